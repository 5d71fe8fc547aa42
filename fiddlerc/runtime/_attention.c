/* One new token's attention over a static KV cache, in one call: what the generated attention of module.py
 * otherwise runs as some twenty small torch ops per layer (views, the rotary, the cache write, SDPA), each
 * costing about its dispatch at one token. fiddlerc.runtime.attention.attend_one calls it on a CPU load
 * under kernels auto/native; the fused QKV and output projections stay products of their own.
 *
 * From the fused projection's output qkv = [q heads | k heads | v heads] x head_dim (fp32), for one
 * sequence at position `pos`:
 *   1. where `head_norm` is given (Qwen3), an RMSNorm over each query and key head, weight row per head;
 *   2. the rotary, x * cos + rotate_half(x) * sin over the whole head (the form the compiler checked);
 *   3. the key and value written into the cache rows at `pos` (keys, values [kv heads][max_len][head_dim],
 *      fp32 or bf16, the cache's own layout);
 *   4. out = softmax(q . K^T * scale) V over positions 0..pos, query head h reading KV head
 *      h / (heads / kv_heads) (grouped-query attention).
 * All arithmetic is fp32 (a bf16 cache is widened as it is read and rounded once as it is written), so it
 * equals the reference within the dtype's rounding. Returns 0, or -1 without its buffer.
 */
#include <math.h>
#include <stdlib.h>
#include "_simd.h"

enum { C_F32 = 0, C_BF16 = 1 }; /* fiddlerc.runtime.attention passes these codes (as matvec's W_ codes) */

static float read_at(int kind, const void *p, int64_t i) {
    if (kind == C_F32) return ((const float *)p)[i];
    uint32_t bits = (uint32_t)((const uint16_t *)p)[i] << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static void write_at(int kind, void *p, int64_t i, float f) {
    if (kind == C_F32) {
        ((float *)p)[i] = f;
        return;
    }
    uint32_t bits;
    memcpy(&bits, &f, 4);
    if ((bits & 0x7fffffff) > 0x7f800000) bits |= 0x00400000; /* NaN stays NaN */
    else bits += 0x7fff + ((bits >> 16) & 1);                 /* round to nearest even */
    ((uint16_t *)p)[i] = (uint16_t)(bits >> 16);
}

/* dot(q, row) over d values, row of `kind` */
static float dot_portable(int kind, const float *q, const void *row, int64_t d) {
    float s = 0.0f;
    for (int64_t i = 0; i < d; i++) s += q[i] * read_at(kind, row, i);
    return s;
}

#ifdef FC_X86
/* eight values of a row of `kind` from index i, widened to fp32 (a bf16 is the top half of an fp32) */
__attribute__((target("avx2,fma"), always_inline)) static inline __m256 load8(int kind, const void *row, int64_t i) {
    if (kind == C_F32) return _mm256_loadu_ps((const float *)row + i);
    __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)row + i));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

__attribute__((target("avx2,fma"))) static float dot_avx2(int kind, const float *q, const void *row, int64_t d) {
    __m256 a = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= d; i += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), load8(kind, row, i), a);
    float s = fc_hsum8(a);
    for (; i < d; i++) s += q[i] * read_at(kind, row, i);
    return s;
}

/* o [d] += w * row (row of `kind`) */
__attribute__((target("avx2,fma"))) static void axpy_avx2(int kind, float *o, float w, const void *row, int64_t d) {
    const __m256 wv = _mm256_set1_ps(w);
    int64_t i = 0;
    for (; i + 8 <= d; i += 8) _mm256_storeu_ps(o + i, _mm256_fmadd_ps(wv, load8(kind, row, i), _mm256_loadu_ps(o + i)));
    for (; i < d; i++) o[i] += w * read_at(kind, row, i);
}
#endif

static void axpy_portable(int kind, float *o, float w, const void *row, int64_t d) {
    for (int64_t i = 0; i < d; i++) o[i] += w * read_at(kind, row, i);
}

/* x [d] normalised (weight row w of `kind`, eps) and rotated in place */
static void norm_and_rotate(int kind, float *x, const void *w, float eps, const float *cos, const float *sin,
                            int64_t d) {
    if (w != NULL) {
        float ss = 0.0f;
        for (int64_t i = 0; i < d; i++) ss += x[i] * x[i];
        const float scale = 1.0f / sqrtf(ss / (float)d + eps);
        for (int64_t i = 0; i < d; i++) x[i] = read_at(kind, w, i) * (x[i] * scale);
    }
    const int64_t half = d / 2;
    for (int64_t i = 0; i < half; i++) {
        const float a = x[i], b = x[i + half];
        x[i] = a * cos[i] - b * sin[i];
        x[i + half] = b * cos[i + half] + a * sin[i + half];
    }
}

