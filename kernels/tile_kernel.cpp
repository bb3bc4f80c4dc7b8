// opd_full_rows' per-row math: the fused teacher-student divergence (plus the hard-label
// cross-entropy), compiled once per instruction set (see row_math.h).
//
// Four passes over one row, all on thread-private scratch that stays in cache:
//   1. read raw logits (fp32/bf16), apply softcap and temperature -> z_s, z_t; row maxima
//   2. sum of exponentials -> lse_s, lse_t (and, for a labelled row at T != 1, lse of y = T z_s
//      with exp(y - max y) kept for the gradient: the only extra exp of hard labels)
//   3. q, p, the divergence, entropy, a and c = sum a        (tile_math.py's table)
//   4. grad = s (a - q c) + h T (softmax(y) - onehot(label)), chained through temperature and
//      softcap, written as fp32 or bf16 (s = row_scale, h = hard_scale); at T = 1 softmax(y) is
//      q, already in cache, so the cross-entropy adds one multiply-add per element and no exp
#include "row_math.h"

namespace opd {
namespace OPD_ISA_NS {
namespace {

// Log-sum-exp of y = T z (max y = T max z since T > 0); exp(y - max y) into `ey` when given.
float hard_lse_row(const float *z, int64_t kp, float mx, float T, float *ey, float &sum) {
    const float ymx = mx * T;
    V acc = splat(0.0f);
    for (int64_t j = 0; j < kp; j += W) {
        V e = vexp(load(z + j) * T - ymx);
        acc += e;
        if (ey) store(ey + j, e);
    }
    sum = hsum(acc);
    return ymx + std::log(sum);
}

struct HardTerms {
    const float *softmax;  // softmax(y) up to `factor`: q (T = 1) or exp(y - max y); null: no label
    float factor;          // h T, divided by sum exp(y - max y) at T != 1
    int64_t label;
    float onehot;  // -h T at the label
};

void grad_row(const Job &job, int64_t row, const float *zs, const float *a, const float *q, float s, float coef,
              const HardTerms &hard) {
    const int64_t k = job.k;
    for (int64_t j = 0; j < k; j += W) {
        V g = (load(a + j) - load(q + j) * coef) * s;  // this order keeps a - q c exactly 0 where it cancels
        if (hard.softmax) g += load(hard.softmax + j) * hard.factor;
        add_onehot(g, j, hard.label, hard.onehot);
        store_grad(job.grad, row, j, k, to_raw(g, load(zs + j), job.temperature, job.softcap_s));
    }
}

}  // namespace

void full_rows(const Job &job, int64_t r0, int64_t r1, float *scratch) {
    const int64_t kp = padded(job.k);
    const float T = job.temperature;
    float *zs = scratch, *zt = scratch + kp, *qbuf = scratch + 2 * kp, *ybuf = scratch + 3 * kp;
    for (int64_t r = r0; r < r1; ++r) {
        const float mx = stage_row(job.student, r, job.k, job.softcap_s, T, zs);
        const float ls = row_lse(zs, kp, mx);
        const float lt = row_lse(zt, kp, stage_row(job.teacher, r, job.k, job.softcap_t, T, zt));
        const int64_t label = job.labels ? job.labels[r] : -1;
        float *ey = nullptr, sum_y = 1.0f;
        if (label >= 0) {
            float lse_y = ls;
            if (T != 1.0f) {
                ey = job.row_scale ? ybuf : nullptr;
                lse_y = hard_lse_row(zs, kp, mx, T, ey, sum_y);
            }
            job.cross_entropy_out[r] = lse_y - zs[label] * T;
        } else if (job.labels) {
            job.cross_entropy_out[r] = 0.0f;
        }
        const Sums s = divergence_row(job.divergence, job.beta, zs, zt, qbuf, kp, ls, lt);
        job.divergence_out[r] = s.value;
        job.coef_out[r] = s.coef;
        job.entropy_out[r] = s.entropy;
        job.lse_s_out[r] = ls;
        job.lse_t_out[r] = lt;
        if (!job.row_scale) continue;
        const float h = label >= 0 ? job.hard_scale[r] : 0.0f;
        const HardTerms hard{label < 0 ? nullptr : T == 1.0f ? qbuf : ey, h * T / sum_y, label, -h * T};
        grad_row(job, r, zs, zt, qbuf, job.row_scale[r], s.coef, hard);
    }
}

}  // namespace OPD_ISA_NS
}  // namespace opd
