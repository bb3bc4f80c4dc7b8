// ctest: the native kernels against plain double-precision implementations of the same
// math (written independently here, scalar and unfused; the log-prob and top-k gradients by
// central differences), for every instruction-set variant this CPU runs, fp32 and bf16 tiles,
// every divergence, temperature and softcap, hard labels; plus thread-count determinism, -inf
// logits and non-finite inputs. Exit code 0 = pass.
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

struct RowRef { double value, entropy, lse_s, lse_t, ce; std::vector<double> grad; };

// dD/dz by the chain rule written out per divergence, plus h dCE/dz for a label >= 0
// (CE = lse(T z) - T z[label]), then through temperature and softcap.
RowRef reference_row(const std::vector<double> &rs, const std::vector<double> &rt, const opd_tile_options &o,
                     double scale, int64_t label = -1, double h = 0) {
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
    RowRef r{0, 0, ms + std::log(ss), mt + std::log(st), 0, std::vector<double>(k)};
    std::vector<double> sy(k);  // softmax(T z), the temperature-1 distribution of the labels
    double sum_y = 0;
    for (size_t j = 0; j < k; ++j) sum_y += std::exp(T * (zs[j] - ms));
    for (size_t j = 0; j < k; ++j) sy[j] = std::exp(T * (zs[j] - ms)) / sum_y;
    if (label >= 0) r.ce = T * ms + std::log(sum_y) - T * zs[label];
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
        g = g * scale;
        if (label >= 0) g += h * T * (sy[j] - (int64_t(j) == label));
        g /= T;
        if (o.softcap_s > 0) { const double t = std::tanh(rs[j] / o.softcap_s); g *= 1 - t * t; }
        r.grad[j] = g;
    }
    return r;
}

struct Result { std::vector<float> div, coef, ent, ls, lt, ce, grad; int status; };

