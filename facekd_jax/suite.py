"""The thesis in miniature: baseline and KD students on one budget, evaluated on the same pairs.

  python -m facekd_jax.suite --data=synthetic --workdir=runs/demo
  python -m facekd_jax.suite --data=lfw:../shared/data/lfw --workdir=runs/lfw
  python -m facekd_jax.suite --data=lfw:../shared/data/lfw --teacher=dlib --workdir=runs/lfw_dlib --seeds=3

Without --teacher=dlib the suite trains its own teacher first (ResNet-18, same budget). With it, the teacher is
dlib's imported face descriptor (facekd_jax.teachers): the suite imports it into DIR/teacher_dlib, builds its
embedding caches (DIR/cache_*; the teacher never runs during training), then for each student and seed trains the
ArcFace-only baseline, every KD method, and a label-free feature-KD row (every training image, singletons too,
teacher embeddings as the only target).

Writes DIR/summary.json, DIR/summary.md (the table, McNemar p-values against the ArcFace-only baseline) and
DIR/roc*.png. Each model is an ordinary run in DIR/... (configs/FILE.py at a config variant: `demo`, `lfw` or
`lfw_dlib`, or --variant; with the suite's data), so a rerun resumes unfinished runs and reuses finished ones whose whole config is unchanged; a changed
setting (--lr, --image_size, ...) on the same --workdir stops naming the field (give another --workdir); a larger
--steps continues the finished runs from their last checkpoint.
"""
from __future__ import annotations

import importlib
import json
import logging
import os
import sys
import time
from typing import Any, Dict, List, Optional

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

# (run name, config module, what it is). The teacher comes first: the KD runs read it.
RUNS = [
    ("teacher_resnet18", "teacher_resnet18", "ResNet-18 ArcFace teacher"),
    ("baseline_resnet56", "baseline_resnet56", "ResNet-56, ArcFace only"),
    ("conventional_kd", "conventional_kd", "ResNet-56, Hinton KD on the classification layer"),
    ("feature_kd", "feature_kd", "ResNet-56, feature KD matched to ArcFace (thesis)"),
    ("arcface_kd", "arcface_kd", "ResNet-56, KD on ArcFace margin logits"),
    ("rkd", "rkd", "ResNet-56, relational KD"),
    ("cosine_matrix_kd", "cosine_matrix_kd", "ResNet-56, cosine-matrix KD"),
    ("proxyless_kd", "proxyless_kd", "ResNet-56, teacher's frozen centres"),
    ("margin_distillation", "margin_distillation", "ResNet-56, MarginDistillation"),
]
TEACHER, BASELINE = "teacher_resnet18", "baseline_resnet56"

# The size of each table is a config variant (facekd_jax/config_lib.py), so `main --config=FILE:VARIANT` trains
# exactly a suite's model: `demo` for synthetic data, `lfw` for LFW with the suite's own teacher, `lfw_dlib` for
# the real-teacher suite; --variant picks another (the tests and the notebooks' smoke mode use `tiny`).
DEFAULT_VARIANTS = {"synthetic": "demo", "lfw": "lfw"}


# The suite with dlib's imported teacher (--teacher=dlib). The label-free row trains on every training image with
# the teacher's embeddings as its only target (kd.ce_weight 0; its margin head is trained by nothing).
DISTILL_RUNS = [
    ("baseline", "baseline_resnet56", "ArcFace only, no teacher", {}),
    ("conventional_kd", "conventional_kd", "Hinton KD on s*cos logits (teacher: its class centres)", {}),
    ("feature_kd", "feature_kd", "feature KD (thesis): 100 x MSE of unit embeddings", {}),
    ("arcface_kd", "arcface_kd", "Hinton KD on ArcFace margin logits", {}),
    ("rkd", "rkd", "relational KD (distance 1, angle 2)", {}),
    ("cosine_matrix_kd", "cosine_matrix_kd", "MSE of batch cosine matrices", {}),
    ("sp_kd", "sp_kd", "similarity-preserving KD (Tung & Mori), exact", {}),
    ("grouped_kd", "grouped_kd", "Grouped KD: binary + 8 x primary group", {}),
    ("ekd", "ekd", "EKD: soft ranks at FPR 1e-1..1e-6", {}),
    ("adadistill", "adadistill", "AdaDistill: adaptive EMA centres of teacher embeddings", {}),
    ("proxyless_kd", "proxyless_kd", "ArcFace on the teacher's class centres", {}),
    ("margin_distillation", "margin_distillation", "teacher's centres, per-sample margin", {}),
    ("label_free_kd", "feature_kd", "feature KD alone, every image (singletons too), no labels",
     {"kd.ce_weight": 0.0}),
]
LABEL_FREE = "label_free_kd"
DLIB_BASELINE = "baseline"
# The real-teacher suite: variant `lfw_dlib` (48x48, 250 steps; chosen on pairsDevTrain, README), a MobileFaceNet
# student, 3 seeds. A run is 4-6 minutes on a 2-core machine, so a seed of 13 runs is about an hour and --seeds=3
# about 3 hours there, over the 90 minutes (README: which --runs fit).
DLIB_VARIANT, DLIB_STUDENTS, DLIB_SEEDS = "lfw_dlib", ("mobilefacenet",), 3
# Command-line sizes that replace the variant's (None: keep it).
_SIZE_FIELDS = {"image_size": "data.image_size", "batch_size": "batch_size", "lr": "optimizer.lr", "scale": "scale",
                "eval_batch_size": "eval_batch_size"}


