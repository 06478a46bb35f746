/* Fused task-vector merge for the CPU: one pass over memory per tensor (plus one for DARE's
 * L1 rescale), multi-threaded with OpenMP, for float32, bfloat16 and float16 storage.
 *
 * It computes exactly what evomerge/methods/task_arithmetic.py computes with torch ops, op
 * for op and rounding for rounding, so candidates and merges stay bit-identical to the torch
 * code (tests/test_kernel.py checks it):
 *   float32: every op in float32, sums over models left to right;
 *   bfloat16 / float16: every op computed in float32 and rounded to the storage type
 *             (round-to-nearest-even), except sums over models, which accumulate in float32
 *             and round once (what torch's CPU kernels do).
 * Compile with -ffp-contract=off: a fused multiply-add would change the rounding.
 *
 * This file holds what every storage type shares (the hash, the rounding, the keep rules);
 * tv_merge_typed.h holds the kernels and is included once per storage type below.
 *
 * Which elements of a task vector survive is a `keep_rule` per model:
 *   KEEP_ALL        no sparsification;
 *   KEEP_KEY_BELOW  key[e] < threshold (precomputed magnitude ranks);
 *   KEEP_HASH_BELOW the DARE draw of element e < threshold, hashed here exactly as
 *                   evomerge/random_fields.py does (no memory for draws at all);
 *   KEEP_MAGNITUDE  |d| above the cut, or equal to it and e < cutoff (TIES top-k by a radix
 *                   select instead of a sort; ties go to lower indices, like the ranks);
 *   KEEP_BITS       bit e of a bitmap: what abs_sums kept, stored in DARE's L1 pass so that
 *                   the merge pass reads 1 bit per element instead of hashing again.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#define MAX_THREADS() omp_get_max_threads()
#else
#define MAX_THREADS() 1
#endif

#define MAX_MODELS 64
/* Below this many elements a parallel region costs more than it saves (and on a busy
 * machine a thread waiting at the region's barrier can lose a whole time slice). */
#define PARALLEL_MIN (1 << 18)
#define HASH_CHUNK_BITS 22 /* random_fields._CHUNK */
#define DRAW_BITS 16       /* random_fields.BITS: a draw is half a hash */
/* Work goes in blocks of this many elements: small enough that a block of every model stays
 * in the L1 cache between the per-model loop and the combination across models (256 was the
 * fastest of 64..4096 here, by 10-20% over 1024). */
#define BLOCK 256
#define BLOCKS(n) for (int64_t start = 0; start < (n); start += BLOCK)
#define BLOCK_LEN(n) ((n) - start < BLOCK ? (n) - start : BLOCK)

enum { KEEP_ALL = 0, KEEP_KEY_BELOW = 1, KEEP_HASH_BELOW = 2, KEEP_MAGNITUDE = 3, KEEP_BITS = 4 };

typedef struct {
    int32_t mode;
    int32_t threshold;
    const int32_t *key;
    uint32_t hash_key;  /* key_lo ^ mix32(key_hi): the chunk key before the chunk offset */
    uint32_t cut_bits;  /* KEEP_MAGNITUDE: bits of |d| at the cut (as float32) */
    int64_t cutoff;     /* KEEP_MAGNITUDE: ties at the cut are kept below this index */
    const uint8_t *bits; /* KEEP_BITS: element e kept if bit e % 8 of bits[e / 8] is set */
} keep_rule;

/* ---- storage types: load to float, round to the type, store ---------------------------- */

