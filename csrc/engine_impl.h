/*
 * The tile engine, one body for both precisions (template.h).
 *
 * 1. Pack x into MR-row panels and ref into NR-row panels (k-major, zero
 *    padded), and compute row norms in double: O((n + m) d) memory, once.
 * 2. Split the n x m problem into blocks of MC anchors x NC references.  A
 *    reference block (NC x d) is sized to stay in L2 while every MR-panel of
 *    the anchor block streams past it; the micro-kernel's NR-panel stays in L1.
 * 3. Per block: micro-kernel -> tile of dot products -> distances in place ->
 *    reducer.  Blocks are the thread pool's work items (pool.c): whole
 *    anchor blocks for reducers with per-row state, single tiles otherwise;
 *    a reducer with per-thread accumulations runs them as slots, so a given
 *    thread count always gives the same bits.
 *
 * Accuracy.  Distances come from the Gram identity ||x||^2 + ||r||^2 - 2 x.r,
 * whose rounding error is about eps * sqrt(d) * (||x||^2 + ||r||^2).  That is
 * small relative to d^2 unless the two points are close compared with their
 * norms, so any pair with d^2 < REFINE * (||x||^2 + ||r||^2) (cosine: 1 - cos
 * < REFINE) is recomputed exactly by direct difference, accumulated in
 * double.  Such pairs are rare in real batches (near-duplicates, collapsed
 * embeddings), so the cost is O(d) for each of them and nothing otherwise.
 * Every other distance has a relative error below about
 * 2 * eps * sqrt(d) / REFINE.  Self-distances are exactly 0; none is negative.
 */

/* Tuning constants; each can be overridden with -D for experiments. */
#ifndef TM_REFINE
#define TM_REFINE (1.0 / 64.0)
#endif
/* Target bytes of one packed reference block, which every MR-panel of the
 * anchor block streams past (L2 is >= 512 KiB per core on x86-64 of the last
 * decade; the rest holds the anchor panels and the tile). */
#ifndef TM_REF_BLOCK_BYTES
#define TM_REF_BLOCK_BYTES (256 * 1024)
#endif
/* Rows of an anchor block (fewer when a small batch needs more blocks to keep
 * every thread busy).  Measured with batch-hard mining, 2 threads, float32
 * (benchmarks/RESULTS.md, "Tile sizes"): 192 beat 48 and 96 by 10-15% at
 * N = 4096 for D = 128 and 512; reference blocks of 256 and 512 KiB tied. */
#ifndef TM_ANCHOR_BLOCK
#define TM_ANCHOR_BLOCK 192
#endif
#ifndef TM_MAX_REF_BLOCK
#define TM_MAX_REF_BLOCK 1024
#endif
/* Below about this many multiply-adds a call is not worth a thread team. */
#ifndef TM_MIN_PARALLEL_WORK
#define TM_MIN_PARALLEL_WORK (1 << 18)
#endif

/* The squared distance by direct difference, in double: four interleaved
 * partial sums (a fixed order, so the same bits every time and on the GPU's
 * copy in csrc/cuda/row_logic.cuh), not one chain of dependent additions. */
double TM_FN(tm_exact_sqeuclidean)(const TM_REAL *a, const TM_REAL *b, int64_t d)
{
    double s0 = 0.0, s1 = 0.0, s2 = 0.0, s3 = 0.0;
    int64_t k = 0;
    for (; k + 4 <= d; k += 4) {
        const double d0 = (double)a[k] - (double)b[k];
        const double d1 = (double)a[k + 1] - (double)b[k + 1];
        const double d2 = (double)a[k + 2] - (double)b[k + 2];
        const double d3 = (double)a[k + 3] - (double)b[k + 3];
        s0 += d0 * d0;
        s1 += d1 * d1;
        s2 += d2 * d2;
        s3 += d3 * d3;
    }
    for (; k < d; ++k) {
        const double diff = (double)a[k] - (double)b[k];
        s0 += diff * diff;
    }
    return (s0 + s1) + (s2 + s3);
}

static double TM_FN(sqnorm)(const TM_REAL *a, int64_t d)
{
    double sum = 0.0;
    for (int64_t k = 0; k < d; ++k)
        sum += (double)a[k] * (double)a[k];
    return sum;
}

