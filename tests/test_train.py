"""The train step, optimiser, sharding and the main entry point."""
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from runs import REPO, load_params, one_device, run_main, subprocess_env, synthetic_batches, tiny_config, train_setup
from facekd_jax import data as data_lib
from facekd_jax import errors, eval_only, optimizer, rundir, sharding, train
from facekd_jax import step as step_lib
from facekd_jax.teachers import load as teacher_load


@pytest.mark.slow
def test_sharded_step_equals_single_device_step_and_teacher_is_untouched():
    """3 KD steps on 1 device, on 8 (data) and on 4x2 (data x model: class-sharded head) agree."""
    # flax's layers on both meshes: the sharding is under test here (the [cpu] layers: test_xla_flags.py)
    config = tiny_config("feature_kd", **{"kd.hinton_weight": 0.5, "teacher.model": "resnet8", "cpu_kernels": "xla"})
    batches = synthetic_batches(config, 3)
    results = {}
    # 4x2 covers both the data-parallel gradient all-reduce and the class-sharded head in one compile.
    for name, mesh in [("one", sharding.make_mesh(1, devices=jax.devices()[:1])), ("data4_model2", sharding.make_mesh(2))]:
        state, step, tvars = train_setup(config, mesh)
        tvars = jax.device_put(tvars, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
        before = jax.tree.map(lambda x: np.array(x, copy=True), tvars)
        for b in batches:
            state, metrics = step(state, sharding.put_batch(b, mesh), tvars)
        assert bool(metrics["finite"]) and "hinton" in metrics and "feature" in metrics
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), tvars, before)
        results[name] = jax.tree.map(np.asarray, state.params)
        if name == "data4_model2":
            assert state.params["head"]["kernel"].sharding.spec == jax.sharding.PartitionSpec(None, "model")
            assert len(state.params["head"]["kernel"].addressable_shards[0].data.shape) == 2
            assert state.params["head"]["kernel"].addressable_shards[0].data.shape[1] == 4  # 8 classes / 2
    # Parameters really moved (otherwise agreement would prove nothing).
    init_state, _, _ = train_setup(config, sharding.make_mesh(1, devices=jax.devices()[:1]))
    moved = jax.tree.map(lambda a, b: float(np.abs(a - np.asarray(b)).max()), results["one"], init_state.params)
    assert max(jax.tree.leaves(moved)) > 1e-4
    for name in ("data4_model2",):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5), results["one"], results[name])


@pytest.mark.slow
@pytest.mark.parametrize("module", ["adadistill", "ekd"])
def test_stateful_kd_methods_shard_and_checkpoint_their_state(module, tmp_path):
    """AdaDistill's centres shard their classes over `model` like the margin head; 3 steps on 4x2 equal 3 on one
    device (parameters and KD state, EKD's too); AdaDistill's state is saved with the checkpoint and restored on
    resume."""
    config = tiny_config(module, **{"teacher.model": "resnet8", "cpu_kernels": "xla"})
    batches = synthetic_batches(config, 3)
    out = {}
    for name, mesh in [("one", sharding.make_mesh(1, devices=jax.devices()[:1])), ("data4_model2", sharding.make_mesh(2))]:
        state, step, tvars = train_setup(config, mesh)
        tvars = jax.device_put(tvars, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
        for b in batches:
            state, metrics = step(state, sharding.put_batch(b, mesh), tvars)
        assert bool(metrics["finite"]) and module in metrics
        out[name] = jax.tree.map(np.asarray, (state.params, state.kd_state))
        if module == "adadistill" and name == "data4_model2":
            assert state.kd_state["adadistill"]["centres"].sharding.spec == jax.sharding.PartitionSpec(None, "model")
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5), out["one"], out["data4_model2"])
    assert any(float(np.abs(x).max()) > 0 for x in jax.tree.leaves(out["one"][1]))
    if module != "adadistill":
        return  # the loop saves and restores kd_state whole, whichever method made it: one method shows it
    # Through the loop (on one device: the sharding was checked above): the state is checkpointed and comes back
    # on resume.
    teacher_dir = tmp_path / "teacher"
    tcfg = tiny_config("teacher_resnet18", **{"model": "resnet8", "num_train_steps": 2, "data.val_targets": ()})
    config = tiny_config(module, teacher_dir, **{"teacher.model": "resnet8", "num_train_steps": 4,
                                                 "data.val_targets": ()})
    with one_device():
        train.train_and_evaluate(tcfg, str(teacher_dir))
        train.train_and_evaluate(config, str(tmp_path / "student"))
        step, saved = load_params(tmp_path / "student")
        assert step == 4 and module in saved["kd_state"]
        config.num_train_steps = 6
        assert train.train_and_evaluate(config, str(tmp_path / "student"))["step"] == 6


