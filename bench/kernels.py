"""Time and peak memory of our kernels against eager PyTorch, torch.compile of the same eager code, and
Liger-Kernel, as ratios measured in one run. Prints markdown tables.

    python -m bench.kernels                                   # CPU: the chunked loss at 4096 tokens x 50,257 vocab
    python -m bench.kernels --device cuda                     # GPU: every kernel over the grid below
    python -m bench.kernels --device cuda --kernels cross_entropy --tokens 8192 --no-compile

Each measured call is one forward plus backward with the same inputs for every implementation:

    rope                        q (1, T, 32, 128) and k (1, T, 8, 128) bf16 (a Llama-3-8B layer) with fp32
                                cos/sin. Ours: kernels.rope.rope. Eager: model.rope.apply_rope on q and on k.
                                Liger: liger_rotary_pos_emb, given its own (B, H, T, D) layout and (1, T, D)
                                tables. Also reported: bandwidth, (read q, k + write outputs) / time, against
                                the bandwidth of a plain copy of the same bytes measured in the same run.
    cross_entropy               bf16 logits (N, V) -> mean loss. Ours: kernels.cross_entropy.cross_entropy
                                (gradient in a fresh buffer, as the others). Eager: F.cross_entropy on the fp32
                                upcast (what HF's loss does). Liger: LigerCrossEntropyLoss.
    fused_linear_cross_entropy  bf16 hidden (N, H) and output weight (V, H) -> mean loss. Ours:
                                kernels.fused_linear_cross_entropy (Triton chunks on CUDA, PyTorch chunks on
                                CPU). Eager: F.linear, then F.cross_entropy on the fp32 upcast. Liger:
                                LigerFusedLinearCrossEntropyLoss.

Grid on CUDA: vocabularies 32,000 / 128,256 / 201,088 (Llama-2 / Llama-3 / GPT-OSS) x hidden 2048 / 2880 / 4096
for the fused loss (--grid pairs: only the (4096, 32000), (2048, 128256), (2880, 201088) pairs of real models),
tokens 8192 and 16384. Time: median of --iters calls after --warmup, implementations called alternately.
Peak memory: the most allocated during one call above what was allocated before it (the inputs), from the CUDA
allocator's statistics; on CPU, resident pages in a fresh subprocess per implementation (bench.common.run_probe).

Liger-Kernel is a benchmark-only dependency: `pip install liger-kernel` (the GPU machine has no package index:
bring the wheel). Without it, its columns read "n/a".
"""

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

if __package__ in (None, ""):  # run as a script (python bench/kernels.py): make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F

from bench.common import cuda_step_peak_mib, rss_step_peak, run_probe, time_alternating
from model.rope import apply_rope, rope_cos_sin, rope_inv_freq

VOCABS = (32000, 128256, 201088)
HIDDENS = (2048, 2880, 4096)
PAIRS = ((4096, 32000), (2048, 128256), (2880, 201088))


def liger():
    """The Liger-Kernel module, or None when it is not installed."""
    try:
        import liger_kernel.transformers as lk

        return lk
    except ImportError:
        return None


# ------------------------------------------------------------------------------------------------ the cases


def make_inputs(kernel: str, shape: dict, device: str, dtype: torch.dtype) -> dict:
    g = torch.Generator(device=device).manual_seed(0)
    if kernel == "rope":
        T = shape["tokens"]
        q = torch.randn(1, T, 32, 128, device=device, dtype=dtype, generator=g, requires_grad=True)
        k = torch.randn(1, T, 8, 128, device=device, dtype=dtype, generator=g, requires_grad=True)
        cos, sin = rope_cos_sin(rope_inv_freq(128, 500000.0, device=device), torch.arange(T, device=device)[None])
        return dict(q=q, k=k, cos=cos, sin=sin, grad_q=torch.randn_like(q), grad_k=torch.randn_like(k))
    N, V = shape["tokens"], shape["vocab"]
    labels = torch.randint(0, V, (N,), device=device, generator=g)
    if kernel == "cross_entropy":
        logits = torch.randn(N, V, device=device, dtype=dtype, generator=g).requires_grad_()
        return dict(logits=logits, labels=labels)
    H = shape["hidden"]
    hidden = torch.randn(N, H, device=device, dtype=dtype, generator=g).requires_grad_()
    weight = (torch.randn(V, H, device=device, dtype=dtype, generator=g) * H**-0.5).requires_grad_()
    return dict(hidden=hidden, weight=weight, labels=labels)


def eager_fn(kernel: str) -> Callable:
    """The eager PyTorch computation of each kernel (the same function torch.compile is given)."""
    if kernel == "rope":
        return lambda q, k, cos, sin: (apply_rope(q, cos, sin), apply_rope(k, cos, sin))
    if kernel == "cross_entropy":
        return lambda logits, labels: F.cross_entropy(logits.float(), labels)
    return lambda hidden, weight, labels: F.cross_entropy(F.linear(hidden, weight).float(), labels)


