"""Training-step throughput, MFU and peak memory of one process with and without FSDP2 wrapping (world size 1),
and with each activation-checkpointing mode, for the model of a config file (default: the ~1.1B Llama of
configs/pretrain_slimpajama.py). Prints a markdown table with ratios against the unwrapped model of the same run.

    python -m bench.fsdp --device cuda                               # the 1.1B shape, seq 2048, batch 8, bf16
    python -m bench.fsdp --device cuda --seq 8192 --batch 2
    python -m bench.fsdp --dim 256 --layers 4 --seq 256 --batch 4    # a small shape: runs on a CPU

One step = forward + loss + backward + AdamW step + zero_grad, on random tokens, bf16 autocast (and bf16 FSDP2
parameters) on CUDA, fp32 on CPU; the model is built on meta, wrapped, materialised and initialised exactly as
train.py does (training/parallel.py). Modes, each built fresh in turn: plain; fsdp; fsdp + selective activation
checkpointing (every 2nd block); fsdp + full activation checkpointing. Time: median of --iters steps after
--warmup. MFU = flops_per_token * tokens/s / peak bf16 FLOP/s (training/logger.py's table; CUDA only). Peak
memory: the most allocated during a step above what is allocated before it (weights and optimizer state
excluded), from the CUDA allocator; on CPU, not measured.
"""

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench.common import cuda_step_peak_mib, sync
from model import build_model
from training import parallel
from training.config import load_config
from training.logger import peak_flops
from training.optim import build_optimizer

MODES = {"plain": (False, "none"), "fsdp": (True, "none"), "fsdp + AC selective": (True, "selective"),
         "fsdp + AC full": (True, "full")}


def build(config, mode: str, dist: parallel.Dist, device: torch.device, optim_cfg):
    sharded, ac = MODES[mode]
    model = build_model(config)
    parallel.apply_activation_checkpointing(model, ac, every=2)
    if sharded:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        parallel.parallelize(model, dist, dtype, torch.float32, reshard_after_forward=True)
    model.to_empty(device=device)
    torch.manual_seed(0)
    model.init_weights()
    return model, build_optimizer(model, optim_cfg, device)


def measure(mode: str, args, cfg, dist: parallel.Dist, device: torch.device) -> dict:
    model, optimizer = build(cfg.model, mode, dist, device, cfg.optim)
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, cfg.model.vocab_size, (args.batch, args.seq + 1), generator=g).to(device)
    x, y = idx[:, :-1], idx[:, 1:]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step():
        with autocast:
            out = model(x, labels=y)
        (out.loss_sum / out.n_tokens).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    times = []
    for i in range(args.warmup + args.iters):
        sync(device)
        t0 = time.perf_counter()
        step()
        sync(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    seconds = statistics.median(times)
    tokens_per_s = args.batch * args.seq / seconds
    peak = peak_flops(device)
    row = {"mode": mode, "ms": seconds * 1e3, "tokens_per_s": tokens_per_s,
           "mfu": model.flops_per_token(args.seq) * tokens_per_s / peak if peak else None,
           "peak_mib": cuda_step_peak_mib(step) if device.type == "cuda" else None}
    return row  # the model and its optimizer are freed with this frame


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/pretrain_slimpajama.py")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--dim", type=int, default=0, help="override the model width (and heads stay)")
    ap.add_argument("--layers", type=int, default=0, help="override the number of blocks")
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5)
    args = ap.parse_args()
    cfg = load_config(args.config, [])
    overrides = {k: v for k, v in (("dim", args.dim), ("n_layers", args.layers)) if v}
    cfg.model = dataclasses.replace(cfg.model, max_seq_len=max(args.seq, cfg.model.max_seq_len), **overrides)
    device = torch.device(args.device)
    dist = parallel.init_distributed(device, fsdp_single=True, timeout_s=600)
    try:
        rows = []
        for mode in args.modes:
            rows.append(measure(mode, args, cfg, dist, dist.device))
            if device.type == "cuda":
                torch.cuda.empty_cache()
    finally:
        parallel.shutdown(dist)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    n_params = sum(p.numel() for p in build_model(cfg.model).parameters())
    print(f"{name}; torch {torch.__version__}; {n_params / 1e6:.0f}M parameters; batch {args.batch} x seq "
          f"{args.seq}; {args.warmup} warmup + {args.iters} timed steps\n")
    base = next((r for r in rows if r["mode"] == "plain"), rows[0])
    print("| mode | ms/step | tokens/s | vs plain | MFU | peak MiB |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
        peak = f"{r['peak_mib']:.0f}" if r["peak_mib"] is not None else "n/a"
        print(f"| {r['mode']} | {r['ms']:.1f} | {r['tokens_per_s']:.0f} | "
              f"{r['tokens_per_s'] / base['tokens_per_s']:.3f} | {mfu} | {peak} |")


if __name__ == "__main__":
    main()