def test_class_parallel_mesh_shards_only_the_class_centres():
    """On data x model, only the margin head's classes shard: the backbone's own embedding layer stays replicated,
    so an embedding width not divisible by the model axis (33 on 2) builds and steps."""
    config = tiny_config("baseline_resnet56", embedding_size=33, **{"cpu_kernels": "xla"})
    mesh = sharding.make_mesh(2)
    state, step, tvars = train_setup(config, mesh)
    specs = {jax.tree_util.keystr(p): x.sharding.spec for p, x in jax.tree_util.tree_leaves_with_path(state.params)}
    sharded = sorted(k for k, spec in specs.items() if spec != jax.sharding.PartitionSpec())
    assert sharded == ["['head']['kernel']"], sharded
    state, metrics = step(state, sharding.put_batch(synthetic_batches(config, 1)[0], mesh), tvars)
    assert bool(metrics["finite"])


@pytest.mark.slow
def test_a_class_count_the_model_axis_does_not_divide_pads_the_head_and_trains_as_on_one_device():
    """7 classes over a model axis of 4 (CASIA's 10,572 over 8 in miniature): the head gets 8 columns, sharded, and
    the padded one is never read, so 3 steps of Hinton KD on 2x4 equal 3 on one device (7 columns); no all-gather
    of the centres in the compiled step."""
    config = tiny_config("conventional_kd", **{"teacher.model": "resnet8", "cpu_kernels": "xla"})
    batches = synthetic_batches(config, 3, num_classes=7)
    out = {}
    for name, mesh in [("one", sharding.make_mesh(1, devices=jax.devices()[:1])), ("data2_model4", sharding.make_mesh(4))]:
        state, step, tvars = train_setup(config, mesh, num_classes=7)
        if name == "data2_model4":
            kernel = state.params["head"]["kernel"]
            assert kernel.shape == (32, 8) and kernel.sharding.spec == jax.sharding.PartitionSpec(None, "model")
            # the same start as on one device (a [32, 8] normal draw differs from a [32, 7] one), for the student's
            # head and the teacher's centres (laid out as the loop lays out a teacher's: padded, sharded)
            kernel = jax.device_put(np.pad(out["init"], ((0, 0), (0, 1))), kernel.sharding)
            state = state.replace(params=dict(state.params, head={"kernel": kernel}))
            centres = teacher_load._shard_centres(out["teacher"], step_lib.setup(config, num_classes=7, mesh=mesh))
            assert centres.shape == (32, 8) and centres.sharding.spec == jax.sharding.PartitionSpec(None, "model")
            tvars = dict(tvars, params=dict(tvars["params"], head={"kernel": centres}))
            hlo = step.lower(state, sharding.put_batch(batches[0], mesh), tvars).compile().as_text()
            assert "all-gather" not in hlo
        else:
            out["init"] = np.asarray(state.params["head"]["kernel"])
            out["teacher"] = np.asarray(tvars["params"]["head"]["kernel"])
        for b in batches:
            state, metrics = step(state, sharding.put_batch(b, mesh), tvars)
        assert bool(metrics["finite"]) and float(metrics["hinton"]) > 0
        out[name] = jax.tree.map(np.asarray, state.params)
    assert out.pop("init").shape == out.pop("teacher").shape == out["one"]["head"]["kernel"].shape == (32, 7)
    out["data2_model4"]["head"]["kernel"] = out["data2_model4"]["head"]["kernel"][:, :7]
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5), out["one"], out["data2_model4"])
    assert sharding.head_classes(10572, 8) == 10576 and sharding.head_classes(10572, 1) == 10572


