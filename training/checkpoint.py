"""Checkpoints: atomic, complete, and loadable without unpickling code.

On disk, inside a run directory:

    ckpt/step_000200/model.safetensors   weights (our parameter names, fp32 as trained)
    ckpt/step_000200/state.pt            optimizer, step, data position, RNG (torch.load(weights_only=True))
    ckpt/step_000200/config.json         the resolved TrainConfig, so a checkpoint directory stands alone
    ckpt/step_000200/lineage.json        {"lineage": id, "step": 200}: which chain of runs wrote it
    ckpt/latest -> step_000200           symlink to the newest complete checkpoint

A checkpoint is written into `ckpt/.tmp-step_000200/`, flushed to disk, then renamed into place; only then
does `latest` move (a rename of a new symlink over the old one). A process killed at any point leaves
`latest` on a complete checkpoint; stale temp directories are removed by the next save (one job per run
directory: training/job.py's lock). A checkpoint whose weights hold inf or NaN is never written.

Nothing here deletes a checkpoint it did not write. A run starting from scratch gets a new lineage id, and a run
resuming carries on its checkpoint's; pruning (keep_last) removes only older checkpoints of the run's own lineage,
never the one `latest` names. Before a run starts, plan_start refuses what would lose or hide checkpoints: starting
from scratch beside existing ones, or resuming from one that has newer ones after it (the run would write its
steps over them). Either is allowed with ckpt.move_aside, which moves them (with `latest`, and the run's
metrics.jsonl and config.json on a fresh start) into `ckpt/old-<time>/`. A `latest` that dangles or names a
damaged checkpoint stops the run with the intact checkpoints listed and the flag that resumes from one
(ckpt.resume_from), never a silent restart. Damaged files (truncated, overwritten) are a CheckpointError naming
the file and the newest intact checkpoint, whoever reads them (train.py, eval.py, generate.py, merge.py).

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
import time
import zipfile
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from safetensors import safe_open
from torch.distributed.tensor import DTensor

from model import build_model
from model.files import fix_permissions, fsync, fsync_tree, write_text_atomic
from model.weights import (CheckpointReader, check_tensors, load_safetensors, save_safetensors, tied_names,
                           write_safetensors)
from training import parallel
from training.config import CkptConfig, TrainConfig, from_dict, to_dict

MODEL_FILE, STATE_FILE, CONFIG_FILE, DCP_DIR = "model.safetensors", "state.pt", "config.json", "dcp"
LINEAGE_FILE = "lineage.json"
RUN_FILES = ("metrics.jsonl", "config.json", "wandb_id.txt")  # the run directory's own, moved aside on a fresh start


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used as it is: names the path, what is wrong, and what to do."""


class NonFiniteWeightsError(CheckpointError):
    """The model to be saved holds inf or NaN: such a checkpoint is never written."""


