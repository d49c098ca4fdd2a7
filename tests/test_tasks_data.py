"""data/tasks.py against lm-evaluation-harness itself (lm-eval 0.4.13, the test-only oracle): the MMLU and GSM8K
prompts its ConfigurableTask builds (its own task yaml files, pointed at local JSONL files and read offline), the
answers its gsm8k filters extract and its exact_match scores; then MalayMMLU in its official layout
(tests/fixtures/malaymmlu_sample.json, see malaymmlu_README.md there), MMLU's .csv files, boxed letters, and every
kind of bad input with the message it gets."""

import copy
import importlib.util
import json
import logging
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from data import tasks
from data.tasks import (GSM_STOP, LETTERS, GSMQuestion, MCQuestion, TaskDataError, boxed_letter, category_weighted,
                        fewshot, flexible_extract, gsm8k_messages, gsm8k_prompt, gsm_correct, malaymmlu_prompt,
                        mmlu_description, mmlu_messages, mmlu_prompt, mmlu_text, normalize_answer, random_fewshot,
                        read_gsm8k, read_malaymmlu, read_mmlu, strict_extract)

FIXTURES = Path(__file__).resolve().parent / "fixtures"
LM_EVAL_TASKS = Path(importlib.util.find_spec("lm_eval").origin).parent / "tasks"  # found without importing it
MMLU_YAML = LM_EVAL_TASKS / "mmlu" / "default"


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def mmlu_row(question: str = "What is 2 + 2?", choices=("3", "4", "5", "6"), answer="B", subject="arithmetic"):
    return {"subject": subject, "question": question, "choices": list(choices), "answer": answer}


# ----------------------------------------------------------------------------------------------------------------------
# lm-eval, offline


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    """make(config, data_files) -> an lm-eval ConfigurableTask over local files. lm-eval (and the `datasets` it reads
    them with) is imported once, offline, with its cache in a temporary directory."""
    cache = tmp_path_factory.mktemp("hf_datasets")
    with pytest.MonkeyPatch.context() as mp:
        for name, value in (("HF_DATASETS_OFFLINE", "1"), ("HF_HUB_OFFLINE", "1"), ("HF_DATASETS_CACHE", str(cache))):
            mp.setenv(name, value)
        from lm_eval.api.task import ConfigurableTask

        logger = logging.getLogger("lm_eval")
        level = logger.level
        logger.setLevel(logging.ERROR)  # its warnings about our configs' defaults

        def make(config: dict, data_files: dict[str, Path]):
            config = copy.deepcopy(config) | {
                "dataset_path": "json", "dataset_name": None,
                "dataset_kwargs": {"data_files": {k: str(v) for k, v in data_files.items()}, "cache_dir": str(cache)}}
            return ConfigurableTask(config=config)

        yield make
        logger.setLevel(level)


def lm_eval_yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def mmlu_config(subject: str | None, test_split: str) -> dict:
    """lm-eval's MMLU task: its default template, the subject's own description (mmlu_<subject>.yaml), or with no
    subject one description per question rendered from its `subject`."""
    config = lm_eval_yaml(MMLU_YAML / "_default_template_yaml")
    if subject is None:
        description = ("The following are multiple choice questions (with answers) about "
                       "{{subject.replace('_', ' ')}}.\n\n")
    else:
        description = lm_eval_yaml(MMLU_YAML / f"mmlu_{subject}.yaml")["description"]
    return config | {"task": f"mmlu_{subject or 'all'}", "description": description, "test_split": test_split}


def gsm8k_config(sampler: str | None) -> dict:
    config = lm_eval_yaml(LM_EVAL_TASKS / "gsm8k" / "gsm8k.yaml")
    assert "fewshot_config" not in config  # gsm8k.yaml keeps lm-eval's default (random) sampler
    return config | ({"fewshot_config": {"sampler": sampler}} if sampler else {})


def as_messages(messages, add_generation_prompt=True):
    """A chat_template for lm-eval's fewshot_context that returns the messages it would render."""
    return messages


