/* Fused kernels of small dense layers (see cellsight/nn/fused_layers.py, which calls them).
 *
 * 1. The tail of a hidden layer, LayerNorm (no affine parameters) -> ReLU -> dropout, over
 *    the last dimension of a row-major (rows, h) float32 matrix: forward and backward, one
 *    pass over each row (lrd_forward, lrd_backward).
 * 2. The masked cross-entropy of G stacked classifier heads, (G, N, C) logits of which head
 *    g uses the first ncls[g] columns (ce_forward, ce_backward).
 *
 * Dropout masks are not drawn here: the caller passes dropout_bits' random bits (one 16-bit
 * integer per unit; the top bit is ignored) and the threshold, so that the mask equals that
 * of cellsight.models.fadvi.heads.fast_dropout for the same generator state.
 *
 * Built with -O3 -march=native -ffast-math: no code here relies on infinities or NaNs (the
 * padding columns of the cross-entropy are skipped by the loop bounds, not masked to -inf).
 */

#include <math.h>
#include <stddef.h>
#include <stdint.h>

/* Mean and 1/sqrt(biased variance + eps) of one row (two passes; sums in float, which the
 * compiler vectorises, the per-row scalars in double). */
static void row_moments(const float *restrict x, int64_t h, float eps, float *mean_out,
                        float *rstd_out)
{
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int64_t j = 0; j < h; ++j)
        s += x[j];
    const float mean = (float)((double)s / (double)h);
    float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
    for (int64_t j = 0; j < h; ++j) {
        const float d = x[j] - mean;
        ss += d * d;
    }
    const double var = (double)ss / (double)h;
    *mean_out = mean;
    *rstd_out = (float)(1.0 / sqrt(var + (double)eps));
}

/* y = dropout(relu(layer_norm(x))) of each of `rows` rows of length h.
 *
 * x, y        (rows, h) input and output.
 * xhat, rstd  (rows, h) normalised values and (rows,) 1/std, written for the backward when
 *             not NULL (only with layer_norm).
 * bits        (rows * h) random 16-bit integers, or NULL for no dropout; a unit is kept when
 *             (bits & 0x7fff) >= threshold, and kept units are multiplied by scale.
 * layer_norm  0: y = dropout(relu(x)) (xhat and rstd unused).
 */
void lrd_forward(const float *restrict x, float *restrict y, float *restrict xhat,
                 float *restrict rstd, const uint16_t *restrict bits, int64_t rows, int64_t h,
                 float eps, int32_t threshold, float scale, int32_t layer_norm)
{
    for (int64_t r = 0; r < rows; ++r) {
        const float *restrict xr = x + r * h;
        float *restrict yr = y + r * h;
        /* xhat = (x - mean) * rstd: exactly 0 where x equals the mean (a constant row), which
         * the fused multiply-add of x * rstd - mean * rstd would not give */
        float mean = 0.0f, mult = 1.0f;
        if (layer_norm) {
            row_moments(xr, h, eps, &mean, &mult);
            if (rstd)
                rstd[r] = mult;
            if (xhat) {
                float *restrict hr = xhat + r * h;
#pragma omp simd
                for (int64_t j = 0; j < h; ++j)
                    hr[j] = (xr[j] - mean) * mult;
            }
        }
        if (bits) {
            const uint16_t *restrict br = bits + r * h;
#pragma omp simd
            for (int64_t j = 0; j < h; ++j) {
                const float v = (xr[j] - mean) * mult;
                const float keep = ((int32_t)(br[j] & 0x7fff) >= threshold) ? scale : 0.0f;
                yr[j] = (v > 0.0f ? v : 0.0f) * keep;
            }
        } else {
#pragma omp simd
            for (int64_t j = 0; j < h; ++j) {
                const float v = (xr[j] - mean) * mult;
                yr[j] = v > 0.0f ? v : 0.0f;
            }
        }
    }
}

/* Gradient wrt x of lrd_forward, from the gradient gy wrt its output y.
 *
 * y is the forward's output: y > 0 exactly where a unit was kept and positive after the ReLU,
 * so neither the mask nor the pre-activation needs saving. scale is the forward's (1 without
 * dropout). With layer_norm, xhat and rstd are the forward's and, per row, with
 * g = gy * scale * (y > 0),
 *     gx = rstd * (g - mean(g) - xhat * mean(g * xhat));
 * without, gx = g. gx may not alias gy.
 */
