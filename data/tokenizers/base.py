"""The tokenizer interface: `Tokenizer`, the base class every back end fills in, and `AddedToken`, a token matched
whole in the text before BPE. The base class does what all back ends share: added-token matching (in one text, or in
a text made of parts of which only some may hold special tokens), BOS / EOS, special tokens added after loading,
chat templates, save_pretrained."""

import copy
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
    chat_template_jinja (the jinja chat template from tokenizer_config.json, or None; set it to attach another one,
    e.g. data.chat.template_jinja("chatml"), which save_pretrained writes into tokenizer_config.json).
    """

    name: str
    vocab_size: int
    bos_id: int | None = None
    eos_id: int | None = None
    pad_id: int | None = None
    stop_ids: list[int]
    add_bos: bool = False
    chat_template_jinja: str | None = None
    chat_template_name: str | None = None  # a data.chat template by name, used when there is no jinja (a run's own)

    def __init__(self, name: str, added: list[AddedToken], normalizer: Callable[[str], str] | None = None):
        self.name = name
        self._normalizer = normalizer
        self._index_added(added)
        self._appended: list[AddedToken] = []  # added by add_special_tokens, for save_pretrained to write
        self.stop_ids = []

    def _index_added(self, added: list[AddedToken]) -> None:
        self.added_tokens = sorted(added, key=lambda t: t.id)
        self.special_tokens = {t.content: t.id for t in self.added_tokens if t.special}
        self._added_by_id: dict[int, AddedToken] = {}
        self._added_by_text: dict[str, AddedToken] = {}
        for t in self.added_tokens:
            self._added_by_id.setdefault(t.id, t)  # an id with two spellings decodes to the first one listed
            self._added_by_text.setdefault(t.content, t)
        self._raw_match = self._matcher([t for t in added if not t.normalized], lambda s: s)
        self._norm_match = self._matcher([t for t in added if t.normalized], self._normalizer or (lambda s: s))
        self._always_match = any(not t.special for t in added)  # non-special added tokens match even for corpora

    # ---- encoding -------------------------------------------------------------------------------------------------

    def encode(self, text: str, bos: bool = False, eos: bool = False, allow_special: bool = False) -> list[int]:
        """Token ids of `text`, optionally wrapped in BOS / EOS.

        allow_special=False: special-token text inside `text` is encoded as ordinary text (for corpora).
        allow_special=True: it becomes the special token's id, as HF `tokenizers` does (for chat templates).
        """
        ids = self._encode_pieces(self._split_added(text, allow_special))
        if bos:
            if self.bos_id is None:
                raise ValueError(f"tokenizer {self.name!r} has no BOS token")
            ids.insert(0, self.bos_id)
        if eos:
            if self.eos_id is None:
                raise ValueError(f"tokenizer {self.name!r} has no EOS token")
            ids.append(self.eos_id)
        return ids

    def encode_parts(self, parts: list[tuple[str, bool]]) -> list[int]:
        """Token ids of the parts' texts joined into one text, special tokens matched only inside the parts whose
        allow_special (the second item) is True: a chat template's own markup allows them, message contents do not.

        The text between two added tokens is encoded as one chunk whatever parts it spans, so where no part holds
        special-token text that it may not use, the ids are those of encode("".join(texts), allow_special=True). An
        added token must lie within one part; an lstrip / rstrip token swallows whitespace across part boundaries,
        as it does in the joined text. (Special tokens matched in normalized text, which none of the supported
        tokenizers has, are matched only in chunks made wholly of parts that allow them.)"""
        return self._encode_pieces(self._split_parts(parts))

    def encode_batch(self, texts: list[str], allow_special: bool = False) -> list[list[int]]:
        """encode() of each text, no BOS / EOS."""
        return [self.encode(t, allow_special=allow_special) for t in texts]

    def add_special_tokens(self, texts: list[str]) -> list[int]:
        """The ids of `texts` as added tokens, adding the ones the tokenizer lacks as special tokens (matched only
        with allow_special, raw text, no stripping), as transformers' add_special_tokens does: a text in the
        vocabulary keeps its id there, any other gets the next id from vocab_size up, and vocab_size grows. Texts
        that are added tokens already keep their ids. save_pretrained writes the new ones into tokenizer.json's
        added_tokens and tokenizer_config.json's added_tokens_decoder; a model's embedding must grow to vocab_size."""
        ids = []
        for text in texts:
            t = self._added_by_text.get(text)
            if t is None:
                vocab_id = self._vocab_id(text)
                t = AddedToken(text, self.vocab_size if vocab_id is None else vocab_id)
                self._appended.append(t)
                self._index_added([*self.added_tokens, t])
                self.vocab_size = max(self.vocab_size, t.id + 1)
            ids.append(t.id)
        return ids

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
        for fname, content in self._with_changes(self._hf_files()).items():
            if isinstance(content, Path):
                shutil.copyfile(content, out / fname)
            elif isinstance(content, dict):
                (out / fname).write_text(json.dumps(content, indent=2, ensure_ascii=False), encoding="utf-8")
            else:
                (out / fname).write_text(content, encoding="utf-8")
        return out

    def _with_changes(self, files: dict[str, Path | dict | str]) -> dict[str, Path | dict | str]:
        """The files with what changed since loading: tokens from add_special_tokens in tokenizer.json and in
        tokenizer_config.json's added_tokens_decoder, and chat_template_jinja in tokenizer_config.json's
        chat_template when it is not the template the files hold (a chat_template.jinja beside it is then left
        out, since it would win)."""
        files = dict(files)
        if self._appended and "tokenizer.json" in files:
            tokenizer_json = _as_dict(files["tokenizer.json"])
            listed = {t["id"] for t in tokenizer_json.get("added_tokens", [])}
            tokenizer_json["added_tokens"] = [*tokenizer_json.get("added_tokens", []), *(
                dataclasses.asdict(t) for t in self._appended if t.id not in listed)]
            files["tokenizer.json"] = tokenizer_json
        config, changed = _as_dict(files.get("tokenizer_config.json", {})), False
        if self._appended:
            config["added_tokens_decoder"] = dict(config.get("added_tokens_decoder", {})) | {
                str(t.id): {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized, "rstrip": t.rstrip,
                            "single_word": t.single_word, "special": t.special} for t in self._appended}
            changed = True
        jinja_file = files.get("chat_template.jinja")
        if isinstance(jinja_file, Path):
            jinja_file = jinja_file.read_text(encoding="utf-8")
        if chat_template_from(config, jinja_file) != self.chat_template_jinja:
            files.pop("chat_template.jinja", None)
            config.pop("chat_template", None)
            if self.chat_template_jinja is not None:
                config["chat_template"] = self.chat_template_jinja
            changed = True
        if changed:
            files["tokenizer_config.json"] = config
        return files

    # ---- chat templates ---------------------------------------------------------------------------------------------

    def apply_chat_template(self, messages: list[dict], template: str | None = None,
                            add_generation_prompt: bool = False, **options) -> "data.chat.ChatEncoding":
        """data.chat.encode_chat(self, ...): the conversation's ids, assistant mask and text. template None or
        "auto": the one detected from `chat_template_jinja`; a name ("chatml", "llama3", "harmony", ... see
        data.chat.TEMPLATES) or a jinja file for a tokenizer that ships none. options: train_on=,
        special_tokens_in_content=, and the template's own (default_system=, reasoning_effort=, ...)."""
        from data.chat import encode_chat  # data.chat renders; this class only carries the jinja and encodes
        return encode_chat(self, messages, template, add_generation_prompt, **options)

    # ---- for the back ends ----------------------------------------------------------------------------------------

    def _encode_pieces(self, pieces: list) -> list[int]:
        ids = []
        for i, piece in enumerate(pieces):
            if isinstance(piece, AddedToken):
                ids.append(piece.id)
            else:
                ids += self._encode_chunk(piece, first=i == 0)
        return ids

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
        """The text cut into normalized chunks (str) and added tokens (AddedToken): _split_parts of one part."""
        if not (allow_special or self._always_match):
            return [self._normalizer(text) if self._normalizer else text] if text else []
        return self._split_parts([(text, allow_special)])

    def _split_parts(self, parts: list[tuple[str, bool]]) -> list:
        """Texts, each allowing special tokens or not, cut into normalized chunks (str) and added tokens
        (AddedToken), as HF's AddedVocabulary cuts their joined text: tokens with normalized=False are found in the
        raw text, the text between them is normalized, then tokens with normalized=True are found in it."""
        pieces, raw, raw_allows, strip_next = [], "", True, False

        def flush():
            if raw:
                pieces.extend(self._find_added(self._normalizer(raw) if self._normalizer else raw, self._norm_match,
                                               raw_allows))
        joined, end = "".join(text for text, _ in parts), 0
        for text, allow_special in parts:
            start, end = end, end + len(text)
            for piece in self._find_added(joined, self._raw_match, allow_special, start, end):
                if isinstance(piece, AddedToken):
                    if piece.lstrip:  # the whitespace before it may end an earlier part
                        raw = raw[:_TRAILING_WS.search(raw).start()]
                    flush()
                    pieces.append(piece)
                    raw, raw_allows, strip_next = "", True, piece.rstrip
                    continue
                if strip_next:  # ... and the whitespace after it may start a later one
                    piece = piece[_LEADING_WS.match(piece).end():]
                    strip_next = not piece
                raw, raw_allows = raw + piece, raw_allows and (allow_special or not piece)
        flush()
        return pieces

    @staticmethod
    def _find_added(text: str, matcher, allow_special: bool, start: int = 0, end: int | None = None) -> list:
        """text[start:end] cut into added tokens and the text between them; the characters around it count for
        single_word, as they do in the whole text."""
        end = len(text) if end is None else end
        if matcher is None:
            return [text[start:end]] if end > start else []
        regex, by_text = matcher
        pieces = []
        for m in regex.finditer(text, start, end):
            t, a, b = by_text[m.group()], m.start(), m.end()
            if t.special and not allow_special:
                continue
            if t.single_word and ((a > 0 and (text[a - 1].isalnum() or text[a - 1] == "_"))
                                  or (b < len(text) and (text[b].isalnum() or text[b] == "_"))):
                continue
            if t.lstrip:
                a = max(start, _TRAILING_WS.search(text, 0, a).start())
            if t.rstrip:
                b = _LEADING_WS.match(text, b, end).end()
            if a > start:
                pieces.append(text[start:a])
            pieces.append(t)
            start = b
        if start < end:
            pieces.append(text[start:end])
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


def _as_dict(content: Path | dict | str) -> dict:
    """A JSON file's content (a path, a parsed dict, or text) as a dict of its own, to change."""
    if isinstance(content, Path):
        content = content.read_text(encoding="utf-8")
    return json.loads(content) if isinstance(content, str) else copy.deepcopy(content)


def chat_template_from(config: dict, jinja_file: str | None = None) -> str | None:
    """The chat template of a tokenizer: chat_template.jinja's text when there is one (how transformers >= 4.43
    saves it), else tokenizer_config.json's chat_template: a string, or a list of {"name", "template"} (the one
    named "default", else the first)."""
    if jinja_file is not None:
        return jinja_file
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t["name"]: t["template"] for t in template}
        return named.get("default", template[0]["template"] if template else None)
    return template
