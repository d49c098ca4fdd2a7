"""Checkpoints: atomic, complete, and loadable without unpickling code.

On disk, inside a run directory:

    ckpt/step_000200/model.safetensors   weights (our parameter names, fp32 as trained)
    ckpt/step_000200/state.pt            optimizer, step, data position, RNG (torch.load(weights_only=True))
    ckpt/step_000200/config.json         the resolved TrainConfig, so a checkpoint directory stands alone
    ckpt/latest -> step_000200           symlink to the newest complete checkpoint

A checkpoint is written into `ckpt/.tmp-step_000200/`, flushed to disk, then renamed into place; only then
does `latest` move (a rename of a new symlink over the old one). A process killed at any point leaves
`latest` on a complete checkpoint; stale temp directories are removed by the next save.

A sharded (FSDP2) run writes the same directory, with the optimizer moved out of state.pt:

    ckpt/step_000200/dcp/                torch.distributed.checkpoint: model and optimizer shards, each rank
                                         writing its own; loads on any number of ranks (DCP reshards)
    ckpt/step_000200/model.safetensors   the whole model, gathered one tensor at a time and written by rank 0,
                                         so eval.py, generate.py and merge.py read a sharded run's checkpoints
    ckpt/step_000200/state.pt            step, data position, RNG of rank 0 (no optimizer: it is in dcp/)

Resuming reads dcp/ when it is there, whatever the world size now (N -> M ranks, 2 -> 1 included); otherwise
model.safetensors and state.pt's optimizer, each rank keeping its shard (1 -> M ranks).
"""

import dataclasses
import json
import os
import shutil
import struct
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.tensor import DTensor

from model import build_model
from model.weights import CheckpointReader, check_tensors, load_safetensors, save_safetensors, tied_names
from training import parallel
from training.config import TrainConfig, from_dict, to_dict

MODEL_FILE, STATE_FILE, CONFIG_FILE, DCP_DIR = "model.safetensors", "state.pt", "config.json", "dcp"
SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int64: "I64",
                      torch.int32: "I32", torch.uint8: "U8", torch.bool: "BOOL"}


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


def save_safetensors_gathered(model: nn.Module, path: Path, write: bool) -> None:
    """model.safetensors of a sharded model without holding it whole: the header first (names, shapes and
    dtypes are known without gathering), then each tensor gathered in turn (a collective: every rank calls
    this) and appended by the writing rank, which holds one full tensor at a time. The file is what
    model.weights.save_safetensors writes for the unsharded model: tied tensors once, under the canonical name."""
    aliases = tied_names(model)
    tensors = [(name, t) for name, t in model.state_dict().items() if name not in aliases]
    header, offset = {}, 0
    for name, t in tensors:
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset,
                                                                                                  offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    f = open(path, "wb") if write else None
    try:
        if f:
            f.write(struct.pack("<Q", len(blob)) + blob)
        for _, t in tensors:
            full = parallel.full_tensor(t.detach())
            if f:
                f.write(full.to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    finally:
        if f:
            f.close()


def save_checkpoint(root: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    state: dict, config: TrainConfig, keep_last: int, d: parallel.Dist | None = None) -> Path:
    """Write checkpoint `step` atomically, point `latest` at it, prune to the newest `keep_last`. With a sharded
    model (d.sharded) every rank must call this: the shards go through torch.distributed.checkpoint."""
    d = d or parallel.Dist()
    name = f"step_{step:06d}"
    tmp, final = root / f".tmp-{name}", root / name
    if d.main:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-*"):  # left by a process killed mid-save
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    parallel.barrier(d)
    saved = {**state, "step": step, "rng": rng_state()}
    if d.sharded:
        model_state, optim_state = get_state_dict(model, optimizer)
        dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(tmp / DCP_DIR))
        save_safetensors_gathered(model, tmp / MODEL_FILE, write=d.main)
        saved["world_size"] = d.world_size
    else:
        save_safetensors(model, str(tmp / MODEL_FILE))
        saved["optimizer"] = optimizer.state_dict()
    parallel.barrier(d)  # every shard is on disk
    if d.main:
        _publish(root, tmp, final, saved, config, keep_last)
    parallel.barrier(d)
    return final


def _publish(root: Path, tmp: Path, final: Path, saved: dict, config: TrainConfig, keep_last: int) -> None:
    """The rest of an atomic save, by one process: state and config, flush, rename, move `latest`, prune."""
    name = final.name
    torch.save(saved, tmp / STATE_FILE)
    (tmp / CONFIG_FILE).write_text(json.dumps(to_dict(config), indent=2))
    for f in tmp.rglob("*"):
        if f.is_file():
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


def check_weights_fit(model: nn.Module, path: Path) -> None:
    """WeightMismatchError unless the file's tensor names and shapes are the model's (headers only)."""
    aliases = tied_names(model)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items() if name not in aliases}
    reader = CheckpointReader([str(path)])
    try:
        check_tensors(expected, dict(reader.shapes), str(path))
    finally:
        reader.close()


def load_training_state(ckpt: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                        d: parallel.Dist | None = None) -> dict:
    """Fill a materialised (possibly sharded) model and its optimizer from a checkpoint written with any world
    size (see the module docstring); returns state.pt's dict (step, data position, RNG). Raises
    model.weights.WeightMismatchError when the weights do not fit the model."""
    d = d or parallel.Dist()
    state = load_state(ckpt)
    if (ckpt / DCP_DIR).is_dir():
        check_weights_fit(model, ckpt / MODEL_FILE)  # a clear error before DCP's own
        model_state, optim_state = get_state_dict(model, optimizer)
        dcp.load({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(ckpt / DCP_DIR))
        set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state)
    else:
        load_safetensors(model, [str(ckpt / MODEL_FILE)], copy=parallel.copy_into_shard)
        optimizer.load_state_dict(state["optimizer"])
        if d.sharded:  # the single-process optimizer state is whole: keep this rank's rows of each tensor
            for group in optimizer.param_groups:
                for p in group["params"]:
                    for key, value in optimizer.state.get(p, {}).items():
                        if isinstance(p, DTensor) and torch.is_tensor(value) and value.shape == p.shape:
                            shard = torch.empty_like(p)
                            parallel.copy_into_shard(shard, value.to(p.device))
                            optimizer.state[p][key] = shard
    return state


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
