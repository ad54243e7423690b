"""The comparison tables end to end at toy size: every run of a table's config file trains, evaluates and lands in
the one summary writer's table; reruns reuse finished runs; changed settings stop naming the field."""
import json

import pytest

from runs import REPO
from facekd_jax import config_lib, errors, suite

DEMO = str(REPO / "configs" / "demo.py")
LFW_DLIB = str(REPO / "configs" / "lfw_dlib.py")
# The teacher, the baseline and a KD method of each kind (logits against the teacher's, the teacher's centres):
# every method's step is tested in test_train.py; here the suite's machinery, at the tests' `tiny` size.
SUITE_SUBSET = ["teacher_resnet18", "baseline_resnet56", "conventional_kd", "margin_distillation"]


@pytest.mark.slow
def test_demo_table_end_to_end_writes_summary_table_and_roc(tmp_path, one_device):
    logs = []
    config = f"{DEMO}:tiny,num_train_steps=3,data.val_targets=('synthetic:60',)"
    summary = suite.run_suite(config, str(tmp_path), runs=SUITE_SUBSET, log=logs.append)
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    table = on_disk["students"]["resnet8"]
    assert list(table["rows"]) == ["teacher"] + SUITE_SUBSET[1:] and table["pairs"] == 60
    for name, row in table["rows"].items():
        assert 0.0 <= row["accuracy_mean"] <= 1.0 and row["train_seconds_mean"] >= 0, name
        assert len(row["accuracy_per_seed"]) == 1
        assert bool(row["p_vs_baseline_per_seed"]) == (name != "baseline_resnet56"), name
    rows = table["rows"]
    assert rows["teacher"]["params"] > rows["baseline_resnet56"]["params"]  # resnet10 vs resnet8
    # each row is configs/demo.py at its variant with the suite's arg; the KD rows read the suite's teacher
    run = tmp_path / "resnet8" / "seed0" / "conventional_kd"
    config = json.loads((run / "config.json").read_text())
    assert (config["model"], config["teacher"]["model"], config["data"]["image_size"]) == ("resnet8", "resnet10", 16)
    assert config["teacher"]["workdir"] == str(tmp_path / "teacher_resnet18")
    assert config["num_train_steps"] == 3 and config["eval_every_steps"] == -1
    markdown = (tmp_path / "summary.md").read_text()
    for name in ["teacher"] + SUITE_SUBSET[1:]:
        assert f"| {name} |" in markdown
    assert (tmp_path / "roc_resnet8.png").stat().st_size > 1000
    # A rerun reuses every finished run (the teacher too) instead of training again.
    logs.clear()
    suite.run_suite(config_arg := f"{DEMO}:tiny,num_train_steps=3,data.val_targets=('synthetic:60',)",
                    str(tmp_path), runs=SUITE_SUBSET, log=logs.append)
    assert sum("reused" in line for line in logs) == len(SUITE_SUBSET), config_arg


def test_suite_rejects_unknown_runs_and_files_without_a_table(tmp_path):
    with pytest.raises(ValueError, match="unknown suite runs"):
        suite.run_suite(DEMO, str(tmp_path), runs=["nope"])
    with pytest.raises(ValueError, match="declares no table"):
        suite.run_suite(str(REPO / "configs" / "feature_kd.py"), str(tmp_path))
    assert list(tmp_path.iterdir()) == []


