"""Chat templates: a conversation -> the exact text a chat model was trained on, its token ids, and which of them to
learn.

    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"}]
    render(messages, "chatml")
    # '<|im_start|>system\\nBe brief.<|im_end|>\\n<|im_start|>user\\nHi<|im_end|>\\n'
    # '<|im_start|>assistant\\nHello!<|im_end|>\\n'
    enc = encode_chat(tok, messages)     # template detected from tok.chat_template_jinja, or pass template="chatml"
    enc.ids, enc.assistant_mask, enc.text

Each template is one function written from the model's own jinja `chat_template` (for GPT-OSS, from OpenAI's Harmony
renderer); tests/test_chat.py renders the same conversations through those originals and compares the strings.

A template returns parts: (text, trainable, content) triples whose texts join to the rendered string. `trainable`
marks what the model itself generates after the generation prompt: the assistant's reply and the token that ends it
(ChatML's <|im_end|>, Llama-3's <|eot_id|>, ...), never the role header, which the prompt supplies. This is the mask
of an assistant-only loss (what HF's `{% generation %}` blocks and TRL's assistant_only_loss mark); it always comes
from the parts, never from searching the ids for a header. `content` marks message text (contents, reasoning, system
prompts) as opposed to the template's own markup: encode_chat lets only markup hold special tokens, so a user who
writes "<|im_end|>" gets the text "<|im_end|>", not the end of the turn.

For supervised fine-tuning: resolve_template() names the template of a tokenizer or a jinja file,
template_special_tokens() / missing_special_tokens() say which special tokens a template needs and a tokenizer lacks
(Tokenizer.add_special_tokens adds them), and template_jinja() gives a jinja text that renders what our function
does, to attach to the tokenizer (chat_template_jinja) so that a saved tokenizer renders identically in transformers.

Messages are dicts with "role" (system, user, assistant; Harmony also developer) and "content" (a string). A system
(or developer) message may only come first. An assistant message may carry "thinking", its reasoning, for the templates
that write reasoning (qwen3, harmony); they keep it only in the turn after the last user message, as the models'
own templates do, since a model never sees its earlier reasoning at inference.
"""

import datetime
import inspect
import re
from dataclasses import dataclass
from pathlib import Path

Part = tuple[str, bool, bool]  # (text, trainable, content): content is message text, markup is the template's own
Segment = tuple[str, bool]     # (text, trainable)

ROLES = ("system", "user", "assistant")


def _markup(text: str, trainable: bool = False) -> Part:
    return (text, trainable, False)


def _content(text: str, trainable: bool = False) -> Part:
    return (text, trainable, True)


def _strip(parts: list[Part]) -> list[Part]:
    """The parts with the whitespace around their joined text removed, as str.strip() removes it."""
    parts = list(parts)
    for order in (range(len(parts)), range(len(parts) - 1, -1, -1)):
        for i in order:
            text, trainable, content = parts[i]
            text = text.lstrip() if order.step == 1 else text.rstrip()
            parts[i] = (text, trainable, content)
            if text:
                break
    return parts


# ----------------------------------------------------------------------------------------------------------------------
# Templates: messages -> parts


def chatml(messages: list[dict], add_generation_prompt: bool = False,
           default_system: str | None = None) -> list[Part]:
    """ChatML (Qwen2/2.5, SmolLM2, Hermes, ...). default_system is the system turn some models' templates write when
    the conversation has none (SmolLM2: "You are a helpful AI assistant named SmolLM, trained by Hugging Face").

        <|im_start|>system\\n{system}<|im_end|>\\n
        <|im_start|>user\\n{user}<|im_end|>\\n
        <|im_start|>assistant\\n[{reply}<|im_end|>]\\n
        <|im_start|>assistant\\n                                    (generation prompt)
    """
    _validate(messages, "chatml")
    if default_system is not None and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": default_system}, *messages]
    parts = []
    for m in messages:
        if m["role"] == "assistant":
            parts += [_markup("<|im_start|>assistant\n"), _content(m["content"], True), _markup("<|im_end|>", True),
                      _markup("\n")]
        else:
            parts += [_markup(f"<|im_start|>{m['role']}\n"), _content(m["content"]), _markup("<|im_end|>\n")]
    if add_generation_prompt:
        parts.append(_markup("<|im_start|>assistant\n"))
    return parts


