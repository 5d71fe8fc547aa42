/* Quantized matrix products for CPU-tier experts: y = W x with W in blocks of 32 weights.
 *
 * Formats (W is [rows][cols], rows a multiple of 4, cols of 64; one scale `d` per block):
 *   q8: int8 q,              weight = d * q                 (fp16 d; 8.5 bits per weight)
 *   q4: q + 8 in a nibble,   weight = d * q, q in [-8, 7]   (fp16 d; 4.5 bits per weight); a block's 16
 *       bytes hold element j in the low nibble of byte j and element j + 16 in its high nibble.
 *   mxfp4: an E2M1 code in a nibble, ordered as q4's; d an E8M0 exponent e (one byte), weight =
 *       E2M1(code) * 2^(e - 127) (4.25 bits per weight). Twice an E2M1 value is an integer in
 *       [-12, 12] (`E2M1_TIMES_2`), so a block's dot product is exact in integers, as q8's is.
 * Layout: rows in panels of four, and within a panel block by block, the four rows' bytes of one
 * block side by side (`panel_offset`); the scales in the same order. A product then reads its weight
 * as one sequential stream, which the hardware prefetchers follow; four separate rows would be four
 * short streams, each restarting at every row of a narrow expert.
 * Activations are quantized the same way on the fly, per block of 32 with an fp32 scale, so a block's
 * product is an exact integer dot product times two scales; only the order of the float sums differs
 * from the same arithmetic done in fp32 (fiddlerc.runtime.quant.reference_matmul).
 *
 * At one token the product reads each weight once: it is bound by memory bandwidth, and the integer
 * dot products keep the arithmetic per byte small enough to stay there. The AVX2 path is chosen at run
 * time (`fc_has_avx2`); the portable path computes the same integers. Panels are split over OpenMP
 * threads; torch's own thread count is passed in by the caller.
 *
 * This file is plain C with no Python or torch API: the package's build compiles it (setuptools) and
 * fiddlerc.runtime.quant loads it with ctypes, passing tensors' data pointers.
 */
#include <Python.h> /* only for the module init that makes this file an importable extension */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "_simd.h"

#define QK 32
#define PANEL 4
enum { FMT_Q8 = 0, FMT_Q4 = 1, FMT_MXFP4 = 2 }; /* fiddlerc.runtime.quant passes these codes */
static const int8_t E2M1_TIMES_2[16] = {0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12};
/* The 4-bit formats read a block's four rows (one cache line) faster than the prefetchers bring them on
 * long rows; fetching this far ahead, non-temporally, keeps the activations of a long row in the
 * first-level cache. int8's rows stream fast enough without (the hint there cost more than it gave). */
#define PREFETCH 1024

/* Index of row r's block b, in blocks: the weights start at this times the block's bytes, the scale
 * is at this index. */
static inline int64_t panel_offset(int64_t r, int64_t b, int64_t nb) {
    return ((r / PANEL) * nb + b) * PANEL + r % PANEL;
}

