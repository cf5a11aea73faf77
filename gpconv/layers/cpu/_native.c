/*
 * gpconv._native: the io block's CPU kernels, in float32.
 *
 *   interleave(src, dst, n, c, g)          dst (n, g, c)  <- src (n, c, g)   per token a (c, g) -> (g, c) transpose
 *                                          (grouped=True: dst (g, n, c); n = 1: a plain 2-D transpose)
 *   uninterleave_add(src, dst, n, c, g)    dst (n, c, g) += src (g, n, c)    the backward's scatter, as an add
 *
 *   io_forward(x, w, bias, y, n, in, out, g)  y (n, out) = the whole io block, G1(x) + G2(interleave(x)) + bias
 *   io_small(...)                             the same for a few tokens (decode), optionally with a hybrid
 *                                             block's low-rank term (x A^T) B^T
 *   io_dx(dy, w, dx, n, in, out, g)           dx (n, in) = the block's input gradient, dY W_own +
 *                                             un-interleave(dY W_mixed) (AVX2 code on every x86 CPU with AVX2)
 *   io_dw(x, dy, dw, n, in, out, g)           dW (g, out/g, 2 in/g) = the block's weight gradient (AVX2 code)
 *
 * The first two are the interleave of the kphi-3 block: channel i*g + k of a token is channel k*c + i of its
 * interleaved copy. torch does them as a strided elementwise copy, one scalar load per element at
 * a stride of g floats (about 3x a plain copy for Phi-3's down_proj, docs/speed.md). Here each token
 * is transposed in register tiles (16 x 16 with AVX-512, 8 x 8 with AVX2), which runs near plain-copy
 * speed. Other CPUs get a cache-tiled scalar loop (still a little faster than torch's).
 *
 * Every kernel comes in an AVX-512 and an AVX2 + FMA version, chosen at import from what the CPU
 * has (isa(); no -march flags, so one build runs on any x86-64); io_forward and io_small have no
 * portable version (gpconv/layers.py then takes torch's path).
 *
 * Pointers come from Python as integers (tensor.data_ptr()); the Python side (gpconv/layers.py)
 * checks dtype, contiguity and shapes before calling. The GIL is released while the kernels run,
 * and `threads` > 1 splits the work over that many OpenMP (or, built without OpenMP, p-) threads.
 *
 * io_forward fuses the interleave into a hand-written GEMM: a block of 48 tokens is transposed once
 * into a channel-major scratch tile (xt), after which a group's own channels and its interleaved
 * channels are both just rows of xt (AVX2: the interleaved ones gathered per group into one
 * contiguous run first), and each output tile (AVX-512: 48 tokens x 8 outputs, 24
 * accumulators; AVX2: 16 tokens x 6 outputs, 12) is fed by one pass over the group's 2c inputs.
 * No interleaved copy of x is written to memory and the two halves are one GEMM instead of two
 * (docs/speed.md has the measurements).
 *
 * Optional: setup.py builds it with optional=True, and gpconv falls back to torch's copy when it
 * is missing or GPCONV_NATIVE=0.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if (defined(__x86_64__) || defined(_M_X64)) && defined(__GNUC__)
#define GPCONV_X86 1
#include <immintrin.h>
#endif

typedef struct {
    const float *src;
    float *dst;
    int64_t n0, n1, n, c, g;
    int kind; /* 0 interleave, 1 uninterleave_add, 2 io_forward, 3 io_small, 4 io_dx, 5 io_dw */
    int grouped; /* interleave: write (g, n, c) instead of (n, g, c) */
    const float *w, *bias; /* io_forward only */
    int64_t out;
    int failed;
    const float *lr_b, *lr_u; /* io_small of a hybrid block: y += u B^T, u = x A^T (n, r) computed before the split */
    int64_t r;
    int64_t k0, k1; /* io_forward: this worker's groups (all of them when run_split splits tokens) */
} job_t;

/* Which x86 kernels run: chosen once at import from what the CPU has (__builtin_cpu_supports), no
   -march flags, so one build runs everywhere. Tests step it down with set_isa(). */
enum { ISA_PORTABLE = 0, ISA_AVX2 = 1, ISA_AVX512 = 2 };
static int isa_level = ISA_PORTABLE;

static int cpu_isa(void) {
#ifdef GPCONV_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f")) return ISA_AVX512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return ISA_AVX2;
#endif
    return ISA_PORTABLE;
}

/* ---- portable versions: 16-wide tiles so both the reads and the writes stay in cache lines ---- */

/* dst rows: token t's group k starts at dst + t * ts + k * rs; (n, g, c): ts = g*c, rs = c;
   grouped (g, n, c): ts = c, rs = n*c. */
static void interleave_scalar(const float *src, float *dst, int64_t n0, int64_t n1, int64_t c, int64_t g, int64_t ts,
                              int64_t rs) {
    for (int64_t t = n0; t < n1; t++) {
        const float *s = src + t * c * g; /* (c, g) */
        float *d = dst + t * ts;          /* (g, c), rows rs apart */
        for (int64_t i0 = 0; i0 < c; i0 += 16) {
            int64_t ie = i0 + 16 < c ? i0 + 16 : c;
            for (int64_t k = 0; k < g; k++)
                for (int64_t i = i0; i < ie; i++) d[k * rs + i] = s[i * g + k];
        }
    }
}

static void uninterleave_add_scalar(const float *src, float *dst, int64_t n0, int64_t n1, int64_t n, int64_t c,
                                    int64_t g) {
    for (int64_t t = n0; t < n1; t++) {
        float *d = dst + t * c * g; /* (c, g) */
        for (int64_t k = 0; k < g; k++) {
            const float *s = src + (k * n + t) * c; /* row (k, t) of (g, n, c) */
            for (int64_t i = 0; i < c; i++) d[i * g + k] += s[i];
        }
    }
}

#ifdef GPCONV_X86
/* r[j] holds row j of a 16 x 16 tile; on return r[j] holds column j. */
__attribute__((target("avx512f"))) static inline void transpose16(__m512 r[16]) {
    __m512 t[16];
    for (int j = 0; j < 8; j++) { /* 2 x 2 blocks of floats */
        t[2 * j] = _mm512_unpacklo_ps(r[2 * j], r[2 * j + 1]);
        t[2 * j + 1] = _mm512_unpackhi_ps(r[2 * j], r[2 * j + 1]);
    }
    for (int j = 0; j < 4; j++) { /* 4 x 4 blocks: pairs of floats moved as doubles */
        __m512d a0 = _mm512_castps_pd(t[4 * j]), a1 = _mm512_castps_pd(t[4 * j + 1]);
        __m512d a2 = _mm512_castps_pd(t[4 * j + 2]), a3 = _mm512_castps_pd(t[4 * j + 3]);
        r[4 * j] = _mm512_castpd_ps(_mm512_unpacklo_pd(a0, a2));
        r[4 * j + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a0, a2));
        r[4 * j + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(a1, a3));
        r[4 * j + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(a1, a3));
    }
    for (int j = 0; j < 4; j++) { /* 128-bit lanes, twice */
        t[j] = _mm512_shuffle_f32x4(r[j], r[j + 4], 0x88);
        t[j + 4] = _mm512_shuffle_f32x4(r[j], r[j + 4], 0xdd);
        t[j + 8] = _mm512_shuffle_f32x4(r[j + 8], r[j + 12], 0x88);
        t[j + 12] = _mm512_shuffle_f32x4(r[j + 8], r[j + 12], 0xdd);
    }
    for (int j = 0; j < 8; j++) {
        r[j] = _mm512_shuffle_f32x4(t[j], t[j + 8], 0x88);
        r[j + 8] = _mm512_shuffle_f32x4(t[j], t[j + 8], 0xdd);
    }
}

__attribute__((target("avx512f"))) static void interleave_avx512(const float *src, float *dst, int64_t n0,
                                                                  int64_t n1, int64_t c, int64_t g, int64_t ts,
                                                                  int64_t rs) {
    for (int64_t t = n0; t < n1; t++) {
        const float *s = src + t * c * g; /* (c, g) */
        float *d = dst + t * ts;          /* (g, c), rows rs apart */
        for (int64_t k0 = 0; k0 < g; k0 += 16) {
            int kw = (int)(g - k0 < 16 ? g - k0 : 16); /* columns in this tile: g need not be a multiple of 16 */
            __mmask16 m = (__mmask16)((1u << kw) - 1);
            int64_t i0 = 0;
            for (; i0 + 16 <= c; i0 += 16) {
                __m512 r[16];
                for (int j = 0; j < 16; j++) r[j] = _mm512_maskz_loadu_ps(m, s + (i0 + j) * g + k0);
                transpose16(r); /* r[j]: channel k0 + j of tokens rows i0 .. i0 + 15 */
                for (int j = 0; j < kw; j++) _mm512_storeu_ps(d + (k0 + j) * rs + i0, r[j]);
            }
            for (; i0 < c; i0++) /* c not a multiple of 16: the last rows one by one */
                for (int64_t k = k0; k < k0 + kw; k++) d[k * rs + i0] = s[i0 * g + k];
        }
    }
}

