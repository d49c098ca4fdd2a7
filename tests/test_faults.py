"""The data-loss and silent paths found under fault testing (roadmap issue 1), one test (or a few) per item of the
report, each reproducing the fault with the command that showed it:

    2  pruning deletes the checkpoints a run has just written; a dangling `latest` restarts silently at step 0
    5  on_nan is bypassed: non-finite logits raise inside the loss, and non-finite weights are checkpointed
    6  two train.py on one out_dir interleave their files (a lock now turns the second away)
    7  SIGTERM saves nothing (now: finish the step, checkpoint, exit 143, resume exactly; under torchrun too)
    9  damaged checkpoint files give raw tracebacks (now: the file, what is wrong, the intact checkpoint to use)
    -  init_from silently drops --model.* overrides

Runs are the debug config shrunk (FAST) so that each takes seconds on two CPU cores.
"""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import eval as eval_script
import train
from configs.debug import config as debug_config
from model import build_model
from model.hf import save_pretrained
from training import checkpoint
from training.config import CkptConfig

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--data.batch_size=4", "--data.seq_len=32", "--eval.batches=1", "--log.interval=1"]


def run(out_dir, *args) -> dict:
    return train.main(["configs/debug.py", f"--out_dir={out_dir}", *FAST, *args])


def losses(out_dir) -> dict[int, float]:
    records = [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def names(root: Path) -> list[str]:
    return [p.name for p in checkpoint.step_dirs(root)]


def wait_for_steps(out_dir: Path, n: int, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    metrics = out_dir / "metrics.jsonl"
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= n):
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.monotonic() < deadline, f"no {n} steps logged in {timeout} s"
        time.sleep(0.2)


# ---------------------------------------------------------------------------------- 2: pruning and `latest`


def test_fresh_start_beside_checkpoints_is_refused_then_moved_aside(tmp_path, capsys):
    """The report's commands: a run, then `--ckpt.resume=false --max_steps=... --ckpt.interval=...` in the same
    out_dir pruned its own new checkpoints at once (pruning by step number kept the old run's newer ones) and left
    `latest` dangling. Now the fresh start is refused, naming them; with --ckpt.move_aside they are moved aside."""
    run(tmp_path, "--max_steps=6", "--ckpt.interval=3")
    root = tmp_path / "ckpt"
    assert names(root) == ["step_000003", "step_000006"]
    with pytest.raises(SystemExit, match=r"holds checkpoints \(step_000003, step_000006\).*from scratch.*"
                                         r"--out_dir.*--ckpt.move_aside=true.*nothing is deleted"):
        run(tmp_path, "--ckpt.resume=false", "--max_steps=4", "--ckpt.interval=2")
    assert names(root) == ["step_000003", "step_000006"] and (root / "latest").resolve().name == "step_000006"

    run(tmp_path, "--ckpt.resume=false", "--ckpt.move_aside=true", "--max_steps=4", "--ckpt.interval=2")
    assert names(root) == ["step_000002", "step_000004"]
    assert checkpoint.resolve(tmp_path).name == "step_000004"
    assert sorted(losses(tmp_path)) == [1, 2, 3, 4]  # the old run's metrics went with its checkpoints
    (old,) = root.glob("old-*")
    assert names(old) == ["step_000003", "step_000006"] and (old / "metrics.jsonl").is_file()
    assert checkpoint.resolve(old).name == "step_000006"  # its `latest` went along and still resolves
    checkpoint.load_model(old / "step_000003")
    assert "moved step_000003, step_000006 aside" in capsys.readouterr().out


def test_pruning_keeps_latest_and_other_lineages_checkpoints(tmp_path):
    """Pruning by step number deleted a checkpoint right after writing it when a newer-numbered one (another run's)
    was there, leaving `latest` dangling. Now only the run's own lineage is pruned."""
    model = build_model(debug_config.model)
    model.to_empty(device="cpu")
    model.init_weights()
    optimizer = torch.optim.AdamW(model.parameters())
    root = tmp_path / "ckpt"
    checkpoint.save_checkpoint(root, 100, model, optimizer, {}, debug_config, 1, lineage="theirs")
    for step in (1, 2, 3):
        path = checkpoint.save_checkpoint(root, step, model, optimizer, {}, debug_config, 1, lineage="ours")
        assert (root / "latest").resolve() == path.resolve()  # never dangling
    assert names(root) == ["step_000003", "step_000100"]  # ours pruned to keep_last=1; theirs untouched
    assert checkpoint.lineage_of(root / "step_000003") == "ours"


def test_dangling_or_broken_latest_is_an_error_naming_intact_checkpoints(tmp_path):
    """A `latest` pointing at nothing restarted the run silently at step 0, over the intact checkpoints."""
    run(tmp_path, "--max_steps=4", "--ckpt.interval=2")
    root = tmp_path / "ckpt"
    shutil.rmtree(root / "step_000004")
    good = root / "step_000002"
    with pytest.raises(SystemExit, match=rf"latest points to step_000004, which does not exist.*Intact checkpoints in "
                                         rf".*: step_000002.*--ckpt.resume_from={good}"):
        run(tmp_path, "--max_steps=6", "--ckpt.interval=2")
    (root / "latest").unlink()  # no `latest` at all, checkpoints there: the same
    with pytest.raises(SystemExit, match=rf"latest is missing.*step_000002.*--ckpt.resume_from={good}"):
        run(tmp_path, "--max_steps=6", "--ckpt.interval=2")
    assert names(root) == ["step_000002"]
    run(tmp_path, "--max_steps=6", "--ckpt.interval=2", f"--ckpt.resume_from={good}")
    assert names(root) == ["step_000004", "step_000006"] and checkpoint.resolve(tmp_path).name == "step_000006"


def test_resume_from_an_older_checkpoint_moves_newer_ones_aside(tmp_path):
    """--ckpt.resume_from an older checkpoint would write its steps over the newer ones: refused, or with
    --ckpt.move_aside they are moved aside (and metrics.jsonl keeps the records up to the resumed step)."""
    run(tmp_path, "--max_steps=6", "--ckpt.interval=2", "--ckpt.keep_last=3")
    root = tmp_path / "ckpt"
    older = root / "step_000002"
    with pytest.raises(SystemExit, match=r"holds checkpoints \(step_000004, step_000006\): resuming from step_000002"):
        run(tmp_path, "--max_steps=6", "--ckpt.interval=2", f"--ckpt.resume_from={older}")
    plan = checkpoint.plan_start(tmp_path, CkptConfig(resume_from=str(older), move_aside=True), act=False)
    assert plan[0] == older.resolve() and names(root) == ["step_000002", "step_000004", "step_000006"]  # only read
    run(tmp_path, "--max_steps=6", "--ckpt.interval=2", "--ckpt.keep_last=3", f"--ckpt.resume_from={older}",
        "--ckpt.move_aside=true")
    assert names(root) == ["step_000002", "step_000004", "step_000006"]
    (old,) = root.glob("old-*")
    assert names(old) == ["step_000004", "step_000006"]
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps)  # no stale records of the abandoned steps 3..6


