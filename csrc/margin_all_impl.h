/*
 * The margin loss (Wu et al. 2017) over every valid triplet, without listing
 * them, one body for both precisions (pair_heads.c).  Per triplet (a, p, n)
 *   max(0, d_ap - beta_a + alpha) + max(0, beta_a - d_an + alpha) + nu beta_a,
 * and the sum over the triplets of anchor a splits into pair terms: each
 * positive's hinge counts once per negative (N_a times), each negative's once
 * per positive (P_a times), the penalty P_a N_a times.  So one walk of the
 * rows gives the loss, the counts, dL/dbeta_a and the gradient weights (N_a
 * on an active positive pair, -P_a on an active negative pair), and the dense
 * row walk (dense_impl.h) turns the weights into the gradient.  In self mode
 * entry (a, j) also gets row j's weight on the same distance (beta_j, N_j,
 * P_j are known before the walk), so the weights are symmetric and the
 * anchor side is the whole gradient; in reference mode the walk adds the
 * reference side.  Positive distances by direct difference (exact), negative
 * ones from the tiles, as the lifted loss takes them.
 */

typedef struct {
    TM_FN(dense_op) dense; /* first: the row function gets the dense_op */
    tm_label_groups ref_groups;
    double margin, nu;
    const double *beta; /* per anchor */
    double *beta_grad;  /* per anchor, unscaled until the finish */
    /* self mode: each row's positive and negative counts, for the column's terms */
    double *row_pos, *row_neg;
} TM_FN(margin_all_op);

static int TM_FN(margin_all_row)(void *op, int thread, int64_t a, int64_t row_in_block,
                                 TM_REAL *dist)
{
    (void)row_in_block;
    TM_FN(margin_all_op) *M = op;
    TM_FN(dense_op) *s = &M->dense;
    const int64_t m = s->c.lv.m, label = s->c.lv.labels[a], own = TM_FN(own_row)(&s->c.lv, a);
    const int64_t *ref_labels = s->c.lv.ref_labels;
    int64_t size;
    const int64_t *members = tm_label_group(&M->ref_groups, label, &size);
    const int64_t n_pos = size - (own >= 0), n_neg = m - size;
    const int counted = n_pos > 0 && n_neg > 0; /* the row has triplets */
    const double margin = M->margin, beta = M->beta[a];
    const double low = beta - margin, high = beta + margin; /* the two hinges */
    const double p_weight = counted ? (double)n_neg : 0.0, n_weight = counted ? (double)n_pos : 0.0;
    /* In self mode the entry (a, j) also carries row j's terms on the same
     * distance, so the weights are symmetric and the anchor side is the
     * gradient (no reference side). */
    const double *col_pos = M->row_pos, *col_neg = M->row_neg, *col_beta = M->beta;
    double loss_pos = 0.0, loss_neg = 0.0, alpha = 0.0;
    int64_t act_pos = 0, act_neg = 0, weighted = 0;
    for (int64_t j = 0; j < m; ++j) {
        const double v = (double)dist[j];
        dist[j] = 0;
        if (ref_labels[j] == label)
            continue;
        const int on = counted && v < high;
        double w = on ? -n_weight : 0.0;
        if (on) {
            loss_neg += high - v;
            ++act_neg;
        }
        if (col_pos != NULL && v < col_beta[j] + margin)
            w -= col_pos[j];
        if (s->want_grad && w != 0.0) {
            TM_FN(dense_pair)(s, thread, 0, a, j, w, v, dist, &alpha);
            ++weighted;
        }
    }
    for (int64_t q = 0; q < size; ++q) {
        const int64_t j = members[q];
        if (j == own)
            continue;
        const double v = TM_FN(dense_distance)(s, a, j);
        const int on = counted && v > low;
        double w = on ? p_weight : 0.0;
        if (on) {
            loss_pos += v - low;
            ++act_pos;
        }
        if (col_neg != NULL && v > col_beta[j] - margin)
            w += col_neg[j];
        if (s->want_grad && w != 0.0) {
            TM_FN(dense_pair)(s, thread, 0, a, j, w, v, dist, &alpha);
            ++weighted;
        }
    }
    const double triplets = (double)n_pos * (double)n_neg;
    s->loss[0][a] = p_weight * loss_pos + n_weight * loss_neg + M->nu * beta * triplets;
    s->count[0][a] = n_pos * n_neg;
    s->active[0][a] = n_neg * act_pos + n_pos * act_neg;
    M->beta_grad[a] = -p_weight * (double)act_pos + n_weight * (double)act_neg + M->nu * triplets;
    if (s->want_grad) {
        s->alpha[0][a] = alpha;
        s->nonzeros[2 * thread] += weighted;
    }
    return TM_OK;
}

