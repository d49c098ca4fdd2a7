"""data/tokenizer.py: every back end against its reference implementation, id for id, on one varied text.

Oracles (test-only): HF `tokenizers` on each tokenizer.json; tiktoken's own encodings (offline, through its cache
directory) for the named encodings; the sentencepiece library and transformers' conversion for a .model file;
transformers' AutoTokenizer for what save_pretrained writes. Real tokenizers come from ../shared/assets (see
PROVENANCE.md); the small hand-made tokenizers at the end need nothing but this repository.
"""

import copy
import hashlib
import json
import shutil
import unicodedata
from pathlib import Path

import pytest
import sentencepiece
import tiktoken
import transformers  # test-only oracle
from tokenizers import Tokenizer as HFTokenizer  # test-only oracle

from data.tokenizer import (ASSETS, BYTE_TO_UNICODE, GPT2_PATTERN, AddedToken, PieceBPETokenizer,
                            SentencePieceTokenizer, TiktokenTokenizer, get_tokenizer, load_tiktoken_ranks,
                            load_tokenizer, tokenizer_from_json)

# English (contractions, capitals), Malay, Chinese, code with tabs and indentation, emoji (skin tone, ZWJ family,
# flags), runs of spaces and newlines (CRLF too), digits (long, decimal, Arabic-Indic, superscript), decomposed and
# compatibility characters, a half special token, a leading and a trailing space.
TEXT = (" Hello world! DON'T stop; I'm sure it's 2024, we've won. Isn't it?\n"
        "Saya suka makan nasi lemak dan teh tarik di kedai mamak.  Selamat pagi, apa khabar?\n"
        "机器学习是人工智能的一个分支。你好，世界！東京は晴れです。\n"
        "def f(x):\n\tif x > 0:\n\t\treturn x ** 2  # square\n    else:\n        return -x\r\n"
        "emoji 🙂👍🏽 family 👨‍👩‍👧‍👦 flags 🇲🇾🇫🇷 heart ❤️‍🔥\n"
        "   leading,  two  three   eight        end\n\n\n  \t\t  \n\n"
        "numbers 1234567 3.14159 1,000,000 ٣٤٥ x² ½ 0xFF\n"
        "Cafe\u0301 café ﬁle naïve Ünïcödé <|im_start <s \n ")

SPECIALS = {  # special tokens of each tokenizer, embedded in the text (Qwen's <think> is a non-special added token)
    "qwen2": ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<think>", "</think>"],
    "llama3": ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
    "gpt-oss": ["<|start|>", "<|channel|>", "<|message|>", "<|end|>", "<|return|>"],
    "llama2": ["<s>", "</s>", "<unk>"],
}


def with_specials(specials: list[str]) -> str:
    """TEXT with the special tokens at the start, glued to words, after spaces, before newlines, twice in a row."""
    out, cuts = specials[0], [0, 23, 70, 150, 201, 260, 330, len(TEXT)]
    for k in range(len(cuts) - 1):
        s = specials[k % len(specials)]
        out += TEXT[cuts[k]:cuts[k + 1]] + [s, " " + s, s + "\n", s + s][k % 4]
    return out


@pytest.fixture(scope="module")
def tok_dir(shared_assets) -> Path:
    return shared_assets / "tokenizers"


@pytest.fixture(scope="module")
def hf_json(tok_dir):
    """name -> (ours, HF tokenizers), each loaded once: the big tokenizer.json files take seconds to parse."""
    cache = {}

    def get(name: str):
        if name not in cache:
            cache[name] = load_tokenizer(tok_dir / name), HFTokenizer.from_file(str(tok_dir / name / "tokenizer.json"))
        return cache[name]
    return get


def assert_same_ids(ours, hf: HFTokenizer, text: str) -> list[int]:
    """Ours against HF tokenizers: with special tokens, with the tokenizer's own BOS, and with specials as text."""
    ids = ours.encode(text, allow_special=True)
    assert ids == hf.encode(text, add_special_tokens=False).ids
    assert ours.encode(text, bos=ours.add_bos, allow_special=True) == hf.encode(text).ids
    hf.encode_special_tokens = True  # HF's way to encode special-token text as ordinary text
    try:
        assert ours.encode(text) == hf.encode(text, add_special_tokens=False).ids
    finally:
        hf.encode_special_tokens = False
    return ids


