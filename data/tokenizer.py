"""Tokenizers: one interface over three back ends, picked from the files a model directory holds.

    tok = get_tokenizer("gpt2")                   # also cl100k_base, o200k_base, o200k_harmony (GPT-OSS)
    tok = load_tokenizer("hf/Qwen2.5-0.5B")       # a model directory: tokenizer.json, else tokenizer.model
    ids = tok.encode("Hello world", eos=True)     # [15496, 995, 50256]
    tok.decode(ids)                               # 'Hello world<|endoftext|>'
    tok.encode("<|im_start|>user", allow_special=True)   # special-token text becomes the special id

Back ends, all giving the same ids as the Hugging Face `tokenizers` library on the same files (tests/test_tokenizer.py
compares them id for id):
- `TiktokenTokenizer`: byte-level BPE run by tiktoken's Rust core. It serves the named encodings, whose rank files
  are committed in data/assets (one line per token: base64 bytes, space, rank; sha256-checked), and Hugging Face
  byte-level BPE tokenizer.json files (GPT-2, Llama-3, Qwen2, SmolLM, Granite, GPT-OSS), converted into a tiktoken
  encoding by `tiktoken_from_tokenizer_json`.
- `SentencePieceTokenizer`: a SentencePiece `.model` file (Llama-2, Mistral, Gemma) run by the sentencepiece library.
- `PieceBPETokenizer`: SentencePiece-style BPE written as a tokenizer.json (spaces as "▁", byte fallback, as in
  Llama-2's), in pure Python, following the `tokenizers` library step by step.

Special and added tokens. A tokenizer's added tokens (HF's `added_tokens`, the specials of a tiktoken encoding, the
control pieces of a SentencePiece model) are matched whole in the text before BPE, the longest leftmost match first,
as `tokenizers` does. Special ones are matched only with `encode(..., allow_special=True)` (what chat templates need);
by default their text is encoded as ordinary text, so a corpus can never inject a control token. Non-special added
tokens (Qwen's `<think>`) are always matched, as in `tokenizers`.

vocab_size is exact: the largest id any token has, plus one (a model's embedding must have at least that many rows).
"""

import base64
import dataclasses
import functools
import hashlib
import heapq
import json
import re
import shutil
import unicodedata
from collections.abc import Callable
from pathlib import Path

import sentencepiece
import tiktoken

ASSETS = Path(__file__).resolve().parent / "assets"
GPT2_RANKS = ASSETS / "gpt2.tiktoken"
GPT2_RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"  # tiktoken's own hash
ENDOFTEXT = "<|endoftext|>"

