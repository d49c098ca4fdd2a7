"""Run every test from the repository root, where the code expects to be (python train.py ...)."""

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _at_repo_root(monkeypatch):
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("WANDB_MODE", os.environ.get("WANDB_MODE", "disabled"))

# Real tokenizers, the SmolLM2 GGUF and eval sets (see ../shared/assets/PROVENANCE.md). CI and development
# machines have ../shared beside the clone; a user's clone does not, and those tests skip there, saying why.
SHARED_ASSETS = Path(os.environ.get("NANOFORGE_SHARED_ASSETS", ROOT.parent / "shared" / "assets"))


@pytest.fixture
def shared_assets() -> Path:
    if not SHARED_ASSETS.is_dir():
        pytest.skip(f"{SHARED_ASSETS} not found (set NANOFORGE_SHARED_ASSETS to ../shared/assets)")
    return SHARED_ASSETS
