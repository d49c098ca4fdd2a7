"""Batched generation with a KV cache, and loading a model for it: the library generate.py, train.py's samples,
eval and GRPO share.

    model, tokenizer = load_for_inference("out/shakespeare", device)          # our checkpoint, HF dir or .gguf
    new = generate(model, [tokenizer.encode("ROMEO:")], 50, temperature=0.8, top_k=50)
    done = generate_completions(model, prompts, 256, stop_ids=[tokenizer.eos_id], progress=True)  # an eval task

`generate()` puts prompts of different lengths in one batch, left-padded, with positions counted from each
prompt's first real token and padding masked out of attention, so every row gets exactly the tokens it would get
alone. A row that finishes leaves the batch, so the steps after it compute only the rows still going.
`generate_completions()` runs many prompts in batches sorted by length through the same decoder (decode_batch),
and says of each whether it stopped (Completion).
"""

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from tqdm import tqdm

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


@dataclass
class Completion:
    """What one prompt generated: its new tokens, and whether it ended on a stop id or a stop string (stopped),
    or ran into max_new_tokens or the model's context (not stopped)."""
    tokens: list[int]
    stopped: bool


def check_request(model: nn.Module, prompts: list[list[int]], max_new_tokens: int, temperature: float, top_k: int,
                  top_p: float, stop_strings, tokenizer) -> None:
    """ValueError for what generate() refuses: an empty prompt, sampling arguments out of range, stop strings
    without a tokenizer, a prompt that leaves no room in the model's context for one new token."""
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


@torch.no_grad()
def generate(model: nn.Module, prompts: list[list[int]], max_new_tokens: int, *, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, stop_ids: tuple[int, ...] | list[int] = (),
             stop_strings: tuple[str, ...] | list[str] = (), tokenizer=None, seed: int = 0,
             pad_id: int = 0) -> list[list[int]]:
    """New tokens for each prompt (lists of token ids), at most max_new_tokens each, all prompts in one batch.

    temperature 0 is greedy; otherwise sampling from softmax(logits / temperature) restricted to top_k
    (0 = all) and the top_p nucleus (1.0 = all), with a generator seeded by `seed` (the caller's RNG is
    untouched; the same call gives the same tokens). A row stops after emitting one of stop_ids (kept in its
    output) or once its decoded output contains one of stop_strings (needs `tokenizer`; the output ends with the
    token that completed it), and then leaves the batch (see decode_batch). A row also stops where its prompt and
    output fill the model's context. Non-finite logits (float16 overflow) raise.
    """
    check_request(model, prompts, max_new_tokens, temperature, top_k, top_p, stop_strings, tokenizer)
    if max_new_tokens == 0:
        return [[] for _ in prompts]
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    completions = decode_batch(model, prompts, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                               stop_ids=stop_ids, stop_strings=stop_strings, tokenizer=tokenizer, gen=gen,
                               pad_id=pad_id)
    return [c.tokens for c in completions]


@torch.no_grad()
def generate_completions(model: nn.Module, prompts: list[list[int]], max_new_tokens: int, *, batch_size: int = 32,
                         progress: bool = False, desc: str = "generating", temperature: float = 0.0, top_k: int = 0,
                         top_p: float = 1.0, stop_ids: tuple[int, ...] | list[int] = (),
                         stop_strings: tuple[str, ...] | list[str] = (), tokenizer=None, seed: int = 0,
                         pad_id: int = 0) -> list[Completion]:
    """A Completion for each prompt, in input order: many prompts (an eval task's) in batches of batch_size.

    The prompts are sorted by length, longest first (equal lengths keep their input order), and cut into batches,
    so that a batch wastes little on padding and the longest batch, the one that needs the most memory, comes
    first. Each batch goes through decode_batch, as generate()'s one batch does, with the sampling arguments of
    generate(); one generator seeded by `seed` serves all batches in turn, so the same call gives the same tokens.
    progress: a tqdm bar over prompts (with an ETA), advanced as each row finishes. No prompts: [].
    """
    if batch_size < 1:
        raise ValueError(f"generate_completions: batch_size must be >= 1, got {batch_size}")
    if not prompts:
        return []
    check_request(model, prompts, max_new_tokens, temperature, top_k, top_p, stop_strings, tokenizer)
    if max_new_tokens == 0:
        return [Completion([], stopped=False) for _ in prompts]
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))  # longest first; sorted() is stable
    results: list[Completion | None] = [None] * len(prompts)
    with tqdm(total=len(prompts), desc=desc, unit="prompt", disable=not progress) as bar:
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            completions = decode_batch(model, [prompts[i] for i in batch], max_new_tokens, temperature=temperature,
                                       top_k=top_k, top_p=top_p, stop_ids=stop_ids, stop_strings=stop_strings,
                                       tokenizer=tokenizer, gen=gen, pad_id=pad_id, on_finish=bar.update)
            for i, completion in zip(batch, completions):
                results[i] = completion
    return results