/* The squared norm in double; a nonzero row whose squares all underflow double gets the
 * smallest subnormal instead of 0, so that the window check refuses it rather than
 * taking it for a zero row. */
static double TM_FN(checked_sqnorm)(const TM_REAL *a, int64_t d)
{
    const double sq = TM_FN(sqnorm)(a, d);
    if (sq == 0.0)
        for (int64_t p = 0; p < d; ++p)
            if (a[p] != 0)
                return 0x1p-1074;
    return sq;
}

/* 1 - cos(a, b) as ||a/|a| - b/|b|||^2 / 2, which has no cancellation. */
static double TM_FN(exact_cosine)(const TM_REAL *a, double norm_a,
                                  const TM_REAL *b, double norm_b, int64_t d)
{
    if (norm_a == 0.0 || norm_b == 0.0)
        return 1.0;
    double sum = 0.0;
    for (int64_t k = 0; k < d; ++k) {
        const double diff = (double)a[k] / norm_a - (double)b[k] / norm_b;
        sum += diff * diff;
    }
    return 0.5 * sum;
}

double TM_FN(tm_exact_distance)(const TM_REAL *a, const TM_REAL *b, int64_t d,
                                int metric)
{
    switch (metric) {
    case TM_METRIC_SQEUCLIDEAN:
        return TM_FN(tm_exact_sqeuclidean)(a, b, d);
    case TM_METRIC_COSINE:
        return TM_FN(exact_cosine)(a, sqrt(TM_FN(sqnorm)(a, d)), b,
                                   sqrt(TM_FN(sqnorm)(b, d)), d);
    default:
        return sqrt(TM_FN(tm_exact_sqeuclidean)(a, b, d));
    }
}

/* The engine's preparation of one side (x or ref), in one parallel region
 * for both sides: its rows packed into width-row panels, dst[(q*d + p)*width
 * + i] = src[(q*width + i)*d + p] (zero past `rows`), and when norms is set,
 * their squared norms (euclidean metrics) or norms (cosine) in double, and
 * the same rounded to the working precision (real_norms). */
typedef struct {
    const TM_REAL *src;
    int64_t rows;
    int width;
    TM_REAL *dst;
    double *norms;
    TM_REAL *real_norms;
    int64_t groups, panels_per_group; /* work items: groups of panels */
} TM_FN(prepare_side);

typedef struct {
    TM_FN(prepare_side) side[2];
    int64_t d;
    int metric;
} TM_FN(prepare_job);

static void TM_FN(prepare_group)(const TM_FN(prepare_side) *side, int64_t d, int metric,
                                 int64_t group)
{
    const int width = side->width;
    const int64_t panels = (side->rows + width - 1) / width;
    const int64_t q0 = group * side->panels_per_group;
    const int64_t q1 = q0 + side->panels_per_group < panels ? q0 + side->panels_per_group
                                                             : panels;
    for (int64_t q = q0; q < q1; ++q) {
        TM_REAL *panel = side->dst + q * width * d;
        for (int i = 0; i < width; ++i) {
            const int64_t row = q * width + i;
            if (row < side->rows) {
                const TM_REAL *s = side->src + row * d;
                for (int64_t p = 0; p < d; ++p)
                    panel[p * width + i] = s[p];
                if (side->norms != NULL) {
                    const double sq = TM_FN(checked_sqnorm)(s, d);
                    side->norms[row] = metric == TM_METRIC_COSINE ? sqrt(sq) : sq;
                    side->real_norms[row] = (TM_REAL)side->norms[row];
                }
            } else {
                for (int64_t p = 0; p < d; ++p)
                    panel[p * width + i] = 0;
            }
        }
    }
}

static void TM_FN(prepare_range)(void *ctx, int participant, int64_t begin, int64_t end)
{
    (void)participant;
    const TM_FN(prepare_job) *job = ctx;
    for (int64_t item = begin; item < end; ++item) {
        const int second = item >= job->side[0].groups;
        TM_FN(prepare_group)(&job->side[second], job->d, job->metric,
                             second ? item - job->side[0].groups : item);
    }
}

/* Whether every nonzero row's squared norm lies where the working precision computes the
 * Gram identity to its documented accuracy: above 2^-100 (float; 2^-960 double), so that
 * eps times it is a normal number, and below 2^120 (2^1000), so that the sums cannot
 * overflow.  norms are squared norms, or norms (cosine). */
