"""The whole floating-point range: results wherever the dtype can hold them, an error where not.

The C core's tile engine computes distances with the Gram identity |x|^2 + |r|^2 - 2 x.r
in the input's precision, which holds its documented accuracy while every nonzero squared
row norm lies in a window of that precision (2^-100 .. 2^120 for float32, 2^-960 .. 2^1000
for float64).  The engine checks the norms it takes anyway while packing the rows, and
returns ``TM_ERR_RANGE`` before writing anything when a row lies outside; the binding
raises :class:`OutOfRange`, and the dispatch wrapper of every public function reruns the
call here:

* **float32 (and float16) inputs** compute in float64, where every float32 value's square
  is a normal number: the results are then rounded to the float32 they would have had.  A
  result that float32 cannot hold (a squared distance or a gradient above 3.4e38, a loss
  beyond it) raises ``FloatingPointError`` naming it.
* **float64 inputs** are rescaled by powers of two, which is exact, where the function's
  result transforms simply: every function with ``metric="cosine"`` (each row by its own
  power of two: cosine distances do not change, and a row's gradient scales by its power);
  with the euclidean metrics, one power 2^e for x and ref, distances scaling by 2^(e p)
  (p = 1, or 2 squared), for the functions of ``_HOMOGENEOUS``: pairwise distances,
  neighbours, retrieval metrics, miners, and the hinge triplet, contrastive and margin
  losses, whose margins (and beta) scale with the distances, so that the loss scales by
  2^(e p q) (q: contrastive's power) and the gradient by 2^(e (1 - p q)).  A result beyond
  float64 raises ``FloatingPointError``; so do other float64 calls with such rows, naming
  the argument and the window, instead of returning inf or NaN.

Heads and the center loss (tripmine.heads, tripmine.center) do not use the engine; they
check their loss (``check_loss_fits``), and float32 heads whose logits overflow rerun here
too.  The common case costs nothing: the check is a pass over n + m norms the engine
computed anyway.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import numpy as np

F32_MAX = float(np.finfo(np.float32).max)

#: Result fields that hold gradients: arrays of the compute dtype.
GRADIENT_FIELDS = ("grad", "ref_grad", "weight_grad", "bias_grad", "centers_grad")

#: Arguments that may hold float arrays the C core reads (a float64 rerun casts them).
_ARRAYS = ("x", "ref", "weight", "bias", "out")


class OutOfRange(Exception):
    """A row's squared norm outside the working precision's window (``TM_ERR_RANGE``);
    caught by the dispatch wrapper, never seen by callers."""


def _peak(value: Any) -> float:
    """The largest magnitude in a loss (a float or a vector); NaN if it holds one."""
    if isinstance(value, float):
        return abs(value)
    value = np.asarray(value)
    return float(np.max(np.abs(value))) if value.size else 0.0


def check_loss_fits(loss: Any, name: str, itemsize: int, checked_inputs: bool = True) -> None:
    """A loss must fit the dtype the call computed in (itemsize 4 or 8): an overflowed
    intermediate (margins near the largest double, sums beyond it), or for float32 a loss
    beyond float32's range, raises instead of coming back as inf, NaN or a number float32
    cannot hold.  With ``checked_inputs`` False (``check_finite=False``) a NaN loss is left
    alone: it comes from NaN inputs, whose results are undefined (README)."""
    peak = _peak(loss)
    if peak <= F32_MAX or (math.isnan(peak) and not checked_inputs):
        return
    if not math.isfinite(peak):
        raise FloatingPointError(f"the loss of {name} is {peak}: an intermediate overflowed "
                                 f"(or the inputs held inf or NaN with check_finite=False)")
    if itemsize == 4:
        _fits_float32(loss, f"the loss of {name}")


def check_loss(result: Any, name: str, names: tuple, args: tuple, keywords: dict) -> None:
    """:func:`check_loss_fits` for a public function's result; the compute dtype (float64
    if x or ref is) is looked up only for a loss beyond float32's range."""
    if _peak(result.loss) <= F32_MAX:
        return
    positional = dict(zip(names, args))
    arrays = [v for n in ("x", "ref") for v in (positional.get(n, keywords.get(n)),)
              if v is not None]
    wide = any(np.asarray(a).dtype.itemsize == 8 for a in arrays)
    check_loss_fits(result.loss, name, 8 if wide else 4,
                    bool(keywords.get("check_finite", True)))


def _float_arrays(bound: dict) -> list[str]:
    return [n for n in _ARRAYS if n != "out" and bound.get(n) is not None]


