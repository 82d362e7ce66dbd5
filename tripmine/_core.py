"""The one module that touches cffi's ``ffi`` and ``lib``.

Everything that crosses into C goes through here: pointer helpers (arrays pass
without copies via ``ffi.from_buffer``; callers keep them referenced for the
duration of the call), float32/float64 dispatch, and :func:`check`, the single
place where a ``tm_status`` becomes a Python exception.  Inputs reaching this
module have already been validated by :mod:`tripmine._validation`.
"""

from __future__ import annotations

import os
import warnings

import numpy as np

from . import _range
from ._native import ffi, lib

_EXCEPTIONS = {
    lib.TM_ERR_RANGE: _range.OutOfRange,  # caught by the dispatch wrapper: a rerun
    lib.TM_ERR_NOMEM: MemoryError,
    lib.TM_ERR_TOO_LARGE: MemoryError,
    lib.TM_ERR_INVALID: ValueError,
    lib.TM_ERR_UNSUPPORTED: ValueError,
}

METRICS = {
    "euclidean": lib.TM_METRIC_EUCLIDEAN,
    "sqeuclidean": lib.TM_METRIC_SQEUCLIDEAN,
    "cosine": lib.TM_METRIC_COSINE,
}

_POINTER_TYPES = {
    np.dtype(np.float32): "float *",
    np.dtype(np.float64): "double *",
    np.dtype(np.int64): "int64_t *",
    np.dtype(np.uint8): "uint8_t *",
    np.dtype(np.bool_): "uint8_t *",
}


def check(status: int, operation: str) -> None:
    """Raise the exception matching a non-zero ``tm_status``."""
    if status == lib.TM_OK:
        return
    message = ffi.string(lib.tm_strerror(status)).decode()
    exc = _EXCEPTIONS.get(status, RuntimeError)
    if status == lib.TM_ERR_INVALID:
        message += " (tripmine's argument checks should have caught this: please report it)"
    raise exc(f"{operation}: {message}")


def _ptr(array: np.ndarray | None):
    """A C pointer to a validated, C-contiguous array (NULL for None)."""
    if array is None:
        return ffi.NULL
    return ffi.from_buffer(_POINTER_TYPES[array.dtype], array, require_writable=False)


def _string(cstr) -> str:
    return ffi.string(cstr).decode() if cstr != ffi.NULL else ""


# ---- numeric entry points ------------------------------------------------


def pairwise_distances(x: np.ndarray, ref: np.ndarray | None, metric: int,
                       out: np.ndarray) -> None:
    """Fill ``out`` with distances; ``ref=None`` is self mode."""
    fn = lib.tm_pairwise_distances_f32 if x.dtype == np.float32 else lib.tm_pairwise_distances_f64
    m = x.shape[0] if ref is None else ref.shape[0]
    check(fn(_ptr(x), x.shape[0], _ptr(ref), m, x.shape[1], metric, _ptr(out)),
          "pairwise_distances")


def pair_masks(labels: np.ndarray, ref_labels: np.ndarray | None,
               positive: np.ndarray | None, negative: np.ndarray | None) -> None:
    m = labels.shape[0] if ref_labels is None else ref_labels.shape[0]
    check(lib.tm_pair_masks(_ptr(labels), labels.shape[0], _ptr(ref_labels), m,
                            _ptr(positive), _ptr(negative)), "pair masks")


def triplet_mask(labels: np.ndarray, out: np.ndarray) -> None:
    check(lib.tm_triplet_mask(_ptr(labels), labels.shape[0], _ptr(out)), "triplet_mask")


# ---- runtime configuration ------------------------------------------------


def set_num_threads(n: int) -> None:
    lib.tm_set_num_threads(n)


def get_num_threads() -> int:
    return int(lib.tm_get_num_threads())


def compiled_isas() -> list[str]:
    return [_string(lib.tm_isa_name(i)) for i in range(lib.tm_isa_count())]


def usable_isas() -> list[str]:
    return [_string(lib.tm_isa_name(i)) for i in range(lib.tm_isa_count())
            if lib.tm_isa_usable(i)]


def get_isa() -> str:
    return _string(lib.tm_get_isa())


def set_isa(name: str) -> None:
    """Force the micro-kernels' instruction set ("auto" picks the best)."""
    status = lib.tm_set_isa(name.encode())
    if status == lib.TM_ERR_UNSUPPORTED:
        raise ValueError(
            f"instruction set {name!r} is not available here; usable: {usable_isas()}, "
            f"compiled in: {compiled_isas()}, or 'auto'"
        )
    check(status, "set_isa")


