"""Evaluate a checkpoint. Prints one JSON line of results; a non-finite number is null there, named under
"nonfinite" with an "error", and the exit code is 1. --out FILE also writes one JSON record per question.

    python eval.py --ckpt out/shakespeare/ckpt/latest --task ppl                  # the run's validation shards
    python eval.py --ckpt out/shakespeare --task ppl --data some.txt              # a text file
    python eval.py --ckpt out/shakespeare --task ppl --data data/cache/shards/X --split train
    python eval.py --ckpt hf/SmolLM2-135M-Instruct --task ppl --data passage.txt    # an HF dir or .gguf too
    python eval.py --ckpt out/sft-smollm2-gsm --task ppl                          # an SFT run: its held-out samples

    python eval.py --ckpt model.gguf --task mmlu --data mmlu_dev.jsonl                      # 0-shot
    python eval.py --ckpt model.gguf --task mmlu --data test/ --fewshot_data dev/ --shots 5 # the real MMLU's CSVs
    python eval.py --ckpt model.gguf --task mmlu --data mmlu_dev.jsonl --shots 5 --fewshot_pool all --chat
    python eval.py --ckpt out/sft --task malaymmlu --data MalayMMLU_0shot.json              # first-token and full acc
    python eval.py --ckpt out/sft --task malaymmlu --data X.json --generative --samples 4 --temperature 0.7
    python eval.py --ckpt out/sft --task gsm8k --data gsm_test.jsonl --shots 5 --fewshot_data gsm_train.jsonl
    python eval.py --ckpt out/sft --task gsm8k --data gsm_test.jsonl --chat --out gsm.jsonl   # per-sample records
    python eval.py --ckpt out/sft --task gsm8k --data gsm_test.jsonl --samples 8 --temperature 0.8   # pass@8

ppl: an SFT run is scored on its held-out split's learnable tokens only (the assistant replies), packed as in
training. --data is a token-shard directory (made by data/prepare.py; --split picks train or val) or a text file,
which is tokenised with the checkpoint's tokenizer and cut into windows of the training sequence length (for an
HF directory or GGUF file, which has no run: --data is a text file, windows of min(1024, context) tokens).

mmlu, malaymmlu, gsm8k: lm-evaluation-harness's prompts and scoring (see training/tasks.py and data/tasks.py, and
the README's evaluation section for where the numbers agree with it and where they differ).
"""

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from data.loader import TokenLoader
from data.prepare import default_shard_dir
from data.tokenizer import load_tokenizer
from data.tasks import TaskDataError
from model.files import write_text_atomic
from training.checkpoint import load_model, resolve
from training.config import TASKS, TaskConfig
from training.device import autocast_context, pick_device
from training.evaluation import evaluate
from training.generation import load_for_inference
from training.tasks import run_task


