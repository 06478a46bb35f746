/* Fused task-vector merge for the CPU: one pass over memory per tensor (plus one per model
 * for DARE's L1 rescale), multi-threaded with OpenMP.
 *
 * It computes exactly what evomerge/methods/task_arithmetic.py computes with torch ops, op
 * for op and rounding for rounding, so candidates and merges stay bit-identical to the torch
 * code (tests/test_kernel.py checks it):
 *   float32: every op in float32, sums over models left to right;
 *   bfloat16: every op computed in float32 and rounded to bfloat16 (round-to-nearest-even),
 *             except sums over models, which accumulate in float32 and round once
 *             (what torch's CPU kernels do).
 * Compile with -ffp-contract=off: a fused multiply-add would change the rounding.
 *
 * Which elements of a task vector survive is a `keep_rule` per model:
 *   KEEP_ALL        no sparsification;
 *   KEEP_KEY_BELOW  key[e] < threshold (precomputed magnitude ranks);
 *   KEEP_HASH_BELOW the DARE draw of element e < threshold, hashed here exactly as
 *                   evomerge/random_fields.py does (no memory for draws at all);
 *   KEEP_MAGNITUDE  |d| above the cut, or equal to it and e < cutoff (TIES top-k by a radix
 *                   select instead of a sort; ties go to lower indices, like the ranks).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_MODELS 64
/* Below this many elements a parallel region costs more than it saves (and on a busy
 * machine a thread waiting at the region's barrier can lose a whole time slice). */
#define PARALLEL_MIN (1 << 18)
#define HASH_CHUNK_BITS 22 /* random_fields._CHUNK */

enum { KEEP_ALL = 0, KEEP_KEY_BELOW = 1, KEEP_HASH_BELOW = 2, KEEP_MAGNITUDE = 3 };

typedef struct {
    int32_t mode;
    int32_t threshold;
    const int32_t *key;
    uint32_t hash_key;  /* key_lo ^ mix32(key_hi): the chunk key before the chunk offset */
    uint32_t cut_bits;  /* KEEP_MAGNITUDE: bits of |d| at the cut (as float32) */
    int64_t cutoff;     /* KEEP_MAGNITUDE: ties at the cut are kept below this index */
} keep_rule;

static inline float bf16_to_f32(uint16_t b) {
    uint32_t u = ((uint32_t)b) << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u); /* quiet NaN */
    u += 0x7fffu + ((u >> 16) & 1u); /* round to nearest, ties to even */
    return (uint16_t)(u >> 16);
}

static inline float round_bf16(float f) { return bf16_to_f32(f32_to_bf16(f)); }
static inline float round_f32(float f) { return f; }
/* 1 where x has the elected sign (zeros never agree: their sign is 0), else 0 */
#define AGREES(x, positive) ((positive) ? ((x) > 0.0f ? 1.0f : 0.0f) : ((x) < 0.0f ? 1.0f : 0.0f))

static inline uint32_t abs_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u & 0x7fffffffu;
}

static inline uint32_t mix32(uint32_t x) {
    x ^= x >> 16;
    x *= 0x7feb352du;
    x ^= x >> 15;
    x *= 0x846ca68bu;
    return x ^ (x >> 16);
}

static inline uint32_t draw24(uint32_t hash_key, int64_t e) {
    uint32_t chunk_start = (uint32_t)(e & ~(((int64_t)1 << HASH_CHUNK_BITS) - 1));
    uint32_t h = (uint32_t)(e - (int64_t)chunk_start) + (hash_key ^ chunk_start);
    return mix32(h) >> 8;
}

static inline int keep_magnitude(const keep_rule *r, int64_t e, float d) {
    uint32_t a = abs_bits(d);
    return (a > r->cut_bits) | ((a == r->cut_bits) & (e < r->cutoff)); /* branch-free */
}

#define LOAD_F32(x) (x)
#define LOAD_BF16(x) bf16_to_f32(x)
#define STORE_F32(x) (x)
#define STORE_BF16(x) f32_to_bf16(x)

/* One block of task-vector values as float: x - base (rounded to T, like torch's
 * subtraction), or x itself when base is NULL (x already holds the task vector). */
#define DEFINE_LOAD_BLOCK(NAME, T, LOAD, ROUND)                                             \
    static inline void NAME(const T *x, const T *base, int64_t start, int64_t len,          \
                            float *out) {                                                   \
        if (base) {                                                                         \
            for (int64_t j = 0; j < len; j++)                                               \
                out[j] = ROUND(LOAD(x[start + j]) - LOAD(base[start + j]));                 \
        } else {                                                                            \
            for (int64_t j = 0; j < len; j++) out[j] = LOAD(x[start + j]);                  \
        }                                                                                   \
    }

