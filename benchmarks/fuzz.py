"""Bad input by the thousand, at scale: tests/fuzzing.py's harness over every reader of outside bytes.

    python benchmarks/fuzz.py                                         # 10,000 mutants per seed, rng seed 0
    python benchmarks/fuzz.py --per-reader 500 --seed 3 --only bin,pth --json runs/fuzz/fuzz.json

Each seed is a valid input of one reader (recordio: train.rec + train.idx + property; bin / bin-py2: protocol-4 and
protocol-2 verification .bin files; dlib: the real dlib_face_recognition_resnet_model_v1.dat; pth: a state dict
torch.save wrote; tfrecord: two files of tf.train.Example; cache: a teacher cache folder; config: a run's
config.json; jpeg / png: a small face-sized image, read by decode_image_np and decode_many). Its mutants are read
in sandbox workers (a time bound, a tracemalloc allocation bound, RLIMIT_AS) and classified (tests/fuzzing.py).

Out: per seed, inputs tried, right data, clear errors, failures, the slowest input's time and the largest peak
allocation (Python's, tracemalloc; resident-memory growth for the readers that build TensorFlow graphs: tfrecord,
jpeg, png), printed as a table; failures already understood whose fix lies outside the reader (fuzzing.KNOWN) are
counted apart as "known"; --json FILE writes the same figures (and per mutation kind)
for the reliability page. Failing inputs are saved under --out/<seed>/<n>-<kind>/ (replay one with
`python tests/fuzzing.py --replay DIR`). Exit status 1 when any input failed. Nothing is downloaded.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
import fuzzing  # noqa: E402  (the harness lives with the tests, which run it on a small budget)


def run_seed(name: str, args: argparse.Namespace, workdir: str, lock: threading.Lock) -> fuzzing.Report:
    """One seed's run in its own sandbox -> its Report (a seed whose maker is missing: a Report of 0 inputs)."""
    try:
        seed = fuzzing.build_seed(name, workdir)
    except (ImportError, FileNotFoundError) as e:
        with lock:
            print(f"{name}: skipped ({e})", flush=True)
        return fuzzing.Report(name, fuzzing.SEEDS[name])
    every = max(1, args.per_reader // 10)

    def progress(i: int, report: fuzzing.Report) -> None:
        if (i + 1) % every == 0:
            with lock:
                print(f"  {name}: {i + 1}/{args.per_reader} ({report.right} right, {report.errors} errors, "
                      f"{len(report.failures)} failures)", flush=True)

    with fuzzing.Sandbox(log_dir=os.path.join(workdir, name)) as box:
        return fuzzing.fuzz(seed, args.per_reader, rng_seed=args.seed, box=box, out=args.out,
                            workdir=os.path.join(workdir, name), progress=progress)


def table(reports) -> str:
    head = (f"{'seed':<22}{'reader':<16}{'inputs':>8}{'right':>8}{'errors':>8}{'failures':>9}{'known':>6}"
            f"{'slowest s':>11}{'peak MiB':>10}  slowest / largest kind")
    rows = [head, "-" * len(head)]
    for r in reports:
        rows.append(f"{r.seed:<22}{r.reader:<16}{r.inputs:>8}{r.right:>8}{r.errors:>8}{len(r.failures):>9}"
                    f"{len(r.known):>6}{r.slowest:>11.3f}{r.peak / fuzzing.MIB:>10.2f}  {r.slowest_kind} / "
                    f"{r.peak_kind}")
    known = sorted({where for r in reports for where in r.as_dict()["known"]})
    return "\n".join(rows + [f"known: {where}" for where in known])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-reader", type=int, default=10_000, help="mutants per seed (default 10,000)")
    parser.add_argument("--seed", type=int, default=0, help="the mutator's random seed")
    parser.add_argument("--out", default="runs/fuzz/failures", help="folder for failing inputs")
    parser.add_argument("--json", default="", help="write the figures to this file")
    parser.add_argument("--only", default="", help=f"comma-separated seeds (default all: {','.join(fuzzing.SEEDS)})")
    parser.add_argument("--workers", type=int, default=2, help="seeds run at once, each in its own sandbox")
    parser.add_argument("--workdir", default="", help="where mutants are written (default: a temporary folder)")
    args = parser.parse_args(argv)
    names = [n for n in args.only.split(",") if n] or list(fuzzing.SEEDS)
    unknown = sorted(set(names) - set(fuzzing.SEEDS))
    if unknown:
        parser.error(f"unknown seeds {unknown}; seeds: {', '.join(fuzzing.SEEDS)}")
    workdir = args.workdir or tempfile.mkdtemp(prefix="facekd-fuzz-")
    lock = threading.Lock()
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.workers)) as pool:
        # The slow seeds first, so the pool does not end on one long tail.
        order = sorted(names, key=lambda n: n not in ("shape-predictor", "tfrecord", "jpeg", "png", "dlib"))
        futures = {name: pool.submit(run_seed, name, args, workdir, lock) for name in order}
        done = {}
        for future in concurrent.futures.as_completed(futures.values()):
            report = future.result()
            done[report.seed] = report
            with lock:
                print(report.summary(), f"[{report.seconds:.0f} s]", flush=True)
            write_json(args, [done[n] for n in names if n in done], time.perf_counter() - t0, final=False)
    reports = [done[n] for n in names]
    wall = time.perf_counter() - t0
    print(table(reports))
    print(f"{sum(r.inputs for r in reports)} inputs, {sum(len(r.failures) for r in reports)} failures in {wall:.0f} s "
          f"(--per-reader {args.per_reader} --seed {args.seed}, {args.workers} workers)")
    write_json(args, reports, wall, final=True)
    return 1 if any(r.failures for r in reports) else 0


def write_json(args: argparse.Namespace, reports, wall: float, *, final: bool) -> None:
    """--json: the figures so far (rewritten as each seed finishes, so a long run can be read before it ends)."""
    if not args.json:
        return
    with open(args.json, "w") as f:
        json.dump({"command": " ".join(["python", "benchmarks/fuzz.py"] + sys.argv[1:]), "complete": final,
                   "per_reader": args.per_reader, "seed": args.seed, "wall_s": round(wall, 1),
                   "python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
                   "readers": [r.as_dict() for r in reports]}, f, indent=2)


if __name__ == "__main__":
    sys.exit(main())
