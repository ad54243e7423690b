"""The teacher-embedding cache: every training image embedded once by the teacher, image and mirror, on disk.

    cache = build_cache("runs/teacher_dlib", "lfw:../shared/data/lfw", "runs/cache_dlib_lfw")
    cache.embeddings        # float32 memory map [N, 2, E]: [i, 0] image i of the source, [i, 1] its mirror
    cache.centres()         # float32 [E, C]: per identity, the L2-normalised mean of its unit embeddings

Training with `config.teacher.cache=DIR` feeds [i, flipped_i] with each batch through the input pipeline
(data.pipeline, `teacher_embeddings`), so the teacher never runs and KD costs what the baseline costs. Each
image is embedded with the TEACHER's input size and crop (teacher.json's crop for the data kind, e.g. dlib's
(68, 77, 184, 193) on LFW), not the student's. Keys are the source's example indices (the order of
data.sources), so the cache belongs to one source and one teacher.

Layout of DIR (NumPy .npy files, memory-mapped, no pickle):
  header.json      format, version, teacher (workdir, model, sha256 fingerprint of its weights, input size,
                   crop), data (spec, num_images, num_classes, sha256 of the labels), embedding_size,
                   corrupt (indices that could not be decoded: zero rows), complete
  embeddings.npy   float32 [N, 2, E]
  labels.npy       int32 [N]
  done.npy         bool [N]: rows written so far (a stopped build resumes from them)
  centres.npy      float32 [E, C], written once when the cache is complete
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import math
import os
import time
import tokenize
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from facekd_jax import errors, paths
from facekd_jax.teachers.imported import write_json

log = logging.getLogger(__name__)

FORMAT, VERSION = "facekd_jax.teacher_cache", 1
HEADER, EMBEDDINGS, LABELS, DONE, CENTRES = "header.json", "embeddings.npy", "labels.npy", "done.npy", "centres.npy"


class CacheMismatchError(ValueError):
    """A cache made for another teacher or another dataset (the message says which field differs)."""


def _labels_digest(labels: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(labels, np.int32).tobytes()).hexdigest()


def weights_fingerprint(params: Any) -> str:
    """sha256 over a parameter tree's paths, shapes and float32 bytes: the same weights give the same string."""
    import jax

    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        a = np.ascontiguousarray(np.asarray(leaf, np.float32))
        h.update(jax.tree_util.keystr(path).encode())
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def data_identity(spec, source) -> Dict[str, Any]:
    """What makes a training source the same one: its spec (string or parsed) without a crop (the cache has its
    own), a local path absolute, the image count, the identity count and a digest of the labels in source order."""
    from facekd_jax.data import specs as specs_lib

    spec = specs_lib.parse(spec, specs_lib.TRAIN)
    return {"spec": specs_lib.canonical_path(spec), "num_images": int(source.num_images),
            "num_classes": int(source.num_classes), "labels_sha256": _labels_digest(source.labels)}


