"""Orbax checkpoints: save (async, keep N, keep best), exact resume, teacher restore, damaged-checkpoint recovery.

Layout of a workdir:
  WORKDIR/checkpoints/<step>/{state,meta}   newest `max_to_keep` train states + JSON metadata
  WORKDIR/best/<step>/{state,meta}          the best state by a verification metric (when configured)
  WORKDIR/checkpoints/corrupt-<step>/       a damaged checkpoint, moved aside (never deleted) on resume

A checkpoint is the train state as a plain dict (step, params, batch_stats, opt_state, rng, ...) plus
metadata (config, step, data position, last metrics, and a fingerprint of every array: `fingerprint`).
Arrays are restored straight into the shardings of the current mesh, so a run saved on 8 devices resumes on 1
and the other way round. A restored checkpoint whose arrays do not match their fingerprint is damaged (bytes
changed on disk), like one whose files cannot be read: the run passes over it to the one before.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import time
from typing import Any, Callable, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from facekd_jax.errors import CheckpointSaveError

log = logging.getLogger(__name__)

STATE, META = "state", "meta"
FINGERPRINT = "fingerprint"  # meta key: {leaf path: fingerprint} of the saved state


class DamagedCheckpointError(ValueError):
    """A checkpoint's arrays differ from the fingerprints written with them."""


