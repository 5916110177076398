"""C helpers for FastLlamaEngine's CPU path: the small element-wise steps of a decoder layer.

Why: with a 128-token prefill chunk (and at decode) each torch element-wise op is tiny, so a layer
made of ~30 of them pays ~30 dispatches and ~20 OpenMP fork/joins; on 2 shared cores a fork/join
costs milliseconds whenever the other thread is descheduled. These kernels do each step in ONE
pass, serially below PARALLEL_MIN elements (no fork/join at all), with fp32 math like torch's:

  rmsnorm        out[t] = x[t] * rsqrt(mean(x[t]^2) + eps) * w
  rope_qkv       qkv [T,(H+2KV)d] -> RoPE'd q grouped per KV head [KV, g*T, d] (rows (group, t)),
                 RoPE'd k and v written to the cache rows start..start+T-1 ([KV, S, d] each)
  ungroup        attention output [KV, g*T, d] -> [T, H*d]
  silu_mul       gate|up [T, 2F] -> silu(gate) * up [T, F]
  attn_decode    one query row per head over kv_len cached keys (fp32 softmax), [H*d] out;
                 the keys are split between the threads, partial results merged (one fork/join)
  attn_decode_f16  the same over an fp16 mirror of the cache (keys in transposed blocks of
                 16: scores as 16-lane FMAs), after copying the step's new row into it

``linear(x, w)`` is the CPU path's fp32 GEMM for chunks of rows (prefill): oneDNN's linear
(torch.ops.mkldnn._linear_pointwise, plain weight, no re-packing) where it exists and agrees with
torch.mm on a self-check, else torch.mm (MKL). On this 2-core AVX-512 host oneDNN ran the
SmolLM2 prefill shapes 10-15% faster than MKL at 128 rows (bench/bench_quant_kernels.py).

Built with the quantizer kernels' machinery (bluelm_v.nn.kernels.cpu_quant: cc -O3 -march=native,
cached per source hash). ``library()`` is None without a C compiler or with
BLUELM_V_NO_CPU_KERNELS=1; the engine then uses its torch path.
"""
from __future__ import annotations

import ctypes

