"""A full disk: a run whose file system fills during a checkpoint save, an evaluation write, a teacher cache build
or an export stops with one line naming the path and the cause, keeps everything written before, and resumes
exactly once space is freed. On a small tmpfs the test mounts (root only; skipped elsewhere, with the reason).
The export's case is in test_export.py, beside the student it exports."""
import errno
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from runs import REPO, load_params, subprocess_env, tiny_config
from facekd_jax import checkpoint as ckpt_lib
from facekd_jax import errors, train


class Disk:
    """A tmpfs of a few MiB: fill() takes every free byte with a filler file, free() gives them back."""

    def __init__(self, root: pathlib.Path):
        self.root = root
        self.filler = root / "filler"

    def fill(self) -> None:
        # Unbuffered: a buffered file keeps the bytes that did not fit and raises ENOSPC again when closed.
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        try:
            for size in (64 << 10, 512, 1):  # then the byte-sized room left in the last page
                try:
                    while os.write(fd, b"\0" * size):
                        pass
                except OSError as e:
                    assert e.errno == errno.ENOSPC, e
        finally:
            os.close(fd)

    def free(self) -> None:
        self.filler.unlink()


@pytest.fixture
def disk(tmp_path):
    root = tmp_path / "disk"
    root.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(root)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip() or 'not root'}): the full-disk cases need "
                    "a small real file system")
    try:
        yield Disk(root)
    finally:
        subprocess.run(["umount", "-l", str(root)], capture_output=True)


def _steps(workdir) -> list:
    d = pathlib.Path(workdir) / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.exists() else []


def test_a_disk_that_fills_during_a_checkpoint_save_stops_keeps_the_last_and_resumes_exactly(disk, tmp_path,
                                                                                            one_device,
                                                                                            monkeypatch):
    config = tiny_config("baseline_resnet56", num_train_steps=6, checkpoint_every_steps=2,
                         **{"data.val_targets": ()})
    train.train_and_evaluate(config, str(tmp_path / "straight"))  # the uninterrupted run, on a roomy disk
    save = ckpt_lib.Checkpointer.save

    def fill_before_step_4(self, step, state, meta, **kwargs):
        if step == 4:
            self.wait()   # step 2 is on disk; then the disk is full
            disk.fill()
        return save(self, step, state, meta, **kwargs)

    monkeypatch.setattr(ckpt_lib.Checkpointer, "save", fill_before_step_4)
    workdir = disk.root / "run"
    with pytest.raises(errors.CheckpointSaveError, match=r"step 4 .*[Nn]o space left on device"):
        train.train_and_evaluate(config, str(workdir))
    assert _steps(workdir) == [2] and not (workdir / "lock").exists()
    monkeypatch.setattr(ckpt_lib.Checkpointer, "save", save)
    disk.free()
    out = train.train_and_evaluate(config, str(workdir))  # resumes from step 2
    assert out["step"] == 6 and _steps(workdir) == [2, 4, 6]  # step 4 saved again, this time whole
    (_, a), (_, b) = load_params(tmp_path / "straight"), load_params(workdir)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)


def test_a_disk_that_fills_before_the_evaluation_is_written_keeps_the_checkpoints_and_finishes_later(
        disk, one_device, monkeypatch):
    config = tiny_config("baseline_resnet56", num_train_steps=4, checkpoint_every_steps=2)
    from facekd_jax import evaluate

    write = evaluate.write_results

    def fill_then_write(*args, **kwargs):
        disk.fill()
        return write(*args, **kwargs)

    monkeypatch.setattr(evaluate, "write_results", fill_then_write)
    workdir = disk.root / "run"
    with pytest.raises(OSError) as e:
        train.train_and_evaluate(config, str(workdir))
    assert e.value.errno == errno.ENOSPC and "eval" in str(e.value.filename)
    assert errors.exit_status(e.value) == 1 and "No space left on device" in errors.message(e.value)
    assert _steps(workdir) == [2, 4] and not list((workdir / "eval").glob("*.tmp"))
    monkeypatch.setattr(evaluate, "write_results", write)
    disk.free()
    out = train.train_and_evaluate(config, str(workdir))  # nothing left to train: evaluates and writes
    assert out["step"] == 4 and (workdir / "eval" / "results.json").exists()


def test_a_full_disk_at_the_command_line_is_one_line_naming_the_path(disk):
    disk.fill()
    workdir = disk.root / "run"
    proc = subprocess.run([sys.executable, "-m", "facekd_jax.main",
                           f"--config={REPO / 'configs' / 'baseline_resnet56.py'}:tiny", f"--workdir={workdir}"],
                          cwd=REPO, env=subprocess_env(1), capture_output=True, text=True, timeout=300)
    assert proc.returncode == errors.EXIT_ERROR, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and str(workdir) in last and "No space left on device" in last
    assert "Traceback" not in proc.stderr
    disk.free()
    assert not (workdir / "lock").exists()  # no half-written lock blocks the rerun


def test_a_teacher_cache_on_a_full_disk_keeps_its_finished_rows_and_completes_later(disk, tmp_path, monkeypatch):
    from facekd_jax.teachers import cache as cache_lib
    from test_teacher_cache import SPEC, make_teacher_run

    make_teacher_run(tmp_path / "teacher")
    reference = cache_lib.build_cache(str(tmp_path / "teacher"), SPEC, str(tmp_path / "ref"), batch_size=5,
                                      progress=False)
    out = disk.root / "cache"
    disk.fill()  # no room even to begin: the files it made are removed, nothing half-made blocks a rerun
    with pytest.raises(OSError, match="No space left on device") as e:
        cache_lib.build_cache(str(tmp_path / "teacher"), SPEC, str(out), batch_size=5, progress=False)
    assert str(out) in str(e.value.filename) and list(out.iterdir()) == []
    disk.free()
    embed_rows = cache_lib._embed_rows

    def embed_then_fill(*args, **kwargs):  # every row embedded, then the disk fills before the centres
        done = embed_rows(*args, **kwargs)
        disk.fill()
        return done

    monkeypatch.setattr(cache_lib, "_embed_rows", embed_then_fill)
    with pytest.raises(OSError, match="No space left on device") as e:
        cache_lib.build_cache(str(tmp_path / "teacher"), SPEC, str(out), batch_size=5, progress=False)
    assert "centres" in str(e.value.filename)
    assert np.load(out / "done.npy").all()  # the finished part is on disk
    monkeypatch.setattr(cache_lib, "_embed_rows", lambda *a, **k: pytest.fail("rows re-embedded"))
    disk.free()
    done = cache_lib.build_cache(str(tmp_path / "teacher"), SPEC, str(out), batch_size=5, progress=False)
    assert done.header["complete"]
    np.testing.assert_array_equal(np.asarray(done.embeddings), np.asarray(reference.embeddings))
