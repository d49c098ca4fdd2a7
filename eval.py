"""Evaluate a checkpoint. Prints one JSON line; a non-finite loss or perplexity is null there, named under
"nonfinite" with an "error", and the exit code is 1.

    python eval.py --ckpt out/shakespeare/ckpt/latest --task ppl                  # the run's validation shards
    python eval.py --ckpt out/shakespeare --task ppl --data some.txt              # a text file
    python eval.py --ckpt out/shakespeare --task ppl --data data/cache/shards/X --split train
    python eval.py --ckpt hf/SmolLM2-135M-Instruct --task ppl --data passage.txt    # an HF dir or .gguf too
    python eval.py --ckpt out/sft-smollm2-gsm --task ppl                          # an SFT run: its held-out samples

An SFT run is scored on its held-out split's learnable tokens only (the assistant replies), packed as in training.

--data is a token-shard directory (made by data/prepare.py; --split picks train or val) or a text file,
which is tokenised with the checkpoint's tokenizer and cut into windows of the training sequence length (for an
HF directory or GGUF file, which has no run: --data is a text file, windows of min(1024, context) tokens).
"""

import argparse
import json
import math
import sys
from pathlib import Path

import torch

from data.loader import TokenLoader
from data.prepare import default_shard_dir
from data.tokenizer import load_tokenizer
from training.checkpoint import load_model, resolve
from training.device import autocast_context, pick_device
from training.evaluation import evaluate
from training.generation import load_for_inference


def text_batches(path: Path, tokenizer, seq_len: int, batch_size: int):
    """Consecutive windows of seq_len+1 tokens (stride seq_len) over one text file, in batches."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise SystemExit(f"{path} is not valid UTF-8 ({e}); convert it to UTF-8 first") from None
    ids = torch.tensor(tokenizer.encode(text), dtype=torch.long)
    n_windows = (len(ids) - 1) // seq_len
    if n_windows < 1:
        raise SystemExit(f"{path} has {len(ids)} tokens, fewer than one window of seq_len+1={seq_len + 1}; "
                         f"pass a longer text or --seq_len smaller")
    windows = torch.stack([ids[i * seq_len: i * seq_len + seq_len + 1] for i in range(n_windows)])  # (N, T+1)
    for start in range(0, n_windows, batch_size):
        w = windows[start:start + batch_size]
        yield w[:, :-1], w[:, 1:]


def main(argv: list[str]) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", required=True, help="checkpoint dir, its ckpt/ parent, the run dir, an HF model dir "
                                                  "or a .gguf file")
    ap.add_argument("--task", default="ppl", choices=["ppl"], help="ppl: loss, perplexity and token accuracy")
    ap.add_argument("--data", default="", help="token-shard dir or text file (default: the run's own shards)")
    ap.add_argument("--split", default="val", choices=["train", "val"], help="split of a shard dir")
    ap.add_argument("--batches", type=int, default=0, help="evaluate at most N batches (0 = all)")
    ap.add_argument("--batch_size", type=int, default=0, help="default: the training batch size")
    ap.add_argument("--seq_len", type=int, default=0, help="default: the training sequence length")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"])
    args = ap.parse_args(argv)
    for flag in ("batches", "batch_size", "seq_len"):
        if getattr(args, flag) < 0:
            ap.error(f"--{flag} must be >= 0 (0 = {'all' if flag == 'batches' else 'the training value'}), "
                     f"got {getattr(args, flag)}")

    device = pick_device(args.device)
    try:
        source = str(resolve(args.ckpt))
    except FileNotFoundError:
        source = None
    if source is None:  # a pretrained model: no run, no shards
        if not args.data or not Path(args.data).is_file():
            raise SystemExit(f"{args.ckpt} is not a nanoforge checkpoint; evaluating a pretrained model needs "
                             f"--data pointing at a text file")
        model, tokenizer = load_for_inference(args.ckpt, device, "fp32")
        seq_len = args.seq_len or min(1024, model.config.max_seq_len)
        if seq_len > model.config.max_seq_len:
            raise SystemExit(f"--seq_len={seq_len} exceeds the model's max_seq_len={model.config.max_seq_len}")
        batches = text_batches(Path(args.data), tokenizer, seq_len, args.batch_size or 1)
        with autocast_context(args.dtype, device):
            r = evaluate(model, batches, args.batches, device, progress=True)
        return report(args.task, args.ckpt, args.data, r)

    model, cfg = load_model(args.ckpt, device)
    seq_len = args.seq_len or cfg.data.seq_len
    batch_size = args.batch_size or cfg.data.batch_size
    if seq_len > cfg.model.max_seq_len:
        raise SystemExit(f"--seq_len={seq_len} exceeds the model's max_seq_len={cfg.model.max_seq_len}")
    d = cfg.data
    if d.kind == "sft" and not args.data:  # the run's packed SFT split, scored on its learnable (assistant) tokens
        from data.packing import PackedLoader
        from data.sft import SFTShards

        data = Path(d.shard_dir)
        try:
            batches = PackedLoader(SFTShards(data, args.split), d.max_tokens, shuffle=False, too_long="truncate")
        except (FileNotFoundError, ValueError) as e:
            raise SystemExit(f"cannot read the run's SFT data: {e}") from None
        with autocast_context(args.dtype, device):
            r = evaluate(model, batches, args.batches, device, progress=True)
        return report(args.task, source, data, r)
    data = Path(args.data or d.shard_dir or default_shard_dir(d.corpus, d.files, d.tokenizer, d.val_fraction, d.text_key))
    if data.is_dir():
        batches = TokenLoader(str(data), args.split, batch_size, seq_len, shuffle=False)
        if batches.meta["tokenizer"] != cfg.data.tokenizer:
            raise SystemExit(f"{data} was tokenised with {batches.meta['tokenizer']!r} but the model was trained "
                             f"with {cfg.data.tokenizer!r}; prepare the data with --tokenizer {cfg.data.tokenizer}")
    elif data.is_file():
        batches = text_batches(data, load_tokenizer(cfg.data.tokenizer), seq_len, batch_size)
    else:
        raise SystemExit(f"--data {data} does not exist (give a token-shard dir or a text file)")
    with autocast_context(args.dtype, device):
        r = evaluate(model, batches, args.batches, device, progress=True)
    return report(args.task, source, data, r)


def report(task: str, source: str, data, r: dict) -> dict:
    """Print the result as one line of strict JSON and return it. A non-finite loss or perplexity (NaN weights,
    an overflow) is written as null, listed under "nonfinite" and explained under "error"; the exit code is then 1."""
    if r["val_tokens"] == 0:
        raise SystemExit(f"evaluation of {source} on {data} scored 0 tokens (every label masked, or no batch read); "
                         f"nothing to report: check --data, --split, --batches and --batch_size")
    result = {"task": task, "ckpt": str(source), "data": str(data), "loss": r["val_loss"], "ppl": r["val_ppl"],
              "token_acc": r["val_token_acc"], "tokens": r["val_tokens"]}
    nonfinite = [k for k, v in result.items() if isinstance(v, float) and not math.isfinite(v)]
    if nonfinite:
        result.update({k: None for k in nonfinite})
        result["nonfinite"] = nonfinite
        result["error"] = (f"non-finite {' and '.join(nonfinite)} over {r['val_tokens']} tokens: the weights hold "
                           f"NaN/inf or the forward overflows (try --dtype fp32)")
    print(json.dumps(result, allow_nan=False))
    return result


if __name__ == "__main__":
    sys.exit(1 if "error" in main(sys.argv[1:]) else 0)
