"""Decode attention straight from the paged KV pool (CPU), without gathering a copy.

Gathering every sequence's keys and values into a padded tensor before
``scaled_dot_product_attention`` moves the whole context through memory three
times per layer; at 64 sequences of a few hundred tokens that costs more than
the layer's matrix products. This small C kernel reads each key and value once,
straight from the sequence's blocks, for all query heads that share it (GQA).

It is built on first use (see ``ckernel``); where it cannot be, ``available()``
is False and the model falls back to gather + SDPA.
"""

from __future__ import annotations

import ctypes

import torch

from llmos_kernel.core import ckernel

_SOURCE = r"""
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

typedef struct {
    const float *q; const float *k; const float *v; float *out;
    const int64_t *tables; const int64_t *lens;
    int64_t max_blocks, block_size, n_kv, group, dim; float scale;
} job_t;

typedef struct { float *scores; int64_t cap; } scratch_t;  /* one per thread, grown as needed */

/* e^x for x <= 0, to ~2e-7 relative (degree-6 Taylor on |f| <= 1/2): 2^(x log2 e) split into 2^int (exponent bits) times
   a polynomial for 2^frac, so the loop vectorizes (libm's expf does not, short of
   -ffast-math). */
static inline float exp_neg(float x) {
    x = x < -87.f ? -87.f : x;
    const float t = x * 1.44269504f, fi = floorf(t + 0.5f), f = t - fi;  /* |f| <= 1/2 */
    const float p = 1.f + f * (0.69314718f + f * (0.24022651f + f * (0.05550411f + f * (
                    0.00961813f + f * (0.00133336f + f * 0.00015404f)))));
    union { float f; int32_t i; } u; u.i = ((int32_t)fi + 127) << 23;
    return p * u.f;
}

/* One sequence: its H = KV*G query heads against its n keys. Each key row holds every KV
   head side by side (KV*D floats), so a pass over the rows reads the sequence's keys and
   values front to back, once. Inlined with D a constant where the model's head size is 64,
   so the dot products unroll. scores: [H][cap]. */
static inline void attend(const job_t *j, int64_t b, float *scores, int64_t cap,
                          const int64_t D) {
    const int64_t G = j->group, KV = j->n_kv, H = KV * G, BS = j->block_size, n = j->lens[b];
    const int64_t *table = j->tables + b * j->max_blocks;
    const float *q = j->q + b * H * D;
    float mx[H];
    for (int64_t i = 0; i < H; i++) mx[i] = -INFINITY;
    for (int64_t t = 0; t < n; t++) {
        const float *row = j->k + (table[t / BS] * BS + t % BS) * KV * D;
        for (int64_t i = 0; i < H; i++) {
            const float *qi = q + i * D, *kp = row + (i / G) * D; float s = 0.f;
            for (int64_t d = 0; d < D; d++) s += qi[d] * kp[d];
            s *= j->scale; scores[i * cap + t] = s;
            mx[i] = s > mx[i] ? s : mx[i];
        }
    }
    for (int64_t i = 0; i < H; i++) {
        float tot = 0.f, *si = scores + i * cap; const float m = mx[i];
        for (int64_t t = 0; t < n; t++) { const float e = exp_neg(si[t] - m); si[t] = e; tot += e; }
        const float inv = 1.f / tot;
        for (int64_t t = 0; t < n; t++) si[t] *= inv;
    }
    float *o = j->out + b * H * D;
    for (int64_t i = 0; i < H * D; i++) o[i] = 0.f;
    for (int64_t t = 0; t < n; t++) {
        const float *row = j->v + (table[t / BS] * BS + t % BS) * KV * D;
        for (int64_t i = 0; i < H; i++) {
            const float p = scores[i * cap + t], *vp = row + (i / G) * D; float *oi = o + i * D;
            for (int64_t d = 0; d < D; d++) oi[d] += p * vp[d];
        }
    }
}

static void attend_seq(const job_t *j, int64_t b, scratch_t *s) {
    const int64_t n = j->lens[b];
    if (n > s->cap) {
        free(s->scores); s->cap = n;
        s->scores = malloc(sizeof(float) * j->n_kv * j->group * n);
    }
    if (j->dim == 64) attend(j, b, s->scores, s->cap, 64);
    else attend(j, b, s->scores, s->cap, j->dim);
}

/* q, out: [B, KV*G, D]; k, v: [slots, KV, D]; tables: [B, max_blocks]; lens: [B]. */
int paged_decode(const float *q, const float *k, const float *v, float *out,
                 const int64_t *tables, const int64_t *lens, int64_t B, int64_t max_blocks,
                 int64_t block_size, int64_t n_kv, int64_t group, int64_t dim, float scale,
                 int64_t threads) {
    if (group > 64) return -1;
    int64_t keys = 0;  /* the work: keys read, summed over sequences */
    for (int64_t b = 0; b < B; b++) keys += lens[b] * n_kv;
    const job_t j = {q, k, v, out, tables, lens, max_blocks, block_size, n_kv, group, dim, scale};
    if (threads < 2 || keys < 4096) {
        scratch_t s = {NULL, 0};
        for (int64_t b = 0; b < B; b++) attend_seq(&j, b, &s);
        free(s.scores);
        return 0;
    }
    /* Sequences of unequal length: hand them out dynamically. The library links libgomp by
       soname, so in a torch process this is torch's OpenMP thread pool. */
    #pragma omp parallel num_threads(threads)
    {
        scratch_t s = {NULL, 0};
        #pragma omp for schedule(dynamic, 1)
        for (int64_t b = 0; b < B; b++) attend_seq(&j, b, &s);
        free(s.scores);
    }
    return 0;
}
"""

MAX_GROUP = 64  # query heads per KV head the kernel takes (bounds its stack scratch)


def _declare(lib: ctypes.CDLL) -> None:
    lib.paged_decode.restype = ctypes.c_int
    lib.paged_decode.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_int64] * 6 + [
        ctypes.c_float, ctypes.c_int64]


def available() -> bool:
    return ckernel.load("paged_attention", _SOURCE, _declare, openmp=True) is not None


def decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, tables: torch.Tensor,
           lens: torch.Tensor, block_size: int, scale: float) -> torch.Tensor:
    """Attention of one new token per sequence: q ``[B, H, D]`` → ``[B, H, D]``."""
    B, H, D = q.shape
    n_kv = k_cache.shape[1]
    q = q.contiguous()
    out = torch.empty_like(q)
    rc = ckernel.load("paged_attention", _SOURCE, _declare, openmp=True).paged_decode(q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), out.data_ptr(),
                           tables.data_ptr(), lens.data_ptr(), B, tables.shape[1], block_size,
                           n_kv, H // n_kv, D, scale, torch.get_num_threads())
    if rc != 0:
        raise RuntimeError(f"paged_decode failed ({rc})")
    return out
