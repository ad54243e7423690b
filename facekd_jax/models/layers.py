"""Building blocks shared by the backbones, with PyTorch's conventions so weights and numbers carry over.

All tensors are NHWC. Parameters are always float32 (``param_dtype``); ``dtype`` is the compute dtype.
Leaf names are fixed so that a weight-decay mask can select weights by name:
convolution and dense weights are ``"kernel"``, BatchNorm leaves ``"scale"``/``"bias"``, PReLU slopes
``"negative_slope"``.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

Dtype = Any

# PyTorch BatchNorm defaults: eps 1e-5, momentum 0.1 (new = 0.9 * old + 0.1 * batch, i.e. flax momentum 0.9).
BN_EPSILON = 1e-5
BN_MOMENTUM = 0.9

# He-normal on fan-out (torchvision's kaiming_normal_(mode="fan_out", nonlinearity="relu")).
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


ModuleDef = Any  # a flax Module class, or a functools.partial of one


def conv(features: int, kernel: int, stride: int = 1, *, dtype: Dtype, module: ModuleDef = nn.Conv,
         name: str | None = None) -> nn.Module:
    """A bias-free square convolution padded like PyTorch's ``Conv2d(padding=kernel // 2)``.

    Explicit symmetric padding (not "SAME") keeps the sampling grid of torch on even inputs with stride 2,
    so ported insightface/torchvision weights give the same outputs. ``module`` is the model's ``conv`` field:
    flax's ``nn.Conv``, or a drop-in with the same variables (facekd_jax.cpu hands in a oneDNN one).
    Input [B, H, W, Cin] -> output [B, floor((H + 2p - k) / s) + 1, ..., features], p = kernel // 2.
    """
    pad = kernel // 2
    return module(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=((pad, pad), (pad, pad)),
        use_bias=False,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=conv_init,
        name=name,
    )


def batch_norm(train: bool, *, dtype: Dtype, use_scale: bool = True, module: ModuleDef = nn.BatchNorm,
               name: str | None = None) -> nn.Module:
    """BatchNorm over the last axis with torch's eps/momentum; batch statistics in train mode only.

    ``module`` is the model's ``norm`` field: flax's ``nn.BatchNorm`` or a drop-in with the same variables.
    Statistics are reduced in float32 even for bfloat16 compute (flax's ``force_float32_reductions``).
    Under jit with a batch sharded over devices the mean is over the global batch (synchronised BN for free).
    One difference from torch: the running variance is updated with the biased batch variance (torch uses
    the unbiased one), negligible at face-training batch sizes.
    Shapes: [..., C] -> [..., C]; variables params/{scale, bias} [C], batch_stats/{mean, var} [C].
    Apply it with `norm_act` where a ReLU or a residual add follows, so a fusing norm can fuse them.
    """
    return module(
        use_running_average=not train,
        momentum=BN_MOMENTUM,
        epsilon=BN_EPSILON,
        use_scale=use_scale,
        dtype=dtype,
        param_dtype=jnp.float32,
        name=name,
    )


def norm_act(norm: nn.Module, x, *, residual=None, relu: bool = False):
    """``relu(norm(x) + residual)`` (each part optional). A norm module whose class sets ``fuses_activation``
    (facekd_jax.cpu's fused batch norm) is called as ``norm(x, residual=..., relu=...)`` and does it in one pass;
    flax's own norm is applied, then the add and the ReLU."""
    if getattr(norm, "fuses_activation", False):
        return norm(x, residual=residual, relu=relu)
    y = norm(x)
    if residual is not None:
        y = y + residual
    return nn.relu(y) if relu else y


class PReLU(nn.Module):
    """Per-channel PReLU as ``torch.nn.PReLU(num_parameters=C)``: slope initialised to 0.25.

    (flax's ``nn.PReLU`` has a single scalar slope; insightface's iResNet learns one per channel.)
    Input [..., C] -> output [..., C]; param ``negative_slope`` [C] float32.
    """

    dtype: Dtype = jnp.float32
    init_slope: float = 0.25

    @nn.compact
    def __call__(self, x):
        slope = self.param(
            "negative_slope", nn.initializers.constant(self.init_slope), (x.shape[-1],), jnp.float32
        )
        x = x.astype(self.dtype)
        return jnp.where(x >= 0, x, slope.astype(self.dtype) * x)


def check_images(images, image_size: int, model: str):
    """Raise ValueError unless ``images`` is [B, image_size, image_size, 3] (NHWC RGB)."""
    if images.ndim != 4 or tuple(images.shape[1:]) != (image_size, image_size, 3):
        raise ValueError(
            f"{model}: expected images of shape [B, {image_size}, {image_size}, 3] (NHWC RGB, the model's "
            f"image_size={image_size}), got {tuple(images.shape)}; build the model with image_size matching "
            "the data, or resize the data"
        )
