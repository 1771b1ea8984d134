"""The decoder's compiled CPU kernel (``kogpt2/native/cached_attention.cc``), built on first use.

TensorFlow has no fused cached attention for the CPU, and the decoder's XLA attention reads every
slot of the cache's capacity at 8-13 GB/s per core. This kernel reads only the filled slots, at
close to the machine's memory bandwidth (docs/BENCHMARKS.md). It is compiled against the installed
TensorFlow's headers with the machine's C++ compiler (``$CXX``, else ``g++``), for the machine's own
CPU (``-march=native``), the first time a process asks for it, and kept in a cache folder:

- ``$KOGPT2_OP_CACHE``, else ``$XDG_CACHE_HOME/kogpt2/ops``, else ``~/.cache/kogpt2/ops``
  (a temporary folder when that cannot be written);
- one file per (source, compiler, flags, TensorFlow version, CPU): a machine with another CPU
  sharing the folder builds its own, and an edit of the source rebuilds;
- written under a temporary name and renamed into place: processes that build at once (Beam
  workers starting together) each write their own and the last rename wins, with identical files.

Without a compiler, or when the build fails, :func:`cached_attention_op` raises
:class:`NativeOpError` with the compiler's message; the decoder's ``attention="auto"`` then falls
back to its XLA attention with a warning (:mod:`kogpt2.decoder`).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kogpt2.tf_setup import import_tf

log = logging.getLogger(__name__)

SOURCE = Path(__file__).resolve().parent / "native" / "cached_attention.cc"
CACHE_ENV = "KOGPT2_OP_CACHE"
#: Seconds a build may take (about 15 s here).
BUILD_TIMEOUT = 600
_FLAGS = ("-shared", "-fPIC", "-O3", "-march=native", "-fopenmp-simd", "-Wno-deprecated-declarations")


class NativeOpError(RuntimeError):
    """The compiled kernel could not be built or loaded on this machine."""


def cache_dir() -> Path:
    """Where built kernels are kept (see the module docstring)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "kogpt2" / "ops"


def _cpu_signature() -> str:
    """What ``-march=native`` depends on: the CPU's model and feature flags."""
    try:
        info = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        info = []
    wanted = [line for line in info if line.startswith(("model name", "flags"))][:2]
    return "\n".join([platform.machine(), *wanted])


def _compiler() -> str:
    cxx = os.environ.get("CXX", "g++")
    found = shutil.which(cxx)
    if found is None:
        raise NativeOpError(f"no C++ compiler: {cxx!r} not found (set CXX, or install g++)")
    return found


def library_path() -> Path:
    """Build the kernel if this machine has no build of it yet; return the shared library's path.

    Raises:
        NativeOpError: no compiler, or the build failed (its message included).
    """
    tf = import_tf()
    cxx = _compiler()
    cflags, lflags = list(tf.sysconfig.get_compile_flags()), list(tf.sysconfig.get_link_flags())
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise NativeOpError(f"C++ compiler {cxx} does not run: {e}") from e
    key = hashlib.sha256(
        "\x1f".join(
            [SOURCE.read_text(encoding="utf-8"), version, *_FLAGS, *cflags, *lflags, tf.__version__, _cpu_signature()]
        ).encode()
    ).hexdigest()[:16]
    name = f"cached_attention-{key}.so"
    for folder in (cache_dir(), Path(tempfile.gettempdir()) / f"kogpt2-ops-{os.getuid()}"):
        built = folder / name
        if built.is_file():
            return built
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            log.info("kernel cache %s not usable (%s)", folder, e)
            continue
        if os.access(folder, os.W_OK):
            _build(cxx, cflags, lflags, built)
            return built
    raise NativeOpError(f"no writable folder for the built kernel (tried {cache_dir()} and the temporary folder)")


def _build(cxx: str, cflags: list[str], lflags: list[str], target: Path) -> None:
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    cmd = [cxx, *_FLAGS, *cflags, str(SOURCE), "-o", str(tmp), *lflags]
    log.info("building the attention kernel: %s", " ".join(cmd))
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=BUILD_TIMEOUT)
    except (OSError, subprocess.SubprocessError) as e:
        tmp.unlink(missing_ok=True)
        raise NativeOpError(f"building the attention kernel failed: {e}") from e
    if done.returncode != 0:
        tmp.unlink(missing_ok=True)
        tail = "\n".join(done.stderr.strip().splitlines()[-20:])
        raise NativeOpError(f"building the attention kernel failed (exit {done.returncode}): {' '.join(cmd)}\n{tail}")
    os.replace(tmp, target)


def cached_attention_op() -> Callable[..., Any]:
    """The ``KogptCachedAttention`` op: ``op(keys, values, qkv, starts, slot) -> (B, H*D)``.

    ``keys``/``values`` are the handles of ``(B, H, S, D)`` float32 variables; the op writes the new
    key and value (from ``qkv``, ``(B, 3*H*D)`` float32) into slot ``slot`` in place and attends over
    slots ``starts[b] .. slot`` of each row ``b``.

    Raises:
        NativeOpError: it cannot be built or loaded here.
    """
    op, error = _load()
    if error is not None:
        raise error
    return op


@functools.cache
def _load() -> tuple[Any, NativeOpError | None]:
    """The op or why not, once per process (a failed build is not retried)."""
    try:
        path = library_path()
    except NativeOpError as e:
        return None, e
    try:
        lib = import_tf().load_op_library(str(path))
    except Exception as e:  # a broken or foreign file: say which
        return None, NativeOpError(f"loading the attention kernel {path} failed: {e}")
    return lib.kogpt_cached_attention, None


def available() -> bool:
    """Whether the kernel builds and loads here (the reason is logged when not)."""
    try:
        cached_attention_op()
    except NativeOpError as e:
        log.warning("%s", e)
        return False
    return True


if __name__ == "__main__":  # python -m kogpt2.native_ops: build now (e.g. in a worker image)
    logging.basicConfig(level=logging.INFO)
    print(library_path())
    sys.exit(0 if available() else 1)