# ---------------------------------------------------------------- HF tokenizer.json: byte-level and SentencePiece-style

@pytest.mark.parametrize("name", ["qwen2", "llama3", "gpt-oss", "llama2"])
def test_tokenizer_json_ids_and_decode_match_hf(hf_json, name):
    ours, hf = hf_json(name)
    for text in (TEXT, with_specials(SPECIALS[name])):
        ids = assert_same_ids(ours, hf, text)
        assert any(i in ours.special_tokens.values() for i in ids) == (text != TEXT)
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=False)
        assert ours.decode(ids, skip_special=True) == hf.decode(ids, skip_special_tokens=True)
    assert ours.encode_batch([TEXT, TEXT[::-1]]) == [ours.encode(TEXT), ours.encode(TEXT[::-1])]
    expected = unicodedata.normalize("NFC", TEXT) if name == "qwen2" else TEXT  # Qwen2 normalizes to NFC
    assert ours.decode(ours.encode(TEXT)) == expected


@pytest.mark.parametrize("name, kind, vocab_size, bos, eos, pad, add_bos", [
    ("qwen2", TiktokenTokenizer, 151669, None, "<|im_end|>", "<|endoftext|>", False),
    ("llama3", TiktokenTokenizer, 128256, "<|begin_of_text|>", "<|eot_id|>", None, True),
    ("gpt-oss", TiktokenTokenizer, 200019, "<|startoftext|>", "<|return|>", "<|endoftext|>", False),
    ("llama2", PieceBPETokenizer, 32000, "<s>", "</s>", None, False),  # no config: conventional names
])
def test_tokenizer_json_attributes(hf_json, name, kind, vocab_size, bos, eos, pad, add_bos):
    ours, hf = hf_json(name)
    assert type(ours) is kind and ours.vocab_size == vocab_size == hf.get_vocab_size(with_added_tokens=True)
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == tuple(None if t is None else hf.token_to_id(t)
                                                            for t in (bos, eos, pad))
    assert ours.add_bos == add_bos and ours.stop_ids == [ours.eos_id]
    assert ours.special_tokens == {t.content: i for i, t in hf.get_added_tokens_decoder().items() if t.special}
    for token in ("Ġthe", "▁the", "the", "<think>", "nonexistent-token"):
        assert ours.token_to_id(token) == hf.token_to_id(token)
    assert (ours.chat_template_jinja is not None) == (name in ("qwen2", "llama3"))
    if name == "qwen2":
        assert "<think>" not in ours.special_tokens and ours.token_to_id("<think>") == 151667
        with pytest.raises(ValueError, match="no BOS"):
            ours.encode("x", bos=True)


def test_o200k_harmony_matches_gpt_oss_tokenizer_json(hf_json):
    _, hf = hf_json("gpt-oss")
    ours = get_tokenizer("o200k_harmony")
    assert_same_ids(ours, hf, with_specials(SPECIALS["gpt-oss"] + ["<|call|>", "<|constrain|>", "<|endofprompt|>"]))
    for content, token_id in hf.get_vocab(with_added_tokens=True).items():
        if content.startswith("<|") and token_id >= 199998:
            assert ours.token_to_id(content) == token_id
    assert (ours.bos_id, ours.eos_id, ours.pad_id, ours.stop_ids) == (199998, 200002, 199999, [200002, 199999, 200012])
    assert ours.vocab_size == 201088  # GPT-OSS's embedding rows: every reserved id up to 201087


