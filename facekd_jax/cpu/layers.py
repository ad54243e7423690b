"""The CPU layers a model takes as its ``conv`` and ``norm`` fields: oneDNN convolutions (depthwise ones too),
depthwise convolutions as element-wise taps where oneDNN is not used, fused batch norm.

Both are drop-ins for flax's (same variables, same results up to float summation order), so a checkpoint moves
freely between a CPU run with them and a GPU/TPU run without. They are handed to `facekd_jax.models.build_model`
by the set-up when `config.cpu_kernels` selects them (facekd_jax.cpu.model_layers); nothing in `models/` knows
they exist.
"""
from __future__ import annotations

import functools
from typing import Callable

import flax.linen as nn
import jax.numpy as jnp
from jax import lax

from facekd_jax.cpu import onednn

_NHWC = ("NHWC", "HWIO", "NHWC")


def _is_depthwise(lhs, rhs, lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count,
                  batch_group_count) -> bool:
    """A 2-D NHWC depthwise convolution (one filter per channel, channel multiplier 1, no dilation)."""
    if lhs.ndim != 4 or rhs.ndim != 4 or dimension_numbers is None or batch_group_count != 1:
        return False
    if any(d != 1 for d in (lhs_dilation or (1, 1))) or any(d != 1 for d in (rhs_dilation or (1, 1))):
        return False
    nhwc = lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)
    return (lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) == nhwc
            and feature_group_count == lhs.shape[-1] > 1 and rhs.shape[2] == 1 and rhs.shape[3] == lhs.shape[-1])


def depthwise_taps(lhs, rhs, strides, pads):
    """Depthwise convolution as a sum of kh*kw shifted element-wise products: x [N,H,W,C], w [kh,kw,1,C].

    XLA:CPU runs a grouped convolution with one group per channel through a generic loop: MobileFaceNet's train
    step spent most of its time there (a 3x3 depthwise layer's gradient: 1,113 ms as a grouped convolution,
    180 ms as taps, 64x32x32x128). Element-wise taps fuse, and their gradients are taps too. Same results up to
    summation order; same parameters.
    """
    (pt, pb), (pl, pr) = pads
    sh, sw = strides
    kh, kw = rhs.shape[:2]
    x = jnp.pad(lhs, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    out_h = (x.shape[1] - kh) // sh + 1
    out_w = (x.shape[2] - kw) // sw + 1
    out = None
    for i in range(kh):
        for j in range(kw):
            tap = x[:, i:i + sh * (out_h - 1) + 1:sh, j:j + sw * (out_w - 1) + 1:sw, :] * rhs[i, j, 0].astype(x.dtype)
            out = tap if out is None else out + tap
    return out


def _with_depthwise_taps(conv: Callable) -> Callable:
    """`conv` (an lax.conv_general_dilated drop-in) with depthwise convolutions computed by depthwise_taps."""

    def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                             dimension_numbers=None, feature_group_count: int = 1, batch_group_count: int = 1,
                             precision=None, preferred_element_type=None):
        if preferred_element_type is None and _is_depthwise(lhs, rhs, lhs_dilation, rhs_dilation, dimension_numbers,
                                                              feature_group_count, batch_group_count):
            strides = tuple(int(s) for s in window_strides)
            pads = (lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], strides, padding)
                    if isinstance(padding, str) else padding)
            pads = tuple((int(lo), int(hi)) for lo, hi in pads)
            if all(p >= 0 for pair in pads for p in pair):
                return depthwise_taps(lhs, rhs, strides, pads)
        return conv(lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
                    dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
                    batch_group_count=batch_group_count, precision=precision,
                    preferred_element_type=preferred_element_type)
    return conv_general_dilated


# nn.Conv with XLA's convolutions except depthwise ones (taps): pure JAX, any device count, no native code.
TapsConv = functools.partial(nn.Conv, conv_general_dilated=_with_depthwise_taps(lax.conv_general_dilated))
# nn.Conv with oneDNN's three passes where the call is a 2-D NHWC convolution, depthwise and grouped ones included
# (onednn.supports; oneDNN's depthwise kernels run MobileFaceNet's step 2x as fast as the taps), XLA's elsewhere;
# same parameters as nn.Conv.
OnednnConv = functools.partial(nn.Conv, conv_general_dilated=onednn.conv_general_dilated)


class FusedBatchNorm(nn.BatchNorm):
    """flax's ``nn.BatchNorm`` (same variables, same results) that also fuses the ReLU, or the residual add and
    ReLU, that follow it: ``bn(x, residual=r, relu=True) == relu(bn(x) + r)`` (models.layers.norm_act calls it so).

    In train mode with float32 or bfloat16 NHWC input (of the module's dtype), the normalisation with what it
    fuses, and its gradient, run as two-pass C++ kernels (onednn.batch_norm_train). A residual block's output
    then comes out of a custom call, which stops XLA:CPU from recomputing the whole chain of earlier blocks'
    BN-add-ReLU inside each later fusion (it did: up to 10 layers per fusion in resnet56). Elsewhere (eval mode,
    a 2-D input, a cross-device axis_name) it is ``nn.BatchNorm`` followed by the add and ReLU.
    """

    fuses_activation = True  # a class attribute, not a field: models.layers.norm_act reads it

    @nn.compact
    def __call__(self, x, use_running_average: bool | None = None, *, mask=None, residual=None,
                 relu: bool = False):
        if residual is not None and not relu:
            raise ValueError("FusedBatchNorm: a residual is only fused together with relu=True")
        eval_mode = nn.merge_param("use_running_average", self.use_running_average, use_running_average)
        if (eval_mode or mask is not None or x.ndim != 4 or self.axis not in (-1, 3)
                or x.dtype not in (jnp.float32, jnp.bfloat16) or self.dtype not in (None, x.dtype)
                or not self.use_bias or self.axis_name is not None
                or (residual is not None and residual.dtype != x.dtype)):
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
        y, mean, var = onednn.batch_norm_train(x, scale.astype(jnp.float32), bias.astype(jnp.float32),
                                               residual, epsilon=self.epsilon, relu=relu)
        if not self.is_initializing():
            ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
            ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
        return y
