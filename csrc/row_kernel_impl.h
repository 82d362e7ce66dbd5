/*
 * Row kernels: the per-anchor loops of the dense losses that run over a whole
 * distance row, written once in portable C and compiled in each kernel file
 * (generic, avx2, avx512) so that the compiler vectorises them for that
 * instruction set.  Include after template.h; every symbol is static.
 *
 * The code is shaped for the auto-vectoriser: chunks of TM_ROW_CHUNK
 * elements held in small local arrays, one elementwise loop per step, and
 * sums kept in TM_ROW_LANES independent accumulators (no reassociation,
 * so no -ffast-math: the lanes are summed in a fixed order, and every
 * instruction set returns the same bits).
 */

#ifndef TM_ROW_CHUNK
#define TM_ROW_CHUNK 256 /* a multiple of TM_ROW_LANES */
#define TM_ROW_LANES 8
#include <math.h>
#include <string.h>
#include "fastmath.h"

#endif

/* lanes[l] += v[l + TM_ROW_LANES i] for a chunk of w (padded to a multiple of
 * TM_ROW_LANES with zeros) elements, summed in the working precision within
 * the chunk and in double across chunks. */
static inline void TM_FN(row_lanes_add)(double *lanes, const TM_REAL *v, int64_t w)
{
    TM_REAL part[TM_ROW_LANES] = {0};
    for (int64_t j = 0; j < w; j += TM_ROW_LANES)
        for (int l = 0; l < TM_ROW_LANES; ++l)
            part[l] += v[j + l];
    for (int l = 0; l < TM_ROW_LANES; ++l)
        lanes[l] += (double)part[l];
}

static inline double TM_FN(row_lanes_total)(const double *lanes)
{
    return ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) +
           ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
}

/* Batch-all (hinge, euclidean metrics) for one anchor with at most
 * TM_LINEAR_POSITIVES positives, in one pass over the row: see
 * tm_batch_all_row_args in internal.h. */
