"""Batches: which rows form each micro-batch, and how they become tensors.

The row order is a pure function of (seed, step), so a resumed run sees exactly the micro-batches
an uninterrupted run would have seen, without saving any sampler state.
"""

from __future__ import annotations

import torch

from .prompts import IGNORE_INDEX, Encoded


def rows_for_step(n_rows: int, step: int, rows_per_step: int, seed: int) -> list[int]:
    """Indices of the rows the optimizer step `step` (0-based) trains on.

    Rows are drawn epoch by epoch, each epoch a fresh permutation seeded by (seed, epoch); a step
    that straddles an epoch boundary takes the end of one permutation and the start of the next.
    """
    out: list[int] = []
    start = step * rows_per_step
    for pos in range(start, start + rows_per_step):
        epoch, i = divmod(pos, n_rows)
        perm = _permutation(n_rows, seed, epoch)
        out.append(perm[i])
    return out


_PERM_CACHE: dict[tuple[int, int, int], list[int]] = {}


def _permutation(n: int, seed: int, epoch: int) -> list[int]:
    key = (n, seed, epoch)
    if key not in _PERM_CACHE:
        g = torch.Generator().manual_seed(seed * 100_003 + epoch)
        _PERM_CACHE[key] = torch.randperm(n, generator=g).tolist()
    return _PERM_CACHE[key]


def pad_collate(rows: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a micro-batch to its longest row; padding is masked out of attention and loss."""
    width = max(len(r.input_ids) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r.input_ids)
        input_ids[i, :n] = torch.tensor(r.input_ids)
        labels[i, :n] = torch.tensor(r.labels)
        attention_mask[i, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def count_loss_tokens(rows: list[Encoded]) -> int:
    """Tokens that carry loss: labels are shifted by one inside the model, so the first never counts."""
    return sum(sum(1 for t in r.labels[1:] if t != IGNORE_INDEX) for r in rows)
