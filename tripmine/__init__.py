"""tripmine: triplet mining and metric-learning losses, fast, exact, in linear memory.

Architecture
------------
::

    tripmine.<function>(x, labels, ...)          public modules, one concept each
          |                                      (distances, masks, miners, losses, heads,
          |                                       center, runtime)
          v
    tripmine._validation                         dtype, shape, labels -> int64 codes,
          |                                      check_finite, out= checks
          v
    tripmine._core  -- cffi -->  C core (csrc/)  status codes -> exceptions in one place
                                    |
                                    v
                  tile engine: anchor blocks x reference blocks (own thread pool)
                  micro-kernel (generic | avx2 | avx512) -> tile of distances -> reducer

Every miner and loss is one walk of the tile engine with its own reducer; only
functions whose *output* is a matrix (``pairwise_distances``, the masks)
allocate N x M.  See README.md for the semantics (metrics, self mode, ties).
"""

from . import _core, center, heads, lifted, margin, metrics, sampling
from .center import CenterLossResult, center_loss, update_centers
from .distances import pairwise_distances
from .heads import (
    SoftmaxLossResult,
    arcface_loss,
    combined_margin_loss,
    cosface_loss,
    large_margin_softmax_loss,
    normface_loss,
    softmax_loss,
    sphereface_loss,
)
from .lifted import LiftedStructuredLossResult, lifted_structured_loss
from .losses import ContrastiveLossResult, TripletLossResult, contrastive_loss, triplet_loss
from .margin import MarginLossResult, margin_loss
from .masks import TRIPLET_MASK_MAX_N, negative_mask, positive_mask, triplet_mask
from .miners import Triplets, batch_hard, distance_weighted, semi_hard
from .runtime import build_info, get_num_threads, set_num_threads

__version__ = _core.build_facts()["version"]

__all__ = [
    "TRIPLET_MASK_MAX_N",
    "CenterLossResult",
    "ContrastiveLossResult",
    "LiftedStructuredLossResult",
    "MarginLossResult",
    "SoftmaxLossResult",
    "TripletLossResult",
    "Triplets",
    "arcface_loss",
    "batch_hard",
    "build_info",
    "center",
    "center_loss",
    "combined_margin_loss",
    "contrastive_loss",
    "cosface_loss",
    "distance_weighted",
    "get_num_threads",
    "heads",
    "large_margin_softmax_loss",
    "lifted",
    "lifted_structured_loss",
    "margin",
    "margin_loss",
    "metrics",
    "negative_mask",
    "normface_loss",
    "pairwise_distances",
    "positive_mask",
    "sampling",
    "semi_hard",
    "set_num_threads",
    "softmax_loss",
    "sphereface_loss",
    "triplet_loss",
    "triplet_mask",
    "update_centers",
]