static void TM_FN(batch_all_row_kernel)(const tm_batch_all_row_args *args,
                                        tm_batch_all_row_result *res)
{
    const TM_REAL *dist = (const TM_REAL *)args->dist;
    const int64_t *ref_labels = args->ref_labels;
    const int64_t label = args->label, m = args->m, n_pos = args->n_pos;
    const TM_REAL margin = (TM_REAL)args->margin;
    TM_REAL *coef = (TM_REAL *)args->coef;
    double *gamma = args->gamma;
    TM_REAL pos[TM_LINEAR_POSITIVES];
    for (int64_t r = 0; r < n_pos; ++r)
        pos[r] = (TM_REAL)args->positive_values[r];
    TM_REAL thr[TM_ROW_CHUNK], neg[TM_ROW_CHUNK], cnt[TM_ROW_CHUNK], sum[TM_ROW_CHUNK];
    TM_REAL c[TM_ROW_CHUNK];
    const TM_REAL *pos_t = (const TM_REAL *)args->pos_t;
    double loss_lanes[TM_ROW_LANES] = {0}, coef_lanes[TM_ROW_LANES] = {0};
    int64_t hits[TM_LINEAR_POSITIVES] = {0};
    int64_t n_neg = 0, nonzero = 0;
    for (int64_t j0 = 0; j0 < m; j0 += TM_ROW_CHUNK) {
        const int64_t w = m - j0 < TM_ROW_CHUNK ? m - j0 : TM_ROW_CHUNK;
        const int64_t padded = (w + TM_ROW_LANES - 1) / TM_ROW_LANES * TM_ROW_LANES;
        const TM_REAL *v = dist + j0;
        const int64_t *lab = ref_labels + j0;
        TM_COUNT usable_count = 0;
        for (int64_t j = 0; j < w; ++j) {
            /* never a itself: a shares its label.  NaN distances are not usable. */
            const TM_COUNT usable = (TM_COUNT)(lab[j] != label) & (TM_COUNT)(v[j] == v[j]);
            neg[j] = (TM_REAL)usable;
            thr[j] = v[j] - margin;
            cnt[j] = 0;
            sum[j] = 0;
            usable_count += usable;
        }
        for (int64_t j = w; j < padded; ++j) {
            neg[j] = 0;
            thr[j] = 0;
            cnt[j] = 0;
            sum[j] = 0;
        }
        n_neg += usable_count;
        for (int64_t r = 0; r < n_pos; ++r) {
            const TM_REAL p = pos[r];
            TM_COUNT h = 0;
            for (int64_t j = 0; j < padded; ++j) {
                const TM_REAL z = p - thr[j];
                /* a select of constants, then a product: no load under a condition */
                const TM_REAL on = (z > 0 ? (TM_REAL)1 : (TM_REAL)0) * neg[j];
                cnt[j] += on;
                sum[j] += on * z;
                h += (TM_COUNT)on;
            }
            hits[r] += h;
        }
        TM_FN(row_lanes_add)(loss_lanes, sum, padded);
        if (coef == NULL)
            continue;
        /* Two-sided: the pairs' other anchors, column j's positives (the row's
         * loss is summed above, so cnt can take their counts now). */
        for (int64_t r = 0; pos_t != NULL && r < args->n_pos_t; ++r) {
            const TM_REAL *p = pos_t + r * args->pos_stride + j0;
            for (int64_t j = 0; j < w; ++j) {
                const TM_REAL z = p[j] - thr[j];
                cnt[j] += (z > 0 ? (TM_REAL)1 : (TM_REAL)0) * neg[j];
            }
        }
        TM_COUNT nz = 0;
        if (args->squared) {
            for (int64_t j = 0; j < padded; ++j) { /* sqeuclidean: beta = -2w, w = -cnt */
                c[j] = 2 * cnt[j];
                nz += (TM_COUNT)(cnt[j] > 0);
            }
        } else {
            for (int64_t j = 0; j < padded; ++j) { /* euclidean: beta = -w / d; 0 at d = 0 */
                const TM_REAL d = j < w ? v[j] : 0;
                const TM_REAL safe = d > 0 ? d : 1; /* no division by 0 or NaN */
                c[j] = (TM_REAL)(d > 0) * (cnt[j] / safe);
                nz += (TM_COUNT)(cnt[j] > 0);
            }
        }
        nonzero += nz;
        TM_FN(row_lanes_add)(coef_lanes, c, padded);
        TM_REAL *out = coef + j0; /* may be dist itself: v is not read below */
        for (int64_t j = 0; j < w; ++j)
            out[j] = c[j];
        if (gamma != NULL) { /* alpha = gamma = -beta on both metrics */
            const int64_t lo = args->gamma_lo > j0 ? args->gamma_lo : j0;
            const int64_t hi = args->gamma_hi < j0 + w ? args->gamma_hi : j0 + w;
            for (int64_t j = lo; j < hi; ++j)
                gamma[j - args->gamma_lo] -= (double)c[j - j0];
        }
    }
    int64_t active = 0;
    for (int64_t r = 0; r < n_pos; ++r) {
        res->hits[r] = hits[r];
        active += hits[r];
    }
    res->loss = TM_FN(row_lanes_total)(loss_lanes);
    res->coef_sum = TM_FN(row_lanes_total)(coef_lanes);
    res->n_neg = n_neg;
    res->active = active;
    res->nonzero = nonzero;
}

/* Distance-weighted's eligible negatives (tm_weighted_row_args): per chunk, a
 * branch-free pass the compiler vectorises computes t, 1 - t^2 / 4 (in
 * double, rounded once, as a scalar loop would) and the eligibility flag,
 * then a light pass compacts them.  The values are those of a plain loop:
 * the same bits on every instruction set. */
