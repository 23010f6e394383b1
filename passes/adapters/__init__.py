"""The adapter pass: `adapt` rules (LoRA, DoRA), built on the core primitive passes/lora.py."""