// labels empty: no hard labels; else n labels (-1 = none) with per-row hard scales `hard`.
Result run(const std::vector<float> &s, const std::vector<float> &t, int64_t n, int64_t k, int dtype,
           const opd_tile_options &o, const std::vector<float> &scale, int threads, int isa,
           const std::vector<int64_t> &labels = {}, const std::vector<float> &hard = {}) {
    std::vector<uint16_t> sb(s.size()), tb(t.size());
    for (size_t i = 0; i < s.size(); ++i) { sb[i] = to_bf16(s[i]); tb[i] = to_bf16(t[i]); }
    std::vector<float> sf = s;  // the gradient is written in place over the student tile
    const bool bf = dtype == OPD_BF16;
    opd_tile ts{bf ? static_cast<const void *>(sb.data()) : sf.data(), dtype, k};
    opd_tile tt{bf ? static_cast<const void *>(tb.data()) : t.data(), dtype, k};
    Result r{std::vector<float>(n), std::vector<float>(n), std::vector<float>(n), std::vector<float>(n),
             std::vector<float>(n), std::vector<float>(n), {}, 0};
    r.status = opd_full_rows(&ts, &tt, n, k, &o, scale.data(), bf ? static_cast<void *>(sb.data()) : sf.data(),
                             dtype, k, r.div.data(), r.coef.data(), r.ent.data(), r.ls.data(), r.lt.data(),
                             labels.empty() ? nullptr : labels.data(), labels.empty() ? nullptr : hard.data(),
                             r.ce.data(), threads, isa);
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
        std::vector<int64_t> labels(n);  // row 1 has no label
        std::vector<float> hard(n);
        for (int64_t i = 0; i < n; ++i) {
            labels[i] = i == 1 ? -1 : (i * 7 + 3) % k;
            hard[i] = i == 1 ? 0.0f : 0.3f + 0.1f * float(i);
        }
        for (int dtype : {OPD_F32, OPD_BF16}) {
            for (int d = 0; d < 6; ++d) {
                for (float temp : {1.0f, 1.7f}) {
                    for (float cap : {0.0f, 5.0f}) {
                      for (bool with_labels : {false, true}) {
                        opd_tile_options o{divs[d], betas[d], temp, cap, cap * 2};
                        char ctx[160];
                        std::snprintf(ctx, sizeof ctx, "isa=%s k=%lld dtype=%d div=%d beta=%g T=%g cap=%g labels=%d",
                                      opd_isa_name(isa), (long long)k, dtype, divs[d], betas[d], temp, cap,
                                      int(with_labels));
                        const std::vector<int64_t> lab = with_labels ? labels : std::vector<int64_t>{};
                        Result r = run(s, t, n, k, dtype, o, scale, 1, isa, lab, hard);
                        check(r.status == OPD_OK, "status", ctx);
                        const double gtol = dtype == OPD_BF16 ? 1e-2 : 1e-4;
                        for (int64_t i = 0; i < n; ++i) {
                            std::vector<double> rs(k), rt(k);
                            for (int64_t j = 0; j < k; ++j) {
                                const bool bf = dtype == OPD_BF16;
                                rs[j] = bf ? from_bf16(to_bf16(s[i * k + j])) : s[i * k + j];
                                rt[j] = bf ? from_bf16(to_bf16(t[i * k + j])) : t[i * k + j];
                            }
                            RowRef ref = with_labels ? reference_row(rs, rt, o, scale[i], labels[i], hard[i])
                                                     : reference_row(rs, rt, o, scale[i]);
                            check(close(r.div[i], ref.value, 1e-4, 1e-5), "divergence", ctx);
                            if (with_labels) check(close(r.ce[i], ref.ce, 1e-4, 1e-5), "cross entropy", ctx);
                            check(close(r.ent[i], ref.entropy, 1e-4, 1e-5), "entropy", ctx);
                            check(close(r.ls[i], ref.lse_s, 1e-5, 1e-5), "lse_s", ctx);
                            check(close(r.lt[i], ref.lse_t, 1e-5, 1e-5), "lse_t", ctx);
                            double gmax = 0;
                            for (double g : ref.grad) gmax = std::fmax(gmax, std::fabs(g));
                            for (int64_t j = 0; j < k; ++j)
                                check(close(r.grad[i * k + j], ref.grad[j], gtol, 1e-6 + gtol * 1e-2 * gmax), "grad",
                                      ctx);
                        }
                        Result r2 = run(s, t, n, k, dtype, o, scale, 2, isa, lab, hard);
                        check(r2.div == r.div && r2.grad == r.grad && r2.ent == r.ent && r2.coef == r.coef &&
                                  r2.ce == r.ce,
                              "threads 1 vs 2 bitwise", ctx);
                      }
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
        const std::vector<int64_t> labels{1, 3};  // labelled -inf logit (index 0 is masked): finite
        Result r = run(s, t, 1, k, OPD_F32, o, scale, 1, isa, labels, scale);  // row 0: shared masks, all finite
        for (float x : r.grad) check(std::isfinite(x), "finite grad", ctx);
        check(std::isfinite(r.div[0]) && std::isfinite(r.ent[0]) && std::isfinite(r.ce[0]), "finite value", ctx);
        std::vector<double> rs(s.begin(), s.begin() + k), rt(t.begin(), t.begin() + k);
        check(close(r.div[0], reference_row(rs, rt, o, 1.0).value, 1e-4, 1e-6), "-inf value", ctx);
        Result r1 = run(s, t, n, k, OPD_F32, o, scale, 1, isa);  // row 1: one-sided zero mass
        check(!std::isnan(r1.div[1]) && !std::isnan(r1.ent[1]), "no NaN", ctx);
    }
}

// A NaN or inf in a row's inputs reaches its value and every element of its gradient; the other rows
// stay finite (rows: 0 clean, 1 student NaN, 2 teacher NaN, 3 student +inf, 4 teacher -inf).
void case_non_finite(int isa) {
    const int64_t n = 5, k = 37;  // k: two and a bit vectors for every ISA width
    std::vector<float> s(n * k), t(n * k), scale(n, 0.5f);
    for (int64_t j = 0; j < n * k; ++j) { s[j] = 0.3f * float(j % 7) - 1.0f; t[j] = 0.2f * float(j % 5); }
    s[1 * k + 20] = NAN;
    t[2 * k + 3] = NAN;
    s[3 * k + 36] = INFINITY;
    t[4 * k + 9] = -INFINITY;  // legal (zero mass): this row stays finite
    t[4 * k + 10] = INFINITY;  // not legal: the whole row is poisoned
    auto row_ok = [&](const std::vector<float> &g, int64_t row, bool finite) {
        for (int64_t j = 0; j < k; ++j) {
            if (bool(std::isfinite(g[row * k + j])) != finite) return false;
        }
        return true;
    };
    for (int dtype : {OPD_F32, OPD_BF16}) {
        for (int div : {OPD_FORWARD_KL, OPD_REVERSE_KL, OPD_JSD, OPD_TVD}) {
            for (float T : {1.0f, 0.7f}) {
                opd_tile_options o{div, 0.3f, T, 0.0f, 0.0f};
                char ctx[96];
                std::snprintf(ctx, sizeof ctx, "non-finite isa=%s dtype=%d div=%d T=%g", opd_isa_name(isa), dtype, div,
                              double(T));
                const std::vector<int64_t> labels{2, 5, -1, 7, 0};
                Result r = run(s, t, n, k, dtype, o, scale, 2, isa, labels, scale);
                for (int64_t i = 0; i < n; ++i) {
                    const bool finite = i == 0;
                    check(bool(std::isfinite(r.div[i])) == finite, "non-finite value", ctx);
                    check(row_ok(r.grad, i, finite), "non-finite gradient row", ctx);
                }
            }
            // top-k (both tails) and log-probs on the student rows 0, 1 and 3
            for (int bucket : {1, 0}) {
                const opd_topk_options o{div, 0.3f, 1.0f, 0.0f, bucket};
                const std::vector<int64_t> ids{1, 4, 20, 1, 4, 20, 1, 4, 20, 1, 4, 20, 1, 4, 20};
                const std::vector<float> log_p(n * 4, std::log(0.2f));
                std::vector<float> x = s, div_out(n), lse(n), mass(n);
                std::vector<uint16_t> xb(n * k);
                for (int64_t j = 0; j < n * k; ++j) xb[j] = to_bf16(s[j]);
                const bool bf = dtype == OPD_BF16;
                opd_tile tile{bf ? static_cast<const void *>(xb.data()) : x.data(), dtype, k};
                void *grad = bf ? static_cast<void *>(xb.data()) : x.data();
                check(opd_topk_rows(&tile, n, k, &o, ids.data(), 3, 3, log_p.data(), 4, scale.data(), grad, dtype, k,
                                    div_out.data(), lse.data(), mass.data(), nullptr, 1, isa) == OPD_OK,
                      "status", "non-finite top-k");
                std::vector<float> g(n * k);
                for (int64_t j = 0; j < n * k; ++j) g[j] = bf ? from_bf16(xb[j]) : x[j];
                const char *tail = bucket ? "bucket" : "renormalize";
                for (int64_t i : {0, 1, 3}) {
                    // renormalized, a row depends on its ids' logits only: row 3's +inf (column 36) is not one
                    const bool finite = i == 0 || (i == 3 && !bucket);
                    check(bool(std::isfinite(div_out[i])) == finite, "non-finite top-k value", tail);
                    if (bucket || finite) {
                        check(row_ok(g, i, finite), "non-finite top-k gradient row", tail);
                        continue;
                    }
                    for (int64_t j = 0; j < k; ++j) {
                        const bool id = j == 1 || j == 4 || j == 20;
                        check(id ? !std::isfinite(g[i * k + j]) : g[i * k + j] == 0.0f, "renormalized gradient", tail);
                    }
                }
            }
        }
        const std::vector<int64_t> ids{0, 1, 2, 3, 4};
        std::vector<float> x = s, lp(n), ent(n), u(n, 1.0f);
        std::vector<uint16_t> xb(n * k);
        for (int64_t j = 0; j < n * k; ++j) xb[j] = to_bf16(s[j]);
        const bool bf = dtype == OPD_BF16;
        opd_tile tile{bf ? static_cast<const void *>(xb.data()) : x.data(), dtype, k};
        check(opd_logprob_rows(&tile, n, k, 1.0f, 0.0f, ids.data(), u.data(), u.data(),
                               bf ? static_cast<void *>(xb.data()) : x.data(), dtype, k, lp.data(), ent.data(), 1,
                               isa) == OPD_OK,
              "status", "non-finite log-probs");
        std::vector<float> g(n * k);
        for (int64_t j = 0; j < n * k; ++j) g[j] = bf ? from_bf16(xb[j]) : x[j];
        for (int64_t i : {0, 1, 3}) {
            check(bool(std::isfinite(lp[i]) && std::isfinite(ent[i])) == (i == 0), "non-finite log-prob", "log-probs");
            check(row_ok(g, i, i == 0), "non-finite log-prob gradient row", "log-probs");
        }
    }
}

std::vector<double> finish_row(const std::vector<double> &raw, double T, double c) {
    std::vector<double> z(raw.size());
    for (size_t j = 0; j < raw.size(); ++j) z[j] = (c > 0 ? c * std::tanh(raw[j] / c) : raw[j]) / T;
    return z;
}

double logsumexp(const std::vector<double> &z) {
    double m = -INFINITY, s = 0;
    for (double x : z) m = std::fmax(m, x);
    for (double x : z) s += std::exp(x - m);
    return m + std::log(s);
}

double xlogy(double x, double y) { return x > 0 ? x * std::log(y) : 0.0; }

// Central differences of f at raw (double throughout).
template <class F>
std::vector<double> numeric_grad(F f, std::vector<double> raw) {
    std::vector<double> g(raw.size());
    for (size_t j = 0; j < raw.size(); ++j) {
        const double x = raw[j], h = 1e-5 * std::fmax(1.0, std::fabs(x));
        raw[j] = x + h;
        const double up = f(raw);
        raw[j] = x - h;
        g[j] = (up - f(raw)) / (2 * h);
        raw[j] = x;
    }
    return g;
}

// fp32 or bf16 copy of a tile and the values the kernel actually sees (bf16-rounded) as double.
struct Tile {
    std::vector<float> f;
    std::vector<uint16_t> b;
    int dtype;
    void *data() { return dtype == OPD_BF16 ? static_cast<void *>(b.data()) : f.data(); }
    double at(size_t i) const { return dtype == OPD_BF16 ? from_bf16(b[i]) : f[i]; }
    float grad_at(size_t i) const { return dtype == OPD_BF16 ? from_bf16(b[i]) : f[i]; }
};

Tile make_tile(const std::vector<float> &x, int dtype) {
    Tile t{x, std::vector<uint16_t>(x.size()), dtype};
    for (size_t i = 0; i < x.size(); ++i) t.b[i] = to_bf16(x[i]);
    return t;
}

bool grad_close(float got, double want, double gmax, int dtype) {
    const double gtol = dtype == OPD_BF16 ? 1e-2 : 1e-4;
    return close(got, want, gtol, 1e-6 + gtol * 1e-2 * gmax);
}

// Row `row` of the kernel's gradient tile against central differences of `objective` at `raw`.
template <class F>
void check_row_grad(const Tile &t, int64_t row, int64_t k, F objective, const std::vector<double> &raw,
                    const char *what, const char *ctx) {
    const std::vector<double> g = numeric_grad(objective, raw);
    double gmax = 0;
    for (double v : g) gmax = std::fmax(gmax, std::fabs(v));
    for (int64_t j = 0; j < k; ++j) check(grad_close(t.grad_at(row * k + j), g[j], gmax, t.dtype), what, ctx);
}

void case_logprobs(int isa) {
    std::mt19937 rng(11);
    std::normal_distribution<float> normal(0.0f, 3.0f);
    for (int64_t k : {1, 37, 1000}) {
        const int64_t n = 4;
        std::vector<float> x(n * k), u(n), u_h(n);
        for (auto &v : x) v = normal(rng);
        std::vector<int64_t> ids(n);
        for (int64_t i = 0; i < n; ++i) {
            ids[i] = (i * 13 + 5) % k;
            u[i] = 0.5f + 0.3f * float(i);
            u_h[i] = i == 2 ? 0.0f : -0.7f + 0.2f * float(i);
        }
        for (int dtype : {OPD_F32, OPD_BF16}) {
            for (float T : {1.0f, 1.7f}) {
                for (float cap : {0.0f, 5.0f}) {
                    char ctx[128];
                    std::snprintf(ctx, sizeof ctx, "logprob isa=%s k=%lld dtype=%d T=%g cap=%g", opd_isa_name(isa),
                                  (long long)k, dtype, T, cap);
                    std::vector<float> grads[2];
                    for (int threads : {1, 2}) {
                        Tile t = make_tile(x, dtype);
                        opd_tile tile{t.data(), dtype, k};
                        std::vector<float> lp(n), ent(n);
                        check(opd_logprob_rows(&tile, n, k, T, cap, ids.data(), u.data(), u_h.data(), t.data(), dtype,
                                               k, lp.data(), ent.data(), threads, isa) == OPD_OK,
                              "status", ctx);
                        for (int64_t i = 0; i < n * k; ++i) grads[threads - 1].push_back(t.grad_at(i));
                        if (threads == 2) continue;
                        Tile orig = make_tile(x, dtype);
                        for (int64_t i = 0; i < n; ++i) {
                            std::vector<double> raw(k);
                            for (int64_t j = 0; j < k; ++j) raw[j] = orig.at(i * k + j);
                            auto stats = [&](const std::vector<double> &r, double &logprob, double &entropy) {
                                const std::vector<double> z = finish_row(r, T, cap);
                                const double lse = logsumexp(z);
                                logprob = z[ids[i]] - lse;
                                entropy = 0;
                                for (double v : z) entropy -= xlogy(std::exp(v - lse), std::exp(v - lse));
                            };
                            double want_lp, want_ent;
                            stats(raw, want_lp, want_ent);
                            check(close(lp[i], want_lp, 1e-5, 1e-5), "logprob", ctx);
                            check(close(ent[i], want_ent, 1e-4, 1e-5), "entropy", ctx);
                            auto objective = [&](const std::vector<double> &r) {
                                double a, b;
                                stats(r, a, b);
                                return u[i] * a + u_h[i] * b;
                            };
                            check_row_grad(t, i, k, objective, raw, "logprob grad", ctx);
                        }
                    }
                    check(grads[0] == grads[1], "logprob threads 1 vs 2 bitwise", ctx);
                }
            }
        }
    }
}

// The top-k loss of one row, written directly on probabilities: categories are the student's
// mass on each id and (bucket) on everything else, or its renormalized mass on the ids.
struct TopKRef { double value, lse, top_mass, entropy; };

TopKRef topk_ref(const std::vector<double> &raw, const std::vector<int64_t> &ids, const std::vector<float> &log_p,
                 const opd_topk_options &o) {
    const std::vector<double> z = finish_row(raw, o.temperature, o.softcap);
    TopKRef r{0, logsumexp(z), 0, 0};
    std::vector<double> q(z.size()), qc, pc;
    for (size_t v = 0; v < z.size(); ++v) {
        q[v] = std::exp(z[v] - r.lse);
        r.entropy -= xlogy(q[v], q[v]);
    }
    double rest = 1.0;
    for (int64_t id : ids) {
        qc.push_back(id >= 0 ? q[id] : 0.0);
        r.top_mass += qc.back();
        rest -= qc.back();
    }
    if (o.bucket) {
        rest = 0;  // summed directly, not as 1 - top mass
        for (size_t v = 0; v < z.size(); ++v) {
            bool hidden = false;
            for (int64_t id : ids) hidden = hidden || id == int64_t(v);
            if (!hidden) rest += q[v];
        }
        qc.push_back(rest);
    } else {
        for (double &x : qc) x = r.top_mass > 0 ? x / r.top_mass : 0.0;
    }
    for (size_t i = 0; i < qc.size(); ++i) pc.push_back(std::exp(double(log_p[i])));
    const double b = o.beta;
    for (size_t i = 0; i < qc.size(); ++i) {
        const double p = pc[i], qq = qc[i], m = b * p + (1 - b) * qq;
        switch (o.divergence) {
            case OPD_FORWARD_KL: r.value += xlogy(p, p) - xlogy(p, qq); break;
            case OPD_REVERSE_KL: r.value += xlogy(qq, qq) - xlogy(qq, p); break;
            case OPD_JSD: r.value += b * (xlogy(p, p) - xlogy(p, m)) + (1 - b) * (xlogy(qq, qq) - xlogy(qq, m)); break;
            default: r.value += 0.5 * std::fabs(p - qq);
        }
    }
    return r;
}

void case_topk(int isa) {
    std::mt19937 rng(13);
    std::normal_distribution<float> normal(0.0f, 2.0f);
    std::uniform_real_distribution<float> uniform(0.05f, 1.0f);
    const int divs[] = {OPD_FORWARD_KL, OPD_REVERSE_KL, OPD_JSD, OPD_TVD};
    // (vocab, ids per row): ids cover the whole vocabulary in the first case
    for (auto [k, n_ids] : {std::pair<int64_t, int64_t>{6, 6}, {37, 5}, {300, 9}}) {
        const int64_t n = 4;
        std::vector<float> x(n * k), scale(n);
        for (auto &v : x) v = normal(rng);
        std::vector<int64_t> ids(n * n_ids);
        for (int64_t i = 0; i < n; ++i) {
            scale[i] = 0.4f + 0.3f * float(i);
            for (int64_t s = 0; s < n_ids; ++s) ids[i * n_ids + s] = (i * 5 + s * 7) % k;  // distinct: 7 ⟂ k
            if (k > n_ids) {
                if (i == 1) ids[i * n_ids + 2] = -1;                           // one padding slot
                if (i == 3) for (int64_t s = 0; s < n_ids; ++s) ids[i * n_ids + s] = -1;  // all padding
            }
        }
        for (int bucket : {1, 0}) {
            const int64_t m = n_ids + bucket;
            std::vector<float> log_p(n * m);
            for (int64_t i = 0; i < n; ++i) {  // teacher: random positive weights on the valid categories
                double total = 0;
                std::vector<double> w(m);
                int valid = 0;
                for (int64_t c = 0; c < m; ++c) {
                    const bool is_tail = c == n_ids;
                    const bool ok = is_tail ? true : ids[i * n_ids + c] >= 0;
                    valid += ok && !is_tail;
                    w[c] = ok ? uniform(rng) : 0.0;
                }
                if (bucket && valid == k) w[n_ids] = 0;  // no tail when the ids cover the vocabulary
                for (double v : w) total += v;
                for (int64_t c = 0; c < m; ++c) log_p[i * m + c] = w[c] > 0 ? float(std::log(w[c] / total)) : -INFINITY;
            }
            for (int dtype : {OPD_F32, OPD_BF16}) {
                for (int d = 0; d < 4; ++d) {
                    for (float T : {1.0f, 1.7f}) {
                        for (float cap : {0.0f, 5.0f}) {
                            const opd_topk_options o{divs[d], 0.3f, T, cap, bucket};
                            char ctx[160];
                            std::snprintf(ctx, sizeof ctx, "topk isa=%s k=%lld ids=%lld bucket=%d dtype=%d div=%d T=%g "
                                          "cap=%g", opd_isa_name(isa), (long long)k, (long long)n_ids, bucket, dtype,
                                          divs[d], T, cap);
                            std::vector<float> grads[2];
                            for (int threads : {1, 2}) {
                                Tile t = make_tile(x, dtype);
                                opd_tile tile{t.data(), dtype, k};
                                std::vector<float> div(n), lse(n), mass(n), ent(n);
                                check(opd_topk_rows(&tile, n, k, &o, ids.data(), n_ids, n_ids, log_p.data(), m,
                                                    scale.data(), t.data(), dtype, k, div.data(), lse.data(),
                                                    mass.data(), ent.data(), threads, isa) == OPD_OK,
                                      "status", ctx);
                                for (int64_t i = 0; i < n * k; ++i) grads[threads - 1].push_back(t.grad_at(i));
                                if (threads == 2) continue;
                                Tile orig = make_tile(x, dtype);
                                for (int64_t i = 0; i < n; ++i) {
                                    std::vector<double> raw(k);
                                    for (int64_t j = 0; j < k; ++j) raw[j] = orig.at(i * k + j);
                                    const std::vector<int64_t> row_ids(ids.begin() + i * n_ids,
                                                                       ids.begin() + (i + 1) * n_ids);
                                    const std::vector<float> row_p(log_p.begin() + i * m, log_p.begin() + (i + 1) * m);
                                    const TopKRef ref = topk_ref(raw, row_ids, row_p, o);
                                    check(close(div[i], ref.value, 1e-4, 2e-5), "topk divergence", ctx);
                                    check(close(lse[i], ref.lse, 1e-5, 1e-5), "topk lse", ctx);
                                    check(close(mass[i], ref.top_mass, 1e-4, 1e-6), "topk mass", ctx);
                                    check(close(ent[i], ref.entropy, 1e-4, 2e-5), "topk entropy", ctx);
                                    auto objective = [&](const std::vector<double> &r) {
                                        return scale[i] * topk_ref(r, row_ids, row_p, o).value;
                                    };
                                    check_row_grad(t, i, k, objective, raw, "topk grad", ctx);
                                }
                            }
                            check(grads[0] == grads[1], "topk threads 1 vs 2 bitwise", ctx);
                        }
                    }
                }
            }
        }
    }
}

// The ids hold all but e^-100 of the mass: the tail's log-sum-exp needs its own max.
void case_topk_far_tail(int isa) {
    const int64_t k = 37, n_ids = 3;
    std::vector<float> x(k);
    for (int64_t j = 0; j < k; ++j) x[j] = 0.1f * float(j % 5);
    const std::vector<int64_t> ids{4, 9, 20};
    for (int64_t id : ids) x[id] = 100.0f;
    const std::vector<float> log_p{std::log(0.3f), std::log(0.3f), std::log(0.3f), std::log(0.1f)};
    for (int div : {OPD_FORWARD_KL, OPD_REVERSE_KL}) {
        const opd_topk_options o{div, 0.5f, 1.0f, 0.0f, 1};
        float value, lse, mass, ent;
        opd_tile tile{x.data(), OPD_F32, k};
        check(opd_topk_rows(&tile, 1, k, &o, ids.data(), n_ids, n_ids, log_p.data(), 4, nullptr, nullptr, 0, 0,
                            &value, &lse, &mass, &ent, 1, isa) == OPD_OK,
              "status", "far tail");
        const TopKRef ref = topk_ref(std::vector<double>(x.begin(), x.end()), ids, log_p, o);
        check(close(value, ref.value, 1e-4, 1e-5), "far tail divergence", opd_isa_name(isa));
    }
}

void case_bad_arguments() {
    float buf[4] = {0, 0, 0, 0}, out[5][1];
    opd_tile tile{buf, OPD_F32, 4};
    opd_tile_options o{OPD_FORWARD_KL, 0.5f, 0.0f, 0.0f, 0.0f};  // temperature 0
    check(opd_full_rows(&tile, &tile, 1, 4, &o, nullptr, nullptr, 0, 0, out[0], out[1], out[2], out[3], out[4],
                        nullptr, nullptr, nullptr, 1, OPD_ISA_AUTO) == OPD_BAD_ARGUMENT,
          "temperature 0 rejected", "args");
    o.temperature = 1.0f;
    opd_tile narrow{buf, OPD_F32, 2};  // ld < k
    check(opd_full_rows(&narrow, &tile, 1, 4, &o, nullptr, nullptr, 0, 0, out[0], out[1], out[2], out[3], out[4],
                        nullptr, nullptr, nullptr, 1, OPD_ISA_AUTO) == OPD_BAD_ARGUMENT,
          "ld < k rejected", "args");
    const int64_t bad_label = 4, ok_label = 3;  // labels must be in [-1, k)
    float ce[1];
    check(opd_full_rows(&tile, &tile, 1, 4, &o, nullptr, nullptr, 0, 0, out[0], out[1], out[2], out[3], out[4],
                        &bad_label, nullptr, ce, 1, OPD_ISA_AUTO) == OPD_BAD_ARGUMENT,
          "label >= k rejected", "args");
    check(opd_full_rows(&tile, &tile, 1, 4, &o, nullptr, nullptr, 0, 0, out[0], out[1], out[2], out[3], out[4],
                        &ok_label, nullptr, ce, 1, OPD_ISA_AUTO) == OPD_OK,
          "labels without a gradient accepted", "args");
    check(opd_full_rows(&tile, &tile, 1, 4, &o, out[0], buf, OPD_F32, 4, out[0], out[1], out[2], out[3], out[4],
                        &ok_label, nullptr, ce, 1, OPD_ISA_AUTO) == OPD_BAD_ARGUMENT,
          "labels with a gradient need hard_scale", "args");
    float lp[1];
    check(opd_logprob_rows(&tile, 1, 4, 1.0f, 0.0f, &bad_label, nullptr, nullptr, nullptr, 0, 0, lp, nullptr, 1,
                           OPD_ISA_AUTO) == OPD_BAD_ARGUMENT,
          "token id >= k rejected", "args");
    opd_topk_options to{OPD_FORWARD_KL, 0.5f, 1.0f, 0.0f, 1};
    check(opd_topk_rows(&tile, 1, 4, &to, &bad_label, 1, 1, buf, 2, nullptr, nullptr, 0, 0, out[0], out[1], out[2],
                        nullptr, 1, OPD_ISA_AUTO) == OPD_BAD_ARGUMENT,
          "top-k id >= k rejected", "args");
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
        case_non_finite(isa);
        case_logprobs(isa);
        case_topk(isa);
        case_topk_far_tail(isa);
    }
    case_bad_arguments();
    std::printf("%d instruction-set variant(s) tested, best=%s, %d failure(s)\n", variants,
                opd_isa_name(opd_best_isa()), failures);
    return failures == 0 && variants > 0 ? 0 : 1;
}