/* One query head h over its KV head's filled rows: out_h = softmax(q_h . K^T * scale) V, `scores` [length]. */
static void attend_head(int kind, const float *q, const char *kg, const char *vg, int64_t length, int64_t d,
                        float scale, float *scores, float *o, int simd) {
    const int64_t item = kind == C_F32 ? 4 : 2;
    float top = -INFINITY, total = 0.0f;
    for (int64_t p = 0; p < length; p++) {
#ifdef FC_X86
        float s = simd ? dot_avx2(kind, q, kg + p * d * item, d) : dot_portable(kind, q, kg + p * d * item, d);
#else
        float s = dot_portable(kind, q, kg + p * d * item, d);
#endif
        scores[p] = s * scale;
        if (scores[p] > top) top = scores[p];
    }
    for (int64_t p = 0; p < length; p++) total += scores[p] = expf(scores[p] - top);
    for (int64_t i = 0; i < d; i++) o[i] = 0.0f;
    for (int64_t p = 0; p < length; p++) {
#ifdef FC_X86
        if (simd) {
            axpy_avx2(kind, o, scores[p] / total, vg + p * d * item, d);
            continue;
        }
#endif
        axpy_portable(kind, o, scores[p] / total, vg + p * d * item, d);
    }
}

int fc_attention_decode(int kind, const float *qkv, const void *head_norm, float eps, const float *cos,
                        const float *sin, int64_t heads, int64_t kv_heads, int64_t d, void *keys, void *values,
                        int64_t max_len, int64_t pos, float scale, float *out, int threads, int simd) {
#ifndef FC_X86
    simd = 0;
#endif
    const int64_t item = kind == C_F32 ? 4 : 2, group = heads / kv_heads, length = pos + 1;
    float *buf = malloc((size_t)((heads + 1) * d + heads * length) * sizeof(float));
    if (buf == NULL) return -1;
    float *q = buf, *k = buf + heads * d, *scores = k + d;
    memcpy(q, qkv, (size_t)(heads * d) * sizeof(float));
    for (int64_t h = 0; h < heads; h++) {
        const void *w = head_norm == NULL ? NULL : (const char *)head_norm + h * d * item;
        norm_and_rotate(kind, q + h * d, w, eps, cos, sin, d);
    }
    for (int64_t g = 0; g < kv_heads; g++) { /* this token's key and value into the cache */
        memcpy(k, qkv + (heads + g) * d, (size_t)d * sizeof(float));
        const void *w = head_norm == NULL ? NULL : (const char *)head_norm + (heads + g) * d * item;
        norm_and_rotate(kind, k, w, eps, cos, sin, d);
        const float *v = qkv + (heads + kv_heads + g) * d;
        for (int64_t i = 0; i < d; i++) {
            write_at(kind, keys, (g * max_len + pos) * d + i, k[i]);
            write_at(kind, values, (g * max_len + pos) * d + i, v[i]);
        }
    }
    const int64_t bytes = 2 * kv_heads * length * d * item; /* the cache's filled rows, read once per group */
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1 && bytes >= FC_PARALLEL_BYTES)
    for (int64_t h = 0; h < heads; h++) {
        const int64_t g = h / group;
        attend_head(kind, q + h * d, (const char *)keys + g * max_len * d * item,
                    (const char *)values + g * max_len * d * item, length, d, scale, scores + h * length, out + h * d,
                    simd);
    }
    free(buf);
    return 0;
}

/* A batched decode step of the server's slot cache: row r (of `rows`) is one sequence's new token, qkv row
 * r (`qkv_stride` floats apart) at position positions[r], its cos and sin rows r of `d`, its cache slot r
 * (keys and values `slot_stride` elements apart, each slot [kv heads][max_len][head_dim]); out row r gets
 * its attention output. Each row is fc_attention_decode's one token over its own slot, so a batched step
 * computes what each sequence computes alone; rows run over the OpenMP threads where the step's filled
 * cache is large enough to share. Returns 0, or -1 without a buffer. */
int fc_attention_decode_rows(int kind, int64_t rows, const float *qkv, int64_t qkv_stride, const void *head_norm,
                             float eps, const float *cos, const float *sin, int64_t heads, int64_t kv_heads, int64_t d,
                             void *keys, void *values, int64_t slot_stride, int64_t max_len,
                             const int64_t *positions, float scale, float *out, int threads, int simd) {
    const int64_t item = kind == C_F32 ? 4 : 2;
    int64_t filled = 0;
    for (int64_t r = 0; r < rows; r++) filled += positions[r] + 1;
    const int64_t bytes = 2 * kv_heads * filled * d * item;
    int failed = 0;
#pragma omp parallel for num_threads(threads) schedule(static) reduction(| : failed) if (threads > 1 && bytes >= FC_PARALLEL_BYTES)
    for (int64_t r = 0; r < rows; r++)
        failed |= fc_attention_decode(kind, qkv + r * qkv_stride, head_norm, eps, cos + r * d, sin + r * d, heads,
                                      kv_heads, d, (char *)keys + r * slot_stride * item,
                                      (char *)values + r * slot_stride * item, max_len, positions[r], scale,
                                      out + r * heads * d, 1, simd) != 0;
    return failed ? -1 : 0;
}
