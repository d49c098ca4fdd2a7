"""Training and validation batches read from the token shards that data/prepare.py writes.

    loader = TokenLoader("shards/shk", "train", batch_size=8, seq_len=256, seed=0)
    batch = loader.next_batch()          # a model.batch.Batch: input_ids, labels int64 (8, 256), labels[:, t] = the
                                         # token after input_ids[:, t]

The shards (raw uint16/uint32 .bin files described by meta.json) are memory-mapped, never loaded whole. Each
shard is cut into windows of seq_len+1 tokens with stride seq_len (one token of overlap, so every token is a
target once); windows never cross shards and a shard's last < seq_len tokens are left out.

The windows are read as one endless stream of epochs. With shuffle=True epoch e is the permutation of all
windows drawn from np.random.default_rng([seed, e]); with shuffle=False (validation) it is 0, 1, 2, ...
A step's global batch is the next batch_size * world_size windows of the stream and rank r takes the r-th
slice of batch_size windows, so the global batch does not depend on how it is split over ranks. The whole
state is `position`, the number of windows consumed globally; resuming from it continues exactly.

What is read is checked, so a damaged shard dir stops with a message naming the file and saying to prepare the shards
again, never an IndexError in the embedding later: meta.json (read_meta: valid JSON, this format version, a token
dtype, the vocabulary size, the splits), each .bin's size (a whole number of tokens of the dtype, as many as meta.json
says), and every token id of every batch (< meta.json's vocab_size). The id check is one vectorised max over the
batch: it covers every id that reaches the model at a cost that does not grow with the corpus (a check of whole
shards would read the entire corpus in the first steps of a shuffled stream).
"""

import functools
import json
from pathlib import Path

import numpy as np
import torch

from model.batch import Batch

META_VERSION = 1  # the token-shard format (meta.json + .bin/.idx) that data/prepare.py writes and this module reads
TOKEN_DTYPES = ("uint16", "uint32")
PREPARE_AGAIN = "prepare the shards again (python -m data.prepare CORPUS --out DIR; train.py re-prepares its own)"


class ShardError(ValueError):
    """A token-shard directory that cannot be read as it is: names the file, what is wrong, and what to do."""

    def __init__(self, path: str | Path, problem: str):
        super().__init__(path, problem)
        self.path, self.problem = Path(path), problem

    def __str__(self) -> str:
        return f"{self.path}: {self.problem}; {PREPARE_AGAIN}"


