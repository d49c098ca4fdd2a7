"""Configs are Python files that build a `TrainConfig`; the command line overrides its fields.

    config = TrainConfig(out_dir="out/x", model=LLAMA_CONFIGS["debug"], ...)     # configs/x.py
    python train.py configs/x.py --optim.lr=1e-3 --model.n_layers=4 --max_steps 50

Every override is parsed to the type of the field it names (the type on the dataclass that holds it, so
any model family's config works). An unknown key or a value of the wrong type stops with an error that
names it and the closest valid keys. `--help` lists every key with its current value and description,
taken from the comment that follows the field in its source.
"""

import copy
import dataclasses
import difflib
import importlib.util
import inspect
import math
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from model import MODELS, ModelConfig
from model.llama import LlamaConfig


@dataclass
class DataConfig:
    kind: Literal["pretrain", "sft"] = "pretrain"  # pretrain: windows of a token stream (corpus, seq_len, batch_size); sft: conversations packed to max_tokens, assistant-only loss (data/sft.py, data/packing.py)
    corpus: str = "shakespeare"  # a known corpus name (shakespeare), or a path: file, directory or glob of .txt/.jsonl/.jsonl.zst; for sft, the training file(s): .jsonl, .json, .parquet
    files: str = "*"  # comma-separated glob(s) on file names to keep inside the corpus, e.g. "*_gut.txt"
    shard_dir: str = ""  # where token shards live; "" = data/cache/shards/<corpus>-<tokenizer>; prepared when missing
    tokenizer: str = "auto"  # auto = init_from's own tokenizer, else gpt2; or a name (gpt2, cl100k_base, o200k_base, o200k_harmony), a model directory, a .tiktoken or SentencePiece .model file
    val_fraction: float = 0.05  # fraction of documents held out for validation
    text_key: str = "text"  # JSON field holding a document's text in .jsonl corpora
    prepare_workers: int = 2  # processes used to tokenise the corpus
    skip_bad_files: bool = False  # corpus files that cannot be read (truncated .zst, bad JSON) are skipped and listed in meta.json instead of stopping the preparation
    seq_len: int = 256  # tokens per training sequence (context length)
    batch_size: int = 8  # sequences per micro-batch, for the whole job: each of N torchrun processes reads batch_size / N
    grad_accum: int = 1  # micro-batches per optimizer step
    format: Literal["auto", "messages", "sharegpt", "prompt_completion", "alpaca", "qa"] = "auto"  # sft: row format (auto = detected from the fields)
    val_files: str = ""  # sft: held-out file(s); "" = val_fraction of the training samples
    chat_template: str = "auto"  # sft: auto = the tokenizer's own; a name (chatml, llama3, qwen3, gemma, granite, harmony, llama2) or a jinja file
    system_prompt: str = ""  # sft: system message added to conversations that have none
    train_on: Literal["assistant", "all", "last"] = "assistant"  # sft: learn the assistant replies (and their end tokens), the whole conversation, or the last reply only
    special_tokens_in_content: bool = False  # sft: special-token text inside message content becomes special ids (default: encoded as plain text)
    add_missing_tokens: bool = True  # sft: add the special tokens the template needs but the vocabulary lacks (embedding grows, new rows at the mean)
    skip_bad_rows: bool = False  # sft: skip (and count) rows that cannot be read instead of stopping
    max_tokens: int = 4096  # sft: token budget of each packed micro-batch (per process)
    too_long: Literal["error", "truncate", "drop"] = "error"  # sft: a sample longer than max_tokens stops the run, is truncated, or is dropped (counted)
    padded: bool = False  # sft: one padded row per sample instead of packing (the baseline; same samples per micro-batch)


@dataclass
class OptimConfig:
    lr: float = 3e-4  # peak learning rate
    weight_decay: float = 0.1  # AdamW decoupled weight decay, on matrices only (not norms, biases, embeddings)
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.95  # AdamW beta2
    eps: float = 1e-8  # AdamW epsilon
    grad_clip: float = 1.0  # clip the global gradient norm to this value; 0 disables clipping


