"""`slimfx::matmul_without_autocast`: a matmul the caller's `torch.autocast` leaves alone.

    y = torch.ops.slimfx.matmul_without_autocast(a, b, device)

is `torch.matmul(a, b)` computed with the autocast of `device`'s type off (the device the model's region
named), in a and b's own dtype. A model's own code turns autocast off around some products
(transformers 5.17's rotary frequencies, in float32 under `maybe_autocast(enabled=False)`);
capture (passes/autocast_regions.py) puts this op where such a region held a matmul, so a
compiled model called under autocast computes there as the model does, not in bfloat16 (which
export's dtype checks refused: "Tensor dtype mismatch").
"""
import contextlib

import torch

__all__ = ["matmul_without_autocast"]


def _matmul(a: torch.Tensor, b: torch.Tensor, device: torch.device) -> torch.Tensor:
    with _autocast_off(device.type):
        return torch.matmul(a, b)


def _autocast_off(device_type: str):
    # A custom op's body runs with the caller's autocast still on: it is turned off here, for the
    # device the model's region named (a device autocast does not know has none to turn off).
    if not torch.amp.is_autocast_available(device_type):
        return contextlib.nullcontext()
    return torch.autocast(device_type, enabled=False)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:2])
    ctx.device_type = inputs[2].type


def _backward(ctx, grad):
    a, b = ctx.saved_tensors
    # torch.matmul's own gradient (broadcast batch dims summed), taken with autocast off as the
    # forward was (a backward called inside the caller's autocast would compute it in half).
    with torch.enable_grad(), _autocast_off(ctx.device_type):
        a_, b_ = (t.detach().requires_grad_(need) for t, need in zip((a, b), ctx.needs_input_grad))
        wanted = [t for t in (a_, b_) if t.requires_grad]
        grads = iter(torch.autograd.grad(torch.matmul(a_, b_), wanted, grad)) if wanted else iter(())
        return *(next(grads) if t.requires_grad else None for t in (a_, b_)), None


def _register() -> None:
    if not hasattr(torch.ops.slimfx, "matmul_without_autocast"):  # a re-import keeps the first registration
        op = torch.library.custom_op("slimfx::matmul_without_autocast", _matmul, mutates_args=(),
                                     schema="(Tensor a, Tensor b, Device device) -> Tensor")
        op.register_fake(_matmul)
        op.register_autograd(_backward, setup_context=_setup_context)


_register()
matmul_without_autocast = torch.ops.slimfx.matmul_without_autocast.default
