"""Input-pipeline throughput: images/second (decode + crop/resize + flip + normalise + batch), per core.

  python benchmarks/input_pipeline.py [--spec SPEC] [--image-size 112] [--batch-size 128] [--seconds 20]

Default: LFW (../shared/data/lfw, 250x250 JPEGs, crop 62,55,188,181 resized to 112) when present, then the
synthetic set; SPEC may be any training spec (recordio:DIR, folder:DIR, tfrecord:GLOB, ...). Per core =
images/s divided by the cores this process may run on (os.sched_getaffinity). Also printed: images per
CPU-second of this process (user + system, all threads), which stays meaningful on a machine shared with other
jobs. The last line is `images_per_second_per_core=<float>` for the first spec measured (LFW when present).
Goal: >= 2,500 images/s per core, so that 8 cores feed one accelerator at 20k images/s.
Measured: the pipeline that decodes on every step (what sets too large to keep decoded in memory use);
`--decode-once` measures the gather from a set decoded once into memory (the default for small sets) instead.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")  # host-side benchmark: keep JAX/TF off accelerators

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
LFW_DIR = REPO.parent / "shared" / "data" / "lfw"


def measure(spec: str, *, image_size: int, batch_size: int, seconds: float, warmup_batches: int,
            decode_once: bool = False) -> dict:
    """Runs the training pipeline of `spec` for about `seconds` after warm-up; returns the figures."""
    from facekd_jax.data import make_train_dataset, pipeline

    batches, info = make_train_dataset(spec, batch_size=batch_size, image_size=image_size, seed=0,
                                       process_index=0, process_count=1,
                                       decode_once_max_bytes=pipeline.DECODE_ONCE_MAX_BYTES if decode_once else 0)
    for _ in range(warmup_batches):
        next(batches)
    n = 0
    cpu0, t0 = os.times(), time.perf_counter()
    while True:
        batch = next(batches)
        n += batch["image"].shape[0]
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds:
            break
    cpu1 = os.times()
    cpu = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
    cores = len(os.sched_getaffinity(0))
    rate = n / elapsed
    return dict(spec=spec, source=info["source"], images=n, seconds=elapsed, images_per_second=rate, cores=cores,
                images_per_second_per_core=rate / cores, images_per_cpu_second=n / max(cpu, 1e-9),
                cpu_utilisation=cpu / elapsed / cores)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", action="append", help="training spec (repeatable); default: LFW if present, "
                                                        "then synthetic")
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seconds", type=float, default=20.0, help="measured time per spec, after warm-up")
    parser.add_argument("--warmup-batches", type=int, default=10)
    parser.add_argument("--decode-once", action="store_true", help="small sets decoded once into memory, as "
                        "training does (default: decoded on every step, as large sets are)")
    args = parser.parse_args(argv)
    specs = args.spec or ([f"lfw:{LFW_DIR}"] if (LFW_DIR / "peopleDevTrain.txt").exists() else []) + ["synthetic"]
    results = []
    for spec in specs:
        r = measure(spec, image_size=args.image_size, batch_size=args.batch_size, seconds=args.seconds,
                    warmup_batches=args.warmup_batches, decode_once=args.decode_once)
        results.append(r)
        print(f"{r['spec']}: {r['source']}")
        print(f"  {r['images']} images in {r['seconds']:.1f} s at {args.image_size}x{args.image_size}, batch "
              f"{args.batch_size}: {r['images_per_second']:.0f} images/s on {r['cores']} core(s) = "
              f"{r['images_per_second_per_core']:.0f} images/s per core; {r['images_per_cpu_second']:.0f} images per "
              f"CPU-second (CPU use {100 * r['cpu_utilisation']:.0f}% of the cores)", flush=True)
    print(f"images_per_second_per_core={results[0]['images_per_second_per_core']:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
