"""insightface arcface_torch iResNet weights (a .pth state dict or an .onnx file) as a facekd_jax teacher.

    weights = read_insightface("w600k_r50.onnx")        # IResNetWeights: torch-named float32 arrays + notes
    model, variables, notes = to_flax_variables(weights)   # "iresnet50", {"params", "batch_stats"}, teacher.json
    run = import_insightface("runs/teacher_r50", "w600k_r50.onnx")   # a teacher run (facekd_jax.teachers.imported)

The network (arcface_torch backbones/iresnet.py): images float [B, 3, 112, 112] RGB, (pixel - 127.5) / 127.5,
ArcFace-aligned -> conv1 -> bn1 -> prelu -> layer1..layer4 of IBasicBlocks -> bn2 -> flatten -> dropout -> fc ->
features (BatchNorm1d, weight frozen at 1) -> embedding [B, E] (512), compared by cosine. facekd_jax's IResNet
has the same modules under the same names (conv1, bn1, prelu, layer1_0/..., head/bn2, head/fc, head/features).

Both readers give one canonical form, a torch state dict (`IResNetWeights.state`: conv weights OIHW, fc.weight
[E, 512*7*7] with inputs in NCHW order), and one mapping (`to_flax_variables`) turns it into Flax variables:
  - conv weight [O, I, kh, kw] -> kernel [kh, kw, I, O]; PReLU weight [C] -> negative_slope [C];
  - BatchNorm weight/bias -> params scale/bias, running_mean/var -> batch_stats mean/var (num_batches_tracked
    is dropped; eps is 1e-5 on both sides);
  - fc.weight: torch flattens the last [512, 7, 7] map as (c, h, w), Flax's NHWC map as (h, w, c), so its input
    axis is permuted: [E, 512, 7, 7] -> [7, 7, 512, E] -> kernel [7*7*512, E];
  - features.weight: Flax's head BN has no scale (arcface_torch freezes it at 1). A file whose values are not 1
    is folded exactly into the layer before it (fc kernel columns, fc bias and running_mean times the weight).
ONNX (`onnx` package) is mapped by the graph's structure, walked from the input: an optional (x - 127.5) * s
(Sub, Mul/Div; folded into conv1's kernel), conv1 [-> BatchNormalization] -> PRelu, per block a
BatchNormalization -> Conv [-> BN] -> PRelu -> Conv [-> BN] -> Add with the block input or a 1x1 Conv [-> BN],
then BatchNormalization -> Flatten/Reshape -> Gemm or MatMul [+ Add] [-> BatchNormalization]. A Conv without its
BatchNormalization node (torch's eval-mode export folds conv -> BN pairs) carries the BN in its weight and bias:
its Flax BN becomes the identity (mean 0, var 1 - eps, scale 1) with the folded bias as its bias. Initializer
names are never used to decide what a tensor is.
Every failure is one InsightfaceFormatError (a ValueError) naming the file and the tensor or graph node.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import os
import re
import zipfile
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

from facekd_jax.models.iresnet import IRESNET_STAGES
from facekd_jax.models.layers import BN_EPSILON

log = logging.getLogger(__name__)

IMAGE_SIZE = 112
WIDTHS = (64, 128, 256, 512)
FINAL_MAP = 7                                   # 112 -> 56 -> 28 -> 14 -> 7
FC_INPUTS = WIDTHS[-1] * FINAL_MAP * FINAL_MAP  # 25,088
ARCHS = {f"r{name[len('iresnet'):]}": name for name in IRESNET_STAGES}   # r18 -> iresnet18, ...
ONNX_HINT = "pip install 'facekd_jax[teachers]' (or: pip install onnx)"
INPUT_CONTRACT = {
    "input": f"{IMAGE_SIZE}x{IMAGE_SIZE} RGB face crop aligned to insightface's 5-point ArcFace template",
    "normalisation": "(pixel - 127.5) / 127.5 (arcface_torch; inputs as every model's)",
    "compare": "cosine similarity of the embeddings",
}
_BN_FIELDS = ("weight", "bias", "running_mean", "running_var")
_PASS_THROUGH = ("Identity", "Dropout")          # no-ops in eval mode
_SHAPE_OPS = ("Shape", "Gather", "Unsqueeze", "Squeeze", "Concat", "Slice", "Cast", "Constant", "Identity")


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


# ------------------------------------------------------------------------------------------- to Flax


def to_flax_variables(weights: IResNetWeights, arch: Optional[str] = None
                      ) -> Tuple[str, Dict[str, Any], Dict[str, Any]]:
    """IResNetWeights -> (model name, {"params", "batch_stats"} for build_model(model, embedding_size=E), notes).

    arch: 'r50' / 'iresnet50', or None to infer it from the blocks per stage. E comes from fc.weight. notes:
    {"arch", "blocks_per_stage", "embedding_size", "features_weight"} for teacher.json.
    InsightfaceFormatError names the file and the first missing, extra or misshapen tensor.
    """
    path, state = weights.path, dict(weights.state)
    stages = blocks_per_stage(state)
    found = _arch_of(stages)
    model = model_name(arch) if arch else found
    if model is None:
        raise InsightfaceFormatError(f"{path}: blocks per stage {list(stages)} are no arcface_torch iResNet's "
                                     f"({_known_archs()})")
    fc = state.get("fc.weight")
    if fc is None or fc.ndim != 2:
        got = "missing" if fc is None else f"of shape {list(fc.shape)}"
        raise InsightfaceFormatError(f"{path}: {weights.where('fc.weight')} is {got}; an iResNet's fc.weight is "
                                     f"[E, {FC_INPUTS}] (the embedding width E, 512 * 7 * 7 inputs)")
    embedding_size = int(fc.shape[0])
    want = expected_shapes(model, embedding_size)
    bn_modules = {m for m, _, kind, _ in _modules(model) if kind in ("bn", "features")}
    state = {k: v for k, v in state.items()
             if not (k.endswith(".num_batches_tracked") and k[:-len(".num_batches_tracked")] in bn_modules)}
    actual = (f"; the file's blocks per stage {list(stages)} are {found}'s: leave --arch out to infer it"
              if found and found != model else "")
    missing = [k for k in want if k not in state]
    if missing:
        raise InsightfaceFormatError(f"{path}: tensor {missing[0]} of {model} is missing"
                                     f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}{actual}")
    extra = [k for k in state if k not in want]
    if extra:
        raise InsightfaceFormatError(f"{path}: {weights.where(extra[0])} is not part of {model}"
                                     f"{f' (and {len(extra) - 1} more)' if len(extra) > 1 else ''}{actual}")
    for name, shape in want.items():
        got = state[name]
        if tuple(got.shape) != shape:
            hint = (f" ({FC_INPUTS} = 512 * 7 * 7 inputs: arcface_torch's {IMAGE_SIZE}x{IMAGE_SIZE} input)"
                    if name == "fc.weight" else "")
            raise InsightfaceFormatError(f"{path}: {weights.where(name)} has shape {list(got.shape)}, {model} "
                                         f"needs {list(shape)}{hint}")
        if not np.issubdtype(got.dtype, np.floating):
            raise InsightfaceFormatError(f"{path}: {weights.where(name)} is {got.dtype}, expected floating point")
        if not np.all(np.isfinite(got)):
            raise InsightfaceFormatError(f"{path}: {weights.where(name)} holds NaN or Inf")
    state = {k: np.asarray(v, np.float32) for k, v in state.items()}

    # features.weight (frozen at 1 in arcface_torch) has no Flax counterpart: fold any other value into the
    # layer before it, exactly: w * ((Wx + b) - m) / s = ((wW)x + wb - wm) / s.
    w = state["features.weight"]
    folded = not np.all(w == 1.0)
    if folded:
        state["fc.weight"] = state["fc.weight"] * w[:, None]
        state["fc.bias"] = state["fc.bias"] * w
        state["features.running_mean"] = state["features.running_mean"] * w
    negative = [f"{m}.running_var" for m in bn_modules if np.any(state[f"{m}.running_var"] + BN_EPSILON <= 0)]
    if negative:
        raise InsightfaceFormatError(f"{path}: {weights.where(negative[0])} has values <= -eps (not a variance)")

    params: Dict[str, Any] = {}
    stats: Dict[str, Any] = {}

    def put(tree: Dict[str, Any], where: Tuple[str, ...], leaves: Dict[str, np.ndarray]) -> None:
        node = tree
        for part in where:
            node = node.setdefault(part, {})
        node.update({k: np.ascontiguousarray(v, np.float32) for k, v in leaves.items()})

    for module, where, kind, _ in _modules(model):
        if kind == "conv":
            put(params, where, {"kernel": state[f"{module}.weight"].transpose(2, 3, 1, 0)})
        elif kind == "prelu":
            put(params, where, {"negative_slope": state[f"{module}.weight"]})
        elif kind == "fc":
            kernel = state["fc.weight"].reshape(embedding_size, WIDTHS[-1], FINAL_MAP, FINAL_MAP)
            put(params, where, {"kernel": kernel.transpose(2, 3, 1, 0).reshape(FC_INPUTS, embedding_size),
                                "bias": state["fc.bias"]})
        else:
            scale = {} if kind == "features" else {"scale": state[f"{module}.weight"]}
            put(params, where, {**scale, "bias": state[f"{module}.bias"]})
            put(stats, where, {"mean": state[f"{module}.running_mean"], "var": state[f"{module}.running_var"]})
    notes = {"arch": model, "blocks_per_stage": list(IRESNET_STAGES[model]), "embedding_size": embedding_size,
             "features_weight": (f"folded into fc (the file's values: {float(w.min()):.6g} .. {float(w.max()):.6g})"
                                 if folded else "1 (frozen, as arcface_torch's)")}
    return model, {"params": params, "batch_stats": stats}, notes


# ------------------------------------------------------------------------------------------- readers


def read_insightface(path: "str | os.PathLike", *, use_torch: Optional[bool] = None) -> IResNetWeights:
    """A .pth state dict or an .onnx file -> IResNetWeights (the kind by the suffix, else by the content: a zip or
    a pickle is a .pth). use_torch: for a .pth, as pth_format.read_state_dict."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--weights={path}: no such file")
    with open(path, "rb") as f:
        pickled = f.read(1) == b"\x80"   # a pickle's PROTO opcode: a legacy (non-zip) torch.save file
    if path.lower().endswith(".onnx") or not (zipfile.is_zipfile(path) or pickled):
        return read_onnx(path)
    from facekd_jax.teachers import pth_format

    use_torch = pth_format.torch_installed() if use_torch is None else use_torch
    state = pth_format.read_state_dict(path, use_torch=use_torch)
    reader = "torch.load(weights_only=True)" if use_torch else "facekd_jax.teachers.pth_format (restricted unpickler)"
    return IResNetWeights(path=path, state=state, fmt={"kind": "pth", "reader": reader,
                                                       "batch_norm": "kept (a state dict)"})


