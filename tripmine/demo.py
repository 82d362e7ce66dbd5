"""``python -m tripmine demo``: metric learning on handwritten digits, in NumPy.

The demo trains a small multilayer perceptron to embed scikit-learn's 8x8
handwritten digits (``sklearn.datasets.load_digits``: 1,797 real images, no
download) so that images of the same digit lie close together, then measures
retrieval on held-out images:

* data: a stratified split by samples -- the network trains on one part and
  retrieval is evaluated on the other (the protocol of pytorch-metric-learning's
  MNIST examples).  ``open_set=True`` instead trains on some digit classes and
  evaluates on the others, never seen in training;
* model: ``Linear -> ReLU -> ... -> Linear -> L2-normalise``, forward and
  backward written by hand in NumPy, trained with Adam on P x K batches from
  :class:`tripmine.sampling.PKSampler`;
* loss and gradient: :func:`tripmine.triplet_loss` (batch-hard by default, any
  mining rule), :func:`tripmine.contrastive_loss`,
  :func:`tripmine.lifted_structured_loss` (``--loss lifted``), or a margin-softmax head of
  :mod:`tripmine.heads` (``--loss arcface`` and the others), whose class weights
  the optimiser updates beside the network's;
* evaluation: Recall@1 and MAP@R (:mod:`tripmine.metrics`) of the held-out
  images in self mode (each held-out image queries all the others) for three
  embeddings: the raw pixels, the untrained network and the trained network.

:func:`run` does everything and returns the figures; the command line
(``tripmine/__main__.py``) only parses options.  The pieces (:class:`MLP`,
:class:`Adam`, :func:`train`, :func:`evaluate`) need only NumPy and tripmine;
the data, the plot and the progress bar need the ``demo`` extra
(scikit-learn, matplotlib, tqdm), imported only when used.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from . import heads, runtime
from .center import center_loss, update_centers
from .lifted import lifted_structured_loss
from .losses import MINING, contrastive_loss, triplet_loss
from .margin import margin_loss
from .metrics import mean_average_precision_at_r, recall_at_k
from .sampling import PKSampler

__all__ = [
    "DemoConfig",
    "MissingDependencyError",
    "MLP",
    "Adam",
    "DigitsSplit",
    "load_digits_split",
    "train",
    "evaluate",
    "run",
]

DEFAULT_PLOT = "tripmine-demo.png"
INSTALL_HINT = ("pip install 'tripmine[demo]'  (in a source checkout: pip install -e '.[demo]')")
#: The margin-softmax heads (tripmine.heads) the demo trains with, and their options on digits:
#: a smaller scale than the face-recognition defaults (64), which suit thousands of classes
#: and 512-d embeddings, not 10 digits.  ``--margin`` sets each head's margin.
HEAD_LOSSES = {
    "softmax": (heads.softmax_loss, {}, None),
    "normface": (heads.normface_loss, {"scale": 16.0}, None),
    "cosface": (heads.cosface_loss, {"scale": 16.0, "margin": 0.35}, "margin"),
    "arcface": (heads.arcface_loss, {"scale": 16.0, "margin": 0.5}, "margin"),
    "combined": (heads.combined_margin_loss, {"scale": 16.0}, "m2"),
    "sphereface": (heads.sphereface_loss, {"margin": 2, "lambda_": 1.0}, "margin"),
    "lsoftmax": (heads.large_margin_softmax_loss, {"margin": 2, "lambda_": 1.0}, "margin"),
}
#: ``--loss center``: the center loss beside a softmax head, as Wen et al. train it
#: (softmax + lambda * center, centers moved by the paper's rule with alpha 0.5); lambda
#: suits unit-norm 64-d embeddings (the paper's 0.003 is for 512-d faces); ``--margin``
#: sets it.
CENTER_LAMBDA = 0.2
CENTER_ALPHA = 0.5
#: ``--loss margin``: Wu et al.'s margin loss over distance-weighted triplets, one beta per
#: class learned with the network (Adam, like every other parameter); ``--margin`` sets alpha.
MARGIN_ALPHA = 0.2
MARGIN_BETA = 1.2
#: ``--loss lifted``: Song et al.'s lifted structured loss over every positive pair of the
#: batch; ``--margin`` sets neg_margin (default CONTRASTIVE_MARGIN, Song's 1).
LOSSES = ("triplet", "contrastive", "lifted", *HEAD_LOSSES, "center", "margin")


def _active_label(loss: str) -> str:
    """What the demo's second curve shows for this loss."""
    if loss == "margin":
        return "fraction of active hinge terms"
    if loss in HEAD_LOSSES or loss == "center":
        return "training accuracy (top-1 without margin)"
    if loss == "lifted":
        return "fraction of active positive pairs"
    return "fraction of active " + ("pairs" if loss == "contrastive" else "triplets")