def _leaf_bits(x: jax.Array) -> jax.Array:
    """The leaf's raw bits as uint32 (floats and ints bit-cast; 8/16-bit types widened; keys as their data)."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    width = jnp.dtype(x.dtype).itemsize
    if width == 4:
        return jax.lax.bitcast_convert_type(x, jnp.uint32)
    if width in (1, 2):
        unsigned = jnp.uint8 if width == 1 else jnp.uint16
        return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)
    raise TypeError(f"cannot fingerprint a {x.dtype} array")


@jax.jit
def _fingerprints(leaves):
    """Two wrap-around uint32 sums per leaf: of its bits and of its bits times an odd position weight. Integer
    sums are exact in any order, so the result does not depend on how the array is sharded."""
    out = []
    for x in leaves:
        bits = _leaf_bits(jnp.asarray(x)).reshape(-1)
        weight = jnp.arange(bits.shape[0], dtype=jnp.uint32) * jnp.uint32(2) + jnp.uint32(1)
        out.append(jnp.stack([jnp.sum(bits, dtype=jnp.uint32), jnp.sum(bits * weight, dtype=jnp.uint32)]))
    return out


_HOST_CHUNK = 1 << 22  # elements per step of the host sums (bounds their temporary memory)


def _host_fingerprint(x) -> Tuple[int, int]:
    """`_fingerprints` of one leaf with NumPy, to the bit (uint32 sums wrap the same way): on CPU, compiling the
    jitted one (~3 s for a ResNet's state) costs more than summing."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    x = np.asarray(x).reshape(-1)
    if x.dtype == np.bool_:
        bits = x.astype(np.uint32)
    elif x.dtype.itemsize == 4:
        bits = x.view(np.uint32)
    elif x.dtype.itemsize in (1, 2):
        bits = x.view(np.uint8 if x.dtype.itemsize == 1 else np.uint16).astype(np.uint32)
    else:
        raise TypeError(f"cannot fingerprint a {x.dtype} array")
    total, weighted = np.uint32(0), np.uint32(0)
    with np.errstate(over="ignore"):
        for start in range(0, bits.shape[0], _HOST_CHUNK):
            chunk = bits[start:start + _HOST_CHUNK]
            weight = np.arange(start, start + chunk.shape[0], dtype=np.uint32) * np.uint32(2) + np.uint32(1)
            total = total + np.sum(chunk, dtype=np.uint32)
            weighted = weighted + np.sum(chunk * weight, dtype=np.uint32)
    return int(total), int(weighted)


def _in_host_memory(x) -> bool:
    """NumPy, or a CPU array this process holds whole (an accelerator's state would be copied to the host on
    every save; there the jitted sums, compiled once per run, are cheaper)."""
    return not isinstance(x, jax.Array) or (x.is_fully_addressable and
                                            all(d.platform == "cpu" for d in x.sharding.device_set))


def fingerprint(tree: Mapping[str, Any]) -> dict:
    """{leaf path: 16 hex digits} of every array in `tree`: written at save, checked at restore. Scrambled bytes
    on disk change it (a changed value changes the bit sum; a moved one the weighted sum). Summed with NumPy when
    every array is in this process's host memory, else by the jitted `_fingerprints` (the same digits)."""
    paths, leaves = zip(*jax.tree_util.tree_leaves_with_path(tree)) if jax.tree_util.tree_leaves(tree) else ((), ())
    if all(_in_host_memory(x) for x in leaves):
        sums = [_host_fingerprint(x) for x in leaves]
    else:
        sums = jax.device_get(_fingerprints(list(leaves)))
    return {jax.tree_util.keystr(p): f"{int(a):08x}{int(b):08x}" for p, (a, b) in zip(paths, sums)}


def check_fingerprint(tree: Mapping[str, Any], meta: Mapping[str, Any], where: str) -> None:
    """Raises DamagedCheckpointError naming the arrays of `tree` whose fingerprint differs from the one saved in
    `meta` (leaves the checkpoint has but `tree` does not read are not checked; an old checkpoint without
    fingerprints passes)."""
    saved = meta.get(FINGERPRINT)
    if not saved:
        return
    now = fingerprint(tree)
    bad = sorted(k for k, v in now.items() if k in saved and saved[k] != v)
    if bad:
        raise DamagedCheckpointError(
            f"{where}: {len(bad)} array(s) differ from the fingerprints written with them: "
            f"{', '.join(bad[:4])}{' ...' if len(bad) > 4 else ''} (the files were changed after the save)")


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
        self.saving: Optional[int] = None   # the step of the newest save started: an async failure is its
        self.best = None
        if best_metric:
            self.best = _manager(os.path.join(workdir, "best"), max_to_keep=1, best_mode=best_mode,
                                 best_fn=lambda metrics: float(metrics[best_metric]), async_save=async_save)

    def save(self, step: int, state: Mapping[str, Any], meta: Mapping[str, Any], *, force: bool = False) -> bool:
        """Starts an async save of `state` at `step` (returns at once; `wait()` blocks until it is on disk)."""
        if step in self.latest.all_steps():
            return False
        self.wait()  # Orbax waits for the previous save anyway: its failure is reported as that step's
        meta = dict(meta, **{FINGERPRINT: fingerprint(dict(state))})
        self.saving = step
        try:
            return self.latest.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(dict(state)), meta=ocp.args.JsonSave(_jsonable(meta))), force=force)
        except Exception as e:  # noqa: BLE001 - any failure to write stops the run, with its cause
            raise CheckpointSaveError(_save_failure(self.directory, step, e)) from e

    def _managers(self):
        """(manager, its folder) for the latest checkpoints and, when kept, the best one."""
        yield self.latest, self.directory
        if self.best is not None:
            yield self.best, os.path.join(self.workdir, "best")

    def check_for_errors(self) -> None:
        """Raises CheckpointSaveError when a background (async) save has failed since the last check."""
        for manager, directory in self._managers():
            try:
                manager.check_for_errors()
            except Exception as e:  # noqa: BLE001
                raise CheckpointSaveError(_save_failure(directory, self.saving, e)) from e

    def save_best(self, step: int, state: Mapping[str, Any], meta: Mapping[str, Any],
                  metrics: Mapping[str, float]) -> None:
        """Offers `state` to the best-checkpoint manager; it keeps it only if `metrics[best_metric]` is the best."""
        if self.best is None or self.best_metric not in metrics or step in self.best.all_steps():
            return
        self.check_for_errors()
        meta = dict(meta, **{FINGERPRINT: fingerprint(dict(state))})
        try:
            self.best.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(dict(state)), meta=ocp.args.JsonSave(_jsonable(meta))),
                metrics={self.best_metric: float(metrics[self.best_metric])}, force=True)
        except Exception as e:  # noqa: BLE001
            raise CheckpointSaveError(_save_failure(os.path.join(self.workdir, "best"), step, e)) from e

    def restore_latest(self, abstract_state: Mapping[str, Any]) -> Tuple[Optional[dict], Optional[dict]]:
        """Newest restorable (state, meta), or (None, None) for a fresh run.

        `abstract_state`: jax.ShapeDtypeStruct leaves carrying the target shardings. A checkpoint that
        fails to restore (truncated or missing files) or whose arrays differ from their saved fingerprints is
        logged with its step and error and moved aside to `checkpoints/corrupt-<step>`; the run then resumes
        from the one before. Nothing is deleted. (A different architecture is not damage: the train loop
        compares the configs before it gets here, `rundir.check_resumable`.)
        """
        self.latest.reload()
        for step in sorted(self.latest.all_steps(), reverse=True):
            try:
                restored = self.latest.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(dict(abstract_state)), meta=ocp.args.JsonRestore()))
                state, meta = dict(restored[STATE]), dict(restored[META])
                check_fingerprint(state, meta, os.path.join(self.directory, str(step)))
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
        """Blocks until every started save is on disk; CheckpointSaveError if one failed."""
        for manager, directory in self._managers():
            try:
                manager.wait_until_finished()
            except Exception as e:  # noqa: BLE001
                raise CheckpointSaveError(_save_failure(directory, self.saving, e)) from e

    def close(self, *, after_error: bool = False) -> None:
        """Waits for the started saves, then releases both managers (each one, even when the other fails).

        A failed save raises CheckpointSaveError; with `after_error` (the run is already stopping on an error,
        often the same failed save that Orbax reports once more on close) it is logged instead, so that it does
        not replace the error that stopped the run."""
        failure = None
        for manager, directory in self._managers():
            try:
                manager.wait_until_finished()
                manager.close()
            except Exception as e:  # noqa: BLE001
                if failure is None:
                    failure = CheckpointSaveError(_save_failure(directory, self.saving, e))
                    failure.__cause__ = e
        if failure is not None:
            if not after_error:
                raise failure
            log.error("while stopping on an earlier error: %s", failure)


