"""Evaluation task data: MMLU, MalayMMLU and GSM8K questions read from local files, their few-shot examples, the
prompts lm-evaluation-harness (lm-eval 0.4) builds from them, and the answer extraction and matching it scores with.
Pure Python: the model side (scoring, generation) is training/tasks.py.

    from data.tasks import (fewshot, flexible_extract, gsm8k_prompt, gsm_correct, mmlu_prompt, random_fewshot,
                            read_gsm8k, read_mmlu, strict_extract)

    test, dev = read_mmlu("mmlu/test"), read_mmlu("mmlu/dev")          # a directory of MMLU .csv files, or a .jsonl
    q = test[0]
    prompt = mmlu_prompt(q, fewshot(q, dev, 5, exclude_self=False, by_subject=True))   # ends with "Answer:"
    # score " A" .. " D" after the prompt; right when the best is LETTERS[q.answer]

    gsm = read_gsm8k("gsm8k/test.jsonl")
    shots = random_fewshot(gsm, read_gsm8k("gsm8k/train.jsonl"), 5, exclude_self=False)   # lm-eval's draws
    prompt = gsm8k_prompt(gsm[0], shots[0])                            # generate until one of GSM_STOP
    gsm_correct(strict_extract(completion), gsm[0].answer)             # lm-eval's strict-match exact_match
    gsm_correct(flexible_extract(completion), gsm[0].answer)           # and its flexible-extract

Files. .jsonl (one JSON object a line; blank lines ignored), .json (a list of objects), .parquet (read with pyarrow),
and for MMLU also the original .csv files (headerless: question, A, B, C, D, answer letter; the subject is the file
name's "<subject>_<split>.csv") or a directory of .csv / .jsonl files. Rows are numbered from 1 in messages: the line
of a .jsonl (or where a .csv record starts), the position in a .json list or a parquet table; MCQuestion.row and
GSMQuestion.row are that number minus one. A row that cannot be used is a TaskDataError naming file:row, the field
and the fix; so is an empty file.

Few-shot examples follow lm-eval's first_n sampler (MMLU's): the first k of the pool in file order, leaving out every
copy of the evaluated question when the pool is the evaluated file itself. lm-eval's gsm8k.yaml keeps the default
sampler instead, a seeded random draw per question: random_fewshot reproduces it.
"""

import csv
import io
import json
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

LETTERS = "ABCDE"
MMLU_SPLITS = ("dev", "val", "test")  # the <split> of MMLU's "<subject>_<split>.csv" file names
GSM_STOP: tuple[str, ...] = ("Question:", "</s>", "<|im_end|>")  # lm-eval gsm8k's generation_kwargs.until

# lm-eval gsm8k.yaml: its two filters and the regexes its exact_match ignores, in the order it applies them
_STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
_FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
_IGNORE = tuple(re.compile(p) for p in (",", r"\$", r"(?s).*#### ", r"\.$"))

_MMLU_ROW = "an MMLU row has subject, question, choices (4 strings) and answer ('A'..'D' or 0..3)"
_MALAY_ROW = "a MalayMMLU row has prompt, options (2 to 5 strings), key ('A'..'E'), subject and category"
_GSM_ROW = "a GSM8K row has question and answer (the reasoning, then '#### N')"


class TaskDataError(ValueError):
    """Task data that cannot be used: names the file (and row), the field, and what to do."""


@dataclass(frozen=True)
class MCQuestion:
    """One multiple-choice question (MMLU or MalayMMLU)."""

    row: int  # 0-based row in its file (see the module docstring)
    subject: str  # as in the file, e.g. "abstract_algebra" (MalayMMLU: its `subject`)
    category: str  # MalayMMLU's `category`; "" for MMLU
    question: str  # MMLU: `question`; MalayMMLU: `prompt` (the question with its lettered options)
    choices: tuple[str, ...]  # MMLU: the 4 `choices`; MalayMMLU: the `options` texts (2..5 of them)
    answer: int  # index into choices of the right one


@dataclass(frozen=True)
class GSMQuestion:
    """One GSM8K problem."""

    row: int
    question: str
    answer: str  # the full reference answer (reasoning + "#### N")
    target: str  # what follows the last "####", stripped


# ----------------------------------------------------------------------------------------------------------------------
# Files and rows