C_SOURCE = r"""
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>
#if defined(__AVX512F__) && defined(__F16C__)
#include <immintrin.h>
#endif
#define PARALLEL_MIN (1 << 19)

void rmsnorm(const float* x, int T, int D, const float* w, float eps, float* out, int threads) {
    #pragma omp parallel for num_threads(threads) if ((long)T * D >= PARALLEL_MIN) schedule(static)
    for (int t = 0; t < T; t++) {
        const float* xr = x + (size_t)t * D;
        float* o = out + (size_t)t * D;
        float ss = 0.f;
        for (int j = 0; j < D; j++) ss += xr[j] * xr[j];
        float r = 1.f / sqrtf(ss / (float)D + eps);
        for (int j = 0; j < D; j++) o[j] = xr[j] * r * w[j];
    }
}

/* cos, sin_s [T, d] (sin_s = sin with its first half negated); k/v cache [KV, S, d]. */
void rope_qkv(const float* qkv, int T, int H, int KV, int d, const float* cos, const float* sin_s,
              float* q_out, float* k_cache, float* v_cache, int S, int start, int threads) {
    int g = H / KV, h2 = d / 2, width = (H + 2 * KV) * d;
    #pragma omp parallel for num_threads(threads) if ((long)T * width >= PARALLEL_MIN) schedule(static)
    for (int t = 0; t < T; t++) {
        const float* row = qkv + (size_t)t * width;
        const float* c = cos + (size_t)t * d;
        const float* s = sin_s + (size_t)t * d;
        for (int h = 0; h < H + KV; h++) {
            const float* x = row + (size_t)h * d;
            float* o = h < H ? q_out + ((size_t)(h / g) * g * T + (size_t)(h % g) * T + t) * d
                             : k_cache + ((size_t)(h - H) * S + start + t) * d;
            for (int j = 0; j < h2; j++) o[j] = x[j] * c[j] + x[j + h2] * s[j];
            for (int j = h2; j < d; j++) o[j] = x[j] * c[j] + x[j - h2] * s[j];
        }
        for (int h = 0; h < KV; h++)
            memcpy(v_cache + ((size_t)h * S + start + t) * d, row + (size_t)(H + KV + h) * d, sizeof(float) * d);
    }
}

void ungroup(const float* o, int T, int H, int KV, int d, float* out) {
    int g = H / KV;
    for (int t = 0; t < T; t++)
        for (int h = 0; h < H; h++)
            memcpy(out + ((size_t)t * H + h) * d, o + ((size_t)(h / g) * g * T + (size_t)(h % g) * T + t) * d,
                   sizeof(float) * d);
}

void silu_mul(const float* gu, int T, int F, float* out, int threads) {
    #pragma omp parallel for num_threads(threads) if ((long)T * F >= PARALLEL_MIN) schedule(static)
    for (int t = 0; t < T; t++) {
        const float* gate = gu + (size_t)t * 2 * F;
        const float* up = gate + F;
        float* o = out + (size_t)t * F;
        for (int j = 0; j < F; j++) o[j] = gate[j] / (1.f + expf(-gate[j])) * up[j];
    }
}

/* q [H, d] (head h uses KV head h / g); k/v cache [KV, S, d]; out [H, d]. Keys [0, kv_len) are
   split into `parts` ranges (one per thread); each computes, for the g query heads of a KV head
   together (every key/value row read once), per-head (max, sum, unnormalised out); merged after. */
#define DMAX 256
#define GMAX 16
/* The fp16 mirror (AVX-512 + F16C only; has_fast_f16() says whether this build has it): values
   [KV, S, d] as rows, keys [KV, S/16, d, 16] (blocks of 16 keys, transposed: a block's scores
   are 16-lane FMAs over d, no horizontal sums) */
int has_fast_f16(void) {
#if defined(__AVX512F__) && defined(__F16C__)
    return 1;
#else
    return 0;
#endif
}

/* scores sc[gi * n + s - s0] = scale * q_gi . k_s for s in [s0, s1), max per query head -> m */
static void score_keys(const float* qh, const void* k_cache, int half, int g, int d, size_t kv0, size_t blk0,
                       int s0, int s1, float scale, float* sc, float* m) {
    int n = s1 - s0;
    for (int gi = 0; gi < g; gi++) m[gi] = -INFINITY;
#if defined(__AVX512F__) && defined(__F16C__)
    if (half) {                                   /* s0 is a multiple of 16 */
        for (int b = s0 / 16; b * 16 < s1; b++) {
            const uint16_t* kb = (const uint16_t*)k_cache + (blk0 + b) * (size_t)d * 16;
            __m512 acc[GMAX];
            for (int gi = 0; gi < g; gi++) acc[gi] = _mm512_setzero_ps();
            for (int j = 0; j < d; j++) {
                __m512 kj = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(kb + j * 16)));
                for (int gi = 0; gi < g; gi++) acc[gi] = _mm512_fmadd_ps(_mm512_set1_ps(qh[gi * d + j]), kj, acc[gi]);
            }
            int valid = s1 - b * 16 < 16 ? s1 - b * 16 : 16;
            __mmask16 mk = (__mmask16)((1u << valid) - 1u);
            for (int gi = 0; gi < g; gi++) {
                __m512 v = _mm512_mul_ps(acc[gi], _mm512_set1_ps(scale));
                _mm512_mask_storeu_ps(sc + (size_t)gi * n + b * 16 - s0, mk, v);
                float mx = _mm512_mask_reduce_max_ps(mk, v);
                if (mx > m[gi]) m[gi] = mx;
            }
        }
        return;
    }
#endif
    const float* kh = (const float*)k_cache + kv0;
    for (int s = s0; s < s1; s++) {
        const float* kr = kh + (size_t)s * d;
        for (int gi = 0; gi < g; gi++) {
            const float* qg = qh + (size_t)gi * d;
            float dot = 0.f;
            for (int j = 0; j < d; j++) dot += qg[j] * kr[j];
            dot *= scale;
            sc[(size_t)gi * n + s - s0] = dot;
            if (dot > m[gi]) m[gi] = dot;
        }
    }
}

/* value row s as fp32 (a pointer into the fp32 cache, or the fp16 row converted into buf) */
static inline const float* value_row(const void* v_cache, size_t off, int half, int d, float* buf) {
#if defined(__AVX512F__) && defined(__F16C__)
    if (half) {
        const uint16_t* src = (const uint16_t*)v_cache + off;
        int j = 0;
        for (; j + 16 <= d; j += 16) _mm512_storeu_ps(buf + j, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(src + j))));
        for (; j < d; j++) buf[j] = _cvtsh_ss(src[j]);
        return buf;
    }
#endif
    return (const float*)v_cache + off;
}

/* acc[gi] = sum_s p[gi, s] v_s over fp16 value rows, d <= 128 in registers (a query head at a
   time: the head's values stay in L2 between the g passes); 0 where this does not apply */
static int weigh_values_f16(const void* v_cache, int half, int g, int d, size_t kv0, int s0, int s1,
                            const float* sc, float acc[GMAX][DMAX]) {
#if defined(__AVX512F__) && defined(__F16C__)
    if (!half || d % 16 || d > 128) return 0;
    int nc = d / 16, n = s1 - s0;
    const uint16_t* vh = (const uint16_t*)v_cache + kv0;
    for (int gi = 0; gi < g; gi++) {
        __m512 a[8];
        for (int c = 0; c < 8; c++) a[c] = _mm512_setzero_ps();
        const float* p = sc + (size_t)gi * n;
        for (int s = s0; s < s1; s++) {
            const uint16_t* vr = vh + (size_t)s * d;
            __m512 e = _mm512_set1_ps(p[s - s0]);
            #pragma GCC unroll 8
            for (int c = 0; c < 8; c++)
                if (c < nc) a[c] = _mm512_fmadd_ps(e, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(vr + c * 16))), a[c]);
        }
        for (int c = 0; c < nc; c++) _mm512_storeu_ps(acc[gi] + c * 16, a[c]);
    }
    return 1;
#else
    (void)v_cache; (void)half; (void)g; (void)d; (void)kv0; (void)s0; (void)s1; (void)sc; (void)acc;
    return 0;
#endif
}

static void attn_core(const float* q, const void* k_cache, const void* v_cache, int half, int H, int KV,
                      int d, int S, int kv_len, float scale, float* out, float* scratch, int threads) {
    int g = H / KV;
    int parts = kv_len >= 512 ? threads : 1;
    /* scratch: parts * H * (d + 2) floats + g * kv_len floats per part (scores) */
    float* part_o = scratch;
    float* part_m = part_o + (size_t)parts * H * d;
    float* part_l = part_m + (size_t)parts * H;
    float* sc_all = part_l + (size_t)parts * H;
    #pragma omp parallel for num_threads(parts) if (parts > 1) schedule(static, 1)
    for (int p = 0; p < parts; p++) {
        int blk = half ? 16 : 1;                    /* fp16 keys: parts split on 16-key blocks */
        int nblk = (kv_len + blk - 1) / blk;
        int s0 = (int)((long)nblk * p / parts) * blk, s1 = (int)((long)nblk * (p + 1) / parts) * blk;
        if (s1 > kv_len) s1 = kv_len;
        int n = s1 - s0;
        float* sc = sc_all + (size_t)g * s0;                 /* [g, n] */
        for (int kvh = 0; kvh < KV; kvh++) {
            const float* qh = q + (size_t)kvh * g * d;
            size_t kv0 = (size_t)kvh * S * d;
            float m[GMAX], l[GMAX];
            score_keys(qh, k_cache, half, g, d, kv0, (size_t)kvh * (S / 16), s0, s1, scale, sc, m);
            for (int gi = 0; gi < g; gi++) {
                float* r = sc + (size_t)gi * n;
                float t = 0.f;
                for (int i = 0; i < n; i++) { r[i] = expf(r[i] - m[gi]); t += r[i]; }
                l[gi] = t;
            }
            float acc[GMAX][DMAX];
            if (weigh_values_f16(v_cache, half, g, d, kv0, s0, s1, sc, acc)) goto partials;
            for (int gi = 0; gi < g; gi++) for (int j = 0; j < d; j++) acc[gi][j] = 0.f;
            for (int s = s0; s < s1; s++) {
                float vbuf[DMAX];
                const float* vr = value_row(v_cache, kv0 + (size_t)s * d, half, d, vbuf);
                for (int gi = 0; gi < g; gi++) {
                    float e = sc[(size_t)gi * n + s - s0];
                    for (int j = 0; j < d; j++) acc[gi][j] += e * vr[j];
                }
            }
        partials:
            for (int gi = 0; gi < g; gi++) {
                int h = kvh * g + gi;
                memcpy(part_o + ((size_t)p * H + h) * d, acc[gi], sizeof(float) * d);
                part_m[p * H + h] = m[gi];
                part_l[p * H + h] = l[gi];
            }
        }
    }
    for (int h = 0; h < H; h++) {
        float m = -INFINITY, l = 0.f;
        for (int p = 0; p < parts; p++) if (part_m[p * H + h] > m) m = part_m[p * H + h];
        float* o = out + (size_t)h * d;
        for (int j = 0; j < d; j++) o[j] = 0.f;
        for (int p = 0; p < parts; p++) {
            float w = part_l[p * H + h] > 0.f ? expf(part_m[p * H + h] - m) : 0.f;
            l += w * part_l[p * H + h];
            const float* po = part_o + ((size_t)p * H + h) * d;
            for (int j = 0; j < d; j++) o[j] += w * po[j];
        }
        for (int j = 0; j < d; j++) o[j] /= l;
    }
}

void attn_decode(const float* q, const float* k_cache, const float* v_cache, int H, int KV, int d,
                 int S, int kv_len, float scale, float* out, float* scratch, int threads) {
    attn_core(q, k_cache, v_cache, 0, H, KV, d, S, kv_len, scale, out, scratch, threads);
}

/* the same over the fp16 mirror (S a multiple of 16); row kv_len-1, just written by rope_qkv into
   the fp32 cache, is copied into the mirror first */
void attn_decode_f16(const float* q, const float* k_cache, const float* v_cache, uint16_t* k_blocks,
                     uint16_t* v_half, int H, int KV, int d, int S, int kv_len, float scale, float* out,
                     float* scratch, int threads) {
#if defined(__AVX512F__) && defined(__F16C__)
    int row = kv_len - 1;
    for (int kvh = 0; kvh < KV; kvh++) {
        size_t src = ((size_t)kvh * S + row) * d;
        uint16_t* kb = k_blocks + ((size_t)kvh * (S / 16) + row / 16) * (size_t)d * 16 + row % 16;
        for (int j = 0; j < d; j++) {
            kb[j * 16] = _cvtss_sh(k_cache[src + j], 0);         /* round to nearest even */
            v_half[src + j] = _cvtss_sh(v_cache[src + j], 0);
        }
    }
    attn_core(q, k_blocks, v_half, 1, H, KV, d, S, kv_len, scale, out, scratch, threads);
#endif
}
"""

