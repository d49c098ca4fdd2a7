"""Train a language model: config -> data -> model -> steps -> checkpoints.

    python train.py configs/pretrain_shakespeare.py --max_steps=200 --optim.lr=1e-3
    python train.py configs/sft_smollm2_gsm.py --data.corpus=my_chats.jsonl     # supervised fine-tuning (data.kind=sft)
    python train.py configs/debug.py --help          # every config key with its value
    torchrun --nproc_per_node=8 train.py configs/pretrain_slimpajama.py     # FSDP2 over 8 GPUs (training/parallel.py)

Pretraining reads windows of a token stream; SFT reads conversations with assistant-only labels packed into
micro-batches of data.max_tokens tokens. Both loaders yield model.batch.Batch, the one type the model takes; a
step's loss is the mean over every learnable token of the step on every rank.

Re-running the same command resumes from out_dir/ckpt/latest, on any number of processes. Read top to bottom:
setup, then the loop. Under torchrun every rank runs this same code on its slice of each global batch; rank 0
alone prints, logs and writes shared files.

One job per out_dir: a second train.py on it exits at once, naming the first. SIGTERM or SIGINT (Ctrl-C) finishes
the current step, writes a checkpoint and exits with status 128 + signal (143, 130), and the same command resumes
exactly (training/job.py). A run never starts over silently or beside another run's checkpoints (ckpt.resume_from,
ckpt.move_aside: training/checkpoint.py), and never saves weights that hold inf or NaN.
"""

import math
import shutil
import sys
import time
from pathlib import Path

import torch

from data.loader import TokenLoader
from data.prepare import default_shard_dir, ensure_prepared, wait_for_prepared
from data.tasks import TaskDataError
from data.tokenizer import load_tokenizer
from model.files import output_dir
from model.moe import expert_load
from training import checkpoint, job, parallel, setup
from training.config import TrainConfig, parse_cli, task_names
from training.device import autocast_context, pick_device
from training.evaluation import evaluate
from training.generation import sample
from training.logger import peak_flops
from training.schedule import lr_at
from training.tasks import read_task_data, run_task, scalar_metrics


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


def pretraining_data(cfg: TrainConfig, dist: parallel.Dist, log):
    """Token shards (prepared on first use, by rank 0), a shuffled train stream and a sequential val stream of
    (batch_size, seq_len) windows; each rank reads its batch_size / world_size rows of every global batch."""
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
    rows, ranks = d.batch_size // dist.world_size, dict(rank=dist.rank, world_size=dist.world_size)
    train_data = TokenLoader(shard_dir, "train", rows, d.seq_len, seed=cfg.seed, **ranks)
    val_data = TokenLoader(shard_dir, "val", rows, d.seq_len, shuffle=False, **ranks)
    if train_data.n_long_docs:
        log(f"data: {train_data.n_long_docs} training documents are longer than seq_len={d.seq_len} "
            f"and are split across windows")
    return train_data, val_data, meta["vocab_size"], [], d.seq_len


