"""A gs:// workdir (facekd_jax.paths): the run works in a local staging folder mirrored to the bucket after
every checkpoint and at the end; a rerun on a machine without that folder resumes from the bucket.

The bucket is fake and offline: etils.epath's own testing hook (`epath.testing.mock_epath`, the path layer Orbax
uses too) maps gs://NAME/... onto a folder that the code under test only ever sees as a gs:// URL; anything that
bypassed the path layer would create a local folder `gs:` in the working directory, which the test forbids."""
import json
import os
import shutil

import pytest
from etils.epath import gpath as epath_gpath
from etils.epath import testing as epath_testing

from runs import one_device, tiny_config
from facekd_jax import paths
from facekd_jax import errors, eval_only, train


@pytest.fixture
def bucket(tmp_path, monkeypatch):
    root = tmp_path / "bucket"
    root.mkdir()
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    stages = tmp_path / "stages"
    monkeypatch.setattr(paths, "staging_dir", lambda url: str(stages / url.split("://", 1)[1].replace("/", "_")))

    def local(path):
        text = os.fspath(path)
        return str(root / text[len("gs://"):]) if text.startswith("gs://") else text

    def one(fn, path, *args, **kwargs):
        return fn(local(path), *args, **kwargs)

    def two(fn, path, dst, *args, **kwargs):
        return fn(local(path), local(dst), *args, **kwargs)

    def walk(fn, top, **kwargs):
        yield from fn(local(top), **kwargs)

    # With TensorFlow installed epath sends gs:// to tf.io.gfile whatever backend mock_epath installs: let the
    # mocked one answer, as it does where TensorFlow is absent.
    monkeypatch.setattr(epath_gpath, "_is_tf_installed", lambda: False)
    with epath_testing.mock_epath(open=one, exists=one, glob=one, isdir=one, listdir=one, makedirs=one, mkdir=one,
                                  remove=one, rmtree=one, stat=one, walk=walk, copy=two, rename=two, replace=two):
        yield root


def _files(folder):
    return sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs)


def test_a_gs_workdir_is_mirrored_to_the_bucket_and_resumes_from_it_on_a_new_machine(bucket, tmp_path):
    config = tiny_config(num_train_steps=4, checkpoint_every_steps=2, keep_checkpoints=1)
    with one_device():
        out = train.train_and_evaluate(config, "gs://bkt/run")
    assert out["step"] == 4 and out["eval"]
    run = bucket / "bkt" / "run"
    stored = _files(run)
    assert "config.json" in stored and "eval/results.json" in stored
    assert any(f.startswith("events.out.tfevents") for f in stored)
    assert sorted(os.listdir(run / "checkpoints")) == ["4"]  # step 2 rotated out here and there
    assert "lock" not in stored and not any(".orbax-checkpoint-tmp" in f for f in stored)
    assert os.listdir(tmp_path / "cwd") == []  # nothing went around the path layer (no local `gs:` folder)
    assert stored == _files(paths.staging_dir("gs://bkt/run")), "the bucket holds what the run wrote"

    # A new machine: no staging folder. The rerun pulls the bucket and resumes at step 4.
    shutil.rmtree(paths.staging_dir("gs://bkt/run"))
    config.num_train_steps = 6
    with one_device():
        out = train.train_and_evaluate(config, "gs://bkt/run")
    assert out["step"] == 6 and sorted(os.listdir(run / "checkpoints")) == ["6"]
    meta = json.loads((run / "checkpoints" / "6" / "meta" / "metadata").read_text())
    assert meta["step"] == 6

    # A changed architecture on the bucket's run: refused naming the URL and the field, the bucket untouched.
    snapshot = {f: (run / f).read_bytes() for f in _files(run)}
    with pytest.raises(errors.ConfigMismatchError, match=r"gs://bkt/run holds a run .*embedding_size"):
        train.train_and_evaluate(tiny_config(num_train_steps=8, embedding_size=24), "gs://bkt/run")
    assert {f: (run / f).read_bytes() for f in _files(run)} == snapshot

    # --mode=eval on the URL: a local copy, the results pushed back.
    before = (run / "eval" / "results.json").read_text()
    (run / "eval" / "results.json").unlink()
    with one_device():
        eval_only.evaluate_workdir(config, "gs://bkt/run")
    assert json.loads((run / "eval" / "results.json").read_text())["step"] == 6 and before

    # A live run elsewhere holds the bucket's lock: refused, nothing in the bucket changed.
    (run / "lock").write_text(json.dumps({"host": "another-host", "pid": 1, "since": "today"}))
    snapshot = {f: (run / f).read_bytes() for f in _files(run)}
    with pytest.raises(errors.WorkdirLockedError, match="another-host"):
        train.train_and_evaluate(config, "gs://bkt/run")
    assert {f: (run / f).read_bytes() for f in _files(run)} == snapshot
    assert os.listdir(tmp_path / "cwd") == []


