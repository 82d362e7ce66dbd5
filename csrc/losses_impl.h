/*
 * Losses and their analytic gradients, one body for both precisions.
 *
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

static TM_FN(pair_coef) TM_FN(pair_coefficients)(int metric, double w, double dist,
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

/* acc += a * u + b * v over d elements (double accumulator). */
static void TM_FN(axpby_double)(double *acc, double a, const TM_REAL *u, double b,
                                const TM_REAL *v, int64_t d)
{
    for (int64_t k = 0; k < d; ++k)
        acc[k] += a * (double)u[k] + b * (double)v[k];
}

/* The same into a TM_REAL accumulator (per-thread reference gradients). */
static void TM_FN(axpby_real)(TM_REAL *acc, double a, const TM_REAL *u, double b,
                              const TM_REAL *v, int64_t d)
{
    const TM_REAL ar = (TM_REAL)a, br = (TM_REAL)b;
    for (int64_t k = 0; k < d; ++k)
        acc[k] += ar * u[k] + br * v[k];
}

static double TM_FN(norm_of)(const TM_REAL *row, int64_t d)
{
    double s = 0.0;
    for (int64_t k = 0; k < d; ++k)
        s += (double)row[k] * (double)row[k];
    return sqrt(s);
}

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

static double TM_FN(reduction_scale)(int reduction, int64_t count, int64_t active)
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

static int TM_FN(valid_reduction)(int reduction)
{
    return reduction == TM_REDUCE_MEAN || reduction == TM_REDUCE_SUM ||
           reduction == TM_REDUCE_MEAN_NONZERO || reduction == TM_REDUCE_NONE;
}

/* Writes scale * acc (double) into out (TM_REAL). */
static void TM_FN(store_scaled)(TM_REAL *out, const double *acc, size_t count, double scale)
{
    for (size_t i = 0; i < count; ++i)
        out[i] = (TM_REAL)(scale * acc[i]);
}

/* ---- triplet loss over given triplets -------------------------------------- */

