"""Batched generation with a KV cache, and loading a model for it: the library generate.py, train.py's samples,
eval and GRPO share.

    model, tokenizer = load_for_inference("out/shakespeare", device)          # our checkpoint, HF dir or .gguf
    new = generate(model, [tokenizer.encode("ROMEO:")], 50, temperature=0.8, top_k=50)

`generate()` puts prompts of different lengths in one batch, left-padded, with positions counted from each
prompt's first real token and padding masked out of attention, so every row gets exactly the tokens it would get
alone.
"""

import math

import torch
from torch import Tensor, nn

from data.tokenizer import load_tokenizer
from model.hf import check_tokenizer_fits, from_pretrained, resolve_model_dir
from model.weights import DTYPES
from training.checkpoint import load_model, resolve


def check_sampling(max_new_tokens: int, temperature: float, top_k: int, top_p: float) -> None:
    """ValueError naming the first sampling argument outside its range."""
    if max_new_tokens < 0:
        raise ValueError(f"generate: max_new_tokens must be >= 0, got {max_new_tokens}")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"generate: temperature must be a finite number >= 0 (0 = greedy), got {temperature}")
    if top_k < 0:
        raise ValueError(f"generate: top_k must be >= 0 (0 = no top-k filter), got {top_k}")
    if not 0 < top_p <= 1:  # also False for NaN
        raise ValueError(f"generate: top_p must be in (0, 1] (1 = no nucleus filter), got {top_p}")


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
    check_sampling(max_new_tokens, temperature, top_k, top_p)
    if stop_strings and tokenizer is None:
        raise ValueError("generate: stop_strings need a tokenizer to decode with")
    context = model.config.max_seq_len
    longest = max(len(p) for p in prompts)
    if longest >= context:
        raise ValueError(f"generate: a prompt of {longest} tokens does not fit the model's context of {context} "
                         f"tokens (with room for one new token); shorten it, or load the model with a larger "
                         f"max_seq_len (and rope_theta / rope_scaling to extend its context)")
    if max_new_tokens == 0:
        return [[] for _ in prompts]
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
        if temperature == 0:
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
    """(model, tokenizer) from one of our checkpoints, an HF model directory or a .gguf file.

    dtype is a key of DTYPES or "auto" (bf16 on CUDA, fp32 elsewhere); overrides (rope_theta, max_seq_len, ...)
    go to the model's config."""
    if dtype != "auto" and dtype not in DTYPES:
        raise ValueError(f"load_for_inference: dtype {dtype!r} unknown; expected auto or one of {list(DTYPES)}")
    torch_dtype = DTYPES.get(dtype, torch.bfloat16 if device.type == "cuda" else torch.float32)
    try:
        ckpt = resolve(path)
    except FileNotFoundError:
        ckpt = None
    if ckpt is not None:  # a nanoforge checkpoint: its config says which tokenizer it was trained with
        model, cfg = load_model(ckpt, device, **overrides)
        model.to(torch_dtype)
        tokenizer = load_tokenizer(cfg.data.tokenizer if cfg.data.tokenizer != "auto" else "gpt2")
        if cfg.data.kind == "sft":  # the template it was fine-tuned in, for a template that has no jinja of ours
            tokenizer.chat_template_name = cfg.data.chat_template
    else:
        model = from_pretrained(path, device=device, dtype=torch_dtype, **overrides)
        tokenizer = load_tokenizer(resolve_model_dir(path))
    check_tokenizer_fits(tokenizer, model.config)
    return model, tokenizer
