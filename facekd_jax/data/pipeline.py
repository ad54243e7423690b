"""The training input pipeline: spec -> an infinite, deterministic, resumable iterator of normalised batches.

Order (indexed sources: synthetic, folder, lfw, recordio). The stream of example positions 0, 1, 2, ... is
cut into global batches of G = batch_size * process_count; process p takes positions
[t*G + p*B, t*G + (p+1)*B) of global step t, so the processes' shares are disjoint and together make the
global batch. Position q is example `perm_e(q mod N)` of epoch e = q // N, where perm_e is a stateless
pseudo-random permutation of the N examples keyed on (seed, e) (tf.random.experimental.index_shuffle; no
table in memory, no Python in the loop). Everything about an example, its index and its horizontal flip, is
a function of (seed, position) alone, so `start_step=k` starts the position counter at k*G and yields
exactly the batches k, k+1, ... of an uninterrupted run, without reading or decoding the skipped ones.

Corrupt images (indexed sources). A file that cannot be decoded is logged by name, counted
(images.CORRUPT, see `corrupt_skipped()`), and replaced by the next example in index order that decodes
(index+1, index+2, ... mod N, at most MAX_REPLACEMENTS tries), with that example's label. A file whose header
TensorFlow's fast decoders accept but whose body they cannot decode (a JPEG with a corrupt body, a truncated PNG)
fails the pipeline instead; `Batches` then finds it among the next batches' images, names it once and restarts
the pipeline at the same step with it marked as corrupt. The replacement
depends only on the index, so batches keep their size and exact resume still holds. (Only when
MAX_REPLACEMENTS consecutive images are all corrupt is the example dropped, which shifts later batches.)

Small indexed sources (at most DECODE_ONCE_MAX_BYTES of decoded pixels, e.g. LFW's 9,525 images at 48x48:
65 MB) are decoded once per process into memory, and every later batch (of this run and of later runs in the same
process, as the suite's) is a gather from that array: the same pixels, the same replacement of corrupt images,
the same batches, without JPEG decoding competing with the train step for the host's cores on every step.

Streaming sources (tfrecord, tfds) are read in a seeded order: files shuffled per epoch, a seeded shuffle
buffer, per-process file shards (tfds.split_for_jax_process for TFDS). `start_step=k` skips k*B records of
that deterministic order before any decoding. A corrupt record there is dropped and named once (one whose image
TensorFlow's decoder fails on is found as above and the stream restarted without it), so after one the positions
of later batches shift by one image; resume is exact as long as no corrupt record lies among the skipped.

tf.data options follow big_vision: a private thread pool, one thread per op, no injected prefetch (it
eats RAM); deterministic parallel maps; prefetch(2). TensorFlow is hidden from the GPUs here, so it never
takes accelerator memory from JAX.
"""
from __future__ import annotations

import atexit
import collections
import logging
import math
import time
import weakref
from typing import Any, Dict, Optional, Tuple

import numpy as np
import tensorflow as tf

# TensorFlow only feeds the host; the accelerators belong to JAX.
try:
    tf.config.set_visible_devices([], "GPU")
except RuntimeError:  # TF already initialised its devices (someone used it first): nothing left to do
    pass

from facekd_jax.data import images as images_lib  # noqa: E402
from facekd_jax.data import sources as sources_lib  # noqa: E402
from facekd_jax.data import specs as specs_lib  # noqa: E402

log = logging.getLogger(__name__)

MAX_REPLACEMENTS = 32
THREADPOOL_SIZE = 48
PREFETCH_BATCHES = 2
DEFAULT_SHUFFLE_BUFFER = 10_000
DECODE_ONCE_MAX_BYTES = 1 << 30  # decoded pixels of an indexed source kept in memory (see the module docstring)
_DECODED_KEPT = 2  # decoded sources kept per process (the suite alternates between two training sets)
_FLIP_SALT = 0x5EED_F11B


