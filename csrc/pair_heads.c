/*
 * The pair heads: the lifted structured loss (Song, Xiang, Jegelka & Savarese
 * 2016, "Deep Metric Learning via Lifted Structured Feature Embedding") and
 * its generalized form (Hermans, Beyer & Leibe 2017, "In Defense of the
 * Triplet Loss", section 2), with their gradients, on the dense losses' row
 * walk (dense_impl.h): per-row log-sum-exps over the distance tiles, then the
 * gradient through one coefficient product.  Never an n x m buffer, never a
 * list of (positive pair, negative) combinations; and the margin loss over
 * every triplet of the batch, as pair terms (margin_all_impl.h).
 * Instantiated for float and double.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "fastmath.h"
#include "internal.h"

/* The rows of a label array grouped by label: their indices sorted by label,
 * then index (label[q] the label of index[q]).  Lets a row find the members
 * of its class in O(log count) without a table indexed by label. */
typedef struct {
    int64_t *label, *index; /* one allocation: label then index, count each */
    int64_t count;
} tm_label_groups;

static int tm_label_pair_order(const void *pa, const void *pb)
{
    const int64_t *a = pa, *b = pb;
    if (a[0] != b[0])
        return a[0] < b[0] ? -1 : 1;
    return a[1] < b[1] ? -1 : (a[1] > b[1]);
}

static int tm_label_groups_build(const int64_t *labels, int64_t count, tm_label_groups *g)
{
    size_t bytes;
    int status = tm_bytes(count > 0 ? count : 1, 2, sizeof(int64_t), &bytes);
    g->count = count;
    if (status != TM_OK)
        return status;
    int64_t *pairs = tm_alloc(bytes);
    g->label = tm_alloc(bytes);
    if (pairs == NULL || g->label == NULL) {
        tm_free(pairs);
        return TM_ERR_NOMEM;
    }
    g->index = g->label + count;
    for (int64_t i = 0; i < count; ++i) {
        pairs[2 * i] = labels[i];
        pairs[2 * i + 1] = i;
    }
    qsort(pairs, (size_t)count, 2 * sizeof(int64_t), tm_label_pair_order);
    for (int64_t q = 0; q < count; ++q) {
        g->label[q] = pairs[2 * q];
        g->index[q] = pairs[2 * q + 1];
    }
    tm_free(pairs);
    return TM_OK;
}

/* The members of class `label`, in index order: *size of them (0 if absent). */
static const int64_t *tm_label_group(const tm_label_groups *g, int64_t label, int64_t *size)
{
    int64_t lo = 0, hi = g->count;
    while (lo < hi) {
        const int64_t mid = lo + (hi - lo) / 2;
        if (g->label[mid] < label)
            lo = mid + 1;
        else
            hi = mid;
    }
    int64_t end = lo;
    while (end < g->count && g->label[end] == label)
        ++end;
    *size = end - lo;
    return g->index + lo;
}

/* log(e^a + e^b), -inf when both are. */
static double tm_log_add(double a, double b)
{
    const double hi = a > b ? a : b, lo = a > b ? b : a;
    if (hi == -INFINITY)
        return -INFINITY;
    return hi + log1p(exp(lo - hi));
}

/* e^a / (e^a + e^b): the share of a sum that its first part holds. */
static double tm_share(double a, double b)
{
    if (a == -INFINITY)
        return 0.0;
    if (b == -INFINITY)
        return 1.0;
    const double z = a - b;
    if (z >= 0.0)
        return 1.0 / (1.0 + exp(-z));
    const double e = exp(z);
    return e / (1.0 + e);
}

#define TM_BITS 32
#include "template.h"
#include "row_tools_impl.h"
#include "dense_impl.h"
#include "lifted_impl.h"
#include "margin_all_impl.h"
#undef TM_BITS
#undef TM_SCRATCH
#define TM_BITS 64
#include "template.h"
#include "row_tools_impl.h"
#include "dense_impl.h"
#include "lifted_impl.h"
#include "margin_all_impl.h"
#undef TM_BITS