# Pre-tokeniser patterns: text is cut into pieces by one regex, then each piece is BPE-encoded on its own.
# GPT-2's: contractions, letter runs, digit runs, punctuation runs, each with at most one leading space; whitespace
# runs leave their last space to the word that follows. R50K_PATTERN is tiktoken's faster equivalent (possessive
# quantifiers); GPT2_PATTERN the original, as HF's ByteLevel pre-tokenizer writes it.
R50K_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# cl100k: case-insensitive contractions, a letter run with one optional non-letter before it, digits in threes,
# punctuation runs that keep their trailing newlines, newline runs. CL100K_HF_PATTERN is the same without possessive
# quantifiers (which Oniguruma, HF's regex engine, reads differently in `{1,3}+`), as Llama-3's tokenizer.json has it.
CL100K_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
                  r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s""")
CL100K_HF_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                     r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
# o200k: words split at case changes (an upper-case run, then lower-case letters), contractions attached, digits in
# threes, punctuation runs keep trailing newlines and slashes.
O200K_PATTERN = "|".join([
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""\p{N}{1,3}""", r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""", r"""\s*[\r\n]+""", r"""\s+(?!\S)""", r"""\s+""",
])


# ---------------------------------------------------------------------------------------------------------------------
# The interface
# ---------------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class AddedToken:
    """A token matched whole in the text before BPE (an entry of HF's `added_tokens`, with its flags)."""
    content: str
    id: int
    special: bool = True       # matched only with allow_special=True; dropped by decode(skip_special=True)
    lstrip: bool = False       # the match also swallows the whitespace before it
    rstrip: bool = False       # ... and after it
    single_word: bool = False  # no match inside a word
    normalized: bool = False   # matched in the normalized text (else in the raw text, before normalization)


# Unicode White_Space (what Rust's and Oniguruma's \s mean), for lstrip / rstrip.
_WS = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
_TRAILING_WS, _LEADING_WS = re.compile(f"[{_WS}]*\\Z"), re.compile(f"[{_WS}]*")


class Tokenizer:
    """Text <-> token ids. A back end implements `_encode_chunk`, `decode`, `_vocab_id` and `_hf_files`.

    Attributes: name (the name or path it was loaded from: load_tokenizer(tok.name) loads it again), vocab_size
    (largest id + 1), bos_id / eos_id / pad_id (None when the tokenizer has no such token), stop_ids (every id that
    ends a generation, eos_id first), add_bos (whether the model's own tokenizer prepends BOS by default),
    special_tokens ({text: id} of the special added tokens), added_tokens (all of them, special or not), and
    chat_template_jinja (the jinja chat template from tokenizer_config.json, or None).
    """

    name: str
    vocab_size: int
    bos_id: int | None = None
    eos_id: int | None = None
    pad_id: int | None = None
    stop_ids: list[int]
    add_bos: bool = False
    chat_template_jinja: str | None = None

    def __init__(self, name: str, added: list[AddedToken], normalizer: Callable[[str], str] | None = None):
        self.name = name
        self.added_tokens = sorted(added, key=lambda t: t.id)
        self.special_tokens = {t.content: t.id for t in self.added_tokens if t.special}
        self._added_by_id: dict[int, AddedToken] = {}
        self._added_by_text: dict[str, AddedToken] = {}
        for t in self.added_tokens:
            self._added_by_id.setdefault(t.id, t)  # an id with two spellings decodes to the first one listed
            self._added_by_text.setdefault(t.content, t)
        self._normalizer = normalizer
        self._raw_match = self._matcher([t for t in added if not t.normalized], lambda s: s)
        self._norm_match = self._matcher([t for t in added if t.normalized], normalizer or (lambda s: s))
        self._always_match = any(not t.special for t in added)  # non-special added tokens match even for corpora
        self.stop_ids = []

    # ---- encoding -------------------------------------------------------------------------------------------------

    def encode(self, text: str, bos: bool = False, eos: bool = False, allow_special: bool = False) -> list[int]:
        """Token ids of `text`, optionally wrapped in BOS / EOS.

        allow_special=False: special-token text inside `text` is encoded as ordinary text (for corpora).
        allow_special=True: it becomes the special token's id, as HF `tokenizers` does (for chat templates).
        """
        ids = []
        for i, piece in enumerate(self._split_added(text, allow_special)):
            if isinstance(piece, AddedToken):
                ids.append(piece.id)
            else:
                ids += self._encode_chunk(piece, first=i == 0)
        if bos:
            if self.bos_id is None:
                raise ValueError(f"tokenizer {self.name!r} has no BOS token")
            ids.insert(0, self.bos_id)
        if eos:
            if self.eos_id is None:
                raise ValueError(f"tokenizer {self.name!r} has no EOS token")
            ids.append(self.eos_id)
        return ids

    def encode_batch(self, texts: list[str], allow_special: bool = False) -> list[list[int]]:
        """encode() of each text, no BOS / EOS."""
        return [self.encode(t, allow_special=allow_special) for t in texts]

    def decode(self, ids: list[int], skip_special: bool = False) -> str:
        """Text of `ids` (special tokens as their text unless skip_special); invalid UTF-8 becomes U+FFFD."""
        raise NotImplementedError

    def token_to_id(self, token: str) -> int | None:
        """The id of `token` written as in the tokenizer's own files: an added token's text, or a vocabulary entry
        (byte-level BPE: GPT-2's byte-to-unicode spelling, e.g. "Ġthe"; SentencePiece: the piece, e.g. "▁the")."""
        t = self._added_by_text.get(token)
        return t.id if t is not None else self._vocab_id(token)

    def save_pretrained(self, out_dir: str | Path) -> Path:
        """Write tokenizer files that transformers' AutoTokenizer and our load_tokenizer both load to the same ids."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        for fname, content in self._hf_files().items():
            if isinstance(content, Path):
                shutil.copyfile(content, out / fname)
            elif isinstance(content, dict):
                (out / fname).write_text(json.dumps(content, indent=2, ensure_ascii=False), encoding="utf-8")
            else:
                (out / fname).write_text(content, encoding="utf-8")
        return out

    # ---- chat templates ---------------------------------------------------------------------------------------------

    def apply_chat_template(self, messages: list[dict], template: str | None = None,
                            add_generation_prompt: bool = False, **options) -> "data.chat.ChatEncoding":
        """data.chat.encode_chat(self, ...): the conversation's ids, assistant mask and text. template None: the one
        detected from `chat_template_jinja`; a name ("chatml", "llama3", "harmony", ... see data.chat.TEMPLATES)
        attaches one to a tokenizer that ships none."""
        from data.chat import encode_chat  # data.chat renders; this class only carries the jinja and encodes
        return encode_chat(self, messages, template, add_generation_prompt, **options)

    # ---- for the back ends ----------------------------------------------------------------------------------------

    def _encode_chunk(self, text: str, first: bool) -> list[int]:
        """Ids of normalized text holding no added token; `first`: the chunk starts the whole text."""
        raise NotImplementedError

    def _vocab_id(self, token: str) -> int | None:
        raise NotImplementedError

    def _hf_files(self) -> dict[str, Path | dict | str]:
        """{file name: a file to copy, a dict to write as JSON, or text} for save_pretrained."""
        raise NotImplementedError

    def _matcher(self, tokens: list[AddedToken], normalize):
        """(regex over the tokens' texts, longest first, so the leftmost longest match wins; {text: token})."""
        if not tokens:
            return None
        by_text = {}
        for t in tokens:
            by_text.setdefault(normalize(t.content), t)
        texts = sorted(by_text, key=lambda s: (-len(s), s))
        return re.compile("|".join(map(re.escape, texts))), by_text

    def _split_added(self, text: str, allow_special: bool) -> list:
        """The text cut into normalized chunks (str) and added tokens (AddedToken), as HF's AddedVocabulary does it:
        tokens with normalized=False are found in the raw text, the rest is normalized, then tokens with
        normalized=True are found in the normalized chunks."""
        if not (allow_special or self._always_match):
            return [self._normalizer(text) if self._normalizer else text] if text else []
        pieces = []
        for piece in self._find_added(text, self._raw_match, allow_special):
            if isinstance(piece, AddedToken):
                pieces.append(piece)
            else:
                pieces += self._find_added(self._normalizer(piece) if self._normalizer else piece,
                                           self._norm_match, allow_special)
        return pieces

    @staticmethod
    def _find_added(text: str, matcher, allow_special: bool) -> list:
        if matcher is None:
            return [text] if text else []
        regex, by_text = matcher
        pieces, start = [], 0
        for m in regex.finditer(text):
            t, a, b = by_text[m.group()], m.start(), m.end()
            if t.special and not allow_special:
                continue
            if t.single_word and ((a > 0 and (text[a - 1].isalnum() or text[a - 1] == "_"))
                                  or (b < len(text) and (text[b].isalnum() or text[b] == "_"))):
                continue
            if t.lstrip:
                a = max(start, _TRAILING_WS.search(text, 0, a).start())
            if t.rstrip:
                b = _LEADING_WS.match(text, b).end()
            if a > start:
                pieces.append(text[start:a])
            pieces.append(t)
            start = b
        if start < len(text):
            pieces.append(text[start:])
        return pieces

    def _token_text(self, token_id: int | None) -> str | None:
        if token_id is None:
            return None
        t = self._added_by_id.get(token_id)
        return t.content if t is not None else self._vocab_token(token_id)

    def _vocab_token(self, token_id: int) -> str | None:
        return None

    def _tokenizer_config(self) -> dict:
        """A tokenizer_config.json for transformers: the tokenizer class that reads tokenizer.json / tokenizer.model as
        they are, the bos/eos/pad tokens, and the chat template."""
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": self.add_bos,
                  "add_eos_token": False, "clean_up_tokenization_spaces": False}
        for key, token_id in (("bos_token", self.bos_id), ("eos_token", self.eos_id), ("pad_token", self.pad_id)):
            if token_id is not None:
                config[key] = self._token_text(token_id)
        if self.chat_template_jinja is not None:
            config["chat_template"] = self.chat_template_jinja
        return config

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.name!r}, vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
                f"eos_id={self.eos_id})")


