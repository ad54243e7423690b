"""Print a markdown table of the model zoo, measured: params, GFLOPs per image, fp32 MB.

    python -m facekd_jax.models [--image-size 112] [--models resnet18,resnet56,...]

Params come from jax.eval_shape of init; GFLOPs from XLA's cost analysis of the lowered (not yet
backend-optimised) eval forward on one image (see facekd_jax.models.model_summary).
"""
from __future__ import annotations

import argparse

import jax

from facekd_jax.models import FIXED_SHAPES, MODEL_NAMES, model_summary


def format_table(rows: list[dict], image_size: int) -> str:
    """Rows of model_summary() -> markdown table with a footer; ratio lines for resnet18 / resnet56."""
    lines = [
        f"| model | head | params (M) | GFLOPs / {image_size}x{image_size} image | GMACs | fp32 MB |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['head']} | {r['params'] / 1e6:.2f} | {r['gflops']:.3f} | {r['gmacs']:.3f} "
            f"| {r['mb']:.2f} |"
        )
    by_name = {r["name"]: r for r in rows}
    lines.append("")
    lines.append(
        f"GFLOPs are FLOPs (not MACs): XLA cost analysis ({jax.default_backend()} backend) of the lowered eval "
        "forward, batch 1, counts a multiply-add as 2 FLOPs; GMACs = GFLOPs / 2. XLA skips kernel taps that fall "
        "on zero padding, so GMACs read a few % below counts that include them (insightface quotes 2.6 G for "
        "iresnet18). Params exclude BatchNorm running statistics; fp32 MB = params * 4 / 2^20."
    )
    if "resnet18" in by_name and "resnet56" in by_name:
        t, s = by_name["resnet18"], by_name["resnet56"]
        lines.append(
            f"resnet18 / resnet56 (thesis teacher / student): params {t['params'] / s['params']:.1f}x, "
            f"GFLOPs {t['gflops'] / s['gflops']:.2f}x."
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m facekd_jax.models", description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=112, help="input side S (default 112)")
    parser.add_argument("--embedding-size", type=int, default=512, help="embedding width E (default 512)")
    parser.add_argument(
        "--models", default=",".join(MODEL_NAMES), help=f"comma-separated subset of {', '.join(MODEL_NAMES)}"
    )
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in MODEL_NAMES]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; known: {', '.join(MODEL_NAMES)}")
    # Imported networks (dlib_resnet29) are summarised at the sizes their weights fix.
    rows = [model_summary(name, image_size=FIXED_SHAPES.get(name, (args.image_size,))[0],
                          embedding_size=FIXED_SHAPES.get(name, (0, args.embedding_size))[1]) for name in names]
    print(format_table(rows, args.image_size))


if __name__ == "__main__":
    main()
