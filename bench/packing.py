"""Packing to a token budget (data/packing.py): how full the bins are, and learnable tokens/s of packed rows against
padded rows (of the same bins, and of random batches). Prints two markdown tables and the command line.

    python -m bench.packing                                   # CPU: efficiency at 16,384, speed at 2,048 tokens
    python -m bench.packing --device cuda --max_tokens 16384  # GPU: speed at the efficiency budget too
    python -m bench.packing --data my.jsonl --steps 9

Two length distributions, each measured on the same samples throughout:
    gsm          the GSM file (--data: the shared gsm_symbolic_train.jsonl, else data/samples/gsm_sample.jsonl
                 when only that exists), each row rendered as {user: question, assistant: answer} with the ChatML
                 template (data.chat.render) and tokenised with GPT-2 (special-token text as plain text; the
                 lengths are what matters). Labels: the next token on the answer, -100 on the prompt and on a
                 sample's last position.
    long-tailed  --n_lognormal lengths drawn from a lognormal (seeded; median budget / 16, sigma 1), capped at the
                 budget, random ids, every position but the last learned.

Efficiency: real tokens / (bins x budget) of epochs 0 and 1 at --budget, beside the best any packing can reach,
total / (ceil(total / budget) x budget): a small file is bounded by its last bin (the 4,000 GSM rows fill 42.1
bins of 16,384, so no plan beats 97.9%), hence also the file's lengths --repeat times over (a dataset of the same
distribution and a realistic size; those samples are the file's, each --repeat times). "padded rows" is what the
padded fallback makes of the same bins: real tokens / tokens fed, each bin's samples padded to its longest.
Best-fit decreasing fills bins with samples of similar lengths (it places them longest first), so that waste is
smaller than that of padding random samples together; "padded random batches" is that usual baseline (a padded
DataLoader): the samples in a random order, as many per batch as a bin holds on average, each batch padded to its
longest.

Speed: forward + backward of a small Llama (model/llama.py: --dim, --layers, GPT-2's padded vocabulary) on the
first 1 + --steps bins of epoch 0 at --max_tokens (the long-tailed lengths redrawn for that budget), in three modes
that alternate bin by bin so all see the same machine conditions: "packed" (the bin in one row, cu_seqlens), "padded,
same bins" (the padded fallback, padded=True: the bin's samples one per row, right-padded to the bin's longest,
labels -100) and "padded, random batches" (as many random samples as the bin holds, padded to their longest: what a
padded DataLoader feeds). The first bin is a warm-up; the table gives the median over the other bins of learnable
tokens / s, the tokens each mode feeds the model, and packed's speed-up: packed's learnable tokens/s over the mode's.
Best-fit decreasing puts samples of similar lengths into a bin, so the padded fallback of the same bins wastes little
(the efficiency table's "padded rows"); the speed-up that packing brings over padding to the longest of each batch
is the one over random batches.
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script (python bench/packing.py): make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from bench.common import sync
from data.chat import render
from data.packing import PackedLoader
from data.tokenizer import load_tokenizer
from model import build_model
from model.batch import IGNORE_INDEX, Batch
from model.llama import LlamaConfig

REPO = Path(__file__).resolve().parents[1]
GSM_FILES = (REPO / ".." / "shared" / "assets" / "eval" / "gsm_symbolic_train.jsonl",  # 4,000 rows
             REPO / "data" / "samples" / "gsm_sample.jsonl")  # 300 rows, where the shared assets are absent

LABELS = {"packed": "packed", "padded": "padded, same bins", "padded random": "padded, random batches"}


class Repeated:
    """`data`'s samples, each `times` times over (sample i is data's i % data.n_samples)."""

    def __init__(self, data, times: int):
        self.data, self.fingerprint = data, f"{data.fingerprint}x{times}"
        self.lengths = np.tile(data.lengths, times)
        self.n_samples = len(self.lengths)

    def sample(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        return self.data.sample(i % self.data.n_samples)


class Samples:
    """In-memory samples with data/sft.py's dataset interface (n_samples, lengths, sample(i), fingerprint)."""

    def __init__(self, ids: list[np.ndarray], labels: list[np.ndarray], name: str):
        self.ids, self.labels, self.fingerprint = ids, labels, name
        self.lengths = np.array([len(x) for x in ids], dtype=np.int64)
        self.n_samples = len(ids)

    def sample(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        return self.ids[i], self.labels[i]


def gsm_samples(path: Path) -> Samples:
    tok = load_tokenizer("gpt2")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    chats = [[{"role": "user", "content": r["question"]}, {"role": "assistant", "content": r["answer"]}]
             for r in rows]
    full = tok.encode_batch([render(c, "chatml") for c in chats])
    prompts = tok.encode_batch([render(c[:1], "chatml", add_generation_prompt=True) for c in chats])
    ids, labels = [], []
    for tokens, prompt in zip(full, prompts):
        tokens = np.asarray(tokens, dtype=np.int64)
        y = np.r_[tokens[1:], IGNORE_INDEX]  # the next token; nothing after the sample's last
        y[:len(prompt) - 1] = IGNORE_INDEX  # the answer's tokens are learned (from the prompt's last position on)
        ids.append(tokens)
        labels.append(y)
    return Samples(ids, labels, f"gsm:{path.name}")


def long_tailed_samples(n: int, budget: int, vocab: int, seed: int) -> Samples:
    rng = np.random.default_rng(seed)
    lengths = np.minimum(rng.lognormal(np.log(budget / 16), 1.0, n).astype(np.int64) + 2, budget)
    ids, labels = [], []
    for length in lengths.tolist():
        tokens = rng.integers(0, vocab, length + 1)
        y = tokens[1:].copy()
        y[-1] = IGNORE_INDEX
        ids.append(tokens[:-1])
        labels.append(y)
    return Samples(ids, labels, f"lognormal:{n}:{budget}:{seed}")


def efficiency_row(name: str, data: Samples, budget: int) -> str:
    loader = PackedLoader(data, budget, too_long="truncate")
    total = loader.n_tokens
    best = total / (-(-total // budget) * budget)
    t0 = time.perf_counter()
    loader.bins_in_epoch(1)
    plan_s = time.perf_counter() - t0
    plan = loader.plan(0)
    rows = [loader.lengths[plan.bin(b)] for b in range(plan.n_bins)]
    padded = total / sum(len(r) * int(r.max()) for r in rows)  # one row per sample, padded to the bin's longest
    order = np.random.default_rng(0).permutation(len(loader.lengths))  # a padded DataLoader: random samples,
    k = max(1, round(len(order) / plan.n_bins))  # as many per batch as a bin holds on average
    batches = [loader.lengths[order[i:i + k]] for i in range(0, len(order), k)]
    random_padded = total / sum(len(r) * int(r.max()) for r in batches)
    lengths = data.lengths
    return (f"| {name} | {data.n_samples:,} | {lengths.mean():.0f} / {int(np.median(lengths))} / {lengths.max():,} | "
            f"{loader.n_truncated} | {loader.bins_in_epoch(0)} | {100 * loader.efficiency(0):.2f}% | "
            f"{100 * loader.efficiency(1):.2f}% | {100 * best:.2f}% | {100 * padded:.1f}% | "
            f"{100 * random_padded:.1f}% | {plan_s * 1e3:.0f} ms |")


def speed_rows(name: str, data: Samples, model: torch.nn.Module, args) -> list[str]:
    loaders = {mode: PackedLoader(data, args.max_tokens, seed=args.seed, padded=mode == "padded",
                                  too_long="truncate") for mode in ("packed", "padded")}
    modes = (*loaders, "padded random")
    rates = {mode: [] for mode in modes}
    fed = {mode: [] for mode in modes}
    autocast = torch.autocast(args.device.split(":")[0], dtype=torch.bfloat16, enabled=args.dtype == "bf16")
    order = iter(np.random.default_rng(args.seed).permutation(data.n_samples))
    for step in range(1 + args.steps):
        bin_size = loaders["packed"].plan(0).bin(step).size
        for mode in modes:
            batch = loaders[mode].next_batch() if mode in loaders else random_batch(data, order, bin_size, args)
            learnable = batch.n_learnable()
            batch = batch.to(args.device)
            sync(args.device)
            t0 = time.perf_counter()
            with autocast:
                out = model(batch)
            out.loss_sum.backward()
            sync(args.device)
            seconds = time.perf_counter() - t0
            model.zero_grad(set_to_none=True)
            if step:  # the first bin warms up
                rates[mode].append(learnable / seconds)
                fed[mode].append(batch.input_ids.numel())
    packed = statistics.median(rates["packed"])
    return [f"| {name} | {LABELS[mode]} | {statistics.mean(fed[mode]):,.0f} | {statistics.median(rates[mode]):,.0f} | "
            f"{packed / statistics.median(rates[mode]):.2f}x |" for mode in modes]


def random_batch(data, order, k: int, args) -> Batch:
    """The baseline of a padded DataLoader: the next k samples of a random order (as many as the packed bin holds),
    one per row, right-padded to the longest of them with labels -100."""
    samples = [data.sample(int(next(order))) for _ in range(k)]
    longest = max(len(ids) for ids, _ in samples)
    ids = torch.zeros(k, longest, dtype=torch.int64)
    labels = torch.full((k, longest), IGNORE_INDEX, dtype=torch.int64)
    for row, (x, y) in enumerate(samples):
        ids[row, :len(x)], labels[row, :len(y)] = torch.from_numpy(x), torch.from_numpy(y)
    return Batch(ids, labels)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, default=next((f for f in GSM_FILES if f.is_file()), GSM_FILES[-1]),
                   help="GSM jsonl with question and answer fields")
    p.add_argument("--budget", type=int, default=16384, help="token budget for the efficiency table")
    p.add_argument("--max_tokens", type=int, default=2048, help="token budget for the speed table")
    p.add_argument("--repeat", type=int, default=10, help="the GSM lengths this many times over, for efficiency")
    p.add_argument("--n_lognormal", type=int, default=20000, help="samples in the long-tailed distribution")
    p.add_argument("--steps", type=int, default=5, help="timed bins per mode (after 1 warm-up)")
    p.add_argument("--dim", type=int, default=64, help="model width (64: the debug config's)")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--attn", default="auto", help="attention backend (model.attention.BACKENDS)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.dtype = args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")
    print(f"command: python -m bench.packing {' '.join(sys.argv[1:] if argv is None else argv)}")
    print(f"device {args.device}, {torch.get_num_threads()} threads, torch {torch.__version__}\n")

    if not args.data.is_file():
        raise SystemExit(f"no GSM file at {args.data}: give --data a jsonl of question/answer rows (the shared "
                         f"assets' eval/gsm_symbolic_train.jsonl, or data/samples/gsm_sample.jsonl in the repo)")
    if args.data != GSM_FILES[0]:
        print(f"GSM lengths from {args.data}" + (f" ({GSM_FILES[0]} is absent)" if not GSM_FILES[0].is_file() else ""))
    gsm = gsm_samples(args.data)
    vocab = 50304  # GPT-2's 50,257 ids, padded to a multiple of 64
    print(f"## Packing efficiency at {args.budget:,} tokens (epochs 0 and 1; best = total / (ceil(total / budget) "
          f"x budget); padded rows: real tokens / tokens of the same bins padded to their longest)\n")
    print("| lengths | samples | mean / median / max | truncated | bins | epoch 0 | epoch 1 | best | padded rows | "
          "padded random batches | plan |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    print(efficiency_row(f"gsm ({args.data.name})", gsm, args.budget))
    print(efficiency_row(f"gsm lengths x {args.repeat}", Repeated(gsm, args.repeat), args.budget))
    print(efficiency_row("long-tailed", long_tailed_samples(args.n_lognormal, args.budget, vocab, args.seed),
                         args.budget))

    config = LlamaConfig(vocab_size=vocab, dim=args.dim, n_layers=args.layers, n_heads=max(1, args.dim // 32),
                         n_kv_heads=max(1, args.dim // 32), ffn_dim=3 * args.dim, max_seq_len=args.max_tokens,
                         attn_backend=args.attn)
    torch.manual_seed(args.seed)
    model = build_model(config)
    model.to_empty(device=args.device)
    model.init_weights()
    print(f"\n## Learnable tokens/s at {args.max_tokens:,} tokens: Llama dim {args.dim}, {args.layers} layers, "
          f"vocab {vocab}, {args.dtype}, attention {args.attn}; forward + backward, median of {args.steps} bins "
          f"after 1 warm-up\n")
    print("| lengths | mode | tokens fed / step | learnable tokens/s | packed speed-up |")
    print("|---|---|---|---|---|")
    for row in speed_rows("gsm", gsm, model, args):
        print(row)
    tail = long_tailed_samples(max(2000, 8 * (1 + args.steps) * 20), args.max_tokens, vocab, args.seed + 1)
    for row in speed_rows("long-tailed", tail, model, args):
        print(row)


if __name__ == "__main__":
    main()
