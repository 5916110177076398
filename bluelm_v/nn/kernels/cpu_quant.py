"""Hand-written CPU kernels for packed weights (C, built once per machine, loaded with ctypes).

Why: on this project's target (2 CPU threads, batch-1 decode) none of torch's built-in integer
matmuls beats the fp32 matvec (bench/bench_quant_kernels.py); a fused unpack-and-FMA loop reads
the packed weight once and is memory-bound on 1/8 of the fp32 bytes.

Kernels (fp32 activations and accumulation unless said; OpenMP threads = torch.get_num_threads(), the
same libgomp torch uses, so the two never oversubscribe the cores):
  int4_gemm_small  y[M, N] = x[M, K] @ dequant(W4).T (+ bias), for small M (decode)
  int4_gemv_q8     the same for M = 1 on 8-bit-quantised activations (integer dot products, VNNI;
                   module kernel "cpu_lowp" only)
  int8_gemm_small  the same for per-channel INT8 weights
  int4_dequant     W4 rows -> fp32 (or bf16) rows (the tile step of the large-M path)
  int8_dequant     W8 rows -> fp32 (or bf16) rows

The library is compiled with ``cc -O3 -march=native -fopenmp`` into ``$BLUELM_V_CACHE`` (default
~/.cache/bluelm_v/kernels), keyed by a hash of the source and the compiler. Without a C compiler,
:func:`library` returns None and the callers fall back to torch dequantise-then-matmul.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

C_SOURCE = r"""
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>
#if defined(__F16C__)
#include <immintrin.h>
static inline float h2f(uint16_t h) { return _cvtsh_ss(h); }
#else
static inline float h2f(uint16_t h) {
    uint32_t s = (uint32_t)(h & 0x8000) << 16, e = (h >> 10) & 0x1f, m = h & 0x3ff, u;
    if (e == 0) { if (m == 0) u = s; else { e = 113; while (!(m & 0x400)) { m <<= 1; e--; } u = s | (e << 23) | ((m & 0x3ff) << 13); } }
    else if (e == 31) u = s | 0x7f800000 | (m << 13);
    else u = s | ((e + 112) << 23) | (m << 13);
    float f; memcpy(&f, &u, 4); return f;
}
#endif
#define MMAX 16
#define GMAX 128
/* Fewer weights than this: one thread (no fork/join; on 2 shared cores a fork/join costs far
   more than such a matvec whenever the other thread is descheduled). */
#define PAR_MIN_WEIGHTS (1L << 21)

/* Split x per group into evens then odds (so each nibble plane meets contiguous x) + group sums. */
static void split_x(const float* x, int M, int K, int g, float* xs, float* xsum) {
    int G = K / g, h = g / 2;
    for (int m = 0; m < M; m++)
        for (int gi = 0; gi < G; gi++) {
            const float* src = x + (size_t)m * K + (size_t)gi * g;
            float* dst = xs + (size_t)m * K + (size_t)gi * g;
            float t = 0.f;
            for (int j = 0; j < h; j++) { dst[j] = src[2 * j]; dst[h + j] = src[2 * j + 1]; t += src[2 * j] + src[2 * j + 1]; }
            xsum[m * G + gi] = t;
        }
}

/* One output row; H = g/2 is a compile-time constant after inlining, so the group loop unrolls
   into whole vectors: 8 codes -> zero-extend -> mask / shift nibbles -> float -> FMA with x. */
