"""A comparison table: every run a table's config file declares, on one budget, evaluated on the same pairs.

  python -m facekd_jax.suite --config=configs/demo.py --workdir=runs/demo                     (make demo)
  python -m facekd_jax.suite --config=configs/lfw_dlib.py --workdir=runs/lfw_dlib --seeds=3   (make lfw-dlib)
  python -m facekd_jax.suite --config=configs/lfw_dlib.py:data.root=/data/lfw --runs=baseline,label_free_kd \
      --teacher=runs/teacher_r50 --workdir=runs/r50_table

A table's file (configs/demo.py, lfw.py, lfw_dlib.py) declares its runs as variants of its get_config and a
`SUITE` (config_lib.Suite): which run is the baseline, where the teacher comes from (a run of the table trained
first, or an import such as dlib's), how many seeds. Anything after the file's colon applies to every run (a size
such as `tiny`, or key=value fields). The suite gets the teacher into DIR (trained, imported, or --teacher=DIR),
builds the teacher-embedding caches the runs name (`{teacher}/cache_...`, facekd_jax.teachers.cache), then trains
each run for each student (--students, default the config's own model) and seed in
DIR/<student>/seed<k>/<run>, and evaluates the teacher on the same pairs with its own crop.

Each run is an ordinary run of facekd_jax.main at that variant, so a rerun resumes unfinished runs and reuses
finished ones whose whole config is unchanged; a changed setting on the same --workdir stops naming the field.
Writes DIR/summary.json, DIR/summary.md (per student: accuracy mean +- std over seeds, per-seed accuracy and
McNemar p against that seed's baseline, EER, FNMR@FMR=1e-3, size, train time) and DIR/roc_<student>.png.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Callable, Dict, List, Optional, Sequence



@dataclasses.dataclass
class Table:
    """A table's config file, loaded: its module (get_config, SUITE) and the arg every run gets."""
    path: str
    arg: str
    module: Any

    @property
    def suite(self):
        return self.module.SUITE

    def config(self, run: str, *, seed: Optional[int] = None, student: Optional[str] = None, split: str = "test"):
        c = self.module.get_config(",".join(p for p in (run, self.arg) if p))
        if seed is not None:
            c.seed = seed
        if student:
            c.model = student
        if split == "dev":
            c.data.val_targets = tuple(dev_spec(v) for v in c.data.val_targets)
        return c


def dev_spec(text: str) -> str:
    """A verification spec on the development split: an LFW set (lfw:, lfw-view2:) becomes lfw-dev: of the same
    folder and crop (data.lfw_dev: people held out of training, never reported); any other set stays."""
    kind, sep, rest = text.partition(":")
    return f"lfw-dev:{rest}" if sep and kind in ("lfw", "lfw-view2") else text


def load_table(config: str) -> Table:
    """'configs/NAME.py[:ARG]' -> Table; ValueError where the file declares no SUITE."""
    from facekd_jax import config_lib

    path, _, arg = config.partition(":")
    module = config_lib.load_module(path)
    if not isinstance(getattr(module, "SUITE", None), config_lib.Suite):
        raise ValueError(f"--config={config}: {path} declares no table (a SUITE = config_lib.Suite(...)); the tables "
                         "are configs/demo.py, configs/lfw.py and configs/lfw_dlib.py")
    return Table(path=path, arg=arg, module=module)


def _config_key(config) -> str:
    """The whole resolved config as canonical JSON: what decides whether a finished run can be reused."""
    return json.dumps(json.loads(config.to_json_best_effort()), sort_keys=True)


def _finished(run_dir: str, config) -> Optional[Dict[str, Any]]:
    """The run's record when it finished with exactly this config (any changed field: train it again)."""
    path = os.path.join(run_dir, "suite_run.json")
    if os.path.exists(path):
        with open(path) as f:
            record = json.load(f)
        if record.get("step") == config.num_train_steps and record.get("config") == _config_key(config):
            return record
    return None


_VAL_TARGETS: Dict[str, Any] = {}  # the table's verification sets, decoded once per process (10 s for LFW's)