def _rows(path: Path) -> Iterator[tuple[int, object]]:
    """(0-based row, row) of every row of a .jsonl / .json / .parquet / .csv file (a .csv row is its list of fields).
    An empty file, an unknown suffix or text that is not JSON is a TaskDataError."""
    if not path.is_file():
        raise TaskDataError(f"{path}: no such file")
    n = 0
    for n, (row, value) in enumerate(_read(path), 1):
        yield row, value
    if n == 0:
        raise TaskDataError(f"{path}: the file holds no rows; give a file with at least one question")


def _read(path: Path) -> Iterator[tuple[int, object]]:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as e:  # pyarrow raises its own error types for a file that is not parquet
            raise TaskDataError(f"{path}: cannot be read as parquet ({e})") from None
        yield from enumerate(table.to_pylist())
        return
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise TaskDataError(f"{path}: not UTF-8 text (bad byte at offset {e.start})") from None
    if suffix == ".json":
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise TaskDataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
        if not isinstance(rows, list):
            raise TaskDataError(f"{path}: holds a JSON {type(rows).__name__}; a .json file must hold a list of rows "
                                "(or write one row a line to a .jsonl file)")
        yield from enumerate(rows)
    elif suffix == ".jsonl":
        for i, line in enumerate(text.split("\n")):  # split at "\n" only: JSON text may hold U+2028
            if line.strip():
                try:
                    yield i, json.loads(line)
                except json.JSONDecodeError as e:
                    raise TaskDataError(f"{path}:{i + 1}: not valid JSON ({e.msg}, column {e.colno}); each line of "
                                        "a .jsonl file must be one JSON object") from None
    elif suffix == ".csv":
        reader = csv.reader(io.StringIO(text, newline=""))
        while True:
            start = reader.line_num  # the record begins on the line after the last one read
            try:
                fields = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                raise TaskDataError(f"{path}:{start + 1}: not valid CSV ({e})") from None
            if fields:
                yield start, fields
    else:
        raise TaskDataError(f"{path}: unknown file type {suffix or '(none)'!r}; give a .jsonl, .json or .parquet file"
                            + " (MMLU: also .csv, or a directory of them)")


def _field(row: object, name: str, where: str, expects: str):
    if not isinstance(row, dict):
        raise TaskDataError(f"{where}: a row must be a JSON object, not {type(row).__name__}; {expects}")
    if name not in row:
        raise TaskDataError(f"{where}: no field {name!r} (the row has {', '.join(map(repr, row)) or 'no fields'}); "
                            f"{expects}")
    return row[name]


def _string(row: object, name: str, where: str, expects: str) -> str:
    value = _field(row, name, where, expects)
    if not isinstance(value, str):
        raise TaskDataError(f"{where}: field {name!r} must be a string, not {type(value).__name__}; {expects}")
    return value


def _strings(value: object, name: str, where: str) -> tuple[str, ...]:
    if not isinstance(value, list | tuple):
        raise TaskDataError(f"{where}: field {name!r} must be a list of strings, not {type(value).__name__}")
    for i, v in enumerate(value):
        if not isinstance(v, str):
            raise TaskDataError(f"{where}: {name}[{i}] must be a string, not {type(v).__name__}")
    return tuple(value)


# ----------------------------------------------------------------------------------------------------------------------
# Readers


def _mmlu_answer(value: object, where: str, field: str = "answer") -> int:
    if isinstance(value, str) and len(value) == 1 and value in LETTERS[:4]:
        return LETTERS.index(value)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 4:
        return value
    raise TaskDataError(f"{where}: field {field!r} is {value!r}, not one of the 4 choices ('A', 'B', 'C', 'D' or "
                        "0..3); fix the row's answer")


def _mmlu_row(row: object, i: int, where: str) -> MCQuestion:
    subject = _string(row, "subject", where, _MMLU_ROW)
    question = _string(row, "question", where, _MMLU_ROW)
    choices = _strings(_field(row, "choices", where, _MMLU_ROW), "choices", where)
    if len(choices) != 4:
        raise TaskDataError(f"{where}: field 'choices' has {len(choices)} choices; an MMLU question has exactly 4 "
                            "(A-D): fix the row or leave it out")
    return MCQuestion(i, subject, "", question, choices, _mmlu_answer(_field(row, "answer", where, _MMLU_ROW), where))


def _mmlu_csv_subject(path: Path) -> str:
    stem = path.stem
    name, _, split = stem.rpartition("_")
    return name if name and split in MMLU_SPLITS else stem


