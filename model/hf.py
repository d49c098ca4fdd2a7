"""Hugging Face model directories in and out: config.json + (sharded) safetensors, and GGUF files.

    model = from_pretrained("hf/SmolLM2-135M-Instruct", dtype=torch.bfloat16, device="cuda")
    model = from_pretrained("SmolLM2-135M-Instruct.Q4_1.gguf")                # converted once, then cached
    model = from_pretrained(path, rope_theta=400000.0, max_seq_len=8192)       # context extension
    save_pretrained(model, "hf/my-model", tokenizer=tok)                       # transformers loads this

A family module (model/llama.py, ...) provides these, and nothing here knows a tensor name:
    HF_MODEL_TYPES: the config.json model_type values it reads
    config_from_hf(dict) -> its config dataclass      config_to_hf(config) -> dict
    HF_KEY_MAP: {hf_name: our_name}                    (read forwards to load, inverted to export)
    HF_TRANSFORMS (optional): {our_name: Transform}    tensors stored in another layout (fused experts)

Loading builds the model on the meta device, allocates it once in the requested dtype and device, and
streams tensors into it one at a time (model.weights.load_safetensors), so two copies never exist. Names
and shapes of every tensor are checked before anything is read.
"""

import dataclasses
import json
from collections.abc import Iterable
from pathlib import Path
from types import ModuleType

import torch
from torch import nn

from model import build_model, gemma2, gpt_oss, granite_moe, llama
from model.files import OutputError, cache_dir, check_output_dir, output_dir
from model.weights import (HF_MODEL_KIND, Transform, key_mapper, load_safetensors, tied_names, transform_finder,
                           write_safetensors)

FAMILY_MODULES: tuple[ModuleType, ...] = (llama, gemma2, gpt_oss, granite_moe)
# model_type in config.json -> the family module that implements it
FAMILIES: dict[str, ModuleType] = {t: m for m in FAMILY_MODULES for t in m.HF_MODEL_TYPES}
# our config class -> its family module (for export)
FAMILY_OF_CONFIG: dict[type, ModuleType] = {m.CONFIG_CLASS: m for m in FAMILY_MODULES}

CONFIG_FILE = "config.json"
SINGLE_FILE, INDEX_FILE = "model.safetensors", "model.safetensors.index.json"
MAX_SHARD_BYTES = 5 * 10**9  # the Hub's usual shard size
# fields that change no tensor shape and may be overridden when loading (context extension, backends)
LOAD_OVERRIDES = ("rope_theta", "rope_scaling", "max_seq_len", "attn_backend")


