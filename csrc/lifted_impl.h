/*
 * Lifted structured loss, one body for both precisions (pair_heads.c).
 *
 * Song's form.  For a positive entry (i, j) of the n x m pair matrix (a
 * positive pair, i a row of x, j a row of ref), with S_i the sum of
 * e^(neg_margin - d) over row i's negatives and S'_j the same over column j's
 * negatives (in self mode the column is the row: S' = S),
 *   J_ij = log(S_i + S'_j) + d_ij - pos_margin,   loss = sum of h_ij^2 / 2,
 * h = max(0, J), scaled by the reduction.  dL/dJ_ij = h_ij, so the gradient
 * weight of a positive entry is h_ij, and a negative entry (i, k) is in S_i
 * and in S'_k:
 *   dL/dd_ik = -(tau_i p_ik + tau'_k q_ik),
 *   p_ik = e^(neg_margin - d_ik) / S_i,  q_ik = e^(neg_margin - d_ik) / S'_k,
 *   tau_i = sum over row i's positives j of h_ij S_i / (S_i + S'_j),
 *   tau'_k = sum over column k's positives l of h_lk S'_k / (S_l + S'_k).
 * p and q are at most 1 and tau at most the sum of the hinges, so no step can
 * overflow whatever the distances (all sums are kept as logarithms).  The
 * computation is three steps:
 *   1. a walk over the tiles: per row (and, in reference mode, per column)
 *      the log of S, as a log-sum-exp shifted by its largest term;
 *   2. the positive pairs, by direct difference (their distances enter the
 *      loss unattenuated, so they are exact as for the mined losses): the
 *      loss, the counts and tau, tau' (O(positive pairs x d), no tile);
 *   3. a second walk (dense_run) that writes each entry's weight into the
 *      coefficient row: one product with the reference rows gives the anchor
 *      side.  In self mode the weights are symmetric (entry (i, k) and (k, i)
 *      have the same weight), so the reference side equals the anchor side
 *      and the anchor side is doubled; in reference mode the reference side
 *      is the transposed product, as for contrastive.
 *
 * Generalized form, per row i with a positive and a negative:
 *   L_i = max(0, LSE_{p}(d_ip - pos_margin) + LSE_{n}(neg_margin - d_in));
 * its weights are softmaxes over the row's positives and negatives, active
 * rows only (g_i = 1).  In self mode the same two walks: the first gives
 * each row's two log-sum-exps and g, the second entry (i, k)'s weight from
 * both rows (g_i's softmax weight + g_k's), symmetric, so the anchor side is
 * the gradient.  In reference mode one walk does both and adds the
 * reference side.  Positive distances come from the direct difference here
 * too.
 */

typedef struct {
    TM_FN(dense_op) dense; /* first: the row functions get the dense_op */
    double neg_margin, pos_margin;
    int generalized;
    /* Song's form */
    double *row_lse, *col_lse; /* n, m: log S, log S' (col_lse == row_lse in self mode) */
    double *row_tau, *col_tau; /* n, m (col_tau == row_tau in self mode) */
    TM_REAL *col_shift_real, *col_tau_real; /* m: neg_margin - log S'_j and tau'_j, rounded */
    double *pos_lse; /* generalized form, self mode: each row's LSE over its positives */
    tm_label_groups ref_groups, x_groups;
    /* step 1 in reference mode: per-thread running maxima and sums per column */
    double *col_max, *col_sum;
    int lse_threads;
    /* results of step 2 */
    double total;
    int64_t terms, active;
} TM_FN(lifted_op);

/* e^v for v <= 0 (larger v is taken as 0), as accurate as the precision. */
static inline double TM_FN(lifted_exp)(double v)
{
#if TM_BITS == 32
    return (double)tm_exp_nonpositive_f32((float)(v < 0.0 ? v : 0.0));
#else
    return exp(v < 0.0 ? v : 0.0);
#endif
}

/* The exact distance of positive entry (i, j), in the caller's units. */
static inline double TM_FN(lifted_pos_dist)(const TM_FN(lifted_op) *L, int64_t i, int64_t j)
{
    return TM_FN(dense_distance)(&L->dense, i, j);
}

