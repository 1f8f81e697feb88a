/* RMSNorm, rotary embedding and silu(gate) * up, one C call each (see fused_ops.py). */
#include <math.h>
#include <stdint.h>

/* out[t] = x[t] / sqrt(mean(x[t]^2) + eps) * w */
void rms_norm(const float *x, const float *w, float *out, int64_t T, int64_t d, float eps) {
    for (int64_t t = 0; t < T; t++) {
        const float *xt = x + t * d; float *ot = out + t * d; float ss = 0.f;
        for (int64_t i = 0; i < d; i++) ss += xt[i] * xt[i];
        const float r = 1.f / sqrtf(ss / (float)d + eps);
        for (int64_t i = 0; i < d; i++) ot[i] = xt[i] * r * w[i];
    }
}

/* Rotate, in place, the first `heads` heads of each row of x ([T, row] floats, heads of D
   floats from the row's start) by the row's angles: pairs (2i, 2i+1) times cos + i sin. */
void rope(float *x, const float *cos_t, const float *sin_t, int64_t T, int64_t row,
          int64_t heads, int64_t D) {
    const int64_t P = D / 2;
    for (int64_t t = 0; t < T; t++) {
        const float *c = cos_t + t * P, *s = sin_t + t * P;
        for (int64_t h = 0; h < heads; h++) {
            float *p = x + t * row + h * D;
            for (int64_t i = 0; i < P; i++) {
                const float a = p[2 * i], b = p[2 * i + 1];
                p[2 * i] = a * c[i] - b * s[i];
                p[2 * i + 1] = a * s[i] + b * c[i];
            }
        }
    }
}

#ifdef __AVX512F__
#include <immintrin.h>

#include "vecmath.h"

/* out[t] = silu(g) * u for each row [g (F floats) | u (F floats)] of gu (see silu_mul16).
   Returns 0, or -1 where F is not a multiple of 16 (the caller keeps torch). */
int silu_mul(const float *gu, float *out, int64_t T, int64_t F, int64_t threads) {
    if (F % 16) return -1;
    #pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1 && T * F >= 65536)
    for (int64_t t = 0; t < T; t++) {
        const float *g = gu + t * 2 * F, *u = g + F; float *o = out + t * F;
        for (int64_t i = 0; i < F; i += 16)
            _mm512_storeu_ps(o + i, silu_mul16(_mm512_loadu_ps(g + i), _mm512_loadu_ps(u + i)));
    }
    return 0;
}
#else
int silu_mul(const float *gu, float *out, int64_t T, int64_t F, int64_t threads) {
    return -1;
}
#endif