def test_kd_state_centres_the_model_axis_does_not_divide_are_replicated():
    """AdaDistill's centres are read over every column (its own classifier), so they are not padded: where their
    class count does not divide the model axis they replicate; where it does they shard."""
    mesh = sharding.make_mesh(4)
    shapes = {"params": {"head": {"kernel": jax.ShapeDtypeStruct((4, 8), jnp.float32)}},
              "kd_state": {"adadistill": {"centres": jax.ShapeDtypeStruct((4, 7), jnp.float32)}},
              "more": {"kd_state": {"centres": jax.ShapeDtypeStruct((4, 8), jnp.float32)}}}
    specs = jax.tree.map(lambda s: s.spec, sharding.tree_shardings(shapes, mesh))
    P = jax.sharding.PartitionSpec
    assert specs == {"params": {"head": {"kernel": P(None, "model")}}, "kd_state": {"adadistill": {"centres": P()}},
                     "more": {"kd_state": {"centres": P(None, "model")}}}


def test_loss_falls_on_synthetic_data():
    config = tiny_config("baseline_resnet56", **{"optimizer.lr": 0.1, "batch_size": 32})
    mesh = sharding.make_mesh(1)
    batches, info = data_lib.make_train_dataset("synthetic:8:16", batch_size=32, image_size=16, seed=0)
    state, step, _ = train_setup(config, mesh, num_classes=info["num_classes"])
    losses = []
    it = iter(batches)
    for _ in range(40):
        state, metrics = step(state, sharding.put_batch(next(it), mesh), {})
        losses.append(float(metrics["ce"]))
    assert np.mean(losses[-5:]) < 0.75 * np.mean(losses[:5]), losses


def test_weight_decay_mask_covers_exactly_conv_and_dense_kernels():
    config = tiny_config("baseline_resnet56", model="resnet56")
    student = step_lib.build_student(config)
    shapes = jax.eval_shape(lambda k: step_lib.init_variables(student, 10, 16, k, 32), jax.random.PRNGKey(0))
    mask = optimizer.weight_decay_mask(shapes["params"])
    flat_mask = dict(jax.tree_util.tree_leaves_with_path(mask))
    n_kernels = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(shapes["params"]):
        name = path[-1].key
        decayed = flat_mask[path]
        if name == "kernel":
            n_kernels += 1
            assert decayed and leaf.ndim in (2, 4), path
        else:
            assert not decayed, path  # BN scale/bias, dense biases
    assert n_kernels == 55 + 2 + 1 + 1  # 55 convs, 2 projection shortcuts (option B), embedding FC, class centres
    # The decoupled transformation: decayed leaves shrink, others do not, with zero gradients.
    tx, _ = optimizer.make_optimizer(config, 10)
    params = jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype), shapes["params"])
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    for path, u in jax.tree_util.tree_leaves_with_path(updates):
        assert (float(jnp.abs(u).max()) > 0) == flat_mask[path], path


