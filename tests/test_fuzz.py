"""Fuzzing: every public function with adversarial inputs (hypothesis, bounded).

Inputs: 0 to 40 rows, 0 to 8 columns; float16/32/64 (mixed between ``x`` and ``ref``);
values that are Gaussian, small integers (ties, duplicates, zero rows), all zero, unit
rows, tiny (down to the denormals) or huge (up to the dtype's maximum), with NaN, +-inf,
-0.0, denormals or the maximum planted here and there; C and Fortran order, strided
views whose gaps hold NaN (a stride bug shows up as NaN), negative strides, zero-stride
broadcasts, byte-swapped and misaligned arrays, nested lists, read-only arrays; labels of
many kinds (int8/int64 (also misaligned)/uint64/str/bytes/float with inf/bool/object/list),
all equal, all distinct, a few classes or pairs; extreme margins, cutoffs, seeds, k and
max_triplets.  One example in four carries one deliberate fault in one argument (a bad
dtype or ndim, a width or length mismatch, NaN or unsortable labels, an unknown option,
a bad number).

Every call must

* raise one of ``ALLOWED_ERRORS`` -- exactly the documented type for a deliberate fault
  or for NaN/inf with ``check_finite=True`` -- or return a result of the documented type,
  shape and dtype.  Any other exception type fails the test; so does an exception from
  valid, finite input;
* leave its inputs unchanged: the same bytes, dtype, shape, strides, flags and memory;
* in the *finite domain*, return finite values that keep cheap invariants (label rules
  and counts of mined triplets, distance ranges, neighbour lists, metric ranges; a batch
  with nothing to learn gives loss 0 and a zero gradient);
* give the same result, bit for bit, on plain C-contiguous native copies of ``x`` and
  ``ref``: views, strides, byte order, alignment, lists and flags are only layouts.

The finite domain (:func:`budget`): every value is finite, and no true intermediate can
overflow the compute dtype -- 16 max‖row‖² (the Gram identity's squared norms; d² ≤ 4
max‖row‖²) stays a decade below the dtype's maximum, the loss (terms x the largest term)
below 1e300, and the gradient (terms x its largest factor: 1/‖x‖ for cosine and for
normalize=True, 4 max‖row‖ for sqeuclidean, the margin for power=2) a decade below the
dtype's maximum.  float32 rows beyond the engine's window compute in float64
(``tripmine._range``), so for them the domain is what float32 can hold: a float32
distance is in it while the true distance is below float32's maximum.  float64 rows
outside the engine's window (squared norms beyond [2^-960, 2^1000]) are rerun at a power of
two that brings them in, so they are in it unless, with a euclidean metric, their norms span
more than the window (about 2^900), where ``FloatingPointError`` is the answer.
Outside the domain (NaN/inf with ``check_finite=False``; results beyond the dtype, e.g.
float32 squared distances above 3.4e38) the call may return or raise an allowed exception
(``FloatingPointError`` where a result overflows), a result must still have the
documented type, shape and dtype, and mined or neighbour indices must be in range.

The default run is bounded (``TRIPMINE_FUZZ_EXAMPLES``, default 100 examples per test,
about 10 s in all on 2 cores) and derandomized, so CI is reproducible.  A long run::

    TRIPMINE_FUZZ_EXAMPLES=20000 TRIPMINE_FUZZ_RANDOM=1 python -m pytest tests/test_fuzz.py

(``TRIPMINE_FUZZ_RANDOM=1`` draws new examples on every run; the number of examples run
is printed after the module; ``--hypothesis-show-statistics`` shows the outcomes.)
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import os
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import tripmine
from tripmine import metrics, sampling

EXAMPLES = int(os.environ.get("TRIPMINE_FUZZ_EXAMPLES", "100"))
RANDOM = os.environ.get("TRIPMINE_FUZZ_RANDOM", "") == "1"
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=not RANDOM, database=None,
                print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                       HealthCheck.data_too_large])

#: The only exception types a public function may raise; anything else is a bug.
ALLOWED_ERRORS = (ValueError, TypeError, MemoryError, OverflowError, FloatingPointError)

#: Examples run to completion per test (printed after the module).
EXAMPLES_RUN: Counter = Counter()


def counted(test: Callable) -> Callable:
    """Count the examples of a fuzz test that ran to the end (not those hypothesis
    abandoned while drawing, nor failing ones)."""

    @functools.wraps(test)
    def run(*args, **kwargs):
        test(*args, **kwargs)
        EXAMPLES_RUN[test.__name__[len("test_fuzz_"):]] += 1

    return run

METRICS = ("euclidean", "sqeuclidean", "cosine")
FLOATS = (np.float16, np.float32, np.float64)
MAX_N = 40
MAX_D = 8


@pytest.fixture(scope="module", autouse=True)
def _report_examples(request):
    yield
    total = sum(EXAMPLES_RUN.values())
    detail = ", ".join(f"{name} {count}" for name, count in sorted(EXAMPLES_RUN.items()))
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is None or capture is None:
        return
    with capture.global_and_fixture_disabled():
        reporter.write_line("")
        reporter.write_line(f"tripmine fuzz: {total} examples run ({detail})")


# ---- calling with a snapshot of the inputs ---------------------------------------------


def _walk(value: Any, arrays: list, lists: list) -> None:
    if isinstance(value, np.ndarray):
        arrays.append(value)
    elif isinstance(value, list):
        lists.append(value)
    elif isinstance(value, tuple):
        for item in value:
            _walk(item, arrays, lists)
    elif isinstance(value, dict):
        for item in value.values():
            _walk(item, arrays, lists)


def _snapshot(value: Any) -> tuple:
    arrays: list = []
    lists: list = []
    _walk(value, arrays, lists)
    return ([(a, a.tobytes(), a.dtype, a.shape, a.strides, a.flags.writeable,
              a.__array_interface__["data"][0]) for a in arrays],
            [(v, repr(v)) for v in lists])


def _assert_unchanged(snapshot: tuple) -> None:
    arrays, lists = snapshot
    for a, data, dtype, shape, strides, writeable, address in arrays:
        assert (a.dtype, a.shape, a.strides) == (dtype, shape, strides), "input reshaped"
        assert a.flags.writeable == writeable, "input's writeable flag changed"
        assert a.__array_interface__["data"][0] == address, "input re-pointed"
        assert a.tobytes() == data, "input modified"
    for value, text in lists:
        assert repr(value) == text, "input list modified"


RAISED = object()


def call(expect: tuple | None, func: Callable, *args, **kwargs) -> Any:
    """``func(*args, **kwargs)``: its result, or RAISED after an allowed exception.

    ``expect``: None -- it must return; a tuple of exception types -- it must raise one
    of them; ``ALLOWED_ERRORS`` -- either.  Exceptions outside ALLOWED_ERRORS propagate
    (and fail the test).  ``_out=`` is passed as ``out=`` and left out of the snapshot.
    """
    out = kwargs.pop("_out", None)
    before = _snapshot((args, kwargs))
    if out is not None:
        kwargs["out"] = out
    try:
        result = func(*args, **kwargs)
    except ALLOWED_ERRORS as exc:
        _assert_unchanged(before)
        if expect is None:
            raise AssertionError(f"valid input raised {type(exc).__name__}: {exc}") from exc
        if not isinstance(exc, expect):
            raise AssertionError(f"expected one of {[e.__name__ for e in expect]}, got "
                                 f"{type(exc).__name__}: {exc}") from exc
        return RAISED
    _assert_unchanged(before)
    if expect is not None and expect is not ALLOWED_ERRORS:
        raise AssertionError(f"expected one of {[e.__name__ for e in expect]}, got a result")
    return result


def _outcome(got: Any, checked: bool = True) -> None:
    """Label the example for --hypothesis-show-statistics."""
    if got is RAISED:
        event("raised an allowed exception")
    elif checked:
        event("returned; finite domain: values checked")
    else:
        event("returned; outside the finite domain: type, shape, dtype checked")


# ---- one fault per example -----------------------------------------------------------------


class Draws:
    """An example's option draws; at most one argument (or the inputs, ``"input"``)
    carries a deliberate fault, whose documented error lands in ``errors``."""

    def __init__(self, data, names: tuple):
        self.data = data
        faulty = data.draw(st.integers(0, 3), label="faulty?") == 3  # shrinks to valid
        self.fault = data.draw(st.sampled_from(names), label="fault") if faulty else None
        self.errors: set = set()

    def __call__(self, name: str, valid, faults: tuple = ()) -> Any:
        if self.fault == name and faults:
            value, error = self.data.draw(st.sampled_from(faults), label=name)
            self.errors.add(error)
            return value
        return self.data.draw(valid, label=name)


METRIC_FAULTS = (("manhattan", ValueError), (None, ValueError), ("", ValueError),
                 ("Euclidean", ValueError))
MARGINS = st.one_of(st.sampled_from([0.0, -0.0, 5e-324, 1e-300, 0.2, 1.0, 1e6, 1e300, 2,
                                     np.float32(0.5), np.float64(1e-3), np.int64(3)]),
                    st.floats(0, 10))
MARGIN_FAULTS = ((-1e-300, ValueError), (-1.0, ValueError), (math.inf, ValueError),
                 (math.nan, ValueError), (True, TypeError), ("0.2", TypeError),
                 (None, TypeError), (1j, TypeError))
SEEDS = st.one_of(st.sampled_from([None, 0, 1, 2**64 - 1, np.uint64(2**64 - 1), np.int64(7)]),
                  st.integers(0, 2**64 - 1))
SEED_FAULTS = ((-1, ValueError), (2**64, ValueError), (True, TypeError), (1.5, TypeError),
               ("1", TypeError))
FLAG_FAULTS = ((1, TypeError), (None, TypeError), ("yes", TypeError))


# ---- embeddings --------------------------------------------------------------------------

VALUE_KINDS = ("gauss", "ints", "zeros", "duplicates", "unit", "tiny", "huge")
LAYOUTS = ("c", "c", "fortran", "rows_strided", "cols_strided", "reversed", "reversed_both",
           "broadcast", "byteswapped", "unaligned", "list")


def _values(kind: str, rng: np.random.Generator, n: int, d: int, dtype) -> np.ndarray:
    info = np.finfo(dtype)
    gauss = rng.standard_normal((n, d))
    if kind == "gauss":
        return gauss * float(rng.choice([1e-3, 1.0, 1e3]))
    if kind == "ints":
        return rng.integers(-2, 3, (n, d)).astype(np.float64)
    if kind == "zeros":
        return np.zeros((n, d))
    if kind == "duplicates":
        return rng.standard_normal((3, d))[rng.integers(0, 3, n)]
    if kind == "unit":
        norms = np.sqrt((gauss ** 2).sum(axis=1, keepdims=True))
        return np.divide(gauss, norms, out=np.zeros_like(gauss), where=norms > 0)
    if kind == "tiny":  # from the denormals up to about sqrt(smallest normal)
        exponent = rng.uniform(math.log10(float(info.smallest_subnormal)),
                               math.log10(float(info.tiny)) / 2 + 2)
    else:  # "huge": from about sqrt(max) up to the maximum
        exponent = rng.uniform(math.log10(float(info.max)) / 2 - 2,
                               math.log10(float(info.max)) - 0.5)
    return np.clip(gauss, -3, 3) * 10.0 ** exponent


def _specials(dtype) -> list:
    info = np.finfo(dtype)
    return [math.nan, math.inf, -math.inf, 0.0, -0.0, float(info.smallest_subnormal),
            -float(info.smallest_subnormal), float(info.tiny), float(info.max),
            -float(info.max)]


def _unaligned(arr: np.ndarray) -> np.ndarray:
    """A C-contiguous copy of ``arr`` at an odd address (NumPy passes it on as it is)."""
    buffer = np.zeros(arr.nbytes + 1, dtype=np.uint8)
    out = buffer[1:].view(arr.dtype).reshape(arr.shape)
    out[...] = arr
    return out


def _lay_out(arr: np.ndarray, layout: str) -> Any:
    """``arr``'s values in another memory layout (gaps of strided views hold NaN)."""
    n, d = arr.shape
    if layout == "fortran":
        return np.asfortranarray(arr)
    if layout == "rows_strided":
        base = np.full((2 * n, d), np.nan, dtype=arr.dtype)
        base[::2] = arr
        return base[::2]
    if layout == "cols_strided":
        base = np.full((n, 2 * d), np.nan, dtype=arr.dtype)
        base[:, ::2] = arr
        return base[:, ::2]
    if layout == "reversed":
        return arr[::-1].copy()[::-1]
    if layout == "reversed_both":
        return arr[::-1, ::-1].copy()[::-1, ::-1]
    if layout == "broadcast":  # zero row stride, read-only: every row is the first
        return np.broadcast_to(arr[:1], arr.shape) if n else arr
    if layout == "byteswapped":
        return arr.astype(arr.dtype.newbyteorder())
    if layout == "unaligned":
        return _unaligned(arr)
    if layout == "list":
        return arr.tolist()
    return arr