def build_facts() -> dict:
    return {
        "version": _string(lib.tm_version()),
        "compiler": _string(lib.tm_compiler()),
        "runtime": _string(lib.tm_runtime()),
        "threaded": bool(lib.tm_threaded()),
        "sanitizers": _string(lib.tm_sanitizers()),
    }


def _apply_environment() -> None:
    """Honour TRIPMINE_NUM_THREADS and TRIPMINE_ISA once, at import."""
    threads = os.environ.get("TRIPMINE_NUM_THREADS", "").strip()
    if threads:
        try:
            value = int(threads)
            if value < 1:
                raise ValueError
        except ValueError:
            warnings.warn(f"ignoring TRIPMINE_NUM_THREADS={threads!r}: expected an integer >= 1",
                          RuntimeWarning, stacklevel=3)
        else:
            set_num_threads(value)
    isa = os.environ.get("TRIPMINE_ISA", "").strip().lower()
    if isa:
        try:
            set_isa(isa)
        except ValueError as exc:
            warnings.warn(f"ignoring TRIPMINE_ISA={isa!r}: {exc}; using {get_isa()!r}",
                          RuntimeWarning, stacklevel=3)


_apply_environment()



def pool_workers() -> int:
    """Worker threads the C core's pool has created (the calling thread not counted)."""
    return int(lib.tm_pool_workers())


def pool_stats() -> dict:
    """Totals of the C core's pool: jobs, and the work items workers and callers ran."""
    values = ffi.new("int64_t[3]")
    lib.tm_pool_stats(values, values + 1, values + 2)
    return {"jobs": values[0], "worker_items": values[1], "caller_items": values[2]}


# ---- miners and losses ------------------------------------------------------


def _typed(name: str, dtype: np.dtype):
    return getattr(lib, f"{name}_{'f32' if dtype == np.float32 else 'f64'}")


def _problem_args(x: np.ndarray, ref: np.ndarray | None) -> tuple:
    m = x.shape[0] if ref is None else ref.shape[0]
    return _ptr(x), x.shape[0], _ptr(ref), m, x.shape[1]


def _labels_args(codes, ref_codes, ref_offset: int | None) -> tuple:
    """labels, ref_labels and ref_offset as the C core takes them (-1: no offset)."""
    return _ptr(codes), _ptr(ref_codes), -1 if ref_offset is None else ref_offset


SELECTS = {"closest": lib.TM_SELECT_CLOSEST, "random": lib.TM_SELECT_RANDOM}
REDUCTIONS = {
    "mean": lib.TM_REDUCE_MEAN,
    "sum": lib.TM_REDUCE_SUM,
    "mean_nonzero": lib.TM_REDUCE_MEAN_NONZERO,
    "none": lib.TM_REDUCE_NONE,
}


def _engine_margin(margin: float, metric: int) -> float:
    """The semi-hard margin in the units of the rows the C core is given: the range
    rerun's rows are 2^e times the caller's (tripmine._range), so the margin is too.  One
    beyond double is as good as the largest double: every finite distance is within it."""
    exponent = _range.row_exponent()
    if exponent == 0:
        return margin
    power = 2 if metric == lib.TM_METRIC_SQEUCLIDEAN else 1
    with np.errstate(over="ignore"):
        scaled = float(np.ldexp(margin, exponent * power))
    return min(scaled, float(np.finfo(np.float64).max))


def batch_hard(x, ref, metric, codes, ref_codes, ref_offset=None):
    n = x.shape[0]
    positive = np.empty(n, dtype=np.int64)
    negative = np.empty(n, dtype=np.int64)
    check(_typed("tm_batch_hard", x.dtype)(*_problem_args(x, ref), metric,
                                           *_labels_args(codes, ref_codes, ref_offset),
                                           _ptr(positive), _ptr(negative)),
          "batch_hard")
    return positive, negative


def semi_hard(x, ref, metric, codes, ref_codes, margin, select, seed, offsets, ref_offset=None):
    total = int(offsets[-1])
    positive = np.empty(total, dtype=np.int64)
    negative = np.empty(total, dtype=np.int64)
    check(_typed("tm_semi_hard", x.dtype)(*_problem_args(x, ref), metric,
                                          *_labels_args(codes, ref_codes, ref_offset),
                                          _engine_margin(margin, metric), SELECTS[select],
                                          seed, _ptr(offsets), _ptr(positive), _ptr(negative)),
          "semi_hard")
    return positive, negative