def test_schedules_and_head_learning_rate():
    config = tiny_config("baseline_resnet56", num_train_steps=100)
    config.optimizer.schedule = "step"
    config.optimizer.step_fractions = (0.5, 0.8)
    config.optimizer.warmup_steps = 10
    config.optimizer.lr = 0.1
    sched = optimizer.make_schedule(config, 100)
    assert float(sched(0)) == 0.0 and abs(float(sched(5)) - 0.05) < 1e-7
    assert abs(float(sched(49)) - 0.1) < 1e-7 and abs(float(sched(51)) - 0.01) < 1e-7
    assert abs(float(sched(90)) - 0.001) < 1e-7
    config.optimizer.schedule = "poly"
    sched = optimizer.make_schedule(config, 100)
    assert abs(float(sched(10)) - 0.1) < 1e-7 and abs(float(sched(55)) - 0.05) < 1e-6 and float(sched(100)) < 1e-7
    # Clipping acts on the backbone only; the head has its own LR multiplier.
    config.optimizer.schedule = "constant"
    config.optimizer.weight_decay = 0.0
    config.optimizer.momentum = 0.0
    config.optimizer.head_lr_multiplier = 10.0
    config.optimizer.grad_clip = 1.0
    config.optimizer.warmup_steps = 0
    tx, _ = optimizer.make_optimizer(config, 100)
    params = {"backbone": {"w": {"kernel": jnp.zeros((4, 4))}}, "head": {"kernel": jnp.zeros((4, 3))}}
    grads = {"backbone": {"w": {"kernel": jnp.full((4, 4), 10.0)}}, "head": {"kernel": jnp.full((4, 3), 10.0)}}
    updates, _ = tx.update(grads, tx.init(params), params)
    assert abs(float(optax_norm(updates["backbone"])) - 0.1) < 1e-5       # clipped to norm 1, times lr 0.1
    np.testing.assert_allclose(updates["head"]["kernel"], -10.0 * 0.1 * 10.0)  # not clipped, 10x lr


def optax_norm(tree):
    return jnp.sqrt(sum(jnp.sum(x ** 2) for x in jax.tree.leaves(tree)))


@pytest.mark.slow
def test_main_trains_teacher_then_distils_then_evaluates(tmp_path):
    """As a new user: a tiny teacher, a feature-KD student on 4 fake devices reading it (main's data-parallel
    path; the step's sharding on 8 is tested above), then eval mode."""
    teacher_dir, student_dir = tmp_path / "teacher", tmp_path / "student"
    with one_device():  # the teacher in this process: main's own path is the student's, below
        train.train_and_evaluate(tiny_config("teacher_resnet18", **{"data.val_targets": ()}), str(teacher_dir))
    proc = run_main("configs/feature_kd.py:smoke", student_dir, {"teacher.workdir": str(teacher_dir)}, devices=4)
    log = proc.stdout + proc.stderr
    assert "SYNTHETIC" in log and "feature" in log and "[synthetic][6]Accuracy-Flip:" in log
    # One line per event: Orbax's INFO chatter (about ten lines per checkpoint) is filtered out (facekd_jax.logs);
    # its warnings stay.
    info = [line for line in log.splitlines() if line.startswith("I")]
    assert info and not any("checkpoint_manager.py" in line or "async_checkpointer.py" in line for line in info)
    progress = [line for line in info if "step 2/" in line or "[2] " in line]  # each progress line once
    assert len(progress) == 1, progress
    assert (student_dir / "config.json").exists()
    assert list((student_dir).glob("events.out.tfevents*")), "no TensorBoard events written"
    results = json.loads((student_dir / "eval" / "results.json").read_text())
    assert results["step"] == 6 and 0.0 <= results["synthetic"]["accuracy"] <= 1.0
    step, state = load_params(student_dir)
    assert step == 6 and set(state["params"]) == {"backbone", "head"}
    # Eval mode on other pairs, with a config whose architecture differs from the run's: the run's config.json
    # decides the architecture (the checkpoint restores only into it), the command line the verification set.
    other = {"teacher.workdir": str(teacher_dir), "model": "resnet20", "embedding_size": 48, "data.image_size": 24,
             "data.val_targets": ("synthetic:30:7",), "eval_batch_size": 30}
    proc = run_main("configs/feature_kd.py:smoke", student_dir, other, mode="eval")
    log = proc.stdout + proc.stderr
    assert "[synthetic][6]Accuracy-Flip:" in log
    assert "model='resnet8'" in log and "embedding_size=32" in log and "data.image_size=16" in log
    # The run's CPU kernels, as in training (eval once built flax's layers: XLA:CPU's depthwise convolutions made
    # a MobileFaceNet's 6,000 LFW pairs take over 5 minutes instead of 47 s).
    assert "cpu_kernels=auto: " in log
    results = json.loads((student_dir / "eval" / "results.json").read_text())
    assert results["synthetic"]["pairs"] == 30
    assert (student_dir / "eval" / "roc.png").stat().st_size > 1000


