"""The train step and everything it is built from: the train state, the run's models, their initialisation
directly in their shardings, and `setup(config)`, the one set-up that the training loop, the TPU plan, the tests
and the benchmarks share.

Data flow of one step (all inside one `jax.jit`, the state donated):
  images --student.apply(train)--> embeddings --margin head--> cosine --+
  images --teacher.apply(eval, frozen)--> teacher embeddings/cosine ----+--> kd_lib.compute_loss --> grads
  --> optax (facekd_jax.optimizer) --> new state, metrics
The global batch is sharded over the mesh's `data` axis, so XLA inserts the gradient all-reduce; the margin
head's class axis is sharded over `model` (facekd_jax.sharding), never gathered. With a teacher-embedding cache
the teacher's embeddings come with the batch and the teacher never runs.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Dict, Mapping, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from facekd_jax import kd as kd_lib
from facekd_jax import losses
from facekd_jax import models
from facekd_jax import optimizer as optimizer_lib
from facekd_jax import sharding

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
    kd_state: Optional[PyTree] = None   # {method: state} of stateful KD methods (kd_lib.init_kd_state), else None

    def as_dict(self) -> Dict[str, Any]:
        """The checkpointed dict (without kd_state when there is none: checkpoints of other runs stay readable)."""
        return {f: getattr(self, f) for f in self.__dataclass_fields__
                if not (f == "kd_state" and self.kd_state is None)}


# ----------------------------------------------------------------------------------------------- models


def model_layers(config, mesh) -> Dict[str, Any]:
    """The conv/norm layers handed to every model of the run, decided once from config.cpu_kernels ({} = flax's).

    facekd_jax.cpu (oneDNN kernels) is imported only when asked for; "xla" never touches it.
    """
    if config.cpu_kernels == "xla":
        return {}
    from facekd_jax import cpu
    return cpu.model_layers(config.cpu_kernels, num_devices=mesh.size, platform=mesh.devices.flat[0].platform)


def build_student(config, layers: Optional[Mapping[str, Any]] = None) -> nn.Module:
    return models.build_model(config.model, embedding_size=config.embedding_size, dropout=config.dropout,
                              dtype=config.dtype, image_size=config.data.image_size, head=config.head or None,
                              **(layers or {}))


def eval_apply(model: nn.Module) -> Callable[[PyTree, jax.Array], jax.Array]:
    """(variables, images) -> raw embeddings in eval mode: one function per model, on which evaluate's jitted
    embedding is cached (a fresh lambda per evaluation would compile every time)."""
    return lambda variables, images: model.apply(variables, images, train=False)


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
    """Whether the configured KD methods need a teacher at all (kd_lib.KD_METHODS says what each needs)."""
    return bool(kd_lib.kd_needs(kd))


def needs_teacher_head(kd) -> bool:
    return bool(kd_lib.kd_needs(kd) & {"teacher_cosine", "teacher_centres"})


def needs_teacher_embeddings(kd) -> bool:
    return bool(kd_lib.kd_needs(kd) & {"teacher_embeddings", "teacher_cosine"})


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
    in_teacher_space = kd_lib.kd_needs(config.kd) & {"teacher_embeddings", "teacher_centres"}
    if not in_teacher_space or e_s == e_t:
        return 0
    if not config.kd.projection:
        raise ValueError(
            f"embedding_size={e_s} differs from teacher.embedding_size={e_t}, and the KD terms "
            f"({', '.join(m.name for m in kd_lib.active_methods(config.kd))}) compare in the teacher's space: set "
            f"--config.embedding_size={e_t}, or --config.kd.projection=True for a training-only linear map")
    return e_t


def _state_init_fn(config, model: nn.Module, tx, num_classes: int, mesh) -> Callable[[jax.Array], TrainState]:
    def init(rng):
        k_init, k_state = jax.random.split(rng)
        variables = init_variables(model, num_classes, config.data.image_size, k_init, config.embedding_size,
                                   projection_size(config),
                                   padded_classes=sharding.head_classes(num_classes, mesh.shape["model"]))
        return TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                          batch_stats=variables["batch_stats"], opt_state=tx.init(variables["params"]),
                          rng=k_state, nonfinite_steps=jnp.zeros((), jnp.int32),
                          kd_state=kd_lib.init_kd_state(config.kd, num_classes, int(config.teacher.embedding_size)))
    return init


def abstract_state(config, model: nn.Module, tx, num_classes: int, mesh) -> TrainState:
    """ShapeDtypeStructs carrying the target shardings: what a checkpoint is restored into."""
    shapes = jax.eval_shape(_state_init_fn(config, model, tx, num_classes, mesh), jax.random.PRNGKey(config.seed))
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        shapes, sharding.tree_shardings(shapes, mesh))


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
    needs = kd_lib.kd_needs(kd)
    projection = projection_size(config)
    head = losses.MarginHead(num_classes=num_classes,
                             padded_classes=sharding.head_classes(num_classes, mesh.shape["model"]))
    margin = tuple(float(m) for m in config.margin_list)
    if config.nonfinite not in ("stop", "skip"):
        raise ValueError(f"config.nonfinite={config.nonfinite!r}: expected 'stop' or 'skip'")

    def loss_fn(params, state: TrainState, batch, teacher_variables, dropout_rng):
        images, labels = batch["image"], batch["label"]
        emb, new_model_state = student.apply(
            {"params": params["backbone"], "batch_stats": state.batch_stats}, images, train=True,
            mutable=["batch_stats"], rngs={"dropout": dropout_rng})
        t_vars = jax.lax.stop_gradient(teacher_variables)
        t_emb = t_cos = None
        if "teacher_embedding" in batch:
            t_emb = batch["teacher_embedding"]
        elif teacher is not None and needs_teacher_embeddings(kd):
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
        kd_state = kd_lib.update_kd_state(kd, state.kd_state, labels=labels, student_kd_embeddings=kd_emb,
                                          teacher_embeddings=t_emb)
        total, terms = kd_lib.compute_loss(
            kd, labels=labels, student_embeddings=emb, student_cosine=s_cos, teacher_embeddings=t_emb,
            teacher_cosine=t_cos, scale=config.scale, margin_list=margin, student_kd_embeddings=kd_emb,
            kd_state=kd_state)
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
    mesh = sharding.make_mesh(config.mesh.model_parallelism) if mesh is None else mesh
    steps = int(config.num_train_steps if num_train_steps is None else num_train_steps)
    layers = model_layers(config, mesh)
    student = build_student(config, layers)
    live_teacher = needs_teacher(config.kd) and not config.teacher.cache and needs_teacher_embeddings(config.kd)
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
    tx, schedule = optimizer_lib.make_optimizer(config, steps)
    abstract = abstract_state(config, student, tx, num_classes, mesh)
    step = make_train_step(config, student, teacher, tx, schedule, mesh, num_classes,
                           jax.tree.map(lambda a: a.sharding, abstract))
    return Setup(config=config, mesh=mesh, num_classes=num_classes, num_train_steps=steps, layers=layers,
                 student=student, teacher=teacher, tx=tx, schedule=schedule, abstract=abstract, train_step=step)


def replicated_abstract_variables(model: nn.Module, num_classes: Optional[int], image_size: int,
                                  embedding_size: int, mesh) -> Dict[str, PyTree]:
    """ShapeDtypeStructs of a model's {"params", "batch_stats"} (with its head when num_classes), replicated."""
    shapes = jax.eval_shape(functools.partial(init_variables, model, num_classes, image_size,
                                              embedding_size=embedding_size), jax.random.PRNGKey(0))
    replicated = NamedSharding(mesh, P())
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated), shapes)

