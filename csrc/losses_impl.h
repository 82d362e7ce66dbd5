/*
 * Losses and their analytic gradients, one body for both precisions: the
 * given-triplet losses (triplet, margin) and the dense ones (batch-all,
 * contrastive) on dense_impl.h's row walk.
 */

/* softplus(z) = log(1 + e^z) and its derivative, without overflow. */
static double TM_FN(softplus)(double z)
{
    return (z > 0.0 ? z : 0.0) + log1p(exp(-fabs(z)));
}

static double TM_FN(sigmoid)(double z)
{
    if (z >= 0.0)
        return 1.0 / (1.0 + exp(-z));
    const double e = exp(z);
    return e / (1.0 + e);
}

/* out = scale * acc in the working precision; 0 when a value is not finite there (an
 * overflow: TM_ERR_RANGE, which the caller reruns in double, or for double reports).
 * Euclidean gradients need no test: each term adds at most 2 (its weight, at most 1,
 * times unit vectors), and infinite distances were refused before.  Elsewhere the test
 * rides along the stores, on the bits as all_finite takes them. */
static int TM_FN(store_scaled)(TM_REAL *out, const double *acc, size_t count, double scale,
                               int metric)
{
    if (metric == TM_METRIC_EUCLIDEAN) {
        for (size_t i = 0; i < count; ++i)
            out[i] = (TM_REAL)(scale * acc[i]);
        return 1;
    }
    TM_FN(real_bits) carries = 0;
    for (size_t i = 0; i < count; ++i) {
        const TM_REAL value = (TM_REAL)(scale * acc[i]);
        carries |= TM_FN(exponent_carry)(value);
        out[i] = value;
    }
    return !TM_FN(carry_beyond)(carries);
}

/* Stable counting sort of triplet numbers by the row that `rows_of` names:
 * order[start[r] .. start[r + 1]) are the triplets touching row r, in order. */
static void TM_FN(order_by_row)(const int64_t *rows_of, int64_t t, int64_t rows, int64_t *start,
                                int64_t *order)
{
    memset(start, 0, (size_t)(rows + 1) * sizeof(int64_t));
    for (int64_t i = 0; i < t; ++i)
        start[rows_of[i] + 1] += 1;
    for (int64_t r = 0; r < rows; ++r)
        start[r + 1] += start[r];
    for (int64_t i = 0; i < t; ++i)
        order[start[rows_of[i]]++] = i; /* start[r] now ends row r */
    for (int64_t r = rows; r > 0; --r)
        start[r] = start[r - 1];
    start[0] = 0;
}

/* The given-triplets gradient's shared state: the triplets, their exact
 * distances and, per triplet, the coefficients of its (a,p) and (a,n) pairs. */
typedef struct {
    const TM_REAL *x, *r;
    int64_t d;
    int metric, soft;
    const int64_t *anchor, *positive, *negative;
    double margin, scale;
    const double *dists;
    double *coef; /* per triplet: (a,p) and (a,n) alpha, beta, gamma */
    const int64_t *start, *order;
    int offset;             /* 0 (positive) or 3 (negative) */
    double *target;         /* gradient rows of the role being written */
    const double *pair_g;   /* NULL, or per triplet dL/dd(a,p) and dL/dd(a,n) (margin loss) */
    double row_coef;        /* the rows' scale (tm_row_scale): 1 unless rerun */
} TM_FN(triplet_grad_job);

static void TM_FN(triplet_coef_range)(void *ctx, int participant, int64_t begin, int64_t end)
{
    (void)participant;
    const TM_FN(triplet_grad_job) *job = ctx;
    const int64_t d = job->d;
    const int cosine = job->metric == TM_METRIC_COSINE;
    for (int64_t i = begin; i < end; ++i) {
        const double dap = job->dists[3 * i], dan = job->dists[3 * i + 1];
        double gp, gn;
        if (job->pair_g != NULL) {
            gp = job->scale * job->pair_g[2 * i];
            gn = job->scale * job->pair_g[2 * i + 1];
        } else {
            const double z = dap - dan + job->margin;
            gp = job->scale * (job->soft ? TM_FN(sigmoid)(z) : (z > 0.0 ? 1.0 : 0.0));
            gn = -gp;
        }
        gp *= job->row_coef;
        gn *= job->row_coef;
        const TM_REAL *xa = job->x + job->anchor[i] * d;
        const double norm_a = cosine ? TM_FN(norm_of)(xa, d) : 0.0;
        const double norm_p = cosine ? TM_FN(norm_of)(job->r + job->positive[i] * d, d) : 0.0;
        const double norm_n = cosine ? TM_FN(norm_of)(job->r + job->negative[i] * d, d) : 0.0;
        const TM_FN(pair_coef) cp = TM_FN(pair_coefficients)(job->metric, gp, dap, norm_a, norm_p);
        const TM_FN(pair_coef) cn = TM_FN(pair_coefficients)(job->metric, gn, dan, norm_a, norm_n);
        double *c = job->coef + 6 * i;
        c[0] = cp.alpha;
        c[1] = cp.beta;
        c[2] = cp.gamma;
        c[3] = cn.alpha;
        c[4] = cn.beta;
        c[5] = cn.gamma;
    }
}

