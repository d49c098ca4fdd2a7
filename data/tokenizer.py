"""Tokenizers: one interface over three back ends, picked from the files a model directory holds.

    tok = get_tokenizer("gpt2")                   # also cl100k_base, o200k_base, o200k_harmony (GPT-OSS)
    tok = load_tokenizer("hf/Qwen2.5-0.5B")       # a model directory: tokenizer.json, else tokenizer.model
    ids = tok.encode("Hello world", eos=True)     # [15496, 995, 50256]
    tok.decode(ids)                               # 'Hello world<|endoftext|>'
    tok.encode("<|im_start|>user", allow_special=True)   # special-token text becomes the special id

Back ends, all giving the same ids as the Hugging Face `tokenizers` library on the same files (tests/test_tokenizer.py
compares them id for id):
- `TiktokenTokenizer` (data/tokenizers/byte_bpe.py): byte-level BPE run by tiktoken's Rust core. It serves the named
  encodings, whose rank files are committed in data/assets (one line per token: base64 bytes, space, rank;
  sha256-checked), and Hugging Face byte-level BPE tokenizer.json files (GPT-2, Llama-3, Qwen2, SmolLM, Granite,
  GPT-OSS), converted into a tiktoken encoding by `tiktoken_from_tokenizer_json`.
- `SentencePieceTokenizer` (data/tokenizers/spm.py): a SentencePiece `.model` file (Llama-2, Mistral, Gemma) run
  by the sentencepiece library.
- `PieceBPETokenizer` (data/tokenizers/piece_bpe.py): SentencePiece-style BPE written as a tokenizer.json (spaces
  as "▁", byte fallback, as in Llama-2's), in pure Python, following the `tokenizers` library step by step.

They fill in `Tokenizer` (data/tokenizers/base.py); data/tokenizers/hf_json.py reads the parts of a tokenizer.json
that more than one of them needs. This module loads a tokenizer from a name, a file or a model directory (with its
tokenizer_config.json, generation_config.json, config.json and chat template), and re-exports the back ends' public
names: import everything from here.

Special and added tokens. A tokenizer's added tokens (HF's `added_tokens`, the specials of a tiktoken encoding, the
control pieces of a SentencePiece model) are matched whole in the text before BPE, the longest leftmost match first,
as `tokenizers` does. Special ones are matched only with `encode(..., allow_special=True)` (what chat templates need);
by default their text is encoded as ordinary text, so a corpus can never inject a control token. Non-special added
tokens (Qwen's `<think>`) are always matched, as in `tokenizers`. `encode_parts` encodes a text made of parts of which
only some may hold special tokens (a chat template's markup may, message contents may not: see data/chat.py).
`add_special_tokens` adds the special tokens a chat template needs to a tokenizer that lacks them (ids from vocab_size
on), and save_pretrained writes them, and any chat template attached through `chat_template_jinja`, so that
transformers and load_tokenizer read the saved directory back to the same ids and template.

vocab_size is exact: the largest id any token has, plus one (a model's embedding must have at least that many rows).
"""

import hashlib
import json
import re
from pathlib import Path

from data.tokenizers.base import AddedToken, Tokenizer, chat_template_from
from data.tokenizers.byte_bpe import (ASSETS, BYTE_TO_UNICODE, CL100K_HF_PATTERN, CL100K_PATTERN, ENDOFPROMPT,
                                      ENDOFTEXT, FIM_MIDDLE, FIM_PREFIX, FIM_SUFFIX, GPT2_PATTERN, GPT2_RANKS,
                                      GPT2_RANKS_SHA256, NAMED_ENCODINGS, O200K_PATTERN, R50K_PATTERN, NamedEncoding,
                                      TiktokenTokenizer, byte_level_decode_text, byte_level_pattern, derive_merges,
                                      get_tokenizer, last_merge, load_tiktoken_ranks, tiktoken_from_tokenizer_json)
