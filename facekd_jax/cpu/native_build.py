"""Compiling the oneDNN handlers (cpu/onednn.cc, by cpu/onednn.py) on first use, into a per-user cache.

The library lands in $FACEKD_CACHE_DIR (default ~/.cache/facekd_jax) under a name keyed by the source, the
command and any versions given, so a changed source or library gets a new build. No JAX import here.
"""
from __future__ import annotations

import hashlib
import os
import pathlib
import subprocess
import tempfile
from typing import Iterable, Sequence

from facekd_jax.paths import cache_dir  # pure Python, no JAX import


class BuildError(RuntimeError):
    """A native piece could not be built (the message names the source, the command and the compiler's words)."""


def build_shared_library(source: pathlib.Path, cmd: Sequence[str], key_parts: Iterable[str] = (),
                         force: bool = False) -> pathlib.Path:
    """Runs `cmd + ["-o", output]` (a compile of `source` to a shared library) once per source, command and
    key_parts; returns the library in cache_dir(). Built in a temporary directory and renamed into place, so
    parallel processes never load a half-written file; raises BuildError with the compiler's message."""
    key = hashlib.sha256(source.read_bytes())
    for part in (*key_parts, *cmd):
        key.update(str(part).encode())
    target = cache_dir() / f"{source.stem}-{key.hexdigest()[:16]}.so"
    if target.exists() and not force:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = pathlib.Path(tmp) / target.name
        full = [*cmd, "-o", str(out)]
        proc = subprocess.run(full, capture_output=True, text=True)
        if proc.returncode != 0:
            raise BuildError(f"compiling {source.name} failed ({' '.join(full)}):\n{proc.stderr[-2000:]}")
        os.replace(out, target)
    return target
