"""XLA:CPU settings that make the train step faster on a CPU, applied by the entry points before JAX starts.

jaxlib 0.10's XLA:CPU already hands some dots, reductions and convolutions to YNNPACK, but runs the element-wise
loop fusions of a ResNet train step (batch norm, ReLU, residual adds, the transposes in front of every
weight-gradient convolution) in its own code, and those took most of the step.
`--xla_cpu_experimental_ynn_fusion_type=dot,eltwise,reduce` gives YNNPACK the element-wise fusions too (and,
replacing the default list, leaves convolutions to XLA's Eigen kernels, which were faster here): resnet56's
112x112 float32 train step at batch 32 runs about 1.7x faster on this project's 2-core CPU
(`python benchmarks/train_step.py`, figures in the README), with the same results up to float summation order
(tests/test_xla_flags.py trains with and without the flag and compares). Where convolutions run in oneDNN
instead (models/onednn_conv.py, the default on a single-device CPU with its wheel installed) the element-wise
fusions cost more than they save, and `dot,reduce` is added instead (CPU_DEFAULTS_WITH_ONEDNN).

The flags touch only XLA's CPU backend; programs on a GPU or TPU are compiled exactly as before. XLA reads
XLA_FLAGS once, when JAX creates its first backend, so `apply_cpu_defaults()` must run before the first JAX
computation: `facekd_jax.main`, `facekd_jax.suite`, the train-step benchmark, the notebooks and the tests call it
first.

Yours win: a flag already named in XLA_FLAGS is left as you set it, and `FACEKD_XLA_CPU_DEFAULTS=0` turns the
defaults off. They are only added for the jaxlib minor version they were tested with (an unknown name in
XLA_FLAGS makes XLA abort the process).

Transparent huge pages: XLA:CPU allocates a step's temporary buffer (2.6 GB for resnet56 at batch 32) afresh
each step, and glibc serves it by mmap, so every step page-faults 638k zeroed 4 KiB pages: sys time 1.3 s of a
2.8 s step. With glibc's `glibc.malloc.hugetlb=1` tunable, malloc asks the kernel for transparent huge pages
(2 MiB) instead: about 2k faults per step, and the buffer is still returned to the kernel after each step (RSS
stays flat). glibc reads GLIBC_TUNABLES only when a process starts, so the command-line entry points
(`python -m facekd_jax.main`, `facekd_jax.suite`, `benchmarks/train_step.py`) call `restart_with_cpu_memory_settings()`
first: where it helps (Linux, glibc >= 2.35, THP "always" or "madvise", CPU backend expected, not opted out, the
tunable not already named) it adds the tunable and re-executes the same command once. Notebooks and the pytest
process are not restarted (export GLIBC_TUNABLES yourself there); tests/conftest.py sets it for the
subprocesses the tests start. Keeping freed memory in the heap instead (mallopt: one arena, no mmap, no trim)
removed the faults too but grew RSS by 4 GB steps as the heap fragmented (5 -> 13 GB in 14 steps).

The large-block cache: even with huge pages the kernel still zeroes the fresh 1.8 GB temporary buffer every
step (clear_page was 13% of a profiled run, and it made step times jump between 1.8 and 2.3 s). The same
restart therefore also preloads facekd_jax/block_cache.c (LD_PRELOAD; built once with the C compiler into
$FACEKD_CACHE_DIR): free() keeps up to two blocks of >= 64 MiB and posix_memalign() hands one back to the next
request it fits, so the buffer is reused instead of re-mapped. resnet56 train step, 16 steps each: 2.1 s -> 1.7 s,
RSS 2.9 -> 4.7 GB (one kept buffer). Skipped, without a restart of its own, where no C compiler is found.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import pathlib
import shutil
import sys
import warnings
from typing import MutableMapping, Optional

from facekd_jax import native_build

# flag name -> value, for XLA's own convolutions. With "individual_convolution" added (YNNPACK convolutions too)
# the step was 10-18% slower.
CPU_DEFAULTS = {"xla_cpu_experimental_ynn_fusion_type": "dot,eltwise,reduce"}
# With oneDNN's convolutions (models/onednn_conv.py) element-wise YNNPACK fusions cost more than they save: XLA
# materialises each batch-norm broadcast for them, a full-size write per layer. resnet56 train step: 15.0-15.4
# images/s with these vs 13.9-14.3 with CPU_DEFAULTS (alternating runs).
CPU_DEFAULTS_WITH_ONEDNN = {"xla_cpu_experimental_ynn_fusion_type": "dot,reduce"}
# models.onednn_conv.OPT_OUT and RUNTIME_DIST, here because that module imports JAX and this one must not
ONEDNN_OPT_OUT, ONEDNN_DIST = "FACEKD_ONEDNN", "onednn-cpu-gomp"
TESTED_JAXLIB = "0.10."  # the jaxlib minor version that knows these flag names
OPT_OUT = "FACEKD_XLA_CPU_DEFAULTS"


def _backends_started() -> bool:
    """True when JAX has already created a backend (then XLA_FLAGS is no longer read)."""
    bridge = sys.modules.get("jax._src.xla_bridge")
    return bool(getattr(bridge, "_backends", None))


def _jaxlib_version() -> Optional[str]:
    try:
        return importlib.metadata.version("jaxlib")
    except importlib.metadata.PackageNotFoundError:
        return None


def jaxlib_is_tested() -> bool:
    """Whether the installed jaxlib is the minor version whose XLA knows CPU_DEFAULTS' flag names."""
    version = _jaxlib_version()
    return version is not None and version.startswith(TESTED_JAXLIB)


HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb=1"
# Modules whose presence means JAX may pick a GPU or TPU backend.
_ACCELERATOR_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin", "jax_rocm7_plugin",
                        "libtpu")
_THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"


def opted_out(name: str = OPT_OUT, environ: Optional[MutableMapping[str, str]] = None) -> bool:
    """Whether environment variable `name` (default OPT_OUT) is 0/false/no/off in `environ` (default os.environ)."""
    environ = os.environ if environ is None else environ
    return environ.get(name, "1").strip().lower() in ("0", "false", "no", "off")


def _xla_flags(environ) -> dict[str, str]:
    """XLA_FLAGS in `environ` as {flag name: value}."""
    flags = {}
    for token in environ.get("XLA_FLAGS", "").split():
        name, _, value = token.lstrip("-").partition("=")
        flags[name] = value
    return flags


def cpu_backend_expected(environ: Optional[MutableMapping[str, str]] = None) -> bool:
    """Whether JAX will run on the CPU: JAX_PLATFORMS starts with cpu, or no GPU/TPU plugin is installed."""
    environ = os.environ if environ is None else environ
    platforms = environ.get("JAX_PLATFORMS", "").strip().lower()
    if platforms:
        return platforms.split(",")[0] == "cpu"
    return not any(importlib.util.find_spec(name) is not None for name in _ACCELERATOR_PLUGINS)


def _glibc_version() -> tuple[int, ...]:
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()  # "glibc 2.36"
        return tuple(int(p) for p in version.split(".")[:2]) if name == "glibc" else ()
    except (AttributeError, ValueError, OSError):
        return ()


def _thp_available() -> bool:
    try:
        with open(_THP_SETTING) as f:
            return "[never]" not in f.read()
    except OSError:
        return False


def huge_pages_wanted(environ: Optional[MutableMapping[str, str]] = None) -> bool:
    """Whether restart_with_cpu_memory_settings() would add the huge-page tunable (see the module docstring)."""
    environ = os.environ if environ is None else environ
    named = {item.split("=", 1)[0] for item in environ.get("GLIBC_TUNABLES", "").split(":") if item}
    return (sys.platform.startswith("linux") and not opted_out(OPT_OUT, environ) and _glibc_version() >= (2, 35)
            and _thp_available() and HUGE_PAGES_TUNABLE.split("=", 1)[0] not in named
            and cpu_backend_expected(environ))


def with_huge_pages(environ: MutableMapping[str, str]) -> MutableMapping[str, str]:
    """Adds HUGE_PAGES_TUNABLE to GLIBC_TUNABLES in `environ` (keeping the user's other tunables)."""
    current = environ.get("GLIBC_TUNABLES", "")
    environ["GLIBC_TUNABLES"] = f"{current}:{HUGE_PAGES_TUNABLE}" if current else HUGE_PAGES_TUNABLE
    return environ


BLOCK_CACHE_SOURCE = pathlib.Path(__file__).with_name("block_cache.c")


