"""Convolutions through oneDNN on XLA:CPU: the kernels PyTorch runs on a CPU, for the same speed in JAX.

XLA:CPU runs convolutions with Eigen (or YNNPACK), and with the 16 and 32 channels of resnet56's first stages
those are 2-5x slower than oneDNN's (`python benchmarks/conv_layer.py --torch`; the weight gradient is the worst).
Here the three passes of a convolution (forward, input gradient, weight gradient) call oneDNN through XLA's FFI
(facekd_jax/cpu/onednn.cc) with a `jax.custom_vjp`, so a train step on a CPU runs the same convolution
kernels as PyTorch's; everything else stays XLA's. Results equal XLA's up to float summation order
(tests/test_cpu_kernels.py).

The same library holds the training-mode batch norm that sits between the convolutions, fused with the ReLU or
the residual add and ReLU that follow it (`batch_norm_train`, used by models/layers.BatchNorm): two-pass C++
loops each way. It is faster than XLA:CPU's fusions, and it stops XLA from recomputing a ResNet stage's whole
residual chain inside every later element-wise fusion (resnet56 step: 9% faster, tests/test_cpu_kernels.py
checks it against float64).

`conv_general_dilated` is a drop-in for `lax.conv_general_dilated` (flax's `nn.Conv(conv_general_dilated=...)`,
as facekd_jax.cpu.layers.OnednnConv uses it). It takes the oneDNN path where the call is one it computes exactly
(`supports`: 2-D NHWC x HWIO -> NHWC, no dilation, any feature group count, float32 or bfloat16 operands of one
dtype)
and XLA's convolution otherwise. Whether a run uses these kernels at all is decided once, by the set-up, from
`config.cpu_kernels` (facekd_jax.cpu.model_layers): only on a single-device CPU, because the custom calls have no
SPMD partitioning rule.

The library needs the `[cpu]` extra (the `onednn-cpu-gomp` and `onednn-devel-cpu-gomp` wheels), a C++ compiler
(`c++`, or $CXX) and jaxlib's FFI headers. The handlers are compiled once, on first use, into $FACEKD_CACHE_DIR
(default ~/.cache/facekd_jax; facekd_jax/cpu/native_build.py), keyed by the source and library versions;
`available()` says whether that worked and `unavailable_reason()` why not.
"""
from __future__ import annotations

import ctypes
import functools
import importlib.metadata
import logging
import os
import pathlib
import shutil
import threading
from typing import Sequence

import jax
import numpy as np
from jax import lax

from facekd_jax.cpu import native_build, xla_flags

SOURCE = pathlib.Path(__file__).with_name("onednn.cc")
RUNTIME_DIST, HEADERS_DIST = xla_flags.ONEDNN_DIST, "onednn-devel-cpu-gomp"
TARGETS = {"forward": ("facekd_onednn_conv_fwd", "FacekdOnednnConvFwd"),
           "input_grad": ("facekd_onednn_conv_bwd_data", "FacekdOnednnConvBwdData"),
           "weight_grad": ("facekd_onednn_conv_bwd_weights", "FacekdOnednnConvBwdWeights"),
           "bn_forward": ("facekd_batch_norm_fwd", "FacekdBatchNormFwd"),
           "bn_backward": ("facekd_batch_norm_bwd", "FacekdBatchNormBwd")}
_NHWC = ("NHWC", "HWIO", "NHWC")

_lock = threading.Lock()
_state: dict = {}  # "available": bool once decided, "reason": why not


BuildError = native_build.BuildError  # the handlers could not be built (the message says why)


def _dist_file(dist: str, suffix: str) -> pathlib.Path:
    """The installed file of distribution `dist` whose path ends with `suffix`."""
    try:
        files = importlib.metadata.files(dist) or []
    except importlib.metadata.PackageNotFoundError:
        raise BuildError(f"the {dist} wheel is not installed (pip install {dist}; pyproject pins it on Linux "
                         "x86-64)") from None
    for f in files:
        if str(f).replace("\\", "/").endswith(suffix):
            return pathlib.Path(f.locate()).resolve()
    raise BuildError(f"the {dist} wheel has no file ending in {suffix}")


