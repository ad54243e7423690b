"""Training sources: the readers behind the training data specs (facekd_jax.data.specs has their syntax).

  source = open_source("lfw:../shared/data/lfw", image_size=112)   # or a parsed specs.DataSpec

  synthetic[:C:K[:SEED]]               procedurally generated faces (facekd_jax.data.synthetic)
  folder:DIR[@l,t,r,b]                 one sub-folder per person (JPEG, PNG, BMP, PGM, ...)
  lfw:DIR[@l,t,r,b]                    LFW people of DIR/peopleDevTrain.txt with >= 2 images, from
                                       DIR/lfw-deepfunneled, crop 62,55,188,181 unless given
  lfw-all:DIR[@l,t,r,b]                every image of the peopleDevTrain people, singletons too (for
                                       label-free KD from a teacher's embeddings)
  recordio:DIR[@l,t,r,b]               insightface train.rec / train.idx / property
  tfrecord:GLOB[@l,t,r,b]              tf.train.Example files: "image" | "image/encoded" (encoded bytes),
                                       "label" | "image/class/label" (int64)
  tfds:NAME[:SPLIT] | tfds:DIR[:SPLIT] a prepared TFDS dataset (catalog name, or a directory for
                                       tfds.builder_from_directory, e.g. the converter's output)

A DIR may be a URL (gs://...) where the kind's registry entry says COPY (read from a local copy pulled once per
process, specs.local); tfrecord GLOBs are read by TensorFlow's file systems in place.

Two kinds of source. An `IndexedSource` (synthetic, folder, lfw, recordio) reads example i directly, so the
pipeline orders examples itself (a seeded permutation per epoch) and can resume at any step exactly. A
`StreamSource` (tfrecord, tfds) is read in a seeded file/shuffle-buffer order; resuming skips records
without decoding them.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import logging
import os
from typing import Callable, List, Optional, Tuple

import numpy as np
import tensorflow as tf

from facekd_jax.data import images as images_lib
from facekd_jax.data import lfw_dev
from facekd_jax.data import specs as specs_lib
from facekd_jax.data import synthetic as synthetic_lib
from facekd_jax.data.specs import LFW_IMAGES, DataSpec
from facekd_jax.paths import is_url

log = logging.getLogger(__name__)

IMAGE_KEYS = ("image", "image/encoded")
LABEL_KEYS = ("label", "image/class/label")


@dataclasses.dataclass
class IndexedSource:
    """N examples with random access. labels int32 [N] in [0, num_classes).

    Exactly one way to get pixels:
      render(index int64 [B]) -> uint8 [B, S, S, 3]   (synthetic: never corrupt), or
      read(index int64 [...]) -> encoded image bytes, same shape, and name(index) -> what the log calls it;
      the pipeline decodes with images.decode_image_tf and `crop`. `read_batched`: read() is cheap per call
      on a whole batch (one Python call) and should be called on batches rather than per example.
    Files and records are also readable from Python (the converters, export calibration): read_bytes(i) ->
    encoded bytes and name_of(i) -> str.
    """
    description: str
    labels: np.ndarray
    num_classes: int
    synthetic: bool = False
    crop: images_lib.Crop = None
    render: Optional[Callable[[tf.Tensor], tf.Tensor]] = None
    read: Optional[Callable[[tf.Tensor], tf.Tensor]] = None
    name: Optional[Callable[[tf.Tensor], tf.Tensor]] = None
    read_batched: bool = False
    class_names: Optional[List[str]] = None
    read_bytes: Optional[Callable[[int], bytes]] = None
    name_of: Optional[Callable[[int], str]] = None

    @property
    def num_images(self) -> int:
        return int(self.labels.shape[0])


@dataclasses.dataclass
class StreamSource:
    """Examples read in order from TFRecord-like files.

    dataset(seed, process_index, process_count) -> tf.data.Dataset of (encoded string, label int32, name
    string), infinite, deterministic for a seed, this process's share only.
    """
    description: str
    num_images: int
    num_classes: int
    dataset: Callable[..., tf.data.Dataset]
    crop: images_lib.Crop = None
    synthetic: bool = False
    class_names: Optional[List[str]] = None


def open_source(spec: "str | DataSpec", *, image_size: int) -> IndexedSource | StreamSource:
    """A training spec (string or parsed) -> a source (see the module docstring). Raises specs.SpecError /
    FileNotFoundError / ValueError naming the spec."""
    return _open(specs_lib.parse(spec, specs_lib.TRAIN), int(image_size))


@functools.lru_cache(maxsize=4)
def _open(spec: DataSpec, image_size: int) -> IndexedSource | StreamSource:
    """Cached (the last few specs): the train loop asks for the class count before it builds the pipeline, and
    a TFRecord source counts its labels with a pass over the files."""
    return spec.info.reader(specs_lib.TRAIN)(specs_lib.local(spec), image_size=image_size)


# ----------------------------------------------------------------------------------------------------- indexed


def synthetic_source(spec: DataSpec, *, image_size: int) -> IndexedSource:
    num_classes, per_class, seed = synthetic_lib.parse_spec(str(spec))
    faces = synthetic_lib.SyntheticFaces(num_classes, per_class, image_size=image_size, seed=seed)
    return IndexedSource(
        description=(f"SYNTHETIC faces ({num_classes} procedurally generated identities x {per_class} images, "
                     f"world seed {seed}; not real data)"),
        labels=faces.labels, num_classes=num_classes, synthetic=True, render=faces.images_tf)


def _file_source(paths: List[str], labels: np.ndarray, class_names: List[str], crop,
                 description: str) -> IndexedSource:
    paths_t = tf.constant(paths)

    def read_file(i):
        return tf.io.read_file(tf.gather(paths_t, i))

    def path_of(i):
        return tf.gather(paths_t, i)

    def read_bytes(i: int) -> bytes:
        with open(paths[int(i)], "rb") as f:
            return f.read()

    return IndexedSource(description=description, labels=np.asarray(labels, np.int32),
                         num_classes=len(class_names), crop=crop, read=read_file, name=path_of,
                         class_names=list(class_names), read_bytes=read_bytes, name_of=lambda i: paths[int(i)])


def folder_source(spec: DataSpec, *, image_size: int = 0) -> IndexedSource:
    """DIR/<person>/<image>: labels from the sorted sub-folder names (facekd_jax.data.folder.list_folder)."""
    from facekd_jax.data.folder import list_folder
    root, crop = spec.path, specs_lib.default_crop(spec)
    paths, labels, class_names = list_folder(root)
    return _file_source(paths, labels, class_names, crop,
                        f"folder {root}: {len(paths)} images of {len(class_names)} people"
                        + (f", crop {crop}" if crop else ""))


def lfw_source(spec: DataSpec, *, image_size: int = 0) -> IndexedSource:
    """LFW's View 1 training people (peopleDevTrain.txt), never in pairsDevTest.txt, without the development
    split's people (data.lfw_dev): `lfw:` those with >= 2 images, `lfw-all:` all of them."""

    root, crop, min_images = spec.path, specs_lib.default_crop(spec), 2 if spec.kind == "lfw" else 1
    people_txt = os.path.join(root, "peopleDevTrain.txt")
    images_dir = os.path.join(root, LFW_IMAGES)
    for p in (people_txt, images_dir):
        if not os.path.exists(p):
            raise FileNotFoundError(f"LFW training data needs {p} (spec 'lfw:{root}')")
    held_out = lfw_dev.held_out(root)
    wanted = sorted(name for name, n in lfw_dev.read_people(people_txt) if n >= min_images and name not in held_out)
    paths, labels = [], []
    for label, name in enumerate(wanted):
        pdir = os.path.join(images_dir, name)
        files = sorted(f for f in os.listdir(pdir) if f.lower().endswith((".jpg", ".jpeg", ".png"))) \
            if os.path.isdir(pdir) else []
        if not files:
            raise FileNotFoundError(f"{pdir}: no images for {name}, listed in {people_txt}")
        paths.extend(os.path.join(pdir, f) for f in files)
        labels.extend([label] * len(files))
    return _file_source(paths, np.asarray(labels, np.int32), wanted, crop,
                        f"LFW {images_dir}: {len(paths)} images of the {len(wanted)} peopleDevTrain people with "
                        f">= {min_images} images (the {len(held_out)} development people held out), crop {crop}")