static int64_t TM_FN(weighted_row_kernel)(const tm_weighted_row_args *args)
{
    const TM_REAL *dist = (const TM_REAL *)args->dist;
    const int64_t *ref_labels = args->ref_labels;
    const int64_t m = args->m, label = args->label;
    const double cutoff = args->cutoff, nonzero = args->nonzero_loss_cutoff;
    TM_REAL *ts = (TM_REAL *)args->ts, *inners = (TM_REAL *)args->inners;
    tm_scored *negatives = args->negatives;
    TM_REAL t_chunk[TM_ROW_CHUNK], inner_chunk[TM_ROW_CHUNK];
    int64_t keep[TM_ROW_CHUNK]; /* as wide as the labels and the doubles: one vector shape */
    int64_t n_valid = 0;
    for (int64_t j0 = 0; j0 < m; j0 += TM_ROW_CHUNK) {
        const int64_t w = m - j0 < TM_ROW_CHUNK ? m - j0 : TM_ROW_CHUNK;
        const TM_REAL *v = dist + j0;
        const int64_t *lab = ref_labels + j0;
        for (int64_t j = 0; j < w; ++j) {
            const double d = (double)v[j];
            /* d > cutoff ? d : cutoff, as a bit blend: GCC (trapping math) will
             * not turn a floating-point select into vector code */
            const double t = tm_pick_double(-(int64_t)(d > cutoff), d, cutoff);
            const double inner = 1.0 - 0.25 * t * t;
            t_chunk[j] = (TM_REAL)t;
            inner_chunk[j] = (TM_REAL)inner;
            /* never the anchor itself (its label), never NaN (d < nonzero fails) */
            keep[j] = (int64_t)(lab[j] != label) & (int64_t)(d < nonzero) &
                      (int64_t)(inner > 0.0);
        }
        for (int64_t j = 0; j < w; ++j) { /* always write, advance by the flag */
            ts[n_valid] = t_chunk[j];
            inners[n_valid] = inner_chunk[j];
            negatives[n_valid].index = j0 + j;
            n_valid += keep[j];
        }
    }
    return n_valid;
}

/* Distance-weighted's sampling weights of a row's n eligible negatives, from
 * t and 1 - t^2/4 (ts and inners; ts is overwritten): their logarithms
 * (float32: tm_log_f32, float64: libm's), then
 * log w = c_t log t + c_inner log(1 - t^2/4) in double, the largest, then
 * negatives[q].value = the cumulative sum (in double, in index order) of
 * w / max w, rounded through the working precision (float32: the exp above,
 * float64: libm's).  Returns the total, or 0 when no weight is finite. */
#undef TM_ROW_LOG
#if TM_BITS == 32
#define TM_ROW_LOG tm_log_f32
#else
#define TM_ROW_LOG log
#endif
static double TM_FN(weighted_weights_kernel)(void *ts_v, const void *inners_v, int64_t n,
                                             double c_t, double c_inner, tm_scored *negatives)
{
    TM_REAL *ts = (TM_REAL *)ts_v;
    const TM_REAL *inners = (const TM_REAL *)inners_v;
    double lanes[TM_ROW_LANES];
    for (int l = 0; l < TM_ROW_LANES; ++l)
        lanes[l] = -HUGE_VAL;
    /* Pass 1: log w into negatives[q].value; the largest per lane, exactly. */
    int64_t q = 0;
    for (; q + TM_ROW_LANES <= n; q += TM_ROW_LANES)
        for (int l = 0; l < TM_ROW_LANES; ++l) {
            const double v = c_t * (double)TM_ROW_LOG(ts[q + l]) +
                             c_inner * (double)TM_ROW_LOG(inners[q + l]);
            negatives[q + l].value = v;
            lanes[l] = tm_pick_double(-(int64_t)(v > lanes[l]), v, lanes[l]);
        }
    double max_log = -HUGE_VAL;
    for (; q < n; ++q) {
        const double v = c_t * (double)TM_ROW_LOG(ts[q]) + c_inner * (double)TM_ROW_LOG(inners[q]);
        negatives[q].value = v;
        max_log = v > max_log ? v : max_log;
    }
    for (int l = 0; l < TM_ROW_LANES; ++l)
        max_log = lanes[l] > max_log ? lanes[l] : max_log;
    if (!(max_log > -HUGE_VAL && max_log < HUGE_VAL))
        return 0.0; /* no eligible negative (or a degenerate dimension) */
    /* Pass 2: the relative weights, vectorised, into ts. */
    for (q = 0; q < n; ++q)
#if TM_BITS == 32
        ts[q] = tm_exp_nonpositive_f32((float)(negatives[q].value - max_log));
#else
        ts[q] = exp(negatives[q].value - max_log);
#endif
    /* Pass 3: the cumulative sum, in order. */
    double total = 0.0;
    for (q = 0; q < n; ++q) {
        total += (double)ts[q];
        negatives[q].value = total;
    }
    return total;
}