def suite_config(config_module: str, *, data: str, workdir: str, steps: Optional[int], overrides: Dict[str, Any],
                 variant: Optional[str] = None):
    """configs/<config_module>.py:<variant> (the variant of the data kind by default) with the suite's data and
    the command line's sizes (`overrides`; None keeps the variant's): the same budget for every model."""
    from facekd_jax import config_lib

    kind = data.split(":")[0]
    variant = variant or DEFAULT_VARIANTS.get(kind, "demo")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    c = importlib.import_module(f"configs.{config_module}").get_config(variant)
    path = data.split(":", 1)[1] if ":" in data else ""
    if kind == "lfw":
        c.data.train, c.data.val_targets = data, (data,)
    elif kind != "synthetic":  # any training spec (recordio:, folder:, ...); verification sets from --val
        c.data.train, c.data.val_targets = data, ()
    elif path:
        c.data.train = data
    if overrides.get("val_targets"):
        c.data.val_targets = tuple(overrides["val_targets"])
    if not c.data.val_targets:
        raise ValueError(f"--data={data}: give the verification sets to compare on with --val=SPEC[,SPEC]")
    is_teacher_run = config_module == TEACHER
    if overrides.get("student") and not is_teacher_run:
        c.model = overrides["student"]
    if is_teacher_run:  # the suite's teacher is the architecture its students distil from
        c.model = overrides.get("teacher") or config_lib.kd_config(variant).teacher.model
    elif overrides.get("teacher") and c.teacher.model:
        c.teacher.model = overrides["teacher"]
    for key, field in _SIZE_FIELDS.items():
        if key in overrides:
            config_lib.set_field(c, field, overrides[key])
    if "embedding_size" in overrides:
        c.embedding_size = c.teacher.embedding_size = overrides["embedding_size"]
    config_lib.suite_budget(c, steps or c.num_train_steps)
    if c.teacher.model:
        c.teacher.workdir = os.path.join(workdir, TEACHER)
    return c


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


_VAL_TARGETS: Dict[str, Any] = {}  # the suite's verification sets, decoded once per process (10 s for LFW's)


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


def _train_record(name: str, description: str, config, run_dir: str, log) -> Dict[str, Any]:
    """Trains (or reuses) one run and returns its suite record: eval results, size, time."""
    from facekd_jax import models, train

    record = _finished(run_dir, config)
    if record is not None:
        log(f"== {name}: finished earlier with the same config, reused ==")
        return record
    log(f"== {name}: {description} ({config.num_train_steps} steps of {config.batch_size}) ==")
    t0 = time.time()
    out = train.train_and_evaluate(config, run_dir, val_targets=_val_targets(config))
    if out.get("preempted"):
        raise SystemExit(f"suite interrupted during {name}; run the same command again to continue")
    summary = models.model_summary(config.model, image_size=config.data.image_size,
                                   embedding_size=config.embedding_size)
    record = {"step": out["step"], "description": description, "model": config.model,
              "train_seconds": time.time() - t0, "eval": out["eval"], "params": summary["params"],
              "gflops": summary["gflops"], "mb": summary["mb"], "image_size": config.data.image_size,
              "seed": config.seed, "config": _config_key(config)}
    with open(os.path.join(run_dir, "suite_run.json"), "w") as f:
        json.dump(record, f)
    return record