class Batches:
    """Iterator of numpy batch dicts over a tf.data pipeline; `dataset` is the tf.data.Dataset behind it.

    close() (also run for every live one at interpreter exit) drops the TensorFlow iterator. Why: a
    pipeline whose maps call Python (tf.numpy_function: Pillow for PGM or corrupt files, RecordIO reads)
    deadlocks if its iterator is still alive when Python shuts down, with worker threads waiting for a GIL
    that will never be released again.
    """

    def __init__(self, dataset: tf.data.Dataset, *, rebuild=None, find_undecodable=None, start_step: int = 0):
        self.dataset = dataset
        self._it = dataset.as_numpy_iterator()
        self._rebuild, self._find = rebuild, find_undecodable
        self.step = start_step             # the step of the next batch
        self.skipped: set = set()          # example indices that TensorFlow's decoders failed on
        _LIVE.add(self)

    def __iter__(self) -> "Batches":
        return self

    def __next__(self) -> Dict[str, np.ndarray]:
        while True:
            if self._it is None:
                raise StopIteration
            try:
                batch = next(self._it)
            except tf.errors.OpError as e:
                self._recover(e)
                continue
            self.step += 1
            return batch

    def _recover(self, error: tf.errors.OpError) -> None:
        """An image TensorFlow's fast decoders accepted the header of but could not decode (a JPEG with a corrupt
        body, a truncated PNG) stopped the pipeline: find it among the images of the next few batches, log and
        count it once, and restart the pipeline at this step with it skipped like any corrupt image (replaced by
        the next example in index order, so batches and exact resume are unchanged)."""
        bad = self._find(self.step) if self._find is not None else {}
        bad = {i: name for i, name in bad.items() if i not in self.skipped}
        if not bad:
            raise RuntimeError(f"the input pipeline failed at step {self.step} and no undecodable image was found "
                               f"among the next batches' images: {type(error).__name__}: "
                               f"{str(error).splitlines()[0][:300]}") from error
        for index, name in sorted(bad.items()):
            images_lib.CORRUPT.add(name)
            log.warning("skipping corrupt image (%d so far): %s: TensorFlow's decoder failed on its bytes (example "
                        "%s; skipped from now on, not named again)", images_lib.CORRUPT.count, name, index)
        self.skipped.update(bad)
        self._it = None
        self.dataset = self._rebuild(self.step, frozenset(self.skipped))
        self._it = self.dataset.as_numpy_iterator()

    def close(self) -> None:
        self._it = None


_LIVE: "weakref.WeakSet[Batches]" = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    for batches in list(_LIVE):
        batches.close()
    import gc
    gc.collect()


def corrupt_skipped() -> int:
    """How many times a corrupt image has been skipped in this process (names: images.CORRUPT.names)."""
    return images_lib.CORRUPT.count


def dataset_options() -> tf.data.Options:
    """tf.data options as big_vision sets them, plus determinism."""
    options = tf.data.Options()
    options.threading.private_threadpool_size = THREADPOOL_SIZE
    options.threading.max_intra_op_parallelism = 1
    # Stop the magic that eats all RAM on big hosts.
    options.experimental_optimization.inject_prefetch = False
    options.deterministic = True
    return options


def _process(process_index: Optional[int], process_count: Optional[int]) -> Tuple[int, int]:
    if process_index is None or process_count is None:
        import jax
        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} must be in [0, process_count={process_count})")
    return int(process_index), int(process_count)


def _coin_flips(seed: int, positions: tf.Tensor) -> tf.Tensor:
    """int64 [B] stream positions -> bool [B]: a fair coin per position, a function of (seed, position) only."""
    lo = positions % (1 << 31)
    seeds = tf.stack([tf.fill(tf.shape(positions), tf.constant(seed, tf.int64)), positions // (1 << 31),
                      tf.fill(tf.shape(positions), tf.constant(_FLIP_SALT, tf.int64))], axis=1)
    shuffled = tf.raw_ops.RandomIndexShuffle(index=lo, seed=seeds, max_index=tf.constant((1 << 31) - 1, tf.int64))
    return tf.equal(shuffled % 2, 1)


def _example_indices(seed: int, positions: tf.Tensor, n: int) -> tf.Tensor:
    """int64 [B] positions -> int64 [B] example indices: perm_epoch(position mod n), epoch = position // n."""
    epoch, offset = positions // n, positions % n
    seeds = tf.stack([tf.fill(tf.shape(positions), tf.constant(seed, tf.int64)), epoch,
                      tf.zeros_like(epoch)], axis=1)
    return tf.raw_ops.RandomIndexShuffle(index=offset, seed=seeds, max_index=tf.constant(n - 1, tf.int64))


