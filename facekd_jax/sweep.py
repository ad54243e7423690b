"""A sweep: every setting a table's config file lists under SWEEP, trained and compared on the development split.

  python -m facekd_jax.sweep --config=configs/lfw_dlib.py --workdir=runs/lfw_dlib_sweep [--entries=a,b] [--seeds=1]

A table's file declares `SWEEP = {name: (runs, "key=value,...")}`: for each entry the suite trains those runs of
the table and its baseline with the entry's settings (a baseline with the same config as another entry's is that
one, linked, not trained again), on the development split (`suite.run_suite(..., split="dev")`: LFW's
held-out people, data.lfw_dev; the reported pairs cannot be read), in WORKDIR/<entry>. The table of every entry and
run (development accuracy, the lift over that entry's baseline with McNemar's p, EER) is written to
WORKDIR/sweep.md and sweep.json; the settings a table reports are chosen from it. Entries resume and finished
runs are reused, as in the suite. A sweep varies the students: every entry is taught by the table's teacher as
written, imported or trained once in WORKDIR (or --teacher=DIR), with a cache per training set it uses.
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Any, Callable, Dict, List, Optional, Sequence


def entries(config: str) -> Dict[str, tuple]:
    """The SWEEP of the table file `config` (FILE.py): {name: (runs, arg)}."""
    from facekd_jax import suite

    table = suite.load_table(config)
    sweep = getattr(table.module, "SWEEP", None)
    if not sweep:
        raise ValueError(f"--config={config}: {table.path} declares no SWEEP")
    return dict(sweep)


def run_sweep(config: str, workdir: str, *, names: Optional[Sequence[str]] = None, seeds: int = 1,
              teacher_dir: Optional[str] = None, log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Runs the SWEEP entries `names` (default all) of the table file `config` on the development split; writes
    and returns {"rows": [...], "markdown"}."""
    from facekd_jax import suite

    path, _, base_arg = config.partition(":")
    sweep = entries(path)
    unknown = sorted(set(names or []) - set(sweep))
    if unknown:
        raise ValueError(f"unknown sweep entries {unknown}; {path} has: {', '.join(sweep)}")
    teacher = suite.get_teacher(suite.load_table(config), workdir, teacher_dir=teacher_dir, log=log, split="dev")
    rows: List[Dict[str, Any]] = []
    for name in names or list(sweep):
        runs, arg = sweep[name]
        full = ",".join(a for a in (base_arg, arg) if a)
        table = suite.Table(path=path, arg=full, module=suite.load_table(path).module)
        if table.suite.baseline not in runs:
            runs = (table.suite.baseline, *runs)
            _share_baseline(table, os.path.join(workdir, name), workdir, seeds, log)
        log(f"=== sweep entry {name}: {', '.join(runs)} with {full or 'the table as written'} ===")
        summary = suite.run_suite(f"{path}:{full}" if full else path, os.path.join(workdir, name), runs=list(runs),
                                  seeds=seeds, split="dev", teacher_dir=teacher.workdir if teacher else None,
                                  log=log)
        for student, table in summary["students"].items():
            for run, row in table["rows"].items():
                if run == "teacher":
                    continue
                base = table["rows"].get(table["baseline"])
                rows.append({"entry": name, "settings": full, "student": student, "run": run,
                             "accuracy_per_seed": row["accuracy_per_seed"], "accuracy_mean": row["accuracy_mean"],
                             "lift": row["accuracy_mean"] - base["accuracy_mean"] if base else None,
                             "p_per_seed": row["p_vs_baseline_per_seed"], "eer_mean": row["eer_mean"],
                             "pairs": table["pairs"]})
    lines = ["| entry | settings | student | run | dev accuracy % (per seed) | lift over the entry's baseline "
             "(points) | McNemar p per seed | EER % |", "|---|---|---|---|---|---:|---|---:|"]
    for r in rows:
        lift = "baseline" if r["run"] in ("baseline", "baseline_resnet56") else (
            f"{100 * r['lift']:+.1f}" if r["lift"] is not None else "")
        lines.append(f"| {r['entry']} | {r['settings'] or '(as written)'} | {r['student']} | {r['run']} | "
                     f"{100 * r['accuracy_mean']:.1f} ({', '.join(f'{100 * a:.1f}' for a in r['accuracy_per_seed'])})"
                     f" | {lift} | {', '.join(f'{p:.2g}' for p in r['p_per_seed'])} | {100 * r['eer_mean']:.1f} |")
    markdown = "\n".join(lines) + "\n"
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "sweep.json"), "w") as f:
        json.dump({"config": config, "seeds": seeds, "rows": rows}, f, indent=2)
    with open(os.path.join(workdir, "sweep.md"), "w") as f:
        f.write(markdown)
    log(markdown)
    return {"rows": rows, "markdown": markdown}


def _share_baseline(table, entry_dir: str, workdir: str, seeds: int, log) -> None:
    """An entry that varies only what its baseline ignores (KD weights, temperature, the teacher's centring)
    compares with a baseline another entry trained with the same config: linked into entry_dir, where the suite
    finds it finished (its suite_run.json names the config) and reuses it instead of training it again."""
    from facekd_jax import suite

    for seed in range(seeds):
        config = table.config(table.suite.baseline, seed=seed, split="dev")
        key, tail = suite._config_key(config), os.path.join(config.model, f"seed{seed}", table.suite.baseline)
        mine = os.path.join(entry_dir, tail)
        if os.path.lexists(mine):
            continue
        for other in sorted(os.listdir(workdir) if os.path.isdir(workdir) else []):
            found = os.path.join(workdir, other, tail)
            record = os.path.join(found, "suite_run.json")
            if found != mine and not os.path.islink(found) and os.path.isfile(record):
                with open(record) as f:
                    if json.load(f).get("config") == key:
                        os.makedirs(os.path.dirname(mine), exist_ok=True)
                        os.symlink(os.path.relpath(found, os.path.dirname(mine)), mine)
                        log(f"{mine}: the same baseline as {found}, linked")
                        break


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="a table's config file with a SWEEP, FILE.py[:ARG]")
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--entries", default="", help="comma-separated subset of the SWEEP's entries")
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--teacher", default="", help="a teacher's folder to use as it is (default: the table's, "
                        "imported or trained in WORKDIR)")
    args = parser.parse_args(argv)
    from facekd_jax import errors, logs
    logs.start_process(workdir=args.workdir)
    with errors.command_line():
        run_sweep(args.config, args.workdir, names=[e for e in args.entries.split(",") if e] or None,
                  seeds=args.seeds, teacher_dir=args.teacher or None)


if __name__ == "__main__":
    main()
