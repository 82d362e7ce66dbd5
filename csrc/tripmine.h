/*
 * tripmine.h -- the public interface of tripmine's C core.
 *
 * tripmine mines training triplets and computes metric-learning losses.  Every
 * operation is one walk of the *tile engine* over a query set x (n x d) and a
 * reference set ref (m x d, by default x itself: "self mode"):
 *
 *     anchors x[0:n]        reference ref[0:m]
 *     +--------+            +------+------+------+
 *     | block0 |  ------->  | tile | tile | tile |  --> reducer (per-anchor state)
 *     +--------+            +------+------+------+
 *     | block1 |  ------->  | tile | tile | tile |  --> reducer
 *     +--------+            +------+------+------+
 *        ...   (anchor blocks are the unit of parallel work, pool.c)
 *
 * A micro-kernel (portable C, or an ISA-specific variant chosen once at load
 * time) computes an MR x NR tile of dot products from packed panels; the
 * macro-kernel turns a block of those into distances (Gram identity, clamped
 * at 0, self-distance exactly 0, near pairs refined by direct difference) and
 * hands the tile to a reducer, which writes it out (pairwise distances) or
 * folds it into per-anchor state (miners and losses).  No n x m buffer is ever
 * allocated by the engine.
 *
 * Conventions
 *   - every entry point returns a tm_status: TM_OK (0) or a negative error;
 *     nothing here prints, exits or aborts;
 *   - sizes and indices are int64_t; arrays are C-contiguous, row-major;
 *   - outputs are allocated by the caller and written only after every
 *     allocation the call needs has succeeded;
 *   - each numeric kernel exists for float (_f32) and double (_f64).
 */
#ifndef TRIPMINE_H
#define TRIPMINE_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(__GNUC__) && !defined(_WIN32)
#define TM_PUBLIC __attribute__((visibility("default")))
#else
#define TM_PUBLIC
#endif

typedef enum {
    TM_OK = 0,
    TM_ERR_NOMEM = -1,       /* an allocation failed */
    TM_ERR_INVALID = -2,     /* a NULL pointer, a negative size, an unknown enum value */
    TM_ERR_TOO_LARGE = -3,   /* a size whose byte count overflows */
    TM_ERR_UNSUPPORTED = -4, /* an instruction set this build or this CPU lacks */
    TM_ERR_RANGE = -5        /* rows whose squared norms leave the working precision's
                              * window (below 2^-100 or above 2^120 for float, 2^-960 and
                              * 2^1000 for double; zero rows are fine): the caller reruns
                              * the call in a precision or a scale that holds them, and
                              * nothing has been written.  From a loss, also: a gradient
                              * entry beyond the working precision (each is scanned), or
                              * with row_exponent a distance beyond it that the loss needs;
                              * the outputs then hold partial values. */
} tm_status;

typedef enum {
    TM_METRIC_EUCLIDEAN = 0,   /* ||x - r||_2 */
    TM_METRIC_SQEUCLIDEAN = 1, /* ||x - r||_2^2 */
    TM_METRIC_COSINE = 2       /* 1 - cos(x, r); a zero vector has cos 0 with anything */
} tm_metric;

typedef enum {
    TM_SELECT_CLOSEST = 0, /* semi-hard: nearest negative farther than the positive */
    TM_SELECT_RANDOM = 1   /* semi-hard: uniform among d(a,p) < d(a,n) < d(a,p) + margin */
} tm_select;

typedef enum {
    TM_REDUCE_MEAN = 0,
    TM_REDUCE_SUM = 1,
    TM_REDUCE_MEAN_NONZERO = 2,
    TM_REDUCE_NONE = 3 /* per-item losses out; the gradient is that of their sum */
} tm_reduction;

/* A static, human-readable description of a status code. */
TM_PUBLIC const char *tm_strerror(int status);

/* ---- build facts and runtime configuration ----------------------------- */

