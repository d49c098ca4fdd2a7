"""training/generation.py's batched decoding: finished rows leave the batch (KVCache.keep_rows), and
generate_completions runs many prompts in length-sorted batches.

Oracle: the same model generating each prompt alone (greedy), which has no other rows to drop. Tiny random models
(fp32, CPU): a Llama and a GPT-OSS (mixture of experts, sinks, a sliding window the decoding runs past).
"""

import itertools

import pytest
import torch

from model import build_model
from model.gpt_oss import GptOssConfig
from model.kv_cache import KVCache
from model.llama import LlamaConfig
from model.rope import RopeScaling
from training.generation import Completion, generate, generate_completions

VOCAB, CONTEXT = 64, 64
CONFIGS = {
    "llama": LlamaConfig(vocab_size=VOCAB, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128,
                         max_seq_len=CONTEXT, attn_backend="sdpa"),
    "gpt_oss": GptOssConfig(vocab_size=VOCAB, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=64,
                            n_experts=4, top_k=2, max_seq_len=CONTEXT, sliding_window=8, attn_backend="eager",
                            rope_scaling=RopeScaling("yarn", factor=4.0, original_max_seq_len=16, truncate=False)),
}
PROMPT_LENGTHS = (3, 11, 6, 1, 9)


def tiny_model(family: str) -> torch.nn.Module:
    """A random model whose logits are far from uniform (weights 0.3 randn, norms 1 + 0.1 randn, sinks randn), so
    greedy choices are clear-cut."""
    model = build_model(CONFIGS[family])
    model.to_empty(device="cpu")
    model.init_weights()
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("sinks"):
                p.copy_(torch.randn_like(p))
            elif "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.3 * torch.randn_like(p))
    return model.eval()


def prompts_of(lengths, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in lengths]


def finish_steps(free: list[list[int]], stop_ids) -> list[int]:
    """How many tokens each row keeps when it stops at the first of stop_ids in its free-running output."""
    return [next((j + 1 for j, t in enumerate(row) if t in stop_ids), len(row)) for row in free]


def spread_stop_ids(free: list[list[int]]) -> tuple[int, int]:
    """Two stop ids under which the rows finish at as many different steps as possible, one row never stopping."""
    def spread(pair):
        steps = finish_steps(free, pair)
        return (len(free[0]) in steps, len(set(steps)), max(steps) - min(steps))
    return max(itertools.combinations(range(VOCAB), 2), key=spread)


class Chars:
    """Decodes ids as letters (id % 26), to test stop strings without a real tokenizer."""

    def decode(self, ids):
        return "".join(chr(97 + i % 26) for i in ids)


def forward_batch_sizes(model: torch.nn.Module) -> tuple[list[int], torch.utils.hooks.RemovableHandle]:
    """A list that fills with the batch size of every forward of model, and the hook's handle."""
    sizes: list[int] = []
    handle = model.register_forward_pre_hook(lambda module, args: sizes.append(args[0].shape[0]))
    return sizes, handle


@pytest.mark.parametrize("family", list(CONFIGS))
def test_rows_finishing_at_different_steps_get_what_they_get_alone(family):
    """Greedy, stop ids chosen so that the five rows finish at very different steps (one only at max_new_tokens):
    each row equals the prompt generated alone, and every decoding step runs only the rows not yet finished."""
    model = tiny_model(family)
    prompts, max_new = prompts_of(PROMPT_LENGTHS), 30
    free = [generate(model, [p], max_new)[0] for p in prompts]
    stop_ids = spread_stop_ids(free)
    steps = finish_steps(free, stop_ids)
    assert max_new in steps and len(set(steps)) >= 4 and min(steps) <= max_new // 3, steps  # really spread out

    sizes, handle = forward_batch_sizes(model)
    batched = generate(model, prompts, max_new, stop_ids=stop_ids)
    handle.remove()
    for b, p in enumerate(prompts):
        assert batched[b] == free[b][:steps[b]] == generate(model, [p], max_new, stop_ids=stop_ids)[0], b
    # prefill (all but the last prompt column, then that column), then the step after token s runs the rows that
    # have more than s tokens: the batch shrinks as rows finish
    live = [sum(n > s for n in steps) for s in range(1, max(steps))]
    assert sizes == [len(prompts)] * 2 + live
    assert live[-1] == 1 and len(set(live)) >= 4