/* Role 0: the anchor's own row gets alpha x_a + beta r_j for both pairs. */
static void TM_FN(triplet_anchor_rows)(void *ctx, int participant, int64_t begin, int64_t end)
{
    (void)participant;
    const TM_FN(triplet_grad_job) *job = ctx;
    const int64_t d = job->d;
    for (int64_t a = begin; a < end; ++a) {
        double *acc = job->target + a * d;
        const TM_REAL *xa = job->x + a * d;
        for (int64_t k = job->start[a]; k < job->start[a + 1]; ++k) {
            const int64_t i = job->order[k];
            const double *c = job->coef + 6 * i;
            const TM_REAL *rp = job->r + job->positive[i] * d, *rn = job->r + job->negative[i] * d;
            const double alpha = c[0] + c[3];
            for (int64_t e = 0; e < d; ++e)
                acc[e] += alpha * (double)xa[e] + c[1] * (double)rp[e] + c[4] * (double)rn[e];
        }
    }
}

/* Roles 1 and 2: the positive's or the negative's rows get gamma r_j + beta x_a. */
static void TM_FN(triplet_other_rows)(void *ctx, int participant, int64_t begin, int64_t end)
{
    (void)participant;
    const TM_FN(triplet_grad_job) *job = ctx;
    const int64_t d = job->d;
    for (int64_t j = begin; j < end; ++j) {
        double *acc = job->target + j * d;
        const TM_REAL *rj = job->r + j * d;
        for (int64_t k = job->start[j]; k < job->start[j + 1]; ++k) {
            const int64_t i = job->order[k];
            const double *c = job->coef + 6 * i + job->offset;
            const TM_REAL *xa = job->x + job->anchor[i] * d;
            for (int64_t e = 0; e < d; ++e)
                acc[e] += c[2] * (double)rj[e] + c[1] * (double)xa[e];
        }
    }
}

/* Gradient of the triplet loss over given triplets, in double (gx: n x d;
 * gr: m x d in reference mode, unused in self mode, where every role lands in
 * gx).  Three passes, one per role (anchor, positive, negative), each
 * parallel over the rows it writes, so no two threads touch a row and every
 * row sums its terms in the same order on any number of threads. */
static int TM_FN(triplet_gradient)(const TM_REAL *x, int64_t n, const TM_REAL *r, int64_t m,
                                   int64_t d, int metric, const int64_t *anchor,
                                   const int64_t *positive, const int64_t *negative, int64_t t,
                                   double margin, int soft, double scale, const double *dists,
                                   const double *pair_g, double row_coef, int self, double *gx,
                                   double *gr)
{
    memset(gx, 0, (size_t)(n * d) * sizeof(double));
    if (!self && gr != NULL)
        memset(gr, 0, (size_t)(m * d) * sizeof(double));
    if (t == 0 || scale == 0.0)
        return TM_OK;
    size_t coef_bytes, order_bytes, start_bytes;
    int status;
    const int64_t rows = n > m ? n : m;
    if ((status = tm_bytes(t, 6, sizeof(double), &coef_bytes)) != TM_OK ||
        (status = tm_bytes(t, 1, sizeof(int64_t), &order_bytes)) != TM_OK ||
        (status = tm_bytes(rows + 1, 1, sizeof(int64_t), &start_bytes)) != TM_OK)
        return status;
    double *coef = tm_alloc(coef_bytes);
    int64_t *order = tm_alloc(order_bytes);
    int64_t *start = tm_alloc(start_bytes);
    if (coef == NULL || order == NULL || start == NULL) {
        tm_free(coef);
        tm_free(order);
        tm_free(start);
        return TM_ERR_NOMEM;
    }
    const int threads = tm_threads_for(t * d / 4096 + 1);
    /* Chunks of about 64 rows' (or triplets') work each. */
    const int64_t row_grain = 64, coef_grain = 1 + 16384 / (d > 0 ? d : 1);
    TM_FN(triplet_grad_job) job = {x, r, d, metric, soft, anchor, positive, negative, margin,
                                   scale, dists, coef, start, order, 0, gx, pair_g, row_coef};
    tm_parallel_for(threads, t, coef_grain, TM_FN(triplet_coef_range), &job);
    TM_FN(order_by_row)(anchor, t, n, start, order);
    tm_parallel_for(threads, n, row_grain, TM_FN(triplet_anchor_rows), &job);
    job.target = self ? gx : gr; /* NULL: the reference gradient is not wanted */
    for (int role = 1; role <= 2 && job.target != NULL; ++role) {
        job.offset = role == 1 ? 0 : 3;
        TM_FN(order_by_row)(role == 1 ? positive : negative, t, m, start, order);
        tm_parallel_for(threads, m, row_grain, TM_FN(triplet_other_rows), &job);
    }
    tm_free(coef);
    tm_free(order);
    tm_free(start);
    return TM_OK;
}

/* ---- triplet loss over given triplets -------------------------------------- */

/* Per triplet: exact d(a,p), d(a,n) and the loss, into work[3 i .. 3 i + 2]. */
typedef struct {
    const TM_REAL *x, *r;
    int64_t d;
    int metric;
    const int64_t *anchor, *positive, *negative;
    double margin;
    int soft;
    double *work;
    tm_row_scale scale; /* distances in the caller's units */
    atomic_int outside; /* a pair double cannot hold (TM_ERR_RANGE) */
} TM_FN(triplet_dist_job);

static void TM_FN(triplet_dist_range)(void *ctx, int participant, int64_t begin, int64_t end)
{
    (void)participant;
    TM_FN(triplet_dist_job) *job = ctx;
    const int64_t d = job->d;
    int outside = 0;
    for (int64_t i = begin; i < end; ++i) {
        const TM_REAL *xa = job->x + job->anchor[i] * d;
        const double dap = tm_caller_distance(&job->scale, TM_FN(tm_exact_distance_checked)(
            xa, job->r + job->positive[i] * d, d, job->metric, &outside));
        const double dan = tm_caller_distance(&job->scale, TM_FN(tm_exact_distance_checked)(
            xa, job->r + job->negative[i] * d, d, job->metric, &outside));
        outside |= isinf(dap) || isinf(dan); /* in the caller's units, beyond double */
        const double z = dap - dan + job->margin;
        job->work[3 * i] = dap;
        job->work[3 * i + 1] = dan;
        job->work[3 * i + 2] = job->soft ? TM_FN(softplus)(z) : (z > 0.0 ? z : 0.0);
    }
    if (outside)
        atomic_store_explicit(&job->outside, 1, memory_order_relaxed);
}