def step_dirs(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first."""
    if not root.is_dir():
        return []
    dirs = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_") and p.name[5:].isdigit()]
    return sorted(dirs, key=step_of)


def step_of(ckpt: Path) -> int:
    return int(Path(ckpt).name[5:])


def new_lineage() -> str:
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{os.urandom(4).hex()}"


def lineage_of(ckpt: Path) -> str | None:
    """The lineage recorded in a checkpoint, or None (none recorded, or unreadable)."""
    try:
        return json.loads((Path(ckpt) / LINEAGE_FILE).read_text())["lineage"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


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
    gathered = ((name, parallel.full_tensor(t.detach())) for name, t in tensors)  # lazily: one full tensor at a time
    if write:
        write_safetensors(path, {name: (tuple(t.shape), t.dtype) for name, t in tensors}, gathered)
    else:
        for _ in gathered:  # join every gather; another rank writes
            pass


def save_checkpoint(root: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    state: dict, config: TrainConfig, keep_last: int, d: parallel.Dist | None = None, *,
                    lineage: str) -> Path:
    """Write checkpoint `step` of `lineage` atomically, point `latest` at it, prune that lineage's older checkpoints
    to the newest `keep_last`. NonFiniteWeightsError, with nothing written, when a weight holds inf or NaN. With a
    sharded model (d.sharded) every rank must call this: the shards go through torch.distributed.checkpoint."""
    d = d or parallel.Dist()
    name = f"step_{step:06d}"
    if bad := non_finite(model, d):
        raise NonFiniteWeightsError(f"not saving checkpoint {name}: {len(bad)} weight tensors hold inf or NaN "
                                    f"({', '.join(bad[:4])}{', ...' if len(bad) > 4 else ''})")
    tmp, final = root / f".tmp-{name}", root / name
    if d.main:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-*"):  # left by a process killed mid-save (one job per run dir: the lock)
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
        _publish(root, tmp, final, saved, config, keep_last, lineage)
    parallel.barrier(d)
    return final


def non_finite(model: nn.Module, d: parallel.Dist | None = None) -> list[str]:
    """Names of the model's tensors that hold inf or NaN (a collective when sharded: every rank calls it)."""
    d = d or parallel.Dist()
    names, bad = [], []
    for name, t in model.state_dict().items():
        local = t.to_local() if isinstance(t, DTensor) else t
        names.append(name)
        bad.append(~torch.isfinite(local.detach()).all())
    if not names:
        return []
    counts = parallel.all_reduce_sum(d, torch.stack(bad).to(torch.int64))  # (n_tensors,) ranks holding a bad shard
    return [name for name, n in zip(names, counts.tolist()) if n]


def _publish(root: Path, tmp: Path, final: Path, saved: dict, config: TrainConfig, keep_last: int,
             lineage: str) -> None:
    """The rest of an atomic save, by one process: state, config and lineage, flush, rename, move `latest`, prune
    this lineage's older checkpoints."""
    torch.save(saved, tmp / STATE_FILE)
    (tmp / CONFIG_FILE).write_text(json.dumps(to_dict(config), indent=2))
    (tmp / LINEAGE_FILE).write_text(json.dumps({"lineage": lineage, "step": saved["step"]}) + "\n")
    fix_permissions(tmp)
    fsync_tree(tmp)
    if final.exists():  # plan_start moves aside what a run would write over: this is someone else's, keep it
        move_aside(root, [final])
    os.rename(tmp, final)
    fsync(root)
    _point_latest(root, final)
    ours = [p for p in step_dirs(root) if lineage_of(p) == lineage]  # oldest first; steps grow along a lineage
    for old in ours[:-max(1, keep_last)]:
        if old != final:
            shutil.rmtree(old, ignore_errors=True)


def _point_latest(root: Path, ckpt: Path) -> None:
    """Move `latest` to `ckpt` atomically: a new symlink renamed over the old one."""
    link = root / ".latest.tmp"
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(ckpt.name)
    os.replace(link, root / "latest")
    fsync(root)


def move_aside(root: Path, ckpts: list[Path], run_files: bool = False) -> Path:
    """Move checkpoints (and `latest`, when it names one of them or nothing) into a new root/old-<time>/, where a
    `latest` still resolves; with run_files, the run directory's metrics.jsonl, config.json and wandb id too.
    Nothing is deleted. Returns the directory they went to."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    dest, n = root / f"old-{stamp}", 1
    while dest.exists():
        n += 1
        dest = root / f"old-{stamp}-{n}"
    dest.mkdir(parents=True)
    names = {p.name for p in ckpts}
    for p in ckpts:
        os.rename(p, dest / p.name)
    latest = root / "latest"
    if latest.is_symlink() and (os.readlink(latest) in names or not latest.exists()):
        os.rename(latest, dest / "latest")
    for name in RUN_FILES if run_files else ():
        if (root.parent / name).exists():
            os.rename(root.parent / name, dest / name)
    fsync(root)
    return dest


def resolve(path: str | Path) -> Path:
    """A checkpoint directory from a run dir, a ckpt/ dir, `ckpt/latest` or `ckpt/step_N`."""
    p = Path(path)
    for candidate in (p, p / "latest", p / "ckpt" / "latest"):
        if (candidate / MODEL_FILE).is_file():
            if not (candidate / STATE_FILE).is_file() or not (candidate / CONFIG_FILE).is_file():
                raise FileNotFoundError(f"checkpoint {candidate} is incomplete: it needs {MODEL_FILE}, {STATE_FILE}, {CONFIG_FILE}")
            return candidate.resolve()
        if candidate.name == "latest" and candidate.is_symlink() and not candidate.exists():
            raise FileNotFoundError(f"{candidate} points to {os.readlink(candidate)}, which does not exist; "
                                    f"{_newest_intact_hint(candidate.parent)}")
    if not p.exists():
        raise FileNotFoundError(f"checkpoint path {p} does not exist")
    raise FileNotFoundError(f"no checkpoint found at {p} (looked for {MODEL_FILE} in it, in latest/ and ckpt/latest/)")


# ----------------------------------------------------------------------------- where a run starts


def plan_start(out_dir: Path, cfg: CkptConfig, act: bool = True) -> tuple[Path | None, str]:
    """(the checkpoint a run resumes from, or None to start from scratch; the lineage its checkpoints belong to),
    refusing with a CheckpointError what would lose or hide a checkpoint (see the module docstring): ckpt.resume_from
    if given, else ckpt/latest when ckpt.resume (which must then be intact), else nothing. act=False only reads (the
    other ranks under torchrun, after rank 0 has moved aside what had to move)."""
    root = Path(out_dir) / "ckpt"
    existing, latest = step_dirs(root), root / "latest"
    if cfg.resume_from:
        try:
            ckpt = resolve(cfg.resume_from)
        except FileNotFoundError as e:
            raise CheckpointError(f"--ckpt.resume_from={cfg.resume_from}: {e}") from None
        check_intact(ckpt)
    elif cfg.resume and (latest.is_symlink() or existing):
        ckpt = latest.resolve()
        if not latest.is_symlink():
            what = "is missing, but checkpoints are there"
        elif not latest.exists():
            what = f"points to {os.readlink(latest)}, which does not exist"
        else:
            what = (f"points to {ckpt.name}, whose " + broken) if (broken := problem(ckpt)) else None
        if what:
            good = intact(root)
            listing = ", ".join(p.name for p in good) or "none"
            todo = (f"to resume from the newest, add {resume_flags(root, good[0])}" if good else
                    "start over with a new --out_dir, or with --ckpt.resume=false --ckpt.move_aside=true")
            raise CheckpointError(f"cannot resume: {latest} {what}. Intact checkpoints in {root}: {listing}; "
                                  f"{todo} (--ckpt.move_aside moves the others into {root}/old-<time>/, deleting "
                                  f"nothing)")
    else:
        ckpt = None
    ours = ckpt is not None and ckpt.parent == root.resolve()
    in_the_way = [p for p in existing if step_of(p) > step_of(ckpt)] if ours else existing
    if in_the_way and not cfg.move_aside:
        names = ", ".join(p.name for p in in_the_way)
        if ours:
            why = f"resuming from {ckpt.name}, this run would write its steps after {step_of(ckpt)} over them"
        else:
            start = "from scratch" if ckpt is None else f"from {ckpt}, of another run directory,"
            why = f"this run starts {start} and its checkpoints would mix with them"
        also = "; or drop --ckpt.resume=false to continue the run they belong to" if not (cfg.resume or ours) else ""
        raise CheckpointError(f"{root} holds checkpoints ({names}): {why}. Give this run a new --out_dir, or pass "
                              f"--ckpt.move_aside=true to move them into {root}/old-<time>/ (nothing is "
                              f"deleted){also}")
    if in_the_way and act:
        dest = move_aside(root, in_the_way, run_files=not ours)
        if ours:
            _point_latest(root, ckpt)
            _keep_metrics_until(Path(out_dir) / RUN_FILES[0], dest, step_of(ckpt))
        print(f"moved {', '.join(p.name for p in in_the_way)} aside into {dest}")
    return ckpt, (lineage_of(ckpt) if ours else None) or new_lineage()


def _keep_metrics_until(metrics: Path, dest: Path, step: int) -> None:
    """A run resuming from an older checkpoint: its metrics.jsonl keeps the records up to `step` (the whole file
    goes to `dest` with the checkpoints moved aside)."""
    if not metrics.is_file():
        return
    shutil.copy2(metrics, dest / metrics.name)
    kept = [line for line in metrics.read_text().splitlines(keepends=True)
            if line.strip() and json.loads(line).get("step", 0) <= step]
    write_text_atomic(metrics, "".join(kept))


# ----------------------------------------------------------------------------- damaged checkpoints


ALL_FILES = (CONFIG_FILE, MODEL_FILE, STATE_FILE, DCP_DIR)


def problem(ckpt: Path, files: tuple[str, ...] = ALL_FILES) -> str | None:
    """What makes `ckpt` unusable (a missing or unreadable file, named), or None when it is intact; `files` limits the
    checks to what a reader needs (weights alone: CONFIG_FILE and MODEL_FILE). Cheap: it reads config.json, the
    safetensors header and state.pt's zip index, not the tensors."""
    for name in (CONFIG_FILE, MODEL_FILE, STATE_FILE):
        if name in files and not (ckpt / name).is_file():
            return f"{name} is missing"
    if CONFIG_FILE in files:
        try:
            from_dict(TrainConfig, json.loads((ckpt / CONFIG_FILE).read_text()))
        except (ValueError, TypeError, KeyError, AttributeError) as e:  # bad JSON or UTF-8, or not a TrainConfig
            return f"{CONFIG_FILE} is not a valid training config ({_brief(e)})"
    if MODEL_FILE in files:
        try:
            with safe_open(str(ckpt / MODEL_FILE), framework="pt", device="cpu"):
                pass
        except Exception as e:  # safetensors' SafetensorError: truncated, or not a safetensors file at all
            return f"{MODEL_FILE} is not a readable safetensors file ({e})"
    if STATE_FILE in files:
        try:
            zipfile.ZipFile(ckpt / STATE_FILE).close()
        except (zipfile.BadZipFile, OSError) as e:
            return f"{STATE_FILE} is not a torch.save archive ({e})"
    if DCP_DIR in files and (ckpt / DCP_DIR).is_dir() and not (ckpt / DCP_DIR / ".metadata").is_file():
        return f"{DCP_DIR}/.metadata is missing"
    return None


def intact(root: Path) -> list[Path]:
    """The intact checkpoints under `root`, newest first."""
    return [p for p in reversed(step_dirs(root)) if problem(p) is None]


def resume_flags(root: Path, ckpt: Path) -> str:
    """The train.py flags that resume from `ckpt` of `root` (moving any newer checkpoints aside)."""
    newer = [p.name for p in step_dirs(root) if step_of(p) > step_of(ckpt)]
    return f"--ckpt.resume_from={ckpt}" + (" --ckpt.move_aside=true" if newer else "")


def _newest_intact_hint(root: Path, but: Path | None = None) -> str:
    good = [p for p in intact(root) if but is None or p.resolve() != but.resolve()]
    if not good:
        return f"no intact checkpoint is left in {root}"
    return (f"the newest intact checkpoint is {good[0]}: use it instead (eval.py, generate.py, merge.py: --ckpt "
            f"{good[0]}; train.py resumes from it with {resume_flags(root, good[0])})")


def _brief(e: BaseException) -> str:
    """An exception as one short line (torch.load's unpickler errors run to a page of advice that does not apply)."""
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {first[:200]}"


def damaged(ckpt: Path, what: str) -> CheckpointError:
    return CheckpointError(f"checkpoint {ckpt} is damaged: {what}; {_newest_intact_hint(ckpt.parent, but=ckpt)}")


def check_intact(ckpt: Path, files: tuple[str, ...] = ALL_FILES) -> None:
    """CheckpointError naming the file and what is wrong, and the newest intact checkpoint, unless `ckpt` is intact
    (as far as `files` go: see problem)."""
    if (what := problem(ckpt, files)) is not None:
        raise damaged(ckpt, what)


def load_state(ckpt: Path) -> dict:
    try:
        return torch.load(ckpt / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as e:  # whatever the unpickler or the zip reader meets in a damaged file
        raise damaged(ckpt, f"{STATE_FILE} cannot be read ({_brief(e)})") from None


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
    check_intact(ckpt)
    state = load_state(ckpt)
    if (ckpt / DCP_DIR).is_dir():
        check_weights_fit(model, ckpt / MODEL_FILE)  # a clear error before DCP's own
        model_state, optim_state = get_state_dict(model, optimizer)
        try:
            dcp.load({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(ckpt / DCP_DIR))
        except Exception as e:  # DCP's CheckpointException gathers every rank's: each rank raises the same
            raise damaged(ckpt, f"{DCP_DIR}/ cannot be read ({_brief(e)})") from None
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
    check_intact(ckpt, files=(CONFIG_FILE, MODEL_FILE))  # what this reads; a damaged state.pt does not matter here
    config = load_config(ckpt)
    config.model = dataclasses.replace(config.model, **{k: v for k, v in overrides.items() if v is not None})
    config.model.validate()
    model = build_model(config.model)
    model.to_empty(device=device)
    load_safetensors(model, [str(ckpt / MODEL_FILE)])
    model.eval()
    return model, config
