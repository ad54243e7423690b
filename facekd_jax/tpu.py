"""TPU chips and slices: the chips' published figures, the slices Cloud TPU sells (and Colab's), the slice a TPU
host's devices form, and compile-only devices of any slice through libtpu (the [tpu] extra), for facekd_jax.plan."""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Dict, List, Sequence, Tuple

# Another JAX process on this host (a test, a training run) may hold libtpu's lock file: a compile-only client
# needs none of it. Set before libtpu loads.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

TPU_EXTRA = "pip install 'facekd_jax[tpu]' (libtpu through jax[tpu] at the installed jax version)"


class PlanError(Exception):
    """A usage error of the plan: one line, exit status 2."""
    exit_status = 2


@dataclasses.dataclass(frozen=True)
class Chip:
    """Published figures of one TPU chip (the page in `source` states each)."""
    kind: str
    peak_bf16_flops: float       # FLOP/s
    hbm_bytes: int
    hbm_bandwidth: float         # bytes/s
    source: str


CHIPS = {
    "v4": Chip("TPU v4", 275e12, 32 * 2**30, 1200e9, "https://cloud.google.com/tpu/docs/v4"),
    "v5e": Chip("TPU v5e", 197e12, 16 * 2**30, 819e9, "https://cloud.google.com/tpu/docs/v5e"),
    "v5p": Chip("TPU v5p", 459e12, 95 * 10**9, 2765e9, "https://cloud.google.com/tpu/docs/v5p"),
    "v6e": Chip("TPU v6e", 918e12, 32 * 10**9, 1638e9, "https://cloud.google.com/tpu/docs/v6e"),
}


@dataclasses.dataclass(frozen=True)
class Topology:
    """A slice: its name as Cloud TPU sells it (v4 and v5p count TensorCores, two per chip; v5e and v6e chips),
    libtpu's topology string, the chips per host and the chip configuration (megacore: one device per chip)."""
    name: str
    chip: str
    topology: str
    host_bounds: Tuple[int, int, int]
    chip_config: str = "default"
    note: str = ""

    @property
    def chips(self) -> int:
        return math.prod(int(v) for v in self.topology.split(":")[1].split("x"))

    @property
    def hosts(self) -> int:
        return max(1, self.chips // math.prod(self.host_bounds))


def _topologies() -> Dict[str, Topology]:
    out = {}
    for chip in ("v4", "v5p"):  # two TensorCores per chip, one megacore device
        for shape in ("2x2x1", "2x2x2", "2x2x4", "2x4x4", "4x4x4"):
            cores = 2 * math.prod(int(v) for v in shape.split("x"))
            out[f"{chip}-{cores}"] = Topology(f"{chip}-{cores}", chip, f"{chip}:{shape}", (2, 2, 1), "megacore")
    for chip in ("v5e", "v6e"):
        for shape in ("1x1", "2x2", "2x4", "4x4", "4x8", "8x8", "8x16", "16x16"):
            chips = math.prod(int(v) for v in shape.split("x"))
            bounds = (1, 1, 1) if chips == 1 else (2, 2, 1) if chips == 4 else (2, 4, 1) if chips == 8 else (2, 2, 1)
            out[f"{chip}-{chips}"] = Topology(f"{chip}-{chips}", chip, f"{chip}:{shape}", bounds)
    out["colab"] = dataclasses.replace(out["v5e-1"], name="colab", note="Colab's TPU runtime: one v5e chip")
    out["colab-v6e"] = dataclasses.replace(out["v6e-1"], name="colab-v6e", note="Colab's v6e runtime: one chip")
    return out


TOPOLOGIES = _topologies()

# jax's device_kind of each chip (v4 and v5p show one megacore device per chip).
_DEVICE_KINDS = {"TPU v4": "v4", "TPU v5 lite": "v5e", "TPU v5e": "v5e", "TPU v5p": "v5p", "TPU v5": "v5p",
                 "TPU v6 lite": "v6e", "TPU v6e": "v6e"}


def topology_of(devices: Sequence[Any]) -> str:
    """The name of the slice `devices` (jax.devices() on a TPU host) form: "colab" for one v5e chip, "v5e-8",
    "v4-8" (TensorCores, as Cloud TPU names v4 and v5p), ...; PlanError where the chip or count is not in
    TOPOLOGIES."""
    kind = str(devices[0].device_kind)
    chip = next((c for k, c in _DEVICE_KINDS.items() if kind.lower().startswith(k.lower())), None)
    count = len(devices) * (2 if chip in ("v4", "v5p") else 1)
    name = {("v5e", 1): "colab", ("v6e", 1): "colab-v6e"}.get((chip, count), f"{chip}-{count}")
    if chip is None or name not in TOPOLOGIES:
        raise PlanError(f"no plan topology for {len(devices)} x {kind}; known: {', '.join(TOPOLOGIES)}")
    return name


def topology_devices(topology: Topology) -> List[Any]:
    """Compile-only TPU devices of the slice. PlanError (one line) without libtpu."""
    try:
        from jax.experimental import topologies
        desc = topologies.get_topology_desc(platform="tpu", topology_name=topology.topology,
                                            chip_config_name=topology.chip_config,
                                            chips_per_host_bounds=topology.host_bounds, num_slices=1)
    except Exception as e:  # noqa: BLE001 (no TPU plugin: RuntimeError or ValueError depending on the jax build)
        raise PlanError(f"compiling for {topology.name} needs libtpu, which is not installed or does not load "
                        f"({type(e).__name__}: {str(e).splitlines()[0][:160]}): {TPU_EXTRA}") from None
    return list(desc.devices)


def find_topology(name: str) -> Topology:
    if name not in TOPOLOGIES:
        raise PlanError(f"unknown topology {name!r}; known: {', '.join(TOPOLOGIES)}")
    return TOPOLOGIES[name]
