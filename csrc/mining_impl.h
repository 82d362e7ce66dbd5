/*
 * Miners, one body for both precisions (template.h).
 *
 * batch-hard is a streaming reducer: per-anchor running argmax / argmin,
 * updated tile by tile in increasing column order (so strict comparisons keep
 * the lowest index on ties).  The per-positive-pair miners are row
 * operations (tm_run_rows): each sees one anchor's whole row of distances.
 */

/* ---- batch-hard ------------------------------------------------------------ */

typedef struct {
    TM_FN(label_view) lv;
    int64_t *positive, *negative;
    TM_REAL *best_positive, *best_negative; /* n each */
} TM_FN(batch_hard_ctx);

static int TM_FN(batch_hard_begin)(void *ctx, int thread, int64_t row0, int64_t nrows)
{
    (void)thread;
    TM_FN(batch_hard_ctx) *c = ctx;
    for (int64_t i = row0; i < row0 + nrows; ++i)
        c->positive[i] = c->negative[i] = -1;
    return TM_OK;
}

static int TM_FN(batch_hard_tile)(void *ctx, int thread, int64_t row0, int64_t nrows,
                                  int64_t col0, int64_t ncols, const TM_REAL *dist, int64_t ld)
{
    (void)thread;
    TM_FN(batch_hard_ctx) *c = ctx;
    const int64_t *ref_labels = c->lv.ref_labels;
    for (int64_t i = 0; i < nrows; ++i) {
        const int64_t a = row0 + i, label = c->lv.labels[a], own = TM_FN(own_row)(&c->lv, a);
        const TM_REAL *row = dist + i * ld;
        int64_t pos = c->positive[a], neg = c->negative[a];
        TM_REAL best_pos = c->best_positive[a], best_neg = c->best_negative[a];
        for (int64_t j = 0; j < ncols; ++j) {
            const int64_t col = col0 + j;
            const TM_REAL v = row[j];
            if (v != v || col == own)
                continue;
            if (ref_labels[col] == label) {
                if (pos < 0 || v > best_pos) {
                    pos = col;
                    best_pos = v;
                }
            } else if (neg < 0 || v < best_neg) {
                neg = col;
                best_neg = v;
            }
        }
        c->positive[a] = pos;
        c->negative[a] = neg;
        c->best_positive[a] = best_pos;
        c->best_negative[a] = best_neg;
    }
    return TM_OK;
}

/* Self mode sees each unordered pair once (the engine's upper triangle) and
 * offers it to both of its rows.  Tiles then come in any order on any
 * thread, so each thread keeps its own best per row, merged at the end; the
 * comparisons break ties on the index explicitly, so the result (the
 * farthest positive and nearest negative, lowest index on ties) does not
 * depend on the order or the thread count. */
typedef struct {
    const int64_t *labels;
    int64_t n;
    int nthreads;
    TM_REAL *pos_val, *neg_val; /* threads x n */
    int64_t *pos_idx, *neg_idx; /* threads x n; -1: none yet */
} TM_FN(symmetric_hard_ctx);

static inline int TM_FN(farther)(TM_REAL v, int64_t j, TM_REAL best, int64_t best_j)
{
    return best_j < 0 || v > best || (v == best && j < best_j);
}

static inline int TM_FN(nearer)(TM_REAL v, int64_t j, TM_REAL best, int64_t best_j)
{
    return best_j < 0 || v < best || (v == best && j < best_j);
}

static int TM_FN(symmetric_hard_setup)(void *ctx, int nthreads, int64_t block_rows)
{
    (void)block_rows;
    TM_FN(symmetric_hard_ctx) *c = ctx;
    size_t val_bytes, idx_bytes;
    int status;
    c->nthreads = nthreads;
    if ((status = tm_bytes((int64_t)nthreads, c->n, sizeof(TM_REAL), &val_bytes)) != TM_OK ||
        (status = tm_bytes((int64_t)nthreads, c->n, sizeof(int64_t), &idx_bytes)) != TM_OK)
        return status;
    c->pos_val = tm_alloc(val_bytes);
    c->neg_val = tm_alloc(val_bytes);
    c->pos_idx = tm_alloc(idx_bytes);
    c->neg_idx = tm_alloc(idx_bytes);
    if (c->pos_val == NULL || c->neg_val == NULL || c->pos_idx == NULL || c->neg_idx == NULL)
        return TM_ERR_NOMEM;
    memset(c->pos_idx, 0xff, idx_bytes); /* all -1 */
    memset(c->neg_idx, 0xff, idx_bytes);
    return TM_OK;
}