# ---------------------------------------------------------------------------------- 5: on_nan on every loss path


def test_diverging_run_with_on_nan_skip_is_handled(tmp_path):
    """The report's command: `--optim.lr=1e4 --on_nan=skip` ended in a ValueError from the loss's row check."""
    with pytest.raises(SystemExit, match=r"stopping: 3 consecutive non-finite steps; the last good checkpoint is "
                                         r".*step_0000\d\d"):
        train.main(["configs/debug.py", f"--out_dir={tmp_path}", "--optim.lr=1e4", "--on_nan=skip",
                    "--max_skipped_steps=2", "--ckpt.interval=2", "--eval.batches=1", "--max_steps=40"])
    model, _ = checkpoint.load_model(tmp_path)  # the checkpoint it leaves loads, is finite, and evaluates
    assert all(torch.isfinite(p).all() for p in model.parameters())
    r = eval_script.main(["--ckpt", str(tmp_path), "--task", "ppl", "--batches", "1"])
    assert math.isfinite(r["loss"])


LOSS_PATHS = {
    "fused-torch": [],  # the default on CPU: fused linear cross-entropy, PyTorch chunks
    "eager": ["--model.kernels.enabled=false"],  # full logits, model.loss.lm_loss
    "fused-triton": ["--model.kernels.interpret=true"],  # Triton chunks (TRITON_INTERPRET=1, set by conftest)
    "triton-ce": ["--model.kernels.interpret=true", "--model.kernels.fused_linear_cross_entropy=false"],
}


def _non_finite_hidden_at(monkeypatch, bad_calls: set[int]):
    """The trunk's output holds NaN and inf on the given (1-based) training forwards: non-finite logits reach the
    loss, whichever path computes it."""
    import model.llama

    real, calls = model.llama.lm_head_loss, [0]

    def lm_head_loss(hidden, *args, **kwargs):
        if torch.is_grad_enabled():
            calls[0] += 1
            if calls[0] in bad_calls:
                hidden = hidden.clone()
                hidden[0, 0, 0], hidden[0, 1, 0] = float("nan"), float("inf")
        return real(hidden, *args, **kwargs)

    monkeypatch.setattr(model.llama, "lm_head_loss", lm_head_loss)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy's, under the interpreter