/* Song's hinge h_ij for the positive entry (i, j) at distance dist. */
static inline double TM_FN(song_hinge)(const TM_FN(lifted_op) *L, int64_t i, int64_t j,
                                       double dist)
{
    const double t = tm_log_add(L->row_lse[i], L->col_lse[j]) + dist - L->pos_margin;
    return t > 0.0 ? t : 0.0; /* -inf (no negative on either side) gives 0 */
}

/* ---- step 1: log S per row (and per column) ------------------------------ */

static int TM_FN(lse_setup)(void *op, int nthreads, int64_t block_rows)
{
    (void)block_rows;
    TM_FN(lifted_op) *L = op;
    if (L->dense.c.lv.self)
        return TM_OK;
    size_t bytes;
    const int64_t m = L->dense.c.lv.m;
    int status = tm_bytes((int64_t)nthreads, m > 0 ? m : 1, sizeof(double), &bytes);
    if (status != TM_OK)
        return status;
    L->col_max = tm_alloc(bytes);
    L->col_sum = tm_alloc(bytes);
    if (L->col_max == NULL || L->col_sum == NULL)
        return TM_ERR_NOMEM;
    for (size_t q = 0; q < (size_t)nthreads * (size_t)m; ++q) {
        L->col_max[q] = -INFINITY;
        L->col_sum[q] = 0.0;
    }
    L->lse_threads = nthreads;
    return TM_OK;
}

/* The row's log-sum-exp over its negatives of (neg_margin - d) (-inf without
 * negatives); returns the sum of e^(nearest - d) it took the log of. */
static double TM_FN(negatives_lse)(const TM_FN(lifted_op) *L, int64_t a, const TM_REAL *row,
                                   double *lse)
{
    const TM_FN(label_view) *lv = &L->dense.c.lv;
    double nearest;
    const double sum = TM_FN(kernel_lifted_lse)(L->dense.kernels)(row, lv->ref_labels,
                                                                 lv->labels[a], lv->m, &nearest);
    *lse = sum > 0.0 ? L->neg_margin - nearest + log(sum) : -INFINITY;
    return sum;
}

static int TM_FN(lse_row)(void *op, int thread, int64_t a, int64_t row_in_block, TM_REAL *dist)
{
    (void)row_in_block;
    TM_FN(lifted_op) *L = op;
    const TM_FN(label_view) *lv = &L->dense.c.lv;
    if (!lv->self) {
        const int64_t m = lv->m, label = lv->labels[a];
        double *mx = L->col_max + (size_t)thread * (size_t)m;
        double *sm = L->col_sum + (size_t)thread * (size_t)m;
        for (int64_t j = 0; j < m; ++j) {
            if (lv->ref_labels[j] == label)
                continue;
            const double v = L->neg_margin - (double)dist[j];
            if (v > mx[j]) {
                sm[j] = sm[j] * TM_FN(lifted_exp)(mx[j] - v) + 1.0;
                mx[j] = v;
            } else {
                sm[j] += TM_FN(lifted_exp)(v - mx[j]);
            }
        }
    }
    TM_FN(negatives_lse)(L, a, dist, &L->row_lse[a]);
    return TM_OK;
}

/* Merges the threads' column sums, in thread order. */
static void TM_FN(lse_columns)(TM_FN(lifted_op) *L)
{
    const int64_t m = L->dense.c.lv.m;
    for (int64_t j = 0; j < m; ++j) {
        double top = -INFINITY;
        for (int t = 0; t < L->lse_threads; ++t)
            top = L->col_max[(size_t)t * (size_t)m + (size_t)j] > top
                      ? L->col_max[(size_t)t * (size_t)m + (size_t)j]
                      : top;
        if (top == -INFINITY) {
            L->col_lse[j] = -INFINITY;
            continue;
        }
        double sum = 0.0;
        for (int t = 0; t < L->lse_threads; ++t) {
            const size_t q = (size_t)t * (size_t)m + (size_t)j;
            if (L->col_max[q] != -INFINITY)
                sum += L->col_sum[q] * exp(L->col_max[q] - top);
        }
        L->col_lse[j] = top + log(sum);
    }
}

