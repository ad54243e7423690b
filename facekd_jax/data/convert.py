"""Dataset converters (command line).

  python -m facekd_jax.data.convert align --lfw=DIR --output=OUT [--box=67,80,175,187] [--workers N]
  python -m facekd_jax.data.convert align --input=DIR --output=OUT --box=l,t,r,b

  python -m facekd_jax.data.convert --input folder:DIR[@l,t,r,b]|recordio:DIR --output-format recordio|tfds \\
      --output OUT [--image-size 112] [--overwrite] [--workers N]
  python -m facekd_jax.data.convert pairs-to-bin --pairs PAIRS_TXT --images DIR [--crop l,t,r,b] \\
      [--image-size 112] --output FILE.bin [--overwrite]

recordio output is insightface-compatible: OUT/train.rec, train.idx (key<TAB>offset), property
("num_classes,S,S"); record 0 is the identity header, images are keys 1..N (flag 0, float label), identity
records follow. tfds output is a directory for tfds.builder_from_directory(OUT) with features
{"image": Image (JPEG), "label": ClassLabel}, split "train".

Every image is decoded once (so a corrupt or truncated file is skipped, counted and named in the log); JPEGs
already S x S without a crop box are stored byte for byte, anything else is cropped/resized to S x S by the
shared decoder (facekd_jax.data.images) and re-encoded as JPEG quality 95. Outputs are written to OUT.tmp-PID and
renamed into place; an existing OUT is replaced only with --overwrite.
"""
from __future__ import annotations

import argparse
import collections
import io
import logging
import os
import re
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from facekd_jax.data import images as images_lib
from facekd_jax.data import insightface_rec, sources, specs, verification

log = logging.getLogger("facekd_jax.data.convert")

JPEG_QUALITY = 95


class ConvertError(ValueError):
    """A conversion cannot proceed; the message names the path."""


# ----------------------------------------------------------------------------------------------------- images


def _is_jpeg(data: bytes) -> bool:
    return data[:3] == b"\xff\xd8\xff"


def encode_jpeg(image: np.ndarray, quality: int = JPEG_QUALITY) -> bytes:
    """uint8 [H, W, 3] -> JPEG bytes."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def prepare_image(data: bytes, *, image_size: int, crop=None, name: str = "<bytes>") -> bytes:
    """Encoded image -> JPEG bytes of an S x S RGB image (the input itself when it already is one, uncropped).

    Raises images.ImageDecodeError naming `name` when the bytes cannot be decoded.
    """
    decoded = images_lib.decode_image_np(data, image_size=image_size, crop=crop, name=name)
    if crop is None and _is_jpeg(data):
        try:
            with Image.open(io.BytesIO(data)) as img:
                keep = img.size == (image_size, image_size) and img.mode == "RGB"
        except OSError:
            keep = False
        if keep:
            return data
    return encode_jpeg(decoded)


def _ordered_map(fn: Callable, items: Iterator, *, workers: int, window: int = 512) -> Iterator:
    """fn over items on a thread pool, results in input order, at most `window` in flight (bounded memory)."""
    with ThreadPoolExecutor(max_workers=workers) as ex:
        pending = collections.deque()
        for item in items:
            pending.append(ex.submit(fn, item))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


class _Skipped:
    """Images skipped because they could not be decoded (named in the log, counted for the summary)."""

    def __init__(self):
        self.names: List[str] = []

    def add(self, name: str, err: Exception) -> None:
        self.names.append(name)
        images_lib.CORRUPT.add(name)
        log.warning("skipping corrupt image (%d so far): %s", len(self.names), err)


# ----------------------------------------------------------------------------------------------------- sources


def open_input(text: str) -> Tuple[sources.IndexedSource, np.ndarray]:
    """A training spec of real images with random access (folder:, lfw:, lfw-all:, recordio:; a bare directory is
    recordio when it holds a .rec, else folder) -> (source, order): the example indices grouped by label, as
    insightface's identity records need them."""
    if ":" not in text and os.path.isdir(text):
        text = ("recordio:" if any(f.endswith(".rec") for f in os.listdir(text)) else "folder:") + text
    try:
        spec = specs.parse(text, specs.TRAIN, field="--input")
    except specs.SpecError as e:
        raise ConvertError(str(e)) from None
    source = sources.open_source(spec, image_size=1)  # the size is the converter's: nothing is decoded here
    if not isinstance(source, sources.IndexedSource) or source.read_bytes is None:
        raise ConvertError(f"--input {text!r}: the converters read real images with random access (folder:, lfw:, "
                           "lfw-all:, recordio:)")
    return source, np.argsort(source.labels, kind="stable")


