"""Writers that must lose nothing: merge.py / save_pretrained / gguf_to_hf / the GGUF cache never delete what they
did not write, and refuse an output that is, contains or lies inside the checkpoint, its run directory or the GGUF
file; exported files get ordinary umask permissions; one streaming safetensors writer; one dtype table; model/ does
not import data/; configs have no import-time side effects.

A run directory is built by hand (config.json, metrics.jsonl, ckpt/step_000001/{model.safetensors, state.pt,
config.json}, ckpt/latest), which is all merge.py reads; the tiny GGUF file comes from test_gguf.
"""

import ast
import hashlib
import json
import os
import runpy
import socket
import stat
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from test_gguf import write_tiny_gguf

import merge as merge_script
from model import build_model
from model.files import MARKER, OutputError, output_dir
from model.hf import resolve_model_dir, save_pretrained
from model.llama import LlamaConfig
from model.weights import DTYPES, save_safetensors, tied_names, write_safetensors
from training import checkpoint, parallel
from training.config import DataConfig, TrainConfig, to_dict

ROOT = Path(__file__).resolve().parents[1]
TINY = LlamaConfig(vocab_size=50304, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=64, max_seq_len=64)


def tiny_model():
    model = build_model(TINY)
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    model.init_weights()
    return model.eval()


def snapshot(root: Path) -> dict[str, str]:
    """Every file and directory under root -> a hash of its content ("dir" for a directory)."""
    return {str(p.relative_to(root)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if not p.is_symlink() or p.exists()}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """<tmp>/runs/base: a run directory with one checkpoint, beside an unrelated file in <tmp>/runs."""
    runs = tmp_path_factory.mktemp("runs")
    (runs / "notes.txt").write_text("someone else's file")
    run = runs / "base"
    step = run / "ckpt" / "step_000001"
    step.mkdir(parents=True)
    cfg = TrainConfig(out_dir=str(run), model=TINY, data=DataConfig(tokenizer="gpt2"))
    save_safetensors(tiny_model(), step / checkpoint.MODEL_FILE)
    torch.save({"step": 1}, step / checkpoint.STATE_FILE)
    (step / checkpoint.CONFIG_FILE).write_text(json.dumps(to_dict(cfg)))
    (run / "ckpt" / "latest").symlink_to("step_000001")
    (run / "config.json").write_text(json.dumps(to_dict(cfg)))
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 10.0}\n')
    return run


def merge(*args: str) -> str:
    return merge_script.main([str(a) for a in args])


# ----------------------------------------------------------------------------------------- 1. merge.py --out refusals

@pytest.mark.parametrize("where,expected", [
    ("ckpt/step_000001", "it is .*step_000001"),
    ("ckpt/latest", "it is .*step_000001"),  # the symlink resolves to the checkpoint
    (".", "it is .*base"),  # the run directory
    ("..", "it contains .*base"),  # the run's parent: its other files must survive too
    ("ckpt", "contains .*step_000001"),  # inside the run, around the checkpoint: the first is named
    ("ckpt/step_000001/hf", "lies inside .*step_000001"),
])
def test_merge_refuses_the_checkpoint_the_run_and_around_them(run_dir, where, expected):
    """python merge.py --ckpt out/base --out out/base (or ckpt/, .., ...) used to delete ckpt/, metrics.jsonl and
    config.json (and with the parent, unrelated files); now it stops with a one-line message and changes nothing."""
    parent = run_dir.parent
    before = snapshot(parent)
    for overwrite in ([], ["--overwrite"]):
        with pytest.raises(SystemExit, match=f"^merge.py: refusing to write hf-model output to .*{expected}") as e:
            merge("--ckpt", run_dir, "--out", run_dir / where, *overwrite)
        assert "\n" not in str(e.value) and "choose an output directory outside it" in str(e.value)
        assert snapshot(parent) == before