def qwen3(messages: list[dict], add_generation_prompt: bool = False, enable_thinking: bool = True) -> list[Part]:
    """ChatML as Qwen3 writes it: assistant turns after the last user message open with their reasoning in a <think>
    block (an empty one for the last message when it has none); earlier turns lose their reasoning. Reasoning comes
    from "thinking" or, as Qwen's template also reads it, from a reply written "<think>...</think>answer".
    enable_thinking=False ends the generation prompt with an empty think block (answer without reasoning).

        <|im_start|>system\\n{system}<|im_end|>\\n
        <|im_start|>user\\n{user}<|im_end|>\\n
        <|im_start|>assistant\\n[{reply}<|im_end|>]\\n                                    (before the last user turn)
        <|im_start|>assistant\\n[<think>\\n{thinking}\\n</think>\\n\\n{reply}<|im_end|>]\\n     (after it)
        <|im_start|>assistant\\n[<think>\\n\\n</think>\\n\\n]                            (generation prompt)
    """
    _validate(messages, "qwen3", thinking=True)
    # The last user message that is not a tool result ends the history; Qwen's template scans for it the same way.
    queries = [i for i, m in enumerate(messages) if m["role"] == "user" and not
               (m["content"].startswith("<tool_response>") and m["content"].endswith("</tool_response>"))]
    last_query = queries[-1] if queries else len(messages) - 1
    parts = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            parts += [_markup(f"<|im_start|>{m['role']}\n"), _content(m["content"]), _markup("<|im_end|>\n")]
            continue
        reply, thinking = m["content"], m.get("thinking")
        if thinking is None:
            thinking = ""
            if "</think>" in reply:  # reasoning written inline: "<think>\n...\n</think>\n\nanswer"
                thinking = reply.split("</think>")[0].rstrip("\n").split("<think>")[-1].lstrip("\n")
                reply = reply.split("</think>")[-1].lstrip("\n")
        parts.append(_markup("<|im_start|>assistant\n"))
        if i > last_query and (i == len(messages) - 1 or thinking):
            parts += [_markup("<think>\n", True), _content(thinking.strip("\n"), True),
                      _markup("\n</think>\n\n", True)]
            reply = reply.lstrip("\n")
        parts += [_content(reply, True), _markup("<|im_end|>", True), _markup("\n")]
    if add_generation_prompt:
        parts.append(_markup("<|im_start|>assistant\n" + ("" if enable_thinking else "<think>\n\n</think>\n\n")))
    return parts


def llama2(messages: list[dict], add_generation_prompt: bool = False, bos_token: str = "<s>",
           eos_token: str = "</s>") -> list[Part]:
    """Llama-2-chat. The system prompt is folded into the first user turn; user and assistant must alternate.
    Contents are stripped of surrounding whitespace. A prompt already ends at [/INST], so add_generation_prompt
    changes nothing (as in Meta's template).

        <s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST][ {reply} </s>]<s>[INST] {user} [/INST]...
    """
    _validate(messages, "llama2", alternate=True)
    system = messages[0]["content"] if messages[0]["role"] == "system" else None
    parts = []
    for i, m in enumerate(messages[1:] if system is not None else messages):
        if m["role"] == "user":
            user = [_content(m["content"])]
            if i == 0 and system is not None:
                user = [_markup("<<SYS>>\n"), _content(system), _markup("\n<</SYS>>\n\n"), *user]
            parts += [_markup(f"{bos_token}[INST] "), *_strip(user), _markup(" [/INST]")]
        else:
            parts += [_markup(" ", True), _content(m["content"].strip(), True), _markup(f" {eos_token}", True)]
    return parts


