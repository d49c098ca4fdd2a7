"""Supervised fine-tuning data: conversation files -> messages -> token shards with assistant-only labels, prepared
once, and the memory-mapped reader the packed loader (data/packing.py) draws samples from.

    args = dict(tokenizer="gpt2", template="chatml", format="auto", val_files="", val_fraction=0.05, seed=0,
                system_prompt=None, train_on="assistant", special_tokens_in_content=False, add_missing_tokens=True,
                skip_bad_rows=False)
    shard_dir = sft_shard_dir("chats.jsonl", **args)      # data/cache/sft/chats-<key12>
    meta = prepare_sft("chats.jsonl", shard_dir, **args)  # rank 0 (wait_for_sft on the others)
    train = SFTShards(shard_dir, "train")
    input_ids, labels = train.sample(0)                    # int64, labels[t] = the token after input_ids[t], or -100

Files. `corpus` and `val_files` are a file, a directory (searched recursively), a glob, or a comma-separated list of
them, of .jsonl (one JSON object a line; blank lines ignored), .json (a list of objects) and .parquet (read with
pyarrow) files. Rows are numbered from 1: the line number in a .jsonl, the position in a .json list or a parquet
table; errors name `file:row`.

Formats, detected per file from the first row's fields (or all named by `format`), each normalised to messages:
    messages            {"messages": [{"role", "content"[, "thinking"]}, ...]}        (OpenAI / Hugging Face)
    sharegpt            {"conversations": [{"from": human|user|gpt|assistant|model|system, "value"}, ...]}
    prompt_completion   {"prompt", "completion"}: strings (user, assistant) or message lists (TRL's conversational)
    alpaca              {"instruction", "input"?, "output"}: user = instruction [+ "\\n\\n" + input]
    qa                  {"question", "answer"}                                         (GSM8K)
`system_prompt` becomes the first message of a conversation that has no system (or developer) message.

Rows that cannot be used. A bad row (not an object, a missing or wrongly typed field, an unknown role, content that
is not a string) or one the template refuses (a role it does not have, user/assistant not alternating where it needs
them to) stops preparation with an SFTDataError naming file:row and the field; with skip_bad_rows it is skipped and
counted (meta.json `skipped`: bad_row, template). A row with no assistant turn (no_assistant), or whose every label
is masked (no_learnable), has nothing to learn and is always skipped and counted. An empty file is an error, and so
is a parquet file without the columns of the format (the message lists the columns it has and each format's).

Tokens. Each sample is encoded once with data.chat.encode_chat in the resolved template ("auto": the tokenizer's own,
with the default system prompt its jinja writes; a name; a jinja file). train_on picks what is learned: "assistant"
(every reply and the token that ends it), "last" (the last reply only) or "all"; special-token text inside message
content stays plain text unless special_tokens_in_content. Special tokens the template writes but the vocabulary
lacks are added (add_missing_tokens; the model's embedding grows to vocab_size) or refused with an SFTDataError
naming them. The saved tokenizer carries the template's jinja when it had none (or one of another template).

On disk, in shard_dir/ (written through model/files.output_dir, kind "sft-shards": built in a temp sibling and renamed
into place, so a directory with a meta.json is complete; a failure leaves nothing):
    meta.json           version, kind "sft", dtype, vocab_size (added tokens included), base_vocab_size,
                        added_tokens [{content, id}], tokenizer, eos_id, template, template_jinja_sha256, options
                        (every argument but tokenizer and template; val_fraction null with val_files), key,
                        inputs {corpus, val_files: [{file, size, mtime_ns}]}, formats {file: format}, skipped
                        {reason: count}, skipped_examples (the first 5, file:row: problem), splits {train, val:
                        {n_samples, n_tokens, n_learnable, max_len}}, seconds
    <split>.bin         every sample's tokens back to back (uint16 when the vocabulary fits, else uint32)
    <split>.mask        uint8, 1 where token t is learned (the label of position t-1)
    <split>.idx         int64 offsets of the samples in .bin (n_samples + 1 of them, from 0 to n_tokens)
    tokenizer/          the tokenizer that encoded the data (added tokens, chat template), via save_pretrained

Held-out split: the rows of `val_files`, else each sample goes to val when a stable hash of (seed, file name, row) is
below val_fraction; with two samples or more, each split gets at least one (the sample nearest the threshold moves).

The cache key hashes the input files (path, size, mtime_ns), the template (name and jinja text), the tokenizer (its
name, or the content of its files, with its vocabulary size and added tokens) and every option. prepare_sft reuses
shard_dir when its meta.json holds that key and otherwise prepares it again, replacing it atomically (only a
directory of ours: output_dir refuses anything else). wait_for_sft polls, with no collective, until it does, and
fails when rank 0 leaves a failure note (data.prepare.failure_note).

Reading. SFTShards memory-maps one split; a missing or damaged meta.json, a missing file or one of the wrong size is
a data.loader.ShardError naming the file. lengths[i] is sample i's tokens minus one (its input/label positions);
fingerprint (the key and the split) lets a resumed run check that it reads the same samples.
"""

