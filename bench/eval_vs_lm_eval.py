"""eval.py's tasks against lm-evaluation-harness and transformers on the same model, machine and run.

    python -m bench.eval_vs_lm_eval                                  # SmolLM2-135M-Instruct, CPU, fp32
    python -m bench.eval_vs_lm_eval --device cuda --dtype bfloat16   # on a GPU
    python -m bench.eval_vs_lm_eval --mmlu_limit 60 --gsm_n 32       # a quicker run

- MMLU, k-shot (default 5) on ../shared/assets/eval/mmlu_dev.jsonl: questions/s of training.tasks.mmlu (one forward
  of each shared prompt, the head at its last position only, prompts sorted by length into batches) against
  `lm_eval --model hf` (lm-evaluation-harness's HF backend, --lm_eval_batch_size) on the same local task, plus how
  many questions get the same predicted letter and both accuracies. Each side runs once, after a warm-up on a few
  questions (lm-evaluation-harness's task is built before its clock starts).
- GSM8K generation at batch 32: tokens/s of training.generation.generate_completions against transformers'
  `generate` (bench/eval_gsm_generation.py, which has the details and the token counts).
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench.common import sync
from data.assets import smollm2_gguf_path
from data.tasks import read_mmlu
from model.gguf import gguf_to_hf
from training.generation import load_for_inference
from training.tasks import mmlu

ASSETS = Path(__file__).resolve().parents[2] / "shared" / "assets"


def lm_eval_task(path: Path) -> dict:
    """lm-evaluation-harness's MMLU task (its _default_template_yaml) over one local JSONL of every subject."""
    return {
        "task": "mmlu_local", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(path)}},
        "test_split": "test", "fewshot_split": "test", "fewshot_config": {"sampler": "first_n"},
        "output_type": "multiple_choice",
        "description": "The following are multiple choice questions (with answers) about "
                       "{{subject.replace('_', ' ')}}.\n\n",
        "doc_to_text": "{{question.strip()}}\nA. {{choices[0]}}\nB. {{choices[1]}}\nC. {{choices[2]}}\n"
                       "D. {{choices[3]}}\nAnswer:",
        "doc_to_choice": ["A", "B", "C", "D"], "doc_to_target": "{{['A', 'B', 'C', 'D'].index(answer)}}",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
    }


def run_lm_eval(lm, path: Path, shots: int) -> list[list[float]]:
    """Each question's choice log-likelihoods from lm-evaluation-harness, in file order."""
    from lm_eval import evaluator
    from lm_eval.tasks import TaskManager, get_task_dict

    tasks = get_task_dict([lm_eval_task(path)], TaskManager())
    for task in tasks.values():
        task.set_config(key="num_fewshot", value=shots)
    out = evaluator.evaluate(lm, tasks, log_samples=True, bootstrap_iters=0)
    samples = sorted(out["samples"]["mmlu_local"], key=lambda s: s["doc_id"])
    return [[float(r[0]) for r in s["filtered_resps"]] for s in samples]


def write_subset(rows: list[str], path: Path) -> Path:
    path.write_text("".join(r + "\n" for r in rows))
    return path


def bench_mmlu(args, hf_dir: Path, work: Path) -> dict:
    from lm_eval.models.huggingface import HFLM

    rows = (Path(args.mmlu) .read_text()).splitlines()
    rows = rows[:args.mmlu_limit] if args.mmlu_limit else rows
    data, warm = write_subset(rows, work / "mmlu.jsonl"), write_subset(rows[:8], work / "warm.jsonl")
    device = torch.device(args.device)
    model, tokenizer = load_for_inference(str(hf_dir), device, {"float32": "fp32", "bfloat16": "bf16"}[args.dtype])
    lm = HFLM(pretrained=str(hf_dir), device=args.device, dtype=args.dtype, batch_size=args.lm_eval_batch_size)

    def ours(path: Path):
        questions = read_mmlu(path)
        return mmlu(model, tokenizer, questions, shots=args.shots, pool=questions, by_subject=False,
                    max_tokens=args.max_tokens)

    ours(warm), run_lm_eval(lm, warm, args.shots)  # warm-up: allocator, kernels, lm-eval's imports
    sync(device)
    t0 = time.perf_counter()
    result = ours(data)
    sync(device)
    t_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    theirs = run_lm_eval(lm, data, args.shots)
    sync(device)
    t_theirs = time.perf_counter() - t0
    questions = read_mmlu(data)
    same = sum(r["pred"] == "ABCD"[max(range(4), key=ll.__getitem__)] for r, ll in zip(result.records, theirs))
    their_acc = sum(max(range(4), key=ll.__getitem__) == q.answer for ll, q in zip(theirs, questions)) / len(questions)
    n = len(questions)
    out = {"task": f"mmlu {args.shots}-shot", "questions": n, "ours_s": round(t_ours, 2), "lm_eval_s": round(t_theirs, 2),
           "ours_questions_per_s": round(n / t_ours, 3), "lm_eval_questions_per_s": round(n / t_theirs, 3),
           "speedup": round(t_theirs / t_ours, 2), "same_prediction": same, "ours_acc": result.metrics["acc"],
           "lm_eval_acc": their_acc, "lm_eval_batch_size": args.lm_eval_batch_size}
    print(f"mmlu {args.shots}-shot, {n} questions: ours {n / t_ours:.2f} q/s, lm-eval hf {n / t_theirs:.2f} q/s "
          f"-> {t_theirs / t_ours:.2f}x; same letter {same}/{n}; acc {result.metrics['acc']:.4f} vs {their_acc:.4f}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="", help="HF model dir or .gguf (default: SmolLM2-135M-Instruct's GGUF)")
    ap.add_argument("--mmlu", default=str(ASSETS / "eval" / "mmlu_dev.jsonl"))
    ap.add_argument("--mmlu_limit", type=int, default=0, help="the first N questions (0 = all)")
    ap.add_argument("--shots", type=int, default=5)
    ap.add_argument("--max_tokens", type=int, default=8192, help="ours: tokens per forward")
    ap.add_argument("--lm_eval_batch_size", default="8", help="lm-evaluation-harness's HF batch size (or auto)")
    ap.add_argument("--gsm_n", type=int, default=64, help="GSM8K prompts for the generation half (0 = skip it)")
    ap.add_argument("--gsm_iters", type=int, default=1, help="timed runs of each side (the median is kept)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                    help="default: bfloat16 on a GPU, float32 on CPU")
    ap.add_argument("--out", default="", help="also write the results as JSON here")
    args = ap.parse_args()
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        os.environ.setdefault("HF_DATASETS_CACHE", str(work / "datasets"))
        model = Path(args.model) if args.model else smollm2_gguf_path()
        hf_dir = gguf_to_hf(model, work / "hf") if model.suffix == ".gguf" else model
        results = {"device": args.device, "dtype": args.dtype, "torch": torch.__version__,
                   "mmlu": bench_mmlu(args, hf_dir, work)}
        if args.gsm_n:
            from bench.eval_gsm_generation import bench_generation

            results["gsm8k"] = bench_generation(hf_dir, args.gsm_n, device=args.device, dtype=args.dtype,
                                                warmup=0, iters=args.gsm_iters)
    print(json.dumps(results))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
