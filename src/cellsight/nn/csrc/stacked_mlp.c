/* Forward and backward passes of G stacked multi-layer perceptrons in one call each: FADVI's
 * classifier heads (cellsight.models.fadvi.fast_step), and the hidden layers of its three
 * encoders. Each network g has L hidden layers Linear -> [LayerNorm] -> ReLU -> [dropout]
 * (the fused tail of dense.c) and, for the heads, a Linear output scored by the masked
 * cross-entropy of dense.c. The matrix products call the BLAS sgemm that torch itself uses
 * (MKL's, whose address the caller passes to set_sgemm once) or gemm.c's AVX-512 kernel
 * (set_native_gemm; faster where MKL runs its AVX2 code), so that a pass is one foreign
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

#include "gemm.c"

/* 1: the products use gemm.c's kernel (when built with AVX-512), 0: the BLAS sgemm */
static int use_native_gemm = 0;

/* Chooses the products' kernel (see use_native_gemm); returns the choice in effect. */
int set_native_gemm(int on) {
    use_native_gemm = on && SG_NATIVE_GEMM;
    return use_native_gemm;
}

/* Whether gemm.c's kernel was built (the compiler targets AVX-512). */
int has_native_gemm(void) { return SG_NATIVE_GEMM; }

/* Row-major C (m x n) = alpha op(A) op(B) + beta C, op(X) = X or X^T (ta, tb). */
static void gemm(int ta, int tb, int m, int n, int k, float alpha, const float *A, int lda,
                 const float *B, int ldb, float beta, float *C, int ldc) {
#if SG_NATIVE_GEMM
    if (use_native_gemm && sg_gemm(ta, tb, m, n, k, alpha, A, lda, B, ldb, beta, C, ldc) == 0)
        return;
#endif
    const char a = tb ? 'T' : 'N', b = ta ? 'T' : 'N';
    sgemm_ptr(&a, &b, &n, &m, &k, &alpha, B, &ldb, A, &lda, &beta, C, &ldc);
}