__attribute__((target("avx512f"))) static void uninterleave_add_avx512(const float *src, float *dst, int64_t n0,
                                                                        int64_t n1, int64_t n, int64_t c, int64_t g) {
    for (int64_t t = n0; t < n1; t++) {
        float *d = dst + t * c * g; /* (c, g) */
        for (int64_t k0 = 0; k0 < g; k0 += 16) {
            int kw = (int)(g - k0 < 16 ? g - k0 : 16);
            __mmask16 m = (__mmask16)((1u << kw) - 1);
            int64_t i0 = 0;
            for (; i0 + 16 <= c; i0 += 16) {
                __m512 r[16];
                for (int j = 0; j < 16; j++) /* row j: group k0 + j, token t, channels i0 .. i0 + 15 */
                    r[j] = j < kw ? _mm512_loadu_ps(src + ((k0 + j) * n + t) * c + i0) : _mm512_setzero_ps();
                transpose16(r); /* r[j]: channel i0 + j across groups k0 .. k0 + 15 */
                for (int j = 0; j < 16; j++) {
                    float *p = d + (i0 + j) * g + k0;
                    _mm512_mask_storeu_ps(p, m, _mm512_add_ps(_mm512_maskz_loadu_ps(m, p), r[j]));
                }
            }
            for (; i0 < c; i0++)
                for (int64_t k = k0; k < k0 + kw; k++) d[i0 * g + k] += src[(k * n + t) * c + i0];
        }
    }
}

/* ---- io_forward: the fused block (AVX-512) ------------------------------------------------------- */

#define FWD_OT 8  /* outputs per tile: 8 broadcasts per input channel ...                       */
#define FWD_TV 3  /* ... times 3 vectors of 16 tokens = 24 accumulators, 48 tokens per tile.    */
#define FWD_TB 48 /* tokens per transposed block: xt (in x 48 floats) stays in L2 (1.5 MB at in=8192);
                     96 or 192 measured slower, 48 tokens of 4 or 6 outputs no faster (docs/speed.md) */

__attribute__((target("avx512f"))) static void io_forward_avx512(const float *x, const float *w, const float *bias,
                                                                  float *y, int64_t n0, int64_t n1, int64_t in,
                                                                  int64_t out, int64_t g, int64_t k0, int64_t k1,
                                                                  float *xt, float *wpad) {
    const int64_t c = in / g, oc = out / g, k2 = 2 * c, nt = (oc + FWD_OT - 1) / FWD_OT;
    for (int64_t tb0 = n0; tb0 < n1; tb0 += FWD_TB) {
        const int64_t nb = n1 - tb0 < FWD_TB ? n1 - tb0 : FWD_TB; /* tokens in this block; the rest are zeros */
        /* xt[ch][t] = x[tb0 + t][ch]: (48, in) -> (in, 48) in 16 x 16 register tiles */
        for (int64_t t0 = 0; t0 < FWD_TB; t0 += 16) {
            for (int64_t ch0 = 0; ch0 < in; ch0 += 16) {
                const int chw = (int)(in - ch0 < 16 ? in - ch0 : 16);
                const __mmask16 m = (__mmask16)((1u << chw) - 1);
                __m512 r[16];
                for (int j = 0; j < 16; j++)
                    r[j] = t0 + j < nb ? _mm512_maskz_loadu_ps(m, x + (tb0 + t0 + j) * in + ch0) : _mm512_setzero_ps();
                transpose16(r);
                for (int j = 0; j < chw; j++) _mm512_store_ps(xt + (ch0 + j) * FWD_TB + t0, r[j]);
            }
        }
        for (int64_t k = k0; k < k1; k++) {
            for (int64_t ot = 0; ot < nt; ot++) {
                const int64_t ow = oc - ot * FWD_OT < FWD_OT ? oc - ot * FWD_OT : FWD_OT;
                const float *wt = w + (k * oc + ot * FWD_OT) * k2; /* FWD_OT rows of the (g, oc, 2c) weight */
                if (ow < FWD_OT) { /* last tile of a group whose oc is not a multiple of 8: zero rows */
                    memset(wpad, 0, sizeof(float) * FWD_OT * k2);
                    memcpy(wpad, wt, sizeof(float) * ow * k2);
                    wt = wpad;
                }
                __m512 acc[FWD_OT][FWD_TV];
                for (int o = 0; o < FWD_OT; o++)
                    for (int v = 0; v < FWD_TV; v++) acc[o][v] = _mm512_setzero_ps();
                /* own half: input channel j of group k is channel k*c + j */
                const float *ao = xt + k * c * FWD_TB;
                for (int64_t j = 0; j < c; j++) {
                    __m512 a[FWD_TV];
                    for (int v = 0; v < FWD_TV; v++) a[v] = _mm512_load_ps(ao + j * FWD_TB + 16 * v);
                    for (int o = 0; o < FWD_OT; o++) {
                        const __m512 b = _mm512_set1_ps(wt[o * k2 + j]);
                        for (int v = 0; v < FWD_TV; v++) acc[o][v] = _mm512_fmadd_ps(a[v], b, acc[o][v]);
                    }
                }
                /* interleaved half: its channel j is channel j*g + k of x (the interleave, read in place) */
                const float *am = xt + k * FWD_TB;
                for (int64_t j = 0; j < c; j++) {
                    __m512 a[FWD_TV];
                    for (int v = 0; v < FWD_TV; v++) a[v] = _mm512_load_ps(am + j * g * FWD_TB + 16 * v);
                    for (int v = 0; v < FWD_TV; v++) /* rows g * 192 bytes apart: prefetch 8 ahead */
                        _mm_prefetch((const char *)(am + (j + 8) * g * FWD_TB + 16 * v), _MM_HINT_T0);
                    for (int o = 0; o < FWD_OT; o++) {
                        const __m512 b = _mm512_set1_ps(wt[o * k2 + c + j]);
                        for (int v = 0; v < FWD_TV; v++) acc[o][v] = _mm512_fmadd_ps(a[v], b, acc[o][v]);
                    }
                }
                /* back to token-major: a 16 x 16 transpose of (outputs, 16 tokens), 8 outputs per token row */
                const __mmask16 om = (__mmask16)((1u << ow) - 1);
                const __m512 bv = bias ? _mm512_maskz_loadu_ps(om, bias + k * oc + ot * FWD_OT) : _mm512_setzero_ps();
                float *yb = y + tb0 * out + k * oc + ot * FWD_OT;
                for (int v = 0; v < FWD_TV; v++) {
                    __m512 r[16];
                    for (int o = 0; o < 16; o++) r[o] = o < FWD_OT ? acc[o][v] : _mm512_setzero_ps();
                    transpose16(r); /* r[q]: outputs 0..7 of token 16v + q */
                    for (int q = 0; q < 16 && 16 * v + q < nb; q++)
                        _mm512_mask_storeu_ps(yb + (16 * v + q) * out, om, _mm512_add_ps(r[q], bv));
                }
            }
        }
    }
}

/* ---- io_small: the block for a few tokens (decode), AVX-512 -------------------------------------
 * torch's small-N path is three ops (gather [own | interleaved], a batched GEMM over tiny matrices,
 * a transpose back), each with its fixed cost. Here: per group, gather each token's 2c inputs into
 * z, then every output is a dot product of a contiguous weight row with z, four rows at a time so
 * one pass over a weight row serves all tokens while it is in L1. Split over groups by threads. */
