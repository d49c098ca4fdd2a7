"""What the benchmarks share: the transformers twin of one of our models, device sync, alternating timing."""

import statistics
import time
from collections.abc import Callable

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
