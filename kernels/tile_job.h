// Internal: one call's arguments as seen by the per-ISA row kernels (tile_kernel.cpp,
// logprob_kernel.cpp and topk_kernel.cpp are compiled once per instruction set; dispatch.cpp
// picks one set and splits rows over threads).
#pragma once

#include <cstdint>

#include "opd_cpu.h"

namespace opd {

struct GradOut {
    void *data;  // row-major, may alias the logits tile (each row is staged before it is written)
    int32_t dtype;
    int64_t ld;
};

// opd_full_rows
struct Job {
    opd_tile student, teacher;
    int64_t k;
    int32_t divergence;  // with jsd beta 0 / 1 already mapped to forward / reverse KL
    float beta, temperature, softcap_s, softcap_t;
    const float *row_scale;
    GradOut grad;
    float *divergence_out, *coef_out, *entropy_out, *lse_s_out, *lse_t_out;
    const int64_t *labels;    // hard labels (NO_LABEL = -1) or null
    const float *hard_scale;  // per-row coefficient of the cross-entropy's gradient (with row_scale)
    float *cross_entropy_out;
};

// opd_logprob_rows
struct LogProbJob {
    opd_tile logits;
    int64_t k;
    float temperature, softcap;
    const int64_t *token_ids;
    const float *grad_logprob, *grad_entropy;  // upstream gradients (null = 0); grad written if either is set
    GradOut grad;
    float *logprob_out, *entropy_out;  // entropy_out may be null
};

// opd_topk_rows
struct TopKJob {
    opd_tile logits;
    int64_t k;
    int32_t divergence;  // effective (jsd endpoints mapped)
    float beta, temperature, softcap;
    bool bucket;
    const int64_t *ids;  // n x n_ids at stride ids_ld; < 0 = padding slot
    int64_t n_ids, ids_ld;
    const float *teacher_log_p;  // n x (n_ids + bucket) at stride log_p_ld
    int64_t log_p_ld;
    const float *row_scale;
    GradOut grad;
    float *divergence_out, *lse_out, *top_mass_out, *entropy_out;  // entropy_out may be null
};

// Rows are padded to a multiple of the widest vector in scratch.
constexpr int64_t kPad = 16;
inline int64_t padded(int64_t k) { return (k + kPad - 1) / kPad * kPad; }
// Scratch floats per thread: student / teacher logits, q, and softmax(T z) for hard labels at T != 1.
inline int64_t full_rows_scratch(int64_t k) { return 4 * padded(k); }
inline int64_t logprob_scratch(int64_t k) { return padded(k); }
// The logits row plus four category rows (student log q, teacher log p / a, q, gathered logits).
inline int64_t topk_scratch(int64_t k, int64_t n_cat) { return padded(k) + 4 * padded(n_cat); }

// Rows [r0, r1) of a job; `scratch` holds the job's scratch floats, 64-byte aligned.
template <class J>
using RowsFn = void (*)(const J &, int64_t r0, int64_t r1, float *scratch);

#define OPD_DECLARE_ISA(ns)                                             \
    namespace ns {                                                      \
    void full_rows(const Job &, int64_t, int64_t, float *);             \
    void logprob_rows(const LogProbJob &, int64_t, int64_t, float *);   \
    void topk_rows(const TopKJob &, int64_t, int64_t, float *);         \
    }
OPD_DECLARE_ISA(generic)
OPD_DECLARE_ISA(avx2)
OPD_DECLARE_ISA(avx512)
#undef OPD_DECLARE_ISA

}  // namespace opd