def recordio_source(spec: DataSpec, *, image_size: int = 0) -> IndexedSource:
    """insightface train.rec via insightface_rec.read_insightface; image bytes are sliced from a memory map."""
    from facekd_jax.data.insightface_rec import read_insightface
    root, crop = spec.path, specs_lib.default_crop(spec)
    index = read_insightface(root)

    def read_np(i: np.ndarray) -> np.ndarray:
        # One Python call per batch: the GIL is held for microseconds per image (a memory-map slice).
        flat = np.asarray(i).reshape(-1)
        out = np.empty(flat.shape[0], dtype=object)
        for n, j in enumerate(flat):
            out[n] = index.read_image(int(j))
        return out.reshape(np.shape(i))

    def read(i: tf.Tensor) -> tf.Tensor:
        out = tf.numpy_function(read_np, [i], tf.string, stateful=False)
        return tf.reshape(out, tf.shape(i))

    keys_t = tf.constant(index.keys, tf.int64)

    def record_name(i):
        return tf.strings.join([index.rec_path, " record ", tf.strings.as_string(tf.gather(keys_t, i))])

    return IndexedSource(
        description=f"recordio {index.rec_path}: {index.num_images} images of {index.num_classes} classes",
        labels=np.asarray(index.labels, np.int32), num_classes=int(index.num_classes), crop=crop,
        read=read, name=record_name, read_batched=True, read_bytes=lambda i: index.read_image(int(i)),
        name_of=lambda i: f"{index.rec_path} record {int(index.keys[int(i)])}")