def _mmlu_csv_row(fields: list[str], i: int, where: str, subject: str) -> MCQuestion:
    if len(fields) != 6:
        raise TaskDataError(f"{where}: {len(fields)} columns; an MMLU .csv row has 6 (question, A, B, C, D, answer "
                            "letter), with no header line")
    letter = fields[5].strip()
    if len(letter) != 1 or letter not in LETTERS[:4]:
        raise TaskDataError(f"{where}: the answer column is {fields[5]!r}, not one of 'A', 'B', 'C', 'D' (MMLU .csv "
                            "files have no header line); fix the row's answer")
    return MCQuestion(i, subject, "", fields[0], tuple(fields[1:5]), LETTERS.index(letter))


def read_mmlu(path: str | Path) -> list[MCQuestion]:
    """MMLU questions of a .jsonl / .json / .parquet file of {subject, question, choices, answer} rows, of an MMLU
    .csv file (headerless; the subject from its name), or of every .csv / .jsonl file in a directory, sorted."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in (".csv", ".jsonl"))
        if not files:
            raise TaskDataError(f"{path}: a directory with no .csv or .jsonl file; give MMLU's data/<split> "
                                "directory or a file")
        return [q for f in files for q in read_mmlu(f)]
    if path.suffix.lower() == ".csv":
        subject = _mmlu_csv_subject(path)
        return [_mmlu_csv_row(fields, i, f"{path}:{i + 1}", subject) for i, fields in _rows(path)]
    return [_mmlu_row(row, i, f"{path}:{i + 1}") for i, row in _rows(path)]


def _malaymmlu_row(row: object, i: int, where: str) -> MCQuestion:
    prompt = _string(row, "prompt", where, _MALAY_ROW)
    options = _strings(_field(row, "options", where, _MALAY_ROW), "options", where)
    if not 2 <= len(options) <= len(LETTERS):
        raise TaskDataError(f"{where}: field 'options' has {len(options)} options; a MalayMMLU question has 2 to "
                            f"{len(LETTERS)} (A-E): fix the row or leave it out")
    key = _string(row, "key", where, _MALAY_ROW)
    letters = LETTERS[:len(options)]
    if len(key) != 1 or key not in letters:
        raise TaskDataError(f"{where}: field 'key' is {key!r}, but the question has {len(options)} options "
                            f"({letters[0]}-{letters[-1]}); fix the key or the options")
    subject = _string(row, "subject", where, _MALAY_ROW)
    category = _string(row, "category", where, _MALAY_ROW)
    return MCQuestion(i, subject, category, prompt, options, letters.index(key))


def read_malaymmlu(path: str | Path) -> list[MCQuestion]:
    """MalayMMLU questions of a .json list (as the official MalayMMLU_0shot.json), .jsonl or .parquet file of
    {prompt, options, key, subject, category} rows; other fields (id, answer, level, ...) are ignored."""
    path = Path(path)
    return [_malaymmlu_row(row, i, f"{path}:{i + 1}") for i, row in _rows(path)]


def _gsm_row(row: object, i: int, where: str) -> GSMQuestion:
    question = _string(row, "question", where, _GSM_ROW)
    answer = _string(row, "answer", where, _GSM_ROW)
    if "####" not in answer:
        raise TaskDataError(f"{where}: field 'answer' has no final '#### N' line (a GSM8K answer is its reasoning, "
                            "then '#### ' and the number); add it, or leave the row out")
    return GSMQuestion(i, question, answer, answer.rsplit("####", 1)[1].strip())


def read_gsm8k(path: str | Path) -> list[GSMQuestion]:
    """GSM8K problems of a .jsonl / .json / .parquet file of {question, answer} rows."""
    path = Path(path)
    return [_gsm_row(row, i, f"{path}:{i + 1}") for i, row in _rows(path)]


# ----------------------------------------------------------------------------------------------------------------------
# Few-shot examples


def fewshot(q, pool: list, k: int, *, exclude_self: bool, by_subject: bool = False) -> list:
    """lm-eval's first_n sampler: the first k items of `pool` in order, after leaving out every item equal to q (its
    row aside) when exclude_self (the pool is the evaluated file), and every other subject when by_subject (MMLU's
    per-subject dev split)."""
    if k < 0:
        raise TaskDataError(f"--shots is {k}; it must be 0 or more")
    if k == 0:
        return []
    pool = [p for p in pool if not by_subject or p.subject == q.subject]
    if exclude_self:
        pool = [p for p in pool if replace(p, row=q.row) != q]
    if len(pool) < k:
        where = f"subject {q.subject!r} of the few-shot pool" if by_subject else "the few-shot pool"
        left_out = " once the question itself is left out" if exclude_self else ""
        raise TaskDataError(f"{where} has {len(pool)} example(s){left_out}, fewer than the {k} asked for: pass "
                            f"--shots {len(pool)} or fewer, or a larger --fewshot_data file")
    return pool[:k]


def random_fewshot(questions: list, pool: list, k: int, *, exclude_self: bool, seed: int = 1234) -> list[list]:
    """The k-shot examples lm-eval's default sampler gives each question, in order: one random.Random(seed) draws
    rnd.sample(pool, k) per question (seed: lm-eval's --fewshot_random_seed, 1234 unless set); when exclude_self (the
    pool is the evaluated file) it draws k + 1, leaves out every item equal to the question and keeps k, drawing
    again from the pool without it if a duplicate left fewer. This is what gsm8k.yaml uses."""
    if k < 0:
        raise TaskDataError(f"--shots is {k}; it must be 0 or more")
    if k == 0:
        return [[] for _ in questions]  # lm-eval draws nothing for 0 shots
    need = k + 1 if exclude_self else k
    if len(pool) < need:
        left_out = " once the question itself is left out" if exclude_self else ""
        raise TaskDataError(f"the few-shot pool has {len(pool) - (need - k)} example(s){left_out}, fewer than the "
                            f"{k} asked for: pass --shots {len(pool) - (need - k)} or fewer, or a larger "
                            f"--fewshot_data file")
    rnd = random.Random(seed)
    out = []
    for q in questions:
        if not exclude_self:
            out.append(rnd.sample(pool, k))
            continue
        drawn = [p for p in rnd.sample(pool, k + 1) if replace(p, row=q.row) != q][:k]
        if len(drawn) < k:
            drawn = rnd.sample([p for p in pool if replace(p, row=q.row) != q], k)
        out.append(drawn)
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Prompts


def mmlu_description(subject: str) -> str:
    """The description lm-eval's mmlu_<subject>.yaml starts each prompt with."""
    return f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"


