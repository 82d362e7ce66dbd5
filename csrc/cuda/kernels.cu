/*
 * tripmine's CUDA kernels, compiled at first use by cupy.RawModule (NVRTC)
 * with --fmad=false, once per dtype: T = float (TM_SUFFIX f32) or double
 * (f64).  See README.md in this folder for the design.
 *
 * All kernels work on one chunk of anchor rows [row0, row0 + rows) against
 * all m reference columns: `tile` is that chunk's rows x m block of the
 * distance matrix (C-contiguous), produced by a cuBLAS GEMM of the chunk
 * against the reference set and finished by finish_tile.  Labels are int64
 * class codes (global arrays); `excl_offset` >= 0 names the column excluded
 * from anchor a (a + excl_offset: self mode, or ref_offset), -1 for none.
 */
#include "row_logic.cuh"

#ifndef TM_SUFFIX
#define TM_SUFFIX f32
#endif
#ifndef TM_REAL
#define TM_REAL float
#endif

#define TM_CAT2(a, b) a##_##b
#define TM_CAT(a, b) TM_CAT2(a, b)
#define TM_KERNEL(name) extern "C" __global__ void TM_CAT(name, TM_SUFFIX)

typedef TM_REAL T;

#define TM_REFINE (1.0 / 64.0)

__device__ __forceinline__ double tm_neg_inf() { return __longlong_as_double(0xfff0000000000000ull); }

__device__ __forceinline__ int tm_excluded(tm_i64 a, tm_i64 j, tm_i64 excl_offset)
{
    return excl_offset >= 0 && j == a + excl_offset;
}

/* Squared norms in double, summed in index order as the C core does. */
TM_KERNEL(row_sqnorms)(const T *x, tm_i64 n, tm_i64 d, double *out)
{
    const tm_i64 i = (tm_i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n)
        return;
    double s = 0.0;
    for (tm_i64 k = 0; k < d; ++k)
        s += (double)x[i * d + k] * (double)x[i * d + k];
    out[i] = s;
}

/* Dot products -> distances, in place, with the C core's rule: Gram identity,
 * pairs close compared with their norms recomputed exactly, clamp, and the
 * excluded (self) pair exactly 0.  norm: squared norms (euclidean metrics) or
 * norms (cosine) in double; norm_real: the squared norms rounded to T. */
TM_KERNEL(finish_tile)(T *tile, const T *x, const T *r, const double *x_norm,
                       const double *r_norm, const T *x_norm_real, const T *r_norm_real,
                       tm_i64 rows, tm_i64 row0, tm_i64 m, tm_i64 d, int metric,
                       tm_i64 excl_offset)
{
    const tm_i64 at = (tm_i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (at >= rows * m)
        return;
    const tm_i64 i = at / m, j = at - i * m, a = row0 + i;
    const T dot = tile[at];
    T out;
    if (metric == TM_COSINE) {
        const double nx = x_norm[a], nr = r_norm[j];
        double dist = 1.0;
        if (nx != 0.0 && nr != 0.0) {
            dist = 1.0 - (double)dot / (nx * nr);
            if (dist < TM_REFINE)
                dist = exact_distance(x + a * d, r + j * d, d, TM_COSINE, nx, nr);
            if (dist < 0.0)
                dist = 0.0;
            if (dist > 2.0)
                dist = 2.0;
        }
        out = (T)dist;
    } else {
        const T scale = x_norm_real[a] + r_norm_real[j];
        T d2 = scale - 2 * dot;
        if (d2 < (T)TM_REFINE * scale)
            d2 = (T)exact_distance(x + a * d, r + j * d, d, TM_SQEUCLIDEAN, 0.0, 0.0);
        d2 = d2 < 0 ? (T)0 : d2;
        out = metric == TM_EUCLIDEAN ? sqrt(d2) : d2;
    }
    if (tm_excluded(a, j, excl_offset))
        out = 0;
    tile[at] = out;
}

/* ---- batch-hard: one block per anchor row, warp-level argmax / argmin ------ */

__device__ __forceinline__ int tm_better(double v, tm_i64 j, double best, tm_i64 best_j,
                                         int farther)
{
    if (j < 0)
        return 0;
    if (best_j < 0)
        return 1;
    if (v != best)
        return farther ? v > best : v < best;
    return j < best_j;
}

__device__ void tm_block_best(double *value, tm_i64 *index, int farther, double *s_val,
                              tm_i64 *s_idx)
{
    const unsigned full = 0xffffffffu;
    for (int offset = 16; offset > 0; offset >>= 1) {
        const double v = __shfl_down_sync(full, *value, offset);
        const tm_i64 j = __shfl_down_sync(full, *index, offset);
        if (tm_better(v, j, *value, *index, farther)) {
            *value = v;
            *index = j;
        }
    }
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) {
        s_val[warp] = *value;
        s_idx[warp] = *index;
    }
    __syncthreads();
    if (warp == 0) {
        const int warps = (blockDim.x + 31) >> 5;
        *value = lane < warps ? s_val[lane] : 0.0;
        *index = lane < warps ? s_idx[lane] : -1;
        for (int offset = 16; offset > 0; offset >>= 1) {
            const double v = __shfl_down_sync(full, *value, offset);
            const tm_i64 j = __shfl_down_sync(full, *index, offset);
            if (tm_better(v, j, *value, *index, farther)) {
                *value = v;
                *index = j;
            }
        }
    }
    __syncthreads();
}

