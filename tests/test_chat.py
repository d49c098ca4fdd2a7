"""Chat templates against the models' own: their jinja `chat_template` rendered by transformers, OpenAI's Harmony
renderer for GPT-OSS, and the real tokenizers for ids and assistant masks.

Jinja sources: ../shared/assets (qwen2, llama3, gemma tokenizer_config.json; the SmolLM2 GGUF) and
tests/fixtures/chat_templates (Llama-2, Granite 3.0 / 3.1, plain ChatML; see the README there).
"""

import datetime
import functools
import json
from pathlib import Path

import pytest

from data.chat import (TEMPLATES, ChatEncoding, detect_default_system, detect_template, encode_chat,
                       granite_system_prompt, render, render_segments)

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "chat_templates"

SYSTEM = {"role": "system", "content": "You are a careful assistant.\nAnswer in one line."}
CONVERSATIONS = {
    "one_turn": [{"role": "user", "content": "Hello!"}],
    "system_one_turn": [SYSTEM, {"role": "user", "content": "What is 2+2?"}],
    "three_turns": [
        SYSTEM,
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": "6."},
        {"role": "user", "content": "Thanks. Name a prime."},
        {"role": "assistant", "content": "7 is prime."},
    ],
    "three_turns_no_system": [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Tell me a joke."},
        {"role": "assistant", "content": "Why did the chicken cross the road?"},
        {"role": "user", "content": "Why?"},
    ],
    # Newlines inside and around contents, surrounding spaces, non-ASCII, a reply opening with a newline.
    "awkward_text": [
        {"role": "system", "content": "  Réponds en français.\n\nSois bref.  "},
        {"role": "user", "content": "  Qu'est-ce qu'un 🐍 ?\nDeux lignes.\n"},
        {"role": "assistant", "content": "\nUn serpent — « python » en anglais.\n\n```py\nprint('ok')\n```\n"},
        {"role": "user", "content": "日本語で？"},
        {"role": "assistant", "content": "ヘビです。"},
    ],
}


# ----------------------------------------------------------------------------------------------------------------------
# Oracles


@functools.lru_cache(maxsize=None)
def _jinja(assets: Path, source: str) -> str:
    """A jinja chat template: 'fixture:<file>', 'gguf:<model file>' or '<tokenizer dir>' (its tokenizer_config.json)."""
    if source.startswith("fixture:"):
        return (FIXTURES / source.removeprefix("fixture:")).read_text()
    if source.startswith("gguf:"):
        from gguf import GGUFReader
        field = GGUFReader(assets / "models" / source.removeprefix("gguf:")).fields["tokenizer.chat_template"]
        return bytes(field.parts[field.data[0]]).decode()
    return json.loads((assets / "tokenizers" / source / "tokenizer_config.json").read_text())["chat_template"]


def hf_render(jinja: str, messages: list[dict], add_generation_prompt: bool, **kwargs) -> str:
    """What tokenizer.apply_chat_template(messages, tokenize=False) renders: transformers' own jinja renderer."""
    from transformers.utils.chat_template_utils import render_jinja_template
    rendered, _ = render_jinja_template([messages], chat_template=jinja, add_generation_prompt=add_generation_prompt,
                                        **kwargs)
    return rendered[0]


