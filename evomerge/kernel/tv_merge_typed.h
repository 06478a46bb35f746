/* The kernels for one storage type; included by tv_merge.c once per type with T, BITS,
 * ABS_MASK, INF_BITS, SUFFIX, IS_FLOAT32, ROUNDS_IN_LOOP and FAST_PATHS defined (see there). No include guard on purpose. */

#define FN(name) CONCAT(name, SUFFIX)
#define LOAD(x) FN(load)(x)
/* Each op's result is rounded to T either where it is computed (ROUND, inside the vectorised
 * loops) or by a pass over the block after the loop (ROUND_ALL): see ROUNDS_IN_LOOP. */
#if ROUNDS_IN_LOOP
#define ROUND(x) FN(round)(x)
#define ROUND_ALL(x, len)
#else
#define ROUND(x) (x)
#define ROUND_ALL(x, len) FN(round_floats)(x, len)
#endif
/* One block of task-vector values as float: x - base (rounded to T, like torch's
 * subtraction), or x itself when base is NULL (x already holds the task vector; float32 then
 * needs no copy at all). */
static inline const float *FN(load_block)(const T *x, const T *base, int64_t start, int64_t len,
                                          float *buf) {
#if IS_FLOAT32
    if (!base) return x + start;
    for (int64_t j = 0; j < len; j++) buf[j] = x[start + j] - base[start + j];
#else
    FN(load_floats)(x + start, len, buf);
    if (base) {
        float sub[BLOCK];
        FN(load_floats)(base + start, len, sub);
        for (int64_t j = 0; j < len; j++) buf[j] = ROUND(buf[j] - sub[j]);
        ROUND_ALL(buf, len);
    }
#endif
    return buf;
}

/* max |x| as a float (NaN when x holds a NaN, Inf for an Inf): the largest of the magnitude
 * bits, which order like the magnitudes themselves. One pass; finiteness for free. */
float FN(abs_peak)(const T *x, int64_t n) {
    const BITS *bits = (const BITS *)x;
    BITS peak = 0;
#pragma omp parallel for reduction(max : peak) schedule(static) if (n > PARALLEL_MIN)
    for (int64_t e = 0; e < n; e++) {
        BITS a = bits[e] & ABS_MASK;
        peak = a > peak ? a : peak;
    }
    T value;
    memcpy(&value, &peak, sizeof(T));
    return LOAD(value);
}

/* Whether a block of stored values holds an Inf or a NaN (magnitude bits at least Inf's): read
 * while the block is still in the L1 cache, so finiteness costs no pass over memory. */
static inline int FN(any_nonfinite)(const T *x, int64_t len) {
    const BITS *bits = (const BITS *)x;
    int bad = 0;
    for (int64_t j = 0; j < len; j++) bad |= (bits[j] & ABS_MASK) >= INF_BITS;
    return bad;
}

/* out = x, and 1 when every value is finite (0 when one is an Inf or a NaN), in one pass. */
int FN(copy_finite)(const T *x, int64_t n, T *out) {
    int bad = 0;
#pragma omp parallel for reduction(| : bad) schedule(static) if (n > PARALLEL_MIN)
    for (int64_t start = 0; start < n; start += 16 * BLOCK) {
        int64_t len = n - start < 16 * BLOCK ? n - start : 16 * BLOCK;
        memcpy(out + start, x + start, (size_t)len * sizeof(T));
        bad |= FN(any_nonfinite)(out + start, len);
    }
    return !bad;
}

/* min |x| over the nonzero elements of x as a float (Inf when there are none): the smallest
 * nonzero magnitude bits (a - 1 wraps the zeros round to the largest), one pass. */
float FN(min_magnitude)(const T *x, int64_t n) {
    const BITS *bits = (const BITS *)x;
    BITS least = (BITS)-1;
#pragma omp parallel for reduction(min : least) schedule(static) if (n > PARALLEL_MIN)
    for (int64_t e = 0; e < n; e++) {
        BITS a = (BITS)((bits[e] & ABS_MASK) - 1);
        least = a < least ? a : least;
    }
    if (least == (BITS)-1) return INFINITY;
    least = (BITS)(least + 1);
    T value;
    memcpy(&value, &least, sizeof(T));
    return LOAD(value);
}