static int TM_FN(symmetric_hard_tile)(void *ctx, int thread, int64_t row0, int64_t nrows,
                                      int64_t col0, int64_t ncols, const TM_REAL *dist,
                                      int64_t ld)
{
    const TM_FN(symmetric_hard_ctx) *c = ctx;
    const size_t off = (size_t)thread * (size_t)c->n;
    TM_REAL *pv = c->pos_val + off, *nv = c->neg_val + off;
    int64_t *pi = c->pos_idx + off, *ni = c->neg_idx + off;
    const int64_t *labels = c->labels;
    for (int64_t i = 0; i < nrows; ++i) {
        const int64_t a = row0 + i, label = labels[a];
        const int64_t first = a + 1 > col0 ? a + 1 - col0 : 0; /* pairs (a, col > a) */
        const TM_REAL *row = dist + i * ld;
        TM_REAL best_pos = pv[a], best_neg = nv[a];
        int64_t pos = pi[a], neg = ni[a];
        for (int64_t j = first; j < ncols; ++j) {
            const int64_t col = col0 + j;
            const TM_REAL v = row[j];
            if (v != v)
                continue;
            if (labels[col] == label) {
                if (TM_FN(farther)(v, col, best_pos, pos)) {
                    best_pos = v;
                    pos = col;
                }
                if (TM_FN(farther)(v, a, pv[col], pi[col])) {
                    pv[col] = v;
                    pi[col] = a;
                }
            } else {
                if (TM_FN(nearer)(v, col, best_neg, neg)) {
                    best_neg = v;
                    neg = col;
                }
                if (TM_FN(nearer)(v, a, nv[col], ni[col])) {
                    nv[col] = v;
                    ni[col] = a;
                }
            }
        }
        pv[a] = best_pos;
        nv[a] = best_neg;
        pi[a] = pos;
        ni[a] = neg;
    }
    return TM_OK;
}

/* Merges the per-thread bests of anchors [begin, end). */
typedef struct {
    const TM_FN(symmetric_hard_ctx) *c;
    int64_t *positive, *negative;
} TM_FN(symmetric_merge_job);

static void TM_FN(symmetric_merge_range)(void *ctx, int participant, int64_t begin, int64_t end)
{
    (void)participant;
    const TM_FN(symmetric_merge_job) *job = ctx;
    const TM_FN(symmetric_hard_ctx) *c = job->c;
    for (int64_t a = begin; a < end; ++a) {
        int64_t pos = -1, neg = -1;
        TM_REAL best_pos = 0, best_neg = 0;
        for (int t = 0; t < c->nthreads; ++t) {
            const size_t at = (size_t)t * (size_t)c->n + (size_t)a;
            if (c->pos_idx[at] >= 0 && TM_FN(farther)(c->pos_val[at], c->pos_idx[at], best_pos, pos)) {
                best_pos = c->pos_val[at];
                pos = c->pos_idx[at];
            }
            if (c->neg_idx[at] >= 0 && TM_FN(nearer)(c->neg_val[at], c->neg_idx[at], best_neg, neg)) {
                best_neg = c->neg_val[at];
                neg = c->neg_idx[at];
            }
        }
        job->positive[a] = pos;
        job->negative[a] = neg;
    }
}