def build(force: bool = False) -> pathlib.Path:
    """Compiles onednn.cc into the cache (once per source, library versions and command); returns the .so.

    OpenMP for the batch-norm loops, and no trapping math so that their ReLU masks vectorise (else branches).
    """
    header = _dist_file(HEADERS_DIST, "oneapi/dnnl/dnnl.hpp")
    include = header.parent.parent.parent
    library = _dist_file(RUNTIME_DIST, "/libdnnl.so.3")
    ffi_include = pathlib.Path(jax.ffi.include_dir())
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if not cxx:
        raise BuildError("no C++ compiler found (install g++ or set CXX)")
    cmd = [cxx, "-O3", "-fno-trapping-math", "-std=c++17", "-fopenmp", "-shared", "-fPIC", f"-I{ffi_include}",
           f"-I{include}", str(SOURCE), str(library), f"-Wl,-rpath,{library.parent}"]
    versions = (importlib.metadata.version(RUNTIME_DIST), importlib.metadata.version("jaxlib"))
    return native_build.build_shared_library(SOURCE, cmd, versions, force=force)


def _load() -> None:
    """Builds, loads and registers the FFI targets (once per process)."""
    lib = ctypes.CDLL(str(build()))
    for name, symbol in TARGETS.values():
        jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")


def available() -> bool:
    """Whether the oneDNN handlers are built and registered in this process (builds them on the first call)."""
    with _lock:
        if "available" not in _state:
            try:
                _load()
                _state.update(available=True, reason="")
            except (BuildError, OSError, AttributeError) as e:
                _state.update(available=False, reason=str(e))
                logging.info("facekd_jax: oneDNN kernels unavailable: %s", e)
        return _state["available"]


def unavailable_reason() -> str:
    available()
    return _state["reason"]


def bfloat16_supported() -> bool:
    """Whether this CPU's oneDNN computes bfloat16 convolutions: it needs AVX-512 (an AVX2-only CPU, such as AMD's
    Zen 2 and 3, has no bfloat16 convolution in oneDNN 3.2). Probed once with a tiny convolution; where it fails,
    `supports` sends bfloat16 convolutions to XLA."""
    with _lock:
        if "bf16" in _state:
            return _state["bf16"]
    ok = False
    if available():
        x = np.zeros((1, 3, 3, 1), jax.numpy.bfloat16)
        try:
            with jax.ensure_compile_time_eval():  # run now, even when asked while a model is being traced
                jax.block_until_ready(conv2d(x, np.zeros((1, 1, 1, 1), jax.numpy.bfloat16), (1, 1),
                                             ((0, 0), (0, 0))))
            ok = True
        except Exception as e:  # noqa: BLE001 (oneDNN's "could not create a primitive descriptor")
            logging.info("facekd_jax: oneDNN has no bfloat16 convolution on this CPU (%s); XLA's is used", e)
    with _lock:
        _state["bf16"] = ok
    return ok


def _pads(padding) -> tuple[tuple[int, int], tuple[int, int]]:
    return tuple((int(lo), int(hi)) for lo, hi in padding)


def _attrs(strides, padding) -> dict:
    (pt, pb), (pl, pr) = padding
    return {k: np.int64(v) for k, v in dict(sh=strides[0], sw=strides[1], pt=pt, pb=pb, pl=pl, pr=pr).items()}


def _call(pass_name: str, shape, dtype, a, b, strides, padding):
    name = TARGETS[pass_name][0]
    return jax.ffi.ffi_call(name, jax.ShapeDtypeStruct(shape, dtype), vmap_method="sequential")(
        a, b, **_attrs(strides, padding))


def _out_shape(x_shape, w_shape, strides, padding):
    n, h, w, _ = x_shape
    kh, kw, _, co = w_shape
    return (n, (h + sum(padding[0]) - kh) // strides[0] + 1, (w + sum(padding[1]) - kw) // strides[1] + 1, co)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv2d(x, w, strides: tuple[int, int], padding: tuple[tuple[int, int], tuple[int, int]]):
    """oneDNN convolution: x [N,H,W,Ci], w [KH,KW,Ci/G,Co] -> [N,OH,OW,Co]; padding ((top, bottom), (left, right));
    G = Ci / w.shape[2] feature groups (XLA's feature_group_count; Ci = G is a depthwise convolution).

    No fallback: callers check `available()` and `supports(...)` (conv_general_dilated does).
    """
    return _call("forward", _out_shape(x.shape, w.shape, strides, padding), x.dtype, x, w, strides, padding)


def _conv2d_fwd(x, w, strides, padding):
    return conv2d(x, w, strides, padding), (x, w)


def _conv2d_bwd(strides, padding, residuals, dy):
    x, w = residuals
    dy = dy.astype(x.dtype)
    dx = _call("input_grad", x.shape, x.dtype, dy, w, strides, padding)
    dw = _call("weight_grad", w.shape, w.dtype, x, dy, strides, padding)
    return dx, dw


conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)