TM_PUBLIC const char *tm_version(void);
TM_PUBLIC const char *tm_compiler(void);
/* Sanitizers compiled in (e.g. "address,undefined"), "" for a normal build. */
TM_PUBLIC const char *tm_sanitizers(void);
/* The parallel runtime, in words (tripmine's own pthread pool, csrc/pool.c,
 * or none), and whether this build can run threads at all. */
TM_PUBLIC const char *tm_runtime(void);
TM_PUBLIC int tm_threaded(void);
/* Worker threads the pool has created so far (0 before the first parallel
 * call; the calling thread is not counted). */
TM_PUBLIC int tm_pool_workers(void);
/* Totals since the process started: jobs run on the pool (calls that ran
 * inline on one thread are not counted), and the work items that workers and
 * calling threads ran in them. */
TM_PUBLIC void tm_pool_stats(int64_t *jobs, int64_t *worker_items, int64_t *caller_items);

/* Threads used by every parallel call, at most 256; n <= 0 restores the
 * default (OMP_NUM_THREADS if set, else the CPUs this process may run on).
 * Idle workers spin for at most TRIPMINE_SPIN_US microseconds (default 50)
 * after a parallel region, then sleep. */
TM_PUBLIC int tm_set_num_threads(int n);
TM_PUBLIC int tm_get_num_threads(void);
/* Kept for callers of earlier versions: the pool resets itself in a forked
 * child (pthread_atfork) and runs threads there too; this does nothing. */
TM_PUBLIC void tm_after_fork_child(void);

/* Instruction sets for the micro-kernels: "generic" always, "avx2" (AVX2+FMA)
 * on x86-64 builds running on a CPU that has it.  The best one is chosen on
 * first use; tm_set_isa forces one.  tm_isa_count/tm_isa_name enumerate the
 * ones compiled in; tm_isa_usable says whether this CPU can run one. */
TM_PUBLIC int tm_set_isa(const char *name);
TM_PUBLIC const char *tm_get_isa(void);
TM_PUBLIC int tm_isa_count(void);
TM_PUBLIC const char *tm_isa_name(int index);
TM_PUBLIC int tm_isa_usable(int index);

/* ---- pairwise distances ------------------------------------------------- */

/* out[i*m + j] = d(x_i, ref_j) for the given metric.  ref == NULL selects
 * self mode (ref = x, m must equal n): then out[i*n + i] is exactly 0. */
TM_PUBLIC int tm_pairwise_distances_f32(const float *x, int64_t n,
                                        const float *ref, int64_t m,
                                        int64_t d, int metric, float *out);
TM_PUBLIC int tm_pairwise_distances_f64(const double *x, int64_t n,
                                        const double *ref, int64_t m,
                                        int64_t d, int metric, double *out);

/* The k nearest reference rows of every x row, nearest first: out_index[i*k + r]
 * and out_dist[i*k + r] (both n*k).  Ties rank by the lower reference index;
 * self mode (ref == NULL) skips row i itself; rows with fewer than k
 * candidates are padded with index -1 and distance +inf.  Memory: the outputs
 * and one tile, never n x m. */
TM_PUBLIC int tm_nearest_neighbors_f32(const float *x, int64_t n, const float *ref, int64_t m,
                                       int64_t d, int metric, int64_t k, int64_t *out_index,
                                       float *out_dist);
TM_PUBLIC int tm_nearest_neighbors_f64(const double *x, int64_t n, const double *ref, int64_t m,
                                       int64_t d, int metric, int64_t k, int64_t *out_index,
                                       double *out_dist);

/* ---- label masks ---------------------------------------------------------- */

/* labels are int64 class codes.  ref_labels == NULL selects self mode (m == n),
 * where the pair (i, i) is neither positive nor negative.  Either output may
 * be NULL; each is n*m bytes of 0/1:
 *   positive[i*m + j] = labels[i] == ref_labels[j]  (and i != j in self mode)
 *   negative[i*m + j] = labels[i] != ref_labels[j]                            */