static int TM_FN(batch_hard_symmetric)(const TM_FN(tm_tile_problem) *problem,
                                       const int64_t *labels, int64_t *positive,
                                       int64_t *negative)
{
    const int64_t n = problem->n;
    TM_FN(symmetric_hard_ctx) ctx = {labels, n, 0, NULL, NULL, NULL, NULL};
    const TM_FN(tm_reducer) reducer = {&ctx, 0, 0, 0, TM_FN(symmetric_hard_setup), NULL,
                                       TM_FN(symmetric_hard_tile), NULL, 1};
    int status = TM_FN(tm_tile_engine)(problem, &reducer);
    if (status == TM_OK) {
        TM_FN(symmetric_merge_job) job = {&ctx, positive, negative};
        tm_parallel_for(tm_threads_for(n * ctx.nthreads), n, 1024, TM_FN(symmetric_merge_range),
                        &job);
    }
    tm_free(ctx.pos_val);
    tm_free(ctx.neg_val);
    tm_free(ctx.pos_idx);
    tm_free(ctx.neg_idx);
    return status;
}

int TM_FN(tm_batch_hard)(const TM_REAL *x, int64_t n, const TM_REAL *ref, int64_t m, int64_t d,
                         int metric, const int64_t *labels, const int64_t *ref_labels,
                         int64_t ref_offset, int64_t *positive, int64_t *negative)
{
    int status = TM_FN(validate_problem)(x, n, ref, m, d, labels, ref_labels, ref_offset);
    if (status != TM_OK)
        return status;
    if (n > 0 && (positive == NULL || negative == NULL))
        return TM_ERR_INVALID;
    if (ref == NULL) {
        const TM_FN(tm_tile_problem) problem = {x, n, NULL, n, d, metric, 0};
        return TM_FN(batch_hard_symmetric)(&problem, labels, positive, negative);
    }
    size_t bytes;
    if ((status = tm_bytes(n, 2, sizeof(TM_REAL), &bytes)) != TM_OK)
        return status;
    TM_REAL *best = tm_alloc(bytes);
    if (best == NULL)
        return TM_ERR_NOMEM;
    TM_FN(batch_hard_ctx) ctx = {{labels, ref_labels, 0, m, ref_offset},
                                 positive, negative, best, best + n};
    const TM_FN(tm_tile_problem) problem = {x, n, ref, m, d, metric, 0};
    const TM_FN(tm_reducer) reducer = {&ctx, 1, 0, 0, NULL, TM_FN(batch_hard_begin),
                                       TM_FN(batch_hard_tile), NULL, 0};
    status = TM_FN(tm_tile_engine)(&problem, &reducer);
    tm_free(best);
    return status;
}

/* ---- semi-hard (closest / random) ----------------------------------------- */

typedef struct {
    TM_FN(row_common) c;
    double margin;
    int select;
    uint64_t seed;
    TM_FN(pair_slots) slots;
} TM_FN(semi_hard_op);

/* closest: answer[r] for the positive of sorted rank r is the smallest negative
 * distance strictly above it.  One pass over the negatives records, for each
 * rank boundary k (the number of positives below the negative), the best
 * negative; a suffix minimum then serves every rank. */
/* The first largest negative: the answer when no negative is above a positive. */
static int64_t TM_FN(farthest_negative)(const tm_scored *negatives, int64_t n_neg)
{
    int64_t far = 0;
    for (int64_t q = 1; q < n_neg; ++q)
        if (negatives[q].value > negatives[far].value)
            far = q;
    return negatives[far].index;
}

#define TM_CLOSEST_FEW 8
/* closest_negatives for the few positives of a P x K row: the same answers,
 * with each negative's update written as selects on its rank's bucket (bucket
 * 0 takes the negatives below every positive and is ignored) instead of a
 * branch on the rank, which mispredicted about every other negative; and the
 * farthest negative found only when some positive needs it. */
static void TM_FN(closest_negatives_few)(const tm_scored *sorted_pos, int64_t n_pos,
                                         const tm_scored *negatives, int64_t n_neg,
                                         int64_t *answer /* n_pos */)
{
    double low[TM_CLOSEST_FEW + 1];
    int64_t at[TM_CLOSEST_FEW + 1];
    for (int64_t k = 0; k <= n_pos; ++k) {
        low[k] = 0.0;
        at[k] = -1;
    }
    for (int64_t q = 0; q < n_neg; ++q) {
        const double v = negatives[q].value;
        const int64_t k = tm_count_below(sorted_pos, n_pos, v);
        const int take = (at[k] < 0) | (v < low[k]);
        low[k] = take ? v : low[k];
        at[k] = take ? q : at[k];
    }
    /* Equal values share a bucket, so the buckets' minima never tie. */
    int64_t run = -1, far = -1;
    double run_value = 0.0;
    for (int64_t r = n_pos - 1; r >= 0; --r) {
        if (at[r + 1] >= 0 && (run < 0 || low[r + 1] < run_value)) {
            run = at[r + 1];
            run_value = low[r + 1];
        }
        if (run >= 0) {
            answer[r] = negatives[run].index;
        } else {
            if (far < 0)
                far = TM_FN(farthest_negative)(negatives, n_neg);
            answer[r] = far;
        }
    }
}