# ---------------------------------------------------------------------------------------------------------------------
# Back end 1: tiktoken (named encodings, HF byte-level BPE)
# ---------------------------------------------------------------------------------------------------------------------

def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible spelling of bytes as printable characters, used by every byte-level BPE vocabulary file:
    printable Latin-1 bytes stand for themselves, the other 68 (controls, space, 0x7F-0xA0, 0xAD) for U+0100 onwards,
    in byte order. So b" the" is spelled "Ġthe" and b"\\n" is "Ċ"."""
    printable = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    out, n = {}, 0
    for b in range(256):
        if b in printable:
            out[b] = chr(b)
        else:
            out[b] = chr(0x100 + n)
            n += 1
    return out


BYTE_TO_UNICODE = _byte_to_unicode()
_BYTES = [bytes([b]) for b in range(256)]
# str.translate tables: alphabet character -> the byte it stands for, as a Latin-1 character; the Latin-1
# characters outside the alphabet -> U+FFFF, which then fails to encode as Latin-1.
_UNSPELL = {ord(c): b for b, c in BYTE_TO_UNICODE.items()} | {
    b: 0xFFFF for b in range(256) if chr(b) not in BYTE_TO_UNICODE.values()}


def _spell(token: bytes) -> str:
    return token.decode("latin-1").translate(BYTE_TO_UNICODE)


def _unspell(token: str) -> bytes | None:
    """The bytes a byte-level vocabulary entry stands for, or None when it is not in the alphabet."""
    try:
        return token.translate(_UNSPELL).encode("latin-1")
    except UnicodeEncodeError:
        return None


class TiktokenTokenizer(Tokenizer):
    """Byte-level BPE through a `tiktoken.Encoding`: the text is cut by the encoding's regex, and each piece of bytes
    is merged pairwise, always merging the adjacent pair whose concatenation has the lowest rank (the rank is the id).

    `added` are the tokens matched before BPE; `added_bytes` what decode writes for each of them (default: its UTF-8
    text); `normalizer` (str -> str) and `add_prefix_space` (a space before every chunk that lacks one) reproduce an
    HF tokenizer.json's normalizer and ByteLevel(add_prefix_space); `hf_pattern` is the regex written into an
    exported tokenizer.json; `hf_files` are the files save_pretrained copies (an HF-sourced tokenizer keeps its own).
    Ids from `drop_from` on stand for single bytes the vocabulary lacks, and are dropped from the output.
    """

    def __init__(self, name: str, encoding: tiktoken.Encoding, ranks: dict[bytes, int], added: list[AddedToken],
                 normalizer: Callable[[str], str] | None = None, add_prefix_space: bool = False, added_bytes: dict[int, bytes] | None = None,
                 hf_pattern: str | None = None, hf_files: dict | None = None, drop_from: int | None = None):
        super().__init__(name, added, normalizer)
        self.encoding, self.ranks, self._drop_from = encoding, ranks, drop_from
        self.vocab_size = max([*ranks.values(), *(t.id for t in added)]) + 1
        self._add_prefix_space = add_prefix_space
        self._added_bytes = {t.id: t.content.encode() for t in reversed(self.added_tokens)} | (added_bytes or {})
        self.hf_pattern, self.hf_files = hf_pattern, hf_files

    @property
    def pattern(self) -> str:
        """The encoding's pre-tokenizer regex."""
        return self.encoding._pat_str

    def _encode_chunk(self, text: str, first: bool) -> list[int]:
        if self._add_prefix_space and not text.startswith(" "):
            text = " " + text
        ids = self.encoding.encode_ordinary(text)
        return ids if self._drop_from is None else [i for i in ids if i < self._drop_from]

    def encode_batch(self, texts: list[str], allow_special: bool = False) -> list[list[int]]:
        if allow_special or self._always_match or self._normalizer or self._add_prefix_space or self._drop_from:
            return super().encode_batch(texts, allow_special)
        return self.encoding.encode_ordinary_batch(texts)  # tiktoken's threads (its Rust core drops the GIL)

    def decode(self, ids: list[int], skip_special: bool = False) -> str:
        out, run = bytearray(), []
        for i in ids:
            t = self._added_by_id.get(i)
            if t is None:
                if not 0 <= i < self.vocab_size:
                    raise ValueError(f"token id {i} is not in tokenizer {self.name!r} (vocab_size {self.vocab_size})")
                run.append(i)
                continue
            out += self._decode_run(run)
            run = []
            if not (skip_special and t.special):
                out += self._added_bytes[i]
        out += self._decode_run(run)
        return out.decode("utf-8", errors="replace")

    def _decode_run(self, ids: list[int]) -> bytes:
        try:
            return self.encoding.decode_bytes(ids) if ids else b""
        except (KeyError, OverflowError) as e:
            raise ValueError(f"tokenizer {self.name!r} (vocab_size {self.vocab_size}) cannot decode {ids}: {e}") from None

    def _vocab_id(self, token: str) -> int | None:
        b = _unspell(token)
        return None if b is None else self.ranks.get(b)

    def _vocab_token(self, token_id: int) -> str | None:
        try:
            return _spell(self.encoding.decode_single_token_bytes(token_id))
        except KeyError:
            return None

    def _hf_files(self) -> dict[str, Path | dict | str]:
        if self.hf_files:
            files = dict(self.hf_files)
            files.setdefault("tokenizer_config.json", self._tokenizer_config())
            return files
        return {"tokenizer.json": self._tokenizer_json(), "tokenizer_config.json": self._tokenizer_config()}

    def _tokenizer_json(self) -> dict:
        """An HF byte-level BPE tokenizer.json with the same ids: vocabulary and merges recovered from the ranks (see
        `derive_merges`), the pre-tokenizer regex as a Split, the added tokens, BOS prepended if add_bos."""
        if self.hf_pattern is None or self._normalizer or self._add_prefix_space or self._drop_from:
            raise ValueError(f"cannot export tokenizer {self.name!r}: give it hf_pattern (its regex as HF's engine "
                             f"reads it), and no normalizer, prefix space or dropped bytes")
        merges = [[_spell(a), _spell(b)] for a, b in derive_merges(self.ranks)]
        post = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
        if self.add_bos and self.bos_id is not None:
            bos = self._token_text(self.bos_id)
            post = {"type": "TemplateProcessing",
                    "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                    "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                             {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
                    "special_tokens": {bos: {"id": bos, "ids": [self.bos_id], "tokens": [bos]}}}
        vocab = {_spell(b): r for b, r in sorted(self.ranks.items(), key=lambda kv: kv[1])}
        added = {t.id: t for t in reversed(self.added_tokens)}  # one spelling per id: the first one listed
        whole = tiktoken.Encoding("probe", pat_str=self.pattern, mergeable_ranks={
            **{_BYTES[b]: b for b in range(256)}, **{t.content.encode(): 256 + k for k, t in enumerate(added.values())}},
            special_tokens={})
        for k, t in enumerate(added.values()):
            # HF numbers an added token missing from the model's vocabulary itself (from the vocabulary's size on),
            # so each goes into the vocabulary too, at its id. BPE never makes it there: no merge does, and the
            # whole-piece lookup of ignore_merges never sees its text as one piece, which the probe checks.
            if t.content in vocab or whole.encode_ordinary(t.content) == [256 + k]:
                raise ValueError(f"cannot export {self.name!r}: the text of added token {t.content!r} is a BPE token "
                                 f"or a whole pre-tokenizer piece")
            vocab[t.content] = t.id
        return {
            "version": "1.0", "truncation": None, "padding": None,
            "added_tokens": [dataclasses.asdict(t) for t in sorted(added.values(), key=lambda t: t.id)],
            "normalizer": None,
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": self.hf_pattern}, "behavior": "Isolated", "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
            "post_processor": post,
            "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
                      "vocab": vocab, "merges": merges},
        }


