"""The pair matrix of one problem walked in row blocks, written once for an array module
(NumPy or CuPy): label masks, tile distances as the C core's engine gives them (exact where
near), exact distances of chosen pairs, and the gradient of blocks of pair weights through
the metric's pair coefficients (csrc/dense_impl.h).  The array-module forms of the pair
losses (``_fused_lifted``: the lifted structured loss; ``_fused_margin``: the margin loss
over every triplet) are walks over it.  Memory O(block x M + (N + M) D); never N x M.
"""

from __future__ import annotations

from typing import Any

EUCLIDEAN, SQEUCLIDEAN, COSINE = "euclidean", "sqeuclidean", "cosine"

#: Largest block of the pair matrix (rows x M) and of gathered pair rows (pairs x D) held
#: at once; each is a handful of float64 arrays of this many entries.
BLOCK_ELEMENTS = 1 << 22

#: The C core's rule (csrc/engine_impl.h): a Gram-identity distance with
#: d^2 < REFINE (|x|^2 + |r|^2) (cosine: 1 - cos < REFINE) is recomputed exactly.
REFINE = 1.0 / 64.0


class Pairs:
    """The pair matrix of one problem, a block of rows at a time: label masks, tile
    distances, exact distances of chosen pairs, and the metric's gradient coefficients."""

    def __init__(self, xp: Any, x: Any, ref: Any, codes: Any, ref_codes: Any,
                 ref_offset: int | None, metric: str, block_elements: int):
        f64 = xp.float64
        self.xp, self.x, self.metric = xp, x, metric
        self.self_mode = ref is None
        self.r = x if ref is None else ref
        self.codes = codes
        self.ref_codes = codes if ref is None else ref_codes
        # x[i] is r[i + own]: that column is neither a positive nor a negative
        self.own = 0 if ref is None else ref_offset
        self.n, self.m, self.d = x.shape[0], self.r.shape[0], x.shape[1]
        self.block_rows = max(1, min(max(self.n, 1), block_elements // max(self.m, 1)))
        self.pair_step = max(1, block_elements // max(self.d, 1))
        x_sq = (x.astype(f64) ** 2).sum(axis=1)
        r_sq = x_sq if ref is None else (ref.astype(f64) ** 2).sum(axis=1)
        if metric == COSINE:
            self.x_norm, self.r_norm = xp.sqrt(x_sq), xp.sqrt(r_sq)
        else:
            self.x_sq, self.r_sq = x_sq, r_sq

    def blocks(self):
        for row0 in range(0, self.n, self.block_rows):
            yield row0, min(self.block_rows, self.n - row0)

    def masks(self, row0: int, rows: int):
        """(positive, negative) entries of rows [row0, row0 + rows)."""
        xp = self.xp
        same = self.codes[row0:row0 + rows, None] == self.ref_codes[None, :]
        positive = same.copy()
        if self.own is not None and rows:
            local = xp.arange(rows)
            positive[local, local + row0 + self.own] = False
        return positive, ~same

    def exact(self, rows: Any, columns: Any):
        """Distances of the pairs (x[rows[t]], r[columns[t]]) by direct difference, float64,
        pair_step pairs at a time."""
        xp, f64 = self.xp, self.xp.float64
        count = int(rows.shape[0])
        out = xp.empty(count, dtype=f64)
        for start in range(0, count, self.pair_step):
            i, j = rows[start:start + self.pair_step], columns[start:start + self.pair_step]
            a, b = self.x[i].astype(f64), self.r[j].astype(f64)
            if self.metric == COSINE:
                na, nb = self.x_norm[i], self.r_norm[j]
                ok = (na > 0) & (nb > 0)
                diff = a / xp.where(ok, na, 1.0)[:, None] - b / xp.where(ok, nb, 1.0)[:, None]
                value = xp.where(ok, 0.5 * (diff * diff).sum(axis=1), 1.0)
            else:
                diff = a - b
                value = (diff * diff).sum(axis=1)
                if self.metric == EUCLIDEAN:
                    value = xp.sqrt(value)
            out[start:start + self.pair_step] = value
        return out

    def tile(self, row0: int, rows: int, negative: Any):
        """Distances of rows [row0, row0 + rows) to every reference row, float64, as the C
        core's tiles (exact where near); only the negative entries are ever read."""
        xp = self.xp
        dot = xp.matmul(self.x[row0:row0 + rows], self.r.T).astype(xp.float64)
        if self.metric == COSINE:
            nx = self.x_norm[row0:row0 + rows, None]
            ok = (nx > 0) & (self.r_norm[None, :] > 0)
            dist = xp.where(ok, 1.0 - dot / xp.where(ok, nx * self.r_norm[None, :], 1.0), 1.0)
            near = ok & (dist < REFINE)
        else:
            scale = self.x_sq[row0:row0 + rows, None] + self.r_sq[None, :]
            dist = scale - 2.0 * dot
            near = dist < REFINE * scale
        near_rows, near_columns = xp.nonzero(near & negative)
        if near_rows.shape[0]:
            exact = self.exact(near_rows + row0, near_columns)
            if self.metric == EUCLIDEAN:
                exact = exact * exact  # squared here like its neighbours; rooted below
            dist[near_rows, near_columns] = exact
        if self.metric == COSINE:
            return xp.clip(dist, 0.0, 2.0)
        dist = xp.maximum(dist, 0.0)
        return xp.sqrt(dist) if self.metric == EUCLIDEAN else dist

    def positives(self, positive: Any, row0: int):
        """(rows in the block, columns, exact distances) of the block's positive pairs."""
        rows, columns = self.xp.nonzero(positive)
        return rows, columns, self.exact(rows + row0, columns)


class Gradient:
    """Unscaled float64 accumulators of dL/dx and dL/dref (one array in self mode) from
    blocks of weights w = dL/dd, and the per-reference gamma sums (csrc/dense_impl.h's
    pair coefficients: w dd/dx_a = alpha x_a + beta r_j, w dd/dr_j = gamma r_j + beta x_a)."""

    def __init__(self, pairs: Pairs, ref_side: bool):
        xp, f64 = pairs.xp, pairs.xp.float64
        self.pairs, self.ref_side = pairs, ref_side
        self.gx = xp.zeros(pairs.x.shape, dtype=f64)
        self.gr = None
        if ref_side:
            self.gr = self.gx if pairs.self_mode else xp.zeros(pairs.r.shape, dtype=f64)
            self.gamma = xp.zeros(pairs.m, dtype=f64)

    def add(self, w: Any, dist: Any, row0: int, rows: int) -> None:
        p, xp = self.pairs, self.pairs.xp
        if p.metric == SQEUCLIDEAN:
            beta = -2.0 * w
            alpha, gamma = -beta.sum(axis=1), -beta.sum(axis=0)
        elif p.metric == EUCLIDEAN:
            side = xp.where(dist > 0, w / xp.where(dist > 0, dist, 1.0), 0.0)
            beta = -side
            alpha, gamma = side.sum(axis=1), side.sum(axis=0)
        else:
            nx, nr = p.x_norm[row0:row0 + rows, None], p.r_norm[None, :]
            ok = (nx > 0) & (nr > 0)
            beta = xp.where(ok, -w / xp.where(ok, nx * nr, 1.0), 0.0)
            side = xp.where(ok, w * (1.0 - dist), 0.0)
            alpha = side.sum(axis=1) / xp.where(nx[:, 0] > 0, nx[:, 0] ** 2, 1.0)
            gamma = side.sum(axis=0)
        xb = p.x[row0:row0 + rows]
        beta = beta.astype(xb.dtype)  # the products in the input dtype, as the tiles
        self.gx[row0:row0 + rows] += alpha[:, None] * xb + xp.matmul(beta, p.r)
        if self.ref_side:
            self.gr += xp.matmul(beta.T, xb)
            self.gamma += gamma

    def finish(self, scale: float):
        """(dL/dx, dL/dref or None) times scale, in the input dtype."""
        p, xp = self.pairs, self.pairs.xp
        if self.ref_side:
            gamma = self.gamma
            if p.metric == COSINE:
                gamma = xp.where(p.r_norm > 0, gamma / xp.where(p.r_norm > 0, p.r_norm ** 2,
                                                                1.0), 0.0)
            self.gr += gamma[:, None] * p.r
        grad = (self.gx * scale).astype(p.x.dtype)
        if self.gr is None or p.self_mode:
            return grad, None
        return grad, (self.gr * scale).astype(p.r.dtype)