static void TM_FN(closest_negatives)(const tm_scored *sorted_pos, int64_t n_pos,
                                     const tm_scored *negatives, int64_t n_neg,
                                     tm_scored *best /* n_pos */, int64_t *answer /* n_pos */)
{
    if (n_pos <= TM_CLOSEST_FEW) {
        TM_FN(closest_negatives_few)(sorted_pos, n_pos, negatives, n_neg, answer);
        return;
    }
    for (int64_t r = 0; r < n_pos; ++r)
        best[r].index = -1;
    int64_t far = -1;
    double far_value = 0.0;
    for (int64_t q = 0; q < n_neg; ++q) {
        const double v = negatives[q].value;
        if (far < 0 || v > far_value) {
            far = negatives[q].index;
            far_value = v;
        }
        const int64_t k = tm_count_below(sorted_pos, n_pos, v);
        if (k > 0 && (best[k - 1].index < 0 || v < best[k - 1].value)) {
            best[k - 1].value = v;
            best[k - 1].index = negatives[q].index;
        }
    }
    int64_t run = -1;
    double run_value = 0.0;
    for (int64_t r = n_pos - 1; r >= 0; --r) {
        if (best[r].index >= 0 &&
            (run < 0 || best[r].value < run_value ||
             (best[r].value == run_value && best[r].index < run))) {
            run = best[r].index;
            run_value = best[r].value;
        }
        answer[r] = run >= 0 ? run : far;
    }
}

static int TM_FN(semi_hard_row)(void *op, int thread, int64_t a, int64_t row_in_block,
                                TM_REAL *dist)
{
    (void)row_in_block;
    TM_FN(semi_hard_op) *s = op;
    tm_scored *positives, *negatives;
    int64_t n_pos, n_neg;
    const int status = TM_FN(begin_pair_row)(&s->c, &s->slots, thread, a, dist, &positives,
                                             &n_pos, &negatives, &n_neg);
    if (status != TM_OK)
        return status;
    const int64_t base = s->slots.pos_offsets[a];
    int64_t *out_negative = s->slots.out_negative;
    if (n_pos == 0 || n_neg == 0)
        return TM_OK;
    if (s->select == TM_SELECT_CLOSEST) {
        /* Sort the positives by distance, remembering each one's slot. */
        int64_t *slot_of = TM_SCRATCH(&s->c.scratch, slots, thread);
        int64_t *answer = TM_SCRATCH(&s->c.scratch, answer, thread);
        for (int64_t k = 0; k < n_pos; ++k)
            positives[k].index = k;
        tm_sort_scored(positives, n_pos);
        for (int64_t r = 0; r < n_pos; ++r)
            slot_of[r] = positives[r].index;
        TM_FN(closest_negatives)(positives, n_pos, negatives, n_neg,
                                 TM_SCRATCH(&s->c.scratch, best, thread), answer);
        for (int64_t r = 0; r < n_pos; ++r)
            out_negative[base + slot_of[r]] = answer[r];
        return TM_OK;
    }
    /* random: candidates in (d_ap, d_ap + margin), in (distance, index) order. */
    tm_sort_scored(negatives, n_neg);
    for (int64_t k = 0; k < n_pos; ++k) {
        const double dap = positives[k].value;
        const int64_t lo = tm_count_at_most(negatives, n_neg, dap);
        const int64_t hi = tm_count_below(negatives, n_neg, dap + s->margin);
        if (hi > lo) {
            const int64_t pick = tm_uniform_index(s->seed, TM_FN(stream_anchor)(&s->c.lv, a),
                                                  positives[k].index, hi - lo);
            out_negative[base + k] = negatives[lo + pick].index;
        }
    }
    return TM_OK;
}

