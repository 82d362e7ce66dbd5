/*
 * The margin-softmax heads (tripmine.h, "classification heads"): softmax,
 * NormFace, CosFace, ArcFace, combined margin, SphereFace and L-Softmax, one
 * fused kernel for all of them, instantiated for float and double
 * (heads_impl.h).  This file holds what does not depend on the precision:
 * the target logit with its margin, and its derivative.
 *
 * Every non-target logit is z_ij = alpha_i beta_j (x_i . W_j) (+ b_j), with
 *   alpha_i = s / |x_i| (NormFace .. combined) or 1,
 *   beta_j  = 1 / |W_j| (NormFace .. combined, SphereFace) or 1,
 * so one tile of dot products serves every head.  The target logit is
 * recomputed from its own dot product in double and transformed by the
 * head's margin; its gradient is exact:
 *   dz_y/dx_i = A x_i + B W_y,    dz_y/dW_y = C x_i + E W_y.
 *
 * Corner rules (documented in the Python docstrings):
 *   - a zero x_i or W_j has cos 0 with anything, and no gradient flows
 *     through the normalisation that it makes undefined;
 *   - at cos theta = +-1 the direction of d(cos)/dx vanishes, so the margin's
 *     derivative there (infinite for ArcFace's cos(theta + m) at theta = 0)
 *     is taken as 0: the gradient is finite everywhere, never NaN;
 *   - ArcFace past theta + m > pi follows InsightFace: where cos theta <=
 *     cos(pi - m) the target logit is s (cos theta - m sin m);
 *   - the combined margin past m1 theta + m2 > pi continues like SphereFace's
 *     psi: (-1)^k cos(u) - 2k with u = m1 theta + m2, k = floor(u / pi),
 *     which keeps it continuous and decreasing in theta;
 *   - psi is continuously differentiable at its k boundaries (its
 *     derivative is 0 from both sides there), so no subgradient is needed.
 */
#include <math.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "fastmath.h"
#include "internal.h"

#ifndef M_PI
#define M_PI 3.14159265358979323846
#endif

/* psi(theta) = (-1)^k cos(m theta) - 2k and its derivative in c = cos theta,
 * from Chebyshev's recurrences: cos(m theta) = T_m(c), d T_m / dc = m
 * U_{m-1}(c), exact and finite at c = +-1. */
static void psi(int m, double c, double *value, double *derivative)
{
    double t_prev = 1.0, t = c;     /* T_0, T_1 */
    double u_prev = 0.0, u = 1.0;   /* U_{-1}, U_0 */
    for (int k = 1; k < m; ++k) {
        const double t_next = 2.0 * c * t - t_prev;
        const double u_next = 2.0 * c * u - u_prev;
        t_prev = t;
        t = t_next;
        u_prev = u;
        u = u_next;
    }
    /* k = floor(m theta / pi) = how many j in 1..m have theta >= j pi / m. */
    int k = 0;
    for (int j = 1; j <= m; ++j)
        k += c <= cos(j * M_PI / m);
    const double sign = (k & 1) ? -1.0 : 1.0;
    *value = sign * t - 2.0 * k;
    *derivative = sign * m * u;
}

/* F(c) and dF/dc of the angular heads, for c in [-1, 1]; sin_theta >= 0. */
static void angular(const tm_head *h, double c, double *F, double *dF)
{
    const double sin_theta = sqrt(fmax(0.0, 1.0 - c * c));
    switch (h->kind) {
    case TM_HEAD_NORMFACE:
        *F = c;
        *dF = 1.0;
        return;
    case TM_HEAD_COSFACE:
        *F = c - h->m3;
        *dF = 1.0;
        return;
    case TM_HEAD_ARCFACE: {
        const double m = h->m2;
        const int with_margin = h->easy_margin ? c > 0.0 : c > cos(M_PI - m);
        if (with_margin) {
            *F = c * cos(m) - sin_theta * sin(m);
            *dF = sin_theta > 0.0 ? cos(m) + c * sin(m) / sin_theta : 0.0;
        } else {
            *F = h->easy_margin ? c : c - m * sin(m);
            *dF = 1.0;
        }
        break;
    }
    case TM_HEAD_COMBINED: {
        const double u = h->m1 * acos(c) + h->m2;
        const double k = floor(u / M_PI);
        const double sign = fmod(k, 2.0) != 0.0 ? -1.0 : 1.0;
        *F = sign * cos(u) - 2.0 * k - h->m3;
        *dF = sin_theta > 0.0 ? sign * h->m1 * sin(u) / sin_theta : 0.0;
        break;
    }
    default: { /* SPHEREFACE, LSOFTMAX */
        double p, dp;
        psi(h->margin, c, &p, &dp);
        const double lambda = h->lambda_;
        *F = (lambda * c + p) / (1.0 + lambda);
        *dF = (lambda + dp) / (1.0 + lambda);
        return;
    }
    }
    if (h->straight_through)
        *dF = 1.0;
}