def _trains_a_head(loss: str) -> bool:
    """Whether the loss has class weights (or margin's per-class beta) trained with the
    network."""
    return loss in HEAD_LOSSES or loss in ("center", "margin")
PROJECTIONS = ("tsne", "pca")
#: Default margins, tuned on the closed-set split (unit-norm embeddings: distances in [0, 2]).
TRIPLET_MARGIN = 0.8
CONTRASTIVE_MARGIN = 1.0
#: Digit classes seen in training with ``open_set=True``; the others are only evaluated.
OPEN_SET_TRAIN_CLASSES = (0, 1, 2, 3, 4)


class MissingDependencyError(ImportError):
    """An optional package of the ``demo`` extra is not installed."""


def _require(module: str, package: str, purpose: str) -> Any:
    """Import an optional dependency, or explain which package to install."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependencyError(
            f"the demo needs {package} for {purpose}, but importing {module!r} failed ({exc}).\n"
            f"Install the demo extra: {INSTALL_HINT}"
        ) from exc


@dataclass(frozen=True)
class DemoConfig:
    """Every knob of the demo; the command-line options map onto these fields."""

    seed: int = 0
    epochs: int = 60
    steps: int | None = None  # total optimiser steps; None: epochs x batches per epoch
    mining: str = "batch_hard"
    loss: str = "triplet"
    margin: float | None = None  # None: TRIPLET_MARGIN or CONTRASTIVE_MARGIN
    p: int | None = None  # classes per batch; None: every training class
    k: int = 16  # images per class in a batch
    lr: float = 3e-3
    dim: int = 64
    hidden: tuple[int, ...] = (256, 128)
    open_set: bool = False
    test_fraction: float = 0.5
    projection: str = "tsne"
    dtype: str = "float32"

    def resolved_margin(self) -> float:
        if self.margin is not None:
            return float(self.margin)
        return TRIPLET_MARGIN if self.loss == "triplet" else CONTRASTIVE_MARGIN

    def check(self) -> None:
        """Refuse impossible settings with a message naming the option."""
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {list(LOSSES)}, got {self.loss!r}")
        if self.mining not in MINING:
            raise ValueError(f"mining must be one of {list(MINING)}, got {self.mining!r}")
        if self.projection not in PROJECTIONS:
            raise ValueError(f"projection must be one of {list(PROJECTIONS)}, "
                             f"got {self.projection!r}")
        for name in ("epochs", "k", "dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.k < 2:
            raise ValueError("k must be >= 2: a batch needs two images of a class for a positive")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.p is not None and self.p < 2:
            raise ValueError("p must be >= 2: a batch needs two classes for a negative")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.margin is not None and not self.margin >= 0:
            raise ValueError(f"margin must be >= 0, got {self.margin}")
        if not 0 < self.test_fraction < 1:
            raise ValueError(f"test_fraction must be in (0, 1), got {self.test_fraction}")
        if any(width < 1 for width in self.hidden):
            raise ValueError(f"hidden widths must be >= 1, got {list(self.hidden)}")


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class DigitsSplit:
    """Training and held-out images (pixel values 0..16, float64) and their digits."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    protocol: str  # "closed-set" (split by samples) or "open-set" (split by classes)


