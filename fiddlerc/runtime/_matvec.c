/* Products of a few tokens with float weights as the checkpoint stores them: y = W x, W row-major
 * [rows][cols] in bf16, fp16 or fp32 (memory-mapped, never repacked), x and y fp32.
 *
 * At one token each weight is read once, so the product is bound by memory bandwidth if the cores keep
 * up with it. MKL's matrix-vector product does not on this kind of machine: in bf16 it converts through
 * a buffer, in fp32 it runs on one thread. Here each weight is widened to fp32 in registers (a bf16 is
 * the top half of an fp32; fp16 converts with F16C) and multiplied in as it streams in, four rows at a
 * time so each activation load serves four rows, two accumulators a row so the multiply-adds overlap.
 * Rows are split over OpenMP threads; the AVX2 path is chosen at run time, a portable one elsewhere.
 * From BCAST_TOKENS tokens on, that loop (two loads per multiply-add, one of them from activations that
 * no longer fit L1 next to the weight stream) gives way to one with the tokens in the vector's lanes:
 * rows_bcast below.
 * Built into the same extension as _quant.c (fiddlerc.runtime.quant loads it; fiddlerc.runtime.matvec
 * calls it).
 */
#include <math.h>
#include <stdlib.h>
#include "_simd.h"

enum { W_F32 = 0, W_BF16 = 1, W_F16 = 2 }; /* fiddlerc.runtime.matvec passes these codes */
#define ROWS 4

static float weight_at(int kind, const void *w, int64_t i) {
    if (kind == W_F32) return ((const float *)w)[i];
    uint16_t h = ((const uint16_t *)w)[i];
    if (kind == W_F16) return fc_half_to_float(h);
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static void rows_portable(int kind, const void *w, int64_t r0, int64_t r1, int64_t cols, const float *x,
                          int64_t ntok, float *y, int64_t rows) {
    for (int64_t r = r0; r < r1; r++) {
        for (int64_t t = 0; t < ntok; t++) {
            float acc = 0.0f;
            for (int64_t c = 0; c < cols; c++) acc += weight_at(kind, w, r * cols + c) * x[t * cols + c];
            y[t * rows + r] = acc;
        }
    }
}

#ifdef FC_X86
__attribute__((target("avx2,fma,f16c"), always_inline)) static inline __m256 load8(const int kind, const void *w,
                                                                                 int64_t i) {
    if (kind == W_F32) return _mm256_loadu_ps((const float *)w + i);
    __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)w + i));
    if (kind == W_F16) return _mm256_cvtph_ps(h);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

/* Rows r0..r1 for one weight kind; `kind` is a constant in each caller below, so the compiler emits one
 * loop per kind with no branch inside. Long rows go four at a time, so each activation load serves four
 * and four streams are in flight (a hardware prefetcher stops at each 4 KiB page: one stream alone
 * stalls at every boundary). Rows shorter than LONG_ROW bytes go one at a time: consecutive rows are
 * adjacent, so that is one sequential stream, where four short rows would be four streams restarting
 * at every panel (measured here: 2048 x 768 bf16 at 13 GB/s four at a time, 25 GB/s one at a time;
 * 4096 x 14336 bf16 at 26 and 17). */