def implementations(kernel: str, inputs: dict, device: str, compile_eager: bool) -> dict[str, Callable | None]:
    """name -> a function running one forward + backward (None: not available here, with the reason printed)."""
    eager = eager_fn(kernel)
    compiled = torch.compile(eager) if compile_eager else None
    lk = liger()
    impls: dict[str, Callable | None] = {}
    if kernel == "rope":
        q, k, cos, sin, gq, gk = (inputs[n] for n in ("q", "k", "cos", "sin", "grad_q", "grad_k"))

        def run(fn, q=q, k=k, cos=cos, sin=sin):
            def step():
                qo, ko = fn(q, k, cos, sin)
                torch.autograd.backward((qo, ko), (gq, gk))
            return step

        impls["eager"] = run(eager)
        impls["compile"] = run(compiled) if compiled else None
        impls["ours"] = None
        if device == "cuda":
            from kernels.rope import rope  # imports triton

            impls["ours"] = run(rope)
        if lk is not None and device == "cuda":
            from liger_kernel.transformers.rope import liger_rotary_pos_emb

            # Liger's layout: (B, H, T, D) and full-width (1, T, D) tables
            lq, lk_ = (t.detach().transpose(1, 2).contiguous().requires_grad_() for t in (q, k))
            lcos, lsin = (torch.cat((t, t), dim=-1) for t in (cos, sin))
            lgq, lgk = gq.transpose(1, 2).contiguous(), gk.transpose(1, 2).contiguous()

            def liger_step():
                qo, ko = liger_rotary_pos_emb(lq, lk_, lcos, lsin)
                torch.autograd.backward((qo, ko), (lgq, lgk))
            impls["liger"] = liger_step
        else:
            impls["liger"] = None
        return impls
    args = [inputs[n] for n in (("logits", "labels") if kernel == "cross_entropy" else ("hidden", "weight", "labels"))]

    def run_loss(fn):
        return lambda: fn(*args).backward()

    impls["eager"] = run_loss(eager)
    impls["compile"] = run_loss(compiled) if compiled else None
    if kernel == "cross_entropy":
        impls["ours"] = None
        if device == "cuda":
            from kernels.cross_entropy import cross_entropy  # imports triton

            impls["ours"] = run_loss(lambda x, y: cross_entropy(x, y)[0])
        impls["liger"] = run_loss(lk.LigerCrossEntropyLoss()) if lk is not None and device == "cuda" else None
    else:
        from kernels.fused_linear_cross_entropy import fused_linear_cross_entropy

        impls["ours"] = run_loss(lambda h, w, y: fused_linear_cross_entropy(h, w, y, use_triton=device == "cuda")[0])
        if lk is not None and device == "cuda":
            loss = lk.LigerFusedLinearCrossEntropyLoss()
            impls["liger"] = run_loss(lambda h, w, y: loss(w, h, y))
        else:
            impls["liger"] = None
    return impls


# ------------------------------------------------------------------------------------------------ measuring


def clear_grads(inputs: dict) -> None:
    for t in inputs.values():
        if isinstance(t, torch.Tensor) and t.requires_grad:
            t.grad = None


def cuda_peak_mib(step: Callable, inputs: dict) -> float:
    clear_grads(inputs)
    return cuda_step_peak_mib(step)


def copy_bandwidth(inputs: dict, warmup: int, iters: int) -> float:
    """Bytes per second of a plain device copy of q and k (read + write), the bound RoPE is held to."""
    src = torch.cat((inputs["q"].detach().flatten(), inputs["k"].detach().flatten()))
    dst = torch.empty_like(src)
    seconds = time_alternating({"copy": lambda: dst.copy_(src)}, warmup, iters, "cuda")["copy"]
    return 2 * src.numel() * src.element_size() / seconds


def measure(kernel: str, shape: dict, args) -> dict:
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    inputs = make_inputs(kernel, shape, args.device, dtype)
    impls = implementations(kernel, inputs, args.device, args.compile)
    runnable = {name: fn for name, fn in impls.items() if fn is not None}

    def timed(fn):
        def call():
            clear_grads(inputs)
            fn()
        return call

    times = time_alternating({n: timed(fn) for n, fn in runnable.items()}, args.warmup, args.iters, args.device)
    if args.device == "cuda":
        peaks = {n: cuda_peak_mib(fn, inputs) for n, fn in runnable.items()}
    else:
        peaks = {n: cpu_peak_mib(kernel, shape, n, args) for n in runnable}
    row = {"kernel": kernel, **shape, "ms": {n: t * 1e3 for n, t in times.items()}, "peak_mib": peaks,
           "missing": [n for n, fn in impls.items() if fn is None]}
    if kernel == "rope" and args.device == "cuda":
        moved = 2 * sum(inputs[n].numel() * inputs[n].element_size() for n in ("q", "k"))  # read + write
        row["copy_gbps"] = copy_bandwidth(inputs, args.warmup, args.iters) / 1e9
        # one call is a forward and a backward: each reads and writes q and k once
        row["gbps"] = {n: 2 * moved / (t * 1e-3) / 1e9 for n, t in row["ms"].items()}
    return row