int TM_FN(tm_triplet_loss)(const TM_REAL *x, int64_t n, const TM_REAL *ref, int64_t m, int64_t d,
                           int metric, const int64_t *anchor, const int64_t *positive,
                           const int64_t *negative, int64_t t, double margin, int soft,
                           int reduction, double *loss, int64_t *n_active, double *per_triplet,
                           TM_REAL *grad, TM_REAL *ref_grad)
{
    const int self = ref == NULL;
    if (n < 0 || m < 0 || d < 0 || t < 0 || (self && m != n) || loss == NULL ||
        n_active == NULL || !TM_FN(valid_reduction)(reduction) ||
        (t > 0 && (anchor == NULL || positive == NULL || negative == NULL)))
        return TM_ERR_INVALID;
    for (int64_t i = 0; i < t; ++i)
        if (anchor[i] < 0 || anchor[i] >= n || positive[i] < 0 || positive[i] >= m ||
            negative[i] < 0 || negative[i] >= m)
            return TM_ERR_INVALID;
    const TM_REAL *r = self ? x : ref;

    size_t z_bytes, gx_bytes, gr_bytes;
    int status;
    if ((status = tm_bytes(t, 3, sizeof(double), &z_bytes)) != TM_OK ||
        (status = tm_bytes(grad != NULL ? n : 0, d, sizeof(double), &gx_bytes)) != TM_OK ||
        (status = tm_bytes(grad != NULL && !self && ref_grad != NULL ? m : 0, d, sizeof(double),
                           &gr_bytes)) != TM_OK)
        return status;
    double *work = tm_alloc(z_bytes); /* per triplet: d(a,p), d(a,n), loss */
    double *gx = tm_alloc(gx_bytes);
    double *gr = tm_alloc(gr_bytes);
    if (work == NULL || gx == NULL || gr == NULL) {
        tm_free(work);
        tm_free(gx);
        tm_free(gr);
        return TM_ERR_NOMEM;
    }

    const int threads = tm_threads_for(t / 256 + 1);
    (void)threads;
    TM_OMP(parallel for num_threads(threads) schedule(static))
    for (int64_t i = 0; i < t; ++i) {
        const TM_REAL *xa = x + anchor[i] * d;
        const double dap = TM_FN(tm_exact_distance)(xa, r + positive[i] * d, d, metric);
        const double dan = TM_FN(tm_exact_distance)(xa, r + negative[i] * d, d, metric);
        const double z = dap - dan + margin;
        work[3 * i] = dap;
        work[3 * i + 1] = dan;
        work[3 * i + 2] = soft ? TM_FN(softplus)(z) : (z > 0.0 ? z : 0.0);
    }
    double total = 0.0;
    int64_t active = 0;
    for (int64_t i = 0; i < t; ++i) {
        total += work[3 * i + 2];
        active += work[3 * i + 2] > 0.0;
        if (per_triplet != NULL)
            per_triplet[i] = work[3 * i + 2];
    }
    const double scale = TM_FN(reduction_scale)(reduction, t, active);
    *loss = reduction == TM_REDUCE_NONE ? total : total * scale;
    *n_active = active;

    if (grad != NULL) {
        memset(gx, 0, gx_bytes);
        if (gr_bytes > 0)
            memset(gr, 0, gr_bytes);
        double *g_ref = self ? gx : gr;
        for (int64_t i = 0; i < t; ++i) {
            const double dap = work[3 * i], dan = work[3 * i + 1];
            const double z = dap - dan + margin;
            const double dz = soft ? TM_FN(sigmoid)(z) : (z > 0.0 ? 1.0 : 0.0);
            if (dz == 0.0 || scale == 0.0)
                continue;
            const int64_t a = anchor[i];
            const TM_REAL *xa = x + a * d;
            const double norm_a = metric == TM_METRIC_COSINE ? TM_FN(norm_of)(xa, d) : 0.0;
            const int64_t js[2] = {positive[i], negative[i]};
            const double ws[2] = {scale * dz, -scale * dz};
            const double ds[2] = {dap, dan};
            for (int side = 0; side < 2; ++side) {
                const TM_REAL *rj = r + js[side] * d;
                const double norm_j = metric == TM_METRIC_COSINE ? TM_FN(norm_of)(rj, d) : 0.0;
                const TM_FN(pair_coef) c =
                    TM_FN(pair_coefficients)(metric, ws[side], ds[side], norm_a, norm_j);
                TM_FN(axpby_double)(gx + a * d, c.alpha, xa, c.beta, rj, d);
                if (g_ref != NULL && (self || gr_bytes > 0))
                    TM_FN(axpby_double)(g_ref + js[side] * d, c.gamma, rj, c.beta, xa, d);
            }
        }
        TM_FN(store_scaled)(grad, gx, (size_t)(n * d), 1.0);
        if (!self && ref_grad != NULL)
            TM_FN(store_scaled)(ref_grad, gr, (size_t)(m * d), 1.0);
    }
    tm_free(work);
    tm_free(gx);
    tm_free(gr);
    return TM_OK;
}

/* ---- dense losses: batch-all and contrastive --------------------------------
 *
 * Both visit every (anchor, reference) pair once, as row operations.  The
 * anchor side of the gradient is accumulated per row in double and stored
 * unscaled (the reduction's scale is only known at the end); the reference
 * side goes to per-thread accumulators (O(threads * m * d)), summed in thread
 * order at the end.  Blocks are assigned to threads statically, so a given
 * thread count always gives the same bits.  Contrastive in self mode needs no
 * reference side: its pair losses are symmetric, so that side equals the
 * anchor side.
 */

typedef struct {
    TM_FN(label_view) lv;
    const TM_REAL *x, *r;
    int64_t d;
    int metric;
    const double *x_norms, *r_norms; /* cosine only */
    /* options */
    double margin, pos_margin, neg_margin;
    int soft, power, want_grad, want_ref_side, ref_parts; /* ref_parts: 1 or 2 */
    /* per anchor (n): losses and counts */
    double *loss_a, *loss_b;
    int64_t *count_a, *count_b, *active_a, *active_b;
    /* gradients, unscaled: anchor side (n x d, two parts) and per-thread
     * reference side (threads x m x d, two parts) */
    TM_REAL *anchor_a, *anchor_b;
    TM_REAL *ref_a, *ref_b;
    int nthreads;
    double *row_acc; /* threads x 2d */
    TM_FN(row_scratch) scratch;
} TM_FN(dense_op);