def build_block_cache() -> Optional[pathlib.Path]:
    """Compiles block_cache.c into the native cache (native_build.py) once per source and command; returns the
    shared library, or None (with the reason on stderr) where it cannot be built."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        print("facekd_jax: no C compiler (cc, gcc or $CC): large-block cache skipped", file=sys.stderr)
        return None
    try:
        return native_build.build_shared_library(
            BLOCK_CACHE_SOURCE, [cc, "-O2", "-shared", "-fPIC", str(BLOCK_CACHE_SOURCE), "-ldl"])
    except (native_build.BuildError, OSError) as e:
        print(f"facekd_jax: large-block cache skipped: {e}", file=sys.stderr)
        return None


def block_cache_wanted(environ: Optional[MutableMapping[str, str]] = None) -> bool:
    """Whether restart_with_cpu_memory_settings() would preload the large-block cache: Linux with glibc, CPU backend
    expected, not opted out, not preloaded already."""
    environ = os.environ if environ is None else environ
    prefix = f"{BLOCK_CACHE_SOURCE.stem}-"  # native_build names the library after its source
    preloaded = any(pathlib.Path(p).name.startswith(prefix) for p in environ.get("LD_PRELOAD", "").split())
    return (sys.platform.startswith("linux") and bool(_glibc_version()) and not opted_out(OPT_OUT, environ)
            and not preloaded and cpu_backend_expected(environ))


def with_block_cache(environ: MutableMapping[str, str], library: os.PathLike) -> MutableMapping[str, str]:
    """Adds `library` to LD_PRELOAD in `environ` (after the user's own preloads)."""
    current = environ.get("LD_PRELOAD", "").strip()
    environ["LD_PRELOAD"] = f"{current} {library}".strip()
    return environ


def restart_with_cpu_memory_settings() -> None:
    """Re-executes this command with glibc's huge-page tunable and the large-block cache preloaded, where
    huge_pages_wanted() or block_cache_wanted() (see the module docstring); else returns.

    For `if __name__ == "__main__":` blocks only, before any work: the process is replaced (same pid, same
    sys.orig_argv), so nothing done before it survives.
    """
    if not getattr(sys, "orig_argv", None):
        return
    changes = []
    if huge_pages_wanted():
        with_huge_pages(os.environ)
        changes.append(f"GLIBC_TUNABLES={os.environ['GLIBC_TUNABLES']} (transparent huge pages)")
    if block_cache_wanted():
        library = build_block_cache()
        if library is not None:
            with_block_cache(os.environ, library)
            changes.append(f"LD_PRELOAD={os.environ['LD_PRELOAD']} (large-block cache)")
    if not changes:
        return
    print(f"facekd_jax: restarting with {' and '.join(changes)} for XLA:CPU's buffers; {OPT_OUT}=0 skips this",
          file=sys.stderr, flush=True)
    sys.stdout.flush()
    os.execv(sys.executable, sys.orig_argv)


def onednn_expected(environ: Optional[MutableMapping[str, str]] = None) -> bool:
    """Whether convolutions will likely run in oneDNN (models/onednn_conv.py), judged before JAX starts: not opted
    out, its wheel installed, and no more than one forced host device in XLA_FLAGS."""
    environ = os.environ if environ is None else environ
    if opted_out(ONEDNN_OPT_OUT, environ):
        return False
    if _xla_flags(environ).get("xla_force_host_platform_device_count", "1").strip() not in ("", "1"):
        return False
    try:
        importlib.metadata.version(ONEDNN_DIST)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def apply_cpu_defaults(environ: Optional[MutableMapping[str, str]] = None) -> list[str]:
    """Appends CPU_DEFAULTS (CPU_DEFAULTS_WITH_ONEDNN where onednn_expected()) to XLA_FLAGS in `environ` (default
    os.environ); returns the flags it added.

    Adds nothing when OPT_OUT is 0/false/no/off, for a flag XLA_FLAGS already names, for a jaxlib other than
    TESTED_JAXLIB, or (with a warning, for os.environ) when JAX has already started a backend.
    """
    use_os = environ is None
    environ = os.environ if use_os else environ
    if opted_out(OPT_OUT, environ):
        return []
    if not jaxlib_is_tested():
        return []
    current = environ.get("XLA_FLAGS", "")
    named = _xla_flags(environ)
    defaults = CPU_DEFAULTS_WITH_ONEDNN if onednn_expected(environ) else CPU_DEFAULTS
    added = [f"--{name}={value}" for name, value in defaults.items() if name not in named]
    if not added:
        return []
    if use_os and _backends_started():
        warnings.warn(f"facekd_jax: JAX has already started, so the XLA:CPU defaults {added} cannot take "
                      "effect in this process; call xla_flags.apply_cpu_defaults() before the first JAX "
                      "computation", RuntimeWarning, stacklevel=2)
        return []
    environ["XLA_FLAGS"] = " ".join([current.strip(), *added]).strip()
    return added
