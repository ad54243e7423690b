"""XLA:CPU settings that make the train step faster on a CPU, applied by the entry points before JAX starts.

jaxlib 0.10's XLA:CPU already hands some dots, reductions and convolutions to YNNPACK, but runs the element-wise
loop fusions of a ResNet train step (batch norm, ReLU, residual adds, the transposes in front of every
weight-gradient convolution) in its own code, and those took most of the step.
`--xla_cpu_experimental_ynn_fusion_type=dot,eltwise,reduce` gives YNNPACK the element-wise fusions too (and,
replacing the default list, leaves convolutions to XLA's Eigen kernels, which were faster here): resnet56's
112x112 float32 train step at batch 32 runs about 1.7x faster on this project's 2-core CPU
(`python benchmarks/train_step.py`, figures in the README), with the same results up to float summation order
(tests/test_xla_flags.py trains with and without the flag and compares). Where convolutions run in oneDNN
instead (facekd_jax/cpu/onednn.py, on a single-device CPU with the [cpu] extra installed) the element-wise
fusions cost more than they save, and `dot,reduce` is added instead (CPU_DEFAULTS_WITH_ONEDNN).

The flags touch only XLA's CPU backend; programs on a GPU or TPU are compiled exactly as before. XLA reads
XLA_FLAGS once, when JAX creates its first backend, so `apply_cpu_defaults()` must run before the first JAX
computation: `facekd_jax.main` and `facekd_jax.suite` call it when config.cpu_kernels is not "xla", and the
benchmarks, the notebooks and the tests call it first.

Yours win: a flag already named in XLA_FLAGS is left as you set it, and `FACEKD_XLA_CPU_DEFAULTS=0` turns the
defaults off. They are only added for the jaxlib minor version they were tested with (an unknown name in
XLA_FLAGS makes XLA abort the process).

Memory settings that help XLA:CPU but are the process's to choose, not a library's, are set by the Makefile
(and documented in the README): glibc's transparent-huge-page tunable (`GLIBC_TUNABLES=glibc.malloc.hugetlb=1`)
removes most of the page faults of the per-step temporary buffer (638k fresh 4 KiB pages per resnet56 step).
"""
from __future__ import annotations

import importlib.metadata
import os
import sys
import warnings
from typing import MutableMapping, Optional

# flag name -> value, for XLA's own convolutions. With "individual_convolution" added (YNNPACK convolutions too)
# the step was 10-18% slower.
CPU_DEFAULTS = {"xla_cpu_experimental_ynn_fusion_type": "dot,eltwise,reduce"}
# With oneDNN's convolutions (cpu/onednn.py) element-wise YNNPACK fusions cost more than they save: XLA
# materialises each batch-norm broadcast for them, a full-size write per layer. resnet56 train step: 15.0-15.4
# images/s with these vs 13.9-14.3 with CPU_DEFAULTS (alternating runs).
CPU_DEFAULTS_WITH_ONEDNN = {"xla_cpu_experimental_ynn_fusion_type": "dot,reduce"}
# cpu.onednn.RUNTIME_DIST, here because that module imports JAX and this one must not
ONEDNN_DIST = "onednn-cpu-gomp"
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


def onednn_expected(environ: Optional[MutableMapping[str, str]] = None) -> bool:
    """Whether convolutions will likely run in oneDNN (cpu/onednn.py), judged before JAX starts: its wheel installed
    (the [cpu] extra) and no more than one forced host device in XLA_FLAGS."""
    environ = os.environ if environ is None else environ
    if _xla_flags(environ).get("xla_force_host_platform_device_count", "1").strip() not in ("", "1"):
        return False
    try:
        importlib.metadata.version(ONEDNN_DIST)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def apply_cpu_defaults(environ: Optional[MutableMapping[str, str]] = None, *, onednn: bool = True) -> list[str]:
    """Appends CPU_DEFAULTS (CPU_DEFAULTS_WITH_ONEDNN where `onednn` and onednn_expected()) to XLA_FLAGS in
    `environ` (default os.environ); returns the flags it added. onednn: whether the run may use the oneDNN
    layers (False for config.cpu_kernels="xla").

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
    defaults = CPU_DEFAULTS_WITH_ONEDNN if onednn and onednn_expected(environ) else CPU_DEFAULTS
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
