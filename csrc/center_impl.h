/*
 * Center loss for one precision (center.c; template.h).
 *
 * Loss and dL/dx: one pass over the samples (any thread, any order: each row
 * is its own), r_i = x_i - c_{y_i} in double, loss_i = |r_i|^2 / 2,
 * dL/dx_i = g_i r_i with g_i = red * upstream_i.  dL/dC: per class, over its
 * samples in sample order, -sum g_i r_i.  The update: per class present in
 * the batch, delta_j = sum (c_j - x_i) / (1 + n_j), c_j -= alpha delta_j.
 */

typedef struct {
    const TM_REAL *x, *centers;
    TM_REAL *mutable_centers;
    const int64_t *labels;
    const double *upstream;
    int64_t n, d, c;
    double red, alpha;
    double *sample_loss;
    TM_REAL *grad, *centers_grad;
    const tm_class_groups *groups;
    int64_t n_present;
    double *scratch; /* d doubles per participant */
    tm_center_row_kernel row;
    tm_center_acc_kernel acc;
} TM_FN(center_job);

static void TM_FN(center_rows)(void *ctx, int participant, int64_t begin, int64_t end)
{
    (void)participant;
    const TM_FN(center_job) *job = ctx;
    const int64_t d = job->d;
    for (int64_t i = begin; i < end; ++i) {
        const TM_REAL *xi = job->x + i * d, *ci = job->centers + job->labels[i] * d;
        const double g = job->red * (job->upstream != NULL ? job->upstream[i] : 1.0);
        TM_REAL *out = job->grad != NULL ? job->grad + i * d : NULL;
        job->sample_loss[i] = job->row(xi, ci, d, g, out);
    }
}

/* dL/dC, one class per item: 0 for a class without samples. */
static void TM_FN(center_class_grad)(void *ctx, int participant, int64_t begin, int64_t end)
{
    const TM_FN(center_job) *job = ctx;
    const int64_t d = job->d;
    double *acc = job->scratch + (size_t)participant * (size_t)d;
    for (int64_t j = begin; j < end; ++j) {
        TM_REAL *out = job->centers_grad + j * d;
        const int64_t first = job->groups->start[j], last = job->groups->start[j + 1];
        if (first == last) {
            memset(out, 0, (size_t)d * sizeof(TM_REAL));
            continue;
        }
        const TM_REAL *cj = job->centers + j * d;
        memset(acc, 0, (size_t)d * sizeof(double));
        for (int64_t q = first; q < last; ++q) {
            const int64_t i = job->groups->order[q];
            const TM_REAL *xi = job->x + i * d;
            const double g = job->red * (job->upstream != NULL ? job->upstream[i] : 1.0);
            job->acc(acc, cj, xi, d, g);
        }
        for (int64_t p = 0; p < d; ++p)
            out[p] = (TM_REAL)acc[p];
    }
}

/* The update, one present class per item. */
static void TM_FN(center_class_update)(void *ctx, int participant, int64_t begin, int64_t end)
{
    const TM_FN(center_job) *job = ctx;
    const int64_t d = job->d;
    double *acc = job->scratch + (size_t)participant * (size_t)d;
    for (int64_t k = begin; k < end; ++k) {
        const int64_t j = job->groups->present[k];
        const int64_t first = job->groups->start[j], last = job->groups->start[j + 1];
        TM_REAL *cj = job->mutable_centers + j * d;
        memset(acc, 0, (size_t)d * sizeof(double));
        for (int64_t q = first; q < last; ++q) {
            job->acc(acc, cj, job->x + job->groups->order[q] * d, d, 1.0);
        }
        const double step = job->alpha / (double)(1 + (last - first));
        for (int64_t p = 0; p < d; ++p)
            cj[p] = (TM_REAL)((double)cj[p] - step * acc[p]);
    }
}

static int TM_FN(center_threads)(int64_t items, int64_t n, int64_t d)
{
    const double work = (double)n * (double)(d > 0 ? d : 1);
    return work < (double)TM_CENTER_MIN_PARALLEL_WORK ? 1 : tm_threads_for(items);
}

/* The arguments both entry points share: pointers present where sizes need
 * them, labels in [0, c), sizes whose byte counts fit. */
static int TM_FN(center_check)(const TM_REAL *x, int64_t n, int64_t d, const int64_t *labels,
                               const TM_REAL *centers, int64_t c)
{
    if ((n > 0 && (labels == NULL || (d > 0 && x == NULL))) ||
        (c > 0 && d > 0 && centers == NULL))
        return TM_ERR_INVALID;
    if (!tm_labels_valid(labels, n, c))
        return TM_ERR_INVALID;
    size_t bytes;
    int st = tm_bytes(n, d, sizeof(TM_REAL), &bytes);
    if (st == TM_OK)
        st = tm_bytes(c, d, sizeof(TM_REAL), &bytes);
    return st;
}

