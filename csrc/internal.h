/*
 * Declarations shared by the C core's translation units; not installed, not
 * part of the public interface (that is tripmine.h).
 */
#ifndef TRIPMINE_INTERNAL_H
#define TRIPMINE_INTERNAL_H

#include <stddef.h>
#include <float.h>
#include <math.h>
#include <stdint.h>

#include "tripmine.h"

#define TM_VERSION_STRING "0.1.0"

/* ---- the thread pool (pool.c) -------------------------------------------
 * tm_parallel_for: body(ctx, participant, begin, end) over [0, n) in chunks
 * of `grain` indices, on up to `threads` participants (ids 0 .. threads-1,
 * the caller is 0; index per-participant scratch by it), in any order.
 * tm_parallel_slots: body(ctx, slot, unit) for units 0 .. n-1, unit u in
 * slot u % slots; each slot runs its units in increasing order, one at a
 * time, whichever participant runs them, so per-slot state is the same on
 * every run.  Both return when all the work is done. */
#define TM_MAX_THREADS 256
#if !defined(TM_NO_THREADS) && (defined(_WIN32) || !defined(__STDC_VERSION__))
#define TM_NO_THREADS 1
#endif
#ifdef TM_NO_THREADS
#define TM_THREADED 0
#else
#define TM_THREADED 1
#endif
typedef void (*tm_range_fn)(void *ctx, int participant, int64_t begin, int64_t end);
typedef void (*tm_unit_fn)(void *ctx, int slot, int64_t unit);
void tm_parallel_for(int threads, int64_t n, int64_t grain, tm_range_fn body, void *ctx);
void tm_parallel_slots(int slots, int64_t n, tm_unit_fn body, void *ctx);
/* The CPUs this process may use (or OMP_NUM_THREADS), at most TM_MAX_THREADS. */
int tm_default_threads(void);

/* 64-byte aligned allocation; a request of 0 bytes still returns a valid
 * pointer, so "NULL" always means "out of memory". */
void *tm_alloc(size_t bytes);
void tm_free(void *p);

/* *out = a * b * elem_size as a size_t, or TM_ERR_TOO_LARGE on overflow
 * (negative sizes are TM_ERR_INVALID). */
int tm_bytes(int64_t a, int64_t b, size_t elem_size, size_t *out);

/* Number of threads to use for `work` independent items (at least 1). */
int tm_threads_for(int64_t work);
/* Pin this thread's view of the thread count (see runtime.c); returns the
 * previous pin, for tm_unpin_threads. */
int tm_pin_threads(void);
void tm_unpin_threads(int previous);

/* A value with the reference index it belongs to, ordered by (value, index)
 * with NaN after everything, so ties resolve to the lowest index. */
typedef struct {
    double value;
    int64_t index;
} tm_scored;

void tm_sort_scored(tm_scored *items, int64_t count);

/* Array forms of fastmath.h's tm_log_f32 (positive normal floats, within a
 * few ulp) and tm_exp_nonpositive_f32 (x <= 0, within 2 ulp), in place: the
 * distance-weighted row kernels' float math, exported for the tests. */
void tm_log_array_f32(float *v, int64_t n);
void tm_exp_nonpositive_array_f32(float *v, int64_t n);

/* Number of leading items of a sorted array whose value is < v (or <= v):
 * a branch-free scan for the few positives of a P x K batch, a binary search
 * otherwise.  Inline: the row operations call them once per pair. */