/* For each model i: sums of floor(|d| * scales[i]) over its kept elements and over all of
 * them, exact in int64 (scales are powers of two), in one pass over every model: DARE's L1
 * rescale factor is all / kept. Where bits[i] is not NULL (n/8 bytes rounded up), which
 * elements were kept is stored there too (KEEP_BITS), for tv_merge to read rather than
 * decide again. */
void FN(abs_sums)(int models, int64_t n, const T **xs, const T *sub_base, const keep_rule *rules,
                  const double *scales, int64_t *kept, int64_t *all, uint8_t **bits) {
    int64_t kept_sum[MAX_MODELS] = {0}, all_sum[MAX_MODELS] = {0};
#pragma omp parallel for reduction(+ : kept_sum[:MAX_MODELS], all_sum[:MAX_MODELS]) schedule(static) if (n > PARALLEL_MIN)
    BLOCKS(n) {
        int64_t len = BLOCK_LEN(n);
        float buf[BLOCK];
        uint8_t flags[BLOCK] = {0};
        for (int i = 0; i < models; i++) {
            const float *block = FN(load_block)(xs[i], sub_base, start, len, buf);
            double scale = scales[i];
            int64_t part = 0, whole = 0;
            FOR_EACH_KEPT(&rules[i], block, load_f32, start, len,
                          int64_t q = (int64_t)((double)fabsf(d) * scale);
                          part += keep ? q : 0; whole += q; flags[j] = (uint8_t)keep;)
            if (bits[i]) pack_bits(flags, len, bits[i] + start / 8);
            kept_sum[i] += part;
            all_sum[i] += whole;
        }
    }
    for (int i = 0; i < models; i++) {
        kept[i] = kept_sum[i];
        all[i] = all_sum[i];
    }
}

/* DARE's L1 table (sparsify.draw_l1_table) before its cumulative sum: sums[b + 1] gets
 * floor(|x| * scale) of every element whose draw (as KEEP_HASH_BELOW draws it) is b. One
 * table per thread, summed (exact integers: the split cannot matter). */
void FN(draw_l1_table)(const T *x, int64_t n, uint32_t hash_key, double scale, int64_t *sums) {
#pragma omp parallel if (n > PARALLEL_MIN)
    {
        int64_t *local = calloc(((size_t)1 << DRAW_BITS) + 1, sizeof(int64_t));
        float buf[BLOCK];
        block_draws draws;
        int64_t q[BLOCK];
#pragma omp for schedule(static)
        BLOCKS(n) {
            int64_t len = BLOCK_LEN(n);
            const float *block = FN(load_block)(x, NULL, start, len, buf);
            draw_block(hash_key, start, len, &draws);
            for (int64_t j = 0; j < len; j++) q[j] = (int64_t)((double)fabsf(block[j]) * scale);
            for (int64_t j = 0; j < len; j++) local[draws.of[j] + 1] += q[j];
        }
#pragma omp critical
        for (int64_t b = 0; b <= ((int64_t)1 << DRAW_BITS); b++) sums[b] += local[b];
        free(local);
    }
}

/* hist[bucket(|d|)] over every element, `bucket` = the high 16 bits of |d| as float32, or
 * (with `high` >= 0) the low 16 bits of those whose high bits equal `high`; one histogram per
 * thread, summed (the counts do not depend on the split). */
static void FN(magnitude_histogram)(const T *x, const T *base, int64_t n, int high, int64_t *hist) {
#pragma omp parallel if (n > PARALLEL_MIN)
    {
        int64_t *local = calloc(65536, sizeof(int64_t));
        float buf[BLOCK];
#pragma omp for schedule(static)
        BLOCKS(n) {
            int64_t len = BLOCK_LEN(n);
            const float *block = FN(load_block)(x, base, start, len, buf);
            if (high < 0) {
                for (int64_t j = 0; j < len; j++) local[abs_bits(block[j]) >> 16]++;
            } else { /* few elements fall in the bucket: a loop that vectorises finds the
                      * runs of 32 that hold any, and only those are counted one by one */
                for (int64_t run = 0; run < len; run += 32) {
                    int64_t end = run + 32 < len ? run + 32 : len;
                    uint32_t in_bucket = 0;
                    for (int64_t j = run; j < end; j++)
                        in_bucket |= (uint32_t)((abs_bits(block[j]) >> 16) == (uint32_t)high);
                    if (!in_bucket) continue;
                    for (int64_t j = run; j < end; j++) {
                        uint32_t a = abs_bits(block[j]);
                        if ((int)(a >> 16) == high) local[a & 0xffffu]++;
                    }
                }
            }
        }
#pragma omp critical
        for (int b = 0; b < 65536; b++) hist[b] += local[b];
        free(local);
    }
}