/* The given-triplet reducer behind both entry points: beta == NULL is the
 * triplet margin loss (one hinge or softplus on d(a,p) - d(a,n) + margin), a
 * beta array the margin loss of Wu et al. (two hinges, see tm_margin_loss).
 * Exact distances per triplet, then the gradient pass of triplet_gradient. */
static int TM_FN(given_triplet_loss)(const TM_REAL *x, int64_t n, const TM_REAL *ref,
                                     int64_t m, int64_t d, int metric, int row_exponent,
                                     const int64_t *anchor, const int64_t *positive,
                                     const int64_t *negative, int64_t t, double margin, int soft,
                                     const double *beta, int reduction, double *loss,
                                     int64_t *n_active, double *per_triplet, double *beta_grad,
                                     TM_REAL *grad, TM_REAL *ref_grad)
{
    const int self = ref == NULL;
    if (n < 0 || m < 0 || d < 0 || t < 0 || (self && m != n) || loss == NULL ||
        n_active == NULL || !TM_FN(valid_reduction)(reduction) ||
        (t > 0 && (anchor == NULL || positive == NULL || negative == NULL)))
        return TM_ERR_INVALID;
    for (int64_t i = 0; i < t; ++i)
        if (anchor[i] < 0 || anchor[i] >= n || positive[i] < 0 || positive[i] >= m ||
            negative[i] < 0 || negative[i] >= m || (beta != NULL && !isfinite(beta[i])))
            return TM_ERR_INVALID;
    const TM_REAL *r = self ? x : ref;
    tm_row_scale row_scale;
    int status = tm_row_scale_init(metric, row_exponent, &row_scale);
    if (status != TM_OK)
        return status;

    size_t z_bytes, g_bytes, gx_bytes, gr_bytes;
    if ((status = tm_bytes(t, 3, sizeof(double), &z_bytes)) != TM_OK ||
        (status = tm_bytes(beta != NULL ? t : 0, 2, sizeof(double), &g_bytes)) != TM_OK ||
        (status = tm_bytes(grad != NULL ? n : 0, d, sizeof(double), &gx_bytes)) != TM_OK ||
        (status = tm_bytes(grad != NULL && !self && ref_grad != NULL ? m : 0, d, sizeof(double),
                           &gr_bytes)) != TM_OK)
        return status;
    double *work = tm_alloc(z_bytes); /* per triplet: d(a,p), d(a,n), loss */
    double *pair_g = beta != NULL ? tm_alloc(g_bytes) : NULL;
    double *gx = tm_alloc(gx_bytes);
    double *gr = tm_alloc(gr_bytes);
    if (work == NULL || (beta != NULL && pair_g == NULL) || gx == NULL || gr == NULL) {
        tm_free(work);
        tm_free(pair_g);
        tm_free(gx);
        tm_free(gr);
        return TM_ERR_NOMEM;
    }

    TM_FN(triplet_dist_job) job = {x, r, d, metric, anchor, positive, negative, margin, soft,
                                   work, row_scale, 0};
    tm_parallel_for(tm_threads_for(t / 256 + 1), t, 256, TM_FN(triplet_dist_range), &job);
    if (atomic_load(&job.outside)) { /* double rows beyond its window: nothing written */
        tm_free(work);
        tm_free(pair_g);
        tm_free(gx);
        tm_free(gr);
        return TM_ERR_RANGE;
    }
    double total = 0.0;
    int64_t active = 0;
    for (int64_t i = 0; i < t; ++i) {
        if (beta != NULL) { /* two hinges, each with its own distance's gradient */
            const double pos = work[3 * i] - beta[i] + margin;
            const double neg = beta[i] - work[3 * i + 1] + margin;
            const double lp = pos > 0.0 ? pos : 0.0, ln = neg > 0.0 ? neg : 0.0;
            work[3 * i + 2] = lp + ln;
            active += (lp > 0.0) + (ln > 0.0);
            pair_g[2 * i] = lp > 0.0 ? 1.0 : 0.0;
            pair_g[2 * i + 1] = ln > 0.0 ? -1.0 : 0.0;
        } else {
            active += work[3 * i + 2] > 0.0;
        }
        total += work[3 * i + 2];
        if (per_triplet != NULL)
            per_triplet[i] = work[3 * i + 2];
    }
    const double scale = TM_FN(reduction_scale)(reduction, t, active);
    *loss = reduction == TM_REDUCE_NONE ? total : total * scale;
    *n_active = active;
    if (beta_grad != NULL && beta != NULL)
        for (int64_t i = 0; i < t; ++i)
            beta_grad[i] = scale * (-pair_g[2 * i + 1] - pair_g[2 * i]);

    if (grad != NULL) {
        status = TM_FN(triplet_gradient)(x, n, r, m, d, metric, anchor, positive, negative, t,
                                         margin, soft, scale, work, pair_g, row_scale.coef, self,
                                         gx, self || ref_grad == NULL ? NULL : gr);
        if (status == TM_OK) {
            int fits = TM_FN(store_scaled)(grad, gx, (size_t)(n * d), 1.0, metric);
            if (!self && ref_grad != NULL)
                fits &= TM_FN(store_scaled)(ref_grad, gr, (size_t)(m * d), 1.0, metric);
            if (!fits)
                status = TM_ERR_RANGE;
        }
    }
    tm_free(work);
    tm_free(pair_g);
    tm_free(gx);
    tm_free(gr);
    return status;
}

