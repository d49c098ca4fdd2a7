"""Chat templates: a conversation -> the exact text a chat model was trained on, and which of its tokens to learn.

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

A template returns segments: (text, trainable) pairs whose texts join to the rendered string. `trainable` marks what
the model itself generates after the generation prompt: the assistant's reply and the token that ends it (ChatML's
<|im_end|>, Llama-3's <|eot_id|>, ...), never the role header, which the prompt supplies. This is the mask of an
assistant-only loss (what HF's `{% generation %}` blocks and TRL's assistant_only_loss mark).

Messages are dicts with "role" (system, user, assistant; Harmony also developer) and "content" (a string). A system
(or developer) message may only come first. An assistant message may carry "thinking", its reasoning, for the templates
that write reasoning (qwen3, harmony); they keep it only in the turn after the last user message, as the models'
own templates do, since a model never sees its earlier reasoning at inference.
"""

import datetime
import inspect
import re
from dataclasses import dataclass

Segment = tuple[str, bool]  # (text, trainable)

ROLES = ("system", "user", "assistant")


# ----------------------------------------------------------------------------------------------------------------------
# Templates: messages -> segments


def chatml(messages: list[dict], add_generation_prompt: bool = False,
           default_system: str | None = None) -> list[Segment]:
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
    segments = []
    for m in messages:
        if m["role"] == "assistant":
            segments += [("<|im_start|>assistant\n", False), (m["content"] + "<|im_end|>", True), ("\n", False)]
        else:
            segments.append((f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n", False))
    if add_generation_prompt:
        segments.append(("<|im_start|>assistant\n", False))
    return segments


def qwen3(messages: list[dict], add_generation_prompt: bool = False, enable_thinking: bool = True) -> list[Segment]:
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
    segments = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            segments.append((f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n", False))
            continue
        reply, thinking = m["content"], m.get("thinking")
        if thinking is None:
            thinking = ""
            if "</think>" in reply:  # reasoning written inline: "<think>\n...\n</think>\n\nanswer"
                thinking = reply.split("</think>")[0].rstrip("\n").split("<think>")[-1].lstrip("\n")
                reply = reply.split("</think>")[-1].lstrip("\n")
        if i > last_query and (i == len(messages) - 1 or thinking):
            reply = "<think>\n" + thinking.strip("\n") + "\n</think>\n\n" + reply.lstrip("\n")
        segments += [("<|im_start|>assistant\n", False), (reply + "<|im_end|>", True), ("\n", False)]
    if add_generation_prompt:
        segments.append(("<|im_start|>assistant\n" + ("" if enable_thinking else "<think>\n\n</think>\n\n"), False))
    return segments


def llama2(messages: list[dict], add_generation_prompt: bool = False, bos_token: str = "<s>",
           eos_token: str = "</s>") -> list[Segment]:
    """Llama-2-chat. The system prompt is folded into the first user turn; user and assistant must alternate.
    Contents are stripped of surrounding whitespace. A prompt already ends at [/INST], so add_generation_prompt
    changes nothing (as in Meta's template).

        <s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST][ {reply} </s>]<s>[INST] {user} [/INST]...
    """
    _validate(messages, "llama2", alternate=True)
    system = messages[0]["content"] if messages[0]["role"] == "system" else None
    segments = []
    for i, m in enumerate(messages[1:] if system is not None else messages):
        if m["role"] == "user":
            content = m["content"] if i > 0 or system is None else f"<<SYS>>\n{system}\n<</SYS>>\n\n{m['content']}"
            segments.append((f"{bos_token}[INST] {content.strip()} [/INST]", False))
        else:
            segments.append((f" {m['content'].strip()} {eos_token}", True))
    return segments


def llama3(messages: list[dict], add_generation_prompt: bool = False,
           bos_token: str = "<|begin_of_text|>") -> list[Segment]:
    """Llama-3 instruct. Contents are stripped of surrounding whitespace. (Llama-3.1's own template also writes a
    dated preamble into the system turn, "Cutting Knowledge Date: ..."; this one, shipped with the Llama-3.1 tokenizer
    in our assets, does not, and detect_template() does not claim the dated one.)

        <|begin_of_text|><|start_header_id|>system<|end_header_id|>\\n\\n{system}<|eot_id|>
        <|start_header_id|>user<|end_header_id|>\\n\\n{user}<|eot_id|>
        <|start_header_id|>assistant<|end_header_id|>\\n\\n[{reply}<|eot_id|>]
        <|start_header_id|>assistant<|end_header_id|>\\n\\n            (generation prompt)
    """
    _validate(messages, "llama3")
    segments = [(bos_token, False)]
    for m in messages:
        header = f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n"
        if m["role"] == "assistant":
            segments += [(header, False), (m["content"].strip() + "<|eot_id|>", True)]
        else:
            segments.append((header + m["content"].strip() + "<|eot_id|>", False))
    if add_generation_prompt:
        segments.append(("<|start_header_id|>assistant<|end_header_id|>\n\n", False))
    return segments


def gemma(messages: list[dict], add_generation_prompt: bool = False, bos_token: str = "<bos>") -> list[Segment]:
    """Gemma 2/3. The assistant is called "model"; a system prompt is written at the start of the first user turn;
    user and model must alternate. User and model contents are stripped of surrounding whitespace.

        <bos><start_of_turn>user\\n{system}\\n\\n{user}<end_of_turn>\\n
        <start_of_turn>model\\n[{reply}<end_of_turn>]\\n
        <start_of_turn>model\\n                                    (generation prompt)
    """
    _validate(messages, "gemma", alternate=True)
    system = messages[0]["content"] if messages[0]["role"] == "system" else None
    segments = [(bos_token, False)]
    for i, m in enumerate(messages[1:] if system is not None else messages):
        if m["role"] == "user":
            prefix = system + "\n\n" if i == 0 and system is not None else ""
            segments.append((f"<start_of_turn>user\n{prefix}{m['content'].strip()}<end_of_turn>\n", False))
        else:
            segments += [("<start_of_turn>model\n", False), (m["content"].strip() + "<end_of_turn>", True),
                         ("\n", False)]
    if add_generation_prompt:
        segments.append(("<start_of_turn>model\n", False))
    return segments


def granite(messages: list[dict], add_generation_prompt: bool = False,
            default_system: str | None = None) -> list[Segment]:
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
    segments = []
    for m in messages:
        header = f"<|start_of_role|>{m['role']}<|end_of_role|>"
        if m["role"] == "assistant":
            segments += [(header, False), (m["content"] + "<|end_of_text|>", True), ("\n", False)]
        else:
            segments.append((header + m["content"] + "<|end_of_text|>\n", False))
    if add_generation_prompt:
        segments.append(("<|start_of_role|>assistant<|end_of_role|>", False))
    return segments


def harmony(messages: list[dict], add_generation_prompt: bool = False,
            model_identity: str = "You are ChatGPT, a large language model trained by OpenAI.",
            reasoning_effort: str = "medium", knowledge_cutoff: str = "2024-06",
            conversation_start_date: str | None = None) -> list[Segment]:
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
    segments = [(f"<|start|>system<|message|>{model_identity}\nKnowledge cutoff: {knowledge_cutoff}\n{date}\n"
                 f"Reasoning: {reasoning_effort}\n\n# Valid channels: analysis, commentary, final. "
                 "Channel must be included for every message.<|end|>", False)]
    if messages[0]["role"] in ("system", "developer"):
        segments.append((f"<|start|>developer<|message|># Instructions\n\n{messages[0]['content']}<|end|>", False))
        messages = messages[1:]
    last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=-1)
    for i, m in enumerate(messages):
        if m["role"] == "user":
            segments.append((f"<|start|>user<|message|>{m['content']}<|end|>", False))
            continue
        segments.append(("<|start|>assistant", False))
        if m.get("thinking") is not None and i > last_user:
            segments.append((f"<|channel|>analysis<|message|>{m['thinking']}<|end|><|start|>assistant", True))
        end = "<|return|>" if i == len(messages) - 1 and not add_generation_prompt else "<|end|>"
        segments.append((f"<|channel|>final<|message|>{m['content']}{end}", True))
    if add_generation_prompt:
        segments.append(("<|start|>assistant", False))
    return segments


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


def render_segments(messages: list[dict], template: str, add_generation_prompt: bool = False,
                    **options) -> list[Segment]:
    """The (text, trainable) segments of `messages` in `template`; options go to the template function
    (e.g. default_system=, bos_token=, reasoning_effort=)."""
    return _template(template)(messages, add_generation_prompt, **options)


def render(messages: list[dict], template: str, add_generation_prompt: bool = False, **options) -> str:
    """The text of `messages` in `template`, identical to what the model's own jinja template renders."""
    return "".join(text for text, _ in render_segments(messages, template, add_generation_prompt, **options))


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
    """A rendered conversation: token ids, True where the token is the assistant's to learn, and the text."""
    ids: list[int]
    assistant_mask: list[bool]
    text: str


def encode_chat(tokenizer, messages: list[dict], template: str | None = None, add_generation_prompt: bool = False,
                **options) -> ChatEncoding:
    """Render `messages` and encode them with `tokenizer`, special-token strings becoming their special ids.

    template None: detected from `tokenizer.chat_template_jinja` (with the default system prompt that template writes,
    unless default_system= is given). Each segment is encoded on its own, which gives the ids of the whole text at
    once whenever no token straddles a segment boundary: boundaries sit at special tokens or where every pre-tokenizer
    splits, and the tests check it. When one does (a ChatML reply starting with a newline; SentencePiece's dummy "▁"
    prefix, which Llama-2 adds after every special token), the ids are those of the whole text and the mask is cut
    where the token counts of the text's prefixes say, the straddling token going to the segment before.
    """
    if template is None:
        jinja = getattr(tokenizer, "chat_template_jinja", None)
        template = detect_template(jinja)
        if template is None:
            reason = "has no chat template" if not jinja else "has a chat template that is none of ours"
            raise ValueError(f"tokenizer {getattr(tokenizer, 'name', tokenizer)!r} {reason}; pass one by name, "
                             f"e.g. template='chatml' (known: {', '.join(TEMPLATES)})")
        if "default_system" in inspect.signature(_template(template)).parameters:
            options.setdefault("default_system", detect_default_system(jinja))
    segments = _merge(render_segments(messages, template, add_generation_prompt, **options))
    text = "".join(s for s, _ in segments)
    pieces = [tokenizer.encode(s, allow_special=True) for s, _ in segments]
    ids = tokenizer.encode(text, allow_special=True)
    if [i for piece in pieces for i in piece] == ids:
        mask = [trainable for (_, trainable), piece in zip(segments, pieces) for _ in piece]
    else:  # a token straddles a boundary: a segment ends after as many tokens as the text up to its end has
        mask, end = [], 0
        for s, trainable in segments:
            end += len(s)
            n_tokens = len(tokenizer.encode(text[:end], allow_special=True))
            mask += [trainable] * (min(n_tokens, len(ids)) - len(mask))
    return ChatEncoding(ids, mask, text)


def _merge(segments: list[Segment]) -> list[Segment]:
    """Join neighbouring segments of the same kind, so there are fewer boundaries to encode across."""
    merged = []
    for text, trainable in segments:
        if merged and merged[-1][1] == trainable:
            merged[-1] = (merged[-1][0] + text, trainable)
        elif text:
            merged.append((text, trainable))
    return merged
