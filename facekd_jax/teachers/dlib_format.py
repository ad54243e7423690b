"""dlib's face-descriptor network file, read in pure Python + NumPy (no dlib needed).

    net = read_dlib_net(find_dlib_weights())   # DlibNet: header + 108 layer records, input outwards
    variables = to_flax_variables(net)         # {"params": ...} for facekd_jax.models.dlib_resnet.DlibResNet29
    emb = DlibResNet29().apply(variables, images)  # images float [B, 150, 150, 3], (pixel - 127.5) / 127.5

The file (dlib_face_recognition_resnet_model_v1.dat, 22.5 MB, shipped by the face_recognition_models package)
is dlib's serialisation of `loss_metric<fc_no_bias<128, avg_pool_everything<... ResNet-29 ...>>>`, little-endian:

  integer  a control byte (low 4 bits: how many value bytes follow, little-endian; bit 0x80: negative), the bytes
  string   an integer length, the bytes;   bool: ASCII '0' or '1';   float: integer mantissa m, integer exponent e
           (m * 2**e; exponents 32000/32001/32002 stand for +inf/-inf/nan)
  tensor   integer version 2, integers num_samples, k, nr, nc, then that many float32 (little-endian)
  alias    integer version 1, integers num_samples, k, nr, nc (a view into a params tensor; no data)

  1, "loss_metric_2", margin, distance threshold    (the loss layer; version 1)
  the version of every nested layer, outermost first: 2 for a layer with parameters/details, 1 for a tag or skip
      layer (these have no record), 3 for the innermost layer (the one that holds the input layer)
  "input_rgb_image_sized", the three channel means (R, G, B), rows, columns
  one record per version-2/3 layer, from the input outwards (each layer writes its subnetwork before itself):
      its name and details, three bools, three (empty) tensors; the innermost record ends with one more integer
      (the sample expansion factor)

Record details: con_4: params (filters (out, in, h, w) then biases), num_filters, nr, nc, stride y, x, padding y,
x, the filters and biases aliases, four float multipliers. affine_: params (gamma then beta), two aliases, mode.
max_pool_2 / avg_pool_2: window rows, columns, stride y, x, padding y, x (a window of 0: the whole map).
fc_2: num_outputs, num_inputs, params ((num_inputs [+1 with bias], num_outputs)), two aliases, bias mode, four
floats. relu_ and add_prev_: nothing.
Every failure is a DlibFormatError naming the file, the byte offset and what was expected there.
"""
from __future__ import annotations

import collections
import dataclasses
import math
import os
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from facekd_jax.paths import PACKAGE_HINT, find_packaged_model

DLIB_MODEL_FILE = "dlib_face_recognition_resnet_model_v1.dat"
# (left, top, right, bottom) of the face in LFW's 250x250 deep-funnelled images: this fixed box, resized to
# 150x150, gives dlib's descriptor 97.8% on LFW's 6000 pairs without any landmark alignment.
DLIB_CROP = (68, 77, 184, 193)
DLIB_IMAGE_SIZE = 150
LOSS_NAME = "loss_metric_2"
INPUT_NAME = "input_rgb_image_sized"
# How to get the face_recognition_models package (which ships dlib's model files).
INSTALL_HINT = f"{PACKAGE_HINT}, or pass the file with --weights=PATH"

# dlib's float_details marks non-finite floats with these exponents.
_SPECIAL_EXPONENTS = {32000: math.inf, 32001: -math.inf, 32002: math.nan}
# Layer names this reader knows -> the short kind used in DlibLayer.kind.
_KINDS = {"con_4": "con", "affine_": "affine", "relu_": "relu", "max_pool_2": "max_pool",
          "avg_pool_2": "avg_pool", "add_prev_": "add_prev", "fc_2": "fc"}
_AFFINE_MODES = {0: "conv", 1: "fc"}      # dlib's layer_mode: CONV_MODE (per channel), FC_MODE (per element)
_FC_BIAS_MODES = {0: True, 1: False}      # dlib's fc_bias_mode: FC_HAS_BIAS, FC_NO_BIAS


class DlibFormatError(ValueError):
    """The file is not (or not entirely) a dlib network of the kind this reader knows; says where and why."""


