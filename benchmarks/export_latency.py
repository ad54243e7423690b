"""Batch-1 latency of an exported student, side by side in one run: JAX (jit), onnxruntime fp32 and int8, LiteRT
fp32, fp16 and int8, with 1 and 2 threads; file sizes.

  python benchmarks/export_latency.py --workdir=runs/lfw_dlib/mobilefacenet/seed0/baseline --calibration=lfw:DIR \
      --parity=lfw:DIR
  python benchmarks/export_latency.py --model=resnet56 --image-size=64 --calibration=lfw:DIR --parity=lfw:DIR

Without --workdir, a freshly initialised student of --model is trained for 2 steps on the calibration data first
(latency does not depend on the weights; parity on a barely trained model says little). Each artefact goes through
facekd_jax.export, parity gate included. Latency: median and p90 of --repeats single-image calls after --warmup.
JAX runs with the process's threads (XLA:CPU uses every core).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _timings(fn, x, warmup: int, repeats: int):
    for _ in range(warmup):
        fn(x)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times)), 1e3 * float(np.percentile(times, 90))


def _train_tiny(model: str, image_size: int, data: str, workdir: str) -> None:
    import importlib

    from facekd_jax import config_lib, train

    c = importlib.import_module("configs.baseline_resnet56").get_config("tiny")
    config_lib.set_field(c, "model", model)
    c.embedding_size = 128 if model == "mobilefacenet" else 256
    c.data.image_size, c.data.train, c.data.val_targets = image_size, data, ()
    c.num_train_steps = 2
    train.train_and_evaluate(c, workdir)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="", help="a trained run; else --model is initialised")
    parser.add_argument("--model", default="mobilefacenet")
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--calibration", required=True, help="image spec for int8 calibration (and the tiny run)")
    parser.add_argument("--parity", required=True, help="verification spec for the parity gates")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--artefacts", default="", help="keep the exported files (and the tiny run) in this folder "
                        "and reuse those already there: export once, time again on a quiet machine")
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import jax

    from facekd_jax import export

    scratch = args.artefacts or tempfile.mkdtemp(prefix="export-latency-")
    os.makedirs(scratch, exist_ok=True)
    workdir = args.workdir
    if not workdir:
        workdir = os.path.join(scratch, "run")
        if not os.path.isfile(os.path.join(workdir, "config.json")):
            _train_tiny(args.model, args.image_size, args.calibration, workdir)
    student = export.load_student(workdir)
    s = student.image_size
    x = np.random.default_rng(0).uniform(0, 255, (1, s, s, 3)).astype(np.float32)
    rows = []
    jax_fn = jax.jit(export.pixel_function(student))
    ms, p90 = _timings(lambda v: jax_fn(v).block_until_ready(), x, args.warmup, args.repeats)
    rows.append(("jax jit fp32", f"all ({os.cpu_count()})", ms, p90, None, 1.0))
    for fmt, precisions in (("onnx", ("fp32", "int8")), ("tflite", ("fp32", "fp16", "int8"))):
        for precision in precisions:
            out = os.path.join(scratch, f"{precision}.{fmt}")
            if os.path.isfile(out) and os.path.isfile(out + ".json"):  # kept from an earlier --artefacts run
                with open(out + ".json") as f:
                    record = json.load(f)
            else:
                record = export.export(workdir, fmt=fmt, precision=precision, out=out, calibration=args.calibration,
                                       parity=args.parity, log=lambda _: None)
            for threads in (1, 2):
                runtime = export.Runtime(out, fmt, threads=threads)
                ms, p90 = _timings(runtime.one, x, args.warmup, args.repeats)
                rows.append((f"{'onnxruntime' if fmt == 'onnx' else 'LiteRT'} {precision}", str(threads), ms, p90,
                             record["bytes"], record["parity"]["mean_cosine"]))
    print(f"\n{student.model} {s}x{s}, embedding {student.embedding_size}, step {student.step} ({workdir})")
    print("| runtime | threads | median ms | p90 ms | file MiB | mean cosine to JAX |")
    print("|---|---|---|---|---|---|")
    for name, threads, ms, p90, size, cos in rows:
        print(f"| {name} | {threads} | {ms:.2f} | {p90:.2f} | {'' if size is None else f'{size / 2**20:.2f}'} "
              f"| {cos:.6f} |")


if __name__ == "__main__":
    main()
