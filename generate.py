"""Generate text: batched, with a KV cache, from our checkpoints, Hugging Face directories or GGUF files.

    python generate.py --ckpt out/shakespeare --prompt "ROMEO:" --max_new_tokens 200 --num_samples 2
    python generate.py --ckpt hf/SmolLM2-135M-Instruct --chat --prompt "What is 2+3?"     # one chat turn
    python generate.py --ckpt SmolLM2-135M-Instruct.Q4_1.gguf --chat                      # interactive chat

`generate()` is the function eval and GRPO call: prompts of different lengths go in one batch, left-padded,
with positions counted from each prompt's first real token and padding masked out of attention, so every row
gets exactly the tokens it would get alone.
"""

import argparse
import sys
from pathlib import Path

import torch
from torch import Tensor, nn

from training.device import pick_device

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def filter_logits(logits: Tensor, temperature: float, top_k: int, top_p: float) -> Tensor:
    """Scaled logits (B, V) with tokens outside the top-k and the top-p nucleus set to -inf.

    Nucleus (Holtzman et al. 2019): keep the smallest set of most probable tokens whose probability mass
    reaches top_p (the token that crosses top_p is kept, so at least one always is)."""
    logits = logits / temperature
    if 0 < top_k < logits.size(-1):
        kth = torch.topk(logits, top_k).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)  # (B, V)
        probs = sorted_logits.softmax(-1)
        mass_before = probs.cumsum(-1) - probs  # probability of the tokens ranked above each one
        sorted_logits = sorted_logits.masked_fill(mass_before >= top_p, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


@torch.no_grad()
def generate(model: nn.Module, prompts: list[list[int]], max_new_tokens: int, *, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, stop_ids: tuple[int, ...] | list[int] = (),
             stop_strings: tuple[str, ...] | list[str] = (), tokenizer=None, seed: int = 0,
             pad_id: int = 0) -> list[list[int]]:
    """New tokens for each prompt (lists of token ids), at most max_new_tokens each.

    temperature 0 is greedy; otherwise sampling from softmax(logits / temperature) restricted to top_k
    (0 = all) and the top_p nucleus (1.0 = all), with a generator seeded by `seed` (the caller's RNG is
    untouched). A row stops after emitting one of stop_ids (kept in its output) or once its decoded output
    contains one of stop_strings (needs `tokenizer`; the output ends with the token that completed it).
    Generation also stops at the model's context length. Non-finite logits (float16 overflow) raise.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate: every prompt needs at least one token")
    if stop_strings and tokenizer is None:
        raise ValueError("generate: stop_strings need a tokenizer to decode with")
    context = model.config.max_seq_len
    longest = max(len(p) for p in prompts)
    if longest >= context:
        raise ValueError(f"generate: a prompt of {longest} tokens does not fit the model's context of {context} "
                         f"tokens (with room for one new token); shorten it, or load the model with a larger "
                         f"max_seq_len (and rope_theta / rope_scaling to extend its context)")
    device = next(model.parameters()).device
    B, total = len(prompts), min(longest + max_new_tokens, context)
    gen = torch.Generator(device=device).manual_seed(seed)

    # left-pad the prompts into one batch: row b is [pad ... pad, prompt_b]
    idx = torch.full((B, longest), pad_id, dtype=torch.long, device=device)  # (B, P)
    attention_mask = torch.zeros(B, total, dtype=torch.long, device=device)  # (B, total): 1 = real token
    for b, p in enumerate(prompts):
        idx[b, longest - len(p):] = torch.tensor(p, dtype=torch.long, device=device)
        attention_mask[b, longest - len(p):] = 1  # the prompt and every position after it
    position_ids = (attention_mask[:, :longest].cumsum(-1) - 1).clamp(min=0)  # (B, P): 0 at each first real token
    next_pos = torch.tensor([len(p) for p in prompts], device=device)[:, None]  # (B, 1)

    was_training = model.training
    model.eval()
    cache = model.new_cache(B, total)
    out: list[list[int]] = [[] for _ in range(B)]
    done = [False] * B
    stop_ids = set(stop_ids)
    logits = model(idx, position_ids=position_ids, cache=cache, attention_mask=attention_mask[:, :longest])
    for step in range(total - longest):
        last = logits[:, -1, :].float()  # (B, V)
        if not torch.isfinite(last).all():
            raise FloatingPointError(f"generate: non-finite logits at new token {step + 1} with weights in "
                                     f"{next(model.parameters()).dtype}: the model overflows in this precision; "
                                     f"load it in bfloat16 or float32")
        if temperature <= 0:
            nxt = last.argmax(-1)  # (B,)
        else:
            probs = filter_logits(last, temperature, top_k, top_p).softmax(-1)
            nxt = torch.multinomial(probs, 1, generator=gen)[:, 0]  # (B,)
        for b, token in enumerate(nxt.tolist()):
            if done[b]:
                continue
            out[b].append(token)
            if token in stop_ids:
                done[b] = True
            elif stop_strings:
                text = tokenizer.decode(out[b][-32:])  # a stop string completed by this token ends here
                done[b] = any(s in text for s in stop_strings)
        if all(done) or step == total - longest - 1:
            break
        logits = model(nxt[:, None], position_ids=next_pos + step, cache=cache,
                       attention_mask=attention_mask[:, :longest + step + 1])
    model.train(was_training)
    return out


def sample(model: nn.Module, tokenizer, prompt: str, max_new_tokens: int, device: torch.device, seed: int,
           temperature: float = 0.8, top_k: int = 50) -> str:
    """Prompt + a sampled continuation as text (train.py's periodic samples); stops at the tokenizer's EOS."""
    ids = tokenizer.encode(prompt)
    new = generate(model, [ids], max_new_tokens, temperature=temperature, top_k=top_k, seed=seed,
                   stop_ids=[tokenizer.eos_id])[0]
    return tokenizer.decode(ids + new)


def load_for_inference(path: str, device: torch.device, dtype: str = "auto", **overrides):
    """(model, tokenizer) from one of our checkpoints, an HF model directory or a .gguf file."""
    from data.tokenizer import load_tokenizer
    from model.hf import check_tokenizer_fits, from_pretrained, resolve_model_dir
    from training.checkpoint import load_model, resolve

    torch_dtype = DTYPES.get(dtype, torch.bfloat16 if device.type == "cuda" else torch.float32)
    try:
        ckpt = resolve(path)
    except FileNotFoundError:
        ckpt = None
    if ckpt is not None:  # a nanoforge checkpoint: its config says which tokenizer it was trained with
        model, cfg = load_model(ckpt, device, **overrides)
        model.to(torch_dtype)
        tokenizer = load_tokenizer(cfg.data.tokenizer if cfg.data.tokenizer != "auto" else "gpt2")
    else:
        model = from_pretrained(path, device=device, dtype=torch_dtype, **overrides)
        tokenizer = load_tokenizer(resolve_model_dir(path))
    check_tokenizer_fits(tokenizer, model.config)
    return model, tokenizer


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

    device = pick_device(args.device)
    model, tok = load_for_inference(args.ckpt, device, args.dtype, rope_theta=args.rope_theta,
                                    max_seq_len=args.max_seq_len)
    stop_ids = list(getattr(tok, "stop_ids", None) or [tok.eos_id])
    sampling = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, stop_ids=stop_ids,
                    stop_strings=args.stop, tokenizer=tok)

    if not args.chat:
        prompt = args.prompt if args.prompt is not None else "\n"
        ids = tok.encode(prompt)
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