int TM_FN(tm_triplet_loss)(const TM_REAL *x, int64_t n, const TM_REAL *ref, int64_t m, int64_t d,
                           int metric, int row_exponent, const int64_t *anchor,
                           const int64_t *positive, const int64_t *negative, int64_t t,
                           double margin, int soft, int reduction, double *loss,
                           int64_t *n_active, double *per_triplet, TM_REAL *grad,
                           TM_REAL *ref_grad)
{
    return TM_FN(given_triplet_loss)(x, n, ref, m, d, metric, row_exponent, anchor, positive,
                                     negative, t, margin, soft, NULL, reduction, loss, n_active,
                                     per_triplet, NULL, grad, ref_grad);
}

/* ---- margin loss over given triplets (Wu et al. 2017) ------------------------
 *
 * The given-triplet reducer with two hinges per triplet:
 *   pos = max(0, d(a,p) - beta_t + margin),  neg = max(0, beta_t - d(a,n) + margin),
 * loss_t = pos + neg; active counts the nonzero hinges (MEAN_NONZERO divides by
 * it, as pytorch-metric-learning's MarginLoss does).  beta_grad[t] (optional)
 * receives dL/dbeta_t = scale ([neg > 0] - [pos > 0]); the gradient flows
 * through each active hinge's own distance (pair_g). */
int TM_FN(tm_margin_loss)(const TM_REAL *x, int64_t n, const TM_REAL *ref, int64_t m, int64_t d,
                          int metric, int row_exponent, const int64_t *anchor,
                          const int64_t *positive, const int64_t *negative, int64_t t,
                          const double *beta, double margin, int reduction, double *loss,
                          int64_t *n_active, double *per_triplet, double *beta_grad,
                          TM_REAL *grad, TM_REAL *ref_grad)
{
    if (!(margin >= 0.0) || !isfinite(margin) || (t > 0 && beta == NULL))
        return TM_ERR_INVALID;
    static const double no_beta = 0.0; /* t == 0: a non-NULL beta keeps the margin path */
    return TM_FN(given_triplet_loss)(x, n, ref, m, d, metric, row_exponent, anchor, positive,
                                     negative, t, margin, 0, beta != NULL ? beta : &no_beta,
                                     reduction, loss, n_active, per_triplet, beta_grad, grad,
                                     ref_grad);
}

/* The distance of two rows as batch-all's few-positives rows take it for a
 * positive pair: the direct difference summed in double, rounded once (the
 * same bits from either of the pair's anchors, in self and reference mode). */
static TM_REAL TM_FN(direct_distance)(const TM_REAL *u, const TM_REAL *v, int64_t d, int squared)
{
    double sq = 0.0;
    for (int64_t k = 0; k < d; ++k) {
        const double diff = (double)u[k] - (double)v[k];
        sq += diff * diff;
    }
    return (TM_REAL)(squared ? sq : sqrt(sq));
}

/* Batch-all for an anchor with few positives (a P x K batch has K - 1), on
 * the euclidean metrics, without splitting the row: one pass of the
 * kernel set's row kernel (row_kernel_impl.h), vectorised for the machine,
 * with no branch on whether a pair is active (a coin flip for much of
 * training).  The coefficient row is written over the distances; the
 * positives' coefficients are then set from their hit counts. */
static void TM_FN(batch_all_row_pass)(TM_FN(dense_op) *s, int thread, int64_t a, TM_REAL *dist,
                                      const int64_t *pos_index, const double *values,
                                      int64_t n_pos)
{
    const int ref_side = s->want_grad && s->want_ref_side && !s->two_sided;
    const tm_batch_all_row_args args = {
        dist, s->c.lv.ref_labels, s->c.lv.m, s->c.lv.labels[a], n_pos, values, s->margin,
        s->metric == TM_METRIC_SQEUCLIDEAN, s->want_grad ? (void *)dist : NULL,
        ref_side ? s->gamma[0] + (size_t)thread * (size_t)s->span : NULL, s->ref_lo,
        s->ref_hi, s->two_sided ? s->pos_t : NULL, s->n, s->max_pos};
    tm_batch_all_row_result res;
    TM_FN(kernel_batch_all_row)(s->kernels)(&args, &res);
    s->loss[0][a] = res.loss;
    s->active[0][a] = res.active;
    s->count[0][a] = n_pos * res.n_neg;
    if (!s->want_grad)
        return;
    double alpha = -res.coef_sum; /* alpha = gamma = -beta on both metrics */
    int64_t weighted = res.nonzero;
    for (int64_t r = 0; r < n_pos; ++r) {
        const int64_t j = pos_index[r];
        if (s->two_sided)
            s->pos_hits[a * s->max_pos + r] = res.hits[r];
        dist[j] = 0; /* the coefficient row */
        if (res.hits[r] != 0) {
            TM_FN(dense_pair)(s, thread, 0, a, j, (double)res.hits[r], values[r], dist, &alpha);
            ++weighted;
        }
    }
    s->alpha[0][a] = alpha;
    s->nonzeros[2 * thread] += weighted;
}