/* ---- step 2: the positive pairs -------------------------------------------- */

/* Rows [begin, end): loss, counts and tau over each row's positives. */
static void TM_FN(song_rows)(void *ctx, int participant, int64_t begin, int64_t end)
{
    (void)participant;
    TM_FN(lifted_op) *L = ctx;
    TM_FN(dense_op) *s = &L->dense;
    const tm_label_groups *g = &L->ref_groups;
    for (int64_t i = begin; i < end; ++i) {
        const int64_t label = s->c.lv.labels[i], own = TM_FN(own_row)(&s->c.lv, i);
        double loss = 0.0, tau = 0.0;
        int64_t count = 0, active = 0;
        int64_t size;
        const int64_t *members = tm_label_group(g, label, &size);
        for (int64_t q = 0; q < size; ++q) {
            const int64_t j = members[q];
            if (j == own)
                continue;
            const double h = TM_FN(song_hinge)(L, i, j, TM_FN(lifted_pos_dist)(L, i, j));
            ++count;
            if (h > 0.0) {
                ++active;
                loss += 0.5 * h * h;
                tau += h * tm_share(L->row_lse[i], L->col_lse[j]);
            }
        }
        s->loss[0][i] = loss;
        s->count[0][i] = count;
        s->active[0][i] = active;
        L->row_tau[i] = tau;
    }
}

/* Reference mode, columns [begin, end): tau' over each column's positives. */
static void TM_FN(song_columns)(void *ctx, int participant, int64_t begin, int64_t end)
{
    (void)participant;
    TM_FN(lifted_op) *L = ctx;
    const TM_FN(label_view) *lv = &L->dense.c.lv;
    const tm_label_groups *g = &L->x_groups;
    for (int64_t j = begin; j < end; ++j) {
        const int64_t label = lv->ref_labels[j];
        double tau = 0.0;
        int64_t size;
        const int64_t *members = tm_label_group(g, label, &size);
        for (int64_t q = 0; q < size; ++q) {
            const int64_t i = members[q];
            if (TM_FN(own_row)(lv, i) == j)
                continue;
            const double h = TM_FN(song_hinge)(L, i, j, TM_FN(lifted_pos_dist)(L, i, j));
            if (h > 0.0)
                tau += h * tm_share(L->col_lse[j], L->row_lse[i]);
        }
        L->col_tau[j] = tau;
    }
}

/* ---- step 3: the weights, one row at a time ---------------------------- */

/* Writes row a's coefficients over its distances for the negatives' weights
 * w_j = -(tau e^(shift - d_j) + col_tau[j] e^(col_shift[j] - d_j)) (no
 * column term when col_shift is NULL; positives and the anchor's own column
 * get 0), adding to *alpha and the thread's gamma sums (see dense_impl.h).
 * The exponents are <= 0 for negatives: shift and col_shift are neg_margin
 * minus log-sum-exps over sets that contain the pair. */
static void TM_FN(negative_weights)(TM_FN(dense_op) *s, int thread, int64_t a, TM_REAL *row,
                                    double shift, double tau, const TM_REAL *col_shift,
                                    const TM_REAL *col_tau, double *alpha)
{
    const int64_t m = s->c.lv.m, label = s->c.lv.labels[a];
    const int64_t *ref_labels = s->c.lv.ref_labels;
    if (s->metric != TM_METRIC_COSINE) {
        /* The kernel's coefficients take the rows' scale through tau (col_tau has it
         * from column_terms): w 2^-e / d, see tm_row_scale. */
        *alpha += TM_FN(kernel_lifted_beta)(s->kernels)(row, ref_labels, label, m, shift,
                                                        tau * s->scale.coef, col_shift, col_tau,
                                                        s->metric == TM_METRIC_SQEUCLIDEAN);
        if (s->want_ref_side) { /* euclidean metrics: gamma = alpha = -beta */
            double *gamma = s->gamma[0] + (size_t)thread * (size_t)s->span - s->ref_lo;
            for (int64_t j = s->ref_lo; j < s->ref_hi; ++j)
                gamma[j] -= (double)row[j];
        }
    } else {
        for (int64_t j = 0; j < m; ++j) {
            const double v = (double)row[j];
            row[j] = 0;
            if (ref_labels[j] == label)
                continue;
            double w = tau * TM_FN(lifted_exp)(shift - v);
            if (col_shift != NULL)
                w += (double)col_tau[j] * TM_FN(lifted_exp)((double)col_shift[j] - v);
            if (w != 0.0)
                TM_FN(dense_pair)(s, thread, 0, a, j, -w, v, row, alpha);
        }
    }
    s->nonzeros[2 * thread] += m;
}