def test_metaspace_variants_of_llama2_match_hf(tok_dir):
    """Llama-2's vocabulary written as newer converters do: no normalizer, a Metaspace pre-tokenizer that adds the
    dummy prefix to every chunk ("always") or only at the start of the text ("first"), and its decoder."""
    base = json.loads((tok_dir / "llama2" / "tokenizer.json").read_text())
    text = with_specials(SPECIALS["llama2"])
    for scheme, decoder in [("always", base["decoder"]),
                            ("first", {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first",
                                       "split": False})]:
        tj = copy.deepcopy(base)
        tj["normalizer"] = None
        tj["pre_tokenizer"] = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": scheme, "split": False}
        tj["decoder"] = decoder
        ours, hf = tokenizer_from_json(tj, f"llama2-{scheme}"), HFTokenizer.from_str(json.dumps(tj))
        for t in (TEXT, text, "<s>Hi", " leading space"):
            ids = ours.encode(t, allow_special=True)
            assert ids == hf.encode(t, add_special_tokens=False).ids, (scheme, t)
            assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=False), (scheme, t)


def test_smollm_from_gguf_digits_pretokenizer(smollm2_gguf):
    """SmolLM2's real vocabulary (from the GGUF in the shared assets): Digits(individual) + ByteLevel pre-tokenizer,
    merges by HF order, and a vocabulary lacking 21 single bytes, which HF drops."""
    import gguf  # runtime dependency (requirements.txt)
    fields = gguf.GGUFReader(smollm2_gguf).fields
    tokens, types = fields["tokenizer.ggml.tokens"].contents(), fields["tokenizer.ggml.token_type"].contents()
    tj = {"added_tokens": [added_token(i, t) for i, t in enumerate(tokens) if types[i] == 3],
          "normalizer": None,
          "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
              {"type": "Digits", "individual_digits": True},
              {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]},
          "post_processor": None, "decoder": BYTE_LEVEL_DECODER,
          "model": {"type": "BPE", "vocab": {t: i for i, t in enumerate(tokens)},
                    "merges": [m.split(" ") for m in fields["tokenizer.ggml.merges"].contents()]}}
    ours, hf = tokenizer_from_json(tj, "smollm"), HFTokenizer.from_str(json.dumps(tj))
    assert ours.vocab_size == 49152
    for text in (TEXT, with_specials(["<|im_start|>", "<|im_end|>", "<file_sep>"]), "a 12 345  6   7x8 9\n 0\t1  ",
                 "ctrl \x04 char x\x04y \x13"):
        ids = assert_same_ids(ours, hf, text)
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=False)


# ---------------------------------------------------------------- named tiktoken encodings

@pytest.fixture(scope="module")
def tiktoken_reference(tmp_path_factory):
    """tiktoken.get_encoding, offline: its cache directory holds the rank files under the names it looks for."""
    cache = tmp_path_factory.mktemp("tiktoken-cache")
    for name in ("r50k_base", "cl100k_base", "o200k_base"):
        url = f"https://openaipublic.blob.core.windows.net/encodings/{name}.tiktoken"
        shutil.copyfile(ASSETS / f"{'gpt2' if name == 'r50k_base' else name}.tiktoken",
                        cache / hashlib.sha1(url.encode()).hexdigest())
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TIKTOKEN_CACHE_DIR", str(cache))
        yield tiktoken.get_encoding


@pytest.mark.parametrize("name, reference, vocab_size", [
    ("gpt2", "r50k_base", 50257), ("cl100k_base", "cl100k_base", 100277), ("o200k_base", "o200k_base", 200019),
    ("o200k_harmony", "o200k_harmony", 201088)])
def test_named_encodings_match_tiktoken(tiktoken_reference, name, reference, vocab_size):
    ref, ours = tiktoken_reference(reference), get_tokenizer(name)
    assert ours.vocab_size == ref.n_vocab == vocab_size
    assert ours.special_tokens == {s: ref.encode_single_token(s) for s in ref.special_tokens_set}
    text = with_specials(sorted(ref.special_tokens_set)[:5])
    ids = ours.encode(text, allow_special=True)
    assert ids == ref.encode(text, allowed_special="all")
    assert ours.encode(text) == ref.encode_ordinary(text) == ours.encode_batch([text])[0]
    assert ours.decode(ids) == ref.decode(ids) == text
    assert ours.eos_id == ref.encode_single_token("<|return|>" if name == "o200k_harmony" else "<|endoftext|>")