__attribute__((target("avx512f"))) static void io_small_avx512(const float *x, const float *w, const float *bias,
                                                                float *y, int64_t n, int64_t in, int64_t out,
                                                                int64_t g, int64_t k0, int64_t k1, float *z) {
    const int64_t c = in / g, oc = out / g, k2 = 2 * c;
    const int64_t full = k2 / 16 * 16;
    const __mmask16 tail = (__mmask16)((1u << (k2 - full)) - 1);
    for (int64_t k = k0; k < k1; k++) {
        for (int64_t t = 0; t < n; t++) { /* z[t] = [x own | x interleaved] of group k */
            const float *xt = x + t * in;
            memcpy(z + t * k2, xt + k * c, sizeof(float) * c);
            for (int64_t j = 0; j < c; j++) z[t * k2 + c + j] = xt[j * g + k];
        }
        const float *wk = w + k * oc * k2;
        int64_t o = 0;
        for (; o + 4 <= oc; o += 4) {
            const float *w0 = wk + o * k2, *w1 = w0 + k2, *w2 = w1 + k2, *w3 = w2 + k2;
            for (int64_t t = 0; t < n; t++) {
                const float *zt = z + t * k2;
                __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
                int64_t j = 0;
                for (; j < full; j += 16) {
                    const __m512 zv = _mm512_loadu_ps(zt + j);
                    a0 = _mm512_fmadd_ps(_mm512_loadu_ps(w0 + j), zv, a0);
                    a1 = _mm512_fmadd_ps(_mm512_loadu_ps(w1 + j), zv, a1);
                    a2 = _mm512_fmadd_ps(_mm512_loadu_ps(w2 + j), zv, a2);
                    a3 = _mm512_fmadd_ps(_mm512_loadu_ps(w3 + j), zv, a3);
                }
                if (tail) {
                    const __m512 zv = _mm512_maskz_loadu_ps(tail, zt + j);
                    a0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail, w0 + j), zv, a0);
                    a1 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail, w1 + j), zv, a1);
                    a2 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail, w2 + j), zv, a2);
                    a3 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail, w3 + j), zv, a3);
                }
                float *yt = y + t * out + k * oc + o;
                const float *bt = bias ? bias + k * oc + o : NULL;
                yt[0] = _mm512_reduce_add_ps(a0) + (bt ? bt[0] : 0.0f);
                yt[1] = _mm512_reduce_add_ps(a1) + (bt ? bt[1] : 0.0f);
                yt[2] = _mm512_reduce_add_ps(a2) + (bt ? bt[2] : 0.0f);
                yt[3] = _mm512_reduce_add_ps(a3) + (bt ? bt[3] : 0.0f);
            }
        }
        for (; o < oc; o++) { /* oc not a multiple of 4 */
            const float *wr = wk + o * k2;
            for (int64_t t = 0; t < n; t++) {
                const float *zt = z + t * k2;
                __m512 a = _mm512_setzero_ps();
                int64_t j = 0;
                for (; j < full; j += 16) a = _mm512_fmadd_ps(_mm512_loadu_ps(wr + j), _mm512_loadu_ps(zt + j), a);
                if (tail) a = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail, wr + j), _mm512_maskz_loadu_ps(tail, zt + j), a);
                y[t * out + k * oc + o] = _mm512_reduce_add_ps(a) + (bias ? bias[k * oc + o] : 0.0f);
            }
        }
    }
}

/* ---- AVX2 + FMA versions (CPUs without AVX-512: AMD Zen 1-3, most desktop Intel) -------------
 * The same algorithms in 8-wide registers: 8 x 8 transposes for the copies; the fused forward's
 * output tile is 16 tokens x 6 outputs = 12 accumulators, which with 2 token vectors and one
 * broadcast fills 15 of the 16 ymm registers. */

/* r[j] holds row j of an 8 x 8 tile; on return r[j] holds column j. */
__attribute__((target("avx2,fma"))) static inline void transpose8(__m256 r[8]) {
    __m256 t[8], u[8];
    for (int j = 0; j < 4; j++) { /* 2 x 2 blocks */
        t[2 * j] = _mm256_unpacklo_ps(r[2 * j], r[2 * j + 1]);
        t[2 * j + 1] = _mm256_unpackhi_ps(r[2 * j], r[2 * j + 1]);
    }
    for (int j = 0; j < 2; j++) { /* 4 x 4 blocks within each 128-bit lane */
        u[4 * j] = _mm256_shuffle_ps(t[4 * j], t[4 * j + 2], 0x44);
        u[4 * j + 1] = _mm256_shuffle_ps(t[4 * j], t[4 * j + 2], 0xee);
        u[4 * j + 2] = _mm256_shuffle_ps(t[4 * j + 1], t[4 * j + 3], 0x44);
        u[4 * j + 3] = _mm256_shuffle_ps(t[4 * j + 1], t[4 * j + 3], 0xee);
    }
    for (int j = 0; j < 4; j++) { /* the two 128-bit lanes */
        r[j] = _mm256_permute2f128_ps(u[j], u[j + 4], 0x20);
        r[j + 4] = _mm256_permute2f128_ps(u[j], u[j + 4], 0x31);
    }
}

/* lanes 0 .. w-1 set (w in 0..8), for maskload / maskstore */
__attribute__((target("avx2,fma"))) static inline __m256i lanes8(int w) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(w), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

__attribute__((target("avx2,fma"))) static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

__attribute__((target("avx2,fma"))) static void interleave_avx2(const float *src, float *dst, int64_t n0, int64_t n1,
                                                                int64_t c, int64_t g, int64_t ts, int64_t rs) {
    for (int64_t t = n0; t < n1; t++) {
        const float *s = src + t * c * g; /* (c, g) */
        float *d = dst + t * ts;          /* (g, c), rows rs apart */
        for (int64_t k0 = 0; k0 < g; k0 += 8) {
            const int kw = (int)(g - k0 < 8 ? g - k0 : 8);
            const __m256i m = lanes8(kw);
            int64_t i0 = 0;
            for (; i0 + 8 <= c; i0 += 8) {
                __m256 r[8];
                for (int j = 0; j < 8; j++) /* a masked load only where the tile sticks out of the row */
                    r[j] = kw == 8 ? _mm256_loadu_ps(s + (i0 + j) * g + k0) : _mm256_maskload_ps(s + (i0 + j) * g + k0, m);
                transpose8(r); /* r[j]: channel k0 + j of rows i0 .. i0 + 7 */
                for (int j = 0; j < kw; j++) _mm256_storeu_ps(d + (k0 + j) * rs + i0, r[j]);
            }
            for (; i0 < c; i0++)
                for (int64_t k = k0; k < k0 + kw; k++) d[k * rs + i0] = s[i0 * g + k];
        }
    }
}

__attribute__((target("avx2,fma"))) static void uninterleave_add_avx2(const float *src, float *dst, int64_t n0,
                                                                      int64_t n1, int64_t n, int64_t c, int64_t g) {
    for (int64_t t = n0; t < n1; t++) {
        float *d = dst + t * c * g; /* (c, g) */
        for (int64_t k0 = 0; k0 < g; k0 += 8) {
            const int kw = (int)(g - k0 < 8 ? g - k0 : 8);
            int64_t i0 = 0;
            for (; i0 + 8 <= c; i0 += 8) {
                __m256 r[8];
                for (int j = 0; j < 8; j++) /* row j: group k0 + j, token t, channels i0 .. i0 + 7 */
                    r[j] = j < kw ? _mm256_loadu_ps(src + ((k0 + j) * n + t) * c + i0) : _mm256_setzero_ps();
                transpose8(r); /* r[j]: channel i0 + j across groups k0 .. k0 + 7 */
                for (int j = 0; j < 8; j++) {
                    float *p = d + (i0 + j) * g + k0;
                    if (kw == 8) {
                        _mm256_storeu_ps(p, _mm256_add_ps(_mm256_loadu_ps(p), r[j]));
                    } else { /* a partial tile (g = 12: every other one): no vmaskmovps store, slow on AMD
                                (uninterleave_add at g = 12 4.03 -> 3.57 ms for 1024 tokens x 3072 on Zen 3) */
                        int q = 0;
                        if (kw >= 4) {
                            _mm_storeu_ps(p, _mm_add_ps(_mm_loadu_ps(p), _mm256_castps256_ps128(r[j])));
                            q = 4;
                        }
                        float rest[8];
                        _mm256_storeu_ps(rest, r[j]);
                        for (; q < kw; q++) p[q] += rest[q];
                    }
                }
            }
            for (; i0 < c; i0++)
                for (int64_t k = k0; k < k0 + kw; k++) d[i0 * g + k] += src[(k * n + t) * c + i0];
        }
    }
}

#define F2_OT 6  /* outputs per tile: 6 broadcasts per input channel ...                            */
#define F2_TV 2  /* ... times 2 vectors of 8 tokens = 12 accumulators, 16 tokens per tile.          */
#define F2_TB 48 /* tokens per transposed block, worked as 3 tiles of 16 while a weight tile (6 rows
                    of 2c) stays in L1; 32, 64 or 96 measured no faster on a Zen 3 EPYC */
_Static_assert(FWD_TB == 48 && F2_TB == 48, "run_split counts io_forward's tokens in blocks of 48");

/* dst[ch][t] = rows[t][ch] for t < ntp (a multiple of 8; rows past nb read as zeros): a block of
   token rows of `width` floats into channel-major rows of F2_TB floats, in 8 x 8 register tiles.
   io_forward and io_dw transpose x this way, io_dx transposes dY. */
__attribute__((target("avx2,fma"))) static void block_to_channel_major(const float *rows, float *dst, int64_t nb,
                                                                       int64_t ntp, int64_t width) {
    for (int64_t t0 = 0; t0 < ntp; t0 += 8) {
        for (int64_t ch0 = 0; ch0 < width; ch0 += 8) {
            const int chw = (int)(width - ch0 < 8 ? width - ch0 : 8);
            const __m256i m = lanes8(chw);
            __m256 r[8];
            for (int j = 0; j < 8; j++) {
                const float *p = rows + (t0 + j) * width + ch0;
                r[j] = t0 + j >= nb ? _mm256_setzero_ps() : chw == 8 ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, m);
            }
            transpose8(r);
            for (int j = 0; j < chw; j++) _mm256_store_ps(dst + (ch0 + j) * F2_TB + t0, r[j]);
        }
    }
}

/* xg: group k's interleaved rows of xt (row j*g + k for j < c) gathered into one contiguous run
   (c x 192 bytes, L2-sized). Read in place they sit g * 192 bytes apart (6 KiB for down_proj): few
   cache sets hold them, and every output tile re-read them from L3. ntp tokens per row. */