static inline int64_t tm_count_below(const tm_scored *items, int64_t count, double v)
{
    if (count <= 8) {
        int64_t k = 0;
        for (int64_t i = 0; i < count; ++i)
            k += items[i].value < v;
        return k;
    }
    int64_t lo = 0, hi = count;
    while (lo < hi) {
        const int64_t mid = lo + (hi - lo) / 2;
        if (items[mid].value < v)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

static inline int64_t tm_count_at_most(const tm_scored *items, int64_t count, double v)
{
    if (count <= 8) {
        int64_t k = 0;
        for (int64_t i = 0; i < count; ++i)
            k += items[i].value <= v;
        return k;
    }
    int64_t lo = 0, hi = count;
    while (lo < hi) {
        const int64_t mid = lo + (hi - lo) / 2;
        if (items[mid].value <= v)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

/* Row buffers of tm_run_rows stay under this many bytes per thread. */
#define TM_ROW_BUFFER_BYTES (4 * 1024 * 1024)

/* Micro-kernel types, declared early because engine_decl.h uses them. */
typedef void (*tm_dot_kernel_f32)(int64_t k, const float *a, const float *b, float *c,
                                  int64_t ldc);
typedef void (*tm_dot_kernel_f64)(int64_t k, const double *a, const double *b, double *c,
                                  int64_t ldc);

/* Batch-all's few-positives row pass (row_kernel_impl.h).  In: the anchor's
 * distance row dist (m elements of the working precision), the references'
 * labels, the anchor's label, the margin, its n_pos <= TM_LINEAR_POSITIVES
 * positives' distances, the metric (squared: sqeuclidean, else euclidean);
 * coef (m elements, may be dist itself) receives the gradient coefficients
 * cnt / d (2 cnt) of the negatives, or NULL for no gradient; gamma, when not
 * NULL, has -coef[j] added at gamma[j - gamma_lo] for j in [gamma_lo,
 * gamma_hi).  Out: the row's loss, active triplets and hits per positive (its
 * active negatives), usable negatives, nonzero coefficients and their sum.
 * Two-sided rows (self mode): with pos_t, column j's own positives' distances
 * pos_t[r * pos_stride + j] for r < n_pos_t (-inf past j's last) also count,
 * so that coef[j] = (cnt_a[j] + cnt_j[a]) / d: the coefficient of the pair
 * from both of its anchors' rows. */
#ifndef TM_LINEAR_POSITIVES
#define TM_LINEAR_POSITIVES 16
#endif
typedef struct {
    const void *dist;
    const int64_t *ref_labels;
    int64_t m, label, n_pos;
    const double *positive_values;
    double margin;
    int squared;
    void *coef;
    double *gamma;
    int64_t gamma_lo, gamma_hi;
    const void *pos_t;
    int64_t pos_stride, n_pos_t;
} tm_batch_all_row_args;

typedef struct {
    double loss, coef_sum;
    int64_t active, n_neg, nonzero;
    int64_t hits[TM_LINEAR_POSITIVES];
} tm_batch_all_row_result;

typedef void (*tm_batch_all_row_kernel)(const tm_batch_all_row_args *args,
                                        tm_batch_all_row_result *res);

/* Distance-weighted's eligible negatives of one row (row_kernel_impl.h): for
 * every j with another label than the anchor's, dist[j] < nonzero_loss_cutoff
 * and 1 - t^2 / 4 > 0 (t = max(dist[j], cutoff), in double), in index order,
 * t and 1 - t^2 / 4 rounded to the working precision go to ts and inners and
 * j to negatives[q].index.  Returns how many. */
typedef struct {
    const void *dist;
    const int64_t *ref_labels;
    int64_t m, label;
    double cutoff, nonzero_loss_cutoff;
    void *ts, *inners;
    tm_scored *negatives;
} tm_weighted_row_args;

typedef int64_t (*tm_weighted_row_kernel)(const tm_weighted_row_args *args);

/* Then, after the logarithms of ts and inners: the cumulative weights
 * (row_kernel_impl.h, weighted_weights_kernel).  Returns their total, 0 for
 * none. */
typedef double (*tm_weighted_weights_kernel)(void *ts, const void *inners, int64_t n,
                                             double c_t, double c_inner, tm_scored *negatives);

/* The engine's finishing of a euclidean tile row (engine_impl.h,
 * compute_tile), vectorised per instruction set (row_kernel_impl.h):
 * gram: t[j] = (norm_x + norm_r[j]) - 2 t[j], returning whether any pair is
 * near (t[j] < refine (norm_x + norm_r[j])); clamp: t[j] = max(t[j], 0),
 * square-rooted when root is set.  Elementwise IEEE operations: the same bits
 * on every instruction set. */
typedef int (*tm_gram_row_kernel)(void *t, double norm_x, const void *norm_r, int64_t n,
                                  double refine);
typedef void (*tm_clamp_row_kernel)(void *t, int64_t n, int root);

/* The margin-softmax heads' row kernels (row_kernel_impl.h): the max of a
 * row, its exponentials in place with their sum, and G = g e^(t - lse). */
typedef double (*tm_softmax_max_kernel)(const void *t, int64_t n);
typedef double (*tm_softmax_exp_kernel)(void *t, int64_t n, double mx);
typedef void (*tm_softmax_grad_kernel)(void *t, int64_t n, double g, double lse);

/* A panel of rows, transposed and scaled (the heads' packing of W):
 * dst[p nr + i] = src[i ld + p] * scale[i] for i < rows, 0 for rows <= i < nr,
 * p < d.  One multiplication per element in the working precision: the same
 * bits on every instruction set. */
typedef void (*tm_pack_panel_kernel)(const void *src, int64_t ld, const void *scale,
                                     int64_t rows, int64_t d, int64_t nr, void *dst);

/* The center loss's row kernels (row_kernel_impl.h): for one sample,
 * r = x - c in double, out[p] = g r rounded (out may be NULL), returning
 * |r|^2 / 2 summed in eight lanes added in a fixed order; and acc[p] +=
 * g (c[p] - x[p]) in double.  The same bits on every instruction set. */
typedef double (*tm_center_row_kernel)(const void *x, const void *c, int64_t d, double g,
                                       void *out);
typedef void (*tm_center_acc_kernel)(double *acc, const void *c, const void *x, int64_t d,
                                     double g);

/* The lifted structured loss's row kernels (row_kernel_impl.h, lifted_impl.h).
 * lifted_lse: over the row's negatives (ref_labels[j] != label), the nearest
 * distance into *nearest (inf without negatives) and the sum of
 * e^(nearest - d_j) (0 without negatives), in eight lanes.  lifted_beta, on
 * the euclidean metrics: with the weights w_j = -(tau e^min(0, shift - d_j) +
 * col_tau[j] e^min(0, col_shift[j] - d_j)) of the negatives (no column term
 * when col_shift is NULL) and 0 elsewhere, writes beta_j = -c_j over d_j,
 * c_j = w_j / d_j (0 at d_j = 0), or 2 w_j with squared set, and returns the
 * sum of the c_j (the row's alpha) in eight lanes.  Elementwise IEEE
 * operations and fixed-order sums: the same bits on every instruction set. */
typedef double (*tm_lifted_lse_kernel)(const void *dist, const int64_t *ref_labels,
                                       int64_t label, int64_t m, double *nearest);
typedef double (*tm_lifted_beta_kernel)(void *dist, const int64_t *ref_labels, int64_t label,
                                        int64_t m, double shift, double tau,
                                        const void *col_shift, const void *col_tau,
                                        int squared);

/* One instruction set's micro-kernels, for both precisions. */
typedef struct {
    const char *name;
    int (*usable)(void);
    int mr_f32, nr_f32;
    tm_dot_kernel_f32 dot_f32;
    int mr_f64, nr_f64;
    tm_dot_kernel_f64 dot_f64;
    tm_batch_all_row_kernel batch_all_row_f32, batch_all_row_f64;
    tm_weighted_row_kernel weighted_row_f32, weighted_row_f64;
    tm_weighted_weights_kernel weighted_weights_f32, weighted_weights_f64;
    tm_gram_row_kernel gram_row_f32, gram_row_f64;
    tm_clamp_row_kernel clamp_row_f32, clamp_row_f64;
    tm_softmax_max_kernel softmax_max_f32, softmax_max_f64;
    tm_softmax_exp_kernel softmax_exp_f32, softmax_exp_f64;
    tm_softmax_grad_kernel softmax_grad_f32, softmax_grad_f64;
    tm_pack_panel_kernel pack_panel_f32, pack_panel_f64;
    tm_center_row_kernel center_row_f32, center_row_f64;
    tm_center_acc_kernel center_acc_f32, center_acc_f64;
    tm_lifted_lse_kernel lifted_lse_f32, lifted_lse_f64;
    tm_lifted_beta_kernel lifted_beta_f32, lifted_beta_f64;
} tm_kernel_set;

/* Flush-to-zero and denormals-are-zero for the calling thread, around a
 * product whose partial sums may leave the normal range (the heads' dX and
 * dW accumulations): subnormal operands and results cost a microcode assist
 * per instruction on many x86 cores, and a term below 2^-126 (2^-1022) is
 * below the precision the result can carry.  Returns the previous state for
 * tm_flush_subnormals_end.  A no-op where SSE's MXCSR does not exist. */
#if defined(__SSE2__) || defined(_M_X64)
#include <xmmintrin.h>
static inline unsigned tm_flush_subnormals_begin(void)
{
    const unsigned previous = _mm_getcsr();
    _mm_setcsr(previous | 0x8040u); /* FTZ (bit 15) | DAZ (bit 6) */
    return previous;
}
static inline void tm_flush_subnormals_end(unsigned previous)
{
    _mm_setcsr(previous);
}
#else
static inline unsigned tm_flush_subnormals_begin(void)
{
    return 0;
}
static inline void tm_flush_subnormals_end(unsigned previous)
{
    (void)previous;
}
#endif

/* Elements of scratch tm_gemm_acc needs. */
#define TM_GEMM_ROWS 64
#define TM_GEMM_KC 256
int64_t tm_gemm_scratch_elems(const tm_kernel_set *kernels);

/* Rows given at 2^e times the caller's (a row_exponent e, which the float64 range
 * rerun uses to bring rows of extreme magnitude into the engine's window; euclidean
 * metrics only).  A distance of the given rows converts to the caller's by
 * ldexp(d, shift), shift = -e (euclidean) or -2e (sqeuclidean), exact unless the
 * result leaves double's normal range; a pair's gradient weight w = dL/dd (in the
 * caller's units) enters the coefficients as w * coef, coef = 2^-e, so that
 * products with the given rows are the gradient with respect to the caller's rows
 * (euclidean: w 2^-e / d times 2^e (x - r); sqeuclidean: 2 w 2^-e times 2^e (x - r)). */
#define TM_MAX_ROW_EXPONENT 1000
typedef struct {
    int shift;
    double coef;
} tm_row_scale;

/* TM_ERR_INVALID for an exponent with the cosine metric (scale-free) or beyond
 * +-TM_MAX_ROW_EXPONENT. */
static inline int tm_row_scale_init(int metric, int row_exponent, tm_row_scale *out)
{
    out->shift = 0;
    out->coef = 1.0;
    if (row_exponent == 0)
        return TM_OK;
    if (metric == TM_METRIC_COSINE || row_exponent < -TM_MAX_ROW_EXPONENT ||
        row_exponent > TM_MAX_ROW_EXPONENT)
        return TM_ERR_INVALID;
    out->shift = metric == TM_METRIC_SQEUCLIDEAN ? -2 * row_exponent : -row_exponent;
    out->coef = ldexp(1.0, -row_exponent);
    return TM_OK;
}

/* A distance of the given rows in the caller's units. */
static inline double tm_caller_distance(const tm_row_scale *scale, double v)
{
    return scale->shift != 0 ? ldexp(v, scale->shift) : v;
}

#define TM_BITS 32
#include "template.h"
#include "engine_decl.h"
#undef TM_BITS
#define TM_BITS 64
#include "template.h"
#include "engine_decl.h"
#undef TM_BITS

/* The kernels every call uses; chosen on first use or by tm_set_isa. */
const tm_kernel_set *tm_active_kernels(void);

extern const tm_kernel_set tm_kernels_generic;
#if (defined(__x86_64__) || defined(_M_X64)) && defined(__GNUC__)
#define TM_HAVE_AVX2_KERNELS 1
extern const tm_kernel_set tm_kernels_avx2;
#define TM_HAVE_AVX512_KERNELS 1
extern const tm_kernel_set tm_kernels_avx512;
#endif

#endif /* TRIPMINE_INTERNAL_H */
