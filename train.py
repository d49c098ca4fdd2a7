"""Train a language model: config -> data -> model -> steps -> checkpoints.

    python train.py configs/pretrain_shakespeare.py --max_steps=200 --optim.lr=1e-3
    python train.py configs/debug.py --help          # every config key with its value
    torchrun --nproc_per_node=8 train.py configs/pretrain_slimpajama.py     # FSDP2 over 8 GPUs (training/parallel.py)

Re-running the same command resumes from out_dir/ckpt/latest, on any number of processes. Read top to bottom:
setup, then the loop. Under torchrun every rank runs this same code on its slice of each global batch; rank 0
alone prints, logs and writes shared files.

One job per out_dir: a second train.py on it exits at once, naming the first. SIGTERM or SIGINT (Ctrl-C) finishes
the current step, writes a checkpoint and exits with status 128 + signal (143, 130), and the same command resumes
exactly (training/job.py). A run never starts over silently or beside another run's checkpoints (ckpt.resume_from,
ckpt.move_aside: training/checkpoint.py), and never saves weights that hold inf or NaN.
"""

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import torch

from data.assets import resolve_model_source
from data.loader import TokenLoader
from data.prepare import default_shard_dir, ensure_prepared, wait_for_prepared
from data.tokenizer import load_tokenizer
from model import build_model
from model.hf import config_from_pretrained, load_pretrained_weights, resolve_model_dir
from model.files import write_text_atomic
from model.moe import expert_load
from model.weights import WeightMismatchError
from training import checkpoint, job, parallel
from training.config import ConfigError, TrainConfig, parse_cli, reapply_model_overrides, to_dict
from training.device import autocast_context, pick_device
from training.evaluation import evaluate
from training.generation import sample
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
        with job.RunLock(cfg.out_dir, dist), job.GracefulStop() as stop:  # one job per out_dir; a clean SIGTERM
            result = train(cfg, dist, argv, stop)
    except BaseException:
        parallel.shutdown(dist, clean=False)  # the other ranks fail on their own; torchrun stops them
        raise
    parallel.shutdown(dist)  # every rank finished: leave together (see parallel.shutdown)
    return result


