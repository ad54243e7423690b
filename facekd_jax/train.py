"""Training: TrainState, the pure sharded train step (ArcFace + KD), the optimiser, and the loop.

Data flow of one step (all inside one `jax.jit`, the state donated):
  images --student.apply(train)--> embeddings --margin head--> cosine --+
  images --teacher.apply(eval, frozen)--> teacher embeddings/cosine ----+--> losses.compute_loss --> grads
  --> optax (clip backbone, weight decay on kernels, SGD momentum) --> new state, metrics
The global batch is sharded over the mesh's `data` axis, so XLA inserts the gradient all-reduce; the margin
head's class axis is sharded over `model` (size 1 unless `mesh.model_parallelism` > 1), never gathered.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import signal
import time
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from facekd_jax import checkpoint as ckpt_lib
from facekd_jax import data as data_lib
from facekd_jax.data import sources as sources_lib
from facekd_jax import evaluate as eval_lib
from facekd_jax import losses
from facekd_jax import models
from facekd_jax import paths

log = logging.getLogger(__name__)

PyTree = Any


# ----------------------------------------------------------------------------------------------- state


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training; a pytree, so it can be jitted, donated and checkpointed.

    params: {"backbone": student params, "head": {"kernel": [E, C]}}; batch_stats: the student's BN stats;
    rng: a raw uint32 [2] key (per-step keys are fold_in(rng, step), so resuming reproduces them);
    nonfinite_steps: steps whose loss or gradient was NaN/Inf and whose update was therefore not applied.
    """
    step: jax.Array
    params: PyTree
    batch_stats: PyTree
    opt_state: PyTree
    rng: jax.Array
    nonfinite_steps: jax.Array
    kd_state: Optional[PyTree] = None   # {method: state} of stateful KD methods (losses.init_kd_state), else None

    def as_dict(self) -> Dict[str, Any]:
        """The checkpointed dict (without kd_state when there is none: checkpoints of other runs stay readable)."""
        return {f: getattr(self, f) for f in self.__dataclass_fields__
                if not (f == "kd_state" and self.kd_state is None)}


# ----------------------------------------------------------------------------------------------- mesh


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


# ----------------------------------------------------------------------------------------------- models


def model_layers(config, mesh) -> Dict[str, Any]:
    """The conv/norm layers handed to every model of the run, decided once from config.cpu_kernels ({} = flax's).

    facekd_jax.cpu (oneDNN kernels) is imported only when asked for; "xla" never touches it.
    """
    if config.cpu_kernels == "xla":
        return {}
    from facekd_jax import cpu
    return cpu.model_layers(config.cpu_kernels, num_devices=mesh.size)


def build_student(config, layers: Optional[Mapping[str, Any]] = None) -> nn.Module:
    return models.build_model(config.model, embedding_size=config.embedding_size, dropout=config.dropout,
                              dtype=config.dtype, image_size=config.data.image_size, head=config.head or None,
                              **(layers or {}))


def teacher_image_size(config) -> int:
    """The teacher's input side: its own where the model fixes one (dlib_resnet29: 150), else the student's."""
    return models.FIXED_IMAGE_SIZES.get(config.teacher.model, config.data.image_size)


def build_teacher(config, layers: Optional[Mapping[str, Any]] = None) -> Optional[nn.Module]:
    if not config.teacher.model:
        return None
    return models.build_model(config.teacher.model, embedding_size=config.teacher.embedding_size,
                              dtype=config.dtype, image_size=teacher_image_size(config),
                              head=config.teacher.head or None, **(layers or {}))


def needs_teacher(kd) -> bool:
    """Whether the configured KD methods need a teacher at all (losses.KD_METHODS says what each needs)."""
    return bool(losses.kd_needs(kd))


def _needs_teacher_head(kd) -> bool:
    return bool(losses.kd_needs(kd) & {"teacher_cosine", "teacher_centres"})


def _needs_teacher_embeddings(kd) -> bool:
    return bool(losses.kd_needs(kd) & {"teacher_embeddings", "teacher_cosine"})


# ----------------------------------------------------------------------------------------------- optimiser


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


# ----------------------------------------------------------------------------------------------- init


