"""Samplers: class-aware uniformity, disjoint ranks, reproducibility, world-size independence."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.sampler import GlobalBatchSampler, SamplerSpec, _cycle_draws, class_image_lists, repeat_factors


def _dataset(n: int = 600, classes: int = 20, seed: int = 0):
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, classes + 1) ** 1.5  # long-tailed, like OID
    labels = [np.unique(rng.choice(classes, size=rng.integers(1, 4), p=weights / weights.sum())) for _ in range(n)]
    return labels, rng.random(n) < 0.6


def _sampler(labels, landscape, mode, world=1, rank=0, per_rank=4, iters=50, seed=0, **spec):
    return GlobalBatchSampler(labels, landscape, 20, per_rank, world, rank, seed, iters, SamplerSpec(mode=mode, **spec))


def test_class_aware_visits_every_class_equally_often():
    labels, land = _dataset()
    s = _sampler(labels, land, "class_aware", per_rank=5, iters=400, group_by_aspect=False)
    rng = np.random.default_rng([0, 3])
    drawn = s._draws(rng, 6000)
    images_of = class_image_lists(labels, 20)
    # each round visits every class once, drawing one of its images: every block of 20 draws has,
    # for every class, an image that contains it
    rounds = len(drawn) // 20
    assert rounds >= 300
    for c in range(20):
        assert np.isin(drawn, images_of[c]).sum() >= rounds
        assert np.isin(drawn.reshape(rounds, 20), images_of[c]).any(axis=1).all()
    # a frequency test on the drawn images' classes vs uniform sampling: rare classes are boosted
    uniform = np.concatenate([rng.permutation(len(labels)) for _ in range(4)])[: len(drawn)]
    rare = images_of[19]
    assert np.isin(drawn, rare).mean() > 3 * np.isin(uniform, rare).mean()


def test_class_aware_within_class_draws_are_uniform_chi_square():
    labels = [np.array([0])] * 10 + [np.array([1])] * 30
    s = GlobalBatchSampler(labels, np.ones(40, bool), 2, 4, 1, 0, 7, 1000, SamplerSpec(mode="class_aware"))
    idx, _ = s.epoch_batches(0)
    counts = np.bincount(idx.ravel(), minlength=40)
    per_class = [counts[:10], counts[10:]]
    assert abs(per_class[0].sum() - per_class[1].sum()) <= 4  # classes balanced despite 1:3 images
    for c in per_class:  # cycles: every image of a class drawn equally often (+-1)
        assert c.max() - c.min() <= 1
    # and the order is random: a chi-square test of positions mod 10 against uniform
    positions = np.flatnonzero(np.isin(idx.ravel(), np.arange(10))) % 10
    observed = np.bincount(positions, minlength=10)
    chi2 = ((observed - observed.mean()) ** 2 / observed.mean()).sum()
    assert chi2 < 27.9  # p = 0.001 for 9 degrees of freedom


@pytest.mark.parametrize("mode", ["uniform", "class_aware", "repeat_factor"])
def test_ranks_are_disjoint_equal_and_independent_of_world_size(mode):
    labels, land = _dataset()
    one = _sampler(labels, land, mode, world=1, per_rank=4)
    ranks = [_sampler(labels, land, mode, world=2, rank=r, per_rank=2) for r in range(2)]
    whole, flips = one.epoch_batches(1)
    parts = [list(s.rank_batches(1)) for s in ranks]
    assert len(parts[0]) == len(parts[1]) == 50  # equal batches on every rank
    for it in range(50):
        combined = parts[0][it] + parts[1][it]
        assert [i for i, _ in combined] == whole[it].tolist()  # same global batch as one worker
        assert [f for _, f in combined] == flips[it].tolist()
    # disjoint positions: rank 0 and rank 1 never share a slot of a global batch
    assert len(parts[0][0]) == len(parts[1][0]) == 2


@pytest.mark.parametrize("mode", ["uniform", "class_aware", "repeat_factor"])
def test_order_is_reproducible_resumable_and_changes_with_epoch_and_seed(mode):
    labels, land = _dataset()
    a = _sampler(labels, land, mode)
    b = _sampler(labels, land, mode)
    e0, _ = a.epoch_batches(0)
    np.testing.assert_array_equal(e0, b.epoch_batches(0)[0])
    assert not np.array_equal(e0, a.epoch_batches(1)[0])
    assert not np.array_equal(e0, _sampler(labels, land, mode, seed=1).epoch_batches(0)[0])
    resumed = list(a.rank_batches(0, start=17))
    assert [i for i, _ in resumed[0]] == e0[17].tolist()


def test_aspect_groups_never_mix_in_a_batch():
    labels, land = _dataset()
    idx, _ = _sampler(labels, land, "uniform").epoch_batches(0)
    assert all(len(set(land[row].tolist())) == 1 for row in idx)


def test_repeat_factors_follow_lvis():
    labels = [np.array([0])] * 90 + [np.array([1])] * 10 + [np.array([0, 1])] * 0
    r = repeat_factors(labels, 2, threshold=0.4)
    assert r[0] == 1.0 and r[95] == pytest.approx(np.sqrt(0.4 / 0.1))


def test_cycle_draws_cover_every_item_each_pass():
    draws = _cycle_draws(np.arange(7) * 10, 7 * 3 + 4, np.random.default_rng(0))
    for p in range(3):
        assert sorted(draws[7 * p : 7 * (p + 1)].tolist()) == list(range(0, 70, 10))
    assert len(set(draws[21:].tolist())) == 4  # the start of a 4th pass: no repeats