/* the bits of a float and back (memcpy: the aliasing-safe way, compiled to nothing) */
static inline float as_float(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint32_t as_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

static inline float load_f32(float x) { return x; }
static inline float round_f32(float x) { return x; }
static inline float store_f32(float x) { return x; }

static inline float load_bf16(uint16_t b) { return as_float((uint32_t)b << 16); }

/* float to bfloat16 bits (in the high half), rounded to nearest, ties to even. No NaN test:
 * inside the kernel every NaN has its low 16 bits zero (bfloat16 inputs, NaNs arithmetic made
 * from them, or the default NaN), and rounding leaves such a NaN unchanged; a general
 * conversion would have to keep a NaN with only low payload bits from rounding to Inf. */
static inline uint32_t rounded_bf16_bits(float f) {
    uint32_t u = as_bits(f);
    return (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
}

static inline uint16_t store_bf16(float f) { return (uint16_t)(rounded_bf16_bits(f) >> 16); }

/* store_bf16 then load_bf16 */
static inline float round_bf16(float f) { return as_float(rounded_bf16_bits(f)); }

/* float16 by integer arithmetic (after F. Giesen's branch-free conversions) rather than
 * _Float16, which compilers vectorise only on CPUs with native float16 arithmetic. */
static inline float load_f16(uint16_t h) {
    uint32_t magnitude = (uint32_t)(h & 0x7fffu) << 13, exponent = magnitude & (0x7c00u << 13);
    uint32_t normal = magnitude + ((127 - 15) << 23);
    uint32_t special = normal + ((128 - 16) << 23);                         /* Inf, NaN */
    uint32_t subnormal = as_bits(as_float(normal + (1u << 23)) - as_float(113u << 23));
    uint32_t u = exponent == (0x7c00u << 13) ? special : exponent == 0 ? subnormal : normal;
    return as_float(u | ((uint32_t)(h & 0x8000u) << 16));
}

static inline uint16_t store_f16(float f) {
    uint32_t u = as_bits(f), sign = u & 0x80000000u;
    u ^= sign;
    /* subnormal results: a float addition does the rounding (to nearest even) */
    uint32_t subnormal = as_bits(as_float(u) + as_float(((127 - 15) + (23 - 10) + 1) << 23))
                         - (((127 - 15) + (23 - 10) + 1) << 23);
    uint32_t normal = (u + ((uint32_t)(15 - 127) << 23) + 0xfffu + ((u >> 13) & 1u)) >> 13;
    uint32_t special = u > (255u << 23) ? 0x7e00u : 0x7c00u;               /* NaN, Inf */
    uint32_t h = u >= ((127 + 16) << 23) ? special : u < (113u << 23) ? subnormal : normal;
    return (uint16_t)(h | (sign >> 16));
}

/* store_f16 then load_f16 in float32 bits: normal results keep 11 significant bits
 * (round to nearest even at bit 13, as bfloat16 does at bit 16), subnormal ones a multiple of
 * 2^-24 (a float addition to 0.5 does that rounding), too large ones become Inf; NaNs stay. */
static inline float round_f16(float f) {
    uint32_t u = as_bits(f), sign = u & 0x80000000u, a = u ^ sign;
    uint32_t normal = (a + 0xfffu + ((a >> 13) & 1u)) & ~0x1fffu;
    uint32_t subnormal = as_bits((as_float(a) + 0.5f) - 0.5f);
    uint32_t r = a < (113u << 23) ? subnormal : normal;
    r = (r > 0x477fe000u) & (a <= 0x7f800000u) ? 0x7f800000u : r; /* past 65504: Inf */
    return as_float(r | sign);
}

/* ---- the same, a block at a time ----------------------------------------------------------
 * load_floats: x[j] as float, for every type. float16 with F16C also rounds a block at a
 * time, between the stages of a merge rather than inside its loops (ROUNDS_IN_LOOP 0): its
 * conversions then run as F16C instructions (8 per instruction, 16 with AVX-512), which
 * compilers never vectorise on their own without native float16 arithmetic. */
#define CONVERSIONS_BY_LOOP(SUFFIX, T)                                                      \
    static inline void load_floats_##SUFFIX(const T *x, int64_t len, float *out) {          \
        for (int64_t j = 0; j < len; j++) out[j] = load_##SUFFIX(x[j]);                     \
    }

CONVERSIONS_BY_LOOP(f32, float)
CONVERSIONS_BY_LOOP(bf16, uint16_t)

#ifdef __F16C__
#include <immintrin.h>
/* F16C rounds to nearest even like store_f16; NaNs keep their payload (store_f16 gives the
 * default NaN), as torch's own vectorised float16 code does. */
#define F16_NEAREST _MM_FROUND_TO_NEAREST_INT
#ifdef __AVX512F__
/* 16 at a time where the CPU has AVX-512 (its conversions are F16C's, twice as wide) */
#define F16_WIDE 16
#define F16_LOAD(p) _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(p)))
#define F16_STORE(p, v) _mm256_storeu_si256((__m256i *)(p), _mm512_cvtps_ph(v, F16_NEAREST))
#define F16_ROUND(v) _mm512_cvtph_ps(_mm512_cvtps_ph(v, F16_NEAREST))
#define F32_LOAD _mm512_loadu_ps
#define F32_STORE _mm512_storeu_ps
#define F32_ADD _mm512_add_ps
#define F32_MUL _mm512_mul_ps
#define F32_SET1 _mm512_set1_ps
#else
#define F16_WIDE 8
#define F16_LOAD(p) _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p)))
#define F16_STORE(p, v) _mm_storeu_si128((__m128i *)(p), _mm256_cvtps_ph(v, F16_NEAREST))
#define F16_ROUND(v) _mm256_cvtph_ps(_mm256_cvtps_ph(v, F16_NEAREST))
#define F32_LOAD _mm256_loadu_ps
#define F32_STORE _mm256_storeu_ps
#define F32_ADD _mm256_add_ps
#define F32_MUL _mm256_mul_ps
#define F32_SET1 _mm256_set1_ps
#endif
static inline void load_floats_f16(const uint16_t *x, int64_t len, float *out) {
    int64_t j = 0;
    for (; j + F16_WIDE <= len; j += F16_WIDE) F32_STORE(out + j, F16_LOAD(x + j));
    for (; j < len; j++) out[j] = _cvtsh_ss(x[j]);
}

static inline void round_floats_f16(float *x, int64_t len) {
    int64_t j = 0;
    for (; j + F16_WIDE <= len; j += F16_WIDE) F32_STORE(x + j, F16_ROUND(F32_LOAD(x + j)));
    for (; j < len; j++) x[j] = _cvtsh_ss(_cvtss_sh(x[j], F16_NEAREST));
}

/* Two steps of a merge in one pass, each rounding the step before it (a pass per rounding
 * would load and store the block twice more): x = round(x) * w ... */
static inline void times_rounded_f16(float *x, int64_t len, float w) {
    int64_t j = 0;
    for (; j + F16_WIDE <= len; j += F16_WIDE)
        F32_STORE(x + j, F32_MUL(F16_ROUND(F32_LOAD(x + j)), F32_SET1(w)));
    for (; j < len; j++) x[j] = _cvtsh_ss(_cvtss_sh(x[j], F16_NEAREST)) * w;
}

/* ... and out = base + round(mixed), stored as float16 */
static inline void add_rounded_to_base_f16(const uint16_t *base, const float *mixed, int64_t len,
                                           uint16_t *out) {
    int64_t j = 0;
    for (; j + F16_WIDE <= len; j += F16_WIDE)
        F16_STORE(out + j, F32_ADD(F16_LOAD(base + j), F16_ROUND(F32_LOAD(mixed + j))));
    for (; j < len; j++)
        out[j] = _cvtss_sh(_cvtsh_ss(base[j]) + _cvtsh_ss(_cvtss_sh(mixed[j], F16_NEAREST)), F16_NEAREST);
}
#else
CONVERSIONS_BY_LOOP(f16, uint16_t)
#endif

/* ---- what every kernel shares ------------------------------------------------------------- */

/* Whether x has the elected sign, `flip` being 0 for + and the sign bit for -: flipped, an
 * agreeing x is a positive nonzero int32 and zeros of either sign are not (their sign is
 * 0). One xor and one compare, where testing x > 0 and x < 0 takes two and mask logic. */
static inline int agrees(float x, uint32_t flip) { return (int32_t)(as_bits(x) ^ flip) > 0; }

/* x * keep (keep 0 or 1) as torch's product with a 0/1 mask computes it: x, or x * 0 (a zero
 * of x's sign, or NaN from an Inf or a NaN); a select is one op fewer than converting keep to
 * float and multiplying */
static inline float masked(float x, int keep) { return keep ? x : x * 0.0f; }

static inline uint32_t abs_bits(float f) { return as_bits(f) & 0x7fffffffu; }

static inline uint32_t mix32(uint32_t x) {
    x ^= x >> 16;
    x *= 0x7feb352du;
    x ^= x >> 15;
    x *= 0x846ca68bu;
    return x ^ (x >> 16);
}

/* The DARE draws of a block's elements (random_fields.UniformField): elements 2k and 2k + 1
 * of a hash chunk take the low and high halves of mix32(k + (hash_key ^ chunk start)).
 * Blocks start at even elements and never straddle a chunk (BLOCK divides the chunk size).
 * Each hash is stored whole and read back as two halves (a union: the halves of a uint32 in
 * memory order), faster than shifting them apart. */
typedef union {
    uint32_t pairs[BLOCK / 2];
    uint16_t of[BLOCK];
} block_draws;

static inline void draw_block(uint32_t hash_key, int64_t start, int64_t len, block_draws *draws) {
    uint32_t chunk_start = (uint32_t)(start & ~(((int64_t)1 << HASH_CHUNK_BITS) - 1));
    uint32_t first = (uint32_t)((start - (int64_t)chunk_start) >> 1) + (hash_key ^ chunk_start);
    for (int64_t k = 0; k < (len + 1) / 2; k++) {
        uint32_t h = mix32(first + (uint32_t)k);
#if __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
        h = (h << 16) | (h >> 16); /* the low half first in memory */
#endif
        draws->pairs[k] = h;
    }
}

/* KEEP_MAGNITUDE: ties at the cut are kept for j below this (the cutoff, block-relative) */
static inline int32_t ties_below(const keep_rule *r, int64_t start, int64_t len) {
    int64_t limit = r->cutoff - start;
    return (int32_t)(limit < 0 ? 0 : limit > len ? len : limit);
}

/* A block's keep flags (0/1 bytes) to bits (bit e % 8 of byte e / 8) and back, 8 at a time
 * by a multiplication that moves each flag to its own bit (no two products overlap, so
 * nothing carries). */
static inline void pack_bits(const uint8_t *keep, int64_t len, uint8_t *bits) {
    for (int64_t k = 0; k < (len + 7) / 8; k++) {
        uint64_t eight;
        memcpy(&eight, keep + 8 * k, 8);
        bits[k] = (uint8_t)((eight * 0x0102040810204080ull) >> 56);
    }
}

static inline void unpack_bits(const uint8_t *bits, int64_t len, uint8_t *keep) {
    for (int64_t k = 0; k < (len + 7) / 8; k++) {
        uint64_t spread = ((uint64_t)bits[k] * 0x0101010101010101ull) & 0x8040201008040201ull;
        uint64_t eight = ((spread + 0x7f7f7f7f7f7f7f7full) >> 7) & 0x0101010101010101ull;
        memcpy(keep + 8 * k, &eight, 8);
    }
}

/* Runs BODY with `d` (the task-vector value, TO_FLOAT(block[j])) and `keep` (0/1) for the
 * block's elements j = 0..len-1 (element start + j), the rule's mode decided once outside
 * the loop and its per-block constants hoisted, so that each loop vectorises in 32-bit lanes. */
#define FOR_EACH_KEPT(rule, block, TO_FLOAT, start, len, BODY)                              \
    switch ((rule)->mode) {                                                                 \
    case KEEP_KEY_BELOW: {                                                                  \
        const int32_t *key = (rule)->key + (start), threshold = (rule)->threshold;          \
        for (int64_t j = 0; j < (len); j++) {                                               \
            float d = TO_FLOAT((block)[j]);                                                 \
            int keep = key[j] < threshold;                                                  \
            BODY                                                                            \
        }                                                                                   \
        break;                                                                              \
    }                                                                                       \
    case KEEP_HASH_BELOW: {                                                                 \
        uint32_t threshold = (uint32_t)(rule)->threshold;                                   \
        block_draws draws; /* hashed in a loop of their own: 15% faster than inline */      \
        draw_block((rule)->hash_key, (start), (len), &draws);                               \
        for (int64_t j = 0; j < (len); j++) {                                               \
            float d = TO_FLOAT((block)[j]);                                                 \
            int keep = draws.of[j] < threshold;                                             \
            BODY                                                                            \
        }                                                                                   \
        break;                                                                              \
    }                                                                                       \
    case KEEP_MAGNITUDE: {                                                                  \
        uint32_t cut = (rule)->cut_bits;                                                    \
        int32_t ties = ties_below((rule), (start), (len));                                  \
        for (int64_t j = 0; j < (len); j++) {                                               \
            float d = TO_FLOAT((block)[j]);                                                 \
            uint32_t a = abs_bits(d);                                                       \
            int keep = (a > cut) | ((a == cut) & ((int32_t)j < ties)); /* branch-free */    \
            BODY                                                                            \
        }                                                                                   \
        break;                                                                              \
    }                                                                                       \
    case KEEP_BITS: {                                                                       \
        uint8_t flags[BLOCK];                                                               \
        unpack_bits((rule)->bits + (start) / 8, (len), flags);                              \
        for (int64_t j = 0; j < (len); j++) {                                               \
            float d = TO_FLOAT((block)[j]);                                                 \
            int keep = flags[j];                                                            \
            BODY                                                                            \
        }                                                                                   \
        break;                                                                              \
    }                                                                                       \
    default:                                                                                \
        for (int64_t j = 0; j < (len); j++) {                                               \
            float d = TO_FLOAT((block)[j]);                                                 \
            int keep = 1;                                                                   \
            BODY                                                                            \
        }                                                                                   \
    }

/* ---- one set of kernels per storage type --------------------------------------------------
 * T: the element type as stored (16-bit types as their bits); BITS: an unsigned integer of
 * its size; ABS_MASK: all bits but the sign; INF_BITS: the bits of +Inf (a magnitude at least
 * that is an Inf or a NaN); SUFFIX names the functions (tv_merge_f32, ...)
 * and the load/round/store helpers above; IS_FLOAT32 picks the few special cases;
 * ROUNDS_IN_LOOP says whether rounding to T is cheap integer code that vectorises inside the
 * kernels' loops (1), or conversion instructions (F16C) run as a pass between them (0);
 * FAST_PATHS whether tv_merge_avx512.h has the dare_ties path for T on this CPU. */
#define CONCAT_(a, b) a##_##b
#define CONCAT(a, b) CONCAT_(a, b)

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__F16C__)
#include "tv_merge_avx512.h"
#define AVX512_PATHS 1
#else
#define AVX512_PATHS 0
#endif