def init_variables(model: nn.Module, num_classes: Optional[int], image_size: int, rng,
                   embedding_size: int, projection_size: int = 0, padded_classes: int = 0) -> Dict[str, PyTree]:
    """{"params": {"backbone", "head"[, "projection"]}, "batch_stats"} for a model, (when num_classes) its margin
    head (padded_classes columns where larger: head_classes) and (when projection_size) the training-only linear
    map of its embedding into the teacher's space."""
    k_model, k_drop, k_head, k_proj = jax.random.split(rng, 4)
    dummy = jnp.zeros((2, image_size, image_size, 3), jnp.float32)
    variables = model.init({"params": k_model, "dropout": k_drop}, dummy, train=False)
    params = {"backbone": variables["params"]}
    emb = jnp.zeros((2, embedding_size), jnp.float32)
    if num_classes:
        params["head"] = losses.MarginHead(num_classes=num_classes, padded_classes=padded_classes).init(
            k_head, emb)["params"]
    if projection_size:
        params["projection"] = _projection(projection_size).init(k_proj, emb)["params"]
    return {"params": params, "batch_stats": variables.get("batch_stats", {})}


def _projection(size: int) -> nn.Module:
    """Student embedding [B, E_s] -> [B, E_t] (no bias): what feature terms and teacher centres see when the
    sizes differ (kd.projection). Training only: never part of an evaluated or exported student."""
    return nn.Dense(size, use_bias=False, dtype=jnp.float32, param_dtype=jnp.float32)


def projection_size(config) -> int:
    """E_t when the student's embedding goes through a projection into the teacher's space, else 0.

    Raises ValueError where sizes differ, the KD methods compare in the teacher's space, and kd.projection is off.
    """
    e_s, e_t = int(config.embedding_size), int(config.teacher.embedding_size)
    in_teacher_space = losses.kd_needs(config.kd) & {"teacher_embeddings", "teacher_centres"}
    if not in_teacher_space or e_s == e_t:
        return 0
    if not config.kd.projection:
        raise ValueError(
            f"embedding_size={e_s} differs from teacher.embedding_size={e_t}, and the KD terms "
            f"({', '.join(m.name for m in losses.active_methods(config.kd))}) compare in the teacher's space: set "
            f"--config.embedding_size={e_t}, or --config.kd.projection=True for a training-only linear map")
    return e_t


def _state_init_fn(config, model: nn.Module, tx, num_classes: int, mesh) -> Callable[[jax.Array], TrainState]:
    def init(rng):
        k_init, k_state = jax.random.split(rng)
        variables = init_variables(model, num_classes, config.data.image_size, k_init, config.embedding_size,
                                   projection_size(config),
                                   padded_classes=head_classes(num_classes, mesh.shape["model"]))
        return TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                          batch_stats=variables["batch_stats"], opt_state=tx.init(variables["params"]),
                          rng=k_state, nonfinite_steps=jnp.zeros((), jnp.int32),
                          kd_state=losses.init_kd_state(config.kd, num_classes, int(config.teacher.embedding_size)))
    return init


def abstract_state(config, model: nn.Module, tx, num_classes: int, mesh) -> TrainState:
    """ShapeDtypeStructs carrying the target shardings: what a checkpoint is restored into."""
    shapes = jax.eval_shape(_state_init_fn(config, model, tx, num_classes, mesh), jax.random.PRNGKey(config.seed))
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        shapes, tree_shardings(shapes, mesh))


