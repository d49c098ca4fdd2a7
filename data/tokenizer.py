"""Tokenizers: one small interface, one back end per file format.

    tok = get_tokenizer("gpt2")
    ids = tok.encode("Hello world", eos=True)     # [15496, 995, 50256]
    tok.decode(ids)                               # 'Hello world<|endoftext|>'

Special tokens written inside a text (e.g. the string "<|endoftext|>") are always encoded as ordinary
text, so a corpus can never inject a control token; specials enter a sequence only through bos=/eos=.

"gpt2" is tiktoken's r50k_base built by hand from the rank file committed at data/assets/gpt2.tiktoken
(one line per token: base64 bytes, space, rank), so no network is ever touched.
"""

import base64
import functools
import hashlib
from pathlib import Path

import tiktoken

ASSETS = Path(__file__).resolve().parent / "assets"
GPT2_RANKS = ASSETS / "gpt2.tiktoken"
GPT2_RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"  # tiktoken's own hash
# GPT-2's pre-tokeniser: contractions, letter runs, digit runs, punctuation runs, each with at most one
# leading space; whitespace runs leave their last space to the word that follows.
R50K_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
ENDOFTEXT = "<|endoftext|>"


class Tokenizer:
    """Text <-> token ids. A back end implements `_encode_ordinary` and `decode`.

    vocab_size counts every id the tokenizer can emit, special tokens included. bos_id / pad_id are None
    when the vocabulary has no such token.
    """

    name: str
    vocab_size: int
    bos_id: int | None
    eos_id: int
    pad_id: int | None
    special_tokens: dict[str, int]

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Token ids of `text` (specials in it encoded as plain text), optionally wrapped in BOS / EOS."""
        ids = self._encode_ordinary(text)
        if bos:
            if self.bos_id is None:
                raise ValueError(f"tokenizer {self.name!r} has no BOS token")
            ids.insert(0, self.bos_id)
        if eos:
            ids.append(self.eos_id)
        return ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """encode() of each text, no BOS / EOS."""
        return [self._encode_ordinary(t) for t in texts]

    def decode(self, ids: list[int]) -> str:
        """Text of `ids`; bytes that do not form valid UTF-8 become U+FFFD."""
        raise NotImplementedError

    def _encode_ordinary(self, text: str) -> list[int]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id})"


class TiktokenTokenizer(Tokenizer):
    """Byte-level BPE through a `tiktoken.Encoding` (GPT-2, cl100k, o200k families)."""

    def __init__(self, name: str, encoding: tiktoken.Encoding, eos_id: int, bos_id: int | None = None,
                 pad_id: int | None = None):
        self.name, self.encoding = name, encoding
        self.vocab_size = encoding.n_vocab
        self.eos_id, self.bos_id, self.pad_id = eos_id, bos_id, pad_id
        self.special_tokens = {s: encoding.encode_single_token(s) for s in encoding.special_tokens_set}

    def _encode_ordinary(self, text: str) -> list[int]:
        return self.encoding.encode_ordinary(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.encoding.encode_ordinary_batch(texts)  # tiktoken's threads (its Rust core drops the GIL)

    def decode(self, ids: list[int]) -> str:
        return self.encoding.decode(ids)


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


@functools.lru_cache(maxsize=None)
def _gpt2_encoding() -> tiktoken.Encoding:
    ranks = load_tiktoken_ranks(GPT2_RANKS, GPT2_RANKS_SHA256)
    return tiktoken.Encoding("r50k_base", pat_str=R50K_PATTERN, mergeable_ranks=ranks,
                             special_tokens={ENDOFTEXT: len(ranks)}, explicit_n_vocab=len(ranks) + 1)


def _gpt2() -> Tokenizer:
    eot = _gpt2_encoding().encode_single_token(ENDOFTEXT)  # 50256: GPT-2 uses it as both BOS and EOS
    return TiktokenTokenizer("gpt2", _gpt2_encoding(), eos_id=eot, bos_id=eot)


TOKENIZERS = {"gpt2": _gpt2}


def get_tokenizer(name: str) -> Tokenizer:
    """The tokenizer called `name` (see TOKENIZERS), built from files in data/assets."""
    if name not in TOKENIZERS:
        raise ValueError(f"unknown tokenizer {name!r}; known: {', '.join(sorted(TOKENIZERS))}")
    return TOKENIZERS[name]()
