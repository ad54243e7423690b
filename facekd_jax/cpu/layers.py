"""The CPU layers a model takes as its ``conv`` and ``norm`` fields: oneDNN convolutions, fused batch norm.

Both are drop-ins for flax's (same variables, same results up to float summation order), so a checkpoint moves
freely between a CPU run with them and a GPU/TPU run without. They are handed to `facekd_jax.models.build_model`
by the set-up when `config.cpu_kernels` selects them (facekd_jax.cpu.model_layers); nothing in `models/` knows
they exist.
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax.numpy as jnp

from facekd_jax.cpu import onednn

# nn.Conv with oneDNN's three passes where the call is a plain 2-D NHWC convolution (onednn.supports), XLA's
# elsewhere; same parameters as nn.Conv.
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
