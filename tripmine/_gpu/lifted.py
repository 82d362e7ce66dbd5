"""The lifted structured loss on CuPy arrays (reached through tripmine._dispatch when ``x``
or ``ref`` is a CuPy array): the CPU's validation and messages, the device problem of
:func:`tripmine._gpu.prepare` (normalize included), then the array-module walk of
:mod:`tripmine._fused_lifted` with cuBLAS products.  Results are CuPy arrays on ``x``'s
device; ``loss`` is a Python float (one synchronisation), or a device vector for
``reduction="none"``.

Block size: the smaller of ``_fused_lifted.BLOCK_ELEMENTS`` pair entries and
``TRIPMINE_GPU_CHUNK_BYTES`` (default 1 GiB) over BYTES_PER_ENTRY, so memory stays
O(block x M + (N + M) D).
"""

from __future__ import annotations

from typing import Any

import cupy as cp

from .. import _fused_lifted
from .. import lifted as cpu_lifted
from . import chunk_bytes, prepare

#: Device bytes per entry of a block of the pair matrix: the float64 distances, weights
#: and their temporaries (about ten float64 arrays) and the label masks.
BYTES_PER_ENTRY = 96


def block_elements() -> int:
    """Entries of the pair matrix one block holds (also the margin loss's batch-all walk)."""
    return max(1, min(_fused_lifted.BLOCK_ELEMENTS, chunk_bytes() // BYTES_PER_ENTRY))


def lifted_structured_loss(x: Any, labels: Any, *, neg_margin: float = 1.0,
                           pos_margin: float = 0.0, generalized: bool = False,
                           metric: str = "euclidean", normalize: bool = False,
                           reduction: str = "mean", ref: Any = None, ref_labels: Any = None,
                           ref_offset: int | None = None, grad: bool = True,
                           check_finite: bool = True) -> cpu_lifted.LiftedStructuredLossResult:
    neg_margin, pos_margin, generalized, reduction, want_grad = cpu_lifted._arguments(
        neg_margin, pos_margin, generalized, reduction, grad)
    problem = prepare(x, labels, ref, ref_labels, metric=metric, normalize=normalize,
                      check_finite=check_finite, ref_offset=ref_offset)
    loss, terms, active, g, rg = _fused_lifted.lifted_terms(
        cp, problem.x, problem.ref, problem.codes, problem.ref_codes, problem.ref_offset,
        metric, neg_margin, pos_margin, generalized, reduction, want_grad, block_elements())
    g, rg = problem.chain(g, rg)
    return cpu_lifted.LiftedStructuredLossResult(loss, g, rg, terms, active,
                                                 active / terms if terms else 0.0)