def llama3(messages: list[dict], add_generation_prompt: bool = False,
           bos_token: str = "<|begin_of_text|>") -> list[Part]:
    """Llama-3 instruct. Contents are stripped of surrounding whitespace. (Llama-3.1's own template also writes a
    dated preamble into the system turn, "Cutting Knowledge Date: ..."; this one, shipped with the Llama-3.1 tokenizer
    in our assets, does not, and detect_template() does not claim the dated one.)

        <|begin_of_text|><|start_header_id|>system<|end_header_id|>\\n\\n{system}<|eot_id|>
        <|start_header_id|>user<|end_header_id|>\\n\\n{user}<|eot_id|>
        <|start_header_id|>assistant<|end_header_id|>\\n\\n[{reply}<|eot_id|>]
        <|start_header_id|>assistant<|end_header_id|>\\n\\n            (generation prompt)
    """
    _validate(messages, "llama3")
    parts = [_markup(bos_token)]
    for m in messages:
        reply = m["role"] == "assistant"
        parts += [_markup(f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n"),
                  _content(m["content"].strip(), reply), _markup("<|eot_id|>", reply)]
    if add_generation_prompt:
        parts.append(_markup("<|start_header_id|>assistant<|end_header_id|>\n\n"))
    return parts


def gemma(messages: list[dict], add_generation_prompt: bool = False, bos_token: str = "<bos>") -> list[Part]:
    """Gemma 2/3. The assistant is called "model"; a system prompt is written at the start of the first user turn;
    user and model must alternate. User and model contents are stripped of surrounding whitespace.

        <bos><start_of_turn>user\\n{system}\\n\\n{user}<end_of_turn>\\n
        <start_of_turn>model\\n[{reply}<end_of_turn>]\\n
        <start_of_turn>model\\n                                    (generation prompt)
    """
    _validate(messages, "gemma", alternate=True)
    system = messages[0]["content"] if messages[0]["role"] == "system" else None
    parts = [_markup(bos_token)]
    for i, m in enumerate(messages[1:] if system is not None else messages):
        if m["role"] == "user":
            parts.append(_markup("<start_of_turn>user\n"))
            if i == 0 and system is not None:
                parts += [_content(system), _markup("\n\n")]
            parts += [_content(m["content"].strip()), _markup("<end_of_turn>\n")]
        else:
            parts += [_markup("<start_of_turn>model\n"), _content(m["content"].strip(), True),
                      _markup("<end_of_turn>", True), _markup("\n")]
    if add_generation_prompt:
        parts.append(_markup("<start_of_turn>model\n"))
    return parts


def granite(messages: list[dict], add_generation_prompt: bool = False,
            default_system: str | None = None) -> list[Part]:
    """IBM Granite 3.x instruct. default_system is the system turn written when the conversation has none: Granite
    3.0 writes none; Granite 3.1 writes granite_system_prompt(), which carries the date.

        <|start_of_role|>system<|end_of_role|>{system}<|end_of_text|>\\n
        <|start_of_role|>user<|end_of_role|>{user}<|end_of_text|>\\n
        <|start_of_role|>assistant<|end_of_role|>[{reply}<|end_of_text|>]\\n
        <|start_of_role|>assistant<|end_of_role|>                 (generation prompt)
    """
    _validate(messages, "granite")
    if default_system is not None and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": default_system}, *messages]
    parts = []
    for m in messages:
        reply = m["role"] == "assistant"
        parts += [_markup(f"<|start_of_role|>{m['role']}<|end_of_role|>"), _content(m["content"], reply),
                  _markup("<|end_of_text|>", reply), _markup("\n")]
    if add_generation_prompt:
        parts.append(_markup("<|start_of_role|>assistant<|end_of_role|>"))
    return parts


def harmony(messages: list[dict], add_generation_prompt: bool = False,
            model_identity: str = "You are ChatGPT, a large language model trained by OpenAI.",
            reasoning_effort: str = "medium", knowledge_cutoff: str = "2024-06",
            conversation_start_date: str | None = None) -> list[Part]:
    """OpenAI Harmony (GPT-OSS). The system message is built from the keyword arguments, whose defaults are those of
    openai_harmony's SystemContent.new() (no date line unless conversation_start_date, e.g. "2025-06-28", is given);
    a leading system or developer message becomes the developer's instructions. Assistant replies go to the final
    channel, "thinking" to the analysis channel. The last message of a conversation ends with <|return|> instead of
    <|end|> when no generation prompt follows (render_conversation_for_training). The model writes everything after
    "<|start|>assistant", channel headers included, so all of that is trainable.

        <|start|>system<|message|>{model_identity}\\nKnowledge cutoff: {knowledge_cutoff}\\n[Current date: {date}\\n]
            \\nReasoning: {reasoning_effort}\\n\\n# Valid channels: analysis, commentary, final. Channel must be
            included for every message.<|end|>
        <|start|>developer<|message|># Instructions\\n\\n{system}<|end|>
        <|start|>user<|message|>{user}<|end|>
        <|start|>assistant[<|channel|>analysis<|message|>{thinking}<|end|><|start|>assistant]   (latest turn only)
            [<|channel|>final<|message|>{reply}<|end|> or <|return|>]
        <|start|>assistant                                              (generation prompt)
    """
    _validate(messages, "harmony", roles=(*ROLES, "developer"), thinking=True)
    if reasoning_effort not in ("low", "medium", "high"):
        raise ValueError(f"harmony: reasoning_effort must be 'low', 'medium' or 'high', not {reasoning_effort!r}")
    date = f"Current date: {conversation_start_date}\n" if conversation_start_date else ""
    parts = [_markup("<|start|>system<|message|>"),
             _content(f"{model_identity}\nKnowledge cutoff: {knowledge_cutoff}\n{date}\nReasoning: {reasoning_effort}"
                      "\n\n# Valid channels: analysis, commentary, final. Channel must be included for every message."),
             _markup("<|end|>")]
    if messages[0]["role"] in ("system", "developer"):
        parts += [_markup("<|start|>developer<|message|># Instructions\n\n"), _content(messages[0]["content"]),
                  _markup("<|end|>")]
        messages = messages[1:]
    last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=-1)
    for i, m in enumerate(messages):
        if m["role"] == "user":
            parts += [_markup("<|start|>user<|message|>"), _content(m["content"]), _markup("<|end|>")]
            continue
        parts.append(_markup("<|start|>assistant"))
        if m.get("thinking") is not None and i > last_user:
            parts += [_markup("<|channel|>analysis<|message|>", True), _content(m["thinking"], True),
                      _markup("<|end|><|start|>assistant", True)]
        end = "<|return|>" if i == len(messages) - 1 and not add_generation_prompt else "<|end|>"
        parts += [_markup("<|channel|>final<|message|>", True), _content(m["content"], True), _markup(end, True)]
    if add_generation_prompt:
        parts.append(_markup("<|start|>assistant"))
    return parts