static int TM_FN(check_offsets)(const int64_t *pos_offsets, int64_t n, const int64_t *out_a,
                                const int64_t *out_b)
{
    if (n == 0)
        return TM_OK;
    if (pos_offsets == NULL || pos_offsets[0] != 0)
        return TM_ERR_INVALID;
    for (int64_t a = 0; a < n; ++a)
        if (pos_offsets[a + 1] < pos_offsets[a])
            return TM_ERR_INVALID;
    if (pos_offsets[n] > 0 && (out_a == NULL || out_b == NULL))
        return TM_ERR_INVALID;
    return TM_OK;
}

int TM_FN(tm_semi_hard)(const TM_REAL *x, int64_t n, const TM_REAL *ref, int64_t m, int64_t d,
                        int metric, const int64_t *labels, const int64_t *ref_labels,
                        int64_t ref_offset, double margin, int select, uint64_t seed,
                        const int64_t *pos_offsets, int64_t *out_positive, int64_t *out_negative)
{
    int status = TM_FN(validate_problem)(x, n, ref, m, d, labels, ref_labels, ref_offset);
    if (status == TM_OK)
        status = TM_FN(check_offsets)(pos_offsets, n, out_positive, out_negative);
    if (status != TM_OK)
        return status;
    if (select != TM_SELECT_CLOSEST && select != TM_SELECT_RANDOM)
        return TM_ERR_INVALID;
    TM_FN(semi_hard_op) s;
    memset(&s, 0, sizeof(s));
    TM_FN(row_common_init)(&s.c, labels, ref, ref_labels, m, ref_offset);
    s.margin = margin;
    s.select = select;
    s.seed = seed;
    s.slots.pos_offsets = pos_offsets;
    s.slots.out_positive = out_positive;
    s.slots.out_negative = out_negative;
    const TM_FN(tm_tile_problem) problem = {x, n, ref, m, d, metric, 0};
    const TM_FN(tm_row_op) op = {&s, TM_FN(row_common_setup), TM_FN(semi_hard_row), NULL, 0};
    status = TM_FN(tm_run_rows)(&problem, &op);
    TM_FN(scratch_free)(&s.c.scratch);
    return status;
}

/* ---- semi-hard "all" -------------------------------------------------------- */

typedef struct {
    TM_FN(row_common) c;
    double margin;
    int64_t *counts;
    const int64_t *offsets, *keep;
    int64_t n_keep;
    int64_t *out_anchor, *out_positive, *out_negative;
} TM_FN(semi_hard_all_op);

static int TM_FN(semi_hard_all_row)(void *op, int thread, int64_t a, int64_t row_in_block,
                                    TM_REAL *dist)
{
    (void)row_in_block;
    TM_FN(semi_hard_all_op) *s = op;
    tm_scored *positives, *negatives;
    int64_t n_pos, n_neg;
    TM_FN(split_for_thread)(&s->c, thread, a, dist, &positives, &n_pos, &negatives, &n_neg);
    if (s->offsets == NULL) {
        /* Counting pass: one sort of the negatives, two searches per positive. */
        tm_sort_scored(negatives, n_neg);
        int64_t count = 0;
        for (int64_t k = 0; k < n_pos; ++k) {
            const double dap = positives[k].value;
            count += tm_count_at_most(negatives, n_neg, dap + s->margin) -
                     tm_count_at_most(negatives, n_neg, dap);
        }
        s->counts[a] = count;
        return TM_OK;
    }
    /* Writing pass, in (positive index, negative index) order. */
    int64_t number = s->offsets[a];
    const int64_t end = s->offsets[a + 1];
    int64_t next_keep = 0;
    if (s->keep != NULL) {
        int64_t lo = 0, hi = s->n_keep; /* first kept triplet number >= offsets[a] */
        while (lo < hi) {
            const int64_t mid = lo + (hi - lo) / 2;
            if (s->keep[mid] < number)
                lo = mid + 1;
            else
                hi = mid;
        }
        next_keep = lo;
    }
    for (int64_t k = 0; k < n_pos; ++k) {
        const double dap = positives[k].value, upper = dap + s->margin;
        for (int64_t q = 0; q < n_neg; ++q) {
            const double v = negatives[q].value;
            if (!(v > dap && v <= upper))
                continue;
            if (number >= end)
                return TM_ERR_INVALID; /* counts changed between the passes */
            int64_t slot = number;
            if (s->keep != NULL) {
                if (next_keep >= s->n_keep || s->keep[next_keep] != number) {
                    ++number;
                    continue;
                }
                slot = next_keep++;
            }
            s->out_anchor[slot] = a;
            s->out_positive[slot] = positives[k].index;
            s->out_negative[slot] = negatives[q].index;
            ++number;
        }
    }
    return number == end ? TM_OK : TM_ERR_INVALID;
}