__attribute__((target("avx2,fma"))) static void gather_interleaved_rows(const float *xt, float *xg, int64_t c,
                                                                        int64_t g, int64_t k, int64_t ntp) {
    for (int64_t j = 0; j < c; j++) {
        const float *s = xt + (j * g + k) * F2_TB;
        float *d = xg + j * F2_TB;
        for (int64_t t = 0; t < ntp; t += 8) _mm256_store_ps(d + t, _mm256_load_ps(s + t));
    }
}

__attribute__((target("avx2,fma"))) static void io_forward_avx2(const float *x, const float *w, const float *bias,
                                                                float *y, int64_t n0, int64_t n1, int64_t in,
                                                                int64_t out, int64_t g, int64_t k0, int64_t k1,
                                                                float *xt, float *xg, float *wpad) {
    const int64_t c = in / g, oc = out / g, k2 = 2 * c, nt = (oc + F2_OT - 1) / F2_OT;
    for (int64_t tb0 = n0; tb0 < n1; tb0 += F2_TB) {
        const int64_t nb = n1 - tb0 < F2_TB ? n1 - tb0 : F2_TB; /* tokens in this block */
        const int64_t ns = (nb + 15) / 16;                       /* 16-token tiles with real tokens */
        block_to_channel_major(x + tb0 * in, xt, nb, 16 * ns, in); /* xt (in, 48); tokens past nb zeros */
        for (int64_t k = k0; k < k1; k++) {
            gather_interleaved_rows(xt, xg, c, g, k, 16 * ns);
            for (int64_t ot = 0; ot < nt; ot++) {
                const int64_t ow = oc - ot * F2_OT < F2_OT ? oc - ot * F2_OT : F2_OT;
                const float *wt = w + (k * oc + ot * F2_OT) * k2; /* F2_OT rows of the (g, oc, 2c) weight */
                if (ow < F2_OT) { /* last tile of a group whose oc is not a multiple of 6: zero rows */
                    memset(wpad, 0, sizeof(float) * F2_OT * k2);
                    memcpy(wpad, wt, sizeof(float) * ow * k2);
                    wt = wpad;
                }
                const __m256i om = lanes8((int)ow);
                const __m256 bv = bias ? _mm256_maskload_ps(bias + k * oc + ot * F2_OT, om) : _mm256_setzero_ps();
                for (int64_t s = 0; s < ns; s++) {
                    /* 12 named accumulators: with an array, gcc spilled them to the stack in the second loop */
                    __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00;
                    __m256 c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
#define F2_STEP(A, J)                                                                                              \
    do {                                                                                                           \
        const __m256 a0 = _mm256_load_ps(A), a1 = _mm256_load_ps((A) + 8);                                         \
        __m256 b = _mm256_broadcast_ss(wt + (J));                                                                  \
        c00 = _mm256_fmadd_ps(a0, b, c00), c01 = _mm256_fmadd_ps(a1, b, c01);                                      \
        b = _mm256_broadcast_ss(wt + k2 + (J));                                                                    \
        c10 = _mm256_fmadd_ps(a0, b, c10), c11 = _mm256_fmadd_ps(a1, b, c11);                                      \
        b = _mm256_broadcast_ss(wt + 2 * k2 + (J));                                                                \
        c20 = _mm256_fmadd_ps(a0, b, c20), c21 = _mm256_fmadd_ps(a1, b, c21);                                      \
        b = _mm256_broadcast_ss(wt + 3 * k2 + (J));                                                                \
        c30 = _mm256_fmadd_ps(a0, b, c30), c31 = _mm256_fmadd_ps(a1, b, c31);                                      \
        b = _mm256_broadcast_ss(wt + 4 * k2 + (J));                                                                \
        c40 = _mm256_fmadd_ps(a0, b, c40), c41 = _mm256_fmadd_ps(a1, b, c41);                                      \
        b = _mm256_broadcast_ss(wt + 5 * k2 + (J));                                                                \
        c50 = _mm256_fmadd_ps(a0, b, c50), c51 = _mm256_fmadd_ps(a1, b, c51);                                      \
    } while (0)
                    /* own half: input channel j of group k is channel k*c + j of x */
                    const float *ao = xt + k * c * F2_TB + 16 * s;
                    for (int64_t j = 0; j < c; j++) F2_STEP(ao + j * F2_TB, j);
                    /* interleaved half: its channel j is channel j*g + k of x (the interleave, read in place) */
                    const float *am = xg + 16 * s;
                    for (int64_t j = 0; j < c; j++) F2_STEP(am + j * F2_TB, c + j);
#undef F2_STEP
                    const __m256 acc[F2_OT][F2_TV] = {{c00, c01}, {c10, c11}, {c20, c21}, {c30, c31}, {c40, c41}, {c50, c51}};
                    /* back to token-major: an 8 x 8 transpose of (outputs, 8 tokens), 6 outputs per token row */
                    float *yb = y + (tb0 + 16 * s) * out + k * oc + ot * F2_OT;
                    for (int v = 0; v < F2_TV; v++) {
                        __m256 r[8];
                        for (int o = 0; o < 8; o++) r[o] = o < F2_OT ? acc[o][v] : _mm256_setzero_ps();
                        transpose8(r); /* r[q]: outputs 0..7 of token 16 s + 8 v + q */
                        for (int q = 0; q < 8 && 16 * s + 8 * v + q < nb; q++) {
                            const __m256 o8 = _mm256_add_ps(r[q], bv);
                            float *p = yb + (8 * v + q) * out;
                            if (ow == F2_OT) { /* 6 floats as 4 + 2 plain stores: vmaskmovps stores are slow on
                                                  AMD (this kernel 0.81-0.96x the time with plain ones, Zen 3) */
                                _mm_storeu_ps(p, _mm256_castps256_ps128(o8));
                                _mm_storel_pi((__m64 *)(p + 4), _mm256_extractf128_ps(o8, 1));
                            } else {
                                _mm256_maskstore_ps(p, om, o8);
                            }
                        }
                    }
                }
            }
        }
    }
}

/* io_dx: the input gradient of the io block, dx (n, in) = dY W_own + un-interleave(dY W_mixed), by
   the forward's plan run backwards. Per block of F2_TB tokens dY is transposed once into dyt
   (out, TB); each (6 channels x 16 tokens) tile of the channel-major dxt (in, TB) is then one pass
   over the group's oc outputs. The interleaved half's channel j of group k is row j*g + k of dxt,
   so the un-interleave is only a row address, as the interleave is in io_forward: no (g, N, c)
   intermediate and no un-interleaving add over memory. Own halves are stored, interleaved halves
   added (each weight element is still read once per block); dxt goes back to token-major at the
   end. */
