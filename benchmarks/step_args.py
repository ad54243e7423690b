"""The command line shared by benchmarks/train_step.py (JAX) and benchmarks/torch_reference.py (PyTorch), so
that both time the same step at the same sizes."""
from __future__ import annotations

import argparse


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Time full training steps of facekd_jax's train step (and PyTorch's)")
    p.add_argument("--model", default="resnet56", help="student model (facekd_jax.models.MODEL_NAMES)")
    p.add_argument("--batch", type=int, default=32, help="global batch size")
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps after compilation")
    p.add_argument("--teacher", default="", help="teacher model: time the feature-KD step and the plain step")
    p.add_argument("--image-size", type=int, default=112)
    p.add_argument("--classes", type=int, default=10572, help="margin-head classes (CASIA-WebFace: 10572)")
    p.add_argument("--embedding-size", type=int, default=512)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--peak-tflops", type=float, default=0.0,
                   help="device peak TFLOP/s for the MFU (default: the datasheet table for known GPUs/TPUs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cached-teacher", action="store_true",
                   help="with --teacher: the teacher's embeddings come with the batch (a teacher cache)")
    p.add_argument("--cpu-kernels", default="auto", choices=("auto", "onednn", "xla"),
                   help="config.cpu_kernels: the layers on a CPU")
    p.add_argument("--torch", action="store_true", help="also time the PyTorch reference step (needs torch)")
    p.add_argument("--torch-compile", action="store_true", help="PyTorch: torch.compile the step")
    p.add_argument("--channels-last", action="store_true", help="PyTorch: channels_last memory format")
    p.add_argument("--threads", type=int, default=0, help="PyTorch threads (default: os.cpu_count())")
    args = p.parse_args(argv)
    if args.batch < 1 or args.steps < 1 or args.warmup < 0:
        p.error("--batch and --steps must be >= 1, --warmup >= 0")
    return args
