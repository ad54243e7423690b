"""The errors a user acts on, in one place, and the exit status every command line gives them.

Exit statuses of every command (facekd_jax.main, suite, plan, export, teachers, data.convert):
  0   done
  2   a usage or input error: a missing path, a malformed file, record or spec, an unknown config key, a changed
      config on an old workdir, a URL where a local path is needed (InputError, FileNotFoundError, ValueError, ...)
  3   a TPU plan that does not fit (facekd_jax.plan)
  75  preempted (SIGTERM): a checkpoint of the step reached was saved; rerun the same command to resume
  1   anything else: a full disk (ENOSPC), another run holding the workdir, a NaN loss, a failed checkpoint save
      (one line each), or a bug (with its traceback)
Expected failures end in one line, `error: ...`, the cause last; FACEKD_TRACEBACK=1 shows the traceback too.
"""
from __future__ import annotations

import contextlib
import errno
import os
import sys
from typing import Iterator, Optional

EXIT_ERROR, EXIT_USAGE, EXIT_DOES_NOT_FIT, EXIT_PREEMPTED = 1, 2, 3, 75
# OS errors that are the machine's, not the program's: the disk is full or read-only, or a path is not ours.
_DISK = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO}


class InputError(ValueError):
    """Input the user must fix; the message names the file, record, field or key and what to do."""


class ConfigMismatchError(InputError):
    """The workdir holds a run trained with another config."""


class NonLocalPathError(InputError):
    """A URL (gs://, s3://, ...) where only a local path will do (a data kind whose registry entry says LOCAL)."""


class WorkdirLockedError(RuntimeError):
    """Another live run holds the workdir."""


class NonFiniteLossError(FloatingPointError):
    """A step's loss or gradient was NaN or Inf."""


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written (a full disk, a lost bucket); the message names the step and cause."""


def exit_status(error: BaseException) -> Optional[int]:
    """The exit status of an expected failure, reported in one line; None for anything else (a bug: traceback).
    An error class of a command may say its own (`exit_status = 3`)."""
    own = getattr(type(error), "exit_status", None)
    if own is not None:
        return int(own)
    if isinstance(error, (WorkdirLockedError, NonFiniteLossError, CheckpointSaveError)):
        return EXIT_ERROR
    if isinstance(error, OSError) and error.errno in _DISK:
        return EXIT_ERROR
    if isinstance(error, (InputError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
                          KeyError, ValueError)):
        return EXIT_USAGE
    return None


def message(error: BaseException) -> str:
    """The error as one line (a KeyError's message without its quotes; an OSError with its path)."""
    if isinstance(error, KeyError) and error.args:
        text = str(error.args[0])
    elif isinstance(error, OSError) and error.filename and str(error.filename) not in str(error.strerror or ""):
        text = f"{error.filename}: {error.strerror or error}"
    else:
        text = str(error) or type(error).__name__
    return " ".join(text.split())


@contextlib.contextmanager
def writing(path) -> Iterator[None]:
    """Around a write to `path`: an OSError that names no file (a full disk met by f.write) names `path`, so the
    one line a user sees says where the disk filled."""
    try:
        yield
    except OSError as e:
        if e.filename is None:
            raise OSError(e.errno, e.strerror or str(e), str(path)) from e
        raise


@contextlib.contextmanager
def command_line() -> Iterator[None]:
    """Around a command's body: an expected failure becomes `error: <one line>` on stderr and its exit status
    (exit_status); a bug keeps its traceback. FACEKD_TRACEBACK=1 keeps every traceback."""
    try:
        yield
    except (SystemExit, KeyboardInterrupt):
        raise
    except BaseException as e:  # noqa: BLE001
        status = exit_status(e)
        if status is None or os.environ.get("FACEKD_TRACEBACK", "") not in ("", "0"):
            raise
        print(f"error: {message(e)}", file=sys.stderr, flush=True)
        sys.exit(status)
