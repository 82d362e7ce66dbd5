/*
 * The dense pair losses' machinery, one body for both precisions: the
 * gradient of one pair (pair_coefficients) and the row walk that turns every
 * (anchor, reference) pair's weight into matrix products (dense_op).  Shared
 * by losses.c (batch-all, contrastive) and pair_heads.c (lifted structured).
 * Everything is static inline: each translation unit uses its own part.
 */

/*
 * Gradient of one pair.  For a weight w = dL/dd(a, j), the pair adds
 *   w * dd/dx_a = alpha * x_a + beta * r_j      to the anchor's gradient,
 *   w * dd/dr_j = gamma * r_j + beta * x_a      to the reference's,
 * with, per metric (d the pair's distance):
 *   euclidean    alpha = gamma = w / d, beta = -w / d   (0 when d == 0)
 *   sqeuclidean  alpha = gamma = 2w,    beta = -2w
 *   cosine       alpha = w cos / |x|^2, gamma = w cos / |r|^2,
 *                beta = -w / (|x| |r|)                   (0 for a zero vector)
 */

typedef struct {
    double alpha, beta, gamma;
} TM_FN(pair_coef);

static inline TM_FN(pair_coef) TM_FN(pair_coefficients)(int metric, double w, double dist,
                                                        double norm_a, double norm_j)
{
    TM_FN(pair_coef) c = {0.0, 0.0, 0.0};
    if (w == 0.0)
        return c;
    if (metric == TM_METRIC_SQEUCLIDEAN) {
        c.alpha = c.gamma = 2.0 * w;
        c.beta = -2.0 * w;
    } else if (metric == TM_METRIC_COSINE) {
        if (norm_a > 0.0 && norm_j > 0.0) {
            const double cosine = 1.0 - dist;
            c.alpha = w * cosine / (norm_a * norm_a);
            c.gamma = w * cosine / (norm_j * norm_j);
            c.beta = -w / (norm_a * norm_j);
        }
    } else if (dist > 0.0) {
        c.alpha = c.gamma = w / dist;
        c.beta = -w / dist;
    }
    return c;
}

static inline double TM_FN(norm_of)(const TM_REAL *row, int64_t d)
{
    double s = 0.0;
    for (int64_t k = 0; k < d; ++k)
        s += (double)row[k] * (double)row[k];
    return sqrt(s);
}


static inline double TM_FN(reduction_scale)(int reduction, int64_t count, int64_t active)
{
    switch (reduction) {
    case TM_REDUCE_MEAN:
        return count > 0 ? 1.0 / (double)count : 0.0;
    case TM_REDUCE_MEAN_NONZERO:
        return active > 0 ? 1.0 / (double)active : 0.0;
    default:
        return 1.0;
    }
}

/* A value's bits, for a branch-free finiteness test: the exponent field plus one carries
 * into the sign bit only when it is all ones (inf or NaN), so OR-ing exponent_carry over
 * values and testing the top bit (carry_beyond) is adds, ands and ors, which vectorise on
 * any x86-64 (a float compare, or a 64-bit one, does not on SSE2). */
#if TM_BITS == 32
typedef uint32_t TM_FN(real_bits);
#else
typedef uint64_t TM_FN(real_bits);
#endif

static inline TM_FN(real_bits) TM_FN(exponent_carry)(TM_REAL value)
{
    const int mantissa = TM_BITS == 32 ? 23 : 52;
    const TM_FN(real_bits) one = (TM_FN(real_bits))1 << mantissa;
    const TM_FN(real_bits) exponent = ((TM_FN(real_bits))1 << (TM_BITS - 1)) - one;
    TM_FN(real_bits) bits;
    memcpy(&bits, &value, sizeof(bits));
    return (bits & exponent) + one;
}

static inline int TM_FN(carry_beyond)(TM_FN(real_bits) carries)
{
    return (int)(carries >> (TM_BITS - 1));
}