def first_difference(ours: list[str], theirs: list, what: str) -> None:
    assert len(ours) == len(theirs)
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert a == b, f"{what}: question {i} differs\nours:   {a!r}\nlm-eval: {b!r}"


# ----------------------------------------------------------------------------------------------------------------------
# MMLU prompts


def test_mmlu_prompt_is_lm_evals_context_for_every_question(harness, shared_assets):
    """The whole dev file as both the evaluated and the few-shot split (so lm-eval leaves the question out of its own
    examples): each question's 0- and 5-shot context, plain and as --fewshot_as_multiturn chat messages."""
    path = shared_assets / "eval" / "mmlu_dev.jsonl"
    questions = read_mmlu(path)
    assert len(questions) == 273
    assert replace(questions[46], row=49) == questions[49]  # one question appears twice: both copies are left out
    task = harness(mmlu_config(None, test_split="dev"), {"dev": path})
    docs = list(task.test_docs())
    for k in (0, 5):
        shots = [fewshot(q, questions, k, exclude_self=True) for q in questions]
        first_difference([mmlu_prompt(q, s) for q, s in zip(questions, shots)],
                         [task.fewshot_context(d, k) for d in docs], f"{k}-shot")
        first_difference([mmlu_messages(q, s) for q, s in zip(questions[::7], shots[::7])],
                         [task.fewshot_context(d, k, apply_chat_template=True, fewshot_as_multiturn=True,
                                               chat_template=as_messages) for d in docs[::7]], f"{k}-shot chat")
    assert mmlu_prompt(questions[46], fewshot(questions[46], questions, 5, exclude_self=True)).count(
        questions[46].question) == 1


@pytest.mark.parametrize("exclude_self", [True, False])
@pytest.mark.parametrize("subject", ["abstract_algebra", "college_physics", "college_chemistry"])
def test_mmlu_per_subject_shots_are_lm_evals(harness, shared_assets, tmp_path, subject, exclude_self):
    """One lm-eval task per subject (its own yaml description) over that subject's questions; ours draw from the
    whole file, by_subject. With exclude_self lm-eval's test split is its few-shot split; without, they are two
    splits of the same rows, so a question may be its own example (college_physics holds one question twice)."""
    path = shared_assets / "eval" / "mmlu_dev.jsonl"
    lines = [line for line in path.read_text().splitlines() if json.loads(line)["subject"] == subject]
    subject_file = tmp_path / f"{subject}.jsonl"
    subject_file.write_text("\n".join(lines) + "\n")
    questions = read_mmlu(path)
    mine = [q for q in questions if q.subject == subject]
    files = {"dev": subject_file} if exclude_self else {"test": subject_file, "dev": subject_file}
    task = harness(mmlu_config(subject, test_split="dev" if exclude_self else "test"), files)
    first_difference([mmlu_prompt(q, fewshot(q, questions, 2, exclude_self=exclude_self, by_subject=True))
                      for q in mine], [task.fewshot_context(d, 2) for d in task.test_docs()], subject)


def test_too_many_shots_fail_in_lm_eval_and_here(harness, shared_assets, tmp_path):
    """college_chemistry has 3 dev questions: 3 shots with the question left out is one too many for both."""
    path = shared_assets / "eval" / "mmlu_dev.jsonl"
    lines = [line for line in path.read_text().splitlines() if json.loads(line)["subject"] == "college_chemistry"]
    subject_file = tmp_path / "chem.jsonl"
    subject_file.write_text("\n".join(lines) + "\n")
    task = harness(mmlu_config("college_chemistry", test_split="dev"), {"dev": subject_file})
    with pytest.raises(AssertionError, match="exceeds the 2 that are available"):
        task.fewshot_context(task.test_docs()[0], 3)
    q = [q for q in read_mmlu(path) if q.subject == "college_chemistry"][0]
    with pytest.raises(TaskDataError) as e:
        fewshot(q, read_mmlu(path), 3, exclude_self=True, by_subject=True)
    assert str(e.value) == ("subject 'college_chemistry' of the few-shot pool has 2 example(s) once the question "
                            "itself is left out, fewer than the 3 asked for: pass --shots 2 or fewer, or a larger "
                            "--fewshot_data file")