#if defined(__AVX512F__)
#include <immintrin.h>
static inline __attribute__((always_inline)) void int4_row(
        const uint8_t* prow, const uint16_t* srow, const uint16_t* zrow, const float* xs,
        const float* xsum, int M, int K, int G, const int H, float* acc) {
    __m512 accv[MMAX];
    float accz[MMAX];
    const __m512i mask = _mm512_set1_epi32(15);
    for (int m = 0; m < M; m++) { accv[m] = _mm512_setzero_ps(); accz[m] = 0.f; }
    for (int gi = 0; gi < G; gi++) {
        const uint8_t* p = prow + (size_t)gi * H;
        __m512 lo[GMAX / 32], hi[GMAX / 32];
        for (int v = 0; v < H / 16; v++) {
            __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(p + 16 * v)));
            lo[v] = _mm512_cvtepi32_ps(_mm512_and_si512(b, mask));
            hi[v] = _mm512_cvtepi32_ps(_mm512_srli_epi32(b, 4));
        }
        float s = h2f(srow[gi]);
        float z = zrow ? h2f(zrow[gi]) : -8.f * s;
        __m512 sv = _mm512_set1_ps(s);
        for (int m = 0; m < M; m++) {
            const float* xe = xs + (size_t)m * K + (size_t)gi * 2 * H;
            const float* xo = xe + H;
            __m512 d0 = _mm512_setzero_ps(), d1 = _mm512_setzero_ps();
            for (int v = 0; v < H / 16; v++) {
                d0 = _mm512_fmadd_ps(lo[v], _mm512_loadu_ps(xe + 16 * v), d0);
                d1 = _mm512_fmadd_ps(hi[v], _mm512_loadu_ps(xo + 16 * v), d1);
            }
            accv[m] = _mm512_fmadd_ps(sv, _mm512_add_ps(d0, d1), accv[m]);
            accz[m] += z * xsum[m * G + gi];
        }
    }
    for (int m = 0; m < M; m++) acc[m] = _mm512_reduce_add_ps(accv[m]) + accz[m];
}
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
static inline float hsum8(__m256 v) {
    __m128 a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    a = _mm_add_ps(a, _mm_movehl_ps(a, a));
    a = _mm_add_ss(a, _mm_movehdup_ps(a));
    return _mm_cvtss_f32(a);
}
static inline __attribute__((always_inline)) void int4_row(
        const uint8_t* prow, const uint16_t* srow, const uint16_t* zrow, const float* xs,
        const float* xsum, int M, int K, int G, const int H, float* acc) {
    __m256 accv[MMAX];
    float accz[MMAX];
    const __m256i mask = _mm256_set1_epi32(15);
    for (int m = 0; m < M; m++) { accv[m] = _mm256_setzero_ps(); accz[m] = 0.f; }
    for (int gi = 0; gi < G; gi++) {
        const uint8_t* p = prow + (size_t)gi * H;
        __m256 lo[GMAX / 16], hi[GMAX / 16];
        for (int v = 0; v < H / 8; v++) {
            __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(p + 8 * v)));
            lo[v] = _mm256_cvtepi32_ps(_mm256_and_si256(b, mask));
            hi[v] = _mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4));
        }
        float s = h2f(srow[gi]);
        float z = zrow ? h2f(zrow[gi]) : -8.f * s;
        __m256 sv = _mm256_set1_ps(s);
        for (int m = 0; m < M; m++) {
            const float* xe = xs + (size_t)m * K + (size_t)gi * 2 * H;
            const float* xo = xe + H;
            __m256 d0 = _mm256_setzero_ps(), d1 = _mm256_setzero_ps();
            for (int v = 0; v < H / 8; v++) {
                d0 = _mm256_fmadd_ps(lo[v], _mm256_loadu_ps(xe + 8 * v), d0);
                d1 = _mm256_fmadd_ps(hi[v], _mm256_loadu_ps(xo + 8 * v), d1);
            }
            accv[m] = _mm256_fmadd_ps(sv, _mm256_add_ps(d0, d1), accv[m]);
            accz[m] += z * xsum[m * G + gi];
        }
    }
    for (int m = 0; m < M; m++) acc[m] = hsum8(accv[m]) + accz[m];
}
#else
static inline void int4_row(const uint8_t* prow, const uint16_t* srow, const uint16_t* zrow, const float* xs,
                            const float* xsum, int M, int K, int G, const int H, float* acc) {
    for (int m = 0; m < M; m++) acc[m] = 0.f;
    for (int gi = 0; gi < G; gi++) {
        const uint8_t* p = prow + (size_t)gi * H;
        float s = h2f(srow[gi]);
        float z = zrow ? h2f(zrow[gi]) : -8.f * s;
        for (int m = 0; m < M; m++) {
            const float* xe = xs + (size_t)m * K + (size_t)gi * 2 * H;
            float d = 0.f;
            for (int j = 0; j < H; j++) d += (float)(p[j] & 15) * xe[j] + (float)(p[j] >> 4) * xe[H + j];
            acc[m] += s * d + z * xsum[m * G + gi];
        }
    }
}
#endif