static int TM_FN(norms_in_window)(const double *norms, int64_t count, int metric)
{
    const double low = sizeof(TM_REAL) == 4 ? 0x1p-100 : 0x1p-960;
    const double high = sizeof(TM_REAL) == 4 ? 0x1p120 : 0x1p1000;
    int inside = 1;
    for (int64_t i = 0; i < count; ++i) {
        const double sq = metric == TM_METRIC_COSINE ? norms[i] * norms[i] : norms[i];
        inside &= !(sq != 0.0 && (sq < low || sq > high)); /* NaN (unchecked input): in */
    }
    return inside;
}

double TM_FN(tm_exact_distance_checked)(const TM_REAL *a, const TM_REAL *b, int64_t d,
                                        int metric, int *outside)
{
    if (sizeof(TM_REAL) == 4)
        return TM_FN(tm_exact_distance)(a, b, d, metric);
    if (metric == TM_METRIC_COSINE) {
        const double sa = TM_FN(checked_sqnorm)(a, d), sb = TM_FN(checked_sqnorm)(b, d);
        if (!TM_FN(norms_in_window)(&sa, 1, TM_METRIC_EUCLIDEAN) ||
            !TM_FN(norms_in_window)(&sb, 1, TM_METRIC_EUCLIDEAN))
            *outside = 1;
        return TM_FN(exact_cosine)(a, sqrt(sa), b, sqrt(sb), d);
    }
    const double sq = TM_FN(tm_exact_sqeuclidean)(a, b, d);
    if (sq > 0x1p1000) { /* the sum may have overflowed */
        *outside = 1;
    } else if (sq < 0x1p-960) {
        /* A difference below double's squares: refused only for tiny rows (which a power
         * of two brings in); between rows of ordinary size it is below the accuracy the
         * distances have anyway (relative to the rows' norms), so 0 or a few ulps stand. */
        double most = 0.0;
        for (int64_t p = 0; p < d; ++p)
            most = fmax(most, fmax(fabs((double)a[p]), fabs((double)b[p])));
        if (most > 0.0 && most < 0x1p-470)
            *outside = 1;
    }
    return metric == TM_METRIC_SQEUCLIDEAN ? sq : sqrt(sq);
}

static void TM_FN(set_groups)(TM_FN(prepare_side) *side, int64_t d)
{
    /* About 32 KiB of rows per work item. */
    const int64_t panels = (side->rows + side->width - 1) / side->width;
    const int64_t row_bytes = (d > 0 ? d : 1) * (int64_t)sizeof(TM_REAL);
    side->panels_per_group = 1 + 32768 / (row_bytes * side->width);
    side->groups = (panels + side->panels_per_group - 1) / side->panels_per_group;
}

typedef struct {
    const TM_REAL *x, *ref;
    int64_t n, m, d;
    int metric, self;
    const TM_REAL *x_packed, *ref_packed;
    const double *x_norms, *ref_norms;
    const TM_REAL *x_norms_real, *ref_norms_real; /* the same, rounded (euclidean metrics) */
    int mr, nr;
    int64_t mc, nc;
    TM_FN(tm_dot_kernel) dot;
    tm_gram_row_kernel gram_row; /* the kernel set's finishing of euclidean rows */
    tm_clamp_row_kernel clamp_row;
    tm_row_scale scale; /* the problem's row_exponent: tiles in the caller's units */
    atomic_int *beyond; /* set when such a distance overflows TM_REAL: TM_ERR_RANGE */
} TM_FN(engine_plan);

/* A row of a tile in the caller's units (the problem's row_exponent); an overflow
 * flags the plan.  Out of line: the tile loop stays as it was for the usual call. */
#if defined(__GNUC__)
__attribute__((noinline, cold))
#endif
static void TM_FN(to_caller_units)(const TM_FN(engine_plan) *pl, TM_REAL *t, int64_t count)
{
    int beyond = 0;
    for (int64_t j = 0; j < count; ++j) {
        t[j] = (TM_REAL)tm_caller_distance(&pl->scale, (double)t[j]);
        beyond |= isinf(t[j]) != 0;
    }
    if (beyond)
        atomic_store_explicit(pl->beyond, 1, memory_order_relaxed);
}

