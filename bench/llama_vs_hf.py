"""Training-step throughput of our Llama against transformers' LlamaForCausalLM (Qwen2ForCausalLM for a
qkv_bias config): same config, same weights, same
machine, same run. One step = forward + loss + backward. Prints tokens/s for each and the ratio ours / HF.

    python -m bench.llama_vs_hf                                  # small default config on CPU, fp32
    python -m bench.llama_vs_hf --size llama-125m --device cuda --dtype bfloat16 --batch 16 --seq 1024

The two models are timed alternately, iteration by iteration, after a warmup, and each reports its median, so a
machine that slows down or speeds up during the run affects both alike. On a GPU, MFU = flops_per_token * tokens/s
/ peak (PaLM's formula, from Llama.flops_per_token; --peak_tflops defaults to the H100's dense bf16 peak).
"""

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script (python bench/llama_vs_hf.py): make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import transformers

from bench.common import hf_twin, time_alternating
from model import LLAMA_CONFIGS, Llama, LlamaConfig, build_model

# default: small enough for a 2-core CPU, with a real-size vocabulary so the output head weighs what it does
SMALL = LlamaConfig(vocab_size=50304, dim=256, n_layers=4, n_heads=4, n_kv_heads=4, ffn_dim=768, max_seq_len=1024)


def build_pair(config: LlamaConfig, device: str, dtype: torch.dtype) -> tuple[Llama, torch.nn.Module]:
    ours = build_model(config)
    ours.to_empty(device=device)
    ours.init_weights()
    ours.to(dtype)
    return ours, hf_twin(ours).train()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="small", help=f"'small' or one of {', '.join(LLAMA_CONFIGS)}")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: bfloat16 on GPU, float32 on CPU)")
    parser.add_argument("--backend", default="sdpa", help="our attention backend: sdpa | eager")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--peak_tflops", type=float, default=989.0, help="accelerator peak (H100 SXM dense bf16: 989)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    if args.size != "small" and args.size not in LLAMA_CONFIGS:
        raise SystemExit(f"--size {args.size!r} unknown; expected 'small' or one of {', '.join(LLAMA_CONFIGS)}")
    base = SMALL if args.size == "small" else LLAMA_CONFIGS[args.size]
    config = LlamaConfig(**{**base.__dict__, "attn_backend": args.backend,
                            "max_seq_len": max(base.max_seq_len, args.seq)})
    dtype_name = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype_name]
    torch.manual_seed(args.seed)
    ours, hf = build_pair(config, args.device, dtype)

    idx = torch.randint(0, config.vocab_size, (args.batch, args.seq), device=args.device)  # (B, T)
    labels = torch.roll(idx, -1, dims=1)  # (B, T): ours takes aligned labels; HF shifts idx itself
    labels[:, -1] = -100
    with torch.no_grad():
        diff = (ours(idx).float() - hf(idx).logits.float()).abs().max().item()

    def step_ours() -> None:
        out = ours(idx, labels=labels)
        (out.loss_sum / out.n_tokens).backward()

    def step_hf() -> None:
        hf(input_ids=idx, labels=idx).loss.backward()

    def zeroed(model, step):
        def run() -> None:
            model.zero_grad(set_to_none=True)
            step()
        return run

    steps = {"ours": zeroed(ours, step_ours), "hf": zeroed(hf, step_hf)}
    medians = time_alternating(steps, args.warmup, args.iters, args.device)

    tokens = args.batch * args.seq
    print(f"config: {args.size} {config}")
    print(f"device {args.device}, dtype {dtype_name}, batch {args.batch}, seq {args.seq}, our backend {args.backend}, "
          f"HF attn_implementation sdpa, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"threads {torch.get_num_threads()}")
    print(f"params {ours.num_params() / 1e6:.2f}M, logits max abs diff ours vs HF: {diff:.2e}")
    print(f"{args.warmup} warmup + {args.iters} timed steps (forward + loss + backward) each, alternating")
    tok_s = {}
    for name in steps:
        med = medians[name]
        tok_s[name] = tokens / med
        line = f"  {name:>4}: median {med * 1e3:8.1f} ms/step  {tok_s[name]:10.0f} tokens/s"
        if args.device.startswith("cuda"):
            mfu = ours.flops_per_token(args.seq) * tok_s[name] / (args.peak_tflops * 1e12)
            line += f"  MFU {100 * mfu:.1f}%"
        print(line)
    print(f"ratio ours / HF tokens/s: {tok_s['ours'] / tok_s['hf']:.3f}x")


if __name__ == "__main__":
    main()