void lrd_backward(const float *restrict gy, const float *restrict y,
                  const float *restrict xhat, const float *restrict rstd, float *restrict gx,
                  int64_t rows, int64_t h, float scale, int32_t layer_norm)
{
    for (int64_t r = 0; r < rows; ++r) {
        const float *restrict gr = gy + r * h;
        const float *restrict yr = y + r * h;
        float *restrict out = gx + r * h;
        if (!layer_norm) {
#pragma omp simd
            for (int64_t j = 0; j < h; ++j)
                out[j] = yr[j] > 0.0f ? gr[j] * scale : 0.0f;
            continue;
        }
        const float *restrict hr = xhat + r * h;
        float sg = 0.0f, sgx = 0.0f;
#pragma omp simd reduction(+ : sg, sgx)
        for (int64_t j = 0; j < h; ++j) {
            const float g = yr[j] > 0.0f ? gr[j] * scale : 0.0f;
            sg += g;
            sgx += g * hr[j];
        }
        const float mg = (float)((double)sg / (double)h);
        const float mgx = (float)((double)sgx / (double)h);
        const float rs = rstd[r];
#pragma omp simd
        for (int64_t j = 0; j < h; ++j) {
            const float g = yr[j] > 0.0f ? gr[j] * scale : 0.0f;
            out[j] = rs * (g - mg - hr[j] * mgx);
        }
    }
}

/* Weighted mean cross-entropy of each of G heads.
 *
 * logits  (G, N, C); head g's classes are columns [0, ncls[g]), the rest padding (ignored).
 * target  (G, N) class codes, w (G, N) weights.
 * ce      (G,) out: -sum_n w[g,n] * log_softmax(logits[g,n,:ncls[g]])[target[g,n]] / denom[g].
 * lse     (G, N) out: log-sum-exp of each row's classes (for the backward).
 * denom   (G,) out: max(sum_n w[g,n], 1).
 * Returns the number of targets outside [0, ncls[g]) (those rows are skipped).
 */
int64_t ce_forward(const float *restrict logits, const int64_t *restrict target,
                   const float *restrict w, const int64_t *restrict ncls, float *restrict ce,
                   float *restrict lse, float *restrict denom, int64_t G, int64_t N, int64_t C)
{
    int64_t bad = 0;
    for (int64_t g = 0; g < G; ++g) {
        const int64_t cg = ncls[g] < C ? ncls[g] : C;
        float wsum = 0.0f, acc = 0.0f;
        for (int64_t n = 0; n < N; ++n) {
            const int64_t i = g * N + n;
            const float *restrict row = logits + i * C;
            const int64_t t = target[i];
            wsum += w[i];
            if (cg < 1 || t < 0 || t >= cg) {
                lse[i] = 0.0f;
                ++bad;
                continue;
            }
            float m = row[0];
            for (int64_t c = 1; c < cg; ++c)
                m = row[c] > m ? row[c] : m;
            float s = 0.0f;
#pragma omp simd reduction(+ : s)
            for (int64_t c = 0; c < cg; ++c)
                s += expf(row[c] - m);
            const float l = m + logf(s);
            lse[i] = l;
            acc += w[i] * (row[t] - l);
        }
        const float d = wsum > 1.0f ? wsum : 1.0f;
        denom[g] = d;
        ce[g] = -acc / d;
    }
    return bad;
}

/* Gradient wrt the logits of ce_forward's ce, given grad (G,) wrt ce:
 *     dlogits[g,n,c] = grad[g] * w[g,n] / denom[g] * (softmax[c] - (c == target[g,n]))
 * for c < ncls[g], 0 in the padding columns (and in rows ce_forward skipped).
 */
void ce_backward(const float *restrict logits, const float *restrict lse,
                 const int64_t *restrict target, const float *restrict w,
                 const float *restrict denom, const float *restrict grad,
                 const int64_t *restrict ncls, float *restrict dlogits, int64_t G, int64_t N,
                 int64_t C)
{
    for (int64_t g = 0; g < G; ++g) {
        const int64_t cg = ncls[g] < C ? ncls[g] : C;
        const float per_w = grad[g] / denom[g];
        for (int64_t n = 0; n < N; ++n) {
            const int64_t i = g * N + n;
            const float *restrict row = logits + i * C;
            float *restrict out = dlogits + i * C;
            const int64_t t = target[i];
            const int64_t valid_c = (cg >= 1 && t >= 0 && t < cg) ? cg : 0;
            const float coef = per_w * w[i];
            const float l = lse[i];
#pragma omp simd
            for (int64_t c = 0; c < valid_c; ++c)
                out[c] = coef * expf(row[c] - l);
            for (int64_t c = valid_c; c < C; ++c)
                out[c] = 0.0f;
            if (valid_c)
                out[t] -= coef;
        }
    }
}
