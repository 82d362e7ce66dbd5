"""Input validation shared by every public function (DESIGN.md section 2).

Each helper returns arrays ready for the C core (native dtype, C-contiguous,
never the caller's array when a conversion was needed) and raises an
exception whose message names the offending argument:

* ``TypeError`` for a dtype tripmine does not compute in (ints, complex,
  bool, object, float128) or a GPU array on the CPU path;
* ``ValueError`` for wrong ndim, mismatched lengths or widths, NaN/inf (unless
  ``check_finite=False``), unknown option strings and unusable ``out`` arrays.

Inputs are never modified: the C core only reads them, and conversions copy.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from . import _core

NATIVE_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def _describe(value: Any) -> str:
    dtype = getattr(value, "dtype", None)
    return f"{type(value).__name__} of dtype {dtype}" if dtype is not None else type(value).__name__


def _as_array(value: Any, name: str) -> np.ndarray:
    if hasattr(value, "__cuda_array_interface__"):
        raise TypeError(f"{name} is a GPU array that is not a CuPy array (or the other "
                        f"inputs are on the host); tripmine's GPU path takes CuPy arrays "
                        f"(cupy.asarray wraps any __cuda_array_interface__ array): pass all "
                        f"embeddings on one side")
    if isinstance(value, np.ndarray):
        return value
    try:
        return np.asarray(value)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name} must be array-like, got {_describe(value)}: {exc}") from None


def c_array(arr: np.ndarray, dtype: Any) -> np.ndarray:
    """``arr`` as the C core reads it: C-contiguous, aligned, native byte order
    (a copy only when needed; a misaligned view would be undefined behaviour in C)."""
    return np.require(arr, dtype=np.dtype(dtype).newbyteorder("="), requirements=["C", "A"])


def compute_dtype(*arrays: np.ndarray | None) -> np.dtype:
    """float64 if any input is float64, else float32 (float16 computes in float32)."""
    # itemsize, not dtype equality: a byte-swapped '>f8' is float64 too.
    if any(a is not None and a.dtype.itemsize == 8 for a in arrays):
        return np.dtype(np.float64)
    return np.dtype(np.float32)


def _float_matrix(value: Any, name: str, check_finite: bool) -> np.ndarray:
    arr = _as_array(value, name)
    if arr.dtype.kind != "f" or arr.dtype.itemsize not in (2, 4, 8):
        raise TypeError(f"{name} must be a float16, float32 or float64 array, "
                        f"got dtype {arr.dtype}")
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-D (rows x features), got shape {arr.shape}")
    # min and max propagate NaN and reach +-inf: two passes without the N x D bool
    # temporary of isfinite (51 MB for a 100k x 512 class matrix).
    if check_finite and arr.size and not (np.isfinite(arr.min()) and np.isfinite(arr.max())):
        raise ValueError(f"{name} contains NaN or infinity; pass check_finite=False to skip "
                         f"this check (results are then undefined where such values enter)")
    return arr


def embeddings(x: Any, ref: Any = None, *, check_finite: bool = True,
               x_name: str = "x", ref_name: str = "ref"
               ) -> tuple[np.ndarray, np.ndarray | None]:
    """Validate query embeddings and optional reference embeddings.

    Returns C-contiguous arrays of one native dtype (see :func:`compute_dtype`);
    ``ref`` stays ``None`` in self mode.
    """
    x_arr = _float_matrix(x, x_name, check_finite)
    ref_arr = None if ref is None else _float_matrix(ref, ref_name, check_finite)
    if ref_arr is not None and ref_arr.shape[1] != x_arr.shape[1]:
        raise ValueError(f"{ref_name} has {ref_arr.shape[1]} features per row but {x_name} has "
                         f"{x_arr.shape[1]}: they must match")
    dtype = compute_dtype(x_arr, ref_arr)
    x_arr = c_array(x_arr, dtype)
    if ref_arr is not None:
        ref_arr = c_array(ref_arr, dtype)
    return x_arr, ref_arr


def _label_vector(value: Any, name: str, expected: int | None, against: str) -> np.ndarray:
    arr = _as_array(value, name)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if expected is not None and arr.shape[0] != expected:
        raise ValueError(f"{name} has length {arr.shape[0]} but {against} has {expected} rows")
    if arr.dtype.kind in "fc" and np.isnan(arr).any():
        raise ValueError(f"{name} contains NaN, which is not a usable class label")
    if arr.dtype.kind == "V":
        raise TypeError(f"{name} must hold sortable labels (ints, strings, floats), "
                        f"got dtype {arr.dtype}")
    return arr


def labels(labels: Any, ref_labels: Any = None, *, n: int | None = None, m: int | None = None,
           x_name: str = "x", ref_name: str = "ref"
           ) -> tuple[np.ndarray, np.ndarray | None]:
    """Map labels (and ref_labels) onto shared int64 class codes.

    Equal labels get equal codes, across both arrays.  Integer and boolean
    labels are their own codes (a cast, no sort); anything else ``np.unique``
    can sort (strings, floats, objects) is encoded by one joint ``np.unique``.
    ``n``/``m`` are the expected lengths (rows of ``x``/``ref``).
    """
    lab = _label_vector(labels, "labels", n, x_name)
    ref_lab = None if ref_labels is None else _label_vector(ref_labels, "ref_labels", m, ref_name)
    arrays = [lab] if ref_lab is None else [lab, ref_lab]
    if any(a.dtype.kind == "u" and a.dtype.itemsize == 8 and a.size and a.max() >= 2**63
           for a in arrays):
        # uint64 codes past int64's range: compare them as Python ints, never wrapped.
        arrays = [a.astype(object) for a in arrays]
        lab, ref_lab = arrays[0], (arrays[1] if ref_lab is not None else None)
    if all(a.dtype.kind in "biu" for a in arrays):
        codes = [c_array(a, np.int64) for a in arrays]
    else:
        if ref_lab is not None and _kind_family(lab) != _kind_family(ref_lab):
            raise TypeError(f"labels ({lab.dtype}) and ref_labels ({ref_lab.dtype}) must be "
                            f"labels of the same kind (both numbers or both strings)")
        joined = np.concatenate(arrays) if len(arrays) > 1 else lab
        try:
            _, inverse = np.unique(joined, return_inverse=True)
        except TypeError as exc:
            raise TypeError(f"labels must be sortable by numpy.unique (all ints, all strings, "
                            f"...): {exc}") from None
        inverse = c_array(inverse.reshape(-1), np.int64)
        codes = [inverse[: lab.shape[0]], inverse[lab.shape[0]:]]
    return codes[0], (codes[1] if ref_lab is not None else None)


def _kind_family(arr: np.ndarray) -> str:
    kind = arr.dtype.kind
    if kind in "biuf":
        return "number"
    if kind in "US":
        return "string"
    return kind


def metric_code(metric: Any) -> int:
    if not isinstance(metric, str) or metric not in _core.METRICS:
        raise ValueError(f"metric must be one of {sorted(_core.METRICS)}, got {metric!r}")
    return _core.METRICS[metric]


def output(out: Any, shape: tuple[int, ...], dtype: np.dtype,
           inputs: Iterable[np.ndarray | None] = ()) -> np.ndarray:
    """Return ``out`` checked for an exact fit, or a new array when it is None."""
    if out is None:
        return np.empty(shape, dtype=dtype)
    if not isinstance(out, np.ndarray):
        raise ValueError(f"out must be a numpy.ndarray, got {_describe(out)}")
    if out.shape != shape:
        raise ValueError(f"out must have shape {shape}, got {out.shape}")
    if out.dtype != dtype:
        raise ValueError(f"out must have dtype {dtype} (the result dtype), got {out.dtype}")
    if not out.flags.c_contiguous:
        raise ValueError("out must be C-contiguous")
    if not out.flags.aligned:
        raise ValueError("out must be aligned to its dtype (a misaligned view of a buffer)")
    if not out.flags.writeable:
        raise ValueError("out is read-only")
    if any(a is not None and np.may_share_memory(out, a) for a in inputs):
        raise ValueError("out must not share memory with the inputs")
    return out


def positive_int(value: Any, name: str) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an integer, got {_describe(value)}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return int(value)


def flag(value: Any, name: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {_describe(value)}")
    return bool(value)


def non_negative(value: Any, name: str) -> float:
    """A finite real >= 0 (margins)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer,
                                                                     np.floating)):
        raise TypeError(f"{name} must be a real number, got {_describe(value)}")
    value = float(value)
    if not np.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    return value


