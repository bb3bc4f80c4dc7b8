// opd_topk_rows' per-row math: the divergence between the teacher's top-k log-probs and the
// student on the k ids (plus, with the bucket, one tail category holding all other mass),
// compiled once per instruction set (see row_math.h). opd_fast/topk.py states the contract.
//
// Per row: stage z = softcap(raw) / T; gather the ids' logits (padding slots: -inf); hide them
// (bucket) and take the log-sum-exp of the rest in one exp pass (with sum q log q alongside
// for the entropy); the divergence table on the m categories; with a gradient, one exp pass
// writes exp(z - lse_tail) * g_tail over the row (bucket; zeros for renormalize) and the ids'
// category gradients are scattered over it, each chained to raw logits.
#include "row_math.h"

namespace opd {
namespace OPD_ISA_NS {
namespace {

inline float logaddexp(float a, float b) {
    const float hi = a > b ? a : b, lo = a > b ? b : a;
    return hi == -kInf ? -kInf : hi + std::log1p(std::exp(lo - hi));
}

inline void fill(float *p, int64_t from, int64_t to, float value) {
    for (int64_t j = from; j < to; ++j) p[j] = value;
}

}  // namespace

void topk_rows(const TopKJob &job, int64_t r0, int64_t r1, float *scratch) {
    const int64_t k = job.k, kp = padded(k), n_ids = job.n_ids, m = n_ids + (job.bucket ? 1 : 0), mp = padded(m);
    const float T = job.temperature;
    float *z = scratch, *log_q = z + kp, *cat_a = log_q + mp, *cat_q = cat_a + mp, *z_ids = cat_q + mp;
    for (int64_t r = r0; r < r1; ++r) {
        const int64_t *ids = job.ids + r * job.ids_ld;
        const float mx = stage_row(job.logits, r, k, job.softcap, T, z);
        for (int64_t i = 0; i < n_ids; ++i) z_ids[i] = ids[i] >= 0 ? z[ids[i]] : -kInf;
        fill(z_ids, n_ids, mp, -kInf);
        const float top_max = row_max(z_ids, mp), lse_top = row_lse(z_ids, mp, top_max);
        // the logits outside the categories: all but the ids (bucket) or the whole row (renormalize)
        float rest_max = mx;
        if (job.bucket) {
            for (int64_t i = 0; i < n_ids; ++i) {
                if (ids[i] >= 0) z[ids[i]] = -kInf;
            }
            if (top_max >= mx) rest_max = row_max(z, kp);  // the max was among the ids
        }
        const LseParts rest = job.entropy_out ? row_lse_parts(z, kp, rest_max)
                                              : LseParts{row_lse(z, kp, rest_max), 0.0f, 0.0f, rest_max};
        const float lse = job.bucket ? logaddexp(rest.lse, lse_top) : rest.lse;
        const float top_norm = job.bucket ? lse : lse_top;  // category log q = z_id - top_norm
        // a valid id whose normalizer is -inf too (every compared logit -inf) is 0/0: NaN, as in torch
        for (int64_t i = 0; i < n_ids; ++i) log_q[i] = ids[i] >= 0 ? z_ids[i] - top_norm : -kInf;
        if (job.bucket) log_q[n_ids] = rest.lse - lse;
        fill(log_q, m, mp, -kInf);
        const float *teacher = job.teacher_log_p + r * job.log_p_ld;
        for (int64_t i = 0; i < m; ++i) cat_a[i] = teacher[i];
        fill(cat_a, m, mp, -kInf);
        const Sums s = divergence_row(job.divergence, job.beta, log_q, cat_a, cat_q, mp, 0.0f, 0.0f);
        job.divergence_out[r] = s.value;
        job.lse_out[r] = lse;
        job.top_mass_out[r] = std::exp(lse_top - lse);
        if (job.entropy_out) {  // over the whole vocabulary: the rest's share plus the ids' (bucket)
            float qlq = q_log_q(rest, lse);
            if (job.bucket) {
                for (int64_t i = 0; i < n_ids; ++i) {
                    const float lq = z_ids[i] - lse;
                    if (z_ids[i] != -kInf) qlq += std::exp(lq) * lq;  // NaN passes
                }
            }
            job.entropy_out[r] = -qlq;
        }
        if (!job.row_scale) continue;
        const float scale = job.row_scale[r];
        for (int64_t j = 0; j < mp; j += W) store(cat_a + j, (load(cat_a + j) - load(cat_q + j) * s.coef) * scale);
        // d lse_tail / dz = exp(z - lse_tail) off the ids (hidden ids: exp(-inf) = 0, overwritten below)
        const float g_tail = job.bucket && rest.lse != -kInf ? cat_a[n_ids] : 0.0f;  // a NaN tail passes
        for (int64_t j = 0; j < k; j += W) {
            V g = splat(0.0f);
            if (g_tail != 0.0f) {
                V zj = load(z + j);
                g = to_raw(vexp(zj - rest.lse) * g_tail, zj, T, job.softcap);
            }
            store_grad(job.grad, r, j, k, g);
        }
        for (int64_t i = 0; i < n_ids; ++i) {
            if (ids[i] >= 0) store_grad_at(job.grad, r, ids[i], to_raw(cat_a[i], z_ids[i], T, job.softcap));
        }
    }
}

}  // namespace OPD_ISA_NS
}  // namespace opd
