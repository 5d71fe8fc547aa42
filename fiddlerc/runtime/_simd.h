/* What fiddlerc's C kernels (_quant.c, _matvec.c) share: the instruction-set switch, an fp16 decoder
 * for the portable paths, and a horizontal sum. */
#ifndef FC_SIMD_H
#define FC_SIMD_H
#include <stdint.h>
#include <string.h>
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define FC_X86 1
#endif

/* Products that read fewer weight bytes than this run on the calling thread alone: waking OpenMP's team
 * and joining it again costs more than the work it would share (the experts of a fine-grained MoE at
 * one token, a narrow model's projections). */
#define FC_PARALLEL_BYTES (64 * 1024)

/* The picks of one token's experts (expert ids and their routing weights, in the router's slot order) put
 * in expert order, so a grouped call sums as Hugging Face does; each pick is counted in `counts` (per
 * expert, NULL: not counted). `order` and `weight` hold FC_MAX_PICKS. Returns 0, or -1 where there are
 * more picks than that, or a pick is out of range or not in `table` (three pointers per expert, NULL for
 * experts the group does not hold). Top-k is small: insertion sort. */
#define FC_MAX_PICKS 64
static inline int fc_expert_order(int n, const int64_t *picks, const float *route, const void *const *table,
                                  int64_t experts, int64_t *order, float *weight, int64_t *counts) {
    if (n > FC_MAX_PICKS) return -1;
    for (int i = 0; i < n; i++) {
        int64_t e = picks[i];
        if (e < 0 || e >= experts || table[3 * e] == NULL) return -1;
        int j = i;
        for (; j > 0 && order[j - 1] > e; j--) order[j] = order[j - 1], weight[j] = weight[j - 1];
        order[j] = e, weight[j] = route[i];
    }
    if (counts != NULL)
        for (int i = 0; i < n; i++) counts[order[i]]++;
    return 0;
}

static inline float fc_half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else { /* subnormal: normalise */
            exp = 127 - 15 + 1;
            while (!(man & 0x400)) {
                man <<= 1;
                exp--;
            }
            bits = sign | (exp << 23) | ((man & 0x3ff) << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7f800000 | (man << 13);
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

#ifdef FC_X86
__attribute__((target("avx2,fma"))) static inline float fc_hsum8(__m256 v) {
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_movehdup_ps(h));
    return _mm_cvtss_f32(h);
}
#endif
#endif
