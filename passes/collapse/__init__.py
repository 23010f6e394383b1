"""The collapse pass: `collapse` (LaCo merging), `drop` (explicit, by block influence or by
angular distance) and `heal` (a least-squares map at each cut, or LoRA trained on calibration)."""
