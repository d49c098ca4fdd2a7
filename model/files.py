"""Writing outputs without losing anything: every writer in the project (checkpoints, Hugging Face export, GGUF
conversion, token shards, run files) goes through these.

    with output_dir("hf/my-model", kind="hf-export", overwrite=args.overwrite, protect=[run_dir]) as tmp:
        write everything into tmp                  # a temp sibling of the target
    # now hf/my-model is complete, marked as ours, with ordinary permissions; on an exception nothing changed

    write_text_atomic(run_dir / "config.json", text)

The rules:
- A target directory appears complete or not at all: it is built in a temp sibling (`.<name>.tmp-<host>-<pid>`)
  and renamed into place. A temp sibling left by a killed writer is removed by the next writer of that target.
- A tool replaces only what it created: a directory we write holds a marker file (MARKER, naming its kind).
  An existing non-empty target is refused unless overwrite=True *and* it carries our marker of the same kind;
  a target that is, contains, or lies inside a protected path (a checkpoint, a run directory) is always refused.
- Files get ordinary permissions: 0666 and directories 0777, less the process umask (temp files from
  `tempfile` and some writers start at 0600 / 0700).
- Two writers racing for the same new target (ranks converting the same GGUF file) cannot swap each other's output
  away: without overwrite the final rename fails if the target appeared meanwhile (OutputError, target intact).

Fetched and derived files (corpora, token shards, GGUF conversions) live under cache_dir().
"""

import contextlib
import json
import os
import shutil
import socket
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

MARKER = ".nanoforge.json"  # {"kind": ..., "created": ...} in every directory a nanoforge tool wrote whole


def cache_dir() -> Path:
    """Where fetched corpora, token shards (by default) and GGUF conversions live: $NANOFORGE_CACHE or
    <repo>/data/cache."""
    return Path(os.environ.get("NANOFORGE_CACHE") or Path(__file__).resolve().parents[1] / "data" / "cache")


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
    tmp = _sibling(path, "tmp")
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
    related = [p for p in (Path(p).expanduser().resolve() for p in protect) if _related(out, p)]
    if related:
        p = out if out in related else related[0]  # name the closest: "it is the run directory"
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


def _sibling(out: Path, tag: str) -> Path:
    """This process's temp sibling of `out`: .<name>.<tag>-<host>-<pid> (tag "tmp" while building, "old" for an
    output being swapped out). The host keeps writers on different machines sharing a file system apart."""
    return out.with_name(f".{out.name}.{tag}-{socket.gethostname()}-{os.getpid()}")


def _writer_may_be_alive(sibling: Path, tag: str) -> bool:
    """Whether the process that made a temp sibling may still be working on it (so it must be left alone): another
    live process on this host, or any process on another host (whose pids we cannot check)."""
    host, _, pid = sibling.name.split(f".{tag}-", 1)[-1].rpartition("-")
    if host and host != socket.gethostname():
        return True
    return pid.isdigit() and int(pid) != os.getpid() and _alive(int(pid))


def remove_stale_temps(out: Path) -> None:
    """Remove temp siblings of `out` left by writers that were killed (.<name>.tmp-<host>-<pid> whose process is
    gone); an older output a killed writer had swapped out (.<name>.old-...) goes back into place if nothing
    replaced it. Siblings of live writers, and of writers on other hosts, are left alone."""
    for old in out.parent.glob(f".{out.name}.old-*"):
        if _writer_may_be_alive(old, "old"):
            continue  # another process is swapping it out now
        if read_marker(old) is None:
            continue  # not an output of ours (only our outputs are ever swapped out): never touch it
        if not out.exists():
            os.rename(old, out)
        else:
            shutil.rmtree(old, ignore_errors=True)
    for stale in out.parent.glob(f".{out.name}.tmp-*"):
        if _writer_may_be_alive(stale, "tmp"):
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


def publish_dir(tmp: Path, out: Path, kind: str, replace: bool = True) -> None:
    """Mark `tmp` as a `kind` output, flush it, and rename it to `out`. The caller has checked `out` with
    check_output_dir. replace=True: an older output of ours there is swapped out, then removed. replace=False:
    only a missing or empty `out` is taken; one that became non-empty since the check raises OutputError and is
    left as it is (rename(2) refuses a non-empty directory atomically)."""
    (tmp / MARKER).write_text(json.dumps({"kind": kind, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}) + "\n")
    fix_permissions(tmp)
    fsync_tree(tmp)
    if replace and out.is_dir() and any(out.iterdir()):
        old = _sibling(out, "old")
        os.rename(out, old)
        try:
            os.rename(tmp, out)
        except OSError:
            if not out.exists():
                os.rename(old, out)  # put the older output back
            raise
        shutil.rmtree(old)
    else:
        try:
            os.rename(tmp, out)  # over a missing or empty directory only
        except OSError as e:
            if not (out.is_dir() and any(out.iterdir())):
                raise
            raise OutputError(f"{out} was written by another process while this {kind} output was being built; "
                              f"it was left as it is ({e.strerror})") from None
    fsync(out.parent)


@contextlib.contextmanager
def output_dir(target: str | Path, kind: str, overwrite: bool = False, protect: Iterable[str | Path] = (),
               flag: str = "--overwrite") -> Iterator[Path]:
    """Check the target (check_output_dir), yield an empty temp sibling to write into, then publish it in the
    target's place; on any exception the temp sibling is removed and the target is left as it was."""
    out = check_output_dir(target, kind, overwrite, protect, flag)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out)
    tmp = _sibling(out, "tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        publish_dir(tmp, out, kind, replace=overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
