"""A Hugging Face model whose token ids are called `tokens`, as a model of one's own may call
them: shared by the tests that hold slimfx to finding the ids by what reads them, not by name.
A plain module (not conftest) so test files anywhere under tests/ can import it."""
from __future__ import annotations

import torch


class RenamedIds(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, tokens, attention_mask):
        return self.inner(input_ids=tokens, attention_mask=attention_mask)