def test_suite_refuses_a_url_workdir_before_anything_is_written(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        suite.main([f"--config={DEMO}", "--workdir=gs://bucket/suite"])
    assert "must be a local folder" in capsys.readouterr().err and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("table", ["demo", "lfw", "lfw_dlib"])
def test_every_row_of_a_table_trains_on_one_budget(table):
    """A table compares methods, not budgets: every row has the same data, sizes, optimiser and steps."""
    module = config_lib.load_module(str(REPO / "configs" / f"{table}.py"))
    configs = {run: module.get_config(run) for run in module.SUITE.runs}
    same = ["batch_size", "num_train_steps", "data.image_size", "optimizer", "scale", "margin_list",
            "data.val_targets", "seed"]
    first = configs[module.SUITE.baseline]
    for run, c in configs.items():
        for field in same:
            *parents, leaf = field.split(".")
            a, b = first, c
            for p in parents:
                a, b = a[p], b[p]
            assert a[leaf] == b[leaf], (table, run, field)
        if run != module.SUITE.teacher:
            assert c.model == first.model, (table, run)
        assert bool(c.teacher.model) == (run not in (module.SUITE.baseline, module.SUITE.teacher)), (table, run)
    if table == "lfw_dlib":  # the label-free row: every training image, no labels
        free = configs["label_free_kd"]
        assert free.data.train.startswith("lfw-all:") and free.kd.ce_weight == 0.0
        assert config_lib.teacher_cache_dir(free) != config_lib.teacher_cache_dir(configs["feature_kd"])


@pytest.mark.slow
def test_real_teacher_table_at_toy_size_aggregates_seeds_and_has_the_label_free_row(tmp_path, one_device,
                                                                                    monkeypatch):
    """configs/lfw_dlib.py's table machinery with a given teacher run (--teacher=DIR, a random resnet8) on
    synthetic faces: its caches built in the teacher's folder, 2 seeds, per-seed McNemar against that seed's
    baseline, the teacher's row, the label-free row; the verification pairs decoded once for all the runs."""
    from facekd_jax import train
    from test_teacher_cache import WIDTH, make_teacher_run

    loads = []
    load_val_targets = train.load_val_targets
    monkeypatch.setattr(train, "load_val_targets",
                        lambda config: loads.append(config.num_train_steps) or load_val_targets(config))
    monkeypatch.setattr(suite, "_VAL_TARGETS", {})
    make_teacher_run(tmp_path / "teacher")
    arg = f"tiny,num_train_steps=2,embedding_size={WIDTH}"
    names = ["baseline", "label_free_kd"]  # a subset: every method compiles its own step
    kwargs = dict(runs=names, seeds=2, students=["resnet8"], teacher_dir=str(tmp_path / "teacher"),
                  log=lambda *_: None)
    summary = suite.run_suite(f"{LFW_DLIB}:{arg}", str(tmp_path / "w"), **kwargs)
    on_disk = json.loads((tmp_path / "w" / "summary.json").read_text())
    rows = on_disk["students"]["resnet8"]["rows"]
    assert list(rows) == ["teacher"] + names
    for name, row in rows.items():
        seeds = 1 if name == "teacher" else 2
        assert len(row["accuracy_per_seed"]) == seeds, name
        assert row["accuracy_mean"] == pytest.approx(sum(row["accuracy_per_seed"]) / seeds)
        assert len(row["p_vs_baseline_per_seed"]) == (0 if name == "baseline" else 2), name
    # The label-free row trained with CE weighted 0 from its own cache in the teacher's folder.
    config = json.loads((tmp_path / "w" / "resnet8" / "seed1" / "label_free_kd" / "config.json").read_text())
    assert config["kd"]["ce_weight"] == 0.0 and config["seed"] == 1
    cache = config_lib.teacher_cache_dir(config_lib.ml_collections.ConfigDict(config))
    assert cache.startswith(str(tmp_path / "teacher" / "cache_synthetic-")), cache  # the tiny size's data
    assert (tmp_path / "teacher" / cache / "header.json").exists()
    assert (tmp_path / "w" / "roc_resnet8.png").stat().st_size > 1000
    assert "| label_free_kd |" in (tmp_path / "w" / "summary.md").read_text()
    assert summary["students"]["resnet8"]["pairs"] == 40
    assert loads.count(2) == 1  # 4 student runs (2 steps each), one decode of the pairs, shared read-only
    # A changed field is not a finished run: another lr on the same workdir stops naming the field, the old run
    # intact; the same config reuses.
    before = (tmp_path / "w" / "resnet8" / "seed0" / "baseline" / "suite_run.json").read_text()
    with pytest.raises(errors.ConfigMismatchError, match=r"optimizer.lr: 0.05 -> 0.01"):
        suite.run_suite(f"{LFW_DLIB}:{arg},optimizer.lr=0.01", str(tmp_path / "w"),
                        **dict(kwargs, runs=["baseline"]))
    assert (tmp_path / "w" / "resnet8" / "seed0" / "baseline" / "suite_run.json").read_text() == before
    logs = []
    suite.run_suite(f"{LFW_DLIB}:{arg}", str(tmp_path / "w"), **dict(kwargs, runs=["baseline"], log=logs.append))
    assert any("reused" in line for line in logs)


@pytest.mark.slow
def test_a_sweep_compares_its_entries_on_the_development_pairs_with_one_teacher(tmp_path, lfw_dir, one_device):
    """python -m facekd_jax.sweep: each SWEEP entry's runs and its baseline trained with its settings, evaluated on
    LFW's development pairs (the reported pairs cannot be read meanwhile), all taught by the one teacher; an
    entry whose baseline is another's is linked to it, not trained again; sweep.json's lift is each run against
    its own entry's baseline."""
    from facekd_jax import sweep
    from test_teacher_cache import WIDTH, make_teacher_run

    table = tmp_path / "table.py"
    table.write_text(f"from facekd_jax import config_lib\n_t = config_lib.load_module({LFW_DLIB!r})\n"
                     "RUNS, SUITE, get_config = _t.RUNS, _t.SUITE, _t.get_config\n"
                     "SWEEP = {'two': (('label_free_kd',), 'num_train_steps=2'),\n"
                     "         'two_uncentred': (('label_free_kd',), 'num_train_steps=2,teacher.centre=False'),\n"
                     "         'three': ((), 'num_train_steps=3')}\n")
    make_teacher_run(tmp_path / "teacher")
    arg = f"tiny,embedding_size={WIDTH},data.root={lfw_dir},data.val_targets=('lfw:{{root}}',)"
    logs = []
    result = sweep.run_sweep(f"{table}:{arg}", str(tmp_path / "w"), teacher_dir=str(tmp_path / "teacher"),
                             log=logs.append)
    rows = json.loads((tmp_path / "w" / "sweep.json").read_text())["rows"]
    assert rows == json.loads(json.dumps(result["rows"]))
    assert [(r["entry"], r["run"]) for r in rows] == [
        ("two", "baseline"), ("two", "label_free_kd"), ("two_uncentred", "baseline"),
        ("two_uncentred", "label_free_kd"), ("three", "baseline")]
    for r in rows:
        assert r["pairs"] == 1000   # LFW's development pairs (500 + 500)
        base = next(b for b in rows if b["entry"] == r["entry"] and b["run"] == "baseline")
        assert r["lift"] == pytest.approx(r["accuracy_mean"] - base["accuracy_mean"])
    seed0 = "resnet8/seed0"
    for entry, steps, centre in (("two", 2, True), ("two_uncentred", 2, False)):
        config = json.loads((tmp_path / "w" / entry / seed0 / "label_free_kd" / "config.json").read_text())
        assert (config["num_train_steps"], config["teacher"]["centre"]) == (steps, centre)
        assert config["data"]["val_targets"] == ["lfw-dev:{root}"]
        assert config["teacher"]["workdir"] == str(tmp_path / "teacher")
    # The uncentred entry's baseline is the first entry's, linked; the three-step one is its own.
    linked = tmp_path / "w" / "two_uncentred" / seed0 / "baseline"
    assert linked.is_symlink() and linked.resolve() == (tmp_path / "w" / "two" / seed0 / "baseline").resolve()
    assert not (tmp_path / "w" / "three" / seed0 / "baseline").is_symlink()
    assert sum(line.startswith("== resnet8 seed 0 baseline") and "reused" not in line for line in logs) == 2
    assert not list((tmp_path / "w").glob("*/teacher*"))   # no entry imported or trained a teacher of its own
    assert "| three | " in (tmp_path / "w" / "sweep.md").read_text()
