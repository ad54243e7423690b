"""The thesis suite end to end at toy size: every run of the suite trains, evaluates and lands in the table."""
import json

import pytest

from facekd_jax import suite

TOY = {"student": "resnet8", "teacher": "resnet10", "image_size": 16, "batch_size": 16, "embedding_size": 32}


@pytest.mark.slow
def test_suite_end_to_end_writes_summary_table_and_roc(tmp_path):
    logs = []
    summary = suite.run_suite("synthetic:8:16", str(tmp_path), steps=3, overrides=dict(TOY, val_targets=("synthetic:60",)),
                              log=logs.append)
    names = [r[0] for r in suite.RUNS]
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    assert list(on_disk["models"]) == names
    keys = {"accuracy", "accuracy_std", "eer", "fnmr_at_fmr", "params", "gflops", "mb", "p_value_vs_baseline",
            "train_seconds"}
    for name, row in on_disk["models"].items():
        assert keys <= set(row), name
        assert 0.0 <= row["accuracy"] <= 1.0 and row["pairs"] == 60 and row["train_seconds"] > 0
        assert (row["p_value_vs_baseline"] is None) == (name == suite.BASELINE)
    models = on_disk["models"]
    assert models["teacher_resnet18"]["params"] > models["baseline_resnet56"]["params"]  # resnet10 vs resnet8
    table = (tmp_path / "summary.md").read_text()
    for name in names:
        assert name in table
    assert (tmp_path / "roc.png").stat().st_size > 1000
    # A rerun reuses every finished run instead of training again.
    logs.clear()
    suite.run_suite("synthetic:8:16", str(tmp_path), steps=3, overrides=dict(TOY, val_targets=("synthetic:60",)),
                    log=logs.append)
    assert sum("reused" in line for line in logs) == len(names)


def test_suite_rejects_unknown_runs_and_missing_verification_sets(tmp_path):
    with pytest.raises(ValueError, match="unknown suite runs"):
        suite.run_suite("synthetic", str(tmp_path), only=["nope"])
    with pytest.raises(ValueError, match="--val"):
        suite.suite_config("baseline_resnet56", data="folder:/x", workdir=str(tmp_path), steps=1, overrides={})