/* Fills tile[i*nc + j] with d(row0 + i, col0 + j); with upper, only the
 * entries with col0 + j >= row0 + i (micro-tiles wholly below the diagonal
 * are not multiplied). */
static void TM_FN(compute_tile)(const TM_FN(engine_plan) *pl, int64_t row0,
                                int64_t nrows, int64_t col0, int64_t ncols,
                                TM_REAL *tile, int upper)
{
    const int64_t ld = pl->nc, d = pl->d;
    const int mr = pl->mr, nr = pl->nr;
    const int64_t row_panels = (nrows + mr - 1) / mr;
    const int64_t col_panels = (ncols + nr - 1) / nr;
    /* row0 and col0 are multiples of mr and nr (mc, nc are). */
    const TM_REAL *a0 = pl->x_packed + row0 * d;
    const TM_REAL *b0 = pl->ref_packed + col0 * d;
    for (int64_t jp = 0; jp < col_panels; ++jp)
        for (int64_t ip = 0; ip < row_panels; ++ip)
            if (!upper || col0 + (jp + 1) * nr > row0 + ip * mr)
                pl->dot(d, a0 + ip * mr * d, b0 + jp * nr * d,
                        tile + ip * mr * ld + jp * nr, ld);

    for (int64_t i = 0; i < nrows; ++i) {
        const int64_t row = row0 + i;
        const TM_REAL *xi = pl->x + row * d;
        const double norm_x = pl->x_norms[row];
        const int64_t skip = upper && row > col0 ? row - col0 : 0;
        if (skip >= ncols)
            continue;
        /* From here on t and wanted cover the row's wanted entries only. */
        TM_REAL *t = tile + i * ld + skip;
        const int64_t first_col = col0 + skip, wanted = ncols - skip;
        if (pl->metric == TM_METRIC_COSINE) {
            for (int64_t j = 0; j < wanted; ++j) {
                const double norm_r = pl->ref_norms[first_col + j];
                double dist = 1.0;
                if (norm_x != 0.0 && norm_r != 0.0) {
                    dist = 1.0 - (double)t[j] / (norm_x * norm_r);
                    if (dist < TM_REFINE)
                        dist = TM_FN(exact_cosine)(xi, norm_x,
                                                   pl->ref + (first_col + j) * d,
                                                   norm_r, d);
                    if (dist < 0.0)
                        dist = 0.0;
                    if (dist > 2.0)
                        dist = 2.0;
                }
                t[j] = (TM_REAL)dist;
            }
        } else {
            /* Three loops so that the common work vectorises: Gram identity
             * (noting whether any pair is near), exact refinement of the near
             * pairs (rare), clamp and square root. */
            const TM_REAL norm_xr = pl->x_norms_real[row];
            const TM_REAL *norm_r = pl->ref_norms_real + first_col;
            const TM_REAL refine = (TM_REAL)TM_REFINE;
            const int near = pl->gram_row(t, (double)norm_xr, norm_r, wanted, (double)refine);
            if (near)
                for (int64_t j = 0; j < wanted; ++j)
                    if (t[j] < refine * (norm_xr + norm_r[j]))
                        t[j] = (TM_REAL)TM_FN(tm_exact_sqeuclidean)(
                            xi, pl->ref + (first_col + j) * d, d);
            pl->clamp_row(t, wanted, pl->metric == TM_METRIC_EUCLIDEAN);
            if (pl->scale.shift != 0) /* the rare rerun of rows of extreme magnitude */
                TM_FN(to_caller_units)(pl, t, wanted);
        }
        if (pl->self && row >= first_col && row < col0 + ncols)
            t[row - first_col] = 0;
    }
}


/* One work item: a whole anchor block (whole_rows) or a single tile. */
typedef struct {
    const TM_FN(engine_plan) *plan;
    const TM_FN(tm_reducer) *reducer;
    int64_t col_blocks;
    TM_REAL *tiles;
    atomic_int status;
} TM_FN(engine_job);

/* One work item, run by `thread` (a participant or, for static schedules, a
 * slot: the reducer's per-thread state): a whole anchor block (whole_rows)
 * or a single tile. */
