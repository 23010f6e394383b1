"""The token pass: `tokens unpad` (computing on the real tokens of a padded batch) today;
`tokens after … prune|merge` are not implemented yet (compile() refuses them)."""
