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
 * accumulations are reproducible for a given thread count.  upper (self
 * mode with whole_rows == 0 only; ignored otherwise) halves the work of a
 * symmetric output: tiles hold only the pairs with col >= row (entries with
 * col < row are unspecified, and tiles with none are skipped), so each
 * unordered pair is seen once.  Every callback may be NULL except tile, and
 * returns a tm_status. */
typedef struct {
    void *ctx;
    int whole_rows;
    int64_t max_block_rows;
    int static_schedule;
    int (*setup)(void *ctx, int nthreads, int64_t block_rows);
    int (*begin_rows)(void *ctx, int thread, int64_t row0, int64_t nrows);
    TM_FN(tm_tile_fn) tile;
    int (*end_rows)(void *ctx, int thread, int64_t row0, int64_t nrows);
    int upper;
} TM_FN(tm_reducer);

/* x is n x d; ref is m x d, or NULL for self mode (ref = x, m = n, and the
 * diagonal distance is exactly 0).  row_exponent e (euclidean metrics; 0 for
 * cosine): x and ref are the caller's rows times 2^e, and the tiles hold the
 * caller's distances, 2^-e (2^-2e squared) times the given rows' (see
 * tm_row_scale). */
typedef struct {
    const TM_REAL *x;
    int64_t n;
    const TM_REAL *ref;
    int64_t m;
    int64_t d;
    int metric;
    int row_exponent;
} TM_FN(tm_tile_problem);

int TM_FN(tm_tile_engine)(const TM_FN(tm_tile_problem) *problem,
                          const TM_FN(tm_reducer) *reducer);

/* Exact distances by direct difference, accumulated in double: the values
 * that losses use and the engine's refinement of near pairs. */
double TM_FN(tm_exact_sqeuclidean)(const TM_REAL *a, const TM_REAL *b, int64_t d);
/* tm_exact_distance for a caller without the engine's norms: *outside is set when double
 * cannot hold the pair to its accuracy (a squared distance above 2^1000, tiny rows whose
 * squared distance is below 2^-960, or for cosine a squared norm outside [2^-960, 2^1000]):
 * TM_ERR_RANGE.  Never for float rows, whose squares double always holds. */
double TM_FN(tm_exact_distance_checked)(const TM_REAL *a, const TM_REAL *b, int64_t d,
                                        int metric, int *outside);
double TM_FN(tm_exact_distance)(const TM_REAL *a, const TM_REAL *b, int64_t d,
                                int metric);


/* Row-wise operations (semi-hard, batch-all, distance-weighted, contrastive)
 * see one anchor's whole row of distances at a time: tm_run_rows buffers a
 * block of rows (never more than a few MiB per thread, whatever n and m) and
 * calls `row` once per anchor, from the thread that owns the block, with the
 * row's position in the block; `row` may overwrite its row (e.g. with
 * gradient coefficients), and the optional `block` then sees the whole
 * block.  setup is called once, before any row, with the number of threads
 * and the most rows a block can have. */
typedef struct {
    void *op;
    int (*setup)(void *op, int nthreads, int64_t block_rows);
    int (*row)(void *op, int thread, int64_t anchor, int64_t row_in_block, TM_REAL *dist);
    int (*block)(void *op, int thread, int64_t row0, int64_t nrows, TM_REAL *rows);
    int static_schedule;
} TM_FN(tm_row_op);

int TM_FN(tm_run_rows)(const TM_FN(tm_tile_problem) *problem, const TM_FN(tm_row_op) *op);

/* Small dense products for the gradients of the dense losses, on the same
 * micro-kernels as the distances.
 *
 * tm_pack_column_panels: src (rows x cols, row-major) -> panels of nr columns,
 * each k-major over all rows: dst[(q*rows + p)*nr + j] = src[p*cols + q*nr + j]
 * (zero past cols).  dst holds ceil(cols/nr)*nr*rows elements.
 *
 * tm_gemm_acc: C (rows x n_out, leading dimension ldc) += A (rows x k) * P,
 * where P(p, j) is row k0 + p of the packed panels (packed from a matrix with
 * panel_rows rows).  A(i, p) = a[i*lda + p], or a[p*lda + i] with transpose_a.
 * scratch: tm_gemm_scratch_elems(kernels) elements. */
void TM_FN(tm_pack_column_panels)(const tm_kernel_set *kernels, const TM_REAL *src, int64_t rows,
                                  int64_t cols, TM_REAL *dst);
