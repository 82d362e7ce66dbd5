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
* **float64 inputs** are rerun at a power of two, which is exact.  With
  ``metric="cosine"`` each row gets its own (cosine distances do not change, and a row's
  gradient scales back by its power).  With the euclidean metrics x and ref get one 2^e,
  the one nearest 1 that brings every row in (``_window_exponent``), and the call runs
  with ``row_exponent()`` = e in this context: the C core's losses take it and compute every
  distance in the caller's units (2^-e, squared 2^-2e, times the given rows'), so margins,
  beta, soft margins and the lifted loss's exponentials stay as given and the gradients are
  with respect to the caller's rows; the semi-hard margin follows the rows
  (``_core._engine_margin``); miners and retrieval metrics return indices, and distances
  scale back here.  Rows whose magnitudes span more than the window (no one power brings
  them in), and a loss that needs a distance beyond float64 (``TM_ERR_RANGE`` from the
  rerun), raise ``FloatingPointError`` naming the rows' range, instead of returning inf
  or NaN.

Heads and the center loss (tripmine.heads, tripmine.center) do not use the engine; they
check their loss (``check_loss_fits``), and float32 heads whose logits overflow rerun here
too.  Every loss a public function returns is checked (``check_loss``), and the C core
scans the gradients it returns (an overflow is ``TM_ERR_RANGE``; rows already inside the
window then raise here).  The common case costs nothing measurable: the window check is a
pass over n + m norms the engine computed anyway, the gradient scan one vectorised pass.

