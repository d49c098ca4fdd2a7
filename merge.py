"""Export to a Hugging Face model directory that transformers loads (LoRA merging arrives with fine-tuning).

    python merge.py --ckpt out/shakespeare/ckpt/latest --out hf/shakespeare           # one of our checkpoints
    python merge.py --ckpt out/sft --out hf/sft --dtype bf16
    python merge.py --gguf SmolLM2-135M-Instruct.Q4_1.gguf --out hf/smollm2             # a llama.cpp GGUF file

The output holds config.json, model.safetensors (or <= 5 GB shards with model.safetensors.index.json),
generation_config.json and the tokenizer files; `AutoModelForCausalLM.from_pretrained(out)` gives the same
logits as our model.
"""

import argparse
import sys

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def main(argv: list[str]) -> str:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = ap.add_mutually_exclusive_group(required=True)
    source.add_argument("--ckpt", help="our checkpoint: a run dir, ckpt/latest or ckpt/step_N")
    source.add_argument("--gguf", help="a llama.cpp GGUF file to convert")
    ap.add_argument("--out", required=True, help="the HF model directory to write (replaced if it exists)")
    ap.add_argument("--dtype", default=None, choices=list(DTYPES), help="weights' dtype (default: as trained, or "
                                                                       "float32 for a GGUF)")
    ap.add_argument("--max_shard_gb", type=float, default=5.0, help="largest safetensors shard")
    args = ap.parse_args(argv)

    if args.gguf:
        from model.gguf import gguf_to_hf

        gguf_to_hf(args.gguf, args.out, dtype=DTYPES[args.dtype or "fp32"])
        print(f"converted {args.gguf} -> {args.out}")
        return args.out

    from data.tokenizer import load_tokenizer
    from model.hf import save_pretrained
    from training.checkpoint import load_model, resolve

    model, cfg = load_model(args.ckpt, "cpu")
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    dtype = DTYPES[args.dtype] if args.dtype else None
    save_pretrained(model, args.out, tokenizer=tokenizer, dtype=dtype, max_shard_bytes=int(args.max_shard_gb * 1e9))
    print(f"exported {resolve(args.ckpt)} ({model.num_params() / 1e6:.1f}M parameters) -> {args.out}")
    return args.out


if __name__ == "__main__":
    main(sys.argv[1:])
