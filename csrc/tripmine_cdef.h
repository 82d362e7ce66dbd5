/* cffi declarations of tripmine.h (no preprocessor: cffi cannot parse it).
 * Enum values are `...`: the compiler reads them from tripmine.h, which stays
 * the single source of truth. */
typedef enum {
    TM_OK,
    TM_ERR_NOMEM,
    TM_ERR_INVALID,
    TM_ERR_TOO_LARGE,
    TM_ERR_UNSUPPORTED,
    TM_ERR_RANGE,
    ...
} tm_status;

typedef enum {
    TM_METRIC_EUCLIDEAN,
    TM_METRIC_SQEUCLIDEAN,
    TM_METRIC_COSINE,
    ...
} tm_metric;

typedef enum {
    TM_SELECT_CLOSEST,
    TM_SELECT_RANDOM,
    ...
} tm_select;

typedef enum {
    TM_REDUCE_MEAN,
    TM_REDUCE_SUM,
    TM_REDUCE_MEAN_NONZERO,
    TM_REDUCE_NONE,
    ...
} tm_reduction;

const char *tm_strerror(int status);
const char *tm_version(void);
const char *tm_compiler(void);
const char *tm_sanitizers(void);
const char *tm_runtime(void);
int tm_threaded(void);
int tm_pool_workers(void);
void tm_pool_stats(int64_t *jobs, int64_t *worker_items, int64_t *caller_items);
int tm_set_num_threads(int n);
int tm_get_num_threads(void);
void tm_after_fork_child(void);
int tm_set_isa(const char *name);
const char *tm_get_isa(void);
int tm_isa_count(void);
const char *tm_isa_name(int index);
int tm_isa_usable(int index);

int tm_pairwise_distances_f32(const float *x, int64_t n, const float *ref,
                              int64_t m, int64_t d, int metric, float *out);
int tm_pairwise_distances_f64(const double *x, int64_t n, const double *ref,
                              int64_t m, int64_t d, int metric, double *out);

int tm_nearest_neighbors_f32(const float *x, int64_t n, const float *ref, int64_t m,
                             int64_t d, int metric, int64_t k, int64_t *out_index,
                             float *out_dist);
int tm_nearest_neighbors_f64(const double *x, int64_t n, const double *ref, int64_t m,
                             int64_t d, int metric, int64_t k, int64_t *out_index,
                             double *out_dist);

int tm_pair_masks(const int64_t *labels, int64_t n, const int64_t *ref_labels,
                  int64_t m, uint8_t *positive, uint8_t *negative);
int tm_triplet_mask(const int64_t *labels, int64_t n, uint8_t *out);

int tm_batch_hard_f32(const float *x, int64_t n, const float *ref, int64_t m, int64_t d, int metric,
                      const int64_t *labels, const int64_t *ref_labels, int64_t ref_offset,
                      int64_t *positive, int64_t *negative);
int tm_semi_hard_f32(const float *x, int64_t n, const float *ref, int64_t m, int64_t d, int metric,
                     const int64_t *labels, const int64_t *ref_labels, int64_t ref_offset,
                     double margin, int select, uint64_t seed, const int64_t *pos_offsets,
                     int64_t *out_positive, int64_t *out_negative);
int tm_semi_hard_all_f32(const float *x, int64_t n, const float *ref, int64_t m, int64_t d,
                         int metric, const int64_t *labels, const int64_t *ref_labels,
                         int64_t ref_offset, double margin, int64_t *counts, const int64_t *offsets,
                         const int64_t *keep, int64_t n_keep, int64_t *out_anchor,
                         int64_t *out_positive, int64_t *out_negative);
int tm_distance_weighted_f32(const float *x, int64_t n, const float *ref, int64_t m, int64_t d,
                             const int64_t *labels, const int64_t *ref_labels, int64_t ref_offset,
                             double cutoff, double nonzero_loss_cutoff, uint64_t seed,
                             const int64_t *pos_offsets, int64_t *out_positive,
                             int64_t *out_negative);
int tm_triplet_loss_f32(const float *x, int64_t n, const float *ref, int64_t m, int64_t d,
                        int metric, int row_exponent, const int64_t *anchor,
                        const int64_t *positive, const int64_t *negative, int64_t t, double margin,
                        int soft, int reduction, double *loss, int64_t *n_active,
                        double *per_triplet, float *grad, float *ref_grad);