from data.tokenizers.hf_json import describe_steps, make_normalizer, steps_of
from data.tokenizers.piece_bpe import PieceBPETokenizer
from data.tokenizers.spm import SentencePieceTokenizer


def _load_json(path: Path) -> dict:
    """A tokenizer JSON file (tokenizer.json, tokenizer_config.json, ...) as a dict; a damaged one raises ValueError
    naming the file and the position, not a bare JSONDecodeError."""
    again = "the file is damaged or cut short: download or copy the model's tokenizer files again"
    try:
        value = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (bad byte at offset {e.start}); {again}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); {again}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: holds a JSON {type(value).__name__}, not an object; {again}")
    return value


def _read_json(path: Path) -> dict:
    """_load_json of an optional file: {} when it is absent."""
    return _load_json(path) if path.is_file() else {}


def _content(value) -> str | None:
    """A token in tokenizer_config.json: a string, or {"content": ...}."""
    return value.get("content") if isinstance(value, dict) else value


def _added_from_config(config: dict) -> list[AddedToken]:
    return [AddedToken(t["content"], int(i), special=t.get("special", True), lstrip=t.get("lstrip", False),
                       rstrip=t.get("rstrip", False), single_word=t.get("single_word", False),
                       normalized=t.get("normalized", False))
            for i, t in config.get("added_tokens_decoder", {}).items()]


def _chat_template(directory: Path | None, config: dict) -> str | None:
    """chat_template.jinja beside the config, else tokenizer_config.json's chat_template (see chat_template_from)."""
    jinja_file = directory / "chat_template.jinja" if directory is not None else None
    text = jinja_file.read_text(encoding="utf-8") if jinja_file is not None and jinja_file.is_file() else None
    return chat_template_from(config, text)


def _post_processor_adds_bos(post: dict | None) -> bool:
    for step in steps_of(post, "processors"):
        if step["type"] == "TemplateProcessing" and "SpecialToken" in step["single"][0]:
            return True
    return False


_CONVENTIONAL = {"bos": ("<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>"),
                 "eos": ("</s>", "<|end_of_text|>", "<eos>", ENDOFTEXT)}


def _set_special_ids(tok: Tokenizer, directory: Path | None, config: dict, tokenizer_json: dict | None = None) -> None:
    """bos / eos / pad / stop_ids / add_bos / chat template, from the first source that has each:
    tokenizer_config.json (and special_tokens_map.json) by token text, generation_config.json then config.json by id
    (eos may be a list there: the first is eos_id unless the tokenizer config names one, all go into stop_ids), and
    for bos / eos, the conventional names among the special tokens."""
    if directory is not None:
        config = _read_json(directory / "special_tokens_map.json") | config
    generation = _read_json(directory / "generation_config.json") if directory else {}
    model_config = _read_json(directory / "config.json") if directory else {}

    def from_config(key: str) -> int | None:
        text = _content(config[f"{key}_token"])
        if text is None:
            return None
        token_id = tok.token_to_id(text)
        if token_id is None:
            raise ValueError(f"{tok.name}: tokenizer_config.json names {key}_token {text!r}, which is not a token")
        return token_id

    def from_ids(key: str) -> list[int]:
        for source in (generation, model_config):
            value = source.get(f"{key}_token_id")
            if value is not None:
                return value if isinstance(value, list) else [value]
        return []

    def conventional(key: str) -> int | None:
        return next((tok.special_tokens[s] for s in _CONVENTIONAL.get(key, ()) if s in tok.special_tokens), None)

    for key in ("bos", "eos", "pad"):
        if f"{key}_token" in config:  # a null there means the tokenizer has none
            token_id = from_config(key)
        else:
            token_id = next(iter(from_ids(key)), getattr(tok, f"{key}_id"))  # else a SentencePiece model's own
            if token_id is None and key != "pad":
                token_id = conventional(key)
        setattr(tok, f"{key}_id", token_id)
    tok.stop_ids = list(dict.fromkeys(i for i in [tok.eos_id, *from_ids("eos")] if i is not None))
    if "add_bos_token" in config:
        tok.add_bos = bool(config["add_bos_token"])
    elif tokenizer_json is not None:
        tok.add_bos = _post_processor_adds_bos(tokenizer_json.get("post_processor"))
    tok.chat_template_jinja = _chat_template(directory, config)
    if tok.vocab_size <= max([i for i in (tok.bos_id, tok.eos_id, tok.pad_id, *tok.stop_ids) if i is not None],
                             default=-1):
        raise ValueError(f"{tok.name}: a bos/eos/pad id is past the vocabulary ({tok.vocab_size} ids)")


