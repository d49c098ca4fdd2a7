"""The parts of an HF tokenizer.json that more than one back end reads: the steps of a normalizer / pre-tokenizer /
decoder, the normalizers we reproduce (Unicode forms, Prepend, Replace), and the BPE model's merges and options."""

import functools
import json
import unicodedata
from collections.abc import Callable


def steps_of(component: dict | None, key: str) -> list[dict]:
    """The steps of an HF normalizer / pre-tokenizer / decoder, a Sequence flattened."""
    if component is None:
        return []
    if component["type"] == "Sequence":
        return [s for sub in component[key] for s in steps_of(sub, key)]
    return [component]


def describe_steps(steps: list[dict]) -> str:
    return "[" + ", ".join(json.dumps(s, ensure_ascii=False) for s in steps) + "]"


_UNICODE_FORMS = ("NFC", "NFD", "NFKC", "NFKD")


def make_normalizer(normalizer: dict | None, name: str) -> Callable[[str], str] | None:
    """str -> str for an HF normalizer made of Unicode normal forms (Qwen2's NFC), Prepend and Replace of a plain
    string (Llama-2's "▁" dummy prefix and space escaping); None for no normalizer."""
    steps = steps_of(normalizer, "normalizers")
    for s in steps:
        if not (s["type"] in ("Prepend", *_UNICODE_FORMS) or (s["type"] == "Replace" and "String" in s["pattern"])):
            raise ValueError(f"{name}: cannot reproduce the normalizer {describe_steps(steps)}; supported: Prepend, "
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


def merge_pairs(model: dict) -> list[tuple[str, str]]:
    return [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]


def check_bpe_options(model: dict, where: str) -> None:
    if model.get("dropout") not in (None, 0, 0.0):
        raise ValueError(f"{where}: BPE dropout {model['dropout']} is random; only deterministic BPE is supported")
    if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        raise ValueError(f"{where}: BPE continuing_subword_prefix / end_of_word_suffix are not supported")
