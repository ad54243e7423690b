"""Benchmark: full training steps (forward, ArcFace loss, backward, optimiser update) of facekd_jax's train step.

It runs the step `facekd_jax.step.setup` builds, the jitted step the training loop runs, on synthetic batches
already on the device (the input pipeline is benchmarked by benchmarks/input_pipeline.py). The config is
configs/default.py (ArcFace, SGD momentum 0.9, weight decay 5e-4, backbone grad clipping 5), or
configs/feature_kd.py (ArcFace + 100 x feature KD from a frozen teacher) when --teacher is given, with the
model, batch, image size, embedding size, classes and dtype of the command line.

    python benchmarks/train_step.py --model=resnet56 --batch=32 --steps=20 [--teacher=resnet18]
        [--image-size=112] [--classes=10572] [--embedding-size=512] [--dtype=float32|bfloat16]
        [--cached-teacher] [--cpu-kernels=auto|onednn|xla]
        [--warmup=3] [--peak-tflops=X] [--torch [--torch-compile] [--channels-last]]

Printed: compile time, median and mean ms/step over --steps timed steps (each step waited for with
jax.block_until_ready after warm-up steps), images/s (= batch / median step time), XLA's FLOPs per step (cost
analysis of the step traced with XLA's convolutions: forward + backward + update, teacher forward included; per
device, as XLA compiles one program per device), achieved TFLOP/s per device, and `mfu=` (achieved / peak) when
the device's peak is known (--peak-tflops, or the datasheet table below for GPUs/TPUs). The CPU settings are
printed too, as they change the CPU figures (see the README): like facekd_jax.main, the benchmark applies
facekd_jax.cpu.xla_flags (YNNPACK fusions; FACEKD_XLA_CPU_DEFAULTS=0 turns them off) and picks the models' layers
from --cpu-kernels as config.cpu_kernels does (auto: oneDNN convolutions and fused batch norm on a single CPU
device where the [cpu] extra is installed). GLIBC_TUNABLES (the Makefile's huge-page setting) is printed; set it
in the environment. With --teacher the plain step (same student, no teacher) is timed as well and
`kd_overhead=` (KD step time / plain step time) printed; with --cached-teacher too, the KD step takes the
teacher's embeddings from the batch, as a run with config.teacher.cache does, and the teacher never runs. With --torch the same step in PyTorch (benchmarks/torch_reference.py) is timed first, in this process,
then `jax_over_torch_eager=` (or `_compile`: JAX images/s / PyTorch images/s) and both frameworks' parameter
counts are printed.
The last line is always `images_per_second=<float>` (JAX; the KD step when --teacher is given).
"""
from __future__ import annotations

import os
import statistics
import sys
import time

import pathlib

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))  # the command line shared with torch_reference.py
from step_args import parse_args  # noqa: E402

# Dense (no sparsity) peak TFLOP/s per device from the vendors' datasheets, keyed by a substring of jax's
# device_kind (first match wins, so specific keys come first): (bfloat16 peak, float32 peak, HBM GB/s: the
# roofline bound facekd_jax.plan uses for TPUs, printed beside the measured step). float32 convolutions
# and matmuls run as TF32 on NVIDIA GPUs under XLA's default precision and as bf16 passes on TPUs, hence that
# column. NVIDIA H100/H200 SXM 989 bf16 / 495 TF32, H100 PCIe 756 / 378, A100 312 / 156; Google Cloud TPU v4 275,
# v5e 197, v5p 459, v6e (Trillium) 918. CPUs have no entry: pass --peak-tflops.
PEAK_TFLOPS = {
    "H100 PCIe": (756.0, 378.0, 2000.0),
    "H200": (989.0, 494.5, 4800.0),
    "H100": (989.0, 494.5, 3350.0),
    "A100": (312.0, 156.0, 2039.0),
    "TPU v4": (275.0, 275.0, 1200.0),
    "TPU v5 lite": (197.0, 197.0, 819.0),
    "TPU v5e": (197.0, 197.0, 819.0),
    "TPU v5p": (459.0, 459.0, 2765.0),
    "TPU v5": (459.0, 459.0, 2765.0),
    "TPU v6 lite": (918.0, 918.0, 1638.0),
    "TPU v6e": (918.0, 918.0, 1638.0),
}


def peak_tflops(device_kind: str, dtype: str):
    """The datasheet peak for `device_kind` (jax.devices()[0].device_kind) and compute dtype, or None."""
    for key, (bf16, fp32, _) in PEAK_TFLOPS.items():
        if key.lower() in device_kind.lower():
            return bf16 if dtype == "bfloat16" else fp32
    return None


def hbm_bandwidth(device_kind: str):
    """The datasheet memory bandwidth (bytes/s) for `device_kind`, or None."""
    for key, (_, _, gbps) in PEAK_TFLOPS.items():
        if key.lower() in device_kind.lower():
            return gbps * 1e9
    return None