def test_ids_past_or_between_ranks_are_errors():
    cl100k = get_tokenizer("cl100k_base")  # 100256 is a hole between the ranks and the specials
    for bad in (100256, 100277, -1):
        with pytest.raises(ValueError, match="not in tokenizer|cannot decode"):
            cl100k.decode([15496, bad])


# ---------------------------------------------------------------- SentencePiece .model

@pytest.fixture(scope="module")
def mistral(tok_dir):
    return load_tokenizer(tok_dir / "mistral-v1.model"), sentencepiece.SentencePieceProcessor(
        model_file=str(tok_dir / "mistral-v1.model"))


def test_sentencepiece_model_matches_sentencepiece_and_transformers(mistral, tok_dir, tmp_path):
    ours, sp = mistral
    assert type(ours) is SentencePieceTokenizer and ours.vocab_size == sp.get_piece_size() == 32000
    assert (ours.bos_id, ours.eos_id, ours.pad_id, ours.add_bos) == (1, 2, None, True)
    assert ours.special_tokens == {"<unk>": 0, "<s>": 1, "</s>": 2}
    assert ours.encode(TEXT) == sp.encode(TEXT) and ours.decode(sp.encode(TEXT)) == sp.decode(sp.encode(TEXT)) == TEXT
    text = with_specials(SPECIALS["llama2"])
    assert ours.encode(text) == sp.encode(text)  # special-token text is ordinary text, as SentencePiece has it
    ids = ours.encode(text, allow_special=True)
    assert ours.decode(ids) == text  # each chunk between specials decodes as SentencePiece writes it back
    assert ours.decode(ids, skip_special=True) == text.replace("<s>", "").replace("</s>", "").replace("<unk>", "")
    # transformers converts the .model itself (merges by piece score, a dummy prefix per chunk between specials)
    shutil.copyfile(tok_dir / "mistral-v1.model", tmp_path / "tokenizer.model")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert ids == hf(text, add_special_tokens=False)["input_ids"]
    assert ours.encode(TEXT) == hf(TEXT, add_special_tokens=False)["input_ids"]


def test_sentencepiece_directory_with_config(tok_dir, tmp_path):
    """tokenizer.model + tokenizer_config.json adding a pad token past the model's pieces + generation_config.json."""
    shutil.copyfile(tok_dir / "mistral-v1.model", tmp_path / "tokenizer.model")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "pad_token": "<pad>", "add_bos_token": False, "chat_template": [
            {"name": "tool_use", "template": "tools"}, {"name": "default", "template": "{{ messages }}"}],
        "added_tokens_decoder": {"32000": {"content": "<pad>", "special": True}}}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 32000]}))
    tok = load_tokenizer(tmp_path)
    assert (tok.vocab_size, tok.pad_id, tok.eos_id, tok.stop_ids, tok.add_bos) == (32001, 32000, 2, [2, 32000], False)
    assert tok.chat_template_jinja == "{{ messages }}"
    ids = tok.encode("a<pad>b", allow_special=True)
    assert 32000 in ids and tok.decode(ids) == "a<pad>b" and tok.decode(ids, skip_special=True) == "ab"
    (tmp_path / "chat_template.jinja").write_text("{{ jinja file }}")  # how newer transformers saves it: it wins
    assert load_tokenizer(tmp_path).chat_template_jinja == "{{ jinja file }}"


# ---------------------------------------------------------------- save_pretrained: transformers and we load the same ids

