"""Native CPU kernels: C++ XLA FFI handlers, compiled on first use, with the XLA twin as fallback.

On CPU the scans' plain-XLA twins are limited by XLA:CPU's code for them (int8 GEMMs at
7-11 GB/s of codes, ``lax.top_k``), not by the work done. The native kernels do the same work
in C++ (AVX-512 VNNI int8 dots where the CPU has them, a running threshold per query instead
of a top-k over all scores):

- ``native/ivf_scan_cpu.cc``: the IVF scan (:mod:`pallas_kernels.ivf_scan`), per query over
  its probed blocks; exactly the twin's values, rows and tie order.
- ``native/flat_scan_cpu.cc``: the flat filtered scan (:mod:`pallas_kernels.flat_scan`), the
  whole batch per tile of eligible rows; the exact top-k in ``lax.top_k``'s order.
- ``native/filter_mask_cpu.cc``: the exact filter mask (``st_jax._filter_index.filter_mask``:
  interval bounds, then each uncertain item verified against its term list), dense or on
  selected words, in one custom call instead of XLA's large while-loop graph (compile time:
  a filtered IVF search graph holds four of them).
- ``native/common.h``: candidate keys, int8 dots, the work sharing over XLA's thread pool.

The library is compiled with the system's C++ compiler (``$CXX``, else ``c++`` / ``g++``)
against the XLA FFI headers of the installed jaxlib (``jax.ffi.include_dir()``), for this
machine's CPU (``-march=native``), into a cache folder (``$ST_JAX_CACHE_DIR``, else
``$XDG_CACHE_HOME/st_jax``, else ``~/.cache/st_jax``) under a name that hashes the source,
the headers, the compiler, the flags and the CPU, so an upgrade or another machine builds its
own copy. The sources compile in parallel (one job per core) in a temporary folder beside the
cache, and the linked library is renamed into place (atomic; concurrent processes may both
build, one rename wins). ``make venv`` builds it ahead (``python -m pallas_kernels.native``);
otherwise the first CPU search that needs it does (~10 s on 2 cores).
``$ST_JAX_NATIVE_CXXFLAGS`` adds compiler flags (e.g. ``-march=x86-64-v3`` for a library
that also runs on a cluster's older CPUs).

When there is no compiler, the build fails, or ``ST_JAX_NATIVE=0`` is set, :func:`available`
is False (the reason in :func:`unavailable_reason`, and a warning once per process) and
``backend="auto"`` uses the XLA twin: results are the same, only slower.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

NATIVE_DIR = Path(__file__).with_name("native")
SOURCES = (NATIVE_DIR / "ivf_scan_cpu.cc", NATIVE_DIR / "flat_scan_cpu.cc",
           NATIVE_DIR / "filter_mask_cpu.cc")
HEADERS = (NATIVE_DIR / "common.h",)
IVF_SCAN_TARGET = "st_jax_ivf_scan_cpu"
FLAT_SCAN_TARGET = "st_jax_flat_scan_cpu"
FILTER_MASK_TARGET = "st_jax_filter_mask_cpu"
# FFI target name -> the library's exported handler symbol
TARGETS = {IVF_SCAN_TARGET: "StJaxIvfScan", FLAT_SCAN_TARGET: "StJaxFlatScan",
           FILTER_MASK_TARGET: "StJaxFilterMask"}
CXXFLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-fvisibility=hidden")
ENV_SWITCH = "ST_JAX_NATIVE"
# extra compiler flags, after CXXFLAGS (e.g. "-march=x86-64-v3" for a library that also runs
# on older CPUs of a cluster; part of the library's name, so each setting has its own build)
ENV_FLAGS = "ST_JAX_NATIVE_CXXFLAGS"


def compiler_flags() -> tuple[str, ...]:
    """``CXXFLAGS`` followed by the words of ``$ST_JAX_NATIVE_CXXFLAGS``."""
    return CXXFLAGS + tuple(shlex.split(os.environ.get(ENV_FLAGS, "")))


class NativeUnavailable(RuntimeError):
    """The native CPU kernel could not be built or loaded (the message says why and what to
    do); the XLA twin (``backend="xla"``) computes the same results."""


_lock = threading.Lock()
_state: dict = {}


def cache_dir() -> Path:
    """Where built libraries are kept: ``$ST_JAX_CACHE_DIR``, else ``$XDG_CACHE_HOME/st_jax``
    or ``~/.cache/st_jax``; when that cannot be created or written (a read-only home), a
    per-user folder in the system's temporary directory."""
    if os.environ.get("ST_JAX_CACHE_DIR"):
        return Path(os.environ["ST_JAX_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    path = Path(base) / "st_jax"
    try:
        path.mkdir(parents=True, exist_ok=True)
        if os.access(path, os.W_OK):
            return path
    except OSError:
        pass
    return Path(tempfile.gettempdir()) / f"st_jax-{os.getuid() if hasattr(os, 'getuid') else 0}"


def _compiler() -> str | None:
    for name in filter(None, (os.environ.get("CXX"), "c++", "g++", "clang++")):
        path = shutil.which(name)
        if path:
            return path
    return None


def _cpu_signature() -> str:
    """The CPU's model and feature flags (``-march=native`` code is only valid on such a CPU)."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("flags", "model name", "Features"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor() + platform.machine()


def cpu_tag() -> str:
    """A short hash of this CPU's model and features: code compiled for the host CPU (this
    library, XLA:CPU executables in a persistent cache) is kept apart per kind of CPU, so a
    cache folder shared between machines never hands one another's code."""
    return hashlib.sha256((_cpu_signature() + platform.machine()).encode()).hexdigest()[:12]


def library_path(cxx: str) -> Path:
    """The cache path of the library built by compiler ``cxx`` for this source, jaxlib and CPU."""
    import jax
    h = hashlib.sha256()
    for source in (*SOURCES, *HEADERS):
        h.update(source.read_bytes())
    for header in sorted(Path(jax.ffi.include_dir()).rglob("*.h")):
        h.update(header.read_bytes())
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    for part in (cxx, version, " ".join(compiler_flags()), _cpu_signature(), platform.machine()):
        h.update(part.encode())
    return cache_dir() / f"st_jax_native-{h.hexdigest()[:20]}.so"


def build(force: bool = False) -> Path:
    """Compiles the native library into the cache (if not there yet, or ``force``); returns
    its path. Each source is compiled on its own, in parallel (one job per core), then linked.
    Raises :class:`NativeUnavailable` naming what is missing or what the compiler said."""
    import jax
    cxx = _compiler()
    if cxx is None:
        raise NativeUnavailable("no C++ compiler found (tried $CXX, c++, g++, clang++): "
                                "install one (apt-get install g++) or set CXX")
    out = library_path(cxx)
    if out.exists() and not force:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    flags = compiler_flags()
    with tempfile.TemporaryDirectory(prefix=".build-", dir=out.parent) as tmp:
        objects = [os.path.join(tmp, f"{src.stem}.o") for src in SOURCES]
        jobs = [[cxx, *flags, "-isystem", jax.ffi.include_dir(), "-c", str(src), "-o", obj]
                for src, obj in zip(SOURCES, objects)]
        with ThreadPoolExecutor(max_workers=max(1, min(len(jobs), os.cpu_count() or 1))) as ex:
            results = list(ex.map(_run, jobs))
        failed = [(cmd, res) for cmd, res in zip(jobs, results) if res.returncode != 0]
        if not failed:
            link = [cxx, *flags, *objects, "-o", os.path.join(tmp, out.name)]
            res = _run(link)
            failed = [(link, res)] if res.returncode != 0 else []
        if failed:
            cmd, res = failed[0]
            raise NativeUnavailable(f"compiling {NATIVE_DIR} failed ({' '.join(cmd)}):\n"
                                    f"{res.stderr[-2000:]}")
        os.chmod(os.path.join(tmp, out.name), 0o755)
        os.replace(os.path.join(tmp, out.name), out)
    return out


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True)


