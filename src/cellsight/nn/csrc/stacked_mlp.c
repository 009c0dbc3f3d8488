/* Forward and backward passes of G stacked multi-layer perceptrons in one call each: FADVI's
 * classifier heads (cellsight.models.fadvi.fast_step), and the hidden layers of its three
 * encoders. Each network g has L hidden layers Linear -> [LayerNorm] -> ReLU -> [dropout]
 * (the fused tail of dense.c) and, for the heads, a Linear output scored by the masked
 * cross-entropy of dense.c. The matrix products call the BLAS sgemm that torch itself uses
 * (MKL's, whose address the caller passes to set_sgemm once), so that a pass is one foreign
 * call instead of some twenty torch operations, each with its own dispatch and allocation.
 *
 * Layouts (row-major, float32): inputs (n, k) per network; weights (in, out) as stored by
 * ParallelClassifiers (which computes x W + b) or (out, in) as nn.Linear stores them, one
 * pointer per layer and network; activations act[l] (G, n, h) of hidden layer l, with the
 * LayerNorm's xhat[l] (G, n, h) and rstd[l] (G n) for the backward.
 */
#include "dense.c"

#include <string.h>

typedef void (*sgemm_fn)(const char *, const char *, const int *, const int *, const int *,
                         const float *, const float *, const int *, const float *,
                         const int *, const float *, float *, const int *);
static sgemm_fn sgemm_ptr = NULL;

/* The Fortran sgemm to use (column-major, as exported by the BLAS torch links). */
void set_sgemm(void *fn) { sgemm_ptr = (sgemm_fn)fn; }

int has_sgemm(void) { return sgemm_ptr != NULL; }

/* Row-major C (m x n) = alpha op(A) op(B) + beta C, op(X) = X or X^T (ta, tb). */
static void gemm(int ta, int tb, int m, int n, int k, float alpha, const float *A, int lda,
                 const float *B, int ldb, float beta, float *C, int ldc) {
    const char a = tb ? 'T' : 'N', b = ta ? 'T' : 'N';
    sgemm_ptr(&a, &b, &n, &m, &k, &alpha, B, &ldb, A, &lda, &beta, C, &ldc);
}

/* out (n, w) rows = bias (w) */
static void fill_rows(float *out, const float *bias, int64_t n, int64_t w) {
    for (int64_t i = 0; i < n; ++i) memcpy(out + i * w, bias, (size_t)w * sizeof(float));
}

/* column sums of d (n, w) into out (w), added (accumulate) or written */
static void col_sums(const float *d, int64_t n, int64_t w, float *out, int accumulate) {
    if (!accumulate) memset(out, 0, (size_t)w * sizeof(float));
    for (int64_t i = 0; i < n; ++i) {
        const float *r = d + i * w;
#pragma omp simd
        for (int64_t c = 0; c < w; ++c) out[c] += r[c];
    }
}

/* Hidden layers of G networks, forward. widths[0] = k (input), widths[l] = h for l >= 1.
 * x[g]: network g's input (n, k) (the same pointer for every g when they share it).
 * W[l G + g], B[l G + g]: layer l of network g, W (in, out) or, with wt, (out, in) as
 * nn.Linear stores it; B (out). bits[l]: dropout bits of layer l (G n h), or NULL.
 * act[l], xhat[l], rstd[l]: (G, n, h) outputs, normalised values, (G n) 1/std of layer l.
 * pre: scratch (G, n, h). */
void mlp_forward(int64_t G, int64_t n, int64_t L, const int64_t *widths, const float *const *x,
                 const float *const *W, const float *const *B, int32_t wt,
                 const uint16_t *const *bits, int32_t threshold, float scale, float eps,
                 int32_t layer_norm, float *const *act, float *const *xhat,
                 float *const *rstd, float *pre) {
    for (int64_t l = 0; l < L; ++l) {
        const int64_t in = widths[l], out = widths[l + 1];
        for (int64_t g = 0; g < G; ++g) {
            const float *src = l == 0 ? x[g] : act[l - 1] + g * n * in;
            float *p = pre + g * n * out;
            fill_rows(p, B[l * G + g], n, out);
            gemm(0, wt, (int)n, (int)out, (int)in, 1.0f, src, (int)in, W[l * G + g],
                 wt ? (int)in : (int)out, 1.0f, p, (int)out);
        }
        lrd_forward(pre, act[l], layer_norm ? xhat[l] : NULL, layer_norm ? rstd[l] : NULL,
                    bits[l], G * n, out, eps, bits[l] ? threshold : 0, scale, layer_norm);
    }
}