/* The weight of positive entry (i, j) at distance v in a symmetric walk: Song's
 * hinge, or the generalized form's softmax weights of both rows. */
static double TM_FN(positive_weight)(const TM_FN(lifted_op) *L, int64_t i, int64_t j, double v)
{
    if (!L->generalized)
        return TM_FN(song_hinge)(L, i, j, v);
    const double pm = L->pos_margin;
    return L->row_tau[i] * TM_FN(lifted_exp)(v - pm - L->pos_lse[i]) +
           L->row_tau[j] * TM_FN(lifted_exp)(v - pm - L->pos_lse[j]);
}

/* Song's second walk, and the generalized form's in self mode: the negatives'
 * weights from the row's and the column's terms, then the positives'. */
static int TM_FN(symmetric_row)(void *op, int thread, int64_t a, int64_t row_in_block,
                                TM_REAL *dist)
{
    (void)row_in_block;
    TM_FN(lifted_op) *L = op;
    TM_FN(dense_op) *s = &L->dense;
    const int64_t label = s->c.lv.labels[a], own = TM_FN(own_row)(&s->c.lv, a);
    double alpha = 0.0;
    TM_FN(negative_weights)(s, thread, a, dist, L->neg_margin - L->row_lse[a], L->row_tau[a],
                            L->col_shift_real, L->col_tau_real, &alpha);
    int64_t size;
    const int64_t *members = tm_label_group(&L->ref_groups, label, &size);
    for (int64_t q = 0; q < size; ++q) {
        const int64_t j = members[q];
        if (j == own)
            continue;
        const double pair_dist = TM_FN(lifted_pos_dist)(L, a, j);
        const double w = TM_FN(positive_weight)(L, a, j, pair_dist);
        if (w != 0.0)
            TM_FN(dense_pair)(s, thread, 0, a, j, w, pair_dist, dist, &alpha);
    }
    s->alpha[0][a] = alpha;
    return TM_OK;
}