void TM_FN(tm_gemm_acc)(const tm_kernel_set *kernels, int64_t rows, int64_t k, const TM_REAL *a,
                        int64_t lda, int transpose_a, const TM_REAL *panels, int64_t panel_rows,
                        int64_t k0, int64_t n_out, TM_REAL *c, int64_t ldc, TM_REAL *scratch);

/* This precision's view of a kernel set. */
static inline int TM_FN(kernel_mr)(const tm_kernel_set *k)
{
#if TM_BITS == 32
    return k->mr_f32;
#else
    return k->mr_f64;
#endif
}

static inline int TM_FN(kernel_nr)(const tm_kernel_set *k)
{
#if TM_BITS == 32
    return k->nr_f32;
#else
    return k->nr_f64;
#endif
}

static inline TM_FN(tm_dot_kernel) TM_FN(kernel_dot)(const tm_kernel_set *k)
{
#if TM_BITS == 32
    return k->dot_f32;
#else
    return k->dot_f64;
#endif
}

static inline tm_gram_row_kernel TM_FN(kernel_gram_row)(const tm_kernel_set *k)
{
#if TM_BITS == 32
    return k->gram_row_f32;
#else
    return k->gram_row_f64;
#endif
}

static inline tm_clamp_row_kernel TM_FN(kernel_clamp_row)(const tm_kernel_set *k)
{
#if TM_BITS == 32
    return k->clamp_row_f32;
#else
    return k->clamp_row_f64;
#endif
}

static inline tm_weighted_weights_kernel TM_FN(kernel_weighted_weights)(const tm_kernel_set *k)
{
#if TM_BITS == 32
    return k->weighted_weights_f32;
#else
    return k->weighted_weights_f64;
#endif
}

static inline tm_weighted_row_kernel TM_FN(kernel_weighted_row)(const tm_kernel_set *k)
{
#if TM_BITS == 32
    return k->weighted_row_f32;
#else
    return k->weighted_row_f64;
#endif
}

static inline tm_batch_all_row_kernel TM_FN(kernel_batch_all_row)(const tm_kernel_set *k)
{
#if TM_BITS == 32
    return k->batch_all_row_f32;
#else
    return k->batch_all_row_f64;
#endif
}

static inline tm_softmax_max_kernel TM_FN(kernel_softmax_max)(const tm_kernel_set *k)
{
#if TM_BITS == 32
    return k->softmax_max_f32;
#else
    return k->softmax_max_f64;
#endif
}

static inline tm_softmax_exp_kernel TM_FN(kernel_softmax_exp)(const tm_kernel_set *k)
{
#if TM_BITS == 32
    return k->softmax_exp_f32;
#else
    return k->softmax_exp_f64;
#endif
}

static inline tm_softmax_grad_kernel TM_FN(kernel_softmax_grad)(const tm_kernel_set *k)
{
#if TM_BITS == 32
    return k->softmax_grad_f32;
#else
    return k->softmax_grad_f64;
#endif
}

static inline tm_pack_panel_kernel TM_FN(kernel_pack_panel)(const tm_kernel_set *k)
{
#if TM_BITS == 32
    return k->pack_panel_f32;
#else
    return k->pack_panel_f64;
#endif
}

static inline tm_center_row_kernel TM_FN(kernel_center_row)(const tm_kernel_set *k)
{
#if TM_BITS == 32
    return k->center_row_f32;
#else
    return k->center_row_f64;
#endif
}

static inline tm_center_acc_kernel TM_FN(kernel_center_acc)(const tm_kernel_set *k)
{
#if TM_BITS == 32
    return k->center_acc_f32;
#else
    return k->center_acc_f64;
#endif
}

static inline tm_lifted_lse_kernel TM_FN(kernel_lifted_lse)(const tm_kernel_set *k)
{
#if TM_BITS == 32
    return k->lifted_lse_f32;
#else
    return k->lifted_lse_f64;
#endif
}

static inline tm_lifted_beta_kernel TM_FN(kernel_lifted_beta)(const tm_kernel_set *k)
{
#if TM_BITS == 32
    return k->lifted_beta_f32;
#else
    return k->lifted_beta_f64;
#endif
}

static inline int64_t TM_FN(round_up)(int64_t value, int64_t multiple)
{
    return (value + multiple - 1) / multiple * multiple;
}