TEMPLATES = {"chatml": chatml, "qwen3": qwen3, "llama2": llama2, "llama3": llama3, "gemma": gemma,
             "granite": granite, "harmony": harmony}


def granite_system_prompt(date: datetime.date | None = None) -> str:
    """The system prompt Granite 3.1 writes when a conversation has none, dated `date` (default: today)."""
    date = date or datetime.date.today()
    return (f"Knowledge Cutoff Date: April 2024.\nToday's Date: {date.strftime('%B %d, %Y')}.\n"
            "You are Granite, developed by IBM. You are a helpful AI assistant.")


def _validate(messages: list[dict], template: str, roles: tuple[str, ...] = ROLES, alternate: bool = False,
              thinking: bool = False) -> None:
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{template}: messages is empty; a conversation needs at least one message")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"{template}: message {i} must be a dict with 'role' and 'content', got {m!r}")
        if m["role"] not in roles:
            raise ValueError(f"{template}: message {i} has unknown role {m['role']!r}; known: {', '.join(roles)}")
        if not isinstance(m["content"], str):
            raise ValueError(f"{template}: message {i} content must be a string, got {type(m['content']).__name__}")
        if m["role"] in ("system", "developer") and i > 0:
            raise ValueError(f"{template}: message {i} is a {m['role']} message; only the first message may be one")
        if m.get("thinking") is not None:
            if not thinking:
                raise ValueError(f"{template}: message {i} has 'thinking', which this template cannot write "
                                 "(qwen3 and harmony can)")
            if m["role"] != "assistant":
                raise ValueError(f"{template}: message {i} has 'thinking' but only assistant messages may")
    turns = messages[1:] if messages[0]["role"] in ("system", "developer") else messages
    if not turns:
        raise ValueError(f"{template}: the conversation has only a {messages[0]['role']} message; "
                         "it needs a user or assistant message")
    if alternate:
        offset = len(messages) - len(turns)
        for i, m in enumerate(turns):
            expected = "user" if i % 2 == 0 else "assistant"
            if m["role"] != expected:
                raise ValueError(f"{template}: roles must alternate user/assistant/user/... after the optional system "
                                 f"message; message {i + offset} is {m['role']!r}, expected {expected!r}")