int tm_batch_all_loss_f32(const float *x, int64_t n, const float *ref, int64_t m, int64_t d,
                          int metric, int row_exponent, const int64_t *labels,
                          const int64_t *ref_labels, int64_t ref_offset, double margin, int soft,
                          int reduction, double *loss, int64_t *n_triplets, int64_t *n_active,
                          double *per_anchor, float *grad, float *ref_grad);
int tm_contrastive_loss_f32(const float *x, int64_t n, const float *ref, int64_t m, int64_t d,
                            int metric, int row_exponent, const int64_t *labels,
                            const int64_t *ref_labels, int64_t ref_offset, double pos_margin,
                            double neg_margin, int power, int reduction, double *loss,
                            int64_t *counts, double *per_anchor, float *grad, float *ref_grad);

int tm_lifted_structured_loss_f32(const float *x, int64_t n, const float *ref, int64_t m, int64_t d,
                                  int metric, int row_exponent, const int64_t *labels,
                                  const int64_t *ref_labels, int64_t ref_offset, double neg_margin,
                                  double pos_margin, int generalized, int reduction, double *loss,
                                  int64_t *counts, double *per_anchor, float *grad,
                                  float *ref_grad);

int tm_margin_all_loss_f32(const float *x, int64_t n, const float *ref, int64_t m, int64_t d,
                           int metric, int row_exponent, const int64_t *labels,
                           const int64_t *ref_labels, int64_t ref_offset, double margin,
                           const double *beta, double nu, int reduction, double *loss,
                           int64_t *counts, double *per_anchor, double *beta_grad, float *grad,
                           float *ref_grad);

int tm_batch_hard_f64(const double *x, int64_t n, const double *ref, int64_t m, int64_t d,
                      int metric, const int64_t *labels, const int64_t *ref_labels,
                      int64_t ref_offset, int64_t *positive, int64_t *negative);
int tm_semi_hard_f64(const double *x, int64_t n, const double *ref, int64_t m, int64_t d,
                     int metric, const int64_t *labels, const int64_t *ref_labels,
                     int64_t ref_offset, double margin, int select, uint64_t seed,
                     const int64_t *pos_offsets, int64_t *out_positive, int64_t *out_negative);
int tm_semi_hard_all_f64(const double *x, int64_t n, const double *ref, int64_t m, int64_t d,
                         int metric, const int64_t *labels, const int64_t *ref_labels,
                         int64_t ref_offset, double margin, int64_t *counts, const int64_t *offsets,
                         const int64_t *keep, int64_t n_keep, int64_t *out_anchor,
                         int64_t *out_positive, int64_t *out_negative);
int tm_distance_weighted_f64(const double *x, int64_t n, const double *ref, int64_t m, int64_t d,
                             const int64_t *labels, const int64_t *ref_labels, int64_t ref_offset,
                             double cutoff, double nonzero_loss_cutoff, uint64_t seed,
                             const int64_t *pos_offsets, int64_t *out_positive,
                             int64_t *out_negative);
int tm_triplet_loss_f64(const double *x, int64_t n, const double *ref, int64_t m, int64_t d,
                        int metric, int row_exponent, const int64_t *anchor,
                        const int64_t *positive, const int64_t *negative, int64_t t, double margin,
                        int soft, int reduction, double *loss, int64_t *n_active,
                        double *per_triplet, double *grad, double *ref_grad);
int tm_batch_all_loss_f64(const double *x, int64_t n, const double *ref, int64_t m, int64_t d,
                          int metric, int row_exponent, const int64_t *labels,
                          const int64_t *ref_labels, int64_t ref_offset, double margin, int soft,
                          int reduction, double *loss, int64_t *n_triplets, int64_t *n_active,
                          double *per_anchor, double *grad, double *ref_grad);
int tm_contrastive_loss_f64(const double *x, int64_t n, const double *ref, int64_t m, int64_t d,
                            int metric, int row_exponent, const int64_t *labels,
                            const int64_t *ref_labels, int64_t ref_offset, double pos_margin,
                            double neg_margin, int power, int reduction, double *loss,
                            int64_t *counts, double *per_anchor, double *grad, double *ref_grad);