def _teacher_gather(embeddings: np.ndarray, augment: bool):
    """(index int64 [B], flip bool [B]) -> float32 [B, E]: the cached teacher embedding of each example as the
    student sees it (its mirror's where the image was flipped). Reads only those rows of the memory map."""
    size = int(embeddings.shape[-1])

    def gather(index, flips):
        column = flips.astype(np.int64) if augment else np.zeros_like(index)
        return np.asarray(embeddings[index, column], np.float32)

    def lookup(index: tf.Tensor, flips: tf.Tensor) -> tf.Tensor:
        out = tf.numpy_function(gather, [index, flips], tf.float32, stateful=False)
        return tf.ensure_shape(out, [None, size])
    return lookup


def _finish(images: tf.Tensor, labels: tf.Tensor, flips: tf.Tensor, augment: bool, index: Optional[tf.Tensor] = None,
            teacher=None) -> Dict[str, tf.Tensor]:
    """uint8 [B, S, S, 3], int32 [B], bool [B] -> {"image": float32 (x - 127.5) / 127.5, "label": int32}, plus
    "teacher_embedding" float32 [B, E] = teacher(index, flips) where a teacher lookup is given."""
    if augment:
        # Reverse only the flipped half and stitch the batch back: ~6x cheaper than a broadcast tf.where.
        which = tf.cast(flips, tf.int32)
        keep, flip = tf.dynamic_partition(images, which, 2)
        slots = tf.dynamic_partition(tf.range(tf.shape(images)[0]), which, 2)
        images = tf.dynamic_stitch(slots, [keep, tf.reverse(flip, axis=[2])])
    images = (tf.cast(images, tf.float32) - 127.5) / 127.5
    out = {"image": images, "label": labels}
    if teacher is not None:
        out["teacher_embedding"] = teacher(index, flips)
    return out


def _decode_with_replacement(src: sources_lib.IndexedSource, index: tf.Tensor, encoded: tf.Tensor,
                             image_size: int, labels_t: tf.Tensor, skip_t: Optional[tf.Tensor] = None):
    """Decode example `index`; if corrupt (or marked in `skip_t`, bool [N]), try index+1, index+2, ... (mod N).
    -> (uint8 [S,S,3], label, ok, the index of the example decoded)."""
    n = src.num_images

    def attempt(j, data):
        def decode():
            return images_lib.decode_image_tf(data, image_size=image_size, crop=src.crop, name=src.name(j))
        if skip_t is None:
            return decode()
        return tf.cond(tf.gather(skip_t, j),
                       lambda: (tf.zeros((image_size, image_size, 3), tf.uint8), tf.constant(False)), decode)

    image, ok = attempt(index, encoded)

    def cond(tries, j, image, ok):
        return tf.logical_and(tf.logical_not(ok), tries < MAX_REPLACEMENTS)

    def body(tries, j, image, ok):
        j = (index + tries + 1) % n
        image, ok = attempt(j, src.read(j))
        return tries + 1, j, image, ok

    _, j, image, ok = tf.while_loop(cond, body, (tf.constant(0, tf.int64), index, image, ok))
    return image, tf.gather(labels_t, j), ok, j


def _step_indices(src: sources_lib.IndexedSource, step: int, *, batch_size: int, seed: int, process_index: int,
                  process_count: int) -> np.ndarray:
    """The example indices of this process's share of global batch `step` (before any replacement)."""
    positions = step * batch_size * process_count + process_index * batch_size + np.arange(batch_size)
    return _example_indices(seed, tf.constant(positions, tf.int64), src.num_images).numpy()


