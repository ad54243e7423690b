"""insightface arcface_torch's iResNet ("improved" pre-activation-style ResNet for faces), in flax.linen.

Architecture (recognition/arcface_torch/backbones/iresnet.py):
  stem   conv3x3(3 -> 64, stride 1) -> BN -> PReLU (per channel)
  stages widths 64/128/256/512, blocks [2,2,2,2] r18, [3,4,6,3] r34, [3,4,14,3] r50, [3,13,30,3] r100,
         [6,26,60,6] r200;
         stride 2 in the first block of every stage, so 112 -> 56 -> 28 -> 14 -> 7
  block  BN -> conv3x3 -> BN -> PReLU -> conv3x3(stride) -> BN, plus shortcut (identity, or conv1x1(stride)
         + BN where the shape changes); no activation after the sum
  head   BN2d -> flatten -> dropout -> FC(512*7*7 -> E) -> BN1d with scale fixed to 1 (see heads.py)
Sub-module names follow the torch ones (conv1, bn1, prelu, layer1_0, ...; head/bn2, head/fc, head/features)
so a converted insightface state dict maps one to one (facekd_jax.teachers.insightface imports .pth and .onnx).
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from facekd_jax.models.heads import EmbeddingHead
from facekd_jax.models.layers import ModuleDef, PReLU, batch_norm, check_images, conv

IRESNET_STAGES = {
    "iresnet18": (2, 2, 2, 2),
    "iresnet34": (3, 4, 6, 3),
    "iresnet50": (3, 4, 14, 3),
    "iresnet100": (3, 13, 30, 3),
    "iresnet200": (6, 26, 60, 6),
}


class IBasicBlock(nn.Module):
    """insightface IBasicBlock: BN -> conv3x3 -> BN -> PReLU -> conv3x3(stride) -> BN, + shortcut.

    Input [B, H, W, Cin] -> output [B, H/stride, W/stride, features] (torch rounding: floor((H-1)/s)+1).
    """

    features: int
    stride: int = 1
    dtype: Any = jnp.float32
    conv: ModuleDef = nn.Conv
    norm: ModuleDef = nn.BatchNorm

    @nn.compact
    def __call__(self, x, train: bool = False):
        layer = dict(dtype=self.dtype, module=self.conv)
        bn = dict(dtype=self.dtype, module=self.norm)
        shortcut = x
        y = batch_norm(train, **bn, name="bn1")(x)
        y = conv(self.features, 3, **layer, name="conv1")(y)
        y = batch_norm(train, **bn, name="bn2")(y)
        y = PReLU(dtype=self.dtype, name="prelu")(y)
        y = conv(self.features, 3, self.stride, **layer, name="conv2")(y)
        y = batch_norm(train, **bn, name="bn3")(y)
        if self.stride != 1 or x.shape[-1] != self.features:
            shortcut = conv(self.features, 1, self.stride, **layer, name="downsample_conv")(x)
            shortcut = batch_norm(train, **bn, name="downsample_bn")(shortcut)
        return y + shortcut


class IResNet(nn.Module):
    """iResNet backbone with a face-embedding head.

    Fields: stage_sizes (blocks per stage), widths (channels per stage), embedding_size E, dropout (head),
    dtype (compute; params stay float32), image_size S (input side; the flatten FC has
    512 * ceil(S/16)^2 inputs), head "flatten" (insightface) | "gap", conv and norm (layer classes, flax's by
    default; see ResNet).
    __call__(images float [B, S, S, 3] NHWC RGB in [-1, 1], train) -> float32 [B, E], not normalised.
    """

    stage_sizes: Sequence[int] = (2, 2, 2, 2)
    widths: Sequence[int] = (64, 128, 256, 512)
    embedding_size: int = 512
    dropout: float = 0.0
    dtype: Any = jnp.float32
    image_size: int = 112
    head: str = "flatten"
    conv: ModuleDef = nn.Conv
    norm: ModuleDef = nn.BatchNorm

    @nn.compact
    def __call__(self, images, train: bool = False):
        check_images(images, self.image_size, type(self).__name__)
        x = images.astype(self.dtype)
        x = conv(self.widths[0], 3, dtype=self.dtype, module=self.conv, name="conv1")(x)
        x = batch_norm(train, dtype=self.dtype, module=self.norm, name="bn1")(x)
        x = PReLU(dtype=self.dtype, name="prelu")(x)
        for i, (num_blocks, width) in enumerate(zip(self.stage_sizes, self.widths)):
            for j in range(num_blocks):
                x = IBasicBlock(width, stride=2 if j == 0 else 1, dtype=self.dtype, conv=self.conv,
                                norm=self.norm, name=f"layer{i + 1}_{j}")(x, train)
        return EmbeddingHead(kind=self.head, embedding_size=self.embedding_size, dropout=self.dropout,
                             dtype=self.dtype, norm=self.norm, name="head")(x, train)
