/*
 * The fused margin-softmax kernel for one precision (heads.c; template.h).
 *
 * 1. Prepare (one parallel region): the norms (robust to any magnitude),
 *    each sample's target logit (its own cosine or dot product, in double,
 *    then the margin) and gradient coefficients; x (or its unit vector, for
 *    the heads that normalise x) packed into MR-row panels and, for
 *    weight_grad, s x^ (or x) into column panels.  The heads that normalise
 *    W pack its unit vectors as they go, so every tile holds cosines.
 * 2. Forward, over blocks of samples (the pool's work items): each block
 *    walks the classes in blocks, in increasing order.  A tile of dot
 *    products (the micro-kernel, on W's block packed once per visit) becomes
 *    logits in place; an online log-sum-exp keeps a running max and sum per
 *    row.  With grad, the same walk also accumulates sum_j exp(z_ij - max_i)
 *    W^_j (W_j where W is not normalised) over the non-target classes on
 *    the micro-kernels (rescaled when the max grows, as FlashAttention
 *    does), which is dL/dx_i up to a
 *    per-row factor once the row's sum is known: dX costs one more
 *    GEMM-sized product and no second walk.
 * 3. Backward for weight_grad, over blocks of classes: each block walks the
 *    samples in blocks, recomputes the same tiles (the same bits: same
 *    panels, same kernel), forms G = dL/dz for its classes and adds G^T
 *    (s x^, or x) into its own rows of weight_grad.  Then the target terms, in
 *    sample order.
 * Every per-row and per-class sum runs in a fixed order over fixed blocks,
 * so the results do not depend on the thread count.  Memory: O((n + c) +
 * n d) plus one block's tiles per thread; never n x c.
 */

/* Samples per forward block (rounded up to MR): large enough that packing
 * W's blocks (once per sample block) costs a few percent of the products. */
#ifndef TM_HEAD_ROWS
#define TM_HEAD_ROWS 240
#endif
/* Forward blocks may be larger (their size changes no result): fewer blocks
 * pack W fewer times.  Blocks per thread, and the most rows of one. */
#ifndef TM_HEAD_FORWARD_SPLIT
#define TM_HEAD_FORWARD_SPLIT 1
#endif
#ifndef TM_HEAD_ROWS_MAX
#define TM_HEAD_ROWS_MAX 528
#endif
/* Bytes of one packed block of W (it stays in L2 while the samples' panels
 * stream past it). */
#ifndef TM_HEAD_CLASS_BYTES
#define TM_HEAD_CLASS_BYTES (512 * 1024)
#endif

/* Below about this many multiply-adds a call is not worth a thread team. */
#ifndef TM_HEAD_MIN_PARALLEL_WORK
#define TM_HEAD_MIN_PARALLEL_WORK (1 << 18)
#endif

/* |a| in double without overflow or underflow of the squares: a row whose sum of
 * squares leaves [2^-960, 2^960] (only float64 rows of extreme magnitude) is
 * scaled by a power of two first, which is exact.  The unit vector is then
 * (a[p] * *scale) * *inv, both factors finite; a zero row has inv = 0. */
static double TM_FN(head_norm)(const TM_REAL *a, int64_t d, double *scale, double *inv)
{
    /* Eight running sums (independent chains, which vectorise), added in a fixed order. */
    double lanes[8] = {0};
    int64_t p8 = 0;
    for (; p8 + 8 <= d; p8 += 8)
        for (int l = 0; l < 8; ++l)
            lanes[l] += (double)a[p8 + l] * (double)a[p8 + l];
    for (int l = 0; p8 + l < d; ++l)
        lanes[l] += (double)a[p8 + l] * (double)a[p8 + l];
    double sum = ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) +
                 ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
    *scale = 1.0;
    if (sum >= 0x1p-960 && sum <= 0x1p960) {
        const double norm = sqrt(sum);
        *inv = 1.0 / norm;
        return norm;
    }
    double most = 0.0;
    for (int64_t p = 0; p < d; ++p)
        most = fmax(most, fabs((double)a[p]));
    if (most == 0.0) {
        *inv = 0.0;
        return 0.0;
    }
    int e;
    frexp(most, &e);
    /* 2^-e brings the largest entry to [1/2, 1); capped at 2^1023 (the subnormals'
     * largest entry then lands at >= 2^-51, still far from underflow). */
    const double k = ldexp(1.0, -e < 1023 ? -e : 1023);
    sum = 0.0;
    for (int64_t p = 0; p < d; ++p) {
        const double v = (double)a[p] * k;
        sum += v * v;
    }
    const double r = sqrt(sum);
    *scale = k;
    *inv = 1.0 / r;
    return r / k; /* inf only where the true norm passes the largest double */
}

