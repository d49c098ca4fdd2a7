"""Config files, command-line overrides with type checking, and --help."""

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from model.granite_moe import GraniteMoeConfig
from model.llama import LlamaConfig
from model.rope import RopeScaling
from training.config import (RANGES, ConfigError, TrainConfig, apply_overrides, describe, flatten, from_dict,
                             load_config, parse_cli, to_dict)

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


def test_readme_config_reference_is_the_generated_table():
    """README's key table is exactly `python -m training.config`'s output (keys, defaults, descriptions)."""
    from training.config import reference_table

    readme = (ROOT / "README.md").read_text()
    table = reference_table()
    assert table in readme, "README's config reference is stale: paste `python -m training.config` into it"
    missing = [k for k in flatten(TrainConfig()) if f"| `{k}` |" not in readme]
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


@pytest.mark.parametrize("arg, message", [
    ("--optim.lr=-1", r"optim.lr must be in \[0, inf\), got -1.0"),
    ("--optim.lr=nan", "optim.lr=nan must be a finite number"),
    ("--optim.eps=0", r"optim.eps must be in \(0, inf\), got 0.0"),
    ("--optim.eps=nan", "optim.eps=nan must be a finite number"),
    ("--optim.weight_decay=-0.1", r"optim.weight_decay must be in \[0, inf\)"),
    ("--optim.beta1=1", r"optim.beta1 must be in \[0, 1\), got 1.0"),
    ("--optim.beta2=-0.5", r"optim.beta2 must be in \[0, 1\)"),
    ("--optim.grad_clip=-1", r"optim.grad_clip must be in \[0, inf\)"),
    ("--optim.grad_clip=inf", "optim.grad_clip=inf must be a finite number"),
    ("--schedule.warmup_steps=-3", r"schedule.warmup_steps must be in \[0, inf\), got -3"),
    ("--schedule.min_lr_ratio=1.5", r"schedule.min_lr_ratio must be in \[0, 1\]"),
    ("--schedule.decay_fraction=-0.1", r"schedule.decay_fraction must be in \[0, 1\]"),
    ("--schedule.div_factor=0.5", r"schedule.div_factor must be in \[1, inf\)"),
    ("--eval.interval=-1", r"eval.interval must be in \[0, inf\)"),
    ("--eval.batches=-2", r"eval.batches must be in \[0, inf\)"),
    ("--ckpt.interval=-5", r"ckpt.interval must be in \[0, inf\), got -5"),
    ("--ckpt.keep_last=0", r"ckpt.keep_last must be in \[1, inf\)"),
    ("--max_skipped_steps=-1", r"max_skipped_steps must be in \[0, inf\)"),
    ("--sample_every=-10", r"sample_every must be in \[0, inf\)"),
    ("--seed=-1", r"seed must be in \[0, inf\)"),
    ("--init_rope_theta=-1", r"init_rope_theta must be in \[0, inf\)"),
    ("--init_max_seq_len=-1", r"init_max_seq_len must be in \[0, inf\)"),
    ("--data.prepare_workers=0", r"data.prepare_workers must be in \[1, inf\)"),
    ("--data.val_fraction=nan", "data.val_fraction=nan must be a finite number"),
    ("--max_steps=0", r"max_steps must be in \[1, inf\), got 0"),
    ("--model.norm_eps=-1e-5", "LlamaConfig.norm_eps must be positive"),
    ("--model.rope_theta=0", "LlamaConfig.rope_theta must be positive"),
    ("--model.init_std=-0.02", "LlamaConfig.init_std must be >= 0"),
    ("--model.norm_eps=nan", "model.norm_eps=nan must be a finite number"),
])
def test_numbers_out_of_range_name_the_key_and_range(arg, message):
    with pytest.raises(ConfigError, match=message):
        load_config(str(ROOT / "configs/debug.py"), [arg])


@pytest.mark.parametrize("config_file, args, message", [
    ("debug_gemma2.py", ["--model.attn_softcap=-50"], "Gemma2Config.attn_softcap must be >= 0"),
    ("debug_gemma2.py", ["--model.query_pre_attn_scalar=0"], "Gemma2Config.query_pre_attn_scalar must be positive"),
    ("debug_gpt_oss.py", ["--model.swiglu_limit=-7"], "GptOssConfig.swiglu_limit must be positive"),
    ("debug_gpt_oss.py", ["--model.aux_loss_coef=-0.01"], "GptOssConfig.aux_loss_coef must be >= 0"),
    ("debug_gpt_oss.py", ["--model.rope_scaling.beta_slow=0"], "rope_scaling.beta_slow must be positive"),
    ("debug_gpt_oss.py", ["--model.rope_scaling.beta_fast=0.5"], r"beta_fast \(0.5\) must be >= beta_slow"),
    ("debug_granite_moe.py", ["--model.residual_multiplier=-0.2"],
     "GraniteMoeConfig.residual_multiplier must be positive"),
    ("debug.py", ["--model.rope_scaling.type=llama3", "--model.rope_scaling.low_freq_factor=0"],
     "rope_scaling.low_freq_factor must be positive"),
])
def test_model_numbers_out_of_range(config_file, args, message):
    with pytest.raises(ConfigError, match=message):
        load_config(str(ROOT / "configs" / config_file), args)


def test_model_configs_reject_nan_themselves():
    """from_pretrained and checkpoints validate model configs without a TrainConfig: NaN fails there too."""
    with pytest.raises(ValueError, match="LlamaConfig.norm_eps must be a finite number, got nan"):
        LlamaConfig(norm_eps=float("nan")).validate()
    with pytest.raises(ValueError, match="GraniteMoeConfig.logits_scaling must be a finite number"):
        GraniteMoeConfig(logits_scaling=float("nan")).validate()
    with pytest.raises(ValueError, match="rope_scaling.factor must be a finite number"):
        RopeScaling("linear", factor=float("nan")).validate()


def test_every_numeric_key_has_a_range():
    """A new int or float field outside `model` needs its valid range in RANGES, so validate() checks it."""
    numeric = [k for k, v in flatten(TrainConfig()).items()
               if not k.startswith("model.") and type(v) in (int, float)]
    assert sorted(set(numeric) - set(RANGES)) == []
    assert set(RANGES) <= set(numeric)


def test_cli_config_error_names_key_and_range():
    with pytest.raises(SystemExit, match=r"config error: optim.lr must be in \[0, inf\), got -1.0"):
        parse_cli(["configs/debug.py", "--optim.lr=-1"])
