// Host build of csrc/cuda/row_logic.cuh (the per-row logic of the CUDA
// kernels), so tests/test_gpu_row_logic.py can check it against the C core on
// a machine without a GPU.  Built by that test with the host C++ compiler.
#include <cmath>
#include <math.h> /* expf, HUGE_VAL in the global namespace */
using std::exp;
using std::fabs;
using std::log;
using std::log1p;
using std::sqrt;

#include "row_logic.cuh"

extern "C" {

double shim_uniform01(tm_u64 seed, tm_i64 anchor, tm_i64 draw)
{
    return tm_uniform01(seed, anchor, draw);
}

tm_i64 shim_uniform_index(tm_u64 seed, tm_i64 anchor, tm_i64 draw, tm_i64 count)
{
    return tm_uniform_index(seed, anchor, draw, count);
}

void shim_log_f32(float *v, tm_i64 n)
{
    for (tm_i64 i = 0; i < n; ++i)
        v[i] = tm_log_f32(v[i]);
}

void shim_exp_nonpositive_f32(float *v, tm_i64 n)
{
    for (tm_i64 i = 0; i < n; ++i)
        v[i] = tm_exp_nonpositive_f32(v[i]);
}

// One anchor row: sorted usable negatives (values as double, order), then per pair.
tm_i64 shim_semi_hard_closest(const double *sorted, const tm_i64 *order, tm_i64 n_neg, double dap)
{
    return semi_hard_closest(sorted, order, n_neg, dap);
}

tm_i64 shim_semi_hard_random(const double *sorted, const tm_i64 *order, tm_i64 n_neg, double dap,
                             double margin, tm_u64 seed, tm_i64 rng_anchor, tm_i64 positive)
{
    return semi_hard_random(sorted, order, n_neg, dap, margin, seed, rng_anchor, positive);
}

tm_i64 shim_semi_hard_all_count(const double *sorted, tm_i64 n_neg, double dap, double margin)
{
    return semi_hard_all_count(sorted, n_neg, dap, margin);
}

// distance-weighted, one row: relative weights (0 for the ineligible), as the
// weighted_log + weighted_relative kernels produce them; returns 0 when the
// row has no finite maximum (skipped), and the last eligible column.
int shim_weighted_row(int single, const void *dist, const int *other, tm_i64 m, double cutoff,
                      double nonzero_loss_cutoff, double dim, double *w, tm_i64 *last_eligible)
{
    double top = -HUGE_VAL;
    *last_eligible = -1;
    for (tm_i64 j = 0; j < m; ++j) {
        int eligible = 0;
        const double value = single
            ? weighted_log_weight<float>(((const float *)dist)[j], other[j], cutoff,
                                         nonzero_loss_cutoff, dim, &eligible)
            : weighted_log_weight<double>(((const double *)dist)[j], other[j], cutoff,
                                          nonzero_loss_cutoff, dim, &eligible);
        w[j] = eligible ? value : -HUGE_VAL;
        if (eligible) {
            *last_eligible = j;
            top = value > top ? value : top;
        }
    }
    if (!(top > -HUGE_VAL && top < HUGE_VAL))
        return 0;
    for (tm_i64 j = 0; j < m; ++j)
        w[j] = w[j] > -HUGE_VAL ? (single ? weighted_relative<float>(w[j], top)
                                          : weighted_relative<double>(w[j], top))
                                : 0.0;
    return 1;
}

tm_i64 shim_weighted_pick(const double *cum, tm_i64 m, double target, tm_i64 last_eligible)
{
    return weighted_pick(cum, m, target, last_eligible);
}

void shim_pair_coefficients(int metric, double w, double dist, double norm_a, double norm_j,
                            double *out)
{
    const tm_pair_coef c = pair_coefficients(metric, w, dist, norm_a, norm_j);
    out[0] = c.alpha;
    out[1] = c.beta;
    out[2] = c.gamma;
}

double shim_softplus(double z) { return tm_softplus(z); }
double shim_sigmoid(double z) { return tm_sigmoid(z); }

}
