/*
 * Per-row and per-pair logic of the CUDA kernels, written as plain C++ so the
 * same text compiles three ways: by NVRTC (cupy.RawModule, at first use), by
 * nvcc (tests/test_cuda_compile.py) and by a host C++ compiler through
 * tests/cuda_shim.cpp, which checks it against the C core on the CPU.
 *
 * Everything here mirrors a piece of csrc/ operation for operation, so that a
 * seeded GPU call draws the same numbers and picks the same rows:
 *   tm_mix64 / tm_uniform01 / tm_uniform_index   <- csrc/rng.h
 *   tm_log_f32                                   <- tm_log_array_f32 (runtime.c)
 *   tm_exp_nonpositive_f32                       <- row_kernel_impl.h
 *   count_at_most / count_below                  <- tm_count_* on (value, index) lists
 *   pair_coefficients, softplus, sigmoid         <- losses_impl.h
 * No standard header is needed (NVRTC has none): the integer types are the
 * built-in ones, and the math functions are CUDA's or <cmath>'s (the shim
 * includes it first).
 */
#ifndef TRIPMINE_ROW_LOGIC_CUH
#define TRIPMINE_ROW_LOGIC_CUH

#ifdef __CUDACC__
#define TM_DEVICE __device__ __forceinline__
#else
#define TM_DEVICE inline
#endif

typedef unsigned long long tm_u64;
typedef long long tm_i64;

enum { TM_EUCLIDEAN = 0, TM_SQEUCLIDEAN = 1, TM_COSINE = 2 };

/* ---- counter-based random numbers (csrc/rng.h) ----------------------------- */