# ----------------------------------------------------------------------------------------------------------------------
# Rendering, detection, encoding


def _template(name: str):
    if name not in TEMPLATES:
        raise ValueError(f"unknown chat template {name!r}; known: {', '.join(TEMPLATES)}")
    return TEMPLATES[name]


def render_parts(messages: list[dict], template: str, add_generation_prompt: bool = False, **options) -> list[Part]:
    """The (text, trainable, content) parts of `messages` in `template`: content parts hold message text (contents,
    reasoning, system prompts), the others the template's own markup. Options go to the template function (e.g.
    default_system=, bos_token=, reasoning_effort=)."""
    return _template(template)(messages, add_generation_prompt, **options)


def render_segments(messages: list[dict], template: str, add_generation_prompt: bool = False,
                    **options) -> list[Segment]:
    """The (text, trainable) segments of `messages` in `template`: the parts, neighbours of one kind joined."""
    segments = []
    for text, trainable, _ in render_parts(messages, template, add_generation_prompt, **options):
        if segments and segments[-1][1] == trainable:
            segments[-1] = (segments[-1][0] + text, trainable)
        elif text:
            segments.append((text, trainable))
    return segments


def render(messages: list[dict], template: str, add_generation_prompt: bool = False, **options) -> str:
    """The text of `messages` in `template`, identical to what the model's own jinja template renders."""
    return "".join(text for text, _, _ in render_parts(messages, template, add_generation_prompt, **options))


# The special-token strings each template writes; {bos_token} / {eos_token} stand for the template's options.
_SPECIAL_TOKENS = {
    "chatml": ("<|im_start|>", "<|im_end|>"),
    "qwen3": ("<|im_start|>", "<|im_end|>"),  # <think> and </think> are plain text, or non-special added tokens
    "llama2": ("{bos_token}", "{eos_token}"),
    "llama3": ("{bos_token}", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    "gemma": ("{bos_token}", "<start_of_turn>", "<end_of_turn>"),
    "granite": ("<|start_of_role|>", "<|end_of_role|>", "<|end_of_text|>"),
    "harmony": ("<|start|>", "<|message|>", "<|channel|>", "<|end|>", "<|return|>"),
}


def template_special_tokens(template: str, **options) -> list[str]:
    """The special-token strings `template` writes (with its bos_token= / eos_token= options where it has them),
    e.g. ["<|im_start|>", "<|im_end|>"] for ChatML."""
    defaults = {name: p.default for name, p in inspect.signature(_template(template)).parameters.items()
                if p.default is not inspect.Parameter.empty}
    values = defaults | options
    return [t for t in dict.fromkeys(t.format(**values) for t in _SPECIAL_TOKENS[template]) if t]


def missing_special_tokens(tokenizer, template: str, **options) -> list[str]:
    """The special tokens of `template` (a name, "auto" or a jinja file, see resolve_template) that `tokenizer` does
    not have as added tokens: what tokenizer.add_special_tokens() must add before training on that template."""
    have = {t.content for t in tokenizer.added_tokens}
    return [t for t in template_special_tokens(resolve_template(tokenizer, template), **options) if t not in have]


# Jinja chat templates that render what our functions render, for tokenizers that ship none.
_JINJA = {
    "chatml": ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
               "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
               "{% endif %}"),
}