__attribute__((target("avx2,fma"))) static void io_dx_avx2(const float *dy, const float *w, float *dx, int64_t n0,
                                                           int64_t n1, int64_t in, int64_t out, int64_t g,
                                                           float *dyt, float *dxt) {
    const int64_t c = in / g, oc = out / g, ntile = (c + F2_OT - 1) / F2_OT;
    for (int64_t tb0 = n0; tb0 < n1; tb0 += F2_TB) {
        const int64_t nb = n1 - tb0 < F2_TB ? n1 - tb0 : F2_TB;
        const int64_t ns = (nb + 15) / 16;
        block_to_channel_major(dy + tb0 * out, dyt, nb, 16 * ns, out); /* dyt (out, TB); tokens past nb zeros */
        for (int half = 0; half < 2; half++) { /* 0: own channels (stored), 1: interleaved ones (added) */
            for (int64_t k = 0; k < g; k++) {
                const float *dk = dyt + k * oc * F2_TB; /* group k's oc rows of dyt */
                for (int64_t jt = 0; jt < ntile; jt++) {
                    const int64_t j0 = jt * F2_OT;
                    const int cw = (int)(c - j0 < F2_OT ? c - j0 : F2_OT);
                    const float *wt = w + ((half * g + k) * ntile + jt) * oc * F2_OT; /* packed (oc, 6) */
                    float *rows[F2_OT]; /* dxt rows of the tile's channels (past cw: never stored) */
                    for (int i = 0; i < F2_OT; i++) {
                        const int64_t jj = j0 + (i < cw ? i : 0);
                        rows[i] = dxt + (half ? jj * g + k : k * c + jj) * F2_TB;
                    }
                    for (int64_t s = 0; s < ns; s++) {
                        __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00;
                        __m256 c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
                        const float *a = dk + 16 * s;
                        const float *wo = wt;
                        for (int64_t o = 0; o < oc; o++, a += F2_TB, wo += F2_OT) {
                            const __m256 a0 = _mm256_load_ps(a), a1 = _mm256_load_ps(a + 8);
                            __m256 b = _mm256_broadcast_ss(wo);
                            c00 = _mm256_fmadd_ps(a0, b, c00), c01 = _mm256_fmadd_ps(a1, b, c01);
                            b = _mm256_broadcast_ss(wo + 1);
                            c10 = _mm256_fmadd_ps(a0, b, c10), c11 = _mm256_fmadd_ps(a1, b, c11);
                            b = _mm256_broadcast_ss(wo + 2);
                            c20 = _mm256_fmadd_ps(a0, b, c20), c21 = _mm256_fmadd_ps(a1, b, c21);
                            b = _mm256_broadcast_ss(wo + 3);
                            c30 = _mm256_fmadd_ps(a0, b, c30), c31 = _mm256_fmadd_ps(a1, b, c31);
                            b = _mm256_broadcast_ss(wo + 4);
                            c40 = _mm256_fmadd_ps(a0, b, c40), c41 = _mm256_fmadd_ps(a1, b, c41);
                            b = _mm256_broadcast_ss(wo + 5);
                            c50 = _mm256_fmadd_ps(a0, b, c50), c51 = _mm256_fmadd_ps(a1, b, c51);
                        }
                        const __m256 acc[F2_OT][F2_TV] = {{c00, c01}, {c10, c11}, {c20, c21},
                                                          {c30, c31}, {c40, c41}, {c50, c51}};
                        for (int i = 0; i < cw; i++) {
                            float *p = rows[i] + 16 * s;
                            if (half) {
                                _mm256_store_ps(p, _mm256_add_ps(_mm256_load_ps(p), acc[i][0]));
                                _mm256_store_ps(p + 8, _mm256_add_ps(_mm256_load_ps(p + 8), acc[i][1]));
                            } else {
                                _mm256_store_ps(p, acc[i][0]);
                                _mm256_store_ps(p + 8, acc[i][1]);
                            }
                        }
                    }
                }
            }
        }
        /* dx[tb0 + t][ch] = dxt[ch][t]: (in, TB) -> (nb, in) */
        for (int64_t t0 = 0; t0 < nb; t0 += 8) {
            const int tw = (int)(nb - t0 < 8 ? nb - t0 : 8);
            int64_t ch0 = 0;
            for (; ch0 + 8 <= in; ch0 += 8) {
                __m256 r[8];
                for (int j = 0; j < 8; j++) r[j] = _mm256_load_ps(dxt + (ch0 + j) * F2_TB + t0);
                transpose8(r); /* r[q]: channels ch0 .. ch0 + 7 of token t0 + q */
                for (int q = 0; q < tw; q++) _mm256_storeu_ps(dx + (tb0 + t0 + q) * in + ch0, r[q]);
            }
            for (; ch0 < in; ch0++)
                for (int q = 0; q < tw; q++) dx[(tb0 + t0 + q) * in + ch0] = dxt[ch0 * F2_TB + t0 + q];
        }
    }
}

/* io_dw: the weight gradient of the io block, dW[k] (oc, 2c) = dY_k^T [x own_k | x interleaved_k],
   for groups k0..k1 (threads split the groups, so no two write the same rows). Per block of F2_TB
   tokens x is transposed into the channel-major xt as in io_forward (the group's interleaved rows
   gathered into xg), and the group's slice of dY copied into dyg (F2_TB, ocp), rows padded with
   zeros to a multiple of 16 outputs. Each tile is 6 input channels x 16 outputs: per token, 2
   vectors of dyg (outputs) against 6 broadcasts from the 6 channel rows, 12 accumulators that
   live in acc (vector-tile layout) between token blocks and go back to dW's (oc, 2c) rows once,
   through 8 x 8 transposes, at the end. */
__attribute__((target("avx2,fma"))) static void io_dw_avx2(const float *x, const float *dy, float *dw, int64_t n,
                                                           int64_t in, int64_t out, int64_t g, int64_t k0, int64_t k1,
                                                           float *xt, float *xg, float *dyg, float *acc) {
    const int64_t c = in / g, oc = out / g, k2 = 2 * c;
    const int64_t ntj = (k2 + F2_OT - 1) / F2_OT, nto = (oc + 15) / 16, ocp = 16 * nto;
    const int64_t per_group = ntj * nto * 96; /* floats of acc per group: 12 vectors per tile */
    if (n == 0) memset(acc, 0, sizeof(float) * (size_t)((k1 - k0) * per_group)); /* no tokens: dW = 0 */
    for (int64_t tb0 = 0; tb0 < n; tb0 += F2_TB) {
        const int64_t nb = n - tb0 < F2_TB ? n - tb0 : F2_TB;
        const int64_t nbp = (nb + 7) / 8 * 8; /* tokens as the transposes write them (the rest zeros) */
        block_to_channel_major(x + tb0 * in, xt, nb, nbp, in); /* xt (in, TB) */
        for (int64_t k = k0; k < k1; k++) {
            gather_interleaved_rows(xt, xg, c, g, k, nbp); /* the interleaved rows of group k, contiguous */
            for (int64_t t = 0; t < nb; t++) { /* dyg[t] = dy[tb0 + t][k*oc : k*oc + oc], zero-padded */
                memcpy(dyg + t * ocp, dy + (tb0 + t) * out + k * oc, sizeof(float) * oc);
                memset(dyg + t * ocp + oc, 0, sizeof(float) * (ocp - oc));
            }
            float *ak = acc + (k - k0) * per_group;
            for (int64_t jt = 0; jt < ntj; jt++) {
                const float *rows[F2_OT]; /* the tile's 6 input channels: own rows of xt, then xg */
                for (int i = 0; i < F2_OT; i++) {
                    int64_t jj = jt * F2_OT + i;
                    if (jj >= k2) jj = k2 - 1; /* past the last channel: any valid row, never stored */
                    rows[i] = jj < c ? xt + (k * c + jj) * F2_TB : xg + (jj - c) * F2_TB;
                }
                const float *r0 = rows[0], *r1 = rows[1], *r2 = rows[2], *r3 = rows[3], *r4 = rows[4], *r5 = rows[5];
                for (int64_t ot = 0; ot < nto; ot++) {
                    float *at = ak + (jt * nto + ot) * 96;
                    __m256 c00, c01, c10, c11, c20, c21, c30, c31, c40, c41, c50, c51;
                    if (tb0 == 0) {
                        c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00;
                        c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
                    } else {
                        c00 = _mm256_load_ps(at), c01 = _mm256_load_ps(at + 8), c10 = _mm256_load_ps(at + 16);
                        c11 = _mm256_load_ps(at + 24), c20 = _mm256_load_ps(at + 32), c21 = _mm256_load_ps(at + 40);
                        c30 = _mm256_load_ps(at + 48), c31 = _mm256_load_ps(at + 56), c40 = _mm256_load_ps(at + 64);
                        c41 = _mm256_load_ps(at + 72), c50 = _mm256_load_ps(at + 80), c51 = _mm256_load_ps(at + 88);
                    }
                    const float *a = dyg + ot * 16;
                    for (int64_t t = 0; t < nb; t++, a += ocp) {
                        const __m256 a0 = _mm256_load_ps(a), a1 = _mm256_load_ps(a + 8);
                        __m256 b = _mm256_broadcast_ss(r0 + t);
                        c00 = _mm256_fmadd_ps(a0, b, c00), c01 = _mm256_fmadd_ps(a1, b, c01);
                        b = _mm256_broadcast_ss(r1 + t);
                        c10 = _mm256_fmadd_ps(a0, b, c10), c11 = _mm256_fmadd_ps(a1, b, c11);
                        b = _mm256_broadcast_ss(r2 + t);
                        c20 = _mm256_fmadd_ps(a0, b, c20), c21 = _mm256_fmadd_ps(a1, b, c21);
                        b = _mm256_broadcast_ss(r3 + t);
                        c30 = _mm256_fmadd_ps(a0, b, c30), c31 = _mm256_fmadd_ps(a1, b, c31);
                        b = _mm256_broadcast_ss(r4 + t);
                        c40 = _mm256_fmadd_ps(a0, b, c40), c41 = _mm256_fmadd_ps(a1, b, c41);
                        b = _mm256_broadcast_ss(r5 + t);
                        c50 = _mm256_fmadd_ps(a0, b, c50), c51 = _mm256_fmadd_ps(a1, b, c51);
                    }
                    _mm256_store_ps(at, c00), _mm256_store_ps(at + 8, c01), _mm256_store_ps(at + 16, c10);
                    _mm256_store_ps(at + 24, c11), _mm256_store_ps(at + 32, c20), _mm256_store_ps(at + 40, c21);
                    _mm256_store_ps(at + 48, c30), _mm256_store_ps(at + 56, c31), _mm256_store_ps(at + 64, c40);
                    _mm256_store_ps(at + 72, c41), _mm256_store_ps(at + 80, c50), _mm256_store_ps(at + 88, c51);
                }
            }
        }
    }
    /* acc -> dW: tile (jt, ot) holds, for channel i of the tile, outputs ot*16 .. +16 as 2 vectors */
    for (int64_t k = k0; k < k1; k++) {
        const float *ak = acc + (k - k0) * per_group;
        float *wk = dw + k * oc * k2;
        for (int64_t jt = 0; jt < ntj; jt++) {
            const int64_t j0 = jt * F2_OT, cw = k2 - j0 < F2_OT ? k2 - j0 : F2_OT;
            for (int64_t ot = 0; ot < nto; ot++) {
                const float *at = ak + (jt * nto + ot) * 96;
                for (int v = 0; v < 2; v++) {
                    __m256 r[8];
                    for (int i = 0; i < 8; i++) r[i] = i < F2_OT ? _mm256_load_ps(at + (2 * i + v) * 8) : _mm256_setzero_ps();
                    transpose8(r); /* r[q]: channels j0 .. j0 + 5 of output ot*16 + 8v + q */
                    for (int q = 0; q < 8; q++) {
                        const int64_t o = ot * 16 + 8 * v + q;
                        if (o >= oc) break;
                        float *p = wk + o * k2 + j0;
                        if (cw == F2_OT) {
                            _mm_storeu_ps(p, _mm256_castps256_ps128(r[q]));
                            _mm_storel_pi((__m64 *)(p + 4), _mm256_extractf128_ps(r[q], 1));
                        } else {
                            float tmp[8];
                            _mm256_storeu_ps(tmp, r[q]);
                            for (int i = 0; i < cw; i++) p[i] = tmp[i];
                        }
                    }
                }
            }
        }
    }
}