DEFINE_LOAD_BLOCK(load_block_f32, float, LOAD_F32, round_f32)
DEFINE_LOAD_BLOCK(load_block_bf16, uint16_t, LOAD_BF16, round_bf16)

/* Runs BODY with `d` (the task-vector value) and `keep` (0/1) for the block's elements
 * j = 0..len-1 (element e = start + j), the rule's mode decided once outside the loop so
 * that each loop vectorises. */
#define FOR_EACH_KEPT(rule, block, start, len, BODY)                                        \
    switch ((rule)->mode) {                                                                 \
    case KEEP_KEY_BELOW:                                                                    \
        for (int64_t j = 0; j < (len); j++) {                                               \
            float d = (block)[j];                                                           \
            int keep = (rule)->key[(start) + j] < (rule)->threshold;                        \
            BODY                                                                            \
        }                                                                                   \
        break;                                                                              \
    case KEEP_HASH_BELOW:                                                                   \
        for (int64_t j = 0; j < (len); j++) {                                               \
            float d = (block)[j];                                                           \
            int keep = draw24((rule)->hash_key, (start) + j) < (uint32_t)(rule)->threshold; \
            BODY                                                                            \
        }                                                                                   \
        break;                                                                              \
    case KEEP_MAGNITUDE:                                                                    \
        for (int64_t j = 0; j < (len); j++) {                                               \
            float d = (block)[j];                                                           \
            int keep = keep_magnitude((rule), (start) + j, d);                              \
            BODY                                                                            \
        }                                                                                   \
        break;                                                                              \
    default:                                                                                \
        for (int64_t j = 0; j < (len); j++) {                                               \
            float d = (block)[j];                                                           \
            int keep = 1;                                                                   \
            BODY                                                                            \
        }                                                                                   \
    }

#define BLOCK 1024
#define BLOCKS(n) for (int64_t start = 0; start < (n); start += BLOCK)
#define BLOCK_LEN(n) ((n) - start < BLOCK ? (n) - start : BLOCK)

/* sums of floor(|d| * scale) over the kept elements and over all of them, exact in int64
 * (scale = 2^shift): DARE's L1 rescale factor is all / kept */
#define DEFINE_KEPT_SUM(NAME, T, LOAD_BLOCK)                                                \
    int64_t NAME(const T *x, const T *base, const keep_rule *rule, int64_t n, double scale, \
                 int64_t *all) {                                                            \
        int64_t total = 0, everything = 0;                                                  \
        _Pragma("omp parallel for reduction(+ : total, everything) schedule(static) if (n > PARALLEL_MIN)") \
        BLOCKS(n) {                                                                         \
            int64_t len = BLOCK_LEN(n), part = 0, whole = 0;                                \
            float block[BLOCK];                                                             \
            LOAD_BLOCK(x, base, start, len, block);                                         \
            FOR_EACH_KEPT(rule, block, start, len,                                          \
                          int64_t q = (int64_t)((double)fabsf(d) * scale);                  \
                          part += q * keep; whole += q;)                                    \
            total += part;                                                                  \
            everything += whole;                                                            \
        }                                                                                   \
        *all = everything;                                                                  \
        return total;                                                                       \
    }

DEFINE_KEPT_SUM(kept_abs_sum_f32, float, load_block_f32)
DEFINE_KEPT_SUM(kept_abs_sum_bf16, uint16_t, load_block_bf16)

/* max |d|, for the fixed-point scale of the exact L1 sums (inputs are NaN-free) */
#define DEFINE_ABS_MAX(NAME, T, LOAD_BLOCK)                                                 \
    float NAME(const T *x, const T *base, int64_t n) {                                      \
        float peak = 0.0f;                                                                  \
        _Pragma("omp parallel for reduction(max : peak) schedule(static) if (n > PARALLEL_MIN)")                 \
        BLOCKS(n) {                                                                         \
            int64_t len = BLOCK_LEN(n);                                                     \
            float block[BLOCK], part = 0.0f;                                                \
            LOAD_BLOCK(x, base, start, len, block);                                         \
            for (int64_t j = 0; j < len; j++) {                                             \
                float a = fabsf(block[j]);                                                  \
                part = a > part ? a : part;                                                 \
            }                                                                               \
            peak = part > peak ? part : peak;                                               \
        }                                                                                   \
        return peak;                                                                        \
    }

