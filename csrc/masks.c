/*
 * Label masks.  Labels arrive as int64 class codes (the Python layer maps any
 * label type onto them), so equality of codes is equality of labels.
 */
#include "internal.h"

typedef struct {
    const int64_t *labels, *ref_labels;
    int64_t m;
    int self;
    uint8_t *positive, *negative;
} pair_mask_job;

static void pair_mask_rows(void *ctx, int participant, int64_t begin, int64_t end)
{
    (void)participant;
    const pair_mask_job *job = ctx;
    const int64_t m = job->m;
    for (int64_t i = begin; i < end; ++i) {
        const int64_t li = job->labels[i];
        uint8_t *pos = job->positive != NULL ? job->positive + i * m : NULL;
        uint8_t *neg = job->negative != NULL ? job->negative + i * m : NULL;
        for (int64_t j = 0; j < m; ++j) {
            const uint8_t same = job->ref_labels[j] == li;
            if (pos != NULL)
                pos[j] = same;
            if (neg != NULL)
                neg[j] = !same;
        }
        if (job->self && pos != NULL)
            pos[i] = 0;
    }
}

int tm_pair_masks(const int64_t *labels, int64_t n, const int64_t *ref_labels,
                  int64_t m, uint8_t *positive, uint8_t *negative)
{
    size_t bytes;
    const int self = ref_labels == NULL;
    if (self)
        ref_labels = labels;
    int status = tm_bytes(n, m, 1, &bytes);
    if (status != TM_OK)
        return status;
    if ((self && m != n) || (bytes > 0 && labels == NULL))
        return TM_ERR_INVALID;
    pair_mask_job job = {labels, ref_labels, m, self, positive, negative};
    tm_parallel_for(tm_threads_for(n / 64 + 1), n, 64, pair_mask_rows, &job);
    return TM_OK;
}

typedef struct {
    const int64_t *labels;
    int64_t n;
    uint8_t *out;
} triplet_mask_job;

static void triplet_mask_planes(void *ctx, int participant, int64_t begin, int64_t end)
{
    (void)participant;
    const triplet_mask_job *job = ctx;
    const int64_t n = job->n;
    for (int64_t a = begin; a < end; ++a) {
        uint8_t *plane = job->out + a * n * n;
        const int64_t la = job->labels[a];
        for (int64_t p = 0; p < n; ++p) {
            uint8_t *row = plane + p * n;
            const uint8_t valid_pair = p != a && job->labels[p] == la;
            for (int64_t q = 0; q < n; ++q)
                row[q] = valid_pair && job->labels[q] != la;
        }
    }
}

int tm_triplet_mask(const int64_t *labels, int64_t n, uint8_t *out)
{
    size_t plane_bytes, bytes;
    int status = tm_bytes(n, n, 1, &plane_bytes);
    if (status == TM_OK)
        status = tm_bytes((int64_t)plane_bytes, n, 1, &bytes);
    if (status != TM_OK)
        return status;
    if (bytes > 0 && (labels == NULL || out == NULL))
        return TM_ERR_INVALID;
    triplet_mask_job job = {labels, n, out};
    tm_parallel_for(tm_threads_for(n), n, 1, triplet_mask_planes, &job);
    return TM_OK;
}
