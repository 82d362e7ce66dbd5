"""tripmine.torch against pure-torch autograd implementations of the same formulas.

The references (tests/torch_reference.py) build the whole distance matrix by direct difference and
let autograd differentiate the masked max/min, sums and means: slow (N x M, or
N x M x M for batch-all) and obviously correct for the small batches used here.
Loss *and* ``.grad`` must match tripmine's for every mining rule, reduction,
metric, ``normalize`` and ``soft``, in float64.  Data are random and continuous,
so no hinge sits at a kink and no two candidate distances tie.

The random rules (distance-weighted, semi-hard ``select="random"``/``"all"``)
cannot be recomputed by a reference: their triplets come from the NumPy API with
the same seed, and the reference computes the loss of those triplets.
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest

import tripmine

torch = pytest.importorskip("torch")
tt = pytest.importorskip("tripmine.torch")

from torch_reference import (  # noqa: E402  (after the skip)
    METRICS,
    REFERENCES,
    contrastive_reference,
    distance_matrix,
    given_triplets_reference,
    unit,
)

TRIPLET_REDUCTIONS = ("mean", "sum", "mean_nonzero", "none")
RTOL, ATOL = 1e-9, 1e-11


# --------------------------------------------------------------------------- helpers


def batch(seed, n_classes=4, per_class=4, dim=5, scale=1.0):
    """Random float64 rows (a leaf requiring grad) and P x K labels, shuffled."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.repeat(np.arange(n_classes), per_class))
    x = scale * rng.standard_normal((labels.shape[0], dim))
    return torch.tensor(x, requires_grad=True), torch.from_numpy(labels)


def zlib_seed(*parts) -> int:
    """A seed per parameter combination (stable across runs and Python versions)."""
    return zlib.crc32(repr(parts).encode())


def typical_distance(x, metric, normalize):
    rows = unit(x.detach()) if normalize else x.detach()
    d = distance_matrix(rows, rows, metric)
    return float(d[d > 0].median())


def loss_and_grads(fn, *leaves, weights=None):
    """fn() (a tensor), and the gradients of its sum (or of sum(weights * fn())) w.r.t.
    the leaves, computed by autograd."""
    for leaf in leaves:
        leaf.grad = None
    loss = fn()
    total = loss.sum() if weights is None else (weights * loss).sum()
    total.backward()
    return loss.detach(), [leaf.grad.clone() for leaf in leaves]


def assert_same(ours, reference):
    (loss, grads), (ref_loss, ref_grads) = ours, reference
    assert loss.shape == ref_loss.shape
    torch.testing.assert_close(loss, ref_loss, rtol=RTOL, atol=ATOL)
    for grad, ref_grad in zip(grads, ref_grads):
        torch.testing.assert_close(grad, ref_grad, rtol=1e-8, atol=1e-10)


# --------------------------------------------------------------------------- deterministic rules


@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("reduction", TRIPLET_REDUCTIONS)
@pytest.mark.parametrize("mining", list(REFERENCES))
def test_triplet_loss_and_gradient_equal_torch_autograd(mining, reduction, metric, normalize,
                                                        soft):
    seed = zlib_seed(mining, reduction, metric, normalize, soft)
    x, labels = batch(seed)
    margin = 0.3 * typical_distance(x, metric, normalize)
    options = dict(margin=margin, soft=soft, metric=metric, normalize=normalize,
                   reduction=reduction)
    criterion = tt.TripletLoss(mining=mining, **options)
    ours = loss_and_grads(lambda: criterion(x, labels), x)
    expected = loss_and_grads(lambda: REFERENCES[mining](x, labels, **options), x)
    assert_same(ours, expected)
    assert criterion.n_triplets > 0 and 0 < criterion.fraction_active <= 1
    # The functional form is the same computation.
    assert_same(loss_and_grads(lambda: tt.triplet_loss(x, labels, mining=mining, **options), x),
                expected)


@pytest.mark.parametrize("mining", list(REFERENCES))
@pytest.mark.parametrize("metric", METRICS)
def test_triplet_reference_mode_gradients_reach_both_sides(mining, metric):
    x, labels = batch(11, per_class=3)
    ref, ref_labels = batch(12, per_class=5)
    options = dict(margin=0.3 * typical_distance(x, metric, False), soft=False, metric=metric,
                   normalize=False, reduction="auto")
    ours = loss_and_grads(lambda: tt.triplet_loss(x, labels, mining=mining, ref=ref,
                                                  ref_labels=ref_labels, **options), x, ref)
    expected = loss_and_grads(lambda: REFERENCES[mining](x, labels, ref=ref,
                                                         ref_labels=ref_labels, **options),
                              x, ref)
    assert_same(ours, expected)