/* bfloat16 is float32's high half: the low 16 bits of |d| as float32 are 0, so the high
 * half alone orders its magnitudes (one histogram pass, none within the bucket). */
#if !IS_FLOAT32 && INF_BITS == 0x7f80u
#define LOW_HALF_ZERO 1
#else
#define LOW_HALF_ZERO 0
#endif

/* The index just past the need-th element (need >= 1, in index order) whose |d| has float32
 * bits `bits`: with threads, a large tensor counts them in 64 parts in parallel, then scans
 * the one part that holds it; otherwise one scan from the start stops there. Either way whole
 * blocks are counted in a loop that vectorises, and only the block that holds it is walked. */
#define TIE_PARTS 64
static int64_t FN(nth_tie)(const T *x, const T *base, int64_t n, uint32_t bits, int64_t need) {
    int64_t counts[TIE_PARTS] = {0}, seen = 0, from = 0;
    if (n > PARALLEL_MIN && MAX_THREADS() > 1) {
        int64_t part = ((n + TIE_PARTS - 1) / TIE_PARTS + BLOCK - 1) / BLOCK * BLOCK;
#pragma omp parallel for schedule(static)
        for (int p = 0; p < TIE_PARTS; p++) {
            float buf[BLOCK];
            int64_t count = 0, end = (p + 1) * part < n ? (p + 1) * part : n;
            for (int64_t start = p * part; start < end; start += BLOCK) {
                int64_t len = end - start < BLOCK ? end - start : BLOCK;
                const float *block = FN(load_block)(x, base, start, len, buf);
                for (int64_t j = 0; j < len; j++) count += abs_bits(block[j]) == bits;
            }
            counts[p] = count;
        }
        int p = 0;
        while (seen + counts[p] < need) seen += counts[p++];
        from = p * part;
    }
    float buf[BLOCK];
    for (int64_t start = from; start < n; start += BLOCK) {
        int64_t len = BLOCK_LEN(n);
        const float *block = FN(load_block)(x, base, start, len, buf);
        int64_t count = 0; /* a whole block's ties first */
        for (int64_t j = 0; j < len; j++) count += abs_bits(block[j]) == bits;
        if (seen + count < need) {
            seen += count;
            continue;
        }
        int64_t j = 0;
        for (; seen < need; j++) seen += abs_bits(block[j]) == bits;
        return start + j;
    }
    return n; /* not reached: the ties number at least need */
}

/* The cut for keeping the k largest |d| (1 <= k < n), given `high_hist`, the histogram of
 * the high 16 bits of |d| as float32 (bits monotonic for non-negative numbers; a magnitude
 * has its sign bit clear, so only the first 32768 buckets can be nonzero): the bucket where
 * the top k end, then the low 16 bits within it (a pass, unless they are all 0), then the
 * index below which ties at the cut are kept (a scan, unless every tie is kept). */
static void FN(cut_from_histogram)(const T *x, const T *base, int64_t n, int64_t k,
                                   const int64_t *high_hist, uint32_t *cut_bits,
                                   int64_t *cutoff) {
    int64_t above = 0;
    int high = 32767;
    while (above + high_hist[high] < k) above += high_hist[high--];
    int low = 0;
    int64_t at_cut = high_hist[high];
    if (!LOW_HALF_ZERO) {
        int64_t *hist = calloc(65536, sizeof(int64_t));
        FN(magnitude_histogram)(x, base, n, high, hist);
        low = 65535;
        while (above + hist[low] < k) above += hist[low--];
        at_cut = hist[low];
        free(hist);
    }
    uint32_t bits = ((uint32_t)high << 16) | (uint32_t)low;
    int64_t need = k - above; /* some ties at the cut are dropped where need < at_cut */
    *cut_bits = bits;
    *cutoff = need < at_cut ? FN(nth_tie)(x, base, n, bits, need) : n;
}