def run_suite(data: str, workdir: str, *, steps: Optional[int] = None, only: Optional[List[str]] = None,
              overrides: Optional[Dict[str, Any]] = None, variant: Optional[str] = None,
              log=print) -> Dict[str, Any]:
    """Trains and evaluates every run of RUNS (or `only`) at the size of config variant `variant` (default: the
    data kind's, DEFAULT_VARIANTS), then writes the summary files; returns the summary."""
    overrides = overrides or {}
    os.makedirs(workdir, exist_ok=True)
    names = [r[0] for r in RUNS]
    wanted = only or names
    unknown = sorted(set(wanted) - set(names))
    if unknown:
        raise ValueError(f"unknown suite runs {unknown}; known: {names}")
    if any(n != TEACHER and n != BASELINE for n in wanted) and TEACHER not in wanted:
        wanted = [TEACHER] + list(wanted)
    records: Dict[str, Dict[str, Any]] = {}
    for name, module, description in RUNS:
        if name not in wanted:
            continue
        config = suite_config(module, data=data, workdir=workdir, steps=steps, overrides=overrides, variant=variant)
        records[name] = _train_record(name, description, config, os.path.join(workdir, name), log)
    return write_summary(records, workdir, log=log)


def _teacher_spec(spec: str, crop) -> str:
    """The student's verification spec with the teacher's own crop instead (same pairs, same images)."""
    from facekd_jax.data import images as images_lib
    from facekd_jax.data import verification

    kind, _, rest = spec.partition(":")
    if crop is None:
        return spec
    box = ",".join(str(v) for v in crop)
    if kind in ("lfw", "lfw-view2"):
        root = images_lib.split_crop(rest)[0]
        pairs = "pairsDevTest.txt" if kind == "lfw" else "pairs.txt"
        return f"pairs:{os.path.join(root, pairs)}:{os.path.join(root, verification.LFW_IMAGES)}@{box}"
    if kind in ("pairs", "bin"):
        return f"{kind}:{images_lib.split_crop(rest)[0]}@{box}"
    raise ValueError(f"--val={spec}: no way to give the teacher its crop on this kind of set")


def _teacher_record(teacher_dir: str, spec: str, eval_batch_size: int, log) -> Dict[str, Any]:
    """The imported teacher evaluated on `spec` (its own crop and input size), cached beside it per spec."""
    from facekd_jax import config_lib, models, train
    from facekd_jax.teachers.imported import read_teacher_run

    run = read_teacher_run(teacher_dir)
    path = os.path.join(teacher_dir, "suite_eval.json")
    cached = {}
    if os.path.exists(path):
        with open(path) as f:
            cached = json.load(f)
    if spec not in cached:
        log(f"== teacher: {run.model} on {spec} ==")
        config = config_lib.default_config()
        config.model, config.embedding_size, config.data.image_size = run.model, run.embedding_size, run.image_size
        config.data.val_targets = (spec,)
        config.eval_batch_size = eval_batch_size
        t0 = time.time()
        results = train.evaluate_workdir(config, teacher_dir)["results"]
        summary = models.model_summary(run.model, image_size=run.image_size, embedding_size=run.embedding_size)
        cached[spec] = {"description": f"{run.model} teacher ({run.image_size}x{run.image_size}, its own crop)",
                        "model": run.model, "eval": results,
                        "params": summary["params"], "gflops": summary["gflops"], "mb": summary["mb"],
                        "image_size": run.image_size, "train_seconds": 0.0, "eval_seconds": time.time() - t0}
        with open(path, "w") as f:
            json.dump(cached, f)
    return cached[spec]


def run_dlib_suite(lfw_dir: str, workdir: str, **kwargs) -> Dict[str, Any]:
    """The thesis's question with a strong teacher: dlib's descriptor imported into DIR/teacher_dlib, then
    run_teacher_suite on LFW's View 1 training people (label-free row: all of their images)."""
    from facekd_jax.teachers.imported import import_dlib

    teacher_dir = os.path.join(workdir, "teacher_dlib")
    import_dlib(teacher_dir, log=kwargs.get("log", print))
    return run_teacher_suite(teacher_dir, workdir, train=f"lfw:{lfw_dir}", label_free=f"lfw-all:{lfw_dir}",
                             **kwargs)


