"""Config files, command-line overrides with type checking, and --help."""

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from training.config import ConfigError, TrainConfig, apply_overrides, describe, flatten, from_dict, load_config, to_dict

ROOT = Path(__file__).resolve().parents[1]


def test_overrides_parse_to_field_types():
    cfg = load_config(str(ROOT / "configs/debug.py"),
                      ["--optim.lr=1e-3", "--model.n_layers", "3", "--compile=true", "--max_steps=1_000",
                       "--schedule.name=wsd", "--model.rope_scaling.type=llama3", "--out_dir=/tmp/x"])
    assert cfg.optim.lr == 1e-3 and isinstance(cfg.optim.lr, float)
    assert cfg.model.n_layers == 3 and type(cfg.model.n_layers) is int
    assert cfg.compile is True and cfg.max_steps == 1000
    assert cfg.schedule.name == "wsd" and cfg.model.rope_scaling.type == "llama3"
    assert cfg.out_dir == "/tmp/x"


@pytest.mark.parametrize("arg, message", [
    ("--optim.lrr=1", "did you mean --optim.lr"),
    ("--lr=1", "--optim.lr"),
    ("--model.nlayers=2", "--model.n_layers"),
    ("--max_steps=abc", "is not a valid int"),
    ("--max_steps=1.5", "is not a valid int"),
    ("--compile=maybe", "is not a bool"),
    ("--schedule.name=cosin", "did you mean 'cosine'"),
    ("--optim=3", "is a section"),
    ("stray", "unexpected argument"),
])
def test_bad_overrides_name_the_key(arg, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(TrainConfig(), [arg])


def test_wrong_type_in_config_file_and_invalid_values():
    cfg = TrainConfig()
    cfg.max_steps = "10"
    with pytest.raises(ConfigError, match="max_steps='10' should be a int"):
        cfg.validate()
    cfg = TrainConfig()
    cfg.data.seq_len = cfg.model.max_seq_len + 1
    with pytest.raises(ConfigError, match="exceeds model.max_seq_len"):
        cfg.validate()
    cfg = TrainConfig()
    cfg.model.n_heads = 7
    with pytest.raises(ConfigError, match="model config"):
        cfg.validate()


def test_top_level_keys_and_every_key_described():
    keys = flatten(TrainConfig())
    for k in ("max_steps", "out_dir", "seed"):
        assert k in keys
    undocumented = [k for k, _, doc in describe(TrainConfig()) if not doc]
    assert not undocumented, f"fields without a trailing comment: {undocumented}"


def test_readme_config_reference_lists_every_key():
    readme = (ROOT / "README.md").read_text()
    missing = [k for k in flatten(TrainConfig()) if f"`{k}`" not in readme]
    assert not missing, f"README's config reference misses {missing}"


def test_dict_round_trip():
    cfg = load_config(str(ROOT / "configs/debug.py"), ["--model.rope_scaling.factor=4"])
    again = from_dict(TrainConfig, to_dict(cfg))
    assert again == cfg and dataclasses.is_dataclass(again.model.rope_scaling)


def test_variant_config_imports_its_base(tmp_path):
    variant = tmp_path / "variant.py"
    variant.write_text("from dataclasses import replace\n"
                       "from configs.debug import config as base\n"
                       "config = replace(base, max_steps=7, optim=replace(base.optim, lr=0.5))\n")
    cfg = load_config(str(variant))
    assert cfg.max_steps == 7 and cfg.optim.lr == 0.5 and cfg.model.dim == 64


def test_missing_config_file_and_missing_config_object(tmp_path):
    with pytest.raises(ConfigError, match="not found; available: .*debug.py"):
        load_config(str(tmp_path / "nope.py"))
    bad = tmp_path / "bad.py"
    bad.write_text("cfg = 1\n")
    with pytest.raises(ConfigError, match="must define `config = TrainConfig"):
        load_config(str(bad))


def test_cli_help_lists_every_key_with_its_value():
    out = subprocess.run([sys.executable, "train.py", "configs/debug.py", "--max_steps=3", "--help"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    for key in flatten(TrainConfig()):
        assert f"--{key}=" in out
    assert "--max_steps=3 " in out and "--model.dim=64 " in out


def test_cli_unknown_key_exits_with_message():
    r = subprocess.run([sys.executable, "train.py", "configs/debug.py", "--optim.learning_rate=1"], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode != 0
    assert "unknown config key --optim.learning_rate" in r.stderr
