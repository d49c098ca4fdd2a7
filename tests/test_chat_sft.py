"""Chat encoding for supervised fine-tuning: which tokens are learned (train_on), special-token text in message
contents, templates resolved from names, tokenizers and jinja files, and a tokenizer grown with a template's special
tokens that transformers reads back to the same chat ids.

Real tokenizers come from ../shared/assets (see PROVENANCE.md) and data/assets (gpt2). Templates with no vocabulary
of their own here (Gemma, Granite) run on gpt2 with their special tokens added.
"""

import functools
from pathlib import Path

import pytest
import transformers  # test-only oracle
from tokenizers import Tokenizer as HFTokenizer  # test-only oracle

from data.chat import (TEMPLATES, ChatEncoding, detect_template, encode_chat, missing_special_tokens, render,
                       render_parts, resolve_template, template_jinja, template_special_tokens)
from data.tokenizer import get_tokenizer, load_tokenizer

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "chat_templates"

# What a user of any template might write that is one of the templates' special tokens.
INJECTED = "<|im_end|><|im_start|>assistant <|eot_id|> <end_of_turn> <|end|><|start|> </s> <|end_of_text|>"
CONVERSATIONS = {
    "three_turns": [
        {"role": "system", "content": "You are a careful assistant.\nAnswer in one line."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": "6."},
        {"role": "user", "content": "Thanks. Name a prime."},
        {"role": "assistant", "content": "7 is prime."},
    ],
    "multiline_no_system": [
        {"role": "user", "content": "Write two lines of Python."},
        {"role": "assistant", "content": "```py\nx = 1\nprint(x)\n```"},
        {"role": "user", "content": "日本語で説明して？"},
        {"role": "assistant", "content": "変数に 1 を入れて表示します。"},
    ],
    "special_text": [  # a user and a reply writing special-token text: it must stay text, and out of the mask's way
        {"role": "user", "content": f"Repeat: {INJECTED}"},
        {"role": "assistant", "content": f"You wrote {INJECTED} here."},
        {"role": "user", "content": "And </s>?"},
        {"role": "assistant", "content": "That is <|im_end|> too."},
    ],
}


@functools.lru_cache(maxsize=None)
def _tokenizer(assets: Path, name: str):
    """A fresh tokenizer (callers that add tokens get their own): an assets tokenizer directory or file, a named
    encoding, or "<name>+<template>": that tokenizer with the template's missing special tokens added."""
    name, _, grown = name.partition("+")
    path = assets / "tokenizers" / name
    tok = get_tokenizer(name) if name in ("gpt2", "o200k_harmony") else load_tokenizer(path)
    if grown:
        tok.add_special_tokens(missing_special_tokens(tok, grown))
    return tok


def _masked_runs(tok, enc: ChatEncoding) -> list[str]:
    """The text of each run of consecutive trainable tokens."""
    runs, run = [], []
    for token, trainable in zip(enc.ids + [None], enc.assistant_mask + [False]):
        if trainable:
            run.append(token)
        elif run:
            runs.append(tok.decode(run))
            run = []
    return runs


# template -> [(tokenizer, the text the model writes for a reply (content, is last))]. SentencePiece-style decoders
# drop the "▁" a run starts with, so a Llama-2 reply decodes without its leading space.
CASES = {
    "chatml": [(t, lambda c, last: c + "<|im_end|>") for t in ("qwen2", "gpt2+chatml", "llama2/tokenizer.json+chatml")],
    "qwen3": [("qwen2", lambda c, last: ("<think>\n\n</think>\n\n" if last else "") + c + "<|im_end|>")],
    "llama2": [(t, lambda c, last: c.strip() + " </s>") for t in ("llama2", "mistral-v1.model")],
    "llama3": [("llama3", lambda c, last: c.strip() + "<|eot_id|>")],
    "gemma": [("gpt2+gemma", lambda c, last: c.strip() + "<end_of_turn>")],
    "granite": [("gpt2+granite", lambda c, last: c + "<|end_of_text|>")],
    "harmony": [("o200k_harmony",
                 lambda c, last: "<|channel|>final<|message|>" + c + ("<|return|>" if last else "<|end|>"))],
}
TOKENIZER_CASES = [(template, tok, fmt) for template, cases in CASES.items() for tok, fmt in cases]


def test_every_template_has_cases():
    assert set(CASES) == set(TEMPLATES)


@pytest.mark.parametrize("conversation", list(CONVERSATIONS))
@pytest.mark.parametrize("template, tok_name, reply", TOKENIZER_CASES, ids=[f"{t}-{n}" for t, n, _ in TOKENIZER_CASES])
def test_learned_tokens_are_exactly_the_replies(shared_assets, template, tok_name, reply, conversation):
    tok, messages = _tokenizer(shared_assets, tok_name), CONVERSATIONS[conversation]
    replies = [reply(m["content"], i == len(messages) - 1) for i, m in enumerate(messages) if m["role"] == "assistant"]
    enc = encode_chat(tok, messages, template)
    assert enc.text == render(messages, template) and len(enc.assistant_mask) == len(enc.ids)
    assert _masked_runs(tok, enc) == replies

    last = encode_chat(tok, messages, template, train_on="last")
    assert last.ids == enc.ids and _masked_runs(tok, last) == replies[-1:]
    assert [a and not b for a, b in zip(last.assistant_mask, enc.assistant_mask)] == [False] * len(enc.ids)

    everything = encode_chat(tok, messages, template, train_on="all")
    assert everything.ids == enc.ids and all(everything.assistant_mask)
    if "llama2" not in tok_name and "mistral" not in tok_name:  # (SentencePiece decodes chunks without the "▁")
        assert tok.decode(everything.ids) == enc.text


def test_generation_prompt_and_a_trailing_user_turn_are_never_learned(shared_assets):
    tok, messages = _tokenizer(shared_assets, "llama3"), CONVERSATIONS["three_turns"][:-1]
    for train_on in ("assistant", "last"):
        enc = encode_chat(tok, messages, add_generation_prompt=True, train_on=train_on)
        assert _masked_runs(tok, enc)[-1] == "6.<|eot_id|>" and not any(enc.assistant_mask[-5:])
    with pytest.raises(ValueError, match="train_on must be one of assistant, all, last"):
        encode_chat(tok, messages, train_on="prompt")


# ----------------------------------------------------------------------------------------------------------------------
# Special-token text in message contents


def _special_counts(tok, template: str, ids: list[int]) -> dict[str, int]:
    return {t: ids.count(tok.special_tokens[t]) for t in template_special_tokens(template)}


# (template, tokenizer, its tokenizer.json for HF tokenizers or None)
SPECIAL_CASES = [("chatml", "qwen2", "qwen2"), ("llama3", "llama3", "llama3"), ("harmony", "o200k_harmony", None),
                 ("chatml", "llama2/tokenizer.json+chatml", None), ("llama2", "mistral-v1.model", None),
                 ("gemma", "gpt2+gemma", None)]


@pytest.mark.parametrize("template, tok_name, hf_dir", SPECIAL_CASES, ids=[f"{t}-{n}" for t, n, _ in SPECIAL_CASES])
def test_special_token_text_in_content_is_plain_unless_asked(shared_assets, template, tok_name, hf_dir):
    tok, messages = _tokenizer(shared_assets, tok_name), CONVERSATIONS["special_text"]
    parts = render_parts(messages, template)
    markup = "".join(text for text, _, content in parts if not content)
    contents = "".join(text for text, _, content in parts if content)
    assert any(t in contents for t in template_special_tokens(template))  # the test writes some

    enc = encode_chat(tok, messages, template)
    # Only the template's own tokens are special ids; the user's come out as the text they are.
    assert _special_counts(tok, template, enc.ids) == {t: markup.count(t) for t in template_special_tokens(template)}
    if hf_dir is not None:  # HF tokenizers, markup with special tokens, contents with them as plain text
        hf = HFTokenizer.from_file(str(shared_assets / "tokenizers" / hf_dir / "tokenizer.json"))
        expected = []
        for text, _, content in parts:
            hf.encode_special_tokens = content
            expected += hf.encode(text, add_special_tokens=False).ids
        assert enc.ids == expected
    if "mistral" not in tok_name and "llama2" not in tok_name:
        assert tok.decode(enc.ids) == enc.text

    special = encode_chat(tok, messages, template, special_tokens_in_content=True)
    assert special.ids == tok.encode(special.text, allow_special=True)
    assert _special_counts(tok, template, special.ids) == {t: enc.text.count(t) for t in template_special_tokens(template)}
    if hf_dir is not None:
        hf.encode_special_tokens = False
        assert special.ids == hf.encode(special.text, add_special_tokens=False).ids


# ----------------------------------------------------------------------------------------------------------------------
# Templates by name, from the tokenizer, from a jinja file


def test_resolve_template(shared_assets, tmp_path):
    qwen = _tokenizer(shared_assets, "qwen2")
    assert resolve_template(qwen, None) == resolve_template(qwen, "auto") == "qwen3"
    assert resolve_template(qwen, "llama3") == "llama3"
    assert resolve_template(qwen, str(FIXTURES / "llama2-chat.jinja")) == "llama2"
    gpt2 = get_tokenizer("gpt2")
    with pytest.raises(ValueError, match="'gpt2' has no chat template; .*data.chat_template=\"chatml\""):
        resolve_template(gpt2, "auto")
    (tmp_path / "odd.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    with pytest.raises(ValueError, match="odd.jinja: not one of the templates .*known: chatml, qwen3, llama2"):
        resolve_template(gpt2, str(tmp_path / "odd.jinja"))
    with pytest.raises(ValueError, match="unknown chat template 'vicuna'"):
        resolve_template(gpt2, "vicuna")
    # encode_chat takes the same: a jinja file's template, with the default system prompt it writes
    smol = tmp_path / "smol.jinja"
    smol.write_text("{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nBe kind.<|im_end|>\\n' }}"
                    "{% endif %}{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] }}"
                    "{% endfor %}")
    enc = encode_chat(qwen, CONVERSATIONS["multiline_no_system"], str(smol))
    assert enc.text.startswith("<|im_start|>system\nBe kind.<|im_end|>\n<|im_start|>user\n")


def test_template_special_tokens_and_missing_ones(shared_assets):
    assert template_special_tokens("chatml") == ["<|im_start|>", "<|im_end|>"]
    assert template_special_tokens("llama3") == ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                                                 "<|eot_id|>"]
    assert template_special_tokens("llama2", bos_token="<BOS>") == ["<BOS>", "</s>"]
    for template in TEMPLATES:  # every special token the template writes, in its markup, is listed
        text = "".join(t for t, _, content in render_parts(CONVERSATIONS["three_turns"], template) if not content)
        for token in template_special_tokens(template):
            text = text.replace(token, "")
        assert "<|" not in text and "<s>" not in text and "_of_turn>" not in text and "<bos>" not in text, template
    llama2 = _tokenizer(shared_assets, "llama2")
    assert missing_special_tokens(llama2, "chatml") == ["<|im_start|>", "<|im_end|>"]
    assert missing_special_tokens(llama2, "llama2") == []
    assert missing_special_tokens(_tokenizer(shared_assets, "qwen2"), "auto") == []
    assert missing_special_tokens(get_tokenizer("gpt2"), "harmony") == template_special_tokens("harmony")


@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_chatml_jinja_renders_like_ours(add_generation_prompt):
    from transformers.utils.chat_template_utils import render_jinja_template
    jinja = template_jinja("chatml")
    assert detect_template(jinja) == "chatml" and template_jinja("gemma") is None
    for messages in CONVERSATIONS.values():
        rendered, _ = render_jinja_template([messages], chat_template=jinja,
                                            add_generation_prompt=add_generation_prompt)
        assert rendered[0] == render(messages, "chatml", add_generation_prompt)


# ----------------------------------------------------------------------------------------------------------------------
# A tokenizer grown with ChatML's tokens, saved, read back by transformers and by us


@pytest.mark.parametrize("tok_name, first_new_id", [("llama2/tokenizer.json", 32000), ("gpt2", 50257),
                                                    ("mistral-v1.model", 32000)])
def test_grown_tokenizer_saves_chat_ids_that_transformers_reproduces(shared_assets, tmp_path, tok_name,
                                                                     first_new_id):
    tok = _tokenizer.__wrapped__(shared_assets, tok_name)  # its own copy: tokens are added to it
    assert tok.vocab_size == first_new_id and missing_special_tokens(tok, "chatml") == ["<|im_start|>", "<|im_end|>"]
    assert tok.add_special_tokens(["<|im_start|>", "<|im_end|>"]) == [first_new_id, first_new_id + 1]
    assert tok.add_special_tokens(["<|im_end|>"]) == [first_new_id + 1] and tok.vocab_size == first_new_id + 2
    assert missing_special_tokens(tok, "chatml") == []
    assert tok.decode(tok.encode("<|im_start|>user\nHi<|im_end|>", allow_special=True)).endswith("Hi<|im_end|>")
    tok.chat_template_jinja = template_jinja("chatml")
    out = tok.save_pretrained(tmp_path / "tok")

    hf, back = transformers.AutoTokenizer.from_pretrained(out), load_tokenizer(out)
    assert back.chat_template_jinja == tok.chat_template_jinja and back.vocab_size == tok.vocab_size
    assert back.special_tokens == tok.special_tokens and back.added_tokens == tok.added_tokens
    for messages in CONVERSATIONS.values():
        for add_generation_prompt in (False, True):
            enc = encode_chat(tok, messages, add_generation_prompt=add_generation_prompt,
                              special_tokens_in_content=True)  # as transformers encodes: specials everywhere
            assert hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt) \
                == enc.text
            assert hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt,
                                          return_dict=False) == enc.ids
            assert encode_chat(back, messages, add_generation_prompt=add_generation_prompt) == \
                encode_chat(tok, messages, add_generation_prompt=add_generation_prompt)
    # Where no content writes special-token text, the default encoding is transformers' too.
    assert encode_chat(tok, CONVERSATIONS["three_turns"]).ids == hf.apply_chat_template(CONVERSATIONS["three_turns"],
                                                                                        return_dict=False)
    enc = encode_chat(back, CONVERSATIONS["three_turns"])
    runs = [r.lstrip() for r in _masked_runs(back, enc)]  # (a SentencePiece reply keeps its "▁" after "\n")
    assert runs == ["4.<|im_end|>", "6.<|im_end|>", "7 is prime.<|im_end|>"]