#define LONG_ROW 8192
__attribute__((target("avx2,fma,f16c"), always_inline)) static inline void rows_avx2(
    const int kind, const void *w, int64_t r0, int64_t r1, int64_t cols, const float *x, int64_t ntok, float *y,
    int64_t rows) {
    const int64_t item = kind == W_F32 ? 4 : 2;
    int64_t r = r0;
    if (cols * item >= LONG_ROW) {
        const int64_t body = cols - cols % 16;
        for (; r + ROWS <= r1; r += ROWS) {
            for (int64_t t = 0; t < ntok; t++) {
                const float *xt = x + t * cols;
                __m256 a[ROWS][2];
                for (int i = 0; i < ROWS; i++) a[i][0] = a[i][1] = _mm256_setzero_ps();
                for (int64_t c = 0; c < body; c += 16) {
                    __m256 x0 = _mm256_loadu_ps(xt + c), x1 = _mm256_loadu_ps(xt + c + 8);
                    for (int i = 0; i < ROWS; i++) {
                        a[i][0] = _mm256_fmadd_ps(load8(kind, w, (r + i) * cols + c), x0, a[i][0]);
                        a[i][1] = _mm256_fmadd_ps(load8(kind, w, (r + i) * cols + c + 8), x1, a[i][1]);
                    }
                }
                for (int i = 0; i < ROWS; i++) {
                    float s = fc_hsum8(_mm256_add_ps(a[i][0], a[i][1]));
                    for (int64_t c = body; c < cols; c++) s += weight_at(kind, w, (r + i) * cols + c) * xt[c];
                    y[t * rows + r + i] = s;
                }
            }
        }
    }
    const int64_t body = cols - cols % 32;
    for (; r < r1; r++) {
        const void *wr = (const char *)w + r * cols * item;
        for (int64_t t = 0; t < ntok; t++) {
            const float *xt = x + t * cols;
            __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
            for (int64_t c = 0; c < body; c += 32) {
                a0 = _mm256_fmadd_ps(load8(kind, wr, c), _mm256_loadu_ps(xt + c), a0);
                a1 = _mm256_fmadd_ps(load8(kind, wr, c + 8), _mm256_loadu_ps(xt + c + 8), a1);
                a2 = _mm256_fmadd_ps(load8(kind, wr, c + 16), _mm256_loadu_ps(xt + c + 16), a2);
                a3 = _mm256_fmadd_ps(load8(kind, wr, c + 24), _mm256_loadu_ps(xt + c + 24), a3);
            }
            float s = fc_hsum8(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
            for (int64_t c = body; c < cols; c++) s += weight_at(kind, wr, c) * xt[c];
            y[t * rows + r] = s;
        }
    }
}

__attribute__((target("avx2,fma,f16c"))) static void rows_f32(const void *w, int64_t r0, int64_t r1, int64_t cols,
                                                             const float *x, int64_t ntok, float *y, int64_t rows) {
    rows_avx2(W_F32, w, r0, r1, cols, x, ntok, y, rows);
}

__attribute__((target("avx2,fma,f16c"))) static void rows_bf16(const void *w, int64_t r0, int64_t r1, int64_t cols,
                                                              const float *x, int64_t ntok, float *y, int64_t rows) {
    rows_avx2(W_BF16, w, r0, r1, cols, x, ntok, y, rows);
}

__attribute__((target("avx2,fma,f16c"))) static void rows_f16(const void *w, int64_t r0, int64_t r1, int64_t cols,
                                                             const float *x, int64_t ntok, float *y, int64_t rows) {
    rows_avx2(W_F16, w, r0, r1, cols, x, ntok, y, rows);
}
#endif

/* Products of BCAST_TOKENS tokens or more: the activations transposed, eight tokens to a vector (xt
 * [group][cols][8], a group of eight tokens, zeros past the last), and each weight broadcast into all
 * lanes and multiplied into BCAST_ROWS rows' accumulators at once, one vector of eight tokens' sums per
 * row (two, for even and odd columns, so twelve multiply-adds are in flight). Per multiply-add that is one
 * broadcast and a twelfth of an activation load, against the loop above's weight and activation load, and
 * the 32 KiB of eight tokens' activations are read once per BCAST_ROWS rows rather than once per row.
 * Reading BCAST_ROWS rows at once is that many streams from memory, which the hardware prefetchers follow
 * badly; the next block of rows, contiguous, is prefetched into L2 as one sequential stream while this one
 * computes. Measured here (2 threads, fp32 1152 x 1024 and 8160 x 1024 at 8 tokens, cycling 256 MiB of
 * weights): 27-28 GB/s, against 15 for the loop above, 23 without the prefetch and 23 with eight rows a
 * block; the loop above reads at 24-27 GB/s at four tokens, this one's cost is that of eight from five
 * on. Each row's sums run in column order. Float weights go straight from the mapped weight; 16-bit ones
 * are widened BCAST_CHUNK columns at a time into an fp32 buffer first. */
#define BCAST_TOKENS 5
#define BCAST_ROWS 6
#define BCAST_TILE 48 /* rows a thread takes at a time: whole blocks */
#define BCAST_CHUNK 64

#ifdef FC_X86
/* n columns (from xt's first) of BCAST_ROWS rows `stride` floats apart into a (even columns) and b (odd);
 * `ahead` (NULL: none) is prefetched, `ahead_bytes` of it spread evenly over the columns. */
__attribute__((target("avx2,fma"), always_inline)) static inline void bcast_cols(const float *w, int64_t stride,
                                                                               int64_t n, const float *xt,
                                                                               __m256 a[BCAST_ROWS],
                                                                               __m256 b[BCAST_ROWS],
                                                                               const char *ahead,
                                                                               int64_t ahead_bytes) {
    const int64_t pairs = n / 2, step = ahead != NULL && pairs > 0 ? (ahead_bytes << 8) / pairs : 0;
    int64_t due = 0, at = 0;
    for (int64_t c = 0; c + 2 <= n; c += 2) {
        for (due += step; due >= (64 << 8); due -= 64 << 8, at += 64) _mm_prefetch(ahead + at, _MM_HINT_T1);
        const __m256 xv = _mm256_loadu_ps(xt + c * 8), xu = _mm256_loadu_ps(xt + c * 8 + 8);
        for (int i = 0; i < BCAST_ROWS; i++) {
            a[i] = _mm256_fmadd_ps(_mm256_broadcast_ss(w + i * stride + c), xv, a[i]);
            b[i] = _mm256_fmadd_ps(_mm256_broadcast_ss(w + i * stride + c + 1), xu, b[i]);
        }
    }
    if (n % 2) {
        const __m256 xv = _mm256_loadu_ps(xt + (n - 1) * 8);
        for (int i = 0; i < BCAST_ROWS; i++) a[i] = _mm256_fmadd_ps(_mm256_broadcast_ss(w + i * stride + n - 1), xv, a[i]);
    }
}

/* Rows r0..r1 of y (of `rows`) for `groups` groups of eight tokens of xt; rows past the last multiple of
 * BCAST_ROWS go through rows_avx2 with x as given. */
__attribute__((target("avx2,fma,f16c"), always_inline)) static inline void rows_bcast(
    const int kind, const void *w, int64_t r0, int64_t r1, int64_t cols, const float *x, const float *xt,
    int64_t ntok, float *y, int64_t rows) {
    const int64_t groups = (ntok + 7) / 8, item = kind == W_F32 ? 4 : 2, block = BCAST_ROWS * cols * item;
    float wide[BCAST_ROWS * BCAST_CHUNK];
    int64_t r = r0;
    for (; r + BCAST_ROWS <= r1; r += BCAST_ROWS) {
        /* the next block, whoever's it is: a thread's tiles are contiguous (schedule(static)) */
        const char *next = r + 2 * BCAST_ROWS <= rows ? (const char *)w + (r + BCAST_ROWS) * cols * item : NULL;
        for (int64_t g = 0; g < groups; g++) {
            const float *xg = xt + g * cols * 8;
            const char *ahead = g == 0 ? next : NULL;
            __m256 a[BCAST_ROWS], b[BCAST_ROWS];
            for (int i = 0; i < BCAST_ROWS; i++) a[i] = b[i] = _mm256_setzero_ps();
            if (kind == W_F32) {
                bcast_cols((const float *)w + r * cols, cols, cols, xg, a, b, ahead, block);
            } else {
                for (int64_t c0 = 0; c0 < cols; c0 += BCAST_CHUNK) {
                    const int64_t n = cols - c0 < BCAST_CHUNK ? cols - c0 : BCAST_CHUNK, body = n - n % 8;
                    for (int i = 0; i < BCAST_ROWS; i++) {
                        const int64_t at = (r + i) * cols + c0;
                        for (int64_t c = 0; c < body; c += 8) _mm256_storeu_ps(wide + i * BCAST_CHUNK + c, load8(kind, w, at + c));
                        for (int64_t c = body; c < n; c++) wide[i * BCAST_CHUNK + c] = weight_at(kind, w, at + c);
                    }
                    const char *part = ahead == NULL ? NULL : ahead + c0 * BCAST_ROWS * item;
                    bcast_cols(wide, BCAST_CHUNK, n, xg + c0 * 8, a, b, part, n * BCAST_ROWS * item);
                }
            }
            float sums[BCAST_ROWS][8];
            for (int i = 0; i < BCAST_ROWS; i++) _mm256_storeu_ps(sums[i], _mm256_add_ps(a[i], b[i]));
            const int64_t t1 = ntok - g * 8 < 8 ? ntok - g * 8 : 8;
            for (int i = 0; i < BCAST_ROWS; i++)
                for (int64_t t = 0; t < t1; t++) y[(g * 8 + t) * rows + r + i] = sums[i][t];
        }
    }
    if (r < r1) rows_avx2(kind, w, r, r1, cols, x, ntok, y, rows);
}

__attribute__((target("avx2,fma,f16c"))) static void bcast_f32(const void *w, int64_t r0, int64_t r1, int64_t cols,
                                                              const float *x, const float *xt, int64_t ntok,
                                                              float *y, int64_t rows) {
    rows_bcast(W_F32, w, r0, r1, cols, x, xt, ntok, y, rows);
}

__attribute__((target("avx2,fma,f16c"))) static void bcast_bf16(const void *w, int64_t r0, int64_t r1, int64_t cols,
                                                               const float *x, const float *xt, int64_t ntok,
                                                               float *y, int64_t rows) {
    rows_bcast(W_BF16, w, r0, r1, cols, x, xt, ntok, y, rows);
}

__attribute__((target("avx2,fma,f16c"))) static void bcast_f16(const void *w, int64_t r0, int64_t r1, int64_t cols,
                                                              const float *x, const float *xt, int64_t ntok,
                                                              float *y, int64_t rows) {
    rows_bcast(W_F16, w, r0, r1, cols, x, xt, ntok, y, rows);
}
#endif

/* x [ntok][cols] as rows_bcast reads it, xt [group][cols][8]; NULL without memory. */
static float *transpose_tokens(const float *x, int64_t ntok, int64_t cols) {
    const int64_t groups = (ntok + 7) / 8;
    float *xt = calloc((size_t)(groups * cols * 8), sizeof(float));
    if (xt == NULL) return NULL;
    for (int64_t t = 0; t < ntok; t++)
        for (int64_t c = 0; c < cols; c++) xt[((t / 8) * cols + c) * 8 + t % 8] = x[t * cols + c];
    return xt;
}

/* y [ntok][rows] fp32 = W [rows][cols] (kind: W_F32, W_BF16, W_F16) times x [ntok][cols] fp32, rows
 * split over `threads` OpenMP threads. */
static void float_product(int kind, const void *w, int64_t rows, int64_t cols, const float *x, int64_t ntok,
                          float *y, int threads, int simd) {
    float *xt = simd && ntok >= BCAST_TOKENS ? transpose_tokens(x, ntok, cols) : NULL;
    const int64_t tile = xt != NULL ? BCAST_TILE : 16, tiles = (rows + tile - 1) / tile;
    const int64_t bytes = rows * cols * (kind == W_F32 ? 4 : 2);
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1 && bytes >= FC_PARALLEL_BYTES)
    for (int64_t i = 0; i < tiles; i++) {
        int64_t r0 = i * tile, r1 = r0 + tile < rows ? r0 + tile : rows;
#ifdef FC_X86
        if (simd && xt != NULL) {
            if (kind == W_F32) bcast_f32(w, r0, r1, cols, x, xt, ntok, y, rows);
            else if (kind == W_BF16) bcast_bf16(w, r0, r1, cols, x, xt, ntok, y, rows);
            else bcast_f16(w, r0, r1, cols, x, xt, ntok, y, rows);
            continue;
        }
        if (simd) {
            if (kind == W_F32) rows_f32(w, r0, r1, cols, x, ntok, y, rows);
            else if (kind == W_BF16) rows_bf16(w, r0, r1, cols, x, ntok, y, rows);
            else rows_f16(w, r0, r1, cols, x, ntok, y, rows);
            continue;
        }
#endif
        rows_portable(kind, w, r0, r1, cols, x, ntok, y, rows);
    }
    free(xt);
}