@pytest.mark.parametrize("path", LOSS_PATHS, ids=list(LOSS_PATHS))
def test_non_finite_logits_obey_on_nan_on_every_loss_path(path, tmp_path, monkeypatch, capsys, request):
    if "triton" in path:
        request.getfixturevalue("kernel_device")  # skips without triton
    small = ["--data.batch_size=2", "--data.seq_len=16", "--ckpt.interval=1", *LOSS_PATHS[path]]
    _non_finite_hidden_at(monkeypatch, {2})
    with pytest.raises(SystemExit, match=r"non-finite loss at step 2 .*last good checkpoint is .*step_000001"):
        run(tmp_path / "stop", "--max_steps=3", *small)
    _non_finite_hidden_at(monkeypatch, {2})
    run(tmp_path / "skip", "--max_steps=3", "--on_nan=skip", *small)
    assert "skipping step: non-finite loss at step 2 (loss nan" in capsys.readouterr().out
    curve = losses(tmp_path / "skip")
    assert sorted(curve) == [1, 2, 3] and all(math.isfinite(v) for v in curve.values())


def test_non_finite_weights_are_never_saved(tmp_path, monkeypatch):
    """An update that overflows the weights (the loss was still finite) was checkpointed, and that checkpoint then
    crashed resume and eval. Now the save is refused, naming the last good checkpoint."""
    real_step, calls = torch.optim.AdamW.step, [0]

    def step(self, *args, **kwargs):
        out = real_step(self, *args, **kwargs)
        calls[0] += 1
        if calls[0] == 3:
            with torch.no_grad():
                self.param_groups[0]["params"][0][0, 0] = float("inf")
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    with pytest.raises(SystemExit, match=r"stopping at step 3: not saving checkpoint step_000003: 1 weight tensors "
                                         r"hold inf or NaN.*the last good checkpoint is .*step_000002"):
        run(tmp_path, "--max_steps=5", "--ckpt.interval=1", "--ckpt.keep_last=5")
    assert names(tmp_path / "ckpt") == ["step_000001", "step_000002"]
    assert not list((tmp_path / "ckpt").glob(".tmp-*"))


# ---------------------------------------------------------------------------------- 6: one job per out_dir


LOCK_HOLDER = ("import sys, time\nfrom training.job import RunLock\nwith RunLock(sys.argv[1]):\n"
               "    print('locked', flush=True)\n    time.sleep(600)\n")


@pytest.fixture
def lock_holder(tmp_path):
    """Another process holding tmp_path's run lock, as a running train.py does."""
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        yield holder
    finally:
        holder.kill()
        holder.wait()


def test_second_train_on_the_same_out_dir_exits_naming_the_first(tmp_path, lock_holder):
    with pytest.raises(SystemExit, match=rf"{tmp_path} is in use by another training process \(pid "
                                         rf"{lock_holder.pid}.*\.lock.*another --out_dir"):
        run(tmp_path, "--max_steps=2")
    assert not (tmp_path / "metrics.jsonl").exists() and not (tmp_path / "ckpt").exists()
    lock_holder.kill()
    lock_holder.wait()
    run(tmp_path, "--max_steps=2")  # the lock dies with its holder
    assert checkpoint.resolve(tmp_path).name == "step_000002"


def torchrun_cmd(out_dir: Path, *args) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
            "configs/debug.py", "--data.tokenizer=gpt2", f"--out_dir={out_dir}", *FAST, *args]


def test_locked_out_dir_ends_a_torchrun_job_cleanly(tmp_path, lock_holder):
    """Under torchrun rank 0 alone takes the lock; when it cannot, every rank exits (none waits at a collective)."""
    proc = subprocess.run(torchrun_cmd(tmp_path, "--max_steps=2", "--parallel.timeout_s=600"), cwd=ROOT,
                          capture_output=True, text=True, timeout=180)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert f"is in use by another training process (pid {lock_holder.pid}" in out, out[-3000:]
    assert not (tmp_path / "ckpt").exists()


# ---------------------------------------------------------------------------------- 7: SIGTERM


STOPPABLE = ["--schedule.name=constant", "--eval.interval=0", "--ckpt.interval=0"]  # lr independent of max_steps