def mmlu_text(q: MCQuestion) -> str:
    """lm-eval MMLU's doc_to_text: the stripped question, a line per lettered choice, then "Answer:"."""
    return "\n".join([q.question.strip(), *(f"{L}. {c}" for L, c in zip(LETTERS, q.choices)), "Answer:"])


def mmlu_prompt(q: MCQuestion, shots: list[MCQuestion]) -> str:
    """lm-eval's MMLU context: the description, each shot as its text, " " and its letter, then "\\n\\n", and last
    the question's text (which ends with "Answer:")."""
    examples = "".join(f"{mmlu_text(s)} {LETTERS[s.answer]}\n\n" for s in shots)
    return mmlu_description(q.subject) + examples + mmlu_text(q)


def mmlu_messages(q: MCQuestion, shots: list[MCQuestion]) -> list[dict]:
    """The MMLU context as chat messages, as lm-eval's --apply_chat_template --fewshot_as_multiturn has them: a
    system message with the description (its "\\n\\n" kept), a user / assistant pair (text, letter) per shot, then a
    user message with the question's text."""
    messages = [{"role": "system", "content": mmlu_description(q.subject)}]
    for s in shots:
        messages += [{"role": "user", "content": mmlu_text(s)}, {"role": "assistant", "content": LETTERS[s.answer]}]
    return messages + [{"role": "user", "content": mmlu_text(q)}]


def malaymmlu_prompt(q: MCQuestion, *, instruction: bool = True) -> str:
    """The official MalayMMLU zero-shot input: its instruction (the one its chat-model and API evaluations use),
    the question with its options, then "\\nJawapan:". instruction=False gives the base-model input of its
    evaluate.py (without --use_chat_template): the question and "\\nJawapan:" only."""
    head = f"Berikut adalah soalan aneka pilihan tentang {q.subject}. Sila berikan jawapan sahaja.\n\n"
    return (head if instruction else "") + q.question + "\nJawapan:"


