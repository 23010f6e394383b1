"""The token pass: `tokens unpad` (computing on the real tokens of a padded batch) and
`tokens after … merge|prune` (fewer tokens through the later blocks), on packed tokens."""
