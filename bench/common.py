"""What the benchmarks share: the transformers twin of one of our models, device sync, alternating timing, and
peak memory (CUDA allocator stats; on CPU, resident pages measured in a fresh subprocess)."""

import json
import os
import re
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch
import transformers

from model.hf import FAMILY_OF_CONFIG
from model.weights import key_mapper


def hf_twin(ours: torch.nn.Module, attn_implementation: str = "sdpa") -> torch.nn.Module:
    """transformers' model for our model's config, holding a copy of our weights (same device and dtype)."""
    family = FAMILY_OF_CONFIG[type(ours.config)]
    hf_config = transformers.AutoConfig.for_model(**family.config_to_hf(ours.config))
    hf_config._attn_implementation = attn_implementation
    param = next(ours.parameters())
    hf = transformers.AutoModelForCausalLM.from_config(hf_config).to(device=param.device, dtype=param.dtype)
    to_hf = key_mapper(family.HF_KEY_MAP, inverse=True)
    missing, unexpected = hf.load_state_dict({to_hf(k): v for k, v in ours.state_dict().items()}, strict=False)
    missing = [k for k in missing if not (ours.config.tie_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise SystemExit(f"weight transfer to HF failed: missing {missing}, unexpected {unexpected}")
    if ours.config.tie_embeddings:
        hf.tie_weights()
    return hf.eval()


def sync(device: str | torch.device) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def time_alternating(fns: dict[str, Callable[[], None]], warmup: int, iters: int, device) -> dict[str, float]:
    """Median seconds per call of each function, calling them in turn iteration by iteration, so a machine that
    speeds up or slows down during the run affects all of them alike."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(warmup + iters):
        for name, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def _proc_status_kib(field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1))


def rss_step_peak(step: Callable[[], None]) -> dict[str, float]:
    """{"peak_mib", "rss_before_mib"}: the resident memory (Linux) that one call of step adds at its peak. Meant for
    a fresh process started by run_probe, where large tensors are mappings of their own that go back to the OS."""
    before = _proc_status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS (Linux >= 4.0)
    step()
    peak = _proc_status_kib("VmHWM")
    return {"peak_mib": (peak - before) / 1024, "rss_before_mib": before / 1024}


def run_probe(cmd: list[str], name: str) -> dict:
    """Run a memory probe (a benchmark re-invoked with its --probe options) in a fresh subprocess whose glibc mmap
    threshold is pinned at 64 KiB, so every tensor over 64 KiB is its own mapping and is returned to the OS when
    freed; the last line it prints is JSON, returned as a dict."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(64 * 1024)}
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"memory probe for {name} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def cuda_step_peak_mib(step: Callable[[], None]) -> float:
    """Peak tensor memory one call of step allocates on the GPU above what is allocated before it, in MiB."""
    sync("cuda")
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    sync("cuda")
    return (torch.cuda.max_memory_allocated() - before) / 2**20