def read_hf_config(path: str | Path) -> dict:
    """config.json of an HF model directory, with errors that say what is wrong."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model path {path} does not exist")
    if not path.is_dir():
        raise ValueError(f"{path} is a file; expected an HF model directory (config.json + *.safetensors) or a .gguf")
    if not (path / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{path} has no {CONFIG_FILE}: it is not a Hugging Face model directory "
                                f"(it holds: {', '.join(sorted(p.name for p in path.iterdir())[:10]) or 'nothing'})")
    return json.loads((path / CONFIG_FILE).read_text())


def family_of(hf_config: dict) -> ModuleType:
    model_type = hf_config.get("model_type")
    if model_type not in FAMILIES:
        raise ValueError(f"model_type {model_type!r} is not supported; supported: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[model_type]


def resolve_model_dir(path: str | Path, cache: str | Path | None = None) -> Path:
    """An HF directory for `path`: itself, or for a .gguf file its conversion in `cache` (default:
    model.files.cache_dir() / "gguf", i.e. $NANOFORGE_CACHE/gguf or data/cache/gguf), made once and reused.

    A conversion is named by the file's stem, size and mtime (a changed file is converted again) and written by
    gguf_to_hf: it appears complete or not at all, and a directory there that holds files nanoforge did not write
    is refused (OutputError), never replaced. Processes converting the same file at once (the ranks of a job)
    each build their own copy; the first to finish publishes it and the others use it.
    """
    path = Path(path)
    if path.suffix != ".gguf":
        return path
    from model.gguf import gguf_to_hf  # only GGUF users need the gguf package's reader

    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {path} does not exist")
    stat = path.stat()
    cache = Path(cache) if cache is not None else cache_dir() / "gguf"
    out = cache / f"{path.stem}-{stat.st_size}-{int(stat.st_mtime)}"
    if not (out / CONFIG_FILE).is_file():
        try:
            gguf_to_hf(path, out)
        except OutputError:
            if not (out / CONFIG_FILE).is_file():  # not merely another process publishing the same conversion first
                raise
    return out


def config_from_pretrained(path: str | Path, **overrides):
    """Our config for an HF directory (or .gguf), with optional LOAD_OVERRIDES, e.g. rope_theta=1e6."""
    hf_config = read_hf_config(resolve_model_dir(path))
    config = family_of(hf_config).config_from_hf(hf_config)
    unknown = set(overrides) - set(LOAD_OVERRIDES)
    if unknown:
        raise ValueError(f"cannot override {sorted(unknown)} when loading (they change tensor shapes); "
                         f"allowed: {', '.join(LOAD_OVERRIDES)}")
    config = dataclasses.replace(config, **{k: v for k, v in overrides.items() if v is not None})
    config.validate()
    return config


def weight_files(model_dir: Path) -> list[str]:
    """The safetensors files of an HF directory: model.safetensors, or the shards its index names."""
    if (model_dir / INDEX_FILE).is_file():
        weight_map = json.loads((model_dir / INDEX_FILE).read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (model_dir / f).is_file()]
        if missing:
            raise FileNotFoundError(f"{model_dir / INDEX_FILE} names shards that are not there: {missing}")
        return [str(model_dir / f) for f in files]
    if (model_dir / SINGLE_FILE).is_file():
        return [str(model_dir / SINGLE_FILE)]
    pickles = sorted(p.name for p in model_dir.glob("*.bin")) + sorted(p.name for p in model_dir.glob("*.pt"))
    hint = (f" It has {', '.join(pickles)}: pickled weights are never loaded (they can run code); convert them "
            "to safetensors with transformers' save_pretrained(safe_serialization=True).") if pickles else ""
    raise FileNotFoundError(f"{model_dir} has no {SINGLE_FILE} or {INDEX_FILE}.{hint}")


def from_pretrained(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                    **overrides) -> nn.Module:
    """Our model with the weights of an HF directory or a GGUF file, in `dtype` on `device`, in eval mode.

    overrides: any of LOAD_OVERRIDES (rope_theta, rope_scaling, max_seq_len, attn_backend).
    """
    model = build_model(config_from_pretrained(path, **overrides)).to(dtype)  # on meta: only the dtype recorded
    model.to_empty(device=device)
    load_pretrained_weights(model, path)
    return model.eval()


def load_pretrained_weights(model: nn.Module, path: str | Path, copy=None, grow_vocab: bool = False) -> None:
    """Fill a materialised model with the weights of an HF directory or .gguf (names, shapes checked first);
    copy as in model.weights.load_safetensors (a sharded model keeps its rows only).

    grow_vocab=True: a model built with more vocabulary rows than the checkpoint (special tokens added for a chat
    template) takes the checkpoint's rows first and fills the rest with their mean, the embedding and an untied
    output head alike, as transformers' resize_token_embeddings(mean_resizing=True) starts them."""
    model_dir = resolve_model_dir(path)
    hf_config = read_hf_config(model_dir)
    family = family_of(hf_config)
    transforms = dict(getattr(family, "HF_TRANSFORMS", None) or {})
    rows = model.config.vocab_size
    if grow_vocab and rows > hf_config["vocab_size"]:
        for name in ("tok_embeddings.weight", "output.weight"):
            transforms[name] = Transform(shape=lambda s: (rows, *s[1:]), load=lambda t: grow_rows(t, rows),
                                         export=lambda t: t)
    load_safetensors(model, weight_files(model_dir), key_map=key_mapper(family.HF_KEY_MAP),
                     transforms=transforms, copy=copy)


def grow_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """t (n, d) extended to (rows, d): the new rows are the mean of the n old ones (computed in fp32)."""
    if rows <= t.shape[0]:
        return t
    mean = t.float().mean(dim=0, keepdim=True).to(t.dtype)  # (1, d)
    return torch.cat([t, mean.expand(rows - t.shape[0], -1)])  # (rows, d)


