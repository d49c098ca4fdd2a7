"""eval.py's tasks against lm-evaluation-harness on the real SmolLM2-135M-Instruct (the GGUF converted to an HF
directory, fp32): MMLU 0-shot and 5-shot on fixed subsets of ../shared/assets/eval/mmlu_dev.jsonl (17 and 7
questions: lm-evaluation-harness takes about 1-2 s a question 5-shot on 2 CPU cores), with the same prompts, give the
same predicted letter (at least 99% of the questions, so all of them here), accuracies within 0.5 points, and choice
log-likelihoods within 2e-3.

lm-evaluation-harness runs offline from a local task definition over the same JSONL (one task over the whole file:
its few-shot pool is the file itself minus the question, the first n kept, which is our fewshot_pool="all").
bench/eval_vs_lm_eval.py runs the whole file and times both.
"""

import json

import pytest
import torch

from data.tasks import read_mmlu
from training.generation import load_for_inference
from training.tasks import mmlu

pytestmark = pytest.mark.slow

EVERY = {0: 17, 5: 39}  # the subsets: every 17th question of the 273 (17 over 17 subjects) 0-shot, every 39th 5-shot


def lm_eval_mmlu_task(path) -> dict:
    """lm-evaluation-harness's MMLU task (its _default_template_yaml) over one local JSONL of every subject."""
    return {
        "task": "mmlu_local",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(path)}},
        "test_split": "test",
        "fewshot_split": "test",
        "fewshot_config": {"sampler": "first_n"},
        "output_type": "multiple_choice",
        "description": "The following are multiple choice questions (with answers) about "
                       "{{subject.replace('_', ' ')}}.\n\n",
        "doc_to_text": "{{question.strip()}}\nA. {{choices[0]}}\nB. {{choices[1]}}\nC. {{choices[2]}}\n"
                       "D. {{choices[3]}}\nAnswer:",
        "doc_to_choice": ["A", "B", "C", "D"],
        "doc_to_target": "{{['A', 'B', 'C', 'D'].index(answer)}}",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
    }


def subset(shared_assets, tmp_path, every: int):
    rows = (shared_assets / "eval" / "mmlu_dev.jsonl").read_text().splitlines()[::every]
    path = tmp_path / "mmlu_subset.jsonl"
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.fixture(scope="module")
def hf_lm(smollm2_hf_dir):
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=str(smollm2_hf_dir), device="cpu", dtype="float32", batch_size=4)


def run_lm_eval(lm, task: dict, shots: int, tmp_path, monkeypatch) -> list[tuple[int, list[float]]]:
    """(row, choice log-likelihoods) per question, from lm-evaluation-harness's logged samples."""
    from lm_eval import evaluator

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    out = evaluator.simple_evaluate(model=lm, tasks=[task], num_fewshot=shots, log_samples=True,
                                    bootstrap_iters=0, random_seed=0, numpy_random_seed=0, torch_random_seed=0,
                                    fewshot_random_seed=0)
    samples = sorted(out["samples"]["mmlu_local"], key=lambda s: s["doc_id"])
    return [(s["doc_id"], [float(r[0]) for r in s["filtered_resps"]]) for s in samples]


@pytest.mark.parametrize("shots", [0, 5])
def test_mmlu_agrees_with_lm_eval_question_by_question(smollm2_hf_dir, hf_lm, shared_assets, shots, tmp_path,
                                                       monkeypatch):
    data = subset(shared_assets, tmp_path, EVERY[shots])
    theirs = run_lm_eval(hf_lm, lm_eval_mmlu_task(data), shots, tmp_path, monkeypatch)
    model, tokenizer = load_for_inference(str(smollm2_hf_dir), torch.device("cpu"), "fp32")
    questions = read_mmlu(data)
    ours = mmlu(model, tokenizer, questions, shots=shots, pool=questions, by_subject=False)
    assert len(theirs) == len(ours.records) == len(questions)
    same = 0
    for (doc_id, their_ll), record, q in zip(theirs, ours.records, questions):
        assert doc_id == q.row
        our_ll = record["logprobs"]
        torch.testing.assert_close(torch.tensor(our_ll), torch.tensor(their_ll), atol=2e-3, rtol=0,
                                   msg=lambda m: f"question {q.row} ({q.subject}), {shots}-shot: {m}")
        same += max(range(4), key=lambda i: our_ll[i]) == max(range(4), key=lambda i: their_ll[i])
    their_acc = sum(max(range(4), key=lambda i: ll[i]) == q.answer for (_, ll), q in zip(theirs, questions)) / len(questions)
    print(json.dumps({"shots": shots, "questions": len(questions), "same_prediction": same,
                      "ours_acc": ours.metrics["acc"], "lm_eval_acc": their_acc}))
    assert same / len(questions) >= 0.99
    assert abs(ours.metrics["acc"] - their_acc) <= 0.005
