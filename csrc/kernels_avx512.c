/*
 * AVX-512F micro-kernels (x86-64 only), compiled for that ISA by a pragma so
 * the rest of the extension stays baseline x86-64; chosen at run time only on
 * CPUs (and operating systems) that report AVX-512F.
 *
 * Register blocking: a 12 x 32 float tile (12 x 16 for double) is 24 zmm
 * accumulators, plus two for the packed reference row and one broadcast, out
 * of 32 registers.  MR = 12 divides the engine's 192-row anchor blocks.
 *
 * Testing without AVX-512 hardware: defining TM_AVX512_EMULATE compiles this
 * same source against SIMDe's portable AVX-512 implementation (simde/x86/
 * avx512.h, https://github.com/simd-everywhere/simde) and reports the set
 * usable everywhere; tests/test_avx512.py builds the whole C core that way
 * and compares every operation with the generic kernels.  Release builds
 * never define it.
 */
#include "internal.h"

#if defined(TM_HAVE_AVX512_KERNELS)

#ifdef TM_AVX512_EMULATE
#define SIMDE_ENABLE_NATIVE_ALIASES
#include <simde/x86/avx512.h>
#else
#pragma GCC push_options
#pragma GCC target("avx512f")
#include <immintrin.h>
#endif

#define AVX512_MR 12
#define AVX512_NR_F32 32
#define AVX512_NR_F64 16

/* One kernel body for both precisions: VEC is the register type, LANES the
 * lanes per register, SUF the intrinsic suffix (ps or pd).  The 24
 * accumulators are named variables (see kernels_avx2.c on why not an array). */
#define AVX512_ROW(VEC, SUF, i, c0, c1)                                      \
    do {                                                                     \
        const VEC ai = _mm512_set1_##SUF(ap[i]);                             \
        c0 = _mm512_fmadd_##SUF(ai, b0, c0);                                 \
        c1 = _mm512_fmadd_##SUF(ai, b1, c1);                                 \
    } while (0)

#define AVX512_STORE2(SUF, LANES, i, c0, c1)                                 \
    do {                                                                     \
        _mm512_storeu_##SUF(c + (i) * ldc, c0);                              \
        _mm512_storeu_##SUF(c + (i) * ldc + (LANES), c1);                    \
    } while (0)

#define AVX512_KERNEL(NAME, T, VEC, LANES, SUF)                              \
    static void NAME(int64_t k, const T *a, const T *b, T *c, int64_t ldc)   \
    {                                                                        \
        VEC c00 = _mm512_setzero_##SUF(), c01 = c00, c10 = c00, c11 = c00;   \
        VEC c20 = c00, c21 = c00, c30 = c00, c31 = c00, c40 = c00;           \
        VEC c41 = c00, c50 = c00, c51 = c00, c60 = c00, c61 = c00;           \
        VEC c70 = c00, c71 = c00, c80 = c00, c81 = c00, c90 = c00;           \
        VEC c91 = c00, ca0 = c00, ca1 = c00, cb0 = c00, cb1 = c00;           \
        for (int64_t p = 0; p < k; ++p) {                                    \
            const VEC b0 = _mm512_loadu_##SUF(b + p * 2 * (LANES));          \
            const VEC b1 = _mm512_loadu_##SUF(b + p * 2 * (LANES) + (LANES)); \
            const T *ap = a + p * AVX512_MR;                                 \
            AVX512_ROW(VEC, SUF, 0, c00, c01);                               \
            AVX512_ROW(VEC, SUF, 1, c10, c11);                               \
            AVX512_ROW(VEC, SUF, 2, c20, c21);                               \
            AVX512_ROW(VEC, SUF, 3, c30, c31);                               \
            AVX512_ROW(VEC, SUF, 4, c40, c41);                               \
            AVX512_ROW(VEC, SUF, 5, c50, c51);                               \
            AVX512_ROW(VEC, SUF, 6, c60, c61);                               \
            AVX512_ROW(VEC, SUF, 7, c70, c71);                               \
            AVX512_ROW(VEC, SUF, 8, c80, c81);                               \
            AVX512_ROW(VEC, SUF, 9, c90, c91);                               \
            AVX512_ROW(VEC, SUF, 10, ca0, ca1);                              \
            AVX512_ROW(VEC, SUF, 11, cb0, cb1);                              \
        }                                                                    \
        AVX512_STORE2(SUF, LANES, 0, c00, c01);                              \
        AVX512_STORE2(SUF, LANES, 1, c10, c11);                              \
        AVX512_STORE2(SUF, LANES, 2, c20, c21);                              \
        AVX512_STORE2(SUF, LANES, 3, c30, c31);                              \
        AVX512_STORE2(SUF, LANES, 4, c40, c41);                              \
        AVX512_STORE2(SUF, LANES, 5, c50, c51);                              \
        AVX512_STORE2(SUF, LANES, 6, c60, c61);                              \
        AVX512_STORE2(SUF, LANES, 7, c70, c71);                              \
        AVX512_STORE2(SUF, LANES, 8, c80, c81);                              \
        AVX512_STORE2(SUF, LANES, 9, c90, c91);                              \
        AVX512_STORE2(SUF, LANES, 10, ca0, ca1);                             \
        AVX512_STORE2(SUF, LANES, 11, cb0, cb1);                             \
    }