def test_keep_rows_moves_the_kept_rows_in_place():
    cache = KVCache(n_layers=2, batch_size=4, n_kv_heads=2, head_dim=3, max_len=6, dtype=torch.float32, device="cpu")
    k, v = torch.randn(2, 4, 2, 5, 3), torch.randn(2, 4, 2, 5, 3)  # (layers, B, heads, filled, head_dim)
    for layer in range(2):
        cache.append(layer, k[layer], v[layer])
    cache.advance(5)
    storage = cache.k.data_ptr()
    cache.keep_rows([1, 3])
    assert cache.batch_size == 2 and cache.length == 5 and cache.k.data_ptr() == storage  # no new memory
    assert torch.equal(cache.k[:, :, :, :5], k[:, [1, 3]]) and torch.equal(cache.v[:, :, :, :5], v[:, [1, 3]])
    keys, _ = cache.append(0, torch.ones(2, 2, 1, 3), torch.ones(2, 2, 1, 3))  # the next step appends to both rows
    assert torch.equal(keys[:, :, :5], k[0, [1, 3]]) and torch.equal(keys[:, :, 5], torch.ones(2, 2, 3))
    for rows in ([1, 0], [0, 0], [2]):  # not ascending, repeated, past the 2 rows left
        with pytest.raises(ValueError, match="rows must ascend within 0..1"):
            cache.keep_rows(rows)


def test_generate_completions_keeps_input_order_and_says_why_each_row_ended(capsys):
    """Five prompts in batches of 2, sorted longest first: two run to max_new_tokens, one into the context (in a
    batch with a shorter prompt that goes on past that point, as it would alone), one ends on a stop string, one on
    a stop id."""
    model = tiny_model("llama")
    max_new = 12
    prompts = prompts_of((5, 60, 3, 8, 2), seed=2)  # prompt 1 leaves room for 4 new tokens in the context of 64
    free = [generate(model, [p], max_new)[0] for p in prompts]
    stop_string = Chars().decode(free[3][4:7])  # ends prompt 3 at its 7th token
    stop_id = free[2][5]  # ends prompt 2 at its first occurrence of this token
    kwargs = dict(stop_ids=[stop_id], stop_strings=[stop_string], tokenizer=Chars())
    alone = [generate(model, [p], max_new, **kwargs)[0] for p in prompts]

    sizes, handle = forward_batch_sizes(model)
    got = generate_completions(model, prompts, max_new, batch_size=2, progress=True, desc="gsm", **kwargs)
    handle.remove()
    assert all(isinstance(c, Completion) for c in got)
    assert [c.tokens for c in got] == alone
    assert [len(c.tokens) for c in got] == [max_new, CONTEXT - 60, free[2].index(stop_id) + 1, 7, max_new]
    assert [c.stopped for c in got] == [False, False, True, True, False]
    first = [len(got[1].tokens), len(got[3].tokens)]  # the first batch: the two longest prompts
    assert sizes[:1 + max(first)] == [2, 2] + [sum(n > s for n in first) for s in range(1, max(first))]
    bar = capsys.readouterr().err
    assert "gsm" in bar and "5/5" in bar  # the progress bar, over prompts

    # a stop id that is also the last token max_new_tokens allows: the row stopped
    last = free[0][max_new - 1]
    k = free[0].index(last) + 1
    assert generate_completions(model, prompts[:1], k, stop_ids=[last]) == [Completion(free[0][:k], stopped=True)]
    assert generate_completions(model, [], 5) == []
    assert generate_completions(model, prompts, 0) == [Completion([], stopped=False)] * len(prompts)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        generate_completions(model, prompts, 4, batch_size=0)
    with pytest.raises(ValueError, match="prompt of 64 tokens does not fit the model's context of 64"):
        generate_completions(model, prompts + [[1] * 64], 4)


@pytest.mark.parametrize("family", list(CONFIGS))
def test_sampling_with_a_seed_repeats_while_rows_leave(family):
    """Sampled, with a stop id that ends rows at different steps: the same call gives the same tokens, another seed
    other tokens; generate_completions over several batches too."""
    model = tiny_model(family)
    prompts = prompts_of(PROMPT_LENGTHS)
    kwargs = dict(temperature=1.0, top_k=20, top_p=0.9, stop_ids=[5, 7])
    a = generate(model, prompts, 20, seed=3, **kwargs)
    assert len({len(row) for row in a}) > 1  # rows did leave the batch at different steps
    assert a == generate(model, prompts, 20, seed=3, **kwargs)
    assert a != generate(model, prompts, 20, seed=4, **kwargs)
    c = generate_completions(model, prompts, 20, batch_size=2, seed=3, **kwargs)
    assert c == generate_completions(model, prompts, 20, batch_size=2, seed=3, **kwargs)
    assert c != generate_completions(model, prompts, 20, batch_size=2, seed=4, **kwargs)