def gsm8k_prompt(q: GSMQuestion, shots: list[GSMQuestion]) -> str:
    """lm-eval gsm8k's context: "Question: {question}\\nAnswer: {answer}\\n\\n" per shot, then
    "Question: {question}\\nAnswer:" (the question unstripped, as lm-eval has it)."""
    examples = "".join(f"Question: {s.question}\nAnswer: {s.answer}\n\n" for s in shots)
    return examples + f"Question: {q.question}\nAnswer:"


def gsm8k_messages(q: GSMQuestion, shots: list[GSMQuestion], instruction: str) -> list[dict]:
    """GSM8K as chat turns: per shot a user message (instruction + question) and an assistant message (its full
    answer, ending "#### N"), then the question's user message. The instruction is joined as given: end it with
    the separator it needs (e.g. "\\n\\n")."""
    messages = []
    for s in shots:
        messages += [{"role": "user", "content": instruction + s.question}, {"role": "assistant", "content": s.answer}]
    return messages + [{"role": "user", "content": instruction + q.question}]


# ----------------------------------------------------------------------------------------------------------------------
# Answers


def strict_extract(completion: str) -> str | None:
    """lm-eval gsm8k's strict-match: the number after the first "#### ", stripped; None when there is none."""
    found = _STRICT.findall(completion)
    return found[0].strip() if found else None


def flexible_extract(completion: str) -> str | None:
    """lm-eval gsm8k's flexible-extract: the last number-like run (two or more of -$0-9., or an integer), stripped;
    None when there is none."""
    found = _FLEXIBLE.findall(completion)
    if not found:
        return None
    groups = [g for g in found[-1] if g]
    return groups[0].strip() if groups else None


def normalize_answer(s: str) -> str:
    """lm-eval gsm8k's exact_match normalisation: remove ",", "$", everything up to the last "#### " and a final
    "." (in that order, each everywhere it matches), then lower-case. Nothing is stripped."""
    for pattern in _IGNORE:
        s = pattern.sub("", s)
    return s.lower()


def gsm_correct(extracted: str | None, target_answer: str) -> bool:
    """lm-eval gsm8k's exact_match of an extracted answer against the reference (the full answer or its target);
    None (lm-eval's "[invalid]") is wrong."""
    return extracted is not None and normalize_answer(extracted) == normalize_answer(target_answer)


_WRAPPER = re.compile(r"\\(?:text|textbf|textrm|mathrm|mathbf)\s*\{([^{}]*)\}")
_BOXED_LETTER = re.compile(r"\(?([A-Z])\)?(?:[.:)]\s*.*)?", re.S)


def _boxed(text: str) -> list[str]:
    """The contents of every closed \\boxed{...} in text, nested braces included."""
    out, start = [], 0
    while (i := text.find("\\boxed{", start)) != -1:
        j = end = i + len("\\boxed{")
        depth = 1
        while end < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[end], 0)
            end += 1
        if depth:
            break
        out.append(text[j:end - 1])
        start = end
    return out


def boxed_letter(text: str, n_choices: int) -> str | None:
    """The choice letter a reply puts in \\boxed{}: "B" for \\boxed{B}, \\boxed{ B }, \\boxed{\\text{B}}, \\boxed{(B)},
    \\boxed{B.} or \\boxed{B. its text}. None when there is no such box, when boxes name different letters, or when
    the letter is not one of the first n_choices."""
    letters = set()
    for content in _boxed(text):
        while (unwrapped := _WRAPPER.sub(r"\1", content)) != content:
            content = unwrapped
        if m := _BOXED_LETTER.fullmatch(content.strip()):
            letters.add(m[1])
    if len(letters) != 1:
        return None
    letter = letters.pop()
    return letter if letter in LETTERS[:n_choices] else None


def category_weighted(per_category: dict[str, tuple[int, int]]) -> float:
    """MalayMMLU's official average: sum over categories of n_cat * acc_cat / sum of n_cat, with acc_cat =
    correct / n_cat, from {category: (correct, n_cat)}. A fraction (the official script prints percent)."""
    for category, (correct, n) in per_category.items():
        if not 0 <= correct <= n:
            raise ValueError(f"category {category!r}: {correct} correct of {n} questions")
    total = sum(n for _, n in per_category.values())
    if total == 0:
        raise ValueError("no questions in any category")
    return sum(n * (correct / n) for correct, n in per_category.values() if n) / total
