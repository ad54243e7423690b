"""Checkpoints: exact resume after SIGKILL, SIGTERM saves, restore across device counts, damaged
checkpoints passed over (and kept), NaN losses stop with the last good checkpoint kept."""
import pathlib
import signal
import subprocess
import time

import jax
import numpy as np
import pytest

from runs import REPO, load_params, main_command, run_main, subprocess_env, tiny_config
from facekd_jax import checkpoint as ckpt_lib
from facekd_jax import errors, optimizer, sharding, train
from facekd_jax import step as step_lib


def _finished_steps(workdir) -> list:
    d = pathlib.Path(workdir) / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.exists() else []


def _wait_for(predicate, proc, timeout=240):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if predicate():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.1)
    return False


LONG = {"num_train_steps": 12, "checkpoint_every_steps": 3}
SLOW = 0.4  # seconds slow_main.py waits before each step, so a run can be killed mid-way


def _assert_same_params(a, b):
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b) > 0
    for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_array_equal(x, y)


@pytest.mark.slow
def test_sigkill_then_resume_is_bit_identical_to_uninterrupted(tmp_path):
    # The uninterrupted run goes on beside the one that is killed (each mostly waits or compiles).
    straight = subprocess.Popen(main_command("configs/baseline_resnet56.py:smoke", tmp_path / "straight", LONG),
                                cwd=REPO, env=subprocess_env(1), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True)
    workdir = tmp_path / "killed"
    proc = subprocess.Popen(main_command("configs/baseline_resnet56.py:smoke", workdir, LONG, step_sleep=SLOW), cwd=REPO,
                            env=subprocess_env(1), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert _wait_for(lambda: 6 in _finished_steps(workdir), proc), "no checkpoint at step 6 appeared"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        _, err = straight.communicate(timeout=300)
        assert straight.returncode == 0, err[-3000:]
    finally:
        for p in (proc, straight):
            if p.poll() is None:
                p.kill()
    assert max(_finished_steps(workdir)) < 12, "the run finished before it was killed"
    out = run_main("configs/baseline_resnet56.py:smoke", workdir, LONG)
    assert "resumed from step" in out.stderr
    step_a, a = load_params(tmp_path / "straight")
    step_b, b = load_params(workdir)
    assert step_a == step_b == 12
    _assert_same_params(a["params"], b["params"])
    _assert_same_params(a["batch_stats"], b["batch_stats"])
    _assert_same_params(a["opt_state"], b["opt_state"])


@pytest.mark.slow
def test_sigterm_saves_current_step_and_exits_cleanly(tmp_path):
    workdir = tmp_path / "run"
    proc = subprocess.Popen(main_command("configs/baseline_resnet56.py:smoke", workdir,
                                         dict(LONG, checkpoint_every_steps=100), step_sleep=SLOW),
                            cwd=REPO, env=subprocess_env(1), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        # Steps are logged every 2 steps; wait until training is under way, then preempt.
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if "step 4/12" in line:
                break
        t0 = time.time()
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=60)
        elapsed = time.time() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
    log = "".join(lines) + rest
    from facekd_jax.main import EXIT_PREEMPTED
    assert proc.returncode == EXIT_PREEMPTED, log[-3000:]  # a scheduler tells "preempted, resumable" from done
    assert elapsed < 30
    steps = _finished_steps(workdir)
    assert steps and 4 <= steps[-1] < 12 and steps[-1] % 100 != 0, (steps, log[-2000:])
    assert "preempted" in log


def _state_on(mesh, config, num_classes=8):
    student = step_lib.build_student(config)
    tx, _ = optimizer.make_optimizer(config, 10)
    return step_lib.create_train_state(config, student, tx, num_classes, mesh), \
        step_lib.abstract_state(config, student, tx, num_classes, mesh)


@pytest.mark.parametrize("save_devices,restore_devices", [(8, 1), (1, 8)])
def test_restore_across_device_counts(tmp_path, save_devices, restore_devices):
    config = tiny_config("baseline_resnet56")
    mesh_save = sharding.make_mesh(2 if save_devices == 8 else 1, devices=jax.devices()[:save_devices])
    mesh_restore = sharding.make_mesh(2 if restore_devices == 8 else 1, devices=jax.devices()[:restore_devices])
    state, _ = _state_on(mesh_save, config)
    ck = ckpt_lib.Checkpointer(str(tmp_path), async_save=True)
    ck.save(3, state.as_dict(), {"step": 3})
    ck.close()
    _, abstract = _state_on(mesh_restore, config)
    ck = ckpt_lib.Checkpointer(str(tmp_path))
    restored, meta = ck.restore_latest(abstract.as_dict())
    ck.close()
    assert meta["step"] == 3
    head = restored["params"]["head"]["kernel"]
    assert len(head.sharding.device_set) == restore_devices
    _assert_same_params(jax.tree.map(np.asarray, state.as_dict()), jax.tree.map(np.asarray, restored))


def test_damaged_newest_checkpoint_is_reported_and_passed_over(tmp_path, caplog):
    config = tiny_config("baseline_resnet56")
    mesh = sharding.make_mesh(1, devices=jax.devices()[:1])
    state, abstract = _state_on(mesh, config)
    ck = ckpt_lib.Checkpointer(str(tmp_path), max_to_keep=5, async_save=False)
    ck.save(2, state.as_dict(), {"step": 2})
    later = state.replace(step=state.step + 2, params=jax.tree.map(lambda x: x + 1.0, state.params))
    ck.save(4, later.as_dict(), {"step": 4})
    ck.close()
    # Truncate every array data file of the newest checkpoint.
    damaged = [p for p in (tmp_path / "checkpoints" / "4" / "state").rglob("*") if p.is_file() and p.stat().st_size > 200]
    assert damaged
    for p in damaged:
        with open(p, "r+b") as f:
            f.truncate(p.stat().st_size // 3)
    ck = ckpt_lib.Checkpointer(str(tmp_path), max_to_keep=5)
    with caplog.at_level("ERROR"):
        restored, meta = ck.restore_latest(abstract.as_dict())
    ck.close()
    assert meta["step"] == 2
    _assert_same_params(jax.tree.map(np.asarray, state.params), jax.tree.map(np.asarray, restored["params"]))
    assert "step 4" in caplog.text
    moved = [p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith("corrupt-4")]
    assert moved, "the damaged checkpoint must be kept aside, not deleted"
    assert (tmp_path / "checkpoints" / "2").exists()


def test_a_checkpoint_whose_parameters_hold_nan_is_passed_over_as_damage(tmp_path, caplog, monkeypatch):
    """Its fingerprints match (written from the NaN), so only the finiteness check catches it: with NumPy for
    arrays in host memory, with one jitted program for an accelerator's (forced here); both name the array."""
    config = tiny_config("baseline_resnet56")
    mesh = sharding.make_mesh(1, devices=jax.devices()[:1])
    state, abstract = _state_on(mesh, config)
    ck = ckpt_lib.Checkpointer(str(tmp_path), max_to_keep=5, async_save=False)
    ck.save(2, state.as_dict(), {"step": 2})
    params = jax.tree.map(np.asarray, state.params)
    kernel = params["head"]["kernel"].copy()
    kernel[0, 1] = np.inf
    params["head"]["kernel"] = kernel
    ck.save(4, state.replace(step=state.step + 2, params=params).as_dict(), {"step": 4})
    ck.close()
    poisoned = {"params": params}
    for on_host in (True, False):
        monkeypatch.setattr(ckpt_lib, "_in_host_memory", lambda x, on_host=on_host: on_host)
        with pytest.raises(ValueError, match=r"non-finite values in \[\"\['head'\]\['kernel'\]\"\]"):
            ckpt_lib._check_restored(poisoned, 4, "ckpt")
        ckpt_lib._check_restored({"params": jax.tree.map(np.asarray, state.params)}, 2, "ckpt")
    ck = ckpt_lib.Checkpointer(str(tmp_path), max_to_keep=5)
    with caplog.at_level("ERROR"):
        _, meta = ck.restore_latest(abstract.as_dict())
    ck.close()
    assert meta["step"] == 2 and "non-finite values" in caplog.text
    assert [p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith("corrupt-4")]


_PUT_BATCH = sharding.put_batch


def _nan_images_at_step(monkeypatch, step: int) -> None:
    """The batch of the given (1-based) step of the next run gets NaN images: a NaN loss from the data, as a
    broken input or an overflowing augmentation would give."""
    calls = []

    def poisoned(batch, mesh):
        calls.append(1)
        if len(calls) == step:
            batch = dict(batch, image=np.full_like(batch["image"], np.nan))
        return _PUT_BATCH(batch, mesh)
    monkeypatch.setattr(sharding, "put_batch", poisoned)


def test_nan_loss_stops_naming_step_and_keeps_last_good_checkpoint(tmp_path, one_device, monkeypatch):
    config = tiny_config("baseline_resnet56", num_train_steps=8, checkpoint_every_steps=2,
                         **{"data.val_targets": ()})
    _nan_images_at_step(monkeypatch, 5)
    with pytest.raises(errors.NonFiniteLossError, match=r"step 5.*total"):
        train.train_and_evaluate(config, str(tmp_path / "stop"))
    assert _finished_steps(tmp_path / "stop") == [2, 4]
    step, state = load_params(tmp_path / "stop")
    assert step == 4 and all(np.isfinite(x).all() for x in jax.tree.leaves(state["params"]))
    # The config switch: skip such steps (their update is not applied) and count them.
    config.nonfinite = "skip"
    _nan_images_at_step(monkeypatch, 5)
    out = train.train_and_evaluate(config, str(tmp_path / "skip"))
    assert out["step"] == 8 and out["nonfinite_steps"] == 1
    _, state = load_params(tmp_path / "skip")
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(state["params"]))
    # The skipped step still advanced optax's counters: the schedule (and the logged lr) follow state.step.
    counts = [int(x) for x in jax.tree.leaves(state["opt_state"]) if np.ndim(x) == 0 and np.issubdtype(x.dtype, np.integer)]
    assert counts and all(c == 8 for c in counts), counts


def _tree_files(root) -> dict:
    root = pathlib.Path(root)
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_changed_config_is_refused_before_anything_is_touched(tmp_path, one_device):
    """A rerun with another architecture is not damage: it stops naming the field, and nothing moves."""
    config = tiny_config("baseline_resnet56", num_train_steps=4, **{"data.val_targets": ()})
    workdir = str(tmp_path / "run")
    train.train_and_evaluate(config, workdir)
    before = _tree_files(workdir)
    changed = tiny_config("baseline_resnet56", num_train_steps=6, embedding_size=16, **{"data.val_targets": ()})
    with pytest.raises(errors.ConfigMismatchError, match=r"embedding_size: 32 -> 16") as e:
        train.train_and_evaluate(changed, workdir)
    assert "--config.embedding_size=32" in str(e.value) and "another --workdir" in str(e.value)
    assert _tree_files(workdir) == before  # no checkpoint moved aside, config.json unchanged, no lock left
    # Fields a resumed run may change (how long it trains) pass: the run continues from step 4.
    longer = tiny_config("baseline_resnet56", num_train_steps=6, **{"data.val_targets": ()})
    assert train.train_and_evaluate(longer, workdir)["step"] == 6


def test_scrambled_checkpoint_bytes_are_damage(tmp_path, caplog):
    """Bytes changed inside a checkpoint's array data are caught by the fingerprints written at save."""
    config = tiny_config("baseline_resnet56")
    mesh = sharding.make_mesh(1, devices=jax.devices()[:1])
    state, abstract = _state_on(mesh, config)
    ck = ckpt_lib.Checkpointer(str(tmp_path), max_to_keep=5, async_save=False)
    ck.save(2, state.as_dict(), {"step": 2})
    ck.save(4, state.replace(step=state.step + 4).as_dict(), {"step": 4})
    ck.close()
    data = max((p for p in (tmp_path / "checkpoints" / "4" / "state").rglob("*") if p.is_file()),
               key=lambda p: p.stat().st_size)
    raw = bytearray(data.read_bytes())
    rng = np.random.default_rng(0)
    for i in rng.choice(len(raw) // 2, 64, replace=False) + len(raw) // 4:  # same size, other bytes
        raw[i] ^= 0x5A
    data.write_bytes(bytes(raw))
    ck = ckpt_lib.Checkpointer(str(tmp_path), max_to_keep=5)
    with caplog.at_level("ERROR"):
        restored, meta = ck.restore_latest(abstract.as_dict())
    ck.close()
    assert meta["step"] == 2 and "step 4" in caplog.text
    assert any(p.name.startswith("corrupt-4") for p in (tmp_path / "checkpoints").iterdir())
    # The fingerprint itself: one changed value in one leaf is named.
    tree = {"a": np.arange(6, dtype=np.float32), "b": np.ones((2, 3), np.int32)}
    meta = {ckpt_lib.FINGERPRINT: ckpt_lib.fingerprint(tree)}
    ckpt_lib.check_fingerprint(tree, meta, "x")
    with pytest.raises(ckpt_lib.DamagedCheckpointError, match=r"\['a'\]"):
        ckpt_lib.check_fingerprint({"a": np.arange(6, dtype=np.float32)[::-1].copy(), "b": tree["b"]}, meta, "x")


def test_host_fingerprint_equals_the_jitted_one_on_every_dtype_and_across_chunks(monkeypatch):
    """Arrays held whole are summed with NumPy, sharded ones on device: both must give the same digits, or a
    checkpoint saved one way would be called damaged when restored the other way."""
    import jax.numpy as jnp

    monkeypatch.setattr(ckpt_lib, "_HOST_CHUNK", 1000)  # several chunks, one ragged
    rng = np.random.default_rng(0)
    tree = {"f32": rng.normal(size=(3, 5, 7)).astype(np.float32), "i32": rng.integers(0, 2**31 - 1, 4321, np.int32),
            "bf16": jnp.asarray(rng.normal(size=2500), jnp.bfloat16), "i8": rng.integers(-128, 127, 100, np.int8),
            "bool": rng.random(33) > 0.5, "u16": rng.integers(0, 65535, 17).astype(np.uint16),
            "key": jax.random.key(3)}
    host = ckpt_lib.fingerprint(tree)
    paths, leaves = zip(*jax.tree_util.tree_leaves_with_path(tree))
    sums = jax.device_get(ckpt_lib._fingerprints([jnp.asarray(x) for x in leaves]))
    assert host == {jax.tree_util.keystr(p): f"{int(a):08x}{int(b):08x}" for p, (a, b) in zip(paths, sums)}
    assert len(set(host.values())) == len(host)
    # A class-sharded array (as the margin head's centres): the jitted sums over its shards, the host's over it.
    mesh = sharding.make_mesh(2)
    sharded = jax.device_put(rng.normal(size=(6, 8)).astype(np.float32),
                             jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "model")))
    (a, b), = jax.device_get(ckpt_lib._fingerprints([sharded]))
    assert ckpt_lib.fingerprint({"x": sharded}) == {"['x']": f"{int(a):08x}{int(b):08x}"}