import functools
import glob
import hashlib
import json
import math
import os
import re
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from data import chat
from data.chat import TEMPLATES, detect_template, encode_chat
from data.loader import TOKEN_DTYPES, ShardError, read_json_object
from data.prepare import preparing, token_dtype, wait_until_prepared
from data.tokenizer import Tokenizer, load_tokenizer
from model.files import cache_dir, output_dir

SFT_VERSION = 1  # the layout of an SFT shard directory (meta.json + <split>.bin/.mask/.idx)
KIND = "sft-shards"  # the output_dir kind of an SFT shard directory
SPLITS = ("train", "val")
SUFFIXES = (".jsonl", ".json", ".parquet")
FIELDS = {"messages": ("messages",), "sharegpt": ("conversations",), "prompt_completion": ("prompt", "completion"),
          "alpaca": ("instruction", "output"), "qa": ("question", "answer")}  # the fields that identify each format
FORMATS = tuple(FIELDS)
ROLES = ("system", "developer", "user", "assistant")  # what a message may be; the template may allow fewer
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
                  "system": "system"}
TRAIN_ON = ("assistant", "all", "last")
SKIP_HINT = "fix the row, or pass --data.skip_bad_rows=true to skip (and count) such rows"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                    "chat_template.jinja", "generation_config.json", "config.json")  # what load_tokenizer reads


class SFTDataError(ValueError):
    """SFT data that cannot be prepared as asked: names the file (and row), what is wrong and what to do."""


class _BadRow(Exception):
    """A row that cannot be normalised; the caller adds file:row. `reason` is its `skipped` counter."""

    def __init__(self, problem: str, reason: str = "bad_row"):
        super().__init__(problem)
        self.problem, self.reason = problem, reason


# ----------------------------------------------------------------------------------------------------------------------
# Files and rows


def list_sft_files(spec: str, what: str = "corpus") -> list[Path]:
    """The .jsonl / .json / .parquet files of `spec` (comma-separated files, directories, globs), each part's files
    sorted, in the order the parts are given, without repeats."""
    found: dict[Path, None] = {}  # ordered, without repeats
    for part in (p.strip() for p in str(spec).split(",")):
        if not part:
            continue
        p = Path(part).expanduser()
        tops = [p] if p.exists() else [Path(g) for g in sorted(glob.glob(str(p), recursive=True))]
        files = []
        for top in tops:
            files += [top] if top.is_file() else sorted(f for f in top.rglob("*") if f.is_file())
        files = [f for f in files if f.name.endswith(SUFFIXES)]
        if not files:
            why = "no such file or directory" if not tops else f"holds no {'/'.join(SUFFIXES)} file"
            raise SFTDataError(f"{what} {part!r}: {why}; give .jsonl, .json or .parquet files, a directory or a glob")
        found |= dict.fromkeys(files)
    if not found:
        raise SFTDataError(f"{what} is empty: give .jsonl, .json or .parquet files, a directory or a glob")
    return list(found)


def _expected_fields() -> str:
    return "; ".join(f"{name}: {', '.join(fields)}" for name, fields in FIELDS.items())


def detect_format(row) -> str | None:
    """The format a row's fields say (see the module docstring), or None."""
    if isinstance(row, dict):
        for name, fields in FIELDS.items():
            if all(f in row for f in fields):
                return name
    return None


def _read_parquet(path: Path, fmt: str) -> Iterator[tuple[int, object]]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises its own error types for a file that is not parquet
        raise SFTDataError(f"{path}: cannot be read as parquet ({e})") from None
    columns = parquet.schema_arrow.names
    wanted = [n for n in FORMATS if fmt in ("auto", n) and all(f in columns for f in FIELDS[n])]
    if not wanted:
        expects = (f"format {fmt!r} expects {', '.join(FIELDS[fmt])}" if fmt != "auto"
                   else f"the formats expect {_expected_fields()}")
        raise SFTDataError(f"{path}: its columns are {', '.join(columns) or '(none)'}; {expects}")
    row = 0
    for batch in parquet.iter_batches(batch_size=1024):
        for r in batch.to_pylist():
            row += 1
            yield row, r


