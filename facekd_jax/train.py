"""Training: `train_and_evaluate(config, workdir)` runs the loop around the train step (facekd_jax.step): the
input pipeline, checkpoints (exact resume), periodic and final verification, logging, NaN checks and preemption.

  python -m facekd_jax.main --config=configs/feature_kd.py --workdir=runs/fkd

The workdir is locked for the run and resumes only with the config it was trained with (facekd_jax.rundir); a
gs:// workdir is mirrored in a local folder and pushed after every checkpoint (facekd_jax.paths).
"""
from __future__ import annotations

import dataclasses
import functools
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
from facekd_jax import kd as kd_lib
from facekd_jax import paths, rundir, sharding
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
    order = ["total", "ce", *(m.name for m in kd_lib.KD_METHODS if m.loss is not None)]
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


@dataclasses.dataclass
class _Run:
    """Everything the loop works with, built once by `_prepare`: the set-up, the state, the data, the teacher's
    variables, the verification sets and where results go."""
    config: ml_collections.ConfigDict
    workdir: str
    setup: step_lib.Setup
    state: step_lib.TrainState
    start_step: int
    batches: Any
    teacher_variables: Dict[str, Any]
    val_targets: Dict[str, Tuple[np.ndarray, np.ndarray]]
    ckpt: ckpt_lib.Checkpointer
    writer: Any
    sync: Optional[Callable[[], None]]
    last_metrics: Dict[str, float] = dataclasses.field(default_factory=dict)
    eval_results: Dict[str, Any] = dataclasses.field(default_factory=dict)

    def meta(self, step: int) -> Dict[str, Any]:
        return {"step": step, "data_position": step * self.config.batch_size, "config": self.config.to_dict(),
                "metrics": self.last_metrics, "num_classes": self.setup.num_classes, "time": time.time()}

    def synced(self) -> None:
        """A URL workdir's push, once each checkpoint and evaluation result is complete on disk."""
        if self.sync is not None:
            self.ckpt.wait()
            self.writer.flush()
            self.sync()

    def evaluate(self, step: int) -> None:
        variables = {"params": self.state.params["backbone"], "batch_stats": self.state.batch_stats}
        self.eval_results = eval_lib.evaluate_targets(self.eval_apply, variables, self.val_targets, step=step,
                                                      batch_size=self.config.eval_batch_size, mesh=self.setup.mesh,
                                                      log=log.info)
        self.writer.write_scalars(step, _best_metrics(self.eval_results))
        self.ckpt.save_best(step, self.state.as_dict(), self.meta(step), _best_metrics(self.eval_results))

    @functools.cached_property
    def eval_apply(self):
        # One apply function for the run: evaluate's jitted embed is cached on it, so evaluations compile once.
        return step_lib.eval_apply(self.setup.student)


