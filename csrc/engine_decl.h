/*
 * Tile-engine types for one precision (see template.h); included once per
 * precision by internal.h.  No include guards on purpose.
 */

/* Consumes one tile of distances: dist[i*ld + j] = d(row0 + i, col0 + j)
 * for i < nrows, j < ncols.  The tile is only valid during the call. */
typedef int (*TM_FN(tm_tile_fn))(void *ctx, int thread, int64_t row0,
                                 int64_t nrows, int64_t col0, int64_t ncols,
                                 const TM_REAL *dist, int64_t ld);

/* A reducer: what the engine does with each tile.
 *   whole_rows != 0: one thread visits all column blocks of an anchor block,
 *       in increasing column order, between begin_rows and end_rows (per-anchor
 *       state such as a running argmin lives across tiles);
 *   whole_rows == 0: tiles are independent and may be visited in any order by
 *       any thread (begin_rows / end_rows are not called).
 * setup is called once, before any tile, with the number of threads that will
 * run (thread ids are 0 .. nthreads-1) and the most anchor rows one block can
 * have; it may allocate per-thread state, which the reducer's owner frees
 * after tm_tile_engine returns.  max_block_rows (0: no limit) caps the rows
 * of an anchor block, for reducers that buffer whole rows.  static_schedule
 * assigns anchor blocks to threads in a fixed round-robin, so per-thread
 * accumulations are reproducible for a given thread count.  Every callback
 * may be NULL except tile, and returns a tm_status. */
typedef struct {
    void *ctx;
    int whole_rows;
    int64_t max_block_rows;
    int static_schedule;
    int (*setup)(void *ctx, int nthreads, int64_t block_rows);
    int (*begin_rows)(void *ctx, int thread, int64_t row0, int64_t nrows);
    TM_FN(tm_tile_fn) tile;
    int (*end_rows)(void *ctx, int thread, int64_t row0, int64_t nrows);
} TM_FN(tm_reducer);

/* x is n x d; ref is m x d, or NULL for self mode (ref = x, m = n, and the
 * diagonal distance is exactly 0). */
typedef struct {
    const TM_REAL *x;
    int64_t n;
    const TM_REAL *ref;
    int64_t m;
    int64_t d;
    int metric;
} TM_FN(tm_tile_problem);

int TM_FN(tm_tile_engine)(const TM_FN(tm_tile_problem) *problem,
                          const TM_FN(tm_reducer) *reducer);

/* Exact distances by direct difference, accumulated in double: the values
 * that losses use and the engine's refinement of near pairs. */
double TM_FN(tm_exact_sqeuclidean)(const TM_REAL *a, const TM_REAL *b, int64_t d);
double TM_FN(tm_exact_distance)(const TM_REAL *a, const TM_REAL *b, int64_t d,
                                int metric);

/* Micro-kernel: c[i*ldc + j] = sum_p a[p*mr + i] * b[p*nr + j] for the full
 * mr x nr tile, from panels packed k-major (see tm_pack_rows). */
typedef void (*TM_FN(tm_dot_kernel))(int64_t k, const TM_REAL *a,
                                     const TM_REAL *b, TM_REAL *c, int64_t ldc);

/* Row-wise operations (semi-hard, batch-all, distance-weighted, contrastive)
 * see one anchor's whole row of distances at a time: tm_run_rows buffers a
 * block of rows (never more than a few MiB per thread, whatever n and m) and
 * calls `row` once per anchor, from the thread that owns the block.  setup is
 * called once with the number of threads before any row. */
typedef struct {
    void *op;
    int (*setup)(void *op, int nthreads);
    int (*row)(void *op, int thread, int64_t anchor, const TM_REAL *dist);
    int static_schedule;
} TM_FN(tm_row_op);

int TM_FN(tm_run_rows)(const TM_FN(tm_tile_problem) *problem, const TM_FN(tm_row_op) *op);