def _val_targets(config) -> Dict[str, Any]:
    from facekd_jax import train

    key = json.dumps([list(config.data.val_targets), config.data.root, config.data.image_size])
    if key not in _VAL_TARGETS:
        targets = train.load_val_targets(config) if config.data.val_targets else {}
        for arrays in targets.values():
            for a in arrays:
                a.flags.writeable = False  # shared by every run of the suite
        _VAL_TARGETS[key] = targets
    return _VAL_TARGETS[key]


def _summary_of(model: str, image_size: int, embedding_size: int) -> Dict[str, Any]:
    from facekd_jax import models

    s = models.model_summary(model, image_size=image_size, embedding_size=embedding_size)
    return {"params": s["params"], "gflops": s["gflops"], "mb": s["mb"]}


def train_run(name: str, description: str, config, run_dir: str, log) -> Dict[str, Any]:
    """Trains (or reuses) one run and returns its suite record: eval results, size, time."""
    from facekd_jax import train

    record = _finished(run_dir, config)
    if record is not None:
        log(f"== {name}: finished earlier with the same config, reused ==")
        return record
    log(f"== {name}: {description} ({config.num_train_steps} steps of {config.batch_size}) ==")
    t0 = time.time()
    out = train.train_and_evaluate(config, run_dir, val_targets=_val_targets(config))
    if out.get("preempted"):
        raise SystemExit(f"suite interrupted during {name}; run the same command again to continue")
    record = {"step": out["step"], "description": description, "model": config.model,
              "train_seconds": time.time() - t0, "eval": out["eval"], "image_size": config.data.image_size,
              "seed": config.seed, "config": _config_key(config),
              **_summary_of(config.model, config.data.image_size, config.embedding_size)}
    with open(os.path.join(run_dir, "suite_run.json"), "w") as f:
        json.dump(record, f)
    return record


# ----------------------------------------------------------------------------------------------- the teacher


@dataclasses.dataclass
class Teacher:
    """The table's teacher: its run folder, what its config.json says, and its record when it is a run of the
    table (trained here; else it is evaluated on the table's pairs with its own crop)."""
    workdir: str
    run: Any                       # teachers.imported.TeacherRun
    record: Optional[Dict[str, Any]] = None


def get_teacher(table: Table, workdir: str, *, teacher_dir: Optional[str], log, split: str = "test"
                ) -> Optional[Teacher]:
    """The teacher of the table: --teacher=DIR as it is, an import (`import:dlib`) into DIR/teacher_dlib, or the
    table's teacher run trained in DIR/<run> (evaluated on `split`'s pairs); None for a table without one."""
    from facekd_jax.teachers.imported import import_dlib, read_teacher_run

    source = table.suite.teacher
    if teacher_dir:
        return Teacher(teacher_dir, read_teacher_run(teacher_dir))
    if source == "import:dlib":
        out = os.path.join(workdir, "teacher_dlib")
        import_dlib(out, log=log)
        return Teacher(out, read_teacher_run(out))
    if source.startswith("import:"):
        raise ValueError(f"{table.path}: SUITE.teacher={source!r}: the suite imports dlib's teacher itself; import "
                         "others with python -m facekd_jax.teachers import ... and pass --teacher=DIR")
    if not source:
        return None
    out = os.path.join(workdir, source)
    record = train_run(source, table.suite.descriptions.get(source, source), table.config(source, split=split), out,
                       log)
    return Teacher(out, read_teacher_run(out), record)


def with_teacher(config, teacher: Optional[Teacher]):
    """A KD run's teacher fields set to the table's teacher (its workdir, model and width; a training-only
    projection where the widths differ)."""
    if teacher is None or not config.teacher.model:
        return config
    config.teacher.workdir = teacher.workdir
    config.teacher.model, config.teacher.embedding_size = teacher.run.model, teacher.run.embedding_size
    config.kd.projection = bool(config.kd.projection or config.embedding_size != teacher.run.embedding_size)
    return config


