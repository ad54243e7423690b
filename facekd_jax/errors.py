"""The errors a user acts on, in one place, with the exit status the command line gives each (facekd_jax.main).

  InputError (2)          bad input: a missing path, a malformed file or spec, an unknown config key, a changed
                          config on an old workdir, a URL where a local path is needed
  WorkdirLockedError (1)  another live run writes the workdir
  NonFiniteLossError (1)  a NaN or Inf loss or gradient (the last good checkpoint is kept)
Exit status 75 means preempted (a checkpoint was saved; rerun to resume), 3 a TPU plan that does not fit.
"""
from __future__ import annotations


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