/* Whether every entry is finite: one pass over values just written.  The losses run it
 * over their gradients, so that an overflow (rows or margins near the top of the
 * precision) is TM_ERR_RANGE, never an inf or NaN handed back. */
static inline int TM_FN(all_finite)(const TM_REAL *v, size_t count)
{
    TM_FN(real_bits) carries = 0;
    for (size_t i = 0; i < count; ++i)
        carries |= TM_FN(exponent_carry)(v[i]);
    return !TM_FN(carry_beyond)(carries);
}

/* TM_OK, or TM_ERR_RANGE when grad (n x d) or ref_grad (m x d; either may be NULL) holds
 * an entry beyond the precision (see all_finite). */
static inline int TM_FN(check_gradients)(const TM_REAL *grad, int64_t n, const TM_REAL *ref_grad,
                                         int64_t m, int64_t d)
{
    const int fits = (grad == NULL || TM_FN(all_finite)(grad, (size_t)(n * d))) &&
                     (ref_grad == NULL || TM_FN(all_finite)(ref_grad, (size_t)(m * d)));
    return fits ? TM_OK : TM_ERR_RANGE;
}

static inline int TM_FN(valid_reduction)(int reduction)
{
    return reduction == TM_REDUCE_MEAN || reduction == TM_REDUCE_SUM ||
           reduction == TM_REDUCE_MEAN_NONZERO || reduction == TM_REDUCE_NONE;
}


/* ---- dense losses: batch-all and contrastive --------------------------------
 *
 * Both visit every (anchor, reference) pair once, as row operations.  Each
 * row turns its distances, in place, into the pair coefficients beta_aj of
 * the gradient (see pair_coefficients), summing the alpha and gamma terms,
 * which multiply the pair's own row:
 *   dL/dx_a   = (sum_j alpha_aj) x_a + sum_j beta_aj r_j
 *   dL/dr_j  += (sum_a gamma_aj) r_j + sum_a beta_aj x_a
 * so that, per block of anchor rows, the two sums over pairs are matrix
 * products (coefficients x reference rows, and their transpose x anchor
 * rows) on the distance micro-kernels.  The anchor side is kept unscaled
 * (the reduction's scale is known only once every row is seen).  The
 * reference side goes to per-thread accumulators for a range of reference
 * rows, summed in thread order after the pass, with blocks assigned to
 * threads statically: a given thread count always gives the same bits.  The
 * range covers all m rows when threads x m x d fits TM_REF_ACC_BYTES;
 * otherwise the walk is repeated for successive ranges (recomputing the
 * distances, never storing more), so memory stays bounded whatever the
 * thread count.  Contrastive keeps its positive (part 0) and
 * negative (part 1) terms apart because "mean_nonzero" scales them
 * separately; in self mode its pair terms are symmetric, so the reference
 * side equals the anchor side and is not computed.
 */

/* Below one nonzero coefficient in this many pairs, a block's gradient
 * visits the pairs instead of multiplying matrices. */
#ifndef TM_SPARSE_RATIO
#define TM_SPARSE_RATIO 16
#endif
/* Up to this many positives per anchor (hinge, euclidean metrics), batch-all
 * takes one whole-row pass per positive (batch_all_row_few) instead of
 * sorting the positives and searching them once per negative. */
/* Budget of all per-thread reference-gradient accumulators together. */
#ifndef TM_REF_ACC_BYTES
#define TM_REF_ACC_BYTES (32 * 1024 * 1024)
#endif