def decode_batch(model: nn.Module, prompts: list[list[int]], max_new_tokens: int, *, temperature: float, top_k: int,
                 top_p: float, stop_ids, stop_strings, tokenizer, gen: torch.Generator, pad_id: int,
                 on_finish: Callable[[], object] | None = None) -> list[Completion]:
    """The decoder generate() and generate_completions() share: one batch of checked prompts -> a Completion each.

    The prompts are left-padded into one batch, with positions counted from each prompt's first real token and
    padding masked out of attention, so every row gets exactly the tokens it would get alone. Row b may generate
    min(max_new_tokens, context - len(prompt b)) tokens, its limit alone; the cache holds the padded prompts plus
    as many steps as the row allowed the most. The prefill computes logits at the last prompt position only.

    A finished row leaves the batch at once: after any step at which rows finish, the next step's inputs,
    positions, attention mask and KV cache keep only the unfinished rows (KVCache.keep_rows, in place), and
    decoding goes on with those. Compacting every time is cheap: it copies at most the live rows' filled cache,
    once per finishing step, so at most once per row; that costs less than one decoding step, which reads the
    weights and that cache (on CPU, SmolLM2-135M, 32 rows of 130-300 positions, 31 of them moving: 10-21 ms
    against a 121-124 ms step), and every later step then computes nothing for the rows dropped.

    Sampled tokens come from `gen`, one draw per row still in the batch per step. on_finish() is called as each
    row finishes (a progress bar).
    """
    device = next(model.parameters()).device
    context = model.config.max_seq_len
    B, longest = len(prompts), max(len(p) for p in prompts)
    limit = [min(max_new_tokens, context - len(p)) for p in prompts]  # new tokens row b may get: as alone
    total = longest + max(limit)  # cache positions: the padded prompts, then one per step (positions stay < context)
    stop_ids = set(stop_ids)

    # left-pad the prompts into one batch: row b is [pad ... pad, prompt_b]
    idx = torch.tensor([[pad_id] * (longest - len(p)) + p for p in prompts], device=device)  # (B, P)
    lengths = torch.tensor([len(p) for p in prompts], device=device)  # (B,)
    first = longest - lengths[:, None]  # (B, 1): where each prompt starts
    attention_mask = (torch.arange(total, device=device) >= first).long()  # (B, total): 1 = the prompt and after
    position_ids = (torch.arange(longest, device=device) - first).clamp(min=0)  # (B, P): 0 at each first token
    next_pos = lengths[:, None]  # (B, 1): the first new token's position

    was_training = model.training
    model.eval()
    cache = model.new_cache(B, total)
    if longest > 1:  # all but the last prompt column only fill the cache: no logits for them
        model(idx[:, :-1], position_ids=position_ids[:, :-1], cache=cache,
              attention_mask=attention_mask[:, :longest - 1], return_hidden=True)
    logits = model(idx[:, -1:], position_ids=position_ids[:, -1:], cache=cache,
                   attention_mask=attention_mask[:, :longest])  # (B, 1, V)

    out: list[list[int]] = [[] for _ in range(B)]
    stopped = [False] * B
    live = list(range(B))  # live[i]: the prompt in batch row i
    for step in itertools.count():
        last = logits[:, -1, :].float()  # (n, V), n = len(live)
        if not torch.isfinite(last).all():
            raise FloatingPointError(f"generate: non-finite logits at new token {step + 1} with weights in "
                                     f"{next(model.parameters()).dtype}: the model overflows in this precision; "
                                     f"load it in bfloat16 or float32")
        if temperature == 0:
            nxt = last.argmax(-1)  # (n,)
        else:
            probs = filter_logits(last, temperature, top_k, top_p).softmax(-1)  # (n, V)
            nxt = torch.multinomial(probs, 1, generator=gen)[:, 0]  # (n,)
        keep = []  # batch rows that go on
        for i, token in enumerate(nxt.tolist()):
            b = live[i]
            out[b].append(token)
            if token in stop_ids:
                stopped[b] = True
            elif stop_strings:
                text = tokenizer.decode(out[b][-32:])  # a stop string completed by this token ends here
                stopped[b] = any(s in text for s in stop_strings)
            if stopped[b] or len(out[b]) == limit[b]:
                if on_finish is not None:
                    on_finish()
            else:
                keep.append(i)
        if not keep:
            break
        if len(keep) < len(live):  # finished rows leave the batch
            rows = torch.tensor(keep, device=device)  # (n',)
            cache.keep_rows(keep)
            nxt, next_pos, attention_mask = nxt[rows], next_pos[rows], attention_mask[rows]  # n' rows each
            live = [live[i] for i in keep]
        logits = model(nxt[:, None], position_ids=next_pos, cache=cache,
                       attention_mask=attention_mask[:, :cache.length + 1])  # (n, 1, V)
        next_pos = next_pos + 1
    model.train(was_training)
    return [Completion(tokens, stop) for tokens, stop in zip(out, stopped)]


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
