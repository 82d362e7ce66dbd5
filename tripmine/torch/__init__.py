"""tripmine for PyTorch: triplet and contrastive losses as autograd functions and modules.

Install with ``pip install 'tripmine[torch]'``.  ``import tripmine`` never imports
torch; ``import tripmine.torch`` does.

::

    from tripmine.torch import TripletLoss

    criterion = TripletLoss(mining="batch_hard", margin=0.2, normalize=True)
    loss = criterion(model(images), labels)      # 0-d tensor
    loss.backward()                              # tripmine's analytic gradient
    print(criterion.fraction_active)             # the last call's counts

How it works: a ``torch.autograd.Function`` hands the embeddings to the C core
(CPU tensors as NumPy views, no copy) or to tripmine's CuPy path (CUDA tensors,
through DLPack, on torch's current stream).  tripmine returns the loss and its
gradient in one call; backward scales that gradient by ``grad_output``.  No
autograd graph is built through the distances or the mining.

* :class:`TripletLoss`, :func:`triplet_loss` -- every mining rule of
  :func:`tripmine.triplet_loss`, plus the miners' options;
* :class:`ContrastiveLoss`, :func:`contrastive_loss`;
* :class:`SoftmaxLoss`, :class:`NormFace`, :class:`CosFace`, :class:`ArcFace`,
  :class:`CombinedMargin`, :class:`SphereFace`, :class:`LargeMarginSoftmax` -- the
  margin-softmax heads, each owning its class weights (``tripmine.heads``);
* :class:`MarginLoss` -- the margin loss with a learnable beta (``tripmine.margin``);
* :class:`LiftedStructuredLoss` -- the lifted structured loss, Song et al.'s form or the
  generalized one (``tripmine.lifted``);
* :class:`CenterLoss` -- the center loss with the paper's center update (or SGD on the
  centers), ``tripmine.center``;
* :class:`MemoryBank` -- cross-batch memory (XBM): mine each batch against
  thousands of past embeddings.
"""

from .center import CenterLoss
from .heads import (
    ArcFace,
    CombinedMargin,
    CosFace,
    LargeMarginSoftmax,
    NormFace,
    SoftmaxLoss,
    SphereFace,
)
from .lifted import LiftedStructuredLoss
from .losses import ContrastiveLoss, TripletLoss, contrastive_loss, triplet_loss
from .margin import MarginLoss
from .memory import MemoryBank

__all__ = ["ArcFace", "CenterLoss", "CombinedMargin", "ContrastiveLoss", "CosFace",
           "LargeMarginSoftmax", "LiftedStructuredLoss", "MarginLoss", "MemoryBank", "NormFace",
           "SoftmaxLoss", "SphereFace", "TripletLoss", "contrastive_loss", "triplet_loss"]
