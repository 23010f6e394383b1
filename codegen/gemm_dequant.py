"""The GEMM template's prologue for a packed weight (runtime/formats.py): the lines of a K step
that dequantize anchor j's [BN, BK] weight tile in registers — codes unpacked from the bytes,
group scales and zero points (packed, float, or the implicit middle code) read once each and
broadcast — so codegen/emit_gemm.py's loop multiplies a tile of the input's dtype and the
dequantized weight is never written out."""
from __future__ import annotations

import torch

from .dtypes import narrowed
from .expr import Unsupported
from .kernel import tensor_val

__all__ = ["quant_tile", "zero_kind"]


def zero_kind(zeros) -> str | None:
    """How a quant_linear's zero points are stored (runtime/ops.py tells them apart by dtype):
    None (symmetric), "packed" (uint8, whole zero points) or "float"."""
    if zeros is None:
        return None
    val = tensor_val(zeros)
    if val is None:
        raise Unsupported(f"{zeros.name}: zero points without a tensor value (dtype unknown)")
    return "packed" if val.dtype == torch.uint8 else "float"


def quant_tile(j: int, bits: int, group: int, zeros: str | None, dtype: torch.dtype, k: int) -> list[str]:
    """Dequantize anchor j's [BN, BK] weight tile: codes from the packed bytes, group scales (and
    zero points — packed, float — or the implicit middle code); in float32, then in the input's
    `dtype` for tl.dot. Each byte, scale and zero point of the step is loaded once (not once per
    weight it serves: that was 3 loads per weight, measured in the PTX — codegen/aot.py)."""
    per = 8 // bits
    if per == 1:
        lines = [f"byte = tl.load(qw{j}_ptr + rn[:, None] * KB + kk[None, :], mask=mn[:, None] & mk[None, :], "
                 "other=0).to(tl.int32)", "code = byte"]
    else:  # the step's BK / per bytes, then the codes in input order: code i of a byte is field i
        lines = [f"kb = k0 // {per} + tl.arange(0, BK // {per})",
                 f"byte = tl.load(qw{j}_ptr + rn[:, None] * KB + kb[None, :], mask=mn[:, None] & (kb[None, :] < KB), "
                 "other=0).to(tl.int32)",
                 f"code = {_unpacked('byte', bits)}"]
    loads = [("scale", lambda idx, rows, m: f"tl.load(s{j}_ptr + {rows} * NG + {idx}, mask={m}, other=0.0).to(tl.float32)")]
    if zeros == "packed":  # zero point of group g: field g % per of byte g // per, as the codes
        loads.append(("zero", lambda idx, rows, m: f"((tl.load(z{j}_ptr + {rows} * ZB + {idx} // {per}, mask={m}, "
                                                    f"other=0).to(tl.int32) >> (({idx} % {per}) * {bits})) & "
                                                    f"{(1 << bits) - 1}).to(tl.float32)"))
    elif zeros == "float":
        loads.append(("zero", lambda idx, rows, m: f"tl.load(z{j}_ptr + {rows} * NG + {idx}, mask={m}, other=0.0)"
                                                   ".to(tl.float32)"))
    zero = "zero" if zeros else f"{float(1 << (bits - 1))!r}"
    if group >= k:  # one group per row (per channel): one value per column
        lines += _group_values(group, "one", loads)
    elif group & (group - 1) == 0:  # BK and the group are powers of two: one divides the other
        lines += [f"if BK <= {group}:", *[f"    {ln}" for ln in _group_values(group, "one", loads)],
                  "else:", *[f"    {ln}" for ln in _group_values(group, "many", loads)]]
    else:  # groups that straddle steps: a value per weight
        lines += _group_values(group, "each", loads)
    lines.append(f"w = {narrowed(f'(code.to(tl.float32) - {zero}) * scale', dtype)}")
    return [f"            {ln}" for ln in lines]


def _unpacked(byte: str, bits: int) -> str:
    """The codes of a [BN, B] tile of packed bytes as a [BN, B · 8/bits] tile in input order:
    interleaving fields 0 and 1 of each byte (int4); for int2, fields 0 and 2, and 1 and 3, then
    those two."""
    field = lambda i: f"(({byte} >> {i * bits}) & {(1 << bits) - 1})" if i else f"({byte} & {(1 << bits) - 1})"
    if bits == 4:
        return f"tl.interleave({field(0)}, {field(1)})"
    if bits == 2:
        return f"tl.interleave(tl.interleave({field(0)}, {field(2)}), tl.interleave({field(1)}, {field(3)}))"
    raise Unsupported(f"no unpacking of {bits}-bit codes")


def _group_values(group: int, how: str, loads) -> list[str]:
    """Lines that set each (variable, load) of `loads` to the step's per-group values, as a tile
    that broadcasts against [BN, BK]: "one" — the step lies in one group (the group is a multiple
    of BK, or the whole row): a [BN, 1] column; "many" — the step holds BK / group whole groups:
    [BN, BK / group] values, each repeated group times; "each" — a value per weight."""
    if how == "one":
        pre, idx, rows, m, wrap = [f"g = k0 // {group}"], "g", "rn", "mn", "{}[:, None]"
    elif how == "many":
        pre = [f"sg = k0 // {group} + tl.arange(0, BK // {group})"]
        idx, rows, m = "sg[None, :]", "rn[:, None]", "mn[:, None] & (sg[None, :] < NG)"
        wrap = f"tl.reshape(tl.broadcast_to(({{}})[:, :, None], (BN, BK // {group}, {group})), (BN, BK))"
    else:
        pre, idx, rows, m, wrap = ["mw = mn[:, None] & mk[None, :]"], "(kk[None, :] // GROUP)", "rn[:, None]", "mw", "{}"
    return pre + [f"{var} = {wrap.format(load(idx, rows, m))}" for var, load in loads]