@dataclasses.dataclass
class DlibLayer:
    """One layer record. kind: 'con' | 'affine' | 'relu' | 'max_pool' | 'avg_pool' | 'add_prev' | 'fc'.

    fields: its integers and floats (e.g. num_filters, nr, nc, stride_y, stride_x, padding_y, padding_x);
    arrays: float32 numpy arrays: con 'filters' [out, in, h, w] and 'biases' [out]; affine 'gamma', 'beta' [k];
    fc 'weights' [num_inputs, num_outputs] (and 'biases' [num_outputs] when it has them).
    """
    index: int       # position among the records, 0 = the layer next to the input
    name: str        # as in the file, e.g. 'con_4'
    kind: str
    offset: int      # byte offset of the record's name in the file
    fields: Dict[str, Any] = dataclasses.field(default_factory=dict)
    arrays: Dict[str, np.ndarray] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class DlibNet:
    """A parsed file. layers run from the input outwards; nesting holds every layer's version, outermost first
    (1 = tag/skip layer, without a record)."""
    path: str
    loss: str
    margin: float
    distance_threshold: float
    channel_means: Tuple[float, float, float]   # R, G, B, subtracted from 0..255 pixels before dividing by 256
    input_size: Tuple[int, int]                 # rows, columns
    nesting: Tuple[int, ...]
    layers: List[DlibLayer]
    sample_expansion_factor: int
    input_offset: int                           # byte offset of the input layer (name, means, size)
    end_offset: int                             # where reading stopped: the file size (checked)

    def counts(self) -> Dict[str, int]:
        """Number of records per kind, e.g. {'con': 29, 'affine': 29, ...}."""
        return dict(collections.Counter(layer.kind for layer in self.layers))

    def structure(self) -> List[str]:
        """Every layer from the input outwards: the record kinds, with 'tag/skip' where the nesting has a layer
        without a record."""
        records = iter(self.layers)
        return [next(records).kind if v != 1 else "tag/skip" for v in reversed(self.nesting)]


class _Reader:
    """A cursor over the file's bytes; every read names what it reads so errors can say where and what."""

    def __init__(self, data: bytes, name: str):
        self.data, self.name, self.pos = data, name, 0
        self.context = ""   # e.g. " of con_4 record 5", appended to what is being read

    def error(self, expected: str, found: str, at: Optional[int] = None) -> DlibFormatError:
        at = self.pos if at is None else at
        return DlibFormatError(f"{self.name}: at byte {at}: expected {expected}{self.context}, found {found}")

    def take(self, n: int, what: str) -> bytes:
        if self.pos + n > len(self.data):
            raise DlibFormatError(
                f"{self.name}: truncated at byte {len(self.data)} while reading {what}{self.context} from byte "
                f"{self.pos} (needed {n} bytes, {len(self.data) - self.pos} left)")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def integer(self, what: str) -> int:
        start = self.pos
        control = self.take(1, what)[0]
        size = control & 0x0F
        if size > 8 or control & 0x70:   # dlib writes at most 8 value bytes and only bit 0x80 besides the size
            raise self.error(f"{what} (an integer control byte)", f"0x{control:02x}", start)
        value = int.from_bytes(self.take(size, what), "little")
        return -value if control & 0x80 else value

    def count(self, what: str) -> int:
        """A non-negative integer (sizes, strides, paddings)."""
        start = self.pos
        value = self.integer(what)
        if value < 0:
            raise self.error(f"{what} (>= 0)", str(value), start)
        return value

    def string(self, what: str, max_len: int = 1 << 16) -> str:
        start = self.pos
        n = self.integer(f"the length of {what}")
        if not 0 <= n <= max_len:
            raise self.error(f"the length of {what} (0..{max_len})", str(n), start)
        return self.take(n, what).decode("latin-1")

    def expect_string(self, value: str, what: str) -> None:
        start = self.pos
        found = self.string(f"{what} {value!r}", max_len=4 * len(value))
        if found != value:
            raise self.error(f"{what} {value!r}", repr(found), start)

    def boolean(self, what: str) -> bool:
        start = self.pos
        byte = self.take(1, what)
        if byte not in (b"0", b"1"):
            raise self.error(f"{what} (a bool, '0' or '1')", repr(byte), start)
        return byte == b"1"

    def real(self, what: str) -> float:
        mantissa = self.integer(f"the mantissa of {what}")
        start = self.pos
        exponent = self.integer(f"the exponent of {what}")
        if exponent in _SPECIAL_EXPONENTS:
            return _SPECIAL_EXPONENTS[exponent]
        if not -32768 <= exponent <= 32767:   # dlib stores exponents as int16
            raise self.error(f"the exponent of {what} (an int16)", str(exponent), start)
        return math.ldexp(float(mantissa), exponent)

    def version(self, expected: int, what: str) -> None:
        start = self.pos
        found = self.integer(f"{what} version {expected}")
        if found != expected:
            raise self.error(f"{what} version {expected}", str(found), start)

    def shape(self, what: str) -> Tuple[int, int, int, int]:
        return tuple(self.count(f"{what} {dim}") for dim in ("num_samples", "k", "nr", "nc"))

    def tensor(self, what: str) -> np.ndarray:
        """-> float32 [num_samples, k, nr, nc]."""
        self.version(2, f"a tensor ({what})")
        shape = self.shape(what)
        n = math.prod(shape)
        raw = self.take(4 * n, f"the float32 data of {what} ({n} values)")
        try:
            return np.frombuffer(raw, dtype="<f4").astype(np.float32).reshape(shape)
        except ValueError as e:  # an empty tensor with a dimension past what NumPy allows
            raise self.error(f"the shape of {what}", f"{shape} ({e})", self.pos - len(raw)) from None

    def alias(self, what: str) -> Tuple[int, int, int, int]:
        self.version(1, f"an alias tensor ({what})")
        return self.shape(what)


