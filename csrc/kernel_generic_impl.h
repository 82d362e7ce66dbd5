/*
 * Portable reference micro-kernel, one body for both precisions (template.h).
 * The accumulators are a small local array the compiler keeps in vector
 * registers; the build uses -ffp-contract=off so this path rounds the same
 * way on every machine.  The SIMD kernels are tested against this one.
 */
#define TM_GENERIC_MR 4
#define TM_GENERIC_NR 8

static void TM_FN(dot_generic)(int64_t k, const TM_REAL *a, const TM_REAL *b,
                               TM_REAL *c, int64_t ldc)
{
    TM_REAL acc[TM_GENERIC_MR][TM_GENERIC_NR];
    for (int i = 0; i < TM_GENERIC_MR; ++i)
        for (int j = 0; j < TM_GENERIC_NR; ++j)
            acc[i][j] = 0;
    for (int64_t p = 0; p < k; ++p) {
        const TM_REAL *ap = a + p * TM_GENERIC_MR;
        const TM_REAL *bp = b + p * TM_GENERIC_NR;
        for (int i = 0; i < TM_GENERIC_MR; ++i)
            for (int j = 0; j < TM_GENERIC_NR; ++j)
                acc[i][j] += ap[i] * bp[j];
    }
    for (int i = 0; i < TM_GENERIC_MR; ++i)
        for (int j = 0; j < TM_GENERIC_NR; ++j)
            c[i * ldc + j] = acc[i][j];
}
