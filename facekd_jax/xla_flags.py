"""XLA:CPU settings that make the train step faster on a CPU, applied by the entry points before JAX starts.

jaxlib 0.10's XLA:CPU already hands some dots, reductions and convolutions to YNNPACK, but runs the element-wise
loop fusions of a ResNet train step (batch norm, ReLU, residual adds, the transposes in front of every
weight-gradient convolution) in its own code, and those took most of the step.
`--xla_cpu_experimental_ynn_fusion_type=dot,eltwise,reduce` gives YNNPACK the element-wise fusions too (and,
replacing the default list, leaves convolutions to XLA's Eigen kernels, which were faster here): resnet56's
112x112 float32 train step at batch 32 runs about 1.7x faster on this project's 2-core CPU
(`python benchmarks/train_step.py`, figures in the README), with the same results up to float summation order
(tests/test_xla_flags.py trains with and without the flag and compares).

The flags touch only XLA's CPU backend; programs on a GPU or TPU are compiled exactly as before. XLA reads
XLA_FLAGS once, when JAX creates its first backend, so `apply_cpu_defaults()` must run before the first JAX
computation: `facekd_jax.main`, `facekd_jax.suite`, the train-step benchmark, the notebooks and the tests call it
first.

Yours win: a flag already named in XLA_FLAGS is left as you set it, and `FACEKD_XLA_CPU_DEFAULTS=0` turns the
defaults off. They are only added for the jaxlib minor version they were tested with (an unknown name in
XLA_FLAGS makes XLA abort the process).
"""
from __future__ import annotations

import importlib.metadata
import os
import sys
import warnings
from typing import MutableMapping, Optional

# flag name -> value. With "individual_convolution" added (YNNPACK convolutions too) the step was 10-18% slower.
CPU_DEFAULTS = {"xla_cpu_experimental_ynn_fusion_type": "dot,eltwise,reduce"}
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


def apply_cpu_defaults(environ: Optional[MutableMapping[str, str]] = None) -> list[str]:
    """Appends CPU_DEFAULTS to XLA_FLAGS in `environ` (default os.environ); returns the flags it added.

    Adds nothing when OPT_OUT is 0/false/no/off, for a flag XLA_FLAGS already names, for a jaxlib other than
    TESTED_JAXLIB, or (with a warning, for os.environ) when JAX has already started a backend.
    """
    use_os = environ is None
    environ = os.environ if use_os else environ
    if environ.get(OPT_OUT, "1").strip().lower() in ("0", "false", "no", "off"):
        return []
    if not jaxlib_is_tested():
        return []
    current = environ.get("XLA_FLAGS", "")
    named = {token.lstrip("-").split("=", 1)[0] for token in current.split()}
    added = [f"--{name}={value}" for name, value in CPU_DEFAULTS.items() if name not in named]
    if not added:
        return []
    if use_os and _backends_started():
        warnings.warn(f"facekd_jax: JAX has already started, so the XLA:CPU defaults {added} cannot take "
                      "effect in this process; call xla_flags.apply_cpu_defaults() before the first JAX "
                      "computation", RuntimeWarning, stacklevel=2)
        return []
    environ["XLA_FLAGS"] = " ".join([current.strip(), *added]).strip()
    return added