def test_mmlu_description_is_every_lm_eval_subjects():
    files = sorted(MMLU_YAML.glob("mmlu_*.yaml"))
    assert len(files) == 57
    for f in files:
        config = lm_eval_yaml(f)
        assert mmlu_description(config["dataset_name"]) == config["description"], f.name


def test_mmlu_text_and_prompt_layout():
    q = MCQuestion(0, "high_school_biology", "", "  Which is a cell?\n", ("a", "b", "c", "d"), 2)
    s = MCQuestion(1, "high_school_biology", "", "Pick D.", ("w", "x", "y", "z"), 3)
    assert mmlu_text(q) == "Which is a cell?\nA. a\nB. b\nC. c\nD. d\nAnswer:"
    assert mmlu_prompt(q, [s, s]) == (
        "The following are multiple choice questions (with answers) about high school biology.\n\n"
        + "Pick D.\nA. w\nB. x\nC. y\nD. z\nAnswer: D\n\n" * 2 + "Which is a cell?\nA. a\nB. b\nC. c\nD. d\nAnswer:")


# ----------------------------------------------------------------------------------------------------------------------
# GSM8K prompts and answers


@pytest.fixture(scope="module")
def gsm(shared_assets):
    eval_dir = shared_assets / "eval"
    return {"test": eval_dir / "gsm_symbolic_test.jsonl", "train": eval_dir / "gsm_symbolic_train.jsonl"}


def test_gsm8k_prompt_is_lm_evals_context(harness, gsm):
    """lm-eval's gsm8k.yaml with its sampler set to first_n (it keeps the random default): 0 and 5 shots from the
    train file for the first 150 test problems."""
    test, train = read_gsm8k(gsm["test"])[:150], read_gsm8k(gsm["train"])
    task = harness(gsm8k_config("first_n"), gsm)
    docs = list(task.test_docs())[:150]
    for k in (0, 5):
        first_difference([gsm8k_prompt(q, fewshot(q, train, k, exclude_self=False)) for q in test],
                         [task.fewshot_context(d, k) for d in docs], f"{k}-shot")


def test_random_fewshot_is_lm_evals_default_sampler(harness, gsm):
    """gsm8k.yaml as it is: lm-eval seeds its sampler with --fewshot_random_seed (1234) and draws 5 shots per
    problem in order."""
    test, train = read_gsm8k(gsm["test"])[:40], read_gsm8k(gsm["train"])
    task = harness(gsm8k_config(None), gsm)
    task.set_fewshot_seed(1234)
    docs = list(task.test_docs())[:40]
    theirs = [task.fewshot_context(d, 5) for d in docs]
    draws = random_fewshot(test, train, 5, exclude_self=False)
    assert len({tuple(s.row for s in shots) for shots in draws}) == len(test)  # each problem gets other examples
    first_difference([gsm8k_prompt(q, shots) for q, shots in zip(test, draws)], theirs, "5-shot seeded")
    assert random_fewshot(test[:3], train, 0, exclude_self=False) == [[], [], []]
    assert random_fewshot(test[:2], train, 5, exclude_self=False, seed=7) != draws[:2]


COMPLETIONS = [
    "She has 5 + 7 = 12 apples.\n#### 12", "#### 1,234", "So she pays $5.", "The answer is -3", "The answer is 12.",
    "I don't know.", "", "First 3 apples, then 4 more, so 7 apples.", "#### 7\n\nQuestion: How many cats are there?",
    "Half of 1 is 0.5\n#### 0.5", "#### 12 dollars, and then some trailing text", "#### $12", "#### -3", "####12",
    "#### 12.\n", "#### 1234.00", "The answer is 1,234.", "12", "It costs $1,234.50 in total.",
    "Answer: 5\n#### 5\n#### 6", "5 apples and 3 pears make 8 fruit\n#### 8.", "The result is 12.5.", "-3 degrees",
    "#### -3.\nQuestion: next", "1,2,3", "#### 0", "x = 5,", "The answer: 12...", "$12",
    "5 + 7 = 12\nSo the answer is 12 dollars.", "#### 1,234\nThe answer is 1234", "Pi is about 3.14159",
    "#### 5 #### 12", "twelve", "-", "1", "Answer: -12", "The answer is 12\n\nQuestion: What is 3 + 4?\nAnswer: 7",
    "#### 12\r\n", "#### 1.234", "0.50", "It is 8 8",
]
REFERENCES = ["Add them.\n#### 12", "Multiply.\n#### 1,234", "Count.\n#### 5", "Subtract.\n#### -3",
              "Halve it.\n#### 0.5", "Sum.\n#### 7", "Count the fruit.\n#### 8", "Nothing.\n#### 0", "#### 1234"]


