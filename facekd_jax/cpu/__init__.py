"""Opt-in CPU kernels: oneDNN convolutions and fused batch norm, handed to the models as their layers.

Nothing else in facekd_jax imports this package unless `config.cpu_kernels` asks for it, and the package works
without it. Install the native part with the `[cpu]` extra (`pip install 'facekd_jax[cpu]'`: the oneDNN wheels;
the handlers compile on first use with the system C++ compiler). Two pieces:

- `model_layers(choice, num_devices)`: {"conv": ..., "norm": ...} for `build_model(**layers)`, decided once per
  run by the set-up (facekd_jax.step.setup) from `config.cpu_kernels`:
    "auto"   oneDNN layers (depthwise convolutions included) on a single-device CPU run where the extra is
             installed and builds; elsewhere on a CPU flax's Conv with depthwise convolutions as element-wise
             taps (pure JAX, 6x faster than XLA:CPU's grouped convolution); on a GPU/TPU flax's layers;
    "onednn" the oneDNN layers, or an error where they cannot be used;
    "taps"   on a CPU flax's layers with depthwise convolutions as taps (what "auto" gives without the extra),
             elsewhere flax's: XLA's own kernels at a usable speed, another rounding than oneDNN's;
    "xla"    flax's layers, XLA's kernels.
- `xla_flags.apply_cpu_defaults()`: XLA:CPU flags (YNNPACK element-wise fusions), pure Python, applied by the
  entry points before JAX starts.
"""
from __future__ import annotations

import logging
from typing import Any, Dict

CHOICES = ("auto", "onednn", "taps", "xla")

log = logging.getLogger(__name__)


def model_layers(choice: str, *, num_devices: int, platform: str = "") -> Dict[str, Any]:
    """The conv/norm layer classes for build_model under `config.cpu_kernels = choice` ({} = flax's own).

    num_devices: the devices the run's mesh spans; the custom calls have no SPMD rule, so several devices get
    flax's layers ("onednn" then raises). platform: the mesh's ("cpu", "tpu", "gpu"; default JAX's backend): a
    TPU program compiled on a CPU host (facekd_jax.plan) gets flax's layers. Raises ValueError for an unknown
    choice, RuntimeError where "onednn" was asked for and cannot be had (the message says why and how to install
    the extra).
    """
    if choice not in CHOICES:
        raise ValueError(f"config.cpu_kernels={choice!r}: expected one of {', '.join(CHOICES)}")
    if choice == "xla":
        return {}
    import jax

    platform = platform or jax.default_backend()
    why = ""
    if choice == "taps":
        why = "cpu_kernels='taps'"
    elif platform != "cpu":
        why = f"the devices are {platform}, not the CPU"
    elif num_devices != 1:
        why = f"the mesh has {num_devices} devices (the oneDNN custom calls run on one)"
    else:
        from facekd_jax.cpu import onednn
        if not onednn.available():
            why = (f"{onednn.unavailable_reason()} (install the [cpu] extra: pip install 'facekd_jax[cpu]'; "
                   "a C++ compiler is needed)")
    if why:
        if choice == "onednn":
            raise RuntimeError(f"config.cpu_kernels='onednn' but oneDNN layers cannot be used: {why}")
        if platform != "cpu":
            log.info("cpu_kernels=%s: flax's layers (%s)", choice, why)
            return {}
        from facekd_jax.cpu.layers import TapsConv
        log.info("cpu_kernels=%s: flax's layers, depthwise convolutions as taps (%s)", choice, why)
        return {"conv": TapsConv}
    from facekd_jax.cpu.layers import FusedBatchNorm, OnednnConv
    log.info("cpu_kernels=%s: oneDNN convolutions and fused batch norm", choice)
    return {"conv": OnednnConv, "norm": FusedBatchNorm}