def _added_tokens(tokenizer_json: dict, name: str) -> dict[int, AddedToken]:
    """tokenizer.json's added tokens, with the ids HF gives them. HF takes an added token's id from the model's
    vocabulary when its text is there; else it numbers it itself, from the vocabulary's size on, one past the last
    added token, and only warns when the file said otherwise. A file whose ids HF would change is refused."""
    vocab, given, added = tokenizer_json["model"]["vocab"], {}, {}
    for t in tokenizer_json.get("added_tokens", []):
        content = t["content"]
        if content in vocab or content in given:
            hf_id = vocab.get(content, given.get(content))
        else:
            top = max(given.values(), default=None)
            hf_id = len(vocab) if top is None or (top < len(vocab) and vocab) else top + 1
        if hf_id != t["id"]:
            raise ValueError(f"{name}: added token {content!r} has id {t['id']} in tokenizer.json, but HF tokenizers "
                             f"gives it id {hf_id}: added tokens missing from the vocabulary must follow it without "
                             f"gaps (or be in the vocabulary at their id)")
        given[content] = hf_id
        added[hf_id] = AddedToken(content, hf_id, special=t.get("special", False), lstrip=t.get("lstrip", False),
                                  rstrip=t.get("rstrip", False), single_word=t.get("single_word", False),
                                  normalized=t.get("normalized", True))
    return added


def tokenizer_from_json(tokenizer_json: dict, name: str, config: dict | None = None, directory: Path | None = None,
                        files: dict | None = None) -> Tokenizer:
    """A tokenizer from the parsed contents of an HF tokenizer.json (and tokenizer_config.json): byte-level BPE goes
    to tiktoken, SentencePiece-style BPE to PieceBPETokenizer. `directory`, if given, is read for
    generation_config.json, config.json and chat_template.jinja; `files` are what save_pretrained copies."""
    config = config or {}
    model_type = tokenizer_json["model"].get("type", "BPE")
    if model_type != "BPE":
        raise NotImplementedError(f"{name}: tokenizer.json with a {model_type} model is not supported (supported: BPE, "
                                  f"byte-level or SentencePiece-style)")
    added = list(_added_tokens(tokenizer_json, name).values())
    steps = steps_of(tokenizer_json.get("pre_tokenizer"), "pretokenizers")
    if any(s["type"] == "ByteLevel" for s in steps):
        decoder = steps_of(tokenizer_json.get("decoder"), "decoders")
        if [s["type"] for s in decoder] != ["ByteLevel"]:
            raise ValueError(f"{name}: byte-level BPE with the decoder {describe_steps(decoder)} is not supported "
                             f"(supported: ByteLevel)")
        encoding, ranks, drop_from = tiktoken_from_tokenizer_json(tokenizer_json, name, added)
        _, prefix_space = byte_level_pattern(tokenizer_json.get("pre_tokenizer"))
        tok = TiktokenTokenizer(name, encoding, ranks, added, make_normalizer(tokenizer_json.get("normalizer"), name),
                                add_prefix_space=prefix_space,
                                added_bytes={t.id: byte_level_decode_text(t.content) for t in added},
                                hf_files=files or {"tokenizer.json": tokenizer_json}, drop_from=drop_from)
    else:
        tok = PieceBPETokenizer(name, tokenizer_json, added)
        tok.hf_files = files or {"tokenizer.json": tokenizer_json}
    if files is None and config:
        tok.hf_files["tokenizer_config.json"] = config
    _set_special_ids(tok, directory, config, tokenizer_json)
    return tok


