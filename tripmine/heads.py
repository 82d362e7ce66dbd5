"""Classification heads: the margin-softmax family, fused so that the N x C logits never exist.

Each function takes embeddings ``x`` (N, D), integer ``labels`` in ``[0, C)`` and
``weight`` (C, D), one row per class, and returns a :class:`SoftmaxLossResult` with the
cross-entropy, ``grad`` = dL/dx, ``weight_grad`` = dL/dW and the training accuracy.  The
C core walks the classes in blocks with an online log-sum-exp per sample (csrc/heads.c):
memory is linear in N + C, never N x C, and the target's logit is recomputed from its own
dot product, in double, before the head's margin is applied.

Heads (theta_j is the angle between x and W_j; s the scale):

==========================  =========================================  =================
function                    target logit (class y)                     other classes j
==========================  =========================================  =================
softmax_loss                W_y.x + b_y                                W_j.x + b_j
normface_loss               s cos theta_y                              s cos theta_j
cosface_loss                s (cos theta_y - m)                        s cos theta_j
arcface_loss                s cos(theta_y + m)                         s cos theta_j
combined_margin_loss        s (cos(m1 theta_y + m2) - m3)              s cos theta_j
sphereface_loss             |x| F(theta_y)                             |x| cos theta_j
large_margin_softmax_loss   |W_y| |x| F(theta_y)                       W_j.x
==========================  =========================================  =================

with F = (lambda_ cos theta + psi(theta)) / (1 + lambda_), psi(theta) = (-1)^k cos(m theta) -
2k, k = floor(m theta / pi).

Common keywords: ``class_weight`` (C,) makes the weighted softmax loss, sample i weighing
``class_weight[y_i]`` (``"mean"`` divides by the sum of those weights, as
``torch.nn.CrossEntropyLoss(weight=)`` does); ``reduction`` ``"mean"`` | ``"sum"`` |
``"none"`` (per-sample losses; the gradients are those of their sum); ``grad``;
``weight_grad`` (with ``grad``: also dL/dW, which costs two more GEMM-sized products);
``upstream`` (N,) with ``reduction="none"``: the gradients become those of ``sum_i
upstream[i] * loss[i]``, the chain rule of an autograd caller; ``check_finite``.  float32
and float64 compute in their own precision, float16 in float32;
gradients come back in the computing dtype.

Corner rules, the same in every head:

* a zero ``x_i`` or ``W_j`` has cos 0 with everything, and no gradient flows through the
  normalisation it leaves undefined;
* gradients are finite everywhere: at cos theta = +-1 the direction of d(cos)/dx vanishes,
  so the margin's derivative there (infinite for cos(theta + m) at theta = 0) is taken as 0;
* psi is continuously differentiable at its k boundaries (its derivative is 0 from both
  sides), so no subgradient is needed there;
* training accuracy (``n_correct``) is the top-1 of the logits *without* margin, ties going
  to the lowest class index (``argmax``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import _core, _range
from . import _validation as check
from ._dispatch import is_cupy

__all__ = [
    "SoftmaxLossResult",
    "arcface_loss",
    "combined_margin_loss",
    "cosface_loss",
    "large_margin_softmax_loss",
    "normface_loss",
    "softmax_loss",
    "sphereface_loss",
]

REDUCTIONS = ("mean", "sum", "none")


@dataclass(frozen=True)
class SoftmaxLossResult:
    """What the heads return.

    ``loss`` is a float, or for ``reduction="none"`` a float64 vector of per-sample losses.
    ``grad`` = dL/dx (N, D) and ``weight_grad`` = dL/dW (C, D) (None when not computed);
    ``bias_grad`` (C,) when a bias was given.  ``n_correct`` counts the samples whose top-1
    logit without margin is their label; ``accuracy`` = ``n_correct / n_samples``.
    """

    loss: float | np.ndarray
    grad: np.ndarray | None
    weight_grad: np.ndarray | None
    bias_grad: np.ndarray | None
    n_samples: int
    n_correct: int
    accuracy: float


def _real(value: Any, name: str) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(
            value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a real number, got {check._describe(value)}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def _in_range(value: Any, name: str, low: float, high: float, *, low_open: bool = False,
              high_open: bool = False) -> float:
    value = _real(value, name)
    below = value <= low if low_open else value < low
    above = value >= high if high_open else value > high
    if below or above:
        lo, hi = ("(" if low_open else "["), (")" if high_open else "]")
        raise ValueError(f"{name} must lie in {lo}{low:g}, {high:g}{hi}, got {value}")
    return value


def _integer_margin(value: Any) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        if isinstance(value, (float, np.floating)) and float(value).is_integer():
            value = int(value)
        else:
            raise ValueError(f"margin must be an integer >= 1 (the angle multiplier m), got "
                             f"{value!r}")
    if not 1 <= value <= 64:
        raise ValueError(f"margin must be an integer in [1, 64], got {value}")
    return int(value)


def _class_vector(value: Any, name: str, c: int, dtype: Any, check_finite: bool,
                  what: str = "one entry per row of weight") -> np.ndarray:
    arr = check._as_array(value, name)
    if arr.dtype.kind not in "fiu":
        raise ValueError(f"{name} must be a real-valued vector, got dtype {arr.dtype}")
    if arr.shape != (c,):
        raise ValueError(f"{name} must have shape ({c},) ({what}), got shape {arr.shape}")
    arr = check.c_array(arr, dtype)
    if check_finite and not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or infinity")
    return arr


def class_labels(labels: Any, n: int, c: int, table: str = "weight") -> np.ndarray:
    """Host labels as int64 class indices in [0, c), one per row of x, c being the rows of
    ``table`` (also used by the GPU path and the center loss, so all give the same
    errors)."""
    arr = check._as_array(labels, "labels")
    if arr.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {arr.shape}")
    if arr.shape[0] != n:
        raise ValueError(f"labels has length {arr.shape[0]} but x has {n} rows")
    if arr.dtype.kind not in "iu" and arr.size:  # np.asarray([]) is float64: no labels
        raise ValueError(f"labels must be integer class indices in [0, {c}), got dtype "
                         f"{arr.dtype}")
    if n and (arr.min() < 0 or arr.max() >= c):
        bad = arr[(arr < 0) | (arr >= c)][0]
        raise ValueError(f"labels must lie in [0, {c}) ({table} has {c} rows), found {bad}")
    return check.c_array(arr, np.int64)


# ---- each head's parameters, validated (the functions below and the sharded head) ----------


def _scale(value: Any) -> float:
    return _in_range(value, "scale", 0.0, math.inf, low_open=True, high_open=True)


def _softmax_head() -> dict:
    return {"kind": "softmax"}


def _normface_head(scale: float = 20.0) -> dict:
    return {"kind": "normface", "scale": _scale(scale)}


def _cosface_head(scale: float = 64.0, margin: float = 0.35) -> dict:
    return {"kind": "cosface", "scale": _scale(scale),
            "m3": _in_range(margin, "margin", 0.0, 1.0)}


def _arcface_head(scale: float = 64.0, margin: float = 0.5, easy_margin: bool = False,
                  straight_through: bool = False) -> dict:
    return {"kind": "arcface", "scale": _scale(scale),
            "m2": _in_range(margin, "margin", 0.0, math.pi, high_open=True),
            "easy_margin": check.flag(easy_margin, "easy_margin"),
            "straight_through": check.flag(straight_through, "straight_through")}


def _combined_head(scale: float = 64.0, m1: float = 1.0, m2: float = 0.3, m3: float = 0.2,
                   straight_through: bool = False) -> dict:
    return {"kind": "combined", "scale": _scale(scale),
            "m1": _in_range(m1, "m1", 0.0, 64.0, low_open=True),
            "m2": _in_range(m2, "m2", 0.0, math.pi, high_open=True),
            "m3": _in_range(m3, "m3", 0.0, 1.0),
            "straight_through": check.flag(straight_through, "straight_through")}


def _sphereface_head(margin: int = 4, lambda_: float = 0.0) -> dict:
    return {"kind": "sphereface", "margin": _integer_margin(margin),
            "lambda_": _in_range(lambda_, "lambda_", 0.0, math.inf, high_open=True)}


def _lsoftmax_head(margin: int = 4, lambda_: float = 0.0) -> dict:
    return {"kind": "lsoftmax", "margin": _integer_margin(margin),
            "lambda_": _in_range(lambda_, "lambda_", 0.0, math.inf, high_open=True)}


HEAD_PARAMETERS = {"softmax": _softmax_head, "normface": _normface_head,
                   "cosface": _cosface_head, "arcface": _arcface_head,
                   "combined": _combined_head, "sphereface": _sphereface_head,
                   "lsoftmax": _lsoftmax_head}


def _run(head: dict, x: Any, labels: Any, weight: Any, *, bias: Any = None,
         class_weight: Any = None, reduction: str = "mean", grad: bool = True,
         weight_grad: bool = True, upstream: Any = None,
         check_finite: bool = True) -> SoftmaxLossResult:
    """Validate the common inputs and run one head: in the C core, or on the GPU when the
    embeddings or the weights are CuPy arrays (tripmine._gpu.heads)."""
    on_gpu = [name for name, value in (("x", x), ("weight", weight)) if is_cupy(value)]
    if on_gpu:
        if len(on_gpu) != 2:
            raise TypeError("mixed devices: x and weight must both be CuPy arrays (or both "
                            "host arrays); move them to one side (cupy.asarray / cupy.asnumpy)")
        try:
            from ._gpu import heads as gpu_heads
        except ImportError as exc:
            raise ImportError(f"the heads were given CuPy arrays, but the GPU backend could "
                              f"not load: {exc}") from exc
    options = dict(bias=bias, class_weight=class_weight, reduction=reduction, grad=grad,
                   weight_grad=weight_grad, upstream=upstream, check_finite=check_finite)
    if on_gpu:
        try:
            return gpu_heads.run(head, x, labels, weight, **options)
        except _range.OutOfRange:  # float32 logits beyond float32: in float64 on the device
            pass
        return _range.rerun_device(gpu_heads.run, ("head", "x", "labels", "weight"),
                                   (head, x, labels, weight), options)
    try:
        return _run_host(head, x, labels, weight, **options)
    except _range.OutOfRange as exc:
        refused = exc
    return _range.rerun(_run_host, ("head", "x", "labels", "weight"),
                        (head, x, labels, weight), options, refused)


def _run_host(head: dict, x: Any, labels: Any, weight: Any, *, bias: Any, class_weight: Any,
              reduction: str, grad: bool, weight_grad: bool, upstream: Any,
              check_finite: bool) -> SoftmaxLossResult:
    """The C core's run of one head (float32 logits that overflow raise OutOfRange)."""
    reduction = check.choice(reduction, "reduction", REDUCTIONS)
    want_grad = check.flag(grad, "grad")
    want_wgrad = check.flag(weight_grad, "weight_grad") and want_grad
    check_finite = check.flag(check_finite, "check_finite")
    x_arr = check._float_matrix(x, "x", check_finite)
    w_arr = check._float_matrix(weight, "weight", check_finite)
    if w_arr.shape[1] != x_arr.shape[1]:
        raise ValueError(f"weight has {w_arr.shape[1]} features per row but x has "
                         f"{x_arr.shape[1]}: weight must be (num_classes, {x_arr.shape[1]})")
    if w_arr.shape[0] < 1:
        raise ValueError("weight must have at least one row (one per class)")
    dtype = check.compute_dtype(x_arr, w_arr)
    n, c = x_arr.shape[0], w_arr.shape[0]
    codes = class_labels(labels, n, c)
    x_arr, w_arr = check.c_array(x_arr, dtype), check.c_array(w_arr, dtype)
    b_arr = None if bias is None else _class_vector(bias, "bias", c, dtype, check_finite)
    cw = None
    if class_weight is not None:
        cw = _class_vector(class_weight, "class_weight", c, np.float64, True)
        if (cw < 0).any():
            raise ValueError(f"class_weight must be >= 0, found {cw[cw < 0][0]}")
    up = None
    if upstream is not None:
        if reduction != "none":
            raise ValueError("upstream weighs per-sample gradients: it needs reduction='none'")
        up = _class_vector(upstream, "upstream", n, np.float64, True, "one entry per sample")
    loss, per_sample, correct, g, wg, bg = _core.softmax_head(
        head, x_arr, codes, w_arr, b_arr, cw, reduction, want_grad, want_wgrad, upstream=up)
    value = per_sample if reduction == "none" else float(loss)
    if dtype.itemsize == 4 and not (np.isfinite(value).all() and
                                    np.max(np.abs(value), initial=0.0) <= _range.F32_MAX):
        # float32 logits W.x that overflowed (unnormalised heads): _run reruns in float64.
        raise _range.OutOfRange(f"the {head['kind']} head")
    _range.check_loss_fits(value, f"the {head['kind']} head", dtype.itemsize, check_finite)
    return SoftmaxLossResult(per_sample if reduction == "none" else float(loss), g, wg, bg, n,
                             correct, correct / n if n else 0.0)