def test_gsm_extraction_and_scoring_are_lm_evals(harness, tmp_path):
    """Every completion against every reference, through lm-eval's own gsm8k pipeline: its strict-match and
    flexible-extract filters (regex, take_first) and process_results' exact_match with gsm8k.yaml's arguments."""
    from lm_eval.api.instance import Instance

    refs = write_jsonl(tmp_path / "refs.jsonl", [{"question": f"Problem {i}?", "answer": a}
                                                 for i, a in enumerate(REFERENCES)])
    task = harness(gsm8k_config("first_n"), {"train": refs, "test": refs})
    docs = list(task.test_docs())
    pairs = [(c, d) for c in COMPLETIONS for d in docs]
    instances = [Instance("generate_until", d, ("", {}), 0, ("gsm8k", i, 1), resps=[c])
                 for i, (c, d) in enumerate(pairs)]
    names = {f.name: f for f in task._filters}
    assert sorted(names) == ["flexible-extract", "strict-match"]
    ours = {"strict-match": strict_extract, "flexible-extract": flexible_extract}
    for name, extract in ours.items():
        names[name].apply(instances)
        right = 0
        for inst, (completion, doc) in zip(instances, pairs):
            theirs = inst.filtered_resps[name]
            mine = extract(completion)
            assert (mine if mine is not None else "[invalid]") == theirs, (name, completion)
            correct = task.process_results(doc, [theirs])["exact_match"] == 1.0
            assert gsm_correct(mine, doc["answer"]) == correct, (name, completion, doc["answer"])
            assert gsm_correct(mine, read_target(doc["answer"])) == correct
            right += correct
        assert 10 < right < len(pairs) - 10, name  # both outcomes are well represented


def read_target(answer: str) -> str:
    return answer.rsplit("####", 1)[1].strip()


@pytest.mark.parametrize("completion, strict, flexible", [
    ("#### 1,234", "1,234", "1,234"), ("So she pays $5.", None, "$5."), ("The answer is -3", None, "-3"),
    ("No number here.", None, None), ("Answer: 5\n#### 5\n#### 6", "5", "6"), ("#### 7\n\nQuestion: 3", "7", "3"),
    ("It is 0.5 or 1.25 litres", None, "1.25"), ("#### $12", None, "$12"), ("Total 8 8", None, "8")])
def test_extractions(completion, strict, flexible):
    assert strict_extract(completion) == strict
    assert flexible_extract(completion) == flexible


def test_normalize_answer_order():
    assert normalize_answer("$1,234.") == "1234"
    assert normalize_answer("We add.\n#### 1,234") == "1234"
    assert normalize_answer("#### 5 #### 6") == "6"  # up to the last "#### "
    assert normalize_answer(" 12 ") == " 12 "  # nothing is stripped
    assert normalize_answer("12..") == "12."
    assert gsm_correct(None, "#### 0") is False


def test_gsm8k_prompt_messages_and_stops():
    q, s = GSMQuestion(0, "What is 1 + 1? ", "1 + 1 = 2\n#### 2", "2"), GSMQuestion(1, "What is 2 + 2?", "#### 4", "4")
    assert gsm8k_prompt(q, [s]) == "Question: What is 2 + 2?\nAnswer: #### 4\n\nQuestion: What is 1 + 1? \nAnswer:"
    assert gsm8k_messages(q, [s], "Solve.\n\n") == [
        {"role": "user", "content": "Solve.\n\nWhat is 2 + 2?"}, {"role": "assistant", "content": "#### 4"},
        {"role": "user", "content": "Solve.\n\nWhat is 1 + 1? "}]
    assert GSM_STOP == tuple(lm_eval_yaml(LM_EVAL_TASKS / "gsm8k" / "gsm8k.yaml")["generation_kwargs"]["until"])


