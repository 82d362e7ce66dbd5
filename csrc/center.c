/*
 * Center loss (Wen et al. 2016, "A Discriminative Feature Learning Approach
 * for Deep Face Recognition"; tripmine.h, "center loss"): the loss with its
 * gradients, and the paper's center update.  O(n d): no tile, no n x c
 * distance matrix (which some ports build to read off its diagonal).
 *
 * Both walk the samples grouped by class (a counting sort, stable: sample
 * order within a class), so a class's sums always run in the same order, on
 * one thread, in double: results do not depend on the thread count.
 * Instantiated for float and double (center_impl.h).
 */
#include <math.h>
#include <string.h>

#include "internal.h"

/* Below about this many elements a call is not worth a thread team. */
#ifndef TM_CENTER_MIN_PARALLEL_WORK
#define TM_CENTER_MIN_PARALLEL_WORK (1 << 16)
#endif

/* The samples of each class, in sample order: class j owns
 * order[start[j] .. start[j + 1]).  present lists the classes with samples,
 * in increasing order; returns how many, or -1 when out of memory. */
typedef struct {
    int64_t *start, *order, *present;
} tm_class_groups;

static int64_t tm_group_by_class(const int64_t *labels, int64_t n, int64_t c,
                                 tm_class_groups *g)
{
    g->start = tm_alloc((size_t)(c + 1) * sizeof(int64_t));
    g->order = tm_alloc((size_t)n * sizeof(int64_t));
    g->present = tm_alloc((size_t)(n < c ? n : c) * sizeof(int64_t));
    if (g->start == NULL || g->order == NULL || g->present == NULL)
        return -1;
    memset(g->start, 0, (size_t)(c + 1) * sizeof(int64_t));
    for (int64_t i = 0; i < n; ++i)
        ++g->start[labels[i] + 1];
    int64_t count = 0;
    for (int64_t j = 0; j < c; ++j) {
        if (g->start[j + 1] > 0)
            g->present[count++] = j;
        g->start[j + 1] += g->start[j];
    }
    /* Fill by a running cursor per class (start[j] moves to start[j + 1], then
     * is restored from its neighbour). */
    for (int64_t i = 0; i < n; ++i)
        g->order[g->start[labels[i]]++] = i;
    for (int64_t j = c; j > 0; --j)
        g->start[j] = g->start[j - 1];
    g->start[0] = 0;
    return count;
}

static void tm_free_groups(tm_class_groups *g)
{
    tm_free(g->start);
    tm_free(g->order);
    tm_free(g->present);
}

static int tm_labels_valid(const int64_t *labels, int64_t n, int64_t c)
{
    for (int64_t i = 0; i < n; ++i)
        if (labels[i] < 0 || labels[i] >= c)
            return 0;
    return 1;
}

#define TM_BITS 32
#include "template.h"
#include "center_impl.h"
#undef TM_BITS
#define TM_BITS 64
#include "template.h"
#include "center_impl.h"
#undef TM_BITS