@pytest.mark.slow
def test_unknown_config_key_and_missing_teacher_are_clear_errors(tmp_path):
    cmd = [sys.executable, "-m", "facekd_jax.main", f"--config={REPO}/configs/feature_kd.py:smoke",
           f"--workdir={tmp_path}", "--config.kd.feture_weight=3"]
    proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(1), capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "feture_weight" in proc.stderr and "feature_weight" in proc.stderr
    proc = run_main("configs/feature_kd.py:smoke", tmp_path / "s", {"teacher.workdir": str(tmp_path / "none")},
                    check=False)
    assert proc.returncode != 0 and "teacher.workdir" in proc.stderr and str(tmp_path / "none") in proc.stderr
    # --help says how configs, variants and overrides work, and what the exit status means.
    proc = subprocess.run([sys.executable, "-m", "facekd_jax.main", "--help"], cwd=tmp_path, env=subprocess_env(1),
                          capture_output=True, text=True, timeout=120)
    assert "FILE.py[:ARG]" in proc.stdout and "key=value" in proc.stdout and "75 (EX_TEMPFAIL)" in proc.stdout


def test_missing_real_data_path_says_how_to_get_it(tmp_path):
    config = tiny_config("baseline_resnet56", **{"data.train": "recordio:{root}", "data.root": str(tmp_path / "no")})
    with pytest.raises(FileNotFoundError, match="faces_webface_112x112"):
        train.train_and_evaluate(config, str(tmp_path / "run"))


MULTIHOST = r"""
import os, sys
pid, port, workdir = int(sys.argv[1]), sys.argv[2], sys.argv[3]
sys.path.insert(0, {repo!r}); sys.path.insert(0, {tests!r})
from runs import tiny_config
from facekd_jax import train
c = tiny_config("baseline_resnet56", num_train_steps=4, checkpoint_every_steps=4, **{{"data.val_targets": ()}})
c.distributed.enabled = True
c.distributed.coordinator_address = "localhost:" + port
c.distributed.num_processes = 2
c.distributed.process_id = pid
train.train_and_evaluate(c, workdir)
"""


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
    """2 processes x 4 CPU devices reach the parameters of 1 process x 8 devices (same global batches)."""
    import socket

    script = tmp_path / "mh.py"
    script.write_text(MULTIHOST.format(repo=str(REPO), tests=str(REPO / "tests")))
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = str(s.getsockname()[1])
    procs = [subprocess.Popen([sys.executable, str(script), str(i), port, str(tmp_path / "two")], cwd=REPO,
                              env=subprocess_env(4), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    try:  # the one process is this one, on its 8 devices, while the two run
        train.train_and_evaluate(tiny_config("baseline_resnet56", num_train_steps=4, checkpoint_every_steps=4,
                                             **{"data.val_targets": ()}), str(tmp_path / "one"))
    finally:
        outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs[0][-3000:] + outs[1][-3000:]
    step_two, two = load_params(tmp_path / "two")
    step_one, one = load_params(tmp_path / "one")
    assert step_two == step_one == 4
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), one["params"], two["params"])


def test_eval_architecture_comes_from_the_run_and_a_damaged_run_config_is_named(tmp_path):
    config = tiny_config("baseline_resnet56")
    assert rundir.trained_architecture(config, str(tmp_path)) is config  # no config.json: the caller's config
    saved = tiny_config("baseline_resnet56", model="resnet20", embedding_size=48, **{"data.image_size": 24})
    (tmp_path / "config.json").write_text(saved.to_json())
    got = rundir.trained_architecture(config, str(tmp_path))
    assert (got.model, got.embedding_size, got.data.image_size) == ("resnet20", 48, 24)
    assert got.data.val_targets == config.data.val_targets and config.model == "resnet8"  # caller's untouched
    (tmp_path / "config.json").write_text('{"model": "resn')
    with pytest.raises(ValueError, match="config.json"):
        eval_only.evaluate_workdir(config, str(tmp_path))
    assert (tmp_path / "config.json").read_text() == '{"model": "resn'  # nothing rewritten


