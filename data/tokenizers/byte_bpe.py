"""Byte-level BPE run by tiktoken's Rust core: GPT-2's byte alphabet, `TiktokenTokenizer`, `.tiktoken` rank files,
the named encodings built from the rank files in data/assets (gpt2, cl100k_base, o200k_base, o200k_harmony), and the
conversion of an HF byte-level BPE tokenizer.json (GPT-2, Llama-3, Qwen2, SmolLM, Granite, GPT-OSS) into a tiktoken
encoding. `derive_merges` goes the other way, for exporting a tokenizer.json from the ranks."""

import base64
import dataclasses
import functools
import hashlib
from collections.abc import Callable
from pathlib import Path

import tiktoken

from data.tokenizers.base import AddedToken, Tokenizer
from data.tokenizers.hf_json import check_bpe_options, describe_steps, merge_pairs, steps_of

ASSETS = Path(__file__).resolve().parents[1] / "assets"  # data/assets
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

    def add_special_tokens(self, texts: list[str]) -> list[int]:
        ids = super().add_special_tokens(texts)
        for t in self._appended:
            self._added_bytes.setdefault(t.id, t.content.encode())
        return ids

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


# ---- HF tokenizer.json, byte-level BPE -> tiktoken -------------------------------------------------------------------

def byte_level_pattern(pre_tokenizer: dict | None) -> tuple[str, bool]:
    """(one tiktoken regex that cuts text exactly as the pre-tokenizer does, add_prefix_space).

    Supported, which covers the byte-level tokenizers in use:
    - ByteLevel(use_regex=True): GPT-2's regex (GPT-2, RoBERTa-style add_prefix_space).
    - Split(Regex R, Isolated) then ByteLevel(use_regex=False) (Llama-3, Qwen2, GPT-OSS): R, plus an alternative that
      takes a run of characters where R does not match, which Isolated keeps as a piece and a findall would drop.
    - Digits then ByteLevel(use_regex=True) (StarCoder, SmolLM, Granite): digits are cut off first (one by one with
      individual_digits), then GPT-2's regex runs inside each remaining piece. As one regex: digits first, GPT-2's
      alternatives without the digit one, and a whitespace run ending before a digit counts as ending its piece.
    """
    steps = steps_of(pre_tokenizer, "pretokenizers")
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
    raise ValueError(f"cannot reproduce the pre-tokenizer {describe_steps(steps)} exactly with one regex; supported: "
                     f"ByteLevel(use_regex=True), Split(Regex, Isolated) + ByteLevel(use_regex=False), "
                     f"Digits + ByteLevel(use_regex=True, add_prefix_space=False)")


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
    check_bpe_options(model, name)
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
    for k, (a, b) in enumerate(merge_pairs(model)):
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

    pattern, _ = byte_level_pattern(tj.get("pre_tokenizer"))
    specials = {t.content: t.id for t in added if t.id not in set(ranks.values())}
    drop_from = max([*ranks.values(), *added_ids]) + 1 if missing else None
    placeholders = {_BYTES[b]: drop_from + k for k, b in enumerate(missing)}
    encoding = tiktoken.Encoding(name, pat_str=pattern, mergeable_ranks=ranks | placeholders, special_tokens=specials)
    return encoding, ranks, drop_from


def byte_level_decode_text(content: str) -> bytes:
    """What HF's ByteLevel decoder writes for a token: its bytes if spelled in the alphabet, else its UTF-8 text."""
    b = _unspell(content)
    return content.encode() if b is None else b
