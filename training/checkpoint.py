"""Checkpoints: atomic, complete, and loadable without unpickling code.

On disk, inside a run directory:

    ckpt/step_000200/model.safetensors   weights (our parameter names, fp32 as trained)
    ckpt/step_000200/state.pt            optimizer, step, data position, RNG (torch.load(weights_only=True))
    ckpt/step_000200/config.json         the resolved TrainConfig, so a checkpoint directory stands alone
    ckpt/latest -> step_000200           symlink to the newest complete checkpoint

A checkpoint is written into `ckpt/.tmp-step_000200/`, flushed to disk, then renamed into place; only then
does `latest` move (a rename of a new symlink over the old one). A process killed at any point leaves
`latest` on a complete checkpoint; stale temp directories are removed by the next save.
"""

import dataclasses
import json
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from model import build_model
from model.weights import load_safetensors, save_safetensors
from training.config import TrainConfig, from_dict, to_dict

MODEL_FILE, STATE_FILE, CONFIG_FILE = "model.safetensors", "state.pt", "config.json"


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def step_dirs(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first."""
    if not root.is_dir():
        return []
    dirs = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_") and p.name[5:].isdigit()]
    return sorted(dirs, key=lambda p: int(p.name[5:]))


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(root: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    state: dict, config: TrainConfig, keep_last: int) -> Path:
    """Write checkpoint `step` atomically, point `latest` at it, prune to the newest `keep_last`."""
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):  # left by a process killed mid-save
        shutil.rmtree(stale, ignore_errors=True)
    name = f"step_{step:06d}"
    tmp, final = root / f".tmp-{name}", root / name
    tmp.mkdir()
    save_safetensors(model, str(tmp / MODEL_FILE))
    torch.save({**state, "step": step, "optimizer": optimizer.state_dict(), "rng": rng_state()}, tmp / STATE_FILE)
    (tmp / CONFIG_FILE).write_text(json.dumps(to_dict(config), indent=2))
    for f in tmp.iterdir():
        _fsync(f)
    if final.exists():  # re-saving the same step (e.g. the end of a resumed run)
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync(root)
    link = root / ".latest.tmp"
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(name)
    os.replace(link, root / "latest")
    _fsync(root)
    keep = max(1, keep_last)
    for old in step_dirs(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def resolve(path: str | Path) -> Path:
    """A checkpoint directory from a run dir, a ckpt/ dir, `ckpt/latest` or `ckpt/step_N`."""
    p = Path(path)
    for candidate in (p, p / "latest", p / "ckpt" / "latest"):
        if (candidate / MODEL_FILE).is_file():
            if not (candidate / STATE_FILE).is_file() or not (candidate / CONFIG_FILE).is_file():
                raise FileNotFoundError(f"checkpoint {candidate} is incomplete: it needs {MODEL_FILE}, {STATE_FILE}, {CONFIG_FILE}")
            return candidate.resolve()
    if not p.exists():
        raise FileNotFoundError(f"checkpoint path {p} does not exist")
    raise FileNotFoundError(f"no checkpoint found at {p} (looked for {MODEL_FILE} in it, in latest/ and ckpt/latest/)")


def load_state(ckpt: Path) -> dict:
    return torch.load(ckpt / STATE_FILE, map_location="cpu", weights_only=True)


def load_config(ckpt: Path) -> TrainConfig:
    return from_dict(TrainConfig, json.loads((ckpt / CONFIG_FILE).read_text()))


def load_model(path: str | Path, device: str | torch.device = "cpu", **overrides) -> tuple[nn.Module, TrainConfig]:
    """Rebuild the model a checkpoint was trained with and fill it with the checkpoint's weights.

    overrides: model config fields that change no tensor shape (rope_theta, max_seq_len, attn_backend, ...);
    None values are ignored."""
    ckpt = resolve(path)
    config = load_config(ckpt)
    config.model = dataclasses.replace(config.model, **{k: v for k, v in overrides.items() if v is not None})
    config.model.validate()
    model = build_model(config.model)
    model.to_empty(device=device)
    load_safetensors(model, [str(ckpt / MODEL_FILE)])
    model.eval()
    return model, config