# Model family -> (jinja source, the special tokens its tokenizer hands the template, the template we detect).
JINJA = {
    "chatml": ("fixture:chatml.jinja", {}, "chatml"),
    "smollm2": ("gguf:SmolLM2-135M-Instruct.Q4_1.gguf", {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"},
                "chatml"),
    "qwen3": ("qwen2", {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}, "qwen3"),
    "llama2": ("fixture:llama2-chat.jinja", {"bos_token": "<s>", "eos_token": "</s>"}, "llama2"),
    "llama3": ("llama3", {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}, "llama3"),
    "gemma": ("gemma", {"bos_token": "<bos>", "eos_token": "<end_of_turn>"}, "gemma"),
    "granite-3.0": ("fixture:granite-3.0-instruct.jinja", {}, "granite"),
    "granite-3.1": ("fixture:granite-3.1-instruct.jinja", {}, "granite"),
}
FROZEN_NOW = datetime.datetime(2024, 7, 4, 12, 0)  # Granite 3.1's template dates its default system prompt


@pytest.fixture
def frozen_clock(monkeypatch):
    """transformers' strftime_now() (used by Granite 3.1's template) reads FROZEN_NOW."""
    import transformers.utils.chat_template_utils as ctu

    class Clock(datetime.datetime):
        @classmethod
        def now(cls, tz=None):
            return FROZEN_NOW
    monkeypatch.setattr(ctu, "datetime", Clock)


@pytest.mark.parametrize("add_generation_prompt", [False, True])
@pytest.mark.parametrize("conversation", list(CONVERSATIONS))
@pytest.mark.parametrize("family", list(JINJA))
def test_render_matches_model_jinja(shared_assets, frozen_clock, family, conversation, add_generation_prompt):
    source, special_tokens, expected_template = JINJA[family]
    jinja, messages = _jinja(shared_assets, source), CONVERSATIONS[conversation]
    template = detect_template(jinja)
    assert template == expected_template
    options = {}
    if family == "granite-3.1":
        options["default_system"] = granite_system_prompt(FROZEN_NOW.date())
    elif template in ("chatml", "granite"):
        options["default_system"] = detect_default_system(jinja)
    ours = render(messages, template, add_generation_prompt, **options)
    assert ours == hf_render(jinja, messages, add_generation_prompt, **special_tokens)


THINKING = [
    {"role": "user", "content": "What is 17*3?"},
    {"role": "assistant", "content": "51.", "thinking": "17*3 = 51."},
    {"role": "user", "content": "And 17*4?"},
    {"role": "assistant", "content": "\n68.", "thinking": "\n17*4 = 68.\nDouble-check: 68.\n"},
]
INLINE_THINKING = [  # reasoning written into the reply, as distilled reasoning datasets store it
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "<think>\nSay hello.\n</think>\n\nHello!"},
    {"role": "user", "content": "Bye"},
    {"role": "assistant", "content": "<think>\nSay bye.\n</think>\n\nBye!"},
]


@pytest.mark.parametrize("enable_thinking", [True, False])
@pytest.mark.parametrize("messages", [THINKING, INLINE_THINKING, THINKING[:2], THINKING[:3]])
def test_qwen3_reasoning_matches_jinja(shared_assets, messages, enable_thinking):
    jinja = _jinja(shared_assets, "qwen2")
    for add_generation_prompt in (False, True):
        ours = render(messages, "qwen3", add_generation_prompt, enable_thinking=enable_thinking)
        assert ours == hf_render(jinja, messages, add_generation_prompt, enable_thinking=enable_thinking)
    assert "17*3 = 51." not in render(THINKING, "qwen3")  # reasoning of turns before the last user message is dropped


def test_qwen3_plain_conversation_gets_an_empty_think_block():
    text = render(CONVERSATIONS["three_turns"], "qwen3")
    assert text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n7 is prime.<|im_end|>\n")
    assert text.count("<think>") == 1  # only the turn after the last user message


# ----------------------------------------------------------------------------------------------------------------------
# Harmony (GPT-OSS) against openai_harmony


