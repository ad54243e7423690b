"""Test set-up: 8 fake CPU devices (set before JAX starts) and paths to shared real data."""
import os
import pathlib

# Sharding is tested on 8 fake CPU devices; this must happen before jax is imported anywhere.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# The XLA:CPU defaults facekd_jax.main applies (YNNPACK fusions), so the tests run the code users run; the
# subprocesses the tests start inherit them. facekd_jax.cpu.xla_flags imports no JAX.
from facekd_jax.cpu import xla_flags  # noqa: E402

xla_flags.apply_cpu_defaults()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
# The tests run on the CPU: with the [tpu] extra installed (the TPU plan's tests), JAX would otherwise try to start
# a TPU backend in every process, and the first would hold libtpu's lock file that the plan's compile-only client
# needs (facekd_jax.plan also sets ALLOW_MULTIPLE_LIBTPU_LOAD for that).
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent XLA cache for the whole session, shared with the subprocesses the tests start: the same train
# step compiled by a resumed run, a second process or eval mode is then read back instead of recompiled.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import tempfile

    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="facekd-jax-cache-")
# Every program, however small: an op run outside jit compiles one per shape (about 0.25 s each here), and the
# same few hundred recur in every worker and subprocess (a model's eager init alone is ~80 of them).
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
LFW_DIR = REPO.parent / "shared" / "data" / "lfw"


def pytest_collection_modifyitems(config, items):
    """The tests marked slow first, each group in file order: xdist hands tests out in collection order, so the
    long ones start early and the workers finish together, instead of one running a two-minute test at the end
    while the other waits."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(scope="session")
def lfw_dir():
    """The shared LFW copy (../shared/data/lfw); tests that need it skip where it is absent."""
    if not (LFW_DIR / "pairs.txt").exists():
        pytest.skip(f"real LFW data not found at {LFW_DIR} (see ../shared/data/lfw/SOURCE.md)")
    return LFW_DIR


@pytest.fixture
def one_device():
    """In-process runs in this test use one device (runs.one_device)."""
    from runs import one_device as context

    with context():
        yield