def test_read_gsm8k(gsm):
    qs = read_gsm8k(gsm["test"])
    assert len(qs) == 500
    rows = [json.loads(line) for line in gsm["test"].read_text().splitlines()]
    assert [q.target for q in qs] == [r["answer"].split("#### ")[-1] for r in rows]
    assert qs[3] == GSMQuestion(3, rows[3]["question"], rows[3]["answer"], rows[3]["final"])


# ----------------------------------------------------------------------------------------------------------------------
# MalayMMLU


def test_malaymmlu_fixture_reads_in_the_official_layout():
    path = FIXTURES / "malaymmlu_sample.json"
    rows = json.loads(path.read_text())
    qs = read_malaymmlu(path)
    assert len(qs) == len(rows) == 12
    assert qs[0] == MCQuestion(0, "Sains", "STEM", "Haiwan manakah yang bertelur?\nA. Kucing\nB. Ayam\nC. Lembu\n"
                               "D. Kambing", ("A. Kucing", "B. Ayam", "C. Lembu", "D. Kambing"), 1)
    assert {len(q.choices) for q in qs} == {4, 5}
    assert sorted({q.category for q in qs}) == ["Humanities", "Language", "STEM"]
    for q, row in zip(qs, rows):
        assert q.choices[q.answer] == row["answer"] and LETTERS[q.answer] == row["key"]
        assert len(q.choices) == row["num_options"]


def test_malaymmlu_prompt():
    q = read_malaymmlu(FIXTURES / "malaymmlu_sample.json")[6]
    assert malaymmlu_prompt(q) == (
        "Berikut adalah soalan aneka pilihan tentang Bahasa Melayu. Sila berikan jawapan sahaja.\n\n"
        "Pilih ayat yang betul.\nA. Dia pergi ke sekolah semalam.\nB. Dia semalam pergi sekolah ke.\n"
        "C. Ke sekolah dia semalam pergi.\nD. Semalam ke dia pergi sekolah.\nE. Pergi dia sekolah ke semalam.\n"
        "Jawapan:")
    assert malaymmlu_prompt(q, instruction=False) == q.question + "\nJawapan:"


def test_category_weighted_is_malaymmlus_average():
    """Per category: STEM 3 of 5 right, Language 2 of 4, Humanities 3 of 3. The official calculate_accuracies.py:
    sum of n_cat * acc_cat over categories, over the number of questions = (5*0.6 + 4*0.5 + 3*1.0) / 12 = 8/12
    (the unweighted mean of the three accuracies would be 0.7)."""
    qs = read_malaymmlu(FIXTURES / "malaymmlu_sample.json")
    right = {"STEM": 3, "Language": 2, "Humanities": 3}
    counts = {c: (right[c], sum(q.category == c for q in qs)) for c in right}
    assert counts == {"STEM": (3, 5), "Language": (2, 4), "Humanities": (3, 3)}
    assert category_weighted(counts) == pytest.approx(8 / 12, abs=1e-12)
    assert category_weighted({"a": (1, 4), "b": (0, 0)}) == 0.25
    with pytest.raises(ValueError, match="no questions"):
        category_weighted({"a": (0, 0)})
    with pytest.raises(ValueError, match="'a': 5 correct of 4"):
        category_weighted({"a": (5, 4)})


# ----------------------------------------------------------------------------------------------------------------------
# MMLU files


