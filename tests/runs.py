"""Helpers shared by the training, checkpoint and suite tests: tiny configs and `main` in a subprocess."""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys
from typing import Dict, Optional

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# Small enough to compile and run in seconds on 2 CPU cores, large enough to learn the synthetic faces.
TINY = {
    "model": "resnet8",
    "teacher.model": "resnet10",
    "data.image_size": 16,
    "data.train": "synthetic:8:16",
    "data.val_targets": ("synthetic:40",),
    "embedding_size": 32,
    "teacher.embedding_size": 32,
    "batch_size": 16,
    "eval_batch_size": 40,
    "num_train_steps": 6,
    "checkpoint_every_steps": 2,
    "eval_every_steps": -1,
    "log_every_steps": 2,
    "best_metric": "",
}


def tiny_config(module: str = "baseline_resnet56", workdir: Optional[str] = None, **overrides):
    """configs/<module>.py:smoke shrunk to TINY, with dotted-key overrides (e.g. **{"kd.feature_weight": 1.0})."""
    import importlib

    c = importlib.import_module(f"configs.{module}").get_config("smoke")
    values = dict(TINY)
    values.update(overrides)
    for key, value in values.items():
        node = c
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        if leaf == "model" and parents == ["teacher"] and not node.model:
            continue  # no teacher in this config: leave it without one
        node[leaf] = value
    if workdir and c.teacher.model:
        c.teacher.workdir = str(workdir)
    return c


def _flag(key: str, value) -> str:
    if isinstance(value, (list, tuple)):  # ml_collections overrides tuples given as a Python literal
        value = repr(tuple(value))
    return f"--config.{key}={value}"


def main_command(config_file: str, workdir, overrides: Optional[Dict] = None, mode: str = "train") -> list:
    values = dict(TINY)
    values.update(overrides or {})
    args = [sys.executable, "-m", "facekd_jax.main", f"--config={REPO / config_file}", f"--workdir={workdir}",
            f"--mode={mode}"]
    teacherless = "baseline" in config_file or "teacher_" in config_file
    for key, value in values.items():
        if teacherless and key == "teacher.model":
            continue
        args.append(_flag(key, value))
    return args


def subprocess_env(devices: int = 1, **extra) -> Dict[str, str]:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["PYTHONUNBUFFERED"] = "1"
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run_main(config_file: str, workdir, overrides: Optional[Dict] = None, *, mode: str = "train",
             devices: int = 1, timeout: int = 300, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(main_command(config_file, workdir, overrides, mode), cwd=REPO, env=subprocess_env(devices),
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"main failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def load_params(workdir, which: str = "latest"):
    """The newest checkpoint's train state as host numpy arrays (whatever device count wrote it)."""
    import jax
    import numpy as np
    import orbax.checkpoint as ocp

    from facekd_jax import checkpoint as ckpt_lib

    manager = ckpt_lib._manager(ckpt_lib.checkpoint_dir(str(workdir), which), max_to_keep=None, read_only=True)
    step = manager.latest_step()
    metadata = manager.item_metadata(step)[ckpt_lib.STATE]
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one), metadata)
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
    manager.close()
    return step, jax.tree.map(np.asarray, restored[ckpt_lib.STATE])


def train_setup(config, mesh, num_classes=8, teacher_seed=1):
    """(train state, jitted train step, teacher variables) for `config` on `mesh`, as the training loop builds them."""
    import jax

    from facekd_jax import train

    student = train.build_student(config)
    teacher = train.build_teacher(config) if train.needs_teacher(config.kd) else None
    tx, schedule = train.make_optimizer(config, config.num_train_steps)
    state = train.create_train_state(config, student, tx, num_classes, mesh)
    shardings = jax.tree.map(lambda a: a.sharding, train.abstract_state(config, student, tx, num_classes, mesh))
    step = train.make_train_step(config, student, teacher, tx, schedule, mesh, num_classes, shardings)
    tvars = {}
    if teacher is not None:
        tvars = train.init_variables(teacher, num_classes, config.data.image_size, jax.random.PRNGKey(teacher_seed),
                                     config.teacher.embedding_size)
    return state, step, tvars


def synthetic_batches(config, n, num_classes=8):
    """`n` host batches of uniform-noise images and random labels at the config's sizes (seed 0)."""
    import numpy as np

    rng = np.random.default_rng(0)
    s = config.data.image_size
    return [{"image": rng.uniform(-1, 1, (config.batch_size, s, s, 3)).astype(np.float32),
             "label": rng.integers(0, num_classes, config.batch_size).astype(np.int32)} for _ in range(n)]