@st.composite
def matrices(draw, n: int, d: int, *, unit: bool = False):
    """(what to pass, the array it means) for an n x d float matrix."""
    dtype = draw(st.sampled_from(FLOATS))
    kind = "unit" if unit and draw(st.integers(0, 3)) < 3 else draw(st.sampled_from(VALUE_KINDS))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    values = _values(kind, rng, n, d, dtype)
    if n * d and draw(st.integers(0, 2)) == 2:
        for _ in range(draw(st.integers(1, 3))):
            i, j = draw(st.integers(0, n - 1)), draw(st.integers(0, d - 1))
            values[i, j] = draw(st.sampled_from(_specials(dtype)))
    with np.errstate(all="ignore"):
        arr = values.astype(dtype)
    passed = _lay_out(arr, draw(st.sampled_from(LAYOUTS)))
    if isinstance(passed, np.ndarray) and passed.flags.writeable and draw(st.integers(0, 3)) == 3:
        passed.setflags(write=False)
    return passed, np.asarray(passed)


# ---- labels ------------------------------------------------------------------------------

LABEL_KINDS = ("int64", "int8", "uint64", "str", "bytes", "float", "bool", "object", "list")
LABEL_PATTERNS = ("equal", "distinct", "few", "pairs")
LABEL_FAULTS = ("labels_length", "ref_labels_length", "labels_2d", "labels_nan", "labels_kind",
                "labels_unsortable", "labels_void", "labels_none")