/* The engine's euclidean tile rows (tm_gram_row_kernel, tm_clamp_row_kernel). */
static int TM_FN(gram_row_kernel)(void *t_v, double norm_x, const void *norm_r_v, int64_t n,
                                  double refine_d)
{
    TM_REAL *t = (TM_REAL *)t_v;
    const TM_REAL *norm_r = (const TM_REAL *)norm_r_v;
    const TM_REAL norm_xr = (TM_REAL)norm_x, refine = (TM_REAL)refine_d;
    int near = 0;
    for (int64_t j = 0; j < n; ++j) {
        const TM_REAL scale = norm_xr + norm_r[j];
        const TM_REAL d2 = scale - 2 * t[j];
        t[j] = d2;
        near |= d2 < refine * scale;
    }
    return near;
}

static void TM_FN(clamp_row_kernel)(void *t_v, int64_t n, int root)
{
    TM_REAL *t = (TM_REAL *)t_v;
    if (root) {
        for (int64_t j = 0; j < n; ++j)
            t[j] = TM_SQRT(t[j] < 0 ? 0 : t[j]);
    } else {
        for (int64_t j = 0; j < n; ++j)
            t[j] = t[j] < 0 ? 0 : t[j];
    }
}

/* The margin-softmax heads' rows (heads_impl.h; tm_softmax_*_kernel in
 * internal.h).  max: the largest of n values (exact in any order, so the same
 * on every instruction set).  exp: t[j] = e^(t[j] - mx) in place (mx >= every
 * t[j]), returning their sum, summed in lanes in a fixed order.  grad:
 * t[j] = g e^(t[j] - lse) in place. */
static double TM_FN(softmax_max_kernel)(const void *t_v, int64_t n)
{
    const TM_REAL *t = (const TM_REAL *)t_v;
    TM_REAL lanes[TM_ROW_LANES];
    for (int l = 0; l < TM_ROW_LANES; ++l)
        lanes[l] = -INFINITY;
    int64_t j = 0;
    for (; j + TM_ROW_LANES <= n; j += TM_ROW_LANES)
        for (int l = 0; l < TM_ROW_LANES; ++l)
            lanes[l] = t[j + l] > lanes[l] ? t[j + l] : lanes[l];
    for (; j < n; ++j)
        lanes[0] = t[j] > lanes[0] ? t[j] : lanes[0];
    TM_REAL best = lanes[0];
    for (int l = 1; l < TM_ROW_LANES; ++l)
        best = lanes[l] > best ? lanes[l] : best;
    return (double)best;
}

static double TM_FN(softmax_exp_kernel)(void *t_v, int64_t n, double mx_d)
{
    TM_REAL *t = (TM_REAL *)t_v;
    const TM_REAL mx = (TM_REAL)mx_d;
    double lanes[TM_ROW_LANES] = {0};
    for (int64_t j0 = 0; j0 < n; j0 += TM_ROW_CHUNK) {
        const int64_t w = n - j0 < TM_ROW_CHUNK ? n - j0 : TM_ROW_CHUNK;
        TM_REAL *c = t + j0;
        for (int64_t j = 0; j < w; ++j)
#if TM_BITS == 32
            c[j] = tm_exp_nonpositive_f32(c[j] - mx);
#else
            c[j] = exp(c[j] - mx);
#endif
        TM_REAL padded[TM_ROW_CHUNK];
        const int64_t wp = (w + TM_ROW_LANES - 1) / TM_ROW_LANES * TM_ROW_LANES;
        memcpy(padded, c, (size_t)w * sizeof(TM_REAL));
        for (int64_t j = w; j < wp; ++j)
            padded[j] = 0;
        TM_FN(row_lanes_add)(lanes, padded, wp);
    }
    return TM_FN(row_lanes_total)(lanes);
}

static void TM_FN(softmax_grad_kernel)(void *t_v, int64_t n, double g_d, double lse_d)
{
    TM_REAL *t = (TM_REAL *)t_v;
    const TM_REAL g = (TM_REAL)g_d, lse = (TM_REAL)lse_d;
    /* A product below the normal range is flushed to zero: it is what dW's
     * product multiplies next, and subnormal operands cost a microcode assist per
     * instruction on many x86 cores (measured: 5x slower on an Intel Xeon). */
    const TM_REAL tiny = TM_REAL_MIN;
    for (int64_t j = 0; j < n; ++j) {
#if TM_BITS == 32
        const TM_REAL v = g * tm_exp_nonpositive_f32(t[j] - lse);
#else
        const TM_REAL v = g * exp(t[j] - lse);
#endif
        t[j] = v >= tiny || v <= -tiny ? v : 0;
    }
}

