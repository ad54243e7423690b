"""Command line for pretrained teachers.

  python -m facekd_jax.teachers import dlib --out=runs/teacher_dlib [--weights=PATH]
      dlib's face descriptor (face_recognition_models' .dat, read without dlib) -> a teacher run for
      --config.teacher.workdir (and for --mode=eval like any run)
  python -m facekd_jax.teachers import insightface --weights=FILE.pth|FILE.onnx [--arch=r50] --out=DIR
      an insightface arcface_torch iResNet (r18/r34/r50/r100/r200; the state dict read without running code from
      it, the ONNX graph mapped by its structure; --arch inferred when left out) -> a teacher run the same way
  python -m facekd_jax.teachers cache --teacher=runs/teacher_dlib --data=lfw:../shared/data/lfw \\
      --out=runs/cache_dlib_lfw [--crop=l,t,r,b] [--batch_size=64]
      every training image and its mirror embedded once, with the teacher's own crop and input size
      -> --config.teacher.cache (resumes where a stopped build left off)
"""
from __future__ import annotations

import argparse
import sys


def _parse_crop(text: str):
    if not text:
        return None
    try:
        box = tuple(int(v) for v in text.split(","))
    except ValueError:
        box = ()
    if len(box) != 4:
        raise argparse.ArgumentTypeError(f"--crop={text}: expected left,top,right,bottom (four integers)")
    return box


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m facekd_jax.teachers", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="import a pretrained teacher into a teacher run")
    imp.add_argument("name", choices=["dlib", "insightface"], help="which teacher")
    imp.add_argument("--out", required=True, help="the teacher run's directory (new or empty)")
    imp.add_argument("--weights", default="", help="the weight file (dlib: default the installed package's; "
                                                    "insightface: a .pth state dict or an .onnx file, required)")
    imp.add_argument("--arch", default="", help="insightface: r18, r34, r50, r100 or r200 (default: from the file)")
    cache = sub.add_parser("cache", help="build (or finish) a teacher-embedding cache for a training source")
    cache.add_argument("--teacher", required=True, help="a teacher run (trained or imported)")
    cache.add_argument("--data", required=True, help="the training data spec the student will use")
    cache.add_argument("--out", required=True, help="the cache directory")
    cache.add_argument("--crop", type=_parse_crop, default=None,
                       help="l,t,r,b box before resizing (default: the teacher's own crop for this data)")
    cache.add_argument("--batch_size", type=int, default=64)
    cache.add_argument("--checkpoint", default="latest", choices=["latest", "best"])
    args = parser.parse_args(argv)
    from facekd_jax import logs
    logs.start_process(onednn=False)  # the teacher gets flax's layers; XLA:CPU's fusions still help it
    from facekd_jax import errors
    try:
        if args.command == "import" and args.name == "insightface":
            from facekd_jax.teachers.insightface import import_insightface
            if not args.weights:
                raise ValueError("import insightface needs --weights=FILE.pth or --weights=FILE.onnx (arcface_torch's "
                                 "iResNet)")
            import_insightface(args.out, args.weights, arch=args.arch or None, log=print)
        elif args.command == "import":
            from facekd_jax.teachers.imported import import_dlib
            if args.arch:
                raise ValueError(f"--arch={args.arch} is for import insightface; dlib's network has one architecture")
            import_dlib(args.out, weights=args.weights or None, log=print)
        else:
            from facekd_jax.teachers.cache import build_cache
            built = build_cache(args.teacher, args.data, args.out, crop=args.crop, batch_size=args.batch_size,
                                checkpoint=args.checkpoint)
            print(f"{args.out}: {built.header['data']['num_images']} images x 2 flips, "
                  f"{built.embedding_size}-d, {built.header['data']['num_classes']} identities "
                  f"({built.header.get('embed_seconds', 0)} s)")
    except (FileNotFoundError, FileExistsError, ValueError, ImportError) as e:
        print(f"error: {errors.message(e)}", file=sys.stderr)
        return errors.EXIT_USAGE
    except OSError as e:  # a full or read-only disk: one line too (the cache keeps its finished rows)
        if errors.exit_status(e) is None:
            raise
        print(f"error: {errors.message(e)}", file=sys.stderr)
        return errors.EXIT_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
