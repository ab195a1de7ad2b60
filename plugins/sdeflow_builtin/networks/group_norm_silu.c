/* SiLU(GroupNorm(x)) on float32 channels-last (N, HW, C) memory: two passes over it forward (statistics,
 * output) and two backward (dy and its sums, dx), each vectorised along the contiguous channels.
 *
 * Built and loaded by group_norm_silu.py, which also holds the PyTorch reference it is tested against.
 * Statistics are accumulated in double. Group g holds channels [g*D, (g+1)*D), D = C/G, M = HW*D.
 * Per-channel scratch lives on the thread's stack (a few doubles per channel, no allocation to fail).
 *
 *   forward:  mu, rstd per (n, g); a_c = gamma_c*rstd, b_c = beta_c - mu*a_c; y = a_c*x + b_c; out = silu(y)
 *   backward: dy = dout * s * (1 + y*(1 - s)), s = sigmoid(y)
 *             dx = rstd*gamma_c*dy - rstd*m1 - rstd^2*(x - mu)*m2, with, over the group,
 *             m1 = mean(gamma_c*dy), m2 = mean(gamma_c*dy*(x - mu)*rstd)
 */
#include <math.h>
#include <stdint.h>

/* exp(-y) is capped below float's overflow: with -ffast-math, 1/(1 + inf) becomes a reciprocal estimate
 * whose refinement step gives 0*inf = NaN. silu and sigmoid are ~1e-35 there either way. */
#define EXP_MAX 80.0f

static void scale_shift(const float *gamma, const float *beta, const double *mean, const double *rstd,
                        int64_t C, int64_t D, float *a, float *b) {
    for (int64_t c = 0; c < C; ++c) {
        double scale = gamma[c] * rstd[c / D];
        a[c] = (float)scale;
        b[c] = (float)(beta[c] - mean[c / D] * scale);
    }
}

void gn_silu_forward(const float *x, const float *gamma, const float *beta, float *out, double *mean,
                     double *rstd, int64_t N, int64_t HW, int64_t C, int64_t G, double eps, int nthreads) {
    const int64_t D = C / G;
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t n = 0; n < N; ++n) {
        const float *xn = x + n * HW * C;
        float *on = out + n * HW * C;
        double s1[C], s2[C];
        float a[C], b[C];
        for (int64_t c = 0; c < C; ++c)
            s1[c] = s2[c] = 0;
        for (int64_t i = 0; i < HW; ++i) {
#pragma omp simd
            for (int64_t c = 0; c < C; ++c) {
                double v = xn[i * C + c];
                s1[c] += v;
                s2[c] += v * v;
            }
        }
        for (int64_t g = 0; g < G; ++g) {
            double sum = 0, sumsq = 0;
            for (int64_t c = g * D; c < (g + 1) * D; ++c) {
                sum += s1[c];
                sumsq += s2[c];
            }
            double mu = sum / (double)(HW * D), var = sumsq / (double)(HW * D) - mu * mu;
            mean[n * G + g] = mu;
            rstd[n * G + g] = 1.0 / sqrt((var > 0 ? var : 0) + eps);
        }
        scale_shift(gamma, beta, mean + n * G, rstd + n * G, C, D, a, b);
        for (int64_t i = 0; i < HW; ++i) {
#pragma omp simd
            for (int64_t c = 0; c < C; ++c) {
                float y = a[c] * xn[i * C + c] + b[c];
                on[i * C + c] = y / (1.0f + expf(fminf(-y, EXP_MAX)));
            }
        }
    }
}

/* dgamma_n and dbeta_n are (N, C): per-example parts, summed by the caller (a fixed order, so the
 * result does not depend on the number of threads). Examples are split over nthreads threads. */
void gn_silu_backward(const float *dout, const float *x, const float *gamma, const float *beta,
                      const double *mean, const double *rstd, float *dx, float *dgamma_n, float *dbeta_n,
                      int64_t N, int64_t HW, int64_t C, int64_t G, int nthreads) {
    const int64_t D = C / G;
    const double M = (double)(HW * D);
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t n = 0; n < N; ++n) {
        const float *xn = x + n * HW * C, *gn = dout + n * HW * C;
        float *dxn = dx + n * HW * C;
        const double *mu = mean + n * G, *rs = rstd + n * G;
        double S1[C], S2[C];
        float a[C], b[C], A[C], B[C], K[C];
        for (int64_t c = 0; c < C; ++c)
            S1[c] = S2[c] = 0;
        scale_shift(gamma, beta, mu, rs, C, D, a, b);
        /* pass 1: dy (kept in dx), and its per-channel sums with and without x */
        for (int64_t i = 0; i < HW; ++i) {
#pragma omp simd
            for (int64_t c = 0; c < C; ++c) {
                float v = xn[i * C + c], y = a[c] * v + b[c], s = 1.0f / (1.0f + expf(fminf(-y, EXP_MAX)));
                float dy = gn[i * C + c] * s * (1.0f + y * (1.0f - s));
                dxn[i * C + c] = dy;
                S1[c] += dy;
                S2[c] += (double)dy * v;
            }
        }
        for (int64_t g = 0; g < G; ++g) {
            double m1 = 0, m2 = 0;
            for (int64_t c = g * D; c < (g + 1) * D; ++c) {
                double t = rs[g] * (S2[c] - mu[g] * S1[c]); /* sum of dy * xhat */
                dgamma_n[n * C + c] = (float)t;
                dbeta_n[n * C + c] = (float)S1[c];
                m1 += gamma[c] * S1[c];
                m2 += gamma[c] * t;
            }
            m1 /= M;
            m2 /= M;
            for (int64_t c = g * D; c < (g + 1) * D; ++c) {
                A[c] = (float)(rs[g] * gamma[c]);
                B[c] = (float)(-rs[g] * rs[g] * m2);
                K[c] = (float)(-rs[g] * m1 + rs[g] * rs[g] * mu[g] * m2);
            }
        }
        /* pass 2: dx = A*dy + B*x + K */
        for (int64_t i = 0; i < HW; ++i) {
#pragma omp simd
            for (int64_t c = 0; c < C; ++c)
                dxn[i * C + c] = A[c] * dxn[i * C + c] + B[c] * xn[i * C + c] + K[c];
        }
    }
}
