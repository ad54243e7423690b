"""IJB-C 1:1 at full size without the data set: the time of every stage of facekd_jax.data.ijb but the network.

  python benchmarks/ijb.py [--faces 469375] [--templates 23124] [--pairs 15658489] [--genuine 19557] [--dim 512]
                           [--gallery 3531] [--random-pairs] [--jpegs 300] [--jpeg-sizes 100,400] [--keep DIR]

1. Synthetic meta files of IJB-C's size are written to a temporary folder (faces `i.jpg template media`, the
   landmarks file with 10 coordinates and a score, the pairs file), then read by ijb_meta.read_meta (all three files and
   their cross-checks) and, for comparison, the pairs file by np.loadtxt.
2. Random float32 image features [faces, dim] are pooled into template features (ijb.template_features, detector
   scores on), the pairs scored (ijb.pair_scores) and the ROC and TAR@FAR taken (ijb.verification_result).
   Pairs are IJB-C-shaped by default: the first template of a pair is one of `--gallery` enrollment templates
   (IJB-C: 1,772 + 1,759), the second one of the other templates (the 19,593 mixed-media probes);
   `--random-pairs` draws both from all templates (the worst case for the Gram-block scorer) and also times the
   gather scorer there.
3. Decode + align: `--jpegs` face-like JPEGs of random sizes (sides uniform in --jpeg-sizes) are decoded and
   aligned one at a time (per-image cost of each part) and through ijb.aligned_batches' thread pool (throughput),
   and the figure is extrapolated to `--faces` images (network excluded).
Each stage prints wall seconds, CPU seconds of this process (all threads; meaningful on a shared machine) and the
peak resident memory so far. Nothing is asserted.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import resource
import shutil
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from facekd_jax.data import align, ijb, ijb_meta  # noqa: E402


class Stage:
    """Prints `name: wall s, cpu s, peak RSS` around a block."""

    def __init__(self, name: str):
        self.name = name

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.wall
        cpu = time.process_time() - self.cpu
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB on Linux
        print(f"{self.name:<44s} {self.seconds:8.2f} s wall {cpu:8.2f} s cpu   peak RSS {peak:5.2f} GiB", flush=True)


# ------------------------------------------------------------------------------------ synthetic meta files

def _digits(values: np.ndarray, width: int) -> np.ndarray:
    """Non-negative ints -> uint8 [n, width] ASCII digits right-aligned, leading positions 0 (dropped later)."""
    out = np.zeros((values.size, width), np.uint8)
    v = values.astype(np.int64).copy()
    for col in range(width - 1, -1, -1):
        digit = v % 10
        out[:, col] = np.where((v > 0) | (col == width - 1), 48 + digit, 0)
        v //= 10
    return out


def _fixed(values: np.ndarray, decimals: int) -> list:
    """Non-negative floats -> [integer digits, '.', decimals digits] fields (fixed point)."""
    scaled = np.rint(values * 10 ** decimals).astype(np.int64)
    whole, frac = np.divmod(scaled, 10 ** decimals)
    frac_digits = _digits(frac + 10 ** decimals, decimals + 1)[:, 1:]  # keeps leading zeros
    return [_digits(whole, len(str(int(whole.max())))), np.full((values.size, 1), 46, np.uint8), frac_digits]


def _write_rows(path: pathlib.Path, fields: list) -> None:
    """fields: uint8 [n, w_i] blocks (0 = nothing) or None for a space; one row per line."""
    n = next(f.shape[0] for f in fields if f is not None)
    space, newline = np.full((n, 1), 32, np.uint8), np.full((n, 1), 10, np.uint8)
    with open(path, "wb") as out:
        for a in range(0, n, 1 << 20):  # 1 M rows at a time: bounded memory
            rows = np.concatenate([space[a:a + (1 << 20)] if f is None else f[a:a + (1 << 20)] for f in fields]
                                  + [newline[a:a + (1 << 20)]], axis=1).reshape(-1)
            out.write(rows[rows != 0].tobytes())


def write_meta(root: pathlib.Path, faces: int, templates: np.ndarray, medias: np.ndarray, pairs: np.ndarray,
               labels: np.ndarray, rng) -> None:
    meta = root / "meta"
    meta.mkdir(parents=True)
    width = len(str(faces))
    name = [_digits(np.arange(1, faces + 1), width), np.frombuffer(b".jpg" * faces, np.uint8).reshape(faces, 4)]
    id_width = len(str(int(max(templates.max(), medias.max(), pairs.max()))))
    _write_rows(meta / "ijbc_face_tid_mid.txt", name + [None, _digits(templates, id_width), None,
                                                           _digits(medias, id_width)])
    marks = rng.uniform(20, 200, (faces, 10))
    fields = list(name)
    for j in range(10):
        fields += [None] + _fixed(marks[:, j], 3)
    fields += [None] + _fixed(rng.uniform(0.5, 1.0, faces), 6)
    _write_rows(meta / "ijbc_name_5pts_score.txt", fields)
    _write_rows(meta / "ijbc_template_pair_label.txt",
                [_digits(pairs[:, 0], id_width), None, _digits(pairs[:, 1], id_width), None,
                 _digits(labels.astype(np.int64), 1)])


def synthetic_protocol(args, rng):
    """(templates [N], medias [N], pairs [P, 2], labels [P]) of IJB-C's shape."""
    n, t = args.faces, args.templates
    templates = np.r_[np.arange(t), rng.integers(0, t, n - t)]  # every template has a face
    rng.shuffle(templates)
    medias = templates * 8 + rng.integers(0, 8, n)  # about 8 media per template, 2.5 faces each
    templates = templates + 1  # ids from 1, as IJB-C's
    if args.random_pairs:
        first, second = rng.integers(1, t + 1, args.pairs), rng.integers(1, t, args.pairs)
        second += second >= first  # no template against itself
    else:  # enrollment (gallery) templates against the probes
        first = rng.integers(1, args.gallery + 1, args.pairs)
        second = rng.integers(args.gallery + 1, t + 1, args.pairs)
    order = np.lexsort((second, first))  # the official file is sorted by its first template
    pairs = np.stack([first, second], axis=1)[order]
    labels = np.zeros(args.pairs, bool)
    labels[rng.choice(args.pairs, args.genuine, replace=False)] = True
    return templates, medias, pairs, labels