def create_train_state(config, model: nn.Module, tx, num_classes: int, mesh) -> TrainState:
    """Initialises the state directly in its shardings (no host copy of the full parameters)."""
    init = _state_init_fn(config, model, tx, num_classes, mesh)
    abstract = abstract_state(config, model, tx, num_classes, mesh)
    rng = jax.random.PRNGKey(config.seed)
    lowered = jax.jit(init, out_shardings=jax.tree.map(lambda a: a.sharding, abstract)).lower(rng)
    # Init runs once: on CPU, XLA's optimisation passes cost 3x the compile time of the RNG-heavy init for nothing.
    options = ({"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
               if jax.default_backend() == "cpu" else {})
    return lowered.compile(compiler_options=options)(rng)


# ----------------------------------------------------------------------------------------------- step


def make_train_step(config, student: nn.Module, teacher: Optional[nn.Module], tx, schedule, mesh,
                    num_classes: int, state_sharding: PyTree) -> Callable:
    """Returns the jitted `train_step(state, batch, teacher_variables) -> (state, metrics)`.

    batch: {"image", "label"[, "teacher_embedding" float [B, E_t]]}. With "teacher_embedding" (from a
    teacher-embedding cache, through the input pipeline) the teacher never runs; else `teacher` runs on the images.
    teacher_variables: {"params": {"backbone"?, "head"?}, "batch_stats"?} of the frozen teacher, "head" its class
    centres [E_t, C] where a method needs them (or {} without KD). It is an argument, never donated and never
    differentiated, so the teacher cannot change.
    """
    kd = config.kd
    needs = losses.kd_needs(kd)
    projection = projection_size(config)
    head = losses.MarginHead(num_classes=num_classes,
                             padded_classes=head_classes(num_classes, mesh.shape["model"]))
    margin = tuple(float(m) for m in config.margin_list)
    if config.nonfinite not in ("stop", "skip"):
        raise ValueError(f"config.nonfinite={config.nonfinite!r}: expected 'stop' or 'skip'")
    debug_nan_step = int(config.get("debug_nan_step", -1))

    def loss_fn(params, state: TrainState, batch, teacher_variables, dropout_rng):
        images, labels = batch["image"], batch["label"]
        emb, new_model_state = student.apply(
            {"params": params["backbone"], "batch_stats": state.batch_stats}, images, train=True,
            mutable=["batch_stats"], rngs={"dropout": dropout_rng})
        t_vars = jax.lax.stop_gradient(teacher_variables)
        t_emb = t_cos = None
        if "teacher_embedding" in batch:
            t_emb = batch["teacher_embedding"]
        elif teacher is not None and _needs_teacher_embeddings(kd):
            t_emb = teacher.apply({"params": t_vars["params"]["backbone"], "batch_stats": t_vars["batch_stats"]},
                                  images, train=False)
        if t_emb is not None and "embedding_mean" in t_vars:  # config.teacher.centre
            t_emb = losses.l2_normalize(t_emb) - t_vars["embedding_mean"]
        if t_emb is not None and "teacher_cosine" in needs:
            t_cos = head.apply({"params": t_vars["params"]["head"]}, t_emb)
        # The student's embedding in the teacher's space: itself, or through the training-only projection.
        kd_emb = _projection(projection).apply({"params": params["projection"]}, emb) if projection else emb
        if kd.teacher_centres:
            s_cos = head.apply({"params": t_vars["params"]["head"]}, kd_emb)
        else:
            s_cos = head.apply({"params": params["head"]}, emb)
        kd_state = losses.update_kd_state(kd, state.kd_state, labels=labels, student_kd_embeddings=kd_emb,
                                          teacher_embeddings=t_emb)
        total, terms = losses.compute_loss(
            kd, labels=labels, student_embeddings=emb, student_cosine=s_cos, teacher_embeddings=t_emb,
            teacher_cosine=t_cos, scale=config.scale, margin_list=margin, student_kd_embeddings=kd_emb,
            kd_state=kd_state)
        if debug_nan_step >= 0:  # test hook: poison one step's loss
            total = total * jnp.where(state.step == debug_nan_step, jnp.nan, 1.0)
            terms = dict(terms, total=total)
        return total, (terms, new_model_state["batch_stats"], kd_state)

    def train_step(state: TrainState, batch, teacher_variables):
        dropout_rng = jax.random.fold_in(state.rng, state.step)
        grads, (terms, new_bs, new_kd_state) = jax.grad(loss_fn, has_aux=True)(
            state.params, state, batch, teacher_variables, dropout_rng)
        updates, new_opt = tx.update(grads, state.opt_state, state.params)
        new_params = optax.apply_updates(state.params, updates)
        grad_norm = optax.tree.norm(grads["backbone"])
        finite = jnp.isfinite(terms["total"]) & jnp.isfinite(grad_norm)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
        # A skipped step keeps the moments but still advances optax's step counters (its integer scalars), so the
        # schedule stays at state.step: the lr logged below is the one the next applied update uses.
        keep_opt = lambda new, old: jax.tree.map(  # noqa: E731
            lambda n, o: n if jnp.issubdtype(n.dtype, jnp.integer) and n.ndim == 0 else jnp.where(finite, n, o),
            new, old)
        new_state = state.replace(
            step=state.step + 1, params=keep(new_params, state.params), batch_stats=keep(new_bs, state.batch_stats),
            opt_state=keep_opt(new_opt, state.opt_state), kd_state=keep(new_kd_state, state.kd_state),
            nonfinite_steps=state.nonfinite_steps + (~finite).astype(jnp.int32))
        metrics = dict(terms, grad_norm=grad_norm, lr=schedule(state.step), finite=finite,
                       nonfinite_steps=new_state.nonfinite_steps)
        return new_state, metrics

    # The batch arrives sharded on `data` and the state keeps its shardings, so XLA adds the gradient
    # all-reduce over `data` itself (no pmean by hand); metrics come back replicated.
    return jax.jit(train_step, donate_argnums=(0,),
                   out_shardings=(state_sharding, NamedSharding(mesh, P())))


# ----------------------------------------------------------------------------------------------- setup


@dataclasses.dataclass
class Setup:
    """Everything a run builds from its config before the first step: the one set-up that the loop, the tests and
    the benchmarks share (`setup`)."""
    config: ml_collections.ConfigDict
    mesh: jax.sharding.Mesh
    num_classes: int
    num_train_steps: int
    layers: Dict[str, Any]           # conv/norm handed to the models ({} = flax's)
    student: nn.Module
    teacher: Optional[nn.Module]     # run live on the images; None without KD or with a teacher cache
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    abstract: TrainState             # ShapeDtypeStructs with the target shardings (what a checkpoint restores into)
    train_step: Callable             # jitted (state, batch, teacher_variables) -> (state, metrics)

    def init_state(self) -> TrainState:
        return create_train_state(self.config, self.student, self.tx, self.num_classes, self.mesh)


def setup(config, *, num_classes: int, mesh=None, num_train_steps: Optional[int] = None) -> Setup:
    """Models (with the layers config.cpu_kernels picks, decided once here), optimiser, abstract state and the
    jitted train step for `config` on `mesh` (default: all devices, config.mesh.model_parallelism)."""
    mesh = make_mesh(config.mesh.model_parallelism) if mesh is None else mesh
    steps = int(config.num_train_steps if num_train_steps is None else num_train_steps)
    layers = model_layers(config, mesh)
    student = build_student(config, layers)
    live_teacher = needs_teacher(config.kd) and not config.teacher.cache and _needs_teacher_embeddings(config.kd)
    teacher = None
    if needs_teacher(config.kd):
        if not config.teacher.model and not config.teacher.cache:
            raise ValueError("config.kd has KD terms but neither config.teacher.model nor config.teacher.cache is set")
        if live_teacher:
            if teacher_image_size(config) != config.data.image_size:
                raise ValueError(
                    f"teacher {config.teacher.model!r} takes {teacher_image_size(config)}x{teacher_image_size(config)} "
                    f"inputs with its own crop, the student {config.data.image_size}x{config.data.image_size}: build a "
                    "teacher-embedding cache (python -m facekd_jax.teachers cache) and pass --config.teacher.cache=DIR")
            teacher = build_teacher(config, layers)
    projection_size(config)  # fails early, naming the fields, where embedding sizes cannot be compared
    tx, schedule = make_optimizer(config, steps)
    abstract = abstract_state(config, student, tx, num_classes, mesh)
    step = make_train_step(config, student, teacher, tx, schedule, mesh, num_classes,
                           jax.tree.map(lambda a: a.sharding, abstract))
    return Setup(config=config, mesh=mesh, num_classes=num_classes, num_train_steps=steps, layers=layers,
                 student=student, teacher=teacher, tx=tx, schedule=schedule, abstract=abstract, train_step=step)


# ----------------------------------------------------------------------------------------------- teacher


def replicated_abstract_variables(model: nn.Module, num_classes: Optional[int], image_size: int,
                                  embedding_size: int, mesh) -> Dict[str, PyTree]:
    """ShapeDtypeStructs of a model's {"params", "batch_stats"} (with its head when num_classes), replicated."""
    shapes = jax.eval_shape(functools.partial(init_variables, model, num_classes, image_size,
                                              embedding_size=embedding_size), jax.random.PRNGKey(0))
    replicated = NamedSharding(mesh, P())
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated), shapes)


