"""Generate text: batched, with a KV cache, from our checkpoints, Hugging Face directories or GGUF files.

    python generate.py --ckpt out/shakespeare --prompt "ROMEO:" --max_new_tokens 200 --num_samples 2
    python generate.py --ckpt hf/SmolLM2-135M-Instruct --chat --prompt "What is 2+3?"     # one chat turn
    python generate.py --ckpt SmolLM2-135M-Instruct.Q4_1.gguf --chat                      # interactive chat

The command line only: the generation loop (KV cache, left-padded batches, sampling) is training/generation.py,
which eval, train.py's samples and GRPO import too.
"""

import argparse
import math
import sys

from training.device import pick_device
from training.generation import DTYPES, generate, load_for_inference


def check_args(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Stop (exit code 2) naming the first flag outside its range."""
    if args.max_new_tokens < 1:
        ap.error(f"--max_new_tokens must be >= 1, got {args.max_new_tokens}")
    if args.num_samples < 1:
        ap.error(f"--num_samples must be >= 1, got {args.num_samples}")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        ap.error(f"--temperature must be a finite number >= 0 (0 = greedy), got {args.temperature}")
    if args.top_k < 0:
        ap.error(f"--top_k must be >= 0 (0 = no top-k filter), got {args.top_k}")
    if not 0 < args.top_p <= 1:  # also False for NaN
        ap.error(f"--top_p must be in (0, 1] (1 = no nucleus filter), got {args.top_p}")
    if args.prompt == "":
        ap.error("--prompt is empty; give some text (or leave --prompt out: without --chat generation starts from "
                 "a newline, with --chat the conversation is interactive)")
    if args.max_seq_len is not None and args.max_seq_len < 1:
        ap.error(f"--max_seq_len must be >= 1, got {args.max_seq_len}")
    if args.rope_theta is not None and not (math.isfinite(args.rope_theta) and args.rope_theta > 0):
        ap.error(f"--rope_theta must be a finite number > 0, got {args.rope_theta}")


def main(argv: list[str]) -> list[str]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", required=True, help="our checkpoint (run dir, ckpt/latest, step dir), an HF model "
                                                  "directory, or a .gguf file")
    ap.add_argument("--prompt", default=None, help="text to continue; with --chat, the user's message")
    ap.add_argument("--chat", action="store_true", help="chat: the prompt goes through the model's chat template; "
                                                       "with no --prompt, an interactive conversation on stdin")
    ap.add_argument("--system", default=None, help="--chat: a system prompt")
    ap.add_argument("--template", default=None, help="--chat: a chat template by name (chatml, llama2, llama3, "
                                                     "gemma, granite, harmony) for a model that ships none")
    ap.add_argument("--max_new_tokens", type=int, default=200)
    ap.add_argument("--num_samples", type=int, default=1, help="continuations of the prompt, generated as a batch")
    ap.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    ap.add_argument("--top_k", type=int, default=50, help="0 = no top-k filter")
    ap.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling mass; 1.0 = off")
    ap.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto", choices=["auto", *DTYPES], help="weights' dtype (auto: bf16 on "
                                                                               "CUDA, fp32 on CPU)")
    ap.add_argument("--rope_theta", type=float, default=None, help="override RoPE theta (context extension)")
    ap.add_argument("--max_seq_len", type=int, default=None, help="override the context length")
    args = ap.parse_args(argv)
    check_args(ap, args)

    device = pick_device(args.device)
    model, tok = load_for_inference(args.ckpt, device, args.dtype, rope_theta=args.rope_theta,
                                    max_seq_len=args.max_seq_len)
    stop_ids = list(getattr(tok, "stop_ids", None) or [tok.eos_id])
    sampling = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, stop_ids=stop_ids,
                    stop_strings=args.stop, tokenizer=tok)

    if not args.chat:
        prompt = args.prompt if args.prompt is not None else "\n"
        ids = tok.encode(prompt)
        if not ids:
            ap.error(f"--prompt {prompt!r} encodes to no tokens with {tok.name}; give some text")
        outs = generate(model, [ids] * args.num_samples, args.max_new_tokens, seed=args.seed, **sampling)
        texts = [prompt + tok.decode(o) for o in outs]
        for i, text in enumerate(texts):
            print(f"--- sample {i + 1}\n{text}")
        return texts

    messages = [{"role": "system", "content": args.system}] if args.system else []
    replies = []
    interactive = args.prompt is None
    while True:
        user = args.prompt if not interactive else input("user> ")
        if interactive and user.strip() in ("", "/exit", "/quit"):
            break
        messages.append({"role": "user", "content": user})
        enc = tok.apply_chat_template(messages, template=args.template, add_generation_prompt=True)
        new = generate(model, [enc.ids], args.max_new_tokens, seed=args.seed, **sampling)[0]
        reply_ids = new[:-1] if new and new[-1] in stop_ids else new
        reply = tok.decode(reply_ids)
        print(reply if not interactive else f"assistant> {reply}", flush=True)
        replies.append(reply)
        messages.append({"role": "assistant", "content": reply})
        if not interactive:
            break
    return replies


if __name__ == "__main__":
    main(sys.argv[1:])