def rerun(func: Callable, names: tuple, args: tuple, kwargs: dict, exc: OutOfRange) -> Any:
    """The call of ``func`` whose C core refused its rows' range, in a range that holds it."""
    bound = dict(zip(names, args))
    bound.update(kwargs)
    arrays = {n: np.asarray(bound[n]) for n in _float_arrays(bound)}
    if not all(np.isfinite(a).all() for a in arrays.values()):
        raise FloatingPointError(f"{func.__name__} was given inf or NaN with "
                                 f"check_finite=False: its result is undefined (README)")
    try:
        if all(a.dtype.itemsize <= 4 for n, a in arrays.items() if n != "bias"):
            return _in_float64(func, bound, arrays)
        return _rescaled(func, bound, arrays)
    except OutOfRange:  # rescaled rows refused again: only from a failure to rescale
        raise FloatingPointError(f"{func.__name__}: rows outside the range tripmine computes "
                                 f"in, which no power of two brought in") from None


def _in_float64(func: Callable, bound: dict, arrays: dict) -> Any:
    out = bound.get("out")
    call = dict(bound)
    for name, value in arrays.items():
        call[name] = value.astype(np.float64)
    if out is not None:
        call["out"] = None
    result = func(**call)
    if isinstance(result, np.ndarray):  # pairwise_distances
        value = _narrow(result, "a distance")
        if out is not None:
            np.copyto(out, value)
            return out
        return value
    if isinstance(result, tuple):  # nearest_neighbors' (indices, distances); Triplets
        items = [_narrow(v, "a distance") if isinstance(v, np.ndarray) and
                 v.dtype == np.float64 else v for v in result]
        return type(result)(*items) if hasattr(result, "_fields") else tuple(items)
    if not dataclasses.is_dataclass(result):
        return result
    changes = {}
    for field in dataclasses.fields(result):
        value = getattr(result, field.name)
        if field.name in GRADIENT_FIELDS and isinstance(value, np.ndarray):
            changes[field.name] = _narrow(value, f"the gradient {field.name}")
        elif field.name == "loss":
            _fits_float32(value, "the loss")
    return dataclasses.replace(result, **changes) if changes else result


def _fits_float32(value: Any, what: str) -> None:
    value = np.asarray(value)
    finite = value[np.isfinite(value)]  # inf marks a missing neighbour, not an overflow
    peak = float(np.max(np.abs(finite))) if finite.size else 0.0
    if peak > F32_MAX:
        raise FloatingPointError(f"{what} reaches {peak:.3g}, beyond float32's range "
                                 f"(3.4e38): pass float64 inputs to get it")


def _narrow(value: np.ndarray, what: str) -> np.ndarray:
    """A float64 result rounded to float32, refused where it does not fit."""
    _fits_float32(value, what)
    return value.astype(np.float32)


#: float64 functions rescaled with one power of two s for x and ref (euclidean metrics):
#: name -> the options in distance units (scaled by s^p, p = 1 euclidean, 2 sqeuclidean)
#: and the option giving the loss's degree in the distances (1 where None).
_HOMOGENEOUS = {
    "pairwise_distances": ((), None),
    "nearest_neighbors": ((), None),
    "recall_at_k": ((), None),
    "mean_average_precision_at_r": ((), None),
    "batch_hard": ((), None),
    "semi_hard": (("margin",), None),
    "triplet_loss": (("margin",), None),
    "contrastive_loss": (("pos_margin", "neg_margin"), "power"),
    # beta (a float or one per class) is a distance too; nu multiplies it, so stays
    "margin_loss": (("margin", "beta"), None),
}
_DEFAULTS = {"margin": 0.2, "pos_margin": 0.0, "neg_margin": 1.0, "power": 1, "beta": 1.2}


def _window_exponent(magnitudes: np.ndarray, d: int) -> int | None:
    """The power of two (its exponent) nearest 0 that brings every row magnitude into the
    float64 window: largest at most 2^450 / sqrt(D), smallest at least 2^-470 (squared norms
    within [2^-940, 2^900], inside the engine's [2^-960, 2^1000]); None where none does."""
    if not magnitudes.size:
        return 0
    top = float(np.log2(magnitudes.max())) + 0.5 * np.log2(max(d, 1))
    bottom = float(np.log2(magnitudes.min()))
    low, high = -470 - bottom, 450 - top  # the exponent must lie in [low, high]
    if low > high:
        return None
    return int(np.ceil(low)) if low > 0 else int(np.floor(high)) if high < 0 else 0


def _refuse(name: str, metric: str, arrays: dict, magnitudes: dict, why: str) -> None:
    both = np.concatenate(list(magnitudes.values()))
    nonzero = both[both > 0]
    low, high = (nonzero.min(), nonzero.max()) if nonzero.size else (0.0, 0.0)
    raise FloatingPointError(
        f"{' and '.join(arrays)} hold rows of magnitude (largest |entry|) {low:.3g} .. "
        f"{high:.3g}, beyond what {name} computes in float64 with metric={metric!r}"
        f"{why} (squared row norms within [2^-960, 2^1000], about 1e-144 .. 1e150 / "
        f"sqrt(D)); metric='cosine' takes any finite rows. Scale the embeddings (and the "
        f"margins) by a power of two")


