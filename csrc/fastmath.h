/*
 * Small branch-free float helpers shared by the row kernels (row_kernel_impl.h)
 * and runtime.c (which exports an array form for the tests).  Integer and IEEE
 * float operations only: they vectorise, give the same bits on every
 * instruction set (-ffp-contract=off), and csrc/cuda/row_logic.cuh repeats
 * them operation for operation.
 */
#ifndef TRIPMINE_FASTMATH_H
#define TRIPMINE_FASTMATH_H

#include <stdint.h>
#include <string.h>

/* ln x = e ln 2 + ln m with x = 2^e m, m in [sqrt(1/2), sqrt(2)), and
 * ln m = 2 atanh(s) = 2 (s + s^3/3 + s^5/5 + ...), s = (m - 1) / (m + 1).
 * |s| <= 0.1716, so the series cut after s^11/11 leaves a relative error
 * below 1e-10, far under float rounding; ln 2 is split in two parts so that
 * e ln 2 is exact to float precision.  Only integer and float arithmetic in
 * a function without branches: GCC vectorises its loops.  The
 * result depends on no library, so another implementation (a GPU kernel) can
 * reproduce it operation for operation. */
static inline float tm_log_f32(float x)
{
    const int32_t sqrt_half_bits = 0x3f3504f3; /* bits of the float nearest sqrt(1/2) */
    int32_t bits;
    memcpy(&bits, &x, sizeof bits);
    /* e: how many octaves x lies above [sqrt(1/2), sqrt(2)); the shift of a
     * negative number is arithmetic with GCC and Clang. */
    const int32_t e = (bits - sqrt_half_bits) >> 23;
    const int32_t m_bits = bits - (int32_t)((uint32_t)e << 23);
    float m;
    memcpy(&m, &m_bits, sizeof m);
    const float s = (m - 1.0f) / (m + 1.0f);
    const float s2 = s * s;
    const float series =
        1.0f + s2 * (1.0f / 3 + s2 * (1.0f / 5 + s2 * (1.0f / 7 + s2 * (1.0f / 9 +
        s2 * (1.0f / 11)))));
    const float fe = (float)e;
    return fe * 0.693145752f + (fe * 1.42860677e-6f + 2.0f * s * series);
}

/* e^x for x <= 0 in float, within 2 ulp, 0 below -87 (where float's normal
 * range ends): x = k ln 2 + r with k = round(x / ln 2) (the 1.5 * 2^23
 * rounding trick; ln 2 split in two so that k ln 2 is exact), e^r by its
 * Taylor polynomial to r^7 (|r| <= 0.347: truncation below 6e-9), times 2^k
 * built in the exponent bits.  Integer and float operations only, no
 * branch: it vectorises, and a GPU kernel reproduces it operation for
 * operation (csrc/cuda/row_logic.cuh, tm_exp_nonpositive_f32). */
static inline float tm_exp_nonpositive_f32(float x)
{
    int32_t xb;
    memcpy(&xb, &x, sizeof xb);
    const float lo = -87.0f;
    int32_t lob;
    memcpy(&lob, &lo, sizeof lob);
    /* x < -87 (or NaN) -> -87 and a zero result; float compares give int masks */
    const int32_t in_range = -(int32_t)(x >= lo);
    const int32_t cb = (xb & in_range) | (lob & ~in_range);
    float c;
    memcpy(&c, &cb, sizeof c);
    const float shifter = 12582912.0f; /* 1.5 * 2^23 */
    const float kf_shifted = c * 1.44269504f + shifter;
    int32_t kb, sb;
    memcpy(&kb, &kf_shifted, sizeof kb);
    memcpy(&sb, &shifter, sizeof sb);
    const int32_t k = kb - sb;
    const float kf = kf_shifted - shifter;
    const float r = (c - kf * 0.693145752f) - kf * 1.42860677e-6f;
    const float p =
        1.0f + r * (1.0f + r * (0.5f + r * (1.0f / 6 + r * (1.0f / 24 + r * (1.0f / 120 +
        r * (1.0f / 720 + r * (1.0f / 5040)))))));
    const int32_t scale_bits = ((k + 127) << 23) & in_range;
    float scale;
    memcpy(&scale, &scale_bits, sizeof scale);
    return p * scale;
}

/* mask (all ones or zero) ? a : b, on the bits: exact, and it vectorises. */
static inline double tm_pick_double(int64_t mask, double a, double b)
{
    uint64_t ua, ub;
    memcpy(&ua, &a, sizeof ua);
    memcpy(&ub, &b, sizeof ub);
    const uint64_t bits = (ua & (uint64_t)mask) | (ub & ~(uint64_t)mask);
    double out;
    memcpy(&out, &bits, sizeof out);
    return out;
}
#endif /* TRIPMINE_FASTMATH_H */