def load_teacher(run: Setup, cache=None) -> Dict[str, PyTree]:
    """The frozen teacher's variables the train step needs, replicated on the run's mesh ({} without KD).

    With config.teacher.cache: only the class centres where a method needs them (the cache's per-identity means,
    facekd_jax.teachers.cache; `cache` is the already opened one, if any); the embeddings come with each batch.
    Otherwise restored from teacher.workdir:
    the backbone (and batch stats) where the teacher runs live, the margin head where centres are needed.
    """
    config, mesh = run.config, run.mesh
    if not needs_teacher(config.kd):
        return {}
    replicated = NamedSharding(mesh, P())
    want_head = _needs_teacher_head(config.kd)
    if config.teacher.centre and not config.teacher.cache:
        raise ValueError("config.teacher.centre=True takes the teacher's mean embedding from its cache: give "
                         "--config.teacher.cache=DIR (python -m facekd_jax.teachers cache)")
    if config.teacher.cache:
        if cache is None:
            from facekd_jax.teachers import cache as cache_lib
            cache = cache_lib.open_cache(config.teacher.cache)
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
    abstract: Dict[str, PyTree] = {"params": {}}
    if run.teacher is not None:
        shapes = replicated_abstract_variables(run.teacher, None, teacher_image_size(config),
                                               config.teacher.embedding_size, mesh)
        abstract = {"params": dict(shapes["params"]), "batch_stats": shapes["batch_stats"]}
    if want_head:  # as the teacher saved it: padded for the teacher run's own model axis (head_classes)
        abstract["params"]["head"] = {"kernel": jax.ShapeDtypeStruct(
            (int(config.teacher.embedding_size), head_classes(run.num_classes, _saved_model_parallelism(workdir))),
            jnp.float32, sharding=replicated)}
    try:
        variables, meta = ckpt_lib.restore_variables(workdir, abstract, which=config.teacher.checkpoint)
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
    if want_head:
        variables["params"]["head"] = {"kernel": _shard_centres(variables["params"]["head"]["kernel"], run)}
    return variables


