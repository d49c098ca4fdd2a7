"""Export to a Hugging Face model directory that transformers loads (LoRA merging arrives with fine-tuning).

    python merge.py --ckpt out/shakespeare/ckpt/latest --out hf/shakespeare           # one of our checkpoints
    python merge.py --ckpt out/sft --out hf/sft --dtype bf16
    python merge.py --gguf SmolLM2-135M-Instruct.Q4_1.gguf --out hf/smollm2             # a llama.cpp GGUF file
    python merge.py --ckpt out/sft --out hf/sft --overwrite                           # replace an earlier export

The output holds config.json, model.safetensors (or <= 5 GB shards with model.safetensors.index.json),
generation_config.json and the tokenizer files; `AutoModelForCausalLM.from_pretrained(out)` gives the same
logits as our model. It is built in a temporary sibling of --out and renamed into place. --out must be new or
empty, or (with --overwrite) an earlier export of ours; it may never be the checkpoint, its run directory, the
GGUF file, or a directory inside or around them. Nothing is deleted that this script did not write.
"""

import argparse
import sys
from pathlib import Path

from model.files import OutputError, check_output_dir
from model.weights import DTYPES, HF_MODEL_KIND


def protected_paths(ckpt: Path) -> list[Path]:
    """What an export of checkpoint `ckpt` (a resolved checkpoint directory) must never touch: the checkpoint, and
    its run directory when it sits in <run>/ckpt/step_N."""
    ckpt = ckpt.resolve()
    return [ckpt, ckpt.parent.parent] if ckpt.parent.name == "ckpt" else [ckpt]


def main(argv: list[str]) -> str:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = ap.add_mutually_exclusive_group(required=True)
    source.add_argument("--ckpt", help="our checkpoint: a run dir, ckpt/latest or ckpt/step_N")
    source.add_argument("--gguf", help="a llama.cpp GGUF file to convert")
    ap.add_argument("--out", required=True, help="the HF model directory to write: new or empty (see --overwrite)")
    ap.add_argument("--overwrite", action="store_true", help="replace --out if it holds an earlier export of ours")
    ap.add_argument("--dtype", default=None, choices=list(DTYPES), help="weights' dtype (default: as trained, or "
                                                                       "float32 for a GGUF)")
    ap.add_argument("--max_shard_gb", type=float, default=5.0, help="largest safetensors shard")
    args = ap.parse_args(argv)
    try:
        return export(args)
    except OutputError as e:  # a refused --out: one line saying why and what to do, no traceback
        raise SystemExit(f"merge.py: {e}") from None


def export(args: argparse.Namespace) -> str:
    if args.gguf:
        from model.gguf import gguf_to_hf

        gguf_to_hf(args.gguf, args.out, dtype=DTYPES[args.dtype or "fp32"], overwrite=args.overwrite,
                   protect=[args.gguf])
        print(f"converted {args.gguf} -> {args.out}")
        return args.out

    from data.tokenizer import load_tokenizer
    from model.hf import save_pretrained
    from training.checkpoint import load_model, resolve

    ckpt = resolve(args.ckpt)
    protect = protected_paths(ckpt)
    check_output_dir(args.out, HF_MODEL_KIND, args.overwrite, protect)  # refuse before loading the model
    model, cfg = load_model(ckpt, "cpu")
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    dtype = DTYPES[args.dtype] if args.dtype else None
    save_pretrained(model, args.out, tokenizer=tokenizer, dtype=dtype, max_shard_bytes=int(args.max_shard_gb * 1e9),
                    overwrite=args.overwrite, protect=protect)
    print(f"exported {ckpt} ({model.num_params() / 1e6:.1f}M parameters) -> {args.out}")
    return args.out


if __name__ == "__main__":
    main(sys.argv[1:])