def test_merge_refuses_a_directory_with_foreign_files_even_with_overwrite(run_dir, tmp_path):
    out = tmp_path / "hf"
    out.mkdir()
    (out / "weights.bin").write_text("not ours")
    for overwrite in ([], ["--overwrite"]):
        with pytest.raises(SystemExit, match="not empty and holds files nanoforge did not write.*nothing was changed"):
            merge("--ckpt", run_dir, "--out", out, *overwrite)
    assert sorted(p.name for p in out.iterdir()) == ["weights.bin"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no temp sibling left behind


def test_merge_reexport_needs_overwrite_and_replaces_only_its_own_export(run_dir, tmp_path):
    out = tmp_path / "hf"
    merge("--ckpt", run_dir, "--out", out)
    assert json.loads((out / MARKER).read_text())["kind"] == "hf-model"
    first = snapshot(out)
    with pytest.raises(SystemExit, match=r"already holds a hf-model output; pass --overwrite to replace it"):
        merge("--ckpt", run_dir, "--out", out)
    assert snapshot(out) == first
    merge("--ckpt", run_dir, "--out", out, "--overwrite", "--dtype", "bf16")
    with safe_open(out / "model.safetensors", framework="pt") as f:
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # the older export was swapped out and removed
    assert (run_dir / "metrics.jsonl").is_file() and (run_dir / "ckpt" / "latest" / "model.safetensors").is_file()


def test_merge_gguf_refuses_the_file_and_its_directory(tmp_path):
    (tmp_path / "models").mkdir()
    gguf = write_tiny_gguf(tmp_path / "models" / "tiny.gguf")
    (tmp_path / "models" / "readme.txt").write_text("keep")
    before = snapshot(tmp_path)
    for out, expected in ((gguf, "it is .*tiny.gguf"), (tmp_path / "models", "it contains .*tiny.gguf"),
                          (tmp_path, "it contains .*tiny.gguf")):
        with pytest.raises(SystemExit, match=f"^merge.py: refusing to write hf-model output to .*{expected}"):
            merge("--gguf", gguf, "--out", out, "--overwrite")
    assert snapshot(tmp_path) == before
    merge("--gguf", gguf, "--out", tmp_path / "hf")
    with pytest.raises(SystemExit, match="pass --overwrite"):
        merge("--gguf", gguf, "--out", tmp_path / "hf")
    merge("--gguf", gguf, "--out", tmp_path / "hf", "--overwrite")
    assert (tmp_path / "hf" / "model.safetensors").is_file() and (tmp_path / "models" / "readme.txt").is_file()


def test_save_pretrained_refuses_foreign_and_protected_targets(tmp_path):
    """save_pretrained used to shutil.rmtree(out_dir) whatever it held."""
    model = tiny_model()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("years of work")
    with pytest.raises(OutputError, match="holds files nanoforge did not write"):
        save_pretrained(model, tmp_path / "mine", overwrite=True)
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "years of work"
    with pytest.raises(OutputError, match="lies inside"):
        save_pretrained(model, tmp_path / "run" / "hf", protect=[tmp_path / "run"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


def test_gguf_cache_conversion_never_deletes_what_it_did_not_write(tmp_path):
    """resolve_model_dir used to rmtree <entry>.tmp and <entry> before converting into the cache."""
    gguf = write_tiny_gguf(tmp_path / "tiny.gguf")
    cache = tmp_path / "cache"
    st = gguf.stat()
    entry = cache / f"tiny-{st.st_size}-{int(st.st_mtime)}"
    (cache / (entry.name + ".tmp")).mkdir(parents=True)
    (cache / (entry.name + ".tmp") / "keep.txt").write_text("not the converter's")
    entry.mkdir()
    (entry / "keep.txt").write_text("not the converter's either")
    with pytest.raises(OutputError, match="holds files nanoforge did not write"):
        resolve_model_dir(gguf, cache)
    assert (entry / "keep.txt").is_file() and (cache / (entry.name + ".tmp") / "keep.txt").is_file()

    (entry / "keep.txt").unlink()
    assert resolve_model_dir(gguf, cache) == entry  # an empty entry is filled
    assert (entry / "config.json").is_file() and (cache / (entry.name + ".tmp") / "keep.txt").is_file()
    assert resolve_model_dir(gguf, cache) == entry  # and then reused
    assert sorted(p.name for p in cache.iterdir()) == [entry.name, entry.name + ".tmp"]


def test_a_target_that_appears_while_building_is_not_swapped_away(tmp_path):
    """Two writers of one new target (the ranks of a job converting the same GGUF file): the second to finish used
    to rename the first one's complete output aside and delete it; now it stops and leaves it."""
    target = tmp_path / "entry"
    with pytest.raises(OutputError, match="written by another process"):
        with output_dir(target, "hf-model") as tmp:
            (tmp / "config.json").write_text("mine")
            target.mkdir()
            (target / "config.json").write_text("the other writer's")
    assert (target / "config.json").read_text() == "the other writer's"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["entry"]


def test_stale_temps_of_dead_writers_go_and_others_stay(tmp_path):
    target = tmp_path / "entry"
    dead = tmp_path / f".entry.tmp-{socket.gethostname()}-999999999"  # no such process
    elsewhere = tmp_path / ".entry.tmp-another-host-999999999"  # a writer on another machine (same file system)
    live = tmp_path / f".entry.tmp-{socket.gethostname()}-{os.getppid()}"  # a running process
    for d in (dead, elsewhere, live):
        d.mkdir()
    with output_dir(target, "hf-model") as tmp:
        (tmp / "x").write_text("1")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([elsewhere.name, live.name, "entry"])


def test_only_our_swapped_out_outputs_are_removed_or_restored(tmp_path):
    """A .<name>.old-* sibling is removed (or put back) only when it carries our marker: a user's directory that
    happens to have such a name is never touched."""
    with output_dir(tmp_path / "entry", "hf-model") as tmp:  # the newer output, already in place
        (tmp / "x").write_text("1")
    host = socket.gethostname()
    ours = tmp_path / f".entry.old-{host}-999999999"  # swapped out by a writer killed before it removed it
    ours.mkdir()
    (ours / MARKER).write_text('{"kind": "hf-model"}')
    users = tmp_path / f".entry.old-{host}-999999998"  # not ours
    users.mkdir()
    (users / "notes.txt").write_text("mine")
    with output_dir(tmp_path / "entry", "hf-model", overwrite=True) as tmp:
        (tmp / "x").write_text("2")
    assert not ours.exists() and (users / "notes.txt").read_text() == "mine"
    assert (tmp_path / "entry" / "x").read_text() == "2"


# ------------------------------------------------------------------------ 12. ordinary, umask-respecting permissions

@pytest.fixture
def umask():
    def set_mask(mask: int) -> None:
        os.umask(mask)

    old = os.umask(0o022)
    yield set_mask
    os.umask(old)


def modes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root.parent)): stat.S_IMODE(p.stat().st_mode) for p in [root, *root.rglob("*")]}