def sft_data(cfg: TrainConfig, dist: parallel.Dist, log):
    """Conversations tokenised once into SFT shards (data/sft.py: assistant-only labels, the chat template, special
    tokens added when the template needs them), packed into micro-batches of data.max_tokens tokens (data/packing.py:
    best-fit decreasing, one global plan split over ranks). data.tokenizer becomes the prepared tokenizer."""
    from data.packing import PackedLoader
    from data.sft import SFTShards, sft_shard_dir, prepare_sft, wait_for_sft

    d = cfg.data
    args = dict(tokenizer=d.tokenizer, template=d.chat_template, format=d.format, val_files=d.val_files,
                val_fraction=d.val_fraction, seed=cfg.seed, system_prompt=d.system_prompt or None,
                train_on=d.train_on, special_tokens_in_content=d.special_tokens_in_content,
                add_missing_tokens=d.add_missing_tokens, skip_bad_rows=d.skip_bad_rows)
    shard_dir = d.shard_dir or str(sft_shard_dir(d.corpus, **args))
    try:
        meta = prepare_sft(d.corpus, shard_dir, **args) if dist.main else wait_for_sft(d.corpus, shard_dir, **args)
    except ValueError as e:  # SFTDataError and friends: the message names the file, the row and the fix
        raise SystemExit(f"data error: {e}") from None
    prepared, run_tokenizer = Path(shard_dir) / "tokenizer", Path(cfg.out_dir) / "tokenizer"
    if dist.main and prepared.is_dir():  # the run keeps the tokenizer it trained with (template, added tokens)
        with output_dir(run_tokenizer, "tokenizer", overwrite=True) as tmp:
            shutil.copytree(prepared, tmp, dirs_exist_ok=True)
    parallel.barrier(dist)
    if prepared.is_dir():  # eval.py, generate.py and merge.py read it from the run's config
        cfg.data.tokenizer = str(run_tokenizer.resolve())
    cfg.data.shard_dir = shard_dir  # recorded in config.json: eval.py reads the held-out split from it
    train_set, val_set = SFTShards(shard_dir, "train"), SFTShards(shard_dir, "val")
    longest = int(train_set.lengths.max())
    if longest > cfg.model.max_seq_len and d.too_long != "truncate":
        log(f"data: the longest sample has {longest} tokens, more than the model's context "
            f"(max_seq_len={cfg.model.max_seq_len}); raise init_max_seq_len (and init_rope_theta) to train on it")
    ranks = dict(rank=dist.rank, world_size=dist.world_size, too_long=d.too_long, padded=d.padded)
    try:
        train_data = PackedLoader(train_set, d.max_tokens, seed=cfg.seed, **ranks)
        val_data = PackedLoader(val_set, d.max_tokens, shuffle=False, **ranks)
    except ValueError as e:  # a sample longer than the budget, with too_long="error"
        raise SystemExit(f"data error: {e}") from None
    log(f"data: {train_set.n_samples} training and {val_set.n_samples} held-out samples, "
        f"{train_set.n_learnable} learnable tokens ({meta.get('skipped') or 'none skipped'}); micro-batches of "
        f"{d.max_tokens} tokens" + (", padded rows" if d.padded else ", packed"))
    return train_data, val_data, meta["vocab_size"], meta.get("added_tokens", []), float(train_set.lengths.mean())