static void TM_FN(batch_all_row_few)(TM_FN(dense_op) *s, int thread, int64_t a, TM_REAL *dist,
                                     const tm_scored *positives, int64_t n_pos)
{
    int64_t index[TM_LINEAR_POSITIVES];
    double values[TM_LINEAR_POSITIVES];
    for (int64_t r = 0; r < n_pos; ++r) { /* as the two-sided rows take them */
        index[r] = positives[r].index;
        values[r] = (double)TM_FN(direct_distance)(s->x + a * s->d, s->r + index[r] * s->d,
                                                   s->d, s->metric == TM_METRIC_SQEUCLIDEAN);
    }
    TM_FN(batch_all_row_pass)(s, thread, a, dist, index, values, n_pos);
}

/* Batch-all's two-sided rows.  In self mode, the pair (a, j) with j a
 * negative of a gets a gradient coefficient from a's row (a's positives that
 * are active with j) and from j's row (j's positives active with a).  The
 * second needs only d(j, a), which row a holds, and j's few positive
 * distances: computed here once, for every anchor, when no class has more
 * than TM_LINEAR_POSITIVES + 1 members.  Each row then writes its pairs'
 * whole coefficients, the gradient is one product of that symmetric
 * coefficient matrix with x (no reference side: no second product, no
 * per-thread accumulators), and the positive pairs' other side, few, is
 * added after the walk (two_sided_positives).  The rows use these positive
 * distances for their loss too, so loss and gradient agree at every hinge. */
static int TM_FN(label_index_order)(const void *pa, const void *pb)
{
    const int64_t *a = pa, *b = pb;
    if (a[0] != b[0])
        return a[0] < b[0] ? -1 : 1;
    return a[1] < b[1] ? -1 : (a[1] > b[1]);
}

/* Sets s->two_sided when the batch qualifies, with the positives' tables. */
static int TM_FN(two_sided_setup)(TM_FN(dense_op) *s)
{
    const int64_t n = s->n, d = s->d;
    size_t bytes;
    int status;
    if (n == 0 || (status = tm_bytes(n, 2, sizeof(int64_t), &bytes)) != TM_OK)
        return n == 0 ? TM_OK : status;
    int64_t *order = tm_alloc(bytes); /* (label, index) pairs, sorted */
    if (order == NULL)
        return TM_ERR_NOMEM;
    for (int64_t j = 0; j < n; ++j) {
        order[2 * j] = s->c.lv.labels[j];
        order[2 * j + 1] = j;
    }
    qsort(order, (size_t)n, 2 * sizeof(int64_t), TM_FN(label_index_order));
    int64_t largest = 0;
    for (int64_t g0 = 0, g1; g0 < n; g0 = g1) {
        for (g1 = g0 + 1; g1 < n && order[2 * g1] == order[2 * g0]; ++g1)
            ;
        largest = g1 - g0 > largest ? g1 - g0 : largest;
    }
    const int64_t max_pos = largest - 1;
    const int64_t slots = max_pos > 0 ? max_pos : 1;
    size_t real_bytes, index_bytes;
    if (max_pos > TM_LINEAR_POSITIVES ||
        (status = tm_bytes(slots, n, sizeof(TM_REAL), &real_bytes)) != TM_OK ||
        (status = tm_bytes(slots, n, sizeof(int64_t), &index_bytes)) != TM_OK) {
        tm_free(order);
        return max_pos > TM_LINEAR_POSITIVES ? TM_OK : status;
    }
    s->pos_t = tm_alloc(real_bytes);
    s->pos_idx = tm_alloc(index_bytes);
    s->pos_hits = tm_alloc(index_bytes);
    if (s->pos_t == NULL || s->pos_idx == NULL || s->pos_hits == NULL) {
        tm_free(order);
        return TM_ERR_NOMEM;
    }
    for (int64_t i = 0; i < slots * n; ++i) {
        s->pos_t[i] = (TM_REAL)-INFINITY;
        s->pos_idx[i] = -1;
        s->pos_hits[i] = 0;
    }
    const int squared = s->metric == TM_METRIC_SQEUCLIDEAN;
    for (int64_t g0 = 0, g1; g0 < n; g0 = g1) {
        for (g1 = g0 + 1; g1 < n && order[2 * g1] == order[2 * g0]; ++g1)
            ;
        for (int64_t u = g0; u < g1; ++u) { /* members in index order */
            const int64_t a = order[2 * u + 1];
            int64_t r = 0;
            for (int64_t v = g0; v < g1; ++v) {
                const int64_t p = order[2 * v + 1];
                if (p == a)
                    continue;
                s->pos_t[r * n + a] = TM_FN(direct_distance)(s->x + a * d, s->x + p * d, d,
                                                             squared);
                s->pos_idx[r * n + a] = p;
                ++r;
            }
        }
    }
    tm_free(order);
    s->max_pos = max_pos;
    s->two_sided = 1;
    return TM_OK;
}

static void TM_FN(batch_all_row_two_sided)(TM_FN(dense_op) *s, int thread, int64_t a,
                                           TM_REAL *dist)
{
    const int64_t n = s->n, max_pos = s->max_pos;
    int64_t index[TM_LINEAR_POSITIVES];
    double values[TM_LINEAR_POSITIVES];
    int64_t n_pos = 0;
    while (n_pos < max_pos && s->pos_idx[n_pos * n + a] >= 0) {
        index[n_pos] = s->pos_idx[n_pos * n + a];
        values[n_pos] = (double)s->pos_t[n_pos * n + a];
        ++n_pos;
    }
    TM_FN(batch_all_row_pass)(s, thread, a, dist, index, values, n_pos);
}

/* The positive pairs' reference side, after the walk: positive p of anchor a
 * with h active negatives adds scale (gamma x_p + beta x_a) to p's gradient. */
