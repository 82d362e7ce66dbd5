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
 *        ...   (anchor blocks are the unit of parallel work, OpenMP)
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
    TM_ERR_UNSUPPORTED = -4  /* an instruction set this build or this CPU lacks */
} tm_status;

typedef enum {
    TM_METRIC_EUCLIDEAN = 0,   /* ||x - r||_2 */
    TM_METRIC_SQEUCLIDEAN = 1, /* ||x - r||_2^2 */
    TM_METRIC_COSINE = 2       /* 1 - cos(x, r); a zero vector has cos 0 with anything */
} tm_metric;

/* A static, human-readable description of a status code. */
TM_PUBLIC const char *tm_strerror(int status);

/* ---- build facts and runtime configuration ----------------------------- */

TM_PUBLIC const char *tm_version(void);
TM_PUBLIC const char *tm_compiler(void);
/* The _OPENMP date macro of the build, or 0 when built without OpenMP. */
TM_PUBLIC int tm_openmp_version(void);

/* Threads used by every parallel call; n <= 0 restores the default
 * (omp_get_max_threads(), i.e. OMP_NUM_THREADS or the core count). */
TM_PUBLIC int tm_set_num_threads(int n);
TM_PUBLIC int tm_get_num_threads(void);

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

#ifdef __cplusplus
}
#endif

#endif /* TRIPMINE_H */