def text_batches(path: Path, tokenizer, seq_len: int, batch_size: int):
    """Consecutive windows of seq_len+1 tokens (stride seq_len) over one text file, in batches."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise SystemExit(f"{path} is not valid UTF-8 ({e}); convert it to UTF-8 first") from None
    ids = torch.tensor(tokenizer.encode(text), dtype=torch.long)
    n_windows = (len(ids) - 1) // seq_len
    if n_windows < 1:
        raise SystemExit(f"{path} has {len(ids)} tokens, fewer than one window of seq_len+1={seq_len + 1}; "
                         f"pass a longer text or --seq_len smaller")
    windows = torch.stack([ids[i * seq_len: i * seq_len + seq_len + 1] for i in range(n_windows)])  # (N, T+1)
    for start in range(0, n_windows, batch_size):
        w = windows[start:start + batch_size]
        yield w[:, :-1], w[:, 1:]


TASK_FLAGS = ("shots", "limit", "samples", "max_new_tokens", "max_tokens", "seed")


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", required=True, help="checkpoint dir, its ckpt/ parent, the run dir, an HF model dir "
                                                  "or a .gguf file")
    ap.add_argument("--task", default="ppl", choices=["ppl", *TASKS],
                    help="ppl: loss, perplexity and token accuracy; mmlu, malaymmlu: multiple choice by "
                         "log-likelihood; gsm8k: generated answers, strict and flexible match")
    ap.add_argument("--data", default="", help="ppl: token-shard dir or text file (default: the run's own shards); "
                                               "a task: its questions' file (or a directory of MMLU CSVs)")
    ap.add_argument("--split", default="val", choices=["train", "val"], help="ppl: split of a shard dir")
    ap.add_argument("--batches", type=int, default=0, help="ppl: evaluate at most N batches (0 = all)")
    ap.add_argument("--batch_size", type=int, default=0, help="ppl: default the training batch size; generation: "
                                                              "prompts decoded together (default 32)")
    ap.add_argument("--seq_len", type=int, default=0, help="ppl: default the training sequence length")
    ap.add_argument("--fewshot_data", default="", help="mmlu: a dev split, gsm8k: a train file, that few-shot "
                                                       "examples come from (default: --data, never a question's own)")
    ap.add_argument("--shots", type=int, default=0, help="few-shot examples per prompt")
    ap.add_argument("--fewshot_pool", default="subject", choices=["subject", "all"],
                    help="mmlu: examples from the question's subject, or the first of the whole few-shot file")
    ap.add_argument("--chat", action="store_true", help="prompts through the model's chat template")
    ap.add_argument("--instruction", default="auto", help="gsm8k --chat: text before the question (auto = ask for "
                                                          "reasoning ending in '#### N'; '' = the bare question)")
    ap.add_argument("--limit", type=int, default=0, help="the first N questions (0 = all)")
    ap.add_argument("--generative", action="store_true", help="malaymmlu: answer by generation (the \\boxed{} "
                                                              "letter) instead of log-likelihood")
    ap.add_argument("--system", default="", help="malaymmlu --generative: system prompt (default: a reasoning one)")
    ap.add_argument("--samples", type=int, default=1, help="generation: answers per question (pass@N / any-of-N)")
    ap.add_argument("--temperature", type=float, default=0.0, help="generation: 0 = greedy")
    ap.add_argument("--top_p", type=float, default=1.0, help="generation: nucleus mass (1 = off)")
    ap.add_argument("--max_new_tokens", type=int, default=0, help="generation: tokens per answer (default: "
                                                                  "gsm8k 256, malaymmlu 1024)")
    ap.add_argument("--max_tokens", type=int, default=8192, help="scoring: tokens per forward")
    ap.add_argument("--seed", type=int, default=0, help="generation: sampling seed")
    ap.add_argument("--out", default="", help="write one JSON record per question to this .jsonl file (new)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"])
    args = ap.parse_args(argv)
    for flag in ("batches", "batch_size", "seq_len", *TASK_FLAGS):
        if getattr(args, flag) < 0:
            ap.error(f"--{flag} must be >= 0, got {getattr(args, flag)}")
    if args.samples < 1:
        ap.error(f"--samples must be >= 1, got {args.samples}")
    if not (args.temperature >= 0 and args.temperature != float("inf")):
        ap.error(f"--temperature must be a finite number >= 0 (0 = greedy), got {args.temperature}")
    if not 0 < args.top_p <= 1:
        ap.error(f"--top_p must be in (0, 1], got {args.top_p}")
    if args.task != "ppl" and not args.data:
        ap.error(f"--task {args.task} needs --data: the questions' file")
    if args.out and Path(args.out).exists():
        ap.error(f"--out {args.out} already exists; eval.py writes only new files (give another path)")
    return args


def main(argv: list[str]) -> dict:
    args = parse_args(argv)
    if args.task == "ppl":
        return ppl(args)
    device = pick_device(args.device)
    model, tokenizer = load_for_inference(args.ckpt, device, args.dtype)
    settings = TaskConfig(**{f"{args.task}_data": args.data}, shots=args.shots, fewshot_pool=args.fewshot_pool,
                          chat=args.chat, instruction=args.instruction, limit=args.limit,
                          generative=args.generative, system_prompt=args.system,
                          samples=args.samples, temperature=args.temperature, top_p=args.top_p,
                          max_new_tokens=args.max_new_tokens or (1024 if args.task == "malaymmlu" else 256),
                          batch_size=args.batch_size or 32, max_tokens=args.max_tokens, seed=args.seed)
    if args.fewshot_data:
        if args.task == "malaymmlu":
            raise SystemExit("--fewshot_data: malaymmlu is evaluated 0-shot (its official prompt)")
        setattr(settings, f"{args.task}_fewshot_data", args.fewshot_data)
    t0 = time.perf_counter()
    try:
        result = run_task(args.task, model, tokenizer, settings, progress=True)
    except (TaskDataError, ValueError) as e:  # bad data, a template the tokenizer lacks, bad sampling settings
        raise SystemExit(f"eval.py --task {args.task}: {e}") from None
    seconds = time.perf_counter() - t0
    if args.out:
        write_records(Path(args.out), result.records)
    metrics = {**result.metrics, "seconds": round(seconds, 2),
               "questions_per_s": round(result.metrics["n"] / seconds, 3) if seconds > 0 else None}
    out = {"task": args.task, "ckpt": args.ckpt, "data": args.data, **metrics}
    if not metrics["n"]:  # the accuracies are null: say why, and exit 1
        out["error"] = (f"no question was scored: {metrics['too_long']} of {len(result.records)} prompts do not fit "
                        f"the model's context of {model.config.max_seq_len} tokens (fewer --shots would shorten them)")
    print(json.dumps(out, allow_nan=False))
    return out


def write_records(path: Path, records: list[dict]) -> None:
    """The per-question records as JSONL, written atomically."""
    write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def ppl(args: argparse.Namespace) -> dict:
    device = pick_device(args.device)
    try:
        source = str(resolve(args.ckpt))
    except FileNotFoundError:
        source = None
    if source is None:  # a pretrained model: no run, no shards
        if not args.data or not Path(args.data).is_file():
            raise SystemExit(f"{args.ckpt} is not a nanoforge checkpoint; evaluating a pretrained model needs "
                             f"--data pointing at a text file")
        model, tokenizer = load_for_inference(args.ckpt, device, "fp32")
        seq_len = args.seq_len or min(1024, model.config.max_seq_len)
        if seq_len > model.config.max_seq_len:
            raise SystemExit(f"--seq_len={seq_len} exceeds the model's max_seq_len={model.config.max_seq_len}")
        batches = text_batches(Path(args.data), tokenizer, seq_len, args.batch_size or 1)
        with autocast_context(args.dtype, device):
            r = evaluate(model, batches, args.batches, device, progress=True)
        return report(args.task, args.ckpt, args.data, r)

    model, cfg = load_model(args.ckpt, device)
    seq_len = args.seq_len or cfg.data.seq_len
    batch_size = args.batch_size or cfg.data.batch_size
    if seq_len > cfg.model.max_seq_len:
        raise SystemExit(f"--seq_len={seq_len} exceeds the model's max_seq_len={cfg.model.max_seq_len}")
    d = cfg.data
    if d.kind == "sft" and not args.data:  # the run's packed SFT split, scored on its learnable (assistant) tokens
        from data.packing import PackedLoader
        from data.sft import SFTShards

        data = Path(d.shard_dir)
        try:
            batches = PackedLoader(SFTShards(data, args.split), d.max_tokens, shuffle=False, too_long="truncate")
        except (FileNotFoundError, ValueError) as e:
            raise SystemExit(f"cannot read the run's SFT data: {e}") from None
        with autocast_context(args.dtype, device):
            r = evaluate(model, batches, args.batches, device, progress=True)
        return report(args.task, source, data, r)
    data = Path(args.data or d.shard_dir or default_shard_dir(d.corpus, d.files, d.tokenizer, d.val_fraction, d.text_key))
    if data.is_dir():
        batches = TokenLoader(str(data), args.split, batch_size, seq_len, shuffle=False)
        if batches.meta["tokenizer"] != cfg.data.tokenizer:
            raise SystemExit(f"{data} was tokenised with {batches.meta['tokenizer']!r} but the model was trained "
                             f"with {cfg.data.tokenizer!r}; prepare the data with --tokenizer {cfg.data.tokenizer}")
    elif data.is_file():
        batches = text_batches(data, load_tokenizer(cfg.data.tokenizer), seq_len, batch_size)
    else:
        raise SystemExit(f"--data {data} does not exist (give a token-shard dir or a text file)")
    with autocast_context(args.dtype, device):
        r = evaluate(model, batches, args.batches, device, progress=True)
    return report(args.task, source, data, r)


def report(task: str, source: str, data, r: dict) -> dict:
    """Print the result as one line of strict JSON and return it. A non-finite loss or perplexity (NaN weights,
    an overflow) is written as null, listed under "nonfinite" and explained under "error"; the exit code is then 1."""
    if r["val_tokens"] == 0:
        raise SystemExit(f"evaluation of {source} on {data} scored 0 tokens (every label masked, or no batch read); "
                         f"nothing to report: check --data, --split, --batches and --batch_size")
    result = {"task": task, "ckpt": str(source), "data": str(data), "loss": r["val_loss"], "ppl": r["val_ppl"],
              "token_acc": r["val_token_acc"], "tokens": r["val_tokens"]}
    nonfinite = [k for k, v in result.items() if isinstance(v, float) and not math.isfinite(v)]
    if nonfinite:
        result.update({k: None for k in nonfinite})
        result["nonfinite"] = nonfinite
        result["error"] = (f"non-finite {' and '.join(nonfinite)} over {r['val_tokens']} tokens: the weights hold "
                           f"NaN/inf or the forward overflows (try --dtype fp32)")
    print(json.dumps(result, allow_nan=False))
    return result


if __name__ == "__main__":
    sys.exit(1 if "error" in main(sys.argv[1:]) else 0)