/* 2^(e - 127), exactly: e = 0 is the subnormal 2^-127, e = 255 reads as infinity (the format's NaN). */
static float e8m0_to_fp32(uint8_t e) {
    uint32_t bits = e ? (uint32_t)e << 23 : 0x00400000u;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* ---- activations: per block of 32, an fp32 scale and int8 values in [-127, 127] ---------------- */

static void quantize_row_portable(const float *x, int64_t cols, int8_t *q, float *d) {
    for (int64_t b = 0; b < cols / QK; b++) {
        float amax = 0.0f;
        for (int j = 0; j < QK; j++) amax = fmaxf(amax, fabsf(x[b * QK + j]));
        float s = amax / 127.0f, inv = s ? 1.0f / s : 0.0f;
        d[b] = s;
        for (int j = 0; j < QK; j++) q[b * QK + j] = (int8_t)lrintf(x[b * QK + j] * inv);
    }
}

#ifdef FC_X86
__attribute__((target("avx2,fma"))) static void quantize_row_avx2(const float *x, int64_t cols, int8_t *q,
                                                                    float *d) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    for (int64_t b = 0; b < cols / QK; b++) {
        __m256 v[4], m = _mm256_setzero_ps();
        for (int i = 0; i < 4; i++) {
            v[i] = _mm256_loadu_ps(x + b * QK + 8 * i);
            m = _mm256_max_ps(m, _mm256_andnot_ps(sign, v[i]));
        }
        __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        h = _mm_max_ps(h, _mm_movehl_ps(h, h));
        h = _mm_max_ss(h, _mm_movehdup_ps(h));
        float amax = _mm_cvtss_f32(h), s = amax / 127.0f, inv = s ? 1.0f / s : 0.0f;
        d[b] = s;
        __m256 k = _mm256_set1_ps(inv);
        __m256i i0 = _mm256_cvtps_epi32(_mm256_mul_ps(v[0], k)), i1 = _mm256_cvtps_epi32(_mm256_mul_ps(v[1], k));
        __m256i i2 = _mm256_cvtps_epi32(_mm256_mul_ps(v[2], k)), i3 = _mm256_cvtps_epi32(_mm256_mul_ps(v[3], k));
        /* packs interleave 128-bit lanes; the permute puts the 32 values back in order */
        __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
        p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256((__m256i *)(q + b * QK), p);
    }
}
#endif

/* ---- one block's integer dot products ---------------------------------------------------------- */

static int32_t dot_q8_portable(const int8_t *w, const int8_t *x) {
    int32_t s = 0;
    for (int j = 0; j < QK; j++) s += (int32_t)w[j] * x[j];
    return s;
}

static int32_t dot_q4_portable(const uint8_t *w, const int8_t *x) {
    int32_t s = 0;
    for (int j = 0; j < QK / 2; j++) {
        s += ((int32_t)(w[j] & 0x0f) - 8) * x[j];
        s += ((int32_t)(w[j] >> 4) - 8) * x[j + QK / 2];
    }
    return s;
}

static int32_t dot_mxfp4_portable(const uint8_t *w, const int8_t *x) {
    int32_t s = 0;
    for (int j = 0; j < QK / 2; j++) {
        s += (int32_t)E2M1_TIMES_2[w[j] & 0x0f] * x[j];
        s += (int32_t)E2M1_TIMES_2[w[j] >> 4] * x[j + QK / 2];
    }
    return s;
}

static void matmul_portable(int fmt, const uint8_t *w, const void *wd, int64_t r0, int64_t r1, int64_t cols,
                            const int8_t *xq, const float *xd, int64_t ntok, float *y, int64_t rows) {
    const int64_t nb = cols / QK, block_bytes = fmt == FMT_Q8 ? QK : QK / 2;
    for (int64_t r = r0; r < r1; r++) {
        for (int64_t t = 0; t < ntok; t++) {
            float acc = 0.0f;
            for (int64_t b = 0; b < nb; b++) {
                const int64_t k = panel_offset(r, b, nb);
                const int8_t *xb = xq + t * cols + b * QK;
                const uint8_t *wb = w + k * block_bytes;
                int32_t s;
                float d;
                if (fmt == FMT_MXFP4) {
                    s = dot_mxfp4_portable(wb, xb);
                    d = 0.5f * e8m0_to_fp32(((const uint8_t *)wd)[k]);
                } else {
                    s = fmt == FMT_Q4 ? dot_q4_portable(wb, xb) : dot_q8_portable((const int8_t *)wb, xb);
                    d = fc_half_to_float(((const uint16_t *)wd)[k]);
                }
                acc += d * xd[t * nb + b] * (float)s;
            }
            y[t * rows + r] = acc;
        }
    }
}

#ifdef FC_X86
/* 32 signed bytes times 32 signed bytes, summed in pairs into eight int32 lanes. maddubs takes one
 * operand unsigned: |w| and x with w's sign moved onto it give the same products, and no pair sum of
 * two 127 * 127 products overflows its int16. */
__attribute__((target("avx2,fma"))) static inline __m256 dot_block(__m256i w, __m256i x) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i p = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w));
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(p, ones));
}