typedef struct {
    TM_FN(row_common) c;
    const TM_REAL *x, *r;
    int64_t n, d;
    int metric;
    tm_row_scale scale;      /* rows given at 2^e times the caller's (dense_init) */
    const double *x_norms, *r_norms; /* cosine only */
    const tm_kernel_set *kernels;
    /* options */
    double margin, pos_margin, neg_margin;
    int soft, power, want_grad, want_ref_side, parts;
    /* per anchor: losses and counts (part 0 and part 1) */
    double *loss[2];
    int64_t *count[2], *active[2];
    /* gradient state, all unscaled */
    double *alpha[2];        /* n: sum of the row's alpha coefficients */
    double *gamma[2];        /* threads x span: sum of gamma coefficients per reference */
    TM_REAL *coef1;          /* threads x block_rows x m: part 1 coefficients */
    int64_t block_rows;
    TM_REAL *anchor_grad[2]; /* n x d */
    TM_REAL *ref_acc[2];     /* threads x span x d, for reference rows [ref_lo, ref_hi) */
    int64_t ref_lo, ref_hi, span; /* span: fixed before the first pass */
    int max_threads;
    int pinned, previous_pin; /* the thread count is pinned from dense_plan to release */
    int first_pass;          /* the pass that also does losses and the anchor side */
    TM_REAL *x_panels, *r_panels;
    int64_t *nonzeros;       /* threads x 2: coefficients set in the current block */
    TM_REAL *gemm_scratch;
    int64_t scratch_elems;
    int nthreads;
    /* batch-all's two-sided rows (two_sided_setup) */
    int two_sided;
    int64_t max_pos;   /* positives per anchor, at most */
    TM_REAL *pos_t;    /* max_pos x n: distance to anchor j's r-th positive, -inf past the last */
    int64_t *pos_idx;  /* max_pos x n: that positive's index, -1 past the last */
    int64_t *pos_hits; /* n x max_pos: active negatives of anchor j's r-th positive */
} TM_FN(dense_op);

/* Rows of the reference side one pass covers: all of them unless the
 * per-thread accumulators would exceed TM_REF_ACC_BYTES. */
static inline int64_t TM_FN(ref_span)(int64_t m, int64_t d, int nthreads, int parts)
{
    const int64_t per_row = (int64_t)nthreads * parts * (d > 0 ? d : 1) *
                            (int64_t)sizeof(TM_REAL);
    int64_t span = TM_REF_ACC_BYTES / per_row;
    if (span < 64)
        span = 64;
    return span < m ? span : (m > 0 ? m : 1);
}

static inline int TM_FN(dense_setup)(void *op, int nthreads, int64_t block_rows)
{
    TM_FN(dense_op) *s = op;
    const int64_t m = s->c.lv.m, d = s->d;
    if (s->c.scratch.positives != NULL) {
        /* A later pass: same problem, so the same threads and blocks. */
        if (nthreads != s->nthreads || block_rows != s->block_rows)
            return TM_ERR_INVALID;
    } else {
        s->nthreads = nthreads;
        s->block_rows = block_rows;
        int status = TM_FN(scratch_alloc)(&s->c.scratch, nthreads, m);
        if (status != TM_OK || !s->want_grad)
            return status;
        const int nr = TM_FN(kernel_nr)(s->kernels);
        const int64_t d_padded = TM_FN(round_up)(d > 0 ? d : 1, nr);
        if (nthreads > s->max_threads)
            return TM_ERR_INVALID;
        const int64_t span = s->span;
        size_t gamma_bytes, coef_bytes, acc_bytes, xp_bytes, rp_bytes, scratch_bytes;
        s->scratch_elems = tm_gemm_scratch_elems(s->kernels);
        if ((status = tm_bytes((int64_t)nthreads, span, sizeof(double), &gamma_bytes)) != TM_OK ||
            (status = tm_bytes((int64_t)nthreads * block_rows, s->parts == 2 ? m : 0,
                               sizeof(TM_REAL), &coef_bytes)) != TM_OK ||
            (status = tm_bytes((int64_t)nthreads * span, d, sizeof(TM_REAL), &acc_bytes)) !=
                TM_OK ||
            (status = tm_bytes(s->want_ref_side ? s->n : 0, d_padded, sizeof(TM_REAL),
                               &xp_bytes)) != TM_OK ||
            (status = tm_bytes(m, d_padded, sizeof(TM_REAL), &rp_bytes)) != TM_OK ||
            (status = tm_bytes((int64_t)nthreads, s->scratch_elems, sizeof(TM_REAL),
                               &scratch_bytes)) != TM_OK)
            return status;
        s->coef1 = tm_alloc(coef_bytes);
        s->nonzeros = tm_alloc((size_t)nthreads * 2 * sizeof(int64_t));
        s->gemm_scratch = tm_alloc(scratch_bytes);
        s->r_panels = tm_alloc(rp_bytes);
        s->x_panels = s->want_ref_side ? (s->c.lv.self ? s->r_panels : tm_alloc(xp_bytes)) : NULL;
        if (s->coef1 == NULL || s->nonzeros == NULL || s->gemm_scratch == NULL ||
            s->r_panels == NULL || (s->want_ref_side && s->x_panels == NULL))
            return TM_ERR_NOMEM;
        for (int part = 0; part < s->parts && s->want_ref_side; ++part) {
            s->gamma[part] = tm_alloc(gamma_bytes);
            s->ref_acc[part] = tm_alloc(acc_bytes);
            if (s->gamma[part] == NULL || s->ref_acc[part] == NULL)
                return TM_ERR_NOMEM;
        }
        TM_FN(tm_pack_column_panels)(s->kernels, s->r, m, d, s->r_panels);
        if (s->want_ref_side && !s->c.lv.self)
            TM_FN(tm_pack_column_panels)(s->kernels, s->x, s->n, d, s->x_panels);
    }
    if (!s->want_grad)
        return TM_OK;
    memset(s->nonzeros, 0, (size_t)nthreads * 2 * sizeof(int64_t));
    for (int part = 0; part < s->parts && s->want_ref_side; ++part) {
        memset(s->gamma[part], 0, (size_t)nthreads * (size_t)s->span * sizeof(double));
        memset(s->ref_acc[part], 0,
               (size_t)nthreads * (size_t)s->span * (size_t)d * sizeof(TM_REAL));
    }
    return TM_OK;
}