class TeacherCache:
    """An opened cache directory (see the module docstring). `embeddings` is a read-only memory map."""

    def __init__(self, directory: str, header: Dict[str, Any]):
        self.directory = directory
        self.header = header
        self.embeddings = np.load(os.path.join(directory, EMBEDDINGS), mmap_mode="r")
        n, e = header["data"]["num_images"], header["embedding_size"]
        if self.embeddings.shape != (n, 2, e) or self.embeddings.dtype != np.float32:
            raise ValueError(f"{directory}/{EMBEDDINGS}: shape {self.embeddings.shape} {self.embeddings.dtype}, "
                             f"header says float32 ({n}, 2, {e}); the cache is damaged: rebuild it")

    @property
    def embedding_size(self) -> int:
        return int(self.header["embedding_size"])

    def labels(self) -> np.ndarray:
        return np.load(os.path.join(self.directory, LABELS))

    def mean(self) -> np.ndarray:
        """float32 [E]: the mean of the teacher's unit embeddings over every image and mirror of the cache.

        A teacher whose embeddings share one direction (dlib's: the norm of this mean is 0.92 on LFW, so a constant
        output has cosine 0.92 to every target) teaches little through unit-vector losses until the mean is taken
        out: config.teacher.centre."""
        total = np.zeros(self.embedding_size, np.float64)
        for start in range(0, len(self.embeddings), _CHUNK):
            e = np.asarray(self.embeddings[start:start + _CHUNK], np.float64)
            total += (e / np.maximum(np.linalg.norm(e, axis=-1, keepdims=True), 1e-12)).sum(axis=(0, 1))
        return (total / (2 * len(self.embeddings))).astype(np.float32)

    def centres(self, mean: Optional[np.ndarray] = None) -> np.ndarray:
        """float32 [E, C]: class centres of the teacher, read from centres.npy (written when the cache completed);
        with `mean` (config.teacher.centre), recomputed from the unit embeddings minus `mean`."""
        if mean is not None:
            return class_centres(self.embeddings, self.labels(), int(self.header["data"]["num_classes"]),
                                 mean=mean)
        path = os.path.join(self.directory, CENTRES)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} missing: the cache is incomplete; run the cache command again to finish")
        return np.load(path)

    def check_matches(self, spec: str, source, *, teacher_workdir: str = "", teacher_model: str = "",
                      embedding_size: Optional[int] = None) -> None:
        """CacheMismatchError unless this cache was built, completely, for `source` (and the given teacher)."""
        where = f"config.teacher.cache={self.directory}"
        if not self.header.get("complete"):
            raise CacheMismatchError(f"{where} is incomplete; run `python -m facekd_jax.teachers cache` again to "
                                     "finish it")
        have, want = self.header["data"], data_identity(spec, source)
        for key in ("spec", "num_images", "num_classes", "labels_sha256"):
            if have[key] != want[key]:
                raise CacheMismatchError(f"{where} was built for another dataset: data.{key} is {have[key]!r} in "
                                         f"the cache, {want[key]!r} for --config.data.train={spec}; build a cache "
                                         "for this data")
        teacher = self.header["teacher"]
        if teacher_workdir and paths.canonical(teacher_workdir) != teacher["workdir"]:
            raise CacheMismatchError(f"{where} was built from teacher {teacher['workdir']}, the config's "
                                     f"teacher.workdir is {paths.canonical(teacher_workdir)}")
        if teacher_model and teacher_model != teacher["model"]:
            raise CacheMismatchError(f"{where} was built with teacher model {teacher['model']!r}, the config says "
                                     f"teacher.model={teacher_model!r}")
        if embedding_size is not None and int(embedding_size) != self.embedding_size:
            raise CacheMismatchError(f"{where} holds {self.embedding_size}-d teacher embeddings, the config says "
                                     f"teacher.embedding_size={embedding_size}: set it to {self.embedding_size}")