def train(cfg: TrainConfig, dist: parallel.Dist, argv: list[str], stop: job.GracefulStop) -> dict:
    device = dist.device
    log = print if dist.main else (lambda *args, **kwargs: None)  # one console for the whole job
    autocast = autocast_context(cfg.dtype, device)
    out_dir, ckpt_root = Path(cfg.out_dir), Path(cfg.out_dir) / "ckpt"
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        cfg.init_from = resolve_model_source(cfg.init_from)  # a known name ("smollm2") becomes its local file
    except (FileNotFoundError, RuntimeError) as e:
        raise SystemExit(f"config error: init_from: {e}") from None
    if cfg.init_from:  # the pretrained model's own shape (and, with tokenizer "auto", its own tokenizer)
        cfg.model = config_from_pretrained(cfg.init_from, rope_theta=cfg.init_rope_theta or None,
                                           max_seq_len=cfg.init_max_seq_len or None,
                                           attn_backend=cfg.model.attn_backend)
        try:
            reapply_model_overrides(cfg, argv)  # the command line's --model.* keys: applied to that shape, or refused
            cfg.validate()
        except ConfigError as e:
            raise SystemExit(f"config error: {e}") from None
    if cfg.data.tokenizer == "auto":
        cfg.data.tokenizer = str(resolve_model_dir(cfg.init_from)) if cfg.init_from else "gpt2"
    # where the run starts (ckpt/latest, ckpt.resume_from, or scratch), decided by rank 0 before anything is loaded
    try:
        resume_from, lineage = job.rank0_first(dist, lambda main: checkpoint.plan_start(out_dir, cfg.ckpt, act=main))
    except checkpoint.CheckpointError as e:
        raise SystemExit(str(e)) from None

    # ---- data: token shards (prepared on first use, by rank 0), a shuffled train stream and a sequential val
    # stream; each rank reads its batch_size / world_size rows of every global batch
    d = cfg.data
    if d.batch_size % dist.world_size:
        raise SystemExit(f"data.batch_size={d.batch_size} (the global batch) must be a multiple of the "
                         f"{dist.world_size} processes; set --data.batch_size to a multiple of {dist.world_size}")
    shard_dir = d.shard_dir or default_shard_dir(d.corpus, d.files, d.tokenizer, d.val_fraction, d.text_key)
    shard_args = dict(tokenizer=d.tokenizer, files=d.files, val_fraction=d.val_fraction, text_key=d.text_key,
                      skip_bad_files=d.skip_bad_files)
    if dist.main:  # rank 0 prepares them; the others poll with no collective, so this may outlast parallel.timeout_s
        meta = ensure_prepared(d.corpus, shard_dir, workers=d.prepare_workers, **shard_args)
    else:
        meta = wait_for_prepared(d.corpus, shard_dir, **shard_args)
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
    step, last_saved = 0, resume_from  # the newest good checkpoint of this run, named when it stops
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
        train_data.load_state_dict(state["data"])
        checkpoint.set_rng_state(state["rng"])
        step = state["step"]
        log(f"resumed from {resume_from} at step {step}")
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
        write_text_atomic(out_dir / "config.json", json.dumps(run_info, indent=2))
    logger = Logger(cfg.out_dir, run_info, cfg.log.wandb_project, cfg.log.wandb_run) if dist.main else None
    fwd = torch.compile(model) if cfg.compile else model

    # ---- the loop
    tokens_per_step = d.batch_size * d.seq_len * d.grad_accum
    flops_per_step = model.flops_per_token(d.seq_len) * tokens_per_step
    peak = peak_flops(device)
    peak = peak * dist.world_size if peak else None  # the whole job's
    params = [p for p in model.parameters() if p.requires_grad]
    clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
    skipped, last, saved_step = 0, {}, step
    start_step, t_window, steps_in_window, t_start = step, time.perf_counter(), 0, time.perf_counter()

    def run_eval() -> dict:
        with autocast:
            r = {"step": step, **evaluate(fwd, val_data, cfg.eval.batches, device,
                                          reduce=lambda t: parallel.all_reduce_sum(dist, t))}
        if dist.main:
            logger.write(r)
            print(logger.eval_line(r))
        return r

    def good() -> str:
        return f"the last good checkpoint is {last_saved}" if last_saved else "no checkpoint yet"

    def save() -> None:
        nonlocal last_saved, saved_step
        try:
            last_saved = checkpoint.save_checkpoint(ckpt_root, step, model, optimizer,
                                                    {"data": train_data.state_dict()}, cfg, cfg.ckpt.keep_last, dist,
                                                    lineage=lineage)
        except checkpoint.NonFiniteWeightsError as e:  # finite losses until now, but the update overflowed
            raise SystemExit(f"stopping at step {step}: {e}; {good()}. Lower --optim.lr or raise "
                             f"--schedule.warmup_steps") from None
        saved_step = step
        log(f"saved checkpoint {last_saved}")

    stop.arm()  # from here on, SIGTERM / SIGINT end the loop after the current step
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
            if cfg.on_nan == "stop":
                raise SystemExit(f"stopping: {where}; {good()}. Lower --optim.lr, raise --schedule.warmup_steps or "
                                 f"check the data; --on_nan=skip skips such steps instead")
            skipped += 1
            optimizer.zero_grad(set_to_none=True)
            log(f"skipping step: {where} ({skipped} in a row)")
            if skipped > cfg.max_skipped_steps:
                raise SystemExit(f"stopping: {skipped} consecutive non-finite steps; {good()}")
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
        if stop.requested(dist):  # every rank agrees, so they save the same checkpoint together
            break

    if stop.signum:
        if saved_step != step:
            save()
        log(f"stopped by {stop.name} after step {step}: {good()}; run the same command again to resume")
        if dist.main:
            logger.close()
        raise SystemExit(128 + stop.signum)
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