@dataclass
class ScheduleConfig:
    name: Literal["cosine", "onecycle", "wsd", "constant"] = "cosine"  # LR schedule: warmup+cosine, one-cycle cosine, warmup-stable-decay, warmup+constant
    warmup_steps: int = 100  # linear warm-up steps (cosine, wsd, constant); the rise of one-cycle
    min_lr_ratio: float = 0.1  # final LR as a fraction of the peak
    decay_fraction: float = 0.2  # wsd: fraction of max_steps spent in the final decay
    decay_shape: Literal["linear", "sqrt"] = "linear"  # wsd: decay to the minimum linearly or as 1-sqrt
    div_factor: float = 25.0  # onecycle: the LR starts at lr / div_factor and rises (cosine) to lr


TASKS = ("mmlu", "malaymmlu", "gsm8k")  # what eval.tasks may name (training.tasks runs them)


def task_names(text: str) -> list[str]:
    """The task names of a comma-separated eval.tasks value."""
    return [t.strip() for t in text.split(",") if t.strip()]


@dataclass
class TaskConfig:
    mmlu_data: str = ""  # mmlu: questions {subject, question, choices[4], answer} (.jsonl, .json, .parquet; the real MMLU's .csv files or their directory)
    mmlu_fewshot_data: str = ""  # mmlu: the dev split few-shot examples come from; "" = the questions themselves (never a question's own)
    fewshot_pool: Literal["subject", "all"] = "subject"  # mmlu: examples from the question's own subject (MMLU's per-subject dev split) or the first of the whole file
    malaymmlu_data: str = ""  # malaymmlu: questions {prompt, options, key, subject, category} (.json, .jsonl, .parquet)
    gsm8k_data: str = ""  # gsm8k: questions {question, answer ending in "#### N"} (.jsonl, .json, .parquet)
    gsm8k_fewshot_data: str = ""  # gsm8k: the train file few-shot examples come from; "" = the questions themselves (never a question's own)
    shots: int = 0  # few-shot examples per prompt (mmlu, gsm8k)
    chat: bool = False  # render prompts through the tokenizer's chat template instead of lm-evaluation-harness's plain text
    instruction: str = "auto"  # gsm8k --chat: text before the question in the user's message; auto = ask for step-by-step reasoning ending in "#### N"; "" = the bare question (as the SFT configs train)
    limit: int = 0  # score the first N questions of each file; 0 = all
    generative: bool = False  # malaymmlu: answer by generation (the \boxed{} letter, first-sample and any-of-N accuracy) instead of log-likelihood
    system_prompt: str = ""  # malaymmlu generative: the system prompt; "" = the built-in reasoning prompt
    samples: int = 1  # generation: answers per question (pass@N for gsm8k, any-of-N for malaymmlu); > 1 needs temperature > 0
    temperature: float = 0.0  # generation: 0 = greedy
    top_p: float = 1.0  # generation: nucleus mass; 1 = off
    max_new_tokens: int = 256  # generation: tokens per answer (an answer that reaches it is counted as truncated)
    batch_size: int = 32  # generation: prompts decoded together (sorted by length; a finished one leaves the batch)
    max_tokens: int = 8192  # scoring: tokens per forward of prompt + choice sequences
    seed: int = 0  # generation: sampling seed


@dataclass
class EvalConfig:
    interval: int = 100  # evaluate every N steps (and at the end); 0 = only at the end
    batches: int = 20  # validation batches per evaluation (0 = the whole split); for sft, micro-batches of each process
    at_start: bool = False  # also evaluate before the first step (the baseline a fine-tune is compared against)
    tasks: str = ""  # comma-separated tasks also run at each evaluation: mmlu, malaymmlu, gsm8k (settings under eval.task); their metrics are logged as <task>_<metric>
    task: TaskConfig = field(default_factory=TaskConfig)


@dataclass
class LogConfig:
    interval: int = 10  # console line and metrics.jsonl record every N steps
    wandb_project: str = ""  # log to Weights & Biases under this project when set (WANDB_MODE=offline works)
    wandb_run: str = ""  # wandb run name; "" = the out_dir's name


@dataclass
class CkptConfig:
    interval: int = 500  # save a checkpoint every N steps (and at the end); 0 = only at the end
    keep_last: int = 2  # keep this run's newest K checkpoints (other runs' checkpoints in ckpt/ are never pruned)
    resume: bool = True  # resume from out_dir/ckpt/latest when it exists; false = start from scratch (refused beside existing checkpoints unless move_aside)
    resume_from: str = ""  # resume from this checkpoint (a step_N dir, a ckpt/ dir or a run dir) instead of latest; it may be another run's
    move_aside: bool = False  # allow a fresh start (or a resume from an older checkpoint) beside existing checkpoints by moving them into ckpt/old-<time>/; never deletes


