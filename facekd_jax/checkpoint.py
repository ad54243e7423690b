"""Orbax checkpoints: save (async, keep N, keep best), exact resume, teacher restore, damaged-checkpoint recovery.

Layout of a workdir:
  WORKDIR/checkpoints/<step>/{state,meta}   newest `max_to_keep` train states + JSON metadata
  WORKDIR/best/<step>/{state,meta}          the best state by a verification metric (when configured)
  WORKDIR/checkpoints/corrupt-<step>/       a damaged checkpoint, moved aside (never deleted) on resume

A checkpoint is the train state as a plain dict (step, params, batch_stats, opt_state, rng, ...) plus
metadata (config, step, data position, last metrics). Arrays are restored straight into the shardings of
the current mesh, so a run saved on 8 devices resumes on 1 and the other way round.
"""
from __future__ import annotations

import json
import logging
import os
import time
from typing import Any, Callable, Mapping, Optional, Tuple

import jax
import numpy as np
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)

STATE, META = "state", "meta"


def _manager(directory: str, *, max_to_keep: Optional[int], best_fn: Optional[Callable] = None,
             best_mode: str = "max", async_save: bool = True, read_only: bool = False,
             partial: bool = False) -> ocp.CheckpointManager:
    """A manager with explicit item handlers, so a restore never depends on what the checkpoint recorded
    about its handlers (a checkpoint written by several processes records none). `partial`: the state item
    is read with the PyTree handler, which can restore a subset of its entries."""
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, best_fn=best_fn, best_mode=best_mode,
        keep_checkpoints_without_metrics=False if best_fn else True,
        enable_async_checkpointing=async_save, create=not read_only, read_only=read_only,
        cleanup_tmp_directories=not read_only)
    handlers = {STATE: ocp.PyTreeCheckpointHandler() if partial else ocp.StandardCheckpointHandler(),
                META: ocp.JsonCheckpointHandler()}
    return ocp.CheckpointManager(os.path.abspath(directory), options=options, item_handlers=handlers)


class Checkpointer:
    """The train loop's checkpoints: newest N for resume, plus the best by a verification metric.

    Every process calls every method (Orbax coordinates the writes of a multi-host run).
    """

    def __init__(self, workdir: str, *, max_to_keep: int = 3, best_metric: Optional[str] = None,
                 best_mode: str = "max", async_save: bool = True):
        self.workdir = workdir
        self.directory = os.path.join(workdir, "checkpoints")
        self.latest = _manager(self.directory, max_to_keep=max_to_keep, async_save=async_save)
        self.best_metric = best_metric
        self.best = None
        if best_metric:
            self.best = _manager(os.path.join(workdir, "best"), max_to_keep=1, best_mode=best_mode,
                                 best_fn=lambda metrics: float(metrics[best_metric]), async_save=async_save)

    def save(self, step: int, state: Mapping[str, Any], meta: Mapping[str, Any], *, force: bool = False) -> bool:
        """Starts an async save of `state` at `step` (returns at once; `wait()` blocks until it is on disk)."""
        if step in self.latest.all_steps():
            return False
        return self.latest.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(dict(state)), meta=ocp.args.JsonSave(_jsonable(meta))), force=force)

    def save_best(self, step: int, state: Mapping[str, Any], meta: Mapping[str, Any],
                  metrics: Mapping[str, float]) -> None:
        """Offers `state` to the best-checkpoint manager; it keeps it only if `metrics[best_metric]` is the best."""
        if self.best is None or self.best_metric not in metrics or step in self.best.all_steps():
            return
        self.best.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(dict(state)), meta=ocp.args.JsonSave(_jsonable(meta))),
            metrics={self.best_metric: float(metrics[self.best_metric])}, force=True)

    def restore_latest(self, abstract_state: Mapping[str, Any]) -> Tuple[Optional[dict], Optional[dict]]:
        """Newest restorable (state, meta), or (None, None) for a fresh run.

        `abstract_state`: jax.ShapeDtypeStruct leaves carrying the target shardings. A checkpoint that
        fails to restore (truncated or missing files) is logged with its step and error and moved aside to
        `checkpoints/corrupt-<step>`; the run then resumes from the one before. Nothing is deleted.
        """
        self.latest.reload()
        for step in sorted(self.latest.all_steps(), reverse=True):
            try:
                restored = self.latest.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(dict(abstract_state)), meta=ocp.args.JsonRestore()))
                state, meta = dict(restored[STATE]), dict(restored[META])
                _check_restored(state, step, self.directory)
                return state, meta
            except Exception as e:  # noqa: BLE001 - any failure to read means: damaged, try the previous one
                path = os.path.join(self.directory, str(step))
                log.error("checkpoint at step %d (%s) cannot be restored (%s: %s); passing over it",
                          step, path, type(e).__name__, str(e).splitlines()[0][:500] if str(e) else "")
                self._move_aside(step)
        return None, None

    def _move_aside(self, step: int) -> None:
        if jax.process_index() != 0:
            return
        src = os.path.join(self.directory, str(step))
        dst = os.path.join(self.directory, f"corrupt-{step}-{int(time.time())}")
        if os.path.exists(src):
            os.rename(src, dst)
            log.error("moved the damaged checkpoint to %s (kept for inspection; delete it when done)", dst)
        self.latest.reload()

    def wait(self) -> None:
        self.latest.wait_until_finished()
        if self.best is not None:
            self.best.wait_until_finished()

    def close(self) -> None:
        self.wait()
        self.latest.close()
        if self.best is not None:
            self.best.close()