DEFINE_ABS_MAX(abs_max_f32, float, load_block_f32)
DEFINE_ABS_MAX(abs_max_bf16, uint16_t, load_block_bf16)

/* 1 when no element is NaN or +-Inf (exponent bits all ones) */
#define DEFINE_ALL_FINITE(NAME, T, EXP_MASK)                                                \
    int NAME(const T *x, int64_t n) {                                                       \
        int64_t bad = 0;                                                                    \
        _Pragma("omp parallel for reduction(+ : bad) schedule(static) if (n > PARALLEL_MIN)")                    \
        for (int64_t e = 0; e < n; e++) bad += (x[e] & (EXP_MASK)) == (EXP_MASK);           \
        return bad == 0;                                                                    \
    }

DEFINE_ALL_FINITE(all_finite_f32, uint32_t, 0x7f800000u)
DEFINE_ALL_FINITE(all_finite_bf16, uint16_t, 0x7f80u)

/*
 * The magnitude cut for keeping the k largest |d| (1 <= k < n): radix select over the bits
 * of |d| as float32 (monotonic for non-negative numbers), high 16 bits then low 16 bits,
 * then a scan for the index below which ties at the cut are kept.
 */
#define DEFINE_MAGNITUDE_CUT(NAME, T, LOAD_BLOCK)                                           \
    void NAME(const T *x, const T *base, int64_t n, int64_t k, uint32_t *cut_bits,          \
              int64_t *cutoff) {                                                            \
        int64_t *hist = calloc(65536, sizeof(int64_t));                                     \
        float block[BLOCK];                                                                 \
        BLOCKS(n) {                                                                         \
            int64_t len = BLOCK_LEN(n);                                                     \
            LOAD_BLOCK(x, base, start, len, block);                                         \
            for (int64_t j = 0; j < len; j++) hist[abs_bits(block[j]) >> 16]++;             \
        }                                                                                   \
        int64_t above = 0;                                                                  \
        int high = 65535;                                                                   \
        while (above + hist[high] < k) above += hist[high--];                               \
        memset(hist, 0, 65536 * sizeof(int64_t));                                           \
        BLOCKS(n) {                                                                         \
            int64_t len = BLOCK_LEN(n);                                                     \
            LOAD_BLOCK(x, base, start, len, block);                                         \
            for (int64_t j = 0; j < len; j++) {                                             \
                uint32_t a = abs_bits(block[j]);                                            \
                if ((int)(a >> 16) == high) hist[a & 0xffffu]++;                            \
            }                                                                               \
        }                                                                                   \
        int low = 65535;                                                                    \
        while (above + hist[low] < k) above += hist[low--];                                 \
        free(hist);                                                                         \
        uint32_t bits = ((uint32_t)high << 16) | (uint32_t)low;                             \
        int64_t need = k - above, seen = 0, e = n;                                          \
        BLOCKS(n) {                                                                         \
            int64_t len = BLOCK_LEN(n);                                                     \
            LOAD_BLOCK(x, base, start, len, block);                                         \
            int64_t j = 0;                                                                  \
            for (; j < len && seen < need; j++) seen += abs_bits(block[j]) == bits;         \
            if (seen == need) {                                                             \
                e = start + j;                                                              \
                break;                                                                      \
            }                                                                               \
        }                                                                                   \
        *cut_bits = bits;                                                                   \
        *cutoff = e;                                                                        \
    }

DEFINE_MAGNITUDE_CUT(magnitude_cut_f32, float, load_block_f32)
DEFINE_MAGNITUDE_CUT(magnitude_cut_bf16, uint16_t, load_block_bf16)

/*
 * out = base + lambda * sum_i(w_i m_i s_i tau_i) / Z   (see task_arithmetic.py), where
 *   tau_i = xs[i] - (sub_base or nothing), s_i = rules[i], rescale[i] = the L1 factor
 *   (1 when not rescaling), m_i the sign-consensus mask; Z = plain_divisor without consensus.
 * Work goes in blocks: first each model's weighted, sparsified task vector for the block
 * (one vectorised loop per model and rule), then the combination across models (unrolled
 * for up to 4 models).
 */
#define MERGE_ARGS(T)                                                                       \
    int models, int64_t n, const T *base, const T **xs, const T *sub_base,                 \
        const keep_rule *rules, const float *rescale, const float *weights, int consensus, \
        int normalize, float plain_divisor, int use_lambda, float lambda, T *out

