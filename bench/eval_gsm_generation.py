"""GSM8K-style generation throughput: training.generation.generate_completions (length-sorted batches, finished
rows leave the batch) against transformers' generate (finished rows stay in the batch to the end) on the same
model and the same prompts, timed alternately in one run.

    python -m bench.eval_gsm_generation                                # SmolLM2-135M-Instruct (the shared GGUF)
    python -m bench.eval_gsm_generation --n 32 --warmup 0 --iters 1    # a quick CPU check
    python -m bench.eval_gsm_generation --device cuda --dtype bfloat16 --n 256

Prompts: the first --n questions of --data in lm-eval gsm8k's 0-shot form "Question: {question}\\nAnswer:"
(data.tasks.gsm8k_prompt), greedy, at most --max_new_tokens each. Both sides get the same length-sorted batches of
--batch_size (longest first, as generate_completions cuts them), left-padded. Ours stops a row at EOS or at one of
lm-eval's stop strings (data.tasks.GSM_STOP); transformers gets eos_token_id and the same stop_strings (its
StopStringCriteria, transformers >= 4.39, with the tokenizer of the model directory), so both should keep the same
tokens. tokens/s = kept tokens (each row's new tokens up to and including its stop) / wall time; for transformers
also the tokens it computed (every row of a batch until the last row stops, or max_new_tokens).
"""

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import transformers

from bench.common import hf_twin, time_alternating
from data.assets import smollm2_gguf_path
from data.tasks import GSM_STOP, gsm8k_prompt, read_gsm8k
from data.tokenizer import load_tokenizer
from model.hf import from_pretrained, resolve_model_dir
from training.generation import generate_completions

DATA = Path(__file__).resolve().parents[2] / "shared" / "assets" / "eval" / "gsm_symbolic_test.jsonl"


def kept(tokens: list[int], eos_id: int, tokenizer) -> list[int]:
    """A row's new tokens up to and including the first that ends it: EOS, or the token completing a stop string
    (the rule generate() applies)."""
    for j, token in enumerate(tokens):
        if token == eos_id or any(s in tokenizer.decode(tokens[max(0, j - 31):j + 1]) for s in GSM_STOP):
            return tokens[:j + 1]
    return tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="", help="HF model dir or .gguf (default: SmolLM2-135M-Instruct Q4_1 GGUF)")
    ap.add_argument("--data", default=str(DATA), help="GSM8K-format .jsonl (question, answer)")
    ap.add_argument("--n", type=int, default=64, help="the first n questions")
    ap.add_argument("--batch_size", type=int, default=32)
    ap.add_argument("--max_new_tokens", type=int, default=256)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: bfloat16 on GPU, float32 on CPU)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--iters", type=int, default=3)
    args = ap.parse_args()
    bench_generation(args.model or str(smollm2_gguf_path()), args.n, device=args.device, dtype=args.dtype,
                     data=args.data, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                     warmup=args.warmup, iters=args.iters)