@pytest.mark.parametrize("mask,file_mode,dir_mode", [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750)])
def test_exports_get_umask_permissions(umask, mask, file_mode, dir_mode, run_dir, tmp_path):
    """model.safetensors came out 0600 (safetensors' writer), a GGUF conversion's directory 0700 (mkdtemp)."""
    umask(mask)
    outs = [Path(merge("--ckpt", run_dir, "--out", tmp_path / "export")),
            Path(merge("--gguf", write_tiny_gguf(tmp_path / "tiny.gguf"), "--out", tmp_path / "converted")),
            save_pretrained(tiny_model(), tmp_path / "sharded", max_shard_bytes=100_000)]
    for out in outs:
        found = modes(out)
        assert any(name.endswith(".safetensors") for name in found)
        assert found == {name: dir_mode if (tmp_path / name).is_dir() else file_mode for name in found}


# ---------------------------------------------------------------------------- one streaming safetensors writer

def test_write_safetensors_round_trips_every_dtype_aligned(tmp_path):
    tensors = {"f32": torch.randn(3, 5), "bf16": torch.randn(7).bfloat16(), "f16": torch.randn(2, 2).half(),
               "i64": torch.arange(6).reshape(2, 3), "u8": torch.arange(5, dtype=torch.uint8),
               "flag": torch.tensor([True, False, True]), "scalar": torch.tensor(2.5)}
    path = tmp_path / "t.safetensors"
    write_safetensors(path, {k: (tuple(v.shape), v.dtype) for k, v in tensors.items()}, iter(tensors.items()))
    raw = path.read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    assert header_len % 8 == 0 and json.loads(raw[8:8 + header_len])["__metadata__"] == {"format": "pt"}
    with safe_open(path, framework="pt") as f:
        assert f.metadata() == {"format": "pt"} and sorted(f.keys()) == sorted(tensors)
        for name, t in tensors.items():
            assert f.get_tensor(name).dtype == t.dtype and torch.equal(f.get_tensor(name), t), name