int TM_FN(tm_semi_hard_all)(const TM_REAL *x, int64_t n, const TM_REAL *ref, int64_t m, int64_t d,
                            int metric, const int64_t *labels, const int64_t *ref_labels,
                            int64_t ref_offset, double margin, int64_t *counts,
                            const int64_t *offsets, const int64_t *keep, int64_t n_keep,
                            int64_t *out_anchor, int64_t *out_positive, int64_t *out_negative)
{
    int status = TM_FN(validate_problem)(x, n, ref, m, d, labels, ref_labels, ref_offset);
    if (status != TM_OK)
        return status;
    if (offsets == NULL && n > 0 && counts == NULL)
        return TM_ERR_INVALID;
    if (offsets != NULL) {
        if ((status = TM_FN(check_offsets)(offsets, n, out_positive, out_negative)) != TM_OK)
            return status;
        const int64_t written = keep != NULL ? n_keep : (n > 0 ? offsets[n] : 0);
        if (written > 0 && out_anchor == NULL)
            return TM_ERR_INVALID;
        if (keep != NULL)
            for (int64_t i = 0; i < n_keep; ++i)
                if (keep[i] < 0 || (i > 0 && keep[i] <= keep[i - 1]) ||
                    (n > 0 && keep[i] >= offsets[n]))
                    return TM_ERR_INVALID;
    }
    TM_FN(semi_hard_all_op) s;
    memset(&s, 0, sizeof(s));
    TM_FN(row_common_init)(&s.c, labels, ref, ref_labels, m, ref_offset);
    s.margin = margin;
    s.counts = counts;
    s.offsets = offsets;
    s.keep = keep;
    s.n_keep = n_keep;
    s.out_anchor = out_anchor;
    s.out_positive = out_positive;
    s.out_negative = out_negative;
    const TM_FN(tm_tile_problem) problem = {x, n, ref, m, d, metric, 0};
    const TM_FN(tm_row_op) op = {&s, TM_FN(row_common_setup), TM_FN(semi_hard_all_row), NULL,
                                 0};
    status = TM_FN(tm_run_rows)(&problem, &op);
    TM_FN(scratch_free)(&s.c.scratch);
    return status;
}

/* ---- distance-weighted sampling --------------------------------------------- */

typedef struct {
    TM_FN(row_common) c;
    double cutoff, nonzero_loss_cutoff, dim;
    uint64_t seed;
    TM_FN(pair_slots) slots;
    const tm_kernel_set *kernels; /* its row kernel, vectorised for the machine */
} TM_FN(weighted_op);

