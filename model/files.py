"""Writing outputs without losing anything: every writer in the project (checkpoints, Hugging Face export, GGUF
conversion, token shards, run files) goes through these.

    with output_dir("hf/my-model", kind="hf-export", overwrite=args.overwrite, protect=[run_dir]) as tmp:
        write everything into tmp                  # a temp sibling of the target
    # now hf/my-model is complete, marked as ours, with ordinary permissions; on an exception nothing changed

    write_text_atomic(run_dir / "config.json", text)

The rules:
- A target directory appears complete or not at all: it is built in a temp sibling (`.<name>.tmp-<pid>`) and
  renamed into place. A temp sibling left by a killed writer is removed by the next writer of that target.
- A tool replaces only what it created: a directory we write holds a marker file (MARKER, naming its kind).
  An existing non-empty target is refused unless overwrite=True *and* it carries our marker of the same kind;
  a target that is, contains, or lies inside a protected path (a checkpoint, a run directory) is always refused.
- Files get ordinary permissions: 0666 and directories 0777, less the process umask (temp files from
  `tempfile` and some writers start at 0600 / 0700).
"""

import contextlib
import json
import os
import shutil
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

MARKER = ".nanoforge.json"  # {"kind": ..., "created": ...} in every directory a nanoforge tool wrote whole


class OutputError(ValueError):
    """A target the tool may not write: names the path, why, and what to do instead."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fix_permissions(path: str | Path) -> None:
    """Give `path` (and, for a directory, everything under it) ordinary umask-respecting permissions."""
    path, mask = Path(path), _umask()
    paths = [path, *path.rglob("*")] if path.is_dir() else [path]
    for p in paths:
        if p.is_symlink():
            continue
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


def fsync(path: str | Path) -> None:
    """Flush a file (or a directory's entries) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    for f in [path, *path.rglob("*")]:
        if f.is_file() or f.is_dir():
            fsync(f)


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write a file through a temp sibling and an atomic rename: readers see the old file or the new one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        fix_permissions(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def read_marker(path: str | Path) -> dict | None:
    """The marker of a directory a nanoforge tool wrote, or None."""
    try:
        marker = json.loads((Path(path) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def _related(a: Path, b: Path) -> bool:
    return a == b or a in b.parents or b in a.parents


def check_output_dir(target: str | Path, kind: str, overwrite: bool = False, protect: Iterable[str | Path] = (),
                     flag: str = "--overwrite") -> Path:
    """The resolved target when a writer of `kind` may (re)place it; OutputError otherwise (see the module docstring).
    `flag` is the option that allows overwriting, named in the message."""
    out = Path(target).expanduser().resolve()
    for p in protect:
        p = Path(p).expanduser().resolve()
        if _related(out, p):
            where = "is" if out == p else ("lies inside" if p in out.parents else "contains")
            raise OutputError(f"refusing to write {kind} output to {out}: it {where} {p}, which must not be "
                              f"touched; choose an output directory outside it")
    if out.exists() and not out.is_dir():
        raise OutputError(f"refusing to write {kind} output to {out}: it exists and is not a directory; "
                          f"choose another path")
    if out.is_dir() and any(out.iterdir()):
        marker = read_marker(out)
        if marker is None or marker.get("kind") != kind:
            what = f"a nanoforge {marker.get('kind')} output" if marker else "files nanoforge did not write"
            raise OutputError(f"refusing to write {kind} output to {out}: it is not empty and holds {what}; "
                              f"choose a new or empty directory (nothing was changed)")
        if not overwrite:
            raise OutputError(f"{out} already holds a {kind} output; pass {flag} to replace it, or choose "
                              f"another directory (nothing was changed)")
    return out


def remove_stale_temps(out: Path) -> None:
    """Remove temp siblings of `out` left by writers that were killed (.<name>.tmp-<pid> whose pid is gone); an
    older output a killed writer had swapped out (.<name>.old-<pid>) goes back into place if nothing replaced it."""
    for old in out.parent.glob(f".{out.name}.old-*"):
        if not out.exists():
            os.rename(old, out)
        else:
            shutil.rmtree(old, ignore_errors=True)
    for stale in out.parent.glob(f".{out.name}.tmp-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and _alive(int(pid)) and int(pid) != os.getpid():
            continue  # another process is writing it now
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def publish_dir(tmp: Path, out: Path, kind: str) -> None:
    """Mark `tmp` as a `kind` output, flush it, and rename it to `out` (an older output of ours there is swapped
    out, then removed). The caller has checked `out` with check_output_dir."""
    (tmp / MARKER).write_text(json.dumps({"kind": kind, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}) + "\n")
    fix_permissions(tmp)
    fsync_tree(tmp)
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old)
    else:
        os.rename(tmp, out)
    fsync(out.parent)


@contextlib.contextmanager
def output_dir(target: str | Path, kind: str, overwrite: bool = False, protect: Iterable[str | Path] = (),
               flag: str = "--overwrite") -> Iterator[Path]:
    """Check the target (check_output_dir), yield an empty temp sibling to write into, then publish it in the
    target's place; on any exception the temp sibling is removed and the target is left as it was."""
    out = check_output_dir(target, kind, overwrite, protect, flag)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        publish_dir(tmp, out, kind)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
