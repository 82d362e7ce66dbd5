"""P x K batch sampling: P classes, K samples of each, per batch.

Batch-hard and the other in-batch miners need every anchor to have positives
in its batch; drawing batches of P classes times K samples each (Hermans,
Beyer & Leibe 2017, "In Defense of the Triplet Loss for Person
Re-Identification") guarantees it.  :class:`PKSampler` draws such batches as
index arrays, seeded and reproducible per epoch, with an epoch that shows
every sample about once.  It needs nothing but NumPy, and it fits PyTorch's
``DataLoader(dataset, batch_sampler=sampler)`` as it is.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Union

import numpy as np

from . import _validation as check

__all__ = ["PKSampler"]

#: Seeds PKSampler accepts (``None``: fresh OS entropy).
SeedLike = Union[None, int, np.integer, np.random.SeedSequence, np.random.Generator]

# Epoch e draws from SeedSequence(entropy, spawn_key=(*spawn_key, _STREAM, e)): the extra
# word keeps these streams apart from the children seed.spawn() hands out to the caller.
_STREAM = 0x706B_7361  # "pksa"

# Quotas are computed in int64: batches_per_epoch * p * n_samples must stay below this.
_INT_LIMIT = 2**62


def _seed_sequence(seed: Any) -> np.random.SeedSequence:
    if seed is None:
        return np.random.SeedSequence()
    if isinstance(seed, np.random.SeedSequence):
        return seed
    if isinstance(seed, np.random.Generator):
        # Consume 128 bits from the caller's generator, as Generator.spawn would.
        return np.random.SeedSequence(seed.integers(0, 2**32, size=4, dtype=np.uint64).tolist())
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be None, a non-negative int, a numpy.random.SeedSequence "
                        f"or a numpy.random.Generator, got {type(seed).__name__}")
    if seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed}")
    return np.random.SeedSequence(int(seed))


class PKSampler:
    """Batches of ``p`` classes x ``k`` samples, as index arrays into ``labels``.

    Parameters
    ----------
    labels : array-like, 1-D
        One class label per sample (ints, strings, anything ``numpy.unique``
        sorts).  Batches hold positions into this array.
    p : int
        Classes per batch (all distinct); at most the number of classes.
    k : int
        Samples per class in a batch.
    seed : None, int, numpy.random.SeedSequence or numpy.random.Generator
        ``None`` draws fresh OS entropy (as NumPy does); the others make every
        epoch reproducible.  A Generator is consumed once, at construction.
        ``seed_sequence`` holds the seed actually used, so a ``seed=None`` run
        can be repeated with ``PKSampler(labels, p, k, seed=old.seed_sequence)``.
    batches_per_epoch : int, optional
        ``len(sampler)``.  Default ``ceil(n_samples / (p * k))``: one epoch
        holds as many slots as there are samples.

    Layout
    ------
    Each batch is a fresh 1-D ``numpy.int64`` array of length ``p * k``, class
    by class: ``labels[batch].reshape(p, k)`` has one class per row, and the
    ``p`` rows are ``p`` distinct classes in random order.  This is the P x K
    layout the miners expect (any order works for them; this one is readable).

    Semantics
    ---------
    * **Which classes.**  A class is visited in proportion to its size: over
      an epoch of ``B`` batches, class ``c`` with ``n_c`` of the ``N`` samples
      gets ``B * p * n_c / N`` visits (exactly, after rounding: the fractional
      parts are rounded up or down at random, unbiased, the total kept at
      ``B * p``).  A class holding more than ``N / p`` samples is capped at
      one visit per batch (``B`` visits) and the others share the rest in
      proportion.  The visits are then dealt into batches at random: each
      batch picks its ``p`` classes without replacement, weighted by the
      visits each class has left (a class whose visits left equal the batches
      left is always picked, so every quota is met).  Proportional visits are
      what make an epoch cover the data: every sample, not every class, gets
      an equal share of the batches (uniform class choice, as in
      pytorch-metric-learning's ``MPerClassSampler``, shows the samples of
      large classes rarely and those of small classes many times over).
    * **Which samples.**  A class with ``n_c >= k`` samples is drawn without
      replacement from a shuffled copy of its samples; when fewer than ``k``
      are left, the row takes those and tops up with the first of a fresh
      shuffle of the class's other samples, which begins the next pass (the
      leftovers go last in it).  So a row never repeats an index, and within
      an epoch no sample of such a class repeats before all of the class's
      samples have been drawn.  A class with ``n_c < k`` samples contributes
      a row holding each of its samples once plus ``k - n_c`` more drawn
      uniformly with replacement from them, shuffled; a one-sample class
      gives a row of ``k`` copies of its index (positives at distance 0:
      filter such classes out of ``labels`` if that matters).
    * **Coverage.**  With the default length, every class with ``k <= n_c <=
      N / p`` shows at least ``k * floor(n_c / k) > n_c - k`` distinct samples
      per epoch; if every ``n_c`` is a multiple of ``k`` (and at most
      ``N / p``) and ``N`` a multiple of ``p * k``, every sample is seen
      exactly once.  A class with ``n_c < k`` is visited with probability
      about ``n_c / k`` per epoch.
    * **Epochs.**  Epoch ``e``'s batches are a pure function of (seed, ``e``).
      ``iter(sampler)`` uses the current epoch (``sampler.epoch``, initially
      0) and advances it, so iterating again gives the next, different epoch;
      ``set_epoch(e)`` chooses it explicitly (PyTorch's
      ``DistributedSampler`` convention).  Two samplers with the same seed
      and labels give the same epochs.
    * **Cost.**  Construction sorts the labels once; each batch costs
      O(number of classes with visits left) plus O(``p * k``), drawn lazily
      as the batch is requested.

    Examples
    --------
    >>> import numpy as np
    >>> from tripmine.sampling import PKSampler
    >>> labels = np.repeat(np.arange(10), 6)        # 10 classes x 6 samples
    >>> sampler = PKSampler(labels, p=4, k=3, seed=0)
    >>> len(sampler)                                 # ceil(60 / (4 * 3))
    5
    >>> batch = next(iter(sampler))
    >>> batch.shape, batch.dtype
    ((12,), dtype('int64'))
    >>> rows = labels[batch].reshape(4, 3)           # one class per row
    >>> bool((rows == rows[:, :1]).all()), len(set(rows[:, 0]))
    (True, 4)

    With PyTorch: ``DataLoader(dataset, batch_sampler=sampler)``, and
    ``sampler.set_epoch(epoch)`` before each epoch if the epochs must not
    depend on how many times the sampler was iterated before.
    """

    def __init__(self, labels: Any, p: int, k: int, *, seed: SeedLike = None,
                 batches_per_epoch: int | None = None) -> None:
        codes, _ = check.labels(labels)
        n = codes.shape[0]
        if n == 0:
            raise ValueError("labels must hold at least one sample, got an empty array")
        self._p = check.positive_int(p, "p")
        self._k = check.positive_int(k, "k")
        # Samples grouped by class: class c owns _order[_starts[c]:_starts[c + 1]].
        order = np.argsort(codes, kind="stable").astype(np.int64)
        sorted_codes = codes[order]
        starts = np.flatnonzero(sorted_codes[1:] != sorted_codes[:-1]) + 1
        starts = np.concatenate([[0], starts, [n]]).astype(np.int64)
        n_classes = starts.shape[0] - 1
        if self._p > n_classes:
            raise ValueError(f"p={self._p} exceeds the number of classes in labels "
                             f"({n_classes}): a batch needs p distinct classes")
        if batches_per_epoch is None:
            batches = -(-n // (self._p * self._k))
        else:
            batches = check.positive_int(batches_per_epoch, "batches_per_epoch")
        if batches * self._p * n >= _INT_LIMIT:
            raise ValueError(f"batches_per_epoch={batches} is too large for {n} samples "
                             f"and p={self._p}")
        self._batches = batches
        self._seed = _seed_sequence(seed)
        self._epoch = 0
        self._n = n
        self._order = order
        self._starts = starts
        self._counts = np.diff(starts)
        self._quota_parts()

    # -- public state ---------------------------------------------------------------------

    @property
    def p(self) -> int:
        """Classes per batch."""
        return self._p

    @property
    def k(self) -> int:
        """Samples per class in a batch."""
        return self._k

    @property
    def batch_size(self) -> int:
        """``p * k``, the length of every batch."""
        return self._p * self._k

    @property
    def num_samples(self) -> int:
        """Number of labels (samples) the batches index into."""
        return self._n

    @property
    def num_classes(self) -> int:
        """Number of distinct labels."""
        return int(self._counts.shape[0])

    @property
    def seed_sequence(self) -> np.random.SeedSequence:
        """The seed every epoch derives from (pass it as ``seed=`` to repeat a run)."""
        return self._seed

    @property
    def epoch(self) -> int:
        """The epoch the next ``iter(sampler)`` draws."""
        return self._epoch

    def set_epoch(self, epoch: int) -> None:
        """Make the next iteration draw epoch ``epoch`` (a non-negative int)."""
        if isinstance(epoch, (bool, np.bool_)) or not isinstance(epoch, (int, np.integer)):
            raise TypeError(f"epoch must be an integer, got {type(epoch).__name__}")
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self._epoch = int(epoch)

    def __len__(self) -> int:
        return self._batches

    def __iter__(self) -> Iterator[np.ndarray]:
        # Claim the epoch now, not at the first next(): two iterators never share one.
        epoch = self._epoch
        self._epoch += 1
        return self._batches_of(epoch)

    def __repr__(self) -> str:
        return (f"PKSampler(p={self._p}, k={self._k}, num_classes={self.num_classes}, "
                f"num_samples={self._n}, batches_per_epoch={self._batches}, "
                f"epoch={self._epoch})")

    # -- one epoch --------------------------------------------------------------------------

    def _quota_parts(self) -> None:
        """The seed-independent part of the visit quotas (see the class docstring).

        Class c's share is ``total * n_c / mass`` visits among the uncapped
        classes; kept as an exact integer floor plus a remainder over ``mass``.
        """
        b, counts = self._batches, self._counts
        capped = np.zeros(counts.shape[0], dtype=bool)
        while True:  # water-filling: at most p classes ever get capped
            total = b * (self._p - int(capped.sum()))
            mass = int(counts[~capped].sum())
            grow = ~capped & (counts * total >= b * mass)
            if not grow.any():
                break
            capped |= grow
        share = np.where(capped, 0, counts * total)
        self._mass = max(mass, 1)
        self._floor = np.where(capped, b, share // self._mass)
        self._remainder = share % self._mass

    def _quotas(self, rng: np.random.Generator) -> np.ndarray:
        """Visits per class this epoch: floors plus an unbiased systematic rounding."""
        order = rng.permutation(self._remainder.shape[0])
        shift = int(rng.integers(self._mass))
        ends = np.cumsum(self._remainder[order]) + shift
        starts = np.concatenate([[shift], ends[:-1]])
        quotas = self._floor.copy()
        quotas[order] += ends // self._mass - starts // self._mass
        return quotas

    def _batches_of(self, epoch: int) -> Iterator[np.ndarray]:
        seed = np.random.SeedSequence(self._seed.entropy,
                                      spawn_key=(*self._seed.spawn_key, _STREAM, epoch),
                                      pool_size=self._seed.pool_size)
        rng = np.random.default_rng(seed)
        quotas = self._quotas(rng)
        active = np.flatnonzero(quotas)
        left = quotas[active]
        pools: dict[int, tuple[np.ndarray, int]] = {}
        p = self._p
        for batch in range(self._batches):
            # Invariant: left.sum() == p * batches_left and left <= batches_left.
            batches_left = self._batches - batch
            forced = np.flatnonzero(left == batches_left)
            free = np.flatnonzero(left < batches_left)
            need = p - forced.shape[0]
            if need > 0:
                # Weighted draw without replacement (Efraimidis-Spirakis keys).
                keys = rng.standard_exponential(free.shape[0]) / left[free]
                free = free[np.argpartition(keys, need - 1)[:need]]
                picked = rng.permutation(np.concatenate([forced, free]))
            else:
                picked = rng.permutation(forced)
            left[picked] -= 1
            rows = [self._row(int(c), rng, pools) for c in active[picked]]
            keep = left > 0
            active, left = active[keep], left[keep]
            yield np.concatenate(rows)

    def _row(self, c: int, rng: np.random.Generator,
             pools: dict[int, tuple[np.ndarray, int]]) -> np.ndarray:
        """Class c's k samples for one batch; pools[c] = (current pass, next position)."""
        members = self._order[self._starts[c]:self._starts[c + 1]]
        n, k = members.shape[0], self._k
        if n < k:
            return rng.permutation(np.concatenate([members, rng.choice(members, size=k - n)]))
        perm, pos = pools.get(c) or (rng.permutation(members), 0)
        remaining = n - pos
        if remaining >= k:
            pools[c] = (perm, pos + k)
            return perm[pos:pos + k]
        leftover = perm[pos:]
        fresh = rng.permutation(perm[:pos])  # the class's samples other than the leftovers
        pools[c] = (np.concatenate([fresh, leftover]), k - remaining)
        return np.concatenate([leftover, fresh[:k - remaining]])
