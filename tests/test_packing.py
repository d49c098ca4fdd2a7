"""data/packing.py: packing plans, the packed and padded batches, ranks, resume and validation passes.

The dataset is an in-memory fake with data/sft.py's interface (n_samples, lengths, sample(i), fingerprint). By
default sample i's input ids are all i, so a batch says which samples it holds; its labels are i + 1 except on a
prompt of i % 3 positions and on its last position (-100).
"""

import dataclasses

import numpy as np
import pytest
import torch

from data.packing import PackedLoader, best_fit_decreasing, plan_epoch
from model import LLAMA_CONFIGS, build_model
from model.batch import IGNORE_INDEX

BUDGET = 16_384


class FakeSFT:
    def __init__(self, lengths, vocab: int | None = None, fingerprint: str = "fake"):
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.n_samples, self.vocab, self.fingerprint = len(self.lengths), vocab, fingerprint

    def sample(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        n = int(self.lengths[i])
        if self.vocab is None:
            ids = np.full(n, i, dtype=np.int64)
            labels = np.full(n, i + 1, dtype=np.int64)
        else:
            tokens = np.random.default_rng(i).integers(0, self.vocab, n + 1)
            ids, labels = tokens[:-1].copy(), tokens[1:].copy()
        labels[:i % 3] = IGNORE_INDEX
        labels[-1] = IGNORE_INDEX
        return ids, labels


def gsm_like(n: int = 20_000, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(150, 451, n)


def long_tailed(n: int = 20_000, seed: int = 0) -> np.ndarray:
    lengths = np.random.default_rng(seed).lognormal(np.log(1200), 1.0, n).astype(np.int64) + 1
    return np.minimum(lengths, BUDGET)


def small(n: int = 300, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(1, 120, n)


def plan_bins(loader: PackedLoader, epoch: int) -> list[list[int]]:
    plan = loader.plan(epoch)
    return [plan.bin(b).tolist() for b in range(plan.n_bins)]


def samples_in(batch) -> list[int]:
    """The sample indices a packed batch holds, in order (the fake's ids are the sample index)."""
    cu = batch.cu_seqlens.tolist()
    return [int(batch.input_ids[0, a]) for a in cu[:-1]]


def same(a, b) -> bool:
    return (torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels)
            and (a.cu_seqlens is None) == (b.cu_seqlens is None)
            and (a.cu_seqlens is None or torch.equal(a.cu_seqlens, b.cu_seqlens)))


# ---- plans -----------------------------------------------------------------------------------------------------------

def test_best_fit_decreasing_puts_each_item_into_the_fullest_bin_that_fits():
    lengths = np.random.default_rng(3).integers(1, 60, 500)
    capacity = 100
    expected, rooms = [], []  # the O(n x bins) definition, written out
    for i in np.argsort(-lengths, kind="stable").tolist():
        fits = [b for b, room in enumerate(rooms) if room >= lengths[i]]
        b = min(fits, key=lambda b: (rooms[b], b)) if fits else len(rooms)
        if not fits:
            expected.append([])
            rooms.append(capacity)
        expected[b].append(i)
        rooms[b] -= lengths[i]
    assert best_fit_decreasing(lengths, capacity) == expected


@pytest.mark.parametrize("lengths", [small(), gsm_like(3000)], ids=["small", "gsm"])
def test_every_sample_once_per_epoch_and_no_bin_over_the_budget(lengths):
    budget = 256 if lengths.max() < 256 else 2048
    loader = PackedLoader(FakeSFT(lengths), budget, seed=1, group_bins=4)  # many groups
    for epoch in range(3):
        bins = plan_bins(loader, epoch)
        assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
        assert max(sum(lengths[b]) for b in bins) <= budget
        assert loader.bins_in_epoch(epoch) == len(bins)


def test_plans_are_deterministic_and_differ_between_epochs_and_seeds():
    data = FakeSFT(gsm_like(3000))
    a, b = PackedLoader(data, 2048, seed=5), PackedLoader(data, 2048, seed=5)
    assert plan_bins(a, 0) == plan_bins(b, 0) and plan_bins(a, 1) == plan_bins(b, 1)
    assert plan_bins(a, 3) == plan_bins(PackedLoader(data, 2048, seed=5), 3)  # planned alone, the same
    assert plan_bins(a, 0) != plan_bins(a, 1)
    assert plan_bins(a, 0) != plan_bins(PackedLoader(data, 2048, seed=6), 0)
    assert sorted(map(sorted, plan_bins(a, 0))) != sorted(map(sorted, plan_bins(a, 1)))  # other bins, not reordered


def test_plan_epoch_is_the_loaders_plan_of_the_kept_samples():
    lengths = np.r_[gsm_like(2000), 5000, 3000]  # samples 2000 and 2001 are longer than the budget
    bins = plan_epoch(np.minimum(lengths, 2048), 2048, seed=4, epoch=2)
    assert [b.tolist() for b in bins] == [b.tolist() for b in plan_epoch(np.minimum(lengths, 2048), 2048, 4, 2)]
    assert [b.tolist() for b in bins] == plan_bins(PackedLoader(FakeSFT(lengths), 2048, 4, too_long="truncate"), 2)
    kept = np.arange(2000)
    dropped = [kept[b].tolist() for b in plan_epoch(lengths[kept], 2048, seed=4, epoch=2)]
    assert dropped == plan_bins(PackedLoader(FakeSFT(lengths), 2048, 4, too_long="drop"), 2)


def test_each_bin_holds_samples_of_one_group_of_the_shuffled_order():
    lengths, budget, group_bins = gsm_like(3000), 2048, 4
    order = np.random.default_rng([7, 1]).permutation(len(lengths))  # the plan's shuffle, its first draw
    start = np.cumsum(lengths[order]) - lengths[order]
    group = np.empty(len(lengths), np.int64)
    group[order] = start // (group_bins * budget)  # sample -> group of its first token in the shuffled order
    bins = plan_epoch(lengths, budget, seed=7, epoch=1, group_bins=group_bins)
    assert all(len(set(group[b].tolist())) == 1 for b in bins)
    assert len({int(group[b[0]]) for b in bins}) == group.max() + 1 > 50
    firsts = [int(group[b[0]]) for b in bins]
    assert firsts != sorted(firsts)  # the bins are shuffled, not left in group order


@pytest.mark.parametrize("lengths", [gsm_like(), long_tailed()], ids=["gsm_like", "long_tailed"])
def test_efficiency_at_16k_tokens(lengths):
    loader = PackedLoader(FakeSFT(lengths), BUDGET)
    for epoch in range(2):
        assert loader.efficiency(epoch) >= 0.98
        assert loader.efficiency(epoch) == lengths.sum() / (loader.bins_in_epoch(epoch) * BUDGET)


# ---- samples longer than the budget ----------------------------------------------------------------------------------

def test_too_long_is_an_error_at_construction_naming_the_sample_and_the_fixes():
    lengths = np.array([10, 30, 12, 40, 5])
    with pytest.raises(ValueError) as e:
        PackedLoader(FakeSFT(lengths), 25)
    msg = str(e.value)
    for part in ("sample 1 ", "30 positions", "max_tokens=25", "data.max_tokens", "too_long=truncate",
                 "too_long=drop"):
        assert part in msg


def test_too_long_truncate_and_drop_are_counted():
    data = FakeSFT([10, 30, 12, 40, 5])
    cut = PackedLoader(data, 25, too_long="truncate", shuffle=False)
    assert (cut.n_truncated, cut.n_dropped) == (2, 0)
    batches = [cut.next_batch() for _ in range(cut.n_batches)]
    seen = {i: n for b in batches for i, n in zip(samples_in(b), b.cu_seqlens.diff().tolist())}
    assert seen == {0: 10, 1: 25, 2: 12, 3: 25, 4: 5}
    ids, labels = data.sample(3)
    row = next(b for b in batches if 3 in samples_in(b))
    start = int(row.cu_seqlens[samples_in(row).index(3)])
    assert row.labels[0, start:start + 25].tolist() == labels[:25].tolist()  # the first 25 positions

    drop = PackedLoader(data, 25, too_long="drop")
    assert (drop.n_truncated, drop.n_dropped) == (0, 2)
    assert sorted(i for b in plan_bins(drop, 0) for i in b) == [0, 2, 4]
    assert drop.efficiency(0) == 27 / (drop.bins_in_epoch(0) * 25)


# ---- batches ---------------------------------------------------------------------------------------------------------

def test_packed_batch_is_the_bins_samples_end_to_end():
    data = FakeSFT(small())
    loader = PackedLoader(data, 256, seed=2)
    for k in range(5):
        members = plan_bins(loader, 0)[k]
        batch = loader.next_batch()
        lengths = data.lengths[members]
        assert batch.input_ids.shape == batch.labels.shape == (1, lengths.sum())
        assert batch.cu_seqlens.dtype == torch.int32
        assert batch.cu_seqlens.tolist() == [0, *np.cumsum(lengths).tolist()]
        assert batch.max_seqlen == lengths.max()
        assert samples_in(batch) == members
        for i, a, b in zip(members, batch.cu_seqlens[:-1].tolist(), batch.cu_seqlens[1:].tolist()):
            ids, labels = data.sample(i)
            assert batch.position_ids[0, a:b].tolist() == list(range(b - a))
            assert batch.input_ids[0, a:b].tolist() == ids.tolist()
            assert batch.labels[0, a:b].tolist() == labels.tolist()


def test_padded_fallback_holds_the_same_samples_one_per_row():
    data = FakeSFT(small())
    packed, padded = PackedLoader(data, 256, seed=2), PackedLoader(data, 256, seed=2, padded=True, pad_id=7)
    for _ in range(5):
        p, q = packed.next_batch(), padded.next_batch()
        members = samples_in(p)
        lengths = data.lengths[members]
        assert q.cu_seqlens is None and q.position_ids is None
        assert q.input_ids.shape == (len(members), lengths.max())
        for row, (i, n) in enumerate(zip(members, lengths.tolist())):
            ids, labels = data.sample(i)
            assert q.input_ids[row, :n].tolist() == ids.tolist() and q.labels[row, :n].tolist() == labels.tolist()
            assert (q.input_ids[row, n:] == 7).all() and (q.labels[row, n:] == IGNORE_INDEX).all()
        assert q.n_learnable() == p.n_learnable()


def test_padded_and_packed_batches_give_the_same_loss():
    config = dataclasses.replace(LLAMA_CONFIGS["debug"], attn_backend="eager")
    torch.manual_seed(0)
    model = build_model(config)
    model.to_empty(device="cpu")
    model.init_weights()
    data = FakeSFT(np.random.default_rng(4).integers(8, 60, 40), vocab=config.vocab_size)
    packed, padded = PackedLoader(data, 128, seed=0), PackedLoader(data, 128, seed=0, padded=True)
    with torch.no_grad():
        for _ in range(4):
            p, q = packed.next_batch(), padded.next_batch()
            assert p.n_samples > 1
            a, b = model(p, reduction="none"), model(q, reduction="none")
            assert int(a.n_tokens) == int(b.n_tokens) > 0
            cu = p.cu_seqlens.tolist()
            for row, (start, end) in enumerate(zip(cu[:-1], cu[1:])):  # every position's loss, atol 1e-5
                torch.testing.assert_close(a.token_losses[0, start:end], b.token_losses[row, :end - start],
                                           atol=1e-5, rtol=0)
            assert (b.token_losses[q.labels == IGNORE_INDEX] == 0).all()  # padding adds nothing
            # loss_sum (~1300 here, where one fp32 ulp is 1.2e-4): 1e-5 per learnable token, for summation order
            torch.testing.assert_close(a.loss_sum, b.loss_sum, atol=1e-5 * int(a.n_tokens), rtol=0)
            # it can fail: the same row without cu_seqlens lets later samples attend to earlier ones
            alone = model(p.input_ids, p.labels)
            assert abs(float(alone.loss_sum) - float(a.loss_sum)) > 1e-3


# ---- ranks, steps, resume --------------------------------------------------------------------------------------------

def test_two_ranks_see_the_batches_of_one_process():
    data = FakeSFT(small())
    one = PackedLoader(data, 256, seed=3)
    ranks = [PackedLoader(data, 256, seed=3, rank=r, world_size=2) for r in range(2)]
    n = one.bins_in_epoch(0) + 7  # across the epoch boundary
    for _ in range(n // 2):
        for r in ranks:
            assert same(r.next_batch(), one.next_batch())
    assert ranks[0].state_dict() == ranks[1].state_dict() == one.state_dict()
    assert one.epoch == 1


def test_total_steps_matches_iterating_the_stream():
    data = FakeSFT(small())
    loader = PackedLoader(data, 256, seed=0)
    bins = [loader.bins_in_epoch(e) for e in range(3)]
    for world_size, grad_accum in ((1, 1), (2, 3), (4, 5)):
        steps = loader.total_steps(3, world_size, grad_accum)
        assert steps == sum(bins) // (world_size * grad_accum)
        stream = PackedLoader(data, 256, seed=0)
        epochs = []
        for _ in range(steps * world_size * grad_accum):
            epochs.append(stream.epoch)
            stream.next_batch()
        assert [epochs.count(e) for e in range(3)][:2] == bins[:2]  # epochs 0 and 1 in full, then part of 2
        assert stream.epoch == (2 if sum(bins) % (world_size * grad_accum) else 3)


def test_resume_mid_epoch_gives_the_same_next_batches():
    data = FakeSFT(small())
    straight = PackedLoader(data, 256, seed=9, rank=1, world_size=2)
    for _ in range(5):
        straight.next_batch()
    sd = straight.state_dict()
    assert sd["position"] == 10 and sd["epoch"] == 0
    resumed = PackedLoader(data, 256, seed=9, rank=1, world_size=2)
    resumed.load_state_dict(sd)
    for _ in range(straight.bins_in_epoch(0)):  # into the next epoch
        assert same(resumed.next_batch(), straight.next_batch())


@pytest.mark.parametrize("key, change", [("seed", dict(seed=1)), ("max_tokens", dict(max_tokens=200)),
                                         ("fingerprint", dict(fingerprint="other")),
                                         ("too_long", dict(too_long="drop")), ("padded", dict(padded=True)),
                                         ("shuffle", dict(shuffle=False)), ("group_bins", dict(group_bins=8))])
def test_mismatched_state_is_an_error_naming_the_key(key, change):
    settings = dict(max_tokens=256, seed=0)
    sd = PackedLoader(FakeSFT(small()), **settings).state_dict()
    fingerprint = change.pop("fingerprint", "fake")
    other = PackedLoader(FakeSFT(small(), fingerprint=fingerprint), **{**settings, **change})
    with pytest.raises(ValueError, match=f"saved {key}="):
        other.load_state_dict(sd)


# ---- validation ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_validation_pass_covers_every_sample_once(world_size):
    data = FakeSFT(small(305))  # 89 bins: neither 2 nor 3 ranks divide them
    pad = 10**6  # no sample's id
    loaders = [PackedLoader(data, 256, shuffle=False, rank=r, world_size=world_size, pad_id=pad)
               for r in range(world_size)]
    n_bins = loaders[0].bins_in_epoch(0)
    assert n_bins % world_size or world_size == 1  # this split leaves some ranks an empty last slot
    assert {v.n_batches for v in loaders} == {-(-n_bins // world_size)}
    for _ in range(2):  # reset() starts the same pass again
        seen, empty = [], 0
        for v in loaders:
            mine = []
            v.next_batch()  # read past the start, then reset
            v.reset()
            for _ in range(v.n_batches):
                batch = v.next_batch()
                if batch.input_ids[0, 0] == pad:
                    assert batch.input_ids.shape == (1, 1) and batch.labels.tolist() == [[IGNORE_INDEX]]
                    empty += 1
                else:
                    mine += samples_in(batch)
            assert mine == sorted(mine)  # bins in sample order
            seen += mine
        assert sorted(seen) == list(range(data.n_samples))
        assert empty == world_size * loaders[0].n_batches - n_bins


@pytest.mark.parametrize("padded", [False, True], ids=["packed", "padded"])
def test_an_empty_validation_batch_adds_nothing_to_the_totals(padded):
    config = dataclasses.replace(LLAMA_CONFIGS["debug"], attn_backend="eager")
    model = build_model(config)
    model.to_empty(device="cpu")
    model.init_weights()
    rank1 = PackedLoader(FakeSFT([10, 20, 30]), 64, shuffle=False, rank=1, world_size=2, padded=padded)
    assert rank1.n_batches == 1
    batch = rank1.next_batch()  # one bin, so rank 1's slot is empty
    assert batch.input_ids.shape == (1, 1) and (batch.cu_seqlens is None) == padded
    with torch.no_grad():
        out = model(batch)
    assert float(out.loss_sum) == 0 and int(out.n_tokens) == 0 and int(out.n_correct) == 0