def _load() -> None:
    """Builds (if needed), loads and registers the FFI targets; records the outcome."""
    import jax
    if os.environ.get(ENV_SWITCH, "1").strip().lower() in ("0", "false", "no", "off"):
        raise NativeUnavailable(f"disabled by {ENV_SWITCH}={os.environ[ENV_SWITCH]}")
    path = build()
    try:
        lib = ctypes.CDLL(str(path))
        handlers = {target: getattr(lib, symbol) for target, symbol in TARGETS.items()}
    except (OSError, AttributeError) as e:
        raise NativeUnavailable(f"loading {path} failed ({e}); delete it to rebuild") from e
    for target, handler in handlers.items():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(handler), platform="cpu")
    _state["lib"] = lib      # keep the library loaded for the process's lifetime
    _state["path"] = path


def ensure_loaded() -> None:
    """Makes the native targets callable; raises :class:`NativeUnavailable` if they cannot be
    (the outcome is kept: the build is tried once per process)."""
    with _lock:
        if "error" not in _state and "lib" not in _state:
            try:
                _load()
            except NativeUnavailable as e:
                _state["error"] = e
            except Exception as e:            # noqa: BLE001 -- any failure means "use the twin"
                _state["error"] = NativeUnavailable(f"{type(e).__name__}: {e}")
        if "error" in _state:
            raise _state["error"]


def available() -> bool:
    """True when the native CPU kernels can be used (builds them on first call); else warns
    once with the reason and returns False."""
    try:
        ensure_loaded()
        return True
    except NativeUnavailable as e:
        if not _state.get("warned"):
            _state["warned"] = True
            if not str(e).startswith("disabled by"):
                warnings.warn(f"st_jax: native CPU kernels unavailable, using the XLA twins "
                              f"(same results, slower): {e}", RuntimeWarning, stacklevel=2)
        return False


def unavailable_reason() -> str | None:
    """Why :func:`available` is False (None when it is True or was not asked yet)."""
    err = _state.get("error")
    return None if err is None else str(err)


def loaded_path() -> Path | None:
    """The library this process loaded (None before a successful load)."""
    return _state.get("path")


def isa() -> str | None:
    """The instruction set the loaded library's int8 dots use: ``"avx512-vnni"``, ``"avx2"``
    or ``"plain C++"`` (from the build's compiler flags and CPU); None before a successful
    load."""
    lib = _state.get("lib")
    if lib is None:
        return None
    fn = lib.StJaxNativeIsa
    fn.restype = ctypes.c_char_p
    return fn().decode()


def main(argv=None) -> int:
    """``python -m pallas_kernels.native``: builds the library now and says where it is."""
    try:
        ensure_loaded()
    except NativeUnavailable as e:
        print(f"native CPU kernels unavailable, the XLA twin will be used: {e}", file=sys.stderr)
        return 0
    print(f"native CPU kernels ready ({isa()} int8 dots): {loaded_path()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
