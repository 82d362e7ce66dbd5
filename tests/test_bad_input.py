"""Every bad input of DESIGN.md section 2: a clear exception naming the argument,
and no modification of anything the caller passed."""

from __future__ import annotations

import numpy as np
import pytest

import tripmine
from tripmine import _validation

X = np.arange(12, dtype=np.float32).reshape(4, 3)
REF = np.arange(15, dtype=np.float32).reshape(5, 3)


def _with_nan(a, value=np.nan):
    a = a.astype(np.float64)
    a[1, 1] = value
    return a


def _read_only(shape, dtype=np.float32):
    out = np.zeros(shape, dtype=dtype)
    out.flags.writeable = False
    return out


# (id, callable taking no arguments, exception type, regex the message must match)
CASES = [
    ("x 1-D", lambda: tripmine.pairwise_distances(X[0]), ValueError, r"x must be 2-D"),
    ("x 3-D", lambda: tripmine.pairwise_distances(X[None]), ValueError, r"x must be 2-D"),
    ("ref 1-D", lambda: tripmine.pairwise_distances(X, REF[0]), ValueError, r"ref must be 2-D"),
    ("x int", lambda: tripmine.pairwise_distances(X.astype(int)), TypeError, r"x must be a float"),
    ("x complex", lambda: tripmine.pairwise_distances(X.astype(complex)), TypeError,
     r"x must be a float"),
    ("x object", lambda: tripmine.pairwise_distances(X.astype(object)), TypeError,
     r"x must be a float"),
    ("x bool", lambda: tripmine.pairwise_distances(X > 3), TypeError, r"x must be a float"),
    ("x longdouble", lambda: tripmine.pairwise_distances(X.astype(np.longdouble)), TypeError,
     r"x must be a float"),
    ("ref int", lambda: tripmine.pairwise_distances(X, REF.astype(np.int32)), TypeError,
     r"ref must be a float"),
    ("x strings", lambda: tripmine.pairwise_distances([["a", "b"]]), TypeError,
     r"x must be a float"),
    ("x NaN", lambda: tripmine.pairwise_distances(_with_nan(X)), ValueError,
     r"x contains NaN or infinity.*check_finite=False"),
    ("x inf", lambda: tripmine.pairwise_distances(_with_nan(X, np.inf)), ValueError,
     r"x contains NaN or infinity"),
    ("x -inf", lambda: tripmine.pairwise_distances(_with_nan(X, -np.inf)), ValueError,
     r"x contains NaN or infinity"),
    ("ref NaN", lambda: tripmine.pairwise_distances(X, _with_nan(REF)), ValueError,
     r"ref contains NaN"),
    ("D mismatch", lambda: tripmine.pairwise_distances(X, REF[:, :2]), ValueError,
     r"ref has 2 features per row but x has 3"),
    ("unknown metric", lambda: tripmine.pairwise_distances(X, metric="manhattan"), ValueError,
     r"metric must be one of"),
    ("metric not a string", lambda: tripmine.pairwise_distances(X, metric=None), ValueError,
     r"metric must be one of"),
    ("out wrong shape", lambda: tripmine.pairwise_distances(X, out=np.zeros((4, 5), np.float32)),
     ValueError, r"out must have shape \(4, 4\)"),
    ("out wrong dtype", lambda: tripmine.pairwise_distances(X, out=np.zeros((4, 4))),
     ValueError, r"out must have dtype float32"),
    ("out read-only", lambda: tripmine.pairwise_distances(X, out=_read_only((4, 4))), ValueError,
     r"out is read-only"),
    ("out non-contiguous",
     lambda: tripmine.pairwise_distances(X, out=np.zeros((4, 8), np.float32)[:, ::2]),
     ValueError, r"out must be C-contiguous"),
    ("out not an array", lambda: tripmine.pairwise_distances(X, out=[[0.0] * 4] * 4), ValueError,
     r"out must be a numpy.ndarray"),
    ("labels 2-D", lambda: tripmine.positive_mask(np.zeros((2, 2))), ValueError,
     r"labels must be 1-D"),
    ("ref_labels 2-D", lambda: tripmine.negative_mask([1, 2], np.zeros((2, 1))), ValueError,
     r"ref_labels must be 1-D"),
    ("labels NaN", lambda: tripmine.positive_mask([1.0, np.nan]), ValueError,
     r"labels contains NaN"),
    ("labels unsortable", lambda: tripmine.positive_mask(np.array([1, "a", None], dtype=object)),
     TypeError, r"labels must be sortable"),
    ("labels vs ref_labels kinds", lambda: tripmine.positive_mask(["a", "b"], [1.5, 2.5]),
     TypeError, r"labels .* and ref_labels .* must be labels of the same kind"),
    ("triplet_mask labels 2-D", lambda: tripmine.triplet_mask(np.zeros((3, 3))), ValueError,
     r"labels must be 1-D"),
    ("GPU-like array", lambda: tripmine.pairwise_distances(_FakeGpuArray()), TypeError,
     r"x is a GPU array"),
    ("ref_offset without ref", lambda: tripmine.batch_hard(X, [0, 0, 1, 1], ref_offset=0),
     ValueError, r"ref_offset needs ref"),
    ("ref_offset negative",
     lambda: tripmine.triplet_loss(X, [0, 0, 1, 1], ref=REF, ref_labels=[0, 0, 1, 1, 2],
                                   ref_offset=-1),
     ValueError, r"ref_offset must satisfy 0 <= ref_offset and ref_offset \+ N <= M"),
    ("ref_offset past the end",
     lambda: tripmine.contrastive_loss(X, [0, 0, 1, 1], ref=REF, ref_labels=[0, 0, 1, 1, 2],
                                       ref_offset=2),
     ValueError, r"ref_offset must satisfy .*x has N = 4 rows, ref has M = 5.*got 2"),
    ("ref_offset float",
     lambda: tripmine.semi_hard(X, [0, 0, 1, 1], ref=REF, ref_labels=[0, 0, 1, 1, 2],
                                ref_offset=1.0),
     TypeError, r"ref_offset must be None or an integer"),
    ("ref_offset bool",
     lambda: tripmine.distance_weighted(X, [0, 0, 1, 1], ref=REF, ref_labels=[0, 0, 1, 1, 2],
                                        ref_offset=True, normalize=True),
     TypeError, r"ref_offset must be None or an integer"),
    ("ref_offset labels differ",
     lambda: tripmine.triplet_loss(X, [0, 0, 1, 1], ref=REF, ref_labels=[0, 0, 1, 2, 2],
                                   ref_offset=0, mining="batch_all"),
     ValueError, r"ref_offset = 0 says x\[3\] is ref\[3\], but labels\[3\] differs from "
                 r"ref_labels\[3\]"),
    ("ref_offset string labels differ",
     lambda: tripmine.positive_mask(["a", "b"], ["c", "a", "c"], ref_offset=1),
     ValueError, r"labels\[1\] differs from ref_labels\[2\]"),
    ("ref_offset mask without ref_labels",
     lambda: tripmine.negative_mask([1, 2], ref_offset=0), ValueError, r"ref_offset needs ref"),
    ("lifted negative neg_margin",
     lambda: tripmine.lifted_structured_loss(X, [0, 0, 1, 1], neg_margin=-1.0), ValueError,
     r"neg_margin"),
    ("lifted negative pos_margin",
     lambda: tripmine.lifted_structured_loss(X, [0, 0, 1, 1], pos_margin=-0.5), ValueError,
     r"pos_margin"),
    ("lifted infinite neg_margin",
     lambda: tripmine.lifted_structured_loss(X, [0, 0, 1, 1], neg_margin=np.inf), ValueError,
     r"neg_margin"),
    ("lifted generalized not a flag",
     lambda: tripmine.lifted_structured_loss(X, [0, 0, 1, 1], generalized=1), TypeError,
     r"generalized"),
    ("lifted reduction auto",
     lambda: tripmine.lifted_structured_loss(X, [0, 0, 1, 1], reduction="auto"), ValueError,
     r"reduction"),
    ("lifted ref without ref_labels",
     lambda: tripmine.lifted_structured_loss(X, [0, 0, 1, 1], ref=REF), ValueError,
     r"ref_labels is required"),
    ("lifted NaN in x",
     lambda: tripmine.lifted_structured_loss(_with_nan(X), [0, 0, 1, 1]), ValueError, r"x"),
]