def positive_real(value: Any, name: str) -> float:
    value = non_negative(value, name)
    if value == 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return value


def choice(value: Any, name: str, options) -> str:
    if not isinstance(value, str) or value not in options:
        raise ValueError(f"{name} must be one of {sorted(options)}, got {value!r}")
    return value


def optional_count(value: Any, name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be None or an integer, got {_describe(value)}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return int(value)


def ref_offset(value: Any, n: int, ref_rows: int | None, codes: np.ndarray | None,
               ref_codes: np.ndarray | None) -> int | None:
    """Validate ``ref_offset``: ``x[i]`` is the sample ``ref[ref_offset + i]``.

    Needs ``ref`` (``ref_rows`` its row count), ``0 <= ref_offset`` and
    ``ref_offset + n <= ref_rows``, and, where labels are known,
    ``labels[i] == ref_labels[ref_offset + i]`` (the embeddings themselves are
    the caller's promise, not compared).
    """
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"ref_offset must be None or an integer, got {_describe(value)}")
    value = int(value)
    if ref_rows is None:
        raise ValueError("ref_offset needs ref (and ref_labels): it says that x[i] is the "
                         "sample ref[ref_offset + i]; self mode (ref=None) already excludes "
                         "each sample's pair with itself")
    if value < 0 or value + n > ref_rows:
        raise ValueError(f"ref_offset must satisfy 0 <= ref_offset and ref_offset + N <= M "
                         f"(x has N = {n} rows, ref has M = {ref_rows}), got {value}")
    if codes is not None and ref_codes is not None and n:
        differ = np.flatnonzero(codes != ref_codes[value:value + n])
        if differ.size:
            i = int(differ[0])
            raise ValueError(f"ref_offset = {value} says x[{i}] is ref[{value + i}], but "
                             f"labels[{i}] differs from ref_labels[{value + i}]")
    return value