static inline void TM_FN(dense_free)(TM_FN(dense_op) *s)
{
    TM_FN(scratch_free)(&s->c.scratch);
    tm_free(s->coef1);
    tm_free(s->nonzeros);
    tm_free(s->gemm_scratch);
    if (s->x_panels != s->r_panels)
        tm_free(s->x_panels);
    tm_free(s->r_panels);
    for (int part = 0; part < 2; ++part) {
        tm_free(s->gamma[part]);
        tm_free(s->ref_acc[part]);
    }
    tm_free(s->pos_t);
    tm_free(s->pos_idx);
    tm_free(s->pos_hits);
}

/* Records pair (a, j) with gradient weight w = dL/dd at distance dist (both in
 * the caller's units, see tm_row_scale): beta into the coefficient row, alpha
 * into *alpha_sum, gamma into the thread's per-reference sums. */
static inline void TM_FN(dense_pair)(const TM_FN(dense_op) *s, int thread, int part,
                                     int64_t a, int64_t j, double w, double dist,
                                     TM_REAL *coef_row, double *alpha_sum)
{
    const double norm_a = s->x_norms != NULL ? s->x_norms[a] : 0.0;
    const double norm_j = s->r_norms != NULL ? s->r_norms[j] : 0.0;
    const TM_FN(pair_coef) c =
        TM_FN(pair_coefficients)(s->metric, w * s->scale.coef, dist, norm_a, norm_j);
    coef_row[j] = (TM_REAL)c.beta;
    *alpha_sum += c.alpha;
    if (s->want_ref_side && j >= s->ref_lo && j < s->ref_hi)
        s->gamma[part][(size_t)thread * (size_t)s->span + (size_t)(j - s->ref_lo)] += c.gamma;
}


/* The block's gradient, for each part: anchor rows get alpha_a x_a +
 * (coefficients x reference rows); the thread's reference accumulator gets
 * (coefficients^T x anchor rows).  Dense blocks use the micro-kernel
 * products; blocks where few pairs carry a weight (hinges mostly inactive,
 * positives of a P x K batch) visit just those pairs. */