def test_workdir_lock_refuses_a_live_owner_and_takes_over_a_stale_one(tmp_path, one_device):
    config = tiny_config("baseline_resnet56", num_train_steps=2, **{"data.val_targets": ()})
    workdir = tmp_path / "run"
    workdir.mkdir()
    owner = subprocess.Popen(["sleep", "60"])
    try:
        (workdir / "lock").write_text(
            '{"host": "%s", "pid": %d, "since": "then"}' % (__import__("socket").gethostname(), owner.pid))
        with pytest.raises(errors.WorkdirLockedError, match=rf"pid {owner.pid}"):
            train.train_and_evaluate(config, str(workdir))
        assert not (workdir / "checkpoints").exists()  # refused before anything was written
    finally:
        owner.kill()
        owner.wait()
    # Its owner is gone: a stale lock (a crashed run) is taken over, and released when the run ends.
    assert train.train_and_evaluate(config, str(workdir))["step"] == 2
    assert not (workdir / "lock").exists()


def test_failed_save_stops_the_run_with_its_cause(tmp_path, monkeypatch, one_device):
    import errno

    import orbax.checkpoint as ocp

    def full_disk(self, step, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(self.directory))

    config = tiny_config("baseline_resnet56", num_train_steps=6, checkpoint_every_steps=2,
                         **{"data.val_targets": ()})
    monkeypatch.setattr(ocp.CheckpointManager, "save", full_disk)
    with pytest.raises(ckpt_lib.CheckpointSaveError, match=r"step 2 .*no space left on device") as e:
        train.train_and_evaluate(config, str(tmp_path / "run"))
    assert "rerun the same command to resume" in str(e.value)