/* blockDim.x: a multiple of 32, at most 1024. */
TM_KERNEL(batch_hard)(const T *tile, tm_i64 row0, tm_i64 m, const tm_i64 *codes,
                      const tm_i64 *ref_codes, tm_i64 excl_offset, tm_i64 *positive,
                      tm_i64 *negative)
{
    __shared__ double s_val[32];
    __shared__ tm_i64 s_idx[32];
    const tm_i64 i = blockIdx.x, a = row0 + i, label = codes[a];
    const T *row = tile + i * m;
    double best_pos = 0.0, best_neg = 0.0;
    tm_i64 pos = -1, neg = -1;
    for (tm_i64 j = threadIdx.x; j < m; j += blockDim.x) {
        const double v = (double)row[j];
        if (v != v || tm_excluded(a, j, excl_offset))
            continue;
        if (ref_codes[j] == label) {
            if (tm_better(v, j, best_pos, pos, 1)) {
                best_pos = v;
                pos = j;
            }
        } else if (tm_better(v, j, best_neg, neg, 0)) {
            best_neg = v;
            neg = j;
        }
    }
    tm_block_best(&best_pos, &pos, 1, s_val, s_idx);
    tm_block_best(&best_neg, &neg, 0, s_val, s_idx);
    if (threadIdx.x == 0) {
        positive[a] = pos;
        negative[a] = neg;
    }
}

/* ---- row preparation for the sorting ops ---------------------------------- */

/* keys[i, j] = distance of a usable negative (other label, not excluded, not
 * NaN), +inf otherwise (sorted to the back); neg_count[i] += usable. */
