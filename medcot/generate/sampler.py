"""Token choice on the device: greedy, temperature, top-p, per-request seeds, EOS masking, for a whole batch.

One call per decode step for all rows, with no host round trip inside: the only sync of a step is the
engine reading the chosen tokens. Rows mix freely (greedy next to sampled, different temperatures/top-p).

Sampling uses the exponential race (Gumbel-max): token = argmax(p / E) with E ~ Exp(1) per vocabulary
entry, which draws from p exactly. E comes from a counter-based hash of (seed, step, token index), not
from a stateful generator, so a seeded request draws the same tokens whatever else runs beside it in the
batch, on any device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_M32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (lowbias32) on int64 tensors holding values in [0, 2**32)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def exponential_noise(seeds: torch.Tensor, steps: torch.Tensor, vocab: int) -> torch.Tensor:
    """E ~ Exp(1) [n, vocab] (fp32), a pure function of each row's (seed, step) and the token index."""
    key = _mix32((seeds & _M32) ^ _mix32(((seeds >> 32) & _M32) ^ _mix32(steps & _M32)))
    idx = (torch.arange(vocab, device=seeds.device, dtype=torch.int64) * 0x9E3779B1) & _M32
    h = _mix32(key[:, None] ^ idx[None, :])
    u = ((h >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))  # (0, 1), 24 bits
    return -torch.log(u)


@dataclass
class RowParams:
    """Host-side sampling parameters of the rows of one step (lists, one entry a row)."""

    temperature: list[float]
    top_p: list[float]
    seeds: list[int]
    steps: list[int]  # tokens the row has drawn so far: the counter of its noise
    block_eos: list[bool]  # EOS may not be chosen (ignore_eos, an answer that must not be empty)


_IDS: dict[tuple, torch.Tensor] = {}


def _device_ids(ids: list[int], device: torch.device) -> torch.Tensor:
    key = (tuple(ids), str(device))
    if key not in _IDS:
        _IDS[key] = torch.tensor(ids, dtype=torch.long, device=device)
    return _IDS[key]


def sample(logits: torch.Tensor, rows: RowParams, eos_ids: list[int]) -> torch.Tensor:
    """Choose one token per row of logits [n, vocab] (fp32, modified in place); returns [n] int64 on the device."""
    device = logits.device
    if eos_ids and any(rows.block_eos):
        eos = _device_ids(eos_ids, device)
        if all(rows.block_eos):
            logits.index_fill_(1, eos, float("-inf"))
        else:
            block = torch.tensor(rows.block_eos, device=device)
            logits[:, eos] = logits[:, eos].masked_fill(block[:, None], float("-inf"))
    greedy = logits.argmax(-1)
    if not any(t > 0 for t in rows.temperature):
        return greedy
    temp = torch.tensor(rows.temperature, dtype=torch.float32, device=device)
    probs = torch.softmax(logits / temp.clamp_min(1e-5)[:, None], dim=-1)
    seeds = torch.tensor(rows.seeds, dtype=torch.int64, device=device)
    steps = torch.tensor(rows.steps, dtype=torch.int64, device=device)
    noise = exponential_noise(seeds, steps, logits.shape[-1])
    if any(p < 1.0 for p in rows.top_p):
        top_p = torch.tensor(rows.top_p, dtype=torch.float32, device=device)
        probs, order = probs.sort(dim=-1, descending=True)
        # Nucleus: keep the most likely tokens until their mass reaches top_p (the first one always stays).
        probs = probs.masked_fill((probs.cumsum(-1) - probs) >= top_p[:, None], 0.0)
        sampled = order.gather(-1, (probs / noise).argmax(-1, keepdim=True))[:, 0]
    else:
        sampled = (probs / noise).argmax(-1)
    return torch.where(temp > 0, sampled, greedy)