static inline int TM_FN(dense_block)(void *op, int thread, int64_t row0, int64_t nrows,
                                     TM_REAL *rows)
{
    TM_FN(dense_op) *s = op;
    if (!s->want_grad)
        return TM_OK;
    const int64_t m = s->c.lv.m, d = s->d, lo = s->ref_lo, hi = s->ref_hi;
    TM_REAL *scratch = s->gemm_scratch + (size_t)thread * (size_t)s->scratch_elems;
    for (int part = 0; part < s->parts; ++part) {
        const TM_REAL *coef =
            part == 0 ? rows : s->coef1 + (size_t)thread * (size_t)(s->block_rows * m);
        TM_REAL *anchor = s->first_pass ? s->anchor_grad[part] + row0 * d : NULL;
        TM_REAL *ref_acc = s->want_ref_side
                               ? s->ref_acc[part] + (size_t)thread * (size_t)(s->span * d)
                               : NULL;
        if (anchor != NULL)
            for (int64_t i = 0; i < nrows; ++i) {
                const double alpha = s->alpha[part][row0 + i];
                const TM_REAL *xa = s->x + (row0 + i) * d;
                for (int64_t k = 0; k < d; ++k)
                    anchor[i * d + k] = (TM_REAL)(alpha * (double)xa[k]);
            }
        const int64_t nonzeros = s->nonzeros[2 * thread + part];
        s->nonzeros[2 * thread + part] = 0;
        if (nonzeros == 0)
            continue;
        if (nonzeros * TM_SPARSE_RATIO < nrows * m) {
            for (int64_t i = 0; i < nrows; ++i) {
                const TM_REAL *crow = coef + i * m;
                const TM_REAL *xa = s->x + (row0 + i) * d;
                for (int64_t j = 0; j < m; ++j) {
                    const TM_REAL beta = crow[j];
                    if (beta == 0)
                        continue;
                    if (anchor != NULL) {
                        const TM_REAL *rj = s->r + j * d;
                        TM_REAL *ga = anchor + i * d;
                        for (int64_t k = 0; k < d; ++k)
                            ga[k] += beta * rj[k];
                    }
                    if (ref_acc != NULL && j >= lo && j < hi) {
                        TM_REAL *gj = ref_acc + (j - lo) * d;
                        for (int64_t k = 0; k < d; ++k)
                            gj[k] += beta * xa[k];
                    }
                }
            }
            continue;
        }
        if (anchor != NULL)
            TM_FN(tm_gemm_acc)(s->kernels, nrows, m, coef, m, 0, s->r_panels, m, 0, d, anchor, d,
                               scratch);
        if (ref_acc != NULL)
            TM_FN(tm_gemm_acc)(s->kernels, hi - lo, nrows, coef + lo, m, 1, s->x_panels, s->n,
                               row0, d, ref_acc, d, scratch);
    }
    return TM_OK;
}


/* Allocations shared by the dense losses: per-anchor arrays and norms.  The
 * row walks see their distances in the caller's units (the tile problem's
 * row_exponent); the exact distances a loss takes itself go through
 * dense_distance. */