def load_tiktoken_ranks(path: Path, sha256: str | None = None) -> dict[bytes, int]:
    """Read a `.tiktoken` rank file (lines of `base64(token bytes) rank`), checking its sha256 if given."""
    raw = path.read_bytes()
    if sha256 is not None and hashlib.sha256(raw).hexdigest() != sha256:
        raise ValueError(f"{path} is corrupt: sha256 {hashlib.sha256(raw).hexdigest()} != expected {sha256}")
    ranks = {}
    for line in raw.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def last_merge(token: bytes, ranks: dict[bytes, int]) -> list[bytes]:
    """tiktoken's BPE on the bytes of `token` (without its whole-piece lookup), stopped before its last merge: start
    from single bytes, keep joining the adjacent pair whose concatenation has the lowest rank (the leftmost on a
    tie), stop at two parts, or earlier where no adjacent pair joins into a ranked token."""
    parts = [_BYTES[b] for b in token]
    none = len(ranks) + 2**40  # larger than any rank
    pair_ranks = [ranks.get(parts[i] + parts[i + 1], none) for i in range(len(parts) - 1)]
    while len(parts) > 2:
        best = min(pair_ranks)
        if best == none:
            break
        i = pair_ranks.index(best)
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
        del pair_ranks[i]
        if i > 0:
            pair_ranks[i - 1] = ranks.get(parts[i - 1] + parts[i], none)
        if i < len(parts) - 1:
            pair_ranks[i] = ranks.get(parts[i] + parts[i + 1], none)
    return parts


