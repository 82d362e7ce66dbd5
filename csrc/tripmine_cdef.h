/* cffi declarations of tripmine.h (no preprocessor: cffi cannot parse it).
 * Enum values are `...`: the compiler reads them from tripmine.h, which stays
 * the single source of truth. */
typedef enum {
    TM_OK,
    TM_ERR_NOMEM,
    TM_ERR_INVALID,
    TM_ERR_TOO_LARGE,
    TM_ERR_UNSUPPORTED,
    ...
} tm_status;

typedef enum {
    TM_METRIC_EUCLIDEAN,
    TM_METRIC_SQEUCLIDEAN,
    TM_METRIC_COSINE,
    ...
} tm_metric;

const char *tm_strerror(int status);
const char *tm_version(void);
const char *tm_compiler(void);
int tm_openmp_version(void);
int tm_set_num_threads(int n);
int tm_get_num_threads(void);
int tm_set_isa(const char *name);
const char *tm_get_isa(void);
int tm_isa_count(void);
const char *tm_isa_name(int index);
int tm_isa_usable(int index);

int tm_pairwise_distances_f32(const float *x, int64_t n, const float *ref,
                              int64_t m, int64_t d, int metric, float *out);
int tm_pairwise_distances_f64(const double *x, int64_t n, const double *ref,
                              int64_t m, int64_t d, int metric, double *out);

int tm_pair_masks(const int64_t *labels, int64_t n, const int64_t *ref_labels,
                  int64_t m, uint8_t *positive, uint8_t *negative);
int tm_triplet_mask(const int64_t *labels, int64_t n, uint8_t *out);
