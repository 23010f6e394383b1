"""Every masked `tl.load` of a generated source says what a masked-off lane reads (`other=`).

Triton's interpreter (numpy) gives masked-off lanes zeros whatever the source says, so the
interpreter-run tests cannot see a load that lost its `other=`; on a GPU those lanes are
undefined. In the GEMM's K loop that is not harmless: past K the input tile's lanes multiply a
dequantized weight `(0 - zero) * scale`, which is not zero, so garbage is summed into the
outputs."""
from __future__ import annotations

import torch

from slimfx.codegen.emit import emit_all
from slimfx.codegen.partition import partition

from graphs import QuantLinear, SharedInput, capture, capture_module


def _loads(source: str) -> list[str]:
    """The text of every tl.load(...) call in `source` (parentheses matched)."""
    calls, start = [], source.find("tl.load(")
    while start != -1:
        depth, i = 0, start + len("tl.load")
        while True:
            depth += {"(": 1, ")": -1}.get(source[i], 0)
            i += 1
            if depth == 0:
                break
        calls.append(source[start:i])
        start = source.find("tl.load(", i)
    return calls


def _sources() -> list[str]:
    graphs = [capture_module(QuantLinear(70, 24, bits, group, sym, True, "silu", zero=zero), torch.randn(2, 70))
              for bits, group, sym, zero in ((4, 16, True, "int"), (4, 32, False, "int"), (2, 48, False, "float"),
                                             (8, None, False, "int"))]
    graphs.append(capture_module(SharedInput(24, (40, 16, 16), 4, 8, False), torch.randn(2, 24)))
    graphs.append(capture([("linear", (0,)), ("softmax", (1,)), ("layer_norm", (2,)), ("mean", (3,)),
                           ("add", (3, 4))])[0])
    return [k.source for gm in graphs for k in emit_all(partition(gm)).kernels]


def test_every_masked_load_says_what_masked_lanes_read():
    sources = _sources()
    assert any("emit_gemm.py" in s for s in sources) and any("emit_rows.py" in s for s in sources)
    masked = [call for s in sources for call in _loads(s) if "mask=" in call]
    assert len(masked) > 20
    assert not [call for call in masked if "other=" not in call]