static int TM_FN(dense_setup)(void *op, int nthreads)
{
    TM_FN(dense_op) *s = op;
    s->nthreads = nthreads;
    int status = TM_FN(scratch_alloc)(&s->scratch, nthreads, s->lv.m);
    if (status != TM_OK || !s->want_grad)
        return status;
    size_t acc_bytes, ref_bytes;
    if ((status = tm_bytes((int64_t)nthreads, 2 * (s->d > 0 ? s->d : 1), sizeof(double),
                           &acc_bytes)) != TM_OK ||
        (status = tm_bytes((int64_t)nthreads * (s->want_ref_side ? s->lv.m : 0), s->d,
                           sizeof(TM_REAL), &ref_bytes)) != TM_OK)
        return status;
    s->row_acc = tm_alloc(acc_bytes);
    if (s->row_acc == NULL)
        return TM_ERR_NOMEM;
    if (s->want_ref_side) {
        s->ref_a = tm_alloc(ref_bytes);
        s->ref_b = s->ref_parts == 2 ? tm_alloc(ref_bytes) : NULL;
        if (s->ref_a == NULL || (s->ref_parts == 2 && s->ref_b == NULL))
            return TM_ERR_NOMEM;
        memset(s->ref_a, 0, ref_bytes);
        if (s->ref_b != NULL)
            memset(s->ref_b, 0, ref_bytes);
    }
    return TM_OK;
}

static void TM_FN(dense_free)(TM_FN(dense_op) *s)
{
    TM_FN(scratch_free)(&s->scratch);
    tm_free(s->row_acc);
    tm_free(s->ref_a);
    tm_free(s->ref_b);
}

/* Adds pair (a, j) with weight w to the row accumulator and the reference side. */
static void TM_FN(dense_pair)(TM_FN(dense_op) *s, int thread, int64_t a, int64_t j, double w,
                              double dist, double *row_acc, TM_REAL *ref_acc)
{
    const double norm_a = s->x_norms != NULL ? s->x_norms[a] : 0.0;
    const double norm_j = s->r_norms != NULL ? s->r_norms[j] : 0.0;
    const TM_FN(pair_coef) c = TM_FN(pair_coefficients)(s->metric, w, dist, norm_a, norm_j);
    const TM_REAL *xa = s->x + a * s->d, *rj = s->r + j * s->d;
    TM_FN(axpby_double)(row_acc, c.alpha, xa, c.beta, rj, s->d);
    if (ref_acc != NULL)
        TM_FN(axpby_real)(ref_acc + (size_t)thread * (size_t)(s->lv.m * s->d) + j * s->d,
                          c.gamma, rj, c.beta, xa, s->d);
}

static void TM_FN(store_row)(TM_REAL *out, const double *acc, int64_t d)
{
    for (int64_t k = 0; k < d; ++k)
        out[k] = (TM_REAL)acc[k];
}

/* Batch-all for one anchor: its positives sorted once; each negative finds,
 * by binary search, how many positives it is active with (d(a,p) > d(a,q) -
 * margin) and their distance sum (suffix sums): loss, active count and the
 * negative's gradient weight.  A difference array over positive ranks gives
 * each positive's weight (its number of active negatives).  With soft=True
 * every triplet counts, so the anchor costs O(#positives * #negatives). */
static int TM_FN(batch_all_row)(void *op, int thread, int64_t a, const TM_REAL *dist)
{
    TM_FN(dense_op) *s = op;
    tm_scored *positives = TM_SCRATCH(&s->scratch, positives, thread);
    tm_scored *negatives = TM_SCRATCH(&s->scratch, negatives, thread);
    int64_t n_pos, n_neg;
    TM_FN(split_row)(&s->lv, a, dist, positives, &n_pos, negatives, &n_neg);
    s->loss_a[a] = 0.0;
    s->count_a[a] = n_pos * n_neg;
    s->active_a[a] = 0;
    double *row_acc = s->want_grad ? s->row_acc + (size_t)thread * (size_t)(2 * s->d) : NULL;
    if (row_acc != NULL)
        memset(row_acc, 0, (size_t)s->d * sizeof(double));
    if (n_pos > 0 && n_neg > 0) {
        tm_sort_scored(positives, n_pos);
        double *pos_weight = TM_SCRATCH(&s->scratch, work, thread); /* n_pos */
        double loss = 0.0;
        int64_t active = 0;
        if (!s->soft) {
            /* n_pos < m here (the anchor has a negative), so n_pos + 1 items fit. */
            double *suffix = (double *)(void *)TM_SCRATCH(&s->scratch, best, thread);
            int64_t *starts = TM_SCRATCH(&s->scratch, slots, thread);
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
                if (row_acc != NULL)
                    TM_FN(dense_pair)(s, thread, a, negatives[q].index, -(double)c, v, row_acc,
                                      s->ref_a);
            }
            int64_t running = 0;
            for (int64_t r = 0; r < n_pos; ++r) {
                running += starts[r];
                pos_weight[r] = (double)running;
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
                if (row_acc != NULL && neg_weight != 0.0)
                    TM_FN(dense_pair)(s, thread, a, negatives[q].index, -neg_weight, v, row_acc,
                                      s->ref_a);
            }
        }
        if (row_acc != NULL)
            for (int64_t r = 0; r < n_pos; ++r)
                if (pos_weight[r] != 0.0)
                    TM_FN(dense_pair)(s, thread, a, positives[r].index, pos_weight[r],
                                      positives[r].value, row_acc, s->ref_a);
        s->loss_a[a] = loss;
        s->active_a[a] = active;
    }
    if (row_acc != NULL)
        TM_FN(store_row)(s->anchor_a + a * s->d, row_acc, s->d);
    return TM_OK;
}

