"""Decode attention straight from the paged KV pool (CPU), without gathering a copy.

Gathering every sequence's keys and values into a padded tensor before
``scaled_dot_product_attention`` moves the whole context through memory three
times per layer; at 64 sequences of a few hundred tokens that costs more than
the layer's matrix products. This small C kernel reads each key and value once,
straight from the sequence's blocks, for all query heads that share it (GQA).

It is compiled on first use with the system C compiler into the llmos cache
(one build per CPU kind) and loaded with ctypes; where no compiler is found,
``available()`` is False and the model falls back to gather + SDPA.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

from llmos_kernel.paths import llmos_home

log = logging.getLogger("llmos.attention")

_SOURCE = r"""
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <pthread.h>

typedef struct {
    const float *q; const float *k; const float *v; float *out;
    const int64_t *tables; const int64_t *lens;
    int64_t max_blocks, block_size, n_kv, group, dim; float scale;
    int64_t first, last;   /* work items [first, last): (sequence, kv head) pairs */
} job_t;

static void *run(void *arg) {
    job_t *j = (job_t *)arg;
    const int64_t D = j->dim, G = j->group, KV = j->n_kv, BS = j->block_size;
    int64_t cap = 0; float *scores = NULL;
    for (int64_t w = j->first; w < j->last; w++) {
        const int64_t b = w / KV, h = w % KV, n = j->lens[b];
        if (n > cap) { free(scores); cap = n; scores = malloc(sizeof(float) * G * cap); }
        const int64_t *table = j->tables + b * j->max_blocks;
        const float *q = j->q + (b * KV * G + h * G) * D;
        float mx[64]; float sum[64];
        for (int64_t g = 0; g < G; g++) mx[g] = -INFINITY;
        for (int64_t t = 0; t < n; t++) {
            const int64_t slot = table[t / BS] * BS + t % BS;
            const float *kp = j->k + (slot * KV + h) * D;
            for (int64_t g = 0; g < G; g++) {
                const float *qg = q + g * D; float s = 0.f;
                for (int64_t d = 0; d < D; d++) s += qg[d] * kp[d];
                s *= j->scale; scores[g * cap + t] = s;
                if (s > mx[g]) mx[g] = s;
            }
        }
        for (int64_t g = 0; g < G; g++) {
            float tot = 0.f;
            for (int64_t t = 0; t < n; t++) {
                float e = expf(scores[g * cap + t] - mx[g]); scores[g * cap + t] = e; tot += e;
            }
            sum[g] = tot;
        }
        float *o = j->out + (b * KV * G + h * G) * D;
        for (int64_t i = 0; i < G * D; i++) o[i] = 0.f;
        for (int64_t t = 0; t < n; t++) {
            const int64_t slot = table[t / BS] * BS + t % BS;
            const float *vp = j->v + (slot * KV + h) * D;
            for (int64_t g = 0; g < G; g++) {
                const float p = scores[g * cap + t] / sum[g]; float *og = o + g * D;
                for (int64_t d = 0; d < D; d++) og[d] += p * vp[d];
            }
        }
    }
    free(scores);
    return NULL;
}

/* q, out: [B, KV*G, D]; k, v: [slots, KV, D]; tables: [B, max_blocks]; lens: [B]. */
int paged_decode(const float *q, const float *k, const float *v, float *out,
                 const int64_t *tables, const int64_t *lens, int64_t B, int64_t max_blocks,
                 int64_t block_size, int64_t n_kv, int64_t group, int64_t dim, float scale,
                 int64_t threads) {
    if (group > 64) return -1;
    int64_t items = B * n_kv;
    if (threads < 1) threads = 1;
    if (threads > items) threads = items;
    job_t jobs[64]; pthread_t ids[64];
    if (threads > 64) threads = 64;
    for (int64_t i = 0; i < threads; i++) {
        job_t j = {q, k, v, out, tables, lens, max_blocks, block_size, n_kv, group, dim, scale,
                   items * i / threads, items * (i + 1) / threads};
        jobs[i] = j;
    }
    for (int64_t i = 1; i < threads; i++) pthread_create(&ids[i], NULL, run, &jobs[i]);
    run(&jobs[0]);
    for (int64_t i = 1; i < threads; i++) pthread_join(ids[i], NULL);
    return 0;
}
"""

# Vectorized reductions, but not -ffast-math: that links crtfastmath, which turns on
# flush-to-zero for the whole process that loads us (subnormals would vanish in user code).
_FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-fno-signed-zeros",
          "-fassociative-math", "-freciprocal-math"]

MAX_GROUP = 64  # query heads per KV head the kernel handles (its per-head scratch)

_lib: ctypes.CDLL | None = None
_tried = False
_lock = threading.Lock()


def _build() -> ctypes.CDLL | None:
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None:
        log.info("no C compiler: decode attention uses gather + SDPA")
        return None
    tag = hashlib.sha256((_SOURCE + " ".join(_FLAGS) + platform.machine()
                          + _cpu_flags()).encode()).hexdigest()[:16]
    cache = llmos_home() / "cache" / "kernels"
    target = cache / f"paged_attention_{tag}.so"
    if not target.exists():
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            src, so = Path(tmp) / "pa.c", Path(tmp) / "pa.so"
            src.write_text(_SOURCE)
            done = subprocess.run([compiler, *_FLAGS, "-shared", "-fPIC", "-pthread", str(src),
                                   "-o", str(so), "-lm"], capture_output=True, text=True,
                                  check=False)
            if done.returncode != 0:
                log.warning("building the paged attention kernel failed: %s", done.stderr[-500:])
                return None
            os.replace(so, target)
    lib = ctypes.CDLL(str(target))
    lib.paged_decode.restype = ctypes.c_int
    lib.paged_decode.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_int64] * 6 + [
        ctypes.c_float, ctypes.c_int64]
    return lib


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return line
    except OSError:
        pass
    return ""


def available() -> bool:
    global _lib, _tried
    with _lock:
        if not _tried:
            _tried = True
            if os.environ.get("LLMOS_NO_C_KERNELS") != "1":
                try:
                    _lib = _build()
                except OSError as e:
                    log.warning("paged attention kernel unavailable: %s", e)
    return _lib is not None


def decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, tables: torch.Tensor,
           lens: torch.Tensor, block_size: int, scale: float) -> torch.Tensor:
    """Attention of one new token per sequence: q ``[B, H, D]`` → ``[B, H, D]``."""
    B, H, D = q.shape
    n_kv = k_cache.shape[1]
    q = q.contiguous()
    out = torch.empty_like(q)
    rc = _lib.paged_decode(q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), out.data_ptr(),
                           tables.data_ptr(), lens.data_ptr(), B, tables.shape[1], block_size,
                           n_kv, H // n_kv, D, scale, torch.get_num_threads())
    if rc != 0:
        raise RuntimeError(f"paged_decode failed ({rc})")
    return out