static inline int TM_FN(dense_init)(TM_FN(dense_op) *s, const TM_REAL *x, int64_t n,
                                    const TM_REAL *ref, int64_t m, int64_t d, int metric,
                                    int row_exponent, const int64_t *labels,
                                    const int64_t *ref_labels, int64_t ref_offset, int parts)
{
    memset(s, 0, sizeof(*s));
    const int scale_status = tm_row_scale_init(metric, row_exponent, &s->scale);
    if (scale_status != TM_OK)
        return scale_status;
    TM_FN(row_common_init)(&s->c, labels, ref, ref_labels, m, ref_offset);
    s->x = x;
    s->r = ref == NULL ? x : ref;
    s->n = n;
    s->d = d;
    s->metric = metric;
    s->parts = parts;
    s->kernels = tm_active_kernels();
    size_t bytes;
    int status = tm_bytes(n > 0 ? n : 1, 10, sizeof(double), &bytes);
    if (status != TM_OK)
        return status;
    double *per_anchor = tm_alloc(bytes); /* 4 double + 4 int64 arrays (+2 spare) */
    if (per_anchor == NULL)
        return TM_ERR_NOMEM;
    memset(per_anchor, 0, bytes);
    for (int part = 0; part < 2; ++part) {
        s->loss[part] = per_anchor + part * n;
        s->alpha[part] = per_anchor + (2 + part) * n;
        s->count[part] = (int64_t *)(void *)(per_anchor + (4 + part) * n);
        s->active[part] = (int64_t *)(void *)(per_anchor + (6 + part) * n);
    }
    if (metric == TM_METRIC_COSINE) {
        if ((status = tm_bytes(n + m, 1, sizeof(double), &bytes)) != TM_OK)
            return status;
        double *norms = tm_alloc(bytes);
        if (norms == NULL)
            return TM_ERR_NOMEM;
        for (int64_t i = 0; i < n; ++i)
            norms[i] = TM_FN(norm_of)(x + i * d, d);
        for (int64_t j = 0; j < m; ++j)
            norms[n + j] = TM_FN(norm_of)(s->r + j * d, d);
        s->x_norms = norms;
        s->r_norms = norms + n;
    }
    return TM_OK;
}

/* The exact distance (direct difference) of rows a of x and j of the reference set, in
 * the caller's units. */
static inline double TM_FN(dense_distance)(const TM_FN(dense_op) *s, int64_t a, int64_t j)
{
    return tm_caller_distance(&s->scale, TM_FN(tm_exact_distance)(s->x + a * s->d,
                                                                  s->r + j * s->d, s->d,
                                                                  s->metric));
}

static inline void TM_FN(dense_release)(TM_FN(dense_op) *s)
{
    if (s->pinned)
        tm_unpin_threads(s->previous_pin);
    tm_free(s->loss[0]);
    tm_free((void *)s->x_norms);
    TM_FN(dense_free)(s);
}

/* out = sum over parts of scale[p] * anchor_p (the scaled anchor side). */
static inline void TM_FN(finish_anchor_side)(const TM_FN(dense_op) *s, TM_REAL *out,
                                      const double *scale)
{
    const size_t count = (size_t)(s->n * s->d);
    for (size_t i = 0; i < count; ++i) {
        double total = 0.0;
        for (int part = 0; part < s->parts; ++part)
            total += scale[part] * (double)s->anchor_grad[part][i];
        out[i] = (TM_REAL)total;
    }
}

/* out[j] += sum over parts of scale[p] * (sum_t acc_p[t][j] + (sum_t gamma_p[t][j]) r_j)
 * for the reference rows [ref_lo, ref_hi) of this pass. */
static inline void TM_FN(add_reference_side)(const TM_FN(dense_op) *s, TM_REAL *out,
                                      const double *scale)
{
    const int64_t d = s->d, span = s->span;
    for (int64_t j = s->ref_lo; j < s->ref_hi; ++j) {
        const int64_t local = j - s->ref_lo;
        const TM_REAL *rj = s->r + j * d;
        for (int64_t k = 0; k < d; ++k) {
            double total = (double)out[j * d + k];
            for (int part = 0; part < s->parts; ++part) {
                double value = 0.0, gamma = 0.0;
                for (int t = 0; t < s->nthreads; ++t) {
                    value += (double)s->ref_acc[part][((size_t)t * (size_t)span +
                                                       (size_t)local) * (size_t)d + (size_t)k];
                    gamma += s->gamma[part][(size_t)t * (size_t)span + (size_t)local];
                }
                total += scale[part] * (value + gamma * (double)rj[k]);
            }
            out[j * d + k] = (TM_REAL)total;
        }
    }
}

/* Runs the row walk once per range of reference rows (once in the usual
 * case).  The first pass also produces the losses and the anchor side, after
 * which `finish` fills `scale` and writes the scaled anchor side.  Every pass
 * then adds its range of the reference side to ref_out. */