@pytest.mark.parametrize("mining", list(REFERENCES))
def test_triplet_ref_offset_excludes_own_rows(mining):
    """x is the slice ref[3:3+N]: its own pairs are excluded, gradients of both sides."""
    rows, labels_all = batch(13, n_classes=5, per_class=4)
    ref = rows.detach().clone().requires_grad_(True)
    x = rows.detach()[3:13].clone().requires_grad_(True)
    labels = labels_all[3:13]
    options = dict(margin=0.5, soft=False, metric="euclidean", normalize=True, reduction="sum")
    ours = loss_and_grads(lambda: tt.triplet_loss(x, labels, mining=mining, ref=ref,
                                                  ref_labels=labels_all, ref_offset=3,
                                                  **options), x, ref)
    expected = loss_and_grads(lambda: REFERENCES[mining](x, labels, ref=ref,
                                                         ref_labels=labels_all, offset=3,
                                                         **options), x, ref)
    assert_same(ours, expected)


@pytest.mark.parametrize("power", [1, 2])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "mean_nonzero", "none"])
def test_contrastive_loss_and_gradient_equal_torch_autograd(reduction, metric, normalize,
                                                            power):
    x, labels = batch(zlib_seed("contrastive", reduction, metric, normalize, power))
    typical = typical_distance(x, metric, normalize)
    options = dict(pos_margin=0.5 * typical, neg_margin=1.1 * typical, power=power,
                   metric=metric, normalize=normalize, reduction=reduction)
    criterion = tt.ContrastiveLoss(**options)
    ours = loss_and_grads(lambda: criterion(x, labels), x)
    expected = loss_and_grads(lambda: contrastive_reference(x, labels, **options), x)
    assert_same(ours, expected)
    n = labels.shape[0]
    assert criterion.n_pairs == n * (n - 1) and 0 < criterion.n_active < criterion.n_pairs
    assert_same(loss_and_grads(lambda: tt.contrastive_loss(x, labels, **options), x), expected)


@pytest.mark.parametrize("metric", METRICS)
def test_contrastive_reference_mode_and_offset(metric):
    x, labels = batch(21, per_class=3)
    ref, ref_labels = batch(22, per_class=5)
    typical = typical_distance(x, metric, False)
    options = dict(pos_margin=0.4 * typical, neg_margin=1.2 * typical, power=2, metric=metric,
                   normalize=False, reduction="mean")
    ours = loss_and_grads(lambda: tt.contrastive_loss(x, labels, ref=ref, ref_labels=ref_labels,
                                                      **options), x, ref)
    expected = loss_and_grads(lambda: contrastive_reference(x, labels, ref=ref,
                                                            ref_labels=ref_labels, **options),
                              x, ref)
    assert_same(ours, expected)
    # x = ref[4:4+N]
    part = ref.detach()[4:12].clone().requires_grad_(True)
    ours = loss_and_grads(lambda: tt.contrastive_loss(part, ref_labels[4:12], ref=ref,
                                                      ref_labels=ref_labels, ref_offset=4,
                                                      **options), part, ref)
    expected = loss_and_grads(lambda: contrastive_reference(part, ref_labels[4:12], ref=ref,
                                                            ref_labels=ref_labels, offset=4,
                                                            **options), part, ref)
    assert_same(ours, expected)


# --------------------------------------------------------------------------- random rules


@pytest.mark.parametrize("reduction", TRIPLET_REDUCTIONS)
@pytest.mark.parametrize("soft", [False, True])
def test_distance_weighted_equals_numpy_api_and_torch_loss_of_its_triplets(reduction, soft):
    x, labels = batch(31, n_classes=5, per_class=5, dim=6)
    options = dict(margin=0.4, soft=soft, metric="euclidean", normalize=True,
                   reduction=reduction)
    criterion = tt.TripletLoss(mining="distance_weighted", seed=77, advance_seed=False,
                               **options)
    ours = loss_and_grads(lambda: criterion(x, labels), x)
    numpy_result = tripmine.triplet_loss(x.detach().numpy(), labels.numpy(),
                                         mining="distance_weighted", seed=77, **options)
    mined = tripmine.distance_weighted(x.detach().numpy(), labels.numpy(), seed=77,
                                       normalize=True)
    for ours_part, mined_part, numpy_part in zip(criterion.triplets, mined,
                                                 numpy_result.triplets):
        np.testing.assert_array_equal(ours_part, mined_part)
        np.testing.assert_array_equal(ours_part, numpy_part)
    np.testing.assert_allclose(ours[0].numpy(), numpy_result.loss, rtol=1e-12)
    np.testing.assert_allclose(ours[1][0].numpy(), numpy_result.grad, rtol=1e-12, atol=1e-15)
    expected = loss_and_grads(lambda: given_triplets_reference(x, mined, **options), x)
    assert_same(ours, expected)
    assert criterion.last_seed == 77