/*
 * The magnitude cut for keeping the k largest |d| (1 <= k < n): radix select over the bits
 * of |d| as float32, high 16 bits then low 16 bits, then the ties (cut_from_histogram).
 */
void FN(magnitude_cut)(const T *x, const T *base, int64_t n, int64_t k, uint32_t *cut_bits,
                       int64_t *cutoff) {
    int64_t *hist = calloc(65536, sizeof(int64_t));
    FN(magnitude_histogram)(x, base, n, -1, hist);
    FN(cut_from_histogram)(x, base, n, k, hist, cut_bits, cutoff);
    free(hist);
}

/* What a resident task vector keeps for TIES instead of magnitude ranks, so that each
 * merge's cut takes no histogram pass over it: the counts of |x| by the high 16 bits of its
 * float32 form (float32: the first 32768 buckets, the only ones a magnitude fills), or by
 * its own magnitude bits (16-bit types: each bucket is one value, so no pass within it). */
void FN(magnitude_table)(const T *x, int64_t n, int64_t *table) {
#if IS_FLOAT32
    int64_t *hist = calloc(65536, sizeof(int64_t));
    FN(magnitude_histogram)(x, NULL, n, -1, hist);
    memcpy(table, hist, 32768 * sizeof(int64_t));
    free(hist);
#else
    memset(table, 0, 32768 * sizeof(int64_t));
#pragma omp parallel if (n > PARALLEL_MIN)
    {
        int64_t *local = calloc(32768, sizeof(int64_t));
#pragma omp for schedule(static)
        for (int64_t e = 0; e < n; e++) local[x[e] & ABS_MASK]++;
#pragma omp critical
        for (int b = 0; b < 32768; b++) table[b] += local[b];
        free(local);
    }
#endif
}

/* magnitude_cut of a stored task vector from its magnitude_table. */
void FN(magnitude_cut_from)(const T *x, int64_t n, int64_t k, const int64_t *table,
                            uint32_t *cut_bits, int64_t *cutoff) {
#if IS_FLOAT32
    FN(cut_from_histogram)(x, NULL, n, k, table, cut_bits, cutoff);
#else
    int64_t above = 0;
    uint32_t key = 32767;
    while (above + table[key] < k) above += table[key--];
    int64_t need = k - above;
    *cut_bits = abs_bits(LOAD((T)key));
    *cutoff = need < table[key] ? FN(nth_tie)(x, NULL, n, *cut_bits, need) : n;
#endif
}

/* One model's share of a block: w * s * tau (s = keep mask times the L1 factor), each
 * product rounded to T as torch rounds it; multiplying by the mask is exact. */
#if ROUNDS_IN_LOOP /* both products in one loop */
#define WEIGH_SCALED(block, TO_FLOAT)                                                       \
    FOR_EACH_KEPT(rule, block, TO_FLOAT, start, len,                                        \
                  weighted[j] = ROUND(ROUND(masked(d, keep) * scale) * w);)
#else
#define WEIGH_SCALED(block, TO_FLOAT)                                                       \
    FOR_EACH_KEPT(rule, block, TO_FLOAT, start, len,                                        \
                  weighted[j] = masked(d, keep) * scale;)                                   \
    FN(times_rounded)(weighted, len, w); /* round(d * keep * scale) * w, in one F16C pass */
#endif
#define WEIGH(block, TO_FLOAT)                                                              \
    if (scale == 1.0f) {                                                                    \
        FOR_EACH_KEPT(rule, block, TO_FLOAT, start, len,                                    \
                      weighted[j] = ROUND(masked(d, keep) * w);)                            \
    } else {                                                                                \
        WEIGH_SCALED(block, TO_FLOAT)                                                       \
    }                                                                                       \
    ROUND_ALL(weighted, len);

