"""facekd_jax.cpu.xla_flags: the XLA:CPU defaults are added only where they should be, and change results only by
float summation order."""
import importlib.metadata
import subprocess
import sys

import numpy as np
import pytest

from runs import REPO, subprocess_env
from facekd_jax.cpu import onednn as onednn_lib
from facekd_jax.cpu import xla_flags

YNN = "--xla_cpu_experimental_ynn_fusion_type=dot,eltwise,reduce"


@pytest.fixture
def tested_jaxlib(monkeypatch):
    monkeypatch.setattr(xla_flags, "_jaxlib_version", lambda: xla_flags.TESTED_JAXLIB + "2")
    monkeypatch.setattr(xla_flags, "onednn_expected", lambda environ=None: False)  # XLA's convolutions


def test_with_onednn_convolutions_the_elementwise_fusions_are_left_out(monkeypatch):
    monkeypatch.setattr(xla_flags, "_jaxlib_version", lambda: xla_flags.TESTED_JAXLIB + "2")
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "2023.2.0")  # the oneDNN wheel installed
    env = {}
    assert xla_flags.onednn_expected(env)
    assert xla_flags.apply_cpu_defaults(env) == ["--xla_cpu_experimental_ynn_fusion_type=dot,reduce"]
    sharded = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}  # sharded: XLA's convolutions
    assert not xla_flags.onednn_expected(sharded)
    assert YNN in xla_flags.apply_cpu_defaults(sharded)
    assert xla_flags.apply_cpu_defaults({}, onednn=False) == [YNN]  # config.cpu_kernels="xla"
    assert xla_flags.onednn_expected({"XLA_FLAGS": "--xla_force_host_platform_device_count=1"})


