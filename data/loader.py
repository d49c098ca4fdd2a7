"""Training and validation batches read from the token shards that data/prepare.py writes.

    loader = TokenLoader("shards/shk", "train", batch_size=8, seq_len=256, seed=0)
    x, y = loader.next_batch()          # int64 (8, 256) each, y[:, t] = the token after x[:, t]

The shards (raw uint16/uint32 .bin files described by meta.json) are memory-mapped, never loaded whole. Each
shard is cut into windows of seq_len+1 tokens with stride seq_len (one token of overlap, so every token is a
target once); windows never cross shards and a shard's last < seq_len tokens are left out.

The windows are read as one endless stream of epochs. With shuffle=True epoch e is the permutation of all
windows drawn from np.random.default_rng([seed, e]); with shuffle=False (validation) it is 0, 1, 2, ...
A step's global batch is the next batch_size * world_size windows of the stream and rank r takes the r-th
slice of batch_size windows, so the global batch does not depend on how it is split over ranks. The whole
state is `position`, the number of windows consumed globally; resuming from it continues exactly.
"""

import functools
import json
from pathlib import Path

import numpy as np
import torch

META_VERSION = 1


class TokenLoader:
    """Fixed-size (x, y) batches of windows from one split of a token-shard directory."""

    def __init__(self, shard_dir: str, split: str, batch_size: int, seq_len: int, seed: int = 0,
                 shuffle: bool = True, rank: int = 0, world_size: int = 1):
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"batch_size and seq_len must be positive, got {batch_size} and {seq_len}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        meta_path = Path(shard_dir) / "meta.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"no token shards in {shard_dir} (no meta.json); make them with "
                                    f"`python -m data.prepare CORPUS --out {shard_dir}`")
        self.meta: dict = json.loads(meta_path.read_text())
        if self.meta.get("version") != META_VERSION:
            raise ValueError(f"{meta_path} has format version {self.meta.get('version')}, this loader reads "
                             f"{META_VERSION}; prepare the shards again")
        if split not in self.meta["splits"]:
            raise ValueError(f"no split {split!r} in {shard_dir}; it has {sorted(self.meta['splits'])}")
        self.shard_dir, self.split = Path(shard_dir), split
        self.batch_size, self.seq_len, self.seed, self.shuffle = batch_size, seq_len, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.tokens_per_batch = batch_size * seq_len  # input tokens in one next_batch() of this rank

        info = self.meta["splits"][split]
        dtype = np.dtype(self.meta["dtype"]).newbyteorder("<")
        self._shards = []
        for s in info["shards"]:
            path = self.shard_dir / s["file"]
            if not path.is_file() or path.stat().st_size != s["n_tokens"] * dtype.itemsize:
                raise ValueError(f"{path} is missing or not {s['n_tokens']} {dtype.name} tokens as meta.json says; "
                                 f"prepare the shards again")
            self._shards.append(np.memmap(path, dtype=dtype, mode="r"))
        per_shard = [(len(m) - 1) // seq_len for m in self._shards]
        self._first = np.cumsum([0] + per_shard)  # index of each shard's first window; last = n_windows
        self.n_windows = int(self._first[-1])
        if self.n_windows == 0:
            raise ValueError(f"split {split!r} of {shard_dir} has {info['n_tokens']:,} tokens in "
                             f"{len(self._shards)} shard(s), fewer than one window of seq_len+1 = {seq_len + 1} "
                             f"tokens in any shard; lower seq_len or give the split more documents")
        self.position = 0
        self._perms: dict[int, np.ndarray] = {}

    @functools.cached_property
    def n_long_docs(self) -> int:
        """Documents of this split longer than seq_len tokens (their EOS included), from the .idx files."""
        n = 0
        for s, tokens in zip(self.meta["splits"][self.split]["shards"], self._shards):
            starts = np.memmap(self.shard_dir / s["file"].replace(".bin", ".idx"), dtype="<i8", mode="r")
            n += int((np.diff(starts, append=len(tokens)) > self.seq_len).sum())
        return n

    def _order(self, epoch: int) -> np.ndarray:
        """Epoch `epoch`'s permutation of window indices (the two most recent epochs are kept)."""
        if epoch not in self._perms:
            rng = np.random.default_rng([self.seed, epoch])
            index_dtype = np.int32 if self.n_windows < 2**31 else np.int64  # half the memory on big corpora
            self._perms = {e: p for e, p in self._perms.items() if e == epoch - 1}
            self._perms[epoch] = rng.permutation(np.arange(self.n_windows, dtype=index_dtype))
        return self._perms[epoch]

    def _window(self, g: int) -> np.ndarray:
        """Tokens of the g-th window of the stream: (seq_len + 1,) int64."""
        epoch, k = divmod(g, self.n_windows)
        w = int(self._order(epoch)[k]) if self.shuffle else k
        s = int(np.searchsorted(self._first, w, side="right")) - 1
        start = (w - int(self._first[s])) * self.seq_len
        return self._shards[s][start:start + self.seq_len + 1].astype(np.int64)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's (x, y) of the next global batch: int64 CPU tensors (batch_size, seq_len)."""
        first = self.position + self.rank * self.batch_size
        w = torch.from_numpy(np.stack([self._window(first + i) for i in range(self.batch_size)]))  # (B, T+1)
        self.position += self.batch_size * self.world_size
        return w[:, :-1].contiguous(), w[:, 1:].contiguous()  # (B, T), (B, T)

    def state_dict(self) -> dict:
        """The stream position (windows consumed by all ranks) plus what must match on resume."""
        return {"position": self.position, "epoch": self.position // self.n_windows, "seed": self.seed,
                "shuffle": self.shuffle, "n_windows": self.n_windows}

    def load_state_dict(self, sd: dict) -> None:
        """Resume at sd's position; the same data, seq_len, seed and shuffle are required."""
        for key in ("n_windows", "seed", "shuffle"):
            if sd[key] != getattr(self, key):
                raise ValueError(f"cannot resume the {self.split!r} loader: saved {key}={sd[key]!r} but this loader "
                                 f"has {getattr(self, key)!r} (different shards, seq_len or seed)")
        self.position = int(sd["position"])

    def reset(self) -> None:
        """Back to the start of the stream (validation reads it from the top each time)."""
        self.position = 0