def check_saved(tok, out: Path, text: str, decode_like_hf: bool = True) -> None:
    """Encode and decode after save_pretrained, by transformers and by us, against the tokenizer saved."""
    tok.save_pretrained(out)
    hf, back = transformers.AutoTokenizer.from_pretrained(out), load_tokenizer(out)
    ids = tok.encode(text, allow_special=True)
    assert hf(text, add_special_tokens=False)["input_ids"] == ids == back.encode(text, allow_special=True)
    assert hf(text)["input_ids"] == tok.encode(text, bos=tok.add_bos, allow_special=True)
    assert (back.vocab_size, back.bos_id, back.eos_id, back.pad_id) == (tok.vocab_size, tok.bos_id, tok.eos_id,
                                                                        tok.pad_id)
    assert (hf.bos_token_id, hf.eos_token_id) == (tok.bos_id, tok.eos_id)
    assert back.decode(ids) == tok.decode(ids)
    plain = tok.encode(TEXT)
    assert hf.decode(plain) == tok.decode(plain)
    if decode_like_hf:  # (SentencePiece: ours writes each chunk back without the dummy-prefix space, HF keeps it)
        assert hf.decode(ids) == tok.decode(ids)


def test_save_pretrained_tiktoken_writes_byte_level_bpe(tmp_path):
    """A model trained from scratch with gpt2 ships a tokenizer.json recovered from the ranks; here also with
    specials at non-contiguous ids past the ranks, and BOS prepended."""
    check_saved(get_tokenizer("gpt2"), tmp_path / "gpt2", with_specials(["<|endoftext|>"]))
    gpt2 = get_tokenizer("gpt2")
    specials = {"<|endoftext|>": 50256, "<|im_start|>": 50300, "<|im_end|>": 50400}
    encoding = tiktoken.Encoding("chat", pat_str=gpt2.pattern, mergeable_ranks=gpt2.ranks, special_tokens=specials)
    tok = TiktokenTokenizer("chat", encoding, gpt2.ranks, [AddedToken(s, i) for s, i in specials.items()],
                            hf_pattern=GPT2_PATTERN)
    tok.bos_id, tok.eos_id, tok.pad_id, tok.add_bos = 50300, 50400, 50256, True
    assert tok.vocab_size == 50401
    check_saved(tok, tmp_path / "chat", with_specials(list(specials)))


def test_save_pretrained_copies_hf_files(hf_json, mistral, tmp_path):
    ours, _ = hf_json("qwen2")
    check_saved(ours, tmp_path / "qwen2", with_specials(SPECIALS["qwen2"]))
    assert load_tokenizer(tmp_path / "qwen2").chat_template_jinja == ours.chat_template_jinja
    ours, _ = hf_json("llama2")  # tokenizer.json alone: a tokenizer_config.json is written beside it
    check_saved(ours, tmp_path / "llama2", with_specials(SPECIALS["llama2"]))
    check_saved(mistral[0], tmp_path / "mistral", with_specials(SPECIALS["llama2"]), decode_like_hf=False)


@pytest.mark.parametrize("name", ["qwen2", "llama2", "mistral-v1.model"])
def test_added_special_tokens_are_saved_and_loaded_by_transformers(tok_dir, tmp_path, name):
    """Special tokens added after loading (a chat template's missing ones) get ids from vocab_size on, are matched
    and decoded, and survive save_pretrained for transformers and for us, with a chat template attached."""
    tok = load_tokenizer(tok_dir / name)
    size, known = tok.vocab_size, list(tok.special_tokens)[0]
    new = ["<|turn|>", "<|stop turn|>"]
    assert tok.add_special_tokens([*new, known]) == [size, size + 1, tok.special_tokens[known]]
    assert tok.vocab_size == size + 2 and tok.add_special_tokens(new[1:]) == [size + 1]
    ids = tok.encode("<|turn|>hi<|stop turn|>", allow_special=True)
    assert size in ids and size + 1 in ids and size not in tok.encode("<|turn|>hi")
    tok.chat_template_jinja = "{% for m in messages %}<|turn|>{{ m['content'] }}<|stop turn|>{% endfor %}"
    check_saved(tok, tmp_path / name, with_specials([*new, known]), decode_like_hf=name != "mistral-v1.model")
    back = load_tokenizer(tmp_path / name)
    assert back.chat_template_jinja == tok.chat_template_jinja and back.special_tokens == tok.special_tokens
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / name)
    assert hf.convert_tokens_to_ids(new) == [size, size + 1] and len(hf) == size + 2