def test_sigterm_saves_a_checkpoint_and_resumes_identically(tmp_path):
    stopped, straight = tmp_path / "stopped", tmp_path / "straight"
    cmd = [sys.executable, "train.py", "configs/debug.py", f"--out_dir={stopped}", *FAST, *STOPPABLE,
           "--max_steps=100000"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_steps(stopped, 2, proc)
        os.kill(proc.pid, signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, out[-3000:]
    step = checkpoint.load_state(checkpoint.resolve(stopped))["step"]
    assert f"stopped by SIGTERM after step {step}: the last good checkpoint is" in out
    assert sorted(losses(stopped)) == list(range(1, step + 1))
    run(stopped, *STOPPABLE, f"--max_steps={step + 3}")  # the command again (longer: the schedule is constant)
    run(straight, *STOPPABLE, f"--max_steps={step + 3}")
    assert losses(stopped) == losses(straight)  # bit-identical


def test_sigterm_under_torchrun_stops_every_rank_at_the_same_step(tmp_path):
    """torchrun forwards SIGTERM to its workers; they agree on the step to stop after and save it together."""
    stopped, straight = tmp_path / "stopped", tmp_path / "straight"
    proc = subprocess.Popen(torchrun_cmd(stopped, *STOPPABLE, "--max_steps=100000"), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_steps(stopped, 2, proc)
        os.kill(proc.pid, signal.SIGTERM)  # the launcher, as a scheduler does
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    ckpt = checkpoint.resolve(stopped)
    step = checkpoint.load_state(ckpt)["step"]
    assert f"stopped by SIGTERM after step {step}" in out, out[-3000:]
    assert out.count("saved checkpoint") == 1
    assert sorted(p.name for p in (ckpt / "dcp").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    outputs = []
    for out_dir in (stopped, straight):  # the command again (longer: the schedule is constant), and uninterrupted
        done = subprocess.run(torchrun_cmd(out_dir, *STOPPABLE, f"--max_steps={step + 2}"), cwd=ROOT,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
        outputs.append(done.stdout)
    assert f"resumed from {ckpt} at step {step}" in outputs[0]
    assert losses(stopped) == losses(straight)


# ---------------------------------------------------------------------------------- 9: damaged checkpoint files


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("two")
    os.chdir(ROOT)
    run(out, "--max_steps=4", "--ckpt.interval=2")
    return out


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGES = {
    "truncated-safetensors": (checkpoint.MODEL_FILE, _truncate),
    "random-state": (checkpoint.STATE_FILE, lambda p: p.write_bytes(os.urandom(p.stat().st_size))),
    "invalid-config": (checkpoint.CONFIG_FILE, lambda p: p.write_text(p.read_text()[:40])),
}


@pytest.mark.parametrize("damage", DAMAGES, ids=list(DAMAGES))
def test_damaged_checkpoint_files_are_named_on_resume_and_load(damage, two_checkpoints, tmp_path):
    file, spoil = DAMAGES[damage]
    out = tmp_path / "run"
    shutil.copytree(two_checkpoints, out, symlinks=True)
    spoil(out / "ckpt" / "step_000004" / file)
    good = out / "ckpt" / "step_000002"
    flags = rf"--ckpt.resume_from={good} --ckpt.move_aside=true"
    with pytest.raises(SystemExit, match=rf"latest points to step_000004, whose {file} .*Intact checkpoints in .*: "
                                         rf"step_000002; .*{flags}"):
        run(out, "--max_steps=6", "--ckpt.interval=2")
    if file == checkpoint.STATE_FILE:  # eval, generate and merge read the weights only: those are intact
        checkpoint.load_model(out)
        with pytest.raises(checkpoint.CheckpointError, match=rf"step_000004 is damaged: {file} cannot be read.*"
                                                             rf"newest intact checkpoint is {good}"):
            checkpoint.load_state(out / "ckpt" / "step_000004")
    else:
        with pytest.raises(checkpoint.CheckpointError, match=rf"step_000004 is damaged: {file} is not a .*newest "
                                                             rf"intact checkpoint is {good}.*--ckpt {good}.*{flags}"):
            checkpoint.load_model(out)
    run(out, "--max_steps=6", "--ckpt.interval=2", f"--ckpt.resume_from={good}", "--ckpt.move_aside=true")
    assert names(out / "ckpt") == ["step_000004", "step_000006"]
    assert checkpoint.problem(next((out / "ckpt").glob("old-*")) / "step_000004") is not None  # kept, as it was


# ---------------------------------------------------------------------------------- init_from and --model.* keys


def test_model_overrides_with_init_from_apply_or_are_refused(tmp_path):
    """With init_from, cfg.model was replaced after the command line was applied: --model.kernels.enabled=false
    and the like were accepted, then ignored."""
    torch.manual_seed(0)
    model = build_model(debug_config.model)
    model.to_empty(device="cpu")
    model.init_weights()
    seed = save_pretrained(model, tmp_path / "hf")
    base = [f"--init_from={seed}", "--data.tokenizer=gpt2", "--max_steps=1"]
    run(tmp_path / "a", *base, "--model.kernels.enabled=false", "--model.norm_eps=1e-6")
    saved = json.loads((tmp_path / "a" / "config.json").read_text())["model"]
    assert saved["kernels"]["enabled"] is False and saved["norm_eps"] == 1e-6
    with pytest.raises(SystemExit, match=r"--model.dim=32, --model.n_layers=3 would change the shape of the weights "
                                         r"of init_from="):
        run(tmp_path / "b", *base, "--model.dim=32", "--model.kernels.rope=false", "--model.n_layers=3")