def check_tokenizer_fits(tokenizer, config) -> None:
    """A tokenizer that can emit ids past the embedding table belongs to another model: say so."""
    if tokenizer.vocab_size > config.vocab_size:
        raise ValueError(f"tokenizer {tokenizer.name!r} has {tokenizer.vocab_size} ids but the model has only "
                         f"{config.vocab_size} embedding rows: the tokenizer does not belong to this model "
                         f"(use the tokenizer files of the model's own directory)")


def _shards(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    """Split name -> tensor into consecutive groups of at most max_bytes (a bigger tensor gets its own)."""
    shards, current, size = [], {}, 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = t
        size += nbytes
    if current:
        shards.append(current)
    return shards


def save_pretrained(model: nn.Module, out_dir: str | Path, tokenizer=None, dtype: torch.dtype | None = None,
                    max_shard_bytes: int = MAX_SHARD_BYTES, overwrite: bool = False,
                    protect: Iterable[str | Path] = ()) -> Path:
    """Write an HF model directory that transformers' AutoModelForCausalLM.from_pretrained loads.

    config.json (plus torch_dtype and the tokenizer's bos/eos ids), model.safetensors or shards of at most
    max_shard_bytes with model.safetensors.index.json, generation_config.json, and the tokenizer files when a
    tokenizer is given. Weights are written in `dtype` (default: as they are).

    The directory is built in a temp sibling and renamed into place (model.files.output_dir): an interrupted export
    leaves nothing half-written. out_dir must be new or empty, or, with overwrite=True, an earlier HF directory of
    ours; it may not be, contain or lie inside a `protect` path (the checkpoint, its run directory). Otherwise
    OutputError, and nothing is changed.
    """
    out_dir = Path(out_dir)
    check_output_dir(out_dir, HF_MODEL_KIND, overwrite, protect)  # refuse before any work
    family = FAMILY_OF_CONFIG[type(model.config)]
    if tokenizer is not None:
        check_tokenizer_fits(tokenizer, model.config)
    to_hf = key_mapper(family.HF_KEY_MAP, inverse=True)
    find_transform = transform_finder(getattr(family, "HF_TRANSFORMS", None))
    aliases = tied_names(model)
    tensors = {}
    for name, t in model.state_dict().items():
        if name in aliases:
            continue  # a tied output head is the embedding; HF's tie_word_embeddings restores it
        t = t.detach()
        transform = find_transform(name)
        if transform is not None:
            t = transform.export(t)
        tensors[to_hf(name)] = t.to(dtype) if dtype is not None else t
    saved_dtype = next(iter(tensors.values())).dtype
    with output_dir(out_dir, HF_MODEL_KIND, overwrite, protect) as tmp:
        _write_weights(tmp, tensors, max_shard_bytes)
        _write_configs(tmp, family, model.config, saved_dtype, tokenizer)
    return out_dir


def _write_weights(folder: Path, tensors: dict[str, torch.Tensor], max_shard_bytes: int) -> None:
    """model.safetensors, or shards of at most max_shard_bytes and model.safetensors.index.json."""
    shards = _shards(tensors, max_shard_bytes)
    if len(shards) == 1:
        write_safetensors(folder / SINGLE_FILE, {k: (tuple(v.shape), v.dtype) for k, v in shards[0].items()},
                          shards[0].items())
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(folder / fname, {k: (tuple(v.shape), v.dtype) for k, v in shard.items()}, shard.items())
        weight_map.update(dict.fromkeys(shard, fname))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (folder / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                indent=2))


def _write_configs(folder: Path, family: ModuleType, config, saved_dtype: torch.dtype, tokenizer) -> None:
    """config.json, generation_config.json and (with a tokenizer) the tokenizer files."""
    hf_config = family.config_to_hf(config)
    hf_config["torch_dtype"] = str(saved_dtype).removeprefix("torch.")
    generation = {}
    if tokenizer is not None:
        stop_ids = list(getattr(tokenizer, "stop_ids", None) or [tokenizer.eos_id])
        hf_config.update(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
        generation = {"bos_token_id": tokenizer.bos_id, "eos_token_id": stop_ids if len(stop_ids) > 1 else stop_ids[0]}
        if tokenizer.pad_id is not None:
            generation["pad_token_id"] = tokenizer.pad_id
        tokenizer.save_pretrained(folder)
    (folder / CONFIG_FILE).write_text(json.dumps(hf_config, indent=2))
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2))

