"""Boolean masks of positive pairs, negative pairs and valid triplets.

These materialise N x M (or N x N x N) matrices; they exist for inspection,
teaching and interoperability.  The miners and losses never build them.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import _core
from . import _validation as check

__all__ = ["positive_mask", "negative_mask", "triplet_mask", "TRIPLET_MASK_MAX_N"]

#: Largest batch :func:`triplet_mask` accepts: N^3 bytes, 1 GiB at N = 1024.
TRIPLET_MASK_MAX_N = 1024


def _pair_mask(labels: Any, ref_labels: Any, ref_offset: Any, which: str) -> np.ndarray:
    codes, ref_codes = check.labels(labels, ref_labels, x_name="labels", ref_name="ref_labels")
    n = codes.shape[0]
    m = n if ref_codes is None else ref_codes.shape[0]
    offset = check.ref_offset(ref_offset, n, None if ref_codes is None else m, codes, ref_codes)
    mask = np.empty((n, m), dtype=bool)
    if mask.size:
        if which == "positive":
            _core.pair_masks(codes, ref_codes, mask, None)
            if offset is not None:  # sample i is ref row offset + i: not its own positive
                rows = np.arange(n)
                mask[rows, offset + rows] = False
        else:
            _core.pair_masks(codes, ref_codes, None, mask)
    return mask


def positive_mask(labels: Any, ref_labels: Any = None, *,
                  ref_offset: int | None = None) -> np.ndarray:
    """``mask[i, j]`` is True when ``labels[i] == ref_labels[j]``.

    Self mode (``ref_labels=None``): ``ref_labels = labels`` and the diagonal
    is False, since a sample is never its own positive.  ``ref_offset`` (with
    ``ref_labels``): sample ``i`` is reference ``ref_offset + i``, so
    ``mask[i, ref_offset + i]`` is False too (the miners' rule).  Returns bool (N, M).
    """
    return _pair_mask(labels, ref_labels, ref_offset, "positive")


def negative_mask(labels: Any, ref_labels: Any = None, *,
                  ref_offset: int | None = None) -> np.ndarray:
    """``mask[i, j]`` is True when ``labels[i] != ref_labels[j]``.  Returns bool (N, M).

    ``ref_offset`` is only checked (a sample's own row has its label, so it is
    never a negative anyway)."""
    return _pair_mask(labels, ref_labels, ref_offset, "negative")


def triplet_mask(labels: Any) -> np.ndarray:
    """``mask[a, p, n]`` is True for every valid triplet of one batch.

    Valid means ``a != p``, ``labels[a] == labels[p]`` and
    ``labels[n] != labels[a]`` (the batch-all mask of Moindrot's
    tensorflow-triplet-loss).  The result has N^3 entries, so N is limited to
    :data:`TRIPLET_MASK_MAX_N`; the streaming miners and losses handle any N in
    linear memory.
    """
    codes, _ = check.labels(labels)
    n = codes.shape[0]
    if n > TRIPLET_MASK_MAX_N:
        raise ValueError(
            f"triplet_mask: labels has {n} entries, above TRIPLET_MASK_MAX_N = "
            f"{TRIPLET_MASK_MAX_N} (the mask would take {n ** 3 / 2 ** 30:.1f} GiB); use the "
            f"streaming miners and losses (batch_hard, semi_hard, triplet_loss with "
            f"mining='batch_all'), which never materialise it"
        )
    mask = np.empty((n, n, n), dtype=bool)
    if mask.size:
        _core.triplet_mask(codes, mask)
    return mask
