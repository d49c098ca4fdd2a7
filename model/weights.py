"""safetensors in and out: checked, streamed one tensor at a time, names translated through a declarative key map.

Every safetensors file the project writes goes through write_safetensors (checkpoints, gathered FSDP2 checkpoints,
Hugging Face export, GGUF conversion): the header from names, shapes and dtypes first, then the tensors one at a
time, so a writer never needs them all at once.
"""

import json
import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import safe_open
from torch import nn

from model import mxfp4

# A dtype by its command-line / config name (merge.py --dtype, generate.py --dtype, parallel.reduce_dtype).
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# The model.files marker kind of a Hugging Face model directory we wrote (merge.py export, GGUF conversion): one
# kind, so --overwrite may replace either with the other, and nothing else.
HF_MODEL_KIND = "hf-model"

# torch dtype -> its name in a safetensors header (https://github.com/huggingface/safetensors, "dtype")
SAFETENSORS_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}

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


def write_safetensors(path: str | Path, header: dict[str, tuple[tuple[int, ...], torch.dtype]],
                      tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Write a .safetensors file while its tensors stream in, holding one at a time.

    header: {name: (shape, dtype)} in file order, known before any tensor exists (a sharded model knows its full
    shapes; a GGUF file its dequantised ones). tensors: (name, tensor) in the same order, each checked against its
    header entry, moved to the CPU and appended. The file is an 8-byte little-endian header length, the JSON header
    {name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {"format": "pt"}} padded with spaces to a
    multiple of 8 bytes (so the data starts aligned), then the raw little-endian data. It gets ordinary
    umask-respecting permissions (plain open(), not a 0600 temp file).
    """
    entries, offset = {}, 0
    for name, (shape, dtype) in header.items():
        if dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"write_safetensors: {name} has dtype {dtype}, which safetensors cannot store here "
                             f"(supported: {', '.join(str(d).removeprefix('torch.') for d in SAFETENSORS_DTYPES)})")
        n_bytes = _numel(shape) * torch.empty((), dtype=dtype).element_size()
        entries[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                         "data_offsets": [offset, offset + n_bytes]}
        offset += n_bytes
    entries["__metadata__"] = {"format": "pt"}
    blob = json.dumps(entries, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    try:
        with open(path, "wb") as f:
            f.write(len(blob).to_bytes(8, "little"))
            f.write(blob)
            expected = iter(header.items())
            for name, tensor in tensors:
                want, (shape, dtype) = next(expected, (None, ((), None)))
                if name != want or tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
                    raise ValueError(f"write_safetensors: {path}: got {name} {list(tensor.shape)} {tensor.dtype}, "
                                     f"but the header's next entry is {want} {list(shape)} {dtype}")
                f.write(tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().data)
            missing = [name for name, _ in expected]
            if missing:
                raise ValueError(f"write_safetensors: {path}: the tensors ended before {missing[0]} "
                                 f"({len(missing)} header entries never came)")
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        Path(path).unlink(missing_ok=True)  # never leave a file whose header promises data it lacks
        raise


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def save_safetensors(model: nn.Module, path: str | Path) -> None:
    """Save parameters and persistent buffers under our names; a tied parameter is stored once, under its canonical
    (first registered) name. Tensors are copied to the CPU one at a time."""
    aliases = tied_names(model)
    tensors = [(name, t) for name, t in model.state_dict().items() if name not in aliases]
    write_safetensors(path, {name: (tuple(t.shape), t.dtype) for name, t in tensors}, tensors)