def semi_hard_all_counts(x, ref, metric, codes, ref_codes, margin, ref_offset=None):
    counts = np.empty(x.shape[0], dtype=np.int64)
    check(_typed("tm_semi_hard_all", x.dtype)(*_problem_args(x, ref), metric,
                                              *_labels_args(codes, ref_codes, ref_offset),
                                              _engine_margin(margin, metric), _ptr(counts),
                                              ffi.NULL, ffi.NULL, 0, ffi.NULL, ffi.NULL,
                                              ffi.NULL),
          "semi_hard")
    return counts


def semi_hard_all_write(x, ref, metric, codes, ref_codes, margin, offsets, keep,
                        ref_offset=None):
    size = int(offsets[-1]) if keep is None else keep.shape[0]
    out = [np.empty(size, dtype=np.int64) for _ in range(3)]
    check(_typed("tm_semi_hard_all", x.dtype)(*_problem_args(x, ref), metric,
                                              *_labels_args(codes, ref_codes, ref_offset),
                                              _engine_margin(margin, metric), ffi.NULL,
                                              _ptr(offsets),
                                              _ptr(keep), 0 if keep is None else keep.shape[0],
                                              *(_ptr(o) for o in out)),
          "semi_hard")
    return out


def distance_weighted(x, ref, codes, ref_codes, cutoff, nonzero_loss_cutoff, seed, offsets,
                      ref_offset=None):
    total = int(offsets[-1])
    positive = np.empty(total, dtype=np.int64)
    negative = np.empty(total, dtype=np.int64)
    check(_typed("tm_distance_weighted", x.dtype)(*_problem_args(x, ref),
                                                  *_labels_args(codes, ref_codes, ref_offset),
                                                  cutoff, nonzero_loss_cutoff, seed,
                                                  _ptr(offsets), _ptr(positive),
                                                  _ptr(negative)),
          "distance_weighted")
    return positive, negative


def _gradient_buffers(x, ref, want_grad):
    if not want_grad:
        return None, None
    grad = np.zeros_like(x)
    ref_grad = None if ref is None else np.zeros_like(ref)
    return grad, ref_grad


def triplet_loss(x, ref, metric, anchor, positive, negative, margin, soft, reduction,
                 want_grad, per_item):
    loss = ffi.new("double *")
    active = ffi.new("int64_t *")
    per_triplet = np.empty(anchor.shape[0]) if per_item else None
    grad, ref_grad = _gradient_buffers(x, ref, want_grad)
    check(_typed("tm_triplet_loss", x.dtype)(*_problem_args(x, ref), metric,
                                             _range.row_exponent(), _ptr(anchor),
                                             _ptr(positive), _ptr(negative), anchor.shape[0],
                                             margin, int(soft), REDUCTIONS[reduction], loss,
                                             active, _ptr(per_triplet), _ptr(grad),
                                             _ptr(ref_grad)),
          "triplet_loss")
    return loss[0], int(active[0]), per_triplet, grad, ref_grad


def batch_all_loss(x, ref, metric, codes, ref_codes, margin, soft, reduction, want_grad,
                   per_item, ref_offset=None):
    loss = ffi.new("double *")
    triplets = ffi.new("int64_t *")
    active = ffi.new("int64_t *")
    per_anchor = np.empty(x.shape[0]) if per_item else None
    grad, ref_grad = _gradient_buffers(x, ref, want_grad)
    check(_typed("tm_batch_all_loss", x.dtype)(*_problem_args(x, ref), metric,
                                               _range.row_exponent(),
                                               *_labels_args(codes, ref_codes, ref_offset),
                                               margin, int(soft), REDUCTIONS[reduction], loss,
                                               triplets, active, _ptr(per_anchor), _ptr(grad),
                                               _ptr(ref_grad)),
          "triplet_loss")
    return loss[0], int(triplets[0]), int(active[0]), per_anchor, grad, ref_grad


def contrastive_loss(x, ref, metric, codes, ref_codes, pos_margin, neg_margin, power, reduction,
                     want_grad, per_item, ref_offset=None):
    loss = ffi.new("double *")
    counts = np.zeros(4, dtype=np.int64)
    per_anchor = np.empty(x.shape[0]) if per_item else None
    grad, ref_grad = _gradient_buffers(x, ref, want_grad)
    check(_typed("tm_contrastive_loss", x.dtype)(*_problem_args(x, ref), metric,
                                                 _range.row_exponent(),
                                                 *_labels_args(codes, ref_codes, ref_offset),
                                                 pos_margin, neg_margin, power,
                                                 REDUCTIONS[reduction], loss, _ptr(counts),
                                                 _ptr(per_anchor), _ptr(grad), _ptr(ref_grad)),
          "contrastive_loss")
    return loss[0], [int(c) for c in counts], per_anchor, grad, ref_grad