def cpu_peak_mib(kernel: str, shape: dict, impl: str, args) -> float:
    cmd = [sys.executable, "-m", "bench.kernels", "--probe", impl, "--kernels", kernel, "--device", "cpu",
           "--probe_shape", json.dumps(shape)]
    if not args.compile:
        cmd.append("--no-compile")
    return run_probe(cmd, f"{kernel} {impl}")["peak_mib"]


def probe(args) -> None:
    """(--probe NAME, in a fresh process) print the resident memory one call of implementation NAME adds."""
    torch.set_num_threads(args.threads)
    kernel, shape = args.kernels[0], json.loads(args.probe_shape)
    inputs = make_inputs(kernel, shape, "cpu", torch.float32)
    step = implementations(kernel, inputs, "cpu", args.compile and args.probe == "compile")[args.probe]
    for _ in range(2):  # warm up: one-time allocations (oneDNN, compiled code) land in the baseline
        clear_grads(inputs)
        step()
    clear_grads(inputs)
    print(json.dumps(rss_step_peak(step)))


# ------------------------------------------------------------------------------------------------ the table


def shapes(kernel: str, args) -> list[dict]:
    tokens = args.tokens or ((4096,) if args.device == "cpu" else (8192, 16384))
    if kernel == "rope":
        return [dict(tokens=t) for t in tokens]
    if args.device == "cpu":
        return [dict(tokens=t, vocab=50257, hidden=768) for t in tokens]
    vocabs = args.vocabs or VOCABS
    if kernel == "cross_entropy":
        return [dict(tokens=t, vocab=v) for v in vocabs for t in tokens]
    pairs = PAIRS if args.grid == "pairs" else [(h, v) for v in vocabs for h in HIDDENS]
    return [dict(tokens=t, vocab=v, hidden=h) for h, v in pairs if v in vocabs for t in tokens]


def fmt_ratio(row: dict, field: str, name: str) -> str:
    values = row[field]
    if name not in values or "ours" not in values:
        return "n/a"
    return f"{values['ours'] / values[name]:.2f}"


def print_table(kernel: str, rows: list[dict]) -> None:
    names = ("ours", "eager", "compile", "liger")
    keys = [k for k in ("tokens", "hidden", "vocab") if k in rows[0]]
    head = keys + [f"{n} ms" for n in names] + [f"{n} MiB" for n in names]
    head += ["time ours/eager", "time ours/compile", "time ours/liger", "mem ours/eager", "mem ours/liger"]
    if kernel == "rope" and "copy_gbps" in rows[0]:
        head += ["ours GB/s", "copy GB/s", "ours / copy"]
    print(f"\n### {kernel}\n")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        cells = [str(r[k]) for k in keys]
        cells += [f"{r['ms'][n]:.2f}" if n in r["ms"] else "n/a" for n in names]
        cells += [f"{r['peak_mib'][n]:.0f}" if n in r["peak_mib"] else "n/a" for n in names]
        cells += [fmt_ratio(r, "ms", n) for n in ("eager", "compile", "liger")]
        cells += [fmt_ratio(r, "peak_mib", n) for n in ("eager", "liger")]
        if "copy_gbps" in r:
            ours = r["gbps"].get("ours")
            cells += [f"{ours:.0f}" if ours else "n/a", f"{r['copy_gbps']:.0f}",
                      f"{ours / r['copy_gbps']:.2f}" if ours else "n/a"]
        print("| " + " | ".join(cells) + " |")
    missing = sorted({n for r in rows for n in r["missing"]})
    if missing:
        print(f"\nnot run: {', '.join(missing)} (ours and Liger need CUDA for rope and cross_entropy; liger needs "
              f"`pip install liger-kernel`; compile is off with --no-compile)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--kernels", nargs="+", default=None,
                        choices=("rope", "cross_entropy", "fused_linear_cross_entropy"))
    parser.add_argument("--tokens", type=int, nargs="+", default=None)
    parser.add_argument("--vocabs", type=int, nargs="+", default=None)
    parser.add_argument("--grid", default="full", choices=("full", "pairs"))
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--probe", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--probe_shape", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.kernels = args.kernels or (["fused_linear_cross_entropy"] if args.device == "cpu" else
                                    ["rope", "cross_entropy", "fused_linear_cross_entropy"])
    if args.probe:
        return probe(args)
    torch.set_num_threads(args.threads)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu, {args.threads} threads"
    lk = liger()
    print(f"device {device_name}; torch {torch.__version__}; "
          f"liger-kernel {getattr(lk, '__version__', 'installed') if lk else 'not installed'}; "
          f"{args.warmup} warmup + {args.iters} timed calls (forward + backward), alternating")
    for kernel in args.kernels:
        rows = []
        for shape in shapes(kernel, args):
            rows.append(measure(kernel, shape, args))
            print(f"  measured {kernel} {shape}", file=sys.stderr, flush=True)
        print_table(kernel, rows)


if __name__ == "__main__":
    main()
