"""One line per event at INFO: the libraries underneath (Orbax logs about ten lines per checkpoint, JAX its
compilation cache, clu's metric writer a second copy of every progress line: the scalars still go to TensorBoard)
keep only their warnings and errors on a handler this filter is attached to."""
from __future__ import annotations

import logging

QUIET_PATHS = ("/orbax/", "/jax/_src/", "/clu/metric_writers/")


class LibraryChatter(logging.Filter):
    """Drops records below WARNING whose source file lies in one of QUIET_PATHS."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or not any(q in record.pathname for q in QUIET_PATHS)


def quiet(handler: logging.Handler) -> logging.Handler:
    handler.addFilter(LibraryChatter())
    return handler