def _prepare(config: ml_collections.ConfigDict, workdir: str,
             val_targets: Optional[Dict[str, Tuple[np.ndarray, np.ndarray]]],
             sync: Optional[Callable[[], None]]) -> _Run:
    """The run in the local folder `workdir`, set up and resumed where it stopped."""
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
    num_train_steps = int(config.num_train_steps)
    if num_train_steps <= 0:
        num_train_steps = int(math.ceil(config.num_epochs * source.num_images / config.batch_size))
    run = step_lib.setup(config, num_classes=int(source.num_classes), mesh=mesh, num_train_steps=num_train_steps)
    teacher_cache = None
    if config.teacher.cache and step_lib.needs_teacher(config.kd):
        from facekd_jax.teachers import cache as cache_lib
        teacher_cache = cache_lib.open_cache(config_lib.teacher_cache_dir(config))
        teacher_cache.check_matches(train_spec, source, teacher_workdir=config.teacher.workdir,
                                    teacher_model=config.teacher.model,
                                    embedding_size=config.teacher.embedding_size)
    restored, _ = ckpt.restore_latest(run.abstract.as_dict())
    if restored is not None:
        state = step_lib.TrainState(**restored)
        log.info("resumed from step %d of %s", int(state.step), workdir)
    else:
        state = run.init_state()
    teacher_variables = teacher_load.load_teacher(run, teacher_cache)
    if val_targets is None:
        val_targets = load_val_targets(config) if config.data.val_targets else {}
    if process_index == 0:
        rundir.write_config(workdir, config)
    writer = metric_writers.create_default_writer(workdir, just_logging=process_index > 0)
    batches, _ = data_lib.make_train_dataset(
        train_spec, batch_size=config.batch_size // process_count, image_size=config.data.image_size,
        seed=config.seed, start_step=int(state.step), process_index=process_index, process_count=process_count,
        teacher_embeddings=teacher_cache.embeddings if teacher_cache is not None else None)
    return _Run(config=config, workdir=workdir, setup=run, state=state, start_step=int(state.step),
                batches=iter(batches), teacher_variables=teacher_variables, val_targets=val_targets, ckpt=ckpt,
                writer=writer, sync=sync)


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                        val_targets: Optional[Dict[str, Tuple[np.ndarray, np.ndarray]]],
                        sync: Optional[Callable[[], None]] = None) -> Dict[str, Any]:
    """The run in the local folder `workdir`; `sync` (a URL workdir's push) is called once each checkpoint or
    evaluation result is complete on disk."""
    r = _prepare(config, workdir, val_targets, sync)
    t0 = time.time()
    with _Preemption() as preemption:
        try:
            step, preempted = _loop(r, preemption)
            if not preempted:
                if r.val_targets and (not r.eval_results or config.eval_every_steps <= 0
                                      or step % config.eval_every_steps != 0):
                    r.evaluate(step)
                if r.val_targets and jax.process_index() == 0:
                    eval_lib.write_results(os.path.join(workdir, "eval"), r.eval_results, step=step)
                r.synced()
        except BaseException:
            r.ckpt.close(after_error=True)  # the error raised says what failed; closing must not replace it
            r.writer.flush()
            raise
        r.ckpt.close()
        r.writer.flush()
    if preempted:
        return {"step": step, "preempted": True, "metrics": r.last_metrics}
    return {"step": step, "metrics": r.last_metrics, "eval": r.eval_results, "num_classes": r.setup.num_classes,
            "train_seconds": time.time() - t0, "nonfinite_steps": int(r.state.nonfinite_steps)}


def _loop(r: _Run, preemption: "_Preemption") -> Tuple[int, bool]:
    """Trains from r.start_step to the last step, or to a preemption after saving a checkpoint of the step reached;
    returns (step, preempted). A NaN loss stops it (_check_finite) before any checkpoint holds the bad state."""
    config, mesh, total = r.config, r.setup.mesh, r.setup.num_train_steps
    pending = None  # metrics of the previous step, checked after the next one is dispatched (no pipeline stall)
    images_since, t_log = 0, time.time()
    step = r.start_step
    while step < total:
        batch = sharding.put_batch(next(r.batches), mesh)
        r.state, metrics = r.setup.train_step(r.state, batch, r.teacher_variables)
        step += 1
        images_since += config.batch_size
        if pending is not None:
            _check_finite(*pending, config)
        pending = (step, metrics)
        if step % config.log_every_steps == 0 or step == total:
            _check_finite(step, metrics, config)
            r.ckpt.check_for_errors()  # a failed background save stops the run here, with its cause
            r.last_metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
            ips = images_since / max(time.time() - t_log, 1e-9)
            eta = (total - step) * config.batch_size / max(ips, 1e-9)
            log.info("step %d/%d %s lr %.5f grad_norm %.3f | %.1f img/s | ETA %s", step, total,
                     _format_metrics(r.last_metrics), r.last_metrics["lr"], r.last_metrics["grad_norm"], ips,
                     time.strftime("%H:%M:%S", time.gmtime(eta)))
            r.writer.write_scalars(step, dict(r.last_metrics, images_per_second=ips))
            images_since, t_log = 0, time.time()
        if r.val_targets and config.eval_every_steps > 0 and step % config.eval_every_steps == 0:
            r.evaluate(step)
        if step % config.checkpoint_every_steps == 0 or step == total or preemption.requested:
            _check_finite(step, metrics, config)
            r.ckpt.save(step, r.state.as_dict(), r.meta(step), force=preemption.requested)
            if preemption.requested:
                r.ckpt.wait()
            r.synced()
        if preemption.requested:
            log.warning("preempted: checkpoint of step %d saved in %s", step, r.ckpt.directory)
            return step, True
    if pending is not None:
        _check_finite(*pending, config)
    return step, False


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