def _saved_model_parallelism(workdir: str) -> int:
    """mesh.model_parallelism of the run in `workdir` (its config.json; 1 where it has none)."""
    try:
        with open(os.path.join(workdir, "config.json")) as f:
            return int(json.load(f).get("mesh", {}).get("model_parallelism", 1))
    except (OSError, ValueError):
        return 1


def _shard_centres(centres, run: Setup) -> jax.Array:
    """Teacher class centres [E_t, >= C] (a cache's, or a teacher head padded for its own run) -> the first C
    columns padded with zeros to the student head's column count, sharded like the student's head over `model`
    (never gathered: the head slices its cosines to C)."""
    centres = np.asarray(centres, np.float32)[:, :run.num_classes]
    columns = head_classes(run.num_classes, run.mesh.shape["model"])
    centres = np.pad(centres, ((0, 0), (0, columns - centres.shape[1])))
    return jax.device_put(centres, NamedSharding(run.mesh, P(None, "model")))


# ----------------------------------------------------------------------------------------------- loop


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


class NonFiniteLossError(FloatingPointError):
    pass


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


def resolve_spec(spec: str, config) -> str:
    """Data specs may say `{root}` for config.data.root."""
    return spec.format(root=os.path.expanduser(config.data.root)) if "{root}" in spec else spec


def _check_train_spec(spec: str, key: str) -> None:
    kind, _, rest = spec.partition(":")
    if kind in sources_lib.PATH_KINDS and rest and not paths.is_url(rest):
        path = rest.split("@")[0]
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"{key}={spec!r}: {path} does not exist. For the thesis setup download insightface's "
                "faces_webface_112x112 (CASIA-WebFace: train.rec, train.idx, property, lfw.bin, agedb_30.bin, "
                "cfp_fp.bin) and pass --config.data.root=THAT_DIR, or run a smoke test with "
                "--config=configs/NAME.py:smoke (synthetic data).")


