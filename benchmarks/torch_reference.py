"""The PyTorch reference of facekd_jax's train step, for benchmarks/train_step.py --torch.

The same computation as facekd_jax.step.make_train_step with configs/default.py (and configs/feature_kd.py
with a teacher), written the way an arcface_torch user would:
  student  facekd_jax.models.resnet: post-activation basic blocks, option-B (conv1x1 + BN) projection
           shortcuts; resnet56 = CIFAR body (conv3x3 16 stem, 3 x 9 blocks of 16/32/64 channels), resnet18 =
           torchvision body (conv7x7 s2 + maxpool stem, 4 x 2 blocks of 64..512); BN eps 1e-5, momentum 0.1.
  head     facekd_jax.models.heads "gap": BN2d -> global average pool -> dropout -> Linear(C, E) -> BN1d whose
           scale is frozen at 1 (insightface's `features`).
  loss     ArcFace (s 64, m 0.5) margin logits of normalise(emb) @ normalise(W [E, C], dim 0), cross-entropy;
           with a teacher (eval mode, no grad) + 100 x mean((normalise(s) - normalise(t))^2) (feature KD).
  update   clip_grad_norm_(backbone, 5); SGD momentum 0.9, weight decay 5e-4 on conv/linear weights and the class
           centres only (ndim >= 2, as facekd_jax's mask); the update is skipped when the loss or the gradient
           norm is not finite (as the JAX step).
Timing: per-step wall time after warm-up steps, median; images/s = batch / median (as train_step.py).

    python benchmarks/torch_reference.py --model=resnet56 --batch=32 --steps=20 [--teacher=resnet18]
        [--torch-compile] [--channels-last] [--dtype=bfloat16]

Needs PyTorch (not a dependency of facekd_jax): `pip install torch==2.13.0` (the CPU wheel on a CPU machine).
"""
from __future__ import annotations

import math
import os
import statistics
import sys
import time

_INSTALL_HINT = ("PyTorch is not installed; the reference step needs it: `pip install torch==2.13.0` "
                 "(for a CPU-only machine: pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu)")

# Same families as facekd_jax.models.resnet.RESNET_CONFIGS (the thesis's pair and small relatives).
RESNET_CONFIGS = {
    "resnet10": dict(stage_sizes=(1, 1, 1, 1), widths=(64, 128, 256, 512), stem="imagenet"),
    "resnet18": dict(stage_sizes=(2, 2, 2, 2), widths=(64, 128, 256, 512), stem="imagenet"),
    "resnet34": dict(stage_sizes=(3, 4, 6, 3), widths=(64, 128, 256, 512), stem="imagenet"),
    "resnet8": dict(stage_sizes=(1, 1, 1), widths=(16, 32, 64), stem="cifar"),
    "resnet20": dict(stage_sizes=(3, 3, 3), widths=(16, 32, 64), stem="cifar"),
    "resnet56": dict(stage_sizes=(9, 9, 9), widths=(16, 32, 64), stem="cifar"),
}


def import_torch():
    try:
        import torch
    except ImportError:
        raise SystemExit(_INSTALL_HINT) from None
    return torch


