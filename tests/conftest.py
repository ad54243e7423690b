"""Test set-up: 8 fake CPU devices (set before JAX starts) and paths to shared real data."""
import os
import pathlib

# Sharding is tested on 8 fake CPU devices; this must happen before jax is imported anywhere.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
LFW_DIR = REPO.parent / "shared" / "data" / "lfw"


@pytest.fixture(scope="session")
def lfw_dir():
    """The shared LFW copy (../shared/data/lfw); tests that need it skip where it is absent."""
    if not (LFW_DIR / "pairs.txt").exists():
        pytest.skip(f"real LFW data not found at {LFW_DIR} (see ../shared/data/lfw/SOURCE.md)")
    return LFW_DIR