typedef struct {
    const tm_head *head;
    const TM_REAL *x, *w, *bias;
    const int64_t *labels;
    const double *class_weight, *upstream;
    int64_t n, d, c;
    int norm_x, norm_w; /* the head normalises x (W): logits are cosines */
    int want_grad, want_wgrad;
    int backward; /* which walk head_range runs */
    /* A shard of the classes (tm_softmax_head_shard): labels may be -1 (the target lies in
     * another shard); partial (first call) receives each row's statistics, lse_in (second
     * call) is the log-sum-exp over every shard, and upstream holds each row's gain. */
    int shard;
    double *partial;
    const double *lse_in;
    double red;
    TM_REAL scale; /* s of the normalised heads, 1 otherwise */
    const tm_kernel_set *kernels;
    TM_FN(tm_dot_kernel) dot;
    tm_softmax_max_kernel row_max;
    tm_softmax_exp_kernel row_exp;
    tm_softmax_grad_kernel row_grad;
    tm_pack_panel_kernel pack_panel;
    int mr, nr;
    int64_t rb, cb, ldt;
    int64_t rb_forward; /* samples per forward block: any multiple of MR gives the same bits */
    /* unit vectors: u = (a * scale) * inv, scale a power of two (head_norm) */
    double *w_scale, *w_inv; /* c */
    TM_REAL *w_unit;          /* c: scale * inv in the working precision, 0 if it overflows */
    double *x_scale, *x_inv, *wy_scale, *wy_inv, *coef; /* n (coef: 4 n) */
    TM_REAL *tz;
    double *lse, *gain, *gain_y, *sample_loss;
    int64_t *argmax;
    TM_REAL *xpack, *xcol;
    TM_REAL *grad, *wgrad, *bgrad;
    char *scratch;
    size_t scratch_stride;
} TM_FN(head_job);

/* One participant's scratch, carved from its slice of job->scratch. */
typedef struct {
    TM_REAL *wpanel, *tile, *wcol, *acc, *gemm, *best;
    double *m, *s, *bs;
    int64_t *bestj;
} TM_FN(head_scratch);

static size_t TM_FN(head_carve)(const TM_FN(head_job) *job, char *base,
                                TM_FN(head_scratch) *out)
{
    const int64_t d = job->d, cb = job->cb, ldt = job->ldt;
    const int64_t rb = job->rb > job->rb_forward ? job->rb : job->rb_forward;
    const int64_t d_cols = TM_FN(round_up)(d > 0 ? d : 1, job->nr);
    size_t offset = 0;
#define TM_HEAD_TAKE(field, type, count)                                                  \
    do {                                                                                  \
        if (out != NULL)                                                                  \
            out->field = (type *)(void *)(base + offset);                                 \
        offset += ((size_t)(count) * sizeof(type) + 63) / 64 * 64;                        \
    } while (0)
    TM_HEAD_TAKE(wpanel, TM_REAL, ldt * d);
    TM_HEAD_TAKE(tile, TM_REAL, TM_FN(round_up)(rb, job->mr) * ldt);
    TM_HEAD_TAKE(wcol, TM_REAL, job->want_grad ? d_cols * cb : 0);
    TM_HEAD_TAKE(acc, TM_REAL, job->want_grad ? rb * d : 0);
    TM_HEAD_TAKE(gemm, TM_REAL, tm_gemm_scratch_elems(job->kernels));
    TM_HEAD_TAKE(best, TM_REAL, rb);
    TM_HEAD_TAKE(m, double, rb);
    TM_HEAD_TAKE(s, double, rb);
    TM_HEAD_TAKE(bs, double, cb);
    TM_HEAD_TAKE(bestj, int64_t, rb);
#undef TM_HEAD_TAKE
    return offset;
}

/* ---- 1. preparation --------------------------------------------------------- */

static void TM_FN(head_prepare_range)(void *ctx, int participant, int64_t begin, int64_t end)
{
    (void)participant;
    TM_FN(head_job) *job = ctx;
    const int64_t d = job->d, c = job->c, n = job->n, mr = job->mr, nr = job->nr;
    const int softmax = job->head->kind == TM_HEAD_SOFTMAX;
    for (int64_t item = begin; item < end; ++item) {
        if (item < c) { /* class j: its unit vector's factors */
            if (!job->norm_w)
                continue;
            TM_FN(head_norm)(job->w + item * d, d, &job->w_scale[item], &job->w_inv[item]);
            const double f = job->w_scale[item] * job->w_inv[item];
            const TM_REAL fr = (TM_REAL)f;
            job->w_unit[item] = isfinite(f) && isfinite((double)fr) ? fr : 0;
            continue;
        }
        const int64_t row = item - c;
        TM_REAL *panel = job->xpack + (row / mr) * mr * d + row % mr;
        if (row >= n) { /* the zero padding of the last panel */
            for (int64_t p = 0; p < d; ++p)
                panel[p * mr] = 0;
            continue;
        }
        const TM_REAL *xi = job->x + row * d;
        const int64_t y = job->labels[row];
        double xs = 1.0, xv = 1.0, ws = 1.0, wv = 1.0, nx = 0.0, nw = 0.0, cos = 0.0;
        if (!softmax)
            nx = TM_FN(head_norm)(xi, d, &xs, &xv);
        double z = 0.0;
        if (y >= 0) { /* y = -1: the target lies in another shard */
            const TM_REAL *wy = job->w + y * d;
            if (softmax) {
                for (int64_t p = 0; p < d; ++p)
                    cos += (double)xi[p] * (double)wy[p];
                if (job->bias != NULL)
                    cos += (double)job->bias[y];
            } else {
                nw = TM_FN(head_norm)(wy, d, &ws, &wv);
                for (int64_t p = 0; p < d; ++p)
                    cos += ((double)xi[p] * xs * xv) * ((double)wy[p] * ws * wv);
            }
            tm_head_target(job->head, cos, nx > 0.0 && nw > 0.0, nx, nw, &z,
                           job->coef + 4 * row);
        } else {
            memset(job->coef + 4 * row, 0, 4 * sizeof(double));
        }
        job->tz[row] = (TM_REAL)z;
        job->x_scale[row] = xs;
        job->x_inv[row] = xv;
        job->wy_scale[row] = ws;
        job->wy_inv[row] = wv;
        const TM_REAL s = job->scale;
        for (int64_t p = 0; p < d; ++p) {
            const TM_REAL v = job->norm_x ? (TM_REAL)((double)xi[p] * xs * xv) : xi[p];
            panel[p * mr] = v;
            if (job->xcol != NULL)
                job->xcol[((p / nr) * n + row) * nr + p % nr] = job->norm_x ? s * v : v;
        }
        if (job->xcol != NULL)
            for (int64_t p = d; p % nr != 0; ++p)
                job->xcol[((p / nr) * n + row) * nr + p % nr] = 0;
    }
}