def _sentencepiece(model_file: Path, name: str, directory: Path | None, config: dict) -> Tokenizer:
    if re.fullmatch(rb"[A-Za-z0-9+/=]+ \d+", model_file.read_bytes()[:200].split(b"\n")[0]):
        raise NotImplementedError(f"{model_file} is a tiktoken rank file (base64 token, space, rank per line), as "
                                  f"Llama-3's original/tokenizer.model; load the HF tokenizer.json beside it instead")
    tok = SentencePieceTokenizer(name, model_file, _added_from_config(config))
    _set_special_ids(tok, directory, config)
    return tok


def load_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer at `path`: a name of get_tokenizer; a model directory (tokenizer.json, else tokenizer.model,
    with tokenizer_config.json, generation_config.json, config.json and chat_template.jinja where present); a
    tokenizer.json, SentencePiece .model or .tiktoken file."""
    if str(path) in NAMED_ENCODINGS:
        return get_tokenizer(str(path))
    p, name = Path(path), str(path)
    if not p.exists():
        raise FileNotFoundError(f"tokenizer {name!r}: no such file or directory; give a model directory (with "
                                f"tokenizer.json or tokenizer.model), a tokenizer file (.json, .model, .tiktoken) or a "
                                f"name: {', '.join(NAMED_ENCODINGS)}")
    directory = p if p.is_dir() else p.parent
    config = _read_json(directory / "tokenizer_config.json")
    if p.is_dir():
        if (p / "tokenizer.json").is_file():
            p = p / "tokenizer.json"
        elif (p / "tokenizer.model").is_file():
            p = p / "tokenizer.model"
        else:
            raise FileNotFoundError(f"{directory} holds neither tokenizer.json (HF tokenizers) nor tokenizer.model "
                                    f"(SentencePiece); copy the tokenizer files of the model there")
    if p.suffix == ".tiktoken":
        sha = hashlib.sha256(p.read_bytes()).hexdigest()
        known = [n for n, e in NAMED_ENCODINGS.items() if e.sha256 == sha]
        if not known:
            raise ValueError(f"{p} (sha256 {sha}) is not a known tiktoken encoding; a .tiktoken file carries no "
                             f"pre-tokenizer regex or special tokens: build a TiktokenTokenizer with them")
        return get_tokenizer(known[0])
    if p.suffix == ".model":
        return _sentencepiece(p, name, directory, config)
    if p.suffix == ".json":
        files = {"tokenizer.json": p}
        for extra in ("tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
            if (directory / extra).is_file():
                files[extra] = directory / extra
        return tokenizer_from_json(_load_json(p), name, config, directory, files)
    raise ValueError(f"{p}: unknown tokenizer file type {p.suffix!r} (supported: tokenizer.json, .model, .tiktoken)")


__all__ = [
    "ASSETS", "BYTE_TO_UNICODE", "CL100K_HF_PATTERN", "CL100K_PATTERN", "ENDOFPROMPT", "ENDOFTEXT", "FIM_MIDDLE",
    "FIM_PREFIX", "FIM_SUFFIX", "GPT2_PATTERN", "GPT2_RANKS", "GPT2_RANKS_SHA256", "NAMED_ENCODINGS", "O200K_PATTERN",
    "R50K_PATTERN", "AddedToken", "NamedEncoding", "PieceBPETokenizer", "SentencePieceTokenizer", "TiktokenTokenizer",
    "Tokenizer", "derive_merges", "get_tokenizer", "last_merge", "load_tiktoken_ranks", "load_tokenizer",
    "tiktoken_from_tokenizer_json", "tokenizer_from_json",
]
