"""Run logging: one console line per log step, `metrics.jsonl` always, wandb when configured.

Every record is one JSON object per line in out_dir/metrics.jsonl: training records carry `step`, `loss`,
`lr`, `grad_norm`, `tokens`, `tokens_per_s` (and `mfu` on GPU); evaluation records carry `val_loss`,
`val_ppl`, `val_token_acc`, `val_tokens`. Appending means a resumed run continues the same file.
"""

import json
import math
import os
from pathlib import Path

import torch

# Dense bf16 tensor-core peak (no sparsity) per GPU, from the vendors' data sheets; used for MFU.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "GH200": 989e12, "B200": 2250e12,
                   "A100": 312e12, "A800": 312e12, "L40S": 362e12, "L4": 121e12, "A10G": 70e12, "RTX 4090": 165e12}


def peak_flops(device: torch.device) -> float | None:
    """Peak bf16 FLOP/s of a known CUDA device, else None (no MFU is reported on CPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in PEAK_BF16_FLOPS.items():
        if key in name:
            return flops
    return None


def format_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def format_count(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.1f}{unit}"
    return f"{n:.0f}"


class Logger:
    def __init__(self, out_dir: str, config: dict, wandb_project: str = "", wandb_run: str = ""):
        self.path = Path(out_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.wandb = None
        if wandb_project:
            import wandb  # imported only when asked for

            self.wandb = wandb.init(project=wandb_project, name=wandb_run or Path(out_dir).name, config=config,
                                    dir=out_dir, resume="allow", id=self._wandb_id(out_dir))

    @staticmethod
    def _wandb_id(out_dir: str) -> str:
        """A stable run id per out_dir, so a resumed run continues the same wandb run."""
        id_file = Path(out_dir) / "wandb_id.txt"
        if not id_file.exists():
            id_file.write_text(os.urandom(6).hex())
        return id_file.read_text().strip()

    def write(self, record: dict) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(clean) + "\n")
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def train_line(self, r: dict, max_steps: int, eta_s: float) -> str:
        parts = [f"step {r['step']:>{len(str(max_steps))}}/{max_steps}", f"loss {r['loss']:.4f}", f"lr {r['lr']:.2e}",
                 f"gnorm {r['grad_norm']:.2f}", f"{format_count(r['tokens_per_s'])} tok/s"]
        if r.get("mfu") is not None:
            parts.append(f"mfu {100 * r['mfu']:.1f}%")
        if r.get("expert_load") is not None:
            parts.append(f"experts {r['expert_load']:.2f}x")
        if r.get("skipped"):
            parts.append(f"skipped {r['skipped']}")
        parts.append(f"eta {format_duration(eta_s)}")
        return " | ".join(parts)

    @staticmethod
    def eval_line(r: dict) -> str:
        tasks = "".join(f" | {k} {v:.4f}" for k, v in r.items() if k.endswith("_acc") and k != "val_token_acc"
                        and isinstance(v, float))  # eval.tasks' accuracies
        return (f"eval step {r['step']} | val_loss {r['val_loss']:.4f} | val_ppl {r['val_ppl']:.2f} | "
                f"val_token_acc {r['val_token_acc']:.4f}{tasks}")

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()
