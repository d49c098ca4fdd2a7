"""Generation throughput of training.generation.generate (our KV cache) against transformers' generate on the same
model, same machine, same run: greedy, a fixed number of new tokens per row, batch 1 and batch 32 by default.

    python -m bench.generate_vs_hf                                   # SmolLM2-135M's shape, random weights
    python -m bench.generate_vs_hf --model SmolLM2-135M-Instruct.Q4_1.gguf --device cuda --dtype bfloat16

tokens/s counts new tokens only (batch x new tokens / wall time, the prompt's prefill included in the time).
Both sides generate exactly --new_tokens per row (no stop token), from the same prompts, timed alternately.
"""

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import transformers

from bench.common import hf_twin, time_alternating
from model import LLAMA_CONFIGS, build_model
from model.hf import from_pretrained
from training.generation import generate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="", help="HF model dir or .gguf (default: random weights of --size)")
    ap.add_argument("--size", default="smollm2-135m", help=f"one of {', '.join(LLAMA_CONFIGS)}")
    ap.add_argument("--batches", default="1,32", help="comma-separated batch sizes")
    ap.add_argument("--prompt_len", type=int, default=64)
    ap.add_argument("--new_tokens", type=int, default=64)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: bfloat16 on GPU, float32 on CPU)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--iters", type=int, default=3)
    args = ap.parse_args()

    dtype_name = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype_name]
    if args.model:
        ours = from_pretrained(args.model, device=args.device, dtype=dtype)
    else:
        ours = build_model(LLAMA_CONFIGS[args.size])
        ours.to_empty(device=args.device)
        torch.manual_seed(0)
        ours.init_weights()
        ours.to(dtype).eval()
    hf = hf_twin(ours)
    print(f"model {args.model or args.size + ' (random weights)'}: {ours.num_params() / 1e6:.1f}M params; device "
          f"{args.device}, dtype {dtype_name}, prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, greedy; "
          f"torch {torch.__version__}, transformers {transformers.__version__}, threads {torch.get_num_threads()}")

    g = torch.Generator().manual_seed(0)
    for batch in [int(b) for b in args.batches.split(",")]:
        prompts = torch.randint(0, ours.config.vocab_size, (batch, args.prompt_len), generator=g)  # (B, P)
        prompt_lists = prompts.tolist()
        x = prompts.to(args.device)
        results = {}

        def run_ours() -> None:
            results["ours"] = generate(ours, prompt_lists, args.new_tokens)

        def run_hf() -> None:
            with torch.no_grad():
                out = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=args.new_tokens,
                                  min_new_tokens=args.new_tokens, do_sample=False, eos_token_id=None,
                                  pad_token_id=0)
            results["hf"] = out[:, args.prompt_len:].tolist()

        medians = time_alternating({"ours": run_ours, "hf": run_hf}, args.warmup, args.iters, args.device)
        same = sum(a == b for a, b in zip(results["ours"], results["hf"]))
        tok_s = {name: batch * args.new_tokens / t for name, t in medians.items()}
        print(f"batch {batch:3d}: ours {tok_s['ours']:9.1f} tok/s ({medians['ours']:.3f} s) | hf {tok_s['hf']:9.1f} "
              f"tok/s ({medians['hf']:.3f} s) | ratio ours/HF {tok_s['ours'] / tok_s['hf']:.2f}x | "
              f"identical greedy rows {same}/{batch}")


if __name__ == "__main__":
    main()
