"""Batches: which rows form each micro-batch, and how they become tensors.

The row order is a pure function of (seed, step), so a resumed run sees exactly the micro-batches
an uninterrupted run would have seen, without saving any sampler state.
"""

from __future__ import annotations

import functools

import torch

from medcot.data.prompts import IGNORE_INDEX, Encoded


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


@functools.cache
def _permutation(n: int, seed: int, epoch: int) -> list[int]:
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


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


def pack_collate(rows: list[Encoded]) -> dict[str, torch.Tensor]:
    """Padding-free: concatenate the rows into one sequence, positions restarting at 0 for each document.

    A document is a row, or each of `Encoded.doc_lens` in a pre-training block. With no attention
    mask, transformers reads the position resets as document boundaries and builds a block-diagonal
    causal mask, so no token attends across documents and no compute is spent on padding; with
    `fast.use_packed_attention`, attention instead runs document by document at `row_bounds`.
    The first label of each document is masked: after the model's one-token shift it would otherwise
    ask the last token of the previous document to predict the next one's first token.
    """
    input_ids, labels, positions, bounds = [], [], [], [0]
    for r in rows:
        for start, end in _documents(r):
            bounds.append(bounds[-1] + end - start)
            labels += [IGNORE_INDEX] + r.labels[start + 1 : end]
            positions += range(end - start)
        input_ids += r.input_ids
    as_row = lambda xs: torch.tensor([xs], dtype=torch.long)  # noqa: E731
    # row_bounds stays a Python list: fast.use_packed_attention slices at these offsets, no GPU sync.
    return {"input_ids": as_row(input_ids), "labels": as_row(labels), "position_ids": as_row(positions),
            "row_bounds": bounds}


def micro_batches(rows: list[Encoded], batch_size: int, packing: bool, max_tokens: int) -> list[list[Encoded]]:
    """Group one optimizer step's rows into micro-batches.

    Padded: `batch_size` rows each, as the recipe says. Packed: as many rows as fit in `max_tokens`
    (at least one), so a step of 8 rows of ~800 tokens is one large forward/backward instead of four
    small padded ones: bigger matrix products, and the quantized weights dequantized once, not 4×.
    """
    if not packing:
        return [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]
    groups: list[list[Encoded]] = [[]]
    used = 0
    for r in rows:
        if groups[-1] and used + len(r.input_ids) > max_tokens:
            groups.append([])
            used = 0
        groups[-1].append(r)
        used += len(r.input_ids)
    return groups


def count_loss_tokens(rows: list[Encoded]) -> int:
    """Tokens that carry loss: labels are shifted by one inside the model, so each document's first never counts."""
    return sum(sum(1 for t in r.labels[start + 1 : end] if t != IGNORE_INDEX) for r in rows for start, end in _documents(r))


def _documents(r: Encoded) -> list[tuple[int, int]]:
    """(start, end) of each document in a row: the row itself, or each of a pre-training block's doc_lens."""
    spans, start = [], 0
    for n in r.doc_lens or (len(r.input_ids),):
        spans.append((start, start + n))
        start += n
    return spans
