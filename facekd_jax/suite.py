"""The thesis in miniature: train teacher, baseline and KD students on one budget, evaluate on the same pairs.

  python -m facekd_jax.suite --data=synthetic --workdir=runs/demo
  python -m facekd_jax.suite --data=lfw:../shared/data/lfw --workdir=runs/lfw

Writes DIR/summary.json, DIR/summary.md (the table, McNemar p-values against the ArcFace-only baseline) and
DIR/roc.png. Each model is an ordinary run in DIR/<name> (a config from configs/ with the suite's data and
budget), so a rerun resumes unfinished runs and reuses finished ones.
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
    ("similarity_kd", "similarity_kd", "ResNet-56, similarity-matrix KD"),
    ("proxyless_kd", "proxyless_kd", "ResNet-56, teacher's frozen centres"),
    ("margin_distillation", "margin_distillation", "ResNet-56, MarginDistillation"),
]
TEACHER, BASELINE = "teacher_resnet18", "baseline_resnet56"

# Sizes per data kind: synthetic is the demo (minutes on 2 CPU cores); lfw trains on View 1's train people.
PRESETS = {
    "synthetic": dict(train="synthetic:32:32", val=["synthetic:400"], image_size=24, embedding_size=128,
                      batch_size=32, steps=60, lr=0.05, eval_batch_size=200),
    # 32x32 (CIFAR's size, ResNet-56's home): at 48x48 the teacher's 200 steps took 5.7x as long on XLA:CPU, not
    # 2.25x. ArcFace keeps m=0.5 but s=32: at s=64 the 200-step teacher stayed at chance (51.1%), at s=32 it
    # reached 58.8%, 66.2% and 63.6% in three runs (pairsDevTest).
    "lfw": dict(train="lfw:{dir}", val=["lfw:{dir}"], image_size=32, embedding_size=256,
                batch_size=64, steps=200, lr=0.1, scale=32.0, eval_batch_size=250),
}


def suite_config(config_module: str, *, data: str, workdir: str, steps: Optional[int], overrides: Dict[str, Any]):
    """The experiment's own config, with the suite's data, size and budget (same for every model)."""
    from configs import default  # noqa: F401 (configs/ must be importable)

    kind = data.split(":")[0]
    preset = dict(PRESETS.get(kind, PRESETS["synthetic"]))
    preset.update({k: v for k, v in overrides.items() if v is not None})
    c = importlib.import_module(f"configs.{config_module}").get_config()
    path = data.split(":", 1)[1] if ":" in data else ""
    if kind == "lfw":
        c.data.train = preset["train"].format(dir=path)
        c.data.val_targets = tuple(v.format(dir=path) for v in preset["val"])
    elif kind == "synthetic":
        c.data.train = data if ":" in data else preset["train"]
        c.data.val_targets = tuple(preset["val"])
    else:  # any training spec (recordio:, folder:, ...); verification sets from --val
        c.data.train = data
        c.data.val_targets = ()
    if preset.get("val_targets"):
        c.data.val_targets = tuple(preset["val_targets"])
    if not c.data.val_targets:
        raise ValueError(f"--data={data}: give the verification sets to compare on with --val=SPEC[,SPEC]")
    is_teacher_run = config_module == TEACHER
    if preset.get("student") and not is_teacher_run:
        c.model = preset["student"]
    if preset.get("teacher"):
        if is_teacher_run:
            c.model = preset["teacher"]
        elif c.teacher.model:
            c.teacher.model = preset["teacher"]
    c.data.image_size = preset["image_size"]
    c.embedding_size = c.teacher.embedding_size = preset["embedding_size"]
    c.batch_size = preset["batch_size"]
    c.num_train_steps = steps or preset["steps"]
    c.optimizer.lr = preset["lr"]
    if preset.get("scale"):
        c.scale = preset["scale"]
    c.optimizer.schedule = "step"
    c.optimizer.step_fractions = (0.6, 0.85)
    c.optimizer.warmup_steps = max(c.num_train_steps // 20, 0)
    c.log_every_steps = max(c.num_train_steps // 10, 1)
    c.eval_every_steps = -1            # evaluate once at the end: same pairs, same point for every model
    c.eval_batch_size = preset["eval_batch_size"]
    c.checkpoint_every_steps = max(c.num_train_steps // 3, 1)
    c.keep_checkpoints = 1
    c.best_metric = ""
    if c.teacher.model:
        c.teacher.workdir = os.path.join(workdir, TEACHER)
    return c


def _finished(run_dir: str, steps: int) -> Optional[Dict[str, Any]]:
    path = os.path.join(run_dir, "suite_run.json")
    if os.path.exists(path):
        with open(path) as f:
            record = json.load(f)
        if record.get("step") == steps:
            return record
    return None


def run_suite(data: str, workdir: str, *, steps: Optional[int] = None, only: Optional[List[str]] = None,
              overrides: Optional[Dict[str, Any]] = None, log=print) -> Dict[str, Any]:
    """Trains and evaluates every run of RUNS (or `only`), then writes the summary files; returns the summary."""
    from facekd_jax import evaluate, models, train

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
        config = suite_config(module, data=data, workdir=workdir, steps=steps, overrides=overrides)
        run_dir = os.path.join(workdir, name)
        record = _finished(run_dir, config.num_train_steps)
        if record is None:
            log(f"== {name}: {description} ({config.num_train_steps} steps of {config.batch_size}) ==")
            t0 = time.time()
            out = train.train_and_evaluate(config, run_dir)
            if out.get("preempted"):
                raise SystemExit(f"suite interrupted during {name}; run the same command again to continue")
            summary = models.model_summary(config.model, image_size=config.data.image_size,
                                           embedding_size=config.embedding_size)
            record = {"step": out["step"], "description": description, "model": config.model,
                      "train_seconds": time.time() - t0, "eval": out["eval"],
                      "params": summary["params"], "gflops": summary["gflops"], "mb": summary["mb"],
                      "image_size": config.data.image_size}
            with open(os.path.join(run_dir, "suite_run.json"), "w") as f:
                json.dump(record, f)
        else:
            log(f"== {name}: finished earlier, reused ==")
        records[name] = record
    return write_summary(records, workdir, log=log)


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
    parser.add_argument("--teacher", default=None, help="teacher architecture (default resnet18)")
    parser.add_argument("--image_size", type=int, default=None)
    parser.add_argument("--batch_size", type=int, default=None)
    parser.add_argument("--embedding_size", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--scale", type=float, default=None, help="margin-head scale s for every model")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # The KD students share their init and eval programs: compile them once for the whole suite.
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(os.path.abspath(args.workdir), ".jax_cache"))
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")
    from facekd_jax import xla_flags
    xla_flags.apply_cpu_defaults()  # before JAX starts: XLA reads XLA_FLAGS once
    import tensorflow as tf
    tf.config.set_visible_devices([], "GPU")
    run_suite(args.data, args.workdir, steps=args.steps, only=[r for r in args.runs.split(",") if r] or None,
              overrides={"student": args.student, "teacher": args.teacher, "image_size": args.image_size,
                         "batch_size": args.batch_size,
                         "embedding_size": args.embedding_size, "lr": args.lr, "scale": args.scale,
                         "val_targets": [v for v in args.val.split(",") if v] or None})


if __name__ == "__main__":
    from facekd_jax import xla_flags
    xla_flags.restart_with_cpu_memory_settings()  # first: glibc and ld.so read GLIBC_TUNABLES/LD_PRELOAD only at start
    main()
