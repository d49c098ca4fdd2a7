"""Training-step throughput and peak memory of our GPT-OSS and GraniteMoE against transformers' GptOssForCausalLM
and GraniteMoeForCausalLM: same config, same weights, same machine, same run. Prints ms/step, tokens/s and the
peak memory of one step for each, and the ratios ours / HF, as a markdown table.

    python -m bench.moe_vs_hf                                    # both families, small config, CPU, fp32
    python -m bench.moe_vs_hf --family gpt_oss --seq 1024 --batch 1
    python -m bench.moe_vs_hf --device cuda --dim 1024 --layers 8 --experts 32 --top_k 4 --seq 2048

Same weights: transformers builds its model from the config (its own init, then every bias redrawn from
normal(0, 0.02) so that the bias layouts are exercised too), saves it with save_pretrained into a temporary
directory, and both sides load that directory: transformers with its from_pretrained, ours with
model.hf.from_pretrained. Before timing, the logits and the loss of the benchmark batch are compared: the largest
abs difference over all logits, and the median over tokens of each token's largest (in bf16 a router whose top-k
is a near tie can pick another expert on one side, which moves that one token's logits a lot: the median shows
whether the rest agree).

One step = zero_grad(set_to_none) + forward + loss + backward, in train mode; HF gets use_cache=False (a training
step has no use for a KV cache) and computes no router aux loss (output_router_logits is off), ours has its router
loss coefficients at 0. Both run the experts implementation they pick by default (transformers 5: "grouped_mm",
torch's grouped GEMM kernel where it can run, else its own loop), printed in the header. HF's attention is "eager"
for GPT-OSS on CPU (its sinks rule out sdpa), "flex_attention" for GPT-OSS on CUDA when this torch has it, "sdpa"
for GraniteMoE; ours is --attn (auto by default, printed). The two models are timed alternately, iteration by
iteration, after a warmup, and each reports its median, so a machine that slows down or speeds up during the run
affects both alike.

Peak memory of one step: the most memory in use during the step above what was in use just before it (weights
loaded, gradients None, after warmup steps), so it counts activations, gradients and temporaries.
    cuda: torch.cuda.max_memory_allocated() after reset_peak_memory_stats(), in this process (tensor bytes).
    cpu:  each model in a fresh subprocess (this file with --probe), where glibc's mmap threshold is pinned at
          64 KiB (MALLOC_MMAP_THRESHOLD_) so every tensor bigger than that is its own mapping and goes back to the
          OS when freed; after 2 warmup steps the peak-RSS mark is reset (/proc/self/clear_refs "5"), one step
          runs, and VmHWM minus VmRSS before the step is reported. These are resident pages, not tensor bytes:
          allocations under 64 KiB that malloc serves from memory it already holds do not show.
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):  # run as a script (python bench/moe_vs_hf.py): make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import transformers

from bench.common import cuda_step_peak_mib, rss_step_peak, run_probe, time_alternating
from model import attention, gpt_oss, granite_moe
from model.hf import from_pretrained
from model.moe import grouped_supported

FAMILIES = ("gpt_oss", "granite")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MiB = 2**20


def our_config(family: str, args: argparse.Namespace):
    """Our config for the benchmark's shape: the published family's defaults except the sizes given."""
    shape = dict(vocab_size=args.vocab, dim=args.dim, n_layers=args.layers, n_heads=args.heads,
                 n_kv_heads=args.kv_heads, ffn_dim=args.ffn or args.dim, n_experts=args.experts, top_k=args.top_k,
                 attn_backend=args.attn)
    if family == "gpt_oss":  # YaRN, 131k context and the 128-key window of the real model; head_dim is free
        return gpt_oss.GptOssConfig(**shape, head_dim=args.head_dim)
    return granite_moe.GraniteMoeConfig(**shape, max_seq_len=max(4096, args.seq))  # head_dim = dim / n_heads


def hf_attention(family: str, device: str, requested: str) -> str:
    if requested != "auto":
        return requested
    if family == "granite":
        return "sdpa"
    if device.startswith("cuda") and transformers.utils.is_torch_flex_attn_available():
        return "flex_attention"
    return "eager"


def save_hf_checkpoint(family: str, args: argparse.Namespace, out_dir: str) -> None:
    """transformers' model for our config, initialised by transformers (biases redrawn), saved to out_dir."""
    module = gpt_oss if family == "gpt_oss" else granite_moe
    hf_config = transformers.AutoConfig.for_model(**module.config_to_hf(our_config(family, args)))
    torch.manual_seed(args.seed)
    hf = transformers.AutoModelForCausalLM.from_config(hf_config)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.02)
    hf.save_pretrained(out_dir)


