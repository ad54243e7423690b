"""Helpers shared by the training, checkpoint and suite tests: tiny configs and `main` in a subprocess."""
from __future__ import annotations

import contextlib
import os
import pathlib
import subprocess
import sys
from typing import Dict, Optional

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# The config variant "tiny" (facekd_jax/config_lib.py): seconds to compile and run on 2 CPU cores.
TINY_ARG = "tiny"


def tiny_config(module: str = "baseline_resnet56", workdir: Optional[str] = None, **overrides):
    """configs/<module>.py:tiny with dotted-key overrides (e.g. **{"kd.feature_weight": 1.0})."""
    import importlib

    from facekd_jax import config_lib

    c = importlib.import_module(f"configs.{module}").get_config(TINY_ARG)
    for key, value in overrides.items():
        if key == "teacher.model" and not c.teacher.model:
            continue  # no teacher in this config: leave it without one
        config_lib.set_field(c, key, value)
    if workdir and c.teacher.model:
        c.teacher.workdir = str(workdir)
    return c


@contextlib.contextmanager
def one_device():
    """In-process runs on the first of the tests' 8 fake devices (the first `mesh.model_parallelism` of them): the
    same code without 8 device programs on 2 CPU cores, for tests that check a run's behaviour, not its sharding
    (sharding is tested on purpose elsewhere). Halves the time of the suite and export tests."""
    import jax
    import pytest

    from facekd_jax import sharding

    original = sharding.make_mesh

    def make_mesh(model_parallelism: int = 1, devices=None):
        return original(model_parallelism, jax.devices()[:model_parallelism] if devices is None else devices)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sharding, "make_mesh", make_mesh)
        yield


def _flag(key: str, value) -> str:
    if isinstance(value, (list, tuple)):  # ml_collections overrides tuples given as a Python literal
        value = repr(tuple(value))
    return f"--config.{key}={value}"


def main_command(config_file: str, workdir, overrides: Optional[Dict] = None, mode: str = "train",
                 step_sleep: float = 0.0) -> list:
    """`python -m facekd_jax.main` on configs/FILE.py:tiny with --config.KEY=VALUE overrides; with step_sleep,
    through tests/slow_main.py, which waits that long before each step (so a test can stop it mid-run)."""
    config = f"{config_file},{TINY_ARG}" if ":" in config_file else f"{config_file}:{TINY_ARG}"
    entry = [str(REPO / "tests" / "slow_main.py"), str(step_sleep)] if step_sleep else ["-m", "facekd_jax.main"]
    args = [sys.executable, *entry, f"--config={REPO / config}", f"--workdir={workdir}", f"--mode={mode}"]
    teacherless = "baseline" in config_file or "teacher_" in config_file
    for key, value in (overrides or {}).items():
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
    """(train state, jitted train step, teacher variables) for `config` on `mesh`, from facekd_jax.step.setup (the
    loop's own set-up); the teacher's variables are random (seeded), with its margin head."""
    import jax

    from facekd_jax import sharding
    from facekd_jax import step as step_lib

    run = step_lib.setup(config, num_classes=num_classes, mesh=mesh)
    tvars = {}
    if run.teacher is not None:
        tvars = step_lib.init_variables(run.teacher, num_classes, config.data.image_size, jax.random.PRNGKey(teacher_seed),
                                     config.teacher.embedding_size,
                                     padded_classes=sharding.head_classes(num_classes, mesh.shape["model"]))
    return run.init_state(), run.train_step, tvars


def synthetic_batches(config, n, num_classes=8):
    """`n` host batches of uniform-noise images and random labels at the config's sizes (seed 0)."""
    import numpy as np

    rng = np.random.default_rng(0)
    s = config.data.image_size
    return [{"image": rng.uniform(-1, 1, (config.batch_size, s, s, 3)).astype(np.float32),
             "label": rng.integers(0, num_classes, config.batch_size).astype(np.int32)} for _ in range(n)]