/* Features p0 .. p1 - 1 of class j's row as the head sees it (W_j, or its unit
 * vector) to out[0], out[stride], ...: both packings use it, so they hold the
 * same bits.  The working-precision factor serves unless it overflowed (a
 * float64 row of subnormal norm), which takes the two double factors. */
static inline void TM_FN(head_w_span)(const TM_FN(head_job) *job, int64_t j, int64_t p0,
                                      int64_t p1, TM_REAL *out, int64_t stride)
{
    const TM_REAL *src = job->w + j * job->d;
    if (!job->norm_w) {
        for (int64_t p = p0; p < p1; ++p)
            out[(p - p0) * stride] = src[p];
        return;
    }
    const TM_REAL f = job->w_unit[j];
    if (f != 0 || job->w_inv[j] == 0.0) {
        for (int64_t p = p0; p < p1; ++p)
            out[(p - p0) * stride] = src[p] * f;
        return;
    }
    const double ws = job->w_scale[j], wv = job->w_inv[j];
    for (int64_t p = p0; p < p1; ++p)
        out[(p - p0) * stride] = (TM_REAL)((double)src[p] * ws * wv);
}

/* W's rows j0 .. j0 + ncols - 1 as NR-row panels, k-major, zero padded:
 * dst[(q d + p) nr + i] = W[j0 + q nr + i][p], times the row's working-precision
 * unit factor where W is normalised (the kernel set's transposing pack); a panel
 * with a row whose factor overflowed takes head_w_span's double path. */
static void TM_FN(head_pack_rows)(const TM_FN(head_job) *job, int64_t j0, int64_t ncols,
                                  TM_REAL *dst)
{
    const int64_t d = job->d, nr = job->nr, panels = (ncols + nr - 1) / nr;
    TM_REAL ones[64], *factors = ones;
    for (int64_t i = 0; i < nr; ++i)
        ones[i] = 1;
    for (int64_t q = 0; q < panels; ++q) {
        TM_REAL *out = dst + q * d * nr;
        const int64_t first = j0 + q * nr;
        const int64_t width = ncols - q * nr < nr ? ncols - q * nr : nr;
        int exceptional = 0;
        if (job->norm_w) {
            factors = job->w_unit + first;
            for (int64_t i = 0; i < width; ++i)
                exceptional |= factors[i] == 0 && job->w_inv[first + i] != 0.0;
        }
        if (!exceptional) {
            job->pack_panel(job->w + first * d, d, factors, width, d, nr, out);
            continue;
        }
        if (width < nr)
            memset(out, 0, (size_t)(d * nr) * sizeof(TM_REAL));
        for (int64_t i = 0; i < width; ++i)
            TM_FN(head_w_span)(job, first + i, 0, d, out + i, nr);
    }
}

/* The same rows (W_j or its unit vector) as column panels, the K side of dX's
 * product: dst[(q ncols + p) nr + i] = row j0 + p, feature q nr + i. */
static void TM_FN(head_pack_cols)(const TM_FN(head_job) *job, int64_t j0, int64_t ncols,
                                  TM_REAL *dst)
{
    const int64_t d = job->d, nr = job->nr, panels = (d + nr - 1) / nr;
    for (int64_t p = 0; p < ncols; ++p)
        for (int64_t q = 0; q < panels; ++q) {
            TM_REAL *out = dst + (q * ncols + p) * nr;
            const int64_t width = d - q * nr < nr ? d - q * nr : nr;
            TM_FN(head_w_span)(job, j0 + p, q * nr, q * nr + width, out, 1);
            for (int64_t i = width; i < nr; ++i)
                out[i] = 0;
        }
}

