// Per-ISA building blocks of the row kernels (tile_kernel.cpp, logprob_kernel.cpp, topk_kernel.cpp):
// GCC/Clang vector types of OPD_WIDTH lanes, exp/log/tanh, bf16 conversion, and the row passes
// they share (staging raw logits, log-sum-exp, the divergence table, the chained gradient store).
// Included once per instruction set, inside that set's namespace (CMake sets OPD_ISA_NS/OPD_WIDTH).
//
// Every sum runs lane-wise in index order and its lanes are folded in a fixed order, so a
// row's result does not depend on which thread computes it.
#pragma once

#include <cmath>
#include <cstring>
#include <limits>

#include "tile_job.h"

#ifndef OPD_ISA_NS
#error "compile with -DOPD_ISA_NS=<name> -DOPD_WIDTH=<lanes>"
#endif

namespace opd {
namespace OPD_ISA_NS {
namespace {

constexpr int W = OPD_WIDTH;
typedef float V __attribute__((vector_size(4 * W)));
typedef int32_t VI __attribute__((vector_size(4 * W)));
typedef uint16_t VH __attribute__((vector_size(2 * W)));
typedef uint32_t VU __attribute__((vector_size(4 * W)));

constexpr float kInf = std::numeric_limits<float>::infinity();

inline V splat(float x) { return V{} + x; }
inline V load(const float *p) { V v; std::memcpy(&v, p, sizeof(V)); return v; }
inline void store(float *p, V v) { std::memcpy(p, &v, sizeof(V)); }
inline V bits_to_float(VI i) { V v; std::memcpy(&v, &i, sizeof(V)); return v; }
inline VI float_to_bits(V v) { VI i; std::memcpy(&i, &v, sizeof(V)); return i; }
inline V select(VI mask, V a, V b) { return mask ? a : b; }
inline V vmax(V a, V b) { return select(a > b, a, b); }
// Running maximum that keeps a NaN of either side: a row's max is NaN when any element is, so a
// row with a NaN logit cannot pass for an all -inf (zero mass) row.
inline V vmax_nan(V acc, V v) { return select((v > acc) | (v != v), v, acc); }
inline V vmin(V a, V b) { return select(a < b, a, b); }
inline V vabs(V x) { return bits_to_float(float_to_bits(x) & 0x7fffffff); }

inline V load_bf16(const uint16_t *p) {
    VH h; std::memcpy(&h, p, sizeof(VH));
    VU u = __builtin_convertvector(h, VU) << 16;
    V v; std::memcpy(&v, &u, sizeof(V)); return v;
}

inline void store_bf16(uint16_t *p, V v) {  // round to nearest even; NaN stays NaN
    VU u; std::memcpy(&u, &v, sizeof(V));
    VU rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    VU nan = (u >> 16) | 0x40u;
    VI is_nan = (float_to_bits(v) & 0x7fffffff) > 0x7f800000;
    VU out = is_nan ? nan : rounded;
    VH h = __builtin_convertvector(out, VH);
    std::memcpy(p, &h, sizeof(VH));
}

// exp(x) with ~1 ulp error (Cephes polynomial); exactly 0 below -87.3 (so -inf gives 0), NaN for NaN
// (the clamps below would otherwise turn a NaN into a finite value and hide a non-finite input).
inline V vexp(V x) {
    V xc = vmin(vmax(x, splat(-87.3f)), splat(88.3f));
    V fx = xc * 1.44269504088896341f;
    fx = (fx + 12582912.0f) - 12582912.0f;  // round to nearest integer
    V r = xc - fx * 0.693359375f;
    r = r - fx * -2.12194440e-4f;
    V y = splat(1.9875691500e-4f);
    y = y * r + 1.3981999507e-3f;
    y = y * r + 8.3334519073e-3f;
    y = y * r + 4.1665795894e-2f;
    y = y * r + 1.6666665459e-1f;
    y = y * r + 5.0000001201e-1f;
    y = y * (r * r) + r + 1.0f;
    VI n = __builtin_convertvector(fx, VI);
    y = y * bits_to_float((n + 127) << 23);
    y = select(x < -87.3f, splat(0.0f), y);
    y = select(x > 88.3f, splat(kInf), y);
    return select(x != x, x, y);
}

// log(x) for finite x > 0 (Cephes polynomial, ~1 ulp); NaN stays NaN (the bit tricks would not).
inline V vlog(V x) {
    VI bits = float_to_bits(x);
    VI e = ((bits >> 23) & 0xff) - 126;
    V m = bits_to_float((bits & 0x007fffff) | 0x3f000000);  // [0.5, 1)
    VI small = m < 0.707106781186547524f;
    e = e + small;  // true lanes are -1
    m = select(small, m + m, m) - 1.0f;
    V z = m * m;
    V y = splat(7.0376836292e-2f);
    y = y * m - 1.1514610310e-1f;
    y = y * m + 1.1676998740e-1f;
    y = y * m - 1.2420140846e-1f;
    y = y * m + 1.4249322787e-1f;
    y = y * m - 1.6668057665e-1f;
    y = y * m + 2.0000714765e-1f;
    y = y * m - 2.4999993993e-1f;
    y = y * m + 3.3333331174e-1f;
    y = y * m * z;
    V ef = __builtin_convertvector(e, V);
    y = y + ef * -2.12194440e-4f;
    y = y - z * 0.5f;
    return select(x != x, x, m + y + ef * 0.693359375f);
}

// tanh(x): odd polynomial near 0 (Cephes), 1 - 2 / (exp(2|x|) + 1) elsewhere.
inline V vtanh(V x) {
    V ax = vabs(x);
    V s = ax * ax;
    V p = splat(-5.70498872745e-3f);
    p = p * s + 2.06390887954e-2f;
    p = p * s - 5.37397155531e-2f;
    p = p * s + 1.33314422036e-1f;
    p = p * s - 3.33332819422e-1f;
    p = p * s * ax + ax;
    V big = 1.0f - 2.0f / (vexp(ax + ax) + 1.0f);
    V t = select(ax < 0.625f, p, big);
    return bits_to_float(float_to_bits(t) | (float_to_bits(x) & int32_t(0x80000000u)));
}

inline float hsum(V v) {
    float s = 0.0f;
    for (int i = 0; i < W; ++i) s += v[i];
    return s;
}

inline float hmax(V v) {
    float m = v[0];
    for (int i = 1; i < W; ++i) m = v[i] > m || v[i] != v[i] ? v[i] : m;  // NaN sticks, as in vmax_nan
    return m;
}

// weight * value with 0 * anything = 0 (zero mass: -inf logits are legal); only an exact zero is
// guarded, so a NaN weight (a non-finite input) still reaches the sums.
inline V where_pos(V weight, V value) { return select(weight == 0.0f, splat(0.0f), weight * value); }

inline V load_any(const opd_tile &t, int64_t row, int64_t j) {
    if (t.dtype == OPD_BF16) return load_bf16(static_cast<const uint16_t *>(t.data) + row * t.ld + j);
    return load(static_cast<const float *>(t.data) + row * t.ld + j);
}

// z = softcap(raw) / T into the padded scratch row (padding = -inf, zero mass); returns the row max.
float stage_row(const opd_tile &t, int64_t row, int64_t k, float softcap, float temperature, float *z) {
    V mx = splat(-kInf);
    for (int64_t j = 0; j < k; j += W) {
        V v;
        const int64_t valid = k - j < W ? k - j : W;
        if (valid == W) {
            v = load_any(t, row, j);
        } else {  // tail: widen the valid elements through a small buffer
            alignas(64) float buf[W];
            for (int64_t i = 0; i < valid; ++i) {
                if (t.dtype == OPD_BF16) {
                    uint32_t u = uint32_t(static_cast<const uint16_t *>(t.data)[row * t.ld + j + i]) << 16;
                    std::memcpy(buf + i, &u, 4);
                } else {
                    buf[i] = static_cast<const float *>(t.data)[row * t.ld + j + i];
                }
            }
            v = load(buf);
        }
        if (softcap > 0.0f) v = vtanh(v / softcap) * softcap;
        if (temperature != 1.0f) v = v / temperature;
        if (valid < W) {
            for (int64_t i = valid; i < W; ++i) v[i] = -kInf;
        }
        store(z + j, v);
        mx = vmax_nan(mx, v);
    }
    for (int64_t j = (k + W - 1) / W * W; j < padded(k); ++j) z[j] = -kInf;
    return hmax(mx);
}

float row_max(const float *z, int64_t kp) {
    V mx = splat(-kInf);
    for (int64_t j = 0; j < kp; j += W) mx = vmax_nan(mx, load(z + j));
    return hmax(mx);
}

float row_lse(const float *z, int64_t kp, float mx) {
    if (mx == -kInf) return -kInf;
    V acc = splat(0.0f);
    for (int64_t j = 0; j < kp; j += W) acc += vexp(load(z + j) - mx);
    return mx + std::log(hsum(acc));
}

// Log-sum-exp and the row's share of sum q log q in one exp pass: with e = exp(z - mx),
// S = sum e and U = sum e (z - mx), the elements' sum of q log q under any normalizer L
// (log q = z - L) is exp(mx - L) (U + S (mx - L)).
struct LseParts { float lse, sum, dot, max; };

LseParts row_lse_parts(const float *z, int64_t kp, float mx) {
    if (mx == -kInf) return {-kInf, 0.0f, 0.0f, mx};
    V acc = splat(0.0f), dot = splat(0.0f);
    for (int64_t j = 0; j < kp; j += W) {
        V d = load(z + j) - mx;
        V e = vexp(d);
        acc += e;
        dot += where_pos(e, d);
    }
    const float s = hsum(acc);
    return {mx + std::log(s), s, hsum(dot), mx};
}

// sum q log q of the elements summarized by `p`, q = exp(z - lse).
inline float q_log_q(const LseParts &p, float lse) {
    if (p.max == -kInf) return 0.0f;
    return std::exp(p.max - lse) * (p.dot + p.sum * (p.max - lse));
}

struct Sums { float value, coef, entropy; };

// The divergence table of tile_math.py on one padded row of final logits (lse given): writes
// a over zt and q over qbuf; returns the row's value, c = sum a and entropy.
Sums divergence_row(int32_t divergence, float beta, const float *zs, float *zt, float *qbuf, int64_t kp, float lse_s,
                    float lse_t) {
    V value = splat(0.0f), kl_p = splat(0.0f), coef = splat(0.0f), ent = splat(0.0f);
    const float log_b = std::log(beta), log_1mb = std::log1p(-beta), one_m_beta = 1.0f - beta;
    for (int64_t j = 0; j < kp; j += W) {
        V log_q = load(zs + j) - lse_s;
        V log_p = load(zt + j) - lse_t;
        V q = vexp(log_q), p = vexp(log_p), a;
        ent += where_pos(q, log_q);
        switch (divergence) {
            case OPD_FORWARD_KL:
                value += where_pos(p, log_p - log_q);
                a = -p;
                coef += a;
                break;
            case OPD_REVERSE_KL:
                a = where_pos(q, log_q - log_p);
                value += a;
                break;
            case OPD_JSD: {
                V la = log_p + log_b, lb = log_q + log_1mb;
                V hi = vmax(la, lb), lo = vmin(la, lb);
                V d = select(hi == -kInf, splat(0.0f), lo - hi);
                V either = la + lb;  // NaN when one side is: max / min above would drop it
                V log_m = select(either != either, either, hi + vlog(vexp(d) + 1.0f));
                kl_p += where_pos(p, log_p - log_m);  // KL(p || M)
                a = where_pos(q, log_q - log_m);
                value += a;                             // KL(q || M)
                a = a * one_m_beta;
                break;
            }
            default: {  // tvd
                V diff = q - p;
                value += vabs(diff);
                V sign = select(diff > 0.0f, splat(1.0f), select(diff < 0.0f, splat(-1.0f), splat(0.0f)));
                sign = select(diff != diff, diff, sign);  // sign(NaN) = NaN keeps a NaN input in the gradient
                a = sign * q * 0.5f;
                coef += a;
            }
        }
        store(zt + j, a);
        store(qbuf + j, q);
    }
    Sums s{hsum(value), hsum(coef), -hsum(ent)};
    switch (divergence) {
        case OPD_REVERSE_KL: s.coef = s.value; break;
        case OPD_JSD: {
            const float kl_q = s.value;
            s.value = beta * hsum(kl_p) + one_m_beta * kl_q;
            s.coef = kl_q * one_m_beta;
            break;
        }
        case OPD_TVD: s.value *= 0.5f; break;
        default: break;
    }
    return s;
}

// Chain dL/dz back through z = softcap(raw) / T (tanh recovered from z: tanh = z T / c).
inline V to_raw(V g, V z, float T, float c) {
    if (T != 1.0f) g = g / T;
    if (c > 0.0f) {
        V t = z * (T / c);
        g = g * (-(t * t) + 1.0f);
    }
    return g;
}

inline float to_raw(float g, float z, float T, float c) {
    V v = to_raw(splat(g), splat(z), T, c);
    return v[0];
}

// Writes g to elements [j, min(j + W, k)) of a gradient row (fp32 or bf16).
inline void store_grad(const GradOut &out, int64_t row, int64_t j, int64_t k, V g) {
    const bool whole = j + W <= k;
    if (out.dtype == OPD_BF16) {
        uint16_t *dst = static_cast<uint16_t *>(out.data) + row * out.ld + j;
        if (whole) {
            store_bf16(dst, g);
        } else {
            alignas(64) uint16_t h[W];
            store_bf16(h, g);
            std::memcpy(dst, h, (k - j) * 2);
        }
    } else {
        float *dst = static_cast<float *>(out.data) + row * out.ld + j;
        if (whole) {
            store(dst, g);
        } else {
            alignas(64) float tail[W];
            store(tail, g);
            std::memcpy(dst, tail, (k - j) * 4);
        }
    }
}

// Overwrites one gradient element (the scattered top-k ids).
inline void store_grad_at(const GradOut &out, int64_t row, int64_t j, float g) {
    if (out.dtype == OPD_BF16) {
        alignas(64) uint16_t h[W];
        store_bf16(h, splat(g));
        static_cast<uint16_t *>(out.data)[row * out.ld + j] = h[0];
    } else {
        static_cast<float *>(out.data)[row * out.ld + j] = g;
    }
}

// g[label - j] += value when the label falls in the W lanes starting at column j.
inline void add_onehot(V &g, int64_t j, int64_t label, float value) {
    if (label >= j && label < j + W) g[label - j] += value;
}

}  // namespace
}  // namespace OPD_ISA_NS
}  // namespace opd
