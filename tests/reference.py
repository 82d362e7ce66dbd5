"""Slow, obviously-correct loop implementations: the oracle for the C core.

Each function follows the definition in DESIGN.md section 2 literally, one
pair (or triplet) at a time, in float64 (or wider) arithmetic.  Speed is
irrelevant here; clarity is the point.
"""

from __future__ import annotations

import math

import numpy as np


def distance(a: np.ndarray, b: np.ndarray, metric: str) -> float:
    """d(a, b) by direct difference in extended precision."""
    a = np.asarray(a, dtype=np.longdouble)
    b = np.asarray(b, dtype=np.longdouble)
    if metric == "cosine":
        norm_a = math.sqrt(float(np.sum(a * a)))
        norm_b = math.sqrt(float(np.sum(b * b)))
        if norm_a == 0.0 or norm_b == 0.0:
            return 1.0  # tripmine's convention: a zero vector has cosine 0 with anything
        diff = a / np.longdouble(norm_a) - b / np.longdouble(norm_b)
        return float(np.sum(diff * diff) / 2)
    squared = float(np.sum((a - b) * (a - b)))
    return math.sqrt(squared) if metric == "euclidean" else squared


def pairwise_distances(x: np.ndarray, ref: np.ndarray | None, metric: str) -> np.ndarray:
    """out[i, j] = d(x_i, ref_j); self mode (ref None) has an exact-zero diagonal."""
    self_mode = ref is None
    ref = x if self_mode else ref
    out = np.empty((len(x), len(ref)))
    for i in range(len(x)):
        for j in range(len(ref)):
            out[i, j] = 0.0 if (self_mode and i == j) else distance(x[i], ref[j], metric)
    return out


def positive_mask(labels, ref_labels=None) -> np.ndarray:
    self_mode = ref_labels is None
    ref_labels = labels if self_mode else ref_labels
    out = np.zeros((len(labels), len(ref_labels)), dtype=bool)
    for i in range(len(labels)):
        for j in range(len(ref_labels)):
            out[i, j] = labels[i] == ref_labels[j] and not (self_mode and i == j)
    return out


def negative_mask(labels, ref_labels=None) -> np.ndarray:
    ref_labels = labels if ref_labels is None else ref_labels
    out = np.zeros((len(labels), len(ref_labels)), dtype=bool)
    for i in range(len(labels)):
        for j in range(len(ref_labels)):
            out[i, j] = labels[i] != ref_labels[j]
    return out


def triplet_mask(labels) -> np.ndarray:
    n = len(labels)
    out = np.zeros((n, n, n), dtype=bool)
    for a in range(n):
        for p in range(n):
            for q in range(n):
                out[a, p, q] = a != p and labels[a] == labels[p] and labels[q] != labels[a]
    return out