def iter_prepared(source: sources.IndexedSource, order: np.ndarray, *, image_size: int, workers: int,
                  skipped: _Skipped, progress: bool = True) -> Iterator[Tuple[bytes, int]]:
    """(JPEG bytes, label) for every decodable image of `source`, in `order`; corrupt ones skipped and logged."""
    from tqdm import tqdm

    def work(i: int):
        name = source.name_of(i)
        try:
            data = source.read_bytes(i)
            return prepare_image(data, image_size=image_size, crop=source.crop, name=name), None
        except images_lib.ImageDecodeError as e:
            return None, e
        except OSError as e:  # unreadable file: same treatment as a corrupt one
            return None, images_lib.ImageDecodeError(f"cannot read image {name}: {e}")

    results = _ordered_map(work, iter(order), workers=workers)
    bar = tqdm(total=len(order), unit="img", desc="convert", disable=not progress, mininterval=1.0)
    try:
        for i, (data, err) in zip(order, results):
            bar.update(1)
            if data is None:
                skipped.add(source.name_of(i), err)
                continue
            yield data, int(source.labels[i])
    finally:
        bar.close()


# ----------------------------------------------------------------------------------------------------- outputs


def _check_output(out: str, overwrite: bool) -> None:
    if os.path.lexists(out) and not overwrite:
        raise FileExistsError(f"output {out} already exists; pass --overwrite to replace it")
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise FileNotFoundError(f"output folder {parent} does not exist (for {out})")


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


def _publish(tmp: str, out: str, overwrite: bool) -> None:
    """Moves the finished tmp into place (removing an old OUT only now, with --overwrite)."""
    if os.path.lexists(out):
        if not overwrite:
            raise FileExistsError(f"output {out} appeared during the conversion; pass --overwrite to replace it")
        _remove(out)
    os.replace(tmp, out)


def write_recordio(out_dir: str, items: Iterator[Tuple[bytes, int]], *, num_classes: int, image_size: int) -> int:
    """insightface train.rec/train.idx/property in out_dir; returns the number of images written."""
    return insightface_rec.write_insightface(out_dir, items, num_classes=num_classes, image_size=image_size)


def _tfds_name(out: str) -> str:
    name = re.sub(r"[^0-9a-z_]+", "_", os.path.basename(os.path.abspath(out)).lower()).strip("_")
    return name if name and name[0].isalpha() else f"faces_{name}".rstrip("_")


def _adhoc_builder_class():
    """tfds AdhocBuilder (what store_as_tfds_dataset uses) under a one-word module name.

    TFDS 4.9.x resolves a builder's source file through the `importlib_resources` backport when the builder's
    module is a dotted package path; with a one-word module it falls back to inspect, so conversion works
    without that extra package installed.
    """
    from tensorflow_datasets.core.dataset_builders import adhoc_builder

    class FacesBuilder(adhoc_builder.AdhocBuilder, skip_registration=True):
        pass

    FacesBuilder.__module__ = "facekd_converted_dataset"
    return FacesBuilder


