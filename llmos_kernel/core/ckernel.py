"""Small C kernels, compiled on first use with the system C compiler and loaded with ctypes.

Each library is built once per source, flags and CPU kind into
``$LLMOS_HOME/cache/kernels``. Where no compiler is found, or
``LLMOS_NO_C_KERNELS=1``, ``load`` returns None and callers use their torch path.
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
from collections.abc import Callable
from pathlib import Path

from llmos_kernel.paths import llmos_home

log = logging.getLogger("llmos.kernels")

# Vectorized reductions, but not -ffast-math: that links crtfastmath, which turns on
# flush-to-zero for the whole process that loads us (subnormals would vanish in user code).
FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-fno-signed-zeros",
         "-fassociative-math", "-freciprocal-math"]

_loaded: dict[str, ctypes.CDLL | None] = {}
_lock = threading.Lock()


def load(name: str, source: str, declare: Callable[[ctypes.CDLL], None], *,
         openmp: bool = False) -> ctypes.CDLL | None:
    """The compiled library ``name`` (``declare`` sets its functions' ctypes signatures).

    With ``openmp`` it links libgomp by soname: loaded into a torch process it shares
    torch's OpenMP runtime (torch is imported first, so its libgomp is the one found)."""
    if name in _loaded:  # every call after the first: kernels are looked up per product
        return _loaded[name]
    with _lock:
        if name not in _loaded:
            lib = None
            if os.environ.get("LLMOS_NO_C_KERNELS") != "1":
                try:
                    if openmp:
                        import torch  # noqa: F401 - its libgomp must be the one loaded
                    lib = _build(name, source, ["-fopenmp"] if openmp else [])
                except OSError as e:
                    log.warning("C kernel %s unavailable: %s", name, e)
                if lib is not None:
                    declare(lib)
            _loaded[name] = lib
        return _loaded[name]


def _build(name: str, source: str, extra: list[str]) -> ctypes.CDLL | None:
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None:
        log.info("no C compiler found: %s uses its torch fallback", name)
        return None
    flags = FLAGS + extra
    tag = hashlib.sha256((source + " ".join(flags) + platform.machine()
                          + _cpu_flags()).encode()).hexdigest()[:16]
    cache = llmos_home() / "cache" / "kernels"
    target = cache / f"{name}_{tag}.so"
    if not target.exists():
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            src, so = Path(tmp) / f"{name}.c", Path(tmp) / f"{name}.so"
            src.write_text(source)
            done = subprocess.run([compiler, *flags, "-shared", "-fPIC", "-pthread", str(src),
                                   "-o", str(so), "-lm"], capture_output=True, text=True,
                                  check=False)
            if done.returncode != 0:
                log.warning("building the %s kernel failed: %s", name, done.stderr[-500:])
                return None
            os.replace(so, target)  # atomic: a concurrent builder finds a whole file
    return ctypes.CDLL(str(target))


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return line
    except OSError:
        pass
    return ""


EXP_NEG16 = r"""
/* e^x for x <= 0 on 16 lanes (AVX-512), to ~2e-7 relative: 2^(x log2 e) as 2^round
   (scalef) times a degree-6 polynomial for 2^frac. Shared by the kernels that need a
   vector exp (libm's expf stays scalar without -ffast-math); include after immintrin.h. */
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
"""


SILU_MUL16 = r"""
/* silu(g) * u on 16 lanes: silu(g) = g * s, s = 1 / (1 + e^-g), from e = e^-|g| (never
   overflows): s = 1/(1+e) for g >= 0, e/(1+e) below; 1/(1+e), in [1/2, 1], by rcp14 and one
   Newton step. Needs exp_neg16 (EXP_NEG16) before it. */
static inline __m512 silu_mul16(__m512 g, __m512 u) {
    const __m512 e = exp_neg16(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_abs_ps(g)));
    const __m512 d = _mm512_add_ps(_mm512_set1_ps(1.f), e);
    __m512 inv = _mm512_rcp14_ps(d);
    inv = _mm512_mul_ps(inv, _mm512_fnmadd_ps(d, inv, _mm512_set1_ps(2.f)));
    const __mmask16 neg = _mm512_cmp_ps_mask(g, _mm512_setzero_ps(), _CMP_LT_OQ);
    const __m512 sig = _mm512_mask_mul_ps(inv, neg, inv, e);
    return _mm512_mul_ps(_mm512_mul_ps(g, sig), u);
}
"""