def read_json_object(path: Path) -> dict:
    """The JSON object in `path` (a shard directory's meta.json); ShardError naming it when it is not UTF-8, not
    valid JSON, or not an object."""
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ShardError(path, f"not UTF-8 text (bad byte at offset {e.start})") from None
    except json.JSONDecodeError as e:
        raise ShardError(path, f"not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    if not isinstance(data, dict):
        raise ShardError(path, f"holds a JSON {type(data).__name__}, not an object")
    return data


def read_meta(shard_dir: str | Path) -> dict:
    """meta.json of a token-shard directory, checked (see the module docstring); FileNotFoundError when there is
    none, ShardError when it is damaged, of another format version, or inconsistent."""
    path = Path(shard_dir) / "meta.json"
    if not path.is_file():
        raise FileNotFoundError(f"no token shards in {shard_dir} (no meta.json); make them with "
                                f"`python -m data.prepare CORPUS --out {shard_dir}`")
    meta = read_json_object(path)
    if meta.get("version") != META_VERSION:
        raise ShardError(path, f"format version {meta.get('version')!r}, this version reads {META_VERSION}")
    vocab, dtype = meta.get("vocab_size"), meta.get("dtype")
    if not isinstance(vocab, int) or isinstance(vocab, bool) or vocab < 1:
        raise ShardError(path, f"vocab_size is {vocab!r}, not a positive integer")
    if dtype not in TOKEN_DTYPES:
        raise ShardError(path, f"dtype is {dtype!r}, not one of {TOKEN_DTYPES}")
    if vocab > np.iinfo(dtype).max + 1:
        raise ShardError(path, f"dtype {dtype} cannot hold the ids of a vocabulary of {vocab} (vocab_size)")
    splits = meta.get("splits")
    ok = isinstance(splits, dict) and all(
        isinstance(info, dict) and isinstance(info.get("shards"), list) and isinstance(info.get("n_tokens"), int)
        and all(isinstance(s, dict) and isinstance(s.get("file"), str) and "/" not in s["file"]
                and isinstance(s.get("n_tokens"), int) and s["n_tokens"] >= 0 for s in info["shards"])
        for info in splits.values())
    if not ok:
        raise ShardError(path, "'splits' is not {split: {shards: [{file, n_tokens, n_docs}], n_tokens, ...}}")
    return meta


class TokenLoader:
    """Fixed-size (x, y) batches of windows from one split of a token-shard directory."""

    def __init__(self, shard_dir: str, split: str, batch_size: int, seq_len: int, seed: int = 0,
                 shuffle: bool = True, rank: int = 0, world_size: int = 1):
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"batch_size and seq_len must be positive, got {batch_size} and {seq_len}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.meta: dict = read_meta(shard_dir)
        if split not in self.meta["splits"]:
            raise ValueError(f"no split {split!r} in {shard_dir}; it has {sorted(self.meta['splits'])}")
        self.shard_dir, self.split = Path(shard_dir), split
        self.batch_size, self.seq_len, self.seed, self.shuffle = batch_size, seq_len, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.tokens_per_batch = batch_size * seq_len  # input tokens in one next_batch() of this rank

        info = self.meta["splits"][split]
        dtype = np.dtype(self.meta["dtype"]).newbyteorder("<")
        self.vocab_size: int = self.meta["vocab_size"]
        self._shards, self._paths = [], []
        for s in info["shards"]:
            path = self.shard_dir / s["file"]
            size = path.stat().st_size if path.is_file() else None
            if size is None or size % dtype.itemsize or size // dtype.itemsize != s["n_tokens"]:
                what = ("is missing" if size is None else
                        f"is {size:,} bytes, not a whole number of {dtype.name} tokens" if size % dtype.itemsize else
                        f"holds {size // dtype.itemsize:,} {dtype.name} tokens")
                raise ShardError(path, f"{what}, but meta.json says {s['n_tokens']:,} {dtype.name} tokens")
            self._shards.append(np.memmap(path, dtype=dtype, mode="r") if size else np.empty(0, dtype))
            self._paths.append(path)
        per_shard = [max(len(m) - 1, 0) // seq_len for m in self._shards]
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

    def _locate(self, g: int) -> tuple[int, int]:
        """(shard, first token) of the g-th window of the stream."""
        epoch, k = divmod(g, self.n_windows)
        w = int(self._order(epoch)[k]) if self.shuffle else k
        s = int(np.searchsorted(self._first, w, side="right")) - 1
        return s, (w - int(self._first[s])) * self.seq_len

    def next_batch(self) -> Batch:
        """This rank's rows of the next global batch: input_ids and labels, int64 CPU tensors (batch_size, seq_len)."""
        first = self.position + self.rank * self.batch_size
        where = [self._locate(first + i) for i in range(self.batch_size)]
        w = np.stack([self._shards[s][t:t + self.seq_len + 1] for s, t in where]).astype(np.int64)  # (B, T+1)
        if w.max() >= self.vocab_size:  # one vectorised pass: no id past the vocabulary reaches the embedding
            row, col = np.unravel_index(int(np.argmax(w >= self.vocab_size)), w.shape)
            s, t = where[row]
            raise ShardError(self._paths[s], f"token {t + col:,} has id {w[row, col]}, past the vocabulary of "
                                             f"{self.vocab_size} ids that meta.json gives (the shard is damaged or "
                                             f"meta.json was edited)")
        self.position += self.batch_size * self.world_size
        w = torch.from_numpy(w)
        return Batch.from_windows(w[:, :-1].contiguous(), w[:, 1:].contiguous())  # (B, T), (B, T)

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

    @property
    def n_batches(self) -> int:
        """Batches in one pass over the split for this world size (at least 1; evaluation never wraps around)."""
        return max(1, self.n_windows // (self.batch_size * self.world_size))

    def reset(self) -> None:
        """Back to the start of the stream (validation reads it from the top each time)."""
        self.position = 0
