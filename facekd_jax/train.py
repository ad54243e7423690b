"""Training: `train_and_evaluate(config, workdir)` runs the loop around the train step (facekd_jax.step): the
input pipeline, checkpoints (exact resume), periodic and final verification, logging, NaN checks and preemption.

  python -m facekd_jax.main --config=configs/feature_kd.py --workdir=runs/fkd

The workdir is locked for the run and resumes only with the config it was trained with (facekd_jax.rundir); a
gs:// workdir is mirrored in a local folder and pushed after every checkpoint (facekd_jax.paths).
"""
from __future__ import annotations

import logging
import math
import os
import signal
import time
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import jax
import ml_collections
import numpy as np

from facekd_jax import checkpoint as ckpt_lib
from facekd_jax import config_lib
from facekd_jax import data as data_lib
from facekd_jax import evaluate as eval_lib
from facekd_jax import losses, paths, rundir, sharding
from facekd_jax import step as step_lib
from facekd_jax.data import specs
from facekd_jax.data import verification
from facekd_jax.errors import ConfigMismatchError, NonFiniteLossError, NonLocalPathError
from facekd_jax.teachers import load as teacher_load

log = logging.getLogger(__name__)


class _Preemption:
    """SIGTERM sets a flag; the loop saves a checkpoint of the current step and exits cleanly."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread (e.g. inside a notebook worker): no handler
            self._previous = None
        return self

    def _handle(self, signum, frame):
        log.warning("SIGTERM received: saving a checkpoint and stopping")
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def init_distributed(d) -> None:
    """jax.distributed.initialize() from config.distributed (before anything touches the devices)."""
    if not d.enabled or jax.distributed.is_initialized():
        return
    kwargs = {}
    if d.coordinator_address:
        kwargs = dict(coordinator_address=d.coordinator_address, num_processes=d.num_processes,
                      process_id=d.process_id)
    jax.distributed.initialize(**kwargs)
    log.info("process %d of %d, %d local / %d global devices", jax.process_index(), jax.process_count(),
             jax.local_device_count(), jax.device_count())


def data_specs(config: ml_collections.ConfigDict) -> Tuple[specs.DataSpec, Tuple[specs.DataSpec, ...]]:
    """config.data.train and config.data.val_targets parsed (`{root}` is config.data.root), before anything is
    created: a malformed spec (SpecError) or a URL its kind cannot take (NonLocalPathError) names the field."""
    train = specs.parse(config.data.train, specs.TRAIN, root=config.data.root, field="config.data.train")
    specs.check_urls(train, "config.data.train")
    val = []
    for i, text in enumerate(config.data.val_targets):
        field = f"config.data.val_targets[{i}]"
        val.append(specs.parse(text, specs.VERIFICATION, root=config.data.root, field=field))
        specs.check_urls(val[-1], field)
    return train, tuple(val)


def load_val_targets(config: ml_collections.ConfigDict) -> Dict[str, Tuple[np.ndarray, np.ndarray]]:
    """{name: (images, issame)} of config.data.val_targets at the run's image size."""
    return verification.load_targets(config.data.val_targets, image_size=config.data.image_size,
                                     root=config.data.root, log_fn=log.info)


def _format_metrics(metrics: Mapping[str, float]) -> str:
    order = ["total", "ce", *(m.name for m in losses.KD_METHODS if m.loss is not None)]
    parts = [f"{k} {metrics[k]:.4f}" for k in order if k in metrics]
    return " ".join(parts)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       val_targets: Optional[Dict[str, Tuple[np.ndarray, np.ndarray]]] = None) -> Dict[str, Any]:
    """Trains the configured student (with KD when configured); returns the final metrics and eval results.

    The workdir is locked for the run (rundir.WorkdirLock); resuming a workdir whose config.json differs
    from `config` stops before anything is touched (ConfigMismatchError, rundir.check_resumable). val_targets:
    the verification sets load_val_targets(config) returns, when the caller already holds them (the suite loads
    them once for all its runs); None loads them here."""
    data_specs(config)
    init_distributed(config.distributed)
    if paths.is_url(workdir):  # mirrored in a local folder, pushed after every checkpoint (facekd_jax.paths)
        single_host_for_url(workdir)
        with paths.RemoteWorkdir(workdir) as stage:
            try:
                rundir.check_resumable(config, stage.local)
            except ConfigMismatchError as e:  # name the URL the user gave, not the mirror
                raise ConfigMismatchError(str(e).replace(stage.local, workdir)) from None
            return _train_and_evaluate(config, stage.local, val_targets, sync=stage.push)
    os.makedirs(workdir, exist_ok=True)
    with rundir.WorkdirLock(workdir):
        rundir.check_resumable(config, workdir)
        return _train_and_evaluate(config, workdir, val_targets)