/* Hidden layers, backward. d (G, n, h) = d loss / d act[L - 1], used as scratch; other:
 * scratch (G, n, h). gW[l G + g], gB[l G + g]: parameter gradients in W's layout (written),
 * or gW == NULL: none. gx[g] (n, k): the inputs' gradients (written), or gx == NULL. */
void mlp_backward(int64_t G, int64_t n, int64_t L, const int64_t *widths, const float *const *x,
                  const float *const *W, int32_t wt, float *const *act, float *const *xhat,
                  float *const *rstd, float scale, int32_t layer_norm, float *d,
                  float *const *gW, float *const *gB, float *const *gx, float *other) {
    for (int64_t l = L - 1; l >= 0; --l) {
        const int64_t in = widths[l], out = widths[l + 1];
        /* through the tail of layer l: d (of act[l]) -> other (of its pre-activation) */
        lrd_backward(d, act[l], layer_norm ? xhat[l] : NULL, layer_norm ? rstd[l] : NULL,
                     other, G * n, out, scale, layer_norm);
        for (int64_t g = 0; g < G; ++g) {
            const float *dp = other + g * n * out;
            const float *src = l == 0 ? x[g] : act[l - 1] + g * n * in;
            if (gW) {
                if (wt)  /* (out, in) = dp^T src */
                    gemm(1, 0, (int)out, (int)in, (int)n, 1.0f, dp, (int)out, src, (int)in,
                         0.0f, gW[l * G + g], (int)in);
                else     /* (in, out) = src^T dp */
                    gemm(1, 0, (int)in, (int)out, (int)n, 1.0f, src, (int)in, dp, (int)out,
                         0.0f, gW[l * G + g], (int)out);
                col_sums(dp, n, out, gB[l * G + g], 0);
            }
            if (l == 0 && !gx) continue;
            float *dst = l == 0 ? gx[g] : d + g * n * in;  /* d's values are consumed */
            gemm(0, wt ? 0 : 1, (int)n, (int)in, (int)out, 1.0f, dp, (int)out, W[l * G + g],
                 wt ? (int)in : (int)out, 0.0f, dst, (int)in);
        }
    }
}

/* Output layer and masked cross-entropy, forward: logits (G, n, c) = act (G, n, h) Wo + Bo;
 * ce (G,), lse (G, n), denom (G,) as ce_forward. Returns ce_forward's count of bad targets. */
int64_t head_out_forward(int64_t G, int64_t n, int64_t h, int64_t c, const float *act,
                         const float *Wo, const float *Bo, float *logits, const int64_t *target,
                         const float *weight, const int64_t *ncls, float *ce, float *lse,
                         float *denom) {
    for (int64_t g = 0; g < G; ++g) {
        float *lg = logits + g * n * c;
        fill_rows(lg, Bo + g * c, n, c);
        gemm(0, 0, (int)n, (int)c, (int)h, 1.0f, act + g * n * h, (int)h, Wo + g * h * c,
             (int)c, 1.0f, lg, (int)c);
    }
    return ce_forward(logits, target, weight, ncls, ce, lse, denom, G, n, c);
}

/* Output layer backward: dlogits (G, n, c) from grad (G,) = d loss / d ce; gWo, gBo (written,
 * or gWo == NULL); d_act (G, n, h) = d loss / d act. */
void head_out_backward(int64_t G, int64_t n, int64_t h, int64_t c, const float *act,
                       const float *Wo, const float *logits, const float *lse,
                       const int64_t *target, const float *weight, const float *denom,
                       const float *grad, const int64_t *ncls, float *dlogits, float *gWo,
                       float *gBo, float *d_act) {
    ce_backward(logits, lse, target, weight, denom, grad, ncls, dlogits, G, n, c);
    for (int64_t g = 0; g < G; ++g) {
        const float *dl = dlogits + g * n * c;
        if (gWo) {
            gemm(1, 0, (int)h, (int)c, (int)n, 1.0f, act + g * n * h, (int)h, dl, (int)c, 0.0f,
                 gWo + g * h * c, (int)c);
            col_sums(dl, n, c, gBo + g * c, 0);
        }
        gemm(0, 1, (int)n, (int)h, (int)c, 1.0f, dl, (int)c, Wo + g * h * c, (int)c, 0.0f,
             d_act + g * n * h, (int)h);
    }
}