def test_mmlu_csv_in_the_original_layout(tmp_path):
    """Headerless: question, A, B, C, D, answer letter; fields with commas (and a newline) are quoted."""
    path = tmp_path / "abstract_algebra_test.csv"
    path.write_text('"Find x, given x + 1 = 3.",1,"2, exactly",3,4,B\n'
                    '"A question\nover two lines",a,b,"c, d",e,D\n'
                    'Plain,p,q,r,s,A\n')
    qs = read_mmlu(path)
    assert qs == [MCQuestion(0, "abstract_algebra", "", "Find x, given x + 1 = 3.", ("1", "2, exactly", "3", "4"), 1),
                  MCQuestion(1, "abstract_algebra", "", "A question\nover two lines", ("a", "b", "c, d", "e"), 3),
                  MCQuestion(3, "abstract_algebra", "", "Plain", ("p", "q", "r", "s"), 0)]
    jsonl = write_jsonl(tmp_path / "same.jsonl", [mmlu_row("Find x, given x + 1 = 3.", ("1", "2, exactly", "3", "4"),
                                                           "B", "abstract_algebra")])
    assert mmlu_prompt(qs[0], qs[2:]) == mmlu_prompt(read_mmlu(jsonl)[0], qs[2:])


def test_mmlu_directory_of_csv_and_jsonl(tmp_path):
    (tmp_path / "virology_dev.csv").write_text("V1,a,b,c,d,C\nV2,a,b,c,d,D\n")
    (tmp_path / "anatomy_dev.csv").write_text("A1,a,b,c,d,A\n")
    (tmp_path / "my_questions.csv").write_text("M1,a,b,c,d,B\n")  # no <split> suffix: the whole name is the subject
    write_jsonl(tmp_path / "extra.jsonl", [mmlu_row(subject="arithmetic")])
    (tmp_path / "notes.txt").write_text("not a question file\n")
    qs = read_mmlu(tmp_path)
    assert [(q.subject, q.question) for q in qs] == [
        ("anatomy", "A1"), ("arithmetic", "What is 2 + 2?"), ("my_questions", "M1"), ("virology", "V1"),
        ("virology", "V2")]
    assert [fewshot(q, qs, 1, exclude_self=True, by_subject=True)[0].question for q in qs[3:]] == ["V2", "V1"]