def bench_generation(path: str | Path, n: int, *, device: str, dtype: str | None = None, data: str | Path = DATA,
                     batch_size: int = 32, max_new_tokens: int = 256, warmup: int = 1, iters: int = 3) -> dict:
    """Time both sides on the first n questions of `data`; print the lines and return the numbers."""
    path = str(path)
    dtype_name = dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    ours = from_pretrained(path, device=device, dtype={"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype_name])
    hf = hf_twin(ours)
    model_dir = resolve_model_dir(path)
    tok = load_tokenizer(model_dir)
    hf_tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    prompts = [tok.encode(gsm8k_prompt(q, [])) for q in read_gsm8k(data)[:n]]
    print(f"model {path}: {ours.num_params() / 1e6:.1f}M params; device {device}, dtype {dtype_name}; "
          f"{len(prompts)} GSM8K prompts of {min(map(len, prompts))}-{max(map(len, prompts))} tokens, 0-shot, "
          f"greedy, batch {batch_size}, max {max_new_tokens} new tokens, stop at EOS {tok.eos_id} or "
          f"{list(GSM_STOP)}; torch {torch.__version__}, transformers {transformers.__version__}, "
          f"threads {torch.get_num_threads()}")

    # transformers' batches: the ones generate_completions makes (longest first), left-padded with EOS
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    hf_batches = []
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        width = len(prompts[rows[0]])
        x = torch.full((len(rows), width), tok.eos_id, dtype=torch.long)  # (B, P)
        mask = torch.zeros(len(rows), width, dtype=torch.long)  # (B, P)
        for b, i in enumerate(rows):
            x[b, width - len(prompts[i]):], mask[b, width - len(prompts[i]):] = torch.tensor(prompts[i]), 1
        hf_batches.append((rows, x.to(device), mask.to(device)))
    results: dict[str, list] = {}

    def run_ours() -> None:
        results["ours"] = generate_completions(ours, prompts, max_new_tokens, batch_size=batch_size,
                                               stop_ids=[tok.eos_id], stop_strings=GSM_STOP, tokenizer=tok)

    def run_hf() -> None:
        results["hf"] = []
        for rows, x, mask in hf_batches:
            with torch.no_grad():
                y = hf.generate(x, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                eos_token_id=tok.eos_id, pad_token_id=tok.eos_id, stop_strings=list(GSM_STOP),
                                tokenizer=hf_tok)  # (B, P + steps)
            results["hf"].append(y[:, x.shape[1]:])  # (B, steps): finished rows padded to the last one's end

    with torch.no_grad():  # one short call each first: lazy set-up (transformers' stop-string tables) is not timed
        generate_completions(ours, prompts[:1], 2, stop_ids=[tok.eos_id], stop_strings=GSM_STOP, tokenizer=tok)
        hf.generate(hf_batches[0][1][:1], attention_mask=hf_batches[0][2][:1], max_new_tokens=2, do_sample=False,
                    eos_token_id=tok.eos_id, pad_token_id=tok.eos_id, stop_strings=list(GSM_STOP), tokenizer=hf_tok)
    medians = time_alternating({"ours": run_ours, "hf": run_hf}, warmup, iters, device)
    ours_rows = [c.tokens for c in results["ours"]]
    hf_rows: list[list[int]] = [[] for _ in prompts]
    for (rows, _, _), new in zip(hf_batches, results["hf"]):
        for b, i in enumerate(rows):
            hf_rows[i] = kept(new[b].tolist(), tok.eos_id, tok)
    n_kept = {"ours": sum(map(len, ours_rows)), "hf": sum(map(len, hf_rows))}
    hf_computed = sum(new.numel() for new in results["hf"])
    tok_s = {name: n_kept[name] / t for name, t in medians.items()}
    same = sum(a == b for a, b in zip(ours_rows, hf_rows))
    stopped = sum(c.stopped for c in results["ours"])
    print(f"ours: {tok_s['ours']:8.1f} tok/s ({medians['ours']:.2f} s, {n_kept['ours']} tokens kept; "
          f"{stopped}/{len(prompts)} rows stopped, the others ran to max_new_tokens)")
    print(f"hf:   {tok_s['hf']:8.1f} tok/s ({medians['hf']:.2f} s, {n_kept['hf']} tokens kept, {hf_computed} "
          f"computed)")
    print(f"ratio ours/HF {tok_s['ours'] / tok_s['hf']:.2f}x | identical greedy rows {same}/{len(prompts)}")
    return {"prompts": len(prompts), "batch_size": batch_size, "max_new_tokens": max_new_tokens,
            "ours_tokens_per_s": round(tok_s["ours"], 2), "hf_tokens_per_s": round(tok_s["hf"], 2),
            "speedup": round(tok_s["ours"] / tok_s["hf"], 2), "ours_s": round(medians["ours"], 2),
            "hf_s": round(medians["hf"], 2), "tokens_kept": n_kept["ours"], "hf_tokens_computed": hf_computed,
            "identical_rows": same, "rows_stopped": stopped}


if __name__ == "__main__":
    main()