/* Contrastive for one anchor: every pair's term and gradient weight depend
 * on that pair alone.  Positive and negative parts are kept apart (a = pos,
 * b = neg) because mean_nonzero scales them separately. */
static int TM_FN(contrastive_row)(void *op, int thread, int64_t a, const TM_REAL *dist)
{
    TM_FN(dense_op) *s = op;
    double *acc_pos = s->want_grad ? s->row_acc + (size_t)thread * (size_t)(2 * s->d) : NULL;
    double *acc_neg = acc_pos != NULL ? acc_pos + s->d : NULL;
    if (acc_pos != NULL)
        memset(acc_pos, 0, 2 * (size_t)s->d * sizeof(double));
    const int64_t label = s->lv.labels[a];
    double loss_pos = 0.0, loss_neg = 0.0;
    int64_t n_pos = 0, n_neg = 0, act_pos = 0, act_neg = 0;
    for (int64_t j = 0; j < s->lv.m; ++j) {
        if (s->lv.self && j == a)
            continue;
        const double v = (double)dist[j];
        const int positive = s->lv.ref_labels[j] == label;
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
            if (acc_pos != NULL)
                TM_FN(dense_pair)(s, thread, a, j, dl, v, acc_pos, s->ref_a);
        } else {
            loss_neg += l;
            ++act_neg;
            if (acc_neg != NULL)
                TM_FN(dense_pair)(s, thread, a, j, -dl, v, acc_neg, s->ref_b);
        }
    }
    s->loss_a[a] = loss_pos;
    s->loss_b[a] = loss_neg;
    s->count_a[a] = n_pos;
    s->count_b[a] = n_neg;
    s->active_a[a] = act_pos;
    s->active_b[a] = act_neg;
    if (acc_pos != NULL) {
        TM_FN(store_row)(s->anchor_a + a * s->d, acc_pos, s->d);
        TM_FN(store_row)(s->anchor_b + a * s->d, acc_neg, s->d);
    }
    return TM_OK;
}