MAX_HEAD_DIM = 256   # DMAX
MAX_GROUP = 16       # GMAX: query heads per KV head
_P, _I, _F = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
_SIGNATURES = {
    "rmsnorm": [_P, _I, _I, _P, _F, _P, _I],
    "rope_qkv": [_P, _I, _I, _I, _I, _P, _P, _P, _P, _P, _I, _I, _I],
    "ungroup": [_P, _I, _I, _I, _I, _P],
    "silu_mul": [_P, _I, _I, _P, _I],
    "attn_decode": [_P, _P, _P, _I, _I, _I, _I, _I, _F, _P, _P, _I],
    "attn_decode_f16": [_P, _P, _P, _P, _P, _I, _I, _I, _I, _I, _F, _P, _P, _I],
    "has_fast_f16": [],
}
_LIB: list = []


def library():
    """The loaded helper library (built on first use), or None where it cannot be built."""
    from bluelm_v.nn.kernels import cpu_quant

    return cpu_quant.load(C_SOURCE, "bluelm_v_layer_ops", _SIGNATURES, _LIB, "CPU layer kernels", ("-lm",))


_GEMM: dict = {}          # dtype -> oneDNN linear, or None where it does not run (a bf16 GEMM needs AVX-512)
LINEAR_MIN_ROWS = 16     # fewer rows (decode): torch's GEMV