def _read_con(r: _Reader, layer: DlibLayer) -> None:
    start = r.pos
    params = r.tensor("params")
    f = layer.fields
    for key in ("num_filters", "nr", "nc", "stride_y", "stride_x", "padding_y", "padding_x"):
        f[key] = r.count(key)
    filters_shape, biases_shape = r.alias("filters"), r.alias("biases")
    for key in ("learning_rate_multiplier", "weight_decay_multiplier", "bias_learning_rate_multiplier",
                "bias_weight_decay_multiplier"):
        f[key] = r.real(key)
    n_out, k, nr, nc = filters_shape
    if (n_out, nr, nc) != (f["num_filters"], f["nr"], f["nc"]) or biases_shape != (1, n_out, 1, 1) \
            or params.size != n_out * k * nr * nc + n_out:
        raise r.error("a filters alias [num_filters, k, nr, nc], a biases alias [1, num_filters, 1, 1] and params "
                      "holding both", f"filters {filters_shape}, biases {biases_shape}, num_filters "
                      f"{f['num_filters']}, {f['nr']}x{f['nc']}, {params.size} params", start)
    flat = params.reshape(-1)
    layer.arrays["filters"] = flat[:n_out * k * nr * nc].reshape(filters_shape)
    layer.arrays["biases"] = flat[n_out * k * nr * nc:].copy()


def _read_affine(r: _Reader, layer: DlibLayer) -> None:
    start = r.pos
    params = r.tensor("params")
    gamma_shape, beta_shape = r.alias("gamma"), r.alias("beta")
    mode_at = r.pos
    mode = r.integer("mode")
    if mode not in _AFFINE_MODES:
        raise r.error("mode 0 (conv) or 1 (fc)", str(mode), mode_at)
    layer.fields["mode"] = _AFFINE_MODES[mode]
    n = math.prod(gamma_shape)
    if gamma_shape != beta_shape or params.size != 2 * n:
        raise r.error("gamma and beta aliases of one shape and params holding both",
                      f"gamma {gamma_shape}, beta {beta_shape}, {params.size} params", start)
    flat = params.reshape(-1)
    layer.arrays["gamma"], layer.arrays["beta"] = flat[:n].copy(), flat[n:].copy()


def _read_pool(r: _Reader, layer: DlibLayer) -> None:
    for key in ("nr", "nc", "stride_y", "stride_x", "padding_y", "padding_x"):
        layer.fields[key] = r.count(key)