def lifted_structured_loss(x, ref, metric, codes, ref_codes, neg_margin, pos_margin,
                           generalized, reduction, want_grad, per_item, ref_offset=None):
    loss = ffi.new("double *")
    counts = np.zeros(2, dtype=np.int64)
    per_anchor = np.empty(x.shape[0]) if per_item else None
    grad, ref_grad = _gradient_buffers(x, ref, want_grad)
    check(_typed("tm_lifted_structured_loss", x.dtype)(
        *_problem_args(x, ref), metric, _range.row_exponent(),
        *_labels_args(codes, ref_codes, ref_offset), neg_margin, pos_margin, int(generalized),
        REDUCTIONS[reduction], loss, _ptr(counts), _ptr(per_anchor), _ptr(grad),
        _ptr(ref_grad)), "lifted_structured_loss")
    return loss[0], [int(c) for c in counts], per_anchor, grad, ref_grad


def margin_all_loss(x, ref, metric, codes, ref_codes, ref_offset, beta, margin, nu, reduction,
                    want_grad, per_item):
    """Margin loss over every valid triplet (tripmine.margin, mining="batch_all"): (loss,
    [triplets, active], per_anchor, beta_grad per anchor, grad, ref_grad)."""
    loss = ffi.new("double *")
    counts = np.zeros(2, dtype=np.int64)
    per_anchor = np.empty(x.shape[0]) if per_item else None
    beta_grad = np.empty(x.shape[0])
    grad, ref_grad = _gradient_buffers(x, ref, want_grad)
    check(_typed("tm_margin_all_loss", x.dtype)(
        *_problem_args(x, ref), metric, _range.row_exponent(),
        *_labels_args(codes, ref_codes, ref_offset), margin, _ptr(beta), nu,
        REDUCTIONS[reduction], loss, _ptr(counts), _ptr(per_anchor), _ptr(beta_grad),
        _ptr(grad), _ptr(ref_grad)), "margin_loss")
    return loss[0], [int(c) for c in counts], per_anchor, beta_grad, grad, ref_grad


def uniform(seed: int, anchor: int, draw: int) -> float:
    """The C core's counter-based uniform number for (seed, anchor, draw)."""
    return float(lib.tm_uniform(seed, anchor, draw))


def nearest_neighbors(x: np.ndarray, ref: np.ndarray | None, metric: int, k: int,
                      indices: np.ndarray, distances: np.ndarray) -> None:
    """Fill ``indices``/``distances`` (n x k) with each row's k nearest references."""
    check(_typed("tm_nearest_neighbors", x.dtype)(*_problem_args(x, ref), metric, k,
                                                  _ptr(indices), _ptr(distances)),
          "nearest_neighbors")


HEADS = {
    "softmax": lib.TM_HEAD_SOFTMAX,
    "normface": lib.TM_HEAD_NORMFACE,
    "cosface": lib.TM_HEAD_COSFACE,
    "arcface": lib.TM_HEAD_ARCFACE,
    "combined": lib.TM_HEAD_COMBINED,
    "sphereface": lib.TM_HEAD_SPHEREFACE,
    "lsoftmax": lib.TM_HEAD_LSOFTMAX,
}
_HEAD_REDUCTIONS = {"mean": lib.TM_REDUCE_MEAN, "sum": lib.TM_REDUCE_SUM,
                    "none": lib.TM_REDUCE_NONE}


def _head_params(head):
    """The tm_head struct of a head dict (``kind`` and the fields it sets)."""
    params = ffi.new("tm_head *")
    params.kind = HEADS[head["kind"]]
    params.scale = head.get("scale", 1.0)
    params.m1 = head.get("m1", 1.0)
    params.m2 = head.get("m2", 0.0)
    params.m3 = head.get("m3", 0.0)
    params.margin = head.get("margin", 1)
    params.lambda_ = head.get("lambda_", 0.0)
    params.easy_margin = int(head.get("easy_margin", False))
    params.straight_through = int(head.get("straight_through", False))
    return params