def read_rows(path: Path, fmt: str = "auto") -> Iterator[tuple[int, object]]:
    """(row number, row) of every row of a file; a row that is not valid JSON comes as a _BadRow to raise."""
    if path.name.endswith(".parquet"):
        yield from _read_parquet(path, fmt)
        return
    if path.name.endswith(".json"):
        try:
            rows = json.loads(path.read_bytes().decode("utf-8"))
        except UnicodeDecodeError as e:
            raise SFTDataError(f"{path}: not UTF-8 text (bad byte at offset {e.start})") from None
        except json.JSONDecodeError as e:
            raise SFTDataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
        if not isinstance(rows, list):
            raise SFTDataError(f"{path}: holds a JSON {type(rows).__name__}; a .json file must hold a list of rows "
                               "(or write one row a line to a .jsonl file)")
        yield from enumerate(rows, 1)
        return
    with open(path, "rb") as f:  # streamed; split at b"\n" only (JSON text may hold U+2028, which splitlines cuts at)
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line.decode("utf-8"))
            except UnicodeDecodeError as e:
                yield lineno, _BadRow(f"not UTF-8 text (bad byte at column {e.start + 1})")
            except json.JSONDecodeError as e:
                yield lineno, _BadRow(f"not valid JSON ({e.msg}, column {e.colno})")


def _string(row: dict, field: str, where: str | None = None, optional: bool = False) -> str | None:
    value = row.get(field)
    if value is None and optional:
        return None
    if field not in row:
        raise _BadRow(f"no field {where or field!r} (the row has {', '.join(map(repr, row)) or 'no fields'})")
    if not isinstance(value, str):
        raise _BadRow(f"field {where or field!r} must be a string, not {type(value).__name__}")
    return value


def _message_list(value, field: str) -> list[dict]:
    """An OpenAI / HF message list, checked and copied (role, content, thinking)."""
    if not isinstance(value, list):
        raise _BadRow(f"field {field!r} must be a list of messages, not {type(value).__name__}")
    out = []
    for i, m in enumerate(value):
        where = f"{field}[{i}]"
        if not isinstance(m, dict):
            raise _BadRow(f"{where} must be an object with 'role' and 'content', not {type(m).__name__}")
        role = _string(m, "role", f"{where}.role")
        if role not in ROLES:
            raise _BadRow(f"{where}.role is {role!r}, an unknown role (known: {', '.join(ROLES)})")
        msg = {"role": role, "content": _string(m, "content", f"{where}.content")}
        thinking = _string(m, "thinking", f"{where}.thinking", optional=True)
        if thinking is not None:
            if role != "assistant":
                raise _BadRow(f"{where}.thinking is given, but only assistant messages may have it")
            msg["thinking"] = thinking
        out.append(msg)
    return out


def to_messages(row, fmt: str, system_prompt: str | None = None) -> list[dict]:
    """A row of format `fmt` as a messages list (see the module docstring); raises _BadRow."""
    if not isinstance(row, dict):
        raise _BadRow(f"a row must be a JSON object, not {type(row).__name__}")
    if fmt == "messages":
        if "messages" not in row:
            raise _BadRow(f"no field 'messages' (the row has {', '.join(map(repr, row)) or 'no fields'})")
        messages = _message_list(row["messages"], "messages")
    elif fmt == "sharegpt":
        turns = row.get("conversations")
        if not isinstance(turns, list):
            raise _BadRow("no field 'conversations'" if "conversations" not in row else
                          f"field 'conversations' must be a list of turns, not {type(turns).__name__}")
        messages = []
        for i, t in enumerate(turns):
            if not isinstance(t, dict):
                raise _BadRow(f"conversations[{i}] must be an object with 'from' and 'value', not {type(t).__name__}")
            who = _string(t, "from", f"conversations[{i}].from")
            if who not in SHAREGPT_ROLES:
                raise _BadRow(f"conversations[{i}].from is {who!r}, an unknown role "
                              f"(known: {', '.join(SHAREGPT_ROLES)})")
            messages.append({"role": SHAREGPT_ROLES[who], "content": _string(t, "value", f"conversations[{i}].value")})
    elif fmt == "prompt_completion":
        messages = []
        for field, role in (("prompt", "user"), ("completion", "assistant")):
            value = row.get(field)
            messages += (_message_list(value, field) if isinstance(value, list)
                         else [{"role": role, "content": _string(row, field)}])
    elif fmt == "alpaca":
        user, extra = _string(row, "instruction"), _string(row, "input", optional=True)
        messages = [{"role": "user", "content": user + ("\n\n" + extra if extra else "")},
                    {"role": "assistant", "content": _string(row, "output")}]
    elif fmt == "qa":
        messages = [{"role": "user", "content": _string(row, "question")},
                    {"role": "assistant", "content": _string(row, "answer")}]
    else:
        raise SFTDataError(f"unknown format {fmt!r}; known: auto, {', '.join(FORMATS)}")
    if system_prompt and (not messages or messages[0]["role"] not in ("system", "developer")):
        messages = [{"role": "system", "content": system_prompt}, *messages]
    return messages


