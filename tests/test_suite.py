"""The thesis suite end to end at toy size: every run of the suite trains, evaluates and lands in the table."""
import json

import pytest

from facekd_jax import config_lib, suite



# The teacher, the baseline and a KD method of each kind (logits against the teacher's, the teacher's centres):
# every method's step is tested in test_train.py; here the suite's machinery, at the tests' `tiny` variant.
SUITE_SUBSET = ["teacher_resnet18", "baseline_resnet56", "conventional_kd", "margin_distillation"]


@pytest.mark.slow
def test_suite_end_to_end_writes_summary_table_and_roc(tmp_path, one_device):
    logs = []
    kwargs = dict(steps=3, only=SUITE_SUBSET, variant="tiny", overrides={"val_targets": ("synthetic:60",)})
    summary = suite.run_suite("synthetic", str(tmp_path), log=logs.append, **kwargs)
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    assert list(on_disk["models"]) == SUITE_SUBSET
    keys = {"accuracy", "accuracy_std", "eer", "fnmr_at_fmr", "params", "gflops", "mb", "p_value_vs_baseline",
            "train_seconds"}
    for name, row in on_disk["models"].items():
        assert keys <= set(row), name
        assert 0.0 <= row["accuracy"] <= 1.0 and row["pairs"] == 60 and row["train_seconds"] > 0
        assert (row["p_value_vs_baseline"] is None) == (name == suite.BASELINE)
    models = on_disk["models"]
    assert models["teacher_resnet18"]["params"] > models["baseline_resnet56"]["params"]  # resnet10 vs resnet8
    # the tiny variant's sizes, the suite's budget
    config = json.loads((tmp_path / "conventional_kd" / "config.json").read_text())
    assert (config["model"], config["teacher"]["model"], config["data"]["image_size"]) == ("resnet8", "resnet10", 16)
    assert config["num_train_steps"] == 3 and config["eval_every_steps"] == -1
    table = (tmp_path / "summary.md").read_text()
    for name in SUITE_SUBSET:
        assert name in table
    assert (tmp_path / "roc.png").stat().st_size > 1000
    # A rerun reuses every finished run instead of training again.
    logs.clear()
    suite.run_suite("synthetic", str(tmp_path), log=logs.append, **kwargs)
    assert sum("reused" in line for line in logs) == len(SUITE_SUBSET)


def test_suite_rejects_unknown_runs_and_missing_verification_sets(tmp_path):
    with pytest.raises(ValueError, match="unknown suite runs"):
        suite.run_suite("synthetic", str(tmp_path), only=["nope"])
    with pytest.raises(ValueError, match="--val"):
        suite.suite_config("baseline_resnet56", data="folder:/x", workdir=str(tmp_path), steps=1, overrides={})


