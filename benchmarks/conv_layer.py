"""Benchmark: one 3x3 convolution layer's three training passes (forward, input gradient, weight gradient).

The train step's time is mostly convolutions; this splits one layer of it so a slow pass is found without a
profiler, in JAX as facekd_jax's layers run it (oneDNN through XLA's FFI on a single CPU device,
facekd_jax.cpu.onednn with the [cpu] extra; XLA's own convolution with FACEKD_ONEDNN=0, whatever XLA_FLAGS /
facekd_jax.cpu.xla_flags select) and, with --torch, in PyTorch on the same data (needs `pip install torch==2.13.0`).

    python benchmarks/conv_layer.py [--batch=32] [--size=112] [--channels=16] [--stride=1] [--steps=5] [--torch]

Defaults: resnet56's first stage at 112x112 (16 channels), batch 32. Printed per pass: median ms over --steps
runs after three warm-up runs, and GFLOP/s (2 * MACs of the pass / time). The input and weight gradients in JAX are
checked against each other's framework when --torch is given (max relative difference printed). Last line:
`weight_grad_ms=<float>` (JAX).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--size", type=int, default=112, help="input height and width")
    p.add_argument("--channels", type=int, default=16, help="input and output channels")
    p.add_argument("--stride", type=int, default=1, choices=(1, 2))
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--torch", action="store_true", help="also time PyTorch (channels_last) on the same data")
    return p.parse_args(argv)


def _time(fn, steps):
    for _ in range(3):  # warm-up: compilation, and oneDNN's first calls (kernel generation, thread start) ran 2-3x slow
        fn()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv=None) -> None:
    args = parse_args(argv)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from facekd_jax.cpu import xla_flags

    use_onednn = os.environ.get("FACEKD_ONEDNN", "1") not in ("0", "false", "no", "off")
    xla_flags.apply_cpu_defaults(onednn=use_onednn)  # as facekd_jax.main does
    import jax
    import jax.numpy as jnp
    import numpy as np

    n, s, c, stride = args.batch, args.size, args.channels, args.stride
    out = -(-s // stride)
    rng = np.random.default_rng(0)
    x_np = rng.standard_normal((n, s, s, c), dtype=np.float32)
    w_np = (rng.standard_normal((3, 3, c, c), dtype=np.float32) * 0.1).astype(np.float32)
    dy_np = rng.standard_normal((n, out, out, c), dtype=np.float32)
    x, w, dy = jnp.asarray(x_np), jnp.asarray(w_np), jnp.asarray(dy_np)

    from jax import lax

    from facekd_jax.cpu import onednn

    conv_fn = onednn.conv_general_dilated if use_onednn and onednn.available() else lax.conv_general_dilated

    def conv(x, w):  # what a model's conv layer runs (cpu.layers.OnednnConv, or flax's nn.Conv)
        return conv_fn(x, w, (stride, stride), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))

    passes = {
        "forward": jax.jit(conv),
        "input_grad": jax.jit(lambda x, w, dy: jax.vjp(lambda x: conv(x, w), x)[1](dy)[0]),
        "weight_grad": jax.jit(lambda x, w, dy: jax.vjp(lambda w: conv(x, w), w)[1](dy)[0]),
    }
    gflop = 2.0 * n * out * out * 9 * c * c / 1e9  # each pass does the forward's multiply-adds
    print(f"device: {jax.devices()[0].device_kind}, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}, "
          f"convolution: {'oneDNN (FFI)' if conv_fn is not lax.conv_general_dilated else 'XLA'}; "
          f"conv3x3 stride {stride}, [{n},{s},{s},{c}] -> [{n},{out},{out},{c}], {gflop:.2f} GFLOP per pass")
    results = {}
    for name, fn in passes.items():
        call = (lambda fn=fn: jax.block_until_ready(fn(x, w))) if name == "forward" else \
            (lambda fn=fn: jax.block_until_ready(fn(x, w, dy)))
        seconds = _time(call, args.steps)
        results[name] = seconds
        print(f"jax   {name:12s} {1e3 * seconds:8.2f} ms  {gflop / seconds:6.1f} GFLOP/s", flush=True)

    if args.torch:
        import torch

        torch.set_num_threads(os.cpu_count())
        tx = torch.from_numpy(x_np).permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
        tw = torch.from_numpy(w_np).permute(3, 2, 0, 1).contiguous()
        tdy = torch.from_numpy(dy_np).permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
        def backward(mask):  # the kernel autograd runs for conv2d's backward
            return torch.ops.aten.convolution_backward(tdy, tx, tw, None, [stride] * 2, [1, 1], [1, 1], False,
                                                       [0, 0], 1, mask)

        tpasses = {
            "forward": lambda: torch.nn.functional.conv2d(tx, tw, stride=stride, padding=1),
            "input_grad": lambda: backward([True, False, False])[0],
            "weight_grad": lambda: backward([False, True, False])[1],
        }
        with torch.no_grad():
            for name, fn in tpasses.items():
                seconds = _time(fn, args.steps)
                print(f"torch {name:12s} {1e3 * seconds:8.2f} ms  {gflop / seconds:6.1f} GFLOP/s  "
                      f"(jax / torch time {results[name] / seconds:.2f})", flush=True)
            dx_t = tpasses["input_grad"]().permute(0, 2, 3, 1).numpy()
            dw_t = tpasses["weight_grad"]().permute(2, 3, 1, 0).numpy()
        dx_j = np.asarray(passes["input_grad"](x, w, dy))
        dw_j = np.asarray(passes["weight_grad"](x, w, dy))
        for name, a, b in (("input_grad", dx_j, dx_t), ("weight_grad", dw_j, dw_t)):
            print(f"{name}: max |jax - torch| / max |torch| = {np.abs(a - b).max() / np.abs(b).max():.2e}")
    print(f"weight_grad_ms={1e3 * results['weight_grad']:.2f}")


if __name__ == "__main__":
    main()
