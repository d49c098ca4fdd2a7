"""A key/value cache for autoregressive decoding: every layer's past keys and values, preallocated.

    cache = KVCache(n_layers, batch_size, n_kv_heads, head_dim, max_len, dtype, device)
    logits = model(prompt_ids, cache=cache)          # prefill: fills positions 0..T-1
    logits = model(next_ids, cache=cache)            # decode: one new position per call

Layer l's keys live in k[l, :, :, :length] as (B, n_kv_heads, length, head_dim). A forward pass appends its
new positions at every layer (append), then the model moves `length` on once (advance), so all layers of a
step see the same offset. Rotary embeddings are applied before caching, so cached keys never change.

When some rows of a batch are finished (generation), keep_rows(index) keeps only the others, so the following
steps compute nothing for the finished ones.
"""

import torch
from torch import Tensor


class KVCache:
    def __init__(self, n_layers: int, batch_size: int, n_kv_heads: int, head_dim: int, max_len: int,
                 dtype: torch.dtype, device: torch.device | str):
        shape = (n_layers, batch_size, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.length = 0  # positions filled so far (the same for every row; padding is masked, not skipped)

    def append(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store k, v (B, n_kv_heads, T, head_dim) after the cached positions; return all keys and values so
        far, (B, n_kv_heads, length + T, head_dim) each (views, no copy)."""
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KVCache full: {end} positions needed, {self.max_len} allocated")
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def broadcast(self, batch_size: int, max_len: int) -> "KVCache":
        """A new cache of batch_size rows and max_len positions, every row starting with this one-row cache's
        filled positions: a prompt prefix computed once, then continued by many rows."""
        if self.k.shape[1] != 1 or max_len < self.length:
            raise ValueError(f"KVCache.broadcast: needs a one-row cache and max_len >= its {self.length} positions; "
                             f"got {self.k.shape[1]} rows, max_len {max_len}")
        L, _, H, _, D = self.k.shape
        out = KVCache(L, batch_size, H, D, max_len, self.k.dtype, self.k.device)
        out.k[:, :, :, :self.length] = self.k[:, :, :, :self.length]  # (L, 1, H, P, D) -> every row
        out.v[:, :, :, :self.length] = self.v[:, :, :, :self.length]
        out.length = self.length
        return out

    def advance(self, n: int) -> None:
        self.length += n

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    def keep_rows(self, rows: list[int]) -> None:
        """Keep only batch rows `rows` (ascending), which become rows 0..n-1 in that order; the others are dropped.

        In place, with no new memory: row rows[j] moves to slot j (j <= rows[j], so a row is read before anything
        overwrites it), copying only its filled positions; rows already in their slot are not touched. k and v then
        are views (n_layers, n, n_kv_heads, max_len, head_dim) of the same storage."""
        ascending = all(a < b for a, b in zip(rows, rows[1:]))
        if not ascending or (rows and not 0 <= rows[0] <= rows[-1] < self.batch_size):
            raise ValueError(f"KVCache.keep_rows: rows must ascend within 0..{self.batch_size - 1}, got {rows}")
        for j, b in enumerate(rows):
            if b != j:
                self.k[:, j, :, :self.length] = self.k[:, b, :, :self.length]  # (n_layers, n_kv_heads, T, head_dim)
                self.v[:, j, :, :self.length] = self.v[:, b, :, :self.length]
        self.k = self.k[:, :len(rows)]  # (n_layers, n, n_kv_heads, max_len, head_dim)
        self.v = self.v[:, :len(rows)]