int TM_FN(tm_center_loss)(const TM_REAL *x, int64_t n, int64_t d, const int64_t *labels,
                          const TM_REAL *centers, int64_t c, int reduction,
                          const double *upstream, double *loss, double *per_sample,
                          TM_REAL *grad, TM_REAL *centers_grad)
{
    if (n < 0 || d < 0 || c < 0 || (n > 0 && c < 1))
        return TM_ERR_INVALID;
    if (reduction != TM_REDUCE_MEAN && reduction != TM_REDUCE_SUM &&
        reduction != TM_REDUCE_NONE)
        return TM_ERR_INVALID;
    if (upstream != NULL && reduction != TM_REDUCE_NONE)
        return TM_ERR_INVALID;
    int st = TM_FN(center_check)(x, n, d, labels, centers, c);
    if (st != TM_OK)
        return st;

    TM_FN(center_job) job;
    memset(&job, 0, sizeof job);
    job.x = x;
    job.centers = centers;
    job.labels = labels;
    job.upstream = upstream;
    job.n = n;
    job.d = d;
    job.c = c;
    job.red = reduction == TM_REDUCE_MEAN && n > 0 ? 1.0 / (double)n : 1.0;
    job.grad = grad;
    job.centers_grad = centers_grad;
    job.row = TM_FN(kernel_center_row)(tm_active_kernels());
    job.acc = TM_FN(kernel_center_acc)(tm_active_kernels());
    tm_class_groups groups = {NULL, NULL, NULL};
    job.groups = &groups;
    const int previous_pin = tm_pin_threads();
    const int threads = TM_FN(center_threads)(n > c ? n : c, n, d);
    job.sample_loss = tm_alloc((size_t)n * sizeof(double));
    if (job.sample_loss == NULL) {
        st = TM_ERR_NOMEM;
        goto done;
    }
    if (centers_grad != NULL) {
        job.scratch = tm_alloc((size_t)threads * (size_t)(d > 0 ? d : 1) * sizeof(double));
        if (job.scratch == NULL || tm_group_by_class(labels, n, c, &groups) < 0) {
            st = TM_ERR_NOMEM;
            goto done;
        }
    }
    tm_parallel_for(threads, n, 64, TM_FN(center_rows), &job);
    if (centers_grad != NULL)
        tm_parallel_for(threads, c, 64, TM_FN(center_class_grad), &job);
    double total = 0.0;
    for (int64_t i = 0; i < n; ++i)
        total += job.sample_loss[i];
    if (loss != NULL)
        *loss = total * job.red;
    if (per_sample != NULL)
        memcpy(per_sample, job.sample_loss, (size_t)n * sizeof(double));

done:
    tm_free(job.sample_loss);
    tm_free(job.scratch);
    tm_free_groups(&groups);
    tm_unpin_threads(previous_pin);
    return st;
}

int TM_FN(tm_update_centers)(TM_REAL *centers, int64_t c, int64_t d, const TM_REAL *x,
                             int64_t n, const int64_t *labels, double alpha)
{
    if (n < 0 || d < 0 || c < 0 || (n > 0 && c < 1) || !isfinite(alpha) || !(alpha >= 0.0))
        return TM_ERR_INVALID;
    int st = TM_FN(center_check)(x, n, d, labels, centers, c);
    if (st != TM_OK)
        return st;
    if (n > 0 && d > 0) { /* x must not overlap the centers it is read against */
        const uintptr_t x0 = (uintptr_t)x, x1 = (uintptr_t)(x + n * d);
        const uintptr_t c0 = (uintptr_t)centers, c1 = (uintptr_t)(centers + c * d);
        if (x0 < c1 && c0 < x1)
            return TM_ERR_INVALID;
    }

    TM_FN(center_job) job;
    memset(&job, 0, sizeof job);
    job.x = x;
    job.mutable_centers = centers;
    job.labels = labels;
    job.n = n;
    job.d = d;
    job.c = c;
    job.alpha = alpha;
    job.acc = TM_FN(kernel_center_acc)(tm_active_kernels());
    tm_class_groups groups = {NULL, NULL, NULL};
    job.groups = &groups;
    const int previous_pin = tm_pin_threads();
    const int64_t present = tm_group_by_class(labels, n, c, &groups);
    const int threads = TM_FN(center_threads)(present, n, d);
    job.scratch = tm_alloc((size_t)threads * (size_t)(d > 0 ? d : 1) * sizeof(double));
    if (present < 0 || job.scratch == NULL) {
        st = TM_ERR_NOMEM;
        goto done;
    }
    job.n_present = present;
    tm_parallel_for(threads, present, 16, TM_FN(center_class_update), &job);

done:
    tm_free(job.scratch);
    tm_free_groups(&groups);
    tm_unpin_threads(previous_pin);
    return st;
}