def supports(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
             feature_group_count) -> bool:
    """Whether oneDNN's convolution computes exactly this `lax.conv_general_dilated` call."""
    if lhs.ndim != 4 or rhs.ndim != 4 or lhs.dtype != rhs.dtype or lhs.dtype not in (np.float32, jax.numpy.bfloat16):
        return False
    if any(d != 1 for d in (lhs_dilation or (1, 1))) or any(d != 1 for d in (rhs_dilation or (1, 1))):
        return False
    if dimension_numbers is None:
        return False
    want = lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)
    if lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) != want:
        return False
    groups = int(feature_group_count)
    return (groups >= 1 and lhs.shape[-1] == rhs.shape[2] * groups and rhs.shape[3] % groups == 0
            and all(int(s) >= 1 for s in window_strides))


def conv_general_dilated(lhs, rhs, window_strides: Sequence[int], padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count: int = 1, batch_group_count: int = 1,
                         precision=None, preferred_element_type=None):
    """`lax.conv_general_dilated` with oneDNN's kernels where `available()` and `supports(...)`, else XLA's."""
    strides = tuple(int(s) for s in window_strides)
    pads = None
    if (batch_group_count == 1 and preferred_element_type is None
            and supports(lhs, rhs, strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
                         feature_group_count) and available()
            and (lhs.dtype != jax.numpy.bfloat16 or bfloat16_supported())):
        pads = _pads(lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], strides, padding)
                     if isinstance(padding, str) else padding)
        if any(p < 0 for pair in pads for p in pair) or min(_out_shape(lhs.shape, rhs.shape, strides, pads)) < 1:
            pads = None  # cropping or an empty output: XLA's
    if pads is None:
        return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
                                        rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
                                        feature_group_count=feature_group_count,
                                        batch_group_count=batch_group_count, precision=precision,
                                        preferred_element_type=preferred_element_type)
    return conv2d(lhs, rhs, strides, pads)


BN_MODES = {"none": 0, "relu": 1, "add_relu": 2}


def _bn_forward(x, scale, bias, residual, epsilon, mode):
    stat = jax.ShapeDtypeStruct(x.shape[-1:], np.float32)
    return jax.ffi.ffi_call(TARGETS["bn_forward"][0], (jax.ShapeDtypeStruct(x.shape, x.dtype), stat, stat),
                            vmap_method="sequential")(
        x, scale, bias, x if residual is None else residual, eps=np.float32(epsilon), mode=np.int64(mode))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _batch_norm_train(x, scale, bias, residual, epsilon, mode):
    return _bn_forward(x, scale, bias, residual, epsilon, mode)


def _batch_norm_train_fwd(x, scale, bias, residual, epsilon, mode):
    y, mean, var = _bn_forward(x, scale, bias, residual, epsilon, mode)
    return (y, mean, var), (x, y, scale, mean, var)


def _batch_norm_train_bwd(epsilon, mode, res, cotangents):
    x, y, scale, mean, var = res
    dy = cotangents[0]  # mean and variance leave through stop_gradient (batch_norm_train)
    stat = jax.ShapeDtypeStruct(scale.shape, np.float32)
    dx, dscale, dbias, dr = jax.ffi.ffi_call(
        TARGETS["bn_backward"][0],
        (jax.ShapeDtypeStruct(x.shape, x.dtype), stat, stat,
         jax.ShapeDtypeStruct(x.shape if mode == BN_MODES["add_relu"] else (1,), x.dtype)),
        vmap_method="sequential")(x, y, dy.astype(x.dtype), scale, mean, var, eps=np.float32(epsilon),
                                  mode=np.int64(mode))
    return dx, dscale, dbias, (dr if mode == BN_MODES["add_relu"] else None)


_batch_norm_train.defvjp(_batch_norm_train_fwd, _batch_norm_train_bwd)


def batch_norm_train(x, scale, bias, residual=None, *, epsilon: float, relu: bool = False):
    """Training-mode batch norm: y = [relu](BN(x) [+ residual]); returns (y, mean, var).

    x [N,H,W,C] float32 or bfloat16 (residual and y the same; arithmetic in float32); scale, bias [C] float32;
    mean/var [C] float32, the biased batch statistics (no gradient).
    A residual needs relu=True (the add-and-ReLU of torchvision's basic block). No fallback: callers check
    `available()` (facekd_jax.cpu.model_layers does, before handing out layers.FusedBatchNorm).
    """
    if residual is not None and not relu:
        raise ValueError("batch_norm_train: a residual is only fused together with relu=True")
    mode = BN_MODES["add_relu" if residual is not None else ("relu" if relu else "none")]
    y, mean, var = _batch_norm_train(x, scale, bias, residual, float(epsilon), mode)
    return y, lax.stop_gradient(mean), lax.stop_gradient(var)