#if defined(__AVX2__) && defined(__FMA__)
/* M = 1 (decode): 4 output rows at a time, interleaving their groups, with the rows 8 ahead
   prefetched: more independent loads in flight when the weights stream from DRAM. */
static inline __attribute__((always_inline)) void int4_rows4(
        const uint8_t* p0, size_t rb, const uint16_t* s0, const uint16_t* z0, int G,
        const float* xs, const float* xsum, const int H, float* out) {
    const __m256i mask = _mm256_set1_epi32(15);
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    float accz[4] = {0.f, 0.f, 0.f, 0.f};
    for (int gi = 0; gi < G; gi++) {
        const float* xe = xs + (size_t)gi * 2 * H;
        const float* xo = xe + H;
        for (int r = 0; r < 4; r++) {
            const uint8_t* p = p0 + r * rb + (size_t)gi * H;
            if (((size_t)gi * H) % 64 == 0) _mm_prefetch((const char*)(p + 8 * rb), _MM_HINT_T0);
            __m256 d0 = _mm256_setzero_ps(), d1 = _mm256_setzero_ps();
            for (int v = 0; v < H / 8; v++) {
                __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(p + 8 * v)));
                d0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(b, mask)), _mm256_loadu_ps(xe + 8 * v), d0);
                d1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4)), _mm256_loadu_ps(xo + 8 * v), d1);
            }
            float s = h2f(s0[(size_t)r * G + gi]);
            float z = z0 ? h2f(z0[(size_t)r * G + gi]) : -8.f * s;
            acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(s), _mm256_add_ps(d0, d1), acc[r]);
            accz[r] += z * xsum[gi];
        }
    }
    for (int r = 0; r < 4; r++) {
        __m128 a = _mm_add_ps(_mm256_castps256_ps128(acc[r]), _mm256_extractf128_ps(acc[r], 1));
        a = _mm_add_ps(a, _mm_movehl_ps(a, a));
        a = _mm_add_ss(a, _mm_movehdup_ps(a));
        out[r] = _mm_cvtss_f32(a) + accz[r];
    }
}
#define HAVE_ROWS4 1
#endif

/* x [M, K] fp32; packed [N, K/2] (low nibble = even column); scales, zeros fp16 [N, K/g] (zeros NULL:
   symmetric, w = s*(q-8)); bias [N] or NULL; y [M, N]. M <= MMAX, g in {32, 64, 128}. */
void int4_gemm_small(const float* x, int M, int K, const uint8_t* packed, const uint16_t* scales,
                     const uint16_t* zeros, const float* bias, int N, int g, float* y, int threads) {
    int G = K / g;
    if ((long)N * K * M < PAR_MIN_WEIGHTS) threads = 1;
    float* xs = (float*)malloc(sizeof(float) * (size_t)M * K);
    float* xsum = (float*)malloc(sizeof(float) * (size_t)M * G);
    split_x(x, M, K, g, xs, xsum);
    int n0 = 0;
#ifdef HAVE_ROWS4
    if (M == 1) {
        size_t rb = (size_t)K / 2;
        #pragma omp parallel for schedule(dynamic, 8) num_threads(threads)
        for (int n = 0; n < N - 3; n += 4) {
            const uint16_t* z = zeros ? zeros + (size_t)n * G : NULL;
            float out4[4];   /* then + bias: bias may alias y (an in-place residual add) */
            if (g == 32) int4_rows4(packed + n * rb, rb, scales + (size_t)n * G, z, G, xs, xsum, 16, out4);
            else if (g == 64) int4_rows4(packed + n * rb, rb, scales + (size_t)n * G, z, G, xs, xsum, 32, out4);
            else int4_rows4(packed + n * rb, rb, scales + (size_t)n * G, z, G, xs, xsum, 64, out4);
            for (int r = 0; r < 4; r++) y[n + r] = out4[r] + (bias ? bias[n + r] : 0.f);
        }
        n0 = N - N % 4;
    }
#endif
    #pragma omp parallel for schedule(dynamic, 16) num_threads(threads)
    for (int n = n0; n < N; n++) {
        float acc[MMAX];
        const uint8_t* prow = packed + (size_t)n * (K / 2);
        const uint16_t* srow = scales + (size_t)n * G;
        const uint16_t* zrow = zeros ? zeros + (size_t)n * G : NULL;
        if (g == 32) int4_row(prow, srow, zrow, xs, xsum, M, K, G, 16, acc);
        else if (g == 64) int4_row(prow, srow, zrow, xs, xsum, M, K, G, 32, acc);
        else int4_row(prow, srow, zrow, xs, xsum, M, K, G, 64, acc);
        float b = bias ? bias[n] : 0.f;
        for (int m = 0; m < M; m++) y[(size_t)m * N + n] = acc[m] + b;
    }
    free(xs); free(xsum);
}