static int TM_FN(weighted_row)(void *op, int thread, int64_t a, int64_t row_in_block,
                               TM_REAL *dist)
{
    (void)row_in_block;
    TM_FN(weighted_op) *s = op;
    const int64_t m = s->c.lv.m, label = s->c.lv.labels[a];
    const int64_t *ref_labels = s->c.lv.ref_labels;
    /* The positives only: the negatives are read straight from the row. */
    tm_scored *positives = TM_SCRATCH(&s->c.scratch, positives, thread);
    tm_scored *negatives = TM_SCRATCH(&s->c.scratch, negatives, thread);
    const int64_t n_pos = TM_FN(gather_positives)(&s->c.lv, a, dist, positives, m);
    const int status = TM_FN(open_pair_slots)(&s->slots, a, positives, n_pos);
    if (status != TM_OK)
        return status;
    const int64_t base = s->slots.pos_offsets[a];
    int64_t *out_negative = s->slots.out_negative;
    if (n_pos == 0)
        return TM_OK;
    /* Log-weights of the eligible negatives (another label, distance below
     * nonzero_loss_cutoff, 1 - t^2/4 > 0; never a itself, never NaN),
     * compacted from the row by the kernel set's row kernel (row_kernel_impl.h,
     * vectorised for the machine; about half of the negatives of a typical
     * batch are eligible, at random, so it never branches on one).  t and
     * 1 - t^2/4 go to scratch
     * (float32: both in the m doubles of `work`; float64: `work` and
     * `answer`); a second row kernel takes their logarithms, the log-weights
     * and their cumulative sum. */
    TM_REAL *ts = (TM_REAL *)(void *)TM_SCRATCH(&s->c.scratch, work, thread);
    TM_REAL *inners = TM_BITS == 32 ? ts + m
                                    : (TM_REAL *)(void *)TM_SCRATCH(&s->c.scratch, answer, thread);
    const tm_weighted_row_args args = {dist, ref_labels, m, label, s->cutoff,
                                       s->nonzero_loss_cutoff, ts, inners, negatives};
    const int64_t n_valid = TM_FN(kernel_weighted_row)(s->kernels)(&args);
    /* Cumulative weights relative to the largest (which contributes 1). */
    const double total = TM_FN(kernel_weighted_weights)(s->kernels)(
        ts, inners, n_valid, 2.0 - s->dim, -0.5 * (s->dim - 3.0), negatives);
    if (!(total > 0.0))
        return TM_OK; /* no eligible negative (or a degenerate dimension) */
    for (int64_t k = 0; k < n_pos; ++k) {
        const double target =
            tm_uniform01(s->seed, TM_FN(stream_anchor)(&s->c.lv, a), positives[k].index) * total;
        /* First negative whose cumulative weight exceeds the target. */
        int64_t pick = tm_count_at_most(negatives, n_valid, target);
        if (pick >= n_valid)
            pick = n_valid - 1;
        out_negative[base + k] = negatives[pick].index;
    }
    return TM_OK;
}

int TM_FN(tm_distance_weighted)(const TM_REAL *x, int64_t n, const TM_REAL *ref, int64_t m,
                                int64_t d, const int64_t *labels, const int64_t *ref_labels,
                                int64_t ref_offset, double cutoff, double nonzero_loss_cutoff,
                                uint64_t seed, const int64_t *pos_offsets, int64_t *out_positive,
                                int64_t *out_negative)
{
    int status = TM_FN(validate_problem)(x, n, ref, m, d, labels, ref_labels, ref_offset);
    if (status == TM_OK)
        status = TM_FN(check_offsets)(pos_offsets, n, out_positive, out_negative);
    if (status != TM_OK)
        return status;
    if (!(cutoff > 0.0) || !(nonzero_loss_cutoff > 0.0))
        return TM_ERR_INVALID;
    TM_FN(weighted_op) s;
    memset(&s, 0, sizeof(s));
    TM_FN(row_common_init)(&s.c, labels, ref, ref_labels, m, ref_offset);
    s.cutoff = cutoff;
    s.nonzero_loss_cutoff = nonzero_loss_cutoff;
    s.dim = (double)d;
    s.kernels = tm_active_kernels();
    s.seed = seed;
    s.slots.pos_offsets = pos_offsets;
    s.slots.out_positive = out_positive;
    s.slots.out_negative = out_negative;
    const TM_FN(tm_tile_problem) problem = {x, n, ref, m, d, TM_METRIC_EUCLIDEAN, 0};
    const TM_FN(tm_row_op) op = {&s, TM_FN(row_common_setup), TM_FN(weighted_row), NULL, 0};
    status = TM_FN(tm_run_rows)(&problem, &op);
    TM_FN(scratch_free)(&s.c.scratch);
    return status;
}