static void TM_FN(two_sided_positives)(const TM_FN(dense_op) *s, TM_REAL *grad, double scale)
{
    const int64_t n = s->n, d = s->d, max_pos = s->max_pos;
    for (int64_t a = 0; a < n; ++a)
        for (int64_t r = 0; r < max_pos && s->pos_idx[r * n + a] >= 0; ++r) {
            const int64_t p = s->pos_idx[r * n + a], h = s->pos_hits[a * max_pos + r];
            if (h == 0)
                continue;
            const TM_FN(pair_coef) c =
                TM_FN(pair_coefficients)(s->metric, (double)h, (double)s->pos_t[r * n + a], 0, 0);
            const TM_REAL *xa = s->x + a * d, *xp = s->x + p * d;
            TM_REAL *gp = grad + p * d;
            for (int64_t k = 0; k < d; ++k)
                gp[k] = (TM_REAL)((double)gp[k] +
                                  scale * (c.gamma * (double)xp[k] + c.beta * (double)xa[k]));
        }
}

/* Batch-all for one anchor: its positives sorted once; each negative finds,
 * by binary search, how many positives it is active with (d(a,p) > d(a,q) -
 * margin) and their distance sum (suffix sums): loss, active count and the
 * negative's gradient weight.  A difference array over positive ranks gives
 * each positive's weight (its number of active negatives).  With soft=True
 * every triplet counts, so the anchor costs O(#positives * #negatives). */
static int TM_FN(batch_all_row)(void *op, int thread, int64_t a, int64_t row_in_block,
                                TM_REAL *dist)
{
    (void)row_in_block;
    TM_FN(dense_op) *s = op;
    if (s->two_sided) {
        TM_FN(batch_all_row_two_sided)(s, thread, a, dist);
        return TM_OK;
    }
    tm_scored *positives, *negatives;
    int64_t n_pos, n_neg;
    /* The row passes run in the working precision: a margin far beyond it (float32
     * max is 3.4e38) takes the double-precision path below instead. */
    if (!s->soft && s->metric != TM_METRIC_COSINE && s->scale.shift == 0 &&
        fabs(s->margin) <= (TM_BITS == 32 ? 1e30 : 1e300)) {
        positives = TM_SCRATCH(&s->c.scratch, positives, thread);
        n_pos = TM_FN(gather_positives)(&s->c.lv, a, dist, positives, TM_LINEAR_POSITIVES + 1);
        if (n_pos <= TM_LINEAR_POSITIVES) {
            TM_FN(batch_all_row_few)(s, thread, a, dist, positives, n_pos);
            return TM_OK;
        }
    }
    TM_FN(split_for_thread)(&s->c, thread, a, dist, &positives, &n_pos, &negatives, &n_neg);
    s->loss[0][a] = 0.0;
    s->count[0][a] = n_pos * n_neg;
    s->active[0][a] = 0;
    TM_REAL *coef = s->want_grad ? dist : NULL; /* the distances are copied: reuse the row */
    double alpha = 0.0;
    int64_t weighted = 0; /* pairs given a gradient weight (a local count: no memory chain) */
    if (coef != NULL)
        memset(coef, 0, (size_t)s->c.lv.m * sizeof(TM_REAL));
    if (n_pos > 0 && n_neg > 0) {
        tm_sort_scored(positives, n_pos);
        double *pos_weight = TM_SCRATCH(&s->c.scratch, work, thread); /* n_pos */
        double loss = 0.0;
        int64_t active = 0;
        if (!s->soft) {
            /* n_pos < m here (the anchor has a negative), so n_pos + 1 items fit. */
            double *suffix = (double *)(void *)TM_SCRATCH(&s->c.scratch, best, thread);
            int64_t *starts = TM_SCRATCH(&s->c.scratch, slots, thread);
            suffix[n_pos] = 0.0;
            for (int64_t r = n_pos - 1; r >= 0; --r)
                suffix[r] = suffix[r + 1] + positives[r].value;
            for (int64_t r = 0; r <= n_pos; ++r)
                starts[r] = 0;
            for (int64_t q = 0; q < n_neg; ++q) {
                const double v = negatives[q].value, threshold = v - s->margin;
                const int64_t first = tm_count_at_most(positives, n_pos, threshold);
                const int64_t c = n_pos - first;
                if (c == 0)
                    continue;
                loss += suffix[first] - (double)c * threshold;
                active += c;
                starts[first] += 1;
                if (coef != NULL) {
                    TM_FN(dense_pair)(s, thread, 0, a, negatives[q].index, -(double)c, v, coef,
                                      &alpha);
                    ++weighted;
                }
            }
        } else {
            for (int64_t r = 0; r < n_pos; ++r)
                pos_weight[r] = 0.0;
            for (int64_t q = 0; q < n_neg; ++q) {
                const double v = negatives[q].value;
                double neg_weight = 0.0;
                for (int64_t r = 0; r < n_pos; ++r) {
                    const double z = positives[r].value - v + s->margin;
                    const double l = TM_FN(softplus)(z);
                    loss += l;
                    active += l > 0.0;
                    const double g = TM_FN(sigmoid)(z);
                    pos_weight[r] += g;
                    neg_weight += g;
                }
                if (coef != NULL && neg_weight != 0.0) {
                    TM_FN(dense_pair)(s, thread, 0, a, negatives[q].index, -neg_weight, v, coef,
                                      &alpha);
                    ++weighted;
                }
            }
        }
        if (!s->soft) {
            /* Positive r is active with every negative whose first active rank is <= r. */
            const int64_t *starts = TM_SCRATCH(&s->c.scratch, slots, thread);
            int64_t running = 0;
            for (int64_t r = 0; r < n_pos; ++r) {
                running += starts[r];
                pos_weight[r] = (double)running;
            }
        }
        if (coef != NULL)
            for (int64_t r = 0; r < n_pos; ++r)
                if (pos_weight[r] != 0.0) {
                    TM_FN(dense_pair)(s, thread, 0, a, positives[r].index, pos_weight[r],
                                      positives[r].value, coef, &alpha);
                    ++weighted;
                }
        s->loss[0][a] = loss;
        s->active[0][a] = active;
    }
    if (coef != NULL) {
        s->alpha[0][a] = alpha;
        s->nonzeros[2 * thread] += weighted;
    }
    return TM_OK;
}