def train(cfg: TrainConfig, dist: parallel.Dist, argv: list[str], stop: job.GracefulStop) -> dict:
    device = dist.device
    log = print if dist.main else (lambda *args, **kwargs: None)  # one console for the whole job
    autocast = autocast_context(cfg.dtype, device)
    out_dir, ckpt_root = Path(cfg.out_dir), Path(cfg.out_dir) / "ckpt"
    out_dir.mkdir(parents=True, exist_ok=True)
    setup.resolve_model(cfg, argv)  # init_from: the pretrained model's shape and tokenizer
    resume_from, lineage = setup.plan_start(cfg, dist)  # ckpt/latest, ckpt.resume_from, or scratch

    # ---- data: pretraining windows or packed SFT samples; both loaders yield model.batch.Batch
    d = cfg.data
    make_data = sft_data if d.kind == "sft" else pretraining_data
    train_data, val_data, vocab_size, added_tokens, mean_len = make_data(cfg, dist, log)
    setup.fit_vocab(cfg, vocab_size, added_tokens, log)  # a chat template's new tokens grow the embedding
    tokenizer = load_tokenizer(d.tokenizer)
    if d.kind == "sft":  # chat-template tasks render in the template the run trains in
        tokenizer.chat_template_name = d.chat_template
    for name in task_names(cfg.eval.tasks):  # a task file that cannot be read stops the run now, not at its eval
        try:
            read_task_data(name, cfg.eval.task)
        except TaskDataError as e:
            raise SystemExit(f"eval.tasks: {e}") from None
    if cfg.epochs:  # the number of steps, known before the first one from the packing plans
        cfg.max_steps = train_data.total_steps(cfg.epochs, dist.world_size, d.grad_accum)
        log(f"data: {cfg.epochs} epochs = {cfg.max_steps} steps of {d.grad_accum} x {dist.world_size} micro-batches")

    # ---- model: built on the meta device, wrapped, materialised, filled (training/setup.py)
    built = setup.build(cfg, dist, resume_from, log)
    model, optimizer, step = built.model, built.optimizer, built.step
    last_saved, total_tokens = resume_from, 0  # the newest good checkpoint of this run, named when it stops
    if built.state is not None:
        train_data.load_state_dict(built.state["data"])
        total_tokens = built.state.get("tokens", step * d.batch_size * d.seq_len * d.grad_accum)
    _, logger = setup.open_run(cfg, dist, argv)  # config.json and metrics.jsonl (rank 0)
    fwd = torch.compile(model) if cfg.compile else model

    # ---- the loop
    flops_per_token = model.flops_per_token(round(mean_len))  # attention at the mean sample (window) length
    peak = peak_flops(device)
    peak = peak * dist.world_size if peak else None  # the whole job's
    params = [p for p in model.parameters() if p.requires_grad]
    clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
    skipped, last, saved_step = 0, {}, step
    start_step, t_window, t_start = step, time.perf_counter(), time.perf_counter()
    window_tokens, window_learned = 0, 0  # tokens (and learnable ones) of the steps since the last log line
    epoch_logged = getattr(train_data, "epoch", 0) - 1

    def run_eval() -> dict:
        with autocast:
            r = {"step": step, **evaluate(fwd, val_data, cfg.eval.batches, device,
                                          reduce=lambda t: parallel.all_reduce_sum(dist, t))}
            for name in task_names(cfg.eval.tasks):  # every rank runs the same questions: FSDP2 forwards are collective
                r.update(scalar_metrics(name, run_task(name, model, tokenizer, cfg.eval.task).metrics))
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
                                                    {"data": train_data.state_dict(), "tokens": total_tokens}, cfg,
                                                    cfg.ckpt.keep_last, dist,
                                                    lineage=lineage)
        except checkpoint.NonFiniteWeightsError as e:  # finite losses until now, but the update overflowed
            raise SystemExit(f"stopping at step {step}: {e}; {good()}. Lower --optim.lr or raise "
                             f"--schedule.warmup_steps") from None
        saved_step = step
        log(f"saved checkpoint {last_saved}")

    if cfg.eval.at_start and step == 0:
        run_eval()
    stop.arm()  # from here on, SIGTERM / SIGINT end the loop after the current step
    model.train()
    while step < cfg.max_steps:
        lr = lr_at(step, cfg.optim.lr, cfg.max_steps, cfg.schedule)
        for group in optimizer.param_groups:
            group["lr"] = lr
        if d.kind == "sft" and train_data.epoch != epoch_logged:  # packing efficiency, once per epoch
            epoch_logged = train_data.epoch
            log(f"data: epoch {epoch_logged}: {train_data.bins_in_epoch(epoch_logged)} micro-batches, packing "
                f"efficiency {100 * train_data.efficiency(epoch_logged):.1f}% of {d.max_tokens} tokens")
        batches = [train_data.next_batch() for _ in range(d.grad_accum)]
        counts = torch.tensor([sum(b.n_learnable() for b in batches), sum(b.input_ids.numel() for b in batches)])
        n_learn, n_input = (int(n) for n in parallel.all_reduce_sum(dist, counts.to(device)))  # the whole step's
        loss_sum = torch.zeros((), device=device)
        for i, batch in enumerate(batches):
            parallel.set_gradient_sync(model, dist, i == len(batches) - 1)  # reduce-scatter after the last only
            with autocast:
                out = fwd(batch.to(device))
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
        total_tokens += n_input
        window_tokens, window_learned = window_tokens + n_input, window_learned + n_learn

        if step % cfg.log.interval == 0 or step == cfg.max_steps:
            if device.type == "cuda":
                torch.cuda.synchronize()
            now = time.perf_counter()
            dt = now - t_window
            r = {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": total_tokens,
                 "tokens_per_s": window_tokens / dt, "learnable_tokens_per_s": window_learned / dt}
            if peak:
                r["mfu"] = flops_per_token * window_tokens / dt / peak
            if (load := expert_load(model)) is not None:  # mixtures of experts: the busiest expert vs an even split
                r["expert_load"] = load
            eta = (now - t_start) / (step - start_step) * (cfg.max_steps - step)
            if dist.main:
                logger.write(r)
                print(logger.train_line(r, cfg.max_steps, eta), flush=True)
            t_window, last, window_tokens, window_learned = now, r, 0, 0
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