void fc_matvec(int kind, const void *w, int64_t rows, int64_t cols, const float *x, int64_t ntok, float *y,
               int threads, int simd) {
    float_product(kind, w, rows, cols, x, ntok, y, threads, simd);
}

/* One token through `n` SwiGLU experts with float weights of one kind, summed in expert order, as
 * _quant.c's fc_experts_silu does for quantized ones: y [hidden] = sum of route[i] * down_e(silu(gate_e x)
 * * up_e x) over e = picks[i]; `table` holds every expert's gate, up and down (3 per expert, NULL where
 * the group does not hold it), `counts` (NULL: none) counts each pick. Returns 0; -1 for a pick the
 * table does not hold; -2 without its buffer. */
int fc_experts_silu_float(int kind, int n, const int64_t *picks, const float *route, const void *const *table,
                          int64_t experts, int64_t hidden, int64_t inter, const float *x, float *y, int64_t *counts,
                          int threads, int simd) {
#ifndef FC_X86
    simd = 0;
#endif
    int64_t order[FC_MAX_PICKS];
    float weight[FC_MAX_PICKS];
    if (fc_expert_order(n, picks, route, table, experts, order, weight, counts) != 0) return -1;
    float *g = malloc((size_t)(2 * inter + hidden) * sizeof(float));
    if (g == NULL) return -2;
    float *u = g + inter, *o = u + inter;
    memset(y, 0, (size_t)hidden * sizeof(float));
    for (int i = 0; i < n; i++) {
        const void *const *w = table + 3 * order[i];
        float_product(kind, w[0], inter, hidden, x, 1, g, threads, simd);
        float_product(kind, w[1], inter, hidden, x, 1, u, threads, simd);
        for (int64_t j = 0; j < inter; j++) g[j] = g[j] / (1.0f + expf(-g[j])) * u[j];
        float_product(kind, w[2], hidden, inter, g, 1, o, threads, simd);
        for (int64_t j = 0; j < hidden; j++) y[j] += weight[i] * o[j];
    }
    free(g);
    return 0;
}

