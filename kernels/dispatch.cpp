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

struct Kernels {
    RowsFn<opd::Job> full;
    RowsFn<opd::LogProbJob> logprob;
    RowsFn<opd::TopKJob> topk;
};

#define OPD_KERNELS(ns) Kernels{opd::ns::full_rows, opd::ns::logprob_rows, opd::ns::topk_rows}

bool kernels_for(int32_t isa, Kernels &out) {
    switch (isa) {
        case OPD_ISA_GENERIC: out = OPD_KERNELS(generic); return true;
#ifdef OPD_HAVE_AVX2
        case OPD_ISA_AVX2:
            if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma")) return false;
            out = OPD_KERNELS(avx2);
            return true;
#endif
#ifdef OPD_HAVE_AVX512
        case OPD_ISA_AVX512:
            if (!__builtin_cpu_supports("avx512f") || !__builtin_cpu_supports("avx512bw")) return false;
            out = OPD_KERNELS(avx512);
            return true;
#endif
        default: return false;
    }
}

struct FreeDeleter {
    void operator()(float *p) const { std::free(p); }
};

bool valid_tile(const opd_tile *t, int64_t k) {
    return t && t->data && (t->dtype == OPD_F32 || t->dtype == OPD_BF16) && t->ld >= k;
}

bool valid_grad(const void *grad, int32_t dtype, int64_t ld, int64_t k) {
    return grad && (dtype == OPD_F32 || dtype == OPD_BF16) && ld >= k;
}

// Runs fn over rows [0, n) in contiguous blocks on up to n_threads threads, each with its own
// 64-byte aligned scratch of scratch_floats floats.
template <class J>
int split_rows(RowsFn<J> fn, const J &job, int64_t n, int32_t n_threads, int64_t scratch_floats) {
    if (n == 0) return OPD_OK;
    const int64_t threads = n_threads < n ? n_threads : n;
    const int64_t per_thread = (n + threads - 1) / threads;
    const size_t scratch_bytes = (size_t(scratch_floats) * sizeof(float) + 63) / 64 * 64;
    std::vector<std::unique_ptr<float, FreeDeleter>> scratch;
    for (int64_t t = 0; t < threads; ++t) {
        scratch.emplace_back(static_cast<float *>(std::aligned_alloc(64, scratch_bytes)));
        if (!scratch.back()) return OPD_OUT_OF_MEMORY;
    }
    std::vector<std::thread> workers;
    for (int64_t t = 1; t < threads; ++t) {
        const int64_t r0 = t * per_thread, r1 = r0 + per_thread < n ? r0 + per_thread : n;
        if (r0 < r1) workers.emplace_back(fn, std::cref(job), r0, r1, scratch[t].get());
    }
    fn(job, 0, per_thread < n ? per_thread : n, scratch[0].get());
    for (auto &w : workers) w.join();
    return OPD_OK;
}

bool labels_in_range(const int64_t *labels, int64_t n, int64_t k, int64_t low) {
    for (int64_t i = 0; i < n; ++i) {
        if (labels[i] < low || labels[i] >= k) return false;
    }
    return true;
}

bool valid_divergence(int32_t divergence, float beta) {
    return divergence >= OPD_FORWARD_KL && divergence <= OPD_TVD && beta >= 0.0f && beta <= 1.0f;
}

int32_t effective_divergence(int32_t divergence, float beta) {
    if (divergence == OPD_JSD && beta == 0.0f) return OPD_FORWARD_KL;
    if (divergence == OPD_JSD && beta == 1.0f) return OPD_REVERSE_KL;
    return divergence;
}

}  // namespace