def _decode_eagerly(src: sources_lib.IndexedSource, index: int, *, image_size: int):
    """Example `index` read and decoded eagerly -> (uint8 [S, S, 3] tensor, ok). A failing read raises (a broken
    record file is not one image's fault); so does TensorFlow's decoder where it rejects the bytes
    (tf.errors.OpError: the caller names the image, `_name`)."""
    i_t = tf.constant(index, tf.int64)
    encoded = src.read(tf.reshape(i_t, (1,)))[0] if src.read_batched else src.read(i_t)
    return images_lib.decode_image_tf(encoded, image_size=image_size, crop=src.crop, name=src.name(i_t))


def find_undecodable_records(records: tf.data.Dataset, *, crop, image_size: int) -> Dict[str, str]:
    """{name: name} of the (encoded, label, name) records of a stream whose bytes TensorFlow's decoders reject,
    found by decoding each eagerly."""
    bad: Dict[str, str] = {}
    for encoded, _, name in records.as_numpy_iterator():
        name = bytes(name).decode("utf-8", "replace")
        try:
            images_lib.decode_image_tf(tf.constant(encoded), image_size=image_size, crop=crop, name=name)
        except tf.errors.OpError:
            bad[name] = name
    return bad


def _name(src: sources_lib.IndexedSource, index: int) -> str:
    return bytes(src.name(tf.constant(index, tf.int64)).numpy()).decode("utf-8", "replace")


def find_undecodable(src: sources_lib.IndexedSource, indices, *, image_size: int) -> Dict[int, str]:
    """{index: name} of the examples among `indices` (and the replacements the pipeline would try after them)
    whose bytes TensorFlow's decoders reject, found by decoding each eagerly."""
    bad: Dict[int, str] = {}
    for index in sorted({int(i) for i in indices}):
        for j in ((index + k) % src.num_images for k in range(MAX_REPLACEMENTS)):
            if j in bad:
                continue
            try:
                _, ok = _decode_eagerly(src, j, image_size=image_size)
            except tf.errors.OpError:
                bad[j] = _name(src, j)
                continue
            if bool(ok):
                break  # the pipeline uses this one; later replacements are never read
    return bad


