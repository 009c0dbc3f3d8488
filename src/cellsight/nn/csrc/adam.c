/* One Adam / AdamW step over a list of float32 tensors (see cellsight/train/native_adam.py).
 *
 * The update rule of torch.optim.Adam / AdamW (amsgrad=False), element by element:
 *   step += 1;  bc1 = 1 - beta1^step;  bc2 = 1 - beta2^step   (double, per tensor)
 *   g = maximize ? -grad : grad
 *   Adam:  g += weight_decay * p          AdamW:  p *= 1 - lr * weight_decay
 *   m = m + (1 - beta1) * (g - m)
 *   v = beta2 * v + (1 - beta2) * g * g
 *   p -= (lr / bc1) * m / (sqrt(v) / sqrt(bc2) + eps)
 *
 * Each tensor keeps its own step counter (a float32 scalar, as torch's fused Adam stores it),
 * so tensors that started training later get their own bias corrections. One call replaces
 * torch's per-step grouping of the tensors by device and dtype and its dispatch.
 */

#include <math.h>
#include <stdint.h>

void adam_step(int64_t n_tensors, const int64_t *restrict numel, float *const *restrict param,
               const float *const *restrict grad, float *const *restrict exp_avg,
               float *const *restrict exp_avg_sq, float *const *restrict step, double lr,
               double beta1, double beta2, double eps, double weight_decay, int32_t decoupled,
               int32_t maximize)
{
    for (int64_t t = 0; t < n_tensors; ++t) {
        const float s = *step[t] + 1.0f;
        *step[t] = s;
        const double bc1 = 1.0 - pow(beta1, (double)s);
        const double bc2 = 1.0 - pow(beta2, (double)s);
        const float step_size = (float)(lr / bc1);
        const float bc2_sqrt = (float)sqrt(bc2);
        const float b1 = (float)(1.0 - beta1), b2 = (float)beta2, c2 = (float)(1.0 - beta2);
        const float e = (float)eps, sign = maximize ? -1.0f : 1.0f;
        const float wd = (float)weight_decay, decay = (float)(1.0 - lr * weight_decay);
        float *restrict p = param[t];
        const float *restrict g = grad[t];
        float *restrict m = exp_avg[t];
        float *restrict v = exp_avg_sq[t];
        const int64_t k = numel[t];
        if (decoupled) {
            if (weight_decay != 0.0) {
#pragma omp simd
                for (int64_t i = 0; i < k; ++i)
                    p[i] *= decay;
            }
#pragma omp simd
            for (int64_t i = 0; i < k; ++i) {
                const float gi = sign * g[i];
                m[i] += b1 * (gi - m[i]);
                v[i] = b2 * v[i] + c2 * gi * gi;
                p[i] -= step_size * m[i] / (sqrtf(v[i]) / bc2_sqrt + e);
            }
        } else {
#pragma omp simd
            for (int64_t i = 0; i < k; ++i) {
                const float gi = sign * g[i] + wd * p[i];
                m[i] += b1 * (gi - m[i]);
                v[i] = b2 * v[i] + c2 * gi * gi;
                p[i] -= step_size * m[i] / (sqrtf(v[i]) / bc2_sqrt + e);
            }
        }
    }
}
