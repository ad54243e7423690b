"""MobileFaceNet (Chen, Liu, Gao & Han 2018, "MobileFaceNets: Efficient CNNs for Accurate Real-Time Face
Verification on Mobile Devices"), the student a phone runs.

Architecture (the paper's Table 1; every convolution is followed by batch norm, and by PReLU unless "linear"):
  conv3x3 64, stride 2                                       112 -> 56
  depthwise conv3x3 64                                       56
  bottlenecks (expansion t, channels c, repeats n, stride s of the first):
    (2, 64, 5, 2) -> 28; (4, 128, 1, 2) -> 14; (2, 128, 6, 1); (4, 128, 1, 2) -> 7; (2, 128, 2, 1)
  conv1x1 512                                                7
  linear GDConv: depthwise conv over the whole 7x7 map (no padding) -> 1x1x512
  linear conv1x1 to the embedding (a Dense on the flattened 512), then BatchNorm1d (scale fixed to 1, as the
  other heads here and insightface's "features" layer)
Bottleneck (MobileNetV2's inverted residual): conv1x1 (c_in * t) -> BN -> PReLU -> depthwise conv3x3 (stride s)
-> BN -> PReLU -> linear conv1x1 (c) -> BN, plus the input where the shape is unchanged (s = 1, c_in = c).
About 1.0 M parameters with a 128-d embedding and 0.22 G multiply-adds at 112x112 (the paper: 0.99 M, 221 M).
At other input sizes the GDConv covers whatever the last map is (S / 16, rounded up).
"""
from __future__ import annotations

from typing import Any, Sequence, Tuple

import flax.linen as nn
import jax.numpy as jnp

from facekd_jax.models.layers import ModuleDef, PReLU, batch_norm, check_images, conv_init

# (expansion t, output channels c, repeats n, stride of the first s), the paper's Table 1.
BOTTLENECKS: Tuple[Tuple[int, int, int, int], ...] = (
    (2, 64, 5, 2), (4, 128, 1, 2), (2, 128, 6, 1), (4, 128, 1, 2), (2, 128, 2, 1))


def _conv(module: ModuleDef, features: int, kernel: int, stride: int = 1, *, groups: int = 1, padding=None,
          dtype: Any, name: str) -> nn.Module:
    pad = kernel // 2 if padding is None else padding
    return module(features, (kernel, kernel), strides=(stride, stride), padding=((pad, pad), (pad, pad)),
                  feature_group_count=groups, use_bias=False, dtype=dtype, param_dtype=jnp.float32,
                  kernel_init=conv_init, name=name)


class ConvBlock(nn.Module):
    """conv (k x k, stride, groups) -> BN -> PReLU (unless linear). [B, H, W, Cin] -> [B, H/s, W/s, features]."""

    features: int
    kernel: int = 1
    stride: int = 1
    groups: int = 1
    linear: bool = False
    padding: Any = None
    dtype: Any = jnp.float32
    conv: ModuleDef = nn.Conv
    norm: ModuleDef = nn.BatchNorm

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = _conv(self.conv, self.features, self.kernel, self.stride, groups=self.groups, padding=self.padding,
                  dtype=self.dtype, name="conv")(x)
        x = batch_norm(train, dtype=self.dtype, module=self.norm, name="bn")(x)
        return x if self.linear else PReLU(dtype=self.dtype, name="prelu")(x)


class Bottleneck(nn.Module):
    """MobileNetV2 inverted residual with PReLU (see the module docstring)."""

    features: int
    expansion: int
    stride: int = 1
    dtype: Any = jnp.float32
    conv: ModuleDef = nn.Conv
    norm: ModuleDef = nn.BatchNorm

    @nn.compact
    def __call__(self, x, train: bool = False):
        layers = dict(dtype=self.dtype, conv=self.conv, norm=self.norm)
        hidden = x.shape[-1] * self.expansion
        y = ConvBlock(hidden, 1, **layers, name="expand")(x, train)
        y = ConvBlock(hidden, 3, self.stride, groups=hidden, **layers, name="depthwise")(y, train)
        y = ConvBlock(self.features, 1, linear=True, **layers, name="project")(y, train)
        if self.stride == 1 and x.shape[-1] == self.features:
            y = y + x
        return y


class MobileFaceNet(nn.Module):
    """MobileFaceNet with its GDConv embedding head.

    Fields: embedding_size E, dropout (before the embedding layer, train mode only), dtype (compute; params stay
    float32), image_size S, bottlenecks (t, c, n, s) rows, conv and norm (layer classes, flax's by default).
    __call__(images float [B, S, S, 3] NHWC RGB in [-1, 1], train) -> float32 [B, E], not normalised.
    """

    embedding_size: int = 128
    dropout: float = 0.0
    dtype: Any = jnp.float32
    image_size: int = 112
    bottlenecks: Sequence[Tuple[int, int, int, int]] = BOTTLENECKS
    conv: ModuleDef = nn.Conv
    norm: ModuleDef = nn.BatchNorm
    head = "gdc"  # not a field: the head is part of the design (models.OWN_HEADS)

    @nn.compact
    def __call__(self, images, train: bool = False):
        check_images(images, self.image_size, type(self).__name__)
        layers = dict(dtype=self.dtype, conv=self.conv, norm=self.norm)
        x = images.astype(self.dtype)
        x = ConvBlock(64, 3, 2, **layers, name="conv1")(x, train)
        x = ConvBlock(64, 3, groups=64, **layers, name="conv2_dw")(x, train)
        for i, (t, c, n, s) in enumerate(self.bottlenecks):
            for j in range(n):
                x = Bottleneck(c, t, s if j == 0 else 1, **layers, name=f"stage{i + 1}_{j}")(x, train)
        x = ConvBlock(512, 1, **layers, name="conv_sep")(x, train)
        # Global depthwise convolution: one k x k filter per channel over the whole last map (k = its side).
        side = x.shape[1]
        x = ConvBlock(512, side, groups=512, linear=True, padding=0, **layers, name="gdc")(x, train)
        x = x.reshape((x.shape[0], -1)).astype(jnp.float32)
        if self.dropout > 0:
            x = nn.Dropout(self.dropout, deterministic=not train, name="dropout")(x)
        x = nn.Dense(self.embedding_size, use_bias=False, dtype=jnp.float32, param_dtype=jnp.float32,
                     name="linear")(x)
        x = batch_norm(train, dtype=jnp.float32, use_scale=False, module=self.norm, name="features")(x)
        return x.astype(jnp.float32)
