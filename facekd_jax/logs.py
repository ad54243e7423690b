"""The process set-up of the commands that are not facekd_jax.main (suite, sweep, teachers): one line per event
at INFO, and JAX and TensorFlow started as main starts them (`start_process`).

The libraries underneath (Orbax logs about ten lines per checkpoint, JAX its compilation cache, clu's metric
writer a second copy of every progress line: the scalars still go to TensorBoard) keep only their warnings and
errors on a handler the LibraryChatter filter is attached to."""
from __future__ import annotations

import logging
import os
from typing import Optional

QUIET_PATHS = ("/orbax/", "/jax/_src/", "/clu/metric_writers/")


class LibraryChatter(logging.Filter):
    """Drops records below WARNING whose source file lies in one of QUIET_PATHS."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or not any(q in record.pathname for q in QUIET_PATHS)


def quiet(handler: logging.Handler) -> logging.Handler:
    handler.addFilter(LibraryChatter())
    return handler


def start_process(*, workdir: Optional[str] = None, onednn: bool = True) -> None:
    """Before JAX starts: INFO logging with the library chatter filtered, TensorFlow quiet and off the GPUs (it only
    feeds data), facekd_jax's XLA:CPU flags (facekd_jax.cpu.xla_flags), and with `workdir` a persistent compilation
    cache in it (the runs of a table share their init and eval programs: compiled once)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    for handler in logging.getLogger().handlers:
        quiet(handler)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if workdir:
        os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(os.path.abspath(workdir), ".jax_cache"))
        os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")
    from facekd_jax.cpu import xla_flags
    xla_flags.apply_cpu_defaults(onednn=onednn)  # XLA reads XLA_FLAGS once, when JAX starts its first backend
    import tensorflow as tf
    tf.config.set_visible_devices([], "GPU")
