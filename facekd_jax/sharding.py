"""The device mesh and where each array lives on it.

One mesh of two named axes over all devices: `data` (the batch is split over it; XLA adds the gradient
all-reduce itself) and `model` (size mesh.model_parallelism: the margin head's class centres [E, C] are split over
it, so millions of identities fit, and are never gathered). Everything else is replicated.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

PyTree = Any


def make_mesh(model_parallelism: int = 1, devices=None) -> jax.sharding.Mesh:
    """A ("data", "model") mesh over all devices; `model` shards the margin head's classes."""
    devices = jax.devices() if devices is None else devices
    n = len(devices)
    if model_parallelism < 1 or n % model_parallelism:
        raise ValueError(f"mesh.model_parallelism={model_parallelism} must divide the device count {n}")
    return jax.make_mesh((n // model_parallelism, model_parallelism), ("data", "model"),
                         axis_types=(jax.sharding.AxisType.Auto,) * 2, devices=devices)


def _leaf_spec(path, leaf) -> P:
    """Class centres [E, C] shard C over `model`: the margin head's (and their optimiser slots) and AdaDistill's
    (kd_state); everything else is replicated, the backbone's own embedding layer too (its "head" submodule)."""
    keys = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
    if getattr(leaf, "ndim", 0) != 2:
        return P()
    if "head" in keys and "backbone" not in keys and keys[-1] == "kernel":
        return P(None, "model")
    if "kd_state" in keys and keys[-1] == "centres":
        return P(None, "model")
    return P()


def tree_shardings(tree: PyTree, mesh) -> PyTree:
    """NamedShardings by _leaf_spec; a kd_state centre matrix whose class count does not divide the `model` axis
    is replicated (the margin head's never needs to be: its columns are padded, head_classes)."""
    def sharding(path, leaf):
        spec = _leaf_spec(path, leaf)
        if spec != P() and leaf.shape[1] % int(mesh.shape["model"]):
            spec = P()
        return NamedSharding(mesh, spec)
    return jax.tree_util.tree_map_with_path(sharding, tree)


def head_classes(num_classes: int, model_parallelism: int) -> int:
    """The margin head's column count: num_classes rounded up to a multiple of the `model` axis, so any class count
    shards (CASIA's 10,572 over 8: 10,576 columns, 4 never read; see losses.MarginHead)."""
    m = max(int(model_parallelism), 1)
    return -(-int(num_classes) // m) * m


def batch_sharding(mesh) -> NamedSharding:
    return NamedSharding(mesh, P("data"))


def put_batch(batch: Mapping[str, np.ndarray], mesh) -> Dict[str, jax.Array]:
    """This process's share of the batch -> global arrays sharded on `data`."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, P())
