"""What a reader of an arcface_torch iResNet file gives (`IResNetWeights`: torch-named float32 arrays), and the
architecture it must have: the module list, the tensor shapes, blocks per stage, the r18..r200 names. Shared by the
.pth and ONNX readers (teachers/pth_format.py, teachers/onnx_format.py) and the importer (teachers/insightface.py).
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from facekd_jax.models.iresnet import IRESNET_STAGES

IMAGE_SIZE = 112
WIDTHS = (64, 128, 256, 512)
FINAL_MAP = 7                                   # 112 -> 56 -> 28 -> 14 -> 7
FC_INPUTS = WIDTHS[-1] * FINAL_MAP * FINAL_MAP  # 25,088
ARCHS = {f"r{name[len('iresnet'):]}": name for name in IRESNET_STAGES}   # r18 -> iresnet18, ...
INPUT_CONTRACT = {
    "input": f"{IMAGE_SIZE}x{IMAGE_SIZE} RGB face crop aligned to insightface's 5-point ArcFace template",
    "normalisation": "(pixel - 127.5) / 127.5 (arcface_torch; inputs as every model's)",
    "compare": "cosine similarity of the embeddings",
}
_BN_FIELDS = ("weight", "bias", "running_mean", "running_var")


class InsightfaceFormatError(ValueError):
    """The weights are not (or not entirely) an arcface_torch iResNet; names the file and the tensor or node."""


@dataclasses.dataclass
class IResNetWeights:
    """What a reader found. state: torch names -> float32 arrays in torch layouts, every BN complete (a folded
    one as the identity plus its bias); origins: name -> where it came from, for errors (ONNX initializer and
    node; empty for a .pth, whose names are the file's); fmt: how the file stored it (teacher.json "format")."""
    path: str
    state: Dict[str, np.ndarray]
    fmt: Dict[str, Any]
    origins: Dict[str, str] = dataclasses.field(default_factory=dict)

    def where(self, name: str) -> str:
        """'tensor NAME' plus its origin in the file where that is not the name itself."""
        origin = self.origins.get(name)
        return f"tensor {name}" + (f" ({origin})" if origin else "")


# ------------------------------------------------------------------------------------------- architecture


def model_name(arch: str) -> str:
    """'r50' | 'iresnet50' -> 'iresnet50'; ValueError listing the known ones."""
    name = ARCHS.get(arch, arch)
    if name not in IRESNET_STAGES:
        raise ValueError(f"--arch={arch}: unknown; known: {', '.join(ARCHS)} (or {', '.join(IRESNET_STAGES)})")
    return name


def blocks_per_stage(state: Dict[str, np.ndarray]) -> Tuple[int, ...]:
    """The number of layerS.J blocks per stage S = 1..4 the names hold (the highest J + 1)."""
    counts = [0, 0, 0, 0]
    for name in state:
        m = re.match(r"layer([1-4])\.(\d+)\.", name)
        if m:
            stage, block = int(m.group(1)) - 1, int(m.group(2))
            counts[stage] = max(counts[stage], block + 1)
    return tuple(counts)


def _arch_of(stages: Tuple[int, ...]) -> Optional[str]:
    return next((name for name, sizes in IRESNET_STAGES.items() if tuple(sizes) == tuple(stages)), None)


def _known_archs() -> str:
    return ", ".join(f"{short} {list(IRESNET_STAGES[name])}" for short, name in ARCHS.items())


def _modules(model: str) -> List[Tuple[str, Tuple[str, ...], str, Tuple[int, ...]]]:
    """(torch module, Flax path, kind, dims) of every module with weights, input outwards. kind: conv (dims: out,
    in, k), bn (channels), prelu (channels), fc, features."""
    out = [("conv1", ("conv1",), "conv", (WIDTHS[0], 3, 3)), ("bn1", ("bn1",), "bn", (WIDTHS[0],)),
           ("prelu", ("prelu",), "prelu", (WIDTHS[0],))]
    cin = WIDTHS[0]
    for s, (n, width) in enumerate(zip(IRESNET_STAGES[model], WIDTHS), start=1):
        for j in range(n):
            t, f = f"layer{s}.{j}", f"layer{s}_{j}"
            out += [(f"{t}.bn1", (f, "bn1"), "bn", (cin,)), (f"{t}.conv1", (f, "conv1"), "conv", (width, cin, 3)),
                    (f"{t}.bn2", (f, "bn2"), "bn", (width,)), (f"{t}.prelu", (f, "prelu"), "prelu", (width,)),
                    (f"{t}.conv2", (f, "conv2"), "conv", (width, width, 3)),
                    (f"{t}.bn3", (f, "bn3"), "bn", (width,))]
            if j == 0:  # stride 2 (and a wider map) in the first block of every stage: a projected shortcut
                out += [(f"{t}.downsample.0", (f, "downsample_conv"), "conv", (width, cin, 1)),
                        (f"{t}.downsample.1", (f, "downsample_bn"), "bn", (width,))]
            cin = width
    out += [("bn2", ("head", "bn2"), "bn", (WIDTHS[-1],)), ("fc", ("head", "fc"), "fc", ()),
            ("features", ("head", "features"), "features", ())]
    return out


def expected_shapes(model: str, embedding_size: int) -> Dict[str, Tuple[int, ...]]:
    """{torch tensor name: shape} of an arcface_torch iResNet (without num_batches_tracked), input outwards."""
    shapes: Dict[str, Tuple[int, ...]] = {}
    for module, _, kind, dims in _modules(model):
        if kind == "conv":
            shapes[f"{module}.weight"] = (dims[0], dims[1], dims[2], dims[2])
        elif kind == "prelu":
            shapes[f"{module}.weight"] = dims
        elif kind == "fc":
            shapes.update({"fc.weight": (embedding_size, FC_INPUTS), "fc.bias": (embedding_size,)})
        else:
            c = dims if kind == "bn" else (embedding_size,)
            shapes.update({f"{module}.{field}": c for field in _BN_FIELDS})
    return shapes