/* The tile of dot products of samples row0 .. row0 + nrows - 1 with the
 * packed class block, then logits in place: s t (the normalised heads, whose
 * panels hold unit vectors), t + b_j (softmax with a bias) or t.
 * Both walks call this, so they see the same bits. */
static void TM_FN(head_logits)(const TM_FN(head_job) *job, int64_t row0, int64_t nrows,
                               int64_t j0, int64_t ncols, const TM_REAL *wpanel, TM_REAL *tile)
{
    const int64_t d = job->d, mr = job->mr, nr = job->nr, ldt = job->ldt;
    const int64_t row_panels = (nrows + mr - 1) / mr, col_panels = (ncols + nr - 1) / nr;
    const TM_REAL *a0 = job->xpack + row0 * d;
    for (int64_t jp = 0; jp < col_panels; ++jp)
        for (int64_t ip = 0; ip < row_panels; ++ip)
            job->dot(d, a0 + ip * mr * d, wpanel + jp * nr * d, tile + ip * mr * ldt + jp * nr,
                     ldt);
    const TM_REAL *bias = job->bias != NULL ? job->bias + j0 : NULL;
    const TM_REAL s = job->scale;
    for (int64_t i = 0; i < nrows; ++i) {
        TM_REAL *t = tile + i * ldt;
        if (job->norm_x)
            for (int64_t j = 0; j < ncols; ++j)
                t[j] = s * t[j];
        if (bias != NULL)
            for (int64_t j = 0; j < ncols; ++j)
                t[j] = t[j] + bias[j];
    }
}

/* ---- 2. forward (and dX) over sample blocks ------------------------------------ */

static void TM_FN(head_forward_block)(TM_FN(head_job) *job, TM_FN(head_scratch) *sc,
                                      int64_t unit)
{
    const int64_t n = job->n, d = job->d, c = job->c, ldt = job->ldt;
    const int64_t row0 = unit * job->rb_forward;
    const int64_t nrows = n - row0 < job->rb_forward ? n - row0 : job->rb_forward;
    const int grad = job->want_grad;
    for (int64_t i = 0; i < nrows; ++i) {
        sc->m[i] = -INFINITY;
        sc->s[i] = 0.0;
        sc->best[i] = -INFINITY;
        sc->bestj[i] = -1;
    }
    if (grad)
        memset(sc->acc, 0, (size_t)(nrows * d) * sizeof(TM_REAL));
    for (int64_t j0 = 0; j0 < c; j0 += job->cb) {
        const int64_t ncols = c - j0 < job->cb ? c - j0 : job->cb;
        TM_FN(head_pack_rows)(job, j0, ncols, sc->wpanel);
        TM_FN(head_logits)(job, row0, nrows, j0, ncols, sc->wpanel, sc->tile);
        if (grad)
            TM_FN(head_pack_cols)(job, j0, ncols, sc->wcol);
        for (int64_t i = 0; i < nrows; ++i) {
            const int64_t row = row0 + i;
            TM_REAL *t = sc->tile + i * ldt;
            const TM_REAL base_max = (TM_REAL)job->row_max(t, ncols);
            if (base_max > sc->best[i]) { /* the first class reaching the max */
                int64_t j = 0;
                while (t[j] != base_max)
                    ++j;
                sc->best[i] = base_max;
                sc->bestj[i] = j0 + j;
            }
            const int64_t y = job->labels[row] - j0;
            const int has_target = y >= 0 && y < ncols;
            /* The block's max with the target's margin logit in place of its plain one:
             * a pass over the block again only where the plain one was the max (the
             * running max must be exact: a margin logit far below it, at a large scale,
             * would otherwise underflow every exponential). */
            TM_REAL block_max = base_max;
            if (has_target) {
                const int was_max = t[y] == base_max;
                t[y] = job->tz[row];
                if (was_max)
                    block_max = (TM_REAL)job->row_max(t, ncols);
                else if (t[y] > block_max)
                    block_max = t[y];
            }
            if ((double)block_max > sc->m[i]) {
                const double f = exp(sc->m[i] - (double)block_max);
                sc->s[i] *= f;
                if (grad && sc->m[i] != -INFINITY) {
                    const TM_REAL fr = (TM_REAL)f;
                    TM_REAL *acc = sc->acc + i * d;
                    for (int64_t p = 0; p < d; ++p)
                        acc[p] *= fr;
                }
                sc->m[i] = (double)block_max;
            }
            sc->s[i] += job->row_exp(t, ncols, sc->m[i]);
            if (has_target) /* the target's own gradient is formed apart */
                t[y] = 0;
        }
        if (grad) {
            const unsigned mxcsr = tm_flush_subnormals_begin();
            TM_FN(tm_gemm_acc)(job->kernels, nrows, ncols, sc->tile, ldt, 0, sc->wcol, ncols, 0,
                               d, sc->acc, d, sc->gemm);
            tm_flush_subnormals_end(mxcsr);
        }
    }
    for (int64_t i = 0; i < nrows; ++i) {
        const int64_t row = row0 + i, y = job->labels[row];
        const double local_lse = sc->m[i] + log(sc->s[i]);
        const double tz = (double)job->tz[row];
        if (job->partial != NULL) { /* a shard's first call: its statistics only */
            double *part = job->partial + 4 * row;
            part[0] = local_lse;
            part[1] = y >= 0 ? tz : 0.0;
            part[2] = (double)sc->best[i];
            part[3] = (double)sc->bestj[i];
            continue;
        }
        /* A shard's second call takes the log-sum-exp over every shard. */
        const double lse = job->lse_in != NULL ? job->lse_in[row] : local_lse;
        const double cw = job->class_weight != NULL ? job->class_weight[y] : 1.0;
        job->lse[row] = lse;
        job->sample_loss[row] = cw * (lse - tz);
        job->argmax[row] = sc->bestj[i];
        if (!grad && !job->want_wgrad)
            continue;
        const double g = cw * job->red * (job->upstream != NULL ? job->upstream[row] : 1.0);
        const double gy = y >= 0 ? g * (exp(tz - lse) - 1.0) : 0.0;
        job->gain[row] = g;
        job->gain_y[row] = gy;
        if (!grad)
            continue;
        /* Non-target: G_ij = (g / S_i) p~_ij, a_i = sum_j G_ij W^_j (acc holds it up to
         * g / S_i); with x normalised, z_ij = s x^_i . W^_j and
         * dX_i = (s / |x_i|) (a_i - (x^_i . a_i) x^_i): a's part orthogonal to x^_i.
         * Target: gy (coef[0] u + coef[1] v), times 1 / |x_i| likewise. */
        const double gs = job->lse_in != NULL ? g * exp(sc->m[i] - lse) : g / sc->s[i];
        const double *co = job->coef + 4 * row;
        const double xs = job->x_scale[row], xv = job->x_inv[row];
        const double ws = job->wy_scale[row], wv = job->wy_inv[row];
        const double s = (double)job->scale;
        const int unit_x = job->head->kind != TM_HEAD_SOFTMAX;
        const TM_REAL *xi = job->x + row * d, *wy = job->w + (y >= 0 ? y : 0) * d;
        const TM_REAL *acc = sc->acc + i * d;
        TM_REAL *out = job->grad + row * d;
        double radial = 0.0;
        if (job->norm_x)
            for (int64_t p = 0; p < d; ++p)
                radial += ((double)xi[p] * xs * xv) * (double)acc[p];
        for (int64_t p = 0; p < d; ++p) {
            const double u = unit_x ? (double)xi[p] * xs * xv : (double)xi[p];
            const double v = unit_x ? (double)wy[p] * ws * wv : (double)wy[p];
            const double target = gy * (co[0] * u + co[1] * v);
            double value;
            if (job->norm_x)
                value = ((gs * s * ((double)acc[p] - radial * u) + target) * xv) * xs;
            else
                value = gs * (double)acc[p] + target;
            out[p] = (TM_REAL)value;
        }
    }
}