def test_encode_parts_matches_special_tokens_only_where_allowed():
    tj = tiny_tokenizer_json(TINY_MERGES, TINY_IDS, TINY_ADDED)
    ours = tokenizer_from_json(tj, "tiny")
    whole = ours.encode(TINY_TEXT, allow_special=True)
    inside = {i for t in TINY_ADDED for k in range(len(TINY_TEXT)) if TINY_TEXT.startswith(t["content"], k)
              for i in range(k + 1, k + len(t["content"]))}
    for cut in sorted(set(range(len(TINY_TEXT) + 1)) - inside):  # lstrip / rstrip reach across the cut
        assert ours.encode_parts([(TINY_TEXT[:cut], True), (TINY_TEXT[cut:], True)]) == whole, cut
    assert ours.encode_parts([(TINY_TEXT, False)]) == ours.encode(TINY_TEXT)
    ids = ours.encode_parts([("the cat", True), (" <|a|> hé", False), (" <|b|>  x", True)])
    assert 600 not in ids and 601 in ids and 650 in ids  # the non-special added token matches everywhere
    assert ids == ours.encode("the cat <|a|> hé ") + [601] + ours.encode("x")  # <|b|> swallows the spaces after it
    assert ours.encode_parts([("<|a", True), ("|>", True)]) == ours.encode("<|a|>")  # a token lies within one part


# ---------------------------------------------------------------- hand-made tokenizers (no shared assets needed)

BYTE_LEVEL_DECODER = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}


def added_token(token_id: int, content: str, special: bool = True, **flags) -> dict:
    """An entry of tokenizer.json's added_tokens, every flag spelled out as HF requires."""
    return {"id": token_id, "content": content, "special": special, "single_word": False, "lstrip": False,
            "rstrip": False, "normalized": not special} | flags


def tiny_tokenizer_json(merges: list[tuple[str, str]], ids: list[int], added: list[dict], **model) -> dict:
    """A byte-level BPE tokenizer.json: the 256 bytes at ids 0..255, each merge's result at the given id, and the
    added tokens, in the vocabulary too, at their ids (how HF keeps ids with gaps, as GPT-2's <|endoftext|>)."""
    vocab = {BYTE_TO_UNICODE[b]: b for b in range(256)}
    for (a, b), i in zip(merges, ids):
        vocab[a + b] = i
    vocab |= {t["content"]: t["id"] for t in added}
    return {"added_tokens": added, "normalizer": {"type": "NFC"},
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": r" ?\p{L}+|\p{N}|\s+(?!\S)|\s+"}, "behavior": "Isolated",
                 "invert": False},  # leaves punctuation out: the Isolated split keeps the gaps as pieces
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}]},
            "post_processor": None, "decoder": BYTE_LEVEL_DECODER,
            "model": {"type": "BPE", "vocab": vocab, "merges": [list(m) for m in merges], **model}}


TINY_MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("Ġ", "c"), ("a", "t"), ("Ġc", "at"), ("!", "!")]
TINY_IDS = [300, 301, 302, 310, 311, 400, 401, 500]  # gaps between them, and after the bytes
TINY_ADDED = [  # ids past the vocabulary, with gaps
    added_token(600, "<|a|>", lstrip=True),
    added_token(601, "<|b|>", rstrip=True),
    added_token(650, "hé", special=False),  # normalized: matched in the NFC-normalized text
    added_token(700, "cat", special=False, single_word=True, normalized=False),
]
TINY_TEXT = "the cat  <|a|> in the<|b|>   cats cat!!! he\u0301 hé 12 ,;  <|a|><|b|>\n\n  <|b|>x"


def test_tiny_byte_level_tokenizer_with_gaps_and_added_token_flags():
    tj = tiny_tokenizer_json(TINY_MERGES, TINY_IDS, TINY_ADDED)
    ours, hf = tokenizer_from_json(tj, "tiny"), HFTokenizer.from_str(json.dumps(tj))
    assert ours.vocab_size == 701 and ours.special_tokens == {"<|a|>": 600, "<|b|>": 601}
    for text in (TINY_TEXT, TINY_TEXT[::-1], ""):
        ids = assert_same_ids(ours, hf, text)
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=False)
        assert ours.decode(ids, skip_special=True) == hf.decode(ids, skip_special_tokens=True)
    assert 650 in ours.encode(TINY_TEXT) and 700 in ours.encode(TINY_TEXT)  # non-special: matched in corpora too