/* `ntok` tokens through the SwiGLU experts their picks name (picks and route [ntok][k], as the router gives
 * them), each expert's weights read once for all of its tokens: expert by expert in ascending order, its
 * tokens gathered, the three products over them at once (float_product streams a weight once whatever the
 * token count), and each token's output added in with its routing weight, so that a token's sum runs in
 * expert order as at one token. y [ntok][hidden] fp32; `counts` (NULL: none) counts each pick. Returns 0;
 * -1 for a pick the table does not hold; -2 without its buffers. The server's batched decode steps. */
int fc_experts_silu_float_tokens(int kind, int64_t ntok, int k, const int64_t *picks, const float *route,
                                 const void *const *table, int64_t experts, int64_t hidden, int64_t inter,
                                 const float *x, float *y, int64_t *counts, int threads, int simd) {
#ifndef FC_X86
    simd = 0;
#endif
    const int64_t n = ntok * k;
    for (int64_t i = 0; i < n; i++)
        if (picks[i] < 0 || picks[i] >= experts || table[3 * picks[i]] == NULL) return -1;
    int64_t *rows = malloc((size_t)n * sizeof(int64_t));
    float *xs = malloc((size_t)n * (size_t)(2 * hidden + 2 * inter) * sizeof(float));
    if (rows == NULL || xs == NULL) {
        free(rows);
        free(xs);
        return -2;
    }
    float *g = xs + n * hidden, *u = g + n * inter, *o = u + n * inter;
    memset(y, 0, (size_t)(ntok * hidden) * sizeof(float));
    for (int64_t e = 0; e < experts; e++) {
        int64_t m = 0;
        for (int64_t i = 0; i < n; i++)
            if (picks[i] == e) rows[m++] = i;
        if (m == 0) continue;
        if (counts != NULL) counts[e] += m;
        for (int64_t j = 0; j < m; j++) memcpy(xs + j * hidden, x + (rows[j] / k) * hidden, (size_t)hidden * sizeof(float));
        const void *const *w = table + 3 * e;
        float_product(kind, w[0], inter, hidden, xs, m, g, threads, simd);
        float_product(kind, w[1], inter, hidden, xs, m, u, threads, simd);
        for (int64_t j = 0; j < m * inter; j++) g[j] = g[j] / (1.0f + expf(-g[j])) * u[j];
        float_product(kind, w[2], hidden, inter, g, m, o, threads, simd);
        for (int64_t j = 0; j < m; j++) {
            float *yt = y + (rows[j] / k) * hidden;
            const float r = route[rows[j]], *oj = o + j * hidden;
            for (int64_t c = 0; c < hidden; c++) yt[c] += r * oj[c];
        }
    }
    free(rows);
    free(xs);
    return 0;
}