def make_config(args, with_teacher: bool):
    """configs/default.py (or feature_kd.py with a teacher) with the command line's sizes."""
    from facekd_jax import config_lib

    config = config_lib.load_config(str(REPO / "configs" / ("feature_kd.py" if with_teacher else "default.py")))
    config.model = args.model
    config.batch_size = args.batch
    config.data.image_size = args.image_size
    config.embedding_size = args.embedding_size
    config.dtype = args.dtype
    config.cpu_kernels = args.cpu_kernels
    if with_teacher:
        config.teacher.model = args.teacher
        config.teacher.embedding_size = args.embedding_size  # feature KD compares embeddings of equal width
        if args.cached_teacher:
            config.teacher.cache = "(benchmark: embeddings in the batch)"
    return config


def summarise(times, batch: int) -> dict:
    """Per-step wall times (s) -> dict(ms_median, ms_mean, ms_min, images_per_second from the median)."""
    median = statistics.median(times)
    return dict(ms_median=1e3 * median, ms_mean=1e3 * statistics.fmean(times), ms_min=1e3 * min(times),
                images_per_second=batch / median)


def build_step(args, with_teacher: bool):
    """facekd_jax's compiled train step and its inputs on the device.

    Returns (compiled step, state, batch, teacher_variables, info); info: compile_s, flops (XLA cost analysis
    of the whole step), params (student + margin head), backbone_params, teacher_params.
    """
    import jax
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P

    from facekd_jax import models
    from facekd_jax import sharding
    from facekd_jax import step as step_lib

    config = make_config(args, with_teacher)
    mesh = sharding.make_mesh(1)
    if args.batch % mesh.shape["data"]:
        raise SystemExit(f"--batch={args.batch} must be divisible by the {mesh.shape['data']} devices")
    # The LR schedule is irrelevant here; the step is the loop's own (facekd_jax.step.setup).
    run = step_lib.setup(config, num_classes=args.classes, mesh=mesh, num_train_steps=1_000_000)
    state = run.init_state()
    teacher_variables = {}
    if run.teacher is not None:  # random weights: the teacher's values do not change its cost
        init = jax.jit(lambda key: step_lib.init_variables(run.teacher, args.classes, args.image_size, key,
                                                           config.teacher.embedding_size),
                       out_shardings=NamedSharding(mesh, P()))
        teacher_variables = init(jax.random.PRNGKey(args.seed + 1))

    rng = np.random.default_rng(args.seed)
    host = {"image": rng.uniform(-1.0, 1.0, (args.batch, args.image_size, args.image_size, 3)).astype(np.float32),
            "label": rng.integers(0, args.classes, (args.batch,), dtype=np.int32)}
    if with_teacher and args.cached_teacher:
        host["teacher_embedding"] = rng.standard_normal((args.batch, config.teacher.embedding_size), np.float32)
    batch = sharding.put_batch(host, mesh)

    t0 = time.perf_counter()
    compiled = run.train_step.lower(state, batch, teacher_variables).compile()
    compile_s = time.perf_counter() - t0
    # FLOPs of the same step with flax's layers (a oneDNN custom call has no cost analysis), counted before backend
    # optimisation like models.model_summary.
    config.cpu_kernels = "xla"
    counted = step_lib.setup(config, num_classes=args.classes, mesh=mesh, num_train_steps=1_000_000)
    cost = counted.train_step.lower(state, batch, teacher_variables).cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    info = dict(compile_s=compile_s, flops=float(cost.get("flops", 0.0)) if cost else 0.0,
                bytes_accessed=float(cost.get("bytes accessed", 0.0)) if cost else 0.0,
                params=models.count_params(state.params),
                backbone_params=models.count_params(state.params["backbone"]),
                teacher_params=(models.count_params(teacher_variables["params"]["backbone"])
                                if run.teacher is not None else 0))
    return compiled, state, batch, teacher_variables, info


def bench_jax(args, with_teacher: bool) -> dict:
    """Compiles and times facekd_jax's train step; returns timings, FLOPs and parameter counts."""
    import jax
    import numpy as np

    compiled, state, batch, teacher_variables, info = build_step(args, with_teacher)
    metrics = None
    for _ in range(args.warmup):
        state, metrics = compiled(state, batch, teacher_variables)
    jax.block_until_ready((state, metrics))
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        state, metrics = compiled(state, batch, teacher_variables)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - t)
    loss = float(metrics["total"])
    if not np.isfinite(loss):
        raise SystemExit(f"non-finite loss {loss} in the benchmark step: the timing is meaningless")
    return dict(summarise(times, args.batch), loss=loss, **info)