def _codes(pattern: str, n: int, rng: np.random.Generator) -> np.ndarray:
    if pattern == "equal":
        return np.zeros(n, dtype=np.int64)
    if pattern == "distinct":
        return rng.permutation(n).astype(np.int64)
    if pattern == "few":
        return rng.integers(0, int(rng.integers(1, 5)), n)
    return rng.permutation(np.arange(n) // 2).astype(np.int64)


def _encode(codes: np.ndarray, kind: str) -> Any:
    values = [int(c) for c in codes]
    if kind == "int64":
        return codes.astype(np.int64) * 7 - 3
    if kind == "int8":
        return (codes % 120 - 60).astype(np.int8)
    if kind == "uint64":  # straddles 2**63
        return codes.astype(np.uint64) + np.uint64(2**63 - 8)
    if kind == "str":
        return np.array([f"id-{c}-é" for c in values], dtype=str)
    if kind == "bytes":
        return np.array([f"id{c}".encode() for c in values], dtype=bytes)
    if kind == "float":
        return np.where(codes == 1, np.inf, codes * 0.5 - 1.0)
    if kind == "bool":
        return codes % 2 == 0
    if kind == "object":
        return np.array(values, dtype=object)
    return values


def _same(labels: Any, ref_labels: Any) -> np.ndarray:
    """(n, m) label equality, by NumPy's comparison of the values."""
    a, b = np.asarray(labels), np.asarray(ref_labels)
    return np.asarray(a[:, None] == b[None, :], dtype=bool).reshape(len(a), len(b))


@dataclass
class Labels:
    labels: Any
    ref_labels: Any
    errors: set  # what validating them must raise (one of); empty if they are valid
    same: np.ndarray | None  # (n, m) label equality when valid
    fault: str | None = None

    def standalone(self) -> Labels:
        """These labels where no x or ref fixes their lengths (masks, PKSampler)."""
        if self.fault not in ("labels_length", "ref_labels_length"):
            return self
        other = self.labels if self.ref_labels is None else self.ref_labels
        return Labels(self.labels, self.ref_labels, set(), _same(self.labels, other))


@st.composite
def label_pairs(draw, n: int, m: int | None, *, faulty: bool = False):
    """labels for n rows (and ref_labels for m, unless m is None); one fault if faulty."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    kind = draw(st.sampled_from(LABEL_KINDS))
    codes = _codes(draw(st.sampled_from(LABEL_PATTERNS)), n, rng)
    ref_codes = None if m is None else _codes(draw(st.sampled_from(LABEL_PATTERNS)), m, rng)
    lab = _encode(codes, kind)
    ref_lab = None if m is None else _encode(ref_codes, kind)
    if kind == "int64" and draw(st.booleans()):  # int64 codes are passed on as they are
        lab = _unaligned(lab)
    fault = draw(st.sampled_from(LABEL_FAULTS)) if faulty else None
    error = None
    if fault == "labels_length":
        lab, error = _encode(np.arange(n + 1) % 3, kind), ValueError
    elif fault == "ref_labels_length" and m is not None:
        ref_lab, error = _encode(np.arange(m + 1) % 3, kind), ValueError
    elif fault == "labels_2d":
        lab, error = np.asarray(lab).reshape(-1, 1), ValueError
    elif fault == "labels_nan" and n:
        lab = np.where(np.arange(n) == n - 1, np.nan, codes.astype(np.float64))
        ref_lab = None if m is None else ref_codes.astype(np.float64)
        error = ValueError
    elif fault == "labels_kind" and m is not None:
        lab, ref_lab, error = _encode(codes, "str"), _encode(ref_codes, "int64"), TypeError
    elif fault == "labels_unsortable" and n >= 2:
        lab = np.array([1, "a"] + [2] * (n - 2), dtype=object)
        ref_lab = None if m is None else np.array([1] * m, dtype=object)
        error = TypeError
    elif fault == "labels_void":
        lab, error = np.zeros(n, dtype=[("a", np.int64)]), TypeError
    elif fault == "labels_none":
        lab, error = None, ValueError
    if error is not None:
        return Labels(lab, ref_lab, {error}, None, fault)
    return Labels(lab, ref_lab, set(), _same(lab, lab if ref_lab is None else ref_lab))


# ---- one problem: embeddings and labels ----------------------------------------------------

EMBEDDING_FAULTS = ("x_int", "x_complex", "x_bool", "x_1d", "x_3d", "x_scalar", "ref_width",
                    "ref_object")


@dataclass
class Problem:
    x: Any
    ref: Any
    labels: Any
    ref_labels: Any
    check_finite: bool
    input_errors: set  # from the embeddings: the call must raise one of them
    label_errors: set  # from the labels, for the functions that read labels
    x_arr: np.ndarray  # what x means (an array, even for a list)
    ref_arr: np.ndarray | None  # None in self mode
    same: np.ndarray | None  # (n, m) label equality, None without valid labels
    unpaired: bool = False  # ref without ref_labels or the reverse: a ValueError

    @property
    def errors(self) -> set:
        return self.input_errors | self.label_errors | ({ValueError} if self.unpaired else set())

    @property
    def self_mode(self) -> bool:
        return self.ref_arr is None

    @property
    def n(self) -> int:
        return self.x_arr.shape[0]

    @property
    def m(self) -> int:
        return self.n if self.ref_arr is None else self.ref_arr.shape[0]

    @property
    def arrays(self) -> list:
        return [a for a in (self.x_arr, self.ref_arr) if a is not None]

    @property
    def dtype(self) -> np.dtype:
        """The documented compute dtype: float64 if either input is, else float32."""
        wide = any(a.dtype.kind == "f" and a.dtype.itemsize == 8 for a in self.arrays)
        return np.dtype(np.float64 if wide else np.float32)

    @property
    def finite(self) -> bool:
        return all(np.isfinite(a).all() for a in self.arrays)

    def masks(self) -> tuple[np.ndarray, np.ndarray]:
        pos = self.same.copy()
        if self.self_mode:
            np.fill_diagonal(pos, False)
        return pos, ~self.same

    def counts(self) -> dict:
        """Label-determined counts of pairs and triplets."""
        pos, neg = self.masks()
        npos, nneg = pos.sum(axis=1), neg.sum(axis=1)
        return {
            "batch_hard": int(((npos > 0) & (nneg > 0)).sum()),
            "pairs_with_negative": int((npos * (nneg > 0)).sum()),
            "batch_all": int((npos * nneg).sum()),
            "positive_pairs": int(pos.sum()),
            "negative_pairs": int(neg.sum()),
        }

    def kwargs(self) -> dict:
        return dict(ref=self.ref, ref_labels=self.ref_labels, check_finite=self.check_finite)


SIZES = st.one_of(st.sampled_from([0, 1, 2, 3]), st.integers(0, MAX_N))
DIMS = st.one_of(st.sampled_from([0, 1, 2]), st.integers(0, MAX_D))


@st.composite
def problems(draw, *, labels: bool = True, unit: bool = False, faulty: bool = False):
    n, d = draw(SIZES), draw(DIMS)
    use_ref = draw(st.booleans())
    m = draw(SIZES) if use_ref else n
    x, x_arr = draw(matrices(n, d, unit=unit))
    ref, ref_arr = draw(matrices(m, d, unit=unit)) if use_ref else (None, None)
    label_fault = faulty and labels and draw(st.booleans())
    lab = (draw(label_pairs(n, m if use_ref else None, faulty=label_fault)) if labels
           else Labels(None, None, set(), None))
    problem = Problem(x, ref, lab.labels, lab.ref_labels, draw(st.booleans()), set(),
                      lab.errors, x_arr, ref_arr, lab.same)
    fault = None
    if faulty and not label_fault:
        fault = draw(st.sampled_from(EMBEDDING_FAULTS + ("ref_unpaired",) * labels))
    if fault == "x_int":
        with np.errstate(invalid="ignore"):
            problem.x, problem.input_errors = x_arr.astype(np.int32), {TypeError}
    elif fault == "x_complex":
        with np.errstate(all="ignore"):
            problem.x, problem.input_errors = x_arr.astype(np.complex64), {TypeError}
    elif fault == "x_bool":
        problem.x, problem.input_errors = np.asarray(x_arr) > 0, {TypeError}
    elif fault == "x_1d":
        problem.x, problem.input_errors = x_arr.reshape(-1), {ValueError}
    elif fault == "x_3d":
        problem.x, problem.input_errors = x_arr[None], {ValueError}
    elif fault == "x_scalar":
        problem.x, problem.input_errors = 1.5, {ValueError}
    elif fault == "ref_width" and use_ref:
        problem.ref, problem.input_errors = np.zeros((m, d + 1)), {ValueError}
    elif fault == "ref_object" and use_ref:
        problem.ref, problem.input_errors = ref_arr.astype(object), {TypeError}
    elif fault == "ref_unpaired" and use_ref:  # ref without ref_labels, or the reverse
        if draw(st.booleans()):
            problem.ref_labels = None
        else:
            problem.ref = problem.ref_arr = None
        problem.unpaired = True
    if not all(a.ndim == 2 for a in problem.arrays):  # a list of no rows is 1-D
        problem.input_errors.add(ValueError)
    elif problem.check_finite and not problem.finite:
        problem.input_errors.add(ValueError)
    if problem.errors:
        problem.same = None
    return problem


# ---- the finite domain ----------------------------------------------------------------------


def _log_norms(a: np.ndarray) -> np.ndarray:
    """log10 of the rows' L2 norms, overflow- and underflow-free; -inf for zero rows."""
    a = np.abs(a.astype(np.float64))
    if a.shape[1] == 0:
        return np.full(a.shape[0], -np.inf)
    top = a.max(axis=1)
    safe = np.where(top > 0, top, 1.0)
    with np.errstate(all="ignore"):
        squares = ((a / safe[:, None]) ** 2).sum(axis=1)
        return np.where(top > 0, np.log10(safe) + 0.5 * np.log10(np.maximum(squares, 1.0)),
                        -np.inf)


def _log_sum(*logs: float) -> float:
    """log10 of a sum of terms given by their log10 (an upper bound: 2 x the largest)."""
    top = max(logs)
    return top + math.log10(2) if top > -math.inf else -math.inf


@dataclass
class Budget:
    values: bool  # distances, mined triplets, neighbour lists: finite and invariant
    loss: bool  # the loss value is finite
    grad: bool  # the gradients are finite


NO_BUDGET = Budget(False, False, False)


def budget(problem: Problem, *, metric: str = "euclidean", normalize: bool = False,
           margin: float = 0.0, power: int = 1, terms: int = 1) -> Budget:
    """Which results must be finite (the module docstring's finite domain)."""
    if problem.input_errors or not problem.finite:
        return NO_BUDGET
    info = np.finfo(problem.dtype)
    top = math.log10(float(info.max))
    logs = np.concatenate([_log_norms(a.astype(problem.dtype)) for a in problem.arrays])
    nonzero = logs[logs > -np.inf]
    raw_hi = float(nonzero.max()) if nonzero.size else -math.inf
    raw_lo = float(nonzero.min()) if nonzero.size else math.inf
    hi = 0.0 if normalize and nonzero.size else raw_hi  # normalised rows are unit rows
    lo = 0.0 if normalize and nonzero.size else raw_lo
    log_d = {"euclidean": math.log10(2) + hi, "sqeuclidean": 2 * (math.log10(2) + hi),
             "cosine": math.log10(2)}[metric]
    # float32 rows outside the engine's window compute in float64 (tripmine._range), so a
    # float32 distance is finite wherever float32 holds it.  float64 rows outside the window
    # are rerun at a power of two that brings them all in (the cosine metric: each row its
    # own): in the domain unless their norms span more than the window (about 2^920,
    # less sqrt(d) for the norm of a row against its largest entry), which no one power
    # brings in (FloatingPointError).
    log_dim = math.log10(max(problem.arrays[0].shape[1], 1))
    window64 = problem.dtype != np.float64 or metric == "cosine" or normalize or \
        raw_hi - raw_lo + log_dim < 900 * math.log10(2)
    values = window64 and log_d < top - 1
    log_term = _log_sum(log_d, math.log10(margin) if margin > 0 else -math.inf)
    log_terms = math.log10(terms + 1)
    # The loss comes back as a Python float, but must fit the dtype the call computes in.
    loss = values and log_terms + power * log_term < min(300, top - 1)
    log_dd = {"euclidean": 0.0, "sqeuclidean": math.log10(4) + hi,
              "cosine": math.log10(4) - lo}[metric]
    log_grad = log_terms + math.log10(power) + log_dd
    if power > 1:
        log_grad += (power - 1) * log_term
    if normalize:
        log_grad += math.log10(4) - raw_lo
    grad = loss and log_grad < top - 1
    return Budget(values, loss, grad)


def expectation(problem: Problem, errors: set, scale: Budget) -> tuple | None:
    """What ``call`` expects: one of the errors of a fault; else, outside the finite
    domain, any allowed outcome; else a result."""
    if errors:
        return tuple(sorted(errors, key=lambda e: e.__name__))
    if not (scale.values and scale.loss and scale.grad):
        return ALLOWED_ERRORS  # a result beyond the dtype: FloatingPointError, or finite
    return None


# ---- checks of results ---------------------------------------------------------------------


def _check_array(got: Any, shape: tuple, dtype) -> None:
    assert isinstance(got, np.ndarray), type(got)
    assert got.shape == shape, (got.shape, shape)
    assert got.dtype == np.dtype(dtype), (got.dtype, dtype)


def _no_alias(results: list, problem: Problem) -> None:
    inputs = [a for a in (problem.x, problem.ref) if isinstance(a, np.ndarray)]
    for r in results:
        for a in inputs:
            assert not np.may_share_memory(r, a), "a result shares memory with an input"


def _check_triplets(t: Any, problem: Problem | None) -> None:
    """Mined triplets: int64 columns, indices in range, anchor order, label rules
    (``problem=None``: the type only)."""
    assert isinstance(t, tripmine.Triplets), type(t)
    for column in t:
        assert isinstance(column, np.ndarray) and column.dtype == np.int64 and column.ndim == 1
    a, p, n = t
    assert len(a) == len(p) == len(n)
    if problem is None:
        return
    if len(a):
        assert 0 <= a.min() and a.max() < problem.n, "anchor index out of range"
        for column in (p, n):
            assert 0 <= column.min() and column.max() < problem.m, "index out of range"
        assert np.all(np.diff(a) >= 0), "triplets not in anchor order"
    if problem.same is not None:
        assert problem.same[a, p].all(), "a positive of another label"
        assert not problem.same[a, n].any(), "a negative of the anchor's label"
        if problem.self_mode:
            assert np.all(a != p), "an anchor is its own positive"


def _check_loss_result(got: Any, problem: Problem, want_grad: bool) -> None:
    if want_grad:
        _check_array(got.grad, (problem.n, problem.x_arr.shape[1]), problem.dtype)
        if problem.self_mode:
            assert got.ref_grad is None
        else:
            _check_array(got.ref_grad, problem.ref_arr.shape, problem.dtype)
        _no_alias([g for g in (got.grad, got.ref_grad) if g is not None], problem)
    else:
        assert got.grad is None and got.ref_grad is None
    total = (got.n_pairs if isinstance(got, tripmine.ContrastiveLossResult) else
             got.n_terms if isinstance(got, tripmine.LiftedStructuredLossResult) else
             got.n_triplets)
    for count in (total, got.n_active):
        assert isinstance(count, int) and count >= 0
    assert got.n_active <= total
    assert got.fraction_active == (got.n_active / total if total else 0.0)


def _check_finite_loss(got: Any, scale: Budget, want_grad: bool, total: int) -> None:
    """Finite loss and gradients in the finite domain; and (README) a batch with nothing
    to learn gives loss 0 and a zero gradient, whatever the magnitudes."""
    if scale.values and total == 0:
        assert np.all(np.asarray(got.loss) == 0) and got.n_active == 0
        for g in (got.grad, got.ref_grad) if want_grad else ():
            assert g is None or not np.any(g), "a nonzero gradient without any term"
    if scale.loss:
        assert np.all(np.isfinite(got.loss)), "non-finite loss from finite input"
        assert np.all(np.asarray(got.loss) >= 0)
    if scale.grad and want_grad:
        for g in (got.grad, got.ref_grad):
            assert g is None or np.all(np.isfinite(g)), "non-finite gradient from finite input"


def _plain(a: np.ndarray | None) -> np.ndarray | None:
    """A C-contiguous, aligned, native-order, writeable copy."""
    return None if a is None else np.array(a, dtype=a.dtype.newbyteorder("="), order="C")


def _assert_same(a: Any, b: Any, where: str = "result") -> None:
    """Bit-for-bit equal results (NaN equal to NaN)."""
    if isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and (a.dtype, a.shape) == (b.dtype, b.shape), where
        assert np.array_equal(a, b, equal_nan=a.dtype.kind in "fc"), (
            f"{where} depends on the input's memory layout")
    elif dataclasses.is_dataclass(a):
        for field in dataclasses.fields(a):
            _assert_same(getattr(a, field.name), getattr(b, field.name), field.name)
    elif isinstance(a, (tuple, list)):
        assert isinstance(b, (tuple, list)) and len(a) == len(b), where
        for x, y in zip(a, b):
            _assert_same(x, y, where)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for key in a:
            _assert_same(a[key], b[key], f"{where}[{key}]")
    elif isinstance(a, float):
        assert a == b or (math.isnan(a) and math.isnan(b)), (where, a, b)
    else:
        assert a == b, (where, a, b)


def _assert_layout_free(got: Any, problem: Problem, run: Callable) -> None:
    """``run(x, ref)`` on plain copies of x and ref gives ``got`` again, bit for bit:
    views, strides, byte order, alignment, lists and read-only flags are only layouts."""
    _assert_same(got, run(_plain(problem.x_arr), _plain(problem.ref_arr)))


# ---- distances and masks -------------------------------------------------------------------


@st.composite
def out_buffers(draw, problem: Problem, faulty: bool):
    """(out, error or None) for pairwise_distances."""
    shape, dtype = (problem.n, problem.m), problem.dtype
    if not faulty:
        return draw(st.sampled_from([None, np.full(shape, -7.0, dtype=dtype)])), None
    choice = draw(st.sampled_from(["shape", "dtype", "strided", "readonly", "list"]))
    if choice == "strided" and problem.n * problem.m < 2:
        choice = "shape"  # an empty or one-element view is contiguous
    if choice == "shape":
        return np.zeros((problem.n + 1, problem.m), dtype=dtype), ValueError
    if choice == "dtype":
        return np.zeros(shape, dtype=np.float32 if dtype == np.float64 else np.float64), ValueError
    if choice == "strided":
        return np.zeros((problem.n, 2 * problem.m), dtype=dtype)[:, ::2], ValueError
    if choice == "readonly":
        out = np.zeros(shape, dtype=dtype)
        out.setflags(write=False)
        return out, ValueError
    return np.zeros(shape, dtype=dtype).tolist(), ValueError


@FUZZ
@given(st.data())
@counted
def test_fuzz_pairwise_distances(data):
    draws = Draws(data, ("input", "metric", "out"))
    problem = data.draw(problems(labels=False, faulty=draws.fault == "input"))
    metric = draws("metric", st.sampled_from(METRICS), METRIC_FAULTS)
    out, out_error = data.draw(out_buffers(problem, draws.fault == "out"))
    errors = problem.errors | draws.errors | ({out_error} if out_error else set())
    scale = NO_BUDGET if errors else budget(problem, metric=metric)
    out_before = None if out is None else np.array(out, copy=True)
    got = call(expectation(problem, errors, scale), tripmine.pairwise_distances, problem.x,
               problem.ref, metric=metric, check_finite=problem.check_finite, _out=out)
    _outcome(got, scale.values)
    if got is RAISED:
        if out_before is not None:
            assert np.array_equal(np.asarray(out), out_before, equal_nan=True), (
                "a refused out was written")
        return
    _check_array(got, (problem.n, problem.m), problem.dtype)
    assert out is None or got is out
    _no_alias([got], problem)
    _assert_layout_free(got, problem, lambda x, ref: tripmine.pairwise_distances(
        x, ref, metric=metric, check_finite=problem.check_finite))
    if scale.values:
        assert np.all(np.isfinite(got)), "non-finite distance from finite input"
        assert np.all(got >= 0)
        if metric == "cosine":
            assert np.all(got <= 2)
        if problem.self_mode:
            assert np.all(np.diag(got) == 0) and np.array_equal(got, got.T)


@FUZZ
@given(st.data())
@counted
def test_fuzz_masks(data):
    n = data.draw(SIZES)
    m = data.draw(st.one_of(st.none(), SIZES))
    lab = data.draw(label_pairs(n, m, faulty=data.draw(st.integers(0, 3)) == 3)).standalone()
    expect = tuple(lab.errors) or None
    pos_want = neg_want = None
    if lab.same is not None:
        pos_want, neg_want = lab.same.copy(), ~lab.same
        if lab.ref_labels is None:
            np.fill_diagonal(pos_want, False)
    for func, want in ((tripmine.positive_mask, pos_want), (tripmine.negative_mask, neg_want)):
        got = call(expect, func, lab.labels, lab.ref_labels)
        _outcome(got)
        if got is not RAISED:
            _check_array(got, want.shape, bool)
            assert np.array_equal(got, want)
    if lab.ref_labels is not None:
        return
    got = call(expect, tripmine.triplet_mask, lab.labels)
    if got is not RAISED:
        n = pos_want.shape[0]
        _check_array(got, (n, n, n), bool)
        assert np.array_equal(got, pos_want[:, :, None] & neg_want[:, None, :])


def test_triplet_mask_refuses_large_batches_cleanly():
    labels = np.zeros(tripmine.TRIPLET_MASK_MAX_N + 1, dtype=np.int64)
    assert call((ValueError,), tripmine.triplet_mask, labels) is RAISED


# ---- miners ---------------------------------------------------------------------------------


@FUZZ
@given(st.data())
@counted
def test_fuzz_batch_hard(data):
    draws = Draws(data, ("input", "metric", "normalize"))
    problem = data.draw(problems(faulty=draws.fault == "input"))
    metric = draws("metric", st.sampled_from(METRICS), METRIC_FAULTS)
    normalize = draws("normalize", st.booleans(), FLAG_FAULTS)
    errors = problem.errors | draws.errors
    scale = NO_BUDGET if errors else budget(problem, metric=metric, normalize=normalize)
    got = call(expectation(problem, errors, scale), tripmine.batch_hard, problem.x,
               problem.labels, metric=metric, normalize=normalize, **problem.kwargs())
    _outcome(got, scale.values)
    if got is RAISED:
        return
    _check_triplets(got, problem)
    _assert_layout_free(got, problem, lambda x, ref: tripmine.batch_hard(
        x, problem.labels, metric=metric, normalize=normalize,
        **{**problem.kwargs(), "ref": ref}))
    if scale.values:
        assert len(got.anchor) == problem.counts()["batch_hard"]
        assert np.array_equal(got.anchor, np.unique(got.anchor))


@FUZZ
@given(st.data())
@counted
def test_fuzz_semi_hard(data):
    draws = Draws(data, ("input", "metric", "margin", "select", "seed", "max_triplets",
                         "normalize"))
    problem = data.draw(problems(faulty=draws.fault == "input"))
    metric = draws("metric", st.sampled_from(METRICS), METRIC_FAULTS)
    margin = draws("margin", MARGINS, MARGIN_FAULTS)
    select = draws("select", st.sampled_from(["closest", "random", "all"]),
                   (("hardest", ValueError), (None, ValueError)))
    seed = draws("seed", SEEDS, SEED_FAULTS)
    max_triplets = draws("max_triplets",
                         st.one_of(st.none(), st.sampled_from([0, 1, 5, 10**9, np.int64(3)])),
                         ((-1, ValueError), (True, TypeError), (2.0, TypeError),
                          ("3", TypeError)))
    normalize = draws("normalize", st.booleans(), FLAG_FAULTS)
    errors = problem.errors | draws.errors
    scale = NO_BUDGET if errors else budget(problem, metric=metric, normalize=normalize,
                                            margin=float(margin))
    got = call(expectation(problem, errors, scale), tripmine.semi_hard, problem.x,
               problem.labels, margin=margin, select=select, seed=seed,
               max_triplets=max_triplets, metric=metric, normalize=normalize,
               **problem.kwargs())
    _outcome(got, scale.values)
    if got is RAISED:
        return
    _check_triplets(got, problem)
    if seed is not None:
        _assert_layout_free(got, problem, lambda x, ref: tripmine.semi_hard(
            x, problem.labels, margin=margin, select=select, seed=seed,
            max_triplets=max_triplets, metric=metric, normalize=normalize,
            **{**problem.kwargs(), "ref": ref}))
    if max_triplets is not None:
        assert len(got.anchor) <= max_triplets
    if scale.values:
        counts = problem.counts()
        limit = counts["batch_all" if select == "all" else "pairs_with_negative"]
        assert len(got.anchor) <= limit
        if select == "closest":  # one triplet per positive pair that has a negative
            want = limit if max_triplets is None else min(limit, int(max_triplets))
            assert len(got.anchor) == want
        if select == "all":
            assert len(set(zip(*(c.tolist() for c in got)))) == len(got.anchor)


def _unit_norm_error(problem: Problem, normalize: Any) -> tuple[bool, bool]:
    """distance_weighted's unit-norm rule without normalize: (must raise, may raise)."""
    if normalize is not False or problem.errors:
        return False, False
    worst = 0.0
    unknown = False  # a NaN or overflowing norm: the check may or may not fire
    for a in problem.arrays:
        if a.size == 0:
            continue
        rows = a.astype(problem.dtype)
        with np.errstate(all="ignore"):
            norms = np.sqrt(np.einsum("ij,ij->i", rows, rows, dtype=np.float64))
        if np.isfinite(norms).all():
            worst = max(worst, float(np.max(np.abs(norms - 1.0))))
        else:
            unknown = True
    return worst > 1.01e-3, worst > 0.99e-3 or unknown


CUTOFFS = st.sampled_from([0.5, 1.4, 5e-324, 1e-300, 1e-3, 1.0, 2.0, 2.5, 1e300, 3])
CUTOFF_FAULTS = ((0.0, ValueError), (-0.5, ValueError), (math.inf, ValueError),
                 (math.nan, ValueError), (True, TypeError), (None, TypeError))


@FUZZ
@given(st.data())
@counted
def test_fuzz_distance_weighted(data):
    draws = Draws(data, ("input", "metric", "cutoff", "nonzero_loss_cutoff", "seed",
                         "normalize"))
    problem = data.draw(problems(unit=True, faulty=draws.fault == "input"))
    metric = draws("metric", st.just("euclidean"), (("cosine", ValueError),
                                                    ("sqeuclidean", ValueError),
                                                    ("manhattan", ValueError)))
    cutoff = draws("cutoff", CUTOFFS, CUTOFF_FAULTS)
    nonzero = draws("nonzero_loss_cutoff", CUTOFFS, CUTOFF_FAULTS)
    seed = draws("seed", SEEDS, SEED_FAULTS)
    normalize = draws("normalize", st.booleans(), FLAG_FAULTS)
    errors = problem.errors | draws.errors
    must, may = _unit_norm_error(problem, normalize)
    if must or (may and errors):  # the unit-norm check may come before the planted fault
        errors.add(ValueError)
    scale = NO_BUDGET if errors else budget(problem, normalize=normalize)
    expect = expectation(problem, errors, scale)
    if expect is None and may:
        expect = ALLOWED_ERRORS
    got = call(expect, tripmine.distance_weighted, problem.x, problem.labels, cutoff=cutoff,
               nonzero_loss_cutoff=nonzero, seed=seed, metric=metric, normalize=normalize,
               **problem.kwargs())
    _outcome(got, scale.values)
    if got is RAISED:
        return
    _check_triplets(got, problem)
    if seed is not None:
        _assert_layout_free(got, problem, lambda x, ref: tripmine.distance_weighted(
            x, problem.labels, cutoff=cutoff, nonzero_loss_cutoff=nonzero, seed=seed,
            metric=metric, normalize=normalize, **{**problem.kwargs(), "ref": ref}))
    if scale.values:
        assert len(got.anchor) <= problem.counts()["pairs_with_negative"]


# ---- losses ---------------------------------------------------------------------------------


@st.composite
def user_triplets(draw, n: int, m: int, faulty: bool):
    """(a Triplets-like value, error or None) indexing n anchors and m references."""
    size = draw(st.integers(0, 30)) if n and m else 0
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    columns = [rng.integers(0, max(n, 1), size), rng.integers(0, max(m, 1), size),
               rng.integers(0, max(m, 1), size)]
    dtype = draw(st.sampled_from([np.int64, np.int32, np.uint16, np.intp]))
    columns = [c.astype(dtype) for c in columns]
    fault = draw(st.sampled_from(["range", "negative", "float", "lengths", "2d", "pair",
                                  "none", "string"])) if faulty else None
    if fault == "range":
        columns[2] = np.concatenate([columns[2][1:], [m]]).astype(np.int64)
    elif fault == "negative":
        columns[0] = np.concatenate([[-1], columns[0][1:]]).astype(np.int64)
    elif fault == "float":
        columns[1] = columns[1].astype(np.float64) + 0.5
    elif fault == "lengths":
        columns[1] = np.concatenate([columns[1], [0]]).astype(dtype)
    elif fault == "2d":
        columns[0] = columns[0].reshape(-1, 1)
    elif fault == "pair":
        return (columns[0], columns[1]), ValueError
    elif fault == "none":
        return None, ValueError
    elif fault == "string":
        return "hardest", ValueError
    error = ValueError if fault else None
    if fault == "float" and size == 0:
        error = None  # an empty float column holds no non-integer index
    layout = draw(st.sampled_from(["triplets", "tuple", "list", "reversed"]))
    if fault == "2d":
        layout = "triplets"  # a list of no rows would lose the second dimension
    if layout == "reversed":
        columns = [c[::-1].copy()[::-1] for c in columns]
    if layout == "tuple":
        return tuple(columns), error
    if layout == "list":
        return [c.tolist() for c in columns], error
    return tripmine.Triplets(*columns), error


MINING_RULES = ("batch_hard", "batch_all", "semi_hard", "distance_weighted", "triplets")
TRIPLET_COUNT = {"batch_hard": "batch_hard", "batch_all": "batch_all",
                 "semi_hard": "pairs_with_negative"}


@FUZZ
@given(st.data())
@counted
def test_fuzz_triplet_loss(data):
    rule = data.draw(st.sampled_from(MINING_RULES), label="rule")
    draws = Draws(data, ("input", "mining", "metric", "margin", "soft", "normalize",
                         "reduction", "grad", "seed"))
    problem = data.draw(problems(unit=rule == "distance_weighted",
                                 faulty=draws.fault == "input"))
    metrics_here = ("euclidean",) if rule == "distance_weighted" else METRICS
    metric = draws("metric", st.sampled_from(metrics_here), METRIC_FAULTS)
    margin = draws("margin", MARGINS, MARGIN_FAULTS)
    soft = draws("soft", st.booleans(), FLAG_FAULTS)
    normalize = draws("normalize", st.booleans(), FLAG_FAULTS)
    want_grad = draws("grad", st.booleans(), FLAG_FAULTS)
    reduction = draws("reduction", st.sampled_from(["auto", "mean", "sum", "mean_nonzero",
                                                    "none"]),
                      (("avg", ValueError), (None, ValueError)))
    seed = draws("seed", SEEDS, SEED_FAULTS if rule == "distance_weighted" else ())
    errors = set(draws.errors)
    labels, mining = problem.labels, rule
    if rule == "triplets":  # labels are not read: only the embeddings' errors apply
        errors |= problem.input_errors
        mining, error = data.draw(user_triplets(problem.n, problem.m, draws.fault == "mining"))
        errors |= {error} if error else set()
        if data.draw(st.booleans()):
            labels = None
    else:
        errors |= problem.errors
        if draws.fault == "mining":
            mining = data.draw(st.sampled_from(["hardest", "batch-hard", 5, None, (1, 2)]))
            errors.add(ValueError)
    may_raise = False
    if rule == "distance_weighted":
        must, may_raise = _unit_norm_error(problem, normalize)
        if must or (may_raise and errors):  # it may come before the planted fault
            errors.add(ValueError)
    scale = NO_BUDGET if errors else budget(problem, metric=metric, normalize=normalize,
                                            margin=float(margin),
                                            terms=(problem.n + problem.m) ** 3)
    expect = expectation(problem, errors, scale) or (ALLOWED_ERRORS if may_raise else None)
    got = call(expect, tripmine.triplet_loss, problem.x, labels, mining=mining, margin=margin,
               soft=soft, metric=metric, normalize=normalize, reduction=reduction, seed=seed,
               grad=want_grad, **problem.kwargs())
    _outcome(got, scale.values)
    if got is RAISED:
        return
    assert isinstance(got, tripmine.TripletLossResult)
    _check_loss_result(got, problem, want_grad)
    _assert_layout_free(got, problem, lambda x, ref: tripmine.triplet_loss(
        x, labels, mining=mining, margin=margin, soft=soft, metric=metric, normalize=normalize,
        reduction=reduction, seed=seed if got.seed is None else got.seed, grad=want_grad,
        **{**problem.kwargs(), "ref": ref}))
    if rule == "batch_all":
        assert got.triplets is None
    else:
        _check_triplets(got.triplets, problem if rule != "triplets" else None)
        assert len(got.triplets.anchor) == got.n_triplets
    assert (got.seed is not None) == (rule == "distance_weighted")
    if reduction == "none":
        size = problem.n if rule == "batch_all" else got.n_triplets
        _check_array(got.loss, (size,), np.float64)
    else:
        assert isinstance(got.loss, float)
    if scale.values and rule in TRIPLET_COUNT:
        assert got.n_triplets == problem.counts()[TRIPLET_COUNT[rule]]
    _check_finite_loss(got, scale, want_grad, got.n_triplets)


@FUZZ
@given(st.data())
@counted
def test_fuzz_contrastive_loss(data):
    draws = Draws(data, ("input", "metric", "pos_margin", "neg_margin", "power", "reduction",
                         "normalize", "grad"))
    problem = data.draw(problems(faulty=draws.fault == "input"))
    metric = draws("metric", st.sampled_from(METRICS), METRIC_FAULTS)
    pos_margin = draws("pos_margin", MARGINS, MARGIN_FAULTS)
    neg_margin = draws("neg_margin", MARGINS, MARGIN_FAULTS)
    power = draws("power", st.sampled_from([1, 2, np.int64(2), 1.0]),
                  ((0, ValueError), (3, ValueError), (1.5, ValueError), (True, ValueError),
                   ("2", ValueError), (None, ValueError)))
    reduction = draws("reduction", st.sampled_from(["mean", "sum", "mean_nonzero", "none"]),
                      (("auto", ValueError), (None, ValueError)))
    normalize = draws("normalize", st.booleans(), FLAG_FAULTS)
    want_grad = draws("grad", st.booleans(), FLAG_FAULTS)
    errors = problem.errors | draws.errors
    scale = NO_BUDGET if errors else budget(
        problem, metric=metric, normalize=normalize,
        margin=max(float(pos_margin), float(neg_margin)), power=int(power),
        terms=(problem.n + problem.m) ** 2)
    got = call(expectation(problem, errors, scale), tripmine.contrastive_loss, problem.x,
               problem.labels, pos_margin=pos_margin, neg_margin=neg_margin, power=power,
               metric=metric, normalize=normalize, reduction=reduction, grad=want_grad,
               **problem.kwargs())
    _outcome(got, scale.values)
    if got is RAISED:
        return
    assert isinstance(got, tripmine.ContrastiveLossResult)
    _check_loss_result(got, problem, want_grad)
    _assert_layout_free(got, problem, lambda x, ref: tripmine.contrastive_loss(
        x, problem.labels, pos_margin=pos_margin, neg_margin=neg_margin, power=power,
        metric=metric, normalize=normalize, reduction=reduction, grad=want_grad,
        **{**problem.kwargs(), "ref": ref}))
    assert got.n_pairs == got.n_positive_pairs + got.n_negative_pairs
    if reduction == "none":
        _check_array(got.loss, (problem.n,), np.float64)
    else:
        assert isinstance(got.loss, float)
    if scale.values:
        counts = problem.counts()
        assert got.n_positive_pairs == counts["positive_pairs"]
        assert got.n_negative_pairs == counts["negative_pairs"]
    _check_finite_loss(got, scale, want_grad, got.n_pairs)


@FUZZ
@given(st.data())
@counted
def test_fuzz_lifted_structured_loss(data):
    draws = Draws(data, ("input", "metric", "pos_margin", "neg_margin", "generalized",
                         "reduction", "normalize", "grad"))
    problem = data.draw(problems(faulty=draws.fault == "input"))
    metric = draws("metric", st.sampled_from(METRICS), METRIC_FAULTS)
    pos_margin = draws("pos_margin", MARGINS, MARGIN_FAULTS)
    neg_margin = draws("neg_margin", MARGINS, MARGIN_FAULTS)
    generalized = draws("generalized", st.booleans(), FLAG_FAULTS)
    reduction = draws("reduction", st.sampled_from(["mean", "sum", "mean_nonzero", "none"]),
                      (("auto", ValueError), (None, ValueError)))
    normalize = draws("normalize", st.booleans(), FLAG_FAULTS)
    want_grad = draws("grad", st.booleans(), FLAG_FAULTS)
    errors = problem.errors | draws.errors
    # Song's term is max(0, J)^2 / 2 with J ~ the margins plus a distance (power 2); the
    # log-sum-exps are shifted by their largest term, so they add no range of their own.
    scale = NO_BUDGET if errors else budget(
        problem, metric=metric, normalize=normalize,
        margin=float(pos_margin) + float(neg_margin) + math.log(problem.n + problem.m + 1),
        power=1 if generalized is True else 2, terms=(problem.n + problem.m) ** 2)
    got = call(expectation(problem, errors, scale), tripmine.lifted_structured_loss, problem.x,
               problem.labels, pos_margin=pos_margin, neg_margin=neg_margin,
               generalized=generalized, metric=metric, normalize=normalize,
               reduction=reduction, grad=want_grad, **problem.kwargs())
    _outcome(got, scale.values)
    if got is RAISED:
        return
    assert isinstance(got, tripmine.LiftedStructuredLossResult)
    _check_loss_result(got, problem, want_grad)
    _assert_layout_free(got, problem, lambda x, ref: tripmine.lifted_structured_loss(
        x, problem.labels, pos_margin=pos_margin, neg_margin=neg_margin,
        generalized=generalized, metric=metric, normalize=normalize, reduction=reduction,
        grad=want_grad, **{**problem.kwargs(), "ref": ref}))
    if reduction == "none":
        _check_array(got.loss, (problem.n,), np.float64)
    else:
        assert isinstance(got.loss, float)
    if scale.values and not generalized:
        assert got.n_terms == problem.counts()["positive_pairs"]
    _check_finite_loss(got, scale, want_grad, got.n_active)


# ---- retrieval metrics -----------------------------------------------------------------------


@FUZZ
@given(st.data())
@counted
def test_fuzz_nearest_neighbors(data):
    draws = Draws(data, ("input", "metric", "k"))
    problem = data.draw(problems(labels=False, faulty=draws.fault == "input"))
    metric = draws("metric", st.sampled_from(METRICS), METRIC_FAULTS)
    k = draws("k", st.one_of(st.integers(1, 8), st.sampled_from([41, 1000, np.int64(2)])),
              ((0, ValueError), (-3, ValueError), (True, TypeError), (2.0, TypeError),
               (None, TypeError), ("3", TypeError)))
    errors = problem.errors | draws.errors
    scale = NO_BUDGET if errors else budget(problem, metric=metric)
    expect = expectation(problem, errors, scale)
    if not errors and data.draw(st.integers(0, 9)) == 9:
        k = 2**62  # n x k arrays cannot be allocated: a clean error (or an empty result)
        expect = (ValueError, MemoryError) if problem.n else ALLOWED_ERRORS
    got = call(expect, metrics.nearest_neighbors, problem.x, k, problem.ref, metric=metric,
               check_finite=problem.check_finite)
    _outcome(got, scale.values)
    if got is RAISED:
        return
    assert isinstance(got, tuple) and len(got) == 2
    indices, distances = got
    _check_array(indices, (problem.n, int(k)), np.int64)
    _check_array(distances, (problem.n, int(k)), problem.dtype)
    _no_alias([indices, distances], problem)
    _assert_layout_free(got, problem, lambda x, ref: metrics.nearest_neighbors(
        x, k, ref, metric=metric, check_finite=problem.check_finite))
    if problem.n == 0:
        return
    assert np.all((indices >= -1) & (indices < problem.m)), "index out of range"
    if problem.self_mode:
        assert not np.any(indices == np.arange(problem.n)[:, None]), "a row is its own neighbour"
    if scale.values:
        filled = min(int(k), problem.m - 1 if problem.self_mode else problem.m)
        assert np.all(indices[:, :filled] >= 0) and np.all(indices[:, filled:] == -1)
        assert np.all(np.isinf(distances[:, filled:]))
        assert np.all(np.isfinite(distances[:, :filled]))
        assert np.all(np.diff(distances[:, :filled], axis=1) >= 0), "not nearest first"
        for row in indices[:, :filled]:
            assert len(set(row.tolist())) == filled, "a neighbour listed twice"


@FUZZ
@given(st.data())
@counted
def test_fuzz_retrieval_metrics(data):
    draws = Draws(data, ("input", "metric", "k"))
    problem = data.draw(problems(faulty=draws.fault == "input"))
    metric = draws("metric", st.sampled_from(METRICS), METRIC_FAULTS)
    errors = problem.errors | draws.errors  # both functions
    k = draws("k", st.one_of(st.integers(1, 6), st.lists(st.integers(1, 50), min_size=1,
                                                         max_size=4),
                             st.sampled_from([(1, 5), np.array([1, 2]), 2**62])),
              (([], ValueError), ("1", TypeError), ([0], ValueError), ([1, True], TypeError),
               (1.0, TypeError), (None, TypeError)))
    scale = NO_BUDGET if errors else budget(problem, metric=metric)
    got = call(expectation(problem, errors | draws.errors, scale), metrics.recall_at_k,
               problem.x, problem.labels, k, metric=metric, **problem.kwargs())
    _outcome(got, scale.values)
    values = []
    if got is not RAISED:
        _assert_layout_free(got, problem, lambda x, ref: metrics.recall_at_k(
            x, problem.labels, k, metric=metric, **{**problem.kwargs(), "ref": ref}))
        if isinstance(k, (int, np.integer)):
            assert isinstance(got, float)
            values = [got]
        else:
            assert isinstance(got, dict) and set(got) == {int(v) for v in k}
            values = [got[v] for v in sorted(got)]
    got = call(expectation(problem, errors, scale), metrics.mean_average_precision_at_r,
               problem.x, problem.labels, metric=metric, **problem.kwargs())
    if got is RAISED:
        return
    assert isinstance(got, float)
    _assert_layout_free(got, problem, lambda x, ref: metrics.mean_average_precision_at_r(
        x, problem.labels, metric=metric, **{**problem.kwargs(), "ref": ref}))
    if not scale.values:
        return
    scorable = bool(problem.masks()[0].any())  # a query with a relevant reference
    for value in [*values, got]:
        if scorable:
            assert 0.0 <= value <= 1.0, value
        else:
            assert math.isnan(value), value
    assert values == sorted(values), "recall@k decreasing in k"


# ---- P x K sampling ---------------------------------------------------------------------------


@FUZZ
@given(st.data())
@counted
def test_fuzz_pk_sampler(data):
    draws = Draws(data, ("labels", "p", "k", "batches_per_epoch", "seed"))
    n = data.draw(st.one_of(st.integers(1, 3), st.integers(1, MAX_N), st.integers(0, MAX_N)))
    lab = data.draw(label_pairs(n, None, faulty=draws.fault == "labels")).standalone()
    labels = lab.labels
    if isinstance(labels, np.ndarray) and labels.dtype.kind != "O" and data.draw(st.booleans()):
        labels = labels[::-1].copy()[::-1]
        labels.setflags(write=False)
    count_faults = ((0, ValueError), (-1, ValueError), (True, TypeError), (2.0, TypeError),
                    (None, TypeError))
    n = 0 if lab.errors else len(np.asarray(labels))
    classes = len(np.unique(np.asarray(labels))) if n else 0
    extremes = st.sampled_from([np.int64(1), 6, 10**6])
    p = draws("p", st.integers(1, max(classes, 1)), count_faults)
    if draws.fault != "p" and data.draw(st.integers(0, 9)) == 9:
        p = data.draw(extremes)  # more classes than there are, mostly
    k = draws("k", st.one_of(st.integers(1, 6), extremes), count_faults)
    batches = draws("batches_per_epoch", st.one_of(st.none(), st.sampled_from([1, 3, 10**12])),
                    ((0, ValueError), (2**62, ValueError), (1.5, TypeError), (True, TypeError)))
    seed = draws("seed", st.one_of(st.none(), st.integers(0, 2**128),
                                   st.sampled_from(["sequence", "generator"])),
                 ((-1, ValueError), (1.5, TypeError), (True, TypeError), ("0", TypeError)))
    if seed == "sequence":
        seed = np.random.SeedSequence(12345)
    elif seed == "generator":
        seed = np.random.default_rng(3)
    errors = lab.errors | draws.errors
    if not lab.errors:  # the documented preconditions, where their arguments are valid
        if n == 0:
            errors.add(ValueError)
        elif draws.fault != "p" and p > classes:
            errors.add(ValueError)
        elif draws.fault not in ("p", "batches_per_epoch") and batches is not None and (
                batches * int(p) * n >= 2**62):
            errors.add(ValueError)
    got = call(tuple(errors) or None, sampling.PKSampler, labels, p, k, seed=seed,
               batches_per_epoch=batches)
    _outcome(got)
    if got is RAISED:
        return
    _, codes = np.unique(np.asarray(labels), return_inverse=True)
    codes = codes.reshape(-1)
    p, k = int(p), int(k)
    assert len(got) == (batches if batches is not None else -(-n // (p * k)))
    assert got.batch_size == p * k and got.num_classes == classes and got.num_samples == n
    if p * k > 4096:
        return
    before = _snapshot((labels,))
    for batch in itertools.islice(iter(got), 6):
        _check_array(batch, (p * k,), np.int64)
        assert np.all((batch >= 0) & (batch < n)), "index out of range"
        rows = codes[batch].reshape(p, k)
        assert np.all(rows == rows[:, :1]), "a row mixes classes"
        assert len(set(rows[:, 0].tolist())) == p, "a class twice in one batch"
        for row in batch.reshape(p, k):
            if int((codes == codes[row[0]]).sum()) >= k:
                assert len(set(row.tolist())) == k, "an index repeated in a row"
    _assert_unchanged(before)
    if isinstance(seed, int):
        epoch = data.draw(st.integers(0, 2**40))
        one = sampling.PKSampler(labels, p, k, seed=seed, batches_per_epoch=batches)
        two = sampling.PKSampler(labels, p, k, seed=seed, batches_per_epoch=batches)
        one.set_epoch(epoch)
        two.set_epoch(epoch)
        assert np.array_equal(next(iter(one)), next(iter(two)))


# ---- failures the fuzzing found: deterministic reproducers ---------------------------------


@pytest.mark.parametrize("dtype, scale, mining", [
    (np.float32, 1e-20, "batch_all"), (np.float32, 1e-20, "contrastive"),
    (np.float64, 1e-160, "batch_all"), (np.float64, 1e-160, "contrastive"),
    (np.float64, 1e-160, "batch_hard"), (np.float64, 1e-170, "batch_all")])
def test_cosine_gradient_of_tiny_rows(dtype, scale, mining):
    # Rows whose squared norms underflow the dtype (1e-170: even double's): the cosine
    # loss is the loss of the same rows scaled up, and the gradient scales back exactly.
    base = np.random.default_rng(0).standard_normal((6, 3))
    x = (base * scale).astype(dtype)
    up = (x.astype(np.float64) / scale)  # magnitude ~1: inside every window
    labels = [0, 0, 1, 1, 2, 2]

    def run(rows):
        if mining == "contrastive":
            return tripmine.contrastive_loss(rows, labels, metric="cosine")
        return tripmine.triplet_loss(rows, labels, metric="cosine", mining=mining)

    result, expected = run(x), run(up)
    assert result.grad.dtype == dtype and np.all(np.isfinite(result.grad))
    assert result.loss == pytest.approx(expected.loss, rel=1e-6 if dtype == np.float32 else 1e-12)
    np.testing.assert_allclose(result.grad.astype(np.float64) * scale, expected.grad,
                               rtol=1e-4 if dtype == np.float32 else 1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype, labels, want", [
    (np.float32, [0, 0], 0.0), (np.float32, [0, 0, 1], FloatingPointError),
    (np.float64, [0, 0, 1], 2e300)])
def test_batch_all_margin_beyond_float32(dtype, labels, want):
    x = np.zeros((len(labels), 2), dtype=dtype)

    def run():
        return tripmine.triplet_loss(x, labels, mining="batch_all", margin=1e300,
                                     reduction="sum")

    if want is FloatingPointError:  # a float32 call's loss must fit float32 (issue 17)
        with pytest.raises(FloatingPointError, match="beyond float32"):
            run()
        return
    assert run().loss == pytest.approx(want)  # 0 when there is no triplet (README)


def test_normalize_gradient_of_a_tiny_float32_row_without_terms_is_zero():
    # Row 3 is in no triplet: its gradient is exactly 0.  _normalize_backward casts
    # 1/|x| = 1e39 to float32 (inf) and multiplies: 0 * inf = NaN.
    x = np.array([[1, 0, 0], [0.9, 0.1, 0], [0, 1, 0], [1e-39, 0, 0]], dtype=np.float32)
    triplets = tripmine.Triplets(np.array([0]), np.array([1]), np.array([2]))
    result = tripmine.triplet_loss(x, None, mining=triplets, normalize=True, margin=1.0)
    np.testing.assert_array_equal(result.grad[3], 0.0)


def test_uint64_labels_above_int64_are_not_negative_int64_labels():
    # 2**64 - 1 and -1 are different labels; the int64 cast of the integer fast path
    # makes them one class.
    mask = tripmine.positive_mask(np.array([2**64 - 1], dtype=np.uint64), np.array([-1]))
    assert not mask.any()


@pytest.mark.parametrize("order", [">", "<"])
def test_non_native_float64_is_computed_in_float64(order):
    # README: float64 inputs are computed natively; a byte-swapped float64 array is
    # float64 too.
    x = np.random.default_rng(0).standard_normal((5, 3))
    swapped = x.astype(np.dtype(np.float64).newbyteorder(order))
    got = tripmine.pairwise_distances(swapped)
    assert got.dtype == np.float64
    np.testing.assert_array_equal(got, tripmine.pairwise_distances(x))


def _overlapping_out(case: str):
    """(x, ref, out): out is a valid (n, m) array sharing memory with x, though x
    itself is not C-contiguous or not of the result dtype (tripmine converts it)."""
    buffer = np.arange(32, dtype=np.float64).reshape(4, 8)
    if case == "strided":
        return buffer[:, ::2], None, buffer.reshape(8, 4)[:4]
    if case == "reversed":
        return buffer[::-1, :4], None, buffer.reshape(8, 4)[4:]
    # float32 x, float64 ref: the result is float64, and out holds x's bytes
    return buffer.view(np.float32)[:, :4], np.ones((4, 4)), buffer.reshape(8, 4)[:4]


@pytest.mark.parametrize("case", ["strided", "reversed", "converted"])
def test_pairwise_distances_refuses_out_overlapping_a_converted_input(case):
    # README: an out "overlapping an input" is a ValueError, and inputs are never
    # modified -- also when tripmine copies the input first.
    x, ref, out = _overlapping_out(case)
    assert out.flags.c_contiguous and out.flags.writeable and np.may_share_memory(out, x)
    assert out.shape == (x.shape[0], x.shape[0] if ref is None else ref.shape[0])
    before = x.copy()
    with pytest.raises(ValueError, match="share memory"):
        tripmine.pairwise_distances(x, ref, out=out)
    np.testing.assert_array_equal(x, before)


def test_recall_at_k_counts_a_repeated_k_once():
    x = np.random.default_rng(0).standard_normal((8, 3))
    labels = np.repeat(np.arange(4), 2)
    once = metrics.recall_at_k(x, labels, k=1)
    assert metrics.recall_at_k(x, labels, k=[1, 1]) == {1: once}  # was {1: 2 * once}


@pytest.mark.parametrize("x, labels", [(np.zeros((0, 2)), []), (np.zeros((1, 2)), [0])])
@pytest.mark.parametrize("func", [metrics.recall_at_k, metrics.mean_average_precision_at_r])
def test_retrieval_metrics_refuse_unknown_metric_on_tiny_batches(func, x, labels):
    # README: unknown options are a ValueError; with no candidate to rank the metric
    # name was never looked at.
    with pytest.raises(ValueError, match="metric"):
        func(x, labels, metric="manhattan")


# ---- the margin-softmax heads ------------------------------------------------------------

#: (function, valid options, option faults): each head's keywords and their bad values.
_SCALES = st.one_of(st.sampled_from([1e-3, 1.0, 64.0, np.float32(30.0), 1000]),
                    st.floats(0.01, 100))
_SCALE_FAULTS = ((0.0, ValueError), (-1.0, ValueError), (math.inf, ValueError),
                 (math.nan, ValueError), ("64", TypeError), (True, TypeError))
_INT_MARGINS = st.sampled_from([1, 2, 3, 4, np.int64(4), 4.0, 7])
_INT_MARGIN_FAULTS = ((0, ValueError), (1.5, ValueError), (65, ValueError), ("4", ValueError),
                      (None, ValueError))
_LAMBDAS = st.one_of(st.sampled_from([0.0, 1.0, 1e6]), st.floats(0, 100))
HEAD_SPECS = {
    "softmax": (tripmine.heads.softmax_loss, {}),
    "normface": (tripmine.heads.normface_loss, {"scale": (_SCALES, _SCALE_FAULTS)}),
    "cosface": (tripmine.heads.cosface_loss, {
        "scale": (_SCALES, _SCALE_FAULTS),
        "margin": (st.floats(0, 1), ((-0.1, ValueError), (1.5, ValueError),
                                     (math.nan, ValueError)))}),
    "arcface": (tripmine.heads.arcface_loss, {
        "scale": (_SCALES, _SCALE_FAULTS),
        "margin": (st.floats(0, 3.1), ((math.pi, ValueError), (-0.5, ValueError))),
        "easy_margin": (st.booleans(), FLAG_FAULTS),
        "straight_through": (st.booleans(), FLAG_FAULTS)}),
    "combined": (tripmine.heads.combined_margin_loss, {
        "scale": (_SCALES, _SCALE_FAULTS),
        "m1": (st.floats(0.1, 5), ((0.0, ValueError), (math.inf, ValueError))),
        "m2": (st.floats(0, 3.1), ((-0.1, ValueError), (4.0, ValueError))),
        "m3": (st.floats(0, 1), ((2.0, ValueError), (math.nan, ValueError))),
        "straight_through": (st.booleans(), FLAG_FAULTS)}),
    "sphereface": (tripmine.heads.sphereface_loss, {
        "margin": (_INT_MARGINS, _INT_MARGIN_FAULTS),
        "lambda_": (_LAMBDAS, ((-1.0, ValueError), (math.inf, ValueError)))}),
    "lsoftmax": (tripmine.heads.large_margin_softmax_loss, {
        "margin": (_INT_MARGINS, _INT_MARGIN_FAULTS),
        "lambda_": (_LAMBDAS, ((-1.0, ValueError),))}),
}
_HEAD_LABEL_FAULTS = (("out_of_range", ValueError), ("negative", ValueError),
                      ("float", ValueError), ("length", ValueError), ("2d", ValueError),
                      ("str", ValueError))


def _head_labels(draw, n: int, c: int, fault: str | None):
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    codes = rng.integers(0, c, n)
    kind = draw(st.sampled_from(["int64", "int8", "uint16", "int32", "list", "unaligned"]))
    if fault in ("out_of_range", "negative", "float", "str") and not n:
        return codes, False  # nothing to corrupt in an empty batch
    if fault == "out_of_range":
        codes[-1] = c
    elif fault == "negative":
        codes[0] = -1
    elif fault == "length":
        codes = rng.integers(0, c, n + 1)
    elif fault == "2d":
        return codes.reshape(-1, 1), True
    elif fault == "float":
        return codes.astype(np.float64), True
    elif fault == "str":
        return np.array([str(v) for v in codes]), True
    if kind == "list":
        return [int(v) for v in codes], fault is not None
    if kind == "unaligned":
        return _unaligned(codes.astype(np.int64)), fault is not None
    return codes.astype(kind), fault is not None


def _head_in_domain(kind: str, x: np.ndarray, w: np.ndarray, options: dict, dtype) -> bool:
    """No true logit or gradient of the head overflows the compute dtype: the logits are
    bounded by |x| |W| (2m + 2) and the gradients by that, by (2m + 2)^2 |x| / |W| and, through
    the normalisations, by scale m^2 / min(|x|, |W|)."""
    top = math.log10(float(np.finfo(dtype).max)) - 3
    lx, lw = _log_norms(x), _log_norms(w)
    lx_max, lw_max = (max(lx.max(initial=-np.inf), 0), max(lw.max(initial=-np.inf), 0))
    lx_min = min(lx[np.isfinite(lx)].min(initial=0), 0)
    lw_min = min(lw[np.isfinite(lw)].min(initial=0), 0)
    m = float(options.get("margin", 1)) if kind in ("sphereface", "lsoftmax") else 1.0
    factor = math.log10(2 * m + 2) * 2 + math.log10(float(options.get("scale", 1.0)) + 1)
    worst = max(lx_max + lw_max, lx_max - lw_min, -lx_min, -lw_min, lw_max - lx_min)
    return worst + factor + 2 < top


@FUZZ
@given(st.data())
@counted
def test_fuzz_heads(data):
    kind = data.draw(st.sampled_from(sorted(HEAD_SPECS)), label="head")
    fn, spec = HEAD_SPECS[kind]
    draws = Draws(data, ("input", "labels", "class_weight", "reduction", "grad") + tuple(spec))
    n, d, c = data.draw(SIZES), data.draw(DIMS), data.draw(st.integers(1, 9))
    x, x_arr = data.draw(matrices(n, d))
    w, w_arr = data.draw(matrices(c, d))
    errors = set()
    if draws.fault == "input":
        bad = data.draw(st.sampled_from(["weight_width", "weight_int", "x_1d", "no_classes"]))
        if bad == "weight_width":
            w, w_arr = np.zeros((c, d + 1)), np.zeros((c, d + 1))
        elif bad == "weight_int":
            w = w_arr.astype(np.int32) if np.isfinite(w_arr).all() else np.zeros((c, d), int)
            errors.add(TypeError)
        elif bad == "x_1d":
            x = x_arr.reshape(-1)
        else:
            w, w_arr = np.zeros((0, d)), np.zeros((0, d))
        errors.add(ValueError if bad != "weight_int" else TypeError)
    label_fault = error = None
    if draws.fault == "labels":
        label_fault, error = data.draw(st.sampled_from(_HEAD_LABEL_FAULTS), label="labels")
    labels, applied = _head_labels(data.draw, n, max(c, 1), label_fault)
    if applied:
        errors.add(error)
    options = {name: draws(name, valid, faults) for name, (valid, faults) in spec.items()}
    class_weight = draws("class_weight", st.sampled_from([None, "uniform", "zeros", "mixed"]),
                         (("negative", ValueError), ("length", ValueError),
                          ("nan", ValueError)))
    cw = {None: None, "uniform": np.full(c, 0.5), "zeros": np.zeros(c),
          "mixed": np.arange(c) % 3 * 1.5, "negative": -np.ones(c), "length": np.ones(c + 1),
          "nan": np.full(c, np.nan)}[class_weight]
    reduction = draws("reduction", st.sampled_from(["mean", "sum", "none"]),
                      (("mean_nonzero", ValueError), (None, ValueError)))
    want_grad = draws("grad", st.booleans(), FLAG_FAULTS)
    errors |= draws.errors
    bias = None
    if kind == "softmax" and data.draw(st.booleans(), label="bias"):
        bias = np.linspace(-1, 1, c)
    if x_arr.ndim != 2 or w_arr.ndim != 2:  # a list of no rows is 1-D
        errors.add(ValueError)
    finite = bool(np.isfinite(x_arr).all() and np.isfinite(w_arr).all())
    if not finite:
        errors.add(ValueError)
    if w_arr.ndim == 2 and w_arr.shape[0] == 0:
        errors.add(ValueError)
    kwargs = dict(options, class_weight=cw, reduction=reduction, grad=want_grad)
    if bias is not None:
        kwargs["bias"] = bias
    dtype = np.dtype(np.float64 if 8 in (x_arr.dtype.itemsize, w_arr.dtype.itemsize)
                     else np.float32)
    in_domain = not errors and _head_in_domain(kind, x_arr, w_arr, options, dtype)
    # Outside the domain a loss that overflows raises FloatingPointError (issue 17).
    expect = tuple(errors) if errors else (None if in_domain else ALLOWED_ERRORS)
    got = call(expect, fn, x, labels, w, **kwargs)
    checked = got is not RAISED and in_domain
    _outcome(got, checked)
    if got is RAISED:
        return
    assert isinstance(got, tripmine.heads.SoftmaxLossResult)
    assert got.n_samples == n and 0 <= got.n_correct <= n
    if reduction == "none":
        _check_array(got.loss, (n,), np.float64)
    else:
        assert isinstance(got.loss, float)
    if want_grad:
        _check_array(got.grad, (n, d), dtype)
        _check_array(got.weight_grad, (c, d), dtype)
        if bias is not None:
            _check_array(got.bias_grad, (c,), dtype)
    else:
        assert got.grad is None and got.weight_grad is None
    if checked:
        assert np.all(np.isfinite(got.loss)) and np.all(np.asarray(got.loss) >= -1e-6 * (
            1 + np.abs(np.asarray(got.loss))))
        if want_grad:
            assert np.isfinite(got.grad).all() and np.isfinite(got.weight_grad).all()
    _assert_same(got, fn(_plain(x_arr), labels, _plain(w_arr), **kwargs))


# ---- the center loss ---------------------------------------------------------------------

def _center_in_domain(x: np.ndarray, c: np.ndarray, dtype) -> bool:
    """No residual, its square sum or a class's gradient sum overflows the dtype."""
    top = math.log10(float(np.finfo(dtype).max)) / 2 - 3
    return max(_log_norms(x).max(initial=0), _log_norms(c).max(initial=0)) < top


@FUZZ
@given(st.data())
@counted
def test_fuzz_center_loss_and_update(data):
    draws = Draws(data, ("input", "labels", "reduction", "grad", "alpha"))
    n, d, c = data.draw(SIZES), data.draw(DIMS), data.draw(st.integers(1, 9))
    x, x_arr = data.draw(matrices(n, d))
    centers, c_arr = data.draw(matrices(c, d))
    errors = set()
    bad = None
    if draws.fault == "input":
        bad = data.draw(st.sampled_from(["width", "int", "x_1d", "no_classes"]))
        if bad == "width":
            centers, c_arr = np.zeros((c, d + 1)), np.zeros((c, d + 1))
        elif bad == "int":
            centers, c_arr = np.zeros((c, d), int), np.zeros((c, d))
        elif bad == "x_1d":
            x = x_arr.reshape(-1)
        else:
            centers, c_arr = np.zeros((0, d)), np.zeros((0, d))
        errors.add(TypeError if bad == "int" else ValueError)
    label_fault = error = None
    if draws.fault == "labels":
        label_fault, error = data.draw(st.sampled_from(_HEAD_LABEL_FAULTS), label="labels")
    labels, applied = _head_labels(data.draw, n, max(c, 1), label_fault)
    if applied:
        errors.add(error)
    reduction = draws("reduction", st.sampled_from(["mean", "sum", "none"]),
                      (("mean_nonzero", ValueError), (None, ValueError)))
    want_grad = draws("grad", st.booleans(), FLAG_FAULTS)
    alpha = draws("alpha", st.one_of(st.sampled_from([0.0, 0.5, 1.0]), st.floats(0, 10)),
                  ((-0.5, ValueError), (math.nan, ValueError), (math.inf, ValueError),
                   ("0.5", TypeError)))
    if x_arr.ndim != 2 or c_arr.ndim != 2:
        errors.add(ValueError)
    finite = bool(np.isfinite(x_arr).all() and np.isfinite(c_arr).all())
    if not finite:
        errors.add(ValueError)
    if c_arr.ndim == 2 and c_arr.shape[0] == 0:
        errors.add(ValueError)
    # errors: the inputs' faults, shared by both calls; a keyword's fault belongs to its call.
    loss_errors = errors | (draws.errors if draws.fault != "alpha" else set())
    dtype = np.dtype(np.float64 if 8 in (x_arr.dtype.itemsize, c_arr.dtype.itemsize)
                     else np.float32)
    in_domain = not loss_errors and _center_in_domain(x_arr, c_arr, dtype)
    # Outside the domain a loss beyond the dtype raises FloatingPointError (issue 17).
    expect = tuple(loss_errors) if loss_errors else (None if in_domain else ALLOWED_ERRORS)
    got = call(expect, tripmine.center_loss, x, labels,
               centers, reduction=reduction, grad=want_grad, centers_grad=want_grad)
    checked = got is not RAISED and in_domain
    _outcome(got, checked)
    if got is not RAISED:
        assert isinstance(got, tripmine.CenterLossResult) and got.n_samples == n
        if reduction == "none":
            _check_array(got.loss, (n,), np.float64)
        if want_grad:
            _check_array(got.grad, (n, d), dtype)
            _check_array(got.centers_grad, (c, d), dtype)
        if checked:
            assert np.all(np.isfinite(got.loss)) and np.all(np.asarray(got.loss) >= 0)
            if want_grad:
                assert np.isfinite(got.grad).all() and np.isfinite(got.centers_grad).all()
        _assert_same(got, tripmine.center_loss(_plain(x_arr), labels, _plain(c_arr),
                                               reduction=reduction, grad=want_grad,
                                               centers_grad=want_grad))
    # The update, in place on a writable C-contiguous float copy of the centers: the same
    # faults except those of the loss's own keywords (and integer centers, copied to float).
    update_errors = (errors - ({TypeError} if bad == "int" else set())) | (
        draws.errors if draws.fault == "alpha" else set())
    target_dtype = np.float64 if c_arr.dtype.itemsize == 8 else np.float32
    if x_arr.ndim == 2 and x_arr.size and finite and \
            np.abs(x_arr).max() > np.finfo(target_dtype).max:
        update_errors.add(ValueError)  # x is read in the centers' dtype, where it overflows
    target = np.array(centers, dtype=target_dtype, order="C")
    before = target.copy()
    x_before = _snapshot(((x, labels), {}))
    try:
        moved = tripmine.update_centers(target, x, labels, alpha=alpha)
    except ALLOWED_ERRORS as exc:
        _assert_unchanged(x_before)
        np.testing.assert_array_equal(target, before)  # a refused update writes nothing
        assert update_errors, f"valid update raised {type(exc).__name__}: {exc}"
        assert isinstance(exc, tuple(update_errors)), exc
        return
    _assert_unchanged(x_before)
    assert not update_errors, f"expected one of {update_errors}, got a result"
    assert moved is target
    if checked and alpha <= 1:  # each center moves toward its samples, never past them
        assert np.isfinite(target).all()


# ---- the margin loss -----------------------------------------------------------------------

MARGIN_RULES = ("batch_hard", "semi_hard", "distance_weighted", "batch_all", "triplets")


def _class_codes(labels: Any) -> np.ndarray | None:
    """The labels as class indices for a per-class beta, when they are small non-negative
    integers; None otherwise."""
    try:
        arr = np.asarray(labels)
    except Exception:  # noqa: BLE001 -- anything array-unlike has no class indices
        return None
    if arr.ndim != 1 or arr.dtype.kind not in "iu" or (arr.size and arr.min() < 0) or \
            (arr.size and arr.max() > 1000):
        return None
    return arr


@FUZZ
@given(st.data())
@counted
def test_fuzz_margin_loss(data):
    rule = data.draw(st.sampled_from(MARGIN_RULES), label="rule")
    draws = Draws(data, ("input", "mining", "metric", "margin", "nu", "beta", "normalize",
                         "reduction", "grad", "seed"))
    problem = data.draw(problems(unit=rule == "distance_weighted",
                                 faulty=draws.fault == "input"))
    metrics_here = ("euclidean",) if rule == "distance_weighted" else METRICS
    metric = draws("metric", st.sampled_from(metrics_here), METRIC_FAULTS)
    margin = draws("margin", MARGINS, MARGIN_FAULTS)
    nu = draws("nu", st.sampled_from([0.0, 0.1, 2.0]), ((-0.5, ValueError),
                                                         (math.nan, ValueError)))
    normalize = draws("normalize", st.booleans(), FLAG_FAULTS)
    want_grad = draws("grad", st.booleans(), FLAG_FAULTS)
    reduction = draws("reduction", st.sampled_from(["mean", "sum", "none"]),
                      (("mean_nonzero", ValueError), (None, ValueError)))
    seed = draws("seed", SEEDS, SEED_FAULTS if rule == "distance_weighted" else ())
    codes = _class_codes(problem.labels)
    per_class = codes is not None and data.draw(st.booleans(), label="per_class")
    c = int(codes.max()) + 1 if per_class and codes.size else 1
    beta_valid = (st.builds(lambda v: np.full(c, v), st.floats(0, 3)) if per_class
                  else st.one_of(st.floats(-1, 3), st.sampled_from([1.2, np.float32(0.5), 2])))
    beta = draws("beta", beta_valid, ((math.inf, ValueError), (np.ones((2, 2)), ValueError),
                                      ("1.2", TypeError)))
    errors = set(draws.errors)
    labels, mining = problem.labels, rule
    if rule == "triplets":
        errors |= problem.input_errors
        mining, error = data.draw(user_triplets(problem.n, problem.m, draws.fault == "mining"))
        errors |= {error} if error else set()
        if per_class:  # beta per class reads the labels: their faults count
            errors |= problem.label_errors
        elif data.draw(st.booleans()):
            labels = None
    else:
        errors |= problem.errors
        if draws.fault == "mining":
            mining = data.draw(st.sampled_from(["batch-all", "hardest", None]))
            errors.add(ValueError)
    may_raise = False
    if rule == "distance_weighted":
        must, may_raise = _unit_norm_error(problem, normalize)
        if must or (may_raise and errors):
            errors.add(ValueError)
    scale = NO_BUDGET if errors else budget(problem, metric=metric, normalize=normalize,
                                            margin=float(margin) + 3 + 3 * float(nu),
                                            terms=(problem.n + problem.m) ** 3)
    expect = expectation(problem, errors, scale) or (ALLOWED_ERRORS if may_raise else None)
    got = call(expect, tripmine.margin_loss, problem.x, labels, mining=mining, margin=margin,
               nu=nu, beta=beta, metric=metric, normalize=normalize, reduction=reduction,
               seed=seed, grad=want_grad, **problem.kwargs())
    _outcome(got, scale.values)
    if got is RAISED:
        return
    assert isinstance(got, tripmine.MarginLossResult)
    if want_grad:
        _check_array(got.grad, (problem.n, problem.x_arr.shape[1]), problem.dtype)
        if not problem.self_mode:
            _check_array(got.ref_grad, problem.ref_arr.shape, problem.dtype)
    else:
        assert got.grad is None and got.ref_grad is None
    t = got.n_triplets
    assert 0 <= got.n_active <= 2 * t
    if mining == "batch_all":
        assert got.triplets is None and got.seed is None
        if scale.values:
            assert t == problem.counts()["batch_all"]
    else:
        assert len(got.triplets.anchor) == t
    if per_class:
        _check_array(got.beta_grad, (c,), np.float64)
    else:
        assert isinstance(got.beta_grad, float)
    if reduction == "none":
        _check_array(got.loss, (problem.n if mining == "batch_all" else t,), np.float64)
    if scale.loss:
        assert np.all(np.isfinite(got.loss))
    if scale.grad and want_grad:
        assert np.isfinite(got.grad).all() and np.isfinite(got.beta_grad).all()
    _assert_layout_free(got, problem, lambda x, ref: tripmine.margin_loss(
        x, labels, mining=mining, margin=margin, nu=nu, beta=beta, metric=metric,
        normalize=normalize, reduction=reduction, seed=seed if got.seed is None else got.seed,
        grad=want_grad, **{**problem.kwargs(), "ref": ref}))