def build_caches(configs: Sequence, teacher: Optional[Teacher], log) -> None:
    """Every teacher-embedding cache the runs name (config.teacher.cache, `{teacher}` = the teacher's folder),
    built (or finished) once for the run's training data."""
    from facekd_jax import config_lib
    from facekd_jax.data import specs
    from facekd_jax.teachers import cache as cache_lib

    done = set()
    for config in configs:
        out = config_lib.teacher_cache_dir(config)
        if not out or out in done or teacher is None:
            continue
        done.add(out)
        spec = specs.parse(config.data.train, specs.TRAIN, root=config.data.root, field="config.data.train")
        t0 = time.time()
        built = cache_lib.build_cache(teacher.workdir, spec, out)
        log(f"teacher cache {out}: {built.header['data']['num_images']} images ({time.time() - t0:.0f} s)")


def teacher_record(teacher: Teacher, config, log) -> Dict[str, Any]:
    """The teacher evaluated on the table's first verification set with its own crop and input size, cached in
    its folder per set (suite_eval.json)."""
    from facekd_jax import config_lib, eval_only
    from facekd_jax.data import specs

    if teacher.record is not None:
        return teacher.record
    spec = specs.parse(config.data.val_targets[0], specs.VERIFICATION, root=config.data.root)
    crop = teacher.run.crop_for(spec)  # its own: dlib's box on LFW, its chip in an aligned copy
    spec = str(spec.replace(crop=crop) if crop else spec)
    path = os.path.join(teacher.workdir, "suite_eval.json")
    cached = {}
    if os.path.exists(path):
        with open(path) as f:
            cached = json.load(f)
    if spec not in cached:
        run = teacher.run
        log(f"== teacher: {run.model} on {spec} ==")
        c = config_lib.default_config()
        c.model, c.embedding_size, c.data.image_size = run.model, run.embedding_size, run.image_size
        c.data.val_targets, c.eval_batch_size = (spec,), config.eval_batch_size
        t0 = time.time()
        results = eval_only.evaluate_workdir(c, teacher.workdir)["results"]
        cached[spec] = {"description": f"{run.model} teacher ({run.image_size}x{run.image_size}, its own crop)",
                        "model": run.model, "eval": results, "image_size": run.image_size, "train_seconds": 0.0,
                        "eval_seconds": time.time() - t0,
                        **_summary_of(run.model, run.image_size, run.embedding_size)}
        with open(path, "w") as f:
            json.dump(cached, f)
    return cached[spec]


# ----------------------------------------------------------------------------------------------- the table