def load_digits_split(seed: int = 0, *, open_set: bool = False,
                      test_fraction: float = 0.5) -> DigitsSplit:
    """Split scikit-learn's digits for training and retrieval evaluation.

    Closed set (default): a stratified split by samples -- every digit is in
    both parts, ``test_fraction`` of each class's images held out.  Open set:
    train on every image of the digits in :data:`OPEN_SET_TRAIN_CLASSES`,
    evaluate on every image of the other digits.
    """
    datasets = _require("sklearn.datasets", "scikit-learn", "the digits dataset")
    x, y = datasets.load_digits(return_X_y=True)
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.int64)
    if open_set:
        seen = np.isin(y, OPEN_SET_TRAIN_CLASSES)
        return DigitsSplit(x[seen], y[seen], x[~seen], y[~seen], "open-set")
    rng = np.random.default_rng(np.random.SeedSequence([seed, 1]))
    test = np.zeros(len(y), dtype=bool)
    for digit in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == digit))
        test[members[: int(round(test_fraction * len(members)))]] = True
    return DigitsSplit(x[~test], y[~test], x[test], y[test], "closed-set")


class Standardizer:
    """Per-pixel centring and scaling fitted on the training images only."""

    def __init__(self, x: np.ndarray):
        self.mean = x.mean(axis=0)
        # Border pixels of the digits are (almost) always 0: do not blow them up.
        self.scale = np.maximum(x.std(axis=0), 1.0)

    def __call__(self, x: np.ndarray, dtype: Any = np.float32) -> np.ndarray:
        return ((x - self.mean) / self.scale).astype(dtype)


# --------------------------------------------------------------------------- model