def test_defaults_are_appended_and_never_override_the_user(tested_jaxlib):
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    assert xla_flags.apply_cpu_defaults(env) == [YNN]
    assert env["XLA_FLAGS"] == "--xla_force_host_platform_device_count=8 " + YNN
    assert xla_flags.apply_cpu_defaults(env) == []  # idempotent
    assert env["XLA_FLAGS"].count("ynn") == 1

    empty = {}
    assert xla_flags.apply_cpu_defaults(empty) == [YNN] and empty["XLA_FLAGS"] == YNN

    mine = {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=eltwise"}  # the user's own choice stands
    assert xla_flags.apply_cpu_defaults(mine) == []
    assert mine["XLA_FLAGS"] == "--xla_cpu_experimental_ynn_fusion_type=eltwise"

    for off in ("0", "false", "OFF", "no"):
        opted_out = {xla_flags.OPT_OUT: off}
        assert xla_flags.apply_cpu_defaults(opted_out) == [] and "XLA_FLAGS" not in opted_out


def test_other_jaxlib_versions_get_no_flags(monkeypatch):
    """An unknown name in XLA_FLAGS aborts XLA, so flags are only added for the jaxlib they were tested with."""
    monkeypatch.setattr(xla_flags, "_jaxlib_version", lambda: "0.99.0")
    env = {}
    assert xla_flags.apply_cpu_defaults(env) == [] and env == {}
    monkeypatch.setattr(xla_flags, "_jaxlib_version", lambda: None)
    assert xla_flags.apply_cpu_defaults(env) == [] and env == {}


def test_too_late_is_a_warning_and_changes_nothing(tested_jaxlib, monkeypatch):
    import jax

    jax.devices()  # this process's backend has started: XLA_FLAGS is no longer read
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    with pytest.warns(RuntimeWarning, match="already started"):
        assert xla_flags.apply_cpu_defaults() == []
    import os

    assert os.environ["XLA_FLAGS"] == "--xla_force_host_platform_device_count=8"


STEPS = """
import re, sys
sys.path.insert(0, {tests!r})
from facekd_jax.cpu import xla_flags
kernels = sys.argv[2]
xla_flags.apply_cpu_defaults(onednn=kernels != "xla")
import jax, numpy as np
from runs import synthetic_batches, tiny_config, train_setup
from facekd_jax import sharding

config = tiny_config("feature_kd", **{{"teacher.model": "resnet8", "cpu_kernels": kernels}})
mesh = sharding.make_mesh(1)
state, step, tvars = train_setup(config, mesh)
batches = synthetic_batches(config, 3)
hlo = step.lower(state, sharding.put_batch(batches[0], mesh), tvars).compile().as_text()
for b in batches:
    state, metrics = step(state, sharding.put_batch(b, mesh), tvars)
flat = {{jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(state.params)}}
# Element-wise YNNPACK fusions (ReLU's maximum, BN's subtract) are what the defaults add: jaxlib 0.10 already
# gives YNNPACK some dots, reductions and convolutions on its own.
fused = re.findall(r"calls=%([\\w.]+)[^\\n]*__ynn_fusion", hlo)
bodies = [hlo.split("%" + name + " ", 1)[1].split("\\n}}", 1)[0] for name in fused]
eltwise = sum(1 for body in bodies if re.search(r" (maximum|subtract)\\(", body))
onednn = hlo.count('custom_call_target="facekd_onednn_conv')
from facekd_jax.models import model_summary
gflops = model_summary("resnet20", image_size=32)["gflops"]
np.savez(sys.argv[1], ynn_eltwise=eltwise, onednn=onednn, loss=float(metrics["total"]), gflops=gflops, **flat)
"""


@pytest.mark.skipif(not xla_flags.jaxlib_is_tested(),
                    reason="the XLA:CPU defaults are only applied on the jaxlib they were tested with")
@pytest.mark.slow
def test_defaults_take_effect_and_change_results_only_by_summation_order(tmp_path):
    """Three feature-KD steps on one CPU device as facekd_jax.main runs them (XLA:CPU defaults, cpu_kernels=auto),
    with flax's layers (cpu_kernels=xla), and with neither: element-wise YNNPACK fusions only with the defaults
    for XLA's convolutions, oneDNN custom calls only with the [cpu] layers, and the same parameters and model FLOPs
    in all three (the [cpu] layers' three steps agree with the plain path)."""
    script = tmp_path / "steps.py"
    script.write_text(STEPS.format(tests=str(REPO / "tests")))
    results, procs = {}, {}
    runs = {"on": ("auto", {}), "xla_conv": ("xla", {}), "off": ("xla", {xla_flags.OPT_OUT: "0"})}
    for name, (kernels, extra) in runs.items():  # side by side: each is mostly one process compiling
        env = subprocess_env(1)
        env.pop(xla_flags.OPT_OUT, None)  # a user's opt-out must not turn the "on" run off
        env.update(extra)
        procs[name] = subprocess.Popen([sys.executable, str(script), str(tmp_path / f"{name}.npz"), kernels],
                                       cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        errors = {name: proc.communicate(timeout=400)[1] for name, proc in procs.items()}
    finally:
        for proc in procs.values():
            proc.kill()
    for name, proc in procs.items():
        assert proc.returncode == 0, errors[name][-3000:]
        results[name] = dict(np.load(tmp_path / f"{name}.npz"))
    eltwise = {name: int(r.pop("ynn_eltwise")) for name, r in results.items()}
    assert eltwise["xla_conv"] >= eltwise["off"] + 10, eltwise  # 20 vs 1 with jaxlib 0.10.2
    if xla_flags.onednn_expected(subprocess_env(1)):  # then the defaults leave the element-wise fusions out
        assert eltwise["on"] == eltwise["off"], eltwise
    onednn = {name: int(r.pop("onednn")) for name, r in results.items()}
    assert onednn["xla_conv"] == onednn["off"] == 0, onednn
    if onednn_lib.available():
        # resnet8 student and teacher, 9 convolutions each: the student's 3 passes (less the stem's input
        # gradient, which nothing uses) and the frozen teacher's forward
        assert onednn["on"] == (3 * 9 - 1) + 9, onednn
    off = results.pop("off")
    for name, r in results.items():
        # A model's FLOPs do not depend on which library XLA:CPU fuses with (they did when counted after
        # compiling), nor on oneDNN (counted with XLA's convolutions).
        assert r.pop("gflops") == off["gflops"], name
        assert np.isfinite(r["loss"]) and r["loss"] == pytest.approx(off["loss"], rel=1e-4), name
        assert r.keys() == off.keys() - {"gflops"}, name
        for key in r:
            np.testing.assert_allclose(r[key], off[key], rtol=1e-3, atol=1e-5, err_msg=f"{name}: {key}")
