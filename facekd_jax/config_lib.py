"""The default config and the variant syntax shared by every file in configs/ (so those files work from any
directory, after a plain `pip install`).

A config file is `get_config(arg)`; `arg` is what follows the colon in `--config=FILE.py:ARG`, as big_vision
writes it: comma-separated parts, each a variant name (VARIANTS) or a `key=value` override of a (dotted) field,
applied left to right after the experiment's own settings:

  --config=configs/feature_kd.py                    the experiment as written
  --config=configs/feature_kd.py:smoke              the same on synthetic data at toy size (about a minute)
  --config=configs/feature_kd.py:smoke,seed=1       the same, seed 1
  --config=configs/feature_kd.py:smoke,model=resnet20,batch_size=32
  --config=configs/conventional_kd.py:lfw_dlib,data.root=../shared/data/lfw   one run of the real-teacher suite

The comparison suites (facekd_jax.suite) build every model of a table from one of these variants (`demo`, `lfw`,
`lfw_dlib`, or `tiny` in the tests and the notebooks' smoke mode), so a suite run and a run of main with the same
variant train the same thing.

Values are Python literals where they parse as one (numbers, tuples, True), else strings.
"""
from __future__ import annotations

import ast
from typing import Any, Callable, Dict

import ml_collections

from facekd_jax.losses import KD_DEFAULTS


def default_config() -> ml_collections.ConfigDict:
    """The thesis's ResNet-56 student with ArcFace on CASIA-WebFace (insightface format), no KD."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    # Student model (facekd_jax.models.build_model).
    c.model = "resnet56"
    c.embedding_size = 512
    c.head = ""              # "" = the model's default head ("gap" for resnet18/56, "flatten" for iresnet)
    c.dropout = 0.0
    c.dtype = "float32"      # "bfloat16": bf16 compute, fp32 parameters
    # Layers on a CPU (facekd_jax.cpu): "auto" = oneDNN kernels on a single-device CPU where the [cpu] extra is
    # installed, "onednn" = require them, "xla" = flax's layers everywhere. GPUs and TPUs always get flax's.
    c.cpu_kernels = "auto"
    # Margin head (arcface_torch names): ArcFace (1, 0.5, 0), CosFace (1, 0, 0.4).
    c.margin_list = (1.0, 0.5, 0.0)
    c.scale = 64.0

    c.batch_size = 512       # global, over all devices and processes
    c.num_epochs = 34        # used when num_train_steps <= 0
    c.num_train_steps = -1
    c.optimizer = ml_collections.ConfigDict(dict(
        lr=0.1, momentum=0.9, nesterov=False, weight_decay=5e-4, grad_clip=5.0, head_lr_multiplier=1.0,
        schedule="step",                      # "step" | "poly" | "constant"
        step_fractions=(20 / 34, 28 / 34, 32 / 34), decay_factor=0.1,   # CASIA-WebFace: epochs 20, 28, 32 of 34
        warmup_steps=0, power=1.0, end_lr_factor=0.0))                   # poly (arcface_torch)

    c.data = ml_collections.ConfigDict()
    c.data.root = "~/data/faces_webface_112x112"
    c.data.train = "recordio:{root}"
    # A tuple, so the command line can override it: --config.data.val_targets="('bin:/x/lfw.bin',)"
    c.data.val_targets = ("bin:{root}/lfw.bin", "bin:{root}/agedb_30.bin", "bin:{root}/cfp_fp.bin")
    c.data.image_size = 112

    # The frozen teacher a KD run distils from: a finished run of configs/teacher_resnet18.py, or an imported
    # one (python -m facekd_jax.teachers import dlib). `cache`: a teacher-embedding cache
    # (python -m facekd_jax.teachers cache); with it the teacher never runs during training.
    # `centre`: the KD terms see the teacher's unit embeddings minus their mean over the cache (and centres made
    # from those): needed where a teacher's embeddings share one direction (dlib's); needs `cache`.
    c.teacher = ml_collections.ConfigDict(dict(model="", embedding_size=512, head="", workdir="",
                                               checkpoint="latest", cache="", centre=False))
    # Loss = ce_weight * ArcFace CE + the weighted KD terms; the keys and their meaning come from the registry
    # facekd_jax.losses.KD_METHODS (one entry per method).
    c.kd = ml_collections.ConfigDict(dict(KD_DEFAULTS))

    c.mesh = ml_collections.ConfigDict(dict(model_parallelism=1))
    # Multi-host: jax.distributed.initialize(); on Cloud TPU / SLURM the empty fields are auto-detected.
    c.distributed = ml_collections.ConfigDict(dict(enabled=False, coordinator_address="", num_processes=0,
                                                   process_id=-1))
    c.log_every_steps = 100
    c.eval_every_steps = 2000          # arcface_torch's verbose=2000
    c.eval_batch_size = 256
    c.checkpoint_every_steps = 1000
    c.keep_checkpoints = 3
    c.async_checkpoints = True
    c.best_metric = "lfw/accuracy"     # "" to keep no best checkpoint
    c.nonfinite = "stop"               # "stop": fail with the step and term; "skip": skip the update, count it
    c.debug_nan_step = -1              # tests: poison the loss at this step
    c.debug_step_sleep = 0.0           # tests: seconds to sleep after each step (to kill a run mid-way)
    return c


def _smoke(c: ml_collections.ConfigDict) -> None:
    """Synthetic data at 32x32, 60 steps of 64: about a minute on 2 CPU cores; shows the machinery, not a result."""
    c.data.train = "synthetic:32:32"
    c.data.val_targets = ("synthetic:200",)
    c.data.image_size = 32
    c.embedding_size = 64
    c.teacher.embedding_size = 64
    c.batch_size = 64
    c.num_train_steps = 60
    c.optimizer.schedule = "constant"
    c.optimizer.lr = 0.05
    c.log_every_steps = 10
    c.eval_every_steps = 30
    c.eval_batch_size = 200
    c.checkpoint_every_steps = 30
    c.best_metric = "synthetic/accuracy"
    if c.teacher.workdir:
        c.teacher.workdir = "runs/smoke_teacher"


def _tiny(c: ml_collections.ConfigDict) -> None:
    """The unit tests' size: seconds to compile and run on 2 CPU cores (resnet8 student, resnet10 teacher, 16x16)."""
    _smoke(c)
    c.model = "resnet8"
    if c.teacher.model:
        c.teacher.model = "resnet10"
    c.data.image_size = 16
    c.data.train = "synthetic:8:16"
    c.data.val_targets = ("synthetic:40",)
    c.embedding_size = c.teacher.embedding_size = 32
    c.batch_size = 16
    c.eval_batch_size = 40
    c.num_train_steps = 6
    c.checkpoint_every_steps = 2
    c.eval_every_steps = -1
    c.log_every_steps = 2
    c.best_metric = ""