/* The 4-bit formats without the sign trick: each weight is read as an unsigned u = v + OFFSET (int4's
 * stored nibble is q + 8; mxfp4's code goes through a table of its values times two, plus 12), so
 * maddubs takes it as it is, and sum(v x) = sum(u x) - OFFSET sum(x), whose second term depends on the
 * activations only: `xc` holds OFFSET sum(x) per block, computed once a call, and each row takes it off
 * once per block, times its scale, in `corr`. */
static const int8_t E2M1_TIMES_2_PLUS_12[16] = {12, 13, 14, 15, 16, 18, 20, 24, 12, 11, 10, 9, 8, 6, 4, 0};

/* Eight blocks' E8M0 exponents as 2^(e - 127) each (e8m0_to_fp32, eight at once). */
__attribute__((target("avx2,fma"))) static inline __m256 load_e8m0(const uint8_t *e) {
    __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)e));
    __m256i bits = _mm256_slli_epi32(v, 23);
    __m256i zero = _mm256_cmpeq_epi32(v, _mm256_setzero_si256());
    return _mm256_castsi256_ps(_mm256_blendv_epi8(bits, _mm256_set1_epi32(0x00400000), zero));
}

static void offset_times_x(const int8_t *xq, int64_t n, int32_t offset, int32_t *xc) {
    for (int64_t b = 0; b < n; b++) {
        int32_t s = 0;
        for (int j = 0; j < QK; j++) s += xq[b * QK + j];
        xc[b] = offset * s;
    }
}

/* One panel (four rows) at a time: each activation block is loaded once for the four, four independent
 * accumulators keep the multiply-add units busy while the next weights stream in, and the two scales of
 * two blocks x four rows are multiplied in one vector op and read back by broadcast loads. */
__attribute__((target("avx2,fma,f16c"))) static void matmul_q8_avx2(const uint8_t *w, const uint16_t *wd, int64_t r0,
                                                                     int64_t r1, int64_t cols, const int8_t *xq,
                                                                     const float *xd, int64_t ntok, float *y,
                                                                     int64_t rows) {
    const int64_t nb = cols / QK;
    float sc[2 * PANEL] __attribute__((aligned(32)));
    for (int64_t r = r0; r < r1; r += PANEL) {
        const uint8_t *wp = w + panel_offset(r, 0, nb) * QK;
        const uint16_t *dp = wd + panel_offset(r, 0, nb);
        for (int64_t t = 0; t < ntok; t++) {
            __m256 acc[PANEL] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
            const int8_t *xt = xq + t * cols;
            const float *xdt = xd + t * nb;
            for (int64_t b2 = 0; b2 < nb; b2 += 2) {
                __m256 xs = _mm256_set_m128(_mm_set1_ps(xdt[b2 + 1]), _mm_set1_ps(xdt[b2]));
                __m128i h = _mm_loadu_si128((const __m128i *)(dp + b2 * PANEL));
                _mm256_store_ps(sc, _mm256_mul_ps(_mm256_cvtph_ps(h), xs));
                for (int j = 0; j < 2; j++) {
                    const int64_t b = b2 + j;
                    __m256i x = _mm256_loadu_si256((const __m256i *)(xt + b * QK));
                    const uint8_t *wb = wp + b * PANEL * QK;
                    for (int i = 0; i < PANEL; i++) {
                        __m256 dot = dot_block(_mm256_loadu_si256((const __m256i *)(wb + i * QK)), x);
                        acc[i] = _mm256_fmadd_ps(_mm256_broadcast_ss(&sc[j * PANEL + i]), dot, acc[i]);
                    }
                }
            }
            for (int i = 0; i < PANEL; i++) y[t * rows + r + i] = fc_hsum8(acc[i]);
        }
    }
}

