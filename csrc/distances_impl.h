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
    const TM_FN(tm_tile_problem) problem = {x, n, ref, m, d, metric};
    const TM_FN(tm_reducer) reducer = {&ctx, 0, 0, 0, NULL, NULL, TM_FN(write_tile), NULL};
    return TM_FN(tm_tile_engine)(&problem, &reducer);
}
