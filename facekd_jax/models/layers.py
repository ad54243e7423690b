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

from facekd_jax.models import onednn_conv

Dtype = Any

# PyTorch BatchNorm defaults: eps 1e-5, momentum 0.1 (new = 0.9 * old + 0.1 * batch, i.e. flax momentum 0.9).
BN_EPSILON = 1e-5
BN_MOMENTUM = 0.9

# He-normal on fan-out (torchvision's kaiming_normal_(mode="fan_out", nonlinearity="relu")).
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def conv(features: int, kernel: int, stride: int = 1, *, dtype: Dtype, name: str | None = None) -> nn.Conv:
    """A bias-free square convolution padded like PyTorch's ``Conv2d(padding=kernel // 2)``.

    Explicit symmetric padding (not "SAME") keeps the sampling grid of torch on even inputs with stride 2,
    so ported insightface/torchvision weights give the same outputs. On a single-device CPU the convolution runs
    in oneDNN (models/onednn_conv.py; same parameters and results, 2-5x faster than XLA:CPU's).
    Input [B, H, W, Cin] -> output [B, floor((H + 2p - k) / s) + 1, ..., features], p = kernel // 2.
    """
    pad = kernel // 2
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=((pad, pad), (pad, pad)),
        use_bias=False,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=conv_init,
        conv_general_dilated=onednn_conv.conv_general_dilated,
        name=name,
    )


class BatchNorm(nn.BatchNorm):
    """flax's ``nn.BatchNorm`` (same variables, same results) that can fuse the ReLU, or the residual add and ReLU,
    that follow it: ``bn(x, residual=r, relu=True) == relu(bn(x) + r)``.

    In train mode on a single-device CPU with float32 or bfloat16 NHWC input (of the module's dtype), the
    normalisation with what it fuses, and its gradient, run as two-pass C++ kernels (models/onednn_conv.py's
    `batch_norm_train`, under the rules and opt-outs of its oneDNN convolutions). A residual block's output then
    comes out of a custom call, which stops XLA:CPU from recomputing the whole chain of earlier blocks'
    BN-add-ReLU inside each later fusion (it did: up to 10 layers per fusion in resnet56). Elsewhere it is
    ``nn.BatchNorm`` followed by the add and ReLU.
    """

    @nn.compact
    def __call__(self, x, use_running_average: bool | None = None, *, mask=None, residual=None,
                 relu: bool = False):
        if residual is not None and not relu:
            raise ValueError("BatchNorm: a residual is only fused together with relu=True")
        eval_mode = nn.merge_param("use_running_average", self.use_running_average, use_running_average)
        if (eval_mode or mask is not None or x.ndim != 4 or self.axis not in (-1, 3)
                or x.dtype not in (jnp.float32, jnp.bfloat16) or self.dtype not in (None, x.dtype)
                or not self.use_bias or self.axis_name is not None
                or (residual is not None and residual.dtype != x.dtype)
                or not onednn_conv.enabled()):
            y = super().__call__(x, use_running_average=use_running_average, mask=mask)
            if residual is not None:
                y = y + residual
            return nn.relu(y) if relu else y
        c = x.shape[-1]
        ra_mean = self.variable("batch_stats", "mean", lambda s: jnp.zeros(s, jnp.float32), (c,))
        ra_var = self.variable("batch_stats", "var", lambda s: jnp.ones(s, jnp.float32), (c,))
        scale = (self.param("scale", self.scale_init, (c,), self.param_dtype) if self.use_scale
                 else jnp.ones((c,), jnp.float32))
        bias = self.param("bias", self.bias_init, (c,), self.param_dtype)
        y, mean, var = onednn_conv.batch_norm_train(x, scale.astype(jnp.float32), bias.astype(jnp.float32),
                                                    residual, epsilon=self.epsilon, relu=relu)
        if not self.is_initializing():
            ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
            ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
        return y


def batch_norm(train: bool, *, dtype: Dtype, use_scale: bool = True, name: str | None = None) -> BatchNorm:
    """BatchNorm over the last axis with torch's eps/momentum; batch statistics in train mode only.

    Statistics are reduced in float32 even for bfloat16 compute (flax's ``force_float32_reductions``).
    Under jit with a batch sharded over devices the mean is over the global batch (synchronised BN for free).
    One difference from torch: the running variance is updated with the biased batch variance (torch uses
    the unbiased one), negligible at face-training batch sizes.
    Shapes: [..., C] -> [..., C]; variables params/{scale, bias} [C], batch_stats/{mean, var} [C].
    Call it as ``bn(x)``, or ``bn(x, relu=True)`` / ``bn(x, residual=r, relu=True)`` to fuse what follows.
    """
    return BatchNorm(
        use_running_average=not train,
        momentum=BN_MOMENTUM,
        epsilon=BN_EPSILON,
        use_scale=use_scale,
        dtype=dtype,
        param_dtype=jnp.float32,
        name=name,
    )


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
