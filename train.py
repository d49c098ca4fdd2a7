"""Train a language model: config -> data -> model -> steps -> checkpoints.

    python train.py configs/pretrain_shakespeare.py --max_steps=200 --optim.lr=1e-3
    python train.py configs/debug.py --help          # every config key with its value
    torchrun --nproc_per_node=8 train.py configs/pretrain_slimpajama.py     # FSDP2 over 8 GPUs (training/parallel.py)

Re-running the same command resumes from out_dir/ckpt/latest, on any number of processes. Read top to bottom:
setup, then the loop. Under torchrun every rank runs this same code on its slice of each global batch; rank 0
alone prints, logs and writes shared files.
"""

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import torch

from data.loader import TokenLoader
from data.prepare import default_shard_dir, ensure_prepared
from data.tokenizer import load_tokenizer
from generate import sample
from model import build_model
from model.hf import config_from_pretrained, load_pretrained_weights, resolve_model_dir
from model.moe import expert_load
from model.weights import WeightMismatchError
from training import checkpoint, parallel
from training.config import TrainConfig, parse_cli, to_dict
from training.device import autocast_context, pick_device
from training.evaluation import evaluate
from training.logger import Logger, peak_flops
from training.optim import build_optimizer
from training.schedule import lr_at


def git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True).stdout
        return sha + ("-dirty" if dirty.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: list[str]) -> dict:
    cfg: TrainConfig = parse_cli(argv)
    dist = parallel.init_distributed(pick_device(cfg.device), cfg.parallel.fsdp_single, cfg.parallel.timeout_s)
    try:
        return train(cfg, dist, argv)
    finally:
        parallel.shutdown(dist)