# ----------------------------------------------------------------------------------------------------------------------
# Tokenizer and template


def _file_state(path: Path) -> tuple:
    st = path.stat()
    return str(path.resolve()), st.st_size, st.st_mtime_ns


def _tokenizer_state(tokenizer: str) -> tuple:
    """What load_tokenizer(tokenizer) reads, as (path, size, mtime_ns) tuples (for the lru_cache below)."""
    p = Path(tokenizer)
    if not p.exists():
        return (tokenizer,)
    d = p if p.is_dir() else p.parent
    files = [d / f for f in _TOKENIZER_FILES if (d / f).is_file()]
    return (tokenizer, *(_file_state(f) for f in ([p] if p.is_file() else []) + files))


@functools.lru_cache(maxsize=4)
def _loaded(tokenizer: str, state: tuple) -> tuple[Tokenizer, str]:
    """(tokenizer as loaded, its fingerprint): the name, or the sha256 of the files it was loaded from, with its
    vocabulary size and added tokens. Cached by file state; never modify the tokenizer it returns."""
    tok = load_tokenizer(tokenizer)
    h = hashlib.sha256(json.dumps([tok.vocab_size, [[t.content, t.id, t.special] for t in tok.added_tokens]]).encode())
    for item in state[1:]:
        h.update(item[0].encode() + b"\0" + Path(item[0]).read_bytes())
    return tok, (tokenizer if len(state) == 1 else "files") + ":" + h.hexdigest()


def resolve(tok: Tokenizer, template: str) -> tuple[str, str | None, bool]:
    """(template name, its jinja text, whether that jinja is the tokenizer's own or a file's, which encode_chat then
    reads from the tokenizer, default system prompt included). template: "auto" (the tokenizer's own), a name of
    data.chat.TEMPLATES, or a jinja file; see data.chat.resolve_template."""
    try:
        name = chat.resolve_template(tok, template)
    except ValueError as e:
        raise SFTDataError(f"{e} (set --data.chat_template)") from None
    if template in TEMPLATES and detect_template(tok.chat_template_jinja) == name:
        return name, tok.chat_template_jinja, True  # the tokenizer's own: rendered as its jinja does (default system)
    if template in TEMPLATES:
        return name, chat.template_jinja(name), False
    if template == "auto":
        return name, tok.chat_template_jinja, True
    return name, Path(template).read_text(encoding="utf-8"), True


# ----------------------------------------------------------------------------------------------------------------------
# Cache key and directory


def _options(format: str, val_files: str, val_fraction: float, seed: int, system_prompt: str | None, train_on: str,
             special_tokens_in_content: bool, add_missing_tokens: bool, skip_bad_rows: bool) -> dict:
    if format not in ("auto", *FORMATS):
        raise SFTDataError(f"format {format!r}: not one of auto, {', '.join(FORMATS)}; set --data.format")
    if train_on not in TRAIN_ON:
        raise SFTDataError(f"train_on {train_on!r}: not one of {', '.join(TRAIN_ON)}; set --data.train_on")
    if not val_files and not 0.0 < val_fraction < 1.0:
        raise SFTDataError(f"val_fraction must be in (0, 1) when no val_files are given, got {val_fraction}")
    return {"format": format, "val_files": val_files,
            "val_fraction": None if val_files else float(val_fraction),  # unused with val_files: not in the key
            "seed": int(seed),
            "system_prompt": system_prompt or None, "train_on": train_on,
            "special_tokens_in_content": bool(special_tokens_in_content),
            "add_missing_tokens": bool(add_missing_tokens), "skip_bad_rows": bool(skip_bad_rows)}


def _inputs(paths: list[Path]) -> list[dict]:
    return [dict(zip(("file", "size", "mtime_ns"), _file_state(p))) for p in paths]


class _Plan:
    """Everything a preparation depends on, resolved once: files, tokenizer, template, options, and the key."""

    def __init__(self, corpus: str, tokenizer: str, template: str, **options):
        self.options = _options(**options)
        self.corpus, self.tokenizer_name = corpus, str(tokenizer)
        self.train_files = list_sft_files(corpus, "corpus")
        self.val_files = list_sft_files(self.options["val_files"], "val_files") if self.options["val_files"] else []
        self.inputs = {"corpus": _inputs(self.train_files), "val_files": _inputs(self.val_files)}
        try:
            self.base_tok, tok_fingerprint = _loaded(self.tokenizer_name, _tokenizer_state(self.tokenizer_name))
        except FileNotFoundError as e:
            raise SFTDataError(str(e)) from None
        self.template, self.jinja, self.from_tokenizer = resolve(self.base_tok, template)
        what = {"version": SFT_VERSION, "inputs": self.inputs, "template": [self.template, self.jinja or ""],
                "tokenizer": tok_fingerprint, "options": self.options}
        self.key = hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()