def single_host_for_url(workdir: str) -> None:
    if jax.process_count() > 1:
        raise NonLocalPathError(
            f"--workdir={workdir}: a multi-host run writes its checkpoint shards from every host, so its workdir "
            "must be one folder all hosts see: mount the bucket (gcsfuse) and give the mounted path")


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                        val_targets: Optional[Dict[str, Tuple[np.ndarray, np.ndarray]]],
                        sync: Optional[Callable[[], None]] = None) -> Dict[str, Any]:
    """The run in the local folder `workdir`; `sync` (a URL workdir's push) is called once each checkpoint or
    evaluation result is complete on disk."""
    from clu import metric_writers  # imported here: tensorboard is slow to import

    mesh = sharding.make_mesh(config.mesh.model_parallelism)
    process_count, process_index = jax.process_count(), jax.process_index()
    if config.batch_size % mesh.shape["data"] or config.batch_size % process_count:
        raise ValueError(f"config.batch_size={config.batch_size} must be divisible by the data-parallel "
                         f"device count {mesh.shape['data']} and the process count {process_count}")

    train_spec, _ = data_specs(config)
    try:
        specs.check_exists(train_spec, "config.data.train")
    except FileNotFoundError as e:
        raise FileNotFoundError(
            f"{e}. For the thesis setup download insightface's faces_webface_112x112 (CASIA-WebFace: train.rec, "
            "train.idx, property, lfw.bin, agedb_30.bin, cfp_fp.bin) and pass --config.data.root=THAT_DIR, or run "
            "a smoke test with --config=configs/NAME.py:smoke (synthetic data).") from None
    ckpt = ckpt_lib.Checkpointer(workdir, max_to_keep=config.keep_checkpoints,
                                 best_metric=config.best_metric or None, async_save=config.async_checkpoints)

    # The head needs the number of classes before the state (and so the resume step) exists.
    source = data_lib.open_source(train_spec, image_size=config.data.image_size)
    info = {"num_classes": source.num_classes, "num_images": int(source.num_images), "synthetic": source.synthetic}
    num_classes = int(info["num_classes"])
    num_train_steps = int(config.num_train_steps)
    if num_train_steps <= 0:
        num_train_steps = int(math.ceil(config.num_epochs * info["num_images"] / config.batch_size))

    run = step_lib.setup(config, num_classes=num_classes, mesh=mesh, num_train_steps=num_train_steps)
    student, train_step = run.student, run.train_step
    teacher_embeddings = teacher_cache = None
    if config.teacher.cache and step_lib.needs_teacher(config.kd):
        from facekd_jax.teachers import cache as cache_lib
        teacher_cache = cache_lib.open_cache(config_lib.teacher_cache_dir(config))
        teacher_cache.check_matches(train_spec, source, teacher_workdir=config.teacher.workdir,
                                    teacher_model=config.teacher.model,
                                    embedding_size=config.teacher.embedding_size)
        teacher_embeddings = teacher_cache.embeddings

    restored, meta = ckpt.restore_latest(run.abstract.as_dict())
    if restored is not None:
        state = step_lib.TrainState(**restored)
        log.info("resumed from step %d of %s", int(state.step), workdir)
    else:
        state = run.init_state()
    start_step = int(state.step)

    teacher_variables = teacher_load.load_teacher(run, teacher_cache)
    if val_targets is None:
        val_targets = load_val_targets(config) if config.data.val_targets else {}
    # One apply function for the run: evaluate's jitted embed is cached on it, so periodic evaluations compile once.
    eval_apply = step_lib.eval_apply(student)

    if process_index == 0:
        rundir.write_config(workdir, config)
    writer = metric_writers.create_default_writer(workdir, just_logging=process_index > 0)

    batches, _ = data_lib.make_train_dataset(train_spec, batch_size=config.batch_size // process_count,
                                             image_size=config.data.image_size, seed=config.seed,
                                             start_step=start_step, process_index=process_index,
                                             process_count=process_count, teacher_embeddings=teacher_embeddings)
    batches = iter(batches)

    def meta_for(step, last_metrics):
        return {"step": step, "data_position": step * config.batch_size, "config": config.to_dict(),
                "metrics": last_metrics, "num_classes": num_classes, "time": time.time()}

    def synced() -> None:
        if sync is not None:
            ckpt.wait()
            writer.flush()
            sync()

    def run_eval(step) -> Dict[str, Any]:
        variables = {"params": state.params["backbone"], "batch_stats": state.batch_stats}
        results = eval_lib.evaluate_targets(eval_apply, variables, val_targets, step=step,
                                            batch_size=config.eval_batch_size, mesh=mesh, log=log.info)
        writer.write_scalars(step, _best_metrics(results))
        return results

    last_metrics: Dict[str, float] = {}
    eval_results: Dict[str, Any] = {}
    pending = None  # metrics of the previous step, checked after the next one is dispatched (no pipeline stall)
    t0, images_since, t_log = time.time(), 0, time.time()
    step = start_step
    with _Preemption() as preemption:
        try:
            while step < num_train_steps:
                batch = sharding.put_batch(next(batches), mesh)
                state, metrics = train_step(state, batch, teacher_variables)
                step += 1
                images_since += config.batch_size
                if pending is not None:
                    _check_finite(*pending, config)
                pending = (step, metrics)
                if step % config.log_every_steps == 0 or step == num_train_steps:
                    _check_finite(step, metrics, config)
                    ckpt.check_for_errors()  # a failed background save stops the run here, with its cause
                    last_metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                    dt = time.time() - t_log
                    ips = images_since / max(dt, 1e-9)
                    eta = (num_train_steps - step) * config.batch_size / max(ips, 1e-9)
                    log.info("step %d/%d %s lr %.5f grad_norm %.3f | %.1f img/s | ETA %s", step, num_train_steps,
                             _format_metrics(last_metrics), last_metrics["lr"], last_metrics["grad_norm"], ips,
                             time.strftime("%H:%M:%S", time.gmtime(eta)))
                    writer.write_scalars(step, dict(last_metrics, images_per_second=ips))
                    images_since, t_log = 0, time.time()
                if val_targets and config.eval_every_steps > 0 and step % config.eval_every_steps == 0:
                    eval_results = run_eval(step)
                    ckpt.save_best(step, state.as_dict(), meta_for(step, last_metrics), _best_metrics(eval_results))
                if step % config.checkpoint_every_steps == 0 or step == num_train_steps:
                    _check_finite(step, metrics, config)
                    ckpt.save(step, state.as_dict(), meta_for(step, last_metrics))
                    synced()
                if preemption.requested:
                    _check_finite(step, metrics, config)
                    ckpt.save(step, state.as_dict(), meta_for(step, last_metrics), force=True)
                    ckpt.wait()
                    synced()
                    log.warning("preempted: checkpoint of step %d saved in %s", step, ckpt.directory)
                    return {"step": step, "preempted": True, "metrics": last_metrics}
            if pending is not None:
                _check_finite(*pending, config)
            if val_targets and (not eval_results or config.eval_every_steps <= 0
                                or step % config.eval_every_steps != 0):
                eval_results = run_eval(step)
                ckpt.save_best(step, state.as_dict(), meta_for(step, last_metrics), _best_metrics(eval_results))
            if val_targets and process_index == 0:
                eval_lib.write_results(os.path.join(workdir, "eval"), eval_results, step=step)
            synced()
        finally:
            ckpt.close()
            writer.flush()
    return {"step": step, "metrics": last_metrics, "eval": eval_results, "num_classes": num_classes,
            "train_seconds": time.time() - t0, "nonfinite_steps": int(state.nonfinite_steps)}


def _best_metrics(results: Mapping[str, Any]) -> Dict[str, float]:
    return {f"{name}/{k}": float(v) for name, r in results.items() for k, v in r.items()
            if isinstance(v, (int, float))}


def _check_finite(step: int, metrics, config) -> None:
    """Stops the run on a NaN/Inf loss or gradient, naming the step and the terms (unless nonfinite='skip')."""
    if bool(metrics["finite"]) or config.nonfinite == "skip":
        return
    values = jax.device_get(metrics)
    bad = sorted(k for k, v in values.items() if np.ndim(v) == 0 and np.issubdtype(np.asarray(v).dtype, np.floating)
                 and not np.isfinite(v))
    raise NonFiniteLossError(
        f"non-finite loss at step {step} (non-finite: {', '.join(bad) or 'gradient'}); the update was not "
        "applied and no checkpoint was written after it, so the newest checkpoint is the last good state. "
        "Lower optimizer.lr, check the data, or set --config.nonfinite=skip to skip such steps.")