def _read_fc(r: _Reader, layer: DlibLayer) -> None:
    f = layer.fields
    f["num_outputs"], f["num_inputs"] = r.count("num_outputs"), r.count("num_inputs")
    start = r.pos
    params = r.tensor("params")
    weights_shape, biases_shape = r.alias("weights"), r.alias("biases")
    mode_at = r.pos
    mode = r.integer("bias mode")
    if mode not in _FC_BIAS_MODES:
        raise r.error("bias mode 0 (has bias) or 1 (no bias)", str(mode), mode_at)
    f["has_bias"] = _FC_BIAS_MODES[mode]
    for key in ("learning_rate_multiplier", "weight_decay_multiplier", "bias_learning_rate_multiplier",
                "bias_weight_decay_multiplier"):
        f[key] = r.real(key)
    n_in, n_out = f["num_inputs"], f["num_outputs"]
    rows = n_in + int(f["has_bias"])
    if params.shape[:2] != (rows, n_out) or params.size != rows * n_out or weights_shape[:2] != (n_in, n_out):
        raise r.error(f"params [{rows}, {n_out}] (num_inputs{' + 1' if f['has_bias'] else ''}, num_outputs) "
                      f"and a weights alias [{n_in}, {n_out}]",
                      f"params {params.shape}, weights {weights_shape}", start)
    table = params.reshape(rows, n_out)
    layer.arrays["weights"] = table[:n_in].copy()
    if f["has_bias"]:
        layer.arrays["biases"] = table[n_in].copy()


_DETAILS = {"con": _read_con, "affine": _read_affine, "max_pool": _read_pool, "avg_pool": _read_pool,
            "fc": _read_fc, "relu": lambda r, layer: None, "add_prev": lambda r, layer: None}


def read_dlib_net(path: "str | os.PathLike") -> DlibNet:
    """Parse a dlib network file -> DlibNet; DlibFormatError (file, byte offset, what was expected) if the file
    is foreign, truncated, or not consumed exactly to its end."""
    path = os.fspath(path)
    with open(path, "rb") as fh:
        data = fh.read()
    r = _Reader(data, path)

    r.version(1, "the loss layer's")
    r.expect_string(LOSS_NAME, "the loss name")
    margin, threshold = r.real("the loss margin"), r.real("the distance threshold")

    # Every nested layer writes its version and then its subnetwork, so the versions come outermost first; the
    # innermost layer (which holds the input layer) has version 3.
    nesting: List[int] = []
    while not nesting or nesting[-1] != 3:
        start = r.pos
        v = r.integer("a layer version")
        if v not in (1, 2, 3):
            raise r.error("a layer version 1 (tag/skip), 2 (layer) or 3 (innermost layer)", str(v), start)
        nesting.append(v)

    input_offset = r.pos
    r.expect_string(INPUT_NAME, "the input layer")
    means = tuple(r.real(f"the {c} channel mean") for c in ("red", "green", "blue"))
    input_size = (r.count("the input rows"), r.count("the input columns"))

    layers: List[DlibLayer] = []
    n_records = sum(v != 1 for v in nesting)
    expansion = 1
    for index in range(n_records):
        start = r.pos
        r.context = f" of record {index}"
        name = r.string("a layer name", max_len=64)
        if name not in _KINDS:
            raise r.error(f"a layer name ({', '.join(_KINDS)})", repr(name), start)
        layer = DlibLayer(index=index, name=name, kind=_KINDS[name], offset=start)
        r.context = f" of {name} record {index}"
        _DETAILS[layer.kind](r, layer)
        for what in ("this_layer_setup_called", "gradient_input_is_stale", "get_output_and_gradient_input_disabled"):
            r.boolean(what)
        for what in ("x_grad", "cached_output", "params_grad"):
            r.tensor(what)
        if index == 0:   # the innermost layer's record ends with its sample expansion factor
            expansion = r.integer("the sample expansion factor")
        layers.append(layer)
    r.context = ""
    if r.pos != len(data):
        raise r.error(f"the end of the file after {n_records} records", f"{len(data) - r.pos} more bytes")
    return DlibNet(path=path, loss=LOSS_NAME, margin=margin, distance_threshold=threshold, channel_means=means,
                   input_size=input_size, nesting=tuple(nesting), layers=layers,
                   sample_expansion_factor=expansion, input_offset=input_offset, end_offset=r.pos)


