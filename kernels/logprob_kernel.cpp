// opd_logprob_rows' per-row math: log q(y), the entropy of q = softmax(z) and the gradient
// u (onehot(y) - q) - u_H q (log q + H), compiled once per instruction set (see row_math.h).
//
// Passes over one row: stage z = softcap(raw) / T (and the max); one exp pass for the
// log-sum-exp and, with the entropy, sum q log q alongside (row_lse_parts); with an upstream
// gradient one more exp pass writes the gradient (chained to raw logits) over the row.
#include "row_math.h"

namespace opd {
namespace OPD_ISA_NS {

void logprob_rows(const LogProbJob &job, int64_t r0, int64_t r1, float *z) {
    const int64_t k = job.k, kp = padded(k);
    const float T = job.temperature;
    for (int64_t r = r0; r < r1; ++r) {
        const float mx = stage_row(job.logits, r, k, job.softcap, T, z);
        const int64_t y = job.token_ids[r];
        float lse, entropy = 0.0f;
        if (job.entropy_out) {
            const LseParts p = row_lse_parts(z, kp, mx);
            lse = p.lse;
            // an all -inf row has no distribution: NaN, like its log-prob (-inf - -inf), not q_log_q's 0
            entropy = lse == -kInf ? std::numeric_limits<float>::quiet_NaN() : -q_log_q(p, lse);
            job.entropy_out[r] = entropy;
        } else {
            lse = row_lse(z, kp, mx);
        }
        job.logprob_out[r] = z[y] - lse;
        if (!job.grad_logprob && !job.grad_entropy) continue;
        const float u = job.grad_logprob ? job.grad_logprob[r] : 0.0f;
        const float u_h = job.grad_entropy ? job.grad_entropy[r] : 0.0f;
        for (int64_t j = 0; j < k; j += W) {
            V zj = load(z + j);
            V log_q = zj - lse;
            V g = -where_pos(vexp(log_q), (log_q + entropy) * u_h + u);  // q = 0 lanes: 0, never 0 * inf
            add_onehot(g, j, y, u);
            store_grad(job.grad, r, j, k, to_raw(g, zj, T, job.softcap));
        }
    }
}

}  // namespace OPD_ISA_NS
}  // namespace opd
