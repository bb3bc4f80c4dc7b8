// C entry points: argument checks, instruction-set choice, and the split of rows over
// threads (contiguous blocks; every row is computed by exactly one thread).
#include <cmath>
#include <cstdlib>
#include <memory>
#include <thread>
#include <vector>

#include "tile_job.h"

namespace {

using opd::RowsFn;

RowsFn kernel_for(int32_t isa) {
    switch (isa) {
        case OPD_ISA_GENERIC: return opd::generic::rows;
#ifdef OPD_HAVE_AVX2
        case OPD_ISA_AVX2: return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") ? opd::avx2::rows
                                                                                                 : nullptr;
#endif
#ifdef OPD_HAVE_AVX512
        case OPD_ISA_AVX512:
            return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") ? opd::avx512::rows
                                                                                           : nullptr;
#endif
        default: return nullptr;
    }
}

struct FreeDeleter {
    void operator()(float *p) const { std::free(p); }
};

bool valid_tile(const opd_tile *t, int64_t k) {
    return t && t->data && (t->dtype == OPD_F32 || t->dtype == OPD_BF16) && t->ld >= k;
}

}  // namespace

extern "C" {

int opd_abi_version(void) { return OPD_ABI_VERSION; }

int opd_isa_supported(int32_t isa) { return isa != OPD_ISA_AUTO && kernel_for(isa) != nullptr; }

int opd_best_isa(void) {
    for (int32_t isa : {OPD_ISA_AVX512, OPD_ISA_AVX2}) {
        if (opd_isa_supported(isa)) return isa;
    }
    return OPD_ISA_GENERIC;
}

const char *opd_isa_name(int32_t isa) {
    switch (isa) {
        case OPD_ISA_GENERIC: return "generic";
        case OPD_ISA_AVX2: return "avx2";
        case OPD_ISA_AVX512: return "avx512";
        default: return "auto";
    }
}

int opd_full_rows(const opd_tile *student, const opd_tile *teacher, int64_t n, int64_t k,
                  const opd_tile_options *options, const float *row_scale, void *grad, int32_t grad_dtype,
                  int64_t grad_ld, float *divergence, float *coef, float *entropy, float *lse_s, float *lse_t,
                  int32_t n_threads, int32_t isa) {
    if (n < 0 || k < 1 || !options || !valid_tile(student, k) || !valid_tile(teacher, k) || n_threads < 1 ||
        !divergence || !coef || !entropy || !lse_s || !lse_t)
        return OPD_BAD_ARGUMENT;
    const opd_tile_options &o = *options;
    if (o.divergence < OPD_FORWARD_KL || o.divergence > OPD_TVD || !(o.beta >= 0.0f && o.beta <= 1.0f) ||
        !(o.temperature > 0.0f) || !(o.softcap_s >= 0.0f) || !(o.softcap_t >= 0.0f))
        return OPD_BAD_ARGUMENT;
    if (row_scale && (!grad || (grad_dtype != OPD_F32 && grad_dtype != OPD_BF16) || grad_ld < k))
        return OPD_BAD_ARGUMENT;
    RowsFn rows = kernel_for(isa == OPD_ISA_AUTO ? opd_best_isa() : isa);
    if (!rows) return OPD_ISA_UNAVAILABLE;
    if (n == 0) return OPD_OK;

    opd::Job job{*student, *teacher, k, o.divergence, o.beta, o.temperature, o.softcap_s, o.softcap_t,
                 row_scale, grad, grad_dtype, grad_ld, divergence, coef, entropy, lse_s, lse_t};
    if (job.divergence == OPD_JSD && o.beta == 0.0f) job.divergence = OPD_FORWARD_KL;
    if (job.divergence == OPD_JSD && o.beta == 1.0f) job.divergence = OPD_REVERSE_KL;

    const int64_t threads = n_threads < n ? n_threads : n;
    const int64_t per_thread = (n + threads - 1) / threads;
    const size_t scratch_bytes = size_t(opd::scratch_floats(k)) * sizeof(float);
    std::vector<std::unique_ptr<float, FreeDeleter>> scratch;
    for (int64_t t = 0; t < threads; ++t) {
        scratch.emplace_back(static_cast<float *>(std::aligned_alloc(64, scratch_bytes)));
        if (!scratch.back()) return OPD_OUT_OF_MEMORY;
    }
    std::vector<std::thread> workers;
    for (int64_t t = 1; t < threads; ++t) {
        const int64_t r0 = t * per_thread, r1 = r0 + per_thread < n ? r0 + per_thread : n;
        if (r0 < r1) workers.emplace_back(rows, std::cref(job), r0, r1, scratch[t].get());
    }
    rows(job, 0, per_thread < n ? per_thread : n, scratch[0].get());
    for (auto &w : workers) w.join();
    return OPD_OK;
}

}  // extern "C"