The GPU path (tripmine._gpu) checks the same window on its norms; ``rerun_device`` reruns
its float32 calls in float64 on the device.
"""

from __future__ import annotations

import contextvars
import dataclasses
import math
from typing import Any, Callable

import numpy as np

F32_MAX = float(np.finfo(np.float32).max)

#: Result fields that hold gradients: arrays of the compute dtype.
GRADIENT_FIELDS = ("grad", "ref_grad", "weight_grad", "bias_grad", "centers_grad")

#: Arguments that may hold float arrays the C core reads (a float64 rerun casts them).
_ARRAYS = ("x", "ref", "weight", "bias", "out")


def window(dtype: Any) -> tuple[float, float]:
    """The squared row norms the tile engine computes the Gram identity in, for a dtype
    (the C core's norms_in_window; the GPU path checks the same)."""
    return (2.0 ** -100, 2.0 ** 120) if np.dtype(dtype).itemsize <= 4 else \
        (2.0 ** -960, 2.0 ** 1000)


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
        raise FloatingPointError(f"the loss of {name} overflows float64 (it came out {peak}: "
                                 f"an intermediate beyond the range; or the inputs held inf "
                                 f"or NaN with check_finite=False)")
    if itemsize == 4:
        _fits_float32(loss, f"the loss of {name}")


def check_gradients(result: Any, name: str, checked_inputs: bool = True) -> None:
    """A gradient of a result must be finite: an overflow raises instead of coming back as
    inf or NaN.  For the gradients scaled here (the cosine rerun's per-row powers); the C
    core scans those it returns.  One summing pass per gradient, which inf or NaN anywhere
    makes non-finite; a second only then.  With ``checked_inputs`` False a NaN is left
    alone, as for the loss."""
    for field in GRADIENT_FIELDS:
        value = getattr(result, field, None)
        if not isinstance(value, np.ndarray) or value.dtype.kind != "f" or not value.size:
            continue
        with np.errstate(over="ignore", invalid="ignore"):
            if np.isfinite(np.add.reduce(value, axis=None)):
                continue
        finite = np.isfinite(value)
        if finite.all() or (not checked_inputs and np.isnan(value[~finite]).any()):
            continue  # the sum overflowed, not an entry; or unchecked NaN inputs
        raise FloatingPointError(f"the gradient {field} of {name} overflows "
                                 f"{value.dtype.name}: an intermediate beyond its range")


def check_loss(result: Any, name: str, names: tuple, args: tuple, keywords: dict) -> None:
    """:func:`check_loss_fits` for a public function's result (its gradients the C core
    scans: an overflow there is ``TM_ERR_RANGE``); the compute dtype (float64 if x or ref
    is) is looked up only for a loss beyond float32's range."""
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
    except OutOfRange:  # the float64 rerun's rows are inside: its gradient scan refused
        raise FloatingPointError(f"{func.__name__}: a gradient overflows float64 (margins or "
                                 f"terms near the top of the range)") from None


def _is_array(value: Any) -> bool:
    """A NumPy or a device (CuPy) array: the reruns below use only methods both have."""
    return isinstance(value, np.ndarray) or hasattr(value, "__cuda_array_interface__")


def rerun_device(func: Callable, names: tuple, args: tuple, kwargs: dict) -> Any:
    """The GPU path's rerun (tripmine._gpu raised OutOfRange from the same norm check as
    the C engine): float32 (and float16) calls compute in float64 on the device and come
    back rounded to float32, or raise, as on the CPU.  float64 rows outside the window
    raise: the CUDA kernels take no row exponent yet (the CPU path does)."""
    bound = dict(zip(names, args))
    bound.update(kwargs)
    arrays = {n: bound[n] for n in _float_arrays(bound) if _is_array(bound[n])}
    if all(a.dtype.itemsize <= 4 for n, a in arrays.items() if n != "bias"):
        try:
            return _in_float64(func, bound, arrays)
        except OutOfRange:
            pass
    raise FloatingPointError(
        f"{func.__name__}: rows beyond the GPU path's float64 window (squared norms within "
        f"[2^-960, 2^1000], row norms about 1e-144 .. 1e150); the CPU path (NumPy arrays) "
        f"takes any finite rows")


def _in_float64(func: Callable, bound: dict, arrays: dict) -> Any:
    out = bound.get("out")
    call = dict(bound)
    for name, value in arrays.items():
        call[name] = value.astype(np.float64)
    if out is not None:
        call["out"] = None
    result = func(**call)
    if _is_array(result):  # pairwise_distances
        value = _narrow(result, "a distance")
        if out is not None:
            out[...] = value
            return out
        return value
    if isinstance(result, tuple):  # nearest_neighbors' (indices, distances); Triplets
        items = [_narrow(v, "a distance") if _is_array(v) and
                 v.dtype == np.float64 else v for v in result]
        return type(result)(*items) if hasattr(result, "_fields") else tuple(items)
    if not dataclasses.is_dataclass(result):
        return result
    changes = {}
    for field in dataclasses.fields(result):
        value = getattr(result, field.name)
        if field.name in GRADIENT_FIELDS and _is_array(value):
            changes[field.name] = _narrow(value, f"the gradient {field.name}")
        elif field.name == "loss":
            _fits_float32(value, "the loss")
    return dataclasses.replace(result, **changes) if changes else result


def _fits_float32(value: Any, what: str) -> None:
    value = value if _is_array(value) else np.asarray(value)
    finite = value[np.isfinite(value)]  # inf marks a missing neighbour, not an overflow
    peak = float(np.max(np.abs(finite))) if finite.size else 0.0
    if peak > F32_MAX:
        raise FloatingPointError(f"{what} reaches {peak:.3g}, beyond float32's range "
                                 f"(3.4e38): pass float64 inputs to get it")


def _narrow(value: np.ndarray, what: str) -> np.ndarray:
    """A float64 result rounded to float32, refused where it does not fit."""
    _fits_float32(value, what)
    return value.astype(np.float32)


#: The float64 range rerun's row exponent e (the rows the C core is given are 2^e times
#: the caller's): 0 outside a rerun.  The loss entry points of the C core take it
#: (row_exponent) and compute in the caller's units; the semi-hard margin follows it
#: (_core._engine_margin).  A context variable, so concurrent calls never see another's.
_ROW_EXPONENT: contextvars.ContextVar[int] = contextvars.ContextVar("tripmine_row_exponent",
                                                                   default=0)


def row_exponent() -> int:
    """The row exponent of the rerun in progress in this context (0 outside one)."""
    return _ROW_EXPONENT.get()


#: Functions whose float64 euclidean rows are rerun at 2^e: the losses and miners take e
#: (their results are the caller's); these return distances, scaled back here.
_RESCALED = ("pairwise_distances", "nearest_neighbors", "recall_at_k",
             "mean_average_precision_at_r", "batch_hard", "semi_hard", "triplet_loss",
             "contrastive_loss", "margin_loss", "lifted_structured_loss")
_DISTANCES = ("pairwise_distances", "nearest_neighbors")


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
    """float64 rows outside the window: exact power-of-two rescaling."""
    name = func.__name__
    metric = bound.get("metric", "euclidean")
    magnitudes = {n: np.max(np.abs(a), axis=1) if a.size else np.zeros(len(a))
                  for n, a in arrays.items()}
    call = dict(bound)
    both = np.concatenate(list(magnitudes.values()))
    nonzero = both[both > 0]
    d = next(iter(arrays.values())).shape[1]
    exponent = _window_exponent(nonzero, d)
    if exponent == 0:
        # The rows are inside the window already: what the C core refused is a result
        # beyond float64, a gradient its scan found (TM_ERR_RANGE).
        peak = float(nonzero.max()) if nonzero.size else 0.0
        raise FloatingPointError(
            f"{name}: a gradient overflows float64 (rows of magnitude up to {peak:.3g}; "
            f"margins or terms near the top of the range)")
    if metric == "cosine":
        # Each row its own power of two: cosine distances ignore it, so the call is the
        # same problem; a row's gradient scales by its power (f(s x) = f(x)).
        shifts = {n: -np.floor(np.log2(np.where(m > 0, m, 1.0))).astype(np.int64)
                  for n, m in magnitudes.items()}
    else:
        if name not in _RESCALED:
            _refuse(name, metric, arrays, magnitudes, "")
        if exponent is None:
            _refuse(name, metric, arrays, magnitudes, ": their magnitudes span more than the "
                    "window, so no one power of two brings them all in")
        shifts = {n: np.full(len(m), exponent, dtype=np.int64) for n, m in magnitudes.items()}
    for n, a in arrays.items():  # x 2^shift, exact (ldexp: no overflowing 2^shift itself)
        call[n] = np.ldexp(a.astype(np.float64), shifts[n][:, None])
    out = bound.get("out")
    if out is not None:
        call["out"] = None
    token = _ROW_EXPONENT.set(0 if metric == "cosine" else exponent)
    try:
        result = func(**call)
    except OutOfRange:  # the rows are inside now: a result beyond float64 (C core)
        peak = float(nonzero.max())
        raise FloatingPointError(
            f"{name}: a {metric} distance between rows of magnitude up to {peak:.3g}, which "
            f"the loss needs, or a gradient overflows float64; pass smaller rows"
            f"{' or metric=' + repr('euclidean') if metric == 'sqeuclidean' else ''}") from None
    finally:
        _ROW_EXPONENT.reset(token)
    if name in _DISTANCES:
        distances = result if name == "pairwise_distances" else result[1]
        if metric != "cosine":
            p = 2 if metric == "sqeuclidean" else 1
            finite = np.isfinite(distances)  # inf marks a missing neighbour
            with np.errstate(over="ignore", under="ignore"):
                distances = np.ldexp(distances, -exponent * p)
            if not np.isfinite(distances[finite]).all():
                peak = float(np.concatenate(list(magnitudes.values())).max())
                raise FloatingPointError(
                    f"a {metric} distance overflows float64 (rows of magnitude up to "
                    f"{peak:.3g}): pass metric='euclidean' or smaller rows")
        if name == "nearest_neighbors":
            return result[0], distances
        if out is not None:
            np.copyto(out, distances)
            return out
        return distances
    if not dataclasses.is_dataclass(result) or metric != "cosine":
        return result  # indices, metrics, or a loss and gradient in the caller's units
    changes = {}
    for field, n in (("grad", "x"), ("ref_grad", "ref")):
        value = getattr(result, field, None)
        if isinstance(value, np.ndarray) and n in shifts:
            with np.errstate(over="ignore", under="ignore"):
                changes[field] = np.ldexp(value, shifts[n][:, None])
    result = dataclasses.replace(result, **changes) if changes else result
    check_gradients(result, name)
    return result
