/*
 * Pieces shared by the miners and the losses, one body for both precisions:
 * argument checks, the label view, per-thread row scratch and the split of
 * one anchor's row into positives and negatives.  Included (with static
 * linkage) by mining.c and losses.c.
 */

/* What every miner needs to know about labels.  own_offset says which
 * reference row is anchor a itself (never its positive nor its negative):
 * row a + own_offset, with own_offset 0 in self mode, the caller's ref_offset
 * when x is a slice of ref, and -1 (no such row) otherwise. */
typedef struct {
    const int64_t *labels, *ref_labels; /* ref_labels == labels in self mode */
    int self;
    int64_t m;
    int64_t own_offset;
} TM_FN(label_view);

/* The reference row that is anchor a itself, or -1. */
static inline int64_t TM_FN(own_row)(const TM_FN(label_view) *lv, int64_t a)
{
    return lv->own_offset >= 0 ? a + lv->own_offset : -1;
}

/* The anchor number that keys a's random draws (rng.h): its row in the
 * reference set when it has one, so that a slice of a batch draws what the
 * whole batch would. */
static inline int64_t TM_FN(stream_anchor)(const TM_FN(label_view) *lv, int64_t a)
{
    return lv->own_offset > 0 ? a + lv->own_offset : a;
}

/* ref_offset: -1, or (reference mode only) x[i] is ref[ref_offset + i], which
 * needs 0 <= ref_offset <= m - n and labels[i] == ref_labels[ref_offset + i]. */
static int TM_FN(validate_problem)(const TM_REAL *x, int64_t n, const TM_REAL *ref, int64_t m,
                                   int64_t d, const int64_t *labels, const int64_t *ref_labels,
                                   int64_t ref_offset)
{
    if (n < 0 || m < 0 || d < 0 || (ref == NULL && m != n))
        return TM_ERR_INVALID;
    if ((n > 0 && labels == NULL) || (ref != NULL && m > 0 && ref_labels == NULL) ||
        (n > 0 && d > 0 && x == NULL))
        return TM_ERR_INVALID;
    if (ref_offset == -1)
        return TM_OK;
    if (ref == NULL || ref_offset < 0 || ref_offset > m - n)
        return TM_ERR_INVALID;
    for (int64_t i = 0; i < n; ++i)
        if (labels[i] != ref_labels[ref_offset + i])
            return TM_ERR_INVALID;
    return TM_OK;
}

/* ---- per-thread scratch for row operations -------------------------------- */

/* Each buffer holds m items per thread: O(threads * m) memory in all. */
typedef struct {
    tm_scored *positives, *negatives, *best;
    int64_t *slots, *answer;
    double *work;
    int64_t m;
} TM_FN(row_scratch);

static int TM_FN(scratch_alloc)(TM_FN(row_scratch) *s, int nthreads, int64_t m)
{
    size_t scored_bytes, index_bytes;
    int status;
    s->m = m > 0 ? m : 1;
    if ((status = tm_bytes((int64_t)nthreads, s->m, sizeof(tm_scored), &scored_bytes)) != TM_OK ||
        (status = tm_bytes((int64_t)nthreads, s->m, sizeof(int64_t), &index_bytes)) != TM_OK)
        return status;
    s->positives = tm_alloc(scored_bytes);
    s->negatives = tm_alloc(scored_bytes);
    s->best = tm_alloc(scored_bytes);
    s->slots = tm_alloc(index_bytes);
    s->answer = tm_alloc(index_bytes);
    s->work = tm_alloc(index_bytes); /* sizeof(double) == sizeof(int64_t) */
    if (s->positives == NULL || s->negatives == NULL || s->best == NULL || s->slots == NULL ||
        s->answer == NULL || s->work == NULL)
        return TM_ERR_NOMEM;
    return TM_OK;
}

static void TM_FN(scratch_free)(TM_FN(row_scratch) *s)
{
    tm_free(s->positives);
    tm_free(s->negatives);
    tm_free(s->best);
    tm_free(s->slots);
    tm_free(s->answer);
    tm_free(s->work);
}

/* This thread's slice of a scratch buffer. */
#define TM_SCRATCH(s, field, thread) ((s)->field + (size_t)(thread) * (size_t)(s)->m)

/* Splits anchor a's row into positives and negatives (index order); NaN
 * distances are kept for positives (their pair exists) and dropped for
 * negatives (they can never be chosen). */
static void TM_FN(split_row)(const TM_FN(label_view) *lv, int64_t a, const TM_REAL *dist,
                             tm_scored *positives, int64_t *n_pos, tm_scored *negatives,
                             int64_t *n_neg)
{
    const int64_t label = lv->labels[a], own = TM_FN(own_row)(lv, a);
    int64_t np = 0, nn = 0;
    for (int64_t j = 0; j < lv->m; ++j) {
        if (j == own)
            continue;
        const double v = (double)dist[j];
        if (lv->ref_labels[j] == label) {
            positives[np].value = v;
            positives[np].index = j;
            ++np;
        } else if (v == v) {
            negatives[nn].value = v;
            negatives[nn].index = j;
            ++nn;
        }
    }
    *n_pos = np;
    *n_neg = nn;
}