def load_pair(family: str, model_dir: str, args: argparse.Namespace, which: tuple[str, ...] = ("ours", "hf")):
    """The models of model_dir, ours and/or HF's, in train mode, in --dtype on --device."""
    dtype = DTYPES[args.dtype]
    models = {}
    if "ours" in which:
        models["ours"] = from_pretrained(model_dir, device=args.device, dtype=dtype, attn_backend=args.attn).train()
    if "hf" in which:
        models["hf"] = transformers.AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=dtype, attn_implementation=hf_attention(family, args.device, args.hf_attn)
        ).to(args.device).train()
    return models


def batch(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    """idx (B, T) and our aligned labels (B, T) (label t = token t + 1, the last ignored); HF shifts idx itself."""
    g = torch.Generator().manual_seed(args.seed)
    idx = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g).to(args.device)  # (B, T)
    labels = torch.roll(idx, -1, dims=1)  # (B, T)
    labels[:, -1] = -100
    return idx, labels


def step_fn(name: str, model: torch.nn.Module, idx: torch.Tensor, labels: torch.Tensor):
    """One training step of `model` (grads set to None first, so every step allocates them alike)."""
    if name == "ours":
        def step() -> None:
            model.zero_grad(set_to_none=True)
            out = model(idx, labels=labels)
            (out.loss_sum / out.n_tokens).backward()
    else:
        def step() -> None:
            model.zero_grad(set_to_none=True)
            model(input_ids=idx, labels=idx, use_cache=False).loss.backward()
    return step


# ------------------------------------------------------------------------------------------------ peak memory


def probe_cpu_peak(args: argparse.Namespace) -> None:
    """(--probe ours|hf, in a fresh process) print {"peak_mib": ...}: resident memory one step adds at its peak."""
    model = load_pair(args.family, args.probe_dir, args, which=(args.probe,))[args.probe]
    idx, labels = batch(args)
    step = step_fn(args.probe, model, idx, labels)
    for _ in range(2):  # warm up: one-time allocations (oneDNN primitives, HF mask caches) land in the baseline
        step()
    model.zero_grad(set_to_none=True)
    print(json.dumps(rss_step_peak(step)))


def cpu_peak_mib(name: str, family: str, model_dir: str, args: argparse.Namespace) -> float:
    """Run probe_cpu_peak for one model in a fresh subprocess with a fixed mmap threshold; its peak in MiB."""
    cmd = [sys.executable, "-m", "bench.moe_vs_hf", "--probe", name, "--probe_dir", model_dir, "--family", family]
    for key in ("layers", "dim", "heads", "kv_heads", "head_dim", "ffn", "experts", "top_k", "vocab", "seq", "batch",
                "device", "dtype", "attn", "hf_attn", "threads", "seed"):
        cmd += [f"--{key}", str(getattr(args, key))]
    return run_probe(cmd, name)["peak_mib"]


def cuda_peak_mib(model: torch.nn.Module, step) -> float:
    """Peak tensor memory one step of `model` allocates above what is allocated before it (its grads freed), in MiB."""
    model.zero_grad(set_to_none=True)
    return cuda_step_peak_mib(step)


# ------------------------------------------------------------------------------------------------ one family


def describe_experts(family: str, models: dict) -> tuple[str, str]:
    """What runs the experts on each side, in words."""
    hf = models["hf"]
    impl = getattr(hf.config, "_experts_implementation", None)
    hf_words = f"experts_implementation={impl!r}"
    if impl == "grouped_mm":
        from transformers.integrations.moe import _can_use_grouped_mm  # private: only to say which path runs

        experts = next(m for m in hf.modules() if type(m).__name__.endswith("Experts"))
        w = experts.gate_up_proj
        x = torch.empty(8, hf.config.hidden_size, device=w.device, dtype=w.dtype)
        offs = torch.zeros(w.shape[0], device=w.device, dtype=torch.int32)
        kernel = _can_use_grouped_mm(x, w, offs)
        hf_words += " (torch grouped_mm kernel)" if kernel else " (HF's fallback: a loop of torch.mm over experts)"
    moe = models["ours"].layers[0].moe
    x = torch.empty(1, device=moe.w_gate_up.device, dtype=moe.w_gate_up.dtype)
    ours_words = "torch._grouped_mm" if grouped_supported(x) else "a loop of matmuls over experts (torch.split)"
    return ours_words, hf_words


def logits_recording_attention(ours: torch.nn.Module, idx: torch.Tensor) -> tuple[torch.Tensor, str]:
    """ours(idx) with attention.resolve_backend watched: the logits and the backend(s) attention() ran."""
    chosen, resolve = set(), attention.resolve_backend

    def recording(requested, needs, device):
        backend = resolve(requested, needs, device)
        chosen.add(backend)
        return backend

    attention.resolve_backend = recording
    try:
        logits = ours(idx)
    finally:
        attention.resolve_backend = resolve
    return logits, "/".join(sorted(chosen))