static int TM_FN(generalized_row)(void *op, int thread, int64_t a, int64_t row_in_block,
                                  TM_REAL *dist)
{
    (void)row_in_block;
    TM_FN(lifted_op) *L = op;
    TM_FN(dense_op) *s = &L->dense;
    const int64_t m = s->c.lv.m, label = s->c.lv.labels[a], own = TM_FN(own_row)(&s->c.lv, a);
    const double pm = L->pos_margin;
    tm_scored *positives = TM_SCRATCH(&s->c.scratch, positives, thread);
    const tm_label_groups *g = &L->ref_groups;
    int64_t n_pos = 0;
    double far = -INFINITY;
    int64_t size;
    const int64_t *members = tm_label_group(g, label, &size);
    for (int64_t q = 0; q < size; ++q) {
        const int64_t j = members[q];
        if (j == own)
            continue;
        positives[n_pos].index = j;
        positives[n_pos].value = TM_FN(lifted_pos_dist)(L, a, j);
        far = positives[n_pos].value > far ? positives[n_pos].value : far;
        ++n_pos;
    }
    double lse_neg;
    TM_FN(negatives_lse)(L, a, dist, &lse_neg);
    const int valid = n_pos > 0 && lse_neg != -INFINITY;
    double lse_pos = 0.0, value = 0.0;
    if (valid) {
        double pos_sum = 0.0;
        for (int64_t r = 0; r < n_pos; ++r)
            pos_sum += TM_FN(lifted_exp)(positives[r].value - far);
        lse_pos = far - pm + log(pos_sum);
        value = lse_pos + lse_neg > 0.0 ? lse_pos + lse_neg : 0.0;
    }
    s->loss[0][a] = value;
    s->count[0][a] = valid;
    s->active[0][a] = value > 0.0;
    if (!s->want_grad)
        return TM_OK;
    double alpha = 0.0;
    if (value > 0.0) {
        /* The negatives' softmax, negated: e^(neg_margin - d - lse_neg). */
        TM_FN(negative_weights)(s, thread, a, dist, L->neg_margin - lse_neg, 1.0, NULL, NULL,
                                &alpha);
        for (int64_t r = 0; r < n_pos; ++r) {
            const double w = TM_FN(lifted_exp)(positives[r].value - pm - lse_pos);
            if (w != 0.0)
                TM_FN(dense_pair)(s, thread, 0, a, positives[r].index, w, positives[r].value,
                                  dist, &alpha);
        }
    } else {
        memset(dist, 0, (size_t)m * sizeof(TM_REAL));
    }
    s->alpha[0][a] = alpha;
    return TM_OK;
}

/* The generalized form in self mode, in two walks: the first gives each row's
 * log-sum-exps and whether its term is active (g = 1), the second writes
 * entry (i, k)'s weight from both rows, g_i e^(.. - lse_i) + g_k e^(.. - lse_k)
 * (symmetric), so one product gives the gradient: no reference side, no
 * per-thread accumulators. */
static int TM_FN(generalized_lse_row)(void *op, int thread, int64_t a, int64_t row_in_block,
                                      TM_REAL *dist)
{
    (void)thread;
    (void)row_in_block;
    TM_FN(lifted_op) *L = op;
    TM_FN(dense_op) *s = &L->dense;
    const int64_t label = s->c.lv.labels[a], own = TM_FN(own_row)(&s->c.lv, a);
    const tm_label_groups *g = &L->ref_groups;
    double top = -INFINITY, sum = 0.0; /* running log-sum-exp of the positives */
    int64_t size;
    const int64_t *members = tm_label_group(g, label, &size);
    for (int64_t q = 0; q < size; ++q) {
        const int64_t j = members[q];
        if (j == own)
            continue;
        const double v = TM_FN(lifted_pos_dist)(L, a, j);
        if (v > top) {
            sum = sum * exp(top - v) + 1.0;
            top = v;
        } else {
            sum += exp(v - top);
        }
    }
    double lse_neg;
    TM_FN(negatives_lse)(L, a, dist, &lse_neg);
    const int valid = top != -INFINITY && lse_neg != -INFINITY;
    const double lse_pos = valid ? top - L->pos_margin + log(sum) : 0.0;
    const double value = valid && lse_pos + lse_neg > 0.0 ? lse_pos + lse_neg : 0.0;
    s->loss[0][a] = value;
    s->count[0][a] = valid;
    s->active[0][a] = value > 0.0;
    L->row_lse[a] = lse_neg;
    L->pos_lse[a] = lse_pos;
    L->row_tau[a] = value > 0.0 ? 1.0 : 0.0;
    return TM_OK;
}

typedef struct {
    int reduction, self_doubles;
    TM_REAL *grad;
} TM_FN(lifted_out);

/* Sums the per-row losses and counts into L->total, terms, active. */
static void TM_FN(lifted_totals)(TM_FN(lifted_op) *L)
{
    const TM_FN(dense_sums) sums = TM_FN(dense_totals)(&L->dense, NULL);
    L->total = sums.loss;
    L->terms = sums.count;
    L->active = sums.active;
}