TM_PUBLIC int tm_pair_masks(const int64_t *labels, int64_t n,
                            const int64_t *ref_labels, int64_t m,
                            uint8_t *positive, uint8_t *negative);

/* out[(a*n + p)*n + q] = 1 iff a != p, labels[a] == labels[p] and
 * labels[q] != labels[a]: the valid triplets (a, p, q) of one batch. */
TM_PUBLIC int tm_triplet_mask(const int64_t *labels, int64_t n, uint8_t *out);

/* ---- miners ---------------------------------------------------------------
 *
 * Common arguments: x (n x d), ref (m x d, or NULL for self mode with m == n),
 * metric, labels (n int64 codes) and ref_labels (m codes; NULL in self mode),
 * ref_offset (-1, or in reference mode the statement that x[i] is the sample
 * ref[ref_offset + i]: 0 <= ref_offset <= m - n and labels[i] ==
 * ref_labels[ref_offset + i], else TM_ERR_INVALID; the rows themselves are
 * not compared).  Positives of anchor a: reference rows with its label, never
 * a itself (row a in self mode, row ref_offset + a with ref_offset);
 * negatives: rows with another label.  Ties go to the lowest reference index.
 * Random choices use the counter-based generator keyed on (seed, anchor,
 * positive index) described in rng.h, where the anchor number is a, or
 * ref_offset + a with ref_offset: so a slice x = X[o:o+n] with ref = X and
 * ref_offset = o mines exactly self mode's triplets of anchors o .. o+n-1.
 *
 * Per-positive-pair miners write one slot per positive pair: anchor a owns
 * slots [pos_offsets[a], pos_offsets[a + 1]), one per positive of a in
 * increasing index order; out_positive[slot] receives the positive's index and
 * out_negative[slot] the chosen negative, or -1 when the pair gets none.
 */

/* Batch-hard (Hermans et al. 2017): per anchor the farthest positive and the
 * nearest negative (-1 where the anchor has none). */
TM_PUBLIC int tm_batch_hard_f32(const float *x, int64_t n, const float *ref, int64_t m, int64_t d,
                                int metric, const int64_t *labels, const int64_t *ref_labels,
                                int64_t ref_offset, int64_t *positive, int64_t *negative);
TM_PUBLIC int tm_batch_hard_f64(const double *x, int64_t n, const double *ref, int64_t m, int64_t d,
                                int metric, const int64_t *labels, const int64_t *ref_labels,
                                int64_t ref_offset, int64_t *positive, int64_t *negative);

/* Semi-hard negatives per positive pair, select = tm_select. */
TM_PUBLIC int tm_semi_hard_f32(const float *x, int64_t n, const float *ref, int64_t m, int64_t d,
                               int metric, const int64_t *labels, const int64_t *ref_labels,
                               int64_t ref_offset, double margin, int select, uint64_t seed,
                               const int64_t *pos_offsets, int64_t *out_positive,
                               int64_t *out_negative);
TM_PUBLIC int tm_semi_hard_f64(const double *x, int64_t n, const double *ref, int64_t m, int64_t d,
                               int metric, const int64_t *labels, const int64_t *ref_labels,
                               int64_t ref_offset, double margin, int select, uint64_t seed,
                               const int64_t *pos_offsets, int64_t *out_positive,
                               int64_t *out_negative);

/* Every (a, p, q) with d(a,p) < d(a,q) <= d(a,p) + margin.  Two calls: with
 * offsets == NULL it writes counts[a], the number of such triplets of anchor
 * a; with offsets (n + 1 prefix sums of those counts) it writes them, by
 * anchor, positive index, negative index.  When keep (sorted global triplet
 * numbers, n_keep of them) is given, only those triplets are written,
 * compactly. */
