"""The frozen teacher's variables a run's train step takes (`load_teacher`): restored from a teacher run (trained
or imported: facekd_jax.rundir), or only the class centres and mean a teacher-embedding cache holds (the
embeddings then come with each batch, facekd_jax.teachers.cache).
"""
from __future__ import annotations

import logging
from typing import Any, Dict

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from facekd_jax import config_lib, paths, rundir, sharding
from facekd_jax import step as step_lib

log = logging.getLogger(__name__)

PyTree = Any


def load_teacher(run: step_lib.Setup, cache=None) -> Dict[str, PyTree]:
    """The frozen teacher's variables the train step needs, replicated on the run's mesh ({} without KD).

    With config.teacher.cache: only the class centres where a method needs them (the cache's per-identity means,
    facekd_jax.teachers.cache; `cache` is the already opened one, if any); the embeddings come with each batch.
    Otherwise restored from teacher.workdir:
    the backbone (and batch stats) where the teacher runs live, the margin head where centres are needed.
    """
    config, mesh = run.config, run.mesh
    if not step_lib.needs_teacher(config.kd):
        return {}
    replicated = NamedSharding(mesh, P())
    want_head = step_lib.needs_teacher_head(config.kd)
    if config.teacher.centre and not config.teacher.cache:
        raise ValueError("config.teacher.centre=True takes the teacher's mean embedding from its cache: give "
                         "--config.teacher.cache=DIR (python -m facekd_jax.teachers cache)")
    if config.teacher.cache:
        if cache is None:
            from facekd_jax.teachers import cache as cache_lib
            cache = cache_lib.open_cache(config_lib.teacher_cache_dir(config))
        out: Dict[str, PyTree] = {}
        mean = None
        if config.teacher.centre:
            mean = cache.mean()
            log.info("teacher embeddings centred: |mean of unit embeddings| = %.3f (%s)", np.linalg.norm(mean),
                     config.teacher.cache)
            out["embedding_mean"] = jax.device_put(mean, replicated)
        if want_head:
            centres = cache.centres(mean)
            if centres.shape[1] != run.num_classes:
                raise ValueError(f"config.teacher.cache={config.teacher.cache}: centres for {centres.shape[1]} "
                                 f"identities, the training data has {run.num_classes}")
            out["params"] = {"head": {"kernel": _shard_centres(centres, run)}}
        return out
    if not config.teacher.workdir:
        raise ValueError("this config distils (config.kd has KD terms) but config.teacher.workdir is empty: "
                         "train a teacher first (configs/teacher_resnet18.py) and pass "
                         "--config.teacher.workdir=THAT_WORKDIR, or give --config.teacher.cache=DIR")
    workdir = paths.local_copy(config.teacher.workdir)  # a URL: its local copy (facekd_jax.paths)
    # The head as the teacher saved it: padded for the teacher run's own model axis (sharding.head_classes).
    columns = sharding.head_classes(run.num_classes, rundir.model_parallelism(workdir)) if want_head else 0
    try:
        variables, meta = rundir.restore_model_variables(
            workdir, run.teacher, image_size=step_lib.teacher_image_size(config),
            embedding_size=config.teacher.embedding_size, sharding=replicated, which=config.teacher.checkpoint,
            head_columns=columns)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"config.teacher.workdir: {e}") from e
    except Exception as e:
        hint = ("An imported teacher (python -m facekd_jax.teachers import) has no class centres for this data: "
                "build a teacher-embedding cache and pass --config.teacher.cache=DIR. " if want_head else "")
        raise RuntimeError(
            f"cannot restore teacher {config.teacher.model!r} with {run.num_classes} classes from {workdir}: {e}. "
            f"{hint}Check that config.teacher.model/embedding_size and the training data match the teacher "
            "run.") from e
    log.info("teacher %s restored from %s (step %s)", config.teacher.model, workdir, meta.get("step"))
    out = {"params": {}, "batch_stats": variables["batch_stats"]}
    if run.teacher is not None:
        out["params"]["backbone"] = variables["params"]
    if want_head:
        out["params"]["head"] = {"kernel": _shard_centres(variables["head"], run)}
    return out


def _shard_centres(centres, run: step_lib.Setup) -> jax.Array:
    """Teacher class centres [E_t, >= C] (a cache's, or a teacher head padded for its own run) -> the first C
    columns padded with zeros to the student head's column count, sharded like the student's head over `model`
    (never gathered: the head slices its cosines to C)."""
    centres = np.asarray(centres, np.float32)[:, :run.num_classes]
    columns = sharding.head_classes(run.num_classes, run.mesh.shape["model"])
    centres = np.pad(centres, ((0, 0), (0, columns - centres.shape[1])))
    return jax.device_put(centres, NamedSharding(run.mesh, P(None, "model")))



def abstract_teacher(run: step_lib.Setup) -> Dict[str, PyTree]:
    """ShapeDtypeStructs, with their shardings, of what `load_teacher` returns for this run: what the train step is
    lowered with where no teacher is at hand (facekd_jax.plan compiles for a TPU topology on any machine)."""
    config, mesh = run.config, run.mesh
    if not step_lib.needs_teacher(config.kd):
        return {}
    replicated = NamedSharding(mesh, P())
    width = int(config.teacher.embedding_size)
    out: Dict[str, PyTree] = {}
    if config.teacher.cache:
        if config.teacher.centre:
            out["embedding_mean"] = jax.ShapeDtypeStruct((width,), np.float32, sharding=replicated)
    else:
        out = {"params": {}, "batch_stats": {}}
        if run.teacher is not None:
            shapes = jax.eval_shape(lambda rng: step_lib.init_variables(
                run.teacher, None, step_lib.teacher_image_size(config), rng, width), jax.random.PRNGKey(0))
            out = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated), shapes)
    if step_lib.needs_teacher_head(config.kd):
        columns = sharding.head_classes(run.num_classes, run.mesh.shape["model"])
        out.setdefault("params", {})["head"] = {"kernel": jax.ShapeDtypeStruct(
            (width, columns), np.float32, sharding=NamedSharding(mesh, P(None, "model")))}
    return out