# ---------------------------------------------------------------------------------------- decode and align

def write_jpegs(folder: pathlib.Path, count: int, sides: tuple, rng) -> tuple:
    """Face-like JPEGs (smooth colour, a skin ellipse, eyes and mouth) -> (names bytes [count], landmarks)."""
    names, marks = [], []
    for i in range(count):
        side = int(rng.integers(sides[0], sides[1] + 1))
        small = rng.uniform(40, 220, (8, 8, 3)).astype(np.uint8)
        img = np.asarray(Image.fromarray(small).resize((side, side), Image.BILINEAR), np.float64)
        yy, xx = np.mgrid[0:side, 0:side]
        img[((xx - side / 2) / (0.33 * side)) ** 2 + ((yy - side / 2) / (0.42 * side)) ** 2 <= 1] = (200, 160, 140)
        pts = np.array([[-18, -12], [18, -12], [0, 6], [-14, 26], [14, 26]]) * side / 112 + side / 2
        for x, y in pts:
            img[(xx - x) ** 2 + (yy - y) ** 2 <= (4 * side / 112) ** 2] = (40, 30, 30)
        img += rng.normal(0, 8, img.shape)
        name = f"{i + 1}.jpg"
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(folder / name, quality=92)
        names.append(name.encode())
        marks.append(pts + rng.normal(0, 1, pts.shape))
    return np.array(names), np.array(marks, np.float32)


def decode_align(args, rng) -> float:
    """Per-image seconds of decode + align through the thread pool (and prints the parts)."""
    with tempfile.TemporaryDirectory(prefix="ijb-jpegs-") as tmp:
        folder = pathlib.Path(tmp)
        names, marks = write_jpegs(folder, args.jpegs, tuple(args.jpeg_sizes), rng)
        template = align.arcface_template(112)
        decoded = []
        t = time.perf_counter()
        for name in names:
            with Image.open(folder / name.decode()) as img:
                decoded.append(np.asarray(img.convert("RGB")))
        decode = (time.perf_counter() - t) / len(names)
        t = time.perf_counter()
        for img, m in zip(decoded, marks):
            align.warp_affine(img, align.similarity_transform(m, template), 112)
        warp = (time.perf_counter() - t) / len(names)
        print(f"one thread: decode {decode * 1e3:.2f} ms + align {warp * 1e3:.2f} ms per image "
              f"(mean side {np.mean([d.shape[0] for d in decoded]):.0f} px)")
        for workers in sorted({1, os.cpu_count() or 1}):
            with Stage(f"aligned_batches, {workers} thread(s), {len(names)} images") as stage:
                for _ in ijb.aligned_batches(str(folder), names, marks, batch_size=128, workers=workers):
                    pass
            per_image = stage.seconds / len(names)
            print(f"  {per_image * 1e3:.2f} ms per image -> {args.faces} images: "
                  f"{per_image * args.faces / 3600:.2f} h (network excluded)")
        return per_image


