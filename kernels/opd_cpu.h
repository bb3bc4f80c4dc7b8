/* opd-fast native CPU kernel: the element-wise half of the fused divergence loss.
 *
 * Plain C ABI (no torch headers) so Python loads it with ctypes and C/C++ trainers can
 * embed it. The caller does the GEMMs; this library turns full-row logits tiles of the
 * student and teacher into per-row statistics and the gradient with respect to the raw
 * student logits, following opd_fast/backends/tile_math.py (the formulas live there):
 *
 *   z = softcap(raw) / T,  q = softmax(z_s),  p = softmax(z_t)
 *   dD/dz_s = a - q * c   (a and c per divergence, see tile_math.py)
 *   grad    = row_scale * (a - q c) / T * (1 - tanh^2)   (tanh term only with a softcap)
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

#define OPD_ABI_VERSION 1

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
 * logits z). n_threads >= 1 threads split the rows. Returns an opd_status.
 */
OPD_API int opd_full_rows(const opd_tile *student, const opd_tile *teacher, int64_t n, int64_t k,
                          const opd_tile_options *options, const float *row_scale, void *grad, int32_t grad_dtype,
                          int64_t grad_ld, float *divergence, float *coef, float *entropy, float *lse_s,
                          float *lse_t, int32_t n_threads, int32_t isa);

OPD_API int opd_abi_version(void);
OPD_API int opd_isa_supported(int32_t isa);  /* 1 when compiled in and supported by this CPU */
OPD_API int opd_best_isa(void);
OPD_API const char *opd_isa_name(int32_t isa);

#ifdef __cplusplus
}
#endif

#endif