/* The heads' transposing pack (tm_pack_panel_kernel), portable: eight features
 * of every row at a time, so reads stay on a few lines per row and writes are
 * contiguous.  kernels_avx512.c gathers instead, and falls back to this. */
static void TM_FN(pack_panel_kernel)(const void *src_v, int64_t ld, const void *scale_v,
                                     int64_t rows, int64_t d, int64_t nr, void *dst_v)
{
    const TM_REAL *src = (const TM_REAL *)src_v, *scale = (const TM_REAL *)scale_v;
    TM_REAL *dst = (TM_REAL *)dst_v;
    if (rows < nr)
        memset(dst, 0, (size_t)(d * nr) * sizeof(TM_REAL));
    for (int64_t p0 = 0; p0 < d; p0 += 8) {
        const int64_t p1 = d - p0 < 8 ? d : p0 + 8;
        for (int64_t i = 0; i < rows; ++i) {
            const TM_REAL *row = src + i * ld;
            const TM_REAL f = scale[i];
            for (int64_t p = p0; p < p1; ++p)
                dst[p * nr + i] = row[p] * f;
        }
    }
}

/* The center loss's rows (center_impl.h; tm_center_row_kernel and
 * tm_center_acc_kernel in internal.h). */
static double TM_FN(center_row_kernel)(const void *x_v, const void *c_v, int64_t d, double g,
                                       void *out_v)
{
    const TM_REAL *x = (const TM_REAL *)x_v, *c = (const TM_REAL *)c_v;
    TM_REAL *out = (TM_REAL *)out_v;
    double lanes[8] = {0};
    int64_t p8 = 0;
    for (; p8 + 8 <= d; p8 += 8)
        for (int l = 0; l < 8; ++l) {
            const double r = (double)x[p8 + l] - (double)c[p8 + l];
            lanes[l] += r * r;
        }
    for (int l = 0; p8 + l < d; ++l) {
        const double r = (double)x[p8 + l] - (double)c[p8 + l];
        lanes[l] += r * r;
    }
    if (out != NULL)
        for (int64_t p = 0; p < d; ++p)
            out[p] = (TM_REAL)(g * ((double)x[p] - (double)c[p]));
    return 0.5 * (((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) +
                  ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7])));
}

static void TM_FN(center_acc_kernel)(double *acc, const void *c_v, const void *x_v, int64_t d,
                                     double g)
{
    const TM_REAL *c = (const TM_REAL *)c_v, *x = (const TM_REAL *)x_v;
    for (int64_t p = 0; p < d; ++p)
        acc[p] += g * ((double)c[p] - (double)x[p]);
}

/* The lifted structured loss's rows (lifted_impl.h; tm_lifted_lse_kernel and
 * tm_lifted_beta_kernel in internal.h). */
static double TM_FN(lifted_lse_kernel)(const void *dist_v, const int64_t *ref_labels,
                                       int64_t label, int64_t m, double *nearest_out)
{
    const TM_REAL *dist = (const TM_REAL *)dist_v;
    const TM_REAL far = (TM_REAL)INFINITY;
    TM_REAL lanes_min[TM_ROW_LANES];
    for (int l = 0; l < TM_ROW_LANES; ++l)
        lanes_min[l] = far;
    for (int64_t j0 = 0; j0 < m; j0 += TM_ROW_CHUNK) {
        const int64_t n = m - j0 < TM_ROW_CHUNK ? m - j0 : TM_ROW_CHUNK;
        const TM_REAL *d = dist + j0;
        const int64_t *lab = ref_labels + j0;
        TM_REAL v[TM_ROW_CHUNK];
        for (int64_t q = 0; q < n; ++q)
            v[q] = lab[q] != label ? d[q] : far;
        const int64_t padded = (n + TM_ROW_LANES - 1) / TM_ROW_LANES * TM_ROW_LANES;
        for (int64_t q = n; q < padded; ++q)
            v[q] = far;
        for (int64_t q = 0; q < padded; q += TM_ROW_LANES)
            for (int l = 0; l < TM_ROW_LANES; ++l)
                lanes_min[l] = v[q + l] < lanes_min[l] ? v[q + l] : lanes_min[l];
    }
    TM_REAL nearest = lanes_min[0];
    for (int l = 1; l < TM_ROW_LANES; ++l)
        nearest = lanes_min[l] < nearest ? lanes_min[l] : nearest;
    *nearest_out = (double)nearest;
    if (nearest == far)
        return 0.0;
    double lanes[TM_ROW_LANES] = {0};
    for (int64_t j0 = 0; j0 < m; j0 += TM_ROW_CHUNK) {
        const int64_t n = m - j0 < TM_ROW_CHUNK ? m - j0 : TM_ROW_CHUNK;
        const TM_REAL *d = dist + j0;
        const int64_t *lab = ref_labels + j0;
        TM_REAL e[TM_ROW_CHUNK];
        for (int64_t q = 0; q < n; ++q) {
            const TM_REAL u = nearest - d[q];
            e[q] = u < 0 ? u : 0;
        }
        for (int64_t q = 0; q < n; ++q)
#if TM_BITS == 32
            e[q] = tm_exp_nonpositive_f32(e[q]);
#else
            e[q] = exp(e[q]);
#endif
        for (int64_t q = 0; q < n; ++q)
            e[q] = lab[q] != label ? e[q] : (TM_REAL)0;
        const int64_t padded = (n + TM_ROW_LANES - 1) / TM_ROW_LANES * TM_ROW_LANES;
        for (int64_t q = n; q < padded; ++q)
            e[q] = 0;
        TM_FN(row_lanes_add)(lanes, e, padded);
    }
    return TM_FN(row_lanes_total)(lanes);
}

