"""Sample text from a checkpoint.

    python generate.py --ckpt out/shakespeare --prompt "ROMEO:" --max_new_tokens 200 --num_samples 2

Each new token runs the model over the whole (cropped) context; the KV-cache generator arrives with the
Hugging Face interop issue.
"""

import argparse
import sys

import torch

from data.tokenizer import get_tokenizer
from training.checkpoint import load_model
from training.device import autocast_context, pick_device


@torch.no_grad()
def sample(model: torch.nn.Module, tokenizer, prompt: str, max_new_tokens: int, device: torch.device, seed: int,
           temperature: float = 0.8, top_k: int = 50) -> str:
    """Prompt + up to max_new_tokens sampled tokens, as text. Uses its own generator, so a caller's RNG
    stream (training's) is untouched; temperature 0 is greedy. Stops early at the tokenizer's EOS."""
    gen = torch.Generator(device=device).manual_seed(seed)
    idx = torch.tensor([tokenizer.encode(prompt)], device=device)  # (1, T)
    was_training = model.training
    model.eval()
    for _ in range(max_new_tokens):
        logits = model(idx[:, -model.config.max_seq_len:])[:, -1, :].float()  # (1, V)
        if temperature <= 0:
            nxt = logits.argmax(-1, keepdim=True)
        else:
            logits = logits / temperature
            if 0 < top_k < logits.size(-1):
                kth = torch.topk(logits, top_k).values[:, -1:]
                logits = logits.masked_fill(logits < kth, -float("inf"))
            nxt = torch.multinomial(logits.softmax(-1), 1, generator=gen)  # (1, 1)
        idx = torch.cat([idx, nxt], dim=1)
        if nxt.item() == tokenizer.eos_id:
            break
    model.train(was_training)
    return tokenizer.decode(idx[0].tolist())


def main(argv: list[str]) -> list[str]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", required=True, help="checkpoint dir, its ckpt/ parent, or the run dir")
    ap.add_argument("--prompt", default="\n")
    ap.add_argument("--max_new_tokens", type=int, default=200)
    ap.add_argument("--num_samples", type=int, default=1)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--top_k", type=int, default=50)
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"])
    args = ap.parse_args(argv)

    device = pick_device(args.device)
    model, cfg = load_model(args.ckpt, device)
    tokenizer = get_tokenizer(cfg.data.tokenizer)
    outs = []
    with autocast_context(args.dtype, device):
        for i in range(args.num_samples):
            text = sample(model, tokenizer, args.prompt, args.max_new_tokens, device, args.seed + i,
                          args.temperature, args.top_k)
            print(f"--- sample {i + 1}\n{text}")
            outs.append(text)
    return outs


if __name__ == "__main__":
    main(sys.argv[1:])
