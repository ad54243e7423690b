"""The reliability page: every fault scenario and fuzz target, what was tried and what held, from a run of the tests.

    python benchmarks/reliability.py                          # runs the scenarios, writes docs/reliability.md
    python benchmarks/reliability.py --fuzz-json runs/fuzz/fuzz.json   # with a large fuzz run's figures
    python benchmarks/reliability.py --fuzz-json A.json --fuzz-json B.json  # several runs (cheap and slow readers)

The scenarios are tests (SCENARIOS: a test file and a -k expression each); they run here under pytest with a
JUnit report, and the page lists each test with its outcome and time, grouped as below. The fuzz table comes from
`benchmarks/fuzz.py --json FILE` (10,000 mutants per reader by default; the CI's seeded budget is
tests/test_fuzz.py, run here as a scenario). The exit statuses come from facekd_jax/errors.py. Nothing is typed
into the page by hand: rerun this script to refresh it. Exit status 1 when a scenario failed.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from typing import List

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (group, test file, -k expression or "" for the whole file)
SCENARIOS = [
    ("Preemption and crashes", "tests/test_checkpoint.py",
     "sigkill or sigterm or restore_across or damaged or scrambled or nan_loss or failed_save"),
    ("Two runs, changed configs", "tests/test_checkpoint.py", "changed_config or workdir_lock"),
    ("Two runs, changed configs", "tests/test_train.py",
     "unknown_config_key or damaged_run_config or missing_real_data"),
    ("A full disk", "tests/test_full_disk.py", ""),
    ("A full disk", "tests/test_export.py", "full_disk or broken_export"),
    ("The command line: one line, an exit status", "tests/test_cli.py", ""),
    ("The command line: one line, an exit status", "tests/test_plan.py", "unknown_topology"),
    ("The command line: one line, an exit status", "tests/test_insightface_teacher.py", "command_line_errors"),
    ("Cloud paths", "tests/test_paths.py", "gs_workdir or gs_teacher"),
    ("Teacher caches", "tests/test_teacher_cache.py", "stopped_build or other_data"),
    ("Damaged and hostile files, by hand", "tests/test_data_formats.py", "truncated or corrupt or missing_path"),
    ("Damaged and hostile files, by hand", "tests/test_data_pipeline.py",
     "corrupt or never_hang or bad_specs"),
    ("Damaged and hostile files, by hand", "tests/test_dlib_teacher.py", "truncated or foreign"),
    ("Damaged and hostile files, by hand", "tests/test_align.py", "truncated or foreign or inflated"),
    ("Damaged and hostile files, by hand", "tests/test_insightface_teacher.py",
     "callable or legacy or wrong_architecture"),
    ("Fuzzed files, the CI's seeded budget", "tests/test_fuzz.py", ""),
]


def run_scenarios(junit: str, workers: int) -> None:
    """Every scenario in one pytest run (its JUnit XML at `junit`)."""
    files = sorted({path for _, path, _ in SCENARIOS})
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", *files], cwd=REPO,
                         capture_output=True, text=True).stdout
    ids = [line for line in out.splitlines() if "::" in line]
    selected = [i for i in ids for _, path, expr in SCENARIOS
                if i.startswith(path + "::") and _selected(i.split("::", 1)[1], expr)]
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}",
           "-n", str(workers), "--dist", "loadgroup", *sorted(set(selected))]
    subprocess.run(cmd, cwd=REPO)


def _tried(name: str) -> str:
    """test_a_b_c[param] -> 'a b c (param)'."""
    base, _, param = name.split("@")[0].partition("[")
    text = base[len("test_"):].replace("_", " ")
    return f"{text} ({param.rstrip(']')})" if param else text


def scenario_table(junit: str):
    """-> (markdown, failed): one row per test case of the JUnit report, grouped as SCENARIOS."""
    cases = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        path = case.get("classname", "").replace(".", "/") + ".py"
        outcome = "held"
        if case.find("failure") is not None or case.find("error") is not None:
            outcome = "**FAILED**"
        elif case.find("skipped") is not None:
            outcome = "skipped: " + (case.find("skipped").get("message") or "")[:100]
        cases.setdefault(path, []).append((case.get("name"), outcome, float(case.get("time", 0))))
    lines, failed, seen = [], 0, set()
    for group in dict.fromkeys(g for g, _, _ in SCENARIOS):
        lines += ["", f"### {group}", "", "| what was tried | test | outcome | s |", "|---|---|---|---:|"]
        for g, path, expr in SCENARIOS:
            if g != group:
                continue
            for name, outcome, seconds in cases.get(path, []):
                if (path, name) in seen or not _selected(name, expr):
                    continue
                seen.add((path, name))
                failed += outcome == "**FAILED**"
                lines.append(f"| {_tried(name)} | `{path}` | {outcome} | {seconds:.1f} |")
    return "\n".join(lines), failed


def _selected(name: str, expr: str) -> bool:
    """pytest's -k for the expressions SCENARIOS uses ('a or b or c'; '' selects all)."""
    return not expr or any(word.strip() in name for word in expr.split(" or "))


