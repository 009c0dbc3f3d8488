/* The zero-inflated negative binomial log-likelihood of a (cells, genes) count matrix and
 * its derivatives in one pass (cellsight.nn.zinb_grad, native path).
 *
 * Per entry, with eps = 1e-8 where scvi-tools puts it (the logarithms evaluated as log1p of
 * ratios, see below, which keeps float32 accuracy for a large theta),
 *   tm = mu + theta + eps, t = log(tm), a = theta (log(theta + eps) - t) - zi,
 *   zero count:     ll = softplus(a) + logsigmoid(zi)
 *   non-zero count: ll = a + logsigmoid(zi) + x (log(mu + eps) - t)
 *                        + lgamma(x + theta) - lgamma(theta) - lgamma(x + 1)
 * and, with w = sigmoid(a) at a zero count and 1 at a non-zero one, r = theta / tm,
 *   d ll / d zi    = sigmoid(-zi) - w
 *   d ll / d mu    = -w r + [x > 0] x (1 / (mu + eps) - 1 / tm)
 *   d ll / d theta = w (log(theta + eps) + theta / (theta + eps) - t - r)
 *                    + [x > 0] (digamma(x + theta) - digamma(theta) - x / tm).
 * Each row is first filled as if every count were zero (a loop the compiler vectorises), then
 * its non-zero entries are gathered into contiguous buffers, recomputed with their counts in a
 * second vectorised loop (the gamma-function terms in double precision, by a fixed-shift
 * recurrence and Stirling's series, accurate to 3e-10 for any count and theta > 0) and
 * scattered back.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#define EPS 1e-8f

/* lgamma(k + 1) of the integers k < LOG_FACTORIAL_SIZE (filled on first use) */
#define LOG_FACTORIAL_SIZE 4096
static double log_factorial[LOG_FACTORIAL_SIZE];
static int log_factorial_ready = 0;

static void fill_log_factorial(void) {
    double acc = 0.0;
    log_factorial[0] = 0.0;
    for (int k = 1; k < LOG_FACTORIAL_SIZE; ++k) {
        acc += log((double)k);
        log_factorial[k] = acc;
    }
    log_factorial_ready = 1;
}

/* lgamma(z) for z > 0: the recurrence lgamma(z) = lgamma(z + 8) - log(z (z + 1) ... (z + 7))
 * then Stirling's series at w = z + 8 >= 8 (error below 1 / (1680 w^7) < 3e-10); a fixed shift,
 * so that a loop over entries vectorises (the product of 8 float-range factors cannot
 * overflow a double). */
static inline double lgamma_pos(double z) {
    double prod = z * (z + 1.0) * (z + 2.0) * (z + 3.0) * (z + 4.0) * (z + 5.0) * (z + 6.0)
                  * (z + 7.0);
    double w = z + 8.0, r = 1.0 / w, r2 = r * r;
    double series = r * (1.0 / 12.0 - r2 * (1.0 / 360.0 - r2 * (1.0 / 1260.0)));
    return (w - 0.5) * log(w) - w + 0.91893853320467274178 + series - log(prod);
}

/* digamma(z) for z > 0: psi(z) = psi(z + 8) - sum_{k<8} 1 / (z + k), the sum taken as one
 * fraction num / den (den = z (z + 1) ... (z + 7)), then the asymptotic series at w = z + 8
 * (error below 1 / (240 w^8) < 3e-10). */
static inline double digamma_pos(double z) {
    double num = 0.0, den = 1.0;
    for (int k = 0; k < 8; ++k) {
        num = num * (z + k) + den;
        den *= z + k;
    }
    double w = z + 8.0, r = 1.0 / w, r2 = r * r;
    return log(w) - 0.5 * r - r2 * (1.0 / 12.0 - r2 * (1.0 / 120.0 - r2 * (1.0 / 252.0)))
           - num / den;
}

/* lgamma and digamma of m values of theta (vectorised) */
static void gamma_of_theta(const float *theta, int64_t m, double *lg, double *dg) {
#pragma omp simd
    for (int64_t j = 0; j < m; ++j) {
        lg[j] = lgamma_pos((double)theta[j]);
        dg[j] = digamma_pos((double)theta[j]);
    }
}