def run_teacher_suite(teacher_dir: str, workdir: str, *, train: str, label_free: str, seeds: int,
                      students: Optional[List[str]] = None, steps: Optional[int] = None,
                      only: Optional[List[str]] = None, overrides: Optional[Dict[str, Any]] = None,
                      variant: str = DLIB_VARIANT, log=print) -> Dict[str, Any]:
    """Every method of DISTILL_RUNS from the teacher run in `teacher_dir`, through its embedding caches (built in
    DIR/cache_0 for `train` and DIR/cache_1 for `label_free` when missing), for each student and `seeds` seeds;
    evaluates the teacher on the same pairs with its own crop; writes DIR/summary.json, summary.md and
    roc_<student>.png. Returns {student: summary}."""
    from facekd_jax import config_lib
    from facekd_jax.teachers import cache as cache_lib
    from facekd_jax.teachers.imported import read_teacher_run

    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    students = list(students or DLIB_STUDENTS)
    names = [r[0] for r in DISTILL_RUNS]
    wanted = only or names
    unknown = sorted(set(wanted) - set(names))
    if unknown:
        raise ValueError(f"unknown suite runs {unknown}; known: {names}")
    os.makedirs(workdir, exist_ok=True)
    teacher = read_teacher_run(teacher_dir)
    specs = {"train": train, "label_free": label_free}
    caches = {}
    for role, spec in specs.items():
        if role == "label_free" and LABEL_FREE not in wanted:
            continue
        name = "cache_" + spec.split(":", 1)[0].replace("-", "_")  # cache_lfw, cache_lfw_all
        if role == "label_free" and spec.split(":", 1)[0] == train.split(":", 1)[0]:
            name += "_label_free"
        caches[role] = os.path.join(workdir, name)
        t0 = time.time()
        built = cache_lib.build_cache(teacher_dir, spec, caches[role])
        log(f"teacher cache {caches[role]}: {built.header['data']['num_images']} images ({time.time() - t0:.0f} s)")

    summaries = {}
    for student in students:
        seed_records: Dict[str, List[Dict[str, Any]]] = {}
        for seed in range(seeds):
            for name, module, description, extra in DISTILL_RUNS:
                if name not in wanted:
                    continue
                config = suite_config(module, data=train, workdir=workdir, steps=steps,
                                      overrides=dict(overrides, student=student), variant=variant)
                config.seed = seed
                if config.teacher.model:
                    role = "label_free" if name == LABEL_FREE else "train"
                    config.teacher.model, config.teacher.workdir = teacher.model, teacher_dir
                    config.teacher.embedding_size = teacher.embedding_size
                    config.teacher.cache = caches[role]
                    config.data.train = specs[role]
                    config.kd.projection = config.embedding_size != teacher.embedding_size
                for key, value in extra.items():
                    config_lib.set_field(config, key, value)
                run_dir = os.path.join(workdir, student, f"seed{seed}", name)
                record = _train_record(f"{student} seed {seed} {name}", description, config, run_dir, log)
                seed_records.setdefault(name, []).append(record)
        val = next(iter(next(iter(seed_records.values()))[0]["eval"]))
        teacher_rec = _teacher_record(teacher_dir, _teacher_spec(config.data.val_targets[0],
                                                                 teacher.crop_for(train)),
                                      config.eval_batch_size, log)
        summaries[student] = write_seed_summary(student, seed_records, teacher_rec, workdir, val, log=log)
    with open(os.path.join(workdir, "summary.json"), "w") as f:
        json.dump({"students": summaries, "seeds": seeds, "teacher": teacher.workdir}, f, indent=2)
    with open(os.path.join(workdir, "summary.md"), "w") as f:
        for summary in summaries.values():
            f.write(summary["markdown"] + "\n")
    log(f"wrote {workdir}/summary.json, summary.md, roc_<student>.png")
    return summaries


