"""The run directory: the one owner of WORKDIR/config.json, of the rules for resuming a run there, of its lock,
and of restoring its model, for eval mode, export, the teacher cache and teachers alike.

  WORKDIR/config.json        the run's whole config (write_config, read_config)
  WORKDIR/checkpoints/, best/  Orbax train states (facekd_jax.checkpoint)
  WORKDIR/lock               held by the run writing the workdir (WorkdirLock)
  WORKDIR/eval/              results.json, roc.png (facekd_jax.evaluate)
  WORKDIR/teacher.json       imported teachers only (facekd_jax.teachers.imported)

A run resumes only with the config it was trained with (`check_resumable`), apart from RESUME_FREE_FIELDS (how
long and how often it trains, evaluates and saves, how it runs). A model is restored into the architecture its
run was trained with (`trained_architecture`, `load_model`), whatever config the caller holds.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import time
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import jax
import ml_collections

from facekd_jax import checkpoint as ckpt_lib
from facekd_jax import paths
from facekd_jax import errors
from facekd_jax.errors import ConfigMismatchError, WorkdirLockedError

log = logging.getLogger(__name__)

CONFIG = "config.json"
PyTree = Any


# ----------------------------------------------------------------------------------------------- config.json


def config_path(workdir: str) -> str:
    return os.path.join(workdir, CONFIG)


def write_config(workdir: str, config: "ml_collections.ConfigDict | Mapping[str, Any]") -> None:
    """WORKDIR/config.json, through a temporary file renamed into place (a reader never sees half of it)."""
    payload = (json.loads(config.to_json_best_effort()) if isinstance(config, ml_collections.ConfigDict)
               else dict(config))
    path = config_path(workdir)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with errors.writing(path), open(tmp, "w") as f:
            json.dump(payload, f, indent=2)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_config(workdir: str) -> Dict[str, Any]:
    """The run's config.json as a dict. FileNotFoundError names the file; ValueError an unreadable one."""
    path = config_path(workdir)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: {workdir} is not a facekd_jax run (train one with "
                                "python -m facekd_jax.main, or import a teacher with python -m facekd_jax.teachers)")
    try:
        with open(path) as f:
            saved = json.load(f)
    except (OSError, ValueError, RecursionError) as e:  # RecursionError: JSON nested thousands deep
        raise ValueError(f"{path}: unreadable run config ({type(e).__name__}: {e})") from e
    if not isinstance(saved, dict):
        raise ValueError(f"{path}: a run config is a JSON object, found {type(saved).__name__}")
    # The fields a model is restored from (trained_architecture) are checked here, where the file is read.
    for field, kind in _ARCHITECTURE_TYPES.items():
        *parents, leaf = field.split(".")
        node = saved
        for part in parents:
            node = node.get(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"{path}: {part} is a {type(node).__name__}, expected a JSON object")
        if leaf in node and (not isinstance(node[leaf], kind) or isinstance(node[leaf], bool)):
            raise ValueError(f"{path}: {field} is {node[leaf]!r}, expected a {kind.__name__}")
    return saved


# The JSON type of each architecture field (ARCHITECTURE_FIELDS).
_ARCHITECTURE_TYPES = {"model": str, "embedding_size": int, "head": str, "data.image_size": int}


def model_parallelism(workdir: str) -> int:
    """mesh.model_parallelism of the run in `workdir` (1 where its config.json has none or cannot be read): the
    margin head's columns were padded for it (sharding.head_classes)."""
    try:
        return int(read_config(workdir).get("mesh", {}).get("model_parallelism", 1))
    except (OSError, ValueError, AttributeError):
        return 1


# ----------------------------------------------------------------------------------------------- resuming


# Fields a resumed run may change: how long, how often, where it evaluates, how it runs. Every other field
# (architecture, data, loss, optimiser, seed, batch) must equal the run's config.json to resume it.
RESUME_FREE_FIELDS = ("num_train_steps", "num_epochs", "log_every_steps", "eval_every_steps", "eval_batch_size",
                      "checkpoint_every_steps", "keep_checkpoints", "async_checkpoints", "best_metric",
                      "data.val_targets", "data.root", "cpu_kernels", "mesh.", "distributed.", "nonfinite")


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
    path = config_path(workdir)
    has_checkpoints = any(os.path.isdir(os.path.join(workdir, d)) and any(
        n.isdigit() for n in os.listdir(os.path.join(workdir, d))) for d in ("checkpoints", "best"))
    if not has_checkpoints or not os.path.exists(path):
        return
    try:
        saved = read_config(workdir)
    except (OSError, ValueError) as e:
        raise ConfigMismatchError(f"{e}; the workdir holds checkpoints of a run whose config cannot be compared: "
                                  "use another --workdir") from e
    diff = config_differences(config, saved)
    if diff:
        shown = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in list(diff.items())[:8])
        back = " ".join(f"--config.{k}={old!r}" for k, (old, _) in list(diff.items())[:8] if old != "<absent>")
        raise ConfigMismatchError(
            f"{workdir} holds a run trained with another config ({path}); {len(diff)} field(s) differ: {shown}"
            f"{' ...' if len(diff) > 8 else ''}. Nothing was changed. To resume that run, use its values "
            f"({back}); to train with the new config, give another --workdir.")


# ----------------------------------------------------------------------------------------------- architecture


# What a checkpoint's shapes depend on: evaluation takes these from the run itself (WORKDIR/config.json).
ARCHITECTURE_FIELDS = ("model", "embedding_size", "head", "data.image_size")