def softmax_loss(x: Any, labels: Any, weight: Any, *, bias: Any = None,
                 class_weight: Any = None, reduction: str = "mean", grad: bool = True,
                 weight_grad: bool = True, upstream: Any = None,
                 check_finite: bool = True) -> SoftmaxLossResult:
    """Softmax cross-entropy of the linear logits ``x @ weight.T + bias``.

    With ``class_weight``, the weighted softmax loss ``-w_y log p_y``.  Matches
    ``torch.nn.CrossEntropyLoss(weight=class_weight)`` on ``torch.nn.Linear`` logits, without
    the (N, C) logits.
    """
    return _run(_softmax_head(), x, labels, weight, bias=bias, class_weight=class_weight,
                reduction=reduction, grad=grad, weight_grad=weight_grad, upstream=upstream,
                check_finite=check_finite)


def normface_loss(x: Any, labels: Any, weight: Any, *, scale: float = 20.0,
                  class_weight: Any = None, reduction: str = "mean", grad: bool = True,
                  weight_grad: bool = True, upstream: Any = None,
                  check_finite: bool = True) -> SoftmaxLossResult:
    """NormFace (Wang et al. 2017): softmax over ``scale * cos(x, W_j)``.

    ``scale=20`` is pytorch-metric-learning's ``NormalizedSoftmaxLoss`` default (its
    temperature 0.05 = 1 / scale).
    """
    return _run(_normface_head(scale), x, labels, weight, class_weight=class_weight,
                reduction=reduction, grad=grad, weight_grad=weight_grad, upstream=upstream,
                check_finite=check_finite)