static inline void FN(weigh_block)(const T *x, const T *sub_base, const keep_rule *rule,
                                   float scale, float w, int64_t start, int64_t len, float *buf,
                                   float *weighted) {
    if (ROUNDS_IN_LOOP && !sub_base) { /* a stored task vector, converted as it is read */
        const T *stored = x + start;
        WEIGH(stored, LOAD)
    } else {
        const float *block = FN(load_block)(x, sub_base, start, len, buf);
        WEIGH(block, load_f32)
    }
}

/* For the block's element j: `sum` over models and, under consensus, `weight`, the sum of
 * the weights of the models that agree with the elected sign (only those count in `sum`).
 * Sums over models accumulate in float and round once, starting from +0 as torch's do (a sum
 * of -0s is +0). The elected sign is the sign of the sum rounded to T, which is the sign of
 * the float sum: a sum of T values is a multiple of T's smallest step, so it cannot round to
 * zero unless it is zero. Products with the agreement mask are exact. (`weight` multiplies by
 * the mask rather than selecting: with two selects in the loop gcc gives up vectorising it.) */
#define SUMS(M, CONSENSUS)                                                                  \
    float sum = weighted[0][j], weight = 0.0f;                                              \
    for (int i = 1; i < (M); i++) sum = sum + weighted[i][j];                               \
    if (CONSENSUS) {                                                                        \
        uint32_t flip = sum >= 0.0f ? 0u : 0x80000000u; /* an exact 0 counts as + */        \
        sum = 0.0f;                                                                         \
        for (int i = 0; i < (M); i++) {                                                     \
            float x = weighted[i][j];                                                       \
            int agree = agrees(x, flip);                                                    \
            sum = sum + masked(x, agree);                                                   \
            weight = weight + weights[i] * (float)agree;                                    \
        }                                                                                   \
    } else {                                                                                \
        sum = 0.0f + sum; /* ((0 + w0) + w1) + ...: the same but for the sign of a zero */  \
    }

#if ROUNDS_IN_LOOP
/* The rest of the merge in the same loop: rounded sum, / Z (the agreeing weights, 0
 * counting as 1, or plain_divisor), times lambda, plus the base, each step rounded to T. */
#define COMBINE(M, CONSENSUS, NORMALIZE, LAMBDA)                                            \
    for (int64_t j = first; j < len; j++) {                                                 \
        SUMS(M, CONSENSUS)                                                                  \
        float mixed = ROUND(sum);                                                           \
        if (NORMALIZE) {                                                                    \
            float divisor = (CONSENSUS) ? ROUND(weight) : plain_divisor;                    \
            divisor = (CONSENSUS) && divisor == 0.0f ? 1.0f : divisor;                      \
            mixed = ROUND(mixed / divisor);                                                 \
        }                                                                                   \
        if (LAMBDA) mixed = ROUND(mixed * lambda);                                          \
        out[start + j] = FN(store)(LOAD(base[start + j]) + mixed);                          \
    }
/* lambda fixed at compile time too: gcc keeps a runtime test's work in the loop */
#define COMBINE_L(M, CONSENSUS, NORMALIZE)                                                  \
    if (use_lambda) {                                                                       \
        COMBINE(M, CONSENSUS, NORMALIZE, 1)                                                 \
    } else {                                                                                \
        COMBINE(M, CONSENSUS, NORMALIZE, 0)                                                 \
    }
#else
/* The same, a step per loop, each rounding the result of the step before it as it reads it
 * (float16's conversions run as F16C instructions a block at a time). */
#define COMBINE_L(M, CONSENSUS, NORMALIZE)                                                  \
    for (int64_t j = first; j < len; j++) {                                                 \
        SUMS(M, CONSENSUS)                                                                  \
        mixed[j] = sum;                                                                     \
        if (NORMALIZE) divisor[j] = (CONSENSUS) ? weight : plain_divisor;                   \
    }                                                                                       \
    FN(finish_block)(mixed + first, divisor + first, len - first, CONSENSUS, NORMALIZE,     \
                     use_lambda, lambda);                                                   \
    FN(add_rounded_to_base)(base + start + first, mixed + first, len - first, out + start + first);

