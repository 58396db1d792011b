/* MLM corruption of DNA crops in one pass per token: the native path of caduceus_dist/data/masking.py.
 *
 * For each crop (a run of `length` stored bytes inside the window arena, read forwards or, for the
 * reverse-complement strand, backwards), this writes the model inputs and the loss targets exactly as
 * the NumPy path does, bit for bit. A stored byte is a token id (< 16) plus the soft-mask flag (16) where
 * the base was lower case; the tables map id | flag to token | flag, so the flag rides along:
 *
 *   token   = forward_lut[byte] (N -> [PAD])  or  reverse_lut[byte] (complement, N -> [PAD]), read backwards
 *   u       = uint32 number `col` of the row's SplitMix64 stream: z_p = mix64(key + (p + 1) * GOLDEN)
 *             for pair p = col / 2, low half (in memory order) for even col, high half for odd col
 *   target  = token (flag kept, for the loss weighting) if u < t_sel else pad_id
 *   input   = mask_id if u < t_mask; (u - t_mask) * vocab / (t_rand - t_mask) if t_mask <= u < t_rand;
 *             token without the flag otherwise
 *
 * t_rand <= t_sel (the caller clips it), so "t_mask <= u < t_rand" is "selected, not [MASK], in the random
 * band". Thresholds are in [0, 2^32], hence uint64. Everything is a function of the key and the column,
 * so any split of the rows across calls, threads or processes gives the same bytes.
 *
 * Work is done in blocks of BLOCK tokens, in passes: the randoms and the branch-free selects (which the
 * compiler vectorises), the table lookups (vpshufb where AVX2 is there, else scalar), and a scan for the
 * ~1.5% random ids (whose 64-bit division would dominate if done for every token).
 */

#include <stdint.h>
#include <string.h>

#define GOLDEN 0x9E3779B97F4A7C15ULL
#define BLOCK 4096 /* tokens per block: randoms, tokens and flags = 24 KiB, in L1/L2 */

static inline uint64_t mix64(uint64_t z) {
    z ^= z >> 30;
    z *= 0xBF58476D1CE4E5B9ULL;
    z ^= z >> 27;
    z *= 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

/* uint32 views of the 64-bit draws in memory order, as numpy's .view(np.uint32) of the uint64 array */
typedef union {
    uint64_t z[BLOCK / 2];
    uint32_t u[BLOCK];
} Draws;

static void draw_block(uint64_t key, int64_t first_pair, int64_t pairs, Draws *d) {
    uint64_t counter = key + (uint64_t)(first_pair + 1) * GOLDEN;
    for (int64_t p = 0; p < pairs; p++)
        d->z[p] = mix64(counter + (uint64_t)p * GOLDEN);
}

static void load_tokens_scalar(const uint8_t *restrict src, int reverse, int64_t cols, const uint8_t *restrict lut,
                               uint8_t *restrict tok) {
    if (reverse) /* src points at the last base of this block's part of the crop */
        for (int64_t j = 0; j < cols; j++)
            tok[j] = lut[src[-j]];
    else
        for (int64_t j = 0; j < cols; j++)
            tok[j] = lut[src[j]];
}

#if defined(__AVX2__)
#include <immintrin.h>

/* Stored bytes are token ids (< 16) plus the soft-mask flag (16): 32 at a time through the table's first
 * 16 entries (vpshufb on the id), the flag OR-ed back (lut[id | 16] == lut[id] | 16), reversed in the
 * register for the reverse strand. Any chunk holding a byte >= 32 takes the scalar table, so the result
 * is lut[byte] for every byte either way. */
static void load_tokens(const uint8_t *restrict src, int reverse, int64_t cols, const uint8_t *restrict lut,
                        uint8_t *restrict tok) {
    const __m256i table = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)lut));
    const __m256i above_flag = _mm256_set1_epi8((char)0xE0), flag = _mm256_set1_epi8(0x10);
    const __m256i id_bits = _mm256_set1_epi8(0x0F);
    const __m256i reverse_lane = _mm256_setr_epi8(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0,
                                                  15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    int64_t j = 0;
    for (; j + 32 <= cols; j += 32) {
        __m256i bytes = _mm256_loadu_si256((const __m256i *)(reverse ? src - j - 31 : src + j));
        if (reverse) /* bytes 31..0 of the crop's block order: reverse within lanes, then swap the lanes */
            bytes = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(bytes, reverse_lane), 0x4E);
        if (_mm256_testz_si256(bytes, above_flag))
            _mm256_storeu_si256((__m256i *)(tok + j),
                                _mm256_or_si256(_mm256_shuffle_epi8(table, _mm256_and_si256(bytes, id_bits)),
                                                _mm256_and_si256(bytes, flag)));
        else
            load_tokens_scalar(reverse ? src - j : src + j, reverse, 32, lut, tok + j);
    }
    load_tokens_scalar(reverse ? src - j : src + j, reverse, cols - j, lut, tok + j);
}
#else
#define load_tokens load_tokens_scalar
#endif