def test_write_safetensors_refuses_a_stream_that_breaks_its_header(tmp_path):
    header = {"a": ((2,), torch.float32), "b": ((3,), torch.float32)}
    path = tmp_path / "t.safetensors"
    with pytest.raises(ValueError, match=r"got b \[3\].*next entry is a \[2\]"):
        write_safetensors(path, header, iter([("b", torch.zeros(3)), ("a", torch.zeros(2))]))
    with pytest.raises(ValueError, match=r"ended before b"):
        write_safetensors(path, header, iter([("a", torch.zeros(2))]))
    with pytest.raises(ValueError, match=r"got a \[2\] torch.float16"):
        write_safetensors(path, header, iter([("a", torch.zeros(2).half())]))
    assert not path.exists()  # no file whose header promises data it lacks


def test_gathered_checkpoint_file_is_the_plain_one_and_every_rank_gathers(tmp_path, monkeypatch):
    model = tiny_model()
    save_safetensors(model, tmp_path / "plain.safetensors")
    calls = []
    real = parallel.full_tensor
    monkeypatch.setattr(parallel, "full_tensor", lambda t: calls.append(t.shape) or real(t))
    checkpoint.save_safetensors_gathered(model, tmp_path / "gathered.safetensors", write=True)
    assert (tmp_path / "gathered.safetensors").read_bytes() == (tmp_path / "plain.safetensors").read_bytes()
    n_tensors = len(calls)
    assert n_tensors == len(model.state_dict()) - len(tied_names(model))  # a tied head is stored (and gathered) once
    calls.clear()
    checkpoint.save_safetensors_gathered(model, tmp_path / "other_rank.safetensors", write=False)
    assert len(calls) == n_tensors and not (tmp_path / "other_rank.safetensors").exists()


def test_one_safetensors_writer_and_one_dtype_table():
    import model.gguf
    import model.hf
    import training.checkpoint

    assert merge_script.DTYPES is DTYPES and parallel.DTYPES is DTYPES
    assert set(DTYPES) == {"fp32", "bf16", "fp16"}
    assert not hasattr(training.checkpoint, "SAFETENSORS_DTYPES")
    for module in (model.gguf, model.hf):
        source = Path(module.__file__).read_text()
        assert '"F32"' not in source and "save_file" not in source, module.__name__  # no second header writer


# --------------------------------------------------------------------------------------------------- layering

def test_model_imports_neither_data_nor_training():
    for path in sorted((ROOT / "model").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            for name in names:
                assert name.split(".")[0] not in ("data", "training"), f"{path.name} imports {name}"


def test_finetune_config_has_no_import_side_effect_and_resolves_at_start(monkeypatch, tmp_path):
    """Importing configs/finetune_smollm2.py used to locate (or download, 93 MB) the GGUF file."""
    from data.assets import resolve_model_source

    monkeypatch.setenv("NANOFORGE_SMOLLM2_GGUF", str(tmp_path / "missing.gguf"))
    config = runpy.run_path(str(ROOT / "configs" / "finetune_smollm2.py"))["config"]
    assert config.init_from == "smollm2"
    with pytest.raises(FileNotFoundError, match="NANOFORGE_SMOLLM2_GGUF=.*missing.gguf is not a file"):
        resolve_model_source(config.init_from)
    gguf = write_tiny_gguf(tmp_path / "tiny.gguf")
    monkeypatch.setenv("NANOFORGE_SMOLLM2_GGUF", str(gguf))
    assert resolve_model_source("smollm2") == str(gguf)
    assert resolve_model_source(str(tmp_path)) == str(tmp_path) and resolve_model_source("") == ""
    with pytest.raises(FileNotFoundError, match=r"'no/such/model' is not an existing .*known: smollm2"):
        resolve_model_source("no/such/model")