def softmax_head(head, x, labels, weight, bias, class_weight, reduction, want_grad, want_wgrad,
                 upstream=None):
    """One margin-softmax head (tripmine.heads): ``head`` is a dict with ``kind`` and the
    tm_head fields it sets.  Returns (loss, per_sample, n_correct, grad, weight_grad,
    bias_grad)."""
    params = _head_params(head)
    loss = ffi.new("double *")
    correct = ffi.new("int64_t *")
    per_sample = np.empty(x.shape[0]) if reduction == "none" else None
    grad = np.empty_like(x) if want_grad else None
    weight_grad = np.empty_like(weight) if want_wgrad else None
    bias_grad = np.empty_like(bias) if (want_wgrad and bias is not None) else None
    check(_typed("tm_softmax_head", x.dtype)(
        params, _ptr(x), x.shape[0], x.shape[1], _ptr(labels), _ptr(weight), weight.shape[0],
        _ptr(bias), _ptr(class_weight), _HEAD_REDUCTIONS[reduction], _ptr(upstream), loss,
        _ptr(per_sample), correct, _ptr(grad), _ptr(weight_grad), _ptr(bias_grad)),
        f"{head['kind']} head")
    return loss[0], per_sample, int(correct[0]), grad, weight_grad, bias_grad


def softmax_head_shard(head, x, labels, weight, bias, lse=None, gain=None, want_grad=False,
                       want_wgrad=False):
    """One shard of a head's classes (tm_softmax_head_shard).  Without ``lse``: the (n, 4)
    statistics (local log-sum-exp, target logit, best plain logit, its row).  With ``lse``
    and ``gain``: (grad, weight_grad, bias_grad), this shard's parts."""
    params = _head_params(head)
    first = lse is None
    partial = np.empty((x.shape[0], 4)) if first else None
    grad = np.empty_like(x) if want_grad and not first else None
    weight_grad = np.empty_like(weight) if want_wgrad and not first else None
    bias_grad = np.empty_like(bias) if (weight_grad is not None and bias is not None) else None
    check(_typed("tm_softmax_head_shard", x.dtype)(
        params, _ptr(x), x.shape[0], x.shape[1], _ptr(labels), _ptr(weight), weight.shape[0],
        _ptr(bias), _ptr(lse), _ptr(gain), _ptr(partial), _ptr(grad), _ptr(weight_grad),
        _ptr(bias_grad)), f"{head['kind']} head shard")
    return partial if first else (grad, weight_grad, bias_grad)


def center_loss(x, labels, centers, reduction, want_grad, want_cgrad, upstream=None):
    """Center loss (tripmine.center): (loss, per_sample, grad, centers_grad)."""
    loss = ffi.new("double *")
    per_sample = np.empty(x.shape[0]) if reduction == "none" else None
    grad = np.empty_like(x) if want_grad else None
    centers_grad = np.empty_like(centers) if want_cgrad else None
    check(_typed("tm_center_loss", x.dtype)(
        _ptr(x), x.shape[0], x.shape[1], _ptr(labels), _ptr(centers), centers.shape[0],
        _HEAD_REDUCTIONS[reduction], _ptr(upstream), loss, _ptr(per_sample), _ptr(grad),
        _ptr(centers_grad)), "center loss")
    return loss[0], per_sample, grad, centers_grad


def update_centers(centers, x, labels, alpha):
    """The paper's center update, in place on ``centers`` (writable, C-contiguous)."""
    ptr = ffi.from_buffer(_POINTER_TYPES[centers.dtype], centers, require_writable=True)
    check(_typed("tm_update_centers", centers.dtype)(
        ptr, centers.shape[0], centers.shape[1], _ptr(x), x.shape[0], _ptr(labels),
        float(alpha)), "center update")


def margin_loss(x, ref, metric, anchor, positive, negative, beta, margin, reduction, want_grad,
                per_item):
    """Margin loss over given triplets (tripmine.margin): (loss, n_active, per_triplet,
    beta_grad per triplet, grad, ref_grad)."""
    loss = ffi.new("double *")
    active = ffi.new("int64_t *")
    t = anchor.shape[0]
    per_triplet = np.empty(t) if per_item else None
    beta_grad = np.empty(t)
    grad, ref_grad = _gradient_buffers(x, ref, want_grad)
    check(_typed("tm_margin_loss", x.dtype)(*_problem_args(x, ref), metric,
                                            _range.row_exponent(), _ptr(anchor),
                                            _ptr(positive), _ptr(negative), t, _ptr(beta),
                                            margin, REDUCTIONS[reduction], loss, active,
                                            _ptr(per_triplet), _ptr(beta_grad), _ptr(grad),
                                            _ptr(ref_grad)),
          "margin_loss")
    return loss[0], int(active[0]), per_triplet, beta_grad, grad, ref_grad
