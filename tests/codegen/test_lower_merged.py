"""Merged GEMM groups (anchors reading one input) whose anchors have different widths and whose
epilogue mixes them, lowered and compared with eager: a scalar gate per token beside its branch,
and a parallel block (Cohere's: attention's q/k/v and the SwiGLU MLP read one norm). An epilogue
node of one anchor's segment read a value another segment computes as if it were an input of
the kernel; lowering then raised AssertionError("… is still read after its group was lowered")."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import slimfx
from graphs import lowered_matches_eager


class ScalarGate(nn.Module):
    """sigmoid(gate(x)) * up(x), gate 16 -> 1 (Qwen2-MoE's shared-expert gate); `up_first` swaps
    the order the two linears run in, which decides the anchor that owns the product."""

    def __init__(self, up_first: bool):
        super().__init__()
        self.gate, self.up, self.up_first = nn.Linear(16, 1), nn.Linear(16, 8), up_first

    def forward(self, x):
        if self.up_first:
            u = self.up(x)
            return u * torch.sigmoid(self.gate(x))
        g = torch.sigmoid(self.gate(x))
        return self.up(x) * g


def test_a_scalar_gate_beside_its_branch_splits_the_merged_gemm():
    torch.manual_seed(0)
    for up_first in (False, True):
        summary = lowered_matches_eager(ScalarGate(up_first), torch.randn(3, 16), torch.randn(1, 16), torch.randn(5, 16))
        assert dict(summary.by_template)["gemm"] == 2  # one kernel per width: the gate is read from memory


class ParallelBlock(nn.Module):
    """One norm feeds q/k/v (widths 16, 8, 8) and gate/up (24, 24) of a SwiGLU MLP."""

    def __init__(self, d: int = 16):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(d, d, bias=False), nn.Linear(d, 8, bias=False), nn.Linear(d, 8, bias=False)
        self.gate, self.up = nn.Linear(d, 24, bias=False), nn.Linear(d, 24, bias=False)
        self.down = nn.Linear(24, d, bias=False)

    def forward(self, x):
        h = F.layer_norm(x, (x.shape[-1],))
        q, k, v = self.q(h), self.k(h), self.v(h)
        mlp = self.down(F.silu(self.gate(h)) * self.up(h))
        return x + mlp + torch.cat([q, k, v], -1).sum(-1, keepdim=True)  # cat stands in for attention


def test_gate_and_up_are_one_segment_beside_projections_of_other_widths():
    torch.manual_seed(0)
    summary = lowered_matches_eager(ParallelBlock(), torch.randn(3, 16), torch.randn(1, 16), torch.randn(7, 16))
    # q/k/v/gate/up one kernel (gate and up computed together, the SwiGLU product in their
    # epilogue), then down with the residual adds.
    assert dict(summary.by_template)["gemm"] == 2 and summary.eager == ()
    assert any("5 GEMMs reading one input" in text for _, text in summary.listings)


def test_a_tiny_cohere_runs_on_the_triton_backend():
    from transformers import CohereConfig, CohereForCausalLM

    torch.manual_seed(0)
    cfg = CohereConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=64, max_position_embeddings=64, use_cache=False,
                       bos_token_id=None, eos_token_id=None, pad_token_id=None)
    model = CohereForCausalLM(cfg).eval()
    ids = torch.randint(0, 64, (2, 8))
    cm = slimfx.compile(model, "", example_inputs={"input_ids": ids}, backend="triton")
    assert any("5 GEMMs reading one input" in text for _, text in cm.lowering.codegen.listings)
    with torch.no_grad():
        for inp in (ids, torch.randint(0, 64, (1, 5))):
            torch.testing.assert_close(cm(input_ids=inp).logits, model(input_ids=inp).logits, atol=2e-5, rtol=2e-5)