def _save_failure(directory: str, step: Optional[int], error: BaseException) -> str:
    """One line: where, which step, and the root cause (e.g. 'No space left on device')."""
    cause = error
    while cause.__cause__ is not None or cause.__context__ is not None:
        cause = cause.__cause__ or cause.__context__
    what = f"the checkpoint of step {step}" if step is not None else "a checkpoint"
    text = str(cause).splitlines()[0][:300] if str(cause) else ""
    if isinstance(cause, OSError) and cause.errno == errno.ENOSPC:
        text = f"no space left on device ({text})"
    return (f"saving {what} in {directory} failed: {type(cause).__name__}: {text}. The run stopped; the checkpoints "
            "already on disk are kept. Free space or fix the cause, then rerun the same command to resume.")


@jax.jit
def _all_finite(leaves):
    """One flag per leaf, in one program for the whole state."""
    return [jnp.isfinite(x).all() for x in leaves]


def _check_restored(state: Mapping[str, Any], step: int, directory: str) -> None:
    """A checkpoint whose parameters hold NaN/Inf is as unusable as a truncated one. Checked with NumPy where the
    arrays are in this process's host memory, as `fingerprint` sums them (eager isfinite().all() compiled two
    programs per parameter shape, ~50 for a ResNet, at every restore), else by one jitted program."""
    found = [(jax.tree_util.keystr(path), leaf) for path, leaf in
             jax.tree_util.tree_leaves_with_path(state.get("params", {}))
             if np.issubdtype(np.dtype(leaf.dtype), np.floating)]
    if all(_in_host_memory(leaf) for _, leaf in found):
        finite = [bool(np.isfinite(np.asarray(leaf)).all()) for _, leaf in found]
    else:
        finite = [bool(f) for f in jax.device_get(_all_finite([leaf for _, leaf in found]))]
    bad = [path for (path, _), ok in zip(found, finite) if not ok]
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
                check_fingerprint(variables, dict(restored[META]), os.path.join(directory, str(step)))
                _check_restored(variables, step, directory)
                return variables, dict(restored[META])
            except Exception as e:  # noqa: BLE001
                log.error("checkpoint %s/%d cannot be restored (%s); trying the one before", directory, step, e)
                errors.append(f"step {step}: {type(e).__name__}: {str(e)[:300]}")
        raise RuntimeError(f"no restorable checkpoint in {directory}: " + "; ".join(errors))
    finally:
        manager.close()