TM_PUBLIC int tm_semi_hard_all_f32(const float *x, int64_t n, const float *ref, int64_t m,
                                   int64_t d, int metric, const int64_t *labels,
                                   const int64_t *ref_labels, int64_t ref_offset, double margin,
                                   int64_t *counts, const int64_t *offsets, const int64_t *keep,
                                   int64_t n_keep, int64_t *out_anchor, int64_t *out_positive,
                                   int64_t *out_negative);
TM_PUBLIC int tm_semi_hard_all_f64(const double *x, int64_t n, const double *ref, int64_t m,
                                   int64_t d, int metric, const int64_t *labels,
                                   const int64_t *ref_labels, int64_t ref_offset, double margin,
                                   int64_t *counts, const int64_t *offsets, const int64_t *keep,
                                   int64_t n_keep, int64_t *out_anchor, int64_t *out_positive,
                                   int64_t *out_negative);

/* Distance-weighted sampling (Wu et al. 2017): per positive pair one negative
 * drawn with probability proportional to
 *   w(t) = t^(2-d) (1 - t^2/4)^((3-d)/2),  t = max(dist, cutoff),
 * and w = 0 for dist >= nonzero_loss_cutoff or 1 - t^2/4 <= 0 (computed in
 * log space, relative to the row's largest weight). */
TM_PUBLIC int tm_distance_weighted_f32(const float *x, int64_t n, const float *ref, int64_t m,
                                       int64_t d, const int64_t *labels, const int64_t *ref_labels,
                                       int64_t ref_offset, double cutoff,
                                       double nonzero_loss_cutoff, uint64_t seed,
                                       const int64_t *pos_offsets, int64_t *out_positive,
                                       int64_t *out_negative);
TM_PUBLIC int tm_distance_weighted_f64(const double *x, int64_t n, const double *ref, int64_t m,
                                       int64_t d, const int64_t *labels, const int64_t *ref_labels,
                                       int64_t ref_offset, double cutoff,
                                       double nonzero_loss_cutoff, uint64_t seed,
                                       const int64_t *pos_offsets, int64_t *out_positive,
                                       int64_t *out_negative);

/* ---- losses ----------------------------------------------------------------
 *
 * Each writes the reduced loss (for TM_REDUCE_NONE: the sum) to *loss, the
 * counts, optionally per-item losses, and -- when grad is not NULL -- dL/dx
 * (n x d) and, in reference mode, dL/dref (m x d, when ref_grad is not NULL).
 * In self mode grad holds the whole gradient (x is both anchor and
 * reference).  ref_offset is the miners'; with it, grad holds only the
 * anchor side and ref_grad the reference side, so for slices of a batch X
 * the sum of the slices' grad (in their rows) and of their ref_grad is self
 * mode's gradient on X (for TM_REDUCE_SUM; other reductions scale each
 * slice by its own counts).  Gradients are analytic; at a hinge kink and at zero
 * euclidean distance the subgradient 0 is used.
 *
 * row_exponent is 0, or (euclidean metrics) an integer e with |e| <= 1000 saying
 * that x and ref are the caller's rows times 2^e: what a caller does with double
 * rows that TM_ERR_RANGE refuses, since multiplying by a power of two is exact.
 * Every distance then enters the loss in the caller's units (2^-e, squared 2^-2e,
 * times the given rows'), margins stay as given, and grad and ref_grad are
 * dL/d(the caller's rows).  A distance beyond double's range comes out infinite, so
 * a loss that depends on it is inf or NaN: check it.  Nonzero with
 * TM_METRIC_COSINE (scale-free: scale each row instead) is TM_ERR_INVALID.
 */

/* Triplet margin loss over given triplets: z = d(a,p) - d(a,q) + margin,
 * loss max(0, z) or, with soft, softplus(z).  Distances are recomputed
 * exactly by direct difference in double. per_triplet (t) may be NULL. */