TM_KERNEL(negative_keys)(const T *tile, tm_i64 rows, tm_i64 row0, tm_i64 m,
                         const tm_i64 *codes, const tm_i64 *ref_codes, tm_i64 excl_offset,
                         T *keys, unsigned long long *neg_count)
{
    const tm_i64 at = (tm_i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (at >= rows * m)
        return;
    const tm_i64 i = at / m, j = at - i * m, a = row0 + i;
    const T v = tile[at];
    const int usable = ref_codes[j] != codes[a] && v == v && !tm_excluded(a, j, excl_offset);
    keys[at] = usable ? v : (T)(1.0 / 0.0);
    if (usable)
        atomicAdd(neg_count + i, 1ull);
}

/* Same for positives (same label, not excluded; NaN kept, as the C core). */
TM_KERNEL(positive_keys)(const T *tile, tm_i64 rows, tm_i64 row0, tm_i64 m,
                         const tm_i64 *codes, const tm_i64 *ref_codes, tm_i64 excl_offset,
                         T *keys, unsigned long long *pos_count)
{
    const tm_i64 at = (tm_i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (at >= rows * m)
        return;
    const tm_i64 i = at / m, j = at - i * m, a = row0 + i;
    const int positive = ref_codes[j] == codes[a] && !tm_excluded(a, j, excl_offset);
    keys[at] = positive ? tile[at] : (T)(1.0 / 0.0);
    if (positive)
        atomicAdd(pos_count + i, 1ull);
}

/* ---- semi-hard: one thread per positive pair ------------------------------- */

/* select 0: closest, 1: random.  pair_row: the pair's row in the chunk,
 * pair_col: its positive (reference index). */
TM_KERNEL(semi_hard_pairs)(const T *tile, const T *sorted, const tm_i64 *order,
                           const unsigned long long *neg_count, const tm_i64 *pair_row,
                           const tm_i64 *pair_col, tm_i64 n_pairs, tm_i64 row0, tm_i64 m,
                           int select, double margin, tm_u64 seed, tm_i64 rng_offset,
                           tm_i64 *negative)
{
    const tm_i64 k = (tm_i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (k >= n_pairs)
        return;
    const tm_i64 i = pair_row[k], p = pair_col[k];
    const double dap = (double)tile[i * m + p];
    const tm_i64 n_neg = (tm_i64)neg_count[i];
    negative[k] = select == 0
        ? semi_hard_closest(sorted + i * m, order + i * m, n_neg, dap)
        : semi_hard_random(sorted + i * m, order + i * m, n_neg, dap, margin, seed,
                           row0 + i + rng_offset, p);
}

TM_KERNEL(semi_hard_all_counts)(const T *tile, const T *sorted,
                                const unsigned long long *neg_count, const tm_i64 *pair_row,
                                const tm_i64 *pair_col, tm_i64 n_pairs, tm_i64 m,
                                double margin, tm_i64 *count)
{
    const tm_i64 k = (tm_i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (k >= n_pairs)
        return;
    const tm_i64 i = pair_row[k];
    count[k] = semi_hard_all_count(sorted + i * m, (tm_i64)neg_count[i],
                                   (double)tile[i * m + pair_col[k]], margin);
}

/* Writes the pair's triplets in negative index order, numbered from start;
 * with keep (sorted triplet numbers), only the kept ones, at their rank. */
TM_KERNEL(semi_hard_all_write)(const T *tile, const tm_i64 *pair_row, const tm_i64 *pair_col,
                               const tm_i64 *start, tm_i64 n_pairs, tm_i64 row0, tm_i64 m,
                               const tm_i64 *codes, const tm_i64 *ref_codes,
                               tm_i64 excl_offset, double margin, const tm_i64 *keep,
                               tm_i64 n_keep, tm_i64 *out_anchor, tm_i64 *out_positive,
                               tm_i64 *out_negative)
{
    const tm_i64 k = (tm_i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (k >= n_pairs)
        return;
    const tm_i64 i = pair_row[k], p = pair_col[k], a = row0 + i, label = codes[a];
    const T *row = tile + i * m;
    const double dap = (double)row[p], upper = dap + margin;
    tm_i64 number = start[k], next_keep = 0;
    if (keep != 0) {
        tm_i64 lo = 0, hi = n_keep;
        while (lo < hi) {
            const tm_i64 mid = lo + (hi - lo) / 2;
            if (keep[mid] < number)
                lo = mid + 1;
            else
                hi = mid;
        }
        next_keep = lo;
    }
    for (tm_i64 j = 0; j < m; ++j) {
        const double v = (double)row[j];
        if (ref_codes[j] == label || tm_excluded(a, j, excl_offset) || !(v > dap && v <= upper))
            continue;
        tm_i64 slot = number;
        if (keep != 0) {
            if (next_keep >= n_keep || keep[next_keep] != number) {
                ++number;
                continue;
            }
            slot = next_keep++;
        }
        out_anchor[slot] = a;
        out_positive[slot] = p;
        out_negative[slot] = j;
        ++number;
    }
}

/* ---- distance-weighted: log-weights, relative weights, inverse-CDF picks ---- */

TM_KERNEL(weighted_log)(const T *tile, tm_i64 rows, tm_i64 row0, tm_i64 m,
                        const tm_i64 *codes, const tm_i64 *ref_codes, tm_i64 excl_offset,
                        double cutoff, double nonzero_loss_cutoff, double dim, double *log_w)
{
    const tm_i64 at = (tm_i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (at >= rows * m)
        return;
    const tm_i64 i = at / m, j = at - i * m, a = row0 + i;
    int eligible = 0;
    const int other = ref_codes[j] != codes[a] && !tm_excluded(a, j, excl_offset);
    const double value = weighted_log_weight<T>(tile[at], other, cutoff, nonzero_loss_cutoff,
                                                dim, &eligible);
    log_w[at] = eligible ? value : tm_neg_inf();
}

/* In place: log w -> w / w_max (0 for the ineligible; rows with no finite
 * maximum are skipped by the caller). */
TM_KERNEL(weighted_relative)(double *w, const double *row_max, tm_i64 rows, tm_i64 m)
{
    const tm_i64 at = (tm_i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (at >= rows * m)
        return;
    const double v = w[at], top = row_max[at / m];
    w[at] = v > tm_neg_inf() ? weighted_relative<T>(v, top) : 0.0;
}

TM_KERNEL(weighted_pairs)(const double *cum, const tm_i64 *last_eligible, const int *row_ok,
                          const tm_i64 *pair_row, const tm_i64 *pair_col, tm_i64 n_pairs,
                          tm_i64 row0, tm_i64 m, tm_u64 seed, tm_i64 rng_offset,
                          tm_i64 *negative)
{
    const tm_i64 k = (tm_i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (k >= n_pairs)
        return;
    const tm_i64 i = pair_row[k];
    if (!row_ok[i]) {
        negative[k] = -1;
        return;
    }
    const double *row = cum + i * m;
    const double target = tm_uniform01(seed, row0 + i + rng_offset, pair_col[k]) * row[m - 1];
    negative[k] = weighted_pick(row, m, target, last_eligible[i]);
}

/* ---- batch-all: per usable negative, a search in the sorted positives ------ *
 * pos_sorted: the row's positives ascending (n_pos of them), pos_prefix:
 * their prefix sums in double (n_pos + 1 per row, stride m + 1).  Writes the
 * negative's gradient weight into w (-count or -sum of sigmoids), its loss and
 * active count into per-row accumulators, and (hinge) one mark at the first
 * active positive rank, (soft) the sigmoids into pos_weight. */
TM_KERNEL(batch_all_negatives)(const T *tile, tm_i64 rows, tm_i64 row0, tm_i64 m,
                               const tm_i64 *codes, const tm_i64 *ref_codes,
                               tm_i64 excl_offset, const T *pos_sorted,
                               const double *pos_prefix, const unsigned long long *pos_count,
                               double margin, int soft, double *w, double *row_loss,
                               unsigned long long *row_active, unsigned int *rank_marks,
                               double *pos_weight)
{
    const tm_i64 at = (tm_i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (at >= rows * m)
        return;
    const tm_i64 i = at / m, j = at - i * m, a = row0 + i;
    w[at] = 0.0;
    const double v = (double)tile[at];
    if (ref_codes[j] == codes[a] || tm_excluded(a, j, excl_offset) || v != v)
        return;
    const tm_i64 n_pos = (tm_i64)pos_count[i];
    if (n_pos == 0)
        return;
    const T *pos = pos_sorted + i * m;
    if (!soft) {
        const double threshold = v - margin;
        const tm_i64 first = count_at_most(pos, n_pos, threshold);
        const tm_i64 c = n_pos - first;
        if (c == 0)
            return;
        const double *prefix = pos_prefix + i * (m + 1);
        atomicAdd(row_loss + i, (prefix[n_pos] - prefix[first]) - (double)c * threshold);
        atomicAdd(row_active + i, (unsigned long long)c);
        atomicAdd(rank_marks + i * (m + 1) + first, 1u);
        w[at] = -(double)c;
        return;
    }
    double loss = 0.0, neg_weight = 0.0;
    unsigned long long active = 0;
    for (tm_i64 r = 0; r < n_pos; ++r) {
        const double z = (double)pos[r] - v + margin;
        const double l = tm_softplus(z);
        loss += l;
        active += l > 0.0;
        const double g = tm_sigmoid(z);
        atomicAdd(pos_weight + i * m + r, g);
        neg_weight += g;
    }
    atomicAdd(row_loss + i, loss);
    atomicAdd(row_active + i, active);
    w[at] = -neg_weight;
}

/* ---- contrastive: every pair on its own ------------------------------------ */

TM_KERNEL(contrastive_pairs)(const T *tile, tm_i64 rows, tm_i64 row0, tm_i64 m,
                             const tm_i64 *codes, const tm_i64 *ref_codes, tm_i64 excl_offset,
                             double pos_margin, double neg_margin, int power, double *w_pos,
                             double *w_neg, double *row_loss /* rows x 2 */,
                             unsigned long long *row_counts /* rows x 4 */)
{
    const tm_i64 at = (tm_i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (at >= rows * m)
        return;
    const tm_i64 i = at / m, j = at - i * m, a = row0 + i;
    w_pos[at] = 0.0;
    w_neg[at] = 0.0;
    if (tm_excluded(a, j, excl_offset))
        return;
    const double v = (double)tile[at];
    const int positive = ref_codes[j] == codes[a];
    atomicAdd(row_counts + 4 * i + (positive ? 0 : 1), 1ull);
    const double t = positive ? v - pos_margin : neg_margin - v;
    if (!(t > 0.0))
        return;
    const double l = power == 2 ? t * t : t;
    const double dl = power == 2 ? 2.0 * t : 1.0;
    atomicAdd(row_loss + 2 * i + (positive ? 0 : 1), l);
    atomicAdd(row_counts + 4 * i + (positive ? 2 : 3), 1ull);
    if (positive)
        w_pos[at] = dl;
    else
        w_neg[at] = -dl;
}

/* ---- dense gradients: weights dL/dd -> pair coefficients -------------------- *
 * beta (T) feeds the two GEMMs; side (double) is the coefficient of the
 * pair's own rows before the norm factor: alpha = gamma = side on the
 * euclidean metrics; cosine: alpha = side / |x|^2, gamma = side / |r|^2. */
TM_KERNEL(pair_coefficient_tile)(const double *w, const T *tile, tm_i64 rows, tm_i64 row0,
                                 tm_i64 m, int metric, const double *x_norm,
                                 const double *r_norm, T *beta, double *side)
{
    const tm_i64 at = (tm_i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (at >= rows * m)
        return;
    const tm_i64 i = at / m, j = at - i * m;
    const double nx = metric == TM_COSINE ? x_norm[row0 + i] : 0.0;
    const double nr = metric == TM_COSINE ? r_norm[j] : 0.0;
    const tm_pair_coef c = pair_coefficients(metric, w[at], (double)tile[at], nx, nr);
    beta[at] = (T)c.beta;
    side[at] = metric == TM_COSINE ? c.alpha * nx * nx : c.alpha;
}

/* ---- triplet loss over given triplets -------------------------------------- */

TM_KERNEL(triplet_terms)(const T *x, const T *r, tm_i64 d, int metric, const double *x_norm,
                         const double *r_norm, const tm_i64 *anchor, const tm_i64 *positive,
                         const tm_i64 *negative, tm_i64 t, double margin, int soft,
                         double *dist_ap, double *dist_an, double *loss)
{
    const tm_i64 k = (tm_i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (k >= t)
        return;
    const tm_i64 a = anchor[k], p = positive[k], n = negative[k];
    const double na = metric == TM_COSINE ? x_norm[a] : 0.0;
    const double dap = exact_distance(x + a * d, r + p * d, d, metric, na,
                                      metric == TM_COSINE ? r_norm[p] : 0.0);
    const double dan = exact_distance(x + a * d, r + n * d, d, metric, na,
                                      metric == TM_COSINE ? r_norm[n] : 0.0);
    const double z = dap - dan + margin;
    dist_ap[k] = dap;
    dist_an[k] = dan;
    loss[k] = soft ? tm_softplus(z) : (z > 0.0 ? z : 0.0);
}

/* One thread per (triplet, feature): adds the triplet's gradient terms to gx
 * (anchor) and gr (positive, negative; gr == gx in self mode; NULL when the
 * reference gradient is not wanted), in double. */
TM_KERNEL(triplet_gradient)(const T *x, const T *r, tm_i64 d, int metric, const double *x_norm,
                            const double *r_norm, const tm_i64 *anchor, const tm_i64 *positive,
                            const tm_i64 *negative, tm_i64 t, double margin, int soft,
                            double scale, const double *dist_ap, const double *dist_an,
                            double *gx, double *gr)
{
    const tm_i64 at = (tm_i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (at >= t * d)
        return;
    const tm_i64 k = at / d, e = at - k * d;
    const double z = dist_ap[k] - dist_an[k] + margin;
    const double g = scale * (soft ? tm_sigmoid(z) : (z > 0.0 ? 1.0 : 0.0));
    if (g == 0.0)
        return;
    const tm_i64 a = anchor[k], p = positive[k], n = negative[k];
    const int cosine = metric == TM_COSINE;
    const double na = cosine ? x_norm[a] : 0.0;
    const tm_pair_coef cp = pair_coefficients(metric, g, dist_ap[k], na, cosine ? r_norm[p] : 0.0);
    const tm_pair_coef cn = pair_coefficients(metric, -g, dist_an[k], na,
                                              cosine ? r_norm[n] : 0.0);
    const double xa = (double)x[a * d + e], rp = (double)r[p * d + e], rn = (double)r[n * d + e];
    atomicAdd(gx + a * d + e, (cp.alpha + cn.alpha) * xa + cp.beta * rp + cn.beta * rn);
    if (gr != 0) {
        atomicAdd(gr + p * d + e, cp.gamma * rp + cp.beta * xa);
        atomicAdd(gr + n * d + e, cn.gamma * rn + cn.beta * xa);
    }
}