/* ---- 3. weight_grad over class blocks ---------------------------------------- */

/* G = g_i exp(z - lse_i) over columns [lo, hi) of one tile row, in place, with
 * the column sums the bias needs. */
static void TM_FN(head_g_span)(const TM_FN(head_job) *job, TM_REAL *t, int64_t lo, int64_t hi,
                               double g, double lse, double *bs)
{
    job->row_grad(t + lo, hi - lo, g, lse);
    if (bs != NULL)
        for (int64_t j = lo; j < hi; ++j)
            bs[j] += (double)t[j];
}

static void TM_FN(head_backward_block)(TM_FN(head_job) *job, TM_FN(head_scratch) *sc,
                                       int64_t unit)
{
    const int64_t n = job->n, d = job->d, c = job->c, ldt = job->ldt;
    const int64_t j0 = unit * job->cb;
    const int64_t ncols = c - j0 < job->cb ? c - j0 : job->cb;
    TM_REAL *wg = job->wgrad + j0 * d;
    memset(wg, 0, (size_t)(ncols * d) * sizeof(TM_REAL));
    double *bs = job->bgrad != NULL ? sc->bs : NULL;
    for (int64_t j = 0; j < ncols; ++j)
        sc->bs[j] = 0.0;
    TM_FN(head_pack_rows)(job, j0, ncols, sc->wpanel);
    for (int64_t row0 = 0; row0 < n; row0 += job->rb) {
        const int64_t nrows = n - row0 < job->rb ? n - row0 : job->rb;
        TM_FN(head_logits)(job, row0, nrows, j0, ncols, sc->wpanel, sc->tile);
        for (int64_t i = 0; i < nrows; ++i) {
            const int64_t row = row0 + i;
            TM_REAL *t = sc->tile + i * ldt;
            const double g = job->gain[row], lse = job->lse[row];
            const int64_t y = job->labels[row] - j0;
            if (y >= 0 && y < ncols) { /* the target's terms come later */
                TM_FN(head_g_span)(job, t, 0, y, g, lse, bs);
                t[y] = 0;
                TM_FN(head_g_span)(job, t, y + 1, ncols, g, lse, bs);
            } else {
                TM_FN(head_g_span)(job, t, 0, ncols, g, lse, bs);
            }
        }
        const unsigned mxcsr = tm_flush_subnormals_begin();
        TM_FN(tm_gemm_acc)(job->kernels, ncols, nrows, sc->tile, ldt, 1, job->xcol, n, row0, d,
                           wg, d, sc->gemm);
        tm_flush_subnormals_end(mxcsr);
    }
    /* With W normalised, z_ij = xcol_i . W^_j, so with b_j = sum_i G_ij xcol_i (the row
     * so far): dW_j = (1 / |W_j|) (b_j - (W^_j . b_j) W^_j), b's part orthogonal to W^_j. */
    if (job->norm_w)
        for (int64_t j = 0; j < ncols; ++j) {
            TM_REAL *row = wg + j * d;
            const TM_REAL *wj = job->w + (j0 + j) * d;
            const double ws = job->w_scale[j0 + j], wv = job->w_inv[j0 + j];
            double radial = 0.0;
            for (int64_t p = 0; p < d; ++p)
                radial += ((double)wj[p] * ws * wv) * (double)row[p];
            for (int64_t p = 0; p < d; ++p)
                row[p] = (TM_REAL)((((double)row[p] - radial * ((double)wj[p] * ws * wv)) * wv) *
                                   ws);
        }
    if (job->bgrad != NULL)
        for (int64_t j = 0; j < ncols; ++j)
            job->bgrad[j0 + j] = (TM_REAL)sc->bs[j];
}