def report(name: str, r: dict, peak) -> None:
    """One human-readable line of a bench_jax result (MFU when the peak TFLOP/s is known)."""
    tflops = r["flops"] / (r["ms_median"] * 1e-3) / 1e12 if r.get("flops") else 0.0
    line = (f"{name}: compile {r['compile_s']:.1f} s | {r['ms_median']:.1f} ms/step median "
            f"({r['ms_mean']:.1f} mean, {r['ms_min']:.1f} min) | {r['images_per_second']:.1f} images/s "
            f"| loss {r['loss']:.3f}")
    if r.get("flops"):
        line += f" | {r['flops'] / 1e9:.1f} GFLOP/step (XLA) | {tflops:.3f} TFLOP/s"
        if peak:
            line += f" | MFU {tflops / peak:.4f}"
    print(line, flush=True)


def main(argv=None) -> None:
    """Prints the figures described in the module docstring; the last line is `images_per_second=`."""
    args = parse_args(argv)
    from facekd_jax.cpu import xla_flags
    # as facekd_jax.main does; FACEKD_XLA_CPU_DEFAULTS=0 times XLA's own code
    xla_flags.apply_cpu_defaults(onednn=args.cpu_kernels != "xla")
    import jax

    device = jax.devices()[0]
    peak = args.peak_tflops or peak_tflops(device.device_kind, args.dtype)
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    print(f"device: {jax.device_count()} x {device.device_kind} ({jax.default_backend()}), jax {jax.__version__}, "
          f"{os.cpu_count()} CPUs, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    if jax.default_backend() == "cpu":
        layers = "xla"
        if args.cpu_kernels != "xla":
            from facekd_jax import cpu
            layers = "oneDNN" if cpu.model_layers(args.cpu_kernels, num_devices=1) else "flax (no [cpu] extra)"
        print(f"cpu: GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r}, layers {layers} "
              f"(--cpu-kernels={args.cpu_kernels})")
    print(f"step: {args.model} student{f' + {args.teacher} teacher (feature KD)' if args.teacher else ''}, "
          f"batch {args.batch}, {args.image_size}x{args.image_size}, embedding {args.embedding_size}, "
          f"{args.classes} classes, {args.dtype}, SGD momentum 0.9 wd 5e-4 clip 5; "
          f"{args.warmup} warm-up + {args.steps} timed steps", flush=True)

    torch_results = {}
    if args.torch:  # first: PyTorch's thread pool is idle (not spinning) by the time JAX runs
        import torch_reference
        torch_results = torch_reference.run(args)

    plain = bench_jax(args, with_teacher=False)
    report("jax plain" if args.teacher else "jax", plain, peak)
    final = plain
    if args.teacher:
        kd = bench_jax(args, with_teacher=True)
        report(f"jax kd ({args.teacher} teacher{', cached embeddings' if args.cached_teacher else ''})", kd, peak)
        final = kd
    print(f"params: student {plain['backbone_params']:,} + margin head {plain['params'] - plain['backbone_params']:,}"
          + (f", teacher {final['teacher_params']:,}" if args.teacher else ""))
    if torch_results:
        for key, r in torch_results.items():
            print(f"jax_over_torch_{key}={plain['images_per_second'] / r['plain']['images_per_second']:.3f}"
                  + (f" kd_jax_over_torch_{key}={final['images_per_second'] / r['kd']['images_per_second']:.3f}"
                     if args.teacher else ""))
        first = next(iter(torch_results.values()))
        pairs = [("student+head", plain["params"], first["params"])]
        if args.teacher:
            pairs.append(("teacher", final["teacher_params"], first["kd"]["teacher_params"]))
        for name, n_jax, n_torch in pairs:
            print(f"param_count {name}: jax={n_jax} torch={n_torch} ({'match' if n_jax == n_torch else 'DIFFER'})")
    tflops = final["flops"] / (final["ms_median"] * 1e-3) / 1e12 if final["flops"] else 0.0
    stats = jax.devices()[0].memory_stats() or {}  # None on some backends (the CPU)
    if "peak_bytes_in_use" in stats:
        print(f"peak_memory_gib={stats['peak_bytes_in_use'] / 2**30:.2f}")
    print(f"compile_seconds={final['compile_s']:.2f}")
    print(f"ms_per_step={final['ms_median']:.2f}")
    print(f"achieved_tflops={tflops:.4f}")
    if peak:
        print(f"peak_tflops={peak:g}")
        print(f"mfu={tflops / peak:.4f}")
    bandwidth = hbm_bandwidth(device.device_kind)
    if peak and bandwidth and final["flops"]:
        # The plan's roofline (facekd_jax.plan.roofline) on this step's own counts: what the measurement is under.
        from facekd_jax import plan, tpu
        chip = tpu.Chip(device.device_kind, peak * 1e12, 0, bandwidth, "train_step.PEAK_TFLOPS")
        bound = plan.roofline(final["flops"], final["bytes_accessed"], chip)
        print(f"roofline_bound_images_per_second={args.batch / bound:.1f} (measured "
              f"{final['images_per_second'] / (args.batch / bound):.0%} of it)")
    if args.teacher:
        print(f"kd_overhead={final['ms_median'] / plain['ms_median']:.3f}")
    print(f"images_per_second={final['images_per_second']:.2f}")


if __name__ == "__main__":
    main()
