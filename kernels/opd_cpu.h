/* opd-fast native CPU kernel: the element-wise half of the fused losses.
 *
 * Plain C ABI (no torch headers) so Python loads it with ctypes and C/C++ trainers can
 * embed it. The caller does the GEMMs; this library turns full-row logits tiles into per-row
 * statistics and the gradient with respect to the raw logits, following
 * opd_fast/backends/tile_math.py (the formulas live there):
 *
 *   z = softcap(raw) / T,  q = softmax(z_s),  p = softmax(z_t)
 *   dD/dz_s = a - q * c   (a and c per divergence, see tile_math.py)
 *   grad    = row_scale * (a - q c) / T * (1 - tanh^2)   (tanh term only with a softcap)
 *
 * plus the hard-label cross-entropy at temperature 1 (opd_full_rows), the per-token
 * log-probabilities (opd_logprob_rows, opd_fast/logprobs.py) and the top-k teacher loss
 * (opd_topk_rows, opd_fast/topk.py).
 *
 * Inputs are fp32 or bf16, arithmetic is fp32. Rows are independent and each row is
 * reduced by one thread in a fixed order, so results do not depend on the thread count.
 */
#ifndef OPD_CPU_H
#define OPD_CPU_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define OPD_ABI_VERSION 2

#if defined(__GNUC__)
#define OPD_API __attribute__((visibility("default")))
#else
#define OPD_API
#endif

enum opd_dtype { OPD_F32 = 0, OPD_BF16 = 1 };
enum opd_divergence { OPD_FORWARD_KL = 0, OPD_REVERSE_KL = 1, OPD_JSD = 2, OPD_TVD = 3 };
/* Instruction-set variants compiled into the library; OPD_ISA_AUTO picks the best one. */
enum opd_isa { OPD_ISA_AUTO = 0, OPD_ISA_GENERIC = 1, OPD_ISA_AVX2 = 2, OPD_ISA_AVX512 = 3 };
enum opd_status { OPD_OK = 0, OPD_BAD_ARGUMENT = 1, OPD_ISA_UNAVAILABLE = 2, OPD_OUT_OF_MEMORY = 3 };

typedef struct {
    int32_t divergence;  /* enum opd_divergence */
    float beta;          /* jsd mixture weight in [0, 1]; 0 and 1 are forward / reverse KL exactly */
    float temperature;   /* > 0 */
    float softcap_s;     /* student softcap c > 0, or 0 for none */
    float softcap_t;     /* teacher softcap c > 0, or 0 for none */
} opd_tile_options;

typedef struct {
    const void *data;    /* row-major, rows of k elements at stride ld (elements) */
    int32_t dtype;       /* enum opd_dtype */
    int64_t ld;
} opd_tile;

/* Full-row tile math for n rows of k logits each.
 *
 * row_scale: per-row gradient scale (n floats) or NULL when no gradient is wanted.
 * grad (grad_dtype, row stride grad_ld): written when row_scale is given; may alias the
 *       student tile (same dtype and ld): each row is read completely before it is overwritten.
 * Outputs (n floats each): divergence, coef (c), entropy, lse_s, lse_t (of the final
 * logits z).
 * Hard labels (labels != NULL): labels[i] in [0, k), or -1 for a row without a label; adds
 * cross_entropy[i] = lse(y) - y[label] with y = T z_s (the student at temperature 1; 0 without a
 * label) and, with row_scale, hard_scale[i] * dCE/d(raw) to the gradient (hard_scale: n floats,
 * given exactly when labels and row_scale are; ignored on rows without a label).
 * n_threads >= 1 threads split the rows. Returns an opd_status.
 */
OPD_API int opd_full_rows(const opd_tile *student, const opd_tile *teacher, int64_t n, int64_t k,
                          const opd_tile_options *options, const float *row_scale, void *grad, int32_t grad_dtype,
                          int64_t grad_ld, float *divergence, float *coef, float *entropy, float *lse_s,
                          float *lse_t, const int64_t *labels, const float *hard_scale, float *cross_entropy,
                          int32_t n_threads, int32_t isa);

/* Per-token log-probabilities of n rows of k logits (z = softcap(raw) / T, q = softmax(z)):
 * logprob[i] = log q(token_ids[i]) (ids in [0, k)) and, when entropy != NULL, entropy[i] = H(q).
 * Gradient: when grad_logprob or grad_entropy (n floats each, NULL = 0; grad_entropy needs
 * entropy) is given, dL/d(raw) of sum_i grad_logprob_i logprob_i + grad_entropy_i entropy_i is
 * written to grad (may alias the logits tile, as in opd_full_rows).
 */
OPD_API int opd_logprob_rows(const opd_tile *logits, int64_t n, int64_t k, float temperature, float softcap,
                             const int64_t *token_ids, const float *grad_logprob, const float *grad_entropy,
                             void *grad, int32_t grad_dtype, int64_t grad_ld, float *logprob, float *entropy,
                             int32_t n_threads, int32_t isa);

typedef struct {
    int32_t divergence;  /* enum opd_divergence */
    float beta;
    float temperature;   /* divides the student's logits only */
    float softcap;       /* student softcap, or 0 */
    int32_t bucket;      /* 1: the k ids plus a tail category; 0: renormalized over the ids */
} opd_topk_options;

/* Top-k teacher loss for n rows of k student logits: the divergence on m = n_ids + bucket
 * categories per row (opd_fast/topk.py). ids: n x n_ids at stride ids_ld, distinct ids in
 * [0, k) or -1 for a padding slot; teacher_log_p: n x m at stride log_p_ld, the teacher's
 * normalized category log-probs (-inf = zero mass; the tail last with the bucket).
 * Outputs (n floats each): divergence, lse (full-vocabulary log-sum-exp of z), top_mass (the
 * student's mass on the ids), entropy (full vocabulary; may be NULL). With row_scale, dL/d(raw)
 * of sum_i row_scale_i divergence_i is written to grad (may alias the logits tile).
 */
OPD_API int opd_topk_rows(const opd_tile *logits, int64_t n, int64_t k, const opd_topk_options *options,
                          const int64_t *ids, int64_t n_ids, int64_t ids_ld, const float *teacher_log_p,
                          int64_t log_p_ld, const float *row_scale, void *grad, int32_t grad_dtype, int64_t grad_ld,
                          float *divergence, float *lse, float *top_mass, float *entropy, int32_t n_threads,
                          int32_t isa);

OPD_API int opd_abi_version(void);
OPD_API int opd_isa_supported(int32_t isa);  /* 1 when compiled in and supported by this CPU */
OPD_API int opd_best_isa(void);
OPD_API const char *opd_isa_name(int32_t isa);

#ifdef __cplusplus
}
#endif

#endif