static void TM_FN(lifted_finish)(TM_FN(dense_op) *s, void *ctx, double *scale)
{
    TM_FN(lifted_out) *o = ctx;
    TM_FN(lifted_op) *L = (TM_FN(lifted_op) *)(void *)s;
    if (L->generalized && !s->c.lv.self) /* one walk: its rows are summed now */
        TM_FN(lifted_totals)(L);
    scale[0] = TM_FN(reduction_scale)(o->reduction, L->terms, L->active);
    scale[1] = 0.0;
    const double anchor_scale[2] = {(o->self_doubles ? 2.0 : 1.0) * scale[0], 0.0};
    if (o->grad != NULL)
        TM_FN(finish_anchor_side)(s, o->grad, anchor_scale);
}

static void TM_FN(lifted_release)(TM_FN(lifted_op) *L)
{
    tm_free(L->row_lse); /* one block: row_lse, col_lse, row_tau, col_tau */
    tm_free(L->ref_groups.label);
    tm_free(L->x_groups.label);
    tm_free(L->col_max);
    tm_free(L->col_sum);
    tm_free(L->col_shift_real);
    TM_FN(dense_release)(&L->dense);
}

/* The columns' terms of the weights (neg_margin - log S'_j, tau'_j), rounded
 * once for the row kernel. */
static int TM_FN(column_terms)(TM_FN(lifted_op) *L)
{
    const int64_t m = L->dense.c.lv.m;
    size_t bytes;
    int status = tm_bytes(2 * m, 1, sizeof(TM_REAL), &bytes);
    if (status != TM_OK)
        return status;
    if ((L->col_shift_real = tm_alloc(bytes > 0 ? bytes : sizeof(TM_REAL))) == NULL)
        return TM_ERR_NOMEM;
    L->col_tau_real = L->col_shift_real + m;
    for (int64_t j = 0; j < m; ++j) {
        L->col_shift_real[j] = (TM_REAL)(L->neg_margin - L->col_lse[j]);
        L->col_tau_real[j] = (TM_REAL)(L->col_tau[j] * L->dense.scale.coef); /* cosine: 1 */
    }
    return TM_OK;
}

/* Steps 1 and 2 of Song's form. */
static int TM_FN(song_prepare)(TM_FN(lifted_op) *L, const TM_FN(tm_tile_problem) *problem)
{
    TM_FN(dense_op) *s = &L->dense;
    const int64_t n = s->n, m = s->c.lv.m;
    const int self = s->c.lv.self;
    size_t bytes;
    int status = tm_bytes(self ? 2 * n : 2 * (n + m), 1, sizeof(double), &bytes);
    if (status != TM_OK)
        return status;
    double *block = tm_alloc(bytes > 0 ? bytes : sizeof(double));
    if (block == NULL)
        return TM_ERR_NOMEM;
    L->row_lse = block;
    L->row_tau = block + n;
    L->col_lse = self ? L->row_lse : block + 2 * n;
    L->col_tau = self ? L->row_tau : block + 2 * n + m;
    if (!self && (status = tm_label_groups_build(s->c.lv.labels, n, &L->x_groups)) != TM_OK)
        return status;
    const TM_FN(tm_row_op) op = {L, TM_FN(lse_setup), TM_FN(lse_row), NULL, 1};
    if ((status = TM_FN(tm_run_rows)(problem, &op)) != TM_OK)
        return status;
    if (!self)
        TM_FN(lse_columns)(L);
    /* About d operations per positive pair: a team only where rows are many. */
    const int threads = tm_threads_for(n / 64 + 1);
    tm_parallel_for(threads, n, 16, TM_FN(song_rows), L);
    if (!self)
        tm_parallel_for(threads, m, 16, TM_FN(song_columns), L);
    TM_FN(lifted_totals)(L);
    return TM_FN(column_terms)(L);
}

