// Internal: one call's arguments as seen by the per-ISA row kernels (tile_kernel.cpp is
// compiled once per instruction set; dispatch.cpp picks one and splits rows over threads).
#pragma once

#include <cstdint>

#include "opd_cpu.h"

namespace opd {

struct Job {
    opd_tile student, teacher;
    int64_t k;
    int32_t divergence;  // with jsd beta 0 / 1 already mapped to forward / reverse KL
    float beta, temperature, softcap_s, softcap_t;
    const float *row_scale;
    void *grad;
    int32_t grad_dtype;
    int64_t grad_ld;
    float *divergence_out, *coef_out, *entropy_out, *lse_s_out, *lse_t_out;
};

// Rows are padded to a multiple of the widest vector in scratch; three scratch rows per thread.
constexpr int64_t kPad = 16;
inline int64_t padded(int64_t k) { return (k + kPad - 1) / kPad * kPad; }
inline int64_t scratch_floats(int64_t k) { return 3 * padded(k); }

// Rows [r0, r1) of the job; `scratch` holds scratch_floats(k) floats, 64-byte aligned.
using RowsFn = void (*)(const Job &, int64_t r0, int64_t r1, float *scratch);

namespace generic { void rows(const Job &, int64_t, int64_t, float *); }
namespace avx2 { void rows(const Job &, int64_t, int64_t, float *); }
namespace avx512 { void rows(const Job &, int64_t, int64_t, float *); }

}  // namespace opd
