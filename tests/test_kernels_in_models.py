"""The kernel switches (kernels.KernelConfig) inside the models: every path gives the eager path's loss, accuracy
and gradients, and a training run with the kernels gives the per-step losses of one without them.

Paths compared with the eager one (full logits, lm_loss, eager RoPE):
    fused      the default on every device: fused linear cross-entropy, PyTorch chunks
    triton     Triton RoPE and Triton cross-entropy chunks (natively on a GPU, else through the interpreter)
    triton-ce  Triton RoPE and the Triton cross-entropy kernel over the full logits (fused switched off)

Tolerances: one forward/backward in fp32, loss and every gradient within 1e-5 relative (max |a - b| / max |b|):
the paths differ only in summation order. Training: the per-step losses of 40 steps of the debug config within
1e-4 absolute (kernels on vs off), and 4 steps through the interpreter within 1e-5; a wrong gradient moves the loss
by more than 1e-2 within a few steps.
"""

import dataclasses
import json
from pathlib import Path

import pytest
import torch

import train
from training.config import load_config
from kernels import KernelConfig
from model import build_model
from model.llama import LlamaConfig
from test_families import our_model, tokens

PATHS = {
    "eager": KernelConfig(enabled=False),
    "fused": KernelConfig(),
    "triton": KernelConfig(interpret=True),
    "triton-ce": KernelConfig(interpret=True, fused_linear_cross_entropy=False),
}
VARIANTS = ["llama", "gemma2", "gpt_oss", "granite-tied", "granite-untied"]
REL_TOL = 1e-5


def build(variant: str, path: str, device: str) -> torch.nn.Module:
    kernels = dataclasses.replace(PATHS[path])  # a fresh object: configs must not share one
    if variant == "llama":
        config = LlamaConfig(vocab_size=96, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96,
                             max_seq_len=128, tie_embeddings=False, qkv_bias=True, attn_backend="eager",
                             kernels=kernels)
        torch.manual_seed(0)
        model = build_model(config)
        model.to_empty(device="cpu")
        model.init_weights()
        model = model.eval()
    else:
        model = our_model(variant)
        model.config.kernels = kernels
        for layer in model.layers:
            layer.attn.kernels = kernels
    return model.to(device)


def loss_and_grads(model, device):
    idx, labels = tokens(1).to(device), tokens(2).to(device)
    labels[0, :5] = -100
    out = model(idx, labels)
    objective = (out.loss_sum + out.aux_loss * out.n_tokens) / out.n_tokens
    objective.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


@pytest.mark.parametrize("path", ["fused", "triton", "triton-ce"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_every_path_equals_the_eager_one(variant, path, kernel_device):
    device = "cpu" if path == "fused" else kernel_device
    if path != "fused" and device == "cpu":
        torch.set_num_threads(1)  # interpreter programs are tiny: threads only spin
    ref, ref_grads = loss_and_grads(build(variant, "eager", device), device)
    out, grads = loss_and_grads(build(variant, path, device), device)
    assert int(out.n_tokens) == int(ref.n_tokens) and int(out.n_correct) == int(ref.n_correct)
    assert abs(float(out.loss_sum) - float(ref.loss_sum)) <= REL_TOL * abs(float(ref.loss_sum))
    assert grads.keys() == ref_grads.keys()
    for name, g in grads.items():
        scale = ref_grads[name].abs().max().clamp(min=1e-30)
        assert float((g - ref_grads[name]).abs().max() / scale) <= REL_TOL, name


def test_kernels_switch_is_a_config_key():
    cfg = load_config("configs/debug.py", ["--model.kernels.fused_linear_cross_entropy=false",
                                            "--model.kernels.rope=false"])
    assert cfg.model.kernels == KernelConfig(rope=False, fused_linear_cross_entropy=False)


def test_interpret_without_the_interpreter_is_a_clear_error(monkeypatch):
    import kernels

    monkeypatch.setattr(kernels, "INTERPRET", False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        KernelConfig(interpret=True).use("rope", torch.zeros(1))


def step_losses(out_dir: Path) -> list[float]:
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


def test_training_with_and_without_kernels_gives_the_same_losses(tmp_path):
    """Convergence: 40 steps of the debug config, the default fused loss against the full-logits eager path."""
    runs = {}
    for name, args in {"kernels": [], "eager": ["--model.kernels.enabled=false"]}.items():
        train.main(["configs/debug.py", f"--out_dir={tmp_path / name}", "--log.interval=1", *args])
        runs[name] = step_losses(tmp_path / name)
    assert len(runs["kernels"]) == 40
    worst = max(abs(a - b) for a, b in zip(runs["kernels"], runs["eager"]))
    assert worst <= 1e-4, f"per-step losses differ by up to {worst:.2e}"


def test_training_through_the_triton_kernels_gives_the_same_losses(tmp_path, kernel_device):
    """The same with Triton RoPE and cross-entropy: natively on a GPU, through the interpreter on a CPU (4 steps,
    a narrower vocabulary: the interpreter runs each program in Python)."""
    common = ["--max_steps=4", "--eval.interval=0", "--ckpt.interval=0", "--log.interval=1",
              "--data.batch_size=2", f"--device={kernel_device}"]
    runs = {}
    variants = {"triton": ["--model.kernels.interpret=true"], "eager": ["--model.kernels.enabled=false"]}
    for name, args in variants.items():
        train.main(["configs/debug.py", f"--out_dir={tmp_path / name}", *common, *args])
        runs[name] = step_losses(tmp_path / name)
    assert len(runs["triton"]) == 4
    worst = max(abs(a - b) for a, b in zip(runs["triton"], runs["eager"]))
    assert worst <= 1e-5, f"per-step losses differ by up to {worst:.2e}"