static void TM_FN(run_unit)(void *ctx, int thread, int64_t unit)
{
    TM_FN(engine_job) *job = ctx;
    const TM_FN(engine_plan) *pl = job->plan;
    const TM_FN(tm_reducer) *reducer = job->reducer;
    const int64_t col_blocks = job->col_blocks;
    atomic_int *shared_status = &job->status;
    if (atomic_load_explicit(shared_status, memory_order_relaxed) != TM_OK)
        return;
    const int64_t mc = pl->mc, nc = pl->nc;
    TM_REAL *tiles = job->tiles;
    TM_REAL *tile = tiles + (size_t)thread * (size_t)(mc * nc);
    const int64_t rb = reducer->whole_rows ? unit : unit / col_blocks;
    const int64_t row0 = rb * mc;
    const int64_t nrows = pl->n - row0 < mc ? pl->n - row0 : mc;
    const int64_t cb_first = reducer->whole_rows ? 0 : unit % col_blocks;
    const int64_t cb_end = reducer->whole_rows ? col_blocks : cb_first + 1;
    const int upper = pl->self && reducer->upper && !reducer->whole_rows;
    int st = TM_OK;
    if (reducer->whole_rows && reducer->begin_rows != NULL)
        st = reducer->begin_rows(reducer->ctx, thread, row0, nrows);
    for (int64_t cb = cb_first; cb < cb_end && st == TM_OK; ++cb) {
        const int64_t col0 = cb * nc;
        const int64_t ncols = pl->m - col0 < nc ? pl->m - col0 : nc;
        if (upper && col0 + ncols <= row0)
            continue; /* wholly below the diagonal */
        TM_FN(compute_tile)(pl, row0, nrows, col0, ncols, tile, upper);
        st = reducer->tile(reducer->ctx, thread, row0, nrows, col0, ncols, tile, nc);
    }
    if (st == TM_OK && reducer->whole_rows && reducer->end_rows != NULL)
        st = reducer->end_rows(reducer->ctx, thread, row0, nrows);
    if (st != TM_OK)
        atomic_store(shared_status, st);
}

static void TM_FN(run_units)(void *ctx, int participant, int64_t begin, int64_t end)
{
    for (int64_t unit = begin; unit < end; ++unit)
        TM_FN(run_unit)(ctx, participant, unit);
}