def _onednn_linear(dtype):
    """oneDNN's linear for ``dtype`` if this torch and CPU run it and it matches torch.mm, else None."""
    if dtype in _GEMM:
        return _GEMM[dtype]
    import torch

    fn = None
    try:
        op = torch.ops.mkldnn._linear_pointwise
        gen = torch.Generator().manual_seed(0)
        x, w = torch.randn(33, 40, generator=gen).to(dtype), torch.randn(24, 40, generator=gen).to(dtype)
        tol = 1e-4 if dtype == torch.float32 else 2e-2
        if torch.backends.mkldnn.is_available() and torch.allclose(
                op(x, w, None, "none", [], "").float(), (x @ w.t()).float(), rtol=tol, atol=tol):
            fn = lambda a, b: op(a, b, None, "none", [], "")      # noqa: E731
    except (AttributeError, RuntimeError):   # e.g. "could not create a primitive descriptor" (no bf16 ISA)
        fn = None
    _GEMM[dtype] = fn
    return fn


def linear(x, w):
    """x [M, K] @ w [N, K].T -> [M, N] (both contiguous CPU tensors, fp32 or both bf16)."""
    fn = _onednn_linear(x.dtype) if x.shape[0] >= LINEAR_MIN_ROWS else None
    return fn(x, w) if fn is not None else x @ w.t()