/* Decode (one row) on 8-bit-quantised activations, llama.cpp's Q4 x Q8 scheme: x is rounded per
   weight group to int8 (scale dx = max|x|/127), split even/odd like the packed nibbles, and each
   group's dot product is integer (AVX-512 VNNI vpdpbusd: unsigned nibble x signed byte, 4 at a
   time): y[n] = sum_g s*dx*(q . xq) + z*dx*sum(xq) (+ bias, which may alias y). has_vnni() says
   whether this build has it (else the caller keeps int4_gemm_small). */
int has_vnni(void) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return 1;
#else
    return 0;
#endif
}

void int4_gemv_q8(const float* x, int K, const uint8_t* packed, const uint16_t* scales, const uint16_t* zeros,
                  const float* bias, int N, int g, float* y, int threads) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    int G = K / g, H = g / 2;
    if ((long)N * K < PAR_MIN_WEIGHTS) threads = 1;
    int8_t* xq = (int8_t*)malloc((size_t)K);            /* per group: H even columns, then H odd */
    float* dx = (float*)malloc(sizeof(float) * (size_t)G);
    float* zx = (float*)malloc(sizeof(float) * (size_t)G);   /* dx * sum(xq) */
    for (int gi = 0; gi < G; gi++) {
        const float* xg = x + (size_t)gi * g;
        float amax = 0.f;
        for (int j = 0; j < g; j++) amax = fmaxf(amax, fabsf(xg[j]));
        float d = amax / 127.f, inv = amax > 0.f ? 127.f / amax : 0.f;
        int sum = 0;
        for (int j = 0; j < H; j++) {
            int e = (int)lrintf(xg[2 * j] * inv), o = (int)lrintf(xg[2 * j + 1] * inv);
            xq[(size_t)gi * g + j] = (int8_t)e;
            xq[(size_t)gi * g + H + j] = (int8_t)o;
            sum += e + o;
        }
        dx[gi] = d;
        zx[gi] = d * (float)sum;
    }
    const __m128i low4 = _mm_set1_epi8(15);
    #pragma omp parallel for schedule(dynamic, 16) num_threads(threads)
    for (int n = 0; n < N; n++) {
        const uint8_t* prow = packed + (size_t)n * (K / 2);
        const uint16_t* srow = scales + (size_t)n * G;
        const uint16_t* zrow = zeros ? zeros + (size_t)n * G : NULL;
        if (n + 4 < N) _mm_prefetch((const char*)(prow + 4 * (size_t)(K / 2)), _MM_HINT_T0);
        __m128 acc = _mm_setzero_ps();
        float accz = 0.f;
        for (int gi = 0; gi < G; gi++) {
            const uint8_t* p = prow + (size_t)gi * H;
            const int8_t* xe = xq + (size_t)gi * g;
            __m128i dot = _mm_setzero_si128();
            for (int c = 0; c < H; c += 16) {            /* 16 bytes = 32 weights */
                __m128i b = _mm_loadu_si128((const __m128i*)(p + c));
                __m128i lo = _mm_and_si128(b, low4), hi = _mm_and_si128(_mm_srli_epi16(b, 4), low4);
                dot = _mm_dpbusd_epi32(dot, lo, _mm_loadu_si128((const __m128i*)(xe + c)));
                dot = _mm_dpbusd_epi32(dot, hi, _mm_loadu_si128((const __m128i*)(xe + H + c)));
            }
            float s = h2f(srow[gi]);
            float z = zrow ? h2f(zrow[gi]) : -8.f * s;
            acc = _mm_fmadd_ps(_mm_set1_ps(s * dx[gi]), _mm_cvtepi32_ps(dot), acc);
            accz += z * zx[gi];
        }
        acc = _mm_add_ps(acc, _mm_movehl_ps(acc, acc));
        acc = _mm_add_ss(acc, _mm_movehdup_ps(acc));
        y[n] = _mm_cvtss_f32(acc) + accz + (bias ? bias[n] : 0.f);
    }
    free(xq); free(dx); free(zx);
