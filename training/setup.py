"""The setup half of a training run, shared by every loop (train.py's, and GRPO's), so that none copies it:

    cfg = parse_cli(argv); dist = parallel.init_distributed(...)
    resolve_model(cfg, argv)                          # init_from -> the pretrained model's shape and tokenizer
    resume_from, lineage = plan_start(cfg, dist)      # ckpt/latest, ckpt.resume_from or scratch (rank 0 decides)
    ... the loop's own data ...
    built = build(cfg, dist, resume_from, log)       # model on meta -> sharded -> weights; optimizer; resume state
    run_info, logger = open_run(cfg, dist, argv)      # config.json, metrics.jsonl (and wandb) on rank 0

Each step stops with a one-line SystemExit that names the problem and the fix, as train.py always did.
"""

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from data.assets import resolve_model_source
from model import build_model
from model.files import write_text_atomic
from model.hf import config_from_pretrained, load_pretrained_weights, resolve_model_dir
from model.weights import WeightMismatchError
from training import checkpoint, job, parallel
from training.config import ConfigError, TrainConfig, reapply_model_overrides, to_dict
from training.device import autocast_context
from training.logger import Logger
from training.optim import build_optimizer


def git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True).stdout
        return sha + ("-dirty" if dirty.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def resolve_model(cfg: TrainConfig, argv: list[str]) -> None:
    """With init_from: a known name ("smollm2") becomes its local file, cfg.model becomes the pretrained model's own
    shape (with init_rope_theta / init_max_seq_len and the command line's --model.* keys applied, or refused), and
    data.tokenizer "auto" becomes the model's own tokenizer (else gpt2)."""
    try:
        cfg.init_from = resolve_model_source(cfg.init_from)
    except (FileNotFoundError, RuntimeError) as e:
        raise SystemExit(f"config error: init_from: {e}") from None
    if cfg.init_from:
        cfg.model = config_from_pretrained(cfg.init_from, rope_theta=cfg.init_rope_theta or None,
                                           max_seq_len=cfg.init_max_seq_len or None,
                                           attn_backend=cfg.model.attn_backend)
        try:
            reapply_model_overrides(cfg, argv)
            cfg.validate()
        except ConfigError as e:
            raise SystemExit(f"config error: {e}") from None
    if cfg.data.tokenizer == "auto":
        cfg.data.tokenizer = str(resolve_model_dir(cfg.init_from)) if cfg.init_from else "gpt2"


def plan_start(cfg: TrainConfig, dist: parallel.Dist) -> tuple[Path | None, str]:
    """(checkpoint to resume from or None, lineage id), decided by rank 0 before anything is loaded
    (training/checkpoint.plan_start); refusals are one-line exits."""
    try:
        return job.rank0_first(dist, lambda main: checkpoint.plan_start(Path(cfg.out_dir), cfg.ckpt, act=main))
    except checkpoint.CheckpointError as e:
        raise SystemExit(str(e)) from None


def fit_vocab(cfg: TrainConfig, vocab_size: int, added_tokens: list[dict], log) -> None:
    """Make room in the model for a tokenizer of `vocab_size` ids. added_tokens: the special tokens the data
    preparation appended to the tokenizer (a chat template's, data.add_missing_tokens). With init_from the embedding
    (and an untied head) grows to vocab_size rows when the tokenizer outgrew it, the new rows starting at the mean
    of the pretrained ones (build()); otherwise a too-small model.vocab_size is an error naming the fix."""
    if vocab_size <= cfg.model.vocab_size:
        return
    if cfg.init_from and added_tokens:
        log(f"model: vocabulary grows from {cfg.model.vocab_size} to {vocab_size} rows for "
            f"{', '.join(t['content'] for t in added_tokens)} (new rows start at the mean of the others)")
        cfg.model.vocab_size = vocab_size
        return
    raise SystemExit(f"tokenizer {cfg.data.tokenizer!r} has {vocab_size} ids but model.vocab_size is "
                     f"{cfg.model.vocab_size}; set --model.vocab_size to at least {vocab_size} "
                     f"(a multiple of 64, e.g. {-(-vocab_size // 64) * 64}, is fastest)")


@dataclass
class Built:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    step: int  # the step training continues from
    state: dict | None  # the resumed checkpoint's state (data position, ...), None on a fresh start


def build(cfg: TrainConfig, dist: parallel.Dist, resume_from: Path | None, log) -> Built:
    """The model, built on the meta device, wrapped (activation checkpointing; FSDP2 shards under torchrun), then
    materialised and filled: from the checkpoint being resumed (with the optimizer and the RNG state), from
    init_from's weights, or by init_weights(); each rank holds only its shards throughout."""
    device = dist.device
    model = build_model(cfg.model)
    p = cfg.parallel
    parallel.apply_activation_checkpointing(model, p.activation_checkpointing, p.ac_every)
    if dist.sharded:
        autocast = autocast_context(cfg.dtype, device)
        bf16 = p.param_dtype == "bf16" or (p.param_dtype == "auto" and isinstance(autocast, torch.autocast))
        parallel.parallelize(model, dist, torch.bfloat16 if bf16 else torch.float32, parallel.DTYPES[p.reduce_dtype],
                             p.reshard_after_forward)
    model.to_empty(device=device)
    optimizer = build_optimizer(model, cfg.optim, device)
    step, state = 0, None
    if resume_from is not None:
        try:
            state = checkpoint.load_training_state(resume_from, model, optimizer, dist)
        except WeightMismatchError as e:
            raise SystemExit(f"cannot resume from {resume_from}: its weights do not fit this config's model.\n{e}\n"
                             f"resume with the config it was trained with, or train this one in a new --out_dir "
                             f"(or here with --ckpt.resume=false --ckpt.move_aside=true, which moves the old "
                             f"checkpoints aside)") from None
        except checkpoint.CheckpointError as e:
            raise SystemExit(str(e)) from None
        checkpoint.set_rng_state(state["rng"])
        step = state["step"]
        log(f"resumed from {resume_from} at step {step}")
    elif cfg.init_from:
        load_pretrained_weights(model, cfg.init_from, copy=parallel.copy_into_shard, grow_vocab=True)
        log(f"model: weights from {cfg.init_from}")
    else:
        # sharded on CPU, DTensor draws each shard from the local generator: a seed per rank keeps shards distinct
        torch.manual_seed(cfg.seed + (dist.rank if dist.sharded and device.type == "cpu" else 0))
        model.init_weights()
    log(f"model: {model.num_params() / 1e6:.2f}M parameters ({model.num_params(non_embedding=True) / 1e6:.2f}M "
        f"non-embedding), device {device}, autocast {cfg.dtype}"
        + (f", FSDP2 over {dist.world_size} processes" if dist.sharded else ""))
    return Built(model, optimizer, step, state)


def open_run(cfg: TrainConfig, dist: parallel.Dist, argv: list[str], script: str = "train.py",
             **extra) -> tuple[dict, Logger | None]:
    """The run's record: config.json (the resolved config, the git commit, the command, the world size and `extra`)
    written atomically by rank 0, and rank 0's Logger (metrics.jsonl, wandb when configured); None elsewhere."""
    run_info = {**to_dict(cfg), "git_commit": git_commit(), "command": " ".join([sys.executable, script, *argv]),
                "world_size": dist.world_size, **extra}
    if not dist.main:
        return run_info, None
    write_text_atomic(Path(cfg.out_dir) / "config.json", json.dumps(run_info, indent=2))
    return run_info, Logger(cfg.out_dir, run_info, cfg.log.wandb_project, cfg.log.wandb_run)