def _steps(n: int, *, batch_size: int, seed: int, start_step: int, process_index: int,
           process_count: int) -> tf.data.Dataset:
    """Steps start_step, start_step + 1, ... -> (example indices int64 [B], flips bool [B]) of this process's share
    of each global batch (the module docstring's order)."""
    global_batch = batch_size * process_count
    offsets = tf.range(batch_size, dtype=tf.int64) + process_index * batch_size

    def step_positions(step):
        positions = step * global_batch + offsets
        return _example_indices(seed, positions, n), _coin_flips(seed, positions)

    return tf.data.Dataset.range(start_step, np.iinfo(np.int64).max // max(global_batch, 1)).map(step_positions)


def _indexed_dataset(src: sources_lib.IndexedSource, *, batch_size: int, image_size: int, seed: int,
                     start_step: int, augment: bool, process_index: int, process_count: int,
                     teacher=None, skip: frozenset = frozenset()) -> tf.data.Dataset:
    n = src.num_images
    skip_t = None
    if skip:
        mask = np.zeros(n, bool)
        mask[sorted(skip)] = True
        skip_t = tf.constant(mask)
    labels_t = tf.constant(src.labels, tf.int32)
    ds = _steps(n, batch_size=batch_size, seed=seed, start_step=start_step, process_index=process_index,
                process_count=process_count)
    if src.render is not None:
        ds = ds.map(lambda idx, flip: _finish(src.render(idx), tf.gather(labels_t, idx), flip, augment, idx, teacher),
                    num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        return ds

    if src.read_batched:  # one Python call per batch; per-example decoding then runs in parallel
        ds = ds.map(lambda idx, flip: (idx, flip, src.read(idx)))
    else:
        ds = ds.map(lambda idx, flip: (idx, flip, tf.fill(tf.shape(idx), "")))
    ds = ds.unbatch()

    def load(index, flip, encoded):
        if not src.read_batched:
            encoded = src.read(index)
        image, label, ok, used = _decode_with_replacement(src, index, encoded, image_size, labels_t, skip_t)
        return image, label, flip, ok, used

    ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.filter(lambda image, label, flip, ok, used: ok)  # only after MAX_REPLACEMENTS corrupt images in a row
    ds = ds.batch(batch_size, drop_remainder=True)
    return ds.map(lambda images, labels, flips, ok, used: _finish(images, labels, flips, augment, used, teacher),
                  num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


_DECODED: "collections.OrderedDict[tuple, Optional[Tuple[np.ndarray, np.ndarray]]]" = collections.OrderedDict()


def decode_once(src: sources_lib.IndexedSource, *, spec: specs_lib.DataSpec,
                image_size: int) -> Optional[Tuple[np.ndarray, np.ndarray]]:
    """Every example of `src` decoded once (cached per process on spec, size, crop and count): (images uint8
    [N, S, S, 3], used int64 [N]), where used[i] is the example the pipeline takes for example i: i itself, or for
    a corrupt image the next example in index order that decodes (as `_decode_with_replacement`). Each corrupt
    image is logged by name and counted once. None where some example has no replacement within MAX_REPLACEMENTS
    (the decoding pipeline then drops it, which this array cannot express)."""
    key = (spec, int(image_size), src.crop, src.num_images)
    if key in _DECODED:
        _DECODED.move_to_end(key)
        return _DECODED[key]
    start = time.time()
    n = src.num_images
    ds = tf.data.Dataset.range(n)
    if src.read_batched:
        ds = ds.batch(256).map(lambda idx: (idx, src.read(idx))).unbatch()
    else:
        ds = ds.map(lambda i: (i, src.read(i)), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

    def load(i, encoded):
        image, ok = images_lib.decode_image_tf(encoded, image_size=image_size, crop=src.crop, name=src.name(i))
        return i, image, ok

    # An image TensorFlow's decoders fail on (a corrupt JPEG body, a truncated PNG) is dropped here and found below.
    ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).ignore_errors().batch(256)
    images = np.zeros((n, image_size, image_size, 3), np.uint8)
    ok = np.zeros(n, bool)
    seen = np.zeros(n, bool)
    for index, image, good in ds.prefetch(2).with_options(dataset_options()).as_numpy_iterator():
        images[index], ok[index], seen[index] = image, good, True
    for index in np.flatnonzero(~seen):  # each one decoded alone, to name it (or keep it, had it been transient)
        try:
            image, good = _decode_eagerly(src, int(index), image_size=image_size)
            images[index], ok[index] = image.numpy(), bool(good)
        except tf.errors.OpError as e:
            name = _name(src, int(index))
            images_lib.CORRUPT.add(name)
            log.warning("skipping corrupt image (%d so far): %s: TensorFlow's decoder failed on its bytes (example "
                        "%d): %s", images_lib.CORRUPT.count, name, index, str(e).splitlines()[0][:200])
    used = np.arange(n, dtype=np.int64)
    result: Optional[Tuple[np.ndarray, np.ndarray]] = (images, used)
    for index in np.flatnonzero(~ok):
        for k in range(1, MAX_REPLACEMENTS + 1):
            if ok[(index + k) % n]:
                used[index] = (index + k) % n
                break
        else:
            result = None
            log.warning("training data: %d corrupt images in a row from example %d; decoding on every step instead "
                        "of once", MAX_REPLACEMENTS + 1, index)
            break
    if result is not None:
        log.info("training data decoded once into memory: %d images at %dx%d (%.0f MB, %d corrupt) in %.1f s", n,
                 image_size, image_size, images.nbytes / 2**20, int((~ok).sum()), time.time() - start)
    _DECODED[key] = result
    while len(_DECODED) > _DECODED_KEPT:
        _DECODED.popitem(last=False)
    return result


def _decoded_dataset(decoded: Tuple[np.ndarray, np.ndarray], labels: np.ndarray, *, batch_size: int, seed: int,
                     start_step: int, augment: bool, process_index: int, process_count: int,
                     teacher=None) -> tf.data.Dataset:
    """The batches of `_indexed_dataset`, gathered from `decode_once`'s arrays instead of decoded."""
    images, used = decoded
    shape = (batch_size,) + images.shape[1:]
    used_t, labels_t = tf.constant(used), tf.constant(labels, tf.int32)

    def gather(index):
        return images[index]

    def batch(index, flips):
        index = tf.gather(used_t, index)  # a corrupt image's replacement, as _decode_with_replacement picks it
        pixels = tf.ensure_shape(tf.numpy_function(gather, [index], tf.uint8, stateful=False), shape)
        return _finish(pixels, tf.gather(labels_t, index), flips, augment, index, teacher)

    return _steps(len(used), batch_size=batch_size, seed=seed, start_step=start_step, process_index=process_index,
                  process_count=process_count).map(batch, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def _stream_dataset(src: sources_lib.StreamSource, *, batch_size: int, image_size: int, seed: int,
                    start_step: int, augment: bool, process_index: int, process_count: int,
                    shuffle_buffer: Optional[int], skip: frozenset = frozenset()) -> tf.data.Dataset:
    """The batches of a stream from `start_step`; records named in `skip` (their images TensorFlow's decoder
    failed on, `find_undecodable_records`) are dropped before decoding."""
    ds = src.dataset(seed, process_index, process_count, shuffle_buffer or DEFAULT_SHUFFLE_BUFFER)
    ds = ds.skip(start_step * batch_size)  # before decoding: resuming costs reading, not decoding
    if skip:
        names = tf.constant(sorted(skip))
        ds = ds.filter(lambda encoded, label, name: tf.logical_not(tf.reduce_any(tf.equal(name, names))))
    ds = ds.enumerate(start=start_step * batch_size)

    def load(position, example):
        encoded, label, name = example
        image, ok = images_lib.decode_image_tf(encoded, image_size=image_size, crop=src.crop, name=name)
        return image, label, position, ok

    ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.filter(lambda image, label, position, ok: ok)
    ds = ds.batch(batch_size, drop_remainder=True)
    return ds.map(lambda images, labels, positions, ok: _finish(images, labels, _coin_flips(seed, positions),
                                                                augment),
                  num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def _stream_batches(src: sources_lib.StreamSource, *, shuffle_buffer: Optional[int], **kwargs) -> Batches:
    """A stream's Batches, which find, name and drop a record TensorFlow's decoder fails on, then go on."""
    batch_size, start_step = kwargs["batch_size"], kwargs["start_step"]

    def build(start: int, skip: frozenset) -> tf.data.Dataset:
        ds = _stream_dataset(src, shuffle_buffer=shuffle_buffer, skip=skip, **dict(kwargs, start_step=start))
        return ds.prefetch(PREFETCH_BATCHES).with_options(dataset_options())

    def find(step: int) -> Dict[str, str]:  # the records of this batch and those prefetched behind it
        ds = src.dataset(kwargs["seed"], kwargs["process_index"], kwargs["process_count"],
                         shuffle_buffer or DEFAULT_SHUFFLE_BUFFER)
        return find_undecodable_records(ds.skip(step * batch_size).take(batch_size * (PREFETCH_BATCHES + 3)),
                                        crop=src.crop, image_size=kwargs["image_size"])

    return Batches(build(start_step, frozenset()), rebuild=build, find_undecodable=find, start_step=start_step)


def make_train_dataset(spec: "str | specs_lib.DataSpec", *, batch_size: int, image_size: int = 112, seed: int = 0, start_step: int = 0,
                       augment: bool = True, process_index: Optional[int] = None,
                       process_count: Optional[int] = None, shuffle_buffer: Optional[int] = None,
                       teacher_embeddings: Optional[np.ndarray] = None,
                       decode_once_max_bytes: int = DECODE_ONCE_MAX_BYTES) -> Tuple[Batches, Dict[str, Any]]:
    """Training batches for this process.

    spec: a training spec, string or parsed (facekd_jax.data.specs: synthetic | folder: | lfw: | recordio: | ...).
    batch_size: images per batch for THIS process (global batch // process_count).
    start_step: yield what an uninterrupted iterator yields from its (start_step+1)-th batch on.
    process_index / process_count: default jax.process_index() / jax.process_count().
    shuffle_buffer: examples in the shuffle buffer of streaming sources (tfrecord, tfds); indexed sources
      shuffle globally and ignore it.
    teacher_embeddings: float [N, 2, E] indexed by example, [:, 0] of the image and [:, 1] of its mirror (a
      teacher-embedding cache, facekd_jax.teachers.cache; a memory map is read row by row): each batch then also
      has "teacher_embedding" float32 [B, E], the one matching the flip the image got. Indexed sources only.
    decode_once_max_bytes: an indexed source whose decoded pixels take at most this many bytes is decoded once
      per process and kept in memory (`decode_once`); the batches are the same either way. 0: decode every step.
    Returns (batches, info): batches an infinite iterator (`Batches`; `.dataset` is the tf.data.Dataset) of
    {"image": float32 [B, S, S, 3] in (x - 127.5) / 127.5, "label": int32 [B]} numpy dicts, deterministic in
    (spec, seed, batch_size, process index and count); info a JSON-friendly dict: num_classes, num_images,
    source (description), synthetic (bool), spec, image_size, batch_size, global_batch_size, steps_per_epoch,
    process_index, process_count. Corrupt images skipped so far: corrupt_skipped().
    """
    if batch_size < 1 or image_size < 1 or start_step < 0:
        raise ValueError(f"make_train_dataset({spec!r}): need batch_size >= 1, image_size >= 1, start_step >= 0; "
                         f"got {batch_size}, {image_size}, {start_step}")
    process_index, process_count = _process(process_index, process_count)
    spec = specs_lib.parse(spec, specs_lib.TRAIN)
    src = sources_lib.open_source(spec, image_size=image_size)
    if src.synthetic:
        log.warning("training data is SYNTHETIC: %s", src.description)
    else:
        log.info("training data: %s", src.description)
    kwargs = dict(batch_size=batch_size, image_size=image_size, seed=seed, start_step=start_step, augment=augment,
                  process_index=process_index, process_count=process_count)
    if isinstance(src, sources_lib.IndexedSource):
        teacher = None
        if teacher_embeddings is not None:
            if teacher_embeddings.ndim != 3 or teacher_embeddings.shape[:2] != (src.num_images, 2):
                raise ValueError(f"make_train_dataset({spec!r}): teacher embeddings of shape "
                                 f"{tuple(teacher_embeddings.shape)} for {src.num_images} examples; expected "
                                 f"({src.num_images}, 2, E)")
            teacher = _teacher_gather(teacher_embeddings, augment)
        decoded = None
        if src.render is None and src.num_images * image_size * image_size * 3 <= decode_once_max_bytes:
            decoded = decode_once(src, spec=spec, image_size=image_size)
        if decoded is not None:
            ds = _decoded_dataset(decoded, src.labels, teacher=teacher, **{k: v for k, v in kwargs.items()
                                                                          if k != "image_size"})
            batches = Batches(ds.prefetch(PREFETCH_BATCHES).with_options(dataset_options()), start_step=start_step)
        else:
            def build(start: int, skip: frozenset) -> tf.data.Dataset:
                ds = _indexed_dataset(src, teacher=teacher, skip=skip, **dict(kwargs, start_step=start))
                return ds.prefetch(PREFETCH_BATCHES).with_options(dataset_options())

            def find(step: int) -> Dict[int, str]:  # this batch and those prefetched behind it
                window = [_step_indices(src, t, batch_size=batch_size, seed=seed, process_index=process_index,
                                        process_count=process_count)
                          for t in range(step, step + PREFETCH_BATCHES + 3)]
                return find_undecodable(src, np.concatenate(window), image_size=image_size)

            batches = Batches(build(start_step, frozenset()), rebuild=build, find_undecodable=find,
                              start_step=start_step)
    else:
        if teacher_embeddings is not None:
            raise ValueError(f"make_train_dataset({spec!r}): cached teacher embeddings need an indexed source "
                             "(synthetic, folder, lfw, recordio); a streaming source has no stable example index")
        batches = _stream_batches(src, shuffle_buffer=shuffle_buffer, **kwargs)
    global_batch = batch_size * process_count
    info = dict(num_classes=int(src.num_classes), num_images=int(src.num_images), source=src.description,
                synthetic=bool(src.synthetic), spec=str(spec), image_size=int(image_size), batch_size=int(batch_size),
                global_batch_size=global_batch, steps_per_epoch=max(1, math.floor(src.num_images / global_batch)),
                process_index=process_index, process_count=process_count)
    return batches, info