TM_PUBLIC int tm_triplet_loss_f32(const float *x, int64_t n, const float *ref, int64_t m, int64_t d,
                                  int metric, int row_exponent, const int64_t *anchor,
                                  const int64_t *positive, const int64_t *negative, int64_t t,
                                  double margin, int soft, int reduction, double *loss,
                                  int64_t *n_active, double *per_triplet, float *grad,
                                  float *ref_grad);
TM_PUBLIC int tm_triplet_loss_f64(const double *x, int64_t n, const double *ref, int64_t m,
                                  int64_t d, int metric, int row_exponent, const int64_t *anchor,
                                  const int64_t *positive, const int64_t *negative, int64_t t,
                                  double margin, int soft, int reduction, double *loss,
                                  int64_t *n_active, double *per_triplet, double *grad,
                                  double *ref_grad);

/* Margin loss over given triplets (Wu et al. 2017, "Sampling Matters"):
 * pos = max(0, d(a,p) - beta[i] + margin), neg = max(0, beta[i] - d(a,q) +
 * margin), loss_i = pos + neg, beta one value per triplet.  *n_active counts the
 * nonzero hinges (TM_REDUCE_MEAN_NONZERO divides by it); beta_grad (t, or
 * NULL) receives dL/dbeta[i].  Distances exact, as for tm_triplet_loss. */
TM_PUBLIC int tm_margin_loss_f32(const float *x, int64_t n, const float *ref, int64_t m, int64_t d,
                                 int metric, int row_exponent, const int64_t *anchor,
                                 const int64_t *positive, const int64_t *negative, int64_t t,
                                 const double *beta, double margin, int reduction, double *loss,
                                 int64_t *n_active, double *per_triplet, double *beta_grad,
                                 float *grad, float *ref_grad);
TM_PUBLIC int tm_margin_loss_f64(const double *x, int64_t n, const double *ref, int64_t m,
                                 int64_t d, int metric, int row_exponent, const int64_t *anchor,
                                 const int64_t *positive, const int64_t *negative, int64_t t,
                                 const double *beta, double margin, int reduction, double *loss,
                                 int64_t *n_active, double *per_triplet, double *beta_grad,
                                 double *grad, double *ref_grad);

/* Batch-all triplet loss: every valid (a, p, q), never enumerated (per anchor
 * one sort of its positives, a binary search per negative).  per_anchor (n)
 * may be NULL. */
TM_PUBLIC int tm_batch_all_loss_f32(const float *x, int64_t n, const float *ref, int64_t m,
                                    int64_t d, int metric, int row_exponent, const int64_t *labels,
                                    const int64_t *ref_labels, int64_t ref_offset, double margin,
                                    int soft, int reduction, double *loss, int64_t *n_triplets,
                                    int64_t *n_active, double *per_anchor, float *grad,
                                    float *ref_grad);
TM_PUBLIC int tm_batch_all_loss_f64(const double *x, int64_t n, const double *ref, int64_t m,
                                    int64_t d, int metric, int row_exponent, const int64_t *labels,
                                    const int64_t *ref_labels, int64_t ref_offset, double margin,
                                    int soft, int reduction, double *loss, int64_t *n_triplets,
                                    int64_t *n_active, double *per_anchor, double *grad,
                                    double *ref_grad);

/* Contrastive loss over all ordered pairs: positive max(0, d - pos_margin)^power,
 * negative max(0, neg_margin - d)^power, power 1 or 2.  counts receives
 * {positive pairs, negative pairs, active positive, active negative}. */
TM_PUBLIC int tm_contrastive_loss_f32(const float *x, int64_t n, const float *ref, int64_t m,
                                      int64_t d, int metric, int row_exponent,
                                      const int64_t *labels, const int64_t *ref_labels,
                                      int64_t ref_offset, double pos_margin, double neg_margin,
                                      int power, int reduction, double *loss, int64_t *counts,
                                      double *per_anchor, float *grad, float *ref_grad);