# ----------------------------------------------------------------------------------------------------- streaming


def _shard_files(files: List[str], process_index: int, process_count: int) -> Tuple[List[str], bool]:
    """Whole files per process when there are enough of them, else every process reads all and keeps 1/P."""
    if len(files) >= process_count and len(files) % process_count == 0:
        return files[process_index::process_count], False
    return files, process_count > 1


def _check_framing(path: str) -> None:
    """ValueError naming the file and the record unless every record's declared length fits in the bytes left.

    TensorFlow allocates the length a record declares before it reads the record (2**34 bytes reserved; 2**40
    crash the process), and a damaged length whose own checksum happens to be right passes TensorFlow's check.
    A walk over the 16-byte frames, not the data; local files only (a remote one would cost a request a record).
    """
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        pos, record = 0, 0
        while pos < size:
            f.seek(pos)
            head = f.read(8)
            length = int.from_bytes(head, "little") if len(head) == 8 else -1
            if not 0 <= length <= size - pos - 16:
                raise ValueError(f"{path}: record {record} at byte {pos} declares {length} bytes but "
                                 f"{max(size - pos - 16, 0)} are left: a truncated or corrupt TFRecord file")
            pos, record = pos + 16 + length, record + 1


def _tf_reason(error: Exception) -> str:
    """The first line of a TensorFlow or protobuf error, without its {{function_node ...}} decoration."""
    text = getattr(error, "message", None) or str(error)
    return " ".join(text.split("}}")[-1].split("\n")[0].split()) or type(error).__name__


def _example_keys(path: str) -> Tuple[str, str]:
    """The (image, label) feature names used by the first record of a TFRecord file."""
    try:
        first = [tf.train.Example.FromString(raw.numpy()) for raw in tf.data.TFRecordDataset(path).take(1)]
    except Exception as e:  # noqa: BLE001 - tf.errors.DataLossError, protobuf's DecodeError: the file's fault
        raise ValueError(f"{path}: record 0 is not a tf.train.Example ({type(e).__name__}: {_tf_reason(e)})") \
            from None
    if not first:
        raise ValueError(f"{path}: empty TFRecord file")
    keys = set(first[0].features.feature.keys())
    image = next((k for k in IMAGE_KEYS if k in keys), None)
    label = next((k for k in LABEL_KEYS if k in keys), None)
    if image is None or label is None:
        raise ValueError(f"{path}: tf.train.Example without {'/'.join(IMAGE_KEYS)} (bytes) and "
                         f"{'/'.join(LABEL_KEYS)} (int64) features; found {sorted(keys)}")
    return image, label