def open_cache(directory: str) -> TeacherCache:
    """Opens a cache (a URL: its local copy, facekd_jax.paths); FileNotFoundError / ValueError name the file and
    what is wrong."""
    directory = paths.local_copy(directory)
    path = os.path.join(directory, HEADER)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: {directory} is not a teacher-embedding cache (build one with "
                                "python -m facekd_jax.teachers cache --teacher=WORKDIR --data=SPEC --out=DIR)")
    try:
        with open(path) as f:
            header = json.load(f)
    except (OSError, ValueError, RecursionError) as e:  # RecursionError: JSON nested thousands deep
        raise ValueError(f"{path}: unreadable cache header ({e})") from e
    if not isinstance(header, dict) or header.get("format") != FORMAT or header.get("version") != VERSION:
        found = header if not isinstance(header, dict) else (header.get("format"), header.get("version"))
        raise ValueError(f"{path}: not a {FORMAT} version {VERSION} header (found {str(found)[:80]})")
    data = header.get("data") if isinstance(header.get("data"), dict) else {}
    n, c, e = data.get("num_images"), data.get("num_classes"), header.get("embedding_size")
    for key, value in (("data.num_images", n), ("data.num_classes", c), ("embedding_size", e)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{path}: {key} is {value!r}, expected an integer >= 0; the cache is damaged: rebuild it")
    for name, dtype, shape in ((EMBEDDINGS, np.float32, (n, 2, e)), (LABELS, np.int32, (n,)),
                               (CENTRES, np.float32, (e, c))):
        if name != CENTRES or os.path.isfile(os.path.join(directory, name)):
            _check_npy(os.path.join(directory, name), np.dtype(dtype), shape)
    return TeacherCache(directory, header)


def _check_npy(path: str, dtype: np.dtype, shape: Tuple[int, ...]) -> None:
    """ValueError naming the file unless its .npy header says `dtype` and `shape` and the file holds exactly that
    many bytes. Checked before NumPy maps or reads it: np.load allocates the shape a header declares (2**40 rows)
    before it finds the file short, and its own errors do not name the file."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(12)
    width = 2 if head[6:8] == b"\x01\x00" else 4  # the header length is 2 bytes in version 1.0, else 4
    if 8 + width + int.from_bytes(head[8:8 + width], "little") > size:  # NumPy reads it in one buffer (< 4 GiB)
        raise ValueError(f"{path}: a .npy header longer than the file ({size} bytes); the cache is damaged: rebuild it")
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                np.lib.format.read_array_header_2_0
            found_shape, _, found_dtype = read_header(f)
            start = f.tell()
    except (ValueError, SyntaxError, EOFError, tokenize.TokenError) as err:
        raise ValueError(f"{path}: not a readable .npy header ({type(err).__name__}: {err}); the cache is damaged: "
                         "rebuild it") from None
    if found_dtype != dtype or found_shape != shape or size != start + math.prod(shape) * dtype.itemsize:
        raise ValueError(f"{path}: {found_dtype} {found_shape} in {size} bytes (data from byte {start}), header.json "
                         f"says {dtype} {shape}; the cache is damaged: rebuild it")


_CHUNK = 65536  # rows per pass over a (memory-mapped) cache


def class_centres(embeddings: np.ndarray, labels: np.ndarray, num_classes: int,
                  valid: Optional[np.ndarray] = None, mean: Optional[np.ndarray] = None) -> np.ndarray:
    """float32 [E, C]: per identity, the L2-normalised mean of the L2-normalised embeddings (minus `mean`, when
    given) of its images and their mirrors. embeddings [N, 2, E] (read in chunks), labels int [N], valid bool [N]
    (rows to use; default all)."""
    labels = np.asarray(labels)
    keep = np.ones(len(labels), bool) if valid is None else np.asarray(valid, bool)
    sums = np.zeros((num_classes, embeddings.shape[-1]))
    for start in range(0, len(labels), _CHUNK):
        e = np.asarray(embeddings[start:start + _CHUNK], np.float64)
        unit = e / np.maximum(np.linalg.norm(e, axis=-1, keepdims=True), 1e-12)
        if mean is not None:
            unit = unit - np.asarray(mean, np.float64)
        rows = keep[start:start + _CHUNK]
        np.add.at(sums, labels[start:start + _CHUNK][rows], unit.sum(axis=1)[rows])
    centres = sums / np.maximum(np.linalg.norm(sums, axis=-1, keepdims=True), 1e-12)
    return centres.T.astype(np.float32)


def _crop_arg(crop: Optional[Sequence[int]]) -> Optional[Tuple[int, int, int, int]]:
    return None if crop is None else tuple(int(v) for v in crop)


def _reserve(path: str) -> None:
    """Allocates the whole of a memory-mapped file on disk now: a full disk is then an OSError (ENOSPC) here, not
    a SIGBUS when a page of the map is first written. File systems without fallocate keep the sparse file."""
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
            raise OSError(e.errno, e.strerror, path) from None
    finally:
        os.close(fd)


def _save_npy(path: str, array: np.ndarray) -> None:
    """np.save through a temporary file renamed into place: a full disk leaves no half-written array."""
    tmp = f"{path}.tmp-{os.getpid()}.npy"
    try:
        with errors.writing(path):
            np.save(tmp, array)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _open_or_create(out: str, header: Dict[str, Any], labels: np.ndarray):
    """(header, embeddings memmap [N, 2, E], done memmap [N]) of the cache in `out`: the existing one, after
    checking it was built for the same teacher and data, or new files, allocated in full on disk first (a full disk
    fails here, and the files this call made are removed, so a rerun after freeing space starts clean)."""
    head_path = os.path.join(out, HEADER)
    if os.path.isfile(head_path):
        existing = open_cache(out).header
        for key in ("teacher", "data", "crop", "embedding_size"):
            if existing[key] != header[key]:
                raise CacheMismatchError(f"{out} holds a cache for another {key} ({existing[key]!r}, now "
                                         f"{header[key]!r}); choose another --out (nothing was changed)")
        for name in (EMBEDDINGS, DONE):  # a cache begun by an older version may be sparse
            _reserve(os.path.join(out, name))
        return (existing, np.load(os.path.join(out, EMBEDDINGS), mmap_mode="r+"),
                np.load(os.path.join(out, DONE), mmap_mode="r+"))
    if os.listdir(out):
        raise FileExistsError(f"{out} exists and is not a teacher cache; choose another --out (nothing was changed)")
    n, e = int(header["data"]["num_images"]), int(header["embedding_size"])
    made = []
    try:
        for name, dtype, shape in ((EMBEDDINGS, np.float32, (n, 2, e)), (DONE, bool, (n,))):
            made.append(os.path.join(out, name))
            with errors.writing(made[-1]):
                np.lib.format.open_memmap(made[-1], mode="w+", dtype=dtype, shape=shape).flush()
            _reserve(made[-1])
        made.append(os.path.join(out, LABELS))
        _save_npy(made[-1], labels)
        made.append(head_path)
        write_json(head_path, header)
    except BaseException:
        for path in made:
            if os.path.exists(path):
                os.remove(path)
        raise
    return (header, np.load(os.path.join(out, EMBEDDINGS), mmap_mode="r+"),
            np.load(os.path.join(out, DONE), mmap_mode="r+"))


def _embed_rows(source, model, variables, todo: np.ndarray, emb, done, *, size: int, crop, batch_size: int,
                progress: bool, corrupt: List[int]) -> List[int]:
    """Embeds the images `todo` of `source` and their mirrors into emb[i] (rows flushed before done[i] is set, so a
    stopped build redoes at most one batch); returns `corrupt` with the indices that could not be decoded."""
    import jax
    import jax.numpy as jnp
    import tensorflow as tf
    from tqdm import tqdm

    from facekd_jax.data import images as images_lib

    def load(index):
        if source.render is not None:
            return source.render(index[None])[0], tf.constant(True)
        return images_lib.decode_image_tf(source.read(index), image_size=size, crop=crop, name=source.name(index))

    ds = tf.data.Dataset.from_tensor_slices(todo)
    ds = ds.map(lambda i: (i, *load(i)), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(batch_size).prefetch(2)

    @jax.jit
    def embed(variables, images):
        x = (images.astype(jnp.float32) - 127.5) / 127.5
        both = jnp.concatenate([x, jnp.flip(x, axis=2)])
        out = model.apply(variables, both, train=False).astype(jnp.float32)
        return jnp.stack([out[:images.shape[0]], out[images.shape[0]:]], axis=1)

    n = len(done)
    bar = tqdm(total=n, initial=n - len(todo), unit="img", desc="teacher cache", disable=not progress,
               mininterval=5.0)
    for index, images, ok in ds.as_numpy_iterator():
        count = len(index)
        if count < batch_size:  # pad the last batch: one compiled shape
            images = np.concatenate([images, np.zeros((batch_size - count,) + images.shape[1:], images.dtype)])
        rows = np.array(embed(variables, images))[:count]  # a writable copy
        rows[~ok] = 0.0  # never read: the pipeline replaces an undecodable image by the next one
        corrupt += [int(i) for i in index[~ok]]
        emb[index] = rows
        emb.flush()
        done[index] = True  # after the rows are on disk
        done.flush()
        bar.update(count)
    bar.close()
    return corrupt


def build_cache(teacher_workdir: str, spec: str, out: str, *, crop: Optional[Sequence[int]] = None,
                batch_size: int = 64, checkpoint: str = "latest", progress: bool = True) -> TeacherCache:
    """Embeds every image of the training source `spec` (and its mirror) with the teacher run in
    `teacher_workdir`, into the cache directory `out`; resumes an unfinished cache for the same teacher and data.

    crop: the box cut before resizing to the teacher's input; default the teacher's own crop for this data kind
    (teacher.json), else the spec's. Raises CacheMismatchError where `out` holds a cache for another teacher or data.
    """
    from facekd_jax import rundir
    from facekd_jax.data import sources as sources_lib
    from facekd_jax.data import specs as specs_lib
    from facekd_jax.teachers.imported import read_teacher_run

    if paths.is_url(out):
        raise ValueError(f"--out={out}: a cache is written to a local folder (memory-mapped); build it here and copy "
                         "it to the bucket (gsutil -m cp -r), a run reads a gs:// cache from a local copy")
    spec = specs_lib.parse(spec, specs_lib.TRAIN, field="--data")
    local = paths.local_copy(teacher_workdir)  # a URL: its local copy
    run = read_teacher_run(local)
    size = run.image_size
    source = sources_lib.open_source(spec, image_size=size)
    if not isinstance(source, sources_lib.IndexedSource):
        raise ValueError(f"--data={spec}: a teacher cache needs an indexed source (synthetic, folder, lfw, "
                         "recordio); a streaming source has no stable example index")
    crop = _crop_arg(crop) or run.crop_for(str(spec)) or source.crop
    restored = rundir.load_model(local, which=checkpoint, layers={})
    model, variables = restored.module, restored.variables

    n, e = source.num_images, run.embedding_size
    header = {"format": FORMAT, "version": VERSION,
              "teacher": {"workdir": paths.canonical(teacher_workdir), "model": run.model, "image_size": size,
                          "fingerprint": weights_fingerprint(variables["params"]), "checkpoint": checkpoint},
              "data": data_identity(spec, source), "source": source.description,
              "crop": list(crop) if crop else None, "embedding_size": e, "flips": ["image", "mirror"],
              "corrupt": [], "complete": False, "created": time.strftime("%Y-%m-%d %H:%M:%S")}
    os.makedirs(out, exist_ok=True)
    header, emb, done = _open_or_create(out, header, np.asarray(source.labels, np.int32))
    if header["complete"] and np.asarray(done).all():
        log.info("%s: complete already (%d images)", out, n)
        return open_cache(out)
    todo = np.flatnonzero(~np.asarray(done)).astype(np.int64)
    log.info("teacher cache %s: %d of %d images to embed with %s at %dx%d, crop %s", out, len(todo), n, run.model,
             size, size, crop)
    t0 = time.time()
    corrupt = list(header.get("corrupt", []))
    if len(todo):
        corrupt = _embed_rows(source, model, variables, todo, emb, done, size=size, crop=crop,
                              batch_size=batch_size, progress=progress, corrupt=corrupt)
    if corrupt:
        log.warning("teacher cache %s: %d images could not be decoded (zero rows): %s", out, len(corrupt),
                    corrupt[:10])
    valid = np.ones(n, bool)
    valid[corrupt] = False
    centres = class_centres(emb, np.asarray(source.labels), source.num_classes, valid)
    _save_npy(os.path.join(out, CENTRES), centres)
    header.update(corrupt=sorted(set(corrupt)), complete=True, embed_seconds=round(time.time() - t0, 1))
    write_json(os.path.join(out, HEADER), header)
    del emb, done
    log.info("teacher cache %s complete: %d images x 2 flips x %d dims, centres of %d identities", out, n, e,
             source.num_classes)
    cache = open_cache(out)
    common = float(np.linalg.norm(cache.mean()))
    if common > 0.5:
        log.warning("teacher cache %s: the teacher's unit embeddings share one direction (|mean| %.2f; a constant "
                    "has cosine %.2f to them): distil with --config.teacher.centre=True", out, common, common)
    return cache