/* The 4-bit formats, a panel at a time, two rows per 32-byte load: the low nibbles of two rows' blocks
 * are their elements 0-15, the high nibbles 16-31, so with the block's activations [x0-15 | x0-15] and
 * [x16-31 | x16-31] two maddubs and one madd give row i's partial sums in four lanes and row i + 1's in
 * the other four. That halves the instructions per weight of a row-at-a-time loop, which here is what
 * kept the 4-bit formats below the memory's speed (they read half the bytes of int8 per weight). */
__attribute__((target("avx2,fma,f16c"))) static void matmul_nibbles_avx2(int fp4, const uint8_t *w, const void *wd,
                                                                          int64_t r0, int64_t r1, int64_t cols,
                                                                          const int8_t *xq, const float *xd,
                                                                          const int32_t *xc, int64_t ntok,
                                                                          float *y, int64_t rows) {
    const int64_t nb = cols / QK;
    const __m256i ones = _mm256_set1_epi16(1), low = _mm256_set1_epi8(0x0f);
    const __m256i lut = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)E2M1_TIMES_2_PLUS_12));
    const __m256i pair0 = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1), pair1 = _mm256_setr_epi32(2, 2, 2, 2, 3, 3, 3, 3);
    const __m256 half = _mm256_set1_ps(fp4 ? 0.5f : 1.0f); /* the table holds E2M1 values times two */
    for (int64_t r = r0; r < r1; r += PANEL) {
        const uint8_t *wp = w + panel_offset(r, 0, nb) * (QK / 2);
        const int64_t dp = panel_offset(r, 0, nb);
        for (int64_t t = 0; t < ntok; t++) {
            __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
            __m128 corr = _mm_setzero_ps();
            const int8_t *xt = xq + t * cols;
            const float *xdt = xd + t * nb;
            const int32_t *xct = xc + t * nb;
            for (int64_t b2 = 0; b2 < nb; b2 += 2) {
                __m256 xs = _mm256_mul_ps(_mm256_set_m128(_mm_set1_ps(xdt[b2 + 1]), _mm_set1_ps(xdt[b2])), half);
                __m256 ws = fp4 ? load_e8m0((const uint8_t *)wd + dp + b2 * PANEL)
                                : _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)wd + dp + b2 * PANEL)));
                __m256 sc = _mm256_mul_ps(ws, xs); /* block b2's four rows, then block b2 + 1's */
                for (int j = 0; j < 2; j++) {
                    const int64_t b = b2 + j;
                    __m128i xb0 = _mm_loadu_si128((const __m128i *)(xt + b * QK));
                    __m128i xb1 = _mm_loadu_si128((const __m128i *)(xt + b * QK + 16));
                    __m256i xlo = _mm256_broadcastsi128_si256(xb0), xhi = _mm256_broadcastsi128_si256(xb1);
                    const uint8_t *wb = wp + b * PANEL * (QK / 2);
                    _mm_prefetch((const char *)(wb + PREFETCH), _MM_HINT_NTA); /* one line a block */
                    __m256 s4 = j ? _mm256_permute2f128_ps(sc, sc, 0x11) : sc; /* this block's rows in lanes 0-3 */
                    __m256i v0 = _mm256_loadu_si256((const __m256i *)wb), v1 = _mm256_loadu_si256((const __m256i *)(wb + 32));
                    __m256i lo0 = _mm256_and_si256(v0, low), hi0 = _mm256_and_si256(_mm256_srli_epi16(v0, 4), low);
                    __m256i lo1 = _mm256_and_si256(v1, low), hi1 = _mm256_and_si256(_mm256_srli_epi16(v1, 4), low);
                    if (fp4) {
                        lo0 = _mm256_shuffle_epi8(lut, lo0), hi0 = _mm256_shuffle_epi8(lut, hi0);
                        lo1 = _mm256_shuffle_epi8(lut, lo1), hi1 = _mm256_shuffle_epi8(lut, hi1);
                    }
                    __m256i p0 = _mm256_add_epi16(_mm256_maddubs_epi16(lo0, xlo), _mm256_maddubs_epi16(hi0, xhi));
                    __m256i p1 = _mm256_add_epi16(_mm256_maddubs_epi16(lo1, xlo), _mm256_maddubs_epi16(hi1, xhi));
                    __m256 d0 = _mm256_cvtepi32_ps(_mm256_madd_epi16(p0, ones));
                    __m256 d1 = _mm256_cvtepi32_ps(_mm256_madd_epi16(p1, ones));
                    acc0 = _mm256_fmadd_ps(_mm256_permutevar8x32_ps(s4, pair0), d0, acc0);
                    acc1 = _mm256_fmadd_ps(_mm256_permutevar8x32_ps(s4, pair1), d1, acc1);
                    corr = _mm_fmadd_ps(_mm256_castps256_ps128(s4), _mm_set1_ps((float)xct[b]), corr);
                }
            }
            float c[4], h0[8], h1[8];
            _mm_storeu_ps(c, corr);
            _mm256_storeu_ps(h0, acc0);
            _mm256_storeu_ps(h1, acc1);
            y[t * rows + r + 0] = (h0[0] + h0[1]) + (h0[2] + h0[3]) - c[0];
            y[t * rows + r + 1] = (h0[4] + h0[5]) + (h0[6] + h0[7]) - c[1];
            y[t * rows + r + 2] = (h1[0] + h1[1]) + (h1[2] + h1[3]) - c[2];
            y[t * rows + r + 3] = (h1[4] + h1[5]) + (h1[6] + h1[7]) - c[3];
        }
    }
}
#endif

