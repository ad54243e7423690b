"""The default config, the sizes every config file can shrink to, and the `FILE.py:ARG` syntax they share (so
config files work from any directory, after a plain `pip install`).

A config file is `get_config(arg)`; `arg` is what follows the colon in `--config=FILE.py:ARG`, as big_vision
writes it: comma-separated parts, each a variant the file declares or a `key=value` override of a (dotted) field,
applied left to right after the experiment's own settings:

  --config=configs/feature_kd.py                    the experiment as written (CASIA-WebFace, ResNet-56 student)
  --config=configs/feature_kd.py:smoke              the same on synthetic data at toy size (about a minute)
  --config=configs/feature_kd.py:smoke,seed=1,model=resnet20
  --config=configs/lfw_dlib.py:label_free_kd,seed=2  one run of the real-teacher table

Every file takes the sizes in SIZES (smoke, tiny). A table's file (configs/demo.py, lfw.py, lfw_dlib.py) also
declares its runs as variants and a `SUITE` (`Suite`) that facekd_jax.suite trains; each run is that file at
that variant, so a table's row can be trained, resumed or inspected on its own with facekd_jax.main.

Values are Python literals where they parse as one (numbers, tuples, True), else strings; commas inside brackets
or quotes do not split parts.
"""
from __future__ import annotations

import ast
import dataclasses
import importlib.util
import os
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import ml_collections

from facekd_jax.kd import KD_DEFAULTS


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
    # installed, "onednn" = require them, "taps" = flax's with depthwise convolutions as element-wise taps, "xla" =
    # flax's layers everywhere. GPUs and TPUs always get flax's.
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
    # facekd_jax.kd.KD_METHODS (one entry per method).
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
    c.model = "resnet10" if c.model == "resnet18" else "resnet8"  # a teacher run stays the larger network
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


# The variants every config file takes after its own: the same run shrunk for a smoke test or a unit test.
SIZES: Dict[str, Callable[[ml_collections.ConfigDict], None]] = {"smoke": _smoke, "tiny": _tiny}