def suite_budget(c: ml_collections.ConfigDict, steps: int) -> None:
    """`steps` and what the comparison suites derive from them, the same for every model of a table: SGD with 5%
    warmup and x0.1 at 60% and 85% of the steps, one evaluation at the end (same pairs, same point for every
    model), a checkpoint every third of the run, no best-checkpoint tracking."""
    c.num_train_steps = steps
    c.optimizer.schedule = "step"
    c.optimizer.step_fractions = (0.6, 0.85)
    c.optimizer.warmup_steps = max(steps // 20, 0)
    c.log_every_steps = max(steps // 10, 1)
    c.eval_every_steps = -1
    c.checkpoint_every_steps = max(steps // 3, 1)
    c.keep_checkpoints = 1
    c.best_metric = ""


def _demo(c: ml_collections.ConfigDict) -> None:
    """`make demo`'s size (python -m facekd_jax.suite --data=synthetic): 60 steps of 32 synthetic faces at 24x24,
    about 25 s a model on 2 CPU cores; the models stay near chance (README)."""
    c.data.train = "synthetic:32:32"
    c.data.val_targets = ("synthetic:400",)
    c.data.image_size = 24
    c.embedding_size = c.teacher.embedding_size = 128
    c.batch_size = 32
    c.optimizer.lr = 0.05
    c.eval_batch_size = 200
    suite_budget(c, 60)


def _lfw(c: ml_collections.ConfigDict) -> None:
    """LFW View 1's training people at 32x32, 200 steps of 64 (the own-teacher LFW suite; give data.root=LFW_DIR,
    the folder holding lfw-deepfunneled/ and the pairsDev files). ArcFace m 0.5 at s 32: at s 64 a 200-step
    teacher stayed at chance (51.1%), at s 32 it reached 58.8-66.2% (pairsDevTest)."""
    c.data.train = "lfw:{root}"
    c.data.val_targets = ("lfw:{root}",)
    c.data.image_size = 32
    c.embedding_size = c.teacher.embedding_size = 256
    c.batch_size = 64
    c.optimizer.lr = 0.1
    c.scale = 32.0
    c.eval_batch_size = 250
    suite_budget(c, 200)


def _lfw_dlib(c: ml_collections.ConfigDict) -> None:
    """The real-teacher suite's run (python -m facekd_jax.suite --teacher=dlib): a MobileFaceNet on LFW View 1's
    training people at 48x48, 128-d, 250 steps of 64, distilling from dlib's imported descriptor through its
    centred embedding cache (the suite's layout: runs/lfw_dlib/teacher_dlib, runs/lfw_dlib/cache_lfw). Chosen on
    pairsDevTrain (README): at 48x48 MobileFaceNet trains 1.7x as fast as at 64x64; dlib's unit embeddings share
    one direction (|mean| 0.915), so the KD terms see them centred."""
    _lfw(c)
    c.model = "mobilefacenet"
    c.data.image_size = 48
    c.embedding_size = c.teacher.embedding_size = 128
    if c.teacher.model:
        c.teacher.model = "dlib_resnet29"
        c.teacher.workdir = "runs/lfw_dlib/teacher_dlib"
        c.teacher.cache = "runs/lfw_dlib/cache_lfw"
        c.teacher.centre = True
    suite_budget(c, 250)


VARIANTS: Dict[str, Callable[[ml_collections.ConfigDict], None]] = {
    "smoke": _smoke, "tiny": _tiny, "demo": _demo, "lfw": _lfw, "lfw_dlib": _lfw_dlib}


def _literal(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def set_field(c: ml_collections.ConfigDict, key: str, value: Any, *, where: str = "config") -> None:
    """c.<dotted key> = value, converted to the field's type; KeyError naming the key and the valid ones."""
    node, walked = c, []
    *parents, leaf = key.split(".")
    for part in parents:
        if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
            raise KeyError(f"{where}: unknown config key {key!r}: {'.'.join(walked) or 'the config'} has no "
                           f"block {part!r}; valid keys: {', '.join(sorted(node.keys()))}")
        node, walked = node[part], walked + [part]
    if leaf not in node:
        raise KeyError(f"{where}: unknown config key {key!r}: {'.'.join(walked) or 'the config'} has no field "
                       f"{leaf!r}; valid keys: {', '.join(sorted(node.keys()))}")
    current = node[leaf]
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    elif isinstance(current, tuple) and isinstance(value, list):
        value = tuple(value)
    elif isinstance(current, str) and not isinstance(value, str):
        value = str(value)
    node[leaf] = value


def apply_arg(c: ml_collections.ConfigDict, arg: str) -> ml_collections.ConfigDict:
    """Applies `arg` (see the module docstring) to c in place and returns it."""
    for part in (p.strip() for p in (arg or "").split(",")):
        if not part:
            continue
        if "=" in part:
            key, _, value = part.partition("=")
            set_field(c, key.strip(), _literal(value.strip()), where=f"config argument {arg!r}")
        elif part in VARIANTS:
            VARIANTS[part](c)
        else:
            raise ValueError(f"unknown config variant {part!r} in {arg!r}: expected one of "
                             f"{', '.join(sorted(VARIANTS))} or key=value")
    return c


def kd_config(arg: str = "", *, teacher_model: str = "resnet18", **kd) -> ml_collections.ConfigDict:
    """A distillation config: the default with the frozen teacher from `teacher.workdir` and the KD settings
    `kd` (keys of facekd_jax.losses.KD_DEFAULTS; an unknown one raises KeyError naming it), then `arg`."""
    c = default_config()
    c.teacher.model = teacher_model
    c.teacher.workdir = "runs/teacher_resnet18"
    for key, value in kd.items():
        set_field(c, f"kd.{key}", value, where="kd_config")
    return apply_arg(c, arg)
