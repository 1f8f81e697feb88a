"""Small C kernels, compiled on first use with the system C compiler and loaded with ctypes.

Kernel ``name``'s source is ``csrc/<name>.c`` beside this module (shipped as package
data), which may include the shared headers in ``csrc``. Each library is built once per
source, headers, flags and CPU kind into ``$LLMOS_HOME/cache/kernels``, so editing a
header rebuilds every kernel. Where no compiler is found, or the build fails, ``load``
returns None and callers use their torch path.

Whether a model may use C kernels at all is its caller's choice
(``KernelOptions.c_kernels``), checked before asking for one: a loaded library is kept for
the life of the process and shared by every model in it, so a per-model switch cannot
live here.
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

CSRC = Path(__file__).with_name("csrc")
"""The kernels' C sources (``<name>.c``) and the headers they share (``*.h``)."""

# Vectorized reductions, but not -ffast-math: that links crtfastmath, which turns on
# flush-to-zero for the whole process that loads us (subnormals would vanish in user code).
FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-fno-signed-zeros",
         "-fassociative-math", "-freciprocal-math"]

_loaded: dict[str, ctypes.CDLL | None] = {}
_lock = threading.Lock()


class BuildError(OSError):
    """The compiler refused a kernel's source; the message ends with its diagnostics."""


def load(name: str, declare: Callable[[ctypes.CDLL], None], *,
         openmp: bool = False) -> ctypes.CDLL | None:
    """The compiled library of ``csrc/<name>.c`` (``declare`` sets its functions' ctypes
    signatures), or None where it cannot be built.

    With ``openmp`` it links libgomp by soname: loaded into a torch process it shares
    torch's OpenMP runtime (torch is imported first, so its libgomp is the one found)."""
    if name in _loaded:  # every call after the first: kernels are looked up per product
        return _loaded[name]
    with _lock:
        if name not in _loaded:
            lib = None
            try:
                if openmp:
                    import torch  # noqa: F401 - its libgomp must be the one loaded
                lib = _cached(name, openmp)
            except OSError as e:
                log.warning("C kernel %s unavailable: %s", name, e)
            if lib is not None:
                declare(lib)
            _loaded[name] = lib
        return _loaded[name]


def compiler() -> str | None:
    """The C compiler: ``$CC``, else ``cc``, else ``gcc``; None where there is none."""
    return shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")


def sources() -> list[str]:
    """The names of every kernel in ``csrc``."""
    return sorted(p.stem for p in CSRC.glob("*.c"))


def build(name: str, target: Path, *, openmp: bool = False) -> None:
    """Compile ``csrc/<name>.c`` into the shared library ``target``, with the flags ``load``
    uses; BuildError (with the compiler's messages) where it fails."""
    cc = compiler()
    if cc is None:
        raise BuildError("no C compiler found (set CC, or install cc or gcc)")
    done = subprocess.run([cc, *_flags(openmp), f"-I{CSRC}", "-shared", "-fPIC", "-pthread",
                           str(CSRC / f"{name}.c"), "-o", str(target), "-lm"],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise BuildError(f"building the {name} kernel failed:\n{done.stderr[-2000:]}")


def _flags(openmp: bool) -> list[str]:
    return FLAGS + (["-fopenmp"] if openmp else [])


def _tag(name: str, openmp: bool) -> str:
    """What a build depends on: the source, every shared header, the flags, the CPU."""
    digest = hashlib.sha256()
    for path in [CSRC / f"{name}.c", *sorted(CSRC.glob("*.h"))]:
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    digest.update((" ".join(_flags(openmp)) + platform.machine() + _cpu_flags()).encode())
    return digest.hexdigest()[:16]


def _cached(name: str, openmp: bool) -> ctypes.CDLL | None:
    target = _built(name, openmp)
    return None if target is None else ctypes.CDLL(str(target))


def _target(name: str, openmp: bool) -> Path:
    return llmos_home() / "cache" / "kernels" / f"{name}_{_tag(name, openmp)}.so"


def _built(name: str, openmp: bool) -> Path | None:
    """The cached library of ``name``, built now if missing; None where it cannot be."""
    if compiler() is None:
        log.info("no C compiler found: %s uses its torch fallback", name)
        return None
    target = _target(name, openmp)
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            so = Path(tmp) / f"{name}.so"
            try:
                build(name, so, openmp=openmp)
            except BuildError as e:
                log.warning("%s", e)
                return None
            os.replace(so, target)  # atomic: a concurrent builder finds a whole file
    return target


def missing(*, openmp: bool = True) -> list[str]:
    """The kernels not yet built for this machine's CPU and these sources (none where
    there is no compiler: nothing would be built)."""
    if compiler() is None:
        return []
    return [name for name in sources() if not _target(name, openmp).exists()]


def prebuild(on_built: Callable[[str, bool], None] | None = None, *,
             openmp: bool = True) -> list[str]:
    """Build every missing kernel now, two compilers at a time, so a process started
    later (a model shard) finds them cached instead of compiling on its first step;
    ``on_built(name, ok)`` after each. Returns the names built."""
    from concurrent.futures import ThreadPoolExecutor

    todo = missing(openmp=openmp)

    def one(name: str) -> tuple[str, bool]:
        ok = _built(name, openmp) is not None
        if on_built is not None:
            on_built(name, ok)
        return name, ok

    with ThreadPoolExecutor(max_workers=2) as pool:
        return [name for name, ok in pool.map(one, todo) if ok]


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return line
    except OSError:
        pass
    return ""
