"""Evaluation tasks on a model, for eval.py --task and train.py's eval.tasks: multiple choice scored by
log-likelihood (MMLU, MalayMMLU), generation with answer extraction (GSM8K, MalayMMLU's generative mode).

    questions = read_mmlu("mmlu_dev.jsonl")
    result = mmlu(model, tokenizer, questions, shots=5, pool=questions)
    result.metrics    # {"acc": 0.41, "n": 273, "acc_by_subject": {...}, "too_long": 0, ...}
    result.records    # one dict per question: its prompt, each choice's log-likelihood, the prediction

Prompts and scoring are lm-evaluation-harness's (data/tasks.py builds the prompts): a choice scores the summed
log-probability of its continuation given the prompt, the continuation being what encoding prompt + " A" adds to
encoding the prompt alone (a trailing space of the prompt moves into the continuation first).

What makes it fast:
- When every choice is one token (" A" .. " D"), one forward of the shared prompt scores all of them, and the LM
  head runs at the prompt's last position only (model.logits on that hidden state): no other logits are built.
- Otherwise every prompt + choice sequence is scored by the loss's per-sample sums (model(batch,
  reduction="none")), many sequences per forward: packed into one row with cu_seqlens when the attention backend
  runs documents natively (flash, flex on a GPU), else as rows of similar length, right-padded (causal attention
  never looks at padding that comes after a sequence, so sdpa's fast causal path runs with no mask).
- Generation sorts prompts by length into batches, and a finished row leaves its batch
  (training.generation.generate_completions).

A prompt that does not fit the model's context is never cut: it is skipped, counted under "too_long" (its
records say so) and left out of the accuracies. Under torchrun every rank runs the whole task on the same
questions, so every forward is one that all ranks make (FSDP2 gathers parameters collectively).
"""

from collections import defaultdict
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn
from tqdm import tqdm

from data.chat import encode_chat
from data.tasks import (GSM_STOP, LETTERS, GSMQuestion, MCQuestion, boxed_letter, category_weighted, fewshot,
                        flexible_extract, gsm8k_messages, gsm8k_prompt, gsm_correct, malaymmlu_prompt, mmlu_messages,
                        mmlu_prompt, random_fewshot, read_gsm8k, read_malaymmlu, read_mmlu, strict_extract)
from model.attention import resolve_backend
from model.batch import IGNORE_INDEX, Batch
from training.config import TASKS, TaskConfig
from training.generation import generate_completions

GSM_INSTRUCTION = ("Solve the following grade-school maths problem step by step. End your answer with a line "
                   "'#### N', where N is the final number.\n\n")
BOXED_SYSTEM_PROMPT = ("You are an expert at answering multiple-choice questions. Think the question through step "
                       "by step, then give the letter of the one correct option inside \\boxed{}, e.g. \\boxed{A}.")


class TaskResult(NamedTuple):
    metrics: dict  # what eval.py prints and train.py logs: accuracies, counts, the prompt format used
    records: list[dict]  # one per question (eval.py --out writes them as JSONL)


# ----------------------------------------------------------------------------- encoding


def encode(tokenizer, text: str) -> list[int]:
    """text as the model's own tokenizer encodes it by default (BOS first when it adds one), as
    lm-evaluation-harness's HF backend does; special-token text stays plain text."""
    return tokenizer.encode(text, bos=tokenizer.add_bos)


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) by lm-evaluation-harness's rule: the context's trailing whitespace moves to
    the continuation; the continuation is what encoding context + continuation adds to encoding the context."""
    stripped = context.rstrip()
    continuation = context[len(stripped):] + continuation
    whole = encode(tokenizer, stripped + continuation)
    ctx = encode(tokenizer, stripped)
    return ctx, whole[len(ctx):]


def chat_ids(tokenizer, messages: list[dict]) -> list[int]:
    """The messages through the tokenizer's chat template, ending with the assistant's generation prompt."""
    return encode_chat(tokenizer, messages, add_generation_prompt=True).ids


def continuation_ids(tokenizer, text: str) -> list[int]:
    """A continuation appended to already-encoded ids (a chat prompt): encoded alone, without BOS."""
    return tokenizer.encode(text)


# ----------------------------------------------------------------------------- scoring


def packs_documents(model: nn.Module, device: torch.device) -> bool:
    """Whether the model's attention runs packed documents natively (flash / flex), so packing many sequences into
    one row costs no more than running them apart; eager and sdpa would compute the whole row's square."""
    backend = model.config.attn_backend
    if backend == "auto":
        backend = resolve_backend("auto", frozenset({"documents"}), device)
    return backend in ("flash", "flex")


