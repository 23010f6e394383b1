"""Which blocks to remove when a rule says `auto(…)`: by block influence (ShortGPT), by the
angular distance across a run (Gromov et al. 2024), or LaCo's merge search. The first two read one
measurement of the residual stream; LaCo tries merges on the graph itself, each trial one
calibration forward with merged weights put in the kept block and the merged blocks skipped
(no recapture, no copy of the model)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ...runtime.progress import Progress
from ..graph import ModelGraph
from ..lent import put_tensor
from ..block_reads import removal_problem
from ..block_rules import angular_room, merge_problem
from .cut import laco_merge
from .streams import StreamSums, angular, final_similarity

__all__ = ["by_influence", "by_angular", "Trial", "laco_trials", "NotEnoughBlocks"]


class NotEnoughBlocks(ValueError):
    """The search cannot remove as many blocks as asked under the rule's constraints."""


def by_influence(sims: StreamSums, count: int, candidates: list[int]) -> list[int]:
    """The `count` candidate blocks of lowest influence 1 − cos(x_in, x_out), in model order."""
    if count > len(candidates):
        raise NotEnoughBlocks(f"{count} blocks asked, {len(candidates)} candidates")
    return sorted(sorted(candidates, key=lambda i: 1 - sims[i, i + 1])[:count])


def by_angular(sims: StreamSums, count: int, max_run: int, candidates: list[int], n_blocks: int) -> list[list[int]]:
    """Runs of at most `max_run` contiguous candidate blocks, `count` blocks in all, chosen greedily
    by the smallest angular distance between what enters a run and what leaves it, the longest
    runs that leave room for the rest first. Runs never touch each other (two adjacent runs would
    be one longer run) and never include the last block."""
    allowed = set(candidates) - {n_blocks - 1}
    runs: list[list[int]] = []
    left = count
    while left > 0:
        best = None
        # The longest runs first, and only one after which the rest can still be taken (block_rules'
        # room): a greedy pick of the best run of max_run could leave no room ("no run of 2 …
        # after choosing [[1, 2]]") where `plan` had counted enough, or find no run of max_run at
        # all in stretches shorter than it (`blocks[::2]`).
        for n in range(min(max_run, left), 0, -1):
            for start in range(0, n_blocks - n):
                run = set(range(start, start + n))
                if not run <= allowed:
                    continue
                rest = allowed - set(range(start - 1, start + n + 1))
                if angular_room(sorted(rest), n_blocks, max_run) < left - n:
                    continue
                d = angular(sims[start, start + n])
                if best is None or d < best[0]:
                    best = (d, sorted(run))
            if best is not None:
                break
        if best is None:
            raise NotEnoughBlocks(f"no run of removable blocks is left after choosing {runs}")
        runs.append(best[1])
        allowed -= set(range(best[1][0] - 1, best[1][-1] + 2))  # a later run may not touch it
        left -= len(best[1])
    return sorted(runs)


@dataclass(frozen=True)
class Trial:
    """One LaCo trial: blocks `merged` (paths) merged into `into`, and the mean cosine of the final
    hidden states to the reference."""

    into: str
    merged: tuple[str, ...]
    similarity: float
    accepted: bool


def laco_trials(graph: ModelGraph, batches, reference: list[torch.Tensor], *, count: int, span: int,
                interval: int, threshold: float, protected: set[str], accept, progress: Progress) -> list[Trial]:
    """LaCo's search (Yang et al. 2024, Algorithm 1): from the top down, try merging the next
    `span` blocks into block l; keep the merge while the final hidden states keep mean cosine ≥
    `threshold` to `reference`, then move down by `interval`, else by one; stop once `count`
    blocks are gone. `accept(keep_block, merged_blocks)` applies an accepted merge to the graph
    (the trial already put the merged weights in the block; it removes the merged blocks)."""
    trials: list[Trial] = []
    removed = 0
    # LaCo starts at L − C for the merge size C it uses: capped by `count`, C is count + 1 at most
    # (from L − span, count=1 never tried the top two blocks). A model of fewer blocks than C
    # starts at its first block (l went negative, and the search ran no trial at all).
    l = max(len(graph.blocks) - min(span, count + 1), 0)
    with progress.task(f"LaCo search ({count} blocks to merge away)", total=count) as step:
        while removed < count and l >= 0:
            c = min(span, count - removed + 1, len(graph.blocks))  # never merge away more than asked
            if c < 2:
                break
            l = min(l, len(graph.blocks) - c)
            run = list(graph.blocks[l:l + c])
            if (any(b.path in protected for b in run) or merge_problem(graph, run[0], run[1:]) is not None
                    or removal_problem(run[1:]) is not None):
                # kept, not built alike (ModernBERT's first layer lacks the attention norm), or a
                # weight tied to a block outside the run (the merge or the removal would reach it)
                l -= 1
                continue
            saved = dict(graph.module.get_submodule(run[0].path).named_parameters())
            laco_merge(graph, run[0], run[1:])
            sim = final_similarity(graph, run[1:], batches, reference)
            ok = sim >= threshold
            trials.append(Trial(run[0].path, tuple(b.path for b in run[1:]), sim, ok))
            if ok:
                accept(run[0], run[1:])
                removed += c - 1
                step(c - 1, note=f"cos {sim:.4f} kept")
                l -= interval
            else:
                _restore(graph, run[0].path, saved)
                step(0, note=f"cos {sim:.4f} < {threshold}")
                l -= 1
    return trials


def _restore(graph: ModelGraph, path: str, saved: dict[str, torch.Tensor]) -> None:
    """Put the block's parameters from before a rejected merge back (laco_merge put new tensors
    in their place and wrote none, so the old ones still hold the old values)."""
    for name, now in graph.module.get_submodule(path).named_parameters():
        if now is not saved[name]:
            put_tensor(graph.module, now, saved[name])