def test_eval_of_an_imported_teacher_takes_its_own_crop_where_a_set_names_none(tmp_path, lfw_dir):
    """--mode=eval of an imported teacher's run (its teacher.json) evaluates on the teacher's crop, as the suite's
    teacher row and its caches do; a set with a crop of its own, and one that takes none, stay as given."""
    saved = tiny_config("baseline_resnet56", model="dlib_resnet29", embedding_size=128, **{"data.image_size": 150})
    (tmp_path / "config.json").write_text(saved.to_json())
    (tmp_path / "teacher.json").write_text(json.dumps({"crops": {"lfw": [68, 77, 184, 193]}}))
    config = tiny_config("baseline_resnet56", **{"data.root": str(lfw_dir), "data.val_targets": (
        "lfw:{root}", "lfw-view2:{root}@1,2,30,40", "synthetic:20")})
    got = eval_only._teacher_crops(rundir.trained_architecture(config, str(tmp_path)), str(tmp_path))
    assert got.data.val_targets == (f"lfw:{lfw_dir}@68,77,184,193", "lfw-view2:{root}@1,2,30,40", "synthetic:20")
    (tmp_path / "teacher.json").unlink()  # a trained run: its sets as given
    assert eval_only._teacher_crops(rundir.trained_architecture(config, str(tmp_path)),
                                    str(tmp_path)).data.val_targets == config.data.val_targets


@pytest.mark.slow
def test_a_config_file_outside_the_repository_trains_from_another_directory(tmp_path):
    """Config files import only the installed package (facekd_jax.config_lib), not the repository's configs/."""
    import shutil

    shutil.copy(REPO / "configs" / "baseline_resnet56.py", tmp_path / "my_config.py")
    env = subprocess_env(1)
    env["PYTHONPATH"] = ""
    proc = subprocess.run([sys.executable, "-m", "facekd_jax.main", "--config=my_config.py:tiny,num_train_steps=2",
                           "--workdir=w"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "w" / "config.json").read_text())["num_train_steps"] == 2
    # A typo in the file name is one line, and nothing is created.
    proc = subprocess.run([sys.executable, "-m", "facekd_jax.main", "--config=my_confg.py", "--workdir=w2"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "my_confg.py does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "w2").exists()


@pytest.mark.parametrize("spec", ["pairs:gs://bucket/pairs.txt:gs://bucket/images", "tfds:gs://bucket/faces_tfds"])
def test_a_url_in_a_spec_that_cannot_take_one_stops_the_run_naming_the_field_and_creates_nothing(spec, tmp_path,
                                                                                                monkeypatch):
    """pairs: separates its two paths with ':' and tfds:DIR goes to TFDS's own loader: a URL there is refused
    before anything is written, naming the field (gs:// used to become a local folder `gs:`). Other paths may be
    URLs: tests/test_paths.py (workdirs, teachers, caches, folder and .bin data), tests/test_data_pipeline.py
    (TFRecord)."""
    monkeypatch.chdir(tmp_path)
    config = tiny_config("feature_kd", **{"teacher.model": "resnet8"})
    field = "data.val_targets" if spec.startswith("pairs") else "data.train"
    if spec.startswith("pairs"):
        config.data.val_targets = (spec,)
    else:
        config.data.train = spec
    with pytest.raises(errors.NonLocalPathError, match=field.replace(".", r"\.") + r"(\[0\])?=.*gs://bucket"):
        train.train_and_evaluate(config, str(tmp_path / "run"))
    assert list(tmp_path.iterdir()) == []