/* mixed / Z, times lambda: the last step's result is left unrounded (the store rounds it) */
static inline void FN(finish_block)(float *mixed, float *divisor, int64_t len, int consensus,
                                    int normalize, int use_lambda, float lambda) {
    if (normalize) {
        ROUND_ALL(mixed, len);
        if (consensus) {
            ROUND_ALL(divisor, len);
            for (int64_t j = 0; j < len; j++) divisor[j] = divisor[j] == 0.0f ? 1.0f : divisor[j];
        }
        for (int64_t j = 0; j < len; j++) mixed[j] = mixed[j] / divisor[j];
    }
    if (use_lambda) FN(times_rounded)(mixed, len, lambda);
}
#endif

/* consensus and normalize fixed at compile time: no dead work in the hot loop */
#define COMBINE_M(M)                                                                        \
    if (consensus && normalize) {                                                           \
        COMBINE_L(M, 1, 1)                                                                  \
    } else if (consensus) {                                                                 \
        COMBINE_L(M, 1, 0)                                                                  \
    } else if (normalize) {                                                                 \
        COMBINE_L(M, 0, 1)                                                                  \
    } else {                                                                                \
        COMBINE_L(M, 0, 0)                                                                  \
    }

/*
 * out = base + lambda * sum_i(w_i m_i s_i tau_i) / Z   (see task_arithmetic.py), where
 *   tau_i = xs[i] - (sub_base or nothing), s_i = rules[i], rescale[i] = the L1 factor
 *   (1 when not rescaling), m_i the sign-consensus mask; Z = plain_divisor without consensus.
 * Work goes in blocks: first each model's weighted, sparsified task vector for the block
 * (one vectorised loop per model and rule), then the combination across models (unrolled
 * for up to 4 models); each stored block is checked for Infs and NaNs while it is in the L1
 * cache. Returns 1 when every value of out is finite, else 0. subnormal_free: the caller has
 * made sure that no value this merge computes can be subnormal
 * (kernel/task_vectors.py, FusedTensor.subnormal_free), which bfloat16's fast path needs.
 */
int FN(tv_merge)(int models, int64_t n, const T *base, const T **xs, const T *sub_base,
                  const keep_rule *rules, const float *rescale, const float *weights,
                  int consensus, int normalize, float plain_divisor, int use_lambda,
                  float lambda, int subnormal_free, T *out) {
    (void)subnormal_free; /* read by the fast paths only */
    int nonfinite = 0;
#pragma omp parallel for reduction(| : nonfinite) schedule(static) if (n > PARALLEL_MIN)
    BLOCKS(n) {
        int64_t len = BLOCK_LEN(n);
        float weighted[MAX_MODELS][BLOCK], buf[BLOCK];
#if !ROUNDS_IN_LOOP
        float mixed[BLOCK], divisor[BLOCK];
#endif
        int64_t first = 0; /* elements below it are combined and stored already */
        for (int i = 0; i < models; i++) {
#if FAST_PATHS /* tv_merge_avx512.h, where it applies */
            if (FN(weigh_fast)(xs[i], sub_base, &rules[i], rescale[i], weights[i], start, len, weighted[i],
                               subnormal_free))
                continue;
#endif
            FN(weigh_block)(xs[i], sub_base, &rules[i], rescale[i], weights[i], start, len, buf, weighted[i]);
        }
#if FAST_PATHS
        first = FN(combine_fast)(models, (const float(*)[BLOCK])weighted, base, consensus, normalize, use_lambda,
                                 start, len, out, subnormal_free);
#endif
        switch (models) {
        case 1: COMBINE_M(1) break;
        case 2: COMBINE_M(2) break;
        case 3: COMBINE_M(3) break;
        case 4: COMBINE_M(4) break;
        default: COMBINE_M(models) break;
        }
        nonfinite |= FN(any_nonfinite)(out + start, len);
    }
    return !nonfinite;
}

#undef COMBINE
#undef COMBINE_L
#undef WEIGH
#undef WEIGH_SCALED
#undef SUMS
#undef ROUND
#undef COMBINE_M
#undef FN
#undef LOAD
#undef ROUND_ALL
#undef T
#undef BITS
#undef ABS_MASK
#undef INF_BITS
#undef SUFFIX
#undef IS_FLOAT32
#undef ROUNDS_IN_LOOP
#undef FAST_PATHS
#undef LOW_HALF_ZERO
#undef TIE_PARTS