static double TM_FN(lifted_beta_kernel)(void *dist_v, const int64_t *ref_labels, int64_t label,
                                        int64_t m, double shift_d, double tau_d,
                                        const void *col_shift_v, const void *col_tau_v,
                                        int squared)
{
    TM_REAL *dist = (TM_REAL *)dist_v;
    const TM_REAL *col_shift = (const TM_REAL *)col_shift_v, *col_tau = (const TM_REAL *)col_tau_v;
    const TM_REAL shift = (TM_REAL)shift_d, tau = (TM_REAL)tau_d, zero = 0, one = 1;
    double lanes[TM_ROW_LANES] = {0};
    for (int64_t j0 = 0; j0 < m; j0 += TM_ROW_CHUNK) {
        const int64_t n = m - j0 < TM_ROW_CHUNK ? m - j0 : TM_ROW_CHUNK;
        TM_REAL *d = dist + j0;
        const int64_t *lab = ref_labels + j0;
        TM_REAL a[TM_ROW_CHUNK], b[TM_ROW_CHUNK];
        TM_REAL c[TM_ROW_CHUNK] = {0}; /* zero past n: the lanes add whole groups */
        for (int64_t q = 0; q < n; ++q) {
            const TM_REAL u = shift - d[q];
            a[q] = u < zero ? u : zero;
        }
        for (int64_t q = 0; q < n; ++q)
#if TM_BITS == 32
            a[q] = tm_exp_nonpositive_f32(a[q]);
#else
            a[q] = exp(a[q]);
#endif
        if (col_shift != NULL) {
            const TM_REAL *cs = col_shift + j0, *ct = col_tau + j0;
            for (int64_t q = 0; q < n; ++q) {
                const TM_REAL v = cs[q] - d[q];
                b[q] = v < zero ? v : zero;
            }
            for (int64_t q = 0; q < n; ++q)
#if TM_BITS == 32
                b[q] = tm_exp_nonpositive_f32(b[q]);
#else
                b[q] = exp(b[q]);
#endif
            for (int64_t q = 0; q < n; ++q)
                a[q] = tau * a[q] + ct[q] * b[q];
        } else {
            for (int64_t q = 0; q < n; ++q)
                a[q] = tau * a[q];
        }
        /* a = -w, the weight negated; c = alpha = gamma = -beta */
        if (squared) {
            for (int64_t q = 0; q < n; ++q)
                c[q] = lab[q] != label ? (TM_REAL)-2 * a[q] : zero;
        } else {
            for (int64_t q = 0; q < n; ++q) {
                const TM_REAL safe = d[q] > zero ? d[q] : one;
                c[q] = lab[q] != label && d[q] > zero ? -a[q] / safe : zero;
            }
        }
        for (int64_t q = 0; q < n; ++q)
            d[q] = -c[q];
        TM_FN(row_lanes_add)(lanes, c, (n + TM_ROW_LANES - 1) / TM_ROW_LANES * TM_ROW_LANES);
    }
    return TM_FN(row_lanes_total)(lanes);
}
