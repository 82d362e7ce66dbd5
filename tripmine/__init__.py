"""tripmine: triplet mining and metric-learning losses, fast, exact, in linear memory.

Architecture
------------
::

    tripmine.<function>(x, labels, ...)          public modules, one concept each
          |                                      (distances, masks, miners, losses, runtime)
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

from . import _core, metrics, sampling
from .distances import pairwise_distances
from .losses import ContrastiveLossResult, TripletLossResult, contrastive_loss, triplet_loss
from .masks import TRIPLET_MASK_MAX_N, negative_mask, positive_mask, triplet_mask
from .miners import Triplets, batch_hard, distance_weighted, semi_hard
from .runtime import build_info, get_num_threads, set_num_threads

__version__ = _core.build_facts()["version"]

__all__ = [
    "TRIPLET_MASK_MAX_N",
    "ContrastiveLossResult",
    "TripletLossResult",
    "Triplets",
    "batch_hard",
    "build_info",
    "contrastive_loss",
    "distance_weighted",
    "get_num_threads",
    "metrics",
    "negative_mask",
    "pairwise_distances",
    "positive_mask",
    "sampling",
    "semi_hard",
    "set_num_threads",
    "triplet_loss",
    "triplet_mask",
]