/* ---- the exported functions (called through ctypes) -------------------------------------------- */

int fc_has_avx2(void) {
#ifdef FC_X86
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#else
    return 0;
#endif
}

/* x [ntok][cols] fp32 -> q [ntok][cols] int8 and d [ntok][cols / 32] fp32. */
static void quantize_activations(const float *x, int64_t ntok, int64_t cols, int8_t *q, float *d, int simd) {
    for (int64_t t = 0; t < ntok; t++) {
#ifdef FC_X86
        if (simd) {
            quantize_row_avx2(x + t * cols, cols, q + t * cols, d + t * (cols / QK));
            continue;
        }
#endif
        quantize_row_portable(x + t * cols, cols, q + t * cols, d + t * (cols / QK));
    }
}

void fc_quantize_activations(const float *x, int64_t ntok, int64_t cols, int8_t *q, float *d, int simd) {
    quantize_activations(x, ntok, cols, q, d, simd);
}

/* y [ntok][rows] fp32 = W [rows][cols] (format `fmt`, in panels, scales wd likewise) times the quantized
 * activations xq/xd of `ntok` tokens (and, for the 4-bit formats, their offset sums xc; NULL: portable),
 * panels split over `threads` OpenMP threads. */
static void product(int fmt, const uint8_t *w, const void *wd, int64_t rows, int64_t cols, const int8_t *xq,
                    const float *xd, const int32_t *xc, int64_t ntok, float *y, int threads, int simd) {
    const int64_t tile = 16, tiles = (rows + tile - 1) / tile;
    const int64_t bytes = fmt == FMT_Q8 ? rows * cols : rows * cols / 2;
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1 && bytes >= FC_PARALLEL_BYTES)
    for (int64_t i = 0; i < tiles; i++) {
        int64_t r0 = i * tile, r1 = r0 + tile < rows ? r0 + tile : rows;
#ifdef FC_X86
        if (simd) {
            if (fmt != FMT_Q8) matmul_nibbles_avx2(fmt == FMT_MXFP4, w, wd, r0, r1, cols, xq, xd, xc, ntok, y, rows);
            else matmul_q8_avx2(w, wd, r0, r1, cols, xq, xd, ntok, y, rows);
            continue;
        }
#endif
        matmul_portable(fmt, w, wd, r0, r1, cols, xq, xd, ntok, y, rows);
    }
}

/* The offset sums the 4-bit AVX2 paths take (`offset_times_x`), in a buffer the caller frees; NULL where
 * none are needed, and where the buffer cannot be had (then *simd is cleared: the portable path). */
