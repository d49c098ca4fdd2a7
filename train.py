"""Train a language model: config -> data -> model -> steps -> checkpoints.

    python train.py configs/pretrain_shakespeare.py --max_steps=200 --optim.lr=1e-3
    python train.py configs/debug.py --help          # every config key with its value

Re-running the same command resumes from out_dir/ckpt/latest. Read top to bottom: setup, then the loop.
"""

import json
import math
import os
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
from model.weights import WeightMismatchError, load_safetensors
from training import checkpoint
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
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise SystemExit("train.py runs on one process for now: use torchrun --nproc_per_node=1 "
                         "(sharded FSDP2 training arrives with the distributed-training issue)")
    device = pick_device(cfg.device)
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

    # ---- data: token shards (prepared on first use), a shuffled train stream and a sequential val stream
    d = cfg.data
    shard_dir = d.shard_dir or default_shard_dir(d.corpus, d.files, d.tokenizer, d.val_fraction, d.text_key)
    meta = ensure_prepared(d.corpus, shard_dir, tokenizer=d.tokenizer, files=d.files, val_fraction=d.val_fraction,
                           text_key=d.text_key, workers=d.prepare_workers)
    if meta["vocab_size"] > cfg.model.vocab_size:
        raise SystemExit(f"tokenizer {meta['tokenizer']!r} has {meta['vocab_size']} ids but model.vocab_size is "
                         f"{cfg.model.vocab_size}; set --model.vocab_size to at least {meta['vocab_size']} "
                         f"(a multiple of 64, e.g. {-(-meta['vocab_size'] // 64) * 64}, is fastest)")
    tokenizer = load_tokenizer(d.tokenizer)
    train_data = TokenLoader(shard_dir, "train", d.batch_size, d.seq_len, seed=cfg.seed)
    val_data = TokenLoader(shard_dir, "val", d.batch_size, d.seq_len, shuffle=False)
    if train_data.n_long_docs:
        print(f"data: {train_data.n_long_docs} training documents are longer than seq_len={d.seq_len} "
              f"and are split across windows")

    # ---- model: built on the meta device, then materialised and initialised (or filled from a checkpoint)
    model = build_model(cfg.model)
    model.to_empty(device=device)
    latest = ckpt_root / "latest"
    resume = cfg.ckpt.resume and latest.exists()
    if resume:
        ckpt = checkpoint.resolve(latest)
        try:
            load_safetensors(model, [str(ckpt / checkpoint.MODEL_FILE)])
        except WeightMismatchError as e:
            raise SystemExit(f"cannot resume from {ckpt}: its weights do not fit this config's model.\n{e}\n"
                             f"use a new --out_dir, or --ckpt.resume=false to start over in this one") from None
    elif cfg.init_from:
        load_pretrained_weights(model, cfg.init_from)
        print(f"model: weights from {cfg.init_from}")
    else:
        torch.manual_seed(cfg.seed)
        model.init_weights()
    optimizer = build_optimizer(model, cfg.optim, device)
    step = 0
    if resume:
        state = checkpoint.load_state(ckpt)
        optimizer.load_state_dict(state["optimizer"])
        train_data.load_state_dict(state["data"])
        checkpoint.set_rng_state(state["rng"])
        step = state["step"]
        print(f"resumed from {ckpt} at step {step}")
    n_params = model.num_params()
    print(f"model: {n_params / 1e6:.2f}M parameters ({model.num_params(non_embedding=True) / 1e6:.2f}M non-embedding), "
          f"device {device}, autocast {cfg.dtype}")
    run_info = {**to_dict(cfg), "git_commit": git_commit(), "command": " ".join([sys.executable, "train.py", *argv])}
    (out_dir / "config.json").write_text(json.dumps(run_info, indent=2))
    logger = Logger(cfg.out_dir, run_info, cfg.log.wandb_project, cfg.log.wandb_run)
    fwd = torch.compile(model) if cfg.compile else model

    # ---- the loop
    tokens_per_step = d.batch_size * d.seq_len * d.grad_accum
    flops_per_step = model.flops_per_token(d.seq_len) * tokens_per_step
    peak = peak_flops(device)
    params = [p for p in model.parameters() if p.requires_grad]
    clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
    skipped, last = 0, {}
    start_step, t_window, steps_in_window, t_start = step, time.perf_counter(), 0, time.perf_counter()

    def run_eval() -> dict:
        with autocast:
            r = {"step": step, **evaluate(fwd, val_data, cfg.eval.batches, device)}
        logger.write(r)
        print(logger.eval_line(r))
        return r

    def save() -> None:
        path = checkpoint.save_checkpoint(ckpt_root, step, model, optimizer, {"data": train_data.state_dict()},
                                          cfg, cfg.ckpt.keep_last)
        print(f"saved checkpoint {path}")

    model.train()
    while step < cfg.max_steps:
        lr = lr_at(step, cfg.optim.lr, cfg.max_steps, cfg.schedule)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batches = [train_data.next_batch() for _ in range(d.grad_accum)]
        n_learn = sum(int((y != -100).sum()) for _, y in batches)  # learnable tokens in the whole step
        loss_sum = torch.zeros((), device=device)
        for x, y in batches:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with autocast:
                out = fwd(x, labels=y)
            # the step's loss is a mean over all its tokens; router losses (MoE) are weighted by tokens too
            ((out.loss_sum + out.aux_loss * out.n_tokens) / max(n_learn, 1)).backward()
            loss_sum += out.loss_sum.detach()
        loss = (loss_sum / max(n_learn, 1)).item()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, clip).item()

        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            what = "loss" if not math.isfinite(loss) else "gradient norm"
            where = f"non-finite {what} at step {step + 1} (loss {loss}, grad norm {grad_norm})"
            good = f"the last good checkpoint is {latest.resolve()}" if latest.exists() else "no checkpoint yet"
            if cfg.on_nan == "stop":
                raise SystemExit(f"stopping: {where}; {good}. Lower --optim.lr, raise --schedule.warmup_steps or "
                                 f"check the data; --on_nan=skip skips such steps instead")
            skipped += 1
            optimizer.zero_grad(set_to_none=True)
            print(f"skipping step: {where} ({skipped} in a row)")
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
            logger.write(r)
            print(logger.train_line(r, cfg.max_steps, eta), flush=True)
            t_window, steps_in_window, last = now, 0, r
        t_side = time.perf_counter()  # evaluation, samples and checkpoints are left out of tokens/s
        if cfg.eval.interval and step % cfg.eval.interval == 0 and step < cfg.max_steps:
            run_eval()
        if cfg.sample_every and step % cfg.sample_every == 0:
            print("sample:", sample(model, tokenizer, "\n", 48, device, seed=step))
        if cfg.ckpt.interval and step % cfg.ckpt.interval == 0 and step < cfg.max_steps:
            save()
        t_window += time.perf_counter() - t_side

    if step > start_step:  # a finished run re-launched has nothing left to do
        last.update(run_eval())
        save()
    else:
        print(f"run already complete at step {step}; nothing to do (raise --max_steps to train further)")
    logger.close()
    return last


if __name__ == "__main__":
    main(sys.argv[1:])