# ------------------------------------------------------------------------------------------------------ main

def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--faces", type=int, default=469_375)
    parser.add_argument("--templates", type=int, default=23_124)
    parser.add_argument("--gallery", type=int, default=3_531)
    parser.add_argument("--pairs", type=int, default=15_658_489)
    parser.add_argument("--genuine", type=int, default=19_557)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--random-pairs", action="store_true")
    parser.add_argument("--jpegs", type=int, default=300)
    parser.add_argument("--jpeg-sizes", type=lambda s: [int(v) for v in s.split(",")], default=[100, 400])
    parser.add_argument("--keep", help="write the meta files here and keep them (default: a temporary folder)")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    print(f"{args.faces} faces, {args.templates} templates, {args.pairs} pairs ({args.genuine} genuine), "
          f"E={args.dim}, {'random' if args.random_pairs else 'gallery x probe'} pairs, {os.cpu_count()} CPUs")

    templates, medias, pairs, labels = synthetic_protocol(args, rng)
    root = pathlib.Path(args.keep or tempfile.mkdtemp(prefix="ijb-bench-")) / "IJBC"
    try:
        with Stage("write synthetic meta files"):
            write_meta(root, args.faces, templates, medias, pairs, labels, rng)
        for f in sorted((root / "meta").iterdir()):
            print(f"  {f.name}: {f.stat().st_size / 2 ** 20:.1f} MiB")
        with Stage("ijb_meta.read_meta (3 files + cross-checks)"):
            meta = ijb_meta.read_meta(str(root), "IJBC")
        same = np.array_equal(meta.pairs, pairs) and np.array_equal(meta.templates, templates)
        print(f"  read back what was written: {same}")
        paths = meta.paths
        with Stage("  ijb_meta.read_template_pairs alone"):
            ijb_meta.read_template_pairs(paths["pairs"])
        with Stage("  ijb_meta.read_landmarks alone"):
            ijb_meta.read_landmarks(paths["landmarks"])
        with Stage("  ijb_meta.read_face_tid_mid alone"):
            ijb_meta.read_face_tid_mid(paths["faces"])
        with Stage("  np.loadtxt(pairs, int64), for comparison"):
            np.loadtxt(paths["pairs"], dtype=np.int64)
    finally:
        if not args.keep:
            shutil.rmtree(root.parent, ignore_errors=True)

    features = rng.standard_normal((args.faces, args.dim), dtype=np.float32)
    with Stage("ijb.template_features (detector scores on)"):
        ids, feats = ijb.template_features(features, meta.templates, meta.medias, detector_scores=meta.scores)
    del features
    with Stage("ijb.pair_scores (auto)"):
        scores = ijb.pair_scores(feats, ids, meta.pairs)
    if args.random_pairs:
        with Stage("ijb.pair_scores (gather)"):
            gathered = ijb.pair_scores(feats, ids, meta.pairs, method="gather")
        print(f"  max |gram - gather| = {np.abs(gathered - scores).max():.2e}")
    # Genuine pairs a little more similar than random: a ROC with a realistic number of distinct vertices.
    scores[meta.labels] += 0.3
    with Stage("ijb.roc_curve + TAR@FAR + thinned ROC + AUC"):
        result = ijb.verification_result(scores, meta.labels)
    with Stage("ijb.tar_at_far alone"):
        ijb.tar_at_far(scores, meta.labels)
    print(ijb.tar_table({"synthetic-IJBC": [result["tar_at_far"][k] for k in result["tar_at_far"]]}))
    decode_align(args, rng)


if __name__ == "__main__":
    main()