static inline int TM_FN(dense_run)(TM_FN(dense_op) *s, const TM_FN(tm_tile_problem) *problem,
                            int (*row)(void *, int, int64_t, int64_t, TM_REAL *),
                            void (*finish)(TM_FN(dense_op) *, void *, double *),
                            void *finish_ctx, double *scale, TM_REAL *ref_out)
{
    const TM_FN(tm_row_op) op = {s, TM_FN(dense_setup), row, TM_FN(dense_block), 1};
    const int64_t m = s->c.lv.m;
    s->first_pass = 1;
    for (int64_t lo = 0;;) {
        const int64_t hi = s->want_ref_side && m - lo > s->span ? lo + s->span : m;
        s->ref_lo = lo;
        s->ref_hi = hi;
        const int status = TM_FN(tm_run_rows)(problem, &op);
        if (status != TM_OK)
            return status;
        if (s->first_pass) {
            finish(s, finish_ctx, scale);
            s->first_pass = 0;
        }
        if (s->want_ref_side)
            TM_FN(add_reference_side)(s, ref_out, scale);
        if (!s->want_ref_side || hi >= m)
            return TM_OK;
        lo = hi;
    }
}

static inline int TM_FN(check_loss_args)(const TM_REAL *x, int64_t n, const TM_REAL *ref, int64_t m,
                                  int64_t d, int metric, const int64_t *labels,
                                  const int64_t *ref_labels, int64_t ref_offset, int reduction,
                                  const double *loss)
{
    int status = TM_FN(validate_problem)(x, n, ref, m, d, labels, ref_labels, ref_offset);
    if (status != TM_OK)
        return status;
    if (loss == NULL || !TM_FN(valid_reduction)(reduction) ||
        (metric != TM_METRIC_EUCLIDEAN && metric != TM_METRIC_SQEUCLIDEAN &&
         metric != TM_METRIC_COSINE))
        return TM_ERR_INVALID;
    return TM_OK;
}

/* Fixes the span of reference rows per pass; call after the options are set. */
static inline void TM_FN(dense_plan)(TM_FN(dense_op) *s)
{
    /* Every pass must see the same thread count (the same blocks and per-thread
     * buffers), even if another thread calls tm_set_num_threads meanwhile. */
    s->previous_pin = tm_pin_threads();
    s->pinned = 1;
    s->max_threads = tm_get_num_threads();
    s->span = s->want_ref_side ? TM_FN(ref_span)(s->c.lv.m, s->d, s->max_threads, s->parts) : 0;
}

/* Part 0's per-anchor losses, counts and active counts summed in anchor
 * order (and the losses copied to per_anchor when given). */
typedef struct {
    double loss;
    int64_t count, active;
} TM_FN(dense_sums);

static inline TM_FN(dense_sums) TM_FN(dense_totals)(const TM_FN(dense_op) *s,
                                                    double *per_anchor)
{
    TM_FN(dense_sums) sums = {0.0, 0, 0};
    for (int64_t a = 0; a < s->n; ++a) {
        sums.loss += s->loss[0][a];
        sums.count += s->count[0][a];
        sums.active += s->active[0][a];
        if (per_anchor != NULL)
            per_anchor[a] = s->loss[0][a];
    }
    return sums;
}

/* The start of a walk whose weights are symmetric in self mode (the pair heads):
 * the gradient into grad (anchor side), the reference side only in reference
 * mode with ref_grad, zeroed here; then the plan. */
static inline void TM_FN(dense_start)(TM_FN(dense_op) *s, TM_REAL *grad, TM_REAL *ref_grad)
{
    const int reference = !s->c.lv.self && ref_grad != NULL;
    s->want_grad = grad != NULL;
    s->want_ref_side = grad != NULL && reference;
    s->anchor_grad[0] = grad;
    TM_FN(dense_plan)(s);
    if (reference)
        memset(ref_grad, 0, (size_t)(s->c.lv.m * s->d) * sizeof(TM_REAL));
}