def write_seed_summary(student: str, seed_records: Dict[str, List[Dict[str, Any]]], teacher: Dict[str, Any],
                       workdir: str, val: str, *, log=print) -> Dict[str, Any]:
    """One student's table over seeds: accuracy mean +- std over seeds, per-seed accuracy and McNemar p against
    that seed's baseline, EER and FNMR@FMR=1e-3 (means), size, train time; the teacher's row on the same pairs;
    roc_<student>.png with every model's seed-0 curve and the teacher's."""
    import numpy as np

    from facekd_jax import evaluate

    def result(rec):
        return next(iter(rec["eval"].values()))

    baseline = seed_records.get(DLIB_BASELINE)
    rows, curves = {}, {}
    t = result(teacher)
    rows["teacher"] = {"description": teacher["description"], "accuracy_mean": t["accuracy"],
                            "accuracy_std_over_seeds": 0.0, "accuracy_per_seed": [t["accuracy"]],
                            "p_vs_baseline_per_seed": [evaluate.mcnemar(t["correct"], result(b)["correct"])["p_value"]
                                                       for b in baseline] if baseline else [],
                            "eer_mean": t["eer"], "fnmr_at_fmr_1e-3_mean": t["fnmr_at_fmr"]["1e-3"],
                            "params": teacher["params"], "gflops": teacher["gflops"], "train_seconds_mean": 0.0,
                            "image_size": teacher["image_size"]}
    curves["teacher"] = (t["roc"]["fmr"], t["roc"]["fnmr"])
    for name, recs in seed_records.items():
        res = [result(r) for r in recs]
        acc = [r["accuracy"] for r in res]
        p_values = []
        if baseline and name != DLIB_BASELINE:
            p_values = [evaluate.mcnemar(r["correct"], result(b)["correct"])["p_value"] for r, b in zip(res, baseline)]
        rows[name] = {"description": recs[0]["description"], "accuracy_mean": float(np.mean(acc)),
                      "accuracy_std_over_seeds": float(np.std(acc, ddof=1)) if len(acc) > 1 else 0.0,
                      "accuracy_per_seed": acc, "p_vs_baseline_per_seed": p_values,
                      "eer_mean": float(np.mean([r["eer"] for r in res])),
                      "fnmr_at_fmr_1e-3_mean": float(np.mean([r["fnmr_at_fmr"]["1e-3"] for r in res])),
                      "params": recs[0]["params"], "gflops": recs[0]["gflops"],
                      "train_seconds_mean": float(np.mean([r["train_seconds"] for r in recs])),
                      "image_size": recs[0]["image_size"]}
        curves[name] = (res[0]["roc"]["fmr"], res[0]["roc"]["fnmr"])
    pairs = len(t["correct"])
    lines = [f"### {student}: {val} ({pairs} pairs), {len(baseline or [])} seeds\n",
             "| model | accuracy % (mean ± std over seeds) | per seed | McNemar p vs that seed's baseline | "
             "EER % | FNMR@FMR=1e-3 % | params (M) | GFLOPs | input | train s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        per_seed = ", ".join(f"{100 * a:.1f}" for a in r["accuracy_per_seed"])
        p = ", ".join(f"{v:.2g}" for v in r["p_vs_baseline_per_seed"]) or ("baseline" if name == DLIB_BASELINE
                                                                            else "n/a")
        lines.append(f"| {name} | {100 * r['accuracy_mean']:.2f} ± {100 * r['accuracy_std_over_seeds']:.2f} | "
                     f"{per_seed} | {p} | {100 * r['eer_mean']:.2f} | {100 * r['fnmr_at_fmr_1e-3_mean']:.1f} | "
                     f"{r['params'] / 1e6:.2f} | {r['gflops']:.3f} | {r['image_size']} | "
                     f"{r['train_seconds_mean']:.0f} |")
    markdown = "\n".join(lines) + "\n"
    evaluate.plot_roc(curves, os.path.join(workdir, f"roc_{student}.png"),
                      title=f"{student} students and their teacher, {val} (seed 0)")
    log(markdown)
    return {"verification_set": val, "pairs": pairs, "rows": rows, "markdown": markdown}


def write_summary(records: Dict[str, Dict[str, Any]], workdir: str, *, log=print) -> Dict[str, Any]:
    from facekd_jax import evaluate

    target = next(iter(next(iter(records.values()))["eval"]))  # the first verification set
    rows, curves = {}, {}
    for name, rec in records.items():
        r = rec["eval"][target]
        rows[name] = {"accuracy": r["accuracy"], "accuracy_std": r["accuracy_std"], "eer": r["eer"],
                      "fnmr_at_fmr": r["fnmr_at_fmr"], "correct": r["correct"], "params": rec["params"],
                      "gflops": rec["gflops"], "mb": rec["mb"]}
        curves[name] = (r["roc"]["fmr"], r["roc"]["fnmr"])
    baseline = BASELINE if BASELINE in rows else None
    models_json = {}
    for name, row in rows.items():
        p = None
        if baseline and name != baseline:
            p = evaluate.mcnemar(row["correct"], rows[baseline]["correct"])["p_value"]
        models_json[name] = {
            "accuracy": row["accuracy"], "accuracy_std": row["accuracy_std"], "eer": row["eer"],
            "fnmr_at_fmr": row["fnmr_at_fmr"], "params": row["params"], "gflops": row["gflops"], "mb": row["mb"],
            "p_value_vs_baseline": p, "train_seconds": records[name]["train_seconds"],
            "description": records[name]["description"], "pairs": len(row["correct"])}
    table = evaluate.compare(rows, baseline=baseline)
    summary = {"verification_set": target, "baseline": baseline,
               "image_size": next(iter(records.values()))["image_size"], "models": models_json}
    with open(os.path.join(workdir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    with open(os.path.join(workdir, "summary.md"), "w") as f:
        f.write(f"Verification set: {target} ({models_json[next(iter(models_json))]['pairs']} pairs)\n\n")
        f.write(table + "\n")
    evaluate.plot_roc(curves, os.path.join(workdir, "roc.png"), title=f"ROC on {target}")
    log(table)
    log(f"wrote {workdir}/summary.json, summary.md, roc.png")
    return summary


def main(argv=None):
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="synthetic", help="synthetic | lfw:DIR | any training data spec")
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--steps", type=int, default=None, help="train steps per model (same for all)")
    parser.add_argument("--runs", default="", help="comma-separated subset of: " + ",".join(r[0] for r in RUNS))
    parser.add_argument("--val", default="", help="verification specs, comma-separated (bin:FILE, pairs:...)")
    parser.add_argument("--student", default=None, help="student architecture (default resnet56)")
    parser.add_argument("--teacher", default=None,
                        help="'dlib': dlib's imported descriptor as the teacher (LFW data; see the module doc); "
                             "else the architecture of the teacher the suite trains (default resnet18)")
    parser.add_argument("--seeds", type=int, default=None, help="with --teacher=dlib: seeds per model (default 3)")
    parser.add_argument("--students", default="", help="with --teacher=dlib: comma-separated students "
                        "(default mobilefacenet)")
    parser.add_argument("--variant", default="", help="the config variant every model is built at (config_lib."
                        "VARIANTS, key=value parts allowed): default demo for synthetic data, lfw for LFW, "
                        "lfw_dlib with --teacher=dlib")
    parser.add_argument("--image_size", type=int, default=None)
    parser.add_argument("--batch_size", type=int, default=None)
    parser.add_argument("--embedding_size", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--scale", type=float, default=None, help="margin-head scale s for every model")
    args = parser.parse_args(argv)
    from facekd_jax import paths
    if paths.is_url(args.workdir):
        parser.error(f"--workdir={args.workdir}: the suite's workdir must be a local folder (its runs, caches and "
                     "summary live there); a single run of facekd_jax.main takes gs:// workdirs")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    from facekd_jax import logs
    for handler in logging.getLogger().handlers:
        logs.quiet(handler)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # The KD students share their init and eval programs: compile them once for the whole suite.
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(os.path.abspath(args.workdir), ".jax_cache"))
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")
    from facekd_jax.cpu import xla_flags
    xla_flags.apply_cpu_defaults()  # before JAX starts: XLA reads XLA_FLAGS once (the configs keep cpu_kernels=auto)
    import tensorflow as tf
    tf.config.set_visible_devices([], "GPU")
    only = [r for r in args.runs.split(",") if r] or None
    if args.teacher == "dlib":
        kind, _, lfw_dir = args.data.partition(":")
        if kind != "lfw" or not lfw_dir:
            parser.error("--teacher=dlib runs on LFW: --data=lfw:DIR")
        run_dlib_suite(lfw_dir, args.workdir, seeds=args.seeds or DLIB_SEEDS, variant=args.variant or DLIB_VARIANT,
                       students=[s for s in args.students.split(",") if s] or None, steps=args.steps, only=only,
                       overrides={"image_size": args.image_size, "batch_size": args.batch_size,
                                  "embedding_size": args.embedding_size, "lr": args.lr, "scale": args.scale,
                                  "val_targets": [v for v in args.val.split(",") if v] or None})
        return
    run_suite(args.data, args.workdir, steps=args.steps, only=only, variant=args.variant or None,
              overrides={"student": args.student, "teacher": args.teacher, "image_size": args.image_size,
                         "batch_size": args.batch_size,
                         "embedding_size": args.embedding_size, "lr": args.lr, "scale": args.scale,
                         "val_targets": [v for v in args.val.split(",") if v] or None})


if __name__ == "__main__":
    main()