def derive_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """An HF merge list, in rank order, under which HF's BPE (with ignore_merges) gives tiktoken's ids: for each token
    of two or more bytes, the two parts tiktoken's BPE joins last when it encodes that token's bytes (see
    `last_merge`). A token whose bytes BPE never brings down to two parts gets no merge: BPE can produce it only as
    a whole pre-tokenizer piece, which both tiktoken and HF's ignore_merges look up before merging."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) > 1 and len(parts := last_merge(token, ranks)) == 2:
            merges.append((parts[0], parts[1]))
    return merges


@dataclasses.dataclass(frozen=True)
class NamedEncoding:
    """A tiktoken encoding built from a rank file in data/assets."""
    file: str
    sha256: str
    pattern: str                 # for tiktoken
    hf_pattern: str              # the same split, in a form HF's Oniguruma engine reads identically
    specials: dict[str, int]     # text -> id; two texts may share an id (the first one listed is how it decodes)
    bos: str | None
    eos: str
    pad: str | None = None
    stops: tuple[str, ...] = ()  # more tokens that end a generation


FIM_PREFIX, FIM_MIDDLE, FIM_SUFFIX, ENDOFPROMPT = "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|endofprompt|>"
_O200K_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"
# GPT-OSS's Harmony format: o200k_base ranks plus its own specials, the rest of 199998..201087 reserved.
_HARMONY = {"<|startoftext|>": 199998, ENDOFTEXT: 199999, "<|return|>": 200002, "<|constrain|>": 200003,
            "<|channel|>": 200005, "<|start|>": 200006, "<|end|>": 200007, "<|message|>": 200008, "<|call|>": 200012,
            ENDOFPROMPT: 200018}
_HARMONY_RESERVED = [200000, 200001, 200004, 200009, 200010, 200011, *range(200013, 201088)]

# As in GPT-2, the cl100k / o200k encodings' one document token <|endoftext|> also serves as BOS.
NAMED_ENCODINGS = {
    "gpt2": NamedEncoding("gpt2.tiktoken", GPT2_RANKS_SHA256, R50K_PATTERN, GPT2_PATTERN, {ENDOFTEXT: 50256},
                          bos=ENDOFTEXT, eos=ENDOFTEXT),
    "cl100k_base": NamedEncoding(
        "cl100k_base.tiktoken", "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7", CL100K_PATTERN,
        CL100K_HF_PATTERN, {ENDOFTEXT: 100257, FIM_PREFIX: 100258, FIM_MIDDLE: 100259, FIM_SUFFIX: 100260,
                            ENDOFPROMPT: 100276}, bos=ENDOFTEXT, eos=ENDOFTEXT),
    "o200k_base": NamedEncoding("o200k_base.tiktoken", _O200K_SHA256, O200K_PATTERN, O200K_PATTERN,
                                {ENDOFTEXT: 199999, ENDOFPROMPT: 200018}, bos=ENDOFTEXT, eos=ENDOFTEXT),
    "o200k_harmony": NamedEncoding(  # bos/eos/pad/stops as GPT-OSS's tokenizer_config and generation_config
        "o200k_base.tiktoken", _O200K_SHA256, O200K_PATTERN, O200K_PATTERN,
        _HARMONY | {f"<|reserved_{i}|>": i for i in _HARMONY_RESERVED}, bos="<|startoftext|>", eos="<|return|>",
        pad=ENDOFTEXT, stops=(ENDOFTEXT, "<|call|>")),
}


@functools.lru_cache(maxsize=None)
def _ranks(file: str, sha256: str) -> dict[bytes, int]:
    return load_tiktoken_ranks(ASSETS / file, sha256)


@functools.lru_cache(maxsize=None)
def _encoding(name: str) -> tiktoken.Encoding:
    e = NAMED_ENCODINGS[name]
    ranks = _ranks(e.file, e.sha256)
    return tiktoken.Encoding(name, pat_str=e.pattern, mergeable_ranks=ranks, special_tokens=e.specials)


def get_tokenizer(name: str) -> Tokenizer:
    """The named tiktoken encoding (see NAMED_ENCODINGS), built from the rank files in data/assets."""
    if name not in NAMED_ENCODINGS:
        raise ValueError(f"unknown tokenizer {name!r}; known: {', '.join(NAMED_ENCODINGS)} (for a model directory "
                         f"or a tokenizer file, use load_tokenizer(path))")
    e = NAMED_ENCODINGS[name]
    tok = TiktokenTokenizer(name, _encoding(name), _ranks(e.file, e.sha256),
                            [AddedToken(s, i) for s, i in e.specials.items()], hf_pattern=e.hf_pattern)
    tok.bos_id, tok.eos_id = e.specials.get(e.bos), e.specials[e.eos]
    tok.pad_id = e.specials.get(e.pad)
    tok.stop_ids = [tok.eos_id, *(e.specials[s] for s in e.stops)]
    return tok


# ---- HF tokenizer.json, byte-level BPE -> tiktoken ---------------------------------------------------------------------

def _steps(component: dict | None, key: str) -> list[dict]:
    """The steps of an HF normalizer / pre-tokenizer / decoder, a Sequence flattened."""
    if component is None:
        return []
    if component["type"] == "Sequence":
        return [s for sub in component[key] for s in _steps(sub, key)]
    return [component]


def _describe(steps: list[dict]) -> str:
    return "[" + ", ".join(json.dumps(s, ensure_ascii=False) for s in steps) + "]"


_UNICODE_FORMS = ("NFC", "NFD", "NFKC", "NFKD")


def _byte_level_pattern(pre_tokenizer: dict | None) -> tuple[str, bool]:
    """(one tiktoken regex that cuts text exactly as the pre-tokenizer does, add_prefix_space).

    Supported, which covers the byte-level tokenizers in use:
    - ByteLevel(use_regex=True): GPT-2's regex (GPT-2, RoBERTa-style add_prefix_space).
    - Split(Regex R, Isolated) then ByteLevel(use_regex=False) (Llama-3, Qwen2, GPT-OSS): R, plus an alternative that
      takes a run of characters where R does not match, which Isolated keeps as a piece and a findall would drop.
    - Digits then ByteLevel(use_regex=True) (StarCoder, SmolLM, Granite): digits are cut off first (one by one with
      individual_digits), then GPT-2's regex runs inside each remaining piece. As one regex: digits first, GPT-2's
      alternatives without the digit one, and a whitespace run ending before a digit counts as ending its piece.
    """
    steps = _steps(pre_tokenizer, "pretokenizers")
    kinds = [s["type"] for s in steps]
    if kinds and kinds[-1] == "ByteLevel":
        prefix_space, use_regex = steps[-1].get("add_prefix_space", True), steps[-1].get("use_regex", True)
        if kinds == ["ByteLevel"] and use_regex:
            return GPT2_PATTERN, prefix_space
        split = steps[0]
        if (kinds == ["Split", "ByteLevel"] and not use_regex and not prefix_space and "Regex" in split["pattern"]
                and split["behavior"] == "Isolated" and not split.get("invert", False)):
            r = split["pattern"]["Regex"]
            return rf"(?:{r})|(?:(?!(?:{r}))[\s\S])+", False
        if kinds == ["Digits", "ByteLevel"] and use_regex and not prefix_space:
            digits = r"\p{N}" if split.get("individual_digits", False) else r"\p{N}+"
            return (rf"{digits}|'s|'t|'re|'ve|'m|'ll|'d| ?\p{{L}}+| ?[^\s\p{{L}}\p{{N}}]+|\s+(?![^\s\p{{N}}])|\s+",
                    False)
    raise ValueError(f"cannot reproduce the pre-tokenizer {_describe(steps)} exactly with one regex; supported: "
                     f"ByteLevel(use_regex=True), Split(Regex, Isolated) + ByteLevel(use_regex=False), "
                     f"Digits + ByteLevel(use_regex=True, add_prefix_space=False)")


def _normalizer(normalizer: dict | None, name: str) -> Callable[[str], str] | None:
    """str -> str for an HF normalizer made of Unicode normal forms (Qwen2's NFC), Prepend and Replace of a plain
    string (Llama-2's "▁" dummy prefix and space escaping); None for no normalizer."""
    steps = _steps(normalizer, "normalizers")
    for s in steps:
        if not (s["type"] in ("Prepend", *_UNICODE_FORMS) or (s["type"] == "Replace" and "String" in s["pattern"])):
            raise ValueError(f"{name}: cannot reproduce the normalizer {_describe(steps)}; supported: Prepend, "
                             f"Replace(String), {', '.join(_UNICODE_FORMS)}")
    return functools.partial(_apply_normalizer, steps) if steps else None


def _apply_normalizer(steps: list[dict], text: str) -> str:
    for s in steps:
        if s["type"] == "Prepend":
            text = s["prepend"] + text if text else text
        elif s["type"] == "Replace":
            text = text.replace(s["pattern"]["String"], s["content"])
        else:
            text = unicodedata.normalize(s["type"], text)
    return text


def _merge_pairs(model: dict) -> list[tuple[str, str]]:
    return [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]


def _check_bpe_options(model: dict, where: str) -> None:
    if model.get("dropout") not in (None, 0, 0.0):
        raise ValueError(f"{where}: BPE dropout {model['dropout']} is random; only deterministic BPE is supported")
    if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        raise ValueError(f"{where}: BPE continuing_subword_prefix / end_of_word_suffix are not supported")


def tiktoken_from_tokenizer_json(tj: dict, name: str, added: list[AddedToken]) -> tuple[tiktoken.Encoding,
                                                                                     dict[bytes, int], int | None]:
    """A tiktoken encoding with the same ids as an HF byte-level BPE tokenizer.json, its rank table, and the first
    placeholder id (or None).

    Ranks come from the vocabulary: each entry, spelled in GPT-2's byte-to-unicode alphabet, is turned back into
    bytes, and its id becomes its rank (vocabulary entries that are added tokens are left out: they are matched whole
    before BPE). Ids need not be contiguous.

    Single bytes missing from the vocabulary (SmolLM's lacks a few control characters and bytes that never occur in
    UTF-8) are dropped by HF after pre-tokenization. Here they get placeholder ranks past every id, which the
    tokenizer drops from the output; that is the same except where such a byte sits between two symbols of a
    pre-tokenizer piece that have a merge: HF, having removed the byte first, joins them, tiktoken cannot.

    HF's BPE and tiktoken's differ: HF joins the adjacent pair that comes first in the merge list, tiktoken the
    pair whose concatenation has the lowest rank, and tiktoken considers every pair whose concatenation is in the
    vocabulary, HF only listed ones. They take the same steps on every text when
    (1) the merges are listed in order of the id they make (ties allowed), and
    (2) for every vocabulary token t of two or more bytes, the two parts that tiktoken's BPE on t's bytes joins last
        (`last_merge`) are a listed merge.
    Why: the parts tiktoken has formed inside any stretch of text were merged in the same order as BPE on that
    stretch's bytes alone, so two adjacent parts that would join into t are always last_merge(t), a listed merge
    by (2), with the same priority by (1); extra merges (Llama-3 lists several per token) are never met. A token
    whose bytes BPE never brings down to two parts comes out only as a whole pre-tokenizer piece, which tiktoken looks
    up before merging, as HF does with ignore_merges (without it, every token must come down to two parts).
    Both conditions are checked: a tokenizer that fails them is refused rather than tokenized differently.
    """
    model = tj["model"]
    _check_bpe_options(model, name)
    if model.get("byte_fallback"):
        raise ValueError(f"{name}: byte-level BPE with byte_fallback is not supported")
    vocab: dict[str, int] = model["vocab"]
    added_ids = {t.id for t in added}
    ranks: dict[bytes, int] = {}
    for token, token_id in vocab.items():
        if token_id in added_ids:
            continue
        b = _unspell(token)
        if b is None:
            raise ValueError(f"{name}: vocabulary entry {token!r} (id {token_id}) is not spelled in the byte-level "
                             f"alphabet, and is not an added token")
        if b in ranks:
            raise ValueError(f"{name}: ids {ranks[b]} and {token_id} spell the same bytes {b!r}")
        ranks[b] = token_id
    missing = [b for b in range(256) if _BYTES[b] not in ranks]
    if missing and model.get("unk_token") is not None:
        raise ValueError(f"{name}: byte-level vocabulary lacks {len(missing)} single bytes, which would become "
                         f"{model['unk_token']!r}; not supported")

    pairs, last = set(), -1  # spelled strings concatenate as their bytes do, so the vocabulary is looked up as is
    for k, (a, b) in enumerate(_merge_pairs(model)):
        ia, ib, made = vocab.get(a), vocab.get(b), vocab.get(a + b)
        if ia is None or ib is None or made is None or not added_ids.isdisjoint((ia, ib, made)):
            raise ValueError(f"{name}: merge #{k} ({a!r}, {b!r}) joins or makes a token that is not a BPE vocabulary "
                             f"entry")
        if made < last:
            raise ValueError(f"{name}: merge #{k} ({a!r}, {b!r}) makes id {made} after a merge made id {last}; "
                             f"tiktoken merges by id, so it would tokenize differently")
        last = made
        pairs.add((ia, ib))
    whole_pieces = model.get("ignore_merges", False)
    for token, rank in ranks.items():
        if len(token) > 1:
            parts = last_merge(token, ranks)
            if len(parts) == 2 and (ranks[parts[0]], ranks[parts[1]]) in pairs or len(parts) > 2 and whole_pieces:
                continue
            raise ValueError(f"{name}: BPE on the bytes of token {rank} ({_spell(token)!r}) ends by joining "
                             f"{[_spell(p) for p in parts]}, which the merge list does not join; tiktoken would "
                             f"tokenize differently")

    pattern, _ = _byte_level_pattern(tj.get("pre_tokenizer"))
    specials = {t.content: t.id for t in added if t.id not in set(ranks.values())}
    drop_from = max([*ranks.values(), *added_ids]) + 1 if missing else None
    placeholders = {_BYTES[b]: drop_from + k for k, b in enumerate(missing)}
    encoding = tiktoken.Encoding(name, pat_str=pattern, mergeable_ranks=ranks | placeholders, special_tokens=specials)
    return encoding, ranks, drop_from


def _byte_level_decode_text(content: str) -> bytes:
    """What HF's ByteLevel decoder writes for a token: its bytes if spelled in the alphabet, else its UTF-8 text."""
    b = _unspell(content)
    return content.encode() if b is None else b


# ---------------------------------------------------------------------------------------------------------------------
# Back end 2: SentencePiece .model files
# ---------------------------------------------------------------------------------------------------------------------

class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model (protobuf `.model`: pieces with scores and types, a normalizer spec, the BPE or unigram
    algorithm), run by the sentencepiece library.

    Its control pieces (<s>, </s>) and unknown piece (<unk>) are the special tokens, plus any tokenizer_config.json
    adds (ids past the model's pieces included). Text between special tokens is encoded chunk by chunk, each with
    SentencePiece's dummy-prefix space, which is what HF's conversion of the same file does (transformers'
    "legacy" behaviour); decode writes each chunk back the same way, so decode(encode(text)) == text. User-defined
    pieces are matched by SentencePiece itself, also in corpora.
    """

    def __init__(self, name: str, model_file: Path, extra: list[AddedToken] = ()):
        self.sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
        self.model_file = model_file
        n = self.sp.get_piece_size()
        added = {i: AddedToken(self.sp.id_to_piece(i), i) for i in range(n)
                 if self.sp.is_control(i) or self.sp.is_unknown(i)}
        for t in extra:
            if t.id not in added and (t.id >= n or t.special):
                added[t.id] = t
        super().__init__(name, list(added.values()))
        self.vocab_size = max([n, *(i + 1 for i in added)])
        self.bos_id, self.eos_id, self.pad_id = (i if i >= 0 else None for i in (self.sp.bos_id(), self.sp.eos_id(),
                                                                                  self.sp.pad_id()))
        self.add_bos = self.bos_id is not None  # Llama, Mistral and Gemma all start a sequence with BOS

    def _encode_chunk(self, text: str, first: bool) -> list[int]:
        return self.sp.encode(text)

    def encode_batch(self, texts: list[str], allow_special: bool = False) -> list[list[int]]:
        if allow_special or self._always_match:
            return super().encode_batch(texts, allow_special)
        return self.sp.encode(texts)

    def decode(self, ids: list[int], skip_special: bool = False) -> str:
        out, run = [], []
        n = self.sp.get_piece_size()
        for i in ids:
            t = self._added_by_id.get(i)
            if t is None:
                if not 0 <= i < n:
                    raise ValueError(f"token id {i} is not in tokenizer {self.name!r} (vocab_size {self.vocab_size})")
                run.append(i)
                continue
            out.append(self.sp.decode(run))
            run = []
            if not (skip_special and t.special):
                out.append(t.content)
        out.append(self.sp.decode(run))
        return "".join(out)

    def _vocab_id(self, token: str) -> int | None:
        i = self.sp.piece_to_id(token)
        return i if self.sp.id_to_piece(i) == token else None

    def _vocab_token(self, token_id: int) -> str | None:
        return self.sp.id_to_piece(token_id) if 0 <= token_id < self.sp.get_piece_size() else None

    def _hf_files(self) -> dict[str, Path | dict | str]:
        """tokenizer.model and a tokenizer_config.json naming PreTrainedTokenizerFast, for which transformers converts
        the model following its own settings (merges by piece score, dummy prefix per chunk)."""
        config = self._tokenizer_config()
        config["unk_token"] = self.sp.id_to_piece(self.sp.unk_id())
        config["added_tokens_decoder"] = {str(t.id): {"content": t.content, "lstrip": t.lstrip, "rstrip": t.rstrip,
                                                      "normalized": False, "single_word": t.single_word,
                                                      "special": t.special} for t in self.added_tokens}
        return {"tokenizer.model": self.model_file, "tokenizer_config.json": config}


# ---------------------------------------------------------------------------------------------------------------------
# Back end 3: SentencePiece-style BPE from tokenizer.json, pure Python
# ---------------------------------------------------------------------------------------------------------------------

class PieceBPETokenizer(Tokenizer):
    """BPE over characters with "▁" for spaces and byte fallback, from a tokenizer.json (Llama-2's), in pure Python.

    The steps, as the `tokenizers` library takes them for each chunk between added tokens:
    1. normalizer: e.g. Prepend("▁") then Replace(" ", "▁") (SentencePiece's dummy prefix and space escaping);
       or a Metaspace pre-tokenizer doing the same (prepend_scheme "always", or "first": only at the text's start).
    2. the chunk's characters become symbols: a character's vocabulary id, else (byte_fallback) one <0xXX> token per
       UTF-8 byte, else the unknown token (consecutive unknowns fused into one with fuse_unk).
    3. merges: repeatedly join the adjacent pair that comes first in the merge list (the leftmost on a tie), until
       no adjacent pair is listed. A heap of candidate pairs keeps this O(n log n) on long chunks.
    Decoding runs the decoder steps (Replace, ByteFallback, Fuse, Strip, Metaspace) over the token strings.
    It is slow next to tiktoken (pure Python): use it for chat and evaluation, not for large corpora.
    """

    def __init__(self, name: str, tj: dict, added: list[AddedToken]):
        model = tj["model"]
        _check_bpe_options(model, name)
        super().__init__(name, added, _normalizer(tj.get("normalizer"), name))
        self.vocab: dict[str, int] = model["vocab"]
        self._tokens = {i: t for t, i in self.vocab.items()}
        self._merges: dict[tuple[int, int], tuple[int, int]] = {}
        for rank, (a, b) in enumerate(_merge_pairs(model)):
            if a not in self.vocab or b not in self.vocab or a + b not in self.vocab:
                raise ValueError(f"{name}: merge #{rank} ({a!r}, {b!r}) joins or makes a token not in the vocabulary")
            self._merges[self.vocab[a], self.vocab[b]] = (rank, self.vocab[a + b])
        self._byte_fallback, self._fuse_unk = model.get("byte_fallback", False), model.get("fuse_unk", False)
        self._ignore_merges = model.get("ignore_merges", False)
        self._unk = self.vocab.get(model["unk_token"]) if model.get("unk_token") else None
        self._bytes = [self.vocab.get(f"<0x{b:02X}>") for b in range(256)]
        self._metaspace = None
        steps = _steps(tj.get("pre_tokenizer"), "pretokenizers")
        if steps:
            if len(steps) > 1 or steps[0]["type"] != "Metaspace" or steps[0].get("split", True):
                raise ValueError(f"{name}: cannot reproduce the pre-tokenizer {_describe(steps)}; supported: none, "
                                 f"or Metaspace(split=False)")
            self._metaspace = (steps[0]["replacement"], steps[0].get("prepend_scheme", "always"))
        self.hf_files: dict = {}
        self._decoder = _steps(tj.get("decoder"), "decoders")
        for s in self._decoder:
            if s["type"] not in ("Replace", "ByteFallback", "Fuse", "Strip", "Metaspace") or (
                    s["type"] == "Replace" and "String" not in s["pattern"]):
                raise ValueError(f"{name}: cannot reproduce the decoder {_describe(self._decoder)}; supported: "
                                 f"Replace(String), ByteFallback, Fuse, Strip, Metaspace")
        self.vocab_size = max([*self.vocab.values(), *(t.id for t in added)]) + 1

    def _encode_chunk(self, text: str, first: bool) -> list[int]:
        if self._metaspace is not None:
            replacement, scheme = self._metaspace
            text = text.replace(" ", replacement)
            if (scheme == "always" or (scheme == "first" and first)) and not text.startswith(replacement):
                text = replacement + text
        if self._ignore_merges and text in self.vocab:
            return [self.vocab[text]]
        return self._merge(self._symbols(text))

    def _symbols(self, text: str) -> list[int]:
        symbols, unk = [], None  # an unknown character's token waits until a known one follows, as in HF
        for ch in text:
            if ch in self.vocab:
                if unk is not None:
                    symbols.append(unk)
                    unk = None
                symbols.append(self.vocab[ch])
                continue
            byte_ids = [self._bytes[b] for b in ch.encode()] if self._byte_fallback else [None]
            if None not in byte_ids:
                symbols += byte_ids
            elif self._unk is not None:
                if unk is not None and not self._fuse_unk:
                    symbols.append(unk)
                unk = self._unk
        return symbols if unk is None else symbols + [unk]

    def _merge(self, ids: list[int]) -> list[int]:
        n = len(ids)
        nxt, prv, alive = list(range(1, n + 1)), list(range(-1, n - 1)), [True] * n
        heap = []  # (merge rank, position of the left symbol, id it makes): the lowest rank, then leftmost, first
        for i in range(n - 1):
            if m := self._merges.get((ids[i], ids[i + 1])):
                heap.append((m[0], i, m[1]))
        heapq.heapify(heap)
        while heap:
            rank, i, new = heapq.heappop(heap)
            j = nxt[i]
            if not alive[i] or j >= n or self._merges.get((ids[i], ids[j]), (0, None))[1] != new:
                continue  # a stale entry: one side has been merged since
            ids[i], alive[j], nxt[i] = new, False, nxt[j]
            if nxt[i] < n:
                prv[nxt[i]] = i
            for left, right in ((prv[i], i), (i, nxt[i])):
                if left >= 0 and right < n and (m := self._merges.get((ids[left], ids[right]))):
                    heapq.heappush(heap, (m[0], left, m[1]))
        return [ids[i] for i in range(n) if alive[i]]

    def decode(self, ids: list[int], skip_special: bool = False) -> str:
        tokens = []
        for i in ids:
            t = self._added_by_id.get(i)
            if t is not None:
                if not (skip_special and t.special):
                    tokens.append(t.content)
            elif i in self._tokens:
                tokens.append(self._tokens[i])
            else:
                raise ValueError(f"token id {i} is not in tokenizer {self.name!r} (vocab_size {self.vocab_size})")
        if not self._decoder:
            return " ".join(tokens)
        for step in self._decoder:
            tokens = _decode_step(step, tokens)
        return "".join(tokens)

    def _vocab_id(self, token: str) -> int | None:
        return self.vocab.get(token)

    def _vocab_token(self, token_id: int) -> str | None:
        return self._tokens.get(token_id)

    def _hf_files(self) -> dict[str, Path | dict | str]:
        files = dict(self.hf_files)
        files.setdefault("tokenizer_config.json", self._tokenizer_config())
        return files


def _decode_step(step: dict, tokens: list[str]) -> list[str]:
    """One HF decoder step over the token strings."""
    kind = step["type"]
    if kind == "Replace":
        return [t.replace(step["pattern"]["String"], step["content"]) for t in tokens]
    if kind == "Fuse":
        return ["".join(tokens)]
    if kind == "Strip":
        c, start, stop = step["content"], step.get("start", 0), step.get("stop", 0)
        out = []
        for t in tokens:  # up to `start` leading and `stop` trailing copies of `content` come off each token
            a, b = 0, len(t)
            while a < min(start, len(t)) and t[a] == c:
                a += 1
            while len(t) - b < stop and b > a and t[b - 1] == c:
                b -= 1
            out.append(t[a:b])
        return out
    if kind == "Metaspace":  # as `tokenizers`: with a prefix scheme, every "▁" of the first token is dropped
        replacement, drop_first = step["replacement"], step.get("prepend_scheme", "always") != "never"
        return [t.replace(replacement, "" if i == 0 and drop_first else " ") for i, t in enumerate(tokens)]
    # ByteFallback: runs of <0xXX> tokens become their bytes as UTF-8, or one U+FFFD per byte if not valid UTF-8.
    out, run = [], bytearray()
    for t in tokens + [None]:
        if t is not None and len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
            try:
                run.append(int(t[3:5], 16))
                continue
            except ValueError:
                pass
        if run:
            try:
                out.append(run.decode("utf-8"))
            except UnicodeDecodeError:
                out += ["\ufffd"] * len(run)
            run = bytearray()
        if t is not None:
            out.append(t)
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Loading: a name, a file, or a model directory
# ---------------------------------------------------------------------------------------------------------------------

def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _content(value) -> str | None:
    """A token in tokenizer_config.json: a string, or {"content": ...}."""
    return value.get("content") if isinstance(value, dict) else value


def _added_from_config(config: dict) -> list[AddedToken]:
    return [AddedToken(t["content"], int(i), special=t.get("special", True), lstrip=t.get("lstrip", False),
                       rstrip=t.get("rstrip", False), single_word=t.get("single_word", False),
                       normalized=t.get("normalized", False))
            for i, t in config.get("added_tokens_decoder", {}).items()]


def _chat_template(directory: Path | None, config: dict) -> str | None:
    """chat_template.jinja beside the config (how transformers >= 4.43 saves it), else tokenizer_config.json's
    chat_template: a string, or a list of {"name", "template"} (the one named "default", else the first)."""
    if directory is not None and (directory / "chat_template.jinja").is_file():
        return (directory / "chat_template.jinja").read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t["name"]: t["template"] for t in template}
        return named.get("default", template[0]["template"] if template else None)
    return template


def _post_processor_adds_bos(post: dict | None) -> bool:
    for step in _steps(post, "processors"):
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
    steps = _steps(tokenizer_json.get("pre_tokenizer"), "pretokenizers")
    if any(s["type"] == "ByteLevel" for s in steps):
        decoder = _steps(tokenizer_json.get("decoder"), "decoders")
        if [s["type"] for s in decoder] != ["ByteLevel"]:
            raise ValueError(f"{name}: byte-level BPE with the decoder {_describe(decoder)} is not supported "
                             f"(supported: ByteLevel)")
        encoding, ranks, drop_from = tiktoken_from_tokenizer_json(tokenizer_json, name, added)
        _, prefix_space = _byte_level_pattern(tokenizer_json.get("pre_tokenizer"))
        tok = TiktokenTokenizer(name, encoding, ranks, added, _normalizer(tokenizer_json.get("normalizer"), name),
                                add_prefix_space=prefix_space,
                                added_bytes={t.id: _byte_level_decode_text(t.content) for t in added},
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
        return tokenizer_from_json(json.loads(p.read_text(encoding="utf-8")), name, config, directory, files)
    raise ValueError(f"{p}: unknown tokenizer file type {p.suffix!r} (supported: tokenizer.json, .model, .tiktoken)")