@dataclass
class ParallelConfig:
    fsdp_single: bool = False  # shard with FSDP2 even at world size 1 (always on when torchrun starts more than one process)
    param_dtype: Literal["auto", "fp32", "bf16"] = "auto"  # FSDP2 compute dtype of the gathered parameters; auto = bf16 when dtype resolves to bf16, else fp32
    reduce_dtype: Literal["fp32", "bf16"] = "fp32"  # FSDP2 dtype of the gradient reduce-scatter
    reshard_after_forward: bool = True  # free each block's gathered parameters after its forward (gather again in backward)
    activation_checkpointing: Literal["none", "selective", "full"] = "none"  # recompute block activations in backward: none, every ac_every-th block, or every block
    ac_every: int = 2  # selective activation checkpointing: blocks 0, k, 2k, ...
    timeout_s: int = 600  # a collective that waits longer (a rank died or hangs) fails the job


@dataclass
class TrainConfig:
    out_dir: str = "out/run"  # run directory: config.json, metrics.jsonl, ckpt/
    seed: int = 1337  # seed for initialisation and data order
    max_steps: int = 1000  # optimizer steps to train for
    epochs: int = 0  # sft: train for this many passes over the data instead (max_steps is then computed from the packing plan); 0 = use max_steps
    device: str = "auto"  # auto (cuda if available, else cpu), cpu, cuda, cuda:N
    dtype: Literal["auto", "fp32", "bf16"] = "auto"  # autocast dtype: auto = bf16 on CUDA, fp32 on CPU
    compile: bool = False  # torch.compile the model
    on_nan: Literal["stop", "skip"] = "stop"  # non-finite loss or grad norm: stop the run, or skip that step
    max_skipped_steps: int = 10  # on_nan=skip: stop after this many consecutive skipped steps
    sample_every: int = 0  # print a sample from the model every N steps; 0 = never
    init_from: str = ""  # start from a Hugging Face model directory or .gguf file: its shape and weights replace `model` (model.attn_backend still applies)
    init_rope_theta: float = 0.0  # with init_from: override the model's RoPE theta (raise it to extend the context); 0 = keep
    init_max_seq_len: int = 0  # with init_from: override the model's context length; 0 = keep
    model: ModelConfig = field(default_factory=LlamaConfig)  # any family's config (model.MODELS); configs/ files pick it
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    ckpt: CkptConfig = field(default_factory=CkptConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def validate(self) -> None:
        """ConfigError naming the first key with a value of the wrong type, a NaN or infinite float, or a number
        outside its range in RANGES; then the checks across keys and the model config's own validate()."""
        for key, value in flatten(self).items():
            check_value(self, key, value)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{key}={value} must be a finite number")
        for key, interval in RANGES.items():
            check_range(key, get_key(self, key), interval)
        if self.epochs and self.data.kind != "sft":
            raise ConfigError(f"epochs={self.epochs} applies to data.kind='sft' (pretraining streams have no epochs to "
                              f"count); set --max_steps instead")
        if self.data.kind == "pretrain" and self.data.seq_len > self.model.max_seq_len:
            raise ConfigError(f"data.seq_len={self.data.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}; "
                              f"lower --data.seq_len or raise --model.max_seq_len")
        for name in task_names(self.eval.tasks):
            if name not in TASKS:
                close = difflib.get_close_matches(name, TASKS, n=1)
                raise ConfigError(f"eval.tasks names {name!r}, not one of {list(TASKS)}"
                                  + (f" (did you mean {close[0]!r}?)" if close else ""))
            if not getattr(self.eval.task, f"{name}_data"):
                raise ConfigError(f"eval.tasks runs {name} but eval.task.{name}_data is empty; give its questions' file "
                                  f"(--eval.task.{name}_data=PATH)")
        if hasattr(self.model, "validate"):
            try:
                self.model.validate()
            except ValueError as e:
                raise ConfigError(f"model config: {e}") from None


# The valid range of every numeric key outside `model` (whose family config checks its own), as an interval:
# [ and ] include the end, ( and ) leave it out. Where 0 is in range it is the off / default value the key's
# comment gives.
RANGES: dict[str, str] = {
    "seed": "[0, inf)",  # numpy's generators take no negative seed
    "max_steps": "[1, inf)",
    "max_skipped_steps": "[0, inf)",
    "sample_every": "[0, inf)",
    "init_rope_theta": "[0, inf)",
    "init_max_seq_len": "[0, inf)",
    "data.val_fraction": "(0, 1)",
    "data.prepare_workers": "[1, inf)",
    "data.seq_len": "[1, inf)",
    "data.batch_size": "[1, inf)",
    "data.grad_accum": "[1, inf)",
    "data.max_tokens": "[1, inf)",
    "epochs": "[0, inf)",
    "optim.lr": "[0, inf)",
    "optim.weight_decay": "[0, inf)",
    "optim.beta1": "[0, 1)",
    "optim.beta2": "[0, 1)",
    "optim.eps": "(0, inf)",  # 0 divides by zero where a gradient's second moment is 0
    "optim.grad_clip": "[0, inf)",
    "schedule.warmup_steps": "[0, inf)",
    "schedule.min_lr_ratio": "[0, 1]",
    "schedule.decay_fraction": "[0, 1]",
    "schedule.div_factor": "[1, inf)",  # onecycle starts at lr / div_factor and rises to lr
    "eval.interval": "[0, inf)",
    "eval.batches": "[0, inf)",  # 0 = the whole validation split
    "eval.task.shots": "[0, inf)",
    "eval.task.limit": "[0, inf)",
    "eval.task.samples": "[1, inf)",
    "eval.task.temperature": "[0, inf)",
    "eval.task.top_p": "(0, 1]",
    "eval.task.max_new_tokens": "[1, inf)",
    "eval.task.batch_size": "[1, inf)",
    "eval.task.max_tokens": "[1, inf)",
    "eval.task.seed": "[0, inf)",
    "log.interval": "[1, inf)",
    "ckpt.interval": "[0, inf)",
    "ckpt.keep_last": "[1, inf)",
    "parallel.ac_every": "[1, inf)",
    "parallel.timeout_s": "[1, inf)",
}


def check_range(key: str, value: float, interval: str) -> None:
    """ConfigError unless `value` lies in `interval`, written like "[0, 1)" (see RANGES)."""
    low, high = (float(end) for end in interval[1:-1].split(","))
    above = value >= low if interval[0] == "[" else value > low
    below = value <= high if interval[-1] == "]" else value < high
    if not (above and below):
        raise ConfigError(f"{key} must be in {interval}, got {value!r}")


class ConfigError(ValueError):
    pass


# ----------------------------------------------------------------------------- keys and values

def flatten(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """{'optim.lr': 3e-4, 'model.rope_scaling.type': 'none', ...} for every leaf field."""
    out = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            out.update(flatten(value, f"{prefix}{f.name}."))
        else:
            out[prefix + f.name] = value
    return out


def get_key(cfg: Any, key: str) -> Any:
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _owner_and_type(cfg: Any, key: str) -> tuple[Any, str, Any]:
    *path, name = key.split(".")
    owner = cfg
    for part in path:
        owner = getattr(owner, part)
    return owner, name, typing.get_type_hints(type(owner))[name]


def parse_value(key: str, text: str, typ: Any) -> Any:
    """Parse `text` to `typ` (bool, int, float, str, Literal[...], Optional[...]); ConfigError if it does not fit."""
    origin, args = typing.get_origin(typ), typing.get_args(typ)
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        if text.lower() in ("none", "null"):
            return None
        return parse_value(key, text, next(a for a in args if a is not type(None)))
    if origin is Literal:
        if text not in args:
            close = difflib.get_close_matches(text, [str(a) for a in args], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"--{key}={text!r} is not one of {list(args)}{hint}")
        return text
    if typ is bool:
        low = text.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"--{key}={text!r} is not a bool (use true or false)")
    try:
        if typ is int:
            value = float(text.replace("_", ""))
            if not value.is_integer():
                raise ValueError
            return int(value)
        if typ is float:
            return float(text)
    except ValueError:
        raise ConfigError(f"--{key}={text!r} is not a valid {typ.__name__}") from None
    if typ is str:
        return text
    raise ConfigError(f"--{key} has type {typ}, which cannot be set from the command line")


def check_value(cfg: Any, key: str, value: Any) -> None:
    """Type-check a value already in the config (a config file may set a wrong type too)."""
    _, _, typ = _owner_and_type(cfg, key)
    if typing.get_origin(typ) is Literal:
        if value not in typing.get_args(typ):
            raise ConfigError(f"{key}={value!r} is not one of {list(typing.get_args(typ))}")
        return
    if typ in (int, str, bool) and not (type(value) is typ):
        raise ConfigError(f"{key}={value!r} should be a {typ.__name__}, got {type(value).__name__}")
    if typ is float and not (isinstance(value, (int, float)) and not isinstance(value, bool)):
        raise ConfigError(f"{key}={value!r} should be a float, got {type(value).__name__}")


def set_key(cfg: Any, key: str, text: str) -> None:
    valid = flatten(cfg)
    if key not in valid:
        sections = {k.rsplit(".", 1)[0] for k in valid if "." in k}
        if key in sections:
            raise ConfigError(f"--{key} is a section, not a key; set its fields, e.g. --{key}.{next(k for k in valid if k.startswith(key + '.')).split('.')[-1]}=...")
        close = difflib.get_close_matches(key, valid, n=3, cutoff=0.5)
        if not close:  # fall back to keys sharing the last component
            close = [k for k in valid if k.split(".")[-1] == key.split(".")[-1]][:3]
        hint = f"; did you mean {', '.join('--' + c for c in close)}?" if close else ""
        raise ConfigError(f"unknown config key --{key}{hint} (python train.py CONFIG --help lists every key)")
    owner, name, typ = _owner_and_type(cfg, key)
    setattr(owner, name, parse_value(key, text, typ))


def override_pairs(argv: list[str]) -> list[tuple[str, str]]:
    """(key, text) of each `--a.b=value` / `--a.b value` argument, in order."""
    pairs, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}; overrides look like --optim.lr=1e-3")
        if "=" in arg:
            key, text = arg[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(argv):
                raise ConfigError(f"{arg} needs a value, e.g. {arg}=VALUE")
            key, text = arg[2:], argv[i + 1]
            i += 2
        pairs.append((key.replace("-", "_"), text))
    return pairs


def apply_overrides(cfg: Any, argv: list[str]) -> None:
    """Apply `--a.b=value` / `--a.b value` arguments in order."""
    for key, text in override_pairs(argv):
        set_key(cfg, key, text)


def reapply_model_overrides(cfg: "TrainConfig", argv: list[str]) -> None:
    """With init_from, cfg.model has been replaced by the pretrained model's own config after the command line was
    applied: apply the `--model.*` overrides of `argv` (train.py's, config file first) to it again, so that none is
    dropped silently. One that would change a tensor's name or shape (dim, n_layers, vocab_size, ffn_dim, ...) is a
    ConfigError naming it: the pretrained weights fix those."""
    from model import build_model  # the tensor shapes, from a model built on the meta device

    def shapes(model_cfg: ModelConfig) -> dict[str, tuple]:
        return {name: tuple(t.shape) for name, t in build_model(model_cfg).state_dict().items()}

    pretrained = shapes(cfg.model)
    refused = []
    for key, text in override_pairs(argv[1:]):
        if not key.startswith("model."):
            continue
        before = copy.deepcopy(cfg.model)
        try:
            set_key(cfg, key, text)
        except ConfigError as e:
            raise ConfigError(f"{e} (with init_from={cfg.init_from!r}, --model.* keys apply to the pretrained "
                              f"model's {type(cfg.model).__name__})") from None
        if shapes(cfg.model) != pretrained:
            refused.append(f"--{key}={text}")
            cfg.model = before
    if refused:
        raise ConfigError(f"{', '.join(refused)} would change the shape of the weights of init_from="
                          f"{cfg.init_from!r}, which fix it: drop {'it' if len(refused) == 1 else 'them'} (keys that "
                          f"change no tensor shape, such as model.kernels.* or model.attn_backend, apply)")


# ----------------------------------------------------------------------------- loading and help

def load_config(path: str, argv: list[str] = ()) -> TrainConfig:
    """Run the config file, take its `config`, apply overrides, validate."""
    file = Path(path)
    if not file.is_file():
        others = sorted(p.name for p in Path("configs").glob("*.py") if p.name != "__init__.py")
        raise ConfigError(f"config file {path!r} not found; available: {', '.join(others)}")
    spec = importlib.util.spec_from_file_location(f"_nanoforge_config_{file.stem}", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = getattr(module, "config", None)
    if not isinstance(cfg, TrainConfig):
        raise ConfigError(f"{path} must define `config = TrainConfig(...)`, found {type(cfg).__name__}")
    cfg = copy.deepcopy(cfg)  # a config may share objects with others (e.g. LLAMA_CONFIGS entries): never mutate those
    apply_overrides(cfg, list(argv))
    cfg.validate()
    return cfg


def field_docs(cls: type) -> dict[str, str]:
    """The trailing `# comment` of each field in a dataclass's source."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    return dict(re.findall(r"^\s+(\w+)\s*:[^#\n]*#\s*(.+)$", source, flags=re.M))


def describe(cfg: Any, prefix: str = "") -> list[tuple[str, Any, str]]:
    """(key, current value, description) for every leaf field, in declaration order."""
    docs = field_docs(type(cfg))
    rows = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            rows += describe(value, f"{prefix}{f.name}.")
        else:
            rows.append((prefix + f.name, value, docs.get(f.name, "")))
    return rows


def help_text(cfg: TrainConfig, path: str) -> str:
    rows = describe(cfg)
    width = max(len(k) + len(repr(v)) for k, v, _ in rows) + 4
    lines = [f"usage: python train.py {path} [--key=value ...]", "", "keys (current value) and what they do:"]
    lines += [f"  --{k}={v!r}".ljust(width + 4) + f"  {d}" for k, v, d in rows]
    return "\n".join(lines)


def reference_table(cfg: "TrainConfig | None" = None) -> str:
    """The README's config reference: one markdown row per key of `cfg` (default TrainConfig()), from the same
    fields and comments as --help, so the two cannot drift (tests/test_config.py compares them).

        python -m training.config > /tmp/ref.md     # regenerate it"""
    rows = ["| key | default | what it does |", "|---|---|---|"]
    rows += [f"| `{k}` | `{v!r}` | {d.replace('|', '/')} |" for k, v, d in describe(cfg or TrainConfig())]
    return "\n".join(rows)


MODEL_CONFIG_KEY = "config_class"  # in a saved model config: which family's config class it is


def to_dict(cfg: Any) -> dict:
    """A plain dict of a config; a model config also records its class name, so that from_dict rebuilds it."""
    out = dataclasses.asdict(cfg)
    if isinstance(cfg, TrainConfig):
        out["model"][MODEL_CONFIG_KEY] = type(cfg.model).__name__
    return out


def from_dict(cls: type, data: dict) -> Any:
    """Rebuild a (nested) config dataclass from `to_dict` output, e.g. a run's config.json."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        value, typ = data[f.name], hints[f.name]
        if typing.get_origin(typ) in (typing.Union, types.UnionType):
            by_name = {c.__name__: c for c in MODELS}  # the model field: its family from the saved class name
            typ = by_name[value.get(MODEL_CONFIG_KEY, LlamaConfig.__name__)]
        kwargs[f.name] = from_dict(typ, value) if dataclasses.is_dataclass(typ) else value
    return cls(**kwargs)


def parse_cli(argv: list[str]) -> TrainConfig:
    """`train.py CONFIG [--key=value ...] [--help]`."""
    if not argv or argv[0].startswith("-"):
        print("usage: python train.py configs/NAME.py [--key=value ...]   (--help after the config lists the keys)")
        sys.exit(0 if argv and argv[0] in ("-h", "--help") else 2)
    path, rest = argv[0], argv[1:]
    try:
        if "--help" in rest or "-h" in rest:
            cfg = load_config(path, [a for a in rest if a not in ("--help", "-h")])
            print(help_text(cfg, path))
            sys.exit(0)
        return load_config(path, rest)
    except ConfigError as e:
        raise SystemExit(f"config error: {e}") from None


if __name__ == "__main__":
    print(reference_table())
