"""Pairwise distance matrices, computed by the C core's tile engine."""

from __future__ import annotations

from typing import Any

import numpy as np

from . import _core
from . import _validation as check
from ._dispatch import dispatch

__all__ = ["pairwise_distances"]


@dispatch
def pairwise_distances(x: Any, ref: Any = None, *, metric: str = "euclidean",
                       out: np.ndarray | None = None, check_finite: bool = True) -> np.ndarray:
    """Distances between the rows of ``x`` (N x D) and of ``ref`` (M x D).

    ``ref=None`` is self mode: ``ref = x`` and the diagonal is exactly 0.

    Metrics: ``"euclidean"`` ``||x - r||``, ``"sqeuclidean"`` ``||x - r||^2``,
    ``"cosine"`` ``1 - x.r / (||x|| ||r||)`` (a zero row has cosine similarity 0
    with every other row, so distance 1).  Values are computed with the Gram
    identity and clamped at 0; pairs close compared with their norms are
    recomputed exactly, so every distance has a small *relative* error
    (README, "Accuracy").

    Parameters
    ----------
    x, ref : float16, float32 or float64 arrays.  float64 if either is float64,
        else float32 (float16 is computed and returned in float32).
    out : optional C-contiguous, writable (N, M) array of the result dtype.
    check_finite : reject NaN/inf in the inputs (default True).

    Returns
    -------
    (N, M) array of the result dtype (``out`` when given).
    """
    metric_id = check.metric_code(metric)
    x_arr, ref_arr = check.embeddings(x, ref, check_finite=check_finite)
    m = x_arr.shape[0] if ref_arr is None else ref_arr.shape[0]
    # The caller's arrays too: a strided or converted x is copied, but out must not
    # overwrite the original either.
    originals = tuple(a for a in (x, ref) if isinstance(a, np.ndarray))
    result = check.output(out, (x_arr.shape[0], m), x_arr.dtype, (x_arr, ref_arr, *originals))
    if result.size:
        _core.pairwise_distances(x_arr, ref_arr, metric_id, result)
    return result