/* The first walk of the generalized form in self mode. */
static int TM_FN(generalized_prepare)(TM_FN(lifted_op) *L, const TM_FN(tm_tile_problem) *problem)
{
    TM_FN(dense_op) *s = &L->dense;
    const int64_t n = s->n;
    size_t bytes;
    int status = tm_bytes(3 * n, 1, sizeof(double), &bytes);
    if (status != TM_OK)
        return status;
    double *block = tm_alloc(bytes > 0 ? bytes : sizeof(double));
    if (block == NULL)
        return TM_ERR_NOMEM;
    L->row_lse = L->col_lse = block;
    L->row_tau = L->col_tau = block + n;
    L->pos_lse = block + 2 * n;
    const TM_FN(tm_row_op) op = {L, TM_FN(lse_setup), TM_FN(generalized_lse_row), NULL, 1};
    if ((status = TM_FN(tm_run_rows)(problem, &op)) != TM_OK)
        return status;
    TM_FN(lifted_totals)(L);
    return TM_FN(column_terms)(L);
}

int TM_FN(tm_lifted_structured_loss)(const TM_REAL *x, int64_t n, const TM_REAL *ref, int64_t m,
                                     int64_t d, int metric, int row_exponent,
                                     const int64_t *labels,
                                     const int64_t *ref_labels, int64_t ref_offset,
                                     double neg_margin, double pos_margin, int generalized,
                                     int reduction, double *loss, int64_t *counts,
                                     double *per_anchor, TM_REAL *grad, TM_REAL *ref_grad)
{
    int status = TM_FN(check_loss_args)(x, n, ref, m, d, metric, labels, ref_labels, ref_offset,
                                        reduction, loss);
    if (status != TM_OK)
        return status;
    if (counts == NULL || !(neg_margin >= 0.0) || !(pos_margin >= 0.0) ||
        !isfinite(neg_margin) || !isfinite(pos_margin) || (generalized != 0 && generalized != 1))
        return TM_ERR_INVALID;
    TM_FN(lifted_op) L;
    memset(&L, 0, sizeof(L));
    TM_FN(dense_op) *s = &L.dense;
    status = TM_FN(dense_init)(s, x, n, ref, m, d, metric, row_exponent, labels, ref_labels,
                               ref_offset, 1);
    L.neg_margin = neg_margin;
    L.pos_margin = pos_margin;
    L.generalized = generalized;
    const TM_FN(tm_tile_problem) problem = {x, n, ref, m, d, metric, row_exponent};
    if (status == TM_OK)
        status = tm_label_groups_build(s->c.lv.ref_labels, m, &L.ref_groups);
    /* Self mode's weights are symmetric (the generalized form's made so): the anchor
     * side gives the gradient; only the generalized form in reference mode has its
     * loss and weights in one walk. */
    const int one_walk = generalized && ref != NULL;
    if (status == TM_OK)
        status = !generalized ? TM_FN(song_prepare)(&L, &problem)
                 : !one_walk  ? TM_FN(generalized_prepare)(&L, &problem)
                              : TM_OK;
    if (status == TM_OK) {
        TM_FN(dense_start)(s, grad, ref_grad);
        /* Song's self-mode weights count each pair once per row: doubled. */
        TM_FN(lifted_out) out = {reduction, ref == NULL && !generalized, grad};
        double scale[2] = {0.0, 0.0};
        if (one_walk || (grad != NULL && L.active > 0))
            status = TM_FN(dense_run)(s, &problem,
                                      one_walk ? TM_FN(generalized_row)
                                               : TM_FN(symmetric_row),
                                      TM_FN(lifted_finish), &out, scale,
                                      ref == NULL ? grad : ref_grad);
        else if (grad != NULL) /* nothing active: a zero gradient */
            memset(grad, 0, (size_t)(n * d) * sizeof(TM_REAL));
        if (!one_walk && !(grad != NULL && L.active > 0))
            scale[0] = TM_FN(reduction_scale)(reduction, L.terms, L.active);
        if (status == TM_OK) {
            *loss = reduction == TM_REDUCE_NONE ? L.total : L.total * scale[0];
            counts[0] = L.terms;
            counts[1] = L.active;
            if (per_anchor != NULL)
                for (int64_t a = 0; a < n; ++a)
                    per_anchor[a] = s->loss[0][a];
            status = TM_FN(check_gradients)(grad, n, ref != NULL ? ref_grad : NULL, m, d);
        }
    }
    TM_FN(lifted_release)(&L);
    return status;
}