/* The pool's work items of the walk in job->backward: sample blocks (forward) or class
 * blocks (weight_grad), each with its participant's scratch. */
static void TM_FN(head_range)(void *ctx, int participant, int64_t begin, int64_t end)
{
    TM_FN(head_job) *job = ctx;
    TM_FN(head_scratch) sc;
    TM_FN(head_carve)(job, job->scratch + (size_t)participant * job->scratch_stride, &sc);
    for (int64_t unit = begin; unit < end; ++unit) {
        if (job->backward)
            TM_FN(head_backward_block)(job, &sc, unit);
        else
            TM_FN(head_forward_block)(job, &sc, unit);
    }
}

/* ---- the entry point ----------------------------------------------------------- */

/* Both entry points: shard = 0 (tm_softmax_head), or a shard's first call (partial) or
 * second (lse_in, upstream = the rows' gains). */
static int TM_FN(head_run)(const tm_head *head, const TM_REAL *x, int64_t n, int64_t d,
                           const int64_t *labels, const TM_REAL *weight, int64_t c,
                           const TM_REAL *bias, const double *class_weight, int reduction,
                           const double *upstream, double *loss, double *per_sample,
                           int64_t *n_correct, TM_REAL *grad, TM_REAL *weight_grad,
                           TM_REAL *bias_grad, int shard, double *partial,
                           const double *lse_in)
{
    if (!tm_head_valid(head) || n < 0 || d < 0 || c < 0 || (n > 0 && c < 1))
        return TM_ERR_INVALID;
    if (reduction != TM_REDUCE_MEAN && reduction != TM_REDUCE_SUM &&
        reduction != TM_REDUCE_NONE)
        return TM_ERR_INVALID;
    if ((n > 0 && d > 0 && x == NULL) || (c > 0 && d > 0 && weight == NULL) ||
        (n > 0 && labels == NULL))
        return TM_ERR_INVALID;
    if ((bias != NULL || bias_grad != NULL) && head->kind != TM_HEAD_SOFTMAX)
        return TM_ERR_INVALID;
    if (bias_grad != NULL && weight_grad == NULL)
        return TM_ERR_INVALID;
    for (int64_t i = 0; i < n; ++i)
        if (labels[i] < (shard ? -1 : 0) || labels[i] >= c)
            return TM_ERR_INVALID;
    if (shard && lse_in != NULL)
        for (int64_t i = 0; i < n; ++i)
            if (!isfinite(lse_in[i]))
                return TM_ERR_INVALID;
    if (class_weight != NULL)
        for (int64_t j = 0; j < c; ++j)
            if (!(class_weight[j] >= 0.0) || !isfinite(class_weight[j]))
                return TM_ERR_INVALID;

    TM_FN(head_job) job;
    memset(&job, 0, sizeof job);
    job.head = head;
    job.x = x;
    job.w = weight;
    job.bias = bias;
    job.labels = labels;
    job.class_weight = class_weight;
    job.upstream = upstream;
    job.n = n;
    job.d = d;
    job.c = c;
    const int kind = head->kind;
    job.norm_x = kind != TM_HEAD_SOFTMAX && kind != TM_HEAD_LSOFTMAX &&
                 kind != TM_HEAD_SPHEREFACE;
    job.norm_w = kind != TM_HEAD_SOFTMAX && kind != TM_HEAD_LSOFTMAX;
    job.scale = job.norm_x ? (TM_REAL)head->scale : 1;
    job.want_grad = grad != NULL;
    job.want_wgrad = weight_grad != NULL;
    job.grad = grad;
    job.wgrad = weight_grad;
    job.bgrad = bias_grad;
    job.shard = shard;
    job.partial = partial;
    job.lse_in = lse_in;
    job.kernels = tm_active_kernels();
    job.dot = TM_FN(kernel_dot)(job.kernels);
    job.row_max = TM_FN(kernel_softmax_max)(job.kernels);
    job.row_exp = TM_FN(kernel_softmax_exp)(job.kernels);
    job.row_grad = TM_FN(kernel_softmax_grad)(job.kernels);
    job.pack_panel = TM_FN(kernel_pack_panel)(job.kernels);
    job.mr = TM_FN(kernel_mr)(job.kernels);
    job.nr = TM_FN(kernel_nr)(job.kernels);
    job.rb = TM_FN(round_up)(TM_HEAD_ROWS, job.mr);
    {
        int64_t cb = TM_HEAD_CLASS_BYTES / ((int64_t)sizeof(TM_REAL) * (d > 0 ? d : 1));
        cb = cb / job.nr * job.nr;
        job.cb = cb < job.nr ? job.nr : (cb > 1024 ? 1024 : cb);
    }
    job.ldt = TM_FN(round_up)(job.cb, job.nr);

    /* Reduction: mean divides by the weight the samples carry. */
    double divisor = (double)n;
    if (class_weight != NULL) {
        divisor = 0.0;
        for (int64_t i = 0; i < n; ++i)
            divisor += class_weight[labels[i]];
    }
    job.red = reduction == TM_REDUCE_MEAN ? (divisor > 0.0 ? 1.0 / divisor : 0.0) : 1.0;

    if (n == 0 || c == 0) {
        if (loss != NULL)
            *loss = 0.0;
        if (n_correct != NULL)
            *n_correct = 0;
        if (weight_grad != NULL)
            memset(weight_grad, 0, (size_t)(c * d) * sizeof(TM_REAL));
        if (bias_grad != NULL)
            memset(bias_grad, 0, (size_t)c * sizeof(TM_REAL));
        return TM_OK;
    }

    /* Every allocation before any output is written. */
    const int64_t n_pad = TM_FN(round_up)(n, job.mr);
    const int64_t d_cols = TM_FN(round_up)(d > 0 ? d : 1, job.nr);
    size_t bytes_xpack, bytes_xcol, bytes_c;
    int st = tm_bytes(n_pad, d, sizeof(TM_REAL), &bytes_xpack);
    if (st == TM_OK)
        st = tm_bytes(weight_grad != NULL ? n : 0, d_cols, sizeof(TM_REAL), &bytes_xcol);
    if (st == TM_OK)
        st = tm_bytes(c, 1, sizeof(double), &bytes_c);
    if (st != TM_OK)
        return st;
    const int64_t backward_units = weight_grad != NULL ? (c + job.cb - 1) / job.cb : 0;
    const int64_t row_panels = n_pad / job.mr;
    const int64_t units = row_panels > backward_units ? row_panels : backward_units;
    const int previous_pin = tm_pin_threads();
    const double work = (double)n * (double)c * (double)(d > 0 ? d : 1);
    const int threads = work < (double)TM_HEAD_MIN_PARALLEL_WORK ? 1 : tm_threads_for(units);
    /* Forward blocks: TM_HEAD_FORWARD_SPLIT per thread, at most TM_HEAD_ROWS_MAX rows. */
    {
        const int64_t parts = (int64_t)threads * TM_HEAD_FORWARD_SPLIT;
        int64_t rows = TM_FN(round_up)((n + parts - 1) / parts, job.mr);
        const int64_t most = TM_FN(round_up)(TM_HEAD_ROWS_MAX, job.mr);
        job.rb_forward = rows > most ? most : rows;
    }
    const int64_t forward_units = (n + job.rb_forward - 1) / job.rb_forward;
    job.scratch_stride = TM_FN(head_carve)(&job, NULL, NULL);
    job.xpack = tm_alloc(bytes_xpack);
    job.xcol = weight_grad != NULL ? tm_alloc(bytes_xcol) : NULL;
    job.w_scale = job.norm_w ? tm_alloc(bytes_c) : NULL;
    job.w_inv = job.norm_w ? tm_alloc(bytes_c) : NULL;
    job.w_unit = job.norm_w ? tm_alloc(bytes_c) : NULL;
    const size_t row_doubles = (size_t)n * sizeof(double);
    job.x_scale = tm_alloc(row_doubles);
    job.x_inv = tm_alloc(row_doubles);
    job.wy_scale = tm_alloc(row_doubles);
    job.wy_inv = tm_alloc(row_doubles);
    job.coef = tm_alloc(row_doubles * 4);
    job.tz = tm_alloc((size_t)n * sizeof(TM_REAL));
    job.argmax = tm_alloc((size_t)n * sizeof(int64_t));
    job.lse = tm_alloc(row_doubles);
    job.gain = tm_alloc(row_doubles);
    job.gain_y = tm_alloc(row_doubles);
    job.sample_loss = tm_alloc(row_doubles);
    job.scratch = tm_alloc((size_t)threads * job.scratch_stride);
    if (job.xpack == NULL || (weight_grad != NULL && job.xcol == NULL) ||
        (job.norm_w && (job.w_scale == NULL || job.w_inv == NULL || job.w_unit == NULL)) ||
        job.x_scale == NULL || job.x_inv == NULL || job.wy_scale == NULL ||
        job.wy_inv == NULL || job.coef == NULL || job.tz == NULL || job.argmax == NULL ||
        job.lse == NULL || job.gain == NULL || job.gain_y == NULL || job.sample_loss == NULL ||
        job.scratch == NULL) {
        st = TM_ERR_NOMEM;
        goto done;
    }

    tm_parallel_for(threads, c + n_pad, 256, TM_FN(head_prepare_range), &job);
    tm_parallel_for(threads, forward_units, 1, TM_FN(head_range), &job);
    if (weight_grad != NULL) {
        job.backward = 1;
        tm_parallel_for(threads, backward_units, 1, TM_FN(head_range), &job);
        /* The target terms, in sample order (several samples share a class):
         * gy Pw (coef[2] u + coef[3] v), Pw = 1 / |W_y| where W is normalised. */
        const int unit = kind != TM_HEAD_SOFTMAX;
        for (int64_t i = 0; i < n; ++i) {
            const double gy = job.gain_y[i];
            const int64_t y = labels[i];
            if (y < 0) /* the target lies in another shard */
                continue;
            const double *co = job.coef + 4 * i;
            const double xs = job.x_scale[i], xv = job.x_inv[i];
            const double ws = job.wy_scale[i], wv = job.wy_inv[i];
            const TM_REAL *xi = x + i * d, *wy = weight + y * d;
            TM_REAL *out = weight_grad + y * d;
            for (int64_t p = 0; p < d; ++p) {
                const double u = unit ? (double)xi[p] * xs * xv : (double)xi[p];
                const double v = unit ? (double)wy[p] * ws * wv : (double)wy[p];
                double term = gy * (co[2] * u + co[3] * v);
                if (job.norm_w)
                    term = (term * wv) * ws;
                out[p] = (TM_REAL)((double)out[p] + term);
            }
            if (bias_grad != NULL)
                bias_grad[y] = (TM_REAL)((double)bias_grad[y] + gy);
        }
    }

    if (!shard) { /* a shard's caller reduces across shards */
        double total = 0.0;
        int64_t correct = 0;
        for (int64_t i = 0; i < n; ++i) {
            total += job.sample_loss[i];
            correct += job.argmax[i] == labels[i];
        }
        if (loss != NULL)
            *loss = total * job.red;
        if (per_sample != NULL)
            memcpy(per_sample, job.sample_loss, (size_t)n * sizeof(double));
        if (n_correct != NULL)
            *n_correct = correct;
    }

done:
    tm_unpin_threads(previous_pin);
    tm_free(job.xpack);
    tm_free(job.xcol);
    tm_free(job.w_scale);
    tm_free(job.w_inv);
    tm_free(job.w_unit);
    tm_free(job.x_scale);
    tm_free(job.x_inv);
    tm_free(job.wy_scale);
    tm_free(job.wy_inv);
    tm_free(job.coef);
    tm_free(job.tz);
    tm_free(job.argmax);
    tm_free(job.lse);
    tm_free(job.gain);
    tm_free(job.gain_y);
    tm_free(job.sample_loss);
    tm_free(job.scratch);
    return st;
}