def template_jinja(template: str) -> str | None:
    """A jinja chat template that renders exactly what `template` renders (with its default options), to attach
    to a tokenizer (tokenizer.chat_template_jinja = ...) so that transformers' apply_chat_template agrees with
    encode_chat; None when we have none for it (only ChatML's is written)."""
    _template(template)
    return _JINJA.get(template)


# Granite 3.1's default system prompt, as its jinja writes it (a newline, or a "\n" escape inside a jinja string).
_GRANITE_31_SYSTEM = re.compile(r"Knowledge Cutoff Date: April 2024\.(\n|\\n)Today's Date: ")
# A fixed system turn inside a ChatML template: '<|im_start|>system\n...<|im_end|>' within one string literal.
_CHATML_DEFAULT_SYSTEM = re.compile(r"<\|im_start\|>system(?:\n|\\n)([^'\"{}+]*?)<\|im_end\|>")


def detect_template(jinja: str | None) -> str | None:
    """Which of TEMPLATES a jinja `chat_template` (from tokenizer_config.json or a GGUF file) is, from its markers;
    None when it is none of ours, or a variant we do not render identically (e.g. Llama-3.1's dated system turn)."""
    if not jinja:
        return None
    if "<|start|>" in jinja and "<|channel|>" in jinja:
        return "harmony"
    if "<|im_start|>" in jinja:
        if "<think>" in jinja:  # Qwen3's hybrid template; other reasoning ChatMLs (QwQ, Qwen3-2507) write differently
            return "qwen3" if "reasoning_content" in jinja and "enable_thinking" in jinja else None
        return None if "bos_token" in jinja else "chatml"  # some ChatMLs (Hermes 3) open with a BOS token
    if "<|start_header_id|>" in jinja:
        return None if "Cutting Knowledge Date" in jinja else "llama3"
    if "<start_of_turn>" in jinja:
        return "gemma"
    if "<|start_of_role|>" in jinja:
        if "Knowledge Cutoff Date" in jinja and not _GRANITE_31_SYSTEM.search(jinja):
            return None  # a later Granite whose default system prompt we do not write
        return "granite"
    if "[INST]" in jinja and "<<SYS>>" in jinja:
        return "llama2"
    return None


def detect_default_system(jinja: str | None) -> str | None:
    """The system prompt a jinja template writes when the conversation has none (SmolLM2's, Qwen2's, Granite
    3.1's, dated today as its template dates it), or None."""
    if not jinja:
        return None
    if "<|start_of_role|>" in jinja and _GRANITE_31_SYSTEM.search(jinja):
        return granite_system_prompt()
    if "<|im_start|>" in jinja and (m := _CHATML_DEFAULT_SYSTEM.search(jinja)):
        return m.group(1).replace("\\n", "\n")
    return None


@dataclass
class ChatEncoding:
    """A rendered conversation: token ids, True where the token is to be learned (see encode_chat's train_on), and
    the text."""
    ids: list[int]
    assistant_mask: list[bool]
    text: str


TRAIN_ON = ("assistant", "all", "last")


def resolve_template(tokenizer, template: str | None) -> str:
    """The name of a template in TEMPLATES: `template` itself when it is one; for None or "auto", the one detected
    from tokenizer.chat_template_jinja; for a path to a jinja file, the one detect_template() finds in it."""
    return _resolve(tokenizer, template)[0]


def _resolve(tokenizer, template: str | None) -> tuple[str, str | None]:
    """(template name, the jinja it was detected from, or None when it was named)."""
    if template in TEMPLATES:
        return template, None
    if template is None or template == "auto":
        jinja = getattr(tokenizer, "chat_template_jinja", None)
        name = detect_template(jinja)
        if name is None and not jinja and getattr(tokenizer, "chat_template_name", None) in TEMPLATES:
            return tokenizer.chat_template_name, None  # named by whoever loaded it (a run's data.chat_template)
        if name is None:
            reason = "has no chat template" if not jinja else "has a chat template that is none of ours"
            raise ValueError(f"tokenizer {getattr(tokenizer, 'name', tokenizer)!r} {reason}; pass one by name, e.g. "
                             f"template='chatml' (data.chat_template=\"chatml\"; known: {', '.join(TEMPLATES)})")
        return name, jinja
    if Path(template).is_file():
        jinja = Path(template).read_text(encoding="utf-8")
        name = detect_template(jinja)
        if name is None:
            raise ValueError(f"chat template file {template}: not one of the templates we render identically (known: "
                             f"{', '.join(TEMPLATES)}); pass one of them by name")
        return name, jinja
    raise ValueError(f"unknown chat template {template!r}: not a template name (known: {', '.join(TEMPLATES)}), "
                     f"'auto' or a path to a jinja file")


