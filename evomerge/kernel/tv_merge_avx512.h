/* The search's hot path for 16-bit storage on AVX-512 CPUs: DARE draws over stored task
 * vectors, then the sign election (dare_ties), with every rounding done in registers by the
 * CPU's conversion instructions, where the generic code rounds by integer ops (bfloat16) or
 * by F16C passes over each block (float16).
 *
 *   bfloat16 (AVX512_BF16): vcvtne2ps2bf16 rounds and packs 32 floats in one instruction. It
 *     rounds to nearest even like round_bf16 and keeps quiet NaNs as round_bf16 does (every NaN
 *     in the kernel is quiet with its low 16 bits zero), but it reads subnormal inputs as zero:
 *     so it runs only in merges where no value can be subnormal (tv_merge's subnormal_free,
 *     which kernel/task_vectors.py's FusedTensor.subnormal_free decides from the smallest magnitudes of the inputs,
 *     known once per search).
 *   float16 (F16C): vcvtps2ph/vcvtph2ps, exact for every value, as the generic code uses them.
 *
 * Included by tv_merge.c where the CPU has them; tests/test_kernel.py checks these paths, and
 * builds without them, against the torch code. */
#include <immintrin.h>

#define SIGN_BIT 0x80000000

typedef struct {
    __m512 low, high; /* elements 0-15 and 16-31 of 32 */
} floats32;

/* ---- 32 values of a 16-bit type (in memory; packed in one vector) to floats and back ----- */

#ifdef __AVX512BF16__
/* each bfloat16 moved to the high half of its own 32-bit lane, the low half zeroed (one word
 * permutation per 16) */
static inline floats32 unpack_bf16(__m512i packed) {
    const __m512i low = _mm512_set_epi16(15, 0, 14, 0, 13, 0, 12, 0, 11, 0, 10, 0, 9, 0, 8, 0,
                                         7, 0, 6, 0, 5, 0, 4, 0, 3, 0, 2, 0, 1, 0, 0, 0);
    const __m512i high = _mm512_add_epi16(low, _mm512_set1_epi16(16));
    const __mmask32 high_words = 0xaaaaaaaau;
    return (floats32){_mm512_castsi512_ps(_mm512_maskz_permutexvar_epi16(high_words, low, packed)),
                      _mm512_castsi512_ps(_mm512_maskz_permutexvar_epi16(high_words, high, packed))};
}

static inline floats32 widen_bf16(const uint16_t *values) { return unpack_bf16(_mm512_loadu_si512(values)); }

static inline __m512i narrow_bf16(floats32 x) { return (__m512i)_mm512_cvtne2ps_pbh(x.high, x.low); }

static inline floats32 rounded_bf16(floats32 x) { return unpack_bf16(narrow_bf16(x)); }
#endif

static inline floats32 widen_f16(const uint16_t *values) {
    return (floats32){_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)values)),
                      _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(values + 16)))};
}

static inline __m512i narrow_f16(floats32 x) {
    return _mm512_inserti64x4(_mm512_castsi256_si512(_mm512_cvtps_ph(x.low, F16_NEAREST)),
                              _mm512_cvtps_ph(x.high, F16_NEAREST), 1);
}

static inline floats32 rounded_f16(floats32 x) { return (floats32){F16_ROUND(x.low), F16_ROUND(x.high)}; }

/* ---- the paths, for either type (gcc inlines the conversions passed in) ----------------- */

typedef floats32 (*widen_fn)(const uint16_t *);
typedef __m512i (*narrow_fn)(floats32);
typedef floats32 (*round_fn)(floats32);

static inline floats32 times(floats32 x, __m512 y) {
    return (floats32){_mm512_mul_ps(x.low, y), _mm512_mul_ps(x.high, y)};
}

/* masked(x, keep): x, or x * 0 where dropped */
static inline floats32 drop_where(floats32 x, __mmask32 drop) {
    const __m512 zero = _mm512_setzero_ps();
    x.low = _mm512_mask_mul_ps(x.low, (__mmask16)drop, x.low, zero);
    x.high = _mm512_mask_mul_ps(x.high, (__mmask16)_kshiftri_mask32(drop, 16), x.high, zero);
    return x;
}

/* weigh_block for a stored task vector under DARE draws: round(round(d * keep * scale) * w);
 * 0 when it does not apply (the caller then runs weigh_block) */
