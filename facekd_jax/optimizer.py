"""The optimiser: SGD with momentum and torch-style weight decay on kernels, the backbone's gradient-norm clip,
a learning-rate multiplier for the margin head, and the schedule (arcface_torch's polynomial decay with warmup, or
steps at fractions of the run), from config.optimizer.
"""
from __future__ import annotations

from typing import Any, Tuple

import jax
import optax

PyTree = Any


def make_schedule(config, num_train_steps: int) -> optax.Schedule:
    """`poly`: linear warmup then polynomial decay (arcface_torch); `step`: x decay_factor at fractions of the run."""
    o = config.optimizer
    warmup = int(o.warmup_steps)
    if o.schedule == "poly":
        decay = optax.polynomial_schedule(o.lr, o.lr * o.end_lr_factor, o.power, max(num_train_steps - warmup, 1))
    elif o.schedule == "step":
        boundaries = {max(int(round(f * num_train_steps)) - warmup, 1): o.decay_factor for f in o.step_fractions}
        decay = optax.piecewise_constant_schedule(o.lr, boundaries)
    elif o.schedule == "constant":
        decay = optax.constant_schedule(o.lr)
    else:
        raise ValueError(f"optimizer.schedule={o.schedule!r}: expected 'poly', 'step' or 'constant'")
    if warmup <= 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, o.lr, warmup), decay], [warmup])


def weight_decay_mask(params: PyTree) -> PyTree:
    """True exactly on conv/dense kernels (and the class centres): BN scale/bias, biases, PReLU are not decayed."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: str(getattr(path[-1], "key", path[-1])) == "kernel" and x.ndim >= 2, params)


def make_optimizer(config, num_train_steps: int) -> Tuple[optax.GradientTransformation, optax.Schedule]:
    """SGD momentum with torch-style weight decay; grad-norm clipping on the backbone; head LR multiplier."""
    o = config.optimizer
    schedule = make_schedule(config, num_train_steps)

    def group(clip: float, lr_multiplier: float) -> optax.GradientTransformation:
        parts = [optax.clip_by_global_norm(clip)] if clip and clip > 0 else []
        parts += [optax.add_decayed_weights(o.weight_decay, mask=weight_decay_mask),
                  optax.sgd(lambda step: schedule(step) * lr_multiplier, momentum=o.momentum or None,
                            nesterov=o.nesterov)]
        return optax.chain(*parts)

    # The training-only projection (kd.projection) trains with the backbone.
    tx = optax.multi_transform(
        {"backbone": group(o.grad_clip, 1.0), "head": group(0.0, o.head_lr_multiplier)},
        lambda params: {k: jax.tree.map(lambda _: "head" if k == "head" else "backbone", v)
                        for k, v in params.items()})
    return tx, schedule

