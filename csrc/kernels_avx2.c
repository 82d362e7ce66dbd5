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

/* The twelve accumulators are named variables, not an array: GCC keeps an
 * array of vectors in memory and stores it on every iteration, which cost a
 * factor of three. */
#define AVX2_ROW_F32(i, c0, c1)                                                \
    do {                                                                     \
        const __m256 ai = _mm256_broadcast_ss(ap + (i));                     \
        c0 = _mm256_fmadd_ps(ai, b0, c0);                                    \
        c1 = _mm256_fmadd_ps(ai, b1, c1);                                    \
    } while (0)

static void dot_avx2_f32(int64_t k, const float *a, const float *b, float *c,
                         int64_t ldc)
{
    __m256 c00 = _mm256_setzero_ps(), c01 = _mm256_setzero_ps();
    __m256 c10 = _mm256_setzero_ps(), c11 = _mm256_setzero_ps();
    __m256 c20 = _mm256_setzero_ps(), c21 = _mm256_setzero_ps();
    __m256 c30 = _mm256_setzero_ps(), c31 = _mm256_setzero_ps();
    __m256 c40 = _mm256_setzero_ps(), c41 = _mm256_setzero_ps();
    __m256 c50 = _mm256_setzero_ps(), c51 = _mm256_setzero_ps();
    for (int64_t p = 0; p < k; ++p) {
        const __m256 b0 = _mm256_loadu_ps(b + p * AVX2_NR_F32);
        const __m256 b1 = _mm256_loadu_ps(b + p * AVX2_NR_F32 + 8);
        const float *ap = a + p * AVX2_MR;
        AVX2_ROW_F32(0, c00, c01);
        AVX2_ROW_F32(1, c10, c11);
        AVX2_ROW_F32(2, c20, c21);
        AVX2_ROW_F32(3, c30, c31);
        AVX2_ROW_F32(4, c40, c41);
        AVX2_ROW_F32(5, c50, c51);
    }
    _mm256_storeu_ps(c + 0 * ldc, c00);
    _mm256_storeu_ps(c + 0 * ldc + 8, c01);
    _mm256_storeu_ps(c + 1 * ldc, c10);
    _mm256_storeu_ps(c + 1 * ldc + 8, c11);
    _mm256_storeu_ps(c + 2 * ldc, c20);
    _mm256_storeu_ps(c + 2 * ldc + 8, c21);
    _mm256_storeu_ps(c + 3 * ldc, c30);
    _mm256_storeu_ps(c + 3 * ldc + 8, c31);
    _mm256_storeu_ps(c + 4 * ldc, c40);
    _mm256_storeu_ps(c + 4 * ldc + 8, c41);
    _mm256_storeu_ps(c + 5 * ldc, c50);
    _mm256_storeu_ps(c + 5 * ldc + 8, c51);
}

#define AVX2_ROW_F64(i, c0, c1)                                                \
    do {                                                                     \
        const __m256d ai = _mm256_broadcast_sd(ap + (i));                    \
        c0 = _mm256_fmadd_pd(ai, b0, c0);                                    \
        c1 = _mm256_fmadd_pd(ai, b1, c1);                                    \
    } while (0)

static void dot_avx2_f64(int64_t k, const double *a, const double *b, double *c,
                         int64_t ldc)
{
    __m256d c00 = _mm256_setzero_pd(), c01 = _mm256_setzero_pd();
    __m256d c10 = _mm256_setzero_pd(), c11 = _mm256_setzero_pd();
    __m256d c20 = _mm256_setzero_pd(), c21 = _mm256_setzero_pd();
    __m256d c30 = _mm256_setzero_pd(), c31 = _mm256_setzero_pd();
    __m256d c40 = _mm256_setzero_pd(), c41 = _mm256_setzero_pd();
    __m256d c50 = _mm256_setzero_pd(), c51 = _mm256_setzero_pd();
    for (int64_t p = 0; p < k; ++p) {
        const __m256d b0 = _mm256_loadu_pd(b + p * AVX2_NR_F64);
        const __m256d b1 = _mm256_loadu_pd(b + p * AVX2_NR_F64 + 4);
        const double *ap = a + p * AVX2_MR;
        AVX2_ROW_F64(0, c00, c01);
        AVX2_ROW_F64(1, c10, c11);
        AVX2_ROW_F64(2, c20, c21);
        AVX2_ROW_F64(3, c30, c31);
        AVX2_ROW_F64(4, c40, c41);
        AVX2_ROW_F64(5, c50, c51);
    }
    _mm256_storeu_pd(c + 0 * ldc, c00);
    _mm256_storeu_pd(c + 0 * ldc + 4, c01);
    _mm256_storeu_pd(c + 1 * ldc, c10);
    _mm256_storeu_pd(c + 1 * ldc + 4, c11);
    _mm256_storeu_pd(c + 2 * ldc, c20);
    _mm256_storeu_pd(c + 2 * ldc + 4, c21);
    _mm256_storeu_pd(c + 3 * ldc, c30);
    _mm256_storeu_pd(c + 3 * ldc + 4, c31);
    _mm256_storeu_pd(c + 4 * ldc, c40);
    _mm256_storeu_pd(c + 4 * ldc + 4, c41);
    _mm256_storeu_pd(c + 5 * ldc, c50);
    _mm256_storeu_pd(c + 5 * ldc + 4, c51);
}

/* The row kernels, vectorised for this instruction set. */
#define TM_BITS 32
#include "template.h"
#include "row_kernel_impl.h"
#undef TM_BITS
#define TM_BITS 64
#include "template.h"
#include "row_kernel_impl.h"
#undef TM_BITS

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
    batch_all_row_kernel_f32, batch_all_row_kernel_f64,
    weighted_row_kernel_f32, weighted_row_kernel_f64,
    weighted_weights_kernel_f32, weighted_weights_kernel_f64,
    gram_row_kernel_f32, gram_row_kernel_f64,
    clamp_row_kernel_f32, clamp_row_kernel_f64,
    softmax_max_kernel_f32, softmax_max_kernel_f64,
    softmax_exp_kernel_f32, softmax_exp_kernel_f64,
    softmax_grad_kernel_f32, softmax_grad_kernel_f64,
    pack_panel_kernel_f32, pack_panel_kernel_f64,
    center_row_kernel_f32, center_row_kernel_f64,
    center_acc_kernel_f32, center_acc_kernel_f64,
    lifted_lse_kernel_f32, lifted_lse_kernel_f64,
    lifted_beta_kernel_f32, lifted_beta_kernel_f64,
};

#else
/* Not an x86-64 GCC-compatible build: nothing to compile here. */
typedef int tm_kernels_avx2_unavailable;
#endif
