/* Counter-based random 64-bit words for dropout masks (see cellsight/nn/dropout.py).
 *
 * Word i of a draw with seed s is SplitMix64's output for the counter s + (i + 1) * golden
 * (Steele, Lea & Flood 2014: the finaliser of Stafford's "Mix13" variant), a function of
 * (s, i) alone, so the words are computed independently (vectorised) and the torch fallback
 * in dropout.py gives the same bits with the same integer arithmetic. Arithmetic is modulo
 * 2^64 (unsigned).
 */

#include <stdint.h>

void splitmix_words(uint64_t seed, int64_t n, uint64_t *restrict out)
{
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
        uint64_t z = seed + (uint64_t)(i + 1) * 0x9E3779B97F4A7C15ull;
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
        out[i] = z ^ (z >> 31);
    }
}