/* x, mu, zi: (n, g); theta: (g,) when theta_per_gene, else (n, g).
 * Outputs: ll (n,), and the per-entry derivatives dmu, dzi, dtheta (n, g).
 * Returns 0, or -1 if the scratch memory could not be allocated. */
int zinb_forward(int64_t n, int64_t g, const float *x, const float *mu, const float *theta,
                 int64_t theta_per_gene, const float *zi, float *ll, float *dmu, float *dzi,
                 float *dtheta) {
    /* scratch for the non-zero entries of one row: positions and gathered inputs/outputs */
    int64_t *pos = malloc((size_t)g * sizeof(int64_t));
    float *buf = malloc((size_t)g * 9 * sizeof(float));
    /* lgamma/digamma of theta per gene (lgt_g, dgt_g) and of the gathered entries' theta
     * (clgt, cdgt), and lgamma(x + 1) of the gathered counts (clx) */
    double *dbuf = malloc((size_t)g * 5 * sizeof(double));
    if (!log_factorial_ready) fill_log_factorial();
    if (!pos || !buf || !dbuf) {
        free(pos);
        free(buf);
        free(dbuf);
        return -1;
    }
    float *cx = buf, *cth = buf + g, *cm = buf + 2 * g, *cz = buf + 3 * g;
    float *odz = buf + 4 * g, *odm = buf + 5 * g, *odt = buf + 6 * g;
    double *lgt_g = dbuf, *dgt_g = dbuf + g, *clgt = dbuf + 2 * g, *cdgt = dbuf + 3 * g;
    double *clx = dbuf + 4 * g;
    float *ite_g = buf + 7 * g, *c_g = buf + 8 * g; /* 1 / (theta + eps), theta / (theta + eps) */
    for (int64_t i = 0; i < n; ++i) {
        const float *xr = x + i * g, *mr = mu + i * g, *zr = zi + i * g;
        const float *tr = theta_per_gene ? theta : theta + i * g;
        float *dmr = dmu + i * g, *dzr = dzi + i * g, *dtr = dtheta + i * g;
        if (i == 0 || !theta_per_gene) {
#pragma omp simd
            for (int64_t j = 0; j < g; ++j) {
                ite_g[j] = 1.0f / (tr[j] + EPS);
                c_g[j] = tr[j] * ite_g[j];
            }
            if (theta_per_gene) gamma_of_theta(tr, g, lgt_g, dgt_g);
        }
        /* 1. every entry as if its count were zero; with q = mu / (theta + eps),
         * log(theta + eps) - log(tm) = -log1p(q) (no cancellation for large theta) and
         * r = theta / tm = c / (1 + q) */
        float row = 0.0f;
#pragma omp simd reduction(+ : row)
        for (int64_t j = 0; j < g; ++j) {
            float th = tr[j], z = zr[j], c = c_g[j];
            float q = mr[j] * ite_g[j];
            float lq = log1pf(q);
            float a = -th * lq - z;
            float ea = expf(-fabsf(a)), ez = expf(-fabsf(z));
            float ia = 1.0f / (1.0f + ea), iz = 1.0f / (1.0f + ez);
            float sp_a = fmaxf(a, 0.0f) + log1pf(ea);                       /* softplus(a) */
            float ls_z = fminf(z, 0.0f) - log1pf(ez);                       /* logsigmoid(zi) */
            float w = a >= 0.0f ? ia : ea * ia;                             /* sigmoid(a) */
            float s_mz = z >= 0.0f ? ez * iz : iz;                          /* sigmoid(-zi) */
            float r = c / (1.0f + q);
            row += sp_a + ls_z;
            dzr[j] = s_mz - w;
            dmr[j] = -w * r;
            dtr[j] = w * (c - lq - r);
        }
        /* 2. the non-zero entries, gathered, recomputed with their count, scattered back */
        int64_t k = 0;
        for (int64_t j = 0; j < g; ++j) {
            pos[k] = j;
            k += xr[j] > 0.0f;
        }
        for (int64_t q = 0; q < k; ++q) {
            int64_t j = pos[q];
            cx[q] = xr[j];
            cth[q] = tr[j];
            cm[q] = mr[j];
            cz[q] = zr[j];
            odt[q] = c_g[j];
            odm[q] = ite_g[j];
            if (theta_per_gene) {
                clgt[q] = lgt_g[j];
                cdgt[q] = dgt_g[j];
            }
            const float xv = xr[j];
            const int32_t xi = (int32_t)xv;
            clx[q] = (xv < (float)LOG_FACTORIAL_SIZE && (float)xi == xv)
                         ? log_factorial[xi] : lgamma_pos((double)xv + 1.0);
        }
        if (!theta_per_gene) gamma_of_theta(cth, k, clgt, cdgt);
        double fix = 0.0;
#pragma omp simd reduction(+ : fix)
        for (int64_t q = 0; q < k; ++q) {
            float xv = cx[q], th = cth[q], m = cm[q], z = cz[q], c = odt[q];
            float qq = m * odm[q];
            float lq = log1pf(qq);
            float a = -th * lq - z;
            float ls_a = fminf(a, 0.0f) - log1pf(expf(-fabsf(a)));        /* logsigmoid(a) */
            float ez = expf(-fabsf(z));
            float s_z = (z >= 0.0f ? 1.0f : ez) / (1.0f + ez);              /* sigmoid(zi) */
            float r = c / (1.0f + qq);
            float tm = m + th + EPS, me = m + EPS;
            double xd = (double)xv, thd = (double)th;
            double lg = lgamma_pos(xd + thd) - clgt[q] - clx[q];
            double dg = digamma_pos(xd + thd) - cdgt[q];
            /* a + logsigmoid(zi) + ... replaces the zero case's softplus(a) + logsigmoid(zi):
             * the difference is a - softplus(a) = logsigmoid(a); and
             * log(mu + eps) - log(tm) = -log1p(theta / (mu + eps)) */
            fix += (double)ls_a - xd * (double)log1pf(th / me) + lg;
            odz[q] = -s_z;
            odm[q] = -r + xv * th / (me * tm);             /* x (1 / (mu + eps) - 1 / tm) */
            odt[q] = (c - lq - r) + (float)dg - xv / tm;
        }
        for (int64_t q = 0; q < k; ++q) {
            int64_t j = pos[q];
            dzr[j] = odz[q];
            dmr[j] = odm[q];
            dtr[j] = odt[q];
        }
        ll[i] = (float)((double)row + fix);
    }
    free(pos);
    free(buf);
    free(dbuf);
    return 0;
}