def train(cfg: TrainConfig, dist: parallel.Dist, argv: list[str]) -> dict:
    device = dist.device
    log = print if dist.main else (lambda *args, **kwargs: None)  # one console for the whole job
    autocast = autocast_context(cfg.dtype, device)
    out_dir, ckpt_root = Path(cfg.out_dir), Path(cfg.out_dir) / "ckpt"
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.init_from:  # the pretrained model's own shape (and, with tokenizer "auto", its own tokenizer)
        cfg.model = config_from_pretrained(cfg.init_from, rope_theta=cfg.init_rope_theta or None,
                                           max_seq_len=cfg.init_max_seq_len or None,
                                           attn_backend=cfg.model.attn_backend)
        cfg.validate()
    if cfg.data.tokenizer == "auto":
        cfg.data.tokenizer = str(resolve_model_dir(cfg.init_from)) if cfg.init_from else "gpt2"

    # ---- data: token shards (prepared on first use, by rank 0), a shuffled train stream and a sequential val
    # stream; each rank reads its batch_size / world_size rows of every global batch
    d = cfg.data
    if d.batch_size % dist.world_size:
        raise SystemExit(f"data.batch_size={d.batch_size} (the global batch) must be a multiple of the "
                         f"{dist.world_size} processes; set --data.batch_size to a multiple of {dist.world_size}")
    shard_dir = d.shard_dir or default_shard_dir(d.corpus, d.files, d.tokenizer, d.val_fraction, d.text_key)
    if not dist.main:
        parallel.barrier(dist)  # wait for rank 0 to prepare them; then ensure_prepared only reads meta.json
    meta = ensure_prepared(d.corpus, shard_dir, tokenizer=d.tokenizer, files=d.files, val_fraction=d.val_fraction,
                           text_key=d.text_key, workers=d.prepare_workers)
    if dist.main:
        parallel.barrier(dist)
    if meta["vocab_size"] > cfg.model.vocab_size:
        raise SystemExit(f"tokenizer {meta['tokenizer']!r} has {meta['vocab_size']} ids but model.vocab_size is "
                         f"{cfg.model.vocab_size}; set --model.vocab_size to at least {meta['vocab_size']} "
                         f"(a multiple of 64, e.g. {-(-meta['vocab_size'] // 64) * 64}, is fastest)")
    tokenizer = load_tokenizer(d.tokenizer)
    rows, ranks = d.batch_size // dist.world_size, dict(rank=dist.rank, world_size=dist.world_size)
    train_data = TokenLoader(shard_dir, "train", rows, d.seq_len, seed=cfg.seed, **ranks)
    val_data = TokenLoader(shard_dir, "val", rows, d.seq_len, shuffle=False, **ranks)
    if train_data.n_long_docs:
        log(f"data: {train_data.n_long_docs} training documents are longer than seq_len={d.seq_len} "
            f"and are split across windows")

    # ---- model: built on the meta device, wrapped (activation checkpointing; FSDP2 shards under torchrun), then
    # materialised and initialised or filled from a checkpoint, each rank holding only its shards
    model = build_model(cfg.model)
    p = cfg.parallel
    parallel.apply_activation_checkpointing(model, p.activation_checkpointing, p.ac_every)
    if dist.sharded:
        bf16 = p.param_dtype == "bf16" or (p.param_dtype == "auto" and isinstance(autocast, torch.autocast))
        parallel.parallelize(model, dist, torch.bfloat16 if bf16 else torch.float32, parallel.DTYPES[p.reduce_dtype],
                             p.reshard_after_forward)
    model.to_empty(device=device)
    optimizer = build_optimizer(model, cfg.optim, device)
    latest = ckpt_root / "latest"
    step = 0
    if cfg.ckpt.resume and latest.exists():
        ckpt = checkpoint.resolve(latest)
        try:
            state = checkpoint.load_training_state(ckpt, model, optimizer, dist)
        except WeightMismatchError as e:
            raise SystemExit(f"cannot resume from {ckpt}: its weights do not fit this config's model.\n{e}\n"
                             f"use a new --out_dir, or --ckpt.resume=false to start over in this one") from None
        train_data.load_state_dict(state["data"])
        checkpoint.set_rng_state(state["rng"])
        step = state["step"]
        log(f"resumed from {ckpt} at step {step}")
    elif cfg.init_from:
        load_pretrained_weights(model, cfg.init_from, copy=parallel.copy_into_shard)
        log(f"model: weights from {cfg.init_from}")
    else:
        # sharded on CPU, DTensor draws each shard from the local generator: a seed per rank keeps shards distinct
        torch.manual_seed(cfg.seed + (dist.rank if dist.sharded and device.type == "cpu" else 0))
        model.init_weights()
    n_params = model.num_params()
    log(f"model: {n_params / 1e6:.2f}M parameters ({model.num_params(non_embedding=True) / 1e6:.2f}M non-embedding), "
        f"device {device}, autocast {cfg.dtype}" + (f", FSDP2 over {dist.world_size} processes" if dist.sharded else ""))
    run_info = {**to_dict(cfg), "git_commit": git_commit(), "command": " ".join([sys.executable, "train.py", *argv]),
                "world_size": dist.world_size}
    if dist.main:
        (out_dir / "config.json").write_text(json.dumps(run_info, indent=2))
    logger = Logger(cfg.out_dir, run_info, cfg.log.wandb_project, cfg.log.wandb_run) if dist.main else None
    fwd = torch.compile(model) if cfg.compile else model

    # ---- the loop
    tokens_per_step = d.batch_size * d.seq_len * d.grad_accum
    flops_per_step = model.flops_per_token(d.seq_len) * tokens_per_step
    peak = peak_flops(device)
    peak = peak * dist.world_size if peak else None  # the whole job's
    params = [p for p in model.parameters() if p.requires_grad]
    clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
    skipped, last = 0, {}
    start_step, t_window, steps_in_window, t_start = step, time.perf_counter(), 0, time.perf_counter()

    def run_eval() -> dict:
        with autocast:
            r = {"step": step, **evaluate(fwd, val_data, cfg.eval.batches, device,
                                          reduce=lambda t: parallel.all_reduce_sum(dist, t))}
        if dist.main:
            logger.write(r)
            print(logger.eval_line(r))
        return r

    def save() -> None:
        path = checkpoint.save_checkpoint(ckpt_root, step, model, optimizer, {"data": train_data.state_dict()},
                                          cfg, cfg.ckpt.keep_last, dist)
        log(f"saved checkpoint {path}")

    model.train()
    while step < cfg.max_steps:
        lr = lr_at(step, cfg.optim.lr, cfg.max_steps, cfg.schedule)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batches = [train_data.next_batch() for _ in range(d.grad_accum)]
        n_local = torch.tensor(sum(int((y != -100).sum()) for _, y in batches), device=device)
        n_learn = int(parallel.all_reduce_sum(dist, n_local))  # learnable tokens in the whole step, all ranks
        loss_sum = torch.zeros((), device=device)
        for i, (x, y) in enumerate(batches):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            parallel.set_gradient_sync(model, dist, i == len(batches) - 1)  # reduce-scatter after the last only
            with autocast:
                out = fwd(x, labels=y)
            # the step's loss is a mean over all its tokens; router losses (MoE) are weighted by tokens too
            ((out.loss_sum + out.aux_loss * out.n_tokens) / max(n_learn, 1)).backward()
            loss_sum += out.loss_sum.detach()
        loss = (parallel.all_reduce_sum(dist, loss_sum) / max(n_learn, 1)).item()
        grad_norm = parallel.clip_grad_norm(params, clip)

        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            what = "loss" if not math.isfinite(loss) else "gradient norm"
            where = f"non-finite {what} at step {step + 1} (loss {loss}, grad norm {grad_norm})"
            good = f"the last good checkpoint is {latest.resolve()}" if latest.exists() else "no checkpoint yet"
            if cfg.on_nan == "stop":
                raise SystemExit(f"stopping: {where}; {good}. Lower --optim.lr, raise --schedule.warmup_steps or "
                                 f"check the data; --on_nan=skip skips such steps instead")
            skipped += 1
            optimizer.zero_grad(set_to_none=True)
            log(f"skipping step: {where} ({skipped} in a row)")
            if skipped > cfg.max_skipped_steps:
                raise SystemExit(f"stopping: {skipped} consecutive non-finite steps; {good}")
            continue  # the same step number runs again on the next batch
        skipped = 0
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        steps_in_window += 1

        if step % cfg.log.interval == 0 or step == cfg.max_steps:
            if device.type == "cuda":
                torch.cuda.synchronize()
            now = time.perf_counter()
            dt = (now - t_window) / steps_in_window
            rate = tokens_per_step / dt
            r = {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": step * tokens_per_step,
                 "tokens_per_s": rate}
            if peak:
                r["mfu"] = flops_per_step / dt / peak
            if (load := expert_load(model)) is not None:  # mixtures of experts: the busiest expert vs an even split
                r["expert_load"] = load
            eta = (now - t_start) / (step - start_step) * (cfg.max_steps - step)
            if dist.main:
                logger.write(r)
                print(logger.train_line(r, cfg.max_steps, eta), flush=True)
            t_window, steps_in_window, last = now, 0, r
        t_side = time.perf_counter()  # evaluation, samples and checkpoints are left out of tokens/s
        if cfg.eval.interval and step % cfg.eval.interval == 0 and step < cfg.max_steps:
            run_eval()
        if cfg.sample_every and step % cfg.sample_every == 0:
            log("sample:", sample(model, tokenizer, "\n", 48, device, seed=step))  # every rank: FSDP gathers
        if cfg.ckpt.interval and step % cfg.ckpt.interval == 0 and step < cfg.max_steps:
            save()
        t_window += time.perf_counter() - t_side

    if step > start_step:  # a finished run re-launched has nothing left to do
        last.update(run_eval())
        save()
    else:
        log(f"run already complete at step {step}; nothing to do (raise --max_steps to train further)")
    if dist.main:
        logger.close()
    return last


if __name__ == "__main__":
    main(sys.argv[1:])