TM_PUBLIC int tm_contrastive_loss_f64(const double *x, int64_t n, const double *ref, int64_t m,
                                      int64_t d, int metric, int row_exponent,
                                      const int64_t *labels, const int64_t *ref_labels,
                                      int64_t ref_offset, double pos_margin, double neg_margin,
                                      int power, int reduction, double *loss, int64_t *counts,
                                      double *per_anchor, double *grad, double *ref_grad);

/* Lifted structured loss (pair_heads.c).  generalized = 0: Song et al.'s smooth
 * form, per positive entry (i, j): J = log(sum over row i's negatives k of
 * e^(neg_margin - d_ik) + sum over column j's negatives l of e^(neg_margin - d_lj))
 * + d_ij - pos_margin, term max(0, J)^2 / 2 (in self mode the column is row j).
 * generalized = 1: Hermans et al.'s form, per row with a positive and a
 * negative: max(0, LSE over positives of (d - pos_margin) + LSE over
 * negatives of (neg_margin - d)).  counts receives {terms, nonzero terms}:
 * positive entries (Song) or rows with a positive and a negative (generalized).
 * per_anchor (optional, n): each row's terms summed. */
TM_PUBLIC int tm_lifted_structured_loss_f32(const float *x, int64_t n, const float *ref, int64_t m,
                                            int64_t d, int metric, int row_exponent,
                                            const int64_t *labels, const int64_t *ref_labels,
                                            int64_t ref_offset, double neg_margin,
                                            double pos_margin, int generalized, int reduction,
                                            double *loss, int64_t *counts, double *per_anchor,
                                            float *grad, float *ref_grad);
TM_PUBLIC int tm_lifted_structured_loss_f64(const double *x, int64_t n, const double *ref,
                                            int64_t m, int64_t d, int metric, int row_exponent,
                                            const int64_t *labels, const int64_t *ref_labels,
                                            int64_t ref_offset, double neg_margin,
                                            double pos_margin, int generalized, int reduction,
                                            double *loss, int64_t *counts, double *per_anchor,
                                            double *grad, double *ref_grad);

/* The margin loss (Wu et al. 2017) over every valid triplet (batch-all), as
 * pair terms, never listing the triplets (pair_heads.c): per triplet
 * max(0, d_ap - beta_a + margin) + max(0, beta_a - d_an + margin) + nu beta_a,
 * beta (n) the anchors' boundaries.  reduction TM_REDUCE_MEAN divides by the
 * number of nonzero hinge terms; TM_REDUCE_NONE gives per_anchor (optional,
 * n: each anchor's triplets summed).  counts receives {triplets, nonzero hinge
 * terms}; beta_grad (n) dL/dbeta_a, scaled by the reduction. */
TM_PUBLIC int tm_margin_all_loss_f32(const float *x, int64_t n, const float *ref, int64_t m,
                                     int64_t d, int metric, int row_exponent, const int64_t *labels,
                                     const int64_t *ref_labels, int64_t ref_offset, double margin,
                                     const double *beta, double nu, int reduction, double *loss,
                                     int64_t *counts, double *per_anchor, double *beta_grad,
                                     float *grad, float *ref_grad);
TM_PUBLIC int tm_margin_all_loss_f64(const double *x, int64_t n, const double *ref, int64_t m,
                                     int64_t d, int metric, int row_exponent, const int64_t *labels,
                                     const int64_t *ref_labels, int64_t ref_offset, double margin,
                                     const double *beta, double nu, int reduction, double *loss,
                                     int64_t *counts, double *per_anchor, double *beta_grad,
                                     double *grad, double *ref_grad);