def cosface_loss(x: Any, labels: Any, weight: Any, *, scale: float = 64.0,
                 margin: float = 0.35, class_weight: Any = None, reduction: str = "mean",
                 grad: bool = True, weight_grad: bool = True,
                 upstream: Any = None,
                 check_finite: bool = True) -> SoftmaxLossResult:
    """CosFace / AM-Softmax (Wang et al. 2018): target logit ``scale * (cos theta - margin)``.

    Defaults ``scale=64, margin=0.35`` are the CosFace paper's.  ``margin`` in [0, 1].
    """
    return _run(_cosface_head(scale, margin), x, labels, weight,
                class_weight=class_weight, reduction=reduction, grad=grad,
                weight_grad=weight_grad, upstream=upstream, check_finite=check_finite)


def arcface_loss(x: Any, labels: Any, weight: Any, *, scale: float = 64.0, margin: float = 0.5,
                 easy_margin: bool = False, straight_through: bool = False,
                 class_weight: Any = None, reduction: str = "mean", grad: bool = True,
                 weight_grad: bool = True, upstream: Any = None,
                 check_finite: bool = True) -> SoftmaxLossResult:
    """ArcFace (Deng et al. 2019): target logit ``scale * cos(theta + margin)``.

    Defaults ``scale=64, margin=0.5`` (radians) are the ArcFace paper's.  Where ``theta +
    margin`` would pass pi, the rule of InsightFace's reference code applies: for
    ``cos theta <= cos(pi - margin)`` the target logit is ``scale * (cos theta - margin *
    sin(margin))``, which keeps it decreasing in theta.  ``easy_margin=True`` applies the
    margin only where ``cos theta > 0`` (the target logit is ``scale * cos theta`` elsewhere).

    ``straight_through=True`` reproduces InsightFace's current training code, which applies
    the margin under ``no_grad``: the forward value is the same, but the gradient is that of
    ``scale * cos theta`` (dz/dcos = scale), not the margin's exact derivative.
    """
    return _run(_arcface_head(scale, margin, easy_margin, straight_through), x, labels, weight,
                class_weight=class_weight, reduction=reduction, grad=grad,
                weight_grad=weight_grad, upstream=upstream, check_finite=check_finite)