def _rescaled(func: Callable, bound: dict, arrays: dict) -> Any:
    """float64 rows outside the window: exact power-of-two rescaling, where it applies."""
    name = func.__name__
    metric = bound.get("metric", "euclidean")
    magnitudes = {n: np.max(np.abs(a), axis=1) if a.size else np.zeros(len(a))
                  for n, a in arrays.items()}
    call = dict(bound)
    if metric == "cosine":
        # Each row its own power of two: cosine distances ignore it, so the call is the
        # same problem; a row's gradient scales by its power (f(s x) = f(x)).
        shifts = {n: -np.floor(np.log2(np.where(m > 0, m, 1.0))).astype(np.int64)
                  for n, m in magnitudes.items()}
        loss_factor, grad_power = None, None
    else:
        if name not in _HOMOGENEOUS:
            _refuse(name, metric, arrays, magnitudes, "")
        if bound.get("soft"):
            _refuse(name, metric, arrays, magnitudes, " and soft=True")
        both = np.concatenate(list(magnitudes.values()))
        nonzero = both[both > 0]
        peak = float(nonzero.max()) if nonzero.size else 1.0
        exponent = _window_exponent(nonzero, next(iter(arrays.values())).shape[1])
        if exponent is None:
            _refuse(name, metric, arrays, magnitudes, ": their magnitudes span more than the "
                    "window, so no one power of two brings them all in")
        shifts = {n: np.full(len(m), exponent, dtype=np.int64) for n, m in magnitudes.items()}
        p = 2 if metric == "sqeuclidean" else 1
        options, degree_option = _HOMOGENEOUS[name]
        degree = p * int(bound.get(degree_option, _DEFAULTS.get(degree_option, 1))
                         if degree_option else 1)
        for option in options:
            value = bound.get(option, _DEFAULTS[option])  # margin: 0.2 in both losses
            try:
                number = np.asarray(value, dtype=np.float64)
            except (TypeError, ValueError):
                return func(**bound)  # let the function refuse it with its own message
            if isinstance(value, (bool, str)) or not np.isfinite(number).all():
                return func(**bound)
            with np.errstate(over="ignore"):
                scaled = np.ldexp(number, exponent * p)
            if not np.isfinite(scaled).all():
                _refuse(name, metric, arrays, magnitudes, f": {option} times the power of two "
                        f"that brings the rows in overflows")
            call[option] = float(scaled) if scaled.ndim == 0 else scaled
        loss_factor = (exponent, degree)  # true = scaled * 2^(-exponent * degree)
        grad_power = exponent * (1 - degree)  # dL/dx = 2^(e (1 - degree)) dL'/dx'
    for n, a in arrays.items():  # x 2^shift, exact (ldexp: no overflowing 2^shift itself)
        call[n] = np.ldexp(a.astype(np.float64), shifts[n][:, None])
    out = bound.get("out")
    if out is not None:
        call["out"] = None
    result = func(**call)
    if name in ("pairwise_distances", "nearest_neighbors"):
        distances = result if name == "pairwise_distances" else result[1]
        if metric != "cosine":
            with np.errstate(over="ignore"):
                distances = np.ldexp(distances, -exponent * p)
            if not np.isfinite(distances[np.isfinite(result if name == "pairwise_distances"
                                                     else result[1])]).all():
                raise FloatingPointError(
                    f"a {metric} distance overflows float64 (rows of magnitude up to "
                    f"{peak:.3g}): pass metric='euclidean' or smaller rows")
        if name == "nearest_neighbors":
            return result[0], distances
        if out is not None:
            np.copyto(out, distances)
            return out
        return distances
    if not dataclasses.is_dataclass(result):
        return result  # Triplets, retrieval metrics: unchanged by the rescaling
    changes = {}
    if metric != "cosine":
        exponent, degree = loss_factor
        with np.errstate(over="ignore"):
            loss = np.ldexp(np.asarray(result.loss, dtype=np.float64), -exponent * degree)
        if not np.isfinite(loss).all():
            raise FloatingPointError(f"the loss of {name} overflows float64 (rows of "
                                     f"magnitude up to {peak:.3g})")
        changes["loss"] = loss if np.ndim(result.loss) else float(loss)
    for field, n in (("grad", "x"), ("ref_grad", "ref")):
        value = getattr(result, field, None)
        if isinstance(value, np.ndarray) and n in shifts:
            with np.errstate(over="ignore", under="ignore"):
                if metric == "cosine":
                    value = np.ldexp(value, shifts[n][:, None])
                else:
                    value = np.ldexp(value, grad_power)
            if not np.isfinite(value).all():
                raise FloatingPointError(f"the gradient {field} of {name} overflows float64")
            changes[field] = value
    return dataclasses.replace(result, **changes) if changes else result
