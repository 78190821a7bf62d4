"""The KV cache of the engine: one static block of `max_len` positions per slot, for every layer.

    k, v: [layers, slots, kv_heads, max_len, head_dim] in the model's dtype

A running request owns one slot from its prefill to its end. Active requests always occupy slots
0..n-1, so a decode step over n requests reads `k[:, :n]` with no gather: when a request leaves, the
request in the highest slot moves into the hole (one copy of its written positions, `move`). The cache is
allocated once, so memory is fixed and known before the first request (`bytes_per_slot`).
"""

from __future__ import annotations

import torch


class SlotKVCache:
    def __init__(self, n_layers: int, slots: int, kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        shape = (n_layers, slots, kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.slots, self.max_len, self.kv_heads, self.head_dim = slots, max_len, kv_heads, head_dim

    @staticmethod
    def bytes_per_slot(n_layers: int, kv_heads: int, max_len: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * n_layers * kv_heads * max_len * head_dim * torch.empty((), dtype=dtype).element_size()

    def decode_index(self, pos: torch.Tensor) -> torch.Tensor:
        """Where one new position per slot 0..b-1 goes (pos [b]): rows of a layer viewed as
        [slots * kv_heads * max_len, head_dim], one per (slot, head). The same for every layer of a step."""
        b = pos.shape[0]
        heads = torch.arange(self.kv_heads, device=pos.device)
        slots = torch.arange(b, device=pos.device)
        return ((slots[:, None] * self.kv_heads + heads[None, :]) * self.max_len + pos[:, None]).reshape(-1)

    def write_decode(self, layer: int, idx: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """k/v [b, kv_heads, head_dim] at `decode_index(pos)` (capturable: no host sync)."""
        self.k[layer].view(-1, self.head_dim).index_copy_(0, idx, k.reshape(-1, self.head_dim))
        self.v[layer].view(-1, self.head_dim).index_copy_(0, idx, v.reshape(-1, self.head_dim))

    def write_prefill(self, layer: int, slots: torch.Tensor, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Positions start..start+T-1 of the given slots: k/v [n, kv_heads, T, head_dim]."""
        t = k.shape[2]
        self.k[layer][slots, :, start:start + t] = k
        self.v[layer][slots, :, start:start + t] = v

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy the first `length` positions of slot `src` into slot `dst` (all layers)."""
        if src != dst and length > 0:
            self.k[:, dst, :, :length].copy_(self.k[:, src, :, :length])
            self.v[:, dst, :, :length].copy_(self.v[:, src, :, :length])