def _plan(corpus: str, tokenizer: str, template: str, format: str = "auto", val_files: str = "",
          val_fraction: float = 0.05, seed: int = 0, system_prompt: str | None = None, train_on: str = "assistant",
          special_tokens_in_content: bool = False, add_missing_tokens: bool = True,
          skip_bad_rows: bool = False) -> _Plan:
    return _Plan(corpus, tokenizer, template, format=format, val_files=val_files, val_fraction=val_fraction,
                 seed=seed, system_prompt=system_prompt, train_on=train_on,
                 special_tokens_in_content=special_tokens_in_content, add_missing_tokens=add_missing_tokens,
                 skip_bad_rows=skip_bad_rows)


def sft_shard_dir(corpus: str, **args) -> Path:
    """The default shard directory of these data and settings: <cache_dir>/sft/<first file's stem>-<key[:12]>
    (cache_dir: $NANOFORGE_CACHE or data/cache)."""
    plan = _plan(corpus, **args)
    stem = plan.train_files[0].name.split(".")[0]
    name = re.sub(r"[^\w.-]+", "_", stem) or "sft"
    return cache_dir() / "sft" / f"{name}-{plan.key[:12]}"


# ----------------------------------------------------------------------------------------------------------------------
# Preparation


class _SplitWriter:
    """Appends samples (tokens, mask) to <split>.bin / .mask and remembers their offsets for .idx."""

    def __init__(self, out: Path, split: str, dtype: np.dtype):
        self.out, self.split, self.dtype = out, split, dtype
        self.bin = open(out / f"{split}.bin", "wb", buffering=1 << 20)
        self.mask = open(out / f"{split}.mask", "wb", buffering=1 << 20)
        self.offsets, self.n_learnable, self.max_len = [0], 0, 0

    def add(self, ids: np.ndarray, mask: np.ndarray) -> None:
        self.bin.write(ids.astype(self.dtype, copy=False).tobytes())
        self.mask.write(mask.astype(np.uint8, copy=False).tobytes())
        self.offsets.append(self.offsets[-1] + len(ids))
        self.n_learnable += int(mask[1:].sum())
        self.max_len = max(self.max_len, len(ids) - 1)

    def close(self) -> dict:
        self.bin.close()
        self.mask.close()
        np.asarray(self.offsets, "<i8").tofile(self.out / f"{self.split}.idx")
        return {"n_samples": len(self.offsets) - 1, "n_tokens": self.offsets[-1], "n_learnable": self.n_learnable,
                "max_len": self.max_len}


def _move_one(out: Path, dtype: np.dtype, src: str, dst: str, index: int, splits: dict) -> None:
    """Move sample `index` of split src to the empty split dst (both closed), rewriting src without it (only done
    when a split would otherwise be empty). The old src files are read memory-mapped under another name."""
    for suffix in (".bin", ".mask", ".idx"):
        os.replace(out / f"{src}{suffix}", out / f"{src}{suffix}.old")
    offsets = np.fromfile(out / f"{src}.idx.old", "<i8")
    tokens = np.memmap(out / f"{src}.bin.old", dtype=dtype, mode="r")
    mask = np.memmap(out / f"{src}.mask.old", dtype=np.uint8, mode="r")
    a, b = int(offsets[index]), int(offsets[index + 1])
    moved = _SplitWriter(out, dst, dtype)
    moved.add(tokens[a:b], mask[a:b])
    splits[dst] = moved.close()
    keep = _SplitWriter(out, src, dtype)
    for i in range(len(offsets) - 1):
        if i != index:
            keep.add(tokens[offsets[i]:offsets[i + 1]], mask[offsets[i]:offsets[i + 1]])
    splits[src] = keep.close()
    del tokens, mask
    for suffix in (".bin", ".mask", ".idx"):
        (out / f"{src}{suffix}.old").unlink()