def forward_groups(lengths: list[int], max_tokens: int, packed: bool) -> list[list[int]]:
    """Indices of sequences grouped into forwards, longest first. A group's cost (packed: the sum of its lengths;
    rows: rows x the longest) stays within max_tokens; a sequence longer than that goes alone."""
    groups: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        if groups:
            g = groups[-1]
            cost = sum(lengths[j] for j in g) + lengths[i] if packed else (len(g) + 1) * lengths[g[0]]
            if cost <= max_tokens:
                g.append(i)
                continue
        groups.append([i])
    return groups


def group_batch(seqs: list[list[int]], labels: list[list[int]], packed: bool) -> Batch:
    """One forward's Batch: the sequences end to end in one row with cu_seqlens (packed), or one right-padded row
    each (padding labelled -100)."""
    if packed:
        ids = torch.tensor([[t for s in seqs for t in s]])  # (1, T)
        lab = torch.tensor([[t for s in labels for t in s]])  # (1, T)
        return Batch.packed(ids, lab, [len(s) for s in seqs])
    T = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), T, dtype=torch.long)  # (B, T)
    lab = torch.full((len(seqs), T), IGNORE_INDEX, dtype=torch.long)  # (B, T)
    for b, (s, l) in enumerate(zip(seqs, labels)):
        ids[b, :len(s)] = torch.tensor(s)
        lab[b, :len(l)] = torch.tensor(l)
    return Batch(ids, lab)


@torch.no_grad()
def score_sequences(model: nn.Module, seqs: list[list[int]], n_scored: list[int], *, max_tokens: int = 8192,
                    progress: bool = False, desc: str = "scoring") -> list[tuple[float, int]]:
    """(summed log-probability, tokens) of the last n_scored[i] tokens of each sequence seqs[i], given the tokens
    before them, from the loss's per-sample sums. Each sequence needs at least one token before its scored ones."""
    device = next(model.parameters()).device
    packed = packs_documents(model, device)
    inputs, labels = [], []
    for s, n in zip(seqs, n_scored):
        if not 0 < n < len(s):
            raise ValueError(f"score_sequences: {n} scored tokens of a {len(s)}-token sequence; at least one token "
                             f"must come before them")
        inputs.append(s[:-1])
        labels.append([IGNORE_INDEX] * (len(s) - 1 - n) + s[-n:])  # labels[t] is the token after inputs[t]
    out: list[tuple[float, int]] = [(0.0, 0)] * len(seqs)
    was_training = model.training
    model.eval()
    groups = forward_groups([len(s) for s in inputs], max_tokens, packed)
    for g in tqdm(groups, desc=desc, unit="batch", disable=not progress):
        r = model(group_batch([inputs[i] for i in g], [labels[i] for i in g], packed).to(device), reduction="none")
        for i, loss, n in zip(g, r.sample_losses.tolist(), r.sample_tokens.tolist()):
            out[i] = (-loss, int(n))
    model.train(was_training)
    return out


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def shared_prefix_groups(contexts: list[list[int]], min_shared: int) -> tuple[list[tuple[int, list[int]]], list[int]]:
    """Contexts that begin with the same tokens: ([(prefix length, indices)], the indices of the others). Sorted
    token lists put such contexts next to each other; each group's prefix leaves at least one token of every member
    to compute after it, is at least min_shared tokens long, and a context joins a group only if that keeps more than
    half of the group's prefix (a one-context group's is its length - 1)."""
    groups: list[list] = []  # [prefix length, indices]
    for i in sorted(range(len(contexts)), key=lambda i: contexts[i]):
        c = contexts[i]
        if groups:
            shared = min(groups[-1][0], common_prefix(contexts[groups[-1][1][0]], c), len(c) - 1)
            if shared >= min_shared and 2 * shared > groups[-1][0]:  # joining may not halve the group's prefix
                groups[-1][0] = shared
                groups[-1][1].append(i)
                continue
        groups.append([len(c) - 1, [i]])
    return [(n, g) for n, g in groups if len(g) > 1], [g[0] for _, g in groups if len(g) == 1]