int tm_lifted_structured_loss_f64(const double *x, int64_t n, const double *ref, int64_t m,
                                  int64_t d, int metric, int row_exponent, const int64_t *labels,
                                  const int64_t *ref_labels, int64_t ref_offset, double neg_margin,
                                  double pos_margin, int generalized, int reduction, double *loss,
                                  int64_t *counts, double *per_anchor, double *grad,
                                  double *ref_grad);

int tm_margin_all_loss_f64(const double *x, int64_t n, const double *ref, int64_t m, int64_t d,
                           int metric, int row_exponent, const int64_t *labels,
                           const int64_t *ref_labels, int64_t ref_offset, double margin,
                           const double *beta, double nu, int reduction, double *loss,
                           int64_t *counts, double *per_anchor, double *beta_grad, double *grad,
                           double *ref_grad);

double tm_uniform(uint64_t seed, int64_t anchor, int64_t draw);

typedef enum {
    TM_HEAD_SOFTMAX,
    TM_HEAD_NORMFACE,
    TM_HEAD_COSFACE,
    TM_HEAD_ARCFACE,
    TM_HEAD_COMBINED,
    TM_HEAD_SPHEREFACE,
    TM_HEAD_LSOFTMAX,
    ...
} tm_head_kind;

typedef struct {
    int kind;
    double scale;
    double m1, m2, m3;
    int margin;
    double lambda_;
    int easy_margin;
    int straight_through;
} tm_head;

int tm_softmax_head_f32(const tm_head *head, const float *x, int64_t n, int64_t d,
                        const int64_t *labels, const float *weight, int64_t c,
                        const float *bias, const double *class_weight, int reduction,
                        const double *upstream, double *loss, double *per_sample,
                        int64_t *n_correct, float *grad, float *weight_grad, float *bias_grad);
int tm_softmax_head_f64(const tm_head *head, const double *x, int64_t n, int64_t d,
                        const int64_t *labels, const double *weight, int64_t c,
                        const double *bias, const double *class_weight, int reduction,
                        const double *upstream, double *loss, double *per_sample,
                        int64_t *n_correct, double *grad, double *weight_grad,
                        double *bias_grad);
int tm_softmax_head_shard_f32(const tm_head *head, const float *x, int64_t n, int64_t d,
                              const int64_t *labels, const float *weight, int64_t c,
                              const float *bias, const double *lse, const double *gain,
                              double *partial, float *grad, float *weight_grad,
                              float *bias_grad);
int tm_softmax_head_shard_f64(const tm_head *head, const double *x, int64_t n, int64_t d,
                              const int64_t *labels, const double *weight, int64_t c,
                              const double *bias, const double *lse, const double *gain,
                              double *partial, double *grad, double *weight_grad,
                              double *bias_grad);

int tm_margin_loss_f32(const float *x, int64_t n, const float *ref, int64_t m, int64_t d,
                       int metric, int row_exponent, const int64_t *anchor, const int64_t *positive,
                       const int64_t *negative, int64_t t, const double *beta, double margin,
                       int reduction, double *loss, int64_t *n_active, double *per_triplet,
                       double *beta_grad, float *grad, float *ref_grad);
int tm_margin_loss_f64(const double *x, int64_t n, const double *ref, int64_t m, int64_t d,
                       int metric, int row_exponent, const int64_t *anchor, const int64_t *positive,
                       const int64_t *negative, int64_t t, const double *beta, double margin,
                       int reduction, double *loss, int64_t *n_active, double *per_triplet,
                       double *beta_grad, double *grad, double *ref_grad);
int tm_center_loss_f32(const float *x, int64_t n, int64_t d, const int64_t *labels,
                       const float *centers, int64_t c, int reduction, const double *upstream,
                       double *loss, double *per_sample, float *grad, float *centers_grad);
int tm_center_loss_f64(const double *x, int64_t n, int64_t d, const int64_t *labels,
                       const double *centers, int64_t c, int reduction, const double *upstream,
                       double *loss, double *per_sample, double *grad, double *centers_grad);
int tm_update_centers_f32(float *centers, int64_t c, int64_t d, const float *x, int64_t n,
                          const int64_t *labels, double alpha);
int tm_update_centers_f64(double *centers, int64_t c, int64_t d, const double *x, int64_t n,
                          const int64_t *labels, double alpha);
