"""Small C kernels for the CPU hot loops, compiled on first use and called through ctypes.

Why not torch.utils.cpp_extension: its builds take a minute (torch headers, ninja) and sit behind a lock
file that a killed process leaves behind. These kernels are plain C on raw pointers: the system C compiler
builds one in about a second into a per-user cache keyed by the source, the flags, the compiler and the
CPU, written under a temporary name and renamed into place, so concurrent ranks and workers never see a
partial library and need no lock. Without a C compiler, or with CADUCEUS_NATIVE=0, `load` returns None
and callers keep their pure PyTorch / NumPy path (same results to float rounding; see the parity tests).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

SOURCE_DIR = Path(__file__).resolve().parent
# -march=native is safe because the CPU's flags are part of the cache key (clusters mix node types).
CFLAGS = ("-O3", "-march=native", "-fPIC", "-shared", "-fno-math-errno", "-fopenmp-simd", "-std=c11")
log = logging.getLogger(__name__)


def enabled() -> bool:
    return os.environ.get("CADUCEUS_NATIVE", "1") != "0"


def cache_dir() -> Path:
    root = os.environ.get("CADUCEUS_NATIVE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "caduceus_dist", "native")
    return Path(root)


def _cpu_identity() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


@functools.cache
def _compiler() -> tuple[str, str] | None:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return cc, version


@functools.cache
def load(name: str) -> ctypes.CDLL | None:
    """The compiled `<name>.c` of this package, or None (native kernels disabled or no working compiler)."""
    if not enabled():
        return None
    compiler = _compiler()
    if compiler is None:
        log.warning("no C compiler found (set CC): using the slower pure PyTorch/NumPy CPU path for %s", name)
        return None
    cc, version = compiler
    source = SOURCE_DIR / f"{name}.c"
    key = hashlib.sha256("\0".join([source.read_text(), " ".join(CFLAGS), version, _cpu_identity()]).encode())
    target = cache_dir() / f"{name}-{key.hexdigest()[:16]}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, partial = tempfile.mkstemp(prefix=f".{name}-", suffix=".so", dir=target.parent)
        os.close(fd)
        try:
            build = subprocess.run([cc, *CFLAGS, str(source), "-o", partial, "-lm"], capture_output=True, text=True)
            if build.returncode != 0:
                log.warning("compiling %s failed (using the slower pure PyTorch/NumPy CPU path):\n%s",
                            source, build.stderr[-2000:])
                return None
            os.replace(partial, target)  # atomic: concurrent builders all produce the same bytes
        finally:
            if os.path.exists(partial):
                os.unlink(partial)
    return ctypes.CDLL(str(target))