def _check_restored(state: Mapping[str, Any], step: int, directory: str) -> None:
    """A checkpoint whose arrays hold NaN/Inf is as unusable as a truncated one."""
    bad = [jax.tree_util.keystr(path) for path, leaf in jax.tree_util.tree_leaves_with_path(state.get("params", {}))
           if np.issubdtype(np.dtype(leaf.dtype), np.floating) and not bool(jax.numpy.isfinite(leaf).all())]
    if bad:
        raise ValueError(f"non-finite values in {bad[:3]} of checkpoint {directory}/{step}")


def _jsonable(tree: Any) -> Any:
    """Config dicts, numpy scalars and tuples -> plain JSON values."""
    return json.loads(json.dumps(tree, default=lambda o: o.item() if hasattr(o, "item") else str(o)))


def checkpoint_dir(workdir: str, which: str = "latest") -> str:
    if which not in ("latest", "best"):
        raise ValueError(f"which={which!r}: expected 'latest' or 'best'")
    return os.path.join(workdir, "checkpoints" if which == "latest" else "best")


def restore_variables(workdir: str, abstract_variables: Mapping[str, Any], *, which: str = "latest",
                      ) -> Tuple[dict, dict]:
    """Restores only some entries of a saved train state (e.g. params and batch_stats of a teacher).

    abstract_variables: {"params": ..., "batch_stats": ...} of jax.ShapeDtypeStruct with target shardings.
    Returns (variables, meta) from the newest restorable checkpoint of `which` ("latest" or "best").
    Raises FileNotFoundError naming the directory when there is no checkpoint.
    """
    directory = checkpoint_dir(workdir, which)
    if not os.path.isdir(directory):
        raise FileNotFoundError(
            f"no checkpoints in {directory}: train that run first (python -m facekd_jax.main --workdir={workdir})")
    manager = _manager(directory, max_to_keep=None, read_only=True, partial=True)
    try:
        steps = sorted(manager.all_steps(), reverse=True)
        if not steps:
            raise FileNotFoundError(f"no finished checkpoint in {directory}")
        errors = []
        for step in steps:
            try:
                restore_args = jax.tree.map(
                    lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding, dtype=x.dtype), dict(abstract_variables))
                restored = manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.PyTreeRestore(item=dict(abstract_variables), restore_args=restore_args,
                                                 partial_restore=True),
                    meta=ocp.args.JsonRestore()))
                variables = dict(restored[STATE])
                _check_restored(variables, step, directory)
                return variables, dict(restored[META])
            except Exception as e:  # noqa: BLE001
                log.error("checkpoint %s/%d cannot be restored (%s); trying the one before", directory, step, e)
                errors.append(f"step {step}: {type(e).__name__}: {str(e)[:300]}")
        raise RuntimeError(f"no restorable checkpoint in {directory}: " + "; ".join(errors))
    finally:
        manager.close()