def _device(torch):
    """CUDA when PyTorch sees a GPU (as JAX would use it), else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def build_modules(torch):
    """The nn.Module classes (defined here so that importing this file does not need torch)."""
    nn = torch.nn
    F = torch.nn.functional

    def conv(cin, cout, k, stride=1):
        conv = nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, bias=False)
        nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
        return conv

    class BasicBlock(nn.Module):
        """conv3x3(stride) -> BN -> ReLU -> conv3x3 -> BN, + shortcut (identity or conv1x1 + BN), ReLU."""

        def __init__(self, cin, cout, stride):
            super().__init__()
            self.conv1, self.bn1 = conv(cin, cout, 3, stride), nn.BatchNorm2d(cout)
            self.conv2, self.bn2 = conv(cout, cout, 3), nn.BatchNorm2d(cout)
            self.downsample = None
            if stride != 1 or cin != cout:
                self.downsample = nn.Sequential(conv(cin, cout, 1, stride), nn.BatchNorm2d(cout))

        def forward(self, x):
            y = F.relu(self.bn1(self.conv1(x)))
            y = self.bn2(self.conv2(y))
            return F.relu(y + (x if self.downsample is None else self.downsample(x)))

    class ResNet(nn.Module):
        """[B, 3, S, S] -> float32 [B, E] embeddings (not normalised), the "gap" head."""

        def __init__(self, stage_sizes, widths, stem, embedding_size=512, dropout=0.0):
            super().__init__()
            if stem == "imagenet":
                self.stem = nn.Sequential(conv(3, widths[0], 7, 2), nn.BatchNorm2d(widths[0]), nn.ReLU(),
                                          nn.MaxPool2d(3, 2, 1))
            else:
                self.stem = nn.Sequential(conv(3, widths[0], 3), nn.BatchNorm2d(widths[0]), nn.ReLU())
            blocks, cin = [], widths[0]
            for i, (n, width) in enumerate(zip(stage_sizes, widths)):
                for j in range(n):
                    blocks.append(BasicBlock(cin, width, 2 if (i > 0 and j == 0) else 1))
                    cin = width
            self.blocks = nn.Sequential(*blocks)
            self.bn2 = nn.BatchNorm2d(cin)
            self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
            self.fc = nn.Linear(cin, embedding_size)
            self.features = nn.BatchNorm1d(embedding_size)
            nn.init.constant_(self.features.weight, 1.0)
            self.features.weight.requires_grad = False  # insightface: BN1d scale frozen (flax use_scale=False)

        def forward(self, x):
            x = self.bn2(self.blocks(self.stem(x)))
            x = self.dropout(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1).float())
            return self.features(self.fc(x))

    class ArcFaceHead(nn.Module):
        """Class centres W [E, C] ~ N(0, 0.01); emb [B, E], labels [B] -> CE of s * ArcFace logits."""

        def __init__(self, embedding_size, num_classes, s=64.0, m=0.5):
            super().__init__()
            self.kernel = nn.Parameter(torch.randn(embedding_size, num_classes) * 0.01)
            self.s, self.cos_m, self.sin_m = s, math.cos(m), math.sin(m)
            self.threshold, self.penalty = math.cos(math.pi - m), math.sin(math.pi - m) * m

        def forward(self, emb, labels):
            cosine = F.normalize(emb.float(), dim=1) @ F.normalize(self.kernel, dim=0)
            mask = F.one_hot(labels, cosine.shape[1]).bool()
            target = torch.where(mask, cosine, 0.0).sum(dim=1).clamp(-1.0, 1.0)  # no gather, as the JAX head
            sin = torch.sqrt(torch.clamp(1.0 - target * target, min=1e-12))
            new = torch.where(target > self.threshold, target * self.cos_m - sin * self.sin_m,
                              target - self.penalty)
            logits = torch.where(mask, new[:, None], cosine) * self.s
            return F.cross_entropy(logits, labels)

    return ResNet, ArcFaceHead


def make_step(torch, args, with_teacher: bool):
    """Returns (step(images, labels) -> loss tensor, trainable parameter count of student + margin head,
    teacher parameter count without its frozen BN1d scale, i.e. counted as flax counts it)."""
    ResNet, ArcFaceHead = build_modules(torch)
    F = torch.nn.functional
    if args.model not in RESNET_CONFIGS or (with_teacher and args.teacher not in RESNET_CONFIGS):
        raise SystemExit(f"torch_reference: models {sorted(RESNET_CONFIGS)} only "
                         f"(got --model={args.model!r} --teacher={args.teacher!r})")
    device = _device(torch)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    student = ResNet(**RESNET_CONFIGS[args.model], embedding_size=args.embedding_size).to(
        device=device, memory_format=memory_format).train()
    head = ArcFaceHead(args.embedding_size, args.classes).to(device)
    teacher = None
    if with_teacher:
        teacher = ResNet(**RESNET_CONFIGS[args.teacher], embedding_size=args.embedding_size).to(
            device=device, memory_format=memory_format).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    backbone = [p for p in student.parameters() if p.requires_grad]
    params = backbone + list(head.parameters())
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.SGD([{"params": decay, "weight_decay": 5e-4}, {"params": no_decay, "weight_decay": 0.0}],
                          lr=0.1, momentum=0.9)
    autocast = args.dtype == "bfloat16"

    def forward_loss(images, labels):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            emb = student(images)
            loss = head(emb.float(), labels)
            if teacher is not None:
                with torch.no_grad():
                    t_emb = teacher(images).float()
                loss = loss + 100.0 * F.mse_loss(F.normalize(emb.float(), dim=1), F.normalize(t_emb, dim=1))
        return loss

    if args.torch_compile:
        forward_loss = torch.compile(forward_loss)

    def step(images, labels):
        opt.zero_grad(set_to_none=True)
        loss = forward_loss(images, labels)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(backbone, 5.0)
        if torch.isfinite(loss) and torch.isfinite(norm):  # the JAX step skips non-finite updates too
            opt.step()
        return loss

    n_teacher = sum(p.numel() for p in teacher.parameters()) - args.embedding_size if teacher is not None else 0
    return step, sum(p.numel() for p in params), n_teacher


def bench(torch, args, with_teacher: bool) -> dict:
    """Times `args.steps` steps after `args.warmup` warm-up steps (at least 1; 3 with torch.compile)."""
    torch.manual_seed(args.seed)
    step, n_params, n_teacher = make_step(torch, args, with_teacher)
    g = torch.Generator().manual_seed(args.seed)
    device = _device(torch)
    images = (torch.rand(args.batch, 3, args.image_size, args.image_size, generator=g) * 2 - 1).to(device)
    if args.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, args.classes, (args.batch,), generator=g).to(device)
    t0 = time.perf_counter()
    loss = float(step(images, labels).detach())  # first step: lazy init / compilation
    first_s = time.perf_counter() - t0
    # torch.compile may recompile on the second call (e.g. once shapes are marked dynamic): warm up more.
    for _ in range(max(args.warmup, 3 if args.torch_compile else 0) - 1):
        loss = step(images, labels)
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        loss = step(images, labels)
        loss = float(loss.detach())  # waits for the step (a no-op on CPU, a sync on a GPU)
        times.append(time.perf_counter() - t)
    median = statistics.median(times)
    return dict(params=n_params, teacher_params=n_teacher, first_s=first_s, ms_median=1e3 * median,
                ms_mean=1e3 * statistics.fmean(times), ms_min=1e3 * min(times),
                images_per_second=args.batch / median, loss=float(loss))


def run(args) -> dict:
    """Times the plain step (and the KD step with args.teacher); prints one line each. Returns
    {variant: {"plain": dict, "kd": dict (with a teacher), "params": int}}, variant "eager" or "compile"."""
    torch = import_torch()
    torch.set_num_threads(args.threads or os.cpu_count())
    variant = "compile" if args.torch_compile else "eager"
    fmt = "channels_last" if args.channels_last else "NCHW"
    print(f"torch {torch.__version__} on {_device(torch)}, {torch.get_num_threads()} threads, mkldnn "
          f"{torch.backends.mkldnn.is_available()}, {variant}, {fmt}", flush=True)
    out = {}
    for name, with_teacher in [("plain", False)] + ([("kd", True)] if args.teacher else []):
        r = bench(torch, args, with_teacher)
        out[name] = r
        label = f"torch {variant} {name}" + (f" ({args.teacher} teacher)" if with_teacher else "")
        print(f"{label}: first step {r['first_s']:.1f} s | {r['ms_median']:.1f} ms/step median "
              f"({r['ms_mean']:.1f} mean, {r['ms_min']:.1f} min) | {r['images_per_second']:.1f} images/s "
              f"| params {r['params']:,}" + (f" + teacher {r['teacher_params']:,}" if with_teacher else "")
              + f" | loss {r['loss']:.3f}", flush=True)
    out["params"] = out["plain"]["params"]
    return {variant: out}


def main(argv=None) -> None:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from step_args import parse_args  # one command line for both scripts

    args = parse_args(argv)
    results = run(args)[("compile" if args.torch_compile else "eager")]
    final = results["kd"] if args.teacher else results["plain"]
    if args.teacher:
        print(f"kd_overhead={final['ms_median'] / results['plain']['ms_median']:.3f}")
    print(f"images_per_second={final['images_per_second']:.2f}")


if __name__ == "__main__":
    main()