def run_family(family: str, args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"moe_vs_hf_{family}_") as model_dir:
        save_hf_checkpoint(family, args, model_dir)
        models = load_pair(family, model_dir, args)
        ours, hf = models["ours"], models["hf"]
        idx, labels = batch(args)
        info = dict(family=family, experts=describe_experts(family, models), hf_attn=hf.config._attn_implementation,
                    params=sum(p.numel() for p in ours.parameters()))

        with torch.no_grad():
            logits_ours, info["attn"] = logits_recording_attention(ours, idx)  # (B, T, vocab)
            logits_ours = logits_ours.float()
            logits_hf = hf(input_ids=idx, use_cache=False).logits.float()  # (B, T, vocab)
            per_token = (logits_ours - logits_hf).abs().amax(dim=-1)  # (B, T)
            info["diff"], info["median_diff"] = per_token.max().item(), per_token.median().item()
            info["scale"] = logits_hf.abs().max().item()
            out = ours(idx, labels=labels)
            info["loss_ours"] = (out.loss_sum / out.n_tokens).item()
            info["loss_hf"] = hf(input_ids=idx, labels=idx, use_cache=False).loss.item()
            del logits_ours, logits_hf, out

        steps = {name: step_fn(name, m, idx, labels) for name, m in models.items()}
        info["medians"] = time_alternating(steps, args.warmup, args.iters, args.device)
        if args.device == "cuda":
            info["peaks"] = {name: cuda_peak_mib(models[name], step) for name, step in steps.items()}
        else:  # each in its own process; this one's models go first so the probes have the memory to themselves
            del steps, models, ours, hf
            info["peaks"] = {name: cpu_peak_mib(name, family, model_dir, args) for name in ("ours", "hf")}
        return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", default="both", choices=(*FAMILIES, "both"))
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv_heads", type=int, default=2)
    parser.add_argument("--head_dim", type=int, default=64, help="GPT-OSS only (GraniteMoE: dim / heads)")
    parser.add_argument("--ffn", type=int, default=0, help="hidden size of each expert (0 = --dim)")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top_k", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--dtype", default=None, choices=tuple(DTYPES), help="default: bf16 on cuda, fp32 on cpu")
    parser.add_argument("--attn", default="auto", help="our attention backend: auto | eager | sdpa | flex | flash")
    parser.add_argument("--hf_attn", default="auto", help="HF attn_implementation (auto: see the module docstring)")
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0 = torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--probe", default="", help=argparse.SUPPRESS)  # internal: CPU memory probe of ours|hf
    parser.add_argument("--probe_dir", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()

    args.dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    if args.threads:
        torch.set_num_threads(args.threads)
    transformers.utils.logging.disable_progress_bar()
    if args.probe:
        probe_cpu_peak(args)
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible to torch")

    families = FAMILIES if args.family == "both" else (args.family,)
    results = [run_family(f, args) for f in families]

    tokens = args.batch * args.seq
    memory_how = ("torch.cuda.max_memory_allocated above the allocation before the step" if args.device == "cuda"
                  else "peak RSS above the RSS before the step, one fresh subprocess per model "
                       "(MALLOC_MMAP_THRESHOLD_=65536)")
    print(f"\ndevice {args.device}, dtype {args.dtype}, batch {args.batch}, seq {args.seq}, dim {args.dim}, "
          f"layers {args.layers}, heads {args.heads}/{args.kv_heads} kv, ffn {args.ffn or args.dim}, "
          f"experts {args.experts} top-{args.top_k}, vocab {args.vocab}; torch {torch.__version__}, "
          f"transformers {transformers.__version__}, threads {torch.get_num_threads()}")
    print(f"{args.warmup} warmup + {args.iters} timed steps (forward + loss + backward) each, alternating; "
          f"peak memory: {memory_how}")
    for r in results:
        ours_experts, hf_experts = r["experts"]
        print(f"{r['family']}: {r['params'] / 1e6:.2f}M params; attention ours {r['attn']}, "
              f"HF {r['hf_attn']}; experts ours {ours_experts}, HF {hf_experts}; logits max abs diff "
              f"{r['diff']:.2e} (median over tokens {r['median_diff']:.2e}, max |logit| {r['scale']:.2f}); "
              f"loss ours {r['loss_ours']:.6f}, HF {r['loss_hf']:.6f}")
    print()
    print("| family | ms/step ours | ms/step HF | tokens/s ours | tokens/s HF | **tokens/s ours / HF** "
          "| peak MiB ours | peak MiB HF | **peak ours / HF** |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        t, m = r["medians"], r["peaks"]
        print(f"| {r['family']} | {t['ours'] * 1e3:.1f} | {t['hf'] * 1e3:.1f} | {tokens / t['ours']:.0f} | "
              f"{tokens / t['hf']:.0f} | **{t['hf'] / t['ours']:.3f}x** | {m['ours']:.1f} | {m['hf']:.1f} | "
              f"**{m['ours'] / m['hf']:.3f}x** |")


if __name__ == "__main__":
    main()