/* ---- classification heads: the margin-softmax family (heads.c) ----------
 *
 * Cross-entropy over C classes whose logits come from a weight matrix W
 * (c x d, one row per class): the reference set of the tile engine is W, the
 * row reducer an online log-sum-exp.  No n x c buffer is ever allocated.
 * For sample i with label y and theta_j the angle between x_i and W_j:
 *
 *   head               target logit z_y                     other logits z_j
 *   SOFTMAX            W_y.x + b_y                          W_j.x + b_j
 *   NORMFACE           s cos theta_y                        s cos theta_j
 *   COSFACE            s (cos theta_y - m3)                 s cos theta_j
 *   ARCFACE            s cos(theta_y + m2) (see heads.c)    s cos theta_j
 *   COMBINED           s (cos(m1 theta_y + m2) - m3)        s cos theta_j
 *   SPHEREFACE         |x| F(theta_y)                       |x| cos theta_j
 *   LSOFTMAX           |W_y| |x| F(theta_y)                 W_j.x
 *
 * with F = (lambda cos + psi) / (1 + lambda), psi(theta) = (-1)^k cos(m theta)
 * - 2k, k = floor(m theta / pi), m = `margin` (an integer >= 1).  The loss of
 * sample i is class_weight[y] (LSE_j z_j - z_y); reduction MEAN divides the
 * sum by the sum of class_weight[y_i] (n without class weights), SUM adds,
 * NONE writes per_sample and differentiates the sum.  upstream (n, or NULL)
 * multiplies each sample's gradient: the chain rule for a caller that
 * weighs the per-sample losses. */
typedef enum {
    TM_HEAD_SOFTMAX = 0,
    TM_HEAD_NORMFACE = 1,
    TM_HEAD_COSFACE = 2,
    TM_HEAD_ARCFACE = 3,
    TM_HEAD_COMBINED = 4,
    TM_HEAD_SPHEREFACE = 5,
    TM_HEAD_LSOFTMAX = 6
} tm_head_kind;

/* A head's parameters (argon2_context style: one struct, not more positional
 * arguments).  Fields a head does not use are ignored. */
typedef struct {
    int kind;             /* tm_head_kind */
    double scale;         /* s: NORMFACE .. COMBINED */
    double m1, m2, m3;    /* COMBINED; COSFACE uses m3, ARCFACE m2 */
    int margin;           /* SPHEREFACE, LSOFTMAX: integer m >= 1 */
    double lambda_;       /* SPHEREFACE, LSOFTMAX: annealing weight >= 0 */
    int easy_margin;      /* ARCFACE: the margin only where cos theta > 0 */
    int straight_through; /* ARCFACE, COMBINED: dz_y/dcos = s (InsightFace) */
} tm_head;

/* x: n x d; labels in [0, c); weight: c x d; bias: c or NULL (SOFTMAX only);
 * class_weight: c (>= 0) or NULL; upstream: n or NULL.  Outputs, each
 * optional (NULL): loss, per_sample (n), n_correct (top-1 of the logits
 * without margin, ties to the lowest class), grad (n x d), weight_grad
 * (c x d), bias_grad (c).  Results do not depend on the thread count. */
TM_PUBLIC int tm_softmax_head_f32(const tm_head *head, const float *x, int64_t n, int64_t d,
                                  const int64_t *labels, const float *weight, int64_t c,
                                  const float *bias, const double *class_weight, int reduction,
                                  const double *upstream, double *loss, double *per_sample,
                                  int64_t *n_correct, float *grad, float *weight_grad,
                                  float *bias_grad);
TM_PUBLIC int tm_softmax_head_f64(const tm_head *head, const double *x, int64_t n, int64_t d,
                                  const int64_t *labels, const double *weight, int64_t c,
                                  const double *bias, const double *class_weight, int reduction,
                                  const double *upstream, double *loss, double *per_sample,
                                  int64_t *n_correct, double *grad, double *weight_grad,
                                  double *bias_grad);