#define T float
#define FAST_PATHS 0
#define BITS uint32_t
#define ABS_MASK 0x7fffffffu
#define INF_BITS 0x7f800000u
#define SUFFIX f32
#define IS_FLOAT32 1
#define ROUNDS_IN_LOOP 1
#include "tv_merge_typed.h"

#if AVX512_PATHS && defined(__AVX512BF16__)
#define FAST_PATHS 1
#else
#define FAST_PATHS 0
#endif
#define T uint16_t
#define BITS uint16_t
#define ABS_MASK 0x7fffu
#define INF_BITS 0x7f80u
#define SUFFIX bf16
#define IS_FLOAT32 0
#define ROUNDS_IN_LOOP 1
#include "tv_merge_typed.h"

#define T uint16_t
#define BITS uint16_t
#define ABS_MASK 0x7fffu
#define INF_BITS 0x7c00u
#define SUFFIX f16
#define IS_FLOAT32 0
#define FAST_PATHS AVX512_PATHS
#ifdef __F16C__
#define ROUNDS_IN_LOOP 0
#else
#define ROUNDS_IN_LOOP 1
#endif
#include "tv_merge_typed.h"

#ifdef _OPENMP
#include <omp.h>
void set_threads(int n) { omp_set_num_threads(n); }
#else
void set_threads(int n) { (void)n; }
#endif
