"""A PEFT model holding a CompiledModel's adapter weights: the outside reference the adapter tests
compare slimfx's LoRA/DoRA forward and merge against."""
from __future__ import annotations

import copy

import torch


def peft_twin(peft, model: torch.nn.Module, cm, *, rank: int, alpha: float, targets: list[str], dora: bool,
              dropout: float = 0.0):
    """get_peft_model over a copy of `model`, its lora_A/lora_B (and DoRA magnitudes) set to cm's."""
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, use_dora=dora, lora_dropout=dropout)
    twin = peft.get_peft_model(copy.deepcopy(model), config).eval()
    ours = dict(cm.program.named_parameters())
    with torch.no_grad():
        for name, p in twin.named_parameters():
            if "lora_" in name:  # base_model.model.<path>.lora_A.default.weight -> <path>.lora_A
                path, _, kind = name.removeprefix("base_model.model.").partition(".lora_")
                p.copy_(ours[f"{path}.lora_{kind.split('.')[0].removesuffix('_vector')}"])
    return twin