/* The target logit of one sample and its gradient's coefficients, in the
 * basis of the unit vectors u = x / |x|, v = W_y / |W_y| (SOFTMAX: the raw x
 * and W_y, with c their dot product plus the bias):
 *   dz/dx   = Px (coef[0] u + coef[1] v),   Px = 1 / |x| for the heads that
 *             normalise x (NORMFACE .. COMBINED), else 1;
 *   dz/dW_y = Pw (coef[2] u + coef[3] v),   Pw = 1 / |W_y| for the heads that
 *             normalise W (all but SOFTMAX and LSOFTMAX), else 1.
 * The 1 / |x| factors are applied by the caller after the combination, so a
 * vanishing direction gives 0, never inf * 0.  ok: both norms are nonzero
 * (otherwise c is 0 and no gradient flows through the normalisation). */
static void tm_head_target(const tm_head *h, double c, int ok, double norm_x, double norm_w,
                           double *z, double coef[4])
{
    if (h->kind == TM_HEAD_SOFTMAX) {
        *z = c;
        coef[0] = 0.0;
        coef[1] = 1.0;
        coef[2] = 1.0;
        coef[3] = 0.0;
        return;
    }
    c = c > 1.0 ? 1.0 : (c < -1.0 ? -1.0 : c);
    double F, dF;
    angular(h, c, &F, &dF);
    if (!ok)
        dF = 0.0;
    switch (h->kind) {
    case TM_HEAD_SPHEREFACE:
        *z = norm_x * F;
        coef[0] = F - dF * c;
        coef[1] = dF;
        coef[2] = norm_x * dF;
        coef[3] = -norm_x * dF * c;
        return;
    case TM_HEAD_LSOFTMAX:
        *z = norm_w * norm_x * F;
        coef[0] = norm_w * (F - dF * c);
        coef[1] = norm_w * dF;
        coef[2] = norm_x * dF;
        coef[3] = norm_x * (F - dF * c);
        return;
    default: { /* NORMFACE .. COMBINED */
        const double s = h->scale;
        *z = s * F;
        coef[0] = -s * dF * c;
        coef[1] = s * dF;
        coef[2] = s * dF;
        coef[3] = -s * dF * c;
        return;
    }
    }
}

/* The head's parameters are usable (the Python layer checks them first and
 * names the argument; this is the C core's own guard). */
static int tm_head_valid(const tm_head *h)
{
    if (h == NULL || h->kind < TM_HEAD_SOFTMAX || h->kind > TM_HEAD_LSOFTMAX)
        return 0;
    if (!isfinite(h->scale) || !isfinite(h->m1) || !isfinite(h->m2) || !isfinite(h->m3) ||
        !isfinite(h->lambda_))
        return 0;
    switch (h->kind) {
    case TM_HEAD_NORMFACE:
    case TM_HEAD_COSFACE:
    case TM_HEAD_ARCFACE:
    case TM_HEAD_COMBINED:
        if (!(h->scale > 0.0))
            return 0;
        if (h->kind == TM_HEAD_ARCFACE && !(h->m2 >= 0.0 && h->m2 < M_PI))
            return 0;
        if (h->kind == TM_HEAD_COMBINED && !(h->m1 > 0.0))
            return 0;
        return 1;
    case TM_HEAD_SPHEREFACE:
    case TM_HEAD_LSOFTMAX:
        return h->margin >= 1 && h->margin <= 64 && h->lambda_ >= 0.0;
    default:
        return 1;
    }
}

#define TM_BITS 32
#include "template.h"
#include "heads_impl.h"
#undef TM_BITS
#define TM_BITS 64
#include "template.h"
#include "heads_impl.h"
#undef TM_BITS