def write_tfds(out_dir: str, items: Iterator[Tuple[bytes, int]], *, num_classes: int, image_size: int,
               class_names: Optional[List[str]] = None, name: str = "faces") -> int:
    """TFDS dataset (TFRecord shards + dataset_info.json + features.json) directly in out_dir, split "train".

    Readable with tfds.builder_from_directory(out_dir).as_dataset(split="train"); the shards are also plain
    tf.train.Example files with "image" (JPEG bytes) and "label" (int64). Returns the number of images.
    """
    import tensorflow_datasets as tfds

    tfds.disable_progress_bar()  # our own bar counts the images; TFDS's would draw a second one over it
    count = [0]

    def examples():
        for i, (data, label) in enumerate(items):
            count[0] += 1
            yield i, {"image": data, "label": label}

    label_feature = (tfds.features.ClassLabel(names=list(class_names)) if class_names
                     else tfds.features.ClassLabel(num_classes=num_classes))
    features = tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(image_size, image_size, 3), encoding_format="jpeg"),
        "label": label_feature,
    })
    work = out_dir + ".build"
    os.makedirs(work)
    try:
        builder = _adhoc_builder_class()(
            name=name, version="1.0.0", features=features, split_datasets={"train": examples()}, data_dir=work,
            description=f"Face images converted by facekd_jax.data.convert ({num_classes} classes, "
                        f"{image_size}x{image_size} JPEG).")
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(compute_stats=tfds.download.ComputeStatsMode.SKIP))
        os.replace(os.fspath(builder.data_dir), out_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return count[0]


def convert_dataset(input_spec: str, output: str, *, output_format: str = "recordio", image_size: int = 112,
                    overwrite: bool = False, workers: Optional[int] = None, progress: bool = True) -> dict:
    """Converts a dataset of real images (folder:, lfw:, lfw-all:, recordio:) into insightface RecordIO or a TFDS
    directory at `output`.

    Returns a summary dict(num_images, num_classes, skipped (list of names), output).
    """
    if output_format not in ("recordio", "tfds"):
        raise ConvertError(f"--output-format {output_format!r}: expected recordio or tfds")
    if image_size <= 0:
        raise ConvertError(f"--image-size {image_size}: must be positive")
    output = os.path.abspath(output)
    _check_output(output, overwrite)
    source, order = open_input(input_spec)
    log.info("converting %s -> %s (%s, %dx%d)", source.description, output, output_format, image_size, image_size)
    workers = workers or min(8, (os.cpu_count() or 2) * 2)
    skipped = _Skipped()
    items = iter_prepared(source, order, image_size=image_size, workers=workers, skipped=skipped, progress=progress)
    tmp = f"{output}.tmp-{os.getpid()}"
    _remove(tmp)
    try:
        if output_format == "recordio":
            n = write_recordio(tmp, items, num_classes=source.num_classes, image_size=image_size)
        else:
            n = write_tfds(tmp, items, num_classes=source.num_classes, image_size=image_size,
                           class_names=source.class_names, name=_tfds_name(output))
        if n == 0:
            raise ConvertError(f"no decodable image in {input_spec} ({len(skipped.names)} corrupt)")
        _publish(tmp, output, overwrite)
    finally:
        _remove(tmp)
    if skipped.names:
        shown = ", ".join(skipped.names[:10]) + (" ..." if len(skipped.names) > 10 else "")
        log.warning("skipped %d corrupt image(s): %s", len(skipped.names), shown)
    log.info("wrote %d images of %d classes to %s", n, source.num_classes, output)
    return dict(num_images=n, num_classes=source.num_classes, skipped=list(skipped.names), output=output)


def pairs_to_bin(pairs_txt: str, images_dir: str, output: str, *, image_size: int = 112, crop=None,
                 overwrite: bool = False, workers: Optional[int] = None, progress: bool = True) -> dict:
    """pairs.txt + LFW-layout folder -> insightface .bin (2N JPEGs S x S, N issame). Returns a summary dict.

    A missing or corrupt image is an error (skipping a pair would change the protocol).
    """
    from tqdm import tqdm

    output = os.path.abspath(output)
    _check_output(output, overwrite)
    pairs = verification.protocol_order(verification.read_pairs(pairs_txt), pairs_txt)
    paths = verification.pair_image_paths(pairs, images_dir, pairs_txt=pairs_txt)
    unique = list(dict.fromkeys(paths))
    workers = workers or min(8, (os.cpu_count() or 2) * 2)

    def work(path: str) -> bytes:
        with open(path, "rb") as f:
            data = f.read()
        return prepare_image(data, image_size=image_size, crop=crop, name=path)

    encoded = {}
    with tqdm(total=len(unique), unit="img", desc="pairs-to-bin", disable=not progress, mininterval=1.0) as bar:
        for path, data in zip(unique, _ordered_map(work, iter(unique), workers=workers)):
            encoded[path] = data
            bar.update(1)
    if os.path.lexists(output) and not overwrite:
        raise FileExistsError(f"output {output} appeared during the conversion; pass --overwrite to replace it")
    # The same bytes object for repeated images: pickle stores it once.
    verification.write_bin(output, [encoded[p] for p in paths], [p.issame for p in pairs])
    log.info("wrote %d pairs (%d same, %d distinct images) to %s", len(pairs), sum(p.issame for p in pairs),
             len(unique), output)
    return dict(num_pairs=len(pairs), num_same=int(sum(p.issame for p in pairs)), num_images=len(unique),
                output=output)


# ----------------------------------------------------------------------------------------------------- align

# dlib's frontal face detector's median box on LFW's 250x250 deep-funnelled images (the faces sit where the funnel
# put them): the box the shape predictor is given there.
LFW_FACE_BOX = (67, 80, 175, 187)


def align_images(images_dir: str, output: str, *, box, size: Optional[int] = None, padding: Optional[float] = None,
                 overwrite: bool = False, workers: Optional[int] = None, progress: bool = True,
                 copy_files: Sequence[str] = (), images_subdir: str = "") -> dict:
    """Every image under `images_dir` (any depth; one sub-folder per person) aligned by dlib's five landmarks
    (data.shape_predictor, found in the face `box`) into a wide dlib chip (data.align: COPY_SIZE, COPY_PADDING)
    from which both dlib's descriptor chip and the ArcFace crop are cut (`align.chip_boxes`), written as JPEG under
    the same relative path in OUT/images_subdir, with OUT/alignment.json saying so; `copy_files` are copied into
    OUT as they are (LFW's protocol files). An image that cannot be decoded or aligned is written as its box,
    resized, and named in alignment.json's "failed" and the log: never dropped (pairs stay complete).
    Written to OUT.tmp-PID and renamed into place. Returns a summary dict."""
    import json

    from facekd_jax.data import align, shape_predictor
    from facekd_jax.data.folder import is_image_file

    size = align.COPY_SIZE if size is None else int(size)
    padding = align.COPY_PADDING if padding is None else float(padding)
    output = os.path.abspath(output)
    _check_output(output, overwrite)
    files = sorted(os.path.relpath(os.path.join(d, f), images_dir) for d, _, fs in os.walk(images_dir)
                   for f in fs if is_image_file(f))
    if not files:
        raise ConvertError(f"--input {images_dir}: no images")
    predictor = shape_predictor.read_shape_predictor(shape_predictor.find_shape_predictor())
    failed: List[dict] = []

    def work(rel: str):
        path = os.path.join(images_dir, rel)
        try:
            with open(path, "rb") as f:
                image = images_lib.decode_rgb(f.read(), name=path)
            landmarks = predictor.predict(image, box)
            chip = align.dlib_face_chip(image, np.floor(align._check_landmarks(landmarks, path) + 0.5), size, padding)
            return encode_jpeg(chip), None
        except (ValueError, OSError) as e:  # undecodable, or degenerate landmarks: the box instead, and named
            try:
                with open(path, "rb") as f:
                    fallback = prepare_image(f.read(), image_size=size, crop=tuple(box), name=path)
            except (ValueError, OSError):
                fallback = encode_jpeg(np.zeros((size, size, 3), np.uint8))
            return fallback, f"{type(e).__name__}: {e}"

    from tqdm import tqdm

    tmp = f"{output}.tmp-{os.getpid()}"
    _remove(tmp)
    try:
        with tqdm(total=len(files), unit="img", desc="align", disable=not progress, mininterval=1.0) as bar:
            for rel, (data, error) in zip(files, _ordered_map(work, iter(files), workers=workers or 2)):
                target = os.path.join(tmp, images_subdir, rel)
                os.makedirs(os.path.dirname(target), exist_ok=True)
                with open(target, "wb") as f:
                    f.write(data)
                if error:
                    failed.append({"image": rel, "error": error})
                    log.warning("could not align %s (%s): its box %s is stored instead", rel, error, list(box))
                bar.update(1)
        for name in copy_files:
            shutil.copy2(name, os.path.join(tmp, os.path.basename(name)))
        record = {"template": "wide dlib chip", "size": size, "padding": padding,
                  "boxes": {k: list(v) for k, v in align.chip_boxes(size, padding).items()},
                  "face_box": list(box), "source": os.path.abspath(images_dir), "images": len(files),
                  "failed": failed}
        with open(os.path.join(tmp, align.ALIGNMENT), "w") as f:
            json.dump(record, f, indent=2)
        _publish(tmp, output, overwrite)
    finally:
        _remove(tmp)
    log.info("aligned %d images into %s (%d could not be aligned: their boxes stored, named in %s)",
             len(files) - len(failed), output, len(failed), align.ALIGNMENT)
    return dict(images=len(files), failed=failed, output=output)


def align_lfw(lfw_dir: str, output: str, *, box=LFW_FACE_BOX, **kwargs) -> dict:
    """LFW's folder (DIR/lfw-deepfunneled and its protocol files) aligned into the same layout at OUT, so that
    every LFW spec (lfw:, lfw-all:, lfw-view2:, lfw-dev:) reads the aligned copy as it reads the original."""
    images = os.path.join(lfw_dir, specs.LFW_IMAGES)
    if not os.path.isdir(images):
        raise FileNotFoundError(f"--lfw={lfw_dir}: {images} not found (expected LFW's folder)")
    texts = sorted(os.path.join(lfw_dir, f) for f in os.listdir(lfw_dir) if f.endswith(".txt"))
    return align_images(images, output, box=box, copy_files=texts, images_subdir=specs.LFW_IMAGES, **kwargs)


# ----------------------------------------------------------------------------------------------------- CLI


def _crop_arg(text: str):
    try:
        return specs.parse_crop(text, f"--crop {text}")
    except specs.SpecError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _dataset_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m facekd_jax.data.convert",
        description="Convert a folder-per-person or insightface RecordIO dataset to insightface RecordIO or TFDS. "
                    "(For verification pairs: python -m facekd_jax.data.convert pairs-to-bin --help)")
    p.add_argument("--input", required=True, help="folder:DIR[@l,t,r,b] (one sub-folder per person), recordio:DIR, "
                                                  "lfw:DIR or lfw-all:DIR")
    p.add_argument("--output-format", choices=("recordio", "tfds"), default="recordio")
    p.add_argument("--output", required=True, help="output directory (must not exist unless --overwrite)")
    p.add_argument("--image-size", type=int, default=112, help="side of the stored square images (default 112)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--workers", type=int, default=None, help="decode/encode threads")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _bin_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m facekd_jax.data.convert pairs-to-bin",
                                description="Build an insightface verification .bin from an LFW-style pairs file.")
    p.add_argument("--pairs", required=True, help="pairs.txt (View 1 'N' or View 2 'FOLDS N' header)")
    p.add_argument("--images", required=True, help="folder with <name>/<name>_%%04d.jpg")
    p.add_argument("--crop", type=_crop_arg, default=None, help="crop box l,t,r,b before resizing (LFW: "
                                                                "62,55,188,181)")
    p.add_argument("--image-size", type=int, default=112)
    p.add_argument("--output", required=True, help="FILE.bin")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--no-progress", action="store_true")
    return p