def _example_label(raw: bytes, image_key: str, label_key: str) -> int:
    """The label of one serialized tf.train.Example that holds one image (bytes) and one label (int64).

    protobuf's own parser, not TensorFlow's: TensorFlow's fast Example parser (tf.io.parse_example) accepts a
    Feature whose length prefix runs past its message and yields bytes of the next one, where protobuf refuses.
    Raises ValueError (the caller adds the file and record)."""
    try:
        feature = tf.train.Example.FromString(raw).features.feature
    except Exception as e:  # noqa: BLE001 - protobuf's DecodeError (its module differs by backend)
        raise ValueError(f"not a tf.train.Example ({type(e).__name__}: {_tf_reason(e)})") from None
    for key, kind in ((image_key, "bytes_list"), (label_key, "int64_list")):
        if key not in feature or feature[key].WhichOneof("kind") != kind or len(getattr(feature[key], kind).value) != 1:
            raise ValueError(f"feature {key!r} is not one {kind.split('_')[0]} value")
    return feature[label_key].int64_list.value[0]


def _tfrecord_count(path: str, image_key: str, label_key: str) -> Tuple[int, int]:
    """(records, largest label) of one file, every record read through TensorFlow (which checks its CRCs) and
    parsed by protobuf; ValueError naming the file and the record otherwise."""
    record, largest = 0, -1
    try:
        for batch in tf.data.TFRecordDataset(path).batch(1024).as_numpy_iterator():
            for raw in batch:
                label = _example_label(raw, image_key, label_key)
                if label < 0:
                    raise ValueError(f"negative label {label}")
                largest, record = max(largest, label), record + 1
    except ValueError as e:
        raise ValueError(f"{path}: record {record}: {e}") from None
    # UnicodeDecodeError: TensorFlow's message quoting the record's bytes could not even be decoded.
    except (tf.errors.OpError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: unreadable TFRecord file at record {record} ({type(e).__name__}: "
                         f"{_tf_reason(e)})") from None
    return record, largest


def tfrecord_source(spec: DataSpec, *, image_size: int = 0, shuffle_buffer: int = 10_000) -> StreamSource:
    """TFRecord files of tf.train.Example. Checks every record's framing (local files), then reads every record
    once, checking its CRCs (TensorFlow) and parsing it (protobuf) to count images and classes. Errors name the
    file and the record."""
    pattern, crop = spec.path, spec.crop
    files = sorted(tf.io.gfile.glob(pattern))
    if not files:
        raise FileNotFoundError(f"no TFRecord files match {pattern!r} (spec 'tfrecord:{pattern}')")
    for path in files:
        if not is_url(path):
            _check_framing(path)
    image_key, label_key = _example_keys(files[0])
    # Files read in parallel, a thread each: TensorFlow reads and checks the bytes outside the GIL.
    with concurrent.futures.ThreadPoolExecutor(min(16, len(files))) as pool:
        counts = list(pool.map(lambda f: _tfrecord_count(f, image_key, label_key), files))
    num_images = sum(c[0] for c in counts)
    if num_images == 0:
        raise ValueError(f"{pattern}: no examples in {len(files)} TFRecord file(s)")
    num_classes = max(c[1] for c in counts) + 1
    feature_spec = {image_key: tf.io.FixedLenFeature([], tf.string), label_key: tf.io.FixedLenFeature([], tf.int64)}

    def dataset(seed: int, process_index: int, process_count: int, buffer: Optional[int] = None) -> tf.data.Dataset:
        mine, shard_examples = _shard_files(files, process_index, process_count)
        # One epoch (files in a seeded order, then a seeded shuffle buffer), repeated: every epoch holds every
        # record exactly once, in a new order.
        ds = tf.data.Dataset.from_tensor_slices(mine)
        ds = ds.shuffle(len(mine), seed=seed, reshuffle_each_iteration=True)

        def records(path):
            return tf.data.TFRecordDataset(path).enumerate().map(
                lambda i, raw: (raw, tf.strings.join([path, ":record ", tf.strings.as_string(i)])))

        ds = ds.interleave(records, cycle_length=min(8, len(mine)), block_length=1, deterministic=True,
                           num_parallel_calls=tf.data.AUTOTUNE)
        if shard_examples:
            ds = ds.shard(process_count, process_index)
        ds = ds.shuffle(buffer or shuffle_buffer, seed=seed, reshuffle_each_iteration=True).repeat()

        def parse(raw, name):
            ex = tf.io.parse_single_example(raw, feature_spec)
            return ex[image_key], tf.cast(ex[label_key], tf.int32), name

        return ds.map(parse, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

    return StreamSource(
        description=f"tfrecord {pattern}: {num_images} images of {num_classes} classes in {len(files)} file(s)",
        num_images=num_images, num_classes=num_classes, dataset=dataset, crop=crop)


def tfds_source(spec: DataSpec, *, image_size: int = 0, shuffle_buffer: int = 10_000) -> StreamSource:
    """A prepared TFDS dataset: a catalog name (prepared under TFDS's data_dir, or downloaded and prepared now)
    or a directory (tfds.builder_from_directory). Features "image" (Image) and "label" (ClassLabel, int, or Text:
    mapped to ints through the sorted vocabulary of the split)."""
    import tensorflow_datasets as tfds

    name, split = spec.path, (spec.options[0] if spec.options else "") or "train"
    if os.path.isdir(name):
        builder = tfds.builder_from_directory(name)
    else:
        builder = tfds.builder(name)
        if not builder.is_prepared():
            log.info("%s: TFDS dataset %s is not prepared under %s; downloading and preparing it", spec, name,
                     builder.data_dir)
            try:
                builder.download_and_prepare()
            except Exception as e:  # no network, no manual files, ...: say what to do instead
                raise RuntimeError(
                    f"{spec}: TFDS dataset {name!r} is not prepared under {builder.data_dir} and preparing it failed "
                    f"({type(e).__name__}: {e}); run `tfds build {name}` where it can download, or pass a prepared "
                    "directory as tfds:DIR") from e
    features = builder.info.features
    if "image" not in features or "label" not in features:
        raise ValueError(f"{spec}: TFDS dataset needs 'image' and 'label' features, has {list(features.keys())}")
    try:
        num_images = int(builder.info.splits[split].num_examples)
    except (KeyError, ValueError) as e:
        raise ValueError(f"{spec}: no split {split!r} (splits: {list(builder.info.splits.keys())})") from e
    label_feature = features["label"]
    vocab = None
    if isinstance(label_feature, tfds.features.ClassLabel):
        num_classes = int(label_feature.num_classes)
    elif isinstance(label_feature, tfds.features.Text) or label_feature.dtype == tf.string:
        # Text labels (the catalog's lfw): one pass over the label column, images left undecoded.
        ds = builder.as_dataset(split=split, decoders={"image": tfds.decode.SkipDecoding()})
        vocab = sorted({v.decode("utf-8") for v in ds.map(lambda e: e["label"]).batch(4096).unbatch()
                        .as_numpy_iterator()})
        num_classes = len(vocab)
    else:
        ds = builder.as_dataset(split=split, decoders={"image": tfds.decode.SkipDecoding()})
        num_classes = int(ds.map(lambda e: tf.cast(e["label"], tf.int64)).reduce(tf.constant(-1, tf.int64),
                                                                                  tf.maximum)) + 1

    def dataset(seed: int, process_index: int, process_count: int, buffer: Optional[int] = None) -> tf.data.Dataset:
        mine = tfds.split_for_jax_process(split, process_index=process_index, process_count=process_count)
        read_config = tfds.ReadConfig(shuffle_seed=seed, shuffle_reshuffle_each_iteration=True, try_autocache=False,
                                      skip_prefetch=True, add_tfds_id=True)
        ds = builder.as_dataset(split=mine, shuffle_files=True, read_config=read_config,
                                decoders={"image": tfds.decode.SkipDecoding()})
        ds = ds.shuffle(buffer or shuffle_buffer, seed=seed, reshuffle_each_iteration=True).repeat()
        table = None
        if vocab is not None:
            table = tf.lookup.StaticHashTable(
                tf.lookup.KeyValueTensorInitializer(tf.constant(vocab), tf.range(len(vocab), dtype=tf.int32)), -1)

        def to_triple(e):
            label = table.lookup(e["label"]) if table is not None else tf.cast(e["label"], tf.int32)
            return e["image"], label, tf.strings.join([builder.info.name, " ", e["tfds_id"]])

        return ds.map(to_triple, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

    names = vocab if vocab is not None else (list(label_feature.names) if hasattr(label_feature, "names") else None)
    return StreamSource(
        description=f"tfds {builder.info.name} ({builder.data_dir}) split {split}: {num_images} images of "
                    f"{num_classes} classes", num_images=num_images, num_classes=num_classes, dataset=dataset,
        class_names=names)
