"""An arcface_torch iResNet's weights from an ONNX graph, mapped by the graph's structure (never by initializer
names): facekd_jax.teachers.insightface's reader of `.onnx` files.

Walked from the image input: an optional (x - 127.5) * s (Sub, Mul/Div; folded into conv1's kernel), conv1
[-> BatchNormalization] -> PRelu, per block a BatchNormalization -> Conv [-> BN] -> PRelu -> Conv [-> BN] -> Add with
the block input or a 1x1 Conv [-> BN], then BatchNormalization -> Flatten/Reshape -> Gemm or MatMul [+ Add]
[-> BatchNormalization]. A Conv without its BatchNormalization node (torch's eval-mode export folds conv -> BN
pairs) carries the BN in its weight and bias: its BN becomes the identity (mean 0, var 1 - eps, scale 1) with the
folded bias as its bias. The result is the torch state dict the .pth reader gives (insightface.IResNetWeights).
Every failure is one InsightfaceFormatError naming the file and the graph node.
"""
from __future__ import annotations

import collections
import os
import re
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from facekd_jax.models.layers import BN_EPSILON
from facekd_jax.teachers.iresnet_weights import (FC_INPUTS, WIDTHS, InsightfaceFormatError, IResNetWeights,
                                                 _BN_FIELDS)

ONNX_HINT = "pip install 'facekd_jax[teachers]' (or: pip install onnx)"
_PASS_THROUGH = ("Identity", "Dropout")          # no-ops in eval mode
_SHAPE_OPS = ("Shape", "Gather", "Unsqueeze", "Squeeze", "Concat", "Slice", "Cast", "Constant", "Identity")


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