@pytest.mark.slow
def test_a_gs_teacher_data_and_cache_are_read_from_local_copies(bucket, tmp_path, one_device):
    """A teacher run, a folder of faces, a .bin verification set and a teacher cache in the bucket, each read from
    a local copy: a student distils from the live teacher on the bucket's faces and evaluates on its .bin; a cache
    built from the bucket's teacher and faces records their URLs, and a run reads it back from the bucket."""
    import io

    import numpy as np
    from PIL import Image

    from test_teacher_cache import SIZE, make_teacher_run
    from facekd_jax.data import verification
    from facekd_jax.teachers import cache as cache_lib

    make_teacher_run(tmp_path / "teacher_src")
    shutil.copytree(tmp_path / "teacher_src", bucket / "bkt" / "teacher")
    rng = np.random.default_rng(0)

    def png(person):
        pixels = np.clip(rng.normal(60 + 60 * person, 20, (2 * SIZE, 2 * SIZE, 3)), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="PNG")
        return buf.getvalue()

    for person in range(3):
        (bucket / "bkt" / "faces" / f"p{person}").mkdir(parents=True)
        for k in range(4):
            (bucket / "bkt" / "faces" / f"p{person}" / f"{k}.png").write_bytes(png(person))
    verification.write_bin(str(bucket / "bkt" / "val.bin"), [png(k % 3) for k in range(40)], [True, False] * 10)
    cfg = tiny_config("feature_kd", **{"teacher.model": "resnet8", "teacher.workdir": "gs://bkt/teacher",
                                       "num_train_steps": 2, "data.train": "folder:gs://bkt/faces",
                                       "data.val_targets": ("bin:gs://bkt/val.bin",)})
    out = train.train_and_evaluate(cfg, str(tmp_path / "student"))
    assert out["step"] == 2 and out["metrics"]["total"] > out["metrics"]["ce"]  # the KD term is there
    assert out["eval"]["val"]["pairs"] == 20
    cache = cache_lib.build_cache("gs://bkt/teacher", "folder:gs://bkt/faces", str(tmp_path / "cache"),
                                  progress=False)
    assert cache.header["teacher"]["workdir"] == "gs://bkt/teacher"
    assert cache.header["data"]["spec"] == "folder:gs://bkt/faces" and cache.header["data"]["num_images"] == 12
    shutil.copytree(tmp_path / "cache", bucket / "bkt" / "cache")
    cfg.teacher.cache = "gs://bkt/cache"
    out = train.train_and_evaluate(cfg, str(tmp_path / "student_from_cache"))
    assert out["step"] == 2 and out["metrics"]["total"] > out["metrics"]["ce"]
    with pytest.raises(ValueError, match="local folder"):  # a cache is written locally, then copied
        cache_lib.build_cache("gs://bkt/teacher", "folder:gs://bkt/faces", "gs://bkt/cache2", progress=False)
    assert os.listdir(tmp_path / "cwd") == []  # nothing went around the path layer (no local `gs:` folder)