def caches_prefixes(model: nn.Module) -> bool:
    """Whether the model's attention takes a KV cache (eager, sdpa; auto picks one of them for a cached call)."""
    return model.config.attn_backend in ("auto", "eager", "sdpa")


def last_logprobs(model: nn.Module, hidden: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                  candidates: list[list[int]]) -> list[list[float]]:
    """The candidates' log-probabilities at hidden[rows, cols]: the LM head at those positions only."""
    device = hidden.device
    logprobs = model.logits(hidden[rows.to(device), cols.to(device)]).float().log_softmax(-1)  # (n, V)
    return [row[torch.tensor(c, device=device)].tolist() for row, c in zip(logprobs, candidates)]


@torch.no_grad()
def next_token_logprobs(model: nn.Module, contexts: list[list[int]], candidates: list[list[int]], *,
                        max_tokens: int = 8192, progress: bool = False, desc: str = "scoring",
                        min_shared: int = 64) -> list[list[float]]:
    """For each context, the log-probabilities (full-vocabulary softmax) of its candidate next tokens, from one
    forward of the context: the LM head runs at the context's last position only.

    Contexts that share a prefix of at least min_shared tokens (k-shot prompts of one subject: the description and
    the same examples) compute it once: one forward of the prefix fills a KV cache, copied to every row, and only
    each context's own tail runs after it (right-padded: causal attention never sees the padding after a tail).
    The others run in batches of whole contexts."""
    device = next(model.parameters()).device
    packed = packs_documents(model, device)
    out: list[list[float]] = [[] for _ in contexts]
    was_training = model.training
    model.eval()
    if caches_prefixes(model):
        shared, alone = shared_prefix_groups(contexts, min_shared)
    else:
        shared, alone = [], list(range(len(contexts)))
    bar = tqdm(total=len(contexts), desc=desc, unit="prompt", disable=not progress)
    for n_prefix, members in shared:
        prefix_cache = model.new_cache(1, n_prefix)
        model(torch.tensor([contexts[members[0]][:n_prefix]], device=device), cache=prefix_cache,
              return_hidden=True)  # fills the cache
        tail = max(len(contexts[i]) for i in members) - n_prefix
        rows = max(1, min(32, max_tokens // tail))
        for start in range(0, len(members), rows):
            chunk = members[start:start + rows]
            tails = [contexts[i][n_prefix:] for i in chunk]
            ids = torch.zeros(len(chunk), tail, dtype=torch.long)  # (n, S) right-padded
            for b, t in enumerate(tails):
                ids[b, :len(t)] = torch.tensor(t)
            cache = prefix_cache.broadcast(len(chunk), n_prefix + tail)
            hidden = model(ids.to(device), cache=cache, return_hidden=True).hidden  # (n, S, dim)
            cols = torch.tensor([len(t) - 1 for t in tails])
            for i, lp in zip(chunk, last_logprobs(model, hidden, torch.arange(len(chunk)), cols,
                                                  [candidates[i] for i in chunk])):
                out[i] = lp
            bar.update(len(chunk))
    for g in forward_groups([len(contexts[i]) for i in alone], max_tokens, packed):
        g = [alone[j] for j in g]
        seqs = [contexts[i] for i in g]
        batch = group_batch(seqs, [[IGNORE_INDEX] * len(s) for s in seqs], packed).to(device)
        hidden = model(batch, return_hidden=True).hidden  # (B, T, dim)
        lengths = torch.tensor([len(s) for s in seqs])
        if packed:  # the last token of each sample in the one row
            rows, cols = torch.zeros_like(lengths), lengths.cumsum(0) - 1
        else:
            rows, cols = torch.arange(len(seqs)), lengths - 1
        for i, lp in zip(g, last_logprobs(model, hidden, rows, cols, [candidates[i] for i in g])):
            out[i] = lp
        bar.update(len(g))
    bar.close()
    model.train(was_training)
    return out


# ----------------------------------------------------------------------------- multiple choice


def argmax(values: list[float]) -> int:
    return max(range(len(values)), key=lambda i: values[i])


def fits(model: nn.Module, record: dict, n_tokens: int) -> bool:
    """Whether n_tokens (a prompt and what is scored or generated after it) fit the model's context; when they do
    not, the record is marked skipped, saying why (the question is counted under too_long, never cut)."""
    if n_tokens <= model.config.max_seq_len:
        return True
    record["skipped"] = f"too_long: {n_tokens} tokens, context {model.config.max_seq_len}"
    return False


def choice_scores(model: nn.Module, requests: list[tuple[list[int], list[list[int]]]], *, max_tokens: int,
                  progress: bool, desc: str) -> list[list[float]]:
    """Each request (context ids, one continuation per choice) -> the choices' summed log-likelihoods. One forward
    of the shared context when every continuation is one token, else one scored sequence per choice."""
    if all(len(c) == 1 for _, conts in requests for c in conts):
        return next_token_logprobs(model, [ctx for ctx, _ in requests], [[c[0] for c in conts] for _, conts in requests],
                                   max_tokens=max_tokens, progress=progress, desc=desc)
    seqs, n_scored, owner = [], [], []
    for r, (ctx, conts) in enumerate(requests):
        for c in conts:
            seqs.append(ctx + c)
            n_scored.append(len(c))
            owner.append(r)
    scored = score_sequences(model, seqs, n_scored, max_tokens=max_tokens, progress=progress, desc=desc)
    out: list[list[float]] = [[] for _ in requests]
    for r, (logprob, _) in zip(owner, scored):
        out[r].append(logprob)
    return out


def by_group(records: list[dict], key: str, field: str) -> dict[str, tuple[int, int]]:
    """{group: (correct, scored)} of records[field] over the scored records, grouped by records[key]."""
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for r in records:
        if not r.get("skipped"):
            counts[r[key]][0] += bool(r[field])
            counts[r[key]][1] += 1
    return {k: (c, n) for k, (c, n) in sorted(counts.items())}


def accuracy(counts: dict[str, tuple[int, int]]) -> float | None:
    """Correct over scored, summed over groups: each group weighted by its size. None when nothing was scored."""
    n = sum(n for _, n in counts.values())
    return sum(c for c, _ in counts.values()) / n if n else None


def mmlu(model: nn.Module, tokenizer, questions: list[MCQuestion], *, shots: int = 0,
         pool: list[MCQuestion] | None = None, by_subject: bool = True, chat: bool = False,
         max_tokens: int = 8192, progress: bool = False, exclude_self: bool | None = None) -> TaskResult:
    """MMLU accuracy: per subject and the size-weighted average (correct / scored over every subject).

    k-shot examples come from `pool` (a dev split; default the questions themselves) by lm-evaluation-harness's
    first-n rule, from the question's own subject when by_subject. exclude_self (default: when the pool is the
    questions themselves) keeps a question out of its own examples.
    chat=True renders the prompt through the tokenizer's chat template instead (the description as the system
    message, each example a user/assistant turn) and scores the bare letter after the assistant's prompt
    (lm-evaluation-harness's --apply_chat_template scores the whitespace-led " A" there)."""
    pool = questions if pool is None else pool
    exclude_self = pool is questions if exclude_self is None else exclude_self
    requests, records = [], []
    for q in questions:
        shown = fewshot(q, pool, shots, exclude_self=exclude_self, by_subject=by_subject)
        letters = LETTERS[:len(q.choices)]
        if chat:
            ctx = chat_ids(tokenizer, mmlu_messages(q, shown))
            conts = [continuation_ids(tokenizer, letter) for letter in letters]
            prompt = tokenizer.decode(ctx)
        else:
            prompt = mmlu_prompt(q, shown)
            pairs = [encode_pair(tokenizer, prompt, " " + letter) for letter in letters]
            ctx, conts = pairs[0][0], [c for _, c in pairs]
        record = {"row": q.row, "subject": q.subject, "answer": LETTERS[q.answer], "prompt": prompt}
        if fits(model, record, len(ctx) + max(len(c) for c in conts)):
            requests.append((ctx, conts))
        records.append(record)
    scores = iter(choice_scores(model, requests, max_tokens=max_tokens, progress=progress, desc="mmlu"))
    for record, q in zip(records, questions):
        if "skipped" in record:
            continue
        s = next(scores)
        record.update(logprobs=s, pred=LETTERS[argmax(s)], correct=argmax(s) == q.answer)
    per_subject = by_group(records, "subject", "correct")
    metrics = {"acc": accuracy(per_subject),
               "acc_by_subject": {k: c / n for k, (c, n) in per_subject.items()},
               "n": sum(n for _, n in per_subject.values()), "shots": shots,
               "prompt": prompt_kind(chat), **skipped_metrics(records)}
    return TaskResult(metrics, records)


def malaymmlu(model: nn.Module, tokenizer, questions: list[MCQuestion], *, chat: bool = False,
              max_tokens: int = 8192, progress: bool = False) -> TaskResult:
    """MalayMMLU's two metrics as its official evaluator computes them (0-shot):

    - first-token accuracy: the argmax, over the option letters' tokens (the last token of encoding "A", "B", ...),
      of the logits at the prompt's last position;
    - full accuracy: the option whose text, appended to the prompt, gives the highest mean log-probability over
      every predicted token of prompt + option (the prompt's tokens included, as the official code averages them).

    Each is averaged per category and over categories weighted by their sizes (data.tasks.category_weighted).
    chat=True wraps the prompt as the user's message in the tokenizer's chat template."""
    first_requests, full_seqs, records = [], [], []
    for q in questions:
        prompt = malaymmlu_prompt(q)
        if chat:
            ctx = chat_ids(tokenizer, [{"role": "user", "content": prompt}])
            options = [ctx + continuation_ids(tokenizer, o) for o in q.choices]
        else:
            ctx = encode(tokenizer, prompt)
            options = [encode(tokenizer, prompt + o) for o in q.choices]
        letters = [tokenizer.encode(letter)[-1] for letter in LETTERS[:len(q.choices)]]
        record = {"row": q.row, "subject": q.subject, "category": q.category, "answer": LETTERS[q.answer],
                  "prompt": tokenizer.decode(ctx) if chat else prompt}
        if fits(model, record, max(len(o) for o in options)):
            first_requests.append((ctx, [[t] for t in letters]))
            full_seqs.extend(options)
        records.append(record)
    first = iter(choice_scores(model, first_requests, max_tokens=max_tokens, progress=progress,
                               desc="malaymmlu first token"))
    full = iter(score_sequences(model, full_seqs, [len(s) - 1 for s in full_seqs], max_tokens=max_tokens,
                                progress=progress, desc="malaymmlu full"))
    for record, q in zip(records, questions):
        if "skipped" in record:
            continue
        s = next(first)
        means = [logprob / n for logprob, n in (next(full) for _ in q.choices)]
        record.update(first_token_logprobs=s, first_token_pred=LETTERS[argmax(s)],
                      first_token_correct=argmax(s) == q.answer, full_mean_logprobs=means,
                      full_pred=LETTERS[argmax(means)], full_correct=argmax(means) == q.answer)
    metrics = category_metrics(records, ("first_token", "full")) | {"prompt": prompt_kind(chat, "MalayMMLU official")}
    return TaskResult(metrics, records)


def prompt_kind(chat: bool, plain: str = "lm-evaluation-harness") -> str:
    """What the results say about the prompt: the chat template's, or the task's plain-text one."""
    return "chat template" if chat else plain


def category_metrics(records: list[dict], metrics: tuple[str, ...]) -> dict:
    """For each metric m: m_acc (categories weighted by size, MalayMMLU's average) and m_acc_by_category."""
    out: dict = {}
    for m in metrics:
        counts = by_group(records, "category", f"{m}_correct")
        out[f"{m}_acc"] = category_weighted(counts) if counts else None
        out[f"{m}_acc_by_category"] = {k: c / n for k, (c, n) in counts.items()}
    out["n"] = sum(1 for r in records if not r.get("skipped"))
    return out | skipped_metrics(records)


def skipped_metrics(records: list[dict]) -> dict:
    too_long = [r["row"] for r in records if r.get("skipped", "").startswith("too_long")]
    return {"too_long": len(too_long), "too_long_rows": too_long[:20]}


# ----------------------------------------------------------------------------- generation


def check_samples(samples: int, temperature: float) -> None:
    if samples < 1:
        raise ValueError(f"--samples must be >= 1, got {samples}")
    if samples > 1 and temperature == 0:
        raise ValueError(f"--samples={samples} with temperature 0 gives {samples} identical greedy answers; "
                         f"pass --temperature (e.g. 0.7) to sample them")


def sampled(model: nn.Module, tokenizer, prompts: list[list[int]], *, samples: int, max_new_tokens: int,
            temperature: float, top_p: float, top_k: int, batch_size: int, stop_strings: tuple[str, ...],
            seed: int, progress: bool, desc: str) -> list[list[tuple[str, bool]]]:
    """`samples` completions of each prompt as (text cut before the first stop string, hit the length limit)."""
    repeated = [p for p in prompts for _ in range(samples)]
    completions = generate_completions(model, repeated, max_new_tokens, batch_size=batch_size, progress=progress,
                                       desc=desc, temperature=temperature, top_p=top_p, top_k=top_k,
                                       stop_ids=tokenizer.stop_ids, stop_strings=stop_strings, tokenizer=tokenizer,
                                       seed=seed, pad_id=tokenizer.pad_id or 0)
    out = []
    for i in range(len(prompts)):
        group = []
        for c in completions[i * samples:(i + 1) * samples]:
            text = tokenizer.decode(c.tokens, skip_special=True)
            for stop in stop_strings:  # as lm-evaluation-harness: the text before the first stop sequence
                text = text.split(stop)[0]
            group.append((text, not c.stopped))
        out.append(group)
    return out


def gsm8k(model: nn.Module, tokenizer, questions: list[GSMQuestion], *, shots: int = 0,
          pool: list[GSMQuestion] | None = None, chat: bool = False, instruction: str = GSM_INSTRUCTION,
          samples: int = 1, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
          max_new_tokens: int = 256, batch_size: int = 32, stop_strings: tuple[str, ...] = GSM_STOP, seed: int = 0,
          progress: bool = False, exclude_self: bool | None = None, fewshot_seed: int = 1234) -> TaskResult:
    """GSM8K accuracy by lm-evaluation-harness's two filters: strict ("#### N") and flexible (the last number),
    both normalised as its exact_match does (commas, "$", a trailing period). Greedy by default; samples > 1 with a
    temperature also gives pass@N (any of the N right). truncated counts completions that hit max_new_tokens (or
    the context) without stopping: a cut-off answer is a known way to get a wrong number.

    The prompt is lm-evaluation-harness's ("Question: ...\\nAnswer:", k-shot examples drawn from `pool`, a train
    file, as its gsm8k task draws them: a random.Random(fewshot_seed) sample per question, in order),
    or with chat=True the tokenizer's chat template (instruction + question as the user's message, examples as
    earlier turns)."""
    check_samples(samples, temperature)
    pool = questions if pool is None else pool
    exclude_self = pool is questions if exclude_self is None else exclude_self
    prompts, records, kept = [], [], []
    examples = random_fewshot(questions, pool, shots, exclude_self=exclude_self, seed=fewshot_seed)
    for q, shown in zip(questions, examples):
        if chat:
            ids = chat_ids(tokenizer, gsm8k_messages(q, shown, instruction))
            text = tokenizer.decode(ids)
        else:
            text = gsm8k_prompt(q, shown)
            ids = encode(tokenizer, text)
        record = {"row": q.row, "prompt": text, "target": q.target}
        if fits(model, record, len(ids) + 1):
            prompts.append(ids)
            kept.append((record, q))
        records.append(record)
    results = sampled(model, tokenizer, prompts, samples=samples, max_new_tokens=max_new_tokens,
                      temperature=temperature, top_p=top_p, top_k=top_k, batch_size=batch_size,
                      stop_strings=tuple(stop_strings), seed=seed, progress=progress, desc="gsm8k")
    for (record, q), group in zip(kept, results):
        strict = [strict_extract(text) for text, _ in group]
        flexible = [flexible_extract(text) for text, _ in group]
        record.update(completion=group[0][0], strict=strict[0], flexible=flexible[0],
                      strict_correct=gsm_correct(strict[0], q.answer),
                      flexible_correct=gsm_correct(flexible[0], q.answer), truncated=group[0][1])
        if samples > 1:
            record.update(completions=[text for text, _ in group],
                          strict_any=any(gsm_correct(s, q.answer) for s in strict),
                          flexible_any=any(gsm_correct(f, q.answer) for f in flexible),
                          truncated_samples=sum(t for _, t in group))
    scored = [r for r in records if "skipped" not in r]
    n = len(scored)

    def mean(field: str) -> float | None:
        return sum(bool(r[field]) for r in scored) / n if n else None

    metrics = {"strict_acc": mean("strict_correct"), "flexible_acc": mean("flexible_correct"), "n": n,
               "truncated": sum(r["truncated"] for r in scored), "shots": shots, "samples": samples,
               "temperature": temperature, "max_new_tokens": max_new_tokens,
               "prompt": prompt_kind(chat)}
    if samples > 1:
        metrics.update({f"strict_pass@{samples}": mean("strict_any"), f"flexible_pass@{samples}": mean("flexible_any"),
                        "truncated_samples": sum(r["truncated_samples"] for r in scored)})
    return TaskResult(metrics | skipped_metrics(records), records)


def malaymmlu_generative(model: nn.Module, tokenizer, questions: list[MCQuestion], *, samples: int = 1,
                         temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                         system_prompt: str = BOXED_SYSTEM_PROMPT, max_new_tokens: int = 1024,
                         batch_size: int = 32, seed: int = 0, progress: bool = False) -> TaskResult:
    """MalayMMLU answered by generation, as the GPT-OSS recipe measured it: `samples` answers per question through
    the chat template with a reasoning system prompt, each parsed for its single \\boxed{} letter. Reports
    first-sample accuracy and any-of-N accuracy (both weighted by category size); an answer with no (or an
    ambiguous) \\boxed{} letter counts as wrong and is also counted under "unparsed"."""
    check_samples(samples, temperature)
    prompts, records, kept = [], [], []
    for q in questions:
        ids = chat_ids(tokenizer, [{"role": "system", "content": system_prompt},
                                   {"role": "user", "content": malaymmlu_prompt(q)}])
        record = {"row": q.row, "subject": q.subject, "category": q.category, "answer": LETTERS[q.answer],
                  "prompt": tokenizer.decode(ids)}
        if fits(model, record, len(ids) + 1):
            prompts.append(ids)
            kept.append((record, q))
        records.append(record)
    results = sampled(model, tokenizer, prompts, samples=samples, max_new_tokens=max_new_tokens,
                      temperature=temperature, top_p=top_p, top_k=top_k, batch_size=batch_size, stop_strings=(),
                      seed=seed, progress=progress, desc="malaymmlu generative")
    for (record, q), group in zip(kept, results):
        letters = [boxed_letter(text, len(q.choices)) for text, _ in group]
        record.update(completions=[text for text, _ in group], parsed=letters,
                      first_sample_correct=letters[0] == LETTERS[q.answer],
                      any_of_n_correct=LETTERS[q.answer] in letters, unparsed=sum(x is None for x in letters),
                      truncated=sum(t for _, t in group))
    metrics = category_metrics(records, ("first_sample", "any_of_n"))
    scored = [r for r in records if "skipped" not in r]
    metrics.update(samples=samples, temperature=temperature, prompt="chat template, generated",
                   unparsed=sum(r["unparsed"] for r in scored),
                   unparsed_first=sum(r["parsed"][0] is None for r in scored),
                   truncated=sum(r["truncated"] for r in scored))
    return TaskResult(metrics, records)


# ----------------------------------------------------------------------------- one entry point: eval.py and train.py


def first(items: list, limit: int) -> list:
    return items[:limit] if limit else items


def same_file(fewshot_data: str, data: str) -> bool:
    """Whether few-shot examples come from the evaluated file itself (none named, or the same path): then a
    question is never its own example, as lm-evaluation-harness does when its few-shot and test splits are one."""
    return not fewshot_data or Path(fewshot_data).resolve() == Path(data).resolve()


def read_task_data(name: str, t: TaskConfig) -> tuple[list, list, bool]:
    """(questions, few-shot pool, whether the pool is the questions' own file) of task `name` under settings t;
    TaskDataError for a file that cannot be read (train.py reads them once before its first step)."""
    readers = {"mmlu": read_mmlu, "malaymmlu": read_malaymmlu, "gsm8k": read_gsm8k}
    if name not in readers:
        raise ValueError(f"unknown task {name!r}; expected one of {list(TASKS)}")
    data, fewshot_data = getattr(t, f"{name}_data"), getattr(t, f"{name}_fewshot_data", "")
    questions = readers[name](data)
    own = same_file(fewshot_data, data)
    return first(questions, t.limit), questions if own else readers[name](fewshot_data), own


def run_task(name: str, model: nn.Module, tokenizer, t: TaskConfig, progress: bool = False) -> TaskResult:
    """Task `name` (mmlu, malaymmlu, gsm8k) with the settings of a TaskConfig (eval.py builds one from its flags,
    train.py takes the config's eval.task): reads the files, takes the first t.limit questions, runs the task."""
    questions, pool, own = read_task_data(name, t)
    if name == "mmlu":
        return mmlu(model, tokenizer, questions, shots=t.shots, pool=pool, by_subject=t.fewshot_pool == "subject",
                    chat=t.chat, max_tokens=t.max_tokens, progress=progress, exclude_self=own)
    if name == "malaymmlu" and t.generative:
        return malaymmlu_generative(model, tokenizer, questions, samples=t.samples, temperature=t.temperature,
                                    top_p=t.top_p, system_prompt=t.system_prompt or BOXED_SYSTEM_PROMPT,
                                    max_new_tokens=t.max_new_tokens, batch_size=t.batch_size, seed=t.seed,
                                    progress=progress)
    if name == "malaymmlu":
        return malaymmlu(model, tokenizer, questions, chat=t.chat, max_tokens=t.max_tokens, progress=progress)
    instruction = GSM_INSTRUCTION if t.instruction == "auto" else t.instruction
    return gsm8k(model, tokenizer, questions, shots=t.shots, pool=pool, chat=t.chat, instruction=instruction,
                 samples=t.samples,
                 temperature=t.temperature, top_p=t.top_p, max_new_tokens=t.max_new_tokens, batch_size=t.batch_size,
                 seed=t.seed, progress=progress, exclude_self=own)


def scalar_metrics(name: str, metrics: dict) -> dict:
    """The numbers among a task's metrics, as {"<task>_<metric>": value}: what metrics.jsonl and wandb get."""
    return {f"{name}_{k}": v for k, v in metrics.items()
            if (isinstance(v, (int, float)) and not isinstance(v, bool)) or (v is None and k.endswith("acc"))}