/* The low-rank term of a hybrid block at decode, y += (x A^T) B^T with A (r, in), B (out, r): two
   thin GEMVs that torch runs as two calls of ~10 us each around ~2 us of arithmetic (SmolLM2 at
   -m 64, rank 28). AVX2 code, used on AVX-512 CPUs too (they all have AVX2 + FMA). */
__attribute__((target("avx2,fma"))) static float dot_avx2(const float *a, const float *b, int64_t len) {
    __m256 s0 = _mm256_setzero_ps(), s1 = s0;
    int64_t j = 0;
    for (; j + 16 <= len; j += 16) {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + j), _mm256_loadu_ps(b + j), s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + j + 8), _mm256_loadu_ps(b + j + 8), s1);
    }
    if (j + 8 <= len) {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + j), _mm256_loadu_ps(b + j), s0);
        j += 8;
    }
    float s = hsum8(_mm256_add_ps(s0, s1));
    for (; j < len; j++) s += a[j] * b[j];
    return s;
}

/* The eight dot products rows[q * stride : + len] . v (q = 0..7) as one vector: eight independent
   FMA chains keep both of an AVX2 core's FMA units busy, and their horizontal sums are gathered by
   three rounds of hadds instead of eight separate reductions. */
__attribute__((target("avx2,fma"))) static inline __m256 dot8_avx2(const float *rows, int64_t stride, const float *v,
                                                                   int64_t len) {
    const int64_t full = len / 8 * 8;
    __m256 a[8];
    for (int q = 0; q < 8; q++) a[q] = _mm256_setzero_ps();
    for (int64_t j = 0; j < full; j += 8) {
        const __m256 vv = _mm256_loadu_ps(v + j);
        for (int q = 0; q < 8; q++) a[q] = _mm256_fmadd_ps(_mm256_loadu_ps(rows + q * stride + j), vv, a[q]);
    }
    if (len > full) {
        const __m256i tail = lanes8((int)(len - full));
        const __m256 vv = _mm256_maskload_ps(v + full, tail);
        for (int q = 0; q < 8; q++)
            a[q] = _mm256_fmadd_ps(_mm256_maskload_ps(rows + q * stride + full, tail), vv, a[q]);
    }
    const __m256 s01 = _mm256_hadd_ps(a[0], a[1]), s23 = _mm256_hadd_ps(a[2], a[3]);
    const __m256 s45 = _mm256_hadd_ps(a[4], a[5]), s67 = _mm256_hadd_ps(a[6], a[7]);
    const __m256 q0 = _mm256_hadd_ps(s01, s23), q1 = _mm256_hadd_ps(s45, s67);
    /* q0 lanes: (0 1 2 3 | 0 1 2 3) halves of rows 0-3; q1 the same for rows 4-7 */
    return _mm256_add_ps(_mm256_permute2f128_ps(q0, q1, 0x20), _mm256_permute2f128_ps(q0, q1, 0x31));
}

/* u (n, r) = x (n, in) A^T */
__attribute__((target("avx2,fma"))) static void lowrank_u_avx2(const float *x, const float *a, float *u, int64_t n,
                                                               int64_t in, int64_t r) {
    for (int64_t t = 0; t < n; t++)
        for (int64_t q = 0; q < r; q++) u[t * r + q] = dot_avx2(x + t * in, a + q * in, in);
}

/* y[t, o0:o1] += B[o0:o1] u[t], eight rows of B at a time (one dot product and horizontal sum per
   output took 6 us of a 13.6 us SmolLM2 q_proj call) */
__attribute__((target("avx2,fma"))) static void lowrank_add_avx2(float *y, const float *b, const float *u, int64_t n,
                                                                 int64_t out, int64_t o0, int64_t o1, int64_t r) {
    for (int64_t t = 0; t < n; t++) {
        const float *ut = u + t * r;
        int64_t o = o0;
        for (; o + 8 <= o1; o += 8) {
            float *yt = y + t * out + o;
            _mm256_storeu_ps(yt, _mm256_add_ps(_mm256_loadu_ps(yt), dot8_avx2(b + o * r, r, ut, r)));
        }
        for (; o < o1; o++) y[t * out + o] += dot_avx2(b + o * r, ut, r); /* the rows past a multiple of 8 */
    }
}

/* io_small in 8-wide registers: see io_small_avx512. Eight weight rows at a time (dot8_avx2; four,
   as in the AVX-512 version, measured slower than gather + bmm on wide groups). */
__attribute__((target("avx2,fma"))) static void io_small_avx2(const float *x, const float *w, const float *bias,
                                                              float *y, int64_t n, int64_t in, int64_t out, int64_t g,
                                                              int64_t k0, int64_t k1, float *z) {
    const int64_t c = in / g, oc = out / g, k2 = 2 * c;
    for (int64_t k = k0; k < k1; k++) {
        for (int64_t t = 0; t < n; t++) { /* z[t] = [x own | x interleaved] of group k */
            const float *xr = x + t * in;
            float *zt = z + t * k2;
            memcpy(zt, xr + k * c, sizeof(float) * c);
            for (int64_t j = 0; j < c; j++) zt[c + j] = xr[j * g + k];
        }
        const float *wk = w + k * oc * k2;
        int64_t o = 0;
        for (; o + 8 <= oc; o += 8) {
            for (int64_t t = 0; t < n; t++) {
                __m256 sum = dot8_avx2(wk + o * k2, k2, z + t * k2, k2);
                if (bias) sum = _mm256_add_ps(sum, _mm256_loadu_ps(bias + k * oc + o));
                _mm256_storeu_ps(y + t * out + k * oc + o, sum);
            }
        }
        for (; o < oc; o++) /* oc not a multiple of 8 */
            for (int64_t t = 0; t < n; t++)
                y[t * out + k * oc + o] = dot_avx2(wk + o * k2, z + t * k2, k2) + (bias ? bias[k * oc + o] : 0.0f);
    }
}
#endif

static void io_small_job(job_t *j) {
#ifdef GPCONV_X86
    /* here n0..n1 range over groups; j->n is the token count */
    float *z = malloc(sizeof(float) * (size_t)(j->n * (2 * j->c + 16)));
    if (z == NULL) {
        j->failed = 1;
        return;
    }
    if (isa_level == ISA_AVX512)
        io_small_avx512(j->src, j->w, j->bias, j->dst, j->n, j->c * j->g, j->out, j->g, j->n0, j->n1, z);
    else
        io_small_avx2(j->src, j->w, j->bias, j->dst, j->n, j->c * j->g, j->out, j->g, j->n0, j->n1, z);
    if (j->r > 0) { /* this worker's groups' outputs get the low-rank term too */
        const int64_t oc = j->out / j->g;
        lowrank_add_avx2(j->dst, j->lr_b, j->lr_u, j->n, j->out, j->n0 * oc, j->n1 * oc, j->r);
    }
    free(z);
#else
    j->failed = 1;
#endif
}

static void io_forward_job(job_t *j) {
#ifdef GPCONV_X86
    const int64_t in = j->c * j->g;
    const int wide = isa_level == ISA_AVX512;
    const int64_t tb = wide ? FWD_TB : F2_TB, ot = wide ? FWD_OT : F2_OT;
    float *xt = aligned_alloc(64, sizeof(float) * (size_t)(in * tb)); /* in * tb * 4 is a multiple of 64 */
    float *wpad = malloc(sizeof(float) * (size_t)(ot * 2 * j->c));
    float *xg = wide ? NULL : aligned_alloc(64, sizeof(float) * (size_t)(j->c * tb)); /* c * 48 * 4: a multiple of 64 */
    if (xt == NULL || wpad == NULL || (!wide && xg == NULL)) {
        j->failed = 1;
    } else if (wide) {
        io_forward_avx512(j->src, j->w, j->bias, j->dst, j->n0, j->n1, in, j->out, j->g, j->k0, j->k1, xt, wpad);
    } else {
        io_forward_avx2(j->src, j->w, j->bias, j->dst, j->n0, j->n1, in, j->out, j->g, j->k0, j->k1, xt, xg, wpad);
    }
    free(xt);
    free(xg);
    free(wpad);
#else
    j->failed = 1;
#endif
}