#else
    (void)x; (void)K; (void)packed; (void)scales; (void)zeros; (void)bias; (void)N; (void)g; (void)y; (void)threads;
#endif
}

/* x [M, K] fp32; q int8 [N, K]; scale fp32 [N]; bias [N] or NULL; y [M, N]. */
void int8_gemm_small(const float* x, int M, int K, const int8_t* q, const float* scale,
                     const float* bias, int N, float* y, int threads) {
    if ((long)N * K * M < PAR_MIN_WEIGHTS) threads = 1;
    #pragma omp parallel for schedule(dynamic, 16) num_threads(threads)
    for (int n = 0; n < N; n++) {
        const int8_t* row = q + (size_t)n * K;
        float b = bias ? bias[n] : 0.f;
        for (int m = 0; m < M; m++) {
            const float* xm = x + (size_t)m * K;
            float d = 0.f;
            for (int k = 0; k < K; k++) d += (float)row[k] * xm[k];
            y[(size_t)m * N + n] = d * scale[n] + b;
        }
    }
}

/* fp32 -> bf16 bits, round to nearest even (finite values) */
static inline uint16_t f2bf(float f) {
    uint32_t b;
    memcpy(&b, &f, 4);
    return (uint16_t)((b + 0x7fffu + ((b >> 16) & 1u)) >> 16);
}

/* one dequantised row chunk -> out row n - r0: fp32, or bf16 bits when bf16 (the bf16 GEMM path) */
#define STORE(o, i, v) do { if (bf16) ((uint16_t*)(o))[i] = f2bf(v); else ((float*)(o))[i] = (v); } while (0)

/* rows [r0, r1) of a packed int4 weight -> out [(r1 - r0), K] fp32 (bf16 != 0: bf16) */
void int4_dequant(const uint8_t* packed, const uint16_t* scales, const uint16_t* zeros, int K, int g,
                  int r0, int r1, void* out, int threads, int bf16) {
    int G = K / g, h = g / 2;
    size_t esize = bf16 ? 2 : 4;
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int n = r0; n < r1; n++) {
        const uint8_t* prow = packed + (size_t)n * (K / 2);
        char* o = (char*)out + (size_t)(n - r0) * K * esize;
        for (int gi = 0; gi < G; gi++) {
            float s = h2f(scales[(size_t)n * G + gi]);
            float z = zeros ? h2f(zeros[(size_t)n * G + gi]) : -8.f * s;
            const uint8_t* p = prow + (size_t)gi * h;
            char* og = o + (size_t)gi * g * esize;
            for (int j = 0; j < h; j++) {
                STORE(og, 2 * j, (float)(p[j] & 15) * s + z);
                STORE(og, 2 * j + 1, (float)(p[j] >> 4) * s + z);
            }
        }
    }
}

