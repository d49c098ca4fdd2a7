"""safetensors in and out: checked, streamed one tensor at a time, names translated through a declarative key map."""

import re
from collections.abc import Callable
from typing import NamedTuple

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from model import mxfp4

_MAX_LISTED = 30  # names listed per category in a WeightMismatchError message


class WeightMismatchError(ValueError):
    """The checkpoint's tensors do not match the model's: lists missing, unexpected and mis-shaped names."""

    def __init__(self, source: str, missing: list[str], unexpected: list[str],
                 mismatched: list[tuple[str, tuple, tuple]]):
        self.missing, self.unexpected, self.mismatched = missing, unexpected, mismatched
        lines = [f"weights from {source} do not match the model:"]

        def listing(title: str, items: list[str]) -> None:
            if items:
                lines.append(f"  {title} ({len(items)}):")
                lines.extend(f"    {item}" for item in items[:_MAX_LISTED])
                if len(items) > _MAX_LISTED:
                    lines.append(f"    ... and {len(items) - _MAX_LISTED} more")

        listing("missing from the checkpoint", missing)
        listing("unexpected in the checkpoint", unexpected)
        listing("mis-shaped", [f"{name}: checkpoint {list(found)} vs model {list(expected)}"
                                for name, found, expected in mismatched])
        super().__init__("\n".join(lines))


def check_tensors(expected: dict[str, tuple], found: dict[str, tuple], source: str) -> None:
    """Compare name -> shape maps of the model (expected) and a checkpoint (found); raise WeightMismatchError
    naming every missing, unexpected and mis-shaped tensor, or return None when they agree exactly."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    mismatched = [(name, tuple(found[name]), tuple(expected[name]))
                  for name in sorted(set(expected) & set(found)) if tuple(found[name]) != tuple(expected[name])]
    if missing or unexpected or mismatched:
        raise WeightMismatchError(source, missing, unexpected, mismatched)


def key_mapper(key_map: dict[str, str | None], inverse: bool = False) -> Callable[[str], str | None]:
    """A renaming function from a declarative map {their_name: our_name} where "{i}" matches a layer index.

    Forward (for loading) renames theirs -> ours; inverse=True (for export) renames ours -> theirs. A None target
    means "skip this tensor" (the function returns None). Names the map does not know are returned unchanged,
    so the load check reports them as unexpected.
    """
    pairs = [(ours, theirs) for theirs, ours in key_map.items() if ours is not None] if inverse else \
        list(key_map.items())

    def to_regex(pattern: str) -> re.Pattern:
        return re.compile("^" + re.escape(pattern).replace(re.escape("{i}"), r"(?P<i>\d+)") + "$")

    compiled = [(to_regex(source), target) for source, target in pairs]

    def rename(name: str) -> str | None:
        for regex, target in compiled:
            match = regex.match(name)
            if match:
                return None if target is None else target.replace("{i}", match.groupdict().get("i") or "")
        return name

    return rename


def tied_names(model: nn.Module) -> dict[str, str]:
    """{alias: canonical} for parameters registered under several names (a tied output head -> embedding)."""
    canonical_of: dict[int, str] = {}
    aliases = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in canonical_of:
            aliases[name] = canonical_of[id(param)]
        else:
            canonical_of[id(param)] = name
    return aliases


class Transform(NamedTuple):
    """How one of our tensors is stored in a checkpoint when it is not a plain rename (a fused-expert layout, a
    transpose). Keyed by our name pattern ("layers.{i}.moe.w_gate_up") in a family's HF_TRANSFORMS."""
    shape: Callable[[tuple], tuple]  # checkpoint shape -> our shape (checked before any tensor is read)
    load: Callable[[torch.Tensor], torch.Tensor]  # checkpoint tensor -> ours
    export: Callable[[torch.Tensor], torch.Tensor]  # ours -> checkpoint tensor (the inverse of load)


def transform_finder(transforms: dict[str, Transform] | None) -> Callable[[str], Transform | None]:
    """name -> its Transform (patterns with "{i}" for a layer index), or None for a plain copy."""
    compiled = [(re.compile("^" + re.escape(p).replace(re.escape("{i}"), r"\d+") + "$"), t)
                for p, t in (transforms or {}).items()]

    def find(name: str) -> Transform | None:
        return next((t for regex, t in compiled if regex.match(name)), None)

    return find