AVX512_KERNEL(dot_avx512_f32, float, __m512, 16, ps)
AVX512_KERNEL(dot_avx512_f64, double, __m512d, 8, pd)

/* The row kernels, vectorised for this instruction set. */
#define TM_BITS 32
#include "template.h"
#include "row_kernel_impl.h"
#undef TM_BITS
#define TM_BITS 64
#include "template.h"
#include "row_kernel_impl.h"
#undef TM_BITS

/* The heads' pack of W (tm_pack_panel_kernel) for full panels: feature p of
 * the panel's rows by two gathers, scaled and stored as one k-row.  The same
 * multiplications as the portable kernel, which serves partial panels. */
static void pack_panel_avx512_f32(const void *src_v, int64_t ld, const void *scale_v,
                                  int64_t rows, int64_t d, int64_t nr, void *dst_v)
{
#ifndef TM_AVX512_EMULATE /* SIMDe has no gathers: the emulated build packs portably */
    if (nr == 2 * 16 && rows == nr && ld < INT32_MAX / nr) {
        const float *lo = (const float *)src_v, *hi = lo + 16 * ld;
        const float *scale = (const float *)scale_v;
        float *dst = (float *)dst_v;
        const __m512i idx = _mm512_mullo_epi32(
            _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
            _mm512_set1_epi32((int)ld));
        const __m512 f0 = _mm512_loadu_ps(scale), f1 = _mm512_loadu_ps(scale + 16);
        for (int64_t p = 0; p < d; ++p) {
            const __m512 a = _mm512_i32gather_ps(idx, lo + p, 4);
            const __m512 b = _mm512_i32gather_ps(idx, hi + p, 4);
            _mm512_storeu_ps(dst + p * 32, _mm512_mul_ps(a, f0));
            _mm512_storeu_ps(dst + p * 32 + 16, _mm512_mul_ps(b, f1));
        }
        return;
    }
#endif
    pack_panel_kernel_f32(src_v, ld, scale_v, rows, d, nr, dst_v);
}

static void pack_panel_avx512_f64(const void *src_v, int64_t ld, const void *scale_v,
                                  int64_t rows, int64_t d, int64_t nr, void *dst_v)
{
#ifndef TM_AVX512_EMULATE
    if (nr == 2 * 8 && rows == nr && ld < INT32_MAX / nr) {
        const double *lo = (const double *)src_v, *hi = lo + 8 * ld;
        const double *scale = (const double *)scale_v;
        double *dst = (double *)dst_v;
        const __m256i idx = _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
                                               _mm256_set1_epi32((int)ld));
        const __m512d f0 = _mm512_loadu_pd(scale), f1 = _mm512_loadu_pd(scale + 8);
        for (int64_t p = 0; p < d; ++p) {
            const __m512d a = _mm512_i32gather_pd(idx, lo + p, 8);
            const __m512d b = _mm512_i32gather_pd(idx, hi + p, 8);
            _mm512_storeu_pd(dst + p * 16, _mm512_mul_pd(a, f0));
            _mm512_storeu_pd(dst + p * 16 + 8, _mm512_mul_pd(b, f1));
        }
        return;
    }
#endif
    pack_panel_kernel_f64(src_v, ld, scale_v, rows, d, nr, dst_v);
}

#ifndef TM_AVX512_EMULATE
#pragma GCC pop_options
#endif

static int avx512_usable(void)
{
#ifdef TM_AVX512_EMULATE
    return 1;
#else
    /* __builtin_cpu_supports checks the CPUID bit; GCC's runtime also
     * requires the OS to save the zmm state (XCR0) before reporting it. */
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f");
#endif
}

const tm_kernel_set tm_kernels_avx512 = {
    "avx512",  avx512_usable,
    AVX512_MR, AVX512_NR_F32, dot_avx512_f32,
    AVX512_MR, AVX512_NR_F64, dot_avx512_f64,
    batch_all_row_kernel_f32, batch_all_row_kernel_f64,
    weighted_row_kernel_f32, weighted_row_kernel_f64,
    weighted_weights_kernel_f32, weighted_weights_kernel_f64,
    gram_row_kernel_f32, gram_row_kernel_f64,
    clamp_row_kernel_f32, clamp_row_kernel_f64,
    softmax_max_kernel_f32, softmax_max_kernel_f64,
    softmax_exp_kernel_f32, softmax_exp_kernel_f64,
    softmax_grad_kernel_f32, softmax_grad_kernel_f64,
    pack_panel_avx512_f32, pack_panel_avx512_f64,
    center_row_kernel_f32, center_row_kernel_f64,
    center_acc_kernel_f32, center_acc_kernel_f64,
    lifted_lse_kernel_f32, lifted_lse_kernel_f64,
    lifted_beta_kernel_f32, lifted_beta_kernel_f64,
};

#else
/* Not an x86-64 GCC-compatible build: nothing to compile here. */
typedef int tm_kernels_avx512_unavailable;
#endif
