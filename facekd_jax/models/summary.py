"""Model size and compute, measured: parameter counts from shapes, FLOPs from XLA's cost analysis."""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp


def count_params(tree: Any) -> int:
    """Number of scalars in a pytree of arrays or ShapeDtypeStructs (pass ``variables["params"]``,
    so that BatchNorm's batch_stats are not counted)."""
    return int(sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(tree)))


def _flops(cost: Any) -> float:
    """The "flops" entry of a ``cost_analysis()`` result (a dict, or a one-dict list in older JAX)."""
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    if not cost or "flops" not in cost:
        raise RuntimeError(f"XLA cost analysis gave no 'flops' entry on backend {jax.default_backend()}: {cost!r}")
    return float(cost["flops"])


def model_summary(name: str, image_size: int = 112, **kwargs) -> dict:
    """Parameters, compute and fp32 size of ``build_model(name, image_size=image_size, **kwargs)``.

    params: trainable parameters (the "params" collection; not batch_stats), from jax.eval_shape.
    gflops: XLA cost analysis of the jitted eval forward on one [1, S, S, 3] image, in 1e9 FLOPs, counted on the
      lowered program (before backend optimisation, so the same on every backend and XLA flag setting).
      XLA counts a multiply-add as 2 FLOPs, so gmacs = gflops / 2 is the figure that papers calling
      MACs "FLOPs" report (insightface: 2.6 "GFLOPs" for iresnet18 at 112).
    mb: float32 size of the params, params * 4 / 2**20.
    Returns dict(name, head, image_size, params, gflops, gmacs, mb).
    """
    from facekd_jax.models import build_model  # here: the registry imports this module

    model = build_model(name, image_size=image_size, **kwargs)
    images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    rngs = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
    variables = jax.eval_shape(lambda x: model.init(rngs, x, train=False), images)
    params = count_params(variables["params"])

    def forward(variables, images):
        return model.apply(variables, images, train=False)

    # Variables are arguments, not constants, so XLA cannot fold any of the network away. The count is taken on
    # the lowered program, before the backend's optimisation: the compiled program's count moves with the fusions
    # a backend picks (resnet56 at 112: 3.095 GFLOPs with XLA:CPU's own fusions, 3.028 with facekd_jax.cpu.xla_flags'
    # YNNPACK ones), the model's does not. Built with flax's layers: a oneDNN custom call (facekd_jax.cpu) has no cost.
    lowered = jax.jit(forward).lower(variables, images)
    try:
        gflops = _flops(lowered.cost_analysis()) / 1e9
    except Exception:  # a backend without pre-compilation cost analysis: count the compiled program instead
        gflops = _flops(lowered.compile().cost_analysis()) / 1e9
    return dict(
        name=name,
        head=getattr(model, "head", "own"),  # an imported network has no head choice
        image_size=image_size,
        params=params,
        gflops=gflops,
        gmacs=gflops / 2,
        mb=params * 4 / 2**20,
    )