def read_onnx(path: "str | os.PathLike") -> IResNetWeights:
    """An ONNX iResNet -> IResNetWeights, mapped by walking its graph (module docstring). ImportError with the
    install command where the onnx package is missing."""
    path = os.fspath(path)
    try:
        import onnx
    except ImportError as e:
        raise ImportError(f"{path}: reading an ONNX file needs the onnx package: {ONNX_HINT}") from e
    try:
        proto = onnx.load(path)
    except Exception as e:  # noqa: BLE001 - a protobuf decode error, a missing external-data file, ...
        raise InsightfaceFormatError(f"{path}: not a readable ONNX model ({type(e).__name__}: "
                                     f"{str(e).splitlines()[0] if str(e) else ''})") from None
    return _OnnxWalk(proto, path).run()


def _onnx_array(tensor) -> np.ndarray:
    from onnx import numpy_helper

    return np.asarray(numpy_helper.to_array(tensor))


def _attributes(node) -> Dict[str, Any]:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


class _OnnxWalk:
    """Walks an ONNX graph from its image input to its embedding output, recording the iResNet's tensors."""

    def __init__(self, proto, path: str):
        graph = proto.graph
        self.path = path
        self.nodes = list(graph.node)
        self.consts: Dict[str, np.ndarray] = {t.name: _onnx_array(t) for t in graph.initializer}
        self.visited = set()
        for i, node in enumerate(self.nodes):   # ONNX lists nodes in topological order
            if node.op_type == "Constant":
                attrs = _attributes(node)
                if "value" in attrs:
                    value = _onnx_array(attrs["value"])
                else:
                    key = next(iter(attrs), None)
                    value = np.asarray(attrs[key]) if key in ("value_float", "value_floats", "value_int",
                                                              "value_ints") else None
                if value is not None:
                    self.consts[node.output[0]] = value
                    self.visited.add(i)
            elif node.op_type == "Identity" and node.input[0] in self.consts:
                self.consts[node.output[0]] = self.consts[node.input[0]]
                self.visited.add(i)
        self.consumers: Dict[str, List[int]] = collections.defaultdict(list)
        self.producer: Dict[str, int] = {}
        for i, node in enumerate(self.nodes):
            if i in self.visited:
                continue
            for t in node.input:
                if t:
                    self.consumers[t].append(i)
            for t in node.output:
                self.producer[t] = i
        inputs = [v.name for v in graph.input if v.name not in self.consts]
        if len(inputs) != 1:
            raise InsightfaceFormatError(f"{path}: expected one image input, found {len(inputs)}: {inputs}")
        self.input = inputs[0]
        self.outputs = [v.name for v in graph.output]
        self.state: Dict[str, np.ndarray] = {}
        self.origins: Dict[str, str] = {}
        self.folded: List[str] = []
        self.kept: List[str] = []
        self.stages = [0, 0, 0, 0]   # blocks read per stage
        self.stage = 0               # the stage being read (1..4)
        self.normalisation = "none in the graph"

    # -- helpers

    def label(self, i: int) -> str:
        node = self.nodes[i]
        return f"node {node.name!r} ({node.op_type})" if node.name else f"node #{i} ({node.op_type})"

    def fail(self, i: int, message: str) -> InsightfaceFormatError:
        return InsightfaceFormatError(f"{self.path}: {self.label(i)}: {message}")

    def op(self, i: Optional[int]) -> str:
        return self.nodes[i].op_type if i is not None else "the graph's end"

    def uses(self, t: str) -> List[int]:
        """Nodes reading t, without the Shape nodes of a dynamic Reshape's side branch (checked there)."""
        return [i for i in self.consumers.get(t, []) if self.nodes[i].op_type != "Shape"]

    def follow(self, t: str) -> Tuple[Optional[int], str]:
        """The one node reading t, through eval-mode no-ops (Identity, Dropout): (node, the tensor it reads);
        (None, t) where t is a graph output read by nothing."""
        while True:
            users = self.uses(t)
            if not users and t in self.outputs:
                return None, t
            if len(users) != 1:
                at = self.producer.get(t)
                what = f"tensor {t!r}" + (f" of {self.label(at)}" if at is not None else "")
                raise InsightfaceFormatError(f"{self.path}: {what} is read by {len(users)} nodes "
                                             f"({', '.join(self.label(u) for u in users[:3])}); an iResNet reads it "
                                             "once here")
            i = users[0]
            if self.nodes[i].op_type not in _PASS_THROUGH:
                return i, t
            self.visited.add(i)
            t = self.nodes[i].output[0]

    def expect(self, i: Optional[int], ops: Tuple[str, ...], what: str, after: str) -> int:
        if i is None:
            raise InsightfaceFormatError(f"{self.path}: the graph ends after {after}; expected {what} "
                                         f"({' or '.join(ops)})")
        if self.nodes[i].op_type not in ops:
            raise self.fail(i, f"expected {what} ({' or '.join(ops)}) after {after}")
        self.visited.add(i)
        return i

    def const(self, i: int, k: int, what: str) -> np.ndarray:
        node = self.nodes[i]
        if len(node.input) <= k or node.input[k] not in self.consts:
            raise self.fail(i, f"its input {k} ({what}) is not a constant (initializer)")
        return self.consts[node.input[k]]

    def record(self, name: str, value: np.ndarray, origin: str) -> None:
        self.state[name] = np.asarray(value, np.float32)
        self.origins[name] = origin

    # -- layers

    def conv(self, i: int, name: str, kernel: int, strides: Tuple[int, ...]) -> Tuple[str, Optional[np.ndarray], int]:
        """A Conv node -> (its output, its bias or None, its stride); records NAME.weight [O, I, k, k]."""
        a = _attributes(self.nodes[i])
        weight = self.const(i, 1, "weight")
        stride = list(a.get("strides", [1, 1]))
        checks = {"group": (a.get("group", 1), 1), "dilations": (list(a.get("dilations", [1, 1])), [1, 1]),
                  "kernel_shape": (list(a.get("kernel_shape", weight.shape[2:])), [kernel, kernel]),
                  "pads": (list(a.get("pads", [0, 0, 0, 0])), [kernel // 2] * 4),
                  "auto_pad": (a.get("auto_pad", b"NOTSET"), b"NOTSET")}
        for key, (got, want) in checks.items():
            if got != want:
                raise self.fail(i, f"{key} {got}, expected {want} for {name} (a {kernel}x{kernel} convolution)")
        if weight.ndim != 4 or len(stride) != 2 or stride[0] != stride[1] or stride[0] not in strides:
            raise self.fail(i, f"weight {list(weight.shape)} with strides {stride}: {name} is a [O, I, {kernel}, "
                               f"{kernel}] convolution with stride {' or '.join(map(str, strides))}")
        self.record(f"{name}.weight", weight, f"initializer {self.nodes[i].input[1]!r} of {self.label(i)}")
        bias = self.const(i, 2, "bias") if len(self.nodes[i].input) > 2 and self.nodes[i].input[2] else None
        return self.nodes[i].output[0], bias, stride[0]

    def batch_norm(self, i: int, name: str, conv_bias: Optional[np.ndarray] = None) -> str:
        """A BatchNormalization node -> its output; records NAME.weight/bias/running_mean/running_var (a bias of
        the conv before it moved into the mean; a file's epsilon other than 1e-5 moved into the variance)."""
        node, a = self.nodes[i], _attributes(self.nodes[i])
        if a.get("training_mode", 0) or a.get("spatial", 1) != 1:
            raise self.fail(i, f"{name}: a training-mode or non-spatial BatchNormalization")
        if any(self.uses(t) for t in node.output[1:]):
            raise self.fail(i, f"{name}: its running-statistics outputs are read (training mode)")
        eps = float(a.get("epsilon", 1e-5))
        scale, bias, mean, var = (self.const(i, k, w) for k, w in enumerate(_BN_FIELDS, start=1))
        if eps != BN_EPSILON:   # Flax's BN has eps 1e-5 (MXNet-born models 2e-5): keep sqrt(var + eps) the same
            var = var.astype(np.float64) + eps - BN_EPSILON
        if np.any(var < 0):
            raise self.fail(i, f"{name}: epsilon {eps} with running variances below {BN_EPSILON - eps:g}: not "
                               f"expressible with eps {BN_EPSILON}")
        if conv_bias is not None:
            mean = mean - conv_bias.reshape(-1)
        for field, value, k in zip(_BN_FIELDS, (scale, bias, mean, var), range(1, 5)):
            self.record(f"{name}.{field}", value.reshape(-1), f"initializer {node.input[k]!r} of {self.label(i)}")
        self.kept.append(name)
        return node.output[0]

    def folded_norm(self, name: str, conv_i: int, bias: Optional[np.ndarray], channels: int) -> None:
        """The BN torch's exporter folded into the conv at conv_i: the identity with the folded bias."""
        origin = f"folded into {self.label(conv_i)}"
        b = np.zeros(channels, np.float32) if bias is None else bias.reshape(-1)
        self.record(f"{name}.weight", np.ones(channels), origin)
        self.record(f"{name}.bias", b, origin)
        self.record(f"{name}.running_mean", np.zeros(channels), origin)
        self.record(f"{name}.running_var", np.full(channels, 1.0 - BN_EPSILON), origin)
        self.folded.append(name)

    def conv_norm(self, i: int, name: str, bn: str, kernel: int, strides: Tuple[int, ...]) -> Tuple[str, int]:
        """Conv [-> BatchNormalization] -> (the output, the stride); the BN kept or folded."""
        out, bias, stride = self.conv(i, name, kernel, strides)
        channels = self.state[f"{name}.weight"].shape[0]
        j, t = self.follow(out)
        if j is not None and self.op(j) == "BatchNormalization":
            self.visited.add(j)
            return self.batch_norm(j, bn, bias), stride
        self.folded_norm(bn, i, bias, channels)
        return out, stride

    def prelu(self, i: int, name: str, channels: int) -> str:
        slope = self.const(i, 1, "slope")
        if slope.size == 1:
            slope = np.full(channels, float(slope.reshape(-1)[0]))
        elif slope.shape not in ((channels, 1, 1), (1, channels, 1, 1)):  # per channel of an NCHW map
            raise self.fail(i, f"{name}: slope of shape {list(slope.shape)}, expected {channels} per channel")
        self.record(f"{name}.weight", slope.reshape(-1), f"initializer {self.nodes[i].input[1]!r} of {self.label(i)}")
        return self.nodes[i].output[0]

    # -- the network

    def stem(self) -> str:
        """[Sub 127.5 [-> Mul/Div s]] -> conv1 [-> bn1] -> prelu; the normalisation folded into conv1."""
        j, t = self.follow(self.input)
        pixel_scale, normalisers = None, []
        if self.op(j) == "Sub":
            self.visited.add(j)
            normalisers.append(self.label(j))
            c = self.const(j, 1, "the subtracted mean")
            if self.nodes[j].input[0] != t or c.size not in (1, 3) or not np.allclose(c, 127.5, rtol=0, atol=1e-4):
                raise self.fail(j, f"subtracts {c.reshape(-1).tolist()} from the input; only x - 127.5 (arcface's "
                                   "mean) can be folded exactly")
            pixel_scale = np.full(3, 127.5)
            j, t = self.follow(self.nodes[j].output[0])
        if self.op(j) in ("Mul", "Div"):
            self.visited.add(j)
            normalisers.append(self.label(j))
            if pixel_scale is None:
                raise self.fail(j, "scales the raw pixels without subtracting 127.5: not (x - 127.5) * s, the one "
                                   "input normalisation that folds exactly into conv1")
            c = self.const(j, 1, "the scale").astype(np.float64)
            if self.nodes[j].input[0] != t or not (c.size == 1 or (c.size == 3 and c.ndim >= 3)):
                raise self.fail(j, f"a scale of shape {list(c.shape)}: expected a scalar or one per channel")
            c = np.broadcast_to(c.reshape(-1), (3,))
            pixel_scale = pixel_scale * (1.0 / c if self.op(j) == "Div" else c)
            j, t = self.follow(self.nodes[j].output[0])
        i = self.expect(j, ("Conv",), "conv1", "the input")
        if self.nodes[i].input[0] != t:
            raise self.fail(i, "conv1 does not read the image")
        out, stride = self.conv_norm(i, "conv1", "bn1", 3, (1,))
        if pixel_scale is not None:
            # The graph computes conv1((x - 127.5) * s) = conv1 with its kernel times 127.5 * s per input channel,
            # applied to (x - 127.5) / 127.5: what facekd_jax feeds. Exact (zero padding stays zero).
            self.state["conv1.weight"] = self.state["conv1.weight"] * pixel_scale[None, :, None, None].astype(
                np.float32)
            self.normalisation = (f"(x - 127.5) * {(pixel_scale / 127.5).tolist()} in the graph "
                                  f"({', '.join(normalisers)}), folded into conv1")
        j, _ = self.follow(out)
        i = self.expect(j, ("PRelu",), "the stem's PReLU", "conv1 and bn1")
        return self.prelu(i, "prelu", WIDTHS[0])

    def block(self, x: str, bn1: int) -> str:
        """One IBasicBlock whose bn1 node reads x -> the block's output (the Add)."""
        tmp = "block"
        t = self.batch_norm(bn1, f"{tmp}.bn1")
        j, _ = self.follow(t)
        c1 = self.expect(j, ("Conv",), "the block's conv1", f"{self.label(bn1)}")
        t, _ = self.conv_norm(c1, f"{tmp}.conv1", f"{tmp}.bn2", 3, (1,))
        width = self.state[f"{tmp}.conv1.weight"].shape[0]
        j, _ = self.follow(t)
        p = self.expect(j, ("PRelu",), "the block's PReLU", f"{self.label(c1)}")
        t = self.prelu(p, f"{tmp}.prelu", width)
        j, _ = self.follow(t)
        c2 = self.expect(j, ("Conv",), "the block's conv2", f"{self.label(p)}")
        main, stride = self.conv_norm(c2, f"{tmp}.conv2", f"{tmp}.bn3", 3, (1, 2))
        j, main = self.follow(main)
        add = self.expect(j, ("Add",), "the residual Add", f"{self.label(c2)}")
        if len(self.nodes[add].input) != 2 or main not in self.nodes[add].input:
            raise self.fail(add, "not a residual sum of the block and its shortcut")
        other = [u for u in self.uses(x) if u != bn1]
        shortcut = self.nodes[add].input[1 - list(self.nodes[add].input).index(main)]
        if stride == 2:
            self.stage += 1   # stride 2 in the first block of every stage
        stage = self.stage
        if stage == 0:
            raise self.fail(c2, "the first block has stride 1: an iResNet's stage 1 starts with stride 2")
        if stage > len(WIDTHS):
            raise self.fail(c2, f"a stride-2 block in stage {stage}: an iResNet has {len(WIDTHS)} stages")
        index = self.stages[stage - 1]
        self.stages[stage - 1] += 1
        if width != WIDTHS[stage - 1]:
            raise self.fail(c1, f"{width} channels in stage {stage}, an iResNet's are {WIDTHS[stage - 1]}")
        if index == 0:
            if len(other) != 1 or self.op(other[0]) != "Conv":
                raise self.fail(add, f"the first block of stage {stage} has no 1x1 Conv shortcut")
            d = other[0]
            self.visited.add(d)
            t, _ = self.conv_norm(d, f"{tmp}.downsample.0", f"{tmp}.downsample.1", 1, (2,))
            j, t = self.follow(t)
            if j != add or t != shortcut:
                raise self.fail(d, "the 1x1 shortcut does not feed the block's residual Add")
        elif other != [add] or shortcut != x:
            bad = next((u for u in other if u != add), add)
            raise self.fail(bad, f"block {index} of stage {stage} has no identity shortcut into its residual Add")
        prefix = f"layer{stage}.{index}"
        for name in [k for k in self.state if k.startswith(f"{tmp}.")]:
            new = prefix + name[len(tmp):]
            self.state[new], self.origins[new] = self.state.pop(name), self.origins.pop(name)
        self.kept = [prefix + n[len(tmp):] if n.startswith(f"{tmp}.") else n for n in self.kept]
        self.folded = [prefix + n[len(tmp):] if n.startswith(f"{tmp}.") else n for n in self.folded]
        return self.nodes[add].output[0]

    def head(self, bn: int) -> None:
        """bn2 -> Flatten/Reshape -> Gemm | MatMul [+ Add] [-> features BatchNormalization] -> the output."""
        t = self.batch_norm(bn, "bn2")
        j, t = self.follow(t)
        flat = self.expect(j, ("Flatten", "Reshape"), "the flatten", f"{self.label(bn)} (bn2)")
        if self.op(flat) == "Flatten" and _attributes(self.nodes[flat]).get("axis", 1) != 1:
            raise self.fail(flat, "flattens from an axis other than 1")
        if self.op(flat) == "Reshape":
            self._shape_branch(flat)
        j, t = self.follow(self.nodes[flat].output[0])
        fc = self.expect(j, ("Gemm", "MatMul"), "the fc layer", f"{self.label(flat)}")
        node = self.nodes[fc]
        if node.input[0] != t:
            raise self.fail(fc, "the flattened map is not its first input")
        origin = f"initializer {node.input[1]!r} of {self.label(fc)}"
        bias = None
        if self.op(fc) == "Gemm":
            a = _attributes(node)
            if a.get("transA", 0) or a.get("alpha", 1.0) != 1.0 or a.get("beta", 1.0) != 1.0:
                raise self.fail(fc, f"transA/alpha/beta {a.get('transA', 0)}/{a.get('alpha', 1.0)}/"
                                    f"{a.get('beta', 1.0)}; expected 0/1/1 (x W^T + b)")
            weight = self.const(fc, 1, "weight")
            weight = weight if a.get("transB", 0) else weight.T
            if len(node.input) > 2 and node.input[2]:
                bias = self.const(fc, 2, "bias")
            out = node.output[0]
        else:
            weight = self.const(fc, 1, "weight").T
            out = node.output[0]
            j, _ = self.follow(out)
            if j is not None and self.op(j) == "Add":
                self.visited.add(j)
                k = 1 if self.nodes[j].input[0] == out else 0
                bias = self.const(j, k, "the fc bias")
                out = self.nodes[j].output[0]
        if weight.ndim != 2:
            raise self.fail(fc, f"a weight of shape {list(weight.shape)}, expected [E, {FC_INPUTS}]")
        embedding = weight.shape[0]
        bias = np.zeros(embedding) if bias is None else bias.reshape(-1)
        self.record("fc.weight", weight, origin)
        self.record("fc.bias", bias, origin if self.op(fc) == "Gemm" else f"the Add after {self.label(fc)}")
        j, t = self.follow(out)
        if j is not None and self.op(j) == "BatchNormalization":
            self.visited.add(j)
            out = self.batch_norm(j, "features")
            j, t = self.follow(out)
        else:
            self.folded_norm("features", fc, None, embedding)
        if j is not None:
            raise self.fail(j, "follows the embedding (features); an iResNet's graph ends there")
        if self.outputs != [t]:
            raise InsightfaceFormatError(f"{self.path}: graph outputs {self.outputs}; an iResNet has one, the "
                                         f"embedding {t!r}")

    def _shape_branch(self, reshape: int) -> None:
        """Marks the nodes computing a Reshape's target shape (Shape -> Gather -> ... -> Concat) as read."""
        todo = [t for t in self.nodes[reshape].input[1:] if t and t not in self.consts]
        while todo:
            i = self.producer.get(todo.pop())
            if i is None or i in self.visited:
                continue
            if self.op(i) not in _SHAPE_OPS:
                raise self.fail(i, f"computes the target shape of {self.label(reshape)}; expected only shape "
                                   f"arithmetic ({', '.join(_SHAPE_OPS)})")
            self.visited.add(i)
            todo += [t for t in self.nodes[i].input if t and t not in self.consts and self.op(i) != "Shape"]

    def run(self) -> IResNetWeights:
        x = self.stem()
        while True:
            norms = [u for u in self.uses(x) if self.op(u) == "BatchNormalization"]
            if len(norms) != 1:
                at = self.producer[x]
                raise self.fail(at, f"its output is read by {len(norms)} BatchNormalization nodes; an iResNet block "
                                    "or its head reads it with one")
            bn = norms[0]
            self.visited.add(bn)
            j, _ = self.follow(self.nodes[bn].output[0])
            if j is not None and self.op(j) in ("Flatten", "Reshape"):
                if len(self.uses(x)) != 1:
                    raise self.fail(bn, "bn2 (the head) shares its input with another node")
                self.head(bn)
                break
            x = self.block(x, bn)
        unread = [i for i in range(len(self.nodes)) if i not in self.visited]
        if unread:
            raise self.fail(unread[0], "is not part of an arcface_torch iResNet (the walk from the input to the "
                                       "embedding did not pass it)")
        convs = len([k for k in self.state if k.endswith(".weight") and self.state[k].ndim == 4])
        # The BNs a conv feeds (torch's export folds those); a block's bn1, the head's bn2 and features follow none.
        conv_bns = [n for n in self.kept + self.folded if not re.fullmatch(r"layer\d\.\d+\.bn1|bn2|features", n)]
        folded = [n for n in self.folded if n != "features"]
        if not folded:
            bn = "kept as BatchNormalization nodes"
        elif len(folded) == len(conv_bns):
            bn = (f"folded into the preceding Conv ({len(folded)} of {convs} convolutions); the pre-convolution "
                  "BatchNorms kept as nodes")
        else:
            bn = f"{len(folded)} of {len(conv_bns)} post-convolution BatchNorms folded into their Conv"
        fmt = {"kind": "onnx", "reader": "onnx (graph walked from the input)", "batch_norm": bn,
               "features": "folded into the fc layer" if "features" in self.folded else "a BatchNormalization node",
               "input_normalisation": self.normalisation}
        return IResNetWeights(path=self.path, state=self.state, fmt=fmt, origins=self.origins)


# ------------------------------------------------------------------------------------------- the teacher run


def import_insightface(out: str, weights: str, *, arch: Optional[str] = None, log: Callable[[str], None] = log.info):
    """Reads an arcface_torch iResNet (.pth or .onnx) into a teacher run at `out` (facekd_jax.teachers.imported):
    config.json (iresnetNN, E, 112x112), the Orbax checkpoint at step 0 ({"params": {"backbone"}, "batch_stats"})
    and teacher.json (source, sha256, parameters, input contract, format). Idempotent for the same file; refuses an
    `out` that holds anything else. arch: 'r50' etc., None to infer it. -> TeacherRun."""
    from facekd_jax.teachers import imported

    path = os.fspath(weights)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--weights={path}: no such file")
    if arch:
        model_name(arch)  # an unknown --arch fails before anything is read

    def read() -> "imported.ImportedNetwork":
        net = read_insightface(path)
        model, variables, notes = to_flax_variables(net, arch)
        meta = {**INPUT_CONTRACT, "compare": f"cosine similarity of the {notes['embedding_size']}-d embeddings",
                "format": net.fmt, **notes, "crops": {},
                "note": "insightface arcface_torch iResNet; check the weights' licence (insightface's published "
                        "models are for non-commercial research only)"}
        return imported.ImportedNetwork(model=model, variables=variables, image_size=IMAGE_SIZE,
                                        embedding_size=notes["embedding_size"], head="flatten", meta=meta)

    return imported.import_teacher(out, path, read, log=log)