def trained_architecture(config: ml_collections.ConfigDict, workdir: str) -> ml_collections.ConfigDict:
    """config with the architecture fields of the run in workdir (its config.json), where they differ.

    A checkpoint restores only into the architecture it was trained with, so `--mode=eval` of, e.g., a suite
    run (32x32, 256-d) with the experiment's own config file (112x112, 512-d) evaluates what was trained and
    says so, instead of failing on mismatched shapes. The verification sets and batch size stay the caller's.
    """
    path = config_path(workdir)
    if not os.path.exists(path):
        return config
    saved = read_config(workdir)
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


# ----------------------------------------------------------------------------------------------- models


def restore_model_variables(workdir: str, model, *, image_size: int, embedding_size: int, sharding,
                            which: str = "latest", head_columns: int = 0) -> Tuple[Dict[str, PyTree], dict]:
    """The variables of `model` (a flax module of the run's architecture; None: the class centres only) from the
    run in `workdir`: ({"params": backbone params, "batch_stats": ...[, "head": class centres [E, head_columns]]},
    checkpoint meta), every array placed with `sharding`. The one restore behind eval mode, export, the teacher
    cache and teachers. FileNotFoundError names the checkpoint folder when there is none."""
    from facekd_jax import step as step_lib

    target: Dict[str, PyTree] = {"params": {}}
    if model is not None:
        shapes = jax.eval_shape(lambda rng: step_lib.init_variables(model, None, image_size, rng, embedding_size),
                                jax.random.PRNGKey(0))
        target = {"params": {"backbone": shapes["params"]["backbone"]}, "batch_stats": shapes["batch_stats"]}
    if head_columns:
        target["params"]["head"] = {"kernel": jax.ShapeDtypeStruct((int(embedding_size), int(head_columns)),
                                                                   jax.numpy.float32)}
    target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), target)
    variables, meta = ckpt_lib.restore_variables(workdir, target, which=which)
    out = {"params": variables["params"].get("backbone", {}), "batch_stats": variables.get("batch_stats", {})}
    if head_columns:
        out["head"] = variables["params"]["head"]["kernel"]
    return out, meta


@dataclasses.dataclass
class RunModel:
    """A finished run's model in eval mode: `apply(variables, images float32 [B, S, S, 3] normalised) -> raw
    embeddings [B, E]` (one function per model, so evaluation compiles once), the variables {"params",
    "batch_stats"}, and the config whose architecture fields it was built from."""
    workdir: str
    config: ml_collections.ConfigDict
    module: Any
    apply: Callable[[Any, Any], Any]
    variables: Dict[str, PyTree]
    step: int
    meta: Dict[str, Any]


def load_model(workdir: str, config: Optional[ml_collections.ConfigDict] = None, *, which: str = "latest",
               layers: Optional[Mapping[str, Any]] = None, sharding=None) -> RunModel:
    """The model of the run in `workdir` (a local folder), built with the architecture of its config.json over
    `config` (default: the default config) with `layers` (the run's CPU kernels, or {} for flax's), its variables
    restored onto `sharding` (default: the first device)."""
    from facekd_jax import config_lib
    from facekd_jax import step as step_lib

    read_config(workdir)  # names the file when the workdir is not a run
    config = trained_architecture(config if config is not None else config_lib.default_config(), workdir)
    module = step_lib.build_student(config, layers or {})
    sharding = sharding or jax.sharding.SingleDeviceSharding(jax.devices()[0])
    variables, meta = restore_model_variables(workdir, module, image_size=config.data.image_size,
                                              embedding_size=config.embedding_size, sharding=sharding, which=which)
    return RunModel(workdir=workdir, config=config, module=module, apply=step_lib.eval_apply(module),
                    variables=variables, step=int(meta.get("step", 0)), meta=meta)


# ----------------------------------------------------------------------------------------------- lock


LOCK = "lock"


class WorkdirLock:
    """WORKDIR/lock: one run at a time writes a workdir (two would replace each other's checkpoints).

    The file holds the owner's host, pid and start time. A lock whose owner is on this host and no longer runs
    is stale (a crashed or killed run): it is taken over, with a log line. A live owner, or one on another host
    (which this process cannot check), is a WorkdirLockedError naming it and the way out. Only process 0 of a
    multi-host run takes the lock. Use as a context manager; the lock is released on exit. (A gs:// workdir's
    lock is an object in the bucket with the same fields: facekd_jax.paths.RemoteWorkdir.)
    """

    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, LOCK)
        self.held = False

    def _owner(self) -> Optional[dict]:
        try:
            with open(self.path) as f:
                return json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # half-written by a process that died while writing it: treated as stale below

    def acquire(self) -> None:
        if jax.process_index() != 0:
            return
        me = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._owner()
                if owner is None:
                    continue  # released between our open and our read: try again
                if owner and (owner.get("host") != me["host"] or paths.pid_alive(int(owner.get("pid", -1)))):
                    raise WorkdirLockedError(
                        f"{os.path.dirname(self.path)} is in use by pid {owner.get('pid')} on host "
                        f"{owner.get('host')} since {owner.get('since')} ({self.path}). Wait for that run, give "
                        "this one another --workdir, or, if that process is gone, delete the lock file.")
                log.warning("taking over the stale lock %s of a run that no longer runs (%s)", self.path,
                            owner or "unreadable")
                os.remove(self.path)
                continue
            try:
                with errors.writing(self.path), os.fdopen(fd, "w") as f:
                    json.dump(me, f)
            except OSError:  # a full disk: no half-written lock left behind
                os.remove(self.path)
                raise
            self.held = True
            return
        raise WorkdirLockedError(f"could not take the lock {self.path}: other runs keep taking it")

    def release(self) -> None:
        if self.held:
            self.held = False
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass

    def __enter__(self) -> "WorkdirLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
