"""The command-line scripts eval.py and generate.py: flags outside their range, results that are not numbers, and
the house rule that scripts import libraries (training/generation.py), never each other.

One tiny debug run (configs/debug.py, 3 steps) gives the checkpoint every test here reads.
"""

import ast
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import eval as eval_script
import generate as generate_script
import train
from model.loss import LossOutput
from model.weights import save_safetensors
from training import checkpoint
from training.evaluation import evaluate
from training.generation import generate, load_for_inference

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ("train", "eval", "generate", "merge")


@pytest.fixture(scope="module")
def debug_ckpt(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("debug")
    train.main(["configs/debug.py", f"--out_dir={out}", "--max_steps=3", "--eval.interval=0", "--eval.batches=1",
                "--ckpt.interval=0"])
    return checkpoint.resolve(out)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "t.txt"
    path.write_text("To be, or not to be, that is the question. " * 60)
    return path


def test_scripts_import_libraries_not_each_other():
    for script in SCRIPTS:
        tree = ast.parse((ROOT / f"{script}.py").read_text())
        imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                    for alias in node.names}
        imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                     if isinstance(node, ast.ImportFrom) and node.module}
        assert not imported & set(SCRIPTS), f"{script}.py imports the script(s) {imported & set(SCRIPTS)}"


# ------------------------------------------------------------------ generate.py


@pytest.mark.parametrize("flags, message", [
    (["--top_p", "0"], "--top_p must be in (0, 1]"),
    (["--top_p", "-0.5"], "--top_p must be in (0, 1]"),
    (["--top_p", "1.5"], "--top_p must be in (0, 1]"),
    (["--top_p", "nan"], "--top_p must be in (0, 1]"),
    (["--temperature", "-1"], "--temperature must be a finite number >= 0"),
    (["--temperature", "nan"], "--temperature must be a finite number >= 0"),
    (["--top_k", "-1"], "--top_k must be >= 0"),
    (["--num_samples", "0"], "--num_samples must be >= 1"),
    (["--max_new_tokens", "-5"], "--max_new_tokens must be >= 1"),
    (["--max_new_tokens", "0"], "--max_new_tokens must be >= 1"),
    (["--prompt", ""], "--prompt is empty"),
    (["--max_seq_len", "0"], "--max_seq_len must be >= 1"),
    (["--rope_theta", "-1"], "--rope_theta must be a finite number > 0"),
])
def test_generate_rejects_flags_out_of_range(debug_ckpt, capsys, flags, message):
    with pytest.raises(SystemExit) as e:
        generate_script.main(["--ckpt", str(debug_ckpt), "--max_new_tokens", "2", *flags])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_new_tokens=-5), "max_new_tokens must be >= 0"),
    (dict(temperature=-1.0), "temperature must be a finite number >= 0"),
    (dict(temperature=1.0, top_k=-3), "top_k must be >= 0"),
    (dict(temperature=1.0, top_p=0.0), r"top_p must be in \(0, 1\]"),
])
def test_generate_library_rejects_arguments_out_of_range(debug_ckpt, kwargs, message):
    model, tok = load_for_inference(str(debug_ckpt), torch.device("cpu"))
    kwargs = {"max_new_tokens": 3, **kwargs}
    with pytest.raises(ValueError, match=message):
        generate(model, [tok.encode("HAMLET:")], **kwargs)


# ------------------------------------------------------------------ eval.py


@pytest.mark.parametrize("flags, message", [
    (["--batch_size", "-4"], "--batch_size must be >= 0"),
    (["--batches", "-1"], "--batches must be >= 0"),
    (["--seq_len", "-8"], "--seq_len must be >= 0"),
])
@pytest.mark.parametrize("data", ["shards", "text"])
def test_eval_rejects_flags_out_of_range(debug_ckpt, text_file, capsys, flags, message, data):
    extra = ["--data", str(text_file)] if data == "text" else []
    with pytest.raises(SystemExit) as e:
        eval_script.main(["--ckpt", str(debug_ckpt), *extra, *flags])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_eval_of_zero_tokens_is_an_error(debug_ckpt, text_file, monkeypatch):
    def masked_batches(path, tokenizer, seq_len, batch_size):  # every label masked: nothing to score
        x = torch.zeros(2, seq_len, dtype=torch.long)
        yield x, torch.full_like(x, -100)

    monkeypatch.setattr(eval_script, "text_batches", masked_batches)
    with pytest.raises(SystemExit, match="scored 0 tokens"):
        eval_script.main(["--ckpt", str(debug_ckpt), "--data", str(text_file)])


def reject_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def test_eval_of_nan_weights_prints_strict_json_and_fails(debug_ckpt, tmp_path):
    nan_ckpt = tmp_path / "nan_ckpt"
    shutil.copytree(debug_ckpt, nan_ckpt)
    model, _ = checkpoint.load_model(nan_ckpt)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    save_safetensors(model, nan_ckpt / "model.safetensors")

    r = subprocess.run([sys.executable, "eval.py", "--ckpt", str(nan_ckpt), "--batches", "1"], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 1, r.stderr[-2000:]
    result = json.loads(r.stdout.strip().splitlines()[-1], parse_constant=reject_constant)
    assert result["loss"] is None and result["ppl"] is None and result["tokens"] > 0
    assert result["nonfinite"] == ["loss", "ppl"] and "non-finite loss and ppl" in result["error"]


class InfiniteLoss(nn.Module):
    """A stand-in model whose loss over every batch is +inf (an overflow)."""

    def forward(self, batch):
        return LossOutput(torch.tensor(float("inf")), torch.tensor(batch.labels.numel()), torch.tensor(0))


def test_infinite_loss_gives_infinite_perplexity():
    x = torch.zeros(1, 4, dtype=torch.long)
    r = evaluate(InfiniteLoss(), [(x, x)], 0, torch.device("cpu"))
    assert r["val_loss"] == math.inf and r["val_ppl"] == math.inf  # not exp(700), a finite 1e304
