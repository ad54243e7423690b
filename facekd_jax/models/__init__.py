"""Face-recognition backbones with an embedding head, by name.

>>> model = build_model("iresnet18", embedding_size=512)          # a flax.linen.Module
>>> variables = model.init({"params": key, "dropout": key2}, images, train=False)  # {"params", "batch_stats"}
>>> emb = model.apply(variables, images, train=False)              # float32 [B, 512], not normalised
>>> emb, upd = model.apply(variables, images, train=True, mutable=["batch_stats"], rngs={"dropout": key})

images: float [B, S, S, 3], NHWC RGB, normalised as (pixel - 127.5) / 127.5 (arcface_torch).
Models: resnet18 (thesis teacher, torchvision body), resnet56 (thesis student, CIFAR body), and insightface's
iresnet18/34/50/100/200, mobilefacenet (Chen et al. 2018, the phone student; its own GDConv head), and
dlib_resnet29 (dlib's face descriptor, imported weights, 150x150 -> 128; eval only).
Params are float32 always; ``dtype`` sets the compute dtype. ``conv`` and ``norm`` keyword arguments replace
flax's layer classes (facekd_jax.cpu hands in oneDNN ones); nothing here is platform-specific.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, Optional, Tuple

import flax.linen as nn
import jax.numpy as jnp

from facekd_jax.models.heads import HEAD_KINDS, EmbeddingHead
from facekd_jax.models.iresnet import IRESNET_STAGES, IResNet
from facekd_jax.models.mobilefacenet import MobileFaceNet
from facekd_jax.models.resnet import RESNET_CONFIGS, ResNet
from facekd_jax.models.summary import count_params, model_summary


@dataclasses.dataclass(frozen=True)
class Model:
    """One entry of the model table: the module that builds it, its fixed fields, the embedding head it is known
    with ("gap", "flatten"; a model with a head of its own names it and takes no other), and, for a network that
    exists only as imported weights, the input side and embedding width those weights fix."""
    module: Callable[[], type]                   # -> the flax module class (imported on use)
    fields: Tuple[Tuple[str, Any], ...] = ()
    head: str = "gap"
    own_head: bool = False
    fixed_shape: Optional[Tuple[int, int]] = None


def _dlib():
    from facekd_jax.models.dlib_resnet import DlibResNet29
    return DlibResNet29


def _resnet(name: str) -> Model:
    return Model(lambda: ResNet, tuple(RESNET_CONFIGS[name].items()))


def _iresnet(name: str) -> Model:
    return Model(lambda: IResNet, (("stage_sizes", IRESNET_STAGES[name]),), head="flatten")


# The one table of models: adding a model is an entry here (and its module).
MODELS: Dict[str, Model] = {
    "resnet18": _resnet("resnet18"), "resnet56": _resnet("resnet56"),
    **{name: _iresnet(name) for name in IRESNET_STAGES},
    "resnet10": _resnet("resnet10"), "resnet34": _resnet("resnet34"), "resnet8": _resnet("resnet8"),
    "resnet20": _resnet("resnet20"),
    "mobilefacenet": Model(lambda: MobileFaceNet, head="gdc", own_head=True),
    "dlib_resnet29": Model(_dlib, head="", fixed_shape=(150, 128)),
}
MODEL_NAMES = tuple(MODELS)
# Derived views of the table, for callers that ask one question.
FIXED_SHAPES = {name: m.fixed_shape for name, m in MODELS.items() if m.fixed_shape}   # imported: name -> (S, E)
FIXED_IMAGE_SIZES = {name: size for name, (size, _) in FIXED_SHAPES.items()}
OWN_HEADS = {name: m.head for name, m in MODELS.items() if m.own_head}
DEFAULT_HEADS = {name: m.head for name, m in MODELS.items() if not m.fixed_shape}

_DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def _compute_dtype(dtype: Any):
    """'float32' | 'bfloat16' | 'bf16' | ... | a jnp dtype -> the numpy dtype; ValueError if not floating."""
    try:
        resolved = jnp.dtype(_DTYPE_ALIASES.get(dtype, dtype) if isinstance(dtype, str) else dtype)
    except TypeError as e:
        raise ValueError(f"build_model: dtype {dtype!r} is not a dtype (use 'float32' or 'bfloat16')") from e
    if not jnp.issubdtype(resolved, jnp.floating):
        raise ValueError(f"build_model: dtype must be floating (e.g. 'float32', 'bfloat16'), got {dtype!r}")
    return resolved


def build_model(
    name: str,
    *,
    embedding_size: int = 512,
    dropout: float = 0.0,
    dtype: Any = "float32",
    image_size: int = 112,
    head: str | None = None,
    **kwargs,
) -> nn.Module:
    """The backbone ``name`` with a face-embedding head, as a flax.linen Module.

    Args:
      name: one of MODEL_NAMES.
      embedding_size: E, the embedding width.
      dropout: dropout rate before the head's FC (train mode only).
      dtype: compute dtype ("float32", "bfloat16"/"bf16", or a jnp dtype); params are float32 regardless,
        embeddings are returned as float32.
      image_size: S, the input side the model is built for (inputs must be [B, S, S, 3]); the "flatten"
        head's FC input size follows it.
      head: "gap" (BN2d -> global average pool -> dropout -> FC -> BN1d) or "flatten" (insightface:
        BN2d -> flatten -> dropout -> FC -> BN1d); None = the model's default (DEFAULT_HEADS).
      **kwargs: further fields of the module (e.g. stage_sizes, widths).
    Returns:
      module with ``apply(variables, images [B, S, S, 3], train) -> float32 [B, E]``.
    Raises:
      ValueError: unknown name (the message lists MODEL_NAMES), unknown head, non-floating dtype.
    """
    if name not in MODELS:
        raise ValueError(f"build_model: unknown model {name!r}; known models: {', '.join(MODEL_NAMES)}")
    entry = MODELS[name]
    if entry.fixed_shape:
        return _build_fixed(name, entry, embedding_size=embedding_size, image_size=image_size, dtype=dtype, **kwargs)
    head = entry.head if head is None else head
    if entry.own_head and head != entry.head:
        raise ValueError(f"build_model({name!r}): its head is its own ({entry.head!r}), not {head!r}")
    if head not in HEAD_KINDS and not entry.own_head:
        raise ValueError(f"build_model({name!r}): unknown head {head!r}; known heads: {', '.join(HEAD_KINDS)}")
    if int(image_size) < 1 or int(embedding_size) < 1:
        raise ValueError(f"build_model({name!r}): image_size and embedding_size must be positive")
    common = dict(embedding_size=int(embedding_size), dropout=float(dropout), dtype=_compute_dtype(dtype),
                  image_size=int(image_size))
    if not entry.own_head:
        common["head"] = head
    return entry.module()(**{**dict(entry.fields), **common, **kwargs})


def _build_fixed(name: str, entry: Model, *, embedding_size: int, image_size: int, dtype: Any, **kwargs
                 ) -> nn.Module:
    """An imported network (eval only, no head choice): its sizes must be the ones its weights fix."""
    size, width = entry.fixed_shape
    if int(image_size) != size or int(embedding_size) != width:
        raise ValueError(f"build_model({name!r}): the imported weights fix image_size={size} and "
                         f"embedding_size={width}; got image_size={image_size}, embedding_size={embedding_size}")
    kwargs.pop("conv", None)  # its layers are its own (no batch norm: folded into affine layers)
    kwargs.pop("norm", None)
    return entry.module()(embedding_size=width, image_size=size, dtype=_compute_dtype(dtype), **kwargs)


__all__ = [
    "MODELS",
    "MODEL_NAMES",
    "FIXED_SHAPES",
    "FIXED_IMAGE_SIZES",
    "DEFAULT_HEADS",
    "HEAD_KINDS",
    "build_model",
    "count_params",
    "model_summary",
    "EmbeddingHead",
    "IResNet",
    "MobileFaceNet",
    "OWN_HEADS",
    "ResNet",
]