class MLP:
    """A multilayer perceptron with L2-normalised output, forward and backward by hand.

    ``y = normalize(W_L relu(... relu(x W_1 + b_1) ...) + b_L)``: ReLU between
    layers, no activation on the last one, then each row divided by its norm so
    the embeddings lie on the unit sphere.  Weights start with He
    initialisation (``N(0, 2 / fan_in)``), biases at 0.
    """

    def __init__(self, sizes: Sequence[int], *, seed: int | np.random.Generator = 0,
                 dtype: Any = np.float32):
        if len(sizes) < 2:
            raise ValueError(f"sizes needs an input and an output width, got {list(sizes)}")
        rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
        self.sizes = tuple(int(s) for s in sizes)
        self.dtype = np.dtype(dtype)
        self.params: list[np.ndarray] = []
        for fan_in, fan_out in zip(self.sizes[:-1], self.sizes[1:]):
            weight = rng.standard_normal((fan_in, fan_out)) * np.sqrt(2.0 / fan_in)
            self.params += [weight.astype(self.dtype), np.zeros(fan_out, dtype=self.dtype)]

    def copy(self) -> MLP:
        clone = object.__new__(MLP)
        clone.sizes, clone.dtype = self.sizes, self.dtype
        clone.params = [p.copy() for p in self.params]
        return clone

    def forward(self, x: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        """Embeddings of the rows of ``x`` and what :meth:`backward` needs."""
        h = np.asarray(x, dtype=self.dtype)
        cache = [h]  # the input of every layer, then the pre-normalisation output
        n_layers = len(self.params) // 2
        for layer in range(n_layers):
            weight, bias = self.params[2 * layer], self.params[2 * layer + 1]
            h = h @ weight + bias
            if layer < n_layers - 1:
                h = np.maximum(h, 0)
            cache.append(h)
        norms = np.sqrt(np.einsum("ij,ij->i", h, h))[:, None]
        out = h / np.maximum(norms, np.finfo(self.dtype).tiny)
        return out, cache

    def __call__(self, x: np.ndarray, batch_size: int = 4096) -> np.ndarray:
        """Embeddings only (evaluated in batches)."""
        parts = [self.forward(x[i:i + batch_size])[0] for i in range(0, len(x), batch_size)]
        return np.concatenate(parts) if parts else np.zeros((0, self.sizes[-1]), self.dtype)

    def backward(self, cache: list[np.ndarray], grad_out: np.ndarray) -> list[np.ndarray]:
        """Gradients of the loss with respect to :attr:`params`, given dL/d(output).

        Normalisation ``y = z / |z|`` has Jacobian ``(I - y y^T) / |z|``; a ReLU
        passes the gradient where its output is positive; a linear layer
        ``z = h W + b`` gives ``dW = h^T dz``, ``db = sum dz``, ``dh = dz W^T``.
        """
        z = cache[-1]
        norms = np.sqrt(np.einsum("ij,ij->i", z, z))[:, None]
        safe = np.maximum(norms, np.finfo(self.dtype).tiny)
        y = z / safe
        grad = np.asarray(grad_out, dtype=self.dtype)
        grad = (grad - y * np.einsum("ij,ij->i", y, grad)[:, None]) / safe
        grad = np.where(norms > 0, grad, 0)  # subgradient 0 at z = 0
        n_layers = len(self.params) // 2
        grads: list[np.ndarray] = [None] * len(self.params)  # type: ignore[list-item]
        for layer in reversed(range(n_layers)):
            h_in = cache[layer]
            if layer < n_layers - 1:
                grad = grad * (cache[layer + 1] > 0)
            grads[2 * layer] = h_in.T @ grad
            grads[2 * layer + 1] = grad.sum(axis=0)
            if layer:
                grad = grad @ self.params[2 * layer].T
        return grads


class Adam:
    """Adam (Kingma & Ba 2015) with bias correction, updating arrays in place."""

    def __init__(self, params: list[np.ndarray], lr: float = 1e-3, beta1: float = 0.9,
                 beta2: float = 0.999, eps: float = 1e-8):
        self.params, self.lr, self.beta1, self.beta2, self.eps = params, lr, beta1, beta2, eps
        self.first = [np.zeros_like(p) for p in params]
        self.second = [np.zeros_like(p) for p in params]
        self.t = 0

    def step(self, grads: Sequence[np.ndarray], lr: float | None = None) -> None:
        self.t += 1
        lr = self.lr if lr is None else lr
        step_size = lr * np.sqrt(1 - self.beta2 ** self.t) / (1 - self.beta1 ** self.t)
        for param, g, m, v in zip(self.params, grads, self.first, self.second):
            m *= self.beta1
            m += (1 - self.beta1) * g
            v *= self.beta2
            v += (1 - self.beta2) * (g * g)
            param -= (step_size * m / (np.sqrt(v) + self.eps)).astype(param.dtype)


# --------------------------------------------------------------------------- training


@dataclass
class History:
    """Per-step loss and fraction of active triplets (or pairs)."""

    loss: list[float] = field(default_factory=list)
    fraction_active: list[float] = field(default_factory=list)
    seconds: float = 0.0


def loss_and_grad(config: DemoConfig, embeddings: np.ndarray, labels: np.ndarray,
                  seed: int, weight: np.ndarray | None = None,
                  centers: np.ndarray | None = None
                  ) -> tuple[float, np.ndarray, float, np.ndarray | None]:
    """The configured loss of one batch: value, dL/d(embeddings), fraction active (the
    training accuracy for a head) and, for a head, dL/d(its class weights).  ``--loss
    center`` reads ``centers`` (train() moves them after the step, by the paper's rule)."""
    if config.loss == "margin":
        alpha = MARGIN_ALPHA if config.margin is None else float(config.margin)
        result = margin_loss(embeddings, labels, margin=alpha, beta=weight[:, 0], seed=seed)
        return (result.loss, result.grad, result.fraction_active,
                result.beta_grad.astype(weight.dtype)[:, None])
    if config.loss == "center":
        lam = CENTER_LAMBDA if config.margin is None else float(config.margin)
        soft = heads.softmax_loss(embeddings, labels, weight, bias=None)
        pull = center_loss(embeddings, labels, centers, centers_grad=False)
        return (soft.loss + lam * pull.loss, soft.grad + lam * pull.grad, soft.accuracy,
                soft.weight_grad)
    if config.loss in HEAD_LOSSES:
        fn, options, margin_name = HEAD_LOSSES[config.loss]
        if config.margin is not None and margin_name is not None:
            options = {**options, margin_name: (int(config.margin) if margin_name == "margin"
                                                and config.loss in ("sphereface", "lsoftmax")
                                                else config.margin)}
        result = fn(embeddings, labels, weight, **options)
        return result.loss, result.grad, result.accuracy, result.weight_grad
    if config.loss == "contrastive":
        result = contrastive_loss(embeddings, labels, neg_margin=config.resolved_margin())
    elif config.loss == "lifted":
        result = lifted_structured_loss(embeddings, labels, neg_margin=config.resolved_margin())
    else:
        result = triplet_loss(embeddings, labels, mining=config.mining,
                              margin=config.resolved_margin(), seed=seed)
    return result.loss, result.grad, result.fraction_active, None


def train(model: MLP, x: np.ndarray, labels: np.ndarray, config: DemoConfig, *,
          progress: bool = False,
          callback: Callable[[int, float, float], None] | None = None) -> History:
    """Train ``model`` in place on P x K batches; returns the loss history.

    The learning rate follows a cosine schedule from ``config.lr`` to 0 over
    the run.  ``progress=True`` shows a tqdm bar with the running (moving
    average) loss and fraction of active triplets; ``callback(step, loss, fraction_active)`` is
    called after every step.
    """
    config.check()
    classes = np.unique(labels)
    p = len(classes) if config.p is None else config.p
    if p > len(classes):
        raise ValueError(f"p = {p} classes per batch, but the training set has only "
                         f"{len(classes)} classes")
    seeds = np.random.SeedSequence([config.seed, 2]).generate_state(2, dtype=np.uint64)
    sampler = PKSampler(labels, p, config.k, seed=int(seeds[0]))
    total = config.steps if config.steps is not None else config.epochs * len(sampler)
    loss_seed = int(seeds[1])

    bar = None
    if progress:
        tqdm = _require("tqdm", "tqdm", "the progress bar (or pass --no-progress)")
        bar = tqdm.tqdm(total=total, desc="training", unit="step", leave=True,
                        dynamic_ncols=True)
    # A head's class weights (one row per training class, labels mapped to 0..C-1) are
    # trained with the network.
    head = _trains_a_head(config.loss)
    classes_index = np.searchsorted(classes, labels)
    weight = centers = None
    if config.loss == "margin":  # one beta per class, as a (C, 1) parameter
        weight = np.full((len(classes), 1), MARGIN_BETA, dtype=config.dtype)
    elif head:
        rng = np.random.default_rng(np.random.SeedSequence([config.seed, 4]))
        weight = (0.01 * rng.standard_normal((len(classes), config.dim))).astype(config.dtype)
    if config.loss == "center":
        centers = np.zeros((len(classes), config.dim), dtype=config.dtype)
    optimizer = Adam(model.params + ([weight] if head else []), lr=config.lr)
    history = History()
    running_loss = running_active = None
    start = time.perf_counter()
    step = 0
    epoch = 0
    try:
        while step < total:
            sampler.set_epoch(epoch)
            for batch in sampler:
                if step >= total:
                    break
                out, cache = model.forward(x[batch])
                batch_labels = classes_index[batch] if head else labels[batch]
                loss, grad_out, active, weight_grad = loss_and_grad(
                    config, out, batch_labels, (loss_seed + step) % 2**63, weight, centers)
                if centers is not None:  # after the loss, from the centers it used
                    update_centers(centers, out, batch_labels, alpha=CENTER_ALPHA)
                lr = 0.5 * config.lr * (1 + np.cos(np.pi * step / total))
                grads = model.backward(cache, grad_out)
                optimizer.step(grads + ([weight_grad] if head else []), lr=lr)
                history.loss.append(float(loss))
                history.fraction_active.append(float(active))
                step += 1
                if running_loss is None:
                    running_loss, running_active = loss, active
                running_loss = 0.9 * running_loss + 0.1 * loss  # exponential moving averages
                running_active = 0.9 * running_active + 0.1 * active
                if bar is not None:
                    bar.set_postfix(epoch=epoch, loss=f"{running_loss:.4f}",
                                    active=f"{running_active:.3f}", refresh=False)
                    bar.update(1)
                if callback is not None:
                    callback(step, float(loss), float(active))
            epoch += 1
    finally:
        if bar is not None:
            bar.close()
    history.seconds = time.perf_counter() - start
    return history


# --------------------------------------------------------------------------- evaluation


def evaluate(embeddings: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Recall@1 and MAP@R of held-out embeddings, each querying all the others."""
    return {
        "recall_at_1": float(recall_at_k(embeddings, labels, 1)),
        "map_at_r": float(mean_average_precision_at_r(embeddings, labels)),
    }


def project_2d(embeddings: np.ndarray, method: str = "pca", seed: int = 0) -> np.ndarray:
    """A 2-D picture of the embeddings: PCA (NumPy SVD) or t-SNE (scikit-learn)."""
    data = np.asarray(embeddings, dtype=np.float64)
    if method == "tsne":
        manifold = _require("sklearn.manifold", "scikit-learn", "the t-SNE projection")
        tsne = manifold.TSNE(n_components=2, init="pca", learning_rate="auto", perplexity=30.0,
                             random_state=seed)
        return tsne.fit_transform(data)
    centred = data - data.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    return centred @ vt[:2].T


def format_table(results: dict[str, dict[str, float]]) -> str:
    names = {"raw_pixels": "raw pixels", "untrained": "untrained network",
             "trained": "trained network"}
    lines = [f"{'embedding (held-out images)':<28}{'Recall@1':>10}{'MAP@R':>10}"]
    for key, values in results.items():
        lines.append(f"{names.get(key, key):<28}{values['recall_at_1']:>10.4f}"
                     f"{values['map_at_r']:>10.4f}")
    return "\n".join(lines)


def save_plot(path: str | os.PathLike, history: History, before: np.ndarray,
              after: np.ndarray, labels: np.ndarray, *, title: str = "",
              projection: str = "pca", scores: dict[str, dict[str, float]] | None = None,
              active_label: str = "fraction of active triplets",
              subject: str = "held-out images") -> None:
    """PNG: the loss curve, and 2-D projections of embeddings before and after training.

    Uses matplotlib's object-oriented API with the Agg canvas, so no global
    backend or pyplot state is touched.
    """
    _require("matplotlib", "matplotlib", "the plot")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(15, 4.6), layout="constrained")
    FigureCanvasAgg(figure)
    ax_loss, ax_before, ax_after = figure.subplots(1, 3)
    steps = np.arange(1, len(history.loss) + 1)
    ax_loss.plot(steps, history.loss, color="0.75", lw=0.8, label="loss per batch")
    if len(history.loss) >= 5:
        width = max(5, len(history.loss) // 40)
        smooth = np.convolve(history.loss, np.ones(width) / width, mode="valid")
        ax_loss.plot(steps[width - 1:], smooth, color="C0", lw=1.8, label=f"mean of {width}")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("loss")
    ax_loss.set_title("training loss")
    active = ax_loss.twinx()
    active.plot(steps, history.fraction_active, color="C3", lw=0.8, alpha=0.7)
    active.set_ylabel(active_label, color="C3")
    active.set_ylim(0, 1.05)
    ax_loss.legend(loc="upper right", fontsize=8)
    for ax, points, name, key in ((ax_before, before, "untrained network", "untrained"),
                                  (ax_after, after, "trained network", "trained")):
        scatter = ax.scatter(points[:, 0], points[:, 1], c=labels, cmap="tab10", s=7,
                             vmin=-0.5, vmax=9.5)
        subtitle = f"{subject}, {name} ({projection.upper()})"
        if scores and key in scores:
            subtitle += f"\nMAP@R {scores[key]['map_at_r']:.3f}, " \
                        f"Recall@1 {scores[key]['recall_at_1']:.3f}"
        ax.set_title(subtitle, fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    figure.colorbar(scatter, ax=[ax_before, ax_after], ticks=range(10), label="digit",
                    shrink=0.8)
    if title:
        figure.suptitle(title)
    figure.savefig(os.fspath(path), dpi=100)


# --------------------------------------------------------------------------- the demo


def _describe(config: DemoConfig, split: DigitsSplit, p: int) -> list[str]:
    train_classes = np.unique(split.y_train)
    test_classes = np.unique(split.y_test)
    if split.protocol == "open-set":
        data = (f"digits (sklearn load_digits), open set: train on digits "
                f"{','.join(map(str, train_classes))} ({len(split.y_train)} images), evaluate "
                f"on unseen digits {','.join(map(str, test_classes))} ({len(split.y_test)} "
                f"images)")
    else:
        data = (f"digits (sklearn load_digits), split by samples: {len(split.y_train)} "
                f"training / {len(split.y_test)} held-out images, {len(test_classes)} classes")
    widths = "-".join(str(s) for s in (split.x_train.shape[1], *config.hidden, config.dim))
    if config.loss == "margin":
        alpha = MARGIN_ALPHA if config.margin is None else config.margin
        loss = (f"margin loss (alpha {alpha:g}, distance-weighted triplets), one beta per class "
                f"(from {MARGIN_BETA:g}) trained with the network")
    elif config.loss == "center":
        lam = CENTER_LAMBDA if config.margin is None else config.margin
        loss = (f"softmax head + {lam:g} x center loss (centers by the paper's update, "
                f"alpha {CENTER_ALPHA:g}), class weights trained with the network")
    elif config.loss in HEAD_LOSSES:
        fn, options, _ = HEAD_LOSSES[config.loss]
        shown = ", ".join(f"{k} {v:g}" for k, v in options.items())
        loss = (f"{fn.__name__} head{f' ({shown})' if shown else ''}"
                + (f", margin {config.margin:g}" if config.margin is not None else "")
                + ", class weights trained with the network")
    elif config.loss == "contrastive":
        loss = f"contrastive loss (neg_margin {config.resolved_margin():g})"
    elif config.loss == "lifted":
        loss = f"lifted structured loss (neg_margin {config.resolved_margin():g})"
    else:
        loss = f"{config.mining} triplet loss (margin {config.resolved_margin():g})"
    model = (f"model: NumPy MLP {widths}, L2-normalised output; Adam lr {config.lr:g} "
             f"(cosine decay); batches {p} x {config.k} (PKSampler); {loss}; seed {config.seed}")
    return [data, model]


@contextlib.contextmanager
def limit_threads(threads: int | None) -> Iterator[None]:
    """Run tripmine's C core and NumPy's BLAS on ``threads`` threads, restoring both after.

    ``None`` leaves both alone.  BLAS is limited through threadpoolctl (a
    dependency of scikit-learn) when it is installed.
    """
    if threads is None:
        yield
        return
    previous = runtime.get_num_threads()
    runtime.set_num_threads(threads)
    try:
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:
            yield
        else:
            with threadpool_limits(limits=threads):
                yield
    finally:
        runtime.set_num_threads(previous)


def run(config: DemoConfig = DemoConfig(), *, plot: str | os.PathLike | None = DEFAULT_PLOT,
        json_path: str | os.PathLike | None = None, progress: bool = True,
        threads: int | None = 1, out: Any = None) -> dict[str, Any]:
    """Run the whole demo; print a report to ``out`` (stdout) and return the figures.

    ``threads`` (default 1) is used by tripmine and NumPy's BLAS during the run
    (:func:`limit_threads`): a batch of a few hundred small embeddings is far too
    little work to share, so one thread is the fastest; ``None`` changes nothing.

    The returned dict is what ``--json`` writes: ``embeddings`` maps
    ``raw_pixels``, ``untrained`` and ``trained`` to ``{"recall_at_1",
    "map_at_r"}``; ``seconds`` is the wall time of the run; the other keys
    describe the data, the settings and the training.
    """
    start = time.perf_counter()
    out = sys.stdout if out is None else out
    config.check()
    # Fail before any work if an optional package is missing.
    _require("sklearn", "scikit-learn", "the digits dataset")
    if plot is not None:
        _require("matplotlib", "matplotlib", "the plot")
    if progress:
        _require("tqdm", "tqdm", "the progress bar (or pass --no-progress)")

    with limit_threads(threads):
        split = load_digits_split(config.seed, open_set=config.open_set,
                                  test_fraction=config.test_fraction)
        p = len(np.unique(split.y_train)) if config.p is None else config.p
        for line in _describe(config, split, p):
            print(line, file=out)
        out.flush()

        standardize = Standardizer(split.x_train)
        x_train = standardize(split.x_train, config.dtype)
        x_test = standardize(split.x_test, config.dtype)
        model = MLP((x_train.shape[1], *config.hidden, config.dim), dtype=config.dtype,
                    seed=np.random.default_rng(np.random.SeedSequence([config.seed, 3])))
        untrained = model(x_test)
        history = train(model, x_train, split.y_train, config, progress=progress)
        trained = model(x_test)

        scores = {
            "raw_pixels": evaluate(split.x_test, split.y_test),
            "untrained": evaluate(untrained, split.y_test),
            "trained": evaluate(trained, split.y_test),
        }
        print(format_table(scores), file=out)
        print("(MAP@R is the headline: Recall@1 is nearly saturated on digits, even for raw "
              "pixels)", file=out)
        out.flush()

        if plot is not None:
            what = config.loss if config.loss != "triplet" else config.mining
            title = f"tripmine demo: digits, {split.protocol}, {what} loss"
            save_plot(plot, history, project_2d(untrained, config.projection, config.seed),
                      project_2d(trained, config.projection, config.seed), split.y_test,
                      title=title, projection=config.projection, scores=scores,
                      active_label=_active_label(config.loss),
                      subject="unseen digits" if config.open_set else "held-out images")
            print(f"plot: {os.fspath(plot)}", file=out)

    seconds = time.perf_counter() - start
    report = {
        "embeddings": scores,
        "seconds": round(seconds, 3),
        "training_seconds": round(history.seconds, 3),
        "steps": len(history.loss),
        "initial_loss": float(np.mean(history.loss[:10])),  # mean of the first 10 steps
        "final_loss": float(np.mean(history.loss[-10:])),  # and of the last 10
        "final_fraction_active": float(np.mean(history.fraction_active[-10:])),
        "protocol": split.protocol,
        "n_train": int(len(split.y_train)),
        "n_test": int(len(split.y_test)),
        "train_classes": [int(c) for c in np.unique(split.y_train)],
        "test_classes": [int(c) for c in np.unique(split.y_test)],
        "threads": threads,
        "config": {**dataclasses.asdict(config), "hidden": list(config.hidden),
                   "margin": (config.margin if _trains_a_head(config.loss)
                              else config.resolved_margin()), "p": p},
    }
    if json_path is not None:
        with open(json_path, "w", encoding="utf-8") as handle:
            json.dump(report, handle, indent=2)
            handle.write("\n")
        print(f"json: {os.fspath(json_path)}", file=out)
    print(f"done in {seconds:.1f} s (training {history.seconds:.1f} s, "
          f"{len(history.loss)} steps)", file=out)
    return report