static int32_t *offset_sums(int fmt, const int8_t *xq, int64_t ntok, int64_t cols, int *simd) {
    if (!*simd || fmt == FMT_Q8) return NULL;
    int32_t *xc = malloc((size_t)(ntok * (cols / QK)) * sizeof(int32_t));
    if (xc == NULL) *simd = 0;
    else offset_times_x(xq, ntok * (cols / QK), fmt == FMT_Q4 ? 8 : 12, xc);
    return xc;
}

void fc_matmul(int fmt, const uint8_t *w, const void *wd, int64_t rows, int64_t cols, const int8_t *xq,
               const float *xd, int64_t ntok, float *y, int threads, int simd) {
#ifndef FC_X86
    simd = 0;
#endif
    int32_t *xc = offset_sums(fmt, xq, ntok, cols, &simd);
    product(fmt, w, wd, rows, cols, xq, xd, xc, ntok, y, threads, simd);
    free(xc);
}

/* One token through `n` SwiGLU experts quantized in `fmt`, summed in expert order: y [hidden] = sum of
 * route[i] * down_e(silu(gate_e x) * up_e x) over e = picks[i], all in fp32, with x quantized once for
 * all gates and ups and each expert's hidden activations once for its down. One call instead of some twenty
 * small ones per expert: at one token of a fine-grained MoE those cost as much as the products. `table`
 * and `scales` hold every expert's gate, up and down (3 per expert, NULL where the group does not hold
 * it), `counts` (NULL: none) counts each pick. Returns 0; -1 for a pick the table does not hold; -2
 * without its buffers. */
int fc_experts_silu(int fmt, int n, const int64_t *picks, const float *route, const void *const *table,
                    const void *const *scales, int64_t experts, int64_t hidden, int64_t inter, const float *x, float *y,
                    int64_t *counts, int threads, int simd) {
#ifndef FC_X86
    simd = 0;
#endif
    int64_t order[FC_MAX_PICKS];
    float weight[FC_MAX_PICKS];
    if (fc_expert_order(n, picks, route, table, experts, order, weight, counts) != 0) return -1;
    const int64_t nbh = hidden / QK, nbi = inter / QK;
    int8_t *xq = malloc((size_t)hidden), *hq = malloc((size_t)inter);
    float *xd = malloc((size_t)nbh * sizeof(float)), *hd = malloc((size_t)nbi * sizeof(float));
    float *g = malloc((size_t)(2 * inter + hidden) * sizeof(float));
    int ok = xq && hq && xd && hd && g;
    if (ok) {
        float *u = g + inter, *o = u + inter;
        memset(y, 0, (size_t)hidden * sizeof(float));
        quantize_activations(x, 1, hidden, xq, xd, simd);
        int simd_x = simd, simd_h = simd;
        int32_t *xc = offset_sums(fmt, xq, 1, hidden, &simd_x);
        for (int i = 0; i < n; i++) {
            const uint8_t *const *w = (const uint8_t *const *)table + 3 * order[i];
            const void *const *d = scales + 3 * order[i];
            product(fmt, w[0], d[0], inter, hidden, xq, xd, xc, 1, g, threads, simd_x);
            product(fmt, w[1], d[1], inter, hidden, xq, xd, xc, 1, u, threads, simd_x);
            for (int64_t j = 0; j < inter; j++) g[j] = g[j] / (1.0f + expf(-g[j])) * u[j];
            quantize_activations(g, 1, inter, hq, hd, simd);
            simd_h = simd;
            int32_t *hc = offset_sums(fmt, hq, 1, inter, &simd_h);
            product(fmt, w[2], d[2], hidden, inter, hq, hd, hc, 1, o, threads, simd_h);
            free(hc);
            for (int64_t j = 0; j < hidden; j++) y[j] += weight[i] * o[j];
        }
        free(xc);
    }
    free(xq), free(hq), free(xd), free(hd), free(g);
    return ok ? 0 : -2;
}

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_quant",
    .m_doc = "fiddlerc's quantized CPU kernels, called through ctypes (see fiddlerc.runtime.quant)",
    .m_size = -1,
};

PyMODINIT_FUNC PyInit__quant(void) { return PyModule_Create(&module); }