class CheckpointReader:
    """The tensors of one or more safetensors files, by name: shapes from the headers, tensors read one at a time.

    An MXFP4 pair `X_blocks` + `X_scales` (GPT-OSS experts) appears as one tensor `X` in its unquantised layout
    (model.mxfp4), dequantised to the requested dtype only when it is read.
    """

    def __init__(self, paths: list[str]):
        self._files = {}
        raw: dict[str, tuple[str, tuple]] = {}  # name -> (path, shape)
        duplicates = []
        for path in paths:
            with safe_open(path, framework="pt", device="cpu") as f:
                for name in f.keys():
                    if name in raw:
                        duplicates.append(f"{name} (in {raw[name][0]} and {path})")
                    raw[name] = (path, tuple(f.get_slice(name).get_shape()))
        if duplicates:
            raise ValueError("checkpoint: tensors stored more than once: " + ", ".join(duplicates))
        self.shapes: dict[str, tuple] = {}
        self._sources: dict[str, tuple] = {}  # name -> ("plain", name) | ("mxfp4", blocks name, scales name)
        for name, (path, shape) in raw.items():
            if name.endswith(mxfp4.SCALES_SUFFIX) and name[:-len(mxfp4.SCALES_SUFFIX)] + mxfp4.BLOCKS_SUFFIX in raw:
                continue  # read with its blocks
            if name.endswith(mxfp4.BLOCKS_SUFFIX):
                base = name[:-len(mxfp4.BLOCKS_SUFFIX)]
                scales = base + mxfp4.SCALES_SUFFIX
                if scales not in raw:
                    raise ValueError(f"checkpoint: MXFP4 tensor {name} has no {scales} beside it")
                self.shapes[base] = mxfp4.dense_shape(shape, raw[scales][1], base)
                self._sources[base] = ("mxfp4", name, scales)
            else:
                self.shapes[name] = shape
                self._sources[name] = ("plain", name)
        self._path_of = {name: path for name, (path, _) in raw.items()}

    def _raw(self, name: str) -> torch.Tensor:
        path = self._path_of[name]
        if path not in self._files:
            self._files[path] = safe_open(path, framework="pt", device="cpu")
        return self._files[path].get_tensor(name)

    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        source = self._sources[name]
        if source[0] == "mxfp4":
            return mxfp4.mxfp4_to_dense(self._raw(source[1]), self._raw(source[2]), dtype or torch.bfloat16, name)
        return self._raw(name)

    def close(self) -> None:
        self._files.clear()


def load_safetensors(model: nn.Module, paths: list[str], key_map: Callable[[str], str | None] | None = None,
                     transforms: dict[str, Transform] | None = None,
                     copy: Callable[[torch.Tensor, torch.Tensor], None] | None = None) -> None:
    """Fill the model's parameters and persistent buffers from safetensors files, then call model.init_buffers().

    Reads only headers first: every tensor name is renamed with key_map (theirs -> ours; None = keep names;
    a None result skips the tensor), its shape passed through its Transform (if any), and names and shapes are
    checked against the model before anything is copied. Then tensors are read one at a time (MXFP4 pairs
    dequantised as they come), transformed, and copied into the existing parameters (cast to their dtype,
    moved to their device), so peak extra memory is one tensor. A tied parameter (output head sharing the
    embedding) is filled from whichever of its names the checkpoint holds; if it holds both, the shapes must agree
    and the canonical one (the embedding) is used.

    copy(parameter, full_tensor) puts each tensor in place (default: parameter.copy_); a sharded model passes one
    that keeps only the rank's shard (training.parallel.copy_into_shard).
    """
    if isinstance(paths, str):
        paths = [paths]
    targets = dict(model.state_dict(keep_vars=True))  # our name -> Parameter / buffer (tied ones appear twice)
    aliases = tied_names(model)
    for name, tensor in targets.items():
        if tensor.is_meta:
            raise ValueError(f"load_safetensors: {name} is on the meta device; call model.to_empty(device=...) first")
    find_transform = transform_finder(transforms)

    # 1) headers only: which checkpoint tensor each of our names comes from, and with what shape
    reader = CheckpointReader(paths)
    location: dict[str, str] = {}  # our name -> their name
    found: dict[str, tuple] = {}
    duplicates = []
    for their_name, shape in reader.shapes.items():
        name = key_map(their_name) if key_map is not None else their_name
        if name is None:
            continue
        if name in found:
            duplicates.append(f"{name} (from {location[name]} and {their_name})")
        transform = find_transform(name)
        location[name] = their_name
        found[name] = tuple(transform.shape(shape)) if transform is not None else shape
    if duplicates:
        raise ValueError("load_safetensors: tensors stored more than once: " + ", ".join(duplicates))
    for alias, canonical in aliases.items():
        if alias in found:
            if canonical not in found:  # e.g. a checkpoint holding only the output head of a tied pair
                location[canonical], found[canonical] = location[alias], found[alias]
            elif found[alias] != found[canonical]:
                raise WeightMismatchError(", ".join(paths), [], [], [(alias, found[alias], found[canonical])])
            del location[alias], found[alias]
    expected = {name: tuple(t.shape) for name, t in targets.items() if name not in aliases}
    check_tensors(expected, found, ", ".join(paths))

    # 2) stream: one tensor at a time
    try:
        with torch.no_grad():
            for name, their_name in location.items():
                tensor = reader.get(their_name, dtype=targets[name].dtype)
                transform = find_transform(name)
                tensor = transform.load(tensor) if transform is not None else tensor
                if copy is None:
                    targets[name].copy_(tensor)
                else:
                    copy(targets[name], tensor)
    finally:
        reader.close()
    if hasattr(model, "init_buffers"):
        model.init_buffers()


def save_safetensors(model: nn.Module, path: str) -> None:
    """Save parameters and persistent buffers under our names as contiguous CPU tensors; a tied parameter is
    stored once, under its canonical (first registered) name."""
    aliases = tied_names(model)
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in model.state_dict().items()
               if name not in aliases}
    save_file(tensors, path, metadata={"format": "pt"})