@pytest.fixture
def harmony_encoding(shared_assets, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_ENCODINGS_BASE", str(shared_assets / "tokenizers"))  # o200k_base.tiktoken, offline
    return _harmony_encoding()


@functools.lru_cache(maxsize=None)
def _harmony_encoding():
    from openai_harmony import HarmonyEncodingName, load_harmony_encoding
    return load_harmony_encoding(HarmonyEncodingName.HARMONY_GPT_OSS)


def harmony_oracle(enc, messages: list[dict], add_generation_prompt: bool, reasoning_effort: str = "medium",
                   conversation_start_date: str | None = None, **identity) -> list[int]:
    """The tokens openai_harmony renders for `messages`: for completion with a generation prompt, for training when
    the conversation ends with the assistant, as it is otherwise. Reasoning is passed only for the assistant messages
    after the last user message (data.chat's rule: earlier reasoning is dropped) and rendered as given
    (auto_drop_analysis=False; harmony's own rule drops the analysis before the first final message, a single turn's
    included)."""
    from openai_harmony import (Conversation, DeveloperContent, Message, ReasoningEffort, RenderConversationConfig,
                                Role, SystemContent)
    system = SystemContent.new().with_reasoning_effort(ReasoningEffort(reasoning_effort.capitalize()))
    if conversation_start_date:
        system = system.with_conversation_start_date(conversation_start_date)
    if "model_identity" in identity:
        system = system.with_model_identity(identity["model_identity"])
    out = [Message.from_role_and_content(Role.SYSTEM, system)]
    if messages[0]["role"] in ("system", "developer"):
        developer = DeveloperContent.new().with_instructions(messages[0]["content"])
        out.append(Message.from_role_and_content(Role.DEVELOPER, developer))
        messages = messages[1:]
    last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
    for i, m in enumerate(messages):
        if m["role"] == "user":
            out.append(Message.from_role_and_content(Role.USER, m["content"]))
            continue
        if m.get("thinking") and i > last_user:
            out.append(Message.from_role_and_content(Role.ASSISTANT, m["thinking"]).with_channel("analysis"))
        out.append(Message.from_role_and_content(Role.ASSISTANT, m["content"]).with_channel("final"))
    conversation, config = Conversation.from_messages(out), RenderConversationConfig(auto_drop_analysis=False)
    if add_generation_prompt:
        return enc.render_conversation_for_completion(conversation, Role.ASSISTANT, config)
    if messages[-1]["role"] == "assistant":
        return enc.render_conversation_for_training(conversation, config)
    return enc.render_conversation(conversation, config)


@pytest.mark.parametrize("add_generation_prompt", [False, True])
@pytest.mark.parametrize("conversation", [*CONVERSATIONS, "thinking", "thinking_one_turn"])
def test_harmony_matches_openai_harmony(harmony_encoding, conversation, add_generation_prompt):
    messages = {"thinking": THINKING, "thinking_one_turn": THINKING[:2]}.get(conversation)
    messages = messages or CONVERSATIONS[conversation]
    expected = harmony_encoding.decode_utf8(harmony_oracle(harmony_encoding, messages, add_generation_prompt))
    assert render(messages, "harmony", add_generation_prompt) == expected


@pytest.mark.parametrize("options", [
    {"reasoning_effort": "high"},
    {"reasoning_effort": "low", "conversation_start_date": "2025-06-28"},
    {"model_identity": "You are a terse assistant.", "conversation_start_date": "2025-01-01"},
])
def test_harmony_system_parameters_match_openai_harmony(harmony_encoding, options):
    messages = [{"role": "developer", "content": "Use metric units."}, *CONVERSATIONS["three_turns"][1:3]]
    expected = harmony_encoding.decode_utf8(harmony_oracle(harmony_encoding, messages, False, **options))
    assert render(messages, "harmony", **options) == expected


def test_harmony_drops_reasoning_of_earlier_turns():
    text = render(THINKING, "harmony")
    assert "17*3 = 51." not in text and "17*4 = 68." in text
    assert text.endswith("<|channel|>final<|message|>\n68.<|return|>")


# ----------------------------------------------------------------------------------------------------------------------
# Detection


def test_detect_template_on_model_templates(shared_assets):
    for family, (source, _, expected) in JINJA.items():
        assert detect_template(_jinja(shared_assets, source)) == expected, family
    assert detect_default_system(_jinja(shared_assets, "gguf:SmolLM2-135M-Instruct.Q4_1.gguf")) == \
        "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    assert detect_default_system(_jinja(shared_assets, "fixture:granite-3.1-instruct.jinja")) == granite_system_prompt()
    for no_default in ("qwen2", "llama3", "gemma", "fixture:chatml.jinja", "fixture:granite-3.0-instruct.jinja"):
        assert detect_default_system(_jinja(shared_assets, no_default)) is None, no_default


def test_detect_template_unknown_or_unsupported():
    assert detect_template(None) is None and detect_template("") is None
    assert detect_template("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}") is None
    # Variants that render differently: Mistral's [INST] without Llama-2's <<SYS>>, Llama-3.1's dated system
    # preamble, a ChatML opening with BOS (Hermes 3), QwQ's reasoning ChatML
    assert detect_template("{{ bos_token }}{% for m in messages %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
                           "{% endfor %}") is None
    assert detect_template("<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023") \
        is None
    assert detect_template("{{ bos_token }}{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' }}"
                           "{% endfor %}") is None
    qwq = "{%- if '</think>' in content %}{% endif %}{{ '<|im_start|>assistant\\n<think>\\n' }}"
    assert detect_template(qwq) is None
    qwen25 = ("{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou are Qwen, created "
              "by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}{% endif %}")
    assert detect_template(qwen25) == "chatml"
    assert detect_default_system(qwen25) == "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."


# ----------------------------------------------------------------------------------------------------------------------
# Validation


@pytest.mark.parametrize("template", list(TEMPLATES))
def test_rejects_malformed_conversations(template):
    user, assistant = {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}
    cases = [
        ([], "empty"),
        ([{"role": "robot", "content": "Hi"}], "unknown role 'robot'"),
        ([user, SYSTEM], "only the first message"),
        ([SYSTEM], "only a system message"),
        ([{"role": "user", "content": ["Hi"]}], "must be a string"),
        ([{"role": "user"}], "'role' and 'content'"),
        ([{"role": "user", "content": "Hi", "thinking": "hm"}], "thinking"),
    ]
    if template in ("llama2", "gemma"):
        cases += [([user, user], "alternate"), ([SYSTEM, assistant, user], "alternate")]
    if template not in ("qwen3", "harmony"):
        cases.append(([user, {**assistant, "thinking": "hm"}], "cannot write"))
    for messages, problem in cases:
        with pytest.raises(ValueError, match=problem):
            render(messages, template)


def test_rejects_unknown_template_and_option():
    with pytest.raises(ValueError, match="unknown chat template 'vicuna'; known: chatml"):
        render(CONVERSATIONS["one_turn"], "vicuna")
    with pytest.raises(ValueError, match="reasoning_effort"):
        render(CONVERSATIONS["one_turn"], "harmony", reasoning_effort="max")
    with pytest.raises(TypeError, match="reasoning_effort"):
        render(CONVERSATIONS["one_turn"], "chatml", reasoning_effort="high")


def test_segments_join_to_text_and_mark_only_replies():
    for template in TEMPLATES:
        segments = render_segments(CONVERSATIONS["three_turns"], template)
        trainable = "".join(text for text, train in segments if train)
        for reply in ("4.", "6.", "7 is prime."):
            assert reply in trainable, template
        assert "What is 2+2?" not in trainable and "careful assistant" not in trainable, template
        assert "assistant" not in trainable.replace("<|start|>assistant", ""), template  # no role headers


@pytest.mark.parametrize("template", list(TEMPLATES))
def test_parts_tell_message_text_from_markup(template):
    """Content parts hold the messages' text and nothing of the template; markup holds none of the messages."""
    from data.chat import render_parts, template_special_tokens
    for messages in (CONVERSATIONS["three_turns"], CONVERSATIONS["awkward_text"], *(
            [THINKING] if template in ("qwen3", "harmony") else [])):
        parts = render_parts(messages, template)
        contents = [text for text, _, content in parts if content and text]
        markup = "".join(text for text, _, content in parts if not content)
        rendered = "".join(text for text, _, _ in parts)
        assert rendered == render(messages, template)
        for m in messages:  # (earlier turns' reasoning is dropped; "4." and "6." are too short to be sure of)
            for text in (m["content"], m.get("thinking")):
                if text and text.strip() in rendered and text.strip() not in ("4.", "6."):
                    assert any(text.strip() in c for c in contents), (template, text)
                    assert text.strip() not in markup, (template, text)
        assert not any(t in c for c in contents for t in template_special_tokens(template)), template


# ----------------------------------------------------------------------------------------------------------------------
# Token ids and assistant masks with the real tokenizers


@functools.lru_cache(maxsize=None)
def _tokenizer(assets: Path, name: str):
    """A model's tokenizer directory in the assets, or a named encoding ("o200k_harmony": GPT-OSS's, 15x faster to
    build than from its 28 MB tokenizer.json; the mask test checks their ids agree through HF tokenizers)."""
    from data.tokenizer import load_tokenizer
    directory = assets / "tokenizers" / name
    return load_tokenizer(directory if directory.is_dir() else name)


@functools.lru_cache(maxsize=None)
def _hf_tokenizer(assets: Path, name: str):
    from tokenizers import Tokenizer
    return Tokenizer.from_file(str(assets / "tokenizers" / name / "tokenizer.json"))


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


def _replies(messages: list[dict], fmt) -> list[str]:
    return [fmt(m["content"], i == len(messages) - 1) for i, m in enumerate(messages) if m["role"] == "assistant"]


# (tokenizer, its tokenizer.json dir for HF tokenizers, template or None to detect it, the text the model writes for
# each reply (content, is last)). Gemma and Granite have no vocabulary here (see the straddling test below).
MASK_CASES = {
    "qwen3": ("qwen2", "qwen2", None,
              lambda c, last: ("<think>\n\n</think>\n\n" if last else "") + c + "<|im_end|>"),
    "chatml": ("qwen2", "qwen2", "chatml", lambda c, last: c + "<|im_end|>"),  # attached by name instead of qwen3
    "llama3": ("llama3", "llama3", None, lambda c, last: c.strip() + "<|eot_id|>"),
    "harmony": ("o200k_harmony", "gpt-oss", "harmony",
                lambda c, last: "<|channel|>final<|message|>" + c + ("<|return|>" if last else "<|end|>")),
    "llama2": ("llama2", "llama2", "llama2", lambda c, last: c.strip() + " </s>"),  # decode drops a leading "▁"
}


@pytest.mark.parametrize("conversation", ["three_turns", "awkward_text"])
@pytest.mark.parametrize("case", list(MASK_CASES))
def test_encode_chat_ids_and_assistant_mask(shared_assets, case, conversation):
    tok_name, tok_dir, template, reply_text = MASK_CASES[case]
    tok, messages = _tokenizer(shared_assets, tok_name), CONVERSATIONS[conversation]
    enc = encode_chat(tok, messages, template)
    assert enc.text == render(messages, template or case)
    assert len(enc.assistant_mask) == len(enc.ids)
    assert enc.ids == tok.encode(enc.text, allow_special=True)  # segment-wise == the whole text at once
    assert enc.ids == _hf_tokenizer(shared_assets, tok_dir).encode(enc.text, add_special_tokens=False).ids
    expected = _replies(messages, reply_text)
    if conversation == "awkward_text" and case in ("chatml", "qwen3"):
        # The first reply opens with "\n", which tokenizes together with the header's "\n": that token stays prompt.
        expected[0] = expected[0].removeprefix("\n")
    assert _masked_runs(tok, enc) == expected


@pytest.mark.parametrize("tok_name, template", [("qwen2", "qwen3"), ("qwen2", "chatml"), ("llama3", "llama3"),
                                                ("o200k_harmony", "harmony")])
def test_segment_wise_ids_are_the_whole_text_ids(shared_assets, tok_name, template):
    """encode_chat's fast path: the template's boundaries sit where these byte-level BPEs split anyway."""
    tok = _tokenizer(shared_assets, tok_name)
    for messages in (CONVERSATIONS["three_turns"], CONVERSATIONS["three_turns_no_system"]):
        segments = render_segments(messages, template, add_generation_prompt=True)
        pieces = [i for text, _ in segments for i in tok.encode(text, allow_special=True)]
        assert pieces == tok.encode("".join(text for text, _ in segments), allow_special=True)


def test_encode_chat_when_a_token_straddles_segments(shared_assets):
    """Granite's markers are plain text in Qwen's vocabulary, so "|>" + "\n" after a reply is one token: the ids
    stay those of the whole text, and the straddling token goes to the reply before it."""
    tok, messages = _tokenizer(shared_assets, "qwen2"), CONVERSATIONS["three_turns"]
    enc = encode_chat(tok, messages, "granite")
    assert enc.ids == tok.encode(enc.text, allow_special=True) and len(enc.assistant_mask) == len(enc.ids)
    assert _masked_runs(tok, enc) == ["4.<|end_of_text|>\n", "6.<|end_of_text|>\n", "7 is prime.<|end_of_text|>\n"]


def test_encode_chat_harmony_ids_match_openai_harmony(shared_assets, harmony_encoding):
    tok = _tokenizer(shared_assets, "o200k_harmony")
    for messages in (CONVERSATIONS["three_turns"], CONVERSATIONS["awkward_text"], THINKING):
        for add_generation_prompt in (False, True):
            enc = encode_chat(tok, messages, "harmony", add_generation_prompt)
            assert enc.ids == harmony_oracle(harmony_encoding, messages, add_generation_prompt)
    enc = encode_chat(tok, THINKING, "harmony")
    assert _masked_runs(tok, enc)[-1] == ("<|channel|>analysis<|message|>\n17*4 = 68.\nDouble-check: 68.\n<|end|>"
                                          "<|start|>assistant<|channel|>final<|message|>\n68.<|return|>")


def test_generation_prompt_is_never_trainable(shared_assets):
    tok = _tokenizer(shared_assets, "llama3")
    enc = encode_chat(tok, CONVERSATIONS["three_turns_no_system"], add_generation_prompt=True)
    assert enc.text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert _masked_runs(tok, enc) == ["Hello! How can I help?<|eot_id|>",
                                      "Why did the chicken cross the road?<|eot_id|>"]
    assert not any(enc.assistant_mask[-4:])


def test_tokenizer_apply_chat_template(shared_assets):
    tok = _tokenizer(shared_assets, "qwen2")
    messages = CONVERSATIONS["three_turns"]
    assert tok.apply_chat_template(messages) == encode_chat(tok, messages)
    assert tok.apply_chat_template(messages, "chatml", True) == encode_chat(tok, messages, "chatml", True)


def test_encode_chat_without_template_says_what_to_pass():
    class Plain:  # a tokenizer with no chat template (e.g. GPT-OSS's tokenizer.json, or GPT-2)
        name = "plain"

        def encode_parts(self, parts):
            return list("".join(text for text, _ in parts).encode())
    with pytest.raises(ValueError, match="has no chat template; pass one by name, e.g. template='chatml' "
                                         "\\(data.chat_template=\"chatml\""):
        encode_chat(Plain(), CONVERSATIONS["one_turn"])
    Plain.chat_template_jinja = "{{ messages[0]['content'] }}"
    with pytest.raises(ValueError, match="none of ours"):
        encode_chat(Plain(), CONVERSATIONS["one_turn"])
    enc = encode_chat(Plain(), CONVERSATIONS["one_turn"], "chatml", add_generation_prompt=True)
    assert bytes(enc.ids).decode() == enc.text and not any(enc.assistant_mask)
