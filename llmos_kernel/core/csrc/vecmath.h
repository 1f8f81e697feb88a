/* Vector math shared by the kernels that need it on AVX-512 (libm's expf stays scalar
   without -ffast-math, which the kernels are not built with: see ckernel.FLAGS). */
#ifndef LLMOS_VECMATH_H
#define LLMOS_VECMATH_H

#ifdef __AVX512F__
#include <immintrin.h>

/* e^x for x <= 0 on 16 lanes, to ~2e-7 relative: 2^(x log2 e) as 2^round (scalef) times a
   degree-6 polynomial for 2^frac. */
static inline __m512 exp_neg16(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.f));
    const __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504f));
    const __m512 fi = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_sub_ps(t, fi);
    __m512 p = _mm512_set1_ps(0.00015404f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.00133336f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.00961813f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.05550411f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.24022651f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.69314718f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
    return _mm512_scalef_ps(p, fi);
}

/* silu(g) * u on 16 lanes: silu(g) = g * s, s = 1 / (1 + e^-g), from e = e^-|g| (never
   overflows): s = 1/(1+e) for g >= 0, e/(1+e) below; 1/(1+e), in [1/2, 1], by rcp14 and one
   Newton step. */
static inline __m512 silu_mul16(__m512 g, __m512 u) {
    const __m512 e = exp_neg16(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_abs_ps(g)));
    const __m512 d = _mm512_add_ps(_mm512_set1_ps(1.f), e);
    __m512 inv = _mm512_rcp14_ps(d);
    inv = _mm512_mul_ps(inv, _mm512_fnmadd_ps(d, inv, _mm512_set1_ps(2.f)));
    const __mmask16 neg = _mm512_cmp_ps_mask(g, _mm512_setzero_ps(), _CMP_LT_OQ);
    const __m512 sig = _mm512_mask_mul_ps(inv, neg, inv, e);
    return _mm512_mul_ps(_mm512_mul_ps(g, sig), u);
}
#endif

#endif
