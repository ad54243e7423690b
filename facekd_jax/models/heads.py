"""The face-embedding head shared by every backbone: BN2d -> pool or flatten -> dropout -> FC -> BN1d.

This is insightface arcface_torch's iResNet head ("flatten"), plus a global-average-pool variant ("gap") for
backbones whose last feature map is not worth a spatial FC (the CIFAR-style ResNet-56, ResNet-18).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from facekd_jax.models.layers import ModuleDef, batch_norm

HEAD_KINDS = ("gap", "flatten")


class EmbeddingHead(nn.Module):
    """Feature map -> face embedding.

    Steps (as insightface's iResNet head): BatchNorm2d -> ("flatten": reshape to [B, h*w*C] |
    "gap": mean over h, w to [B, C]) -> dropout -> Dense(embedding_size, with bias) -> BatchNorm1d with its
    scale fixed to 1 (no learnable scale, only a bias; insightface freezes ``features.weight`` at 1.0).

    The FC and the final BN run in float32 whatever the body's compute dtype, as insightface runs its FC
    in float32 under fp16 autocast: a 25,088-long dot product is where low precision hurts most.

    Fields: kind "gap" | "flatten"; embedding_size E; dropout rate; dtype (compute dtype of the BN2d); norm
    (the BatchNorm class, flax's by default).
    Input [B, h, w, C] (any dtype) -> output float32 [B, E], not normalised.
    With "flatten" the FC has h*w*C inputs, so it follows the image size (7*7*512 at 112 for iResNet).
    """

    kind: str = "flatten"
    embedding_size: int = 512
    dropout: float = 0.0
    dtype: Any = jnp.float32
    norm: ModuleDef = nn.BatchNorm

    @nn.compact
    def __call__(self, x, train: bool = False):
        if self.kind not in HEAD_KINDS:
            raise ValueError(f"EmbeddingHead: unknown head kind {self.kind!r}; known: {', '.join(HEAD_KINDS)}")
        x = batch_norm(train, dtype=self.dtype, module=self.norm, name="bn2")(x)
        x = x.astype(jnp.float32)
        if self.kind == "flatten":
            x = x.reshape((x.shape[0], -1))
        else:
            x = jnp.mean(x, axis=(1, 2))
        if self.dropout > 0:
            x = nn.Dropout(self.dropout, deterministic=not train, name="dropout")(x)
        x = nn.Dense(self.embedding_size, dtype=jnp.float32, param_dtype=jnp.float32, name="fc")(x)
        x = batch_norm(train, dtype=jnp.float32, use_scale=False, module=self.norm, name="features")(x)
        return x.astype(jnp.float32)