/* Hugging Face's RMSNorm of `rows` vectors of `n` (x, weight and y fp32 or bf16, all one kind):
 * y = weight * (x / sqrt(mean(x^2) + eps)), normalised in fp32 and rounded to the kind before the weight
 * multiplies it, then rounded again, as the module computes it; only the order of the sum differs.
 * `weight` holds `wrows` rows of n, row r of x taking row r % wrows (a weight per head: Qwen3's norms of
 * its queries' and keys' heads). */
static uint16_t to_bf16(float f) {
    uint32_t bits;
    memcpy(&bits, &f, 4);
    if ((bits & 0x7fffffff) > 0x7f800000) return (uint16_t)((bits >> 16) | 0x40); /* NaN stays NaN */
    bits += 0x7fff + ((bits >> 16) & 1);                                           /* round to nearest even */
    return (uint16_t)(bits >> 16);
}

void fc_rms_norm(int kind, const void *x, const void *weight, int64_t rows, int64_t n, int64_t wrows, float eps,
                 void *y) {
    for (int64_t r = 0; r < rows; r++) {
        const int64_t w0 = (r % wrows) * n;
        double ss = 0.0;
        for (int64_t i = 0; i < n; i++) {
            float v = weight_at(kind, x, r * n + i);
            ss += (double)(v * v);
        }
        const float scale = 1.0f / sqrtf((float)(ss / (double)n) + eps);
        for (int64_t i = 0; i < n; i++) {
            float h = weight_at(kind, x, r * n + i) * scale;
            if (kind == W_F32) {
                ((float *)y)[r * n + i] = weight_at(kind, weight, w0 + i) * h;
            } else { /* bf16: h rounded as .to(bf16) rounds it, then the bf16 product rounded again */
                uint32_t bits = (uint32_t)to_bf16(h) << 16;
                memcpy(&h, &bits, 4);
                ((uint16_t *)y)[r * n + i] = to_bf16(weight_at(kind, weight, w0 + i) * h);
            }
        }
    }
}

