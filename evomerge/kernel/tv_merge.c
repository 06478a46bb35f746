/* Fused task-vector merge for the CPU: one pass over memory per tensor (plus one per model
 * for the L1 rescale), multi-threaded with OpenMP.
 *
 * It computes exactly what evomerge/methods/task_arithmetic.py computes with torch ops, op
 * for op and rounding for rounding, so the search's candidates stay bit-identical to
 * `evomerge merge` (tests/test_kernel.py checks it):
 *   float32: every op in float32, sums over models left to right;
 *   bfloat16: every op computed in float32 and rounded to bfloat16 (round-to-nearest-even),
 *             except sums over models, which accumulate in float32 and round once
 *             (what torch's CPU kernels do).
 * Compile with -ffp-contract=off: a fused multiply-add would change the rounding.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#define MAX_MODELS 64

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

static inline float sign_of(float x) { return (float)((x > 0.0f) - (x < 0.0f)); }

/* sum over kept elements of floor(|delta| * 2^shift), exact in int64 */
#define DEFINE_KEPT_SUM(NAME, T, LOAD)                                                      \
    int64_t NAME(const T *delta, const int32_t *key, int32_t threshold, int64_t n,         \
                 double scale) {                                                            \
        int64_t total = 0;                                                                  \
        _Pragma("omp parallel for reduction(+ : total) schedule(static)")                  \
        for (int64_t e = 0; e < n; e++) {                                                   \
            if (key == 0 || key[e] < threshold)                                             \
                total += (int64_t)((double)fabsf(LOAD(delta[e])) * scale); /* >= 0: trunc == floor */ \
        }                                                                                   \
        return total;                                                                       \
    }

#define LOAD_F32(x) (x)
#define LOAD_BF16(x) bf16_to_f32(x)
#define STORE_F32(x) (x)
#define STORE_BF16(x) f32_to_bf16(x)

DEFINE_KEPT_SUM(kept_abs_sum_f32, float, LOAD_F32)
DEFINE_KEPT_SUM(kept_abs_sum_bf16, uint16_t, LOAD_BF16)

/*
 * out = base + lambda * sum_i(w_i m_i s_i tau_i) / Z   (see task_arithmetic.py), where
 *   tau_i = deltas[i], s_i = keys[i][e] < thresholds[i] (keys[i] == 0: keep all),
 *   rescale[i] = the L1 factor (1 when not rescaling), m_i the sign-consensus mask.
 * Without consensus, Z = plain_divisor (computed by the caller like torch does).
 * MERGE_BODY is instantiated for each model count up to 8 so that the compiler unrolls the
 * loops over models and vectorises the loop over elements.
 */
#define MERGE_ARGS(T)                                                                       \
    int models, int64_t n, const T *base, const T **deltas, const int32_t **keys,          \
        const int32_t *thresholds, const float *rescale, const float *weights,             \
        int consensus, int normalize, float plain_divisor, int use_lambda, float lambda,   \
        T *out

#define MERGE_BODY(M, T, LOAD, STORE, ROUND)                                                \
    _Pragma("omp parallel for simd schedule(static)")                                      \
    for (int64_t e = 0; e < n; e++) {                                                       \
        float weighted[MAX_MODELS];                                                         \
        for (int i = 0; i < (M); i++) {                                                     \
            float d = LOAD(deltas[i][e]);                                                   \
            int keep = keys[i] == 0 || keys[i][e] < thresholds[i];                          \
            float kept = keep ? d : ROUND(d * 0.0f);                                        \
            kept = ROUND(kept * rescale[i]);                                                \
            weighted[i] = ROUND(kept * weights[i]);                                         \
        }                                                                                   \
        float mixed, divisor;                                                               \
        if (consensus) {                                                                    \
            float total = weighted[0];                                                      \
            for (int i = 1; i < (M); i++) total = total + weighted[i];                      \
            float elected = ROUND(total) >= 0.0f ? 1.0f : -1.0f;                            \
            float agree = sign_of(weighted[0]) == elected ? 1.0f : 0.0f;                    \
            mixed = ROUND(weighted[0] * agree);                                             \
            divisor = ROUND(weights[0] * agree);                                            \
            for (int i = 1; i < (M); i++) {                                                 \
                agree = sign_of(weighted[i]) == elected ? 1.0f : 0.0f;                      \
                mixed = mixed + ROUND(weighted[i] * agree);                                 \
                divisor = divisor + ROUND(weights[i] * agree);                              \
            }                                                                               \
            mixed = ROUND(mixed);                                                           \
            divisor = ROUND(divisor);                                                       \
            divisor = divisor == 0.0f ? 1.0f : divisor;                                     \
        } else {                                                                            \
            mixed = weighted[0];                                                            \
            for (int i = 1; i < (M); i++) mixed = mixed + weighted[i];                      \
            mixed = ROUND(mixed);                                                           \
            divisor = plain_divisor;                                                        \
        }                                                                                   \
        if (normalize) mixed = ROUND(mixed / divisor);                                      \
        if (use_lambda) mixed = ROUND(mixed * lambda);                                      \
        out[e] = STORE(ROUND(LOAD(base[e]) + mixed));                                       \
    }

#define DEFINE_MERGE(NAME, T, LOAD, STORE, ROUND)                                           \
    void NAME(MERGE_ARGS(T)) {                                                              \
        switch (models) {                                                                   \
        case 1: { MERGE_BODY(1, T, LOAD, STORE, ROUND) break; }                             \
        case 2: { MERGE_BODY(2, T, LOAD, STORE, ROUND) break; }                             \
        case 3: { MERGE_BODY(3, T, LOAD, STORE, ROUND) break; }                             \
        case 4: { MERGE_BODY(4, T, LOAD, STORE, ROUND) break; }                             \
        case 5: { MERGE_BODY(5, T, LOAD, STORE, ROUND) break; }                             \
        case 6: { MERGE_BODY(6, T, LOAD, STORE, ROUND) break; }                             \
        case 7: { MERGE_BODY(7, T, LOAD, STORE, ROUND) break; }                             \
        case 8: { MERGE_BODY(8, T, LOAD, STORE, ROUND) break; }                             \
        default: { MERGE_BODY(models, T, LOAD, STORE, ROUND) break; }                       \
        }                                                                                   \
    }

DEFINE_MERGE(tv_merge_f32, float, LOAD_F32, STORE_F32, round_f32)
DEFINE_MERGE(tv_merge_bf16, uint16_t, LOAD_BF16, STORE_BF16, round_bf16)

int max_models(void) { return MAX_MODELS; }

#ifdef _OPENMP
#include <omp.h>
void set_threads(int n) { omp_set_num_threads(n); }
#else
void set_threads(int n) { (void)n; }
#endif