int TM_FN(tm_tile_engine)(const TM_FN(tm_tile_problem) *problem,
                          const TM_FN(tm_reducer) *reducer)
{
    if (problem == NULL || reducer == NULL || reducer->tile == NULL)
        return TM_ERR_INVALID;
    const int64_t n = problem->n, d = problem->d;
    const int self = problem->ref == NULL;
    const int64_t m = self ? n : problem->m;
    const int metric = problem->metric;
    if (n < 0 || m < 0 || d < 0 || (self && problem->m != n))
        return TM_ERR_INVALID;
    if (metric != TM_METRIC_EUCLIDEAN && metric != TM_METRIC_SQEUCLIDEAN &&
        metric != TM_METRIC_COSINE)
        return TM_ERR_INVALID;
    if ((problem->x == NULL && n > 0 && d > 0) ||
        (!self && problem->ref == NULL && m > 0 && d > 0))
        return TM_ERR_INVALID;

    const tm_kernel_set *kernels = tm_active_kernels();
    TM_FN(engine_plan) plan;
    const int scale_status = tm_row_scale_init(metric, problem->row_exponent, &plan.scale);
    if (scale_status != TM_OK)
        return scale_status;
    plan.x = problem->x;
    plan.ref = self ? problem->x : problem->ref;
    plan.n = n;
    plan.m = m;
    plan.d = d;
    plan.metric = metric;
    plan.self = self;
    plan.mr = TM_FN(kernel_mr)(kernels);
    plan.nr = TM_FN(kernel_nr)(kernels);
    plan.dot = TM_FN(kernel_dot)(kernels);
    plan.gram_row = TM_FN(kernel_gram_row)(kernels);
    plan.clamp_row = TM_FN(kernel_clamp_row)(kernels);

    /* Block sizes: see the comment at the top of this file. */
    const int64_t row_bytes = (d > 0 ? d : 1) * (int64_t)sizeof(TM_REAL);
    int64_t nc = TM_REF_BLOCK_BYTES / row_bytes;
    if (nc > TM_MAX_REF_BLOCK)
        nc = TM_MAX_REF_BLOCK;
    nc = nc / plan.nr * plan.nr;
    if (nc < plan.nr)
        nc = plan.nr;
    if (nc > TM_FN(round_up)(m, plan.nr))
        nc = TM_FN(round_up)(m > 0 ? m : 1, plan.nr);
    const int max_threads = tm_get_num_threads();
    /* Enough anchor blocks to balance threads on small batches. */
    int64_t mc = TM_FN(round_up)(TM_ANCHOR_BLOCK, plan.mr);
    const int64_t balanced = TM_FN(round_up)(
        (n + 4 * (int64_t)max_threads - 1) / (4 * (int64_t)max_threads), plan.mr);
    if (balanced < mc)
        mc = balanced > 0 ? balanced : plan.mr;
    if (reducer->max_block_rows > 0 && mc > reducer->max_block_rows) {
        mc = reducer->max_block_rows / plan.mr * plan.mr;
        if (mc < plan.mr)
            mc = plan.mr;
    }
    plan.mc = mc;
    plan.nc = nc;

    const int64_t row_blocks = (n + mc - 1) / mc;
    const int64_t col_blocks = (m + nc - 1) / nc;
    const int64_t units = reducer->whole_rows ? row_blocks : row_blocks * col_blocks;
    /* Tiny problems run on one thread: waking a team costs more than they do. */
    const int64_t work = n * m * (d + 8);
    const int threads = tm_threads_for(work < TM_MIN_PARALLEL_WORK ? 1 : units);

    /* Every allocation happens here, before any output is written. */
    size_t x_pack_bytes, ref_pack_bytes, tile_bytes, x_norm_bytes, ref_norm_bytes, real_norm_bytes;
    int status;
    if ((status = tm_bytes(TM_FN(round_up)(n, plan.mr), d, sizeof(TM_REAL), &x_pack_bytes)) ||
        (status = tm_bytes(TM_FN(round_up)(m, plan.nr), d, sizeof(TM_REAL), &ref_pack_bytes)) ||
        (status = tm_bytes((int64_t)threads * mc, nc, sizeof(TM_REAL), &tile_bytes)) ||
        (status = tm_bytes(n, 1, sizeof(double), &x_norm_bytes)) ||
        (status = tm_bytes(self ? 0 : m, 1, sizeof(double), &ref_norm_bytes)) ||
        (status = tm_bytes(n + (self ? 0 : m), 1, sizeof(TM_REAL), &real_norm_bytes)))
        return status;
    TM_REAL *x_packed = tm_alloc(x_pack_bytes);
    TM_REAL *ref_packed = tm_alloc(ref_pack_bytes);
    TM_REAL *tiles = tm_alloc(tile_bytes);
    double *x_norms = tm_alloc(x_norm_bytes);
    double *ref_norms = self ? x_norms : tm_alloc(ref_norm_bytes);
    TM_REAL *real_norms = tm_alloc(real_norm_bytes);
    if (x_packed == NULL || ref_packed == NULL || tiles == NULL ||
        x_norms == NULL || ref_norms == NULL || real_norms == NULL) {
        status = TM_ERR_NOMEM;
        goto done;
    }
    if (reducer->setup != NULL && (status = reducer->setup(reducer->ctx, threads, mc)) != TM_OK)
        goto done;

    /* Pack both sides and take their norms in one parallel region. */
    TM_FN(prepare_job) prep = {
        {{plan.x, n, plan.mr, x_packed, x_norms, real_norms, 0, 0},
         {plan.ref, m, plan.nr, ref_packed, self ? NULL : ref_norms,
          self ? NULL : real_norms + n, 0, 0}},
        d, metric};
    TM_FN(set_groups)(&prep.side[0], d);
    TM_FN(set_groups)(&prep.side[1], d);
    tm_parallel_for(threads, prep.side[0].groups + prep.side[1].groups, 1,
                    TM_FN(prepare_range), &prep);
    /* The Gram identity needs every nonzero squared norm inside the window of TM_REAL
     * (tm_status TM_ERR_RANGE): one pass over the norms the packing took. */
    if (!TM_FN(norms_in_window)(x_norms, n, metric) ||
        (!self && !TM_FN(norms_in_window)(ref_norms, m, metric))) {
        status = TM_ERR_RANGE;
        goto done;
    }
    plan.x_packed = x_packed;
    plan.ref_packed = ref_packed;
    plan.x_norms = x_norms;
    plan.ref_norms = ref_norms;
    plan.x_norms_real = real_norms;
    plan.ref_norms_real = self ? real_norms : real_norms + n;

    atomic_int beyond = 0;
    plan.beyond = &beyond;
    TM_FN(engine_job) job = {&plan, reducer, col_blocks, tiles, TM_OK};
    if (reducer->static_schedule)
        tm_parallel_slots(threads, units, TM_FN(run_unit), &job);
    else
        tm_parallel_for(threads, units, 1, TM_FN(run_units), &job);
    status = atomic_load(&job.status);
    /* A distance in the caller's units beyond TM_REAL (row_exponent): the reducer has
     * seen inf; its owner writes nothing on an error. */
    if (status == TM_OK && atomic_load(&beyond))
        status = TM_ERR_RANGE;

done:
    tm_free(x_packed);
    tm_free(ref_packed);
    tm_free(tiles);
    tm_free(x_norms);
    if (!self)
        tm_free(ref_norms);
    tm_free(real_norms);
    return status;
}