def _val_score(seed: int, path: Path, row: int) -> float:
    """A stable number in [0, 1) for a row: the sample goes to val when it is below val_fraction."""
    digest = hashlib.sha256(f"{seed}\0{path.name}\0{row}".encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2.0**64


def _encoder(tok: Tokenizer, plan: _Plan):
    """messages -> (ids, mask) numpy arrays, with the plan's template and options (mask[t]: token t is learned)."""
    template = None if plan.from_tokenizer else plan.template  # None: the jinja the tokenizer now carries
    options = {"train_on": plan.options["train_on"],
               "special_tokens_in_content": plan.options["special_tokens_in_content"]}

    def encode(messages: list[dict]) -> tuple[np.ndarray, np.ndarray]:
        enc = encode_chat(tok, messages, template, **options)
        return np.asarray(enc.ids, np.int64), np.asarray(enc.assistant_mask, np.uint8)

    return encode


def _prepared_tokenizer(plan: _Plan) -> tuple[Tokenizer, list[dict]]:
    """A fresh tokenizer for the plan: the template's jinja attached when it has none (or another), and the
    template's missing special tokens added (add_missing_tokens) or refused. Returns it and the added tokens."""
    tok = load_tokenizer(plan.tokenizer_name)
    if plan.from_tokenizer:
        tok.chat_template_jinja = plan.jinja
    elif detect_template(tok.chat_template_jinja) != plan.template:
        tok.chat_template_jinja = plan.jinja  # the template the data are written in (None: none we can attach)
    missing = chat.missing_special_tokens(tok, plan.template)
    added = []
    if missing:
        if not plan.options["add_missing_tokens"]:
            raise SFTDataError(f"tokenizer {tok.name!r} lacks the special tokens {', '.join(missing)} that chat "
                               f"template {plan.template!r} writes; pass --data.add_missing_tokens=true to add them "
                               "(the model's embedding grows), or choose the tokenizer's own template")
        ids = tok.add_special_tokens(missing)
        added = [{"content": t, "id": int(i)} for t, i in zip(missing, ids)]
    return tok, added


def _samples(plan: _Plan, encode, skipped: Counter, examples: list[str],
             formats: dict) -> Iterator[tuple[Path, int, str | None, np.ndarray, np.ndarray]]:
    """(file, row, split or None for val_fraction to decide, ids, mask) of every usable row of the plan's files, in
    order; rows left out are counted in `skipped` (and the first few bad ones described in `examples`), each file's
    format goes into `formats`. Raises SFTDataError for a bad row unless skip_bad_rows."""
    opts = plan.options
    jobs = [(p, "train" if plan.val_files else None) for p in plan.train_files] + [(p, "val") for p in plan.val_files]
    for path, split in jobs:
        fmt, n_rows = None if opts["format"] == "auto" else opts["format"], 0
        for row, value in read_rows(path, opts["format"]):
            n_rows += 1
            try:
                if isinstance(value, _BadRow):
                    raise value
                if not isinstance(value, dict):
                    raise _BadRow(f"a row must be a JSON object, not {type(value).__name__}")
                if fmt is None:
                    fmt = detect_format(value)
                    if fmt is None:
                        raise SFTDataError(f"{path}:{row}: the first row's fields ({', '.join(map(repr, value))}) "
                                           f"are no format's; the formats expect {_expected_fields()} (or set "
                                           "--data.format)")
                messages = to_messages(value, fmt, opts["system_prompt"])
                if not any(m["role"] == "assistant" for m in messages):
                    skipped["no_assistant"] += 1
                    continue
                try:
                    ids, mask = encode(messages)
                except ValueError as e:  # data.chat._validate: a role or an order the template does not take
                    raise _BadRow(str(e), "template") from None
            except _BadRow as e:
                if not opts["skip_bad_rows"]:
                    raise SFTDataError(f"{path}:{row}: {e.problem}; {SKIP_HINT}") from None
                skipped[e.reason] += 1
                if len(examples) < 5:
                    examples.append(f"{path}:{row}: {e.problem}")
                continue
            if len(ids) < 2 or not mask[1:].any():
                skipped["no_learnable"] += 1
                continue
            yield path, row, split, ids, mask
        if n_rows == 0:
            raise SFTDataError(f"{path}: the file holds no rows")
        formats[str(path.resolve())] = fmt or opts["format"]


def _prepare(plan: _Plan, out: Path) -> dict:
    """Write the plan's shards, tokenizer and meta.json into the (temporary) directory `out`; return the meta."""
    t0 = time.perf_counter()
    tok, added = _prepared_tokenizer(plan)
    dtype, opts = token_dtype(tok.vocab_size), plan.options
    skipped, examples, formats = Counter(), [], {}
    writers = {s: _SplitWriter(out, s, dtype) for s in SPLITS}
    nearest = {}  # split -> (distance of a score from val_fraction, the sample's index): the one to move if need be
    for path, row, split, ids, mask in _samples(plan, _encoder(tok, plan), skipped, examples, formats):
        if split is None:
            score = _val_score(opts["seed"], path, row)
            split = "val" if score < opts["val_fraction"] else "train"
            if abs(score - opts["val_fraction"]) < nearest.get(split, (math.inf,))[0]:
                nearest[split] = (abs(score - opts["val_fraction"]), len(writers[split].offsets) - 1)
        writers[split].add(ids, mask)
    splits = {s: w.close() for s, w in writers.items()}
    total, counts = sum(s["n_samples"] for s in splits.values()), dict(sorted(skipped.items()))
    inputs = plan.corpus + (f" and {opts['val_files']}" if opts["val_files"] else "")
    if total == 0:
        raise SFTDataError(f"no sample to learn from in {inputs} (skipped: {counts or 'none'})")
    for split, other in (("train", "val"), ("val", "train")):
        if splits[split]["n_samples"] > 0:
            continue
        if plan.val_files:
            source = f"val_files {opts['val_files']!r}" if split == "val" else f"corpus {plan.corpus!r}"
            raise SFTDataError(f"the {split} split is empty: {source} gave no usable sample (skipped: "
                               f"{counts or 'none'}); it needs at least one")
        if splits[other]["n_samples"] < 2:
            raise SFTDataError(f"the {split} split is empty: {inputs} gave {total} usable sample(s) (skipped: "
                               f"{counts or 'none'}) and each split needs one; add samples or give --data.val_files")
        _move_one(out, dtype, other, split, nearest[other][1], splits)
    tok.save_pretrained(out / "tokenizer")
    meta = {"version": SFT_VERSION, "kind": "sft", "dtype": dtype.name, "vocab_size": tok.vocab_size,
            "base_vocab_size": plan.base_tok.vocab_size, "added_tokens": added, "tokenizer": plan.tokenizer_name,
            "eos_id": tok.eos_id, "template": plan.template,
            "template_jinja_sha256": hashlib.sha256(plan.jinja.encode()).hexdigest() if plan.jinja else None,
            "options": opts, "key": plan.key, "inputs": plan.inputs, "formats": formats, "skipped": counts,
            "skipped_examples": examples, "splits": splits, "seconds": round(time.perf_counter() - t0, 2)}
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def _current(shard_dir: str | Path, key: str) -> tuple[dict | None, str]:
    """(meta, "") when shard_dir holds complete shards made with `key`; else (None, why not, "" if nothing there)."""
    try:
        meta = read_sft_meta(shard_dir)
        for split in SPLITS:
            _check_files(Path(shard_dir), meta, split)
    except FileNotFoundError:
        return None, ""
    except ShardError as e:
        return None, f"{e.path.name}: {e.problem}"
    if meta.get("key") != key:
        return None, "it was prepared from other files or settings (its key differs)"
    return meta, ""


def prepare_sft(corpus: str, shard_dir: str | Path, **args) -> dict:
    """meta.json of shard_dir, preparing it first when it is missing, damaged or stale (its key differs). args: see
    the module docstring. A failure leaves a note (data.prepare.failure_note) for the ranks in wait_for_sft."""
    plan = _plan(corpus, **args)
    meta, why = _current(shard_dir, plan.key)
    if meta is not None:
        return meta
    print(f"{shard_dir}: {why}; preparing it again" if why else f"preparing SFT shards in {shard_dir}",
          file=sys.stderr)
    with preparing(shard_dir), output_dir(shard_dir, KIND, overwrite=True) as tmp:
        meta = _prepare(plan, tmp)
    if meta["skipped"]:
        print(f"{shard_dir}: skipped {meta['skipped']}" + "".join(f"\n  {x}" for x in meta["skipped_examples"]),
              file=sys.stderr)
    return meta


def wait_for_sft(corpus: str, shard_dir: str | Path, poll_s: float = 1.0, report_s: float = 60.0,
                 timeout_s: float | None = None, **args) -> dict:
    """meta.json of shard_dir once another process (rank 0, in prepare_sft with the same args) has it current.
    Polls every poll_s seconds with no collective (data.prepare.wait_until_prepared); RuntimeError when that process
    leaves a failure note after this began to wait, TimeoutError after timeout_s (None: never)."""
    key = _plan(corpus, **args).key
    return wait_until_prepared(shard_dir, lambda: _current(shard_dir, key)[0], "SFT shards",
                               "On several nodes it must be on a filesystem they share.", poll_s, report_s, timeout_s)


# ----------------------------------------------------------------------------------------------------------------------
# Reader


def read_sft_meta(shard_dir: str | Path) -> dict:
    """meta.json of an SFT shard directory, checked; FileNotFoundError when there is none, ShardError when it is
    damaged, of another version or kind, or inconsistent."""
    path = Path(shard_dir) / "meta.json"
    if not path.is_file():
        raise FileNotFoundError(f"no SFT shards in {shard_dir} (no meta.json); train.py prepares them (data.kind=sft)")
    meta = read_json_object(path)
    if meta.get("kind") != "sft" or meta.get("version") != SFT_VERSION:
        raise ShardError(path, f"not SFT shards of version {SFT_VERSION} (kind {meta.get('kind')!r}, version "
                               f"{meta.get('version')!r})")
    vocab, dtype = meta.get("vocab_size"), meta.get("dtype")
    if not isinstance(vocab, int) or isinstance(vocab, bool) or vocab < 1:
        raise ShardError(path, f"vocab_size is {vocab!r}, not a positive integer")
    if dtype not in TOKEN_DTYPES or vocab > np.iinfo(dtype).max + 1:
        raise ShardError(path, f"dtype {dtype!r} is not one of {TOKEN_DTYPES} that holds {vocab} ids")
    splits = meta.get("splits")
    fields = ("n_samples", "n_tokens", "n_learnable")
    if not (isinstance(splits, dict) and all(isinstance(splits.get(s), dict) and all(
            isinstance(splits[s].get(f), int) and splits[s][f] >= 0 for f in fields) for s in SPLITS)):
        raise ShardError(path, f"'splits' is not {{train, val: {{{', '.join(fields)}}}}}")
    if not isinstance(meta.get("key"), str):
        raise ShardError(path, "no cache key ('key')")
    return meta


def _check_files(shard_dir: Path, meta: dict, split: str) -> None:
    """ShardError naming the first of <split>.bin/.mask/.idx that is missing or not the size meta.json says."""
    info, itemsize = meta["splits"][split], np.dtype(meta["dtype"]).itemsize
    for suffix, size in ((".bin", info["n_tokens"] * itemsize), (".mask", info["n_tokens"]),
                         (".idx", (info["n_samples"] + 1) * 8)):
        path = shard_dir / f"{split}{suffix}"
        if not path.is_file():
            raise ShardError(path, "is missing")
        if path.stat().st_size != size:
            raise ShardError(path, f"is {path.stat().st_size:,} bytes, but meta.json says {size:,} "
                                   f"({info['n_samples']:,} samples, {info['n_tokens']:,} tokens)")


class SFTShards:
    """One split of an SFT shard directory, memory-mapped: sample(i) -> (input_ids, labels) int64 arrays.

    lengths[i] is sample i's number of (input, label) positions: its tokens minus one. labels[t] is the token after
    input_ids[t] where that token is learned, else -100 (model/batch.py's convention)."""

    def __init__(self, shard_dir: str | Path, split: str):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.shard_dir, self.split = Path(shard_dir), split
        try:
            self.meta: dict = read_sft_meta(shard_dir)
        except FileNotFoundError:
            raise ShardError(self.shard_dir / "meta.json", "is missing: no SFT shards here") from None
        _check_files(self.shard_dir, self.meta, split)
        info = self.meta["splits"][split]
        dtype = np.dtype(self.meta["dtype"]).newbyteorder("<")
        base = self.shard_dir / split

        def mapped(suffix: str, dt) -> np.ndarray:
            return np.memmap(f"{base}{suffix}", dtype=dt, mode="r") if os.path.getsize(f"{base}{suffix}") else \
                np.empty(0, dt)

        self._tokens, self._mask = mapped(".bin", dtype), mapped(".mask", np.uint8)
        self._offsets = np.asarray(mapped(".idx", "<i8"), np.int64)
        idx = Path(f"{base}.idx")
        if self._offsets[0] != 0 or self._offsets[-1] != info["n_tokens"] or np.any(np.diff(self._offsets) < 2):
            raise ShardError(idx, "offsets do not run from 0 to n_tokens with at least 2 tokens a sample")
        self.n_samples: int = info["n_samples"]
        self.n_learnable: int = info["n_learnable"]
        self.lengths: np.ndarray = np.diff(self._offsets) - 1  # (n_samples,) int64
        self.fingerprint: str = f"{self.meta['key']}:{split}"

    def __len__(self) -> int:
        return self.n_samples

    def sample(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids, labels), int64 arrays of lengths[i]: tokens[:-1], and tokens[1:] where learned else -100."""
        if not 0 <= i < self.n_samples:
            raise IndexError(f"sample {i} of {self.n_samples} in {self.shard_dir} ({self.split})")
        a, b = int(self._offsets[i]), int(self._offsets[i + 1])
        tokens = np.asarray(self._tokens[a:b], np.int64)
        labels = np.where(self._mask[a + 1:b] == 1, tokens[1:], -100)
        return tokens[:-1], labels