def test_merges_that_tiktoken_cannot_reproduce_are_refused():
    # merge order disagrees with the ids: HF would join "in" before "he"; tiktoken joins by id
    tj = tiny_tokenizer_json([("h", "e"), ("i", "n")], [301, 300], [])
    with pytest.raises(ValueError, match="tiktoken merges by id"):
        tokenizer_from_json(tj, "bad-order")
    # a vocabulary token no merge makes: tiktoken would produce it, HF never
    tj = tiny_tokenizer_json([("h", "e")], [300], [])
    tj["model"]["vocab"]["ab"] = 301
    with pytest.raises(ValueError, match="merge list does not join"):
        tokenizer_from_json(tj, "unreachable")
    # the same token made by a merge of other parts than tiktoken's BPE would join last
    tj = tiny_tokenizer_json([("a", "b"), ("b", "c"), ("a", "bc")], [300, 301, 302], [])
    with pytest.raises(ValueError, match="merge list does not join"):
        tokenizer_from_json(tj, "other-split")


@pytest.mark.parametrize("change, error, match", [
    (lambda tj: tj.update(normalizer={"type": "Lowercase"}), ValueError, "normalizer"),
    (lambda tj: tj["pre_tokenizer"]["pretokenizers"][0].update(behavior="Removed"), ValueError, "pre-tokenizer"),
    (lambda tj: tj.update(pre_tokenizer={"type": "Sequence", "pretokenizers": [
        {"type": "WhitespaceSplit"}, {"type": "ByteLevel", "use_regex": False}]}), ValueError, "pre-tokenizer"),
    (lambda tj: tj.update(decoder={"type": "WordPiece"}), ValueError, "decoder"),
    (lambda tj: tj["model"].update(dropout=0.1), ValueError, "dropout"),
    (lambda tj: tj["model"].update(type="Unigram"), NotImplementedError, "Unigram"),
])
def test_what_cannot_be_reproduced_exactly_is_refused(change, error, match):
    tj = tiny_tokenizer_json(TINY_MERGES, TINY_IDS, TINY_ADDED)
    change(tj)
    with pytest.raises(error, match=match):
        tokenizer_from_json(tj, "tiny")


def test_load_tokenizer_paths_and_errors(tmp_path):
    assert load_tokenizer("gpt2").vocab_size == 50257
    assert load_tokenizer(ASSETS / "cl100k_base.tiktoken").name == "cl100k_base"  # known by its sha256
    with pytest.raises(FileNotFoundError, match="no such file or directory.*tokenizer.json or tokenizer.model"):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="neither tokenizer.json .* nor tokenizer.model"):
        load_tokenizer(tmp_path)
    (tmp_path / "mine.tiktoken").write_bytes(b"YQ== 0\nYg== 1\n")
    with pytest.raises(ValueError, match="not a known tiktoken encoding"):
        load_tokenizer(tmp_path / "mine.tiktoken")
    with pytest.raises(ValueError, match="known: gpt2, cl100k_base, o200k_base, o200k_harmony"):
        get_tokenizer("llama3")
    tj = tiny_tokenizer_json(TINY_MERGES, TINY_IDS, TINY_ADDED)
    (tmp_path / "tokenizer.json").write_text(json.dumps(tj))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|nope|>"}))
    with pytest.raises(ValueError, match="names eos_token '<\\|nope\\|>', which is not a token"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<|b|>"}, "bos_token": None}))
    tok = load_tokenizer(tmp_path)
    assert (tok.name, tok.eos_id, tok.bos_id) == (str(tmp_path), 601, None)
    assert load_tokenizer(tok.name).encode(TINY_TEXT) == tok.encode(TINY_TEXT)  # the name loads it again
    assert load_tiktoken_ranks(ASSETS / "gpt2.tiktoken")[b"Hello"] == 15496