def encode_chat(tokenizer, messages: list[dict], template: str | None = None, add_generation_prompt: bool = False,
                *, train_on: str = "assistant", special_tokens_in_content: bool = False, **options) -> ChatEncoding:
    """Render `messages` and encode them with `tokenizer`: the template's special-token strings become their
    special ids, while special-token text inside the messages (a user writing "<|im_end|>") stays plain text, unless
    special_tokens_in_content=True.

    template: a name of TEMPLATES; None or "auto" for the one detected from `tokenizer.chat_template_jinja`; or a
    path to a jinja file (see resolve_template). A detected template writes the default system prompt its jinja
    writes, unless default_system= is given. train_on: which tokens the mask marks: "assistant" every reply and the
    token that ends it, "last" only the last reply and its end token, "all" every token.

    The parts are encoded as one text with tokenizer.encode_parts, markup allowing special tokens and content not.
    The mask comes from the parts alone: each run of parts of one trainable value (a segment) is encoded on its own,
    which gives the whole text's ids whenever no token straddles a segment boundary (boundaries sit at special tokens
    or where every pre-tokenizer splits, and the tests check it). When one does (a ChatML reply starting with a
    newline; SentencePiece's dummy "▁" prefix, which Llama-2 adds after every special token), the ids are those of
    the whole text and the mask is cut where the token counts of the text's prefixes say, the straddling token going
    to the segment before.
    """
    if train_on not in TRAIN_ON:
        raise ValueError(f"train_on must be one of {', '.join(TRAIN_ON)}, not {train_on!r}")
    template, jinja = _resolve(tokenizer, template)
    if jinja is not None and "default_system" in inspect.signature(_template(template)).parameters:
        options.setdefault("default_system", detect_default_system(jinja))
    parts = render_parts(messages, template, add_generation_prompt, **options)
    if train_on == "all":
        parts = [(text, True, content) for text, _, content in parts]
    elif train_on == "last":  # only the last run of trainable parts: the last assistant turn
        last = max((i for i, (_, trainable, _) in enumerate(parts) if trainable), default=-1)
        first = next((i + 1 for i in range(last, -1, -1) if parts[i][0] and not parts[i][1]), 0)
        parts = [(text, trainable and i >= first, content) for i, (text, trainable, content) in enumerate(parts)]
    segments = _segments(parts, special_tokens_in_content)
    ids = tokenizer.encode_parts([p for _, seg in segments for p in seg])
    pieces = [tokenizer.encode_parts(seg) for _, seg in segments]
    if [i for piece in pieces for i in piece] == ids:
        mask = [trainable for (trainable, _), piece in zip(segments, pieces) for _ in piece]
    else:  # a token straddles a boundary: a segment ends after as many tokens as the text up to its end has
        mask, prefix = [], []
        for trainable, seg in segments:
            prefix += seg
            mask += [trainable] * (min(len(tokenizer.encode_parts(prefix)), len(ids)) - len(mask))
    return ChatEncoding(ids, mask, "".join(text for text, _, _ in parts))


def _segments(parts: list[Part], special_tokens_in_content: bool) -> list[tuple[bool, list[tuple[str, bool]]]]:
    """(trainable, [(text, allow_special)]) for each run of parts of one trainable value, empty parts left out."""
    segments = []
    for text, trainable, content in parts:
        if not text:
            continue
        if not segments or segments[-1][0] != trainable:
            segments.append((trainable, []))
        segments[-1][1].append((text, special_tokens_in_content or not content))
    return segments