def suite_budget(c: ml_collections.ConfigDict, steps: int, *, schedule: bool = True) -> None:
    """`steps` and what a comparison table derives from them, the same for every model of a table: SGD with 5%
    warmup and (schedule=True) x0.1 at 60% and 85% of the steps, one evaluation at the end (same pairs, same point
    for every model), a checkpoint every third of the run, no best-checkpoint tracking. schedule=False keeps the
    config's optimizer.schedule and step_fractions (a table that sweeps them sets them itself)."""
    c.num_train_steps = steps
    if schedule:
        c.optimizer.schedule = "step"
        c.optimizer.step_fractions = (0.6, 0.85)
    c.optimizer.warmup_steps = max(steps // 20, 0)
    c.log_every_steps = max(steps // 10, 1)
    c.eval_every_steps = -1
    c.checkpoint_every_steps = max(steps // 3, 1)
    c.keep_checkpoints = 1
    c.best_metric = ""


@dataclasses.dataclass(frozen=True)
class Suite:
    """What a table's config file declares beside its runs' configs (facekd_jax.suite trains the table).

    runs: the table's rows in order, each a variant of the file's get_config ("baseline", "feature_kd", ...).
    baseline: the row every other row's McNemar test compares with.
    teacher: where the teacher comes from: a run of `runs`, trained first ("teacher_resnet18"), or an import
      ("import:dlib", facekd_jax.teachers); `python -m facekd_jax.suite --teacher=DIR` gives a teacher run instead.
    seeds: seeds per row by default. descriptions: {run: what the table says of it}. default: the runs trained
      when none are named (empty: all; `--runs=all` trains all in any case).
    """
    runs: Tuple[str, ...]
    baseline: str
    teacher: str = ""
    seeds: int = 1
    descriptions: Mapping[str, str] = dataclasses.field(default_factory=dict)
    default: Tuple[str, ...] = ()


def split_run(arg: str, runs: Sequence[str], default: str) -> Tuple[str, str]:
    """'RUN,rest' -> (RUN, 'rest') where the first part of a table file's arg is one of its runs; else
    (default, arg)."""
    parts = split_parts(arg or "")
    if parts and parts[0] in runs:
        return parts[0], ",".join(parts[1:])
    return default, arg or ""


def teacher_cache_dir(config: ml_collections.ConfigDict) -> str:
    """config.teacher.cache with `{teacher}` replaced by config.teacher.workdir (a cache kept in its teacher's run
    folder, as the tables keep theirs) and `{data}` by the training data's kind and a digest of its resolved spec
    (so that one teacher keeps a cache per dataset, crop and copy: "lfw-1c3e5a7b"); '' without a cache."""
    path = str(config.teacher.cache).replace("{teacher}", str(config.teacher.workdir).rstrip("/"))
    if "{data}" in path:
        import hashlib

        from facekd_jax.data import specs
        spec = specs.parse(config.data.train, specs.TRAIN, root=config.data.root, field="config.data.train")
        digest = hashlib.sha256(f"{specs.canonical_path(spec)}@{spec.crop}".encode()).hexdigest()[:8]
        path = path.replace("{data}", f"{spec.kind}-{digest}")
    return path


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


def split_parts(arg: str) -> List[str]:
    """'a,b=(1, 2),c' -> ['a', 'b=(1, 2)', 'c']: commas inside brackets or quotes do not split."""
    parts, depth, quote, current = [], 0, "", []
    for ch in arg:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append("".join(current).strip())
            current = []
            continue
        current.append(ch)
    parts.append("".join(current).strip())
    return [p for p in parts if p]


def apply_arg(c: ml_collections.ConfigDict, arg: str,
              variants: Optional[Mapping[str, Callable[[ml_collections.ConfigDict], None]]] = None
              ) -> ml_collections.ConfigDict:
    """Applies `arg` (see the module docstring) to c in place and returns it. variants: the names the config file
    takes (default SIZES: smoke, tiny)."""
    variants = SIZES if variants is None else variants
    for part in split_parts(arg or ""):
        if "=" in part:
            key, _, value = part.partition("=")
            set_field(c, key.strip(), _literal(value.strip()), where=f"config argument {arg!r}")
        elif part in variants:
            variants[part](c)
        else:
            raise ValueError(f"unknown config variant {part!r} in {arg!r}: expected one of "
                             f"{', '.join(sorted(variants))} or key=value")
    return c


def kd_config(arg: str = "", *, teacher_model: str = "resnet18", **kd) -> ml_collections.ConfigDict:
    """A distillation config: the default with the frozen teacher from `teacher.workdir` and the KD settings
    `kd` (keys of facekd_jax.kd.KD_DEFAULTS; an unknown one raises KeyError naming it), then `arg` (SIZES and
    key=value parts)."""
    c = default_config()
    c.teacher.model = teacher_model
    c.teacher.workdir = "runs/teacher_resnet18"
    for key, value in kd.items():
        set_field(c, f"kd.{key}", value, where="kd_config")
    return apply_arg(c, arg)


def load_module(path: str):
    """A config file (configs/NAME.py) as a module, imported from its path (not from sys.path)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path} does not exist")
    name = "facekd_config_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"config file {path} has no get_config(arg)")
    return module


def load_config(path_and_arg: str) -> ml_collections.ConfigDict:
    """'configs/NAME.py[:ARG]' -> its get_config(ARG), as `--config=` gives it to main."""
    path, _, arg = str(path_and_arg).partition(":")
    module = load_module(path)
    return module.get_config(arg) if arg else module.get_config()


def check_overrides(argv: Sequence[str], required: Sequence[str] = ("--config",)) -> None:
    """Exits with status 2 and one line, before anything is written, on a missing required flag, a missing config
    file, an unknown variant or key=value in FILE.py:ARG, or an unknown `--config.a.b=...` key, naming it and the
    valid ones."""
    import sys

    def fail(text: str) -> None:
        print(f"error: {text}", file=sys.stderr)
        sys.exit(2)

    given = {a.split("=", 1)[0] for a in argv}
    if given & {"-h", "--help", "--helpshort", "--helpfull", "-?"}:
        return  # absl prints the flags
    for flag in required:
        if flag not in given:
            fail(f"{flag}=... is required (--help lists the flags)")
    path = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    overrides = [a[len("--config."):].split("=", 1)[0] for a in argv if a.startswith("--config.")]
    if not path:
        return
    file = path.partition(":")[0]
    if not os.path.isfile(file):
        fail(f"--config={path}: config file {file} does not exist")
    try:
        config = load_config(path)
    except (KeyError, ValueError) as e:
        fail(f"--config={path}: {e.args[0] if e.args else e}")
    for key in overrides:
        node, walked = config, []
        for part in key.split("."):
            if not hasattr(node, "keys") or part not in node:
                valid = sorted(node.keys()) if hasattr(node, "keys") else []
                where = ".".join(walked) or "the config"
                fail(f"unknown config key --config.{key}: {where} has no field {part!r}; valid keys: "
                     f"{', '.join(valid)}")
            node, walked = node[part], walked + [part]