def _align_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m facekd_jax.data.convert align",
                                description="Align every face by dlib's 5 landmarks (pure NumPy) into wide dlib chips "
                                "from which both dlib's descriptor chip and the ArcFace crop are cut.")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--lfw", help="LFW's folder (lfw-deepfunneled and the protocol files): OUT gets the layout")
    where.add_argument("--input", help="a folder of images, one sub-folder per person")
    p.add_argument("--box", type=_crop_arg, default=None, help="the face box l,t,r,b the landmarks are found in "
                   f"(LFW: {','.join(map(str, LFW_FACE_BOX))}, dlib's detector's median there)")
    p.add_argument("--output", required=True)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry; returns the exit status (0 ok, 2 on a user error, which is logged naming the path)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if argv and argv[0] == "align":
            a = _align_parser().parse_args(argv[1:])
            kwargs = dict(overwrite=a.overwrite, workers=a.workers, progress=not a.no_progress)
            if a.lfw:
                align_lfw(a.lfw, a.output, box=a.box or LFW_FACE_BOX, **kwargs)
            elif a.box is None:
                raise ConvertError("align --input=DIR needs --box=l,t,r,b (where the faces are)")
            else:
                align_images(a.input, a.output, box=a.box, **kwargs)
        elif argv and argv[0] == "pairs-to-bin":
            a = _bin_parser().parse_args(argv[1:])
            pairs_to_bin(a.pairs, a.images, a.output, image_size=a.image_size, crop=a.crop, overwrite=a.overwrite,
                         workers=a.workers, progress=not a.no_progress)
        else:
            if argv and argv[0] == "dataset":
                argv = argv[1:]
            a = _dataset_parser().parse_args(argv)
            convert_dataset(a.input, a.output, output_format=a.output_format, image_size=a.image_size,
                            overwrite=a.overwrite, workers=a.workers, progress=not a.no_progress)
    except (FileNotFoundError, FileExistsError, ValueError, images_lib.ImageDecodeError) as e:
        log.error("%s", e)
        return 2
    except OSError as e:  # a full or read-only disk: one line too (nothing final was written: OUT.tmp is removed)
        from facekd_jax import errors
        if errors.exit_status(e) is None:
            raise
        log.error("%s", errors.message(e))
        return errors.EXIT_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
