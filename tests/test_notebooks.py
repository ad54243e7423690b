"""The Colab notebooks: committed without outputs, public API only, and run top to bottom on CPU at toy size.

Each notebook in notebooks/ is executed headless with nbclient in a kernel of this interpreter, with
FACEKD_SMOKE=1 (the notebooks' switch to tiny models and a few steps) and one CPU device, as CI does.
"""
import importlib.util
import json
import pathlib
import re
import sys

import nbformat
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))

# What each notebook must have shown once it has run (besides: no cell failed).
EXPECTED_TEXT = {
    "quickstart.ipynb": ["smoke: True", "| teacher |", "| feature_kd |", "McNemar p vs that seed's baseline (b, c)"],
    "distill_your_own.ipynb": ["smoke: True", "McNemar, feature_kd vs teacher", "McNemar, feature_kd vs baseline",
                               "p vs baseline (b, c)", "reloaded student on synthetic"],
}
# The quickstart's TPU plan cell: the tiny config planned for Colab's TPU where the [tpu] extra is installed.
EXPECTED_TEXT["quickstart.ipynb"].append("== colab: 1 x TPU v5e" if importlib.util.find_spec("libtpu")
                                         else "no TPU compiler here")
EXPECTED_IMAGES = {"quickstart.ipynb": 1, "distill_your_own.ipynb": 2}  # ROC (+ the training images)
# A private name of the library (facekd_jax.<module>._x or `from facekd_jax... import _x`).
PRIVATE = re.compile(r"\b(?:train|evaluate|suite|data|models|losses|checkpoint|synthetic|facekd_jax)\._[A-Za-z]"
                     r"|from facekd_jax[\w.]* import (?:.*, *)?_[A-Za-z]")


def test_the_documented_notebooks_exist():
    assert {p.name for p in NOTEBOOKS} >= set(EXPECTED_TEXT), [p.name for p in NOTEBOOKS]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_committed_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3"  # what Colab starts
    dirty = [i for i, cell in enumerate(nb.cells) if cell.cell_type == "code"
             and (cell.get("outputs") or cell.get("execution_count") is not None)]
    assert not dirty, f"{path.name}: cells {dirty} carry outputs; clear them before committing"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_uses_only_the_public_api(path):
    nb = nbformat.read(path, as_version=4)
    code = "\n".join(cell.source for cell in nb.cells if cell.cell_type == "code")
    assert not PRIVATE.findall(code), f"{path.name} reaches into private names: {PRIVATE.findall(code)}"
    assert "FACEKD_SMOKE" in code, f"{path.name} ignores the FACEKD_SMOKE switch"


def _kernel_for_this_python(root: pathlib.Path) -> str:
    """Writes a kernelspec that starts ipykernel with sys.executable under root; returns its name."""
    name = "facekd-test-python"
    folder = root / "kernels" / name
    folder.mkdir(parents=True)
    spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "facekd_jax tests", "language": "python"}
    (folder / "kernel.json").write_text(json.dumps(spec))
    return name


def _outputs(nb):
    texts, images = [], 0
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.output_type == "stream":
                texts.append(out.text)
            elif out.output_type in ("display_data", "execute_result"):
                texts.extend(str(out.data[k]) for k in ("text/markdown", "text/plain") if k in out.data)
                images += "image/png" in out.data
    return "\n".join(texts), images


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_top_to_bottom_in_smoke_mode(path, tmp_path, monkeypatch):
    from nbclient import NotebookClient

    jupyter = tmp_path / "jupyter"
    kernel = _kernel_for_this_python(jupyter)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    # The kernel inherits this environment: our kernelspec, the smoke switch, one CPU device, temp files here.
    monkeypatch.setenv("JUPYTER_PATH", str(jupyter))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))
    monkeypatch.setenv("JUPYTER_PLATFORM_DIRS", "1")
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    monkeypatch.setenv("MPLCONFIGDIR", str(tmp_path / "matplotlib"))
    monkeypatch.setenv("FACEKD_SMOKE", "1")
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setenv("TMPDIR", str(scratch))
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, kernel_name=kernel, timeout=600, startup_timeout=120,
                            resources={"metadata": {"path": str(path.parent)}})
    client.execute()  # raises CellExecutionError (with the cell and traceback) when a cell fails

    text, images = _outputs(nb)
    missing = [s for s in EXPECTED_TEXT.get(path.name, ["smoke: True"]) if s not in text]
    assert not missing, f"{path.name}: {missing} not in the outputs:\n{text[-4000:]}"
    assert images >= EXPECTED_IMAGES.get(path.name, 0), f"{path.name}: {images} images shown"
    # Smoke runs write their data and runs under TMPDIR.
    assert list(scratch.iterdir()), "the notebook wrote nothing under TMPDIR"
    if path.name == "distill_your_own.ipynb":
        exported = {p.name for p in scratch.glob("*/runs/export_*/*")}
        assert {"student.msgpack", "config.json", "model.json"} <= exported, exported