extern "C" {

int opd_abi_version(void) { return OPD_ABI_VERSION; }

int opd_isa_supported(int32_t isa) {
    Kernels k;
    return isa != OPD_ISA_AUTO && kernels_for(isa, k);
}

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
                  const int64_t *labels, const float *hard_scale, float *cross_entropy, int32_t n_threads,
                  int32_t isa) {
    if (n < 0 || k < 1 || !options || !valid_tile(student, k) || !valid_tile(teacher, k) || n_threads < 1 ||
        !divergence || !coef || !entropy || !lse_s || !lse_t)
        return OPD_BAD_ARGUMENT;
    const opd_tile_options &o = *options;
    if (!valid_divergence(o.divergence, o.beta) || !(o.temperature > 0.0f) || !(o.softcap_s >= 0.0f) ||
        !(o.softcap_t >= 0.0f))
        return OPD_BAD_ARGUMENT;
    if (row_scale && !valid_grad(grad, grad_dtype, grad_ld, k)) return OPD_BAD_ARGUMENT;
    if (labels && (!cross_entropy || !labels_in_range(labels, n, k, -1))) return OPD_BAD_ARGUMENT;
    if (bool(hard_scale) != bool(labels && row_scale)) return OPD_BAD_ARGUMENT;
    Kernels kernels;
    if (!kernels_for(isa == OPD_ISA_AUTO ? opd_best_isa() : isa, kernels)) return OPD_ISA_UNAVAILABLE;

    const opd::Job job{*student, *teacher, k, effective_divergence(o.divergence, o.beta), o.beta, o.temperature,
                       o.softcap_s, o.softcap_t, row_scale, {grad, grad_dtype, grad_ld}, divergence, coef, entropy,
                       lse_s, lse_t, labels, hard_scale, cross_entropy};
    return split_rows(kernels.full, job, n, n_threads, opd::full_rows_scratch(k));
}

int opd_logprob_rows(const opd_tile *logits, int64_t n, int64_t k, float temperature, float softcap,
                     const int64_t *token_ids, const float *grad_logprob, const float *grad_entropy, void *grad,
                     int32_t grad_dtype, int64_t grad_ld, float *logprob, float *entropy, int32_t n_threads,
                     int32_t isa) {
    if (n < 0 || k < 1 || !valid_tile(logits, k) || !(temperature > 0.0f) || !(softcap >= 0.0f) || !token_ids ||
        !logprob || n_threads < 1 || (grad_entropy && !entropy) || !labels_in_range(token_ids, n, k, 0))
        return OPD_BAD_ARGUMENT;
    if ((grad_logprob || grad_entropy) && !valid_grad(grad, grad_dtype, grad_ld, k)) return OPD_BAD_ARGUMENT;
    Kernels kernels;
    if (!kernels_for(isa == OPD_ISA_AUTO ? opd_best_isa() : isa, kernels)) return OPD_ISA_UNAVAILABLE;
    const opd::LogProbJob job{*logits, k, temperature, softcap, token_ids, grad_logprob, grad_entropy,
                              {grad, grad_dtype, grad_ld}, logprob, entropy};
    return split_rows(kernels.logprob, job, n, n_threads, opd::logprob_scratch(k));
}

int opd_topk_rows(const opd_tile *logits, int64_t n, int64_t k, const opd_topk_options *options, const int64_t *ids,
                  int64_t n_ids, int64_t ids_ld, const float *teacher_log_p, int64_t log_p_ld,
                  const float *row_scale, void *grad, int32_t grad_dtype, int64_t grad_ld, float *divergence,
                  float *lse, float *top_mass, float *entropy, int32_t n_threads, int32_t isa) {
    if (n < 0 || k < 1 || !valid_tile(logits, k) || !options || !ids || n_ids < 1 || ids_ld < n_ids ||
        !teacher_log_p || !divergence || !lse || !top_mass || n_threads < 1)
        return OPD_BAD_ARGUMENT;
    const opd_topk_options &o = *options;
    const int64_t n_cat = n_ids + (o.bucket ? 1 : 0);
    if (!valid_divergence(o.divergence, o.beta) || !(o.temperature > 0.0f) || !(o.softcap >= 0.0f) ||
        log_p_ld < n_cat || (o.bucket != 0 && o.bucket != 1))
        return OPD_BAD_ARGUMENT;
    for (int64_t r = 0; r < n; ++r) {
        if (!labels_in_range(ids + r * ids_ld, n_ids, k, -1)) return OPD_BAD_ARGUMENT;
    }
    if (row_scale && !valid_grad(grad, grad_dtype, grad_ld, k)) return OPD_BAD_ARGUMENT;
    Kernels kernels;
    if (!kernels_for(isa == OPD_ISA_AUTO ? opd_best_isa() : isa, kernels)) return OPD_ISA_UNAVAILABLE;
    const opd::TopKJob job{*logits, k, effective_divergence(o.divergence, o.beta), o.beta, o.temperature, o.softcap,
                           o.bucket == 1, ids, n_ids, ids_ld, teacher_log_p, log_p_ld, row_scale,
                           {grad, grad_dtype, grad_ld}, divergence, lse, top_mass, entropy};
    return split_rows(kernels.topk, job, n, n_threads, opd::topk_scratch(k, n_cat));
}

}  // extern "C"