def load_val_targets(config) -> Dict[str, Tuple[np.ndarray, np.ndarray]]:
    targets = {}
    for spec in config.data.val_targets:
        spec = resolve_spec(spec, config)
        name = data_lib.verification_name(spec)
        targets[name] = data_lib.load_verification(spec, image_size=config.data.image_size)
        log.info("verification set %s: %d pairs from %s", name, len(targets[name][1]), spec)
    return targets


def _eval_apply(model):
    return lambda variables, images: model.apply(variables, images, train=False)


def _format_metrics(metrics: Mapping[str, float]) -> str:
    order = ["total", "ce", *(m.name for m in losses.KD_METHODS if m.loss is not None)]
    parts = [f"{k} {metrics[k]:.4f}" for k in order if k in metrics]
    return " ".join(parts)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       val_targets: Optional[Dict[str, Tuple[np.ndarray, np.ndarray]]] = None) -> Dict[str, Any]:
    """Trains the configured student (with KD when configured); returns the final metrics and eval results.

    The workdir is locked for the run (checkpoint.WorkdirLock); resuming a workdir whose config.json differs
    from `config` stops before anything is touched (ConfigMismatchError, check_resumable). val_targets: the
    verification sets load_val_targets(config) returns, when the caller already holds them (the suite loads them
    once for all its runs); None loads them here."""
    check_data_urls(config)
    init_distributed(config.distributed)
    if paths.is_url(workdir):  # mirrored in a local folder, pushed after every checkpoint (facekd_jax.paths)
        _single_host_for_url(workdir)
        with paths.RemoteWorkdir(workdir) as stage:
            try:
                check_resumable(config, stage.local)
            except ConfigMismatchError as e:  # name the URL the user gave, not the mirror
                raise ConfigMismatchError(str(e).replace(stage.local, workdir)) from None
            return _train_and_evaluate(config, stage.local, val_targets, sync=stage.push)
    os.makedirs(workdir, exist_ok=True)
    with ckpt_lib.WorkdirLock(workdir):
        check_resumable(config, workdir)
        return _train_and_evaluate(config, workdir, val_targets)


def _single_host_for_url(workdir: str) -> None:
    if jax.process_count() > 1:
        raise NonLocalPathError(
            f"--workdir={workdir}: a multi-host run writes its checkpoint shards from every host, so its workdir "
            "must be one folder all hosts see: mount the bucket (gcsfuse) and give the mounted path")


class ConfigMismatchError(ValueError):
    """The workdir holds a run trained with another config."""


class NonLocalPathError(ValueError):
    """A URL (gs://, s3://, ...) in a data spec that cannot take one (`check_data_urls`)."""


def check_data_urls(config: ml_collections.ConfigDict) -> None:
    """Raises NonLocalPathError naming the field and the way out, before anything is created, for the data specs
    that cannot take a URL: `pairs:PAIRS_TXT:IMAGES_DIR` (a URL's colons cannot be told from the separator) and
    `tfds:DIR` (give `tfds:NAME` with TFDS_DATA_DIR in the bucket). Every other path may be a URL (facekd_jax.paths):
    the workdir (mirrored), teacher.workdir and teacher.cache, folder/lfw/recordio data and bin/lfw verification
    sets (local copies, data.sources.local_spec), tfrecord globs (read by TensorFlow in place)."""
    fields = {"config.data.train": resolve_spec(str(config.data.train or ""), config)}
    fields.update({f"config.data.val_targets[{i}]": resolve_spec(v, config)
                   for i, v in enumerate(config.data.val_targets)})
    for field, value in fields.items():
        if str(value).split(":", 1)[0] in ("pairs", "tfds") and "://" in str(value):
            raise NonLocalPathError(
                f"{field}={value}: a pairs: or tfds: spec must name local paths (pairs: separates its two paths "
                "with ':'; for TFDS give tfds:NAME and TFDS_DATA_DIR=gs://...); copy the files to this machine's "
                "disk (gsutil -m cp -r), or mount the bucket (gcsfuse gs://BUCKET /mnt/BUCKET, or Drive on Colab) "
                "and give the mounted path")