/* gemm as used by the kernels, exported for the tests */
void gemm_for_tests(int ta, int tb, int m, int n, int k, float alpha, const float *A, int lda,
                    const float *B, int ldb, float beta, float *C, int ldc) {
    gemm(ta, tb, m, n, k, alpha, A, lda, B, ldb, beta, C, ldc);
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

/* ------------------------------------------------------------------------------------------
 * scVI's decoder with a ZINB likelihood (FADVI's generative model), forward and backward.
 *
 * Hidden layers l = 0 .. L-1: h_l = relu([h_{l-1}, onehot(batch)] W_l^T + b_l) with h_{-1} = z
 * (n, k); W_l (out, in_l + nb) as nn.Linear stores it, its last nb columns the one-hot batch's
 * (nb = 0: no batch input; inject = 0: the batch enters layer 0 only). Outputs:
 * rho = softmax(h W_s^T + b_s), mu = lib rho with lib = exp(log(sum_g x)), zi = h W_z^T + b_z,
 * theta = exp(px_r), and ll (n,) with the derivatives of zinb.c.
 */
#include "zinb.c"

typedef struct {
    int64_t n, g, k, h, L, nb, inject;
} dec_dims;

static int64_t dec_in_width(const dec_dims *d, int64_t l) {
    const int64_t prev = l == 0 ? d->k : d->h;
    return prev + ((d->nb > 0 && (l == 0 || d->inject)) ? d->nb : 0);
}

/* add the one-hot batch's column of W (out, in) to each row of out (n, o) */
static void add_batch_columns(float *out, const float *W, int64_t in, int64_t prev,
                              const int64_t *batch, int64_t n, int64_t o) {
    for (int64_t i = 0; i < n; ++i) {
        const float *col = W + prev + batch[i];
        float *r = out + i * o;
        for (int64_t c = 0; c < o; ++c) r[c] += col[c * in];
    }
}

/* W: L + 2 weight pointers (hidden layers, then scale, then zero-inflation), B likewise.
 * hs: L buffers (n, h) of the hidden outputs. rho, mu, zi, dmu, dzi, dth: (n, g); theta (g);
 * ll (n). Returns zinb_forward's status. */
int decoder_zinb_forward(int64_t n, int64_t g, int64_t k, int64_t h, int64_t L, int64_t nb,
                         int64_t inject, const float *z, const int64_t *batch, const float *x,
                         const float *const *W, const float *const *B, const float *px_r,
                         float *const *hs, float *rho, float *mu, float *zi, float *theta,
                         float *ll, float *dmu, float *dzi, float *dth) {
    dec_dims d = {n, g, k, h, L, nb, inject};
    for (int64_t l = 0; l < L; ++l) {
        const int64_t in = dec_in_width(&d, l), prev = l == 0 ? k : h;
        const float *src = l == 0 ? z : hs[l - 1];
        float *o = hs[l];
        fill_rows(o, B[l], n, h);
        gemm(0, 1, (int)n, (int)h, (int)prev, 1.0f, src, (int)prev, W[l], (int)in, 1.0f, o,
             (int)h);
        if (in > prev) add_batch_columns(o, W[l], in, prev, batch, n, h);
        for (int64_t q = 0; q < n * h; ++q) o[q] = o[q] > 0.0f ? o[q] : 0.0f;
    }
    const float *top = hs[L - 1];
    fill_rows(rho, B[L], n, g);
    gemm(0, 1, (int)n, (int)g, (int)h, 1.0f, top, (int)h, W[L], (int)h, 1.0f, rho, (int)g);
    fill_rows(zi, B[L + 1], n, g);
    gemm(0, 1, (int)n, (int)g, (int)h, 1.0f, top, (int)h, W[L + 1], (int)h, 1.0f, zi, (int)g);
#pragma omp simd
    for (int64_t j = 0; j < g; ++j) theta[j] = expf(px_r[j]);
    for (int64_t i = 0; i < n; ++i) {
        float *r = rho + i * g, *m = mu + i * g;
        const float *xr = x + i * g;
        double total = 0.0;
        for (int64_t j = 0; j < g; ++j) total += xr[j];
        const float lib = expf(logf((float)total));  /* as the torch path: exp(log(sum x)) */
        float mx = r[0];
        for (int64_t j = 1; j < g; ++j) mx = r[j] > mx ? r[j] : mx;
        float s = 0.0f;
#pragma omp simd reduction(+ : s)
        for (int64_t j = 0; j < g; ++j) {
            r[j] = expf(r[j] - mx);
            s += r[j];
        }
        const float inv = 1.0f / s;
#pragma omp simd
        for (int64_t j = 0; j < g; ++j) {
            r[j] *= inv;
            m[j] = lib * r[j];
        }
    }
    return zinb_forward(n, g, x, mu, theta, 1, zi, ll, dmu, dzi, dth);
}

/* Backward from grad (n,) = d loss / d ll: parameter gradients gW/gB (L + 2 each, written) and
 * g_px_r (g), and d_z (n, k). Scratch: ds, gzi (n, g), dh, dh2 (n, h). */
void decoder_zinb_backward(int64_t n, int64_t g, int64_t k, int64_t h, int64_t L, int64_t nb,
                           int64_t inject, const float *z, const int64_t *batch,
                           const float *const *W, float *const *hs, const float *rho,
                           const float *mu, const float *theta, const float *dmu,
                           const float *dzi, const float *dth, const float *grad,
                           float *const *gW, float *const *gB, float *g_px_r, float *d_z,
                           float *ds, float *gzi, float *dh, float *dh2) {
    dec_dims d = {n, g, k, h, L, nb, inject};
    /* likelihood -> mu, zi, theta; mu = lib softmax(s) -> d s = t - rho sum(t), t = mu d mu */
    zinb_backward(n, g, grad, dmu, dzi, dth, 1, ds, gzi, g_px_r);
#pragma omp simd
    for (int64_t j = 0; j < g; ++j) g_px_r[j] *= theta[j];
    for (int64_t i = 0; i < n; ++i) {
        float *r = ds + i * g;
        const float *m = mu + i * g, *p = rho + i * g;
        float s = 0.0f;
#pragma omp simd reduction(+ : s)
        for (int64_t j = 0; j < g; ++j) {
            r[j] *= m[j];
            s += r[j];
        }
#pragma omp simd
        for (int64_t j = 0; j < g; ++j) r[j] -= p[j] * s;
    }
    const float *top = hs[L - 1];
    gemm(1, 0, (int)g, (int)h, (int)n, 1.0f, ds, (int)g, top, (int)h, 0.0f, gW[L], (int)h);
    col_sums(ds, n, g, gB[L], 0);
    gemm(1, 0, (int)g, (int)h, (int)n, 1.0f, gzi, (int)g, top, (int)h, 0.0f, gW[L + 1], (int)h);
    col_sums(gzi, n, g, gB[L + 1], 0);
    gemm(0, 0, (int)n, (int)h, (int)g, 1.0f, ds, (int)g, W[L], (int)h, 0.0f, dh, (int)h);
    gemm(0, 0, (int)n, (int)h, (int)g, 1.0f, gzi, (int)g, W[L + 1], (int)h, 1.0f, dh, (int)h);
    for (int64_t l = L - 1; l >= 0; --l) {
        const int64_t in = dec_in_width(&d, l), prev = l == 0 ? k : h;
        const float *src = l == 0 ? z : hs[l - 1];
        const float *out = hs[l];
        for (int64_t q = 0; q < n * h; ++q) dh[q] = out[q] > 0.0f ? dh[q] : 0.0f;
        /* gW (h, in): the first prev columns dh^T src, the batch columns per batch sums */
        gemm(1, 0, (int)h, (int)prev, (int)n, 1.0f, dh, (int)h, src, (int)prev, 0.0f, gW[l],
             (int)in);
        if (in > prev) {
            for (int64_t c = 0; c < h; ++c)
                for (int64_t b = 0; b < nb; ++b) gW[l][c * in + prev + b] = 0.0f;
            for (int64_t i = 0; i < n; ++i) {
                const float *r = dh + i * h;
                float *col = gW[l] + prev + batch[i];
                for (int64_t c = 0; c < h; ++c) col[c * in] += r[c];
            }
        }
        col_sums(dh, n, h, gB[l], 0);
        float *dst = l == 0 ? d_z : dh2;
        gemm(0, 0, (int)n, (int)prev, (int)h, 1.0f, dh, (int)h, W[l], (int)in, 0.0f, dst,
             (int)prev);
        if (l > 0) {
            float *t = dh;
            dh = dh2;
            dh2 = t;
        }
    }
}

/* ------------------------------------------------------------------------------------------
 * The Gaussian posterior heads of G encoders and its sample and KL divergence.
 *
 * Encoder g's last hidden layer act (G, n, h) gives loc_g = act_g Wm_g^T + bm_g and
 * v_g = act_g Wv_g^T + bv_g (nn.Linear layouts, k[g] outputs each), written side by side into
 * loc, v (n, K), K = sum k; then ev = exp(v), scale = sqrt(ev + var_eps), z = loc + scale noise
 * and kl = 0.5 (loc^2 + scale^2 - 1) - log(scale) (n, K).
 */
void gauss_forward(int64_t G, int64_t n, int64_t h, const int64_t *k, const float *act,
                   const float *const *Wm, const float *const *Bm, const float *const *Wv,
                   const float *const *Bv, float var_eps, const float *noise, float *loc,
                   float *v, float *ev, float *scale, float *z, float *kl) {
    int64_t K = 0;
    for (int64_t g = 0; g < G; ++g) K += k[g];
    int64_t off = 0;
    for (int64_t g = 0; g < G; ++g) {
        for (int64_t i = 0; i < n; ++i) {
            memcpy(loc + i * K + off, Bm[g], (size_t)k[g] * sizeof(float));
            memcpy(v + i * K + off, Bv[g], (size_t)k[g] * sizeof(float));
        }
        gemm(0, 1, (int)n, (int)k[g], (int)h, 1.0f, act + g * n * h, (int)h, Wm[g], (int)h,
             1.0f, loc + off, (int)K);
        gemm(0, 1, (int)n, (int)k[g], (int)h, 1.0f, act + g * n * h, (int)h, Wv[g], (int)h,
             1.0f, v + off, (int)K);
        off += k[g];
    }
#pragma omp simd
    for (int64_t q = 0; q < n * K; ++q) {
        const float e = expf(v[q]);
        const float s = sqrtf(e + var_eps);
        ev[q] = e;
        scale[q] = s;
        z[q] = loc[q] + s * noise[q];
        kl[q] = 0.5f * (loc[q] * loc[q] + s * s - 1.0f) - logf(s);
    }
}

/* Backward. d_loc (n, K): d loss / d loc from everything but the sample and the KL (heads,
 * penalties), overwritten with the total; d_z (n, K): d loss / d z; klc: d loss / d kl (one
 * weight for every entry, kl_weight * beta / n). Writes the heads' gradients gWm, gBm, gWv, gBv
 * (per encoder) and d_act (G, n, h). d_v: scratch (n, K). */
void gauss_backward(int64_t G, int64_t n, int64_t h, const int64_t *k, const float *act,
                    const float *const *Wm, const float *const *Wv, float var_eps,
                    const float *noise, const float *loc, const float *ev, const float *scale,
                    float *d_loc, const float *d_z, float klc, float *const *gWm,
                    float *const *gBm, float *const *gWv, float *const *gBv, float *d_act,
                    float *d_v) {
    int64_t K = 0;
    for (int64_t g = 0; g < G; ++g) K += k[g];
#pragma omp simd
    for (int64_t q = 0; q < n * K; ++q) {
        const float e = ev[q], s = scale[q];
        d_loc[q] += d_z[q] + klc * loc[q];
        /* d kl / d v = 0.5 e (1 - 1 / s^2); d z / d v = noise e / (2 s) */
        d_v[q] = d_z[q] * noise[q] * e / (2.0f * s) + 0.5f * klc * e * (1.0f - 1.0f / (e + var_eps));
    }
    int64_t off = 0;
    for (int64_t g = 0; g < G; ++g) {
        const float *a = act + g * n * h;
        gemm(1, 0, (int)k[g], (int)h, (int)n, 1.0f, d_loc + off, (int)K, a, (int)h, 0.0f,
             gWm[g], (int)h);
        gemm(1, 0, (int)k[g], (int)h, (int)n, 1.0f, d_v + off, (int)K, a, (int)h, 0.0f, gWv[g],
             (int)h);
        memset(gBm[g], 0, (size_t)k[g] * sizeof(float));
        memset(gBv[g], 0, (size_t)k[g] * sizeof(float));
        for (int64_t i = 0; i < n; ++i)
            for (int64_t c = 0; c < k[g]; ++c) {
                gBm[g][c] += d_loc[i * K + off + c];
                gBv[g][c] += d_v[i * K + off + c];
            }
        float *da = d_act + g * n * h;
        gemm(0, 0, (int)n, (int)h, (int)k[g], 1.0f, d_loc + off, (int)K, Wm[g], (int)h, 0.0f, da,
             (int)h);
        gemm(0, 0, (int)n, (int)h, (int)k[g], 1.0f, d_v + off, (int)K, Wv[g], (int)h, 1.0f, da,
             (int)h);
        off += k[g];
    }
}
