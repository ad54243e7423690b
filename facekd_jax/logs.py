"""The process set-up of the commands that are not facekd_jax.main (suite, sweep, teachers): one line per event
at INFO, and JAX and TensorFlow started as main starts them (`start_process`).

The libraries underneath (Orbax logs about ten lines per checkpoint, JAX its compilation cache, clu's metric
writer a second copy of every progress line: the scalars still go to TensorBoard) keep only their warnings and
errors on a handler the LibraryChatter filter is attached to."""
from __future__ import annotations

import glob
import importlib.util
import logging
import os
import sys
from typing import Optional

QUIET_PATHS = ("/orbax/", "/jax/_src/", "/clu/metric_writers/")


class LibraryChatter(logging.Filter):
    """Drops records below WARNING whose source file lies in one of QUIET_PATHS."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or not any(q in record.pathname for q in QUIET_PATHS)


def quiet(handler: logging.Handler) -> logging.Handler:
    handler.addFilter(LibraryChatter())
    return handler


def skip_absent_tpu() -> None:
    """Before JAX starts: with libtpu installed (the [tpu] extra, for TPU plans) on a machine without a TPU and
    without a GPU plugin, JAX_PLATFORMS=cpu, so that JAX does not try the TPU first and libtpu does not print its
    failed start (a dozen lines about TPU worker hostnames) on every command. An explicit JAX_PLATFORMS, a TPU
    host (/dev/accel*, /dev/vfio/N) or an installed CUDA plugin is left alone; compile-only TPU devices
    (facekd_jax.plan) need no TPU platform."""
    if os.environ.get("JAX_PLATFORMS") or importlib.util.find_spec("libtpu") is None:
        return
    if glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*") or os.environ.get("COLAB_TPU_ADDR"):
        return
    if any(importlib.util.find_spec(p) for p in ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin")):
        return
    os.environ["JAX_PLATFORMS"] = "cpu"
    if "jax" in sys.modules:  # imported already (a config file imports it): its option, read from the environment
        sys.modules["jax"].config.update("jax_platforms", "cpu")  # at import, is still open until a backend starts


def start_process(*, workdir: Optional[str] = None, onednn: bool = True) -> None:
    """Before JAX starts: INFO logging with the library chatter filtered, TensorFlow quiet and off the GPUs (it only
    feeds data), facekd_jax's XLA:CPU flags (facekd_jax.cpu.xla_flags), and with `workdir` a persistent compilation
    cache in it (the runs of a table share their init and eval programs: compiled once)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    for handler in logging.getLogger().handlers:
        quiet(handler)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    skip_absent_tpu()
    if workdir:
        os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(os.path.abspath(workdir), ".jax_cache"))
        os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")
    from facekd_jax.cpu import xla_flags
    xla_flags.apply_cpu_defaults(onednn=onednn)  # XLA reads XLA_FLAGS once, when JAX starts its first backend
    import tensorflow as tf
    tf.config.set_visible_devices([], "GPU")