static void io_dx_job(job_t *j) {
#ifdef GPCONV_X86
    const int64_t in = j->c * j->g;
    /* sizes are multiples of 16 floats (F2_TB = 48), so aligned_alloc's size rule holds */
    float *dyt = aligned_alloc(64, sizeof(float) * (size_t)(j->out * F2_TB));
    float *dxt = aligned_alloc(64, sizeof(float) * (size_t)(in * F2_TB));
    if (dyt == NULL || dxt == NULL)
        j->failed = 1;
    else
        io_dx_avx2(j->src, j->w, j->dst, j->n0, j->n1, in, j->out, j->g, dyt, dxt);
    free(dyt);
    free(dxt);
#else
    j->failed = 1;
#endif
}

static void io_dw_job(job_t *j) {
#ifdef GPCONV_X86
    /* here n0..n1 range over groups; src = x, lr_u = dY (see py_io_dw) */
    const int64_t in = j->c * j->g, oc = j->out / j->g, k2 = 2 * j->c;
    const int64_t ntj = (k2 + F2_OT - 1) / F2_OT, nto = (oc + 15) / 16;
    float *xt = aligned_alloc(64, sizeof(float) * (size_t)(in * F2_TB));
    float *xg = aligned_alloc(64, sizeof(float) * (size_t)(j->c * F2_TB));
    float *dyg = aligned_alloc(64, sizeof(float) * (size_t)(F2_TB * 16 * nto));
    float *acc = aligned_alloc(64, sizeof(float) * (size_t)((j->n1 - j->n0) * ntj * nto * 96 + 16));
    if (xt == NULL || xg == NULL || dyg == NULL || acc == NULL)
        j->failed = 1;
    else if (j->n1 > j->n0)
        io_dw_avx2(j->src, j->lr_u, j->dst, j->n, in, j->out, j->g, j->n0, j->n1, xt, xg, dyg, acc);
    free(xt);
    free(xg);
    free(dyg);
    free(acc);
#else
    j->failed = 1;
#endif
}

static void run_job(job_t *j) {
    if (j->kind == 5) {
        io_dw_job(j);
        return;
    }
    if (j->kind == 4) {
        io_dx_job(j);
        return;
    }
    if (j->kind == 2) {
        io_forward_job(j);
        return;
    }
    if (j->kind == 3) {
        io_small_job(j);
        return;
    }
#ifdef GPCONV_X86
    const int64_t ts = j->grouped ? j->c : j->c * j->g, rs = j->grouped ? j->n * j->c : j->c;
    if (isa_level == ISA_AVX512) {
        if (j->kind == 0)
            interleave_avx512(j->src, j->dst, j->n0, j->n1, j->c, j->g, ts, rs);
        else
            uninterleave_add_avx512(j->src, j->dst, j->n0, j->n1, j->n, j->c, j->g);
        return;
    }
    if (isa_level == ISA_AVX2) {
        if (j->kind == 0)
            interleave_avx2(j->src, j->dst, j->n0, j->n1, j->c, j->g, ts, rs);
        else
            uninterleave_add_avx2(j->src, j->dst, j->n0, j->n1, j->n, j->c, j->g);
        return;
    }
#endif
    if (j->kind == 0)
        interleave_scalar(j->src, j->dst, j->n0, j->n1, j->c, j->g, j->grouped ? j->c : j->c * j->g,
                          j->grouped ? j->n * j->c : j->c);
    else
        uninterleave_add_scalar(j->src, j->dst, j->n0, j->n1, j->n, j->c, j->g);
}

static void *thread_main(void *arg) {
    run_job((job_t *)arg);
    return NULL;
}

#define MAX_THREADS 64

/* Split the work over `threads` workers (the caller's thread is one of them): tokens, or groups
   for io_small and io_dw (and io_forward on few tokens, below); returns 0, or -1 if a worker
   failed (out of memory). */
static int run_split(job_t proto, int threads) {
    const int64_t n = proto.kind == 3 || proto.kind == 5 ? proto.g : proto.n; /* io_small, io_dw: groups */
    if (threads < 1) threads = 1;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads > n) threads = (int)(n > 0 ? n : 1);
    job_t jobs[MAX_THREADS];
    pthread_t tid[MAX_THREADS];
    int started[MAX_THREADS] = {0};
    /* io_forward works in blocks of 48 tokens, and each block streams all the weights once. Split
       evenly over few tokens, the workers' partial blocks add weight passes (32 tokens on two
       threads: two blocks of 16, each about as slow as a full one). Where that costs more passes
       in all than one worker would make, every worker takes all tokens and a share of the groups
       instead (measured, docs/speed.md). */
    const int64_t per_worker = (proto.n + threads - 1) / threads;
    const int by_groups = proto.kind == 2 && proto.g >= threads &&
                          (proto.n + 47) / 48 < threads * ((per_worker + 47) / 48);
    for (int w = 0; w < threads; w++) {
        jobs[w] = proto;
        jobs[w].n0 = n * w / threads;
        jobs[w].n1 = n * (w + 1) / threads;
        jobs[w].k0 = 0;
        jobs[w].k1 = proto.g;
        if (by_groups) {
            jobs[w].n0 = 0;
            jobs[w].n1 = proto.n;
            jobs[w].k0 = proto.g * w / threads;
            jobs[w].k1 = proto.g * (w + 1) / threads;
        }
        jobs[w].failed = 0;
    }
#ifdef _OPENMP
    /* Built with -fopenmp: the workers are OpenMP's, and since the extension is loaded after torch,
       whose libgomp.so.1 is already in the process, they are torch's own pool (no second set of
       threads competing with torch's spinning workers). */
    (void)tid;
    (void)started;
#pragma omp parallel for num_threads(threads) schedule(static, 1)
    for (int w = 0; w < threads; w++) run_job(&jobs[w]);
    int failed = 0;
    for (int w = 0; w < threads; w++) failed |= jobs[w].failed;
#else
    for (int w = 1; w < threads; w++) started[w] = pthread_create(&tid[w], NULL, thread_main, &jobs[w]) == 0;
    run_job(&jobs[0]);
    int failed = jobs[0].failed;
    for (int w = 1; w < threads; w++) {
        if (started[w])
            pthread_join(tid[w], NULL);
        else
            run_job(&jobs[w]); /* could not start a thread: do its share here */
        failed |= jobs[w].failed;
    }
#endif
    return failed ? -1 : 0;
}

