// ctest: the native kernel against a plain double-precision implementation of the same
// math (written independently here, scalar and unfused), for every instruction-set
// variant this CPU runs, fp32 and bf16 tiles, every divergence, temperature and softcap;
// plus thread-count determinism and -inf logits. Exit code 0 = pass.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "opd_cpu.h"

namespace {

int failures = 0;

void check(bool ok, const char *what, const char *ctx) {
    if (!ok) {
        ++failures;
        if (failures < 20) std::printf("FAIL %s [%s]\n", what, ctx);
    }
}

uint16_t to_bf16(float x) {
    uint32_t u;
    std::memcpy(&u, &x, 4);
    return uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

float from_bf16(uint16_t h) {
    uint32_t u = uint32_t(h) << 16;
    float x;
    std::memcpy(&x, &u, 4);
    return x;
}

struct RowRef { double value, entropy, lse_s, lse_t; std::vector<double> grad; };

// dD/dz by the chain rule written out per divergence, then through temperature and softcap.
RowRef reference_row(const std::vector<double> &rs, const std::vector<double> &rt, const opd_tile_options &o,
                     double scale) {
    const size_t k = rs.size();
    const double T = o.temperature;
    auto finish = [&](double x, double c) { return (c > 0 ? c * std::tanh(x / c) : x) / T; };
    std::vector<double> zs(k), zt(k), q(k), p(k);
    double ms = -INFINITY, mt = -INFINITY;
    for (size_t j = 0; j < k; ++j) {
        zs[j] = finish(rs[j], o.softcap_s);
        zt[j] = finish(rt[j], o.softcap_t);
        ms = std::fmax(ms, zs[j]);
        mt = std::fmax(mt, zt[j]);
    }
    double ss = 0, st = 0;
    for (size_t j = 0; j < k; ++j) { ss += std::exp(zs[j] - ms); st += std::exp(zt[j] - mt); }
    RowRef r{0, 0, ms + std::log(ss), mt + std::log(st), std::vector<double>(k)};
    for (size_t j = 0; j < k; ++j) { q[j] = std::exp(zs[j] - r.lse_s); p[j] = std::exp(zt[j] - r.lse_t); }
    auto xlogy = [](double x, double y) { return x > 0 ? x * std::log(y) : 0.0; };
    int div = o.divergence;
    if (div == OPD_JSD && o.beta == 0.0f) div = OPD_FORWARD_KL;
    if (div == OPD_JSD && o.beta == 1.0f) div = OPD_REVERSE_KL;
    std::vector<double> dq(k);  // dD/dq_j
    const double b = o.beta;
    for (size_t j = 0; j < k; ++j) {
        r.entropy -= xlogy(q[j], q[j]);
        const double m = b * p[j] + (1 - b) * q[j];
        switch (div) {
            case OPD_FORWARD_KL: r.value += xlogy(p[j], p[j]) - xlogy(p[j], q[j]); dq[j] = -p[j] / q[j]; break;
            case OPD_REVERSE_KL:
                r.value += xlogy(q[j], q[j]) - xlogy(q[j], p[j]);
                dq[j] = q[j] > 0 ? std::log(q[j] / p[j]) + 1 : 0;
                break;
            case OPD_JSD:
                r.value += b * (xlogy(p[j], p[j]) - xlogy(p[j], m)) + (1 - b) * (xlogy(q[j], q[j]) - xlogy(q[j], m));
                dq[j] = q[j] > 0 ? (1 - b) * std::log(q[j] / m) : 0;  // the p/M and q/M terms cancel
                break;
            default: r.value += 0.5 * std::fabs(p[j] - q[j]); dq[j] = 0.5 * ((q[j] > p[j]) - (q[j] < p[j]));
        }
    }
    double qdq = 0;
    for (size_t j = 0; j < k; ++j) qdq += q[j] > 0 ? q[j] * dq[j] : 0;
    for (size_t j = 0; j < k; ++j) {
        double g = q[j] > 0 ? q[j] * (dq[j] - qdq) : 0;  // softmax Jacobian
        g = g * scale / T;
        if (o.softcap_s > 0) { const double t = std::tanh(rs[j] / o.softcap_s); g *= 1 - t * t; }
        r.grad[j] = g;
    }
    return r;
}

struct Result { std::vector<float> div, coef, ent, ls, lt, grad; int status; };

Result run(const std::vector<float> &s, const std::vector<float> &t, int64_t n, int64_t k, int dtype,
           const opd_tile_options &o, const std::vector<float> &scale, int threads, int isa) {
    std::vector<uint16_t> sb(s.size()), tb(t.size());
    for (size_t i = 0; i < s.size(); ++i) { sb[i] = to_bf16(s[i]); tb[i] = to_bf16(t[i]); }
    std::vector<float> sf = s;  // the gradient is written in place over the student tile
    const bool bf = dtype == OPD_BF16;
    opd_tile ts{bf ? static_cast<const void *>(sb.data()) : sf.data(), dtype, k};
    opd_tile tt{bf ? static_cast<const void *>(tb.data()) : t.data(), dtype, k};
    Result r{std::vector<float>(n), std::vector<float>(n), std::vector<float>(n), std::vector<float>(n),
             std::vector<float>(n), {}, 0};
    r.status = opd_full_rows(&ts, &tt, n, k, &o, scale.data(), bf ? static_cast<void *>(sb.data()) : sf.data(),
                             dtype, k, r.div.data(), r.coef.data(), r.ent.data(), r.ls.data(), r.lt.data(), threads,
                             isa);
    r.grad.resize(n * k);
    for (int64_t i = 0; i < n * k; ++i) r.grad[i] = bf ? from_bf16(sb[i]) : sf[i];
    return r;
}

bool close(double got, double want, double rtol, double atol) {
    return std::isfinite(got) == std::isfinite(want) && (!std::isfinite(want) ? got == want
                                                                               : std::fabs(got - want) <= atol + rtol * std::fabs(want));
}

void case_matrix(int isa) {
    std::mt19937 rng(7);
    std::normal_distribution<float> normal(0.0f, 3.0f);
    const int divs[] = {OPD_FORWARD_KL, OPD_REVERSE_KL, OPD_JSD, OPD_JSD, OPD_JSD, OPD_TVD};
    const float betas[] = {0.5f, 0.5f, 0.3f, 0.0f, 1.0f, 0.5f};
    for (int64_t k : {1, 37, 1000}) {
        const int64_t n = 5;
        std::vector<float> s(n * k), t(n * k), scale(n);
        for (auto &x : s) x = normal(rng);
        for (auto &x : t) x = normal(rng);
        for (int64_t i = 0; i < n; ++i) scale[i] = 0.5f + 0.25f * float(i);
        for (int dtype : {OPD_F32, OPD_BF16}) {
            for (int d = 0; d < 6; ++d) {
                for (float temp : {1.0f, 1.7f}) {
                    for (float cap : {0.0f, 5.0f}) {
                        opd_tile_options o{divs[d], betas[d], temp, cap, cap * 2};
                        char ctx[160];
                        std::snprintf(ctx, sizeof ctx, "isa=%s k=%lld dtype=%d div=%d beta=%g T=%g cap=%g",
                                      opd_isa_name(isa), (long long)k, dtype, divs[d], betas[d], temp, cap);
                        Result r = run(s, t, n, k, dtype, o, scale, 1, isa);
                        check(r.status == OPD_OK, "status", ctx);
                        const double gtol = dtype == OPD_BF16 ? 1e-2 : 1e-4;
                        for (int64_t i = 0; i < n; ++i) {
                            std::vector<double> rs(k), rt(k);
                            for (int64_t j = 0; j < k; ++j) {
                                const bool bf = dtype == OPD_BF16;
                                rs[j] = bf ? from_bf16(to_bf16(s[i * k + j])) : s[i * k + j];
                                rt[j] = bf ? from_bf16(to_bf16(t[i * k + j])) : t[i * k + j];
                            }
                            RowRef ref = reference_row(rs, rt, o, scale[i]);
                            check(close(r.div[i], ref.value, 1e-4, 1e-5), "divergence", ctx);
                            check(close(r.ent[i], ref.entropy, 1e-4, 1e-5), "entropy", ctx);
                            check(close(r.ls[i], ref.lse_s, 1e-5, 1e-5), "lse_s", ctx);
                            check(close(r.lt[i], ref.lse_t, 1e-5, 1e-5), "lse_t", ctx);
                            double gmax = 0;
                            for (double g : ref.grad) gmax = std::fmax(gmax, std::fabs(g));
                            for (int64_t j = 0; j < k; ++j)
                                check(close(r.grad[i * k + j], ref.grad[j], gtol, 1e-6 + gtol * 1e-2 * gmax), "grad",
                                      ctx);
                        }
                        Result r2 = run(s, t, n, k, dtype, o, scale, 2, isa);
                        check(r2.div == r.div && r2.grad == r.grad && r2.ent == r.ent && r2.coef == r.coef,
                              "threads 1 vs 2 bitwise", ctx);
                    }
                }
            }
        }
    }
}

void case_neg_inf(int isa) {
    const int64_t n = 2, k = 19;
    std::vector<float> s(n * k), t(n * k), scale(n, 1.0f);
    for (int64_t j = 0; j < n * k; ++j) { s[j] = 0.1f * float(j % 7); t[j] = -0.2f * float(j % 5); }
    for (int64_t j = 0; j < k; j += 3) { s[j] = -INFINITY; t[j] = -INFINITY; }  // masked vocab in both
    s[k + 4] = -INFINITY;                                                       // student-only zero mass
    t[k + 5] = -INFINITY;                                                       // teacher-only zero mass
    for (int div : {OPD_FORWARD_KL, OPD_REVERSE_KL, OPD_JSD, OPD_TVD}) {
        opd_tile_options o{div, 0.5f, 1.0f, 0.0f, 0.0f};
        char ctx[64];
        std::snprintf(ctx, sizeof ctx, "-inf isa=%s div=%d", opd_isa_name(isa), div);
        Result r = run(s, t, 1, k, OPD_F32, o, scale, 1, isa);  // row 0: shared masks, all finite
        for (float x : r.grad) check(std::isfinite(x), "finite grad", ctx);
        check(std::isfinite(r.div[0]) && std::isfinite(r.ent[0]), "finite value", ctx);
        std::vector<double> rs(s.begin(), s.begin() + k), rt(t.begin(), t.begin() + k);
        check(close(r.div[0], reference_row(rs, rt, o, 1.0).value, 1e-4, 1e-6), "-inf value", ctx);
        Result r1 = run(s, t, n, k, OPD_F32, o, scale, 1, isa);  // row 1: one-sided zero mass
        check(!std::isnan(r1.div[1]) && !std::isnan(r1.ent[1]), "no NaN", ctx);
    }
}

void case_bad_arguments() {
    float buf[4] = {0, 0, 0, 0}, out[5][1];
    opd_tile tile{buf, OPD_F32, 4};
    opd_tile_options o{OPD_FORWARD_KL, 0.5f, 0.0f, 0.0f, 0.0f};  // temperature 0
    check(opd_full_rows(&tile, &tile, 1, 4, &o, nullptr, nullptr, 0, 0, out[0], out[1], out[2], out[3], out[4], 1,
                        OPD_ISA_AUTO) == OPD_BAD_ARGUMENT,
          "temperature 0 rejected", "args");
    o.temperature = 1.0f;
    opd_tile narrow{buf, OPD_F32, 2};  // ld < k
    check(opd_full_rows(&narrow, &tile, 1, 4, &o, nullptr, nullptr, 0, 0, out[0], out[1], out[2], out[3], out[4],
                        1, OPD_ISA_AUTO) == OPD_BAD_ARGUMENT,
          "ld < k rejected", "args");
}

}  // namespace

int main() {
    if (opd_abi_version() != OPD_ABI_VERSION) return 1;
    int variants = 0;
    for (int isa : {OPD_ISA_GENERIC, OPD_ISA_AVX2, OPD_ISA_AVX512}) {
        if (!opd_isa_supported(isa)) continue;
        ++variants;
        case_matrix(isa);
        case_neg_inf(isa);
    }
    case_bad_arguments();
    std::printf("%d instruction-set variant(s) tested, best=%s, %d failure(s)\n", variants,
                opd_isa_name(opd_best_isa()), failures);
    return failures == 0 && variants > 0 ? 0 : 1;
}