def test_an_error_that_orbax_reports_again_on_close_does_not_replace_the_one_that_stopped_the_run(
        tmp_path, monkeypatch, one_device, caplog):
    import errno

    import orbax.checkpoint as ocp

    def full_disk(self, step, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(self.directory))

    def reported_again(self):
        raise OSError(errno.ENOSPC, "No space left on device (reported again)", str(self.directory))

    config = tiny_config("baseline_resnet56", num_train_steps=4, checkpoint_every_steps=2,
                         **{"data.val_targets": ()})
    monkeypatch.setattr(ocp.CheckpointManager, "save", full_disk)
    monkeypatch.setattr(ocp.CheckpointManager, "close", reported_again)
    with pytest.raises(ckpt_lib.CheckpointSaveError, match=r"step 2 .*no space left on device") as e:
        train.train_and_evaluate(config, str(tmp_path / "run"))
    assert "reported again" not in str(e.value)
    assert any("while stopping on an earlier error" in r.getMessage() for r in caplog.records)
    # Without an earlier error the same failure on close is the error, naming the folder.
    ck = ckpt_lib.Checkpointer(str(tmp_path / "other"))
    with pytest.raises(ckpt_lib.CheckpointSaveError, match=r"other/checkpoints failed: .*reported again"):
        ck.close()
