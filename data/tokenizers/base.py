"""The tokenizer interface: `Tokenizer`, the base class every back end fills in, and `AddedToken`, a token matched
whole in the text before BPE. The base class does what all back ends share: added-token matching, BOS / EOS,
chat templates, save_pretrained."""

import dataclasses
import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path


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
