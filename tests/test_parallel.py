"""FSDP2 under torchrun (training/parallel.py) on CPU with gloo: 2 ranks against 1 process, resuming across world
sizes, export from a sharded run, and a rank that dies.

Every run starts from the same weights: a seed checkpoint (the debug model after init_weights, written as a
Hugging Face directory) loaded with --init_from, so that runs on 1 and 2 ranks can be compared step by step.
(Initialised from scratch, each rank draws its own shards: the same distribution, not the same numbers.)

Tolerances on the per-step losses (~10.8 falling to ~9.6) of 10 steps of configs/debug.py:
    fp32, 2 ranks vs 1 process                   1e-5 absolute (measured ~1e-6: sums in another order)
    bf16 FSDP parameters vs fp32                 5e-2 absolute: bf16 rounds weights and activations at 2^-8
                                                 relative; 10 steps of lr 3e-3 keep the curves within ~1e-2
Weights of runs on different world sizes: within 1e-4 absolute (WEIGHT_ATOL). The losses agree to ~1e-6, but
Adam divides each gradient entry by its own running RMS, so an entry whose gradient is ~1e-9 (the embedding row of
a token seen once) moves by up to lr = 3e-3 a step whatever its rounding noise: measured up to 6.5e-5 in 14 of the
3.2M weights after 10 steps. The export of a sharded run's checkpoint equals (torch.equal) the export of the same
weights loaded into one process.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import merge
import train
from configs.debug import config as debug_config
from model import build_model
from model.hf import save_pretrained
from training import checkpoint
from training.optim import build_optimizer

ROOT = Path(__file__).resolve().parents[1]
STEPS = ["--max_steps=10", "--log.interval=1", "--eval.interval=0", "--ckpt.interval=5"]
FP32_ATOL, BF16_ATOL, WEIGHT_ATOL = 1e-5, 5e-2, 1e-4


@pytest.fixture(scope="module")
def seed_dir(tmp_path_factory) -> Path:
    """The debug model, initialised once in one process, as an HF directory every run starts from."""
    torch.manual_seed(0)
    model = build_model(debug_config.model)
    model.to_empty(device="cpu")
    model.init_weights()
    return save_pretrained(model, tmp_path_factory.mktemp("seed") / "hf")


def common(seed_dir: Path) -> list[str]:
    return ["configs/debug.py", f"--init_from={seed_dir}", "--data.tokenizer=gpt2", *STEPS]


def torchrun(nproc: int, out_dir: Path, args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "train.py",
           *args, f"--out_dir={out_dir}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def single(out_dir: Path, args: list[str]) -> None:
    train.main([*args, f"--out_dir={out_dir}"])


def losses(out_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def assert_close_losses(a: dict, b: dict, atol: float, steps=range(1, 11)) -> None:
    worst = max(abs(a[s] - b[s]) for s in steps)
    assert worst <= atol, f"per-step losses differ by up to {worst:.2e} (allowed {atol:.0e})"


@pytest.fixture(scope="module")
def one_process(seed_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one")
    single(out, common(seed_dir))
    return out


@pytest.fixture(scope="module")
def two_ranks(seed_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("two")
    torchrun(2, out, common(seed_dir))
    return out


def test_two_ranks_train_as_one_process(one_process, two_ranks):
    assert sorted(losses(two_ranks)) == list(range(1, 11))
    assert_close_losses(losses(two_ranks), losses(one_process), FP32_ATOL)
    config = json.loads((two_ranks / "config.json").read_text())
    assert config["world_size"] == 2


@pytest.mark.parametrize("variant", [
    ["--data.grad_accum=2", "--data.batch_size=4"],
    ["--parallel.activation_checkpointing=full"],
    ["--parallel.activation_checkpointing=selective", "--parallel.ac_every=2", "--parallel.reshard_after_forward=false"],
], ids=["grad-accum", "ac-full", "ac-selective"])
def test_variants_on_two_ranks_train_as_one_process(variant, seed_dir, tmp_path):
    single(tmp_path / "one", [*common(seed_dir), *variant])
    torchrun(2, tmp_path / "two", [*common(seed_dir), *variant])
    assert_close_losses(losses(tmp_path / "two"), losses(tmp_path / "one"), FP32_ATOL)


def test_bf16_parameters_on_two_ranks(one_process, seed_dir, tmp_path):
    torchrun(2, tmp_path, [*common(seed_dir), "--parallel.param_dtype=bf16"])
    assert_close_losses(losses(tmp_path), losses(one_process), BF16_ATOL)


def interrupted_at_5(run_dir: Path, to: Path) -> Path:
    """A copy of a finished run as it was after checkpoint 5: the state a crash at step 6-9 leaves."""
    shutil.copytree(run_dir, to, symlinks=True)
    shutil.rmtree(to / "ckpt" / "step_000010")
    (to / "ckpt" / "latest").unlink()
    (to / "ckpt" / "latest").symlink_to("step_000005")
    return to


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(checkpoint.resolve(run_dir) / checkpoint.MODEL_FILE)


@pytest.mark.parametrize("saved_on, resumed_on", [(2, 1), (2, 2), (1, 2)])
def test_resume_on_another_world_size(saved_on, resumed_on, one_process, two_ranks, seed_dir, tmp_path):
    straight = two_ranks if saved_on == 2 else one_process
    run_dir = interrupted_at_5(straight, tmp_path / "run")
    if resumed_on == 1:
        single(run_dir, common(seed_dir))
    else:
        out = torchrun(resumed_on, run_dir, common(seed_dir))
        assert "resumed from" in out.stdout
    assert_close_losses(losses(run_dir), losses(straight), FP32_ATOL, steps=range(6, 11))
    ours, theirs = final_weights(run_dir), final_weights(straight)
    assert ours.keys() == theirs.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], atol=WEIGHT_ATOL, rtol=0, msg=name)


def test_export_of_a_sharded_run(one_process, two_ranks, tmp_path):
    """merge.py on a 2-rank checkpoint (its gathered model.safetensors) gives the tensors that the same weights,
    loaded from the DCP shards into one process, export to; and the single-process run's export within
    WEIGHT_ATOL."""
    sharded = Path(merge.main(["--ckpt", str(two_ranks), "--out", str(tmp_path / "sharded")]))
    ckpt = checkpoint.resolve(two_ranks)
    cfg = checkpoint.load_config(ckpt)
    model = build_model(cfg.model)
    model.to_empty(device="cpu")
    optimizer = build_optimizer(model, cfg.optim, torch.device("cpu"))
    checkpoint.load_training_state(ckpt, model, optimizer)  # the DCP shards, resharded to one process
    direct = save_pretrained(model, tmp_path / "direct")
    plain = Path(merge.main(["--ckpt", str(one_process), "--out", str(tmp_path / "plain")]))
    a, b, c = (load_file(d / "model.safetensors") for d in (sharded, direct, plain))
    assert a.keys() == b.keys() == c.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
        torch.testing.assert_close(a[name], c[name], atol=WEIGHT_ATOL, rtol=0, msg=name)


def worker_pids(launcher_pid: int) -> list[int]:
    """The processes torchrun started (children of any of its threads), oldest first."""
    tasks = Path(f"/proc/{launcher_pid}/task").iterdir()
    return sorted(int(p) for task in tasks for p in (task / "children").read_text().split())


def test_a_dead_rank_ends_the_job_and_the_checkpoint_loads(seed_dir, tmp_path):
    args = [*common(seed_dir), "--max_steps=100000", "--ckpt.interval=3", "--parallel.timeout_s=30"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py", *args,
           f"--out_dir={tmp_path}"]
    launcher = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 180
        while not (tmp_path / "ckpt" / "latest").exists():  # wait for a first complete checkpoint
            assert launcher.poll() is None and time.monotonic() < deadline, "no checkpoint was written"
            time.sleep(0.5)
        victim = worker_pids(launcher.pid)[-1]
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        output, _ = launcher.communicate(timeout=120)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    took = time.monotonic() - killed_at
    assert launcher.returncode != 0
    # torchrun's report names the rank that died first and how
    assert "train.py FAILED" in output and "Root Cause" in output and "SIGKILL" in output, output[-3000:]
    assert took < 90, f"the job took {took:.0f} s to end after a rank died"
    ckpt = checkpoint.resolve(tmp_path)  # the last complete checkpoint
    checkpoint.load_model(tmp_path)
    step = checkpoint.load_state(ckpt)["step"]
    assert step % 3 == 0
    again = torchrun(2, tmp_path, [*args, f"--max_steps={step + 1}"])  # the command again (bounded) resumes
    assert f"resumed from {ckpt} at step {step}" in again.stdout


@pytest.mark.parametrize("config_file", ["configs/debug_gemma2.py", "configs/debug_gpt_oss.py",
                                         "configs/debug_granite_moe.py"])
def test_every_family_on_two_ranks_trains_as_one_process(config_file, tmp_path):
    """Gemma2 (softcaps, windows, tied head), GPT-OSS (sinks, biases, experts) and GraniteMoE (experts) sharded
    expert by expert and row by row: 5 steps from the same seed weights."""
    from training.config import load_config

    torch.manual_seed(0)
    model = build_model(load_config(config_file, []).model)
    model.to_empty(device="cpu")
    model.init_weights()
    seed = save_pretrained(model, tmp_path / "seed")
    args = [config_file, f"--init_from={seed}", "--data.tokenizer=gpt2", "--max_steps=5", "--log.interval=1",
            "--eval.interval=0"]
    single(tmp_path / "one", args)
    torchrun(2, tmp_path / "two", args)
    assert_close_losses(losses(tmp_path / "two"), losses(tmp_path / "one"), FP32_ATOL, steps=range(1, 6))


def test_eval_tasks_on_two_ranks_give_the_one_process_numbers(seed_dir, tmp_path):
    """eval.tasks under FSDP2: every rank runs the same questions (generation and scoring forwards are collective),
    nothing hangs when rows finish at different steps, and the logged metrics equal one process's."""
    gsm, mmlu = tmp_path / "gsm.jsonl", tmp_path / "mmlu.jsonl"
    gsm.write_text("".join(json.dumps({"question": f"Tom has {i} pens and buys {i + 2}. How many now?",
                                       "answer": f"{i} + {i + 2} = {2 * i + 2}\n#### {2 * i + 2}"}) + "\n"
                           for i in range(5)))
    mmlu.write_text("".join(json.dumps({"subject": "anatomy", "question": f"Which number follows {i}?",
                                        "choices": [str(i - 1), str(i + 1), str(i), str(i + 2)], "answer": "B"}) + "\n"
                            for i in range(4)))
    args = [*common(seed_dir), "--max_steps=2", "--eval.interval=2", "--eval.batches=1", "--eval.tasks=gsm8k,mmlu",
            f"--eval.task.gsm8k_data={gsm}", f"--eval.task.mmlu_data={mmlu}", "--eval.task.max_new_tokens=12",
            "--eval.task.batch_size=2"]
    single(tmp_path / "one", args)
    torchrun(2, tmp_path / "two", args)

    def task_metrics(out_dir: Path) -> dict:
        records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
        (final,) = [r for r in records if "gsm8k_n" in r]
        return {k: v for k, v in final.items() if k.startswith(("gsm8k_", "mmlu_"))}

    one, two = task_metrics(tmp_path / "one"), task_metrics(tmp_path / "two")
    assert one["gsm8k_n"] == 5 and one["mmlu_n"] == 4
    assert one.keys() == two.keys()
    for k in one:
        assert two[k] == pytest.approx(one[k], abs=1e-6), k
