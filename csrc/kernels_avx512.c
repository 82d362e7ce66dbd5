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
 * lanes per register, SUF the intrinsic suffix (ps/pd), BCAST the broadcast.
 * The 24 accumulators are named variables (see kernels_avx2.c on why not an
 * array). */
#define AVX512_ROW(i, c0, c1)                                                \
    do {                                                                     \
        const VEC ai = BCAST(ap[i]);                                         \
        c0 = FMADD(ai, b0, c0);                                              \
        c1 = FMADD(ai, b1, c1);                                              \
    } while (0)

#define AVX512_KERNEL(NAME, T)                                               \
    static void NAME(int64_t k, const T *a, const T *b, T *c, int64_t ldc)   \
    {                                                                        \
        VEC c00 = ZERO(), c01 = ZERO(), c10 = ZERO(), c11 = ZERO();          \
        VEC c20 = ZERO(), c21 = ZERO(), c30 = ZERO(), c31 = ZERO();          \
        VEC c40 = ZERO(), c41 = ZERO(), c50 = ZERO(), c51 = ZERO();          \
        VEC c60 = ZERO(), c61 = ZERO(), c70 = ZERO(), c71 = ZERO();          \
        VEC c80 = ZERO(), c81 = ZERO(), c90 = ZERO(), c91 = ZERO();          \
        VEC ca0 = ZERO(), ca1 = ZERO(), cb0 = ZERO(), cb1 = ZERO();          \
        for (int64_t p = 0; p < k; ++p) {                                    \
            const VEC b0 = LOAD(b + p * 2 * LANES);                          \
            const VEC b1 = LOAD(b + p * 2 * LANES + LANES);                  \
            const T *ap = a + p * AVX512_MR;                                 \
            AVX512_ROW(0, c00, c01);                                         \
            AVX512_ROW(1, c10, c11);                                         \
            AVX512_ROW(2, c20, c21);                                         \
            AVX512_ROW(3, c30, c31);                                         \
            AVX512_ROW(4, c40, c41);                                         \
            AVX512_ROW(5, c50, c51);                                         \
            AVX512_ROW(6, c60, c61);                                         \
            AVX512_ROW(7, c70, c71);                                         \
            AVX512_ROW(8, c80, c81);                                         \
            AVX512_ROW(9, c90, c91);                                         \
            AVX512_ROW(10, ca0, ca1);                                        \
            AVX512_ROW(11, cb0, cb1);                                        \
        }                                                                    \
        STORE(c + 0 * ldc, c00);  STORE(c + 0 * ldc + LANES, c01);           \
        STORE(c + 1 * ldc, c10);  STORE(c + 1 * ldc + LANES, c11);           \
        STORE(c + 2 * ldc, c20);  STORE(c + 2 * ldc + LANES, c21);           \
        STORE(c + 3 * ldc, c30);  STORE(c + 3 * ldc + LANES, c31);           \
        STORE(c + 4 * ldc, c40);  STORE(c + 4 * ldc + LANES, c41);           \
        STORE(c + 5 * ldc, c50);  STORE(c + 5 * ldc + LANES, c51);           \
        STORE(c + 6 * ldc, c60);  STORE(c + 6 * ldc + LANES, c61);           \
        STORE(c + 7 * ldc, c70);  STORE(c + 7 * ldc + LANES, c71);           \
        STORE(c + 8 * ldc, c80);  STORE(c + 8 * ldc + LANES, c81);           \
        STORE(c + 9 * ldc, c90);  STORE(c + 9 * ldc + LANES, c91);           \
        STORE(c + 10 * ldc, ca0); STORE(c + 10 * ldc + LANES, ca1);          \
        STORE(c + 11 * ldc, cb0); STORE(c + 11 * ldc + LANES, cb1);          \
    }

#define VEC __m512
#define LANES 16
#define ZERO _mm512_setzero_ps
#define BCAST _mm512_set1_ps
#define FMADD _mm512_fmadd_ps
#define LOAD _mm512_loadu_ps
#define STORE _mm512_storeu_ps
AVX512_KERNEL(dot_avx512_f32, float)
#undef VEC
#undef LANES
#undef ZERO
#undef BCAST
#undef FMADD
#undef LOAD
#undef STORE

#define VEC __m512d
#define LANES 8
#define ZERO _mm512_setzero_pd
#define BCAST _mm512_set1_pd
#define FMADD _mm512_fmadd_pd
#define LOAD _mm512_loadu_pd
#define STORE _mm512_storeu_pd
AVX512_KERNEL(dot_avx512_f64, double)
#undef VEC
#undef LANES
#undef ZERO
#undef BCAST
#undef FMADD
#undef LOAD
#undef STORE

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
};

#else
/* Not an x86-64 GCC-compatible build: nothing to compile here. */
typedef int tm_kernels_avx512_unavailable;
#endif