class _FakeGpuArray:
    __cuda_array_interface__ = {"shape": (2, 2), "typestr": "<f4", "data": (0, False),
                                "version": 3}


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_table(case):
    _, call, exc, pattern = case
    with pytest.raises(exc, match=pattern):
        call()


def test_out_overlapping_input_is_refused_without_writing():
    buffer = np.arange(16, dtype=np.float32).reshape(4, 4)
    before = buffer.copy()
    with pytest.raises(ValueError, match="out must not share memory"):
        tripmine.pairwise_distances(buffer, out=buffer)
    np.testing.assert_array_equal(buffer, before)


@pytest.mark.parametrize("name, args", [
    ("labels length", dict(labels=[1, 2, 3], n=4)),
    ("ref_labels length", dict(labels=[1, 2], ref_labels=[1, 2, 3], n=2, m=4)),
])
def test_label_length_mismatch_names_the_argument(name, args):
    arg = name.split()[0]
    with pytest.raises(ValueError, match=rf"{arg} has length \d+ but (x|ref) has \d+ rows"):
        _validation.labels(args.pop("labels"), args.pop("ref_labels", None), **args)


def test_failed_calls_leave_inputs_and_out_untouched():
    x = X.copy()
    out = np.full((4, 4), 7.0, dtype=np.float32)
    for metric in ("bad", None):
        with pytest.raises(ValueError):
            tripmine.pairwise_distances(x, metric=metric, out=out)
    with pytest.raises(ValueError):
        tripmine.pairwise_distances(x, REF[:, :2], out=out)
    np.testing.assert_array_equal(x, X)
    assert np.all(out == 7.0)


def test_check_finite_false_accepts_non_finite():
    got = tripmine.pairwise_distances(_with_nan(X), check_finite=False)
    assert got.shape == (4, 4)


@pytest.mark.parametrize("mining", [5, None, (np.array([0]), np.array([1])), "hardest"])
def test_mining_must_be_a_rule_or_triplets(mining):
    with pytest.raises(ValueError, match="mining must be one of"):
        tripmine.triplet_loss(X, [0, 0, 1, 1], mining=mining)