/* ---- row collector: the reducer behind tm_run_rows -------------------- */

typedef struct {
    const TM_FN(tm_row_op) *op;
    int64_t m;
    int64_t block_rows;
    TM_REAL *buffer; /* nthreads x block_rows x m */
} TM_FN(row_collector);

static int TM_FN(rows_setup)(void *ctx, int nthreads, int64_t block_rows)
{
    TM_FN(row_collector) *rc = ctx;
    size_t bytes;
    int status = tm_bytes((int64_t)nthreads * block_rows, rc->m, sizeof(TM_REAL), &bytes);
    if (status != TM_OK)
        return status;
    rc->block_rows = block_rows;
    rc->buffer = tm_alloc(bytes);
    if (rc->buffer == NULL)
        return TM_ERR_NOMEM;
    return rc->op->setup != NULL ? rc->op->setup(rc->op->op, nthreads, block_rows) : TM_OK;
}

static int TM_FN(rows_tile)(void *ctx, int thread, int64_t row0, int64_t nrows, int64_t col0,
                            int64_t ncols, const TM_REAL *dist, int64_t ld)
{
    (void)row0;
    TM_FN(row_collector) *rc = ctx;
    TM_REAL *rows = rc->buffer + (size_t)thread * (size_t)(rc->block_rows * rc->m);
    for (int64_t i = 0; i < nrows; ++i)
        memcpy(rows + i * rc->m + col0, dist + i * ld, (size_t)ncols * sizeof(TM_REAL));
    return TM_OK;
}

static int TM_FN(rows_end)(void *ctx, int thread, int64_t row0, int64_t nrows)
{
    TM_FN(row_collector) *rc = ctx;
    TM_REAL *rows = rc->buffer + (size_t)thread * (size_t)(rc->block_rows * rc->m);
    for (int64_t i = 0; i < nrows; ++i) {
        const int status = rc->op->row(rc->op->op, thread, row0 + i, i, rows + i * rc->m);
        if (status != TM_OK)
            return status;
    }
    return rc->op->block != NULL ? rc->op->block(rc->op->op, thread, row0, nrows, rows) : TM_OK;
}

int TM_FN(tm_run_rows)(const TM_FN(tm_tile_problem) *problem, const TM_FN(tm_row_op) *op)
{
    if (problem == NULL || op == NULL || op->row == NULL)
        return TM_ERR_INVALID;
    const int64_t m = problem->ref == NULL ? problem->n : problem->m;
    TM_FN(row_collector) rc = {op, m, 0, NULL};
    int64_t max_rows = TM_ROW_BUFFER_BYTES / ((m > 0 ? m : 1) * (int64_t)sizeof(TM_REAL));
    const TM_FN(tm_reducer) reducer = {
        &rc, 1, max_rows > 0 ? max_rows : 1, op->static_schedule,
        TM_FN(rows_setup), NULL, TM_FN(rows_tile), TM_FN(rows_end), 0,
    };
    const int status = TM_FN(tm_tile_engine)(problem, &reducer);
    tm_free(rc.buffer);
    return status;
}

/* ---- small dense products for gradients ------------------------------------ */

