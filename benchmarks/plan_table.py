"""The TPU plan's table for docs/scale.md: the compiler's figures for the configurations people ask about, made by
facekd_jax.plan (compile-only TPU devices; the [tpu] extra), never typed.

  python benchmarks/plan_table.py --out=docs/plan_table.md [--json=runs/plan_table.json] [--rows=thesis,ms1mv2,...]
                                  [--topologies=v5e-8,...] [--no-search] [--resume]

Rows (each: memory per chip, fits, the largest global batch that fits, roofline images/s and epoch time,
collectives):
  thesis     the thesis's pair on CASIA-WebFace: ResNet-56 student, feature KD from a ResNet-18 teacher run live or
             read from a teacher-embedding cache, float32, batch 512, on Colab's TPU (one v5e) and a v5e-8
  ms1mv2     an iresnet50 teacher (cached) -> MobileFaceNet student at 112x112, bfloat16, batch 1024, on a v5e-8
             and a v4-8
  webface42m a 2,059,906-identity WebFace42M head, the margin head sharded over `model` (MobileFaceNet student,
             cached iresnet50 teacher, bfloat16, batch 1024) on 16-chip slices and down to one v5e chip
These are compiler figures and roofline bounds, not measurements (facekd_jax/plan.py).
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the host compiles; libtpu gives the TPU devices
REPO = pathlib.Path(__file__).resolve().parents[1]

THESIS = "configs/feature_kd.py:data.image_size=112,batch_size=512"
STUDENT = ("configs/feature_kd.py:model=mobilefacenet,teacher.model=iresnet50,embedding_size=512,"
           "teacher.embedding_size=512,dtype=bfloat16,batch_size=1024,teacher.cache=planned")
ROWS = {
    "thesis": [("ResNet-18 -> ResNet-56, live teacher", THESIS, "casia", ["colab", "v5e-8"]),
               ("ResNet-18 -> ResNet-56, cached teacher", THESIS + ",teacher.cache=planned", "casia",
                ["colab", "v5e-8"])],
    "ms1mv2": [("iresnet50 (cached) -> MobileFaceNet, bf16", STUDENT, "ms1mv2", ["v5e-8", "v4-8"])],
    # From 16-chip slices down to one chip: where the head stops fitting.
    "webface42m": [(f"WebFace42M head, model parallelism {m}", STUDENT + f",mesh.model_parallelism={m}",
                    "webface42m", [topology]) for m, topology in [(8, "v5e-16"), (4, "v5e-16"), (4, "v5p-16"),
                                                                  (4, "v5e-8"), (2, "v5e-4"),
                                                                  (1, "v5e-1")]],
}


def _cell_gib(n) -> str:
    return f"{n / 2**30:.2f}"


def row_markdown(name: str, train: dict, searched: bool = True) -> str:
    m = train["memory_per_chip"]
    fits = "yes" if train["fits"] else f"no (+{_cell_gib(train['shortfall_bytes'])} GiB)"
    # Without the search, a row that does not fit still names its largest batch (the plan halves it until it fits).
    best = train.get("max_batch") if searched or "max_batch" in train else "not searched"
    if "compiler" in m:  # refused by the compiler: no cost figures
        return (f"| {name} | {train['topology']} | {train['global_batch']} | {_cell_gib(m['total'])} (compiler) | "
                f"{fits} | {best or 'none'} | - | - | - |")
    epoch = train["epoch_seconds_bound"]
    coll = ", ".join(f"{op} {c['count']}" for op, c in train["collectives"].items() if c["count"]) or "none"
    gathered = " (head gathered!)" if train["head_gathered"] else ""
    return (f"| {name} | {train['topology']} | {train['global_batch']} | {_cell_gib(m['total'])} | {fits} | "
            f"{best or 'none'} | {train['images_per_second_bound']:,.0f} | "
            f"{epoch['CASIA-WebFace'] / 60:.1f} / {epoch['MS1MV2'] / 60:.1f} / {epoch['WebFace42M'] / 3600:.2f} h | "
            f"{coll}{gathered} |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="", help="write the markdown table here (default: print it)")
    parser.add_argument("--json", default="", help="write every plan here")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {', '.join(ROWS)}")
    parser.add_argument("--topologies", default="", help="only these topologies of the rows (comma-separated)")
    parser.add_argument("--no-search", action="store_true", help="skip the largest-batch search (one compile a "
                        "row instead of several; its column says 'not searched')")
    parser.add_argument("--resume", action="store_true", help="reuse the rows --json already holds (same "
                        "configuration, topology and search): a table too long for one sitting is finished later")
    args = parser.parse_args(argv)
    only = {t for t in args.topologies.split(",") if t}
    done = {}
    if args.resume and args.json and os.path.exists(args.json):
        done = {(p["config"], p["train"]["topology"], p.get("searched", True)): p
                for p in json.loads(pathlib.Path(args.json).read_text())}
    sys.path.insert(0, str(REPO))
    os.chdir(REPO)
    from facekd_jax import config_lib, plan

    lines = ["| configuration | topology | global batch | memory per chip (GiB) | fits | largest batch that fits | "
             "images/s bound | epoch bound: CASIA / MS1MV2 min, WebFace42M h | collectives |",
             "|---|---|---:|---:|---|---:|---:|---|---|"]
    plans = []
    for key in [r for r in args.rows.split(",") if r]:
        for name, config, classes, topologies in ROWS[key]:
            for topology in topologies:
                if only and topology not in only:
                    continue
                p = done.get((config, topology, not args.no_search))
                if p is None:
                    t0 = time.time()
                    (p,) = plan.plan(config_lib.load_config(config), [topology], classes=classes,
                                     search=not args.no_search)
                    p["row"], p["config"], p["seconds"] = name, config, round(time.time() - t0, 1)
                    p["searched"] = not args.no_search
                plans.append(p)
                lines.append(row_markdown(name, p["train"], searched=p["searched"]))
                print(lines[-1], f"({p['seconds']} s)", flush=True)
                write(args, lines, plans)  # after every row: a long run can be read before it ends
    print("\n".join(lines))
    return 0


def write(args: argparse.Namespace, lines, plans) -> None:
    command = "python benchmarks/plan_table.py " + " ".join(sys.argv[1:] if len(sys.argv) > 1 else [])
    if args.out:
        pathlib.Path(args.out).write_text(
            "# The TPU plan table\n\nGenerated by `" + command.strip() + "` (facekd_jax.plan on compile-only TPU "
            "devices, libtpu): **compiler figures and roofline bounds, not measurements** ([scale.md](scale.md)). "
            "Memory is the compiler's per-chip total (arguments, outputs, temporaries, code); the bounds assume "
            "every FLOP at the chip's peak bf16 rate and every byte at its HBM bandwidth.\n\n"
            + "\n".join(lines) + "\n")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(plans, indent=2, default=str))


if __name__ == "__main__":
    sys.exit(main())