static inline int weigh_fast_16(const uint16_t *x, const uint16_t *sub_base, const keep_rule *rule, float scale,
                                float w, int64_t start, int64_t len, float *weighted, widen_fn widen,
                                round_fn rounded) {
    if (rule->mode != KEEP_HASH_BELOW || sub_base || len % 32 || rule->threshold > 0xffff) return 0;
    block_draws draws;
    draw_block(rule->hash_key, start, len, &draws);
    const __m512i threshold = _mm512_set1_epi16((short)rule->threshold);
    const __m512 scale_v = _mm512_set1_ps(scale), w_v = _mm512_set1_ps(w);
    for (int64_t j = 0; j < len; j += 32) {
        __mmask32 drop = _mm512_cmpge_epu16_mask(_mm512_loadu_si512(draws.of + j), threshold);
        floats32 d = widen(x + start + j);
        floats32 q = rounded(times(rounded(times(drop_where(d, drop), scale_v)), w_v));
        _mm512_storeu_ps(weighted + j, q.low);
        _mm512_storeu_ps(weighted + j + 16, q.high);
    }
    return 1;
}

/* SUMS with consensus for 16 elements: the sum over models of the weighted values that agree
 * with the elected sign (the others add x * 0), from +0 like SUMS */
static inline __m512 agreeing_sum(int models, const float (*weighted)[BLOCK], int64_t j) {
    __m512 sum = _mm512_loadu_ps(weighted[0] + j);
    for (int i = 1; i < models; i++) sum = _mm512_add_ps(sum, _mm512_loadu_ps(weighted[i] + j));
    __mmask16 positive = _mm512_cmp_ps_mask(sum, _mm512_setzero_ps(), _CMP_GE_OQ);
    __m512i flip = _mm512_maskz_mov_epi32((__mmask16)~positive, _mm512_set1_epi32((int)SIGN_BIT));
    __m512 agreeing = _mm512_setzero_ps();
    for (int i = 0; i < models; i++) {
        __m512 x = _mm512_loadu_ps(weighted[i] + j);
        __mmask16 differ = _mm512_cmple_epi32_mask(_mm512_xor_si512(_mm512_castps_si512(x), flip),
                                                   _mm512_setzero_si512());
        x = _mm512_mask_mul_ps(x, differ, x, _mm512_setzero_ps());
        agreeing = _mm512_add_ps(agreeing, x);
    }
    return agreeing;
}

/* COMBINE with consensus and nothing after the sum (dare_ties): out = base + round(sum), 32
 * elements at a time. Returns how many elements it stored (0 when it does not apply): a
 * ragged end is left to the generic loop. */
static inline int64_t combine_fast_16(int models, const float (*weighted)[BLOCK], const uint16_t *base,
                                      int consensus, int normalize, int use_lambda, int64_t start, int64_t len,
                                      uint16_t *out, widen_fn widen, narrow_fn narrow, round_fn rounded) {
    if (!consensus || normalize || use_lambda) return 0;
    int64_t j = 0;
    for (; j + 32 <= len; j += 32) {
        floats32 mixed = rounded((floats32){agreeing_sum(models, weighted, j), agreeing_sum(models, weighted, j + 16)});
        floats32 b = widen(base + start + j);
        __m512i merged = narrow((floats32){_mm512_add_ps(b.low, mixed.low), _mm512_add_ps(b.high, mixed.high)});
        _mm512_storeu_si512(out + start + j, merged);
    }
    return j;
}

/* ---- per type: what tv_merge_typed.h calls as FN(weigh_fast) and FN(combine_fast) -------- */

#ifdef __AVX512BF16__
static inline int weigh_fast_bf16(const uint16_t *x, const uint16_t *sub_base, const keep_rule *rule, float scale,
                                  float w, int64_t start, int64_t len, float *weighted, int subnormal_free) {
    return subnormal_free && weigh_fast_16(x, sub_base, rule, scale, w, start, len, weighted, widen_bf16, rounded_bf16);
}

static inline int64_t combine_fast_bf16(int models, const float (*weighted)[BLOCK], const uint16_t *base,
                                        int consensus, int normalize, int use_lambda, int64_t start, int64_t len,
                                        uint16_t *out, int subnormal_free) {
    if (!subnormal_free) return 0;
    return combine_fast_16(models, weighted, base, consensus, normalize, use_lambda, start, len, out, widen_bf16,
                           narrow_bf16, rounded_bf16);
}
#endif

static inline int weigh_fast_f16(const uint16_t *x, const uint16_t *sub_base, const keep_rule *rule, float scale,
                                 float w, int64_t start, int64_t len, float *weighted, int subnormal_free) {
    (void)subnormal_free; /* F16C is exact for subnormals too */
    return weigh_fast_16(x, sub_base, rule, scale, w, start, len, weighted, widen_f16, rounded_f16);
}

static inline int64_t combine_fast_f16(int models, const float (*weighted)[BLOCK], const uint16_t *base,
                                       int consensus, int normalize, int use_lambda, int64_t start, int64_t len,
                                       uint16_t *out, int subnormal_free) {
    (void)subnormal_free;
    return combine_fast_16(models, weighted, base, consensus, normalize, use_lambda, start, len, out, widen_f16,
                           narrow_f16, rounded_f16);
}
