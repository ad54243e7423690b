"""Post-activation ResNets with basic blocks: the thesis's teacher (ResNet-18) and student (ResNet-56).

  resnet18  torchvision body: conv7x7(64, s2) -> BN -> ReLU -> maxpool3x3(s2), then 4 stages of
            [2,2,2,2] basic blocks, 64/128/256/512 channels, stride 2 at stages 2-4
            (112 -> 56 -> 28 -> 28 -> 14 -> 7 -> 4).
  resnet56  CIFAR body (He et al. 2016, sec. 4.2): conv3x3(16, s1) -> BN -> ReLU, then 3 stages of
            9 basic blocks, 16/32/64 channels, stride 2 at stages 2-3 (112 -> 112 -> 56 -> 28).
Basic block: conv3x3(stride) -> BN -> ReLU -> conv3x3 -> BN, + shortcut, -> ReLU.
Shortcut: identity, or where the shape changes "option B" of He et al., a conv1x1(stride) + BN projection
(as torchvision; option A's zero-padded strided identity would save 2,752 of ResNet-56's ~0.89 M params).
Both use the face-embedding head of heads.py, global-average-pooled by default ("gap"):
BN2d -> GAP -> dropout -> FC(C -> E) -> BN1d. ResNet-18 with it has 11.44 M params, ResNet-56 0.89 M: the
"twelve times larger" teacher of the thesis (12.9x).
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from facekd_jax.models.heads import EmbeddingHead
from facekd_jax.models.layers import ModuleDef, batch_norm, check_images, conv, norm_act

# torchvision-style (ImageNet stem) and CIFAR-style (6n+2 layers) families; resnet18/resnet56 are the thesis's
# pair, the others are smaller or intermediate members for quick experiments and tests.
RESNET_CONFIGS = {
    "resnet10": dict(stage_sizes=(1, 1, 1, 1), widths=(64, 128, 256, 512), stem="imagenet"),
    "resnet18": dict(stage_sizes=(2, 2, 2, 2), widths=(64, 128, 256, 512), stem="imagenet"),
    "resnet34": dict(stage_sizes=(3, 4, 6, 3), widths=(64, 128, 256, 512), stem="imagenet"),
    "resnet8": dict(stage_sizes=(1, 1, 1), widths=(16, 32, 64), stem="cifar"),
    "resnet20": dict(stage_sizes=(3, 3, 3), widths=(16, 32, 64), stem="cifar"),
    "resnet56": dict(stage_sizes=(9, 9, 9), widths=(16, 32, 64), stem="cifar"),
}


class BasicBlock(nn.Module):
    """ResNet basic block (post-activation): conv3x3(stride) -> BN -> ReLU -> conv3x3 -> BN, + shortcut, ReLU.

    Input [B, H, W, Cin] -> output [B, ceil(H/stride), ceil(W/stride), features].
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
        y = conv(self.features, 3, self.stride, **layer, name="conv1")(x)
        y = norm_act(batch_norm(train, **bn, name="bn1"), y, relu=True)
        y = conv(self.features, 3, **layer, name="conv2")(y)
        bn2 = batch_norm(train, **bn, name="bn2")
        if self.stride != 1 or x.shape[-1] != self.features:
            shortcut = conv(self.features, 1, self.stride, **layer, name="downsample_conv")(x)
            shortcut = batch_norm(train, **bn, name="downsample_bn")(shortcut)
        return norm_act(bn2, y, residual=shortcut, relu=True)


class ResNet(nn.Module):
    """Basic-block ResNet backbone with a face-embedding head.

    Fields: stage_sizes (blocks per stage), widths (channels per stage), stem "imagenet" (conv7x7 s2 + maxpool
    s2, torchvision) | "cifar" (conv3x3 s1), embedding_size E, dropout (head), dtype (compute; params stay
    float32), image_size S, head "gap" | "flatten", conv and norm (the layer classes, flax's by default; any
    drop-in with the same variables, as the Flax ImageNet example's ``conv: ModuleDef``).
    __call__(images float [B, S, S, 3] NHWC RGB in [-1, 1], train) -> float32 [B, E], not normalised.
    """

    stage_sizes: Sequence[int] = (2, 2, 2, 2)
    widths: Sequence[int] = (64, 128, 256, 512)
    stem: str = "imagenet"
    embedding_size: int = 512
    dropout: float = 0.0
    dtype: Any = jnp.float32
    image_size: int = 112
    head: str = "gap"
    conv: ModuleDef = nn.Conv
    norm: ModuleDef = nn.BatchNorm

    @nn.compact
    def __call__(self, images, train: bool = False):
        check_images(images, self.image_size, type(self).__name__)
        layers = dict(dtype=self.dtype, conv=self.conv, norm=self.norm)
        x = images.astype(self.dtype)
        if self.stem == "imagenet":
            x = conv(self.widths[0], 7, 2, dtype=self.dtype, module=self.conv, name="conv1")(x)
            x = norm_act(batch_norm(train, dtype=self.dtype, module=self.norm, name="bn1"), x, relu=True)
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        elif self.stem == "cifar":
            x = conv(self.widths[0], 3, dtype=self.dtype, module=self.conv, name="conv1")(x)
            x = norm_act(batch_norm(train, dtype=self.dtype, module=self.norm, name="bn1"), x, relu=True)
        else:
            raise ValueError(f"ResNet: unknown stem {self.stem!r}; known: 'imagenet', 'cifar'")
        for i, (num_blocks, width) in enumerate(zip(self.stage_sizes, self.widths)):
            for j in range(num_blocks):
                stride = 2 if (i > 0 and j == 0) else 1
                x = BasicBlock(width, stride=stride, **layers, name=f"layer{i + 1}_{j}")(x, train)
        return EmbeddingHead(kind=self.head, embedding_size=self.embedding_size, dropout=self.dropout,
                             dtype=self.dtype, norm=self.norm, name="head")(x, train)