void int8_dequant(const int8_t* q, const float* scale, int K, int r0, int r1, void* out, int threads, int bf16) {
    size_t esize = bf16 ? 2 : 4;
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int n = r0; n < r1; n++) {
        const int8_t* row = q + (size_t)n * K;
        char* o = (char*)out + (size_t)(n - r0) * K * esize;
        float s = scale[n];
        for (int k = 0; k < K; k++) STORE(o, k, (float)row[k] * s);
    }
}
"""

MAX_SMALL_M = 16      # MMAX in the C source
MAX_GROUP = 128       # GMAX
_LOCK = threading.Lock()
_LIB: list = []       # [ctypes.CDLL | None] once tried
_P, _I = ctypes.c_void_p, ctypes.c_int
_SIGNATURES = {
    "int4_gemm_small": [_P, _I, _I, _P, _P, _P, _P, _I, _I, _P, _I],
    "int8_gemm_small": [_P, _I, _I, _P, _P, _P, _I, _P, _I],
    "int4_dequant": [_P, _P, _P, _I, _I, _I, _I, _P, _I, _I],
    "int4_gemv_q8": [_P, _I, _P, _P, _P, _P, _I, _I, _P, _I],
    "has_vnni": [],
    "int8_dequant": [_P, _P, _I, _I, _I, _P, _I, _I],
}
# Compiled with -ffast-math (vectorised float reductions) but LINKED without it: linking with it
# pulls in GCC's crtfastmath start-up code, which turns on flush-to-zero for the whole process
# (torch's numerics included) as soon as the library loads.
FLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp", "-fPIC"]
LINK_FLAGS = ["-shared", "-fopenmp"]


def cache_dir() -> Path:
    return Path(os.environ.get("BLUELM_V_CACHE", Path.home() / ".cache" / "bluelm_v")) / "kernels"


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def _cpu_flags() -> str:
    """This CPU's feature flags (Linux), so that a shared cache never hands -march=native code
    built on another CPU (e.g. with VNNI) to this one."""
    try:
        return next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        return ""


def _build(cc: str, source: str = C_SOURCE, stem: str = "bluelm_v_quant", libs: tuple = ()) -> Path:
    """Compile ``source`` once per (source, compiler, flags, CPU) into the cache; the .so path."""
    key = hashlib.sha256((source + cc + " ".join(FLAGS + LINK_FLAGS + list(libs)) + _cpu_flags()).encode()
                         ).hexdigest()[:16]
    target = cache_dir() / f"{stem}_{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        src, obj, out = Path(tmp) / "kernels.c", Path(tmp) / "kernels.o", Path(tmp) / "kernels.so"
        src.write_text(source)
        subprocess.run([cc, *FLAGS, "-c", str(src), "-o", str(obj)], check=True, capture_output=True, text=True)
        subprocess.run([cc, *LINK_FLAGS, str(obj), "-o", str(out), *libs], check=True, capture_output=True, text=True)
        os.replace(out, target)  # atomic: concurrent builders never see a half-written library
    return target


def load(source: str, stem: str, signatures: dict, slot: list, what: str, libs: tuple = ()):
    """Build (once) and load a C library with ctypes ``signatures`` ({name: argtypes}: void
    results; argless functions return int), cached in ``slot``; None without a compiler, with BLUELM_V_NO_CPU_KERNELS=1, or when
    the build fails (a warning with the compiler's message names ``what`` falls back to torch)."""
    if slot:
        return slot[0]
    with _LOCK:
        if slot:
            return slot[0]
        lib, cc = None, _compiler()
        if os.environ.get("BLUELM_V_NO_CPU_KERNELS") != "1" and cc is not None:
            try:
                import torch  # noqa: F401 -- load torch's libgomp first so both share one OpenMP pool
                lib = ctypes.CDLL(str(_build(cc, source, stem, libs)))
                for name, args in signatures.items():
                    getattr(lib, name).argtypes = args
                    getattr(lib, name).restype = None if args else ctypes.c_int
            except (OSError, subprocess.CalledProcessError) as exc:
                detail = getattr(exc, "stderr", "") or str(exc)
                print(f"bluelm-v: warning: {what} could not be built with {cc} ({detail.strip()[:300]}); "
                      "using torch ops instead", file=sys.stderr)
                lib = None
        slot.append(lib)
        return lib


def library():
    """The loaded kernel library, building it on first use; None when it cannot be built
    (no compiler, or BLUELM_V_NO_CPU_KERNELS=1): callers then use torch fallbacks."""
    return load(C_SOURCE, "bluelm_v_quant", _SIGNATURES, _LIB, "CPU quant kernels")


_VNNI: list = []


def q8_gemv():
    """lib.int4_gemv_q8 where the library has it (AVX-512 VNNI), else None (cached per library)."""
    lib = library()
    if not _VNNI or _VNNI[0] is not lib:
        _VNNI[:] = [lib, lib.int4_gemv_q8 if lib is not None and lib.has_vnni() == 1 else None]
    return _VNNI[1]