def fuzz_table(paths: List[str]) -> str:
    """One table per fuzz run on record (`benchmarks/fuzz.py --json`): e.g. the cheap readers at 10,000 mutants
    each and the slow ones (dlib's files, TFRecord) at a smaller budget, each run saying what it was."""
    runs = [p for p in paths if p and os.path.isfile(p)]
    if not runs:
        return ("No large fuzz run on record here: `python benchmarks/fuzz.py --json runs/fuzz/fuzz.json` (10,000 "
                "mutants per reader; hours on 2 cores), then rerun this script with `--fuzz-json runs/fuzz/fuzz.json`.")
    return "\n\n".join(_fuzz_run_table(p) for p in runs)


def _fuzz_run_table(path: str) -> str:
    with open(path) as f:
        run = json.load(f)
    lines = [f"`{run['command']}`: {run['per_reader']:,} mutants per reader (mutator seed {run['seed']}), "
             f"{run['wall_s'] / 60:.0f} min on {run['cpus']} CPUs, Python {run['python']}"
             + ("" if run.get("complete") else " (**stopped before the end: the figures so far**)") + "."
             + (" A smaller run than the 10,000 per reader of `make fuzz` (hours on 2 cores)."
                if run["per_reader"] < 10_000 else ""), "",
             "| seed | reader | inputs | right data | clear errors | failures | known | slowest s | peak MiB |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in run["readers"]:
        lines.append(f"| {r['seed']} | {r['reader']} | {r['inputs']:,} | {r['right']:,} | {r['clear_errors']:,} | "
                     f"{r['failures']} | {r['known_failures']} | {r['slowest_s']:.2f} | "
                     f"{r['largest_peak_bytes'] / 2**20:.1f} |")
    known = sorted({where for r in run["readers"] for where in r["known"]})
    lines += [""] + [f"Known (understood, counted apart from the failures; where the fix belongs): {where}"
                     for where in known]
    return "\n".join(lines).rstrip()


def exit_table() -> str:
    sys.path.insert(0, REPO)
    from facekd_jax import errors

    rows = [(0, "done"), (errors.EXIT_ERROR, "anything else: a full disk, a workdir in use by another run, a NaN "
                                              "loss, a failed checkpoint save, a failed export parity gate"),
            (errors.EXIT_USAGE, "a usage or input error: a missing path, a malformed spec or file, an unknown "
                                "config key, a workdir trained with another config"),
            (errors.EXIT_DOES_NOT_FIT, "`python -m facekd_jax.plan`: the config does not fit the chip"),
            (errors.EXIT_PREEMPTED, "preempted by SIGTERM after saving a checkpoint: rerun the same command")]
    return "\n".join(["| status | meaning |", "|---:|---|"] + [f"| {s} | {m} |" for s, m in rows])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(REPO, "docs", "reliability.md"))
    parser.add_argument("--junit", default=os.path.join(REPO, "runs", "reliability", "junit.xml"),
                        help="the scenarios' JUnit report (written by the run)")
    parser.add_argument("--fuzz-json", action="append", default=[],
                        help="a benchmarks/fuzz.py --json file; repeat for several runs (default runs/fuzz/fuzz.json)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--no-run", action="store_true", help="render the page from an existing --junit report")
    args = parser.parse_args(argv)
    os.makedirs(os.path.dirname(args.junit), exist_ok=True)
    t0 = time.time()
    if not args.no_run:
        run_scenarios(args.junit, args.workers)
    scenarios, failed = scenario_table(args.junit)
    page = f"""# Reliability

Generated by `python benchmarks/reliability.py` on {datetime.date.today()}, {platform.machine()},
{os.cpu_count()} CPUs, Python {platform.python_version()} ({time.time() - t0:.0f} s). Each row is a test that
makes the fault and checks what must hold: one clear error naming the file, record or key; nothing already written
lost or corrupted (a damaged checkpoint is moved aside, never deleted); the run resuming exactly where that
applies. The times are of this run, with whatever else the machine was doing. Rerun a row with
`python -m pytest "FILE::TEST"`.

## Exit statuses

Every command (`facekd_jax.main`, `suite`, `sweep`, `plan`, `export`, `teachers`, `data.convert`) prints an expected
failure as one line, `error: ...`, without a traceback (`FACEKD_TRACEBACK=1` adds it), and exits with:

{exit_table()}

## Fault scenarios
{scenarios}

## Fuzzing every reader of outside bytes

tests/fuzzing.py mutates a valid input of each reader (bit flips, overwrites, truncation at each structural
boundary, inflated size and count fields, wrong magic, empty files, duplicated and deleted chunks) and reads each
mutant in a sandboxed worker with a time bound, a Python allocation bound (tracemalloc: 10x the file's size plus
16 MiB unless the reader's own working set needs more, tests/fuzzing.py READERS) and an address-space bound
(RLIMIT_AS), so a declared 2**40-byte record must be refused before anything that size is allocated. "right data": the reader's
answer equals what the unmutated parts say; "clear errors": one ValueError or project error naming the file;
"failures": anything else (a crash, a hang, an allocation over the bound, another exception, a wrong answer).

{fuzz_table(args.fuzz_json or [os.path.join(REPO, "runs", "fuzz", "fuzz.json")])}
"""
    with open(args.out, "w") as f:
        f.write(page)
    print(f"wrote {args.out}: {failed} scenario(s) failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