/* One shard of the classes, for a caller that splits W across processes (tripmine.torch.
 * distributed.ShardedMarginSoftmax): the loss of the whole problem is
 * class_weight[y] (LSE over every shard - z_y), so each shard gives its statistics, the
 * caller combines them, and each shard then forms its part of the gradients.  labels are
 * indices into this shard's rows of weight (c x d), or -1 where the target lies in another
 * shard; bias (c) as in tm_softmax_head (SOFTMAX only).
 *   First call (lse == NULL): partial (4 n) receives per row the log-sum-exp of this
 *   shard's logits (the target's with its margin), the target logit z_y (0 where the label
 *   is -1), the largest logit without margin and its row (lowest on ties, as a double).
 *   Second call: lse (n) is the log-sum-exp over every shard, gain (n) dL/dloss_i (the
 *   class weight and reduction already in it); grad (n x d) receives this shard's part of
 *   dL/dx (the sum over shards is dL/dx), weight_grad (c x d) and bias_grad (c) dL/dW and
 *   dL/db of this shard's rows; at least one of grad and weight_grad.
 * Results do not depend on the thread count. */
TM_PUBLIC int tm_softmax_head_shard_f32(const tm_head *head, const float *x, int64_t n,
                                        int64_t d, const int64_t *labels, const float *weight,
                                        int64_t c, const float *bias, const double *lse,
                                        const double *gain, double *partial, float *grad,
                                        float *weight_grad, float *bias_grad);
TM_PUBLIC int tm_softmax_head_shard_f64(const tm_head *head, const double *x, int64_t n,
                                        int64_t d, const int64_t *labels, const double *weight,
                                        int64_t c, const double *bias, const double *lse,
                                        const double *gain, double *partial, double *grad,
                                        double *weight_grad, double *bias_grad);

/* ---- center loss (center.c) -----------------------------------------------
 *
 * Wen et al. 2016: L = 1/2 sum_i ||x_i - c_{y_i}||^2 over x (n x d) and the
 * class centers (c x d), labels in [0, c).  reduction MEAN divides by n, SUM
 * adds, NONE writes per_sample (n) and differentiates the sum; upstream (n,
 * or NULL; NONE only) multiplies each sample's gradient.  Outputs, each
 * optional (NULL): loss, per_sample, grad = dL/dx (n x d), centers_grad =
 * dL/dC (c x d; rows of classes without samples are 0).  Sums run in double
 * in sample order within a class, so results do not depend on the thread
 * count. */
TM_PUBLIC int tm_center_loss_f32(const float *x, int64_t n, int64_t d, const int64_t *labels,
                                 const float *centers, int64_t c, int reduction,
                                 const double *upstream, double *loss, double *per_sample,
                                 float *grad, float *centers_grad);
TM_PUBLIC int tm_center_loss_f64(const double *x, int64_t n, int64_t d, const int64_t *labels,
                                 const double *centers, int64_t c, int reduction,
                                 const double *upstream, double *loss, double *per_sample,
                                 double *grad, double *centers_grad);

/* The paper's center update, in place: for every class j with n_j > 0
 * samples in the batch, delta_j = sum_{y_i = j} (c_j - x_i) / (1 + n_j) and
 * c_j -= alpha delta_j (in double, rounded once).  alpha must be finite and
 * >= 0; x must not overlap centers.  Nothing is written on an error. */
TM_PUBLIC int tm_update_centers_f32(float *centers, int64_t c, int64_t d, const float *x,
                                    int64_t n, const int64_t *labels, double alpha);
TM_PUBLIC int tm_update_centers_f64(double *centers, int64_t c, int64_t d, const double *x,
                                    int64_t n, const int64_t *labels, double alpha);

/* The counter-based generator of rng.h, exposed for tests and the GPU path. */
TM_PUBLIC double tm_uniform(uint64_t seed, int64_t anchor, int64_t draw);

#ifdef __cplusplus
}
#endif

#endif /* TRIPMINE_H */
