/*
 * AVX2 + FMA micro-kernels (x86-64 only), compiled for that ISA by a pragma so
 * the rest of the extension stays baseline x86-64; chosen at run time only on
 * CPUs that report both features.
 *
 * Register blocking: a 6 x 16 float tile (6 x 8 for double) is 12 ymm
 * accumulators, plus two for the packed reference row and one broadcast,
 * out of 16 registers.
 */
#include "internal.h"

#ifdef TM_HAVE_AVX2_KERNELS

#pragma GCC push_options
#pragma GCC target("avx2,fma")
#include <immintrin.h>

#define AVX2_MR 6
#define AVX2_NR_F32 16
#define AVX2_NR_F64 8

static void dot_avx2_f32(int64_t k, const float *a, const float *b, float *c,
                         int64_t ldc)
{
    __m256 acc[AVX2_MR][2];
    for (int i = 0; i < AVX2_MR; ++i) {
        acc[i][0] = _mm256_setzero_ps();
        acc[i][1] = _mm256_setzero_ps();
    }
    for (int64_t p = 0; p < k; ++p) {
        const __m256 b0 = _mm256_loadu_ps(b + p * AVX2_NR_F32);
        const __m256 b1 = _mm256_loadu_ps(b + p * AVX2_NR_F32 + 8);
        const float *ap = a + p * AVX2_MR;
        for (int i = 0; i < AVX2_MR; ++i) {
            const __m256 ai = _mm256_broadcast_ss(ap + i);
            acc[i][0] = _mm256_fmadd_ps(ai, b0, acc[i][0]);
            acc[i][1] = _mm256_fmadd_ps(ai, b1, acc[i][1]);
        }
    }
    for (int i = 0; i < AVX2_MR; ++i) {
        _mm256_storeu_ps(c + i * ldc, acc[i][0]);
        _mm256_storeu_ps(c + i * ldc + 8, acc[i][1]);
    }
}

static void dot_avx2_f64(int64_t k, const double *a, const double *b, double *c,
                         int64_t ldc)
{
    __m256d acc[AVX2_MR][2];
    for (int i = 0; i < AVX2_MR; ++i) {
        acc[i][0] = _mm256_setzero_pd();
        acc[i][1] = _mm256_setzero_pd();
    }
    for (int64_t p = 0; p < k; ++p) {
        const __m256d b0 = _mm256_loadu_pd(b + p * AVX2_NR_F64);
        const __m256d b1 = _mm256_loadu_pd(b + p * AVX2_NR_F64 + 4);
        const double *ap = a + p * AVX2_MR;
        for (int i = 0; i < AVX2_MR; ++i) {
            const __m256d ai = _mm256_broadcast_sd(ap + i);
            acc[i][0] = _mm256_fmadd_pd(ai, b0, acc[i][0]);
            acc[i][1] = _mm256_fmadd_pd(ai, b1, acc[i][1]);
        }
    }
    for (int i = 0; i < AVX2_MR; ++i) {
        _mm256_storeu_pd(c + i * ldc, acc[i][0]);
        _mm256_storeu_pd(c + i * ldc + 4, acc[i][1]);
    }
}

#pragma GCC pop_options

static int avx2_usable(void)
{
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

const tm_kernel_set tm_kernels_avx2 = {
    "avx2",  avx2_usable,
    AVX2_MR, AVX2_NR_F32, dot_avx2_f32,
    AVX2_MR, AVX2_NR_F64, dot_avx2_f64,
};

#else
/* Not an x86-64 GCC-compatible build: nothing to compile here. */
typedef int tm_kernels_avx2_unavailable;
#endif