/* Inclusive uint32 form of "u < t" for t in [0, 2^32]: u <= last, and nothing at all when t == 0. */
typedef struct {
    uint32_t last;
    uint8_t any; /* 0xFF, or 0 when t == 0 */
} Below;

static Below below(uint64_t t) {
    Below b = {t ? (uint32_t)(t - 1) : 0, t ? 0xFF : 0};
    return b;
}

static void select_block(const uint32_t *restrict u, const uint8_t *restrict tok, int64_t cols, Below sel,
                         Below mask, uint32_t band_first, Below band, uint8_t mask_id, uint8_t pad_id,
                         uint8_t *restrict inputs, uint8_t *restrict targets, uint8_t *restrict in_band) {
    for (int64_t j = 0; j < cols; j++) { /* branch-free byte masks, so that it vectorises */
        uint8_t selected = (uint8_t)-(uint8_t)(u[j] <= sel.last) & sel.any;
        uint8_t masked = (uint8_t)-(uint8_t)(u[j] <= mask.last) & mask.any;
        targets[j] = (uint8_t)((tok[j] & selected) | (pad_id & ~selected));
        inputs[j] = (uint8_t)((mask_id & masked) | (tok[j] & 0x0F & ~masked));
        in_band[j] = (uint8_t)((uint32_t)(u[j] - band_first) <= band.last) & band.any; /* 0 or 1 */
    }
    memset(in_band + cols, 0, 8); /* a short last block must not see the flags of the block before */
}

/* The ~1.5% positions flagged in_band get a uniform id; the flags are scanned 8 at a time. */
static void random_ids(const uint32_t *u, const uint8_t *in_band, int64_t cols, uint64_t t_mask, uint64_t band,
                       uint64_t vocab, uint8_t *inputs) {
    for (int64_t j = 0; j < cols; j += 8) {
        uint64_t word; /* in_band is padded to a multiple of 8 with zeros */
        memcpy(&word, in_band + j, 8);
        while (word) {
            int64_t k = j + __builtin_ctzll(word) / 8;
            inputs[k] = (uint8_t)(((uint64_t)u[k] - t_mask) * vocab / band);
            word &= word - 1;
        }
    }
}

/* Row i: crop of `length` bases starting at arena[starts[i]], reverse-complemented where reverse[i],
 * masked with the stream keys[i], written to row out_rows[i] of inputs / targets (row-major, `length`
 * wide). Returns 0. */
int mlm_mask_crops(const uint8_t *arena, const int64_t *starts, const uint8_t *reverse, const uint64_t *keys,
                   const int64_t *out_rows, int64_t rows, int64_t length, const uint8_t *forward_lut,
                   const uint8_t *reverse_lut, uint64_t t_sel, uint64_t t_mask, uint64_t t_rand, uint64_t vocab,
                   uint8_t mask_id, uint8_t pad_id, uint8_t *inputs, uint8_t *targets) {
    Draws draws; /* with tok and in_band: 24 KiB of stack */
    uint8_t tok[BLOCK], in_band[BLOCK + 8];
    /* random band: t_mask <= u < t_rand, i.e. (uint32)(u - t_mask) < t_rand - t_mask (empty unless t_mask < 2^32) */
    uint64_t band = t_rand > t_mask ? t_rand - t_mask : 0;
    Below sel = below(t_sel), mask = below(t_mask), in_band_test = below(band);
    for (int64_t i = 0; i < rows; i++) {
        const uint8_t *crop = arena + starts[i];
        uint8_t *row_inputs = inputs + out_rows[i] * length, *row_targets = targets + out_rows[i] * length;
        for (int64_t col = 0; col < length; col += BLOCK) { /* BLOCK is even: blocks start on a whole pair */
            int64_t cols = length - col < BLOCK ? length - col : BLOCK;
            draw_block(keys[i], col / 2, (cols + 1) / 2, &draws);
            load_tokens(reverse[i] ? crop + length - 1 - col : crop + col, reverse[i], cols,
                        reverse[i] ? reverse_lut : forward_lut, tok);
            select_block(draws.u, tok, cols, sel, mask, (uint32_t)t_mask, in_band_test, mask_id, pad_id,
                         row_inputs + col, row_targets + col, in_band);
            if (band)
                random_ids(draws.u, in_band, cols, t_mask, band, vocab, row_inputs + col);
        }
    }
    return 0;
}