def test_suite_refuses_a_url_workdir_before_anything_is_written(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        suite.main(["--workdir=gs://bucket/suite"])
    assert "must be a local folder" in capsys.readouterr().err and list(tmp_path.iterdir()) == []


def test_suite_config_gives_every_model_the_same_data_budget_and_head(tmp_path):
    configs = {name: suite.suite_config(module, data="lfw:/data/lfw", workdir=str(tmp_path), steps=None,
                                        overrides={"scale": None, "lr": 0.2})
               for name, module, _ in suite.RUNS}
    lfw = config_lib.apply_arg(config_lib.default_config(), "lfw")
    for name, c in configs.items():
        assert c.data.train == "lfw:/data/lfw" and c.data.val_targets == ("lfw:/data/lfw",), name
        assert (c.num_train_steps, c.batch_size, c.data.image_size) == (lfw.num_train_steps, lfw.batch_size,
                                                                         lfw.data.image_size), name
        assert c.scale == lfw.scale and c.optimizer.lr == 0.2, name  # None keeps the variant's; a value wins
        if name != suite.TEACHER and c.teacher.model:
            assert c.teacher.workdir == str(tmp_path / suite.TEACHER), name
            assert c.teacher.embedding_size == c.embedding_size, name
    assert configs[suite.TEACHER].model == "resnet18" and configs[suite.BASELINE].model == "resnet56"
    assert configs["feature_kd"].kd.feature_weight > 0 and not configs[suite.BASELINE].teacher.model
    c = suite.suite_config("baseline_resnet56", data="synthetic", workdir=str(tmp_path), steps=7,
                           overrides={"scale": 16.0})
    assert c.scale == 16.0 and c.num_train_steps == 7


@pytest.mark.slow
def test_teacher_suite_at_toy_size_aggregates_seeds_and_has_the_label_free_row(tmp_path, one_device,
                                                                                monkeypatch):
    """The real-teacher suite's machinery on a random teacher run and synthetic faces: caches built, every
    method for 2 seeds, per-seed McNemar against that seed's baseline, the teacher's row, the label-free row;
    the verification pairs decoded once for all the runs."""
    from facekd_jax import train
    from test_teacher_cache import WIDTH, make_teacher_run

    loads = []
    load_val_targets = train.load_val_targets
    monkeypatch.setattr(train, "load_val_targets", 
                        lambda config: loads.append(config.num_train_steps) or load_val_targets(config))
    monkeypatch.setattr(suite, "_VAL_TARGETS", {})
    make_teacher_run(tmp_path / "teacher")
    toy = {"image_size": 16, "batch_size": 16, "embedding_size": WIDTH, "val_targets": ("synthetic:40",),
           "eval_batch_size": 40}
    names = ["baseline", suite.LABEL_FREE]  # a subset: every method compiles its own step
    kwargs = dict(train="synthetic:6:4", label_free="synthetic:8:3", seeds=2, students=["resnet8"], steps=2,
                  overrides=toy)
    summaries = suite.run_teacher_suite(str(tmp_path / "teacher"), str(tmp_path / "w"), log=lambda *_: None,
                                        only=names, **kwargs)
    on_disk = json.loads((tmp_path / "w" / "summary.json").read_text())
    rows = on_disk["students"]["resnet8"]["rows"]
    assert list(rows) == ["teacher"] + names
    for name, row in rows.items():
        seeds = 1 if name == "teacher" else 2
        assert len(row["accuracy_per_seed"]) == seeds, name
        assert row["accuracy_mean"] == pytest.approx(sum(row["accuracy_per_seed"]) / seeds)
        assert len(row["p_vs_baseline_per_seed"]) == (0 if name == suite.DLIB_BASELINE else 2), name
    # The label-free row trained on its own source, with CE weighted 0: its run's config says so.
    config = json.loads((tmp_path / "w" / "resnet8" / "seed1" / suite.LABEL_FREE / "config.json").read_text())
    assert config["data"]["train"] == "synthetic:8:3" and config["kd"]["ce_weight"] == 0.0
    assert config["teacher"]["cache"].endswith("cache_synthetic_label_free") and config["seed"] == 1
    assert (tmp_path / "w" / "roc_resnet8.png").stat().st_size > 1000
    assert "| label_free_kd |" in (tmp_path / "w" / "summary.md").read_text()
    assert summaries["resnet8"]["pairs"] == 40
    assert loads.count(2) == 1  # 4 student runs (2 steps each), one decode of the pairs, shared read-only
    # A changed field is not a finished run: --lr on the same workdir stops naming the field, the old run intact;
    # the same config reuses.
    before = (tmp_path / "w" / "resnet8" / "seed0" / "baseline" / "suite_run.json").read_text()
    with pytest.raises(train.ConfigMismatchError, match=r"optimizer.lr: 0.1 -> 0.01"):
        suite.run_teacher_suite(str(tmp_path / "teacher"), str(tmp_path / "w"), log=lambda *_: None,
                                only=["baseline"], **dict(kwargs, overrides=dict(toy, lr=0.01)))
    assert (tmp_path / "w" / "resnet8" / "seed0" / "baseline" / "suite_run.json").read_text() == before
    logs = []
    suite.run_teacher_suite(str(tmp_path / "teacher"), str(tmp_path / "w"), log=logs.append, only=["baseline"],
                            **kwargs)
    assert any("reused" in line for line in logs)