TM_DEVICE tm_u64 tm_mix64(tm_u64 z)
{
    z += 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

TM_DEVICE double tm_uniform01(tm_u64 seed, tm_i64 anchor, tm_i64 draw)
{
    tm_u64 z = tm_mix64(seed);
    z = tm_mix64(z ^ (tm_u64)anchor);
    z = tm_mix64(z ^ (tm_u64)draw);
    return (double)(z >> 11) * (1.0 / 9007199254740992.0);
}

TM_DEVICE tm_i64 tm_uniform_index(tm_u64 seed, tm_i64 anchor, tm_i64 draw, tm_i64 count)
{
    const tm_i64 k = (tm_i64)(tm_uniform01(seed, anchor, draw) * (double)count);
    return k < count ? k : count - 1;
}

/* ---- float32 logarithm of tm_log_array_f32, bit for bit ---------------------
 * Only integer and IEEE float operations; the kernels are compiled with
 * --fmad=false and IEEE division so that no step is fused or approximated. */

TM_DEVICE float tm_log_f32(float value)
{
    union { float f; int i; } in, mant;
    in.f = value;
    const int sqrt_half_bits = 0x3f3504f3;
    const int e = (in.i - sqrt_half_bits) >> 23;
    mant.i = in.i - (int)((unsigned)e << 23);
    const float m = mant.f;
    const float s = (m - 1.0f) / (m + 1.0f);
    const float s2 = s * s;
    const float series =
        1.0f + s2 * (1.0f / 3 + s2 * (1.0f / 5 + s2 * (1.0f / 7 + s2 * (1.0f / 9 +
        s2 * (1.0f / 11)))));
    const float fe = (float)e;
    return fe * 0.693145752f + (fe * 1.42860677e-6f + 2.0f * s * series);
}

/* ---- searches in an ascending row (ties already in index order) ------------ */

/* Number of the first n entries of row with (double)row[i] <= v. */
template <typename T>
TM_DEVICE tm_i64 count_at_most(const T *row, tm_i64 n, double v)
{
    tm_i64 lo = 0, hi = n;
    while (lo < hi) {
        const tm_i64 mid = lo + (hi - lo) / 2;
        if ((double)row[mid] <= v)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

/* Number of the first n entries of row with (double)row[i] < v. */
template <typename T>
TM_DEVICE tm_i64 count_below(const T *row, tm_i64 n, double v)
{
    tm_i64 lo = 0, hi = n;
    while (lo < hi) {
        const tm_i64 mid = lo + (hi - lo) / 2;
        if ((double)row[mid] < v)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

/* ---- semi-hard picks from an anchor's negatives sorted by (distance, index) --
 * sorted/order: the anchor's n_neg usable negatives, ascending, ties in index
 * order (a stable sort of the row); returns a reference index or -1. */

/* "closest": the smallest distance strictly above d(a, p), lowest index on
 * ties; when there is none, the farthest negative (lowest index on ties). */
template <typename T>
TM_DEVICE tm_i64 semi_hard_closest(const T *sorted, const tm_i64 *order, tm_i64 n_neg,
                                   double dap)
{
    if (n_neg <= 0)
        return -1;
    const tm_i64 above = count_at_most(sorted, n_neg, dap);
    if (above < n_neg)
        return order[above];
    /* the first entry of the last run of equal values */
    return order[count_below(sorted, n_neg, (double)sorted[n_neg - 1])];
}

/* "random": uniform among d(a,p) < d(a,n) < d(a,p) + margin, drawn with the
 * counter (seed, anchor, positive index). */
template <typename T>
TM_DEVICE tm_i64 semi_hard_random(const T *sorted, const tm_i64 *order, tm_i64 n_neg,
                                  double dap, double margin, tm_u64 seed, tm_i64 rng_anchor,
                                  tm_i64 positive)
{
    const tm_i64 lo = count_at_most(sorted, n_neg, dap);
    const tm_i64 hi = count_below(sorted, n_neg, dap + margin);
    if (hi <= lo)
        return -1;
    return order[lo + tm_uniform_index(seed, rng_anchor, positive, hi - lo)];
}

/* "all": how many negatives satisfy d(a,p) < d(a,n) <= d(a,p) + margin. */
template <typename T>
TM_DEVICE tm_i64 semi_hard_all_count(const T *sorted, tm_i64 n_neg, double dap, double margin)
{
    return count_at_most(sorted, n_neg, dap + margin) - count_at_most(sorted, n_neg, dap);
}

/* ---- distance-weighted sampling ------------------------------------------- */

/* log w of one candidate, or 0 with *eligible = 0 (mining_impl.h, weighted_row). */
template <typename T>
TM_DEVICE double weighted_log_weight(T dist, int other_label, double cutoff,
                                     double nonzero_loss_cutoff, double dim, int *eligible);

template <>
TM_DEVICE double weighted_log_weight<float>(float dist, int other_label, double cutoff,
                                            double nonzero_loss_cutoff, double dim,
                                            int *eligible)
{
    const double v = (double)dist;
    const double t = v > cutoff ? v : cutoff;
    const double inner = 1.0 - 0.25 * t * t;
    *eligible = other_label && (v < nonzero_loss_cutoff) && (inner > 0.0);
    if (!*eligible)
        return 0.0;
    const float log_t = tm_log_f32((float)t), log_inner = tm_log_f32((float)inner);
    return (2.0 - dim) * (double)log_t + (-0.5 * (dim - 3.0)) * (double)log_inner;
}

template <>
TM_DEVICE double weighted_log_weight<double>(double dist, int other_label, double cutoff,
                                             double nonzero_loss_cutoff, double dim,
                                             int *eligible)
{
    const double v = dist;
    const double t = v > cutoff ? v : cutoff;
    const double inner = 1.0 - 0.25 * t * t;
    *eligible = other_label && (v < nonzero_loss_cutoff) && (inner > 0.0);
    if (!*eligible)
        return 0.0;
    return (2.0 - dim) * log(t) + (-0.5 * (dim - 3.0)) * log(inner);
}

/* The weight relative to the row's largest, rounded through T as the C core does. */
template <typename T>
TM_DEVICE double weighted_relative(double log_w, double max_log);

/* ---- float32 e^x (x <= 0) of row_kernel_impl.h's tm_exp_nonpositive_f32, bit for bit
 * (integer and IEEE float operations only, as tm_log_f32 above). */
TM_DEVICE float tm_exp_nonpositive_f32(float x)
{
    union { float f; int i; } in, lo, clamped, shifted, shifter, scale;
    in.f = x;
    lo.f = -87.0f;
    const int in_range = -(int)(x >= lo.f);
    clamped.i = (in.i & in_range) | (lo.i & ~in_range);
    const float c = clamped.f;
    shifter.f = 12582912.0f; /* 1.5 * 2^23 */
    shifted.f = c * 1.44269504f + shifter.f;
    const int k = shifted.i - shifter.i;
    const float kf = shifted.f - shifter.f;
    const float r = (c - kf * 0.693145752f) - kf * 1.42860677e-6f;
    const float p =
        1.0f + r * (1.0f + r * (0.5f + r * (1.0f / 6 + r * (1.0f / 24 + r * (1.0f / 120 +
        r * (1.0f / 720 + r * (1.0f / 5040)))))));
    scale.i = ((k + 127) << 23) & in_range;
    return p * scale.f;
}

template <>
TM_DEVICE double weighted_relative<float>(double log_w, double max_log)
{
    return (double)tm_exp_nonpositive_f32((float)(log_w - max_log));
}

template <>
TM_DEVICE double weighted_relative<double>(double log_w, double max_log)
{
    return exp(log_w - max_log);
}

/* First column whose cumulative weight exceeds target (cum: m ascending
 * doubles, zero-weight columns repeat their predecessor); last_eligible when
 * rounding left the target at the total. */
TM_DEVICE tm_i64 weighted_pick(const double *cum, tm_i64 m, double target, tm_i64 last_eligible)
{
    const tm_i64 pick = count_at_most(cum, m, target);
    return pick < m ? pick : last_eligible;
}

/* ---- losses -------------------------------------------------------------- */

TM_DEVICE double tm_softplus(double z)
{
    return (z > 0.0 ? z : 0.0) + log1p(exp(-fabs(z)));
}

TM_DEVICE double tm_sigmoid(double z)
{
    if (z >= 0.0)
        return 1.0 / (1.0 + exp(-z));
    const double e = exp(z);
    return e / (1.0 + e);
}

struct tm_pair_coef {
    double alpha, beta, gamma;
};

/* w * dd/dx_a = alpha x_a + beta r_j;  w * dd/dr_j = gamma r_j + beta x_a. */
TM_DEVICE tm_pair_coef pair_coefficients(int metric, double w, double dist, double norm_a,
                                         double norm_j)
{
    tm_pair_coef c;
    c.alpha = c.beta = c.gamma = 0.0;
    if (w == 0.0)
        return c;
    if (metric == TM_SQEUCLIDEAN) {
        c.alpha = c.gamma = 2.0 * w;
        c.beta = -2.0 * w;
    } else if (metric == TM_COSINE) {
        if (norm_a > 0.0 && norm_j > 0.0) {
            const double cosine = 1.0 - dist;
            c.alpha = w * cosine / (norm_a * norm_a);
            c.gamma = w * cosine / (norm_j * norm_j);
            c.beta = -w / (norm_a * norm_j);
        }
    } else if (dist > 0.0) {
        c.alpha = c.gamma = w / dist;
        c.beta = -w / dist;
    }
    return c;
}

/* Exact distance by direct difference in double (engine_impl.h). */
template <typename T>
TM_DEVICE double exact_distance(const T *a, const T *b, tm_i64 d, int metric, double norm_a,
                                double norm_b)
{
    double sum = 0.0;
    if (metric == TM_COSINE) {
        if (norm_a == 0.0 || norm_b == 0.0)
            return 1.0;
        for (tm_i64 k = 0; k < d; ++k) {
            const double diff = (double)a[k] / norm_a - (double)b[k] / norm_b;
            sum += diff * diff;
        }
        return 0.5 * sum;
    }
    /* four interleaved partial sums, in tm_exact_sqeuclidean's order */
    double s0 = 0.0, s1 = 0.0, s2 = 0.0, s3 = 0.0;
    tm_i64 k = 0;
    for (; k + 4 <= d; k += 4) {
        const double d0 = (double)a[k] - (double)b[k];
        const double d1 = (double)a[k + 1] - (double)b[k + 1];
        const double d2 = (double)a[k + 2] - (double)b[k + 2];
        const double d3 = (double)a[k + 3] - (double)b[k + 3];
        s0 += d0 * d0;
        s1 += d1 * d1;
        s2 += d2 * d2;
        s3 += d3 * d3;
    }
    for (; k < d; ++k) {
        const double diff = (double)a[k] - (double)b[k];
        s0 += diff * diff;
    }
    sum = (s0 + s1) + (s2 + s3);
    return metric == TM_SQEUCLIDEAN ? sum : sqrt(sum);
}

#endif /* TRIPMINE_ROW_LOGIC_CUH */