def combined_margin_loss(x: Any, labels: Any, weight: Any, *, scale: float = 64.0,
                         m1: float = 1.0, m2: float = 0.3, m3: float = 0.2,
                         straight_through: bool = False, class_weight: Any = None,
                         reduction: str = "mean", grad: bool = True, weight_grad: bool = True,
                         upstream: Any = None,
                         check_finite: bool = True) -> SoftmaxLossResult:
    """The combined margin of InsightFace: target logit ``scale * (cos(m1 theta + m2) - m3)``.

    ``m1`` is SphereFace's multiplicative angular margin, ``m2`` ArcFace's additive angular
    margin and ``m3`` CosFace's additive cosine margin; the defaults (1.0, 0.3, 0.2) are those
    of InsightFace's combined-margin configuration.  Where ``u = m1 theta + m2`` passes pi
    the logit continues as ``scale * ((-1)^k cos u - 2k - m3)``, k = floor(u / pi) (SphereFace's
    psi), which keeps it continuous and decreasing in theta.  ``straight_through`` as in
    :func:`arcface_loss`.
    """
    return _run(_combined_head(scale, m1, m2, m3, straight_through), x, labels, weight,
                class_weight=class_weight, reduction=reduction, grad=grad,
                weight_grad=weight_grad, upstream=upstream, check_finite=check_finite)