/* Allocations shared by the two dense losses: per-anchor arrays and norms. */
static int TM_FN(dense_init)(TM_FN(dense_op) *s, const TM_REAL *x, int64_t n, const TM_REAL *ref,
                             int64_t m, int64_t d, int metric, const int64_t *labels,
                             const int64_t *ref_labels)
{
    memset(s, 0, sizeof(*s));
    s->lv.labels = labels;
    s->lv.ref_labels = ref == NULL ? labels : ref_labels;
    s->lv.self = ref == NULL;
    s->lv.m = m;
    s->x = x;
    s->r = ref == NULL ? x : ref;
    s->d = d;
    s->metric = metric;
    size_t bytes;
    int status = tm_bytes(n > 0 ? n : 1, 6, sizeof(double), &bytes);
    if (status != TM_OK)
        return status;
    double *per_anchor = tm_alloc(bytes); /* 2 double + 4 int64 arrays */
    if (per_anchor == NULL)
        return TM_ERR_NOMEM;
    s->loss_a = per_anchor;
    s->loss_b = per_anchor + n;
    s->count_a = (int64_t *)(void *)(per_anchor + 2 * n);
    s->count_b = s->count_a + n;
    s->active_a = s->count_b + n;
    s->active_b = s->active_a + n;
    memset(per_anchor, 0, bytes);
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

static void TM_FN(dense_release)(TM_FN(dense_op) *s)
{
    tm_free(s->loss_a);
    tm_free((void *)s->x_norms);
    TM_FN(dense_free)(s);
}

/* out = scale_a * (anchor_a + sum_t ref_a[t]) + scale_b * (anchor_b + sum_t ref_b[t]);
 * any part may be NULL. */
static void TM_FN(combine)(TM_REAL *out, int64_t rows, int64_t d, double scale_a,
                           const TM_REAL *anchor_a, const TM_REAL *ref_a, double scale_b,
                           const TM_REAL *anchor_b, const TM_REAL *ref_b, int nthreads)
{
    const size_t count = (size_t)(rows * d);
    for (size_t i = 0; i < count; ++i) {
        double part_a = anchor_a != NULL ? (double)anchor_a[i] : 0.0;
        double part_b = anchor_b != NULL ? (double)anchor_b[i] : 0.0;
        for (int t = 0; t < nthreads; ++t) {
            if (ref_a != NULL)
                part_a += (double)ref_a[(size_t)t * count + i];
            if (ref_b != NULL)
                part_b += (double)ref_b[(size_t)t * count + i];
        }
        out[i] = (TM_REAL)(scale_a * part_a + scale_b * part_b);
    }
}

static int TM_FN(check_loss_args)(const TM_REAL *x, int64_t n, const TM_REAL *ref, int64_t m,
                                  int64_t d, int metric, const int64_t *labels,
                                  const int64_t *ref_labels, int reduction, const double *loss)
{
    int status = TM_FN(validate_problem)(x, n, ref, m, d, labels, ref_labels);
    if (status != TM_OK)
        return status;
    if (loss == NULL || !TM_FN(valid_reduction)(reduction) ||
        (metric != TM_METRIC_EUCLIDEAN && metric != TM_METRIC_SQEUCLIDEAN &&
         metric != TM_METRIC_COSINE))
        return TM_ERR_INVALID;
    return TM_OK;
}

int TM_FN(tm_batch_all_loss)(const TM_REAL *x, int64_t n, const TM_REAL *ref, int64_t m,
                             int64_t d, int metric, const int64_t *labels,
                             const int64_t *ref_labels, double margin, int soft, int reduction,
                             double *loss, int64_t *n_triplets, int64_t *n_active,
                             double *per_anchor, TM_REAL *grad, TM_REAL *ref_grad)
{
    int status = TM_FN(check_loss_args)(x, n, ref, m, d, metric, labels, ref_labels, reduction,
                                        loss);
    if (status != TM_OK)
        return status;
    if (n_triplets == NULL || n_active == NULL)
        return TM_ERR_INVALID;
    TM_FN(dense_op) s;
    if ((status = TM_FN(dense_init)(&s, x, n, ref, m, d, metric, labels, ref_labels)) != TM_OK) {
        TM_FN(dense_release)(&s);
        return status;
    }
    s.margin = margin;
    s.soft = soft;
    s.ref_parts = 1;
    s.want_grad = grad != NULL;
    s.want_ref_side = grad != NULL && (ref == NULL || ref_grad != NULL);
    s.anchor_a = grad;
    const TM_FN(tm_tile_problem) problem = {x, n, ref, m, d, metric};
    const TM_FN(tm_row_op) op = {&s, TM_FN(dense_setup), TM_FN(batch_all_row), 1};
    status = TM_FN(tm_run_rows)(&problem, &op);
    if (status == TM_OK) {
        double total = 0.0;
        int64_t triplets = 0, active = 0;
        for (int64_t a = 0; a < n; ++a) {
            total += s.loss_a[a];
            triplets += s.count_a[a];
            active += s.active_a[a];
            if (per_anchor != NULL)
                per_anchor[a] = s.loss_a[a];
        }
        const double scale = TM_FN(reduction_scale)(reduction, triplets, active);
        *loss = reduction == TM_REDUCE_NONE ? total : total * scale;
        *n_triplets = triplets;
        *n_active = active;
        if (grad != NULL) {
            if (ref == NULL) {
                TM_FN(combine)(grad, n, d, scale, grad, s.ref_a, 0.0, NULL, NULL, s.nthreads);
            } else {
                TM_FN(combine)(grad, n, d, scale, grad, NULL, 0.0, NULL, NULL, 0);
                if (ref_grad != NULL)
                    TM_FN(combine)(ref_grad, m, d, scale, NULL, s.ref_a, 0.0, NULL, NULL,
                                   s.nthreads);
            }
        }
    }
    TM_FN(dense_release)(&s);
    return status;
}

int TM_FN(tm_contrastive_loss)(const TM_REAL *x, int64_t n, const TM_REAL *ref, int64_t m,
                               int64_t d, int metric, const int64_t *labels,
                               const int64_t *ref_labels, double pos_margin, double neg_margin,
                               int power, int reduction, double *loss, int64_t *counts,
                               double *per_anchor, TM_REAL *grad, TM_REAL *ref_grad)
{
    int status = TM_FN(check_loss_args)(x, n, ref, m, d, metric, labels, ref_labels, reduction,
                                        loss);
    if (status != TM_OK)
        return status;
    if (counts == NULL || (power != 1 && power != 2))
        return TM_ERR_INVALID;
    TM_FN(dense_op) s;
    TM_REAL *anchor_neg = NULL;
    if ((status = TM_FN(dense_init)(&s, x, n, ref, m, d, metric, labels, ref_labels)) != TM_OK)
        goto done;
    s.pos_margin = pos_margin;
    s.neg_margin = neg_margin;
    s.power = power;
    s.want_grad = grad != NULL;
    s.want_ref_side = grad != NULL && ref != NULL && ref_grad != NULL;
    s.ref_parts = 2;
    if (grad != NULL) {
        size_t bytes;
        if ((status = tm_bytes(n, d, sizeof(TM_REAL), &bytes)) != TM_OK)
            goto done;
        anchor_neg = tm_alloc(bytes);
        if (anchor_neg == NULL) {
            status = TM_ERR_NOMEM;
            goto done;
        }
    }
    s.anchor_a = grad;
    s.anchor_b = anchor_neg;
    {
        const TM_FN(tm_tile_problem) problem = {x, n, ref, m, d, metric};
        const TM_FN(tm_row_op) op = {&s, TM_FN(dense_setup), TM_FN(contrastive_row), 1};
        status = TM_FN(tm_run_rows)(&problem, &op);
    }
    if (status == TM_OK) {
        double sum_pos = 0.0, sum_neg = 0.0;
        int64_t n_pos = 0, n_neg = 0, act_pos = 0, act_neg = 0;
        for (int64_t a = 0; a < n; ++a) {
            sum_pos += s.loss_a[a];
            sum_neg += s.loss_b[a];
            n_pos += s.count_a[a];
            n_neg += s.count_b[a];
            act_pos += s.active_a[a];
            act_neg += s.active_b[a];
            if (per_anchor != NULL)
                per_anchor[a] = s.loss_a[a] + s.loss_b[a];
        }
        double scale_pos = 1.0, scale_neg = 1.0;
        if (reduction == TM_REDUCE_MEAN) {
            scale_pos = scale_neg = n_pos + n_neg > 0 ? 1.0 / (double)(n_pos + n_neg) : 0.0;
        } else if (reduction == TM_REDUCE_MEAN_NONZERO) {
            scale_pos = act_pos > 0 ? 1.0 / (double)act_pos : 0.0;
            scale_neg = act_neg > 0 ? 1.0 / (double)act_neg : 0.0;
        }
        *loss = reduction == TM_REDUCE_NONE ? sum_pos + sum_neg
                                            : scale_pos * sum_pos + scale_neg * sum_neg;
        counts[0] = n_pos;
        counts[1] = n_neg;
        counts[2] = act_pos;
        counts[3] = act_neg;
        if (grad != NULL) {
            /* Self mode: each unordered pair appears twice with equal terms,
             * so the reference side doubles the anchor side. */
            const double both = ref == NULL ? 2.0 : 1.0;
            TM_FN(combine)(grad, n, d, both * scale_pos, grad, NULL, both * scale_neg,
                           anchor_neg, NULL, 0);
            if (ref != NULL && ref_grad != NULL)
                TM_FN(combine)(ref_grad, m, d, scale_pos, NULL, s.ref_a, scale_neg, NULL,
                               s.ref_b, s.nthreads);
        }
    }
done:
    tm_free(anchor_neg);
    TM_FN(dense_release)(&s);
    return status;
}
