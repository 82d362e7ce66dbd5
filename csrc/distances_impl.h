/*
 * Pairwise distances, one body for both precisions: the simplest reducer,
 * which copies each tile into the caller's n x m output.
 */
typedef struct {
    TM_REAL *out;
    int64_t m;
} TM_FN(write_ctx);

static int TM_FN(write_tile)(void *ctx, int thread, int64_t row0, int64_t nrows,
                             int64_t col0, int64_t ncols, const TM_REAL *dist,
                             int64_t ld)
{
    (void)thread;
    const TM_FN(write_ctx) *w = ctx;
    for (int64_t i = 0; i < nrows; ++i)
        memcpy(w->out + (row0 + i) * w->m + col0, dist + i * ld,
               (size_t)ncols * sizeof(TM_REAL));
    return TM_OK;
}

/* Self mode: the engine computes the upper triangle (col >= row) once; each
 * tile writes it and its mirror image, so the output is exactly symmetric
 * and costs half the multiplications.  The mirror is written column by
 * column of the tile, i.e. along the output's rows. */
static int TM_FN(write_tile_symmetric)(void *ctx, int thread, int64_t row0, int64_t nrows,
                                       int64_t col0, int64_t ncols, const TM_REAL *dist,
                                       int64_t ld)
{
    (void)thread;
    const TM_FN(write_ctx) *w = ctx;
    for (int64_t i = 0; i < nrows; ++i) {
        const int64_t skip = row0 + i > col0 ? row0 + i - col0 : 0;
        if (skip < ncols)
            memcpy(w->out + (row0 + i) * w->m + col0 + skip, dist + i * ld + skip,
                   (size_t)(ncols - skip) * sizeof(TM_REAL));
    }
    for (int64_t j = 0; j < ncols; ++j) {
        /* Column col0 + j mirrors into row col0 + j, at the tile's rows
         * strictly above the diagonal. */
        const int64_t col = col0 + j;
        const int64_t rows = col - row0 < nrows ? col - row0 : nrows;
        TM_REAL *dst = w->out + col * w->m + row0;
        for (int64_t i = 0; i < rows; ++i)
            dst[i] = dist[i * ld + j];
    }
    return TM_OK;
}

int TM_FN(tm_pairwise_distances)(const TM_REAL *x, int64_t n, const TM_REAL *ref,
                                 int64_t m, int64_t d, int metric, TM_REAL *out)
{
    size_t out_bytes;
    int status = tm_bytes(n, m, sizeof(TM_REAL), &out_bytes);
    if (status != TM_OK)
        return status;
    if (out == NULL && out_bytes > 0)
        return TM_ERR_INVALID;
    TM_FN(write_ctx) ctx = {out, m};
    const TM_FN(tm_tile_problem) problem = {x, n, ref, m, d, metric, 0};
    const TM_FN(tm_reducer) reducer = {&ctx, 0, 0, 0, NULL, NULL,
                                       ref == NULL ? TM_FN(write_tile_symmetric)
                                                   : TM_FN(write_tile),
                                       NULL, ref == NULL};
    return TM_FN(tm_tile_engine)(&problem, &reducer);
}

/* ---- k nearest neighbours --------------------------------------------------
 *
 * A streaming top-k per anchor: a bounded max-heap of (distance, index) kept
 * in the caller's output rows while the anchor's tiles stream past (in
 * increasing column order, one thread per anchor block), then heap-sorted in
 * place.  Empty slots are (inf, -1) and rank after every real candidate, so a
 * row with fewer than k candidates ends padded with them.  Ties rank by the
 * lower index; NaN distances and, in self mode, the anchor itself are skipped.
 */
typedef struct {
    int64_t *index;
    TM_REAL *dist;
    int64_t k;
    int self;
} TM_FN(knn_ctx);

/* (da, ia) ranks after (db, ib); index -1 (empty) ranks after every index. */
static inline int TM_FN(knn_after)(TM_REAL da, int64_t ia, TM_REAL db, int64_t ib)
{
    if (da != db)
        return da > db;
    return (uint64_t)ia > (uint64_t)ib;
}