def to_flax_variables(net: DlibNet) -> Dict[str, Any]:
    """DlibNet -> {"params": ...} for facekd_jax.models.dlib_resnet.DlibResNet29 (float32 numpy arrays).

    Conv filters (out, in, h, w) -> kernel (h, w, in, out); affine gamma/beta -> scale/bias; fc weights
    (num_inputs, num_outputs) -> Dense kernel as is. Every layer kind, shape, stride, padding and pooling window
    is checked against the model's plan; a mismatch is a DlibFormatError naming the record and its offset.
    """
    # The plan lives with the model so the two cannot drift apart; imported here to keep reading NumPy-only.
    from facekd_jax.models.dlib_resnet import DLIB_MEANS, dlib_layer_plan

    def fail(at: int, expected: str, found: str) -> DlibFormatError:
        return DlibFormatError(f"{net.path}: at byte {at}: expected {expected}, found {found}")

    if not np.allclose(net.channel_means, DLIB_MEANS, atol=1e-3):
        raise fail(net.input_offset, f"channel means {DLIB_MEANS} (DlibResNet29 hard-codes them)",
                   str(net.channel_means))
    plan = dlib_layer_plan()
    structure = net.structure()
    expected_structure = ["tag/skip" if step.kind in ("tag", "skip") else step.kind for step in plan]
    if structure != expected_structure:
        diff = next((i for i, (a, b) in enumerate(zip(structure, expected_structure)) if a != b),
                    min(len(structure), len(expected_structure)))
        record = sum(kind != "tag/skip" for kind in structure[:diff])   # the first record at or after the change
        at = net.layers[record].offset if record < len(net.layers) else net.end_offset
        raise fail(at, f"DlibResNet29's {len(expected_structure)} layers (from the input, at layer {diff}: "
                   f"{expected_structure[diff:diff + 4]})",
                   f"{len(structure)} layers ({structure[diff:diff + 4]} at layer {diff})")

    params: Dict[str, Any] = {}

    def put(path: str, leaves: Dict[str, np.ndarray]) -> None:
        node = params
        for part in path.split("/"):
            node = node.setdefault(part, {})
        node.update({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in leaves.items()})

    steps = [step for step in plan if step.kind not in ("tag", "skip")]
    for layer, step in zip(net.layers, steps):
        where = f"{layer.name} record {layer.index} ({step.path or step.kind})"
        got = {k: layer.fields[k] for k in step.fields}
        if got != step.fields:
            raise fail(layer.offset, f"{where} with {step.fields}", str(got))
        if layer.kind == "con":
            filters = layer.arrays["filters"]
            if filters.shape[1] != step.in_channels:
                raise fail(layer.offset, f"{where} with {step.in_channels} input channels", str(filters.shape[1]))
            put(step.path, {"kernel": filters.transpose(2, 3, 1, 0), "bias": layer.arrays["biases"]})
        elif layer.kind == "affine":
            gamma = layer.arrays["gamma"].reshape(-1)
            if layer.fields["mode"] != "conv" or gamma.size != step.in_channels:
                raise fail(layer.offset, f"{where}: a per-channel (conv mode) affine of {step.in_channels} channels",
                           f"{layer.fields['mode']} mode, {gamma.size} values")
            put(step.path, {"scale": gamma, "bias": layer.arrays["beta"].reshape(-1)})
        elif layer.kind == "fc":
            put(step.path, {"kernel": layer.arrays["weights"]})
    return {"params": params}


def load_dlib_variables(path: "str | os.PathLike") -> Dict[str, Any]:
    """read_dlib_net + to_flax_variables: the file -> {"params": ...} for DlibResNet29."""
    return to_flax_variables(read_dlib_net(path))


def find_dlib_weights() -> str:
    """The path of dlib_face_recognition_resnet_model_v1.dat in the installed face_recognition_models package;
    FileNotFoundError with the install command when it is not there."""
    return find_packaged_model(DLIB_MODEL_FILE, "dlib's face-descriptor weights", INSTALL_HINT)