typedef struct {
    int reduction;
    double *loss;
    int64_t *counts;
    double *per_anchor;
    TM_REAL *grad;
} TM_FN(margin_all_out);

static void TM_FN(margin_all_finish)(TM_FN(dense_op) *s, void *ctx, double *scale)
{
    TM_FN(margin_all_out) *o = ctx;
    TM_FN(margin_all_op) *M = (TM_FN(margin_all_op) *)(void *)s;
    const TM_FN(dense_sums) sums = TM_FN(dense_totals)(s, o->per_anchor);
    const double total = sums.loss;
    const int64_t triplets = sums.count, active = sums.active;
    /* "mean": over the nonzero hinge terms (pytorch-metric-learning's rule). */
    scale[0] = o->reduction == TM_REDUCE_MEAN ? (active > 0 ? 1.0 / (double)active : 0.0) : 1.0;
    scale[1] = 0.0;
    *o->loss = total * scale[0];
    o->counts[0] = triplets;
    o->counts[1] = active;
    for (int64_t a = 0; a < s->n; ++a)
        M->beta_grad[a] *= scale[0];
    if (o->grad != NULL)
        TM_FN(finish_anchor_side)(s, o->grad, scale);
}

int TM_FN(tm_margin_all_loss)(const TM_REAL *x, int64_t n, const TM_REAL *ref, int64_t m,
                              int64_t d, int metric, int row_exponent, const int64_t *labels,
                              const int64_t *ref_labels, int64_t ref_offset, double margin,
                              const double *beta, double nu, int reduction, double *loss,
                              int64_t *counts, double *per_anchor, double *beta_grad,
                              TM_REAL *grad, TM_REAL *ref_grad)
{
    int status = TM_FN(check_loss_args)(x, n, ref, m, d, metric, labels, ref_labels, ref_offset,
                                        reduction, loss);
    if (status != TM_OK)
        return status;
    if (counts == NULL || (n > 0 && (beta == NULL || beta_grad == NULL)) || !(margin >= 0.0) ||
        !isfinite(margin) || !(nu >= 0.0) || !isfinite(nu) ||
        reduction == TM_REDUCE_MEAN_NONZERO)
        return TM_ERR_INVALID;
    for (int64_t a = 0; a < n; ++a)
        if (!isfinite(beta[a]))
            return TM_ERR_INVALID;
    TM_FN(margin_all_op) M;
    memset(&M, 0, sizeof(M));
    TM_FN(dense_op) *s = &M.dense;
    status = TM_FN(dense_init)(s, x, n, ref, m, d, metric, row_exponent, labels, ref_labels,
                               ref_offset, 1);
    M.margin = margin;
    M.nu = nu;
    M.beta = beta;
    M.beta_grad = beta_grad;
    if (status == TM_OK)
        status = tm_label_groups_build(s->c.lv.ref_labels, m, &M.ref_groups);
    if (status == TM_OK && ref == NULL && grad != NULL) {
        /* Self mode: the rows' counts for the column terms (row_pos[j] weighs the
         * negative entries of row j, row_neg[j] its positive ones; 0 without triplets). */
        size_t bytes;
        status = tm_bytes(2 * n, 1, sizeof(double), &bytes);
        if (status == TM_OK && (M.row_pos = tm_alloc(bytes > 0 ? bytes : 1)) == NULL)
            status = TM_ERR_NOMEM;
        if (status == TM_OK) {
            M.row_neg = M.row_pos + n;
            for (int64_t j = 0; j < n; ++j) {
                int64_t size;
                tm_label_group(&M.ref_groups, labels[j], &size);
                const int counted = size > 1 && size < n;
                M.row_pos[j] = counted ? (double)(size - 1) : 0.0;
                M.row_neg[j] = counted ? (double)(n - size) : 0.0;
            }
        }
    }
    if (status == TM_OK) {
        TM_FN(dense_start)(s, grad, ref_grad);
        TM_FN(margin_all_out) out = {reduction, loss, counts, per_anchor, grad};
        double scale[2];
        const TM_FN(tm_tile_problem) problem = {x, n, ref, m, d, metric, row_exponent};
        status = TM_FN(dense_run)(s, &problem, TM_FN(margin_all_row), TM_FN(margin_all_finish),
                                  &out, scale, ref == NULL ? grad : ref_grad);
    }
    if (status == TM_OK)
        status = TM_FN(check_gradients)(grad, n, ref != NULL ? ref_grad : NULL, m, d);
    tm_free(M.ref_groups.label);
    tm_free(M.row_pos);
    TM_FN(dense_release)(s);
    return status;
}