int TM_FN(tm_softmax_head)(const tm_head *head, const TM_REAL *x, int64_t n, int64_t d,
                           const int64_t *labels, const TM_REAL *weight, int64_t c,
                           const TM_REAL *bias, const double *class_weight, int reduction,
                           const double *upstream, double *loss, double *per_sample,
                           int64_t *n_correct, TM_REAL *grad, TM_REAL *weight_grad,
                           TM_REAL *bias_grad)
{
    return TM_FN(head_run)(head, x, n, d, labels, weight, c, bias, class_weight, reduction,
                           upstream, loss, per_sample, n_correct, grad, weight_grad, bias_grad,
                           0, NULL, NULL);
}

int TM_FN(tm_softmax_head_shard)(const tm_head *head, const TM_REAL *x, int64_t n, int64_t d,
                                 const int64_t *labels, const TM_REAL *weight, int64_t c,
                                 const TM_REAL *bias, const double *lse, const double *gain,
                                 double *partial, TM_REAL *grad, TM_REAL *weight_grad,
                                 TM_REAL *bias_grad)
{
    const int first = lse == NULL;
    if (first ? (partial == NULL || grad != NULL || weight_grad != NULL || bias_grad != NULL)
              : (gain == NULL || partial != NULL))
        return TM_ERR_INVALID;
    if (!first && n > 0 && grad == NULL && weight_grad == NULL)
        return TM_ERR_INVALID;
    if (gain != NULL)
        for (int64_t i = 0; i < n; ++i)
            if (!isfinite(gain[i]))
                return TM_ERR_INVALID;
    return TM_FN(head_run)(head, x, n, d, labels, weight, c, bias, NULL, TM_REDUCE_NONE,
                           gain, NULL, NULL, NULL, grad, weight_grad, bias_grad, 1, partial,
                           lse);
}