def test_mmlu_parquet_with_index_answers(tmp_path):
    """cais/mmlu's parquet layout: the answer is an index."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "test-00000-of-00001.parquet"
    pq.write_table(pa.table({"question": ["Q1", "Q2"], "subject": ["anatomy", "anatomy"],
                             "choices": [["a", "b", "c", "d"], ["e", "f", "g", "h"]], "answer": [3, 0]}), path)
    assert read_mmlu(path) == [MCQuestion(0, "anatomy", "", "Q1", ("a", "b", "c", "d"), 3),
                               MCQuestion(1, "anatomy", "", "Q2", ("e", "f", "g", "h"), 0)]


def test_fewshot_order_and_edges():
    qs = [MCQuestion(i, s, "", f"q{i}", ("a", "b", "c", "d"), 0) for i, s in enumerate("xyxyx")]
    assert [s.row for s in fewshot(qs[4], qs, 2, exclude_self=False, by_subject=True)] == [0, 2]
    assert [s.row for s in fewshot(qs[0], qs, 2, exclude_self=True, by_subject=True)] == [2, 4]
    assert [s.row for s in fewshot(qs[0], qs, 3, exclude_self=True)] == [1, 2, 3]
    assert fewshot(qs[0], [], 0, exclude_self=True) == []
    with pytest.raises(TaskDataError, match="--shots is -1; it must be 0 or more"):
        fewshot(qs[0], qs, -1, exclude_self=False)


# ----------------------------------------------------------------------------------------------------------------------
# Bad input


def test_mmlu_wrong_number_of_choices(tmp_path):
    path = write_jsonl(tmp_path / "mmlu.jsonl", [mmlu_row(), mmlu_row(choices=("a", "b", "c"))])
    with pytest.raises(TaskDataError) as e:
        read_mmlu(path)
    assert str(e.value) == (f"{path}:2: field 'choices' has 3 choices; an MMLU question has exactly 4 (A-D): fix the "
                            "row or leave it out")


def test_malaymmlu_wrong_number_of_options(tmp_path):
    row = {"id": 1, "prompt": "Soalan?", "options": [f"{L}. x" for L in "ABCDEF"], "key": "A", "subject": "Sains",
           "category": "STEM"}
    path = tmp_path / "MalayMMLU_0shot.json"
    path.write_text(json.dumps([row]))
    with pytest.raises(TaskDataError) as e:
        read_malaymmlu(path)
    assert str(e.value) == (f"{path}:1: field 'options' has 6 options; a MalayMMLU question has 2 to 5 (A-E): fix the "
                            "row or leave it out")


def test_mmlu_answer_outside_the_choices(tmp_path):
    path = write_jsonl(tmp_path / "mmlu.jsonl", [mmlu_row(answer="E")])
    with pytest.raises(TaskDataError) as e:
        read_mmlu(path)
    assert str(e.value) == (f"{path}:1: field 'answer' is 'E', not one of the 4 choices ('A', 'B', 'C', 'D' or "
                            "0..3); fix the row's answer")
    for bad in (4, True, "b", "AB"):
        with pytest.raises(TaskDataError, match=f"field 'answer' is {bad!r}, not one of the 4 choices"):
            read_mmlu(write_jsonl(tmp_path / "mmlu.jsonl", [mmlu_row(answer=bad)]))


def test_malaymmlu_key_outside_the_options(tmp_path):
    rows = json.loads((FIXTURES / "malaymmlu_sample.json").read_text())
    rows[2]["key"] = "E"  # a question with 5 options: E is one of them
    rows[3]["key"] = "E"  # a question with 4
    path = tmp_path / "MalayMMLU_0shot.json"
    path.write_text(json.dumps(rows))
    with pytest.raises(TaskDataError) as e:
        read_malaymmlu(path)
    assert str(e.value) == (f"{path}:4: field 'key' is 'E', but the question has 4 options (A-D); fix the key or "
                            "the options")


def test_gsm_answer_without_final_number(tmp_path):
    rows = [{"question": "1 + 1?", "answer": "2\n#### 2"}] * 2 + [{"question": "2 + 2?", "answer": "It is 4."}]
    path = write_jsonl(tmp_path / "gsm.jsonl", rows)
    with pytest.raises(TaskDataError) as e:
        read_gsm8k(path)
    assert str(e.value) == (f"{path}:3: field 'answer' has no final '#### N' line (a GSM8K answer is its reasoning, "
                            "then '#### ' and the number); add it, or leave the row out")


@pytest.mark.parametrize("name, text", [("empty.jsonl", ""), ("blank.jsonl", "\n\n"), ("empty.json", "[]"),
                                        ("empty_test.csv", "")])
def test_empty_data_file(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(TaskDataError) as e:
        read_mmlu(path)
    assert str(e.value) == f"{path}: the file holds no rows; give a file with at least one question"


def test_more_shots_than_the_dev_split(tmp_path):
    dev = read_mmlu(write_jsonl(tmp_path / "dev.jsonl", [mmlu_row(subject="anatomy"), mmlu_row(subject="virology")]))
    q = MCQuestion(0, "anatomy", "", "Q?", ("a", "b", "c", "d"), 0)
    with pytest.raises(TaskDataError) as e:
        fewshot(q, dev, 5, exclude_self=False, by_subject=True)
    assert str(e.value) == ("subject 'anatomy' of the few-shot pool has 1 example(s), fewer than the 5 asked for: pass "
                            "--shots 1 or fewer, or a larger --fewshot_data file")
    with pytest.raises(TaskDataError, match="^the few-shot pool has 2 example"):
        fewshot(q, dev, 5, exclude_self=False)
    with pytest.raises(TaskDataError, match="^the few-shot pool has 2 example"):
        random_fewshot(dev[:1], dev, 5, exclude_self=False)


def test_invalid_json_names_the_line(tmp_path):
    path = tmp_path / "gsm.jsonl"
    path.write_text('{"question": "1 + 1?", "answer": "#### 2"}\n\n{"question": "2 + 2?", "answer": \n')
    with pytest.raises(TaskDataError) as e:
        read_gsm8k(path)
    assert str(e.value) == (f"{path}:3: not valid JSON (Expecting value, column 34); each line of a .jsonl file must "
                            "be one JSON object")
    path = tmp_path / "MalayMMLU_0shot.json"
    path.write_text('[\n  {"prompt": "x",\n  "key" "A"}\n]')
    with pytest.raises(TaskDataError, match=r"not valid JSON \(Expecting ':' delimiter at line 3, column 9\)"):
        read_malaymmlu(path)
    path.write_text('{"prompt": "x"}')
    with pytest.raises(TaskDataError, match="holds a JSON dict; a .json file must hold a list of rows"):
        read_malaymmlu(path)


def test_missing_and_mistyped_fields(tmp_path):
    path = write_jsonl(tmp_path / "mmlu.jsonl", [{"subject": "x", "choices": ["a", "b", "c", "d"], "answer": "A"}])
    with pytest.raises(TaskDataError) as e:
        read_mmlu(path)
    assert str(e.value) == (f"{path}:1: no field 'question' (the row has 'subject', 'choices', 'answer'); an MMLU row "
                            "has subject, question, choices (4 strings) and answer ('A'..'D' or 0..3)")
    with pytest.raises(TaskDataError, match=r":1: choices\[2\] must be a string, not int"):
        read_mmlu(write_jsonl(path, [mmlu_row(choices=("a", "b", 3, "d"))]))
    with pytest.raises(TaskDataError, match=":1: a row must be a JSON object, not list"):
        read_gsm8k(write_jsonl(path, [["1 + 1?", "#### 2"]]))
    with pytest.raises(TaskDataError, match="no field 'category'"):
        read_malaymmlu(write_jsonl(path, [{"prompt": "x", "options": ["A. a", "B. b"], "key": "A", "subject": "s"}]))


def test_bad_csv_rows_and_files(tmp_path):
    path = tmp_path / "anatomy_test.csv"
    path.write_text("question,A,B,C,D,answer\nQ,a,b,c,d,A\n")
    with pytest.raises(TaskDataError, match=f"{path}:1: the answer column is 'answer', not one of 'A', 'B', 'C', 'D' "
                                            r"\(MMLU .csv files have no header line\)"):
        read_mmlu(path)
    path.write_text("Q,a,b,c,d,A\nQ,a,b,c,A\n")
    with pytest.raises(TaskDataError, match=f"{path}:2: 5 columns; an MMLU .csv row has 6"):
        read_mmlu(path)
    with pytest.raises(TaskDataError, match="no such file"):
        read_mmlu(tmp_path / "missing.jsonl")
    (tmp_path / "q.txt").write_text("x")
    with pytest.raises(TaskDataError, match="unknown file type '.txt'"):
        read_gsm8k(tmp_path / "q.txt")
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    with pytest.raises(TaskDataError, match="a directory with no .csv or .jsonl file"):
        read_mmlu(empty)


# ----------------------------------------------------------------------------------------------------------------------
# Boxed letters


@pytest.mark.parametrize("text, n, letter", [
    (r"So the answer is \boxed{B}.", 4, "B"), (r"\boxed{ B }", 4, "B"), (r"\boxed{\text{B}}", 4, "B"),
    (r"\boxed{\textbf{(C)}}", 4, "C"), (r"\boxed{B.}", 4, "B"), (r"\boxed{(D)}", 4, "D"),
    (r"\boxed{A. kucing}", 4, "A"), (r"\boxed{B} and again \boxed{B}", 4, "B"), (r"\boxed{E}", 5, "E"),
    (r"\boxed{E}", 4, None), (r"\boxed{B} or \boxed{C}", 4, None), ("The answer is B.", 4, None),
    (r"\boxed{42}", 4, None), (r"\boxed{Apple}", 4, None), (r"\boxed{B", 4, None), ("", 4, None),
    (r"\boxed{12} so \boxed{C}", 4, "C"), (r"\boxed{\text{\textbf{A}}}", 2, "A"), (r"\boxed{b}", 4, None)])
def test_boxed_letter(text, n, letter):
    assert boxed_letter(text, n) == letter


def test_no_torch_in_data_tasks():
    source = Path(tasks.__file__).read_text()
    assert "import torch" not in source and "lm_eval" not in source