@pytest.mark.parametrize("select", ["random", "all"])
@pytest.mark.parametrize("metric", METRICS)
def test_semi_hard_select_options_mine_like_the_numpy_miner(select, metric):
    x, labels = batch(41, n_classes=4, per_class=5)
    margin = 0.6 * typical_distance(x, metric, False)
    options = dict(margin=margin, soft=False, metric=metric, normalize=False, reduction="sum")
    criterion = tt.TripletLoss(mining="semi_hard", select=select, seed=5, advance_seed=False,
                               **options)
    ours = loss_and_grads(lambda: criterion(x, labels), x)
    mined = tripmine.semi_hard(x.detach().numpy(), labels.numpy(), margin=margin, select=select,
                               seed=5, metric=metric)
    assert mined.anchor.shape[0] > 0
    for ours_part, mined_part in zip(criterion.triplets, mined):
        np.testing.assert_array_equal(ours_part, mined_part)
    expected = loss_and_grads(lambda: given_triplets_reference(x, mined, **options), x)
    assert_same(ours, expected)


def test_distance_weighted_cutoffs_are_the_miners():
    x, labels = batch(42, n_classes=5, per_class=4, dim=4)
    criterion = tt.TripletLoss(mining="distance_weighted", normalize=True, seed=9,
                               advance_seed=False, cutoff=0.3, nonzero_loss_cutoff=1.9)
    criterion(x, labels).backward()
    mined = tripmine.distance_weighted(x.detach().numpy(), labels.numpy(), cutoff=0.3,
                                       nonzero_loss_cutoff=1.9, seed=9, normalize=True)
    for ours_part, mined_part in zip(criterion.triplets, mined):
        np.testing.assert_array_equal(ours_part, mined_part)
    assert criterion.last_seed == 9


def test_given_triplets_as_tensors():
    x, labels = batch(43)
    triplets = tripmine.batch_hard(x.detach().numpy(), labels.numpy())
    as_tensors = tuple(torch.from_numpy(t) for t in triplets)
    options = dict(margin=0.7, soft=True, metric="cosine", normalize=False, reduction="mean")
    ours = loss_and_grads(lambda: tt.TripletLoss(**options)(x, labels, triplets=as_tensors), x)
    expected = loss_and_grads(lambda: given_triplets_reference(x, triplets, **options), x)
    assert_same(ours, expected)


# --------------------------------------------------------------------------- reduction="none"


@pytest.mark.parametrize("mining, metric", [
    *((mining, metric) for mining in ("batch_hard", "semi_hard") for metric in METRICS),
    ("distance_weighted", "euclidean"),  # defined for the euclidean metric only
])
def test_weighted_per_triplet_losses_backpropagate_exactly(mining, metric):
    """A non-uniform grad_output on the per-triplet vector (any weighting of the triplets)."""
    x, labels = batch(51)
    options = dict(margin=0.5 * typical_distance(x, metric, True), soft=False, metric=metric,
                   normalize=True, reduction="none")
    criterion = tt.TripletLoss(mining=mining, seed=3, advance_seed=False, **options)
    with torch.no_grad():
        count = criterion(x, labels).shape[0]
    weights = torch.linspace(0.5, 2.0, count, dtype=torch.float64)
    ours = loss_and_grads(lambda: criterion(x, labels), x, weights=weights)
    expected = loss_and_grads(lambda: given_triplets_reference(x, criterion.triplets, **options),
                              x, weights=weights)
    assert_same(ours, expected)


@pytest.mark.parametrize("loss", ["batch_all", "contrastive"])
def test_per_anchor_vectors_take_uniform_weights_and_refuse_others(loss):
    x, labels = batch(52)
    if loss == "batch_all":
        fn = tt.TripletLoss(mining="batch_all", reduction="none")
    else:
        fn = tt.ContrastiveLoss(reduction="none", neg_margin=3.0)
    sum_loss, (sum_grad,) = loss_and_grads(lambda: fn(x, labels), x)
    uniform = torch.full((labels.shape[0],), 2.5, dtype=torch.float64)
    _, (scaled_grad,) = loss_and_grads(lambda: fn(x, labels), x, weights=uniform)
    torch.testing.assert_close(scaled_grad, 2.5 * sum_grad, rtol=1e-14, atol=0)
    with pytest.raises(NotImplementedError, match="uniform gradient"):
        loss_and_grads(lambda: fn(x, labels), x, weights=torch.rand(labels.shape[0],
                                                                     dtype=torch.float64))
