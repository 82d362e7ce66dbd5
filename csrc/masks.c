/*
 * Label masks.  Labels arrive as int64 class codes (the Python layer maps any
 * label type onto them), so equality of codes is equality of labels.
 */
#include "internal.h"

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
    const int threads = tm_threads_for(n / 64 + 1);
    (void)threads; /* unused without OpenMP */
    TM_OMP(parallel for num_threads(threads) schedule(static))
    for (int64_t i = 0; i < n; ++i) {
        const int64_t li = labels[i];
        uint8_t *pos = positive != NULL ? positive + i * m : NULL;
        uint8_t *neg = negative != NULL ? negative + i * m : NULL;
        for (int64_t j = 0; j < m; ++j) {
            const uint8_t same = ref_labels[j] == li;
            if (pos != NULL)
                pos[j] = same;
            if (neg != NULL)
                neg[j] = !same;
        }
        if (self && pos != NULL)
            pos[i] = 0;
    }
    return TM_OK;
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
    const int threads = tm_threads_for(n);
    (void)threads;
    TM_OMP(parallel for num_threads(threads) schedule(static))
    for (int64_t a = 0; a < n; ++a) {
        uint8_t *plane = out + a * n * n;
        const int64_t la = labels[a];
        for (int64_t p = 0; p < n; ++p) {
            uint8_t *row = plane + p * n;
            const uint8_t valid_pair = p != a && labels[p] == la;
            for (int64_t q = 0; q < n; ++q)
                row[q] = valid_pair && labels[q] != la;
        }
    }
    return TM_OK;
}