void TM_FN(tm_pack_column_panels)(const tm_kernel_set *kernels, const TM_REAL *src, int64_t rows,
                                  int64_t cols, TM_REAL *dst)
{
    const int nr = TM_FN(kernel_nr)(kernels);
    const int64_t panels = (cols + nr - 1) / nr;
    for (int64_t q = 0; q < panels; ++q) {
        TM_REAL *panel = dst + q * rows * nr;
        const int64_t col0 = q * nr;
        const int64_t width = cols - col0 < nr ? cols - col0 : nr;
        for (int64_t p = 0; p < rows; ++p) {
            const TM_REAL *s = src + p * cols + col0;
            TM_REAL *out = panel + p * nr;
            for (int64_t j = 0; j < width; ++j)
                out[j] = s[j];
            for (int64_t j = width; j < nr; ++j)
                out[j] = 0;
        }
    }
}

/* Rows of A in chunks of TM_GEMM_ROWS and k in chunks of TM_GEMM_KC: one
 * packed chunk of A (MR-panels) meets each KC x NR panel of P while that
 * panel sits in L1; each MR x NR product is added into C. */
void TM_FN(tm_gemm_acc)(const tm_kernel_set *kernels, int64_t rows, int64_t k, const TM_REAL *a,
                        int64_t lda, int transpose_a, const TM_REAL *panels, int64_t panel_rows,
                        int64_t k0, int64_t n_out, TM_REAL *c, int64_t ldc, TM_REAL *scratch)
{
    const int mr = TM_FN(kernel_mr)(kernels), nr = TM_FN(kernel_nr)(kernels);
    const TM_FN(tm_dot_kernel) dot = TM_FN(kernel_dot)(kernels);
    const int64_t chunk_rows = TM_FN(round_up)(TM_GEMM_ROWS, mr);
    TM_REAL *a_packed = scratch;                        /* chunk_rows x KC */
    TM_REAL *tile = scratch + chunk_rows * TM_GEMM_KC;  /* mr x nr */
    const int64_t col_panels = (n_out + nr - 1) / nr;
    for (int64_t r0 = 0; r0 < rows; r0 += chunk_rows) {
        const int64_t nrows = rows - r0 < chunk_rows ? rows - r0 : chunk_rows;
        const int64_t row_panels = (nrows + mr - 1) / mr;
        for (int64_t p0 = 0; p0 < k; p0 += TM_GEMM_KC) {
            const int64_t kc = k - p0 < TM_GEMM_KC ? k - p0 : TM_GEMM_KC;
            /* Pack A[r0 : r0 + nrows, p0 : p0 + kc] into MR-panels, k-major. */
            for (int64_t ip = 0; ip < row_panels; ++ip) {
                TM_REAL *panel = a_packed + ip * mr * kc;
                const int64_t first = r0 + ip * mr;
                const int64_t valid = r0 + nrows - first < mr ? r0 + nrows - first : mr;
                if (transpose_a) {
                    /* A's rows are columns of a: read each k's mr values together. */
                    for (int64_t p = 0; p < kc; ++p) {
                        const TM_REAL *src = a + (p0 + p) * lda + first;
                        for (int i = 0; i < mr; ++i)
                            panel[p * mr + i] = i < valid ? src[i] : 0;
                    }
                } else {
                    for (int i = 0; i < mr; ++i) {
                        if (i >= valid) {
                            for (int64_t p = 0; p < kc; ++p)
                                panel[p * mr + i] = 0;
                            continue;
                        }
                        const TM_REAL *src = a + (first + i) * lda + p0;
                        for (int64_t p = 0; p < kc; ++p)
                            panel[p * mr + i] = src[p];
                    }
                }
            }
            for (int64_t q = 0; q < col_panels; ++q) {
                const TM_REAL *b = panels + (q * panel_rows + k0 + p0) * nr;
                const int64_t col0 = q * nr;
                const int64_t width = n_out - col0 < nr ? n_out - col0 : nr;
                for (int64_t ip = 0; ip < row_panels; ++ip) {
                    dot(kc, a_packed + ip * mr * kc, b, tile, nr);
                    const int64_t row0 = r0 + ip * mr;
                    const int64_t height = r0 + nrows - row0 < mr ? r0 + nrows - row0 : mr;
                    for (int64_t i = 0; i < height; ++i) {
                        TM_REAL *out = c + (row0 + i) * ldc + col0;
                        const TM_REAL *t = tile + i * nr;
                        for (int64_t j = 0; j < width; ++j)
                            out[j] += t[j];
                    }
                }
            }
        }
    }
}
