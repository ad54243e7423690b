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

import logging
import os
from typing import Any, Callable, Dict, Optional, Tuple

import numpy as np

from facekd_jax.models.iresnet import IRESNET_STAGES
from facekd_jax.models.layers import BN_EPSILON
from facekd_jax.teachers.iresnet_weights import (FC_INPUTS, FINAL_MAP, IMAGE_SIZE, INPUT_CONTRACT, WIDTHS,
                                                 InsightfaceFormatError, IResNetWeights, _arch_of, _known_archs,
                                                 _modules, blocks_per_stage, expected_shapes, model_name)
from facekd_jax.teachers.onnx_format import read_onnx

log = logging.getLogger(__name__)

__all__ = ["IResNetWeights", "InsightfaceFormatError", "blocks_per_stage", "expected_shapes", "import_insightface",
           "model_name", "read_insightface", "read_onnx", "to_flax_variables"]


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
    from facekd_jax.teachers import pth_format

    if path.lower().endswith(".onnx") or not (pth_format.is_zip_archive(path) or pickled):
        return read_onnx(path)

    use_torch = pth_format.torch_installed() if use_torch is None else use_torch
    state = pth_format.read_state_dict(path, use_torch=use_torch)
    reader = "torch.load(weights_only=True)" if use_torch else "facekd_jax.teachers.pth_format (restricted unpickler)"
    return IResNetWeights(path=path, state=state, fmt={"kind": "pth", "reader": reader,
                                                       "batch_norm": "kept (a state dict)"})


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
                "format": net.fmt, **notes, "crops": {}, "template": "arcface",
                "note": "insightface arcface_torch iResNet; check the weights' licence (insightface's published "
                        "models are for non-commercial research only)"}
        return imported.ImportedNetwork(model=model, variables=variables, image_size=IMAGE_SIZE,
                                        embedding_size=notes["embedding_size"], head="flatten", meta=meta)

    return imported.import_teacher(out, path, read, log=log)