/* The loop over a block's elements, branch-free so that it vectorises. */
#define COMBINE(M, CONSENSUS, NORMALIZE, T, LOAD, STORE, ROUND)                             \
    for (int64_t j = 0; j < len; j++) {                                                     \
        float mixed, divisor;                                                               \
        if (CONSENSUS) {                                                                    \
            float total = weighted[0][j];                                                   \
            for (int i = 1; i < (M); i++) total = total + weighted[i][j];                   \
            int positive = ROUND(total) >= 0.0f; /* the elected sign; an exact 0 counts as + */ \
            float agree = AGREES(weighted[0][j], positive);                                 \
            mixed = ROUND(weighted[0][j] * agree);                                          \
            divisor = ROUND(weights[0] * agree);                                            \
            for (int i = 1; i < (M); i++) {                                                 \
                agree = AGREES(weighted[i][j], positive);                                   \
                mixed = mixed + ROUND(weighted[i][j] * agree);                              \
                divisor = divisor + ROUND(weights[i] * agree);                              \
            }                                                                               \
            mixed = ROUND(mixed);                                                           \
            divisor = ROUND(divisor);                                                       \
            divisor = divisor == 0.0f ? 1.0f : divisor;                                     \
        } else {                                                                            \
            mixed = weighted[0][j];                                                         \
            for (int i = 1; i < (M); i++) mixed = mixed + weighted[i][j];                   \
            mixed = ROUND(mixed);                                                           \
            divisor = plain_divisor;                                                        \
        }                                                                                   \
        if (NORMALIZE) mixed = ROUND(mixed / divisor);                                      \
        float scaled = ROUND(mixed * lambda);                                               \
        mixed = use_lambda ? scaled : mixed;                                                \
        out[start + j] = STORE(ROUND(LOAD(base[start + j]) + mixed));                       \
    }

/* consensus and normalize fixed at compile time: no dead division in the hot loop */
#define COMBINE_M(M, T, LOAD, STORE, ROUND)                                                 \
    if (consensus && normalize) {                                                           \
        COMBINE(M, 1, 1, T, LOAD, STORE, ROUND)                                             \
    } else if (consensus) {                                                                 \
        COMBINE(M, 1, 0, T, LOAD, STORE, ROUND)                                             \
    } else if (normalize) {                                                                 \
        COMBINE(M, 0, 1, T, LOAD, STORE, ROUND)                                             \
    } else {                                                                                \
        COMBINE(M, 0, 0, T, LOAD, STORE, ROUND)                                             \
    }

#define DEFINE_MERGE(NAME, T, LOAD, STORE, ROUND, LOAD_BLOCK)                               \
    void NAME(MERGE_ARGS(T)) {                                                              \
        _Pragma("omp parallel for schedule(static) if (n > PARALLEL_MIN)")                 \
        BLOCKS(n) {                                                                         \
            int64_t len = BLOCK_LEN(n);                                                     \
            float weighted[MAX_MODELS][BLOCK], block[BLOCK];                                \
            for (int i = 0; i < models; i++) {                                              \
                float *w_out = weighted[i], scale = rescale[i], w = weights[i];             \
                LOAD_BLOCK(xs[i], sub_base, start, len, block);                             \
                FOR_EACH_KEPT(&rules[i], block, start, len,                                 \
                              float kept = d * (float)keep; /* d or a signed 0, exact */   \
                              w_out[j] = ROUND(ROUND(kept * scale) * w);)                   \
            }                                                                               \
            switch (models) {                                                               \
            case 1: COMBINE_M(1, T, LOAD, STORE, ROUND) break;                              \
            case 2: COMBINE_M(2, T, LOAD, STORE, ROUND) break;                              \
            case 3: COMBINE_M(3, T, LOAD, STORE, ROUND) break;                              \
            case 4: COMBINE_M(4, T, LOAD, STORE, ROUND) break;                              \
            default: COMBINE_M(models, T, LOAD, STORE, ROUND) break;                        \
            }                                                                               \
        }                                                                                   \
    }

DEFINE_MERGE(tv_merge_f32, float, LOAD_F32, STORE_F32, round_f32, load_block_f32)
DEFINE_MERGE(tv_merge_bf16, uint16_t, LOAD_BF16, STORE_BF16, round_bf16, load_block_bf16)

#ifdef _OPENMP
#include <omp.h>
void set_threads(int n) { omp_set_num_threads(n); }
#else
void set_threads(int n) { (void)n; }
#endif
