"""PKSampler: the P x K layout, sampling without/with replacement, coverage of an
epoch, proportional class visits, seeding and epochs, and every bad input."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest

import tripmine.sampling
from tripmine.sampling import PKSampler


def _imbalanced(seed: int = 0, n_classes: int = 60) -> np.ndarray:
    """Class sizes 1..40 (some below k, some far above), shuffled positions."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 41, size=n_classes)
    sizes[:3] = (1, 2, 3)  # always some classes smaller than k = 4
    return rng.permutation(np.repeat(np.arange(n_classes) * 7 + 100, sizes))


def _rows(labels: np.ndarray, batch: np.ndarray, p: int, k: int) -> np.ndarray:
    return np.asarray(labels)[batch].reshape(p, k)


def _per_class_draws(labels, batches, p, k) -> dict:
    """Each class's indices in the order the epoch drew them."""
    draws: dict = {}
    for batch in batches:
        for row in batch.reshape(p, k):
            draws.setdefault(labels[row[0]], []).extend(row.tolist())
    return draws


def _sizes(labels) -> dict:
    values, counts = np.unique(labels, return_counts=True)
    return dict(zip(values.tolist(), counts.tolist()))


# -- layout ---------------------------------------------------------------------------------

@pytest.mark.parametrize("p, k", [(1, 1), (4, 4), (8, 3), (60, 2), (5, 40)])
def test_every_batch_is_p_distinct_classes_times_k(p, k):
    labels = _imbalanced()
    sampler = PKSampler(labels, p, k, seed=1)
    batches = list(sampler)
    assert len(batches) == len(sampler) == -(-labels.size // (p * k))
    for batch in batches:
        assert isinstance(batch, np.ndarray)
        assert batch.dtype == np.int64 and batch.shape == (p * k,)
        assert batch.min() >= 0 and batch.max() < labels.size
        rows = _rows(labels, batch, p, k)
        assert (rows == rows[:, :1]).all(), "a row mixes classes"
        assert len(set(rows[:, 0].tolist())) == p, "classes repeat within a batch"


def test_class_order_within_batches_varies():
    labels = np.repeat(np.arange(8), 8)
    firsts = {int(labels[b[0]]) for b in PKSampler(labels, 4, 2, seed=0)}
    assert len(firsts) > 1


def test_batches_are_fresh_arrays_and_labels_untouched():
    labels = _imbalanced()
    before = labels.copy()
    sampler = PKSampler(labels, 4, 4, seed=2)
    first = list(sampler)
    for batch in first:
        batch[:] = -1
    sampler.set_epoch(0)
    again = list(sampler)
    assert all(b.min() >= 0 for b in again)
    np.testing.assert_array_equal(labels, before)


# -- which samples --------------------------------------------------------------------------

def test_large_classes_never_repeat_an_index_within_a_pass():
    labels = _imbalanced(seed=3)
    p, k = 6, 4
    # Three times the default length: the large classes go through several passes.
    sampler = PKSampler(labels, p, k, seed=4, batches_per_epoch=3 * -(-labels.size // (p * k)))
    batches = list(sampler)
    sizes = _sizes(labels)
    several_passes = 0
    for label, draws in _per_class_draws(labels, batches, p, k).items():
        n = sizes[label]
        if n < k:
            continue
        for row in np.reshape(draws, (-1, k)):
            assert len(set(row.tolist())) == k, f"class {label} repeats an index in a row"
        # Pass j is draws[j*n:(j+1)*n]: all of the class's samples, each once.
        for start in range(0, len(draws), n):
            chunk = draws[start:start + n]
            assert len(set(chunk)) == len(chunk), f"class {label} repeats within a pass"
        several_passes += len(draws) > 2 * n
    assert several_passes > 0  # the setup did exercise the pass boundary


def test_small_classes_are_drawn_with_replacement():
    # Classes of 1, 2 and 3 samples with k = 4, plus large ones.
    labels = np.concatenate([[0], [1, 1], [2, 2, 2], np.repeat([3, 4, 5], 12)])
    p, k = 4, 4
    members = {c: set(np.flatnonzero(labels == c).tolist()) for c in range(6)}
    seen_small = set()
    sampler = PKSampler(labels, p, k, seed=5, batches_per_epoch=20)
    for batch in sampler:
        for row in batch.reshape(p, k):
            c = int(labels[row[0]])
            if c <= 2:
                seen_small.add(c)
                # Every sample of the class once, the rest repeats of them.
                assert set(row.tolist()) == members[c]
    assert seen_small == {0, 1, 2}
    row_of_singleton = next(r for b in PKSampler(labels, p, k, seed=5, batches_per_epoch=20)
                            for r in b.reshape(p, k) if labels[r[0]] == 0)
    np.testing.assert_array_equal(row_of_singleton, [0, 0, 0, 0])


def test_small_class_repeats_are_random():
    labels = np.concatenate([[0, 0], np.repeat([1, 2], 8)])
    rows = {tuple(r) for b in PKSampler(labels, 3, 5, seed=6, batches_per_epoch=40)
            for r in b.reshape(3, 5) if labels[r[0]] == 0}
    assert len(rows) > 3  # not one fixed filling


# -- coverage and class visits --------------------------------------------------------------

def test_epoch_sees_every_sample_exactly_once_when_sizes_fit():
    # n_c multiples of k, N a multiple of p * k, no class above N / p.
    rng = np.random.default_rng(7)
    sizes = [4, 8, 12, 4, 16, 4, 8, 8, 12, 4, 8, 12, 20, 4, 4, 16, 8, 8, 4, 12]
    assert sum(sizes) % (4 * 4) == 0
    labels = rng.permutation(np.repeat(np.arange(len(sizes)), sizes))
    for epoch in range(3):
        sampler = PKSampler(labels, 4, 4, seed=8)
        sampler.set_epoch(epoch)
        seen = np.concatenate(list(sampler))
        np.testing.assert_array_equal(np.sort(seen), np.arange(labels.size))


def test_default_epoch_coverage_bound():
    # Documented bound: a class with k <= n_c <= N/p shows >= k * floor(n_c / k) distinct
    # samples per epoch.  Summed over classes of this data set that is > 90% of the samples.
    labels = _imbalanced(seed=9, n_classes=80)
    p, k = 8, 4
    sizes = _sizes(labels)
    assert max(sizes.values()) <= labels.size / p
    bound = sum(k * (n // k) for n in sizes.values() if n >= k)
    assert bound / labels.size > 0.9
    for seed in range(3):
        batches = list(PKSampler(labels, p, k, seed=seed))
        draws = _per_class_draws(labels, batches, p, k)
        for label, n in sizes.items():
            if n >= k:
                assert len(set(draws.get(label, []))) >= k * (n // k), f"class {label}"
        distinct = len(np.unique(np.concatenate(batches)))
        assert distinct >= bound


def test_visits_are_proportional_to_class_size():
    labels = _imbalanced(seed=10)
    p, k = 6, 4
    sampler = PKSampler(labels, p, k, seed=11)
    total = len(sampler) * p
    sizes = _sizes(labels)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        draws = _per_class_draws(labels, list(sampler), p, k)
        for label, n in sizes.items():
            share = total * n / labels.size
            visits = len(draws.get(label, [])) // k
            assert np.floor(share) <= visits <= np.ceil(share), (label, share, visits)


def test_rounding_is_unbiased_for_small_classes():
    # 12 one-sample classes and three of 12: B = 3 batches of 4 classes, 12 visits, a
    # singleton's share 12 * 1 / 48 = 1/4 visit, a large class's 12 * 12 / 48 = 3.
    labels = np.concatenate([np.arange(12), np.repeat([90, 91, 92], 12)])
    sampler = PKSampler(labels, 4, 4, seed=12)
    assert len(sampler) == 3
    epochs = 200
    hits = np.zeros(12)
    for _ in range(epochs):
        batches = np.stack(list(sampler))
        assert all(np.isin([90, 91, 92], labels[b]).all() for b in batches)
        visited = np.isin(np.arange(12), batches)
        assert visited.sum() == 3  # the rounding keeps the total exact
        hits += visited
    # Binomial(200, 1/4) per singleton: sd 0.031 of a frequency; 0.1 is 3.3 sd (and the seed
    # is fixed); a share of 1/2 (say, the cap's slots handed to the singletons) fails.
    np.testing.assert_allclose(hits / epochs, 0.25, atol=0.1)


def test_a_dominant_class_is_capped_at_one_visit_per_batch():
    labels = np.concatenate([np.zeros(200, dtype=int), np.repeat(np.arange(1, 11), 4)])
    p, k = 4, 4
    sampler = PKSampler(labels, p, k, seed=13)
    batches = list(sampler)
    assert all(0 in labels[b] for b in batches)
    # The other classes share the remaining 3 slots of each batch in proportion.
    draws = _per_class_draws(labels, batches, p, k)
    others = [len(draws.get(c, [])) // k for c in range(1, 11)]
    assert sum(others) == 3 * len(batches)
    assert max(others) - min(others) <= 1


def test_p_equal_to_the_number_of_classes():
    labels = np.array([0, 0, 1, 2, 2, 2, 2, 2])
    for batch in PKSampler(labels, 3, 2, seed=14, batches_per_epoch=5):
        assert sorted(set(labels[batch].tolist())) == [0, 1, 2]


def test_string_labels():
    labels = np.array(["cat", "dog", "eel", "fox"] * 5 + ["gnu"] * 3)
    p, k = 3, 2
    sampler = PKSampler(list(labels), p, k, seed=15)
    assert sampler.num_classes == 5 and sampler.num_samples == 23
    batches = list(sampler)
    assert len(batches) == 4
    for batch in batches:
        rows = _rows(labels, batch, p, k)
        assert (rows == rows[:, :1]).all() and len(set(rows[:, 0])) == p


def test_string_and_integer_labels_of_the_same_partition_agree():
    ints = _imbalanced(seed=16)
    # Sorting the names in the order of the integers keeps the classes' order.
    names = np.array([f"id{c:05d}" for c in ints])
    a = list(PKSampler(ints, 5, 3, seed=17))
    b = list(PKSampler(names, 5, 3, seed=17))
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


# -- seeding and epochs ---------------------------------------------------------------------

def _epoch(sampler):
    return np.stack(list(sampler))


def test_same_seed_same_batches_different_seed_different():
    labels = _imbalanced()
    a, b, c = (PKSampler(labels, 4, 4, seed=s) for s in (21, 21, 22))
    np.testing.assert_array_equal(_epoch(a), _epoch(b))
    np.testing.assert_array_equal(_epoch(a), _epoch(b))  # the second epochs agree too
    assert not np.array_equal(_epoch(PKSampler(labels, 4, 4, seed=21)), _epoch(c))


def test_seed_sequence_generator_and_none():
    labels = _imbalanced()
    from_int = _epoch(PKSampler(labels, 4, 4, seed=5))
    from_ss = _epoch(PKSampler(labels, 4, 4, seed=np.random.SeedSequence(5)))
    np.testing.assert_array_equal(from_int, from_ss)
    g1, g2 = np.random.default_rng(3), np.random.default_rng(3)
    np.testing.assert_array_equal(_epoch(PKSampler(labels, 4, 4, seed=g1)),
                                  _epoch(PKSampler(labels, 4, 4, seed=g2)))
    fresh = PKSampler(labels, 4, 4)
    assert not np.array_equal(_epoch(fresh), _epoch(PKSampler(labels, 4, 4)))
    # seed=None is repeatable through seed_sequence.
    fresh.set_epoch(0)
    np.testing.assert_array_equal(_epoch(fresh),
                                  _epoch(PKSampler(labels, 4, 4, seed=fresh.seed_sequence)))


def test_epochs_differ_and_set_epoch_is_a_pure_function_of_seed_and_epoch():
    labels = _imbalanced()
    sampler = PKSampler(labels, 4, 4, seed=31)
    assert sampler.epoch == 0
    epochs = [_epoch(sampler) for _ in range(3)]
    assert sampler.epoch == 3
    assert not np.array_equal(epochs[0], epochs[1])
    assert not np.array_equal(epochs[1], epochs[2])
    other = PKSampler(labels, 4, 4, seed=31)
    other.set_epoch(2)
    np.testing.assert_array_equal(_epoch(other), epochs[2])
    assert other.epoch == 3
    other.set_epoch(np.int64(0))
    np.testing.assert_array_equal(_epoch(other), epochs[0])
    other.set_epoch(1)
    np.testing.assert_array_equal(_epoch(other), epochs[1])


def test_iter_claims_its_epoch_immediately():
    labels = _imbalanced()
    sampler = PKSampler(labels, 4, 4, seed=32)
    it0, it1 = iter(sampler), iter(sampler)
    assert sampler.epoch == 2
    a, b = np.stack(list(it0)), np.stack(list(it1))
    assert not np.array_equal(a, b)
    sampler.set_epoch(1)
    np.testing.assert_array_equal(_epoch(sampler), b)


def test_seed_sequence_streams_stay_apart_from_its_spawned_children():
    labels = np.arange(64) % 8
    ss = np.random.SeedSequence(40)
    sampler = PKSampler(labels, 4, 2, seed=ss)
    child_first = np.random.default_rng(ss.spawn(1)[0]).permutation(64)
    assert not np.array_equal(np.concatenate(list(sampler)), child_first)
    assert ss.n_children_spawned == 1  # the sampler spawned nothing of its own


# -- length ---------------------------------------------------------------------------------

@pytest.mark.parametrize("n, p, k, expected", [(60, 4, 3, 5), (61, 4, 3, 6), (3, 1, 5, 1)])
def test_default_length_covers_the_data(n, p, k, expected):
    labels = np.arange(n) % max(p, 3)
    sampler = PKSampler(labels, p, k, seed=0)
    assert len(sampler) == expected
    assert sum(1 for _ in sampler) == expected
    assert sampler.batch_size == p * k


def test_batches_per_epoch_override():
    labels = _imbalanced()
    sampler = PKSampler(labels, 4, 4, seed=0, batches_per_epoch=7)
    assert len(sampler) == 7
    assert len(list(sampler)) == 7
    assert len(list(sampler)) == 7


def test_usable_as_a_batch_sampler_without_torch():
    # What torch.utils.data.DataLoader(dataset, batch_sampler=...) does with it.
    dataset = [f"item{i}" for i in range(40)]
    labels = np.arange(40) % 5
    sampler = PKSampler(labels, 2, 4, seed=0)
    loaded = [[dataset[i] for i in batch] for batch in sampler]
    assert len(loaded) == len(sampler) == 5
    assert all(len(b) == 8 for b in loaded)
    # ... and the module imports nothing beyond NumPy and tripmine itself.
    tree = ast.parse(Path(tripmine.sampling.__file__).read_text(encoding="utf-8"))
    imported = {alias.name.split(".")[0] for node in ast.walk(tree)
                if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module and node.level == 0}
    assert imported <= {"__future__", "collections", "typing", "numpy"}, imported


def test_repr_names_the_configuration():
    text = repr(PKSampler(np.arange(12) % 3, 3, 2, seed=0))
    assert text.startswith("PKSampler(") and "p=3" in text and "k=2" in text
    assert "num_classes=3" in text and "batches_per_epoch=2" in text


# -- bad input ------------------------------------------------------------------------------

LABELS = np.arange(20) % 4

BAD = [
    ("labels 2-D", lambda: PKSampler(LABELS.reshape(4, 5), 2, 2), ValueError,
     r"labels must be 1-D, got shape \(4, 5\)"),
    ("labels scalar", lambda: PKSampler(3, 1, 1), ValueError, r"labels must be 1-D"),
    ("labels empty", lambda: PKSampler([], 1, 1), ValueError, r"labels must hold at least one"),
    ("labels NaN", lambda: PKSampler([0.0, np.nan], 1, 1), ValueError, r"labels contains NaN"),
    ("labels unsortable", lambda: PKSampler(np.array([1, "a", None], dtype=object), 1, 1),
     TypeError, r"labels must be sortable"),
    ("p zero", lambda: PKSampler(LABELS, 0, 2), ValueError, r"p must be >= 1, got 0"),
    ("p negative", lambda: PKSampler(LABELS, -3, 2), ValueError, r"p must be >= 1, got -3"),
    ("p float", lambda: PKSampler(LABELS, 2.0, 2), TypeError, r"p must be an integer, got float"),
    ("p bool", lambda: PKSampler(LABELS, True, 2), TypeError, r"p must be an integer, got bool"),
    ("p too large", lambda: PKSampler(LABELS, 5, 2), ValueError,
     r"p=5 exceeds the number of classes in labels \(4\)"),
    ("k zero", lambda: PKSampler(LABELS, 2, 0), ValueError, r"k must be >= 1, got 0"),
    ("k str", lambda: PKSampler(LABELS, 2, "4"), TypeError, r"k must be an integer, got str"),
    ("k bool", lambda: PKSampler(LABELS, 2, False), TypeError, r"k must be an integer, got bool"),
    ("batches zero", lambda: PKSampler(LABELS, 2, 2, batches_per_epoch=0), ValueError,
     r"batches_per_epoch must be >= 1, got 0"),
    ("batches float", lambda: PKSampler(LABELS, 2, 2, batches_per_epoch=2.5), TypeError,
     r"batches_per_epoch must be an integer, got float"),
    ("batches huge", lambda: PKSampler(LABELS, 2, 2, batches_per_epoch=2**60), ValueError,
     r"batches_per_epoch=\d+ is too large"),
    ("seed negative", lambda: PKSampler(LABELS, 2, 2, seed=-1), ValueError,
     r"seed must be a non-negative int, got -1"),
    ("seed float", lambda: PKSampler(LABELS, 2, 2, seed=1.5), TypeError,
     r"seed must be None, a non-negative int, .* got float"),
    ("seed bool", lambda: PKSampler(LABELS, 2, 2, seed=True), TypeError,
     r"seed must be None, .* got bool"),
    ("seed legacy RandomState", lambda: PKSampler(LABELS, 2, 2, seed=np.random.RandomState(0)),
     TypeError, r"seed must be None, .* got RandomState"),
]


@pytest.mark.parametrize("make, exc, match", [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_input(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


@pytest.mark.parametrize("epoch, exc, match", [
    (-1, ValueError, r"epoch must be >= 0, got -1"),
    (1.0, TypeError, r"epoch must be an integer, got float"),
    (True, TypeError, r"epoch must be an integer, got bool"),
])
def test_bad_set_epoch(epoch, exc, match):
    sampler = PKSampler(LABELS, 2, 2, seed=0)
    with pytest.raises(exc, match=match):
        sampler.set_epoch(epoch)
    assert sampler.epoch == 0