/* Tokens' routing by a softmax-then-top-k router (fiddlerc.runtime.routing), each token on its own: logits =
 * W x (W [experts][hidden] of `kind`, rounded to the kind as F.linear returns them), probabilities
 * softmax(logits) in fp32, the `k` most probable (picks, weights [ntok][k]; the largest first, ties to the
 * lower expert), renormalised to sum to one where `normalise`. x [ntok][hidden]. Returns 0; -1 for k
 * outside [1, experts]; -2 without its buffer. */
int fc_route_softmax_topk(int kind, const void *w, int64_t experts, int64_t hidden, const float *x, int64_t ntok,
                          int k, int normalise, int64_t *picks, float *weights, int simd) {
#ifndef FC_X86
    simd = 0;
#endif
    if (k < 1 || k > experts) return -1;
    float *p = malloc((size_t)experts * sizeof(float));
    if (p == NULL) return -2;
    for (int64_t t = 0; t < ntok; t++) {
        int64_t *tp = picks + t * k;
        float *tw = weights + t * k;
        float_product(kind, w, experts, hidden, x + t * hidden, 1, p, 1, simd);
        float top = -INFINITY, total = 0.0f;
        for (int64_t e = 0; e < experts; e++) {
            if (kind == W_BF16) {
                uint32_t bits = (uint32_t)to_bf16(p[e]) << 16;
                memcpy(&p[e], &bits, 4);
            }
            if (p[e] > top) top = p[e];
        }
        for (int64_t e = 0; e < experts; e++) total += p[e] = expf(p[e] - top);
        float kept = 0.0f;
        for (int i = 0; i < k; i++) {
            int64_t best = -1;
            for (int64_t e = 0; e < experts; e++)
                if (p[e] >= 0.0f && (best < 0 || p[e] > p[best])) best = e;
            tp[i] = best;
            tw[i] = p[best] / total;
            kept += tw[i];
            p[best] = -1.0f; /* taken */
        }
        if (normalise)
            for (int i = 0; i < k; i++) tw[i] /= kept;
    }
    free(p);
    return 0;
}