def sphereface_loss(x: Any, labels: Any, weight: Any, *, margin: int = 4, lambda_: float = 0.0,
                    class_weight: Any = None, reduction: str = "mean", grad: bool = True,
                    weight_grad: bool = True, upstream: Any = None,
                    check_finite: bool = True) -> SoftmaxLossResult:
    """SphereFace / A-Softmax (Liu et al. 2017): only W is normalised.

    Target logit ``|x| (lambda_ cos theta + psi(theta)) / (1 + lambda_)``, others ``|x| cos
    theta_j``.  ``margin=4`` is the paper's; ``lambda_`` is its annealing weight, which the
    caller schedules (the paper starts large and decays it towards a small floor; 0 applies
    the full margin).
    """
    return _run(_sphereface_head(margin, lambda_), x, labels, weight,
                class_weight=class_weight, reduction=reduction, grad=grad,
                weight_grad=weight_grad, upstream=upstream, check_finite=check_finite)


def large_margin_softmax_loss(x: Any, labels: Any, weight: Any, *, margin: int = 4,
                              lambda_: float = 0.0, class_weight: Any = None,
                              reduction: str = "mean", grad: bool = True,
                              weight_grad: bool = True,
                              upstream: Any = None,
                              check_finite: bool = True) -> SoftmaxLossResult:
    """L-Softmax (Liu et al. 2016): nothing is normalised.

    Target logit ``|W_y| |x| (lambda_ cos theta + psi(theta)) / (1 + lambda_)``, others
    ``W_j . x``.  ``margin=4`` is pytorch-metric-learning's ``LargeMarginSoftmaxLoss`` default
    (the paper trains with m in {2, 3, 4}); ``lambda_`` anneals as in
    :func:`sphereface_loss`.
    """
    return _run(_lsoftmax_head(margin, lambda_), x, labels, weight,
                class_weight=class_weight, reduction=reduction, grad=grad,
                weight_grad=weight_grad, upstream=upstream, check_finite=check_finite)