def run_suite(config: str, workdir: str, *, runs: Optional[Sequence[str]] = None, seeds: Optional[int] = None,
              students: Optional[Sequence[str]] = None, teacher_dir: Optional[str] = None, split: str = "test",
              log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Trains and evaluates the table of `config` ('configs/NAME.py[:ARG]'): `runs` (default all, the teacher
    first where it is a run), `seeds` (default SUITE.seeds) and `students` (default the config's model) in
    `workdir`; writes and returns the summary {"students": {student: table}, "seeds", "teacher", "split"}.

    split "dev": every LFW verification set becomes the development split's pairs (`dev_spec`), and reading the
    reported test pairs raises for as long as the suite runs. The runs are the same (the verification sets are not
    part of what a run trains), so a later split="test" call on the same workdir reuses their checkpoints and only
    evaluates them on the test pairs: the reported pairs are read once, at the end."""
    if split not in ("test", "dev"):
        raise ValueError(f"--split={split}: expected test or dev")
    from facekd_jax.data import lfw_dev

    lfw_dev.refuse_test_pairs(split == "dev")
    try:
        return _run_suite(config, workdir, runs=runs, seeds=seeds, students=students, teacher_dir=teacher_dir,
                          split=split, log=log)
    finally:
        lfw_dev.refuse_test_pairs(False)


def _run_suite(config: str, workdir: str, *, runs, seeds, students, teacher_dir, split: str, log) -> Dict[str, Any]:
    table = load_table(config)
    suite = table.suite
    wanted = list(suite.runs if runs in (["all"], ("all",)) else runs or suite.default or suite.runs)
    unknown = sorted(set(wanted) - set(suite.runs))
    if unknown:
        raise ValueError(f"unknown suite runs {unknown}; {table.path} has: {', '.join(suite.runs)}")
    seeds = int(seeds or suite.seeds)
    os.makedirs(workdir, exist_ok=True)
    rows = [r for r in suite.runs if r in wanted and r != suite.teacher]
    needs = [table.config(r) for r in rows]
    teacher = None
    if any(c.teacher.model for c in needs) or suite.teacher in wanted or teacher_dir:
        teacher = get_teacher(table, workdir, teacher_dir=teacher_dir, log=log, split=split)
    plan = {}  # (student, seed, run) -> config
    for student in (students or [None]):
        for seed in range(seeds):
            for run in rows:
                plan[(student, seed, run)] = with_teacher(
                    table.config(run, seed=seed, student=student, split=split), teacher)
    build_caches(plan.values(), teacher, log)
    records: Dict[str, Dict[str, List[Dict[str, Any]]]] = {}
    for (student, seed, run), c in plan.items():
        name = c.model if student is None else student
        record = train_run(f"{name} seed {seed} {run}", suite.descriptions.get(run, run), c,
                           os.path.join(workdir, name, f"seed{seed}", run), log)
        records.setdefault(name, {}).setdefault(run, []).append(record)
    summaries = {}
    for name, by_run in records.items():
        first = next(c for (s, _, _), c in plan.items() if (c.model if s is None else s) == name)
        t = teacher_record(teacher, first, log) if teacher is not None else None
        summaries[name] = write_table(name, by_run, t, suite.baseline, workdir, log=log)
    summary = {"students": summaries, "seeds": seeds, "teacher": teacher.workdir if teacher else None,
               "config": config, "split": split}
    with open(os.path.join(workdir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    with open(os.path.join(workdir, "summary.md"), "w") as f:
        f.write("\n".join(s["markdown"] for s in summaries.values()))
    log(f"wrote {workdir}/summary.json, summary.md, roc_<student>.png")
    return summary


def _row(description: str, results: List[Dict[str, Any]], records: List[Dict[str, Any]],
         baseline: Optional[List[Dict[str, Any]]], *, is_baseline: bool) -> Dict[str, Any]:
    import numpy as np

    from facekd_jax import stats

    acc = [r["accuracy"] for r in results]
    tests = []
    if baseline and not is_baseline:  # a row of one result (the teacher) is compared with every seed's baseline
        mine = results if len(results) == len(baseline) else [results[0]] * len(baseline)
        tests = [stats.mcnemar(r["correct"], b["correct"]) for r, b in zip(mine, baseline)]
    return {"description": description, "accuracy_mean": float(np.mean(acc)),
            "accuracy_std_over_seeds": float(np.std(acc, ddof=1)) if len(acc) > 1 else 0.0,
            "accuracy_fold_std": float(results[0]["accuracy_std"]), "accuracy_per_seed": acc,
            "p_vs_baseline_per_seed": [t["p_value"] for t in tests],
            "discordant_per_seed": [[t["b"], t["c"]] for t in tests],
            "eer_mean": float(np.mean([r["eer"] for r in results])),
            "fnmr_at_fmr_1e-3_mean": float(np.mean([r["fnmr_at_fmr"]["1e-3"] for r in results])),
            "params": records[0]["params"], "gflops": records[0]["gflops"], "mb": records[0]["mb"],
            "train_seconds_mean": float(np.mean([r["train_seconds"] for r in records])),
            "image_size": records[0]["image_size"]}


def write_table(student: str, by_run: Dict[str, List[Dict[str, Any]]], teacher: Optional[Dict[str, Any]],
                baseline: str, workdir: str, *, log=print) -> Dict[str, Any]:
    """One student's table over seeds (its markdown, its rows for summary.json) and roc_<student>.png with every
    model's seed-0 curve and the teacher's. With one seed the ± is the 10-fold std of that run, with several the
    std over seeds; p is McNemar's exact test on the per-pair decisions against that seed's baseline."""
    from facekd_jax import evaluate

    def result(rec):
        return next(iter(rec["eval"].values()))

    base = [result(r) for r in by_run[baseline]] if baseline in by_run else None
    entries = ([("teacher", [teacher])] if teacher is not None else []) + list(by_run.items())
    rows, curves = {}, {}
    for name, recs in entries:
        res = [result(r) for r in recs]
        rows[name] = _row(recs[0]["description"], res, recs, base, is_baseline=name == baseline)
        curves[name] = (res[0]["roc"]["fmr"], res[0]["roc"]["fnmr"])
    seeds = max(len(recs) for _, recs in entries)
    val = next(iter(entries[-1][1][0]["eval"]))
    pairs = len(result(entries[-1][1][0])["correct"])
    spread = "std over seeds" if seeds > 1 else "10-fold std"
    lines = [f"### {student}: {val} ({pairs} pairs), {seeds} seed{'s' if seeds > 1 else ''}\n",
             f"| model | accuracy % (mean ± {spread}) | per seed | McNemar p vs that seed's baseline (b, c) | "
             "EER % | FNMR@FMR=1e-3 % | params (M) | GFLOPs | MB | input | train s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        spread_value = r["accuracy_std_over_seeds"] if seeds > 1 else r["accuracy_fold_std"]
        per_seed = ", ".join(f"{100 * a:.1f}" for a in r["accuracy_per_seed"])
        p = ", ".join(f"{v:.3g} ({b}, {c})" for v, (b, c) in zip(r["p_vs_baseline_per_seed"],
                                                                r["discordant_per_seed"]))
        p = p or ("baseline" if name == baseline else "n/a")
        lines.append(f"| {name} | {100 * r['accuracy_mean']:.2f} ± {100 * spread_value:.2f} | {per_seed} | {p} | "
                     f"{100 * r['eer_mean']:.2f} | {100 * r['fnmr_at_fmr_1e-3_mean']:.1f} | "
                     f"{r['params'] / 1e6:.2f} | {r['gflops']:.3f} | {r['mb']:.1f} | {r['image_size']} | "
                     f"{r['train_seconds_mean']:.0f} |")
    markdown = "\n".join(lines) + "\n"
    evaluate.plot_roc(curves, os.path.join(workdir, f"roc_{student}.png"),
                      title=f"{student} and its teacher, {val} (seed 0)")
    log(markdown)
    return {"verification_set": val, "pairs": pairs, "baseline": baseline, "rows": rows, "markdown": markdown}


def main(argv=None):
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="a table's config file, FILE.py[:ARG] (ARG: a size such as "
                        "tiny, key=value fields; applied to every run)")
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--runs", default="", help="comma-separated subset of the table's runs, or all (default: "
                        "the table's default runs)")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per run (default the table's)")
    parser.add_argument("--students", default="", help="comma-separated student models (default the config's)")
    parser.add_argument("--teacher", default=None, help="a teacher run folder (trained, or imported with python -m "
                        "facekd_jax.teachers import) instead of the table's own teacher")
    parser.add_argument("--split", default="test", choices=("test", "dev"),
                        help="dev: evaluate on LFW's development pairs (facekd_jax.data.lfw_dev) and refuse to read "
                        "the reported test pairs; test (default): the table's own verification sets")
    args = parser.parse_args(argv)
    from facekd_jax import paths
    if paths.is_url(args.workdir):
        parser.error(f"--workdir={args.workdir}: the suite's workdir must be a local folder (its runs, caches and "
                     "summary live there); a single run of facekd_jax.main takes gs:// workdirs")
    from facekd_jax import logs
    logs.start_process(workdir=args.workdir)
    from facekd_jax import errors
    with errors.command_line():
        run_suite(args.config, args.workdir, runs=[r for r in args.runs.split(",") if r] or None, seeds=args.seeds,
                  students=[s for s in args.students.split(",") if s] or None, teacher_dir=args.teacher,
                  split=args.split)


if __name__ == "__main__":
    main()