/* Gradients from the saved derivatives and the upstream gradient grad (n,): gmu = grad dmu,
 * gzi = grad dzi (either output may be NULL: not needed), and gtheta = grad @ dtheta (g,)
 * when theta_per_gene, else grad dtheta (n, g) (NULL: not needed). */
void zinb_backward(int64_t n, int64_t g, const float *grad, const float *dmu, const float *dzi,
                   const float *dtheta, int64_t theta_per_gene, float *gmu, float *gzi,
                   float *gtheta) {
    if (gtheta && theta_per_gene) {
        for (int64_t j = 0; j < g; ++j) gtheta[j] = 0.0f;
    }
    for (int64_t i = 0; i < n; ++i) {
        float s = grad[i];
        const float *a = dmu + i * g, *b = dzi + i * g, *c = dtheta + i * g;
        if (gmu) {
            float *o = gmu + i * g;
#pragma omp simd
            for (int64_t j = 0; j < g; ++j) o[j] = s * a[j];
        }
        if (gzi) {
            float *o = gzi + i * g;
#pragma omp simd
            for (int64_t j = 0; j < g; ++j) o[j] = s * b[j];
        }
        if (gtheta) {
            float *o = theta_per_gene ? gtheta : gtheta + i * g;
            if (theta_per_gene) {
#pragma omp simd
                for (int64_t j = 0; j < g; ++j) o[j] += s * c[j];
            } else {
#pragma omp simd
                for (int64_t j = 0; j < g; ++j) o[j] = s * c[j];
            }
        }
    }
}