/* Contrastive for one anchor: every pair's term and gradient weight depend
 * on that pair alone. */
static int TM_FN(contrastive_row)(void *op, int thread, int64_t a, int64_t row_in_block,
                                  TM_REAL *dist)
{
    TM_FN(dense_op) *s = op;
    TM_REAL *coef_pos = s->want_grad ? dist : NULL;
    TM_REAL *coef_neg = s->want_grad ? s->coef1 + ((size_t)thread * (size_t)s->block_rows +
                                                   (size_t)row_in_block) * (size_t)s->c.lv.m
                                     : NULL;
    const int64_t label = s->c.lv.labels[a], own = TM_FN(own_row)(&s->c.lv, a);
    double loss_pos = 0.0, loss_neg = 0.0, alpha_pos = 0.0, alpha_neg = 0.0;
    int64_t n_pos = 0, n_neg = 0, act_pos = 0, act_neg = 0;
    for (int64_t j = 0; j < s->c.lv.m; ++j) {
        const double v = (double)dist[j];
        if (coef_pos != NULL)
            coef_pos[j] = coef_neg[j] = 0;
        if (j == own)
            continue;
        const int positive = s->c.lv.ref_labels[j] == label;
        const double t = positive ? v - s->pos_margin : s->neg_margin - v;
        if (positive)
            ++n_pos;
        else
            ++n_neg;
        if (!(t > 0.0))
            continue;
        const double l = s->power == 2 ? t * t : t;
        const double dl = s->power == 2 ? 2.0 * t : 1.0;
        if (positive) {
            loss_pos += l;
            ++act_pos;
            if (coef_pos != NULL)
                TM_FN(dense_pair)(s, thread, 0, a, j, dl, v, coef_pos, &alpha_pos);
        } else {
            loss_neg += l;
            ++act_neg;
            if (coef_neg != NULL)
                TM_FN(dense_pair)(s, thread, 1, a, j, -dl, v, coef_neg, &alpha_neg);
        }
    }
    s->loss[0][a] = loss_pos;
    s->loss[1][a] = loss_neg;
    s->count[0][a] = n_pos;
    s->count[1][a] = n_neg;
    s->active[0][a] = act_pos;
    s->active[1][a] = act_neg;
    if (coef_pos != NULL) {
        s->alpha[0][a] = alpha_pos;
        s->alpha[1][a] = alpha_neg;
        s->nonzeros[2 * thread] += act_pos;
        s->nonzeros[2 * thread + 1] += act_neg;
    }
    return TM_OK;
}


typedef struct {
    int reduction;
    double *loss;
    int64_t *n_triplets, *n_active;
    double *per_anchor;
    TM_REAL *grad;
} TM_FN(batch_all_out);

static void TM_FN(batch_all_finish)(TM_FN(dense_op) *s, void *ctx, double *scale)
{
    TM_FN(batch_all_out) *o = ctx;
    const TM_FN(dense_sums) sums = TM_FN(dense_totals)(s, o->per_anchor);
    const double total = sums.loss;
    const int64_t triplets = sums.count, active = sums.active;
    scale[0] = TM_FN(reduction_scale)(o->reduction, triplets, active);
    scale[1] = 0.0;
    *o->loss = o->reduction == TM_REDUCE_NONE ? total : total * scale[0];
    *o->n_triplets = triplets;
    *o->n_active = active;
    if (o->grad != NULL)
        TM_FN(finish_anchor_side)(s, o->grad, scale);
}

int TM_FN(tm_batch_all_loss)(const TM_REAL *x, int64_t n, const TM_REAL *ref, int64_t m,
                             int64_t d, int metric, int row_exponent, const int64_t *labels,
                             const int64_t *ref_labels, int64_t ref_offset, double margin,
                             int soft, int reduction, double *loss, int64_t *n_triplets,
                             int64_t *n_active, double *per_anchor, TM_REAL *grad,
                             TM_REAL *ref_grad)
{
    int status = TM_FN(check_loss_args)(x, n, ref, m, d, metric, labels, ref_labels, ref_offset,
                                        reduction, loss);
    if (status != TM_OK)
        return status;
    if (n_triplets == NULL || n_active == NULL)
        return TM_ERR_INVALID;
    TM_FN(dense_op) s;
    status = TM_FN(dense_init)(&s, x, n, ref, m, d, metric, row_exponent, labels, ref_labels,
                               ref_offset, 1);
    if (status == TM_OK) {
        s.margin = margin;
        s.soft = soft;
        s.want_grad = grad != NULL;
        s.want_ref_side = grad != NULL && (ref == NULL || ref_grad != NULL);
        s.anchor_grad[0] = grad; /* unscaled during the walk, scaled by finish */
        if (ref == NULL && grad != NULL && !soft && metric != TM_METRIC_COSINE &&
            s.scale.shift == 0 && fabs(margin) <= (TM_BITS == 32 ? 1e30 : 1e300))
            status = TM_FN(two_sided_setup)(&s);
        if (s.two_sided)
            s.want_ref_side = 0; /* the rows' coefficients cover both sides */
        TM_FN(dense_plan)(&s);
        if (ref != NULL && ref_grad != NULL)
            memset(ref_grad, 0, (size_t)(m * d) * sizeof(TM_REAL));
        /* In self mode x is also the reference set: both sides land in grad. */
        TM_FN(batch_all_out) out = {reduction, loss, n_triplets, n_active, per_anchor, grad};
        double scale[2];
        const TM_FN(tm_tile_problem) problem = {x, n, ref, m, d, metric, row_exponent};
        if (status == TM_OK)
            status = TM_FN(dense_run)(&s, &problem, TM_FN(batch_all_row),
                                      TM_FN(batch_all_finish), &out, scale,
                                      ref == NULL ? grad : ref_grad);
        if (status == TM_OK && s.two_sided)
            TM_FN(two_sided_positives)(&s, grad, scale[0]);
    }
    if (status == TM_OK)
        status = TM_FN(check_gradients)(grad, n, ref != NULL ? ref_grad : NULL, m, d);
    TM_FN(dense_release)(&s);
    return status;
}