# Fields a resumed run may change: how long, how often, where it evaluates, how it runs. Every other field
# (architecture, data, loss, optimiser, seed, batch) must equal the run's config.json to resume it.
RESUME_FREE_FIELDS = ("num_train_steps", "num_epochs", "log_every_steps", "eval_every_steps", "eval_batch_size",
                      "checkpoint_every_steps", "keep_checkpoints", "async_checkpoints", "best_metric",
                      "data.val_targets", "data.root", "cpu_kernels", "mesh.", "distributed.", "debug_",
                      "nonfinite")


def _flat(tree: Mapping[str, Any], prefix: str = "") -> Dict[str, Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_differences(config: ml_collections.ConfigDict, saved: Mapping[str, Any]) -> Dict[str, Tuple[Any, Any]]:
    """{field: (the run's value, the new value)} for the fields outside RESUME_FREE_FIELDS that differ."""
    new, old = _flat(json.loads(config.to_json_best_effort())), _flat(saved)
    free = lambda k: any(k == f or (f.endswith((".", "_")) and k.startswith(f)) for f in RESUME_FREE_FIELDS)
    return {k: (old.get(k, "<absent>"), new.get(k, "<absent>")) for k in sorted(set(new) | set(old))
            if not free(k) and old.get(k, "<absent>") != new.get(k, "<absent>")}


def check_resumable(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Raises ConfigMismatchError, naming the fields, when `workdir` holds checkpoints of a run whose config.json
    differs from `config` (a changed architecture would not restore; a changed loss or data would not be the
    same run). Nothing in the workdir is read beyond config.json or changed."""
    path = os.path.join(workdir, "config.json")
    has_checkpoints = any(os.path.isdir(os.path.join(workdir, d)) and any(
        n.isdigit() for n in os.listdir(os.path.join(workdir, d))) for d in ("checkpoints", "best"))
    if not has_checkpoints or not os.path.exists(path):
        return
    try:
        with open(path) as f:
            saved = json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigMismatchError(f"{path}: unreadable run config ({e}); the workdir holds checkpoints of a run "
                                  "whose config cannot be compared: use another --workdir") from e
    diff = config_differences(config, saved)
    if diff:
        shown = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in list(diff.items())[:8])
        back = " ".join(f"--config.{k}={old!r}" for k, (old, _) in list(diff.items())[:8] if old != "<absent>")
        raise ConfigMismatchError(
            f"{workdir} holds a run trained with another config ({path}); {len(diff)} field(s) differ: {shown}"
            f"{' ...' if len(diff) > 8 else ''}. Nothing was changed. To resume that run, use its values "
            f"({back}); to train with the new config, give another --workdir.")


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                        val_targets: Optional[Dict[str, Tuple[np.ndarray, np.ndarray]]],
                        sync: Optional[Callable[[], None]] = None) -> Dict[str, Any]:
    """The run in the local folder `workdir`; `sync` (a URL workdir's push) is called once each checkpoint or
    evaluation result is complete on disk."""
    from clu import metric_writers  # imported here: tensorboard is slow to import

    mesh = make_mesh(config.mesh.model_parallelism)
    process_count, process_index = jax.process_count(), jax.process_index()
    if config.batch_size % mesh.shape["data"] or config.batch_size % process_count:
        raise ValueError(f"config.batch_size={config.batch_size} must be divisible by the data-parallel "
                         f"device count {mesh.shape['data']} and the process count {process_count}")

    train_spec = resolve_spec(config.data.train, config)
    _check_train_spec(train_spec, "config.data.train")
    ckpt = ckpt_lib.Checkpointer(workdir, max_to_keep=config.keep_checkpoints,
                                 best_metric=config.best_metric or None, async_save=config.async_checkpoints)

    # The head needs the number of classes before the state (and so the resume step) exists.
    source = data_lib.open_source(train_spec, image_size=config.data.image_size)
    info = {"num_classes": source.num_classes, "num_images": int(source.num_images), "synthetic": source.synthetic}
    num_classes = int(info["num_classes"])
    num_train_steps = int(config.num_train_steps)
    if num_train_steps <= 0:
        num_train_steps = int(math.ceil(config.num_epochs * info["num_images"] / config.batch_size))

    run = setup(config, num_classes=num_classes, mesh=mesh, num_train_steps=num_train_steps)
    student, train_step = run.student, run.train_step
    teacher_embeddings = teacher_cache = None
    if config.teacher.cache and needs_teacher(config.kd):
        from facekd_jax.teachers import cache as cache_lib
        teacher_cache = cache_lib.open_cache(config.teacher.cache)
        teacher_cache.check_matches(train_spec, source, teacher_workdir=config.teacher.workdir,
                                    teacher_model=config.teacher.model,
                                    embedding_size=config.teacher.embedding_size)
        teacher_embeddings = teacher_cache.embeddings

    restored, meta = ckpt.restore_latest(run.abstract.as_dict())
    if restored is not None:
        state = TrainState(**restored)
        log.info("resumed from step %d of %s", int(state.step), workdir)
    else:
        state = run.init_state()
    start_step = int(state.step)

    teacher_variables = load_teacher(run, teacher_cache)
    if val_targets is None:
        val_targets = load_val_targets(config) if config.data.val_targets else {}
    # One apply function for the run: evaluate's jitted embed is cached on it, so periodic evaluations compile once.
    eval_apply = _eval_apply(student)

    if process_index == 0:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))
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
                batch = put_batch(next(batches), mesh)
                state, metrics = train_step(state, batch, teacher_variables)
                step += 1
                images_since += config.batch_size
                if config.debug_step_sleep:
                    time.sleep(config.debug_step_sleep)
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


# ----------------------------------------------------------------------------------------------- eval mode


# What a checkpoint's shapes depend on: evaluation takes these from the run itself (WORKDIR/config.json).
ARCHITECTURE_FIELDS = ("model", "embedding_size", "head", "data.image_size")


def trained_architecture(config: ml_collections.ConfigDict, workdir: str) -> ml_collections.ConfigDict:
    """config with the architecture fields of the run in workdir (its config.json), where they differ.

    A checkpoint restores only into the architecture it was trained with, so `--mode=eval` of, e.g., a suite
    run (32x32, 256-d) with the experiment's own config file (112x112, 512-d) evaluates what was trained and
    says so, instead of failing on mismatched shapes. The verification sets and batch size stay the caller's.
    """
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        return config
    try:
        with open(path) as f:
            saved = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: unreadable run config ({e}); fix or remove it to evaluate with the given "
                         f"config") from e
    config = ml_collections.ConfigDict(config.to_dict())
    for field in ARCHITECTURE_FIELDS:
        *parents, leaf = field.split(".")
        have, node = saved, config
        for part in parents:
            have, node = have.get(part, {}), node[part]
        if leaf in have and have[leaf] != node[leaf]:
            log.warning("eval: %s=%r from %s (the command line's config says %r)", field, have[leaf], path,
                        node[leaf])
            node[leaf] = type(node[leaf])(have[leaf])
    return config


def evaluate_workdir(config: ml_collections.ConfigDict, workdir: str, *, which: str = "latest") -> Dict[str, Any]:
    """Evaluates a run's latest (or best) checkpoint on config.data.val_targets; writes WORKDIR/eval/.

    The architecture comes from the run (`trained_architecture`); the verification sets from `config`.
    """
    check_data_urls(config)
    if paths.is_url(workdir):  # a local copy, then the eval files pushed back (no lock: training may go on)
        _single_host_for_url(workdir)
        with paths.RemoteWorkdir(workdir, local=paths.staging_dir(workdir) + "-eval", lock=False) as stage:
            return evaluate_workdir(config, stage.local, which=which)
    config = trained_architecture(config, workdir)
    mesh = make_mesh(1)
    student = build_student(config, model_layers(config, mesh))  # the run's kernels (XLA:CPU's depthwise is slow)
    abstract = replicated_abstract_variables(student, None, config.data.image_size, config.embedding_size, mesh)
    variables, meta = ckpt_lib.restore_variables(workdir, abstract, which=which)
    step = int(meta.get("step", 0))
    targets = load_val_targets(config)
    if not targets:
        raise ValueError("config.data.val_targets is empty: nothing to evaluate")
    results = eval_lib.evaluate_targets(
        _eval_apply(student), {"params": variables["params"]["backbone"], "batch_stats": variables["batch_stats"]},
        targets, step=step, batch_size=config.eval_batch_size, mesh=mesh, log=print)
    if jax.process_index() == 0:
        eval_lib.write_results(os.path.join(workdir, "eval"), results, step=step)
    return {"step": step, "results": results}