#ifndef TM_LABEL_CHUNK
#define TM_LABEL_CHUNK 64
#endif

/* Anchor a's positives (index order, NaN distances kept, as split_row), at
 * most `limit` of them: returns how many were stored, `limit` meaning "at
 * least that many". */
static inline int64_t TM_FN(gather_positives)(const TM_FN(label_view) *lv, int64_t a,
                                              const TM_REAL *dist, tm_scored *positives,
                                              int64_t limit)
{
    const int64_t label = lv->labels[a], own = TM_FN(own_row)(lv, a), m = lv->m;
    const int64_t *ref_labels = lv->ref_labels;
    int64_t np = 0;
    /* Positives are rare (K - 1 in a row of a P x K batch): a chunk is first
     * tested as a whole, with a branch-free loop the compiler vectorises, and
     * only a chunk holding the label is walked element by element. */
    for (int64_t j0 = 0; j0 < m && np < limit; j0 += TM_LABEL_CHUNK) {
        const int64_t end = m - j0 < TM_LABEL_CHUNK ? m : j0 + TM_LABEL_CHUNK;
        /* bit 63 of (labels xor label) - 1: set for an equal label (and for
         * labels differing in bit 63, which the walk below then rejects);
         * subtraction and shift, where baseline x86-64 has no 64-bit compare */
        uint64_t any = 0;
        for (int64_t j = j0; j < end; ++j)
            any |= ((uint64_t)(ref_labels[j] ^ label) - 1) >> 63;
        if (!any)
            continue;
        for (int64_t j = j0; j < end && np < limit; ++j) {
            if (ref_labels[j] != label || j == own)
                continue;
            positives[np].value = (double)dist[j];
            positives[np].index = j;
            ++np;
        }
    }
    return np;
}

/* What every row operation starts with (as its first member, so that one
 * setup serves them all): which pairs are positives, and per-thread scratch. */
typedef struct {
    TM_FN(label_view) lv;
    TM_FN(row_scratch) scratch;
} TM_FN(row_common);

static inline void TM_FN(row_common_init)(TM_FN(row_common) *c, const int64_t *labels,
                                   const TM_REAL *ref, const int64_t *ref_labels, int64_t m,
                                   int64_t ref_offset)
{
    c->lv.labels = labels;
    c->lv.ref_labels = ref == NULL ? labels : ref_labels;
    c->lv.self = ref == NULL;
    c->lv.m = m;
    c->lv.own_offset = ref == NULL ? 0 : ref_offset;
}

static inline int TM_FN(row_common_setup)(void *op, int nthreads, int64_t block_rows)
{
    (void)block_rows;
    TM_FN(row_common) *c = op;
    return TM_FN(scratch_alloc)(&c->scratch, nthreads, c->lv.m);
}

/* split_row into this thread's scratch. */
static inline void TM_FN(split_for_thread)(TM_FN(row_common) *c, int thread, int64_t a,
                                           const TM_REAL *dist, tm_scored **positives,
                                           int64_t *n_pos, tm_scored **negatives, int64_t *n_neg)
{
    *positives = TM_SCRATCH(&c->scratch, positives, thread);
    *negatives = TM_SCRATCH(&c->scratch, negatives, thread);
    TM_FN(split_row)(&c->lv, a, dist, *positives, n_pos, *negatives, n_neg);
}

/* Where per-positive-pair miners write: anchor a owns slots
 * [pos_offsets[a], pos_offsets[a + 1]), one per positive in index order. */
typedef struct {
    const int64_t *pos_offsets;
    int64_t *out_positive, *out_negative;
} TM_FN(pair_slots);

/* Gives each of anchor a's positives its slot, with no negative chosen yet. */
static inline int TM_FN(open_pair_slots)(const TM_FN(pair_slots) *slots, int64_t a,
                                         const tm_scored *positives, int64_t n_pos)
{
    const int64_t base = slots->pos_offsets[a];
    if (slots->pos_offsets[a + 1] - base != n_pos)
        return TM_ERR_INVALID;
    for (int64_t k = 0; k < n_pos; ++k) {
        slots->out_positive[base + k] = positives[k].index;
        slots->out_negative[base + k] = -1;
    }
    return TM_OK;
}

/* The common start of a per-pair miner's row: split it, and give each
 * positive of anchor a its slot with no negative chosen yet. */
static inline int TM_FN(begin_pair_row)(TM_FN(row_common) *c, const TM_FN(pair_slots) *slots,
                                        int thread, int64_t a, const TM_REAL *dist,
                                        tm_scored **positives, int64_t *n_pos,
                                        tm_scored **negatives, int64_t *n_neg)
{
    TM_FN(split_for_thread)(c, thread, a, dist, positives, n_pos, negatives, n_neg);
    return TM_FN(open_pair_slots)(slots, a, *positives, *n_pos);
}