static void TM_FN(knn_sift_down)(TM_REAL *hd, int64_t *hi, int64_t size, int64_t at)
{
    const TM_REAL d = hd[at];
    const int64_t i = hi[at];
    for (;;) {
        int64_t child = 2 * at + 1;
        if (child >= size)
            break;
        if (child + 1 < size && TM_FN(knn_after)(hd[child + 1], hi[child + 1], hd[child], hi[child]))
            ++child;
        if (!TM_FN(knn_after)(hd[child], hi[child], d, i))
            break;
        hd[at] = hd[child];
        hi[at] = hi[child];
        at = child;
    }
    hd[at] = d;
    hi[at] = i;
}

static int TM_FN(knn_begin)(void *ctx, int thread, int64_t row0, int64_t nrows)
{
    (void)thread;
    const TM_FN(knn_ctx) *c = ctx;
    for (int64_t s = row0 * c->k; s < (row0 + nrows) * c->k; ++s) {
        c->dist[s] = (TM_REAL)INFINITY;
        c->index[s] = -1;
    }
    return TM_OK;
}

static int TM_FN(knn_tile)(void *ctx, int thread, int64_t row0, int64_t nrows, int64_t col0,
                           int64_t ncols, const TM_REAL *dist, int64_t ld)
{
    (void)thread;
    const TM_FN(knn_ctx) *c = ctx;
    for (int64_t r = 0; r < nrows; ++r) {
        const int64_t a = row0 + r;
        TM_REAL *hd = c->dist + a * c->k;
        int64_t *hi = c->index + a * c->k;
        const TM_REAL *row = dist + r * ld;
        for (int64_t j = 0; j < ncols; ++j) {
            const TM_REAL v = row[j];
            /* Columns arrive in increasing order, so an equal distance never
             * displaces the root unless the root is an empty slot. */
            if (!(v <= hd[0]) || (v == hd[0] && hi[0] >= 0))
                continue;
            if (c->self && col0 + j == a)
                continue;
            hd[0] = v;
            hi[0] = col0 + j;
            TM_FN(knn_sift_down)(hd, hi, c->k, 0);
        }
    }
    return TM_OK;
}

static int TM_FN(knn_end)(void *ctx, int thread, int64_t row0, int64_t nrows)
{
    (void)thread;
    const TM_FN(knn_ctx) *c = ctx;
    for (int64_t a = row0; a < row0 + nrows; ++a) {
        TM_REAL *hd = c->dist + a * c->k;
        int64_t *hi = c->index + a * c->k;
        for (int64_t size = c->k - 1; size > 0; --size) { /* heap sort: worst to the back */
            const TM_REAL d = hd[0];
            const int64_t i = hi[0];
            hd[0] = hd[size];
            hi[0] = hi[size];
            hd[size] = d;
            hi[size] = i;
            TM_FN(knn_sift_down)(hd, hi, size, 0);
        }
    }
    return TM_OK;
}

int TM_FN(tm_nearest_neighbors)(const TM_REAL *x, int64_t n, const TM_REAL *ref, int64_t m,
                                int64_t d, int metric, int64_t k, int64_t *out_index,
                                TM_REAL *out_dist)
{
    size_t out_bytes;
    int status = tm_bytes(n, k, sizeof(int64_t), &out_bytes);
    if (status != TM_OK)
        return status;
    if (k < 1 || (n > 0 && (out_index == NULL || out_dist == NULL)))
        return TM_ERR_INVALID;
    TM_FN(knn_ctx) ctx = {out_index, out_dist, k, ref == NULL};
    const TM_FN(tm_tile_problem) problem = {x, n, ref, m, d, metric, 0};
    const TM_FN(tm_reducer) reducer = {&ctx, 1, 0, 0, NULL, TM_FN(knn_begin), TM_FN(knn_tile),
                                       TM_FN(knn_end), 0};
    if (m == 0) { /* the engine visits no tile: pad every row here */
        if (n < 0)
            return TM_ERR_INVALID;
        TM_FN(knn_begin)(&ctx, 0, 0, n);
        return TM_OK;
    }
    return TM_FN(tm_tile_engine)(&problem, &reducer);
}