typedef struct {
    int reduction, self;
    double *loss;
    int64_t *counts;
    double *per_anchor;
    TM_REAL *grad;
} TM_FN(contrastive_out);

static void TM_FN(contrastive_finish)(TM_FN(dense_op) *s, void *ctx, double *scale)
{
    TM_FN(contrastive_out) *o = ctx;
    double sum_pos = 0.0, sum_neg = 0.0;
    int64_t n_pos = 0, n_neg = 0, act_pos = 0, act_neg = 0;
    for (int64_t a = 0; a < s->n; ++a) {
        sum_pos += s->loss[0][a];
        sum_neg += s->loss[1][a];
        n_pos += s->count[0][a];
        n_neg += s->count[1][a];
        act_pos += s->active[0][a];
        act_neg += s->active[1][a];
        if (o->per_anchor != NULL)
            o->per_anchor[a] = s->loss[0][a] + s->loss[1][a];
    }
    scale[0] = scale[1] = 1.0;
    if (o->reduction == TM_REDUCE_MEAN) {
        scale[0] = scale[1] = n_pos + n_neg > 0 ? 1.0 / (double)(n_pos + n_neg) : 0.0;
    } else if (o->reduction == TM_REDUCE_MEAN_NONZERO) {
        scale[0] = act_pos > 0 ? 1.0 / (double)act_pos : 0.0;
        scale[1] = act_neg > 0 ? 1.0 / (double)act_neg : 0.0;
    }
    *o->loss = o->reduction == TM_REDUCE_NONE ? sum_pos + sum_neg
                                              : scale[0] * sum_pos + scale[1] * sum_neg;
    o->counts[0] = n_pos;
    o->counts[1] = n_neg;
    o->counts[2] = act_pos;
    o->counts[3] = act_neg;
    if (o->grad != NULL) {
        /* Self mode: each unordered pair appears twice with equal terms, so
         * the reference side doubles the anchor side. */
        const double both = o->self ? 2.0 : 1.0;
        const double anchor_scale[2] = {both * scale[0], both * scale[1]};
        TM_FN(finish_anchor_side)(s, o->grad, anchor_scale);
    }
}

int TM_FN(tm_contrastive_loss)(const TM_REAL *x, int64_t n, const TM_REAL *ref, int64_t m,
                               int64_t d, int metric, int row_exponent, const int64_t *labels,
                               const int64_t *ref_labels, int64_t ref_offset, double pos_margin,
                               double neg_margin, int power, int reduction, double *loss,
                               int64_t *counts, double *per_anchor, TM_REAL *grad,
                               TM_REAL *ref_grad)
{
    int status = TM_FN(check_loss_args)(x, n, ref, m, d, metric, labels, ref_labels, ref_offset,
                                        reduction, loss);
    if (status != TM_OK)
        return status;
    if (counts == NULL || (power != 1 && power != 2))
        return TM_ERR_INVALID;
    TM_FN(dense_op) s;
    TM_REAL *anchor_neg = NULL;
    status = TM_FN(dense_init)(&s, x, n, ref, m, d, metric, row_exponent, labels, ref_labels,
                               ref_offset, 2);
    if (status == TM_OK) {
        s.pos_margin = pos_margin;
        s.neg_margin = neg_margin;
        s.power = power;
        s.want_grad = grad != NULL;
        s.want_ref_side = grad != NULL && ref != NULL && ref_grad != NULL;
        if (grad != NULL) {
            size_t bytes;
            if ((status = tm_bytes(n, d, sizeof(TM_REAL), &bytes)) == TM_OK &&
                (anchor_neg = tm_alloc(bytes)) == NULL)
                status = TM_ERR_NOMEM;
        }
    }
    if (status == TM_OK) {
        s.anchor_grad[0] = grad;
        s.anchor_grad[1] = anchor_neg;
        TM_FN(dense_plan)(&s);
        if (s.want_ref_side)
            memset(ref_grad, 0, (size_t)(m * d) * sizeof(TM_REAL));
        TM_FN(contrastive_out) out = {reduction, ref == NULL, loss, counts, per_anchor, grad};
        double scale[2];
        const TM_FN(tm_tile_problem) problem = {x, n, ref, m, d, metric, row_exponent};
        status = TM_FN(dense_run)(&s, &problem, TM_FN(contrastive_row),
                                  TM_FN(contrastive_finish), &out, scale, ref_grad);
    }
    if (status == TM_OK)
        status = TM_FN(check_gradients)(grad, n, ref != NULL ? ref_grad : NULL, m, d);
    tm_free(anchor_neg);
    TM_FN(dense_release)(&s);
    return status;
}
