"""facekd_jax.xla_flags: the XLA:CPU defaults are added only where they should be, and change results only by
float summation order."""
import importlib.metadata
import subprocess
import sys

import numpy as np
import pytest

from runs import REPO, subprocess_env
from facekd_jax import xla_flags
from facekd_jax.models import onednn_conv

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
    for not_onednn in ({xla_flags.ONEDNN_OPT_OUT: "0"},
                       {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}):  # sharded: XLA's convolutions
        assert not xla_flags.onednn_expected(not_onednn)
        assert YNN in xla_flags.apply_cpu_defaults(not_onednn)
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
from facekd_jax import xla_flags
xla_flags.apply_cpu_defaults()
import jax, numpy as np
from runs import synthetic_batches, tiny_config, train_setup
from facekd_jax import train

config = tiny_config("feature_kd", **{{"teacher.model": "resnet8"}})
mesh = train.make_mesh(1)
state, step, tvars = train_setup(config, mesh)
batches = synthetic_batches(config, 3)
hlo = step.lower(state, train.put_batch(batches[0], mesh), tvars).compile().as_text()
for b in batches:
    state, metrics = step(state, train.put_batch(b, mesh), tvars)
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
def test_defaults_take_effect_and_change_results_only_by_summation_order(tmp_path):
    """Three feature-KD steps on one CPU device as facekd_jax.main runs them (XLA:CPU defaults, oneDNN
    convolutions), with XLA's convolutions, and with neither: element-wise YNNPACK fusions only with the defaults
    for XLA's convolutions, oneDNN custom calls only where not opted out, and the same parameters and model FLOPs
    in all three."""
    script = tmp_path / "steps.py"
    script.write_text(STEPS.format(tests=str(REPO / "tests")))
    results = {}
    runs = {"on": {}, "xla_conv": {onednn_conv.OPT_OUT: "0"},
            "off": {xla_flags.OPT_OUT: "0", onednn_conv.OPT_OUT: "0"}}
    for name, extra in runs.items():
        env = subprocess_env(1)
        for key in (xla_flags.OPT_OUT, onednn_conv.OPT_OUT):
            env.pop(key, None)  # a user's opt-out must not turn the "on" run off
        env.update(extra)
        proc = subprocess.run([sys.executable, str(script), str(tmp_path / f"{name}.npz")], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[name] = dict(np.load(tmp_path / f"{name}.npz"))
    eltwise = {name: int(r.pop("ynn_eltwise")) for name, r in results.items()}
    assert eltwise["xla_conv"] >= eltwise["off"] + 10, eltwise  # 20 vs 1 with jaxlib 0.10.2
    if xla_flags.onednn_expected(subprocess_env(1)):  # then the defaults leave the element-wise fusions out
        assert eltwise["on"] == eltwise["off"], eltwise
    onednn = {name: int(r.pop("onednn")) for name, r in results.items()}
    assert onednn["xla_conv"] == onednn["off"] == 0, onednn
    if onednn_conv.available():
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


RESTART = """
import os, sys
print("pid", os.getpid(), flush=True)
from facekd_jax import xla_flags
xla_flags.restart_with_cpu_memory_settings()
print("tunables", os.environ.get("GLIBC_TUNABLES", ""), flush=True)
print("preload", os.environ.get("LD_PRELOAD", ""), flush=True)
"""


def _run(code, env, timeout=120):
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.splitlines()


def test_restart_adds_the_huge_page_tunable_and_block_cache_once_and_keeps_the_users():
    env = subprocess_env(1)
    env.pop(xla_flags.OPT_OUT, None)
    env["GLIBC_TUNABLES"] = "glibc.malloc.tcache_count=8"  # the user's own: kept
    env["LD_PRELOAD"] = ""
    if not xla_flags.huge_pages_wanted(dict(env, GLIBC_TUNABLES="")) or not xla_flags.block_cache_wanted(env):
        pytest.skip("no transparent huge pages, glibc < 2.35 or not glibc here: the restart is rightly skipped")
    lines = _run(RESTART, env)
    # the same process (exec keeps the pid) ran the script twice: before and after the restart
    assert [line.split()[0] for line in lines] == ["pid", "pid", "tunables", "preload"] and lines[0] == lines[1]
    assert lines[2] == "tunables glibc.malloc.tcache_count=8:" + xla_flags.HUGE_PAGES_TUNABLE
    assert lines[3] == f"preload {xla_flags.build_block_cache()}"
    for name, value in ((xla_flags.OPT_OUT, "0"), ("JAX_PLATFORMS", "cuda")):
        lines = _run(RESTART, dict(env, **{name: value}))
        assert len(lines) == 3 and "hugetlb=1" not in lines[1] and "block_cache" not in lines[2], (name, lines)
    # what the user set already is not added again, and the rest still is
    lines = _run(RESTART, dict(env, GLIBC_TUNABLES="glibc.malloc.hugetlb=0"))
    assert lines[2] == "tunables glibc.malloc.hugetlb=0" and "block_cache-" in lines[3], lines


BLOCK_CACHE = """
import ctypes, resource
libc = ctypes.CDLL(None)
libc.posix_memalign.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t, ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]

def alloc(mib):
    p = ctypes.c_void_p()
    assert libc.posix_memalign(ctypes.byref(p), 64, mib << 20) == 0
    return p.value

def touch(p, mib):  # first byte as it was, and the page faults of writing every page
    first = ctypes.c_ubyte.from_address(p).value
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    ctypes.memset(p, 0xAB, mib << 20)
    return first, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

a = alloc(100); touch(a, 100); libc.free(a)
b = alloc(96)  # fits the kept 100 MiB block
print("reuse", b == a, *touch(b, 96))
libc.free(b)
c = alloc(40)  # below the 64 MiB threshold: glibc's, the kept block stays
d = alloc(30 + 64)
print("again", d == a, *touch(d, 94))
"""


def test_block_cache_hands_a_freed_large_block_to_the_next_request():
    """Without the cache the freed 100 MiB block goes back to the kernel and the next one faults in zeroed pages
    again; with it the same block, with its old contents, comes back without a fault."""
    env = subprocess_env(1)
    env.pop("GLIBC_TUNABLES", None)
    library = xla_flags.build_block_cache() if xla_flags.block_cache_wanted(dict(env, LD_PRELOAD="")) else None
    if library is None:
        pytest.skip("the large-block cache is not used on this machine (not Linux/glibc, or no C compiler)")
    plain = _run(BLOCK_CACHE, dict(env, LD_PRELOAD=""))
    cached = _run(BLOCK_CACHE, dict(env, LD_PRELOAD=str(library)))
    _, _, first, faults = plain[0].split()
    assert first == "0" and int(faults) > 1000, plain  # fresh zero pages: 96 MiB / 4 KiB = 24k faults
    assert cached[0] == "reuse True 171 0" and cached[1] == "again True 171 0", cached  # 0xAB = 171


FAULTS = """
import resource
import jax, jax.numpy as jnp
from jax import lax

def loss(w, x):  # activations kept for the backward pass: XLA's temporary buffer is about 200 MB
    for i in range(4):
        x = jnp.tanh(lax.conv_general_dilated(x, w[i], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")))
    return jnp.sum(x)

step = jax.jit(jax.grad(loss))
w, x = jnp.full((4, 3, 3, 8, 8), 0.05), jnp.ones((32, 128, 128, 8))
faults = []
for _ in range(5):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step(w, x).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(sum(faults[2:]))
"""


@pytest.mark.skipif(not xla_flags.huge_pages_wanted({"GLIBC_TUNABLES": ""}),
                    reason="no transparent huge pages or glibc < 2.35 on this machine")
def test_huge_pages_remove_the_per_step_page_faults():
    """Each step's fresh temporary buffer faults in 4 KiB pages without the tunable, in 2 MiB pages with it."""
    env = subprocess_env(1)
    env.pop("GLIBC_TUNABLES", None)
    env.pop("LD_PRELOAD", None)  # the block cache would remove the faults on its own (its own test below)
    without = int(_run(FAULTS, env, timeout=300)[-1])
    with_ = int(_run(FAULTS, xla_flags.with_huge_pages(dict(env)), timeout=300)[-1])
    # 3 steps: 123k vs 1k faults on an idle machine, 123k vs 26k beside another test worker (the kernel then
    # finds fewer free 2 MiB pages); a mistyped tunable would leave them equal
    assert without > 20_000 and with_ < without / 2, (without, with_)


def test_a_failed_block_cache_build_is_skipped_and_leaves_the_cache_clean(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("FACEKD_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    assert xla_flags.build_block_cache() is None
    assert "compiling block_cache.c failed" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # nothing half-written left for a later process to preload
