"""Export (facekd_jax.export): each format and precision of a small trained student passes its parity gate and
runs in its own runtime; a broken export fails the gate and leaves nothing behind; a missing extra names the
install command."""
import json

import numpy as np
import pytest

from runs import one_device, tiny_config

pytest.importorskip("onnxruntime", reason="the [export] extra is not installed (pip install -e '.[export]')")
pytest.importorskip("ai_edge_litert", reason="the [export] extra is not installed (pip install -e '.[export]')")

from facekd_jax import export, train  # noqa: E402

# One xdist worker trains the module's student once (make test runs --dist loadgroup), not one per worker.
pytestmark = pytest.mark.xdist_group("export")


@pytest.fixture(scope="session")  # session: trained once per worker even when xdist interleaves other modules
def run(tmp_path_factory, lfw_dir):
    """A MobileFaceNet student (PReLU, depthwise convs, GDC head) trained 20 steps on LFW at 32x32."""
    workdir = tmp_path_factory.mktemp("export") / "student"
    config = tiny_config("baseline_resnet56", model="mobilefacenet", embedding_size=32, num_train_steps=20,
                         checkpoint_every_steps=20,  # one save: the tiny variant's every-2-steps cost 45 s here
                         **{"data.image_size": 32, "data.train": f"lfw:{lfw_dir}", "data.val_targets": ()})
    with one_device():
        train.train_and_evaluate(config, str(workdir))
    return workdir


@pytest.fixture(scope="session")
def fp32_bytes():
    """{format: the fp32 export's size}, filled by the fp32 tests for the int8 ones (which export it themselves
    when run alone)."""
    return {}


def _export(run, lfw_dir, fmt, precision, out, **kwargs):
    kwargs = dict(dict(calibration_images=24, parity_images=export.MIN_PARITY_IMAGES), **kwargs)
    return export.export(str(run), fmt=fmt, precision=precision, out=str(out), calibration=f"lfw:{lfw_dir}",
                         parity=f"lfw:{lfw_dir}", log=lambda _: None, **kwargs)


@pytest.mark.parametrize("fmt,precision", [("tflite", "fp32"), ("tflite", "fp16"), ("tflite", "int8"),
                                           ("onnx", "fp32"), ("onnx", "fp16"), ("onnx", "int8")])
def test_each_format_and_precision_passes_its_gate_and_runs(run, lfw_dir, tmp_path, fp32_bytes, fmt, precision):
    out = tmp_path / f"student.{fmt}"
    record = _export(run, lfw_dir, fmt, precision, out)
    assert out.exists() and not (tmp_path / f"student.{fmt}.tmp").exists()
    contract = json.loads((tmp_path / f"student.{fmt}.json").read_text())
    assert contract["input"]["shape"] == [1, 32, 32, 3] and contract["input"]["colour"] == "RGB"
    assert contract["output"]["shape"] == [1, 32] and contract["model"] == "mobilefacenet"
    gate = export.PARITY_GATES[precision]
    assert contract["parity"]["gate"] == gate and contract["parity"]["images"] >= export.MIN_PARITY_IMAGES
    assert contract["parity"]["mean_cosine"] >= gate["mean"] and contract["parity"]["min_cosine"] >= gate["min"]
    assert (contract["calibration"] is not None) == (precision == "int8")
    # The file on its own, in its runtime, against JAX on images the gate did not use.
    student = export.load_student(str(run))
    pixels = np.random.default_rng(5).uniform(0, 255, (4, 32, 32, 3)).astype(np.float32)
    got = export.Runtime(str(out), fmt)(pixels)
    want = export.jax_embeddings(student, pixels)
    assert got.shape == want.shape == (4, 32)
    assert export.cosines(got, want).min() > (0.99999 if precision == "fp32" else 0.9)
    assert record["bytes"] == out.stat().st_size
    if precision == "fp32":
        fp32_bytes[fmt] = record["bytes"]
    if precision == "int8":  # really quantised: a quarter of the fp32 weights, or less
        if fmt not in fp32_bytes:
            fp32_bytes[fmt] = _export(run, lfw_dir, fmt, "fp32", tmp_path / f"fp32.{fmt}")["bytes"]
        assert record["bytes"] < 0.5 * fp32_bytes[fmt]


def test_a_broken_export_fails_the_gate_and_writes_nothing(run, lfw_dir, tmp_path):
    out = tmp_path / "broken.tflite"
    with pytest.raises(export.ExportError, match=r"parity gate: cosine to JAX mean .* min .* nothing was written"):
        _export(run, lfw_dir, "tflite", "fp32", out, scale=1.0)  # the wrong input normalisation (not scaled)
    assert list(tmp_path.iterdir()) == []
    # Too few parity images say little about the least cosine: refused, nothing exported.
    with pytest.raises(export.ExportError, match=r"50 held-back images .* at least 100"):
        _export(run, lfw_dir, "tflite", "fp32", out, parity_images=50)
    assert list(tmp_path.iterdir()) == []


def test_a_missing_extra_names_the_install_command(monkeypatch):
    import importlib

    real = importlib.import_module

    def missing(name, *args):
        if name == "tf2onnx":
            raise ImportError("No module named 'tf2onnx'")
        return real(name, *args)

    monkeypatch.setattr(importlib, "import_module", missing)
    with pytest.raises(export.ExportError, match=r"\[export\]"):
        export._require("tf2onnx")


def test_an_export_onto_a_full_disk_is_one_error_naming_the_file_and_keeps_the_earlier_export(run, lfw_dir,
                                                                                                tmp_path):
    import errno
    import subprocess

    from facekd_jax import errors
    from test_full_disk import Disk

    root = tmp_path / "disk"
    root.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(root)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (not root): the full-disk case needs a small real file system")
    try:
        disk, out = Disk(root), root / "student.tflite"
        _export(run, lfw_dir, "tflite", "fp32", out)
        before = {p.name: p.read_bytes() for p in root.iterdir()}
        disk.fill()
        with pytest.raises(OSError) as e:
            _export(run, lfw_dir, "tflite", "fp32", out)
        assert e.value.errno == errno.ENOSPC and str(e.value.filename) == f"{out}.tmp"
        assert errors.exit_status(e.value) == errors.EXIT_ERROR
        disk.free()
        # The earlier export and its contract as they were: no FILE.tmp, nothing half-written.
        assert {p.name: p.read_bytes() for p in root.iterdir()} == before
        record = _export(run, lfw_dir, "tflite", "fp32", out)  # room again: the same command works
        assert json.loads((root / "student.tflite.json").read_text())["bytes"] == record["bytes"] == out.stat().st_size
    finally:
        subprocess.run(["umount", "-l", str(root)], capture_output=True)