static PyObject *call(PyObject *args, int kind) {
    unsigned long long src, dst;
    long long n, c, g;
    int threads = 1, grouped = 0;
    if (!PyArg_ParseTuple(args, "KKLLL|ip", &src, &dst, &n, &c, &g, &threads, &grouped)) return NULL;
    if (n < 0 || c < 1 || g < 1) {
        PyErr_SetString(PyExc_ValueError, "gpconv._native: need n >= 0, c >= 1, g >= 1");
        return NULL;
    }
    job_t proto = {(const float *)(uintptr_t)src, (float *)(uintptr_t)dst, 0, 0, n, c, g, kind, kind == 0 && grouped,
                   NULL, NULL, 0, 0, NULL, NULL, 0};
    Py_BEGIN_ALLOW_THREADS
    run_split(proto, threads);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *py_interleave(PyObject *self, PyObject *args) { return call(args, 0); }

static PyObject *io_call(PyObject *args, int kind) {
    unsigned long long x, w, bias, y, xl = 0, la = 0, lb = 0;
    long long n, in, out, g, r = 0;
    int threads = 1;
    if (!PyArg_ParseTuple(args, "KKKKLLLL|iKKKL", &x, &w, &bias, &y, &n, &in, &out, &g, &threads, &xl, &la, &lb, &r))
        return NULL;
    if (n < 0 || g < 1 || in < g || out < g || in % g || out % g) {
        PyErr_SetString(PyExc_ValueError, "gpconv._native.io_forward: need n >= 0 and g dividing in and out");
        return NULL;
    }
    if (r < 0 || (r > 0 && (kind != 3 || xl == 0 || la == 0 || lb == 0))) {
        PyErr_SetString(PyExc_ValueError, "gpconv._native: a low-rank term (r > 0) needs io_small and x, A, B pointers");
        return NULL;
    }
    if (isa_level < ISA_AVX2) {
        PyErr_SetString(PyExc_RuntimeError, "gpconv._native.io_forward needs AVX2 + FMA or AVX-512");
        return NULL;
    }
    float *u = NULL;
    if (r > 0 && (u = malloc(sizeof(float) * (size_t)(n * r + 1))) == NULL) return PyErr_NoMemory();
    job_t proto = {(const float *)(uintptr_t)x, (float *)(uintptr_t)y, 0, 0, n, in / g, g, kind, 0,
                   (const float *)(uintptr_t)w, (const float *)(uintptr_t)bias, out, 0,
                   (const float *)(uintptr_t)lb, u, r};
    int rc;
    Py_BEGIN_ALLOW_THREADS
    if (r > 0) lowrank_u_avx2((const float *)(uintptr_t)xl, (const float *)(uintptr_t)la, u, n, in, r);
    rc = run_split(proto, threads);
    Py_END_ALLOW_THREADS
    free(u);
    if (rc) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyObject *py_io_forward(PyObject *self, PyObject *args) { return io_call(args, 2); }
static PyObject *py_io_small(PyObject *self, PyObject *args) { return io_call(args, 3); }

/* io_dx's weight layout: W (g, oc, 2c) -> for each half, group and 6-channel tile, an (oc, 6) block
   (channels past c are zeros), so that the kernel's six broadcasts per output are six consecutive
   floats. Read in place, W[k][o][j0 .. j0 + 5] sit 2c floats apart per o; at c = 256 that is a
   2 KB stride, which maps every row onto the same two L1 sets (down_proj's io_dx 1.4x slower). */
static void pack_dx_weight(const float *w, float *wp, int64_t c, int64_t oc, int64_t g) {
    const int64_t ntile = (c + F2_OT - 1) / F2_OT;
    for (int64_t half = 0; half < 2; half++)
        for (int64_t k = 0; k < g; k++)
            for (int64_t o0 = 0; o0 < oc; o0 += 8) /* 8 weight rows at a time: reads and writes both sequential */
                for (int64_t jt = 0; jt < ntile; jt++) {
                    float *d = wp + ((half * g + k) * ntile + jt) * oc * F2_OT;
                    const int64_t j0 = jt * F2_OT, cw = c - j0 < F2_OT ? c - j0 : F2_OT;
                    for (int64_t o = o0; o < o0 + 8 && o < oc; o++) {
                        const float *s = w + (k * oc + o) * 2 * c + half * c + j0;
                        for (int64_t i = 0; i < F2_OT; i++) d[o * F2_OT + i] = i < cw ? s[i] : 0.0f;
                    }
                }
}

/* io_dx and io_dw: three pointers, n, in, out, g and optional threads, checked alike. Returns 0 with
   a Python error set when the arguments are wrong or the CPU lacks AVX2. */
static int grad_args(PyObject *args, const char *name, unsigned long long p[3], long long *n, long long *in,
                     long long *out, long long *g, int *threads) {
    *threads = 1;
    if (!PyArg_ParseTuple(args, "KKKLLLL|i", &p[0], &p[1], &p[2], n, in, out, g, threads)) return 0;
    if (*n < 0 || *g < 1 || *in < *g || *out < *g || *in % *g || *out % *g) {
        PyErr_Format(PyExc_ValueError, "gpconv._native.%s: need n >= 0 and g dividing in and out", name);
        return 0;
    }
    if (isa_level < ISA_AVX2) {
        PyErr_Format(PyExc_RuntimeError, "gpconv._native.%s needs AVX2 + FMA", name);
        return 0;
    }
    return 1;
}

static PyObject *py_io_dx(PyObject *self, PyObject *args) {
    unsigned long long p[3]; /* dy, w, dx */
    long long n, in, out, g;
    int threads;
    if (!grad_args(args, "io_dx", p, &n, &in, &out, &g, &threads)) return NULL;
    const unsigned long long dy = p[0], w = p[1], dx = p[2];
    const int64_t c = in / g, oc = out / g, ntile = (c + F2_OT - 1) / F2_OT;
    float *wp = malloc(sizeof(float) * (size_t)(2 * g * ntile * oc * F2_OT));
    if (wp == NULL) return PyErr_NoMemory();
    job_t proto = {(const float *)(uintptr_t)dy, (float *)(uintptr_t)dx, 0, 0, n, c, g, 4, 0, wp, NULL, out, 0,
                   NULL, NULL, 0};
    int rc;
    Py_BEGIN_ALLOW_THREADS
    pack_dx_weight((const float *)(uintptr_t)w, wp, c, oc, g);
    rc = run_split(proto, threads);
    Py_END_ALLOW_THREADS
    free(wp);
    if (rc) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyObject *py_io_dw(PyObject *self, PyObject *args) {
    unsigned long long p[3]; /* x, dy, dw */
    long long n, in, out, g;
    int threads;
    if (!grad_args(args, "io_dw", p, &n, &in, &out, &g, &threads)) return NULL;
    const unsigned long long x = p[0], dy = p[1], dw = p[2];
    job_t proto = {(const float *)(uintptr_t)x, (float *)(uintptr_t)dw, 0, 0, n, in / g, g, 5, 0, NULL, NULL, out, 0,
                   NULL, (const float *)(uintptr_t)dy, 0};
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = run_split(proto, threads);
    Py_END_ALLOW_THREADS
    if (rc) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static const char *isa_names[] = {"portable", "avx2", "avx512"};

static PyObject *py_isa(PyObject *self, PyObject *args) { return PyUnicode_FromString(isa_names[isa_level]); }
static PyObject *py_uninterleave_add(PyObject *self, PyObject *args) { return call(args, 1); }

/* Tests run every version the CPU has: set_isa("portable") forces the portable loops, "avx2" the
   AVX2 ones on an AVX-512 CPU. Asking for more than the CPU has gives what it has. */
static PyObject *py_set_isa(PyObject *self, PyObject *args) {
    const char *name;
    if (!PyArg_ParseTuple(args, "s", &name)) return NULL;
    int want = -1;
    for (int i = 0; i < 3; i++)
        if (strcmp(name, isa_names[i]) == 0) want = i;
    if (want < 0) {
        PyErr_Format(PyExc_ValueError, "gpconv._native.set_isa: %s is not one of portable, avx2, avx512", name);
        return NULL;
    }
    const int before = isa_level, have = cpu_isa();
    isa_level = want < have ? want : have;
    return PyUnicode_FromString(isa_names[before]);
}

static PyMethodDef methods[] = {
    {"interleave", py_interleave, METH_VARARGS,
     "interleave(src_ptr, dst_ptr, n, c, g, threads=1, grouped=False): float32 dst (n, g, c) <- src (n, c, g); "
     "grouped: dst (g, n, c). With n = 1 it is a plain 2-D transpose (c, g) -> (g, c)."},
    {"uninterleave_add", py_uninterleave_add, METH_VARARGS,
     "uninterleave_add(src_ptr, dst_ptr, n, c, g, threads=1): float32 dst (n, c, g) += src (g, n, c) permuted."},
    {"io_forward", py_io_forward, METH_VARARGS,
     "io_forward(x_ptr, w_ptr, bias_ptr_or_0, y_ptr, n, in, out, g, threads=1): float32 y (n, out) = the io block "
     "on x (n, in) with weight (g, out/g, 2*in/g); needs AVX2 + FMA or AVX-512."},
    {"io_small", py_io_small, METH_VARARGS,
     "io_small(x_ptr, w_ptr, bias_ptr_or_0, y_ptr, n, in, out, g, threads=1, xl_ptr=0, a_ptr=0, b_ptr=0, r=0): the "
     "same as io_forward, for a few tokens (one dot product per output; threads split the groups); with r > 0 also "
     "a hybrid block's low-rank term y += (xl A^T) B^T, A (r, in), B (out, r), xl the unpermuted x; needs AVX2 + FMA "
     "or AVX-512."},
    {"io_dx", py_io_dx, METH_VARARGS,
     "io_dx(dy_ptr, w_ptr, dx_ptr, n, in, out, g, threads=1): float32 dx (n, in) = the io block's input gradient "
     "for dy (n, out) and weight (g, out/g, 2*in/g), written (not added); needs AVX2 + FMA (AVX-512 CPUs run the "
     "AVX2 code)."},
    {"io_dw", py_io_dw, METH_VARARGS,
     "io_dw(x_ptr, dy_ptr, dw_ptr, n, in, out, g, threads=1): float32 dW (g, out/g, 2*in/g) = the io block's weight "
     "gradient for x (n, in) and dy (n, out), written (not added); threads split the groups; needs AVX2 + FMA."},
    {"isa", py_isa, METH_NOARGS, "isa() -> 'avx512' | 'avx2' | 'portable': which kernels run (the best this CPU has)."},
    {"set_isa", py_set_isa, METH_VARARGS,
     "set_isa(name) -> str: run the kernels of 'avx512', 'avx2' or 'portable' (at most what the CPU has); "
     "returns the old setting."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_native", "gpconv's CPU data-movement kernels.", -1,
                                    methods};

PyMODINIT_FUNC PyInit__native(void) {
    isa_level = cpu_isa();
    PyObject *m = PyModule_Create(&module);
#ifdef _OPENMP
    if (m != NULL) PyModule_AddIntConstant(m, "openmp", 1);
#else
    if (m != NULL) PyModule_AddIntConstant(m, "openmp", 0);
#endif
    return m;
}
