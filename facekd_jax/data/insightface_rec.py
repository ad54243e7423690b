"""insightface's RecordIO dataset layout (train.rec, train.idx, property) on the framing of recordio.py.

Record 0 has flag > 0 and label (first key after the images, end key); images are keys 1 .. label[0] - 1;
identity records (flag 2, label (first image key, end image key)) follow. Files without that header (record 0 is
an image) are read as "every record is an image". `property` holds "num_classes,H,W". `read_insightface` indexes
a dataset without reading its images (vectorised over a memory map); `write_insightface` writes one.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
from typing import Callable, Iterator, Optional, Sequence, Tuple

import numpy as np

from facekd_jax.data.recordio import (_FRAME, _LENGTH_MASK, _MAX_FLAG, IR_SIZE, MAGIC, IRHeader, RecordIOError,
                                      RecordIOWriter, _open_map, _read_record_at, _scan_offsets, frame_record,
                                      pack_record, read_idx, unpack_record)

log = logging.getLogger(__name__)


@dataclasses.dataclass
class InsightfaceIndex:
    """Where every image of an insightface-style RecordIO dataset lies, without reading the images.

    rec_path: the .rec file.
    keys int64 [N]: record key of each image; labels int32 [N] in [0, num_classes).
    record_offsets int64 [N]: byte offset of each image's record (its magic word) in the .rec.
    image_offsets int64 [N]: byte offset of the ENCODED IMAGE in the .rec (after the 8-byte framing, the 24-byte
      IRHeader and 4*flag bytes of extra labels): `rec[image_offsets[i] : image_offsets[i] + image_lengths[i]]`
      is the JPEG, for every i with contiguous[i]. -1 where contiguous[i] is False.
    image_lengths int64 [N]: length of each encoded image in bytes.
    contiguous bool [N]: False for the (rare) records MXNet split in parts because the bytes held its magic
      word: their image is not one slice of the file; read those with `read_image(i)` (the slow path).
    num_classes: from `property`, else the insightface identity header, else max(label) + 1.
    image_size: int H from `property` ("num_classes,H,W"), or None without a property file.
    has_header: whether record 0 was the insightface identity header.
    """
    rec_path: str
    image_offsets: np.ndarray
    image_lengths: np.ndarray
    labels: np.ndarray
    keys: np.ndarray
    num_classes: int
    image_size: Optional[int]
    record_offsets: np.ndarray = None
    contiguous: np.ndarray = None
    has_header: bool = False
    _buf: Optional[np.ndarray] = dataclasses.field(default=None, init=False, repr=False, compare=False)

    @property
    def num_images(self) -> int:
        return int(self.labels.shape[0])

    def __len__(self) -> int:
        return self.num_images

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_buf"] = None  # re-mapped lazily after unpickling; never pickle the file contents
        return state

    def _map(self) -> np.ndarray:
        if self._buf is None:
            self._buf = _open_map(self.rec_path)
        return self._buf

    def read_image(self, i: int) -> bytes:
        """Encoded image bytes of image i (fast slice when contiguous, else join the record's parts)."""
        buf = self._map()
        if self.contiguous is None or self.contiguous[i]:
            o = int(self.image_offsets[i])
            return buf[o:o + int(self.image_lengths[i])].tobytes()
        payload, _ = _read_record_at(buf, int(self.record_offsets[i]), rec_path=self.rec_path,
                                     key=int(self.keys[i]))
        return unpack_record(payload, name=f"{self.rec_path} record {int(self.keys[i])}")[1]


def read_property(path: str) -> Tuple[int, int, int]:
    """insightface `property` file ("num_classes,H,W") -> (num_classes, H, W); errors name the file."""
    with open(path, "rb") as f:
        text = f.read().decode("utf-8", "replace").strip()  # undecodable bytes show up in the error below
    try:
        values = [int(float(v)) for v in text.replace(" ", "").split(",")]
    except (ValueError, OverflowError):  # OverflowError: "inf"
        values = []
    if len(values) != 3 or values[0] <= 0:
        raise RecordIOError(f"{path}: expected 'num_classes,height,width', got {text[:80]!r}")
    return values[0], values[1], values[2]


def _looks_like_image(data: bytes) -> bool:
    return data[:2] == b"\xff\xd8" or data[:8] == b"\x89PNG\r\n\x1a\n" or data[:2] == b"BM" or data[:1] == b"P"


def _resolve_paths(path: str) -> Tuple[str, Optional[str], Optional[str]]:
    """Dataset dir (train.rec inside) or a .rec file -> (rec, idx or None, property or None)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        rec = os.path.join(path, "train.rec")
        if not os.path.isfile(rec):
            recs = sorted(f for f in os.listdir(path) if f.endswith(".rec"))
            if len(recs) != 1:
                raise FileNotFoundError(f"no train.rec in {path}" + (f" (found {recs}; pass the .rec file)"
                                                                      if recs else ""))
            rec = os.path.join(path, recs[0])
    elif os.path.isfile(path):
        rec = path
    else:
        raise FileNotFoundError(f"RecordIO dataset not found: {path} (expected a directory with train.rec, "
                                "train.idx, property, or a .rec file)")
    idx = os.path.splitext(rec)[0] + ".idx"
    prop = os.path.join(os.path.dirname(rec), "property")
    return rec, (idx if os.path.isfile(idx) else None), (prop if os.path.isfile(prop) else None)


def _gather(buf: np.ndarray, offsets: np.ndarray, width: int) -> np.ndarray:
    """Bytes [offsets[i], offsets[i] + width) of the file for every i (clipped at EOF) -> uint8 [N, width]."""
    out = np.empty((offsets.shape[0], width), np.uint8)
    cols = np.arange(width, dtype=np.int64)[None, :]
    step = 1 << 16  # rows per chunk: bounds the temporary index array to ~20 MB
    for s in range(0, offsets.shape[0], step):
        idx = offsets[s:s + step, None] + cols
        np.minimum(idx, max(buf.shape[0] - 1, 0), out=idx)
        out[s:s + step] = buf[idx]
    return out


def _record_offsets(buf: np.ndarray, rec_path: str, idx_path: Optional[str]) -> Tuple[np.ndarray, np.ndarray, str]:
    """(keys, byte offsets, the file they came from): the .idx's, checked against the .rec's size, or a scan."""
    size = int(buf.shape[0])
    if idx_path is None:
        log.info("%s: no .idx beside it; scanning the file once", rec_path)
        offsets = _scan_offsets(buf, rec_path)
        return np.arange(offsets.size, dtype=np.int64), offsets, rec_path
    keys, offsets = read_idx(idx_path)
    if keys.size == 0:
        raise RecordIOError(f"{idx_path}: empty index (delete it to rebuild the index from {rec_path})")
    bad = np.flatnonzero((offsets < 0) | (offsets >= size))
    if bad.size:
        inside = np.flatnonzero((offsets >= 0) & (offsets < size))
        if inside.size:  # name the record the truncation cut, when one was cut mid-way
            j = int(inside[np.argmax(offsets[inside])])
            _read_record_at(buf, int(offsets[j]), rec_path=rec_path, key=int(keys[j]))
        i = int(bad[np.argmin(offsets[bad])])
        raise RecordIOError(f"{idx_path}: key {int(keys[i])} points at byte {int(offsets[i])}, outside "
                            f"{rec_path} ({size} bytes): the .rec looks truncated or belongs to another .idx")
    return keys, offsets, idx_path


def _image_keys(buf: np.ndarray, rec_path: str, skeys: np.ndarray, soffs: np.ndarray,
                where: str) -> Tuple[Optional[np.ndarray], Optional[int]]:
    """Record 0 as insightface's identity header: (the image keys it declares, its class count or None), or
    (None, None) when record 0 is an image (every record is then an image)."""
    key0 = int(skeys[0])
    payload0, _ = _read_record_at(buf, int(soffs[0]), rec_path=rec_path, key=key0)
    header0, rest0 = unpack_record(payload0, name=f"{rec_path} record {key0}")
    if not (key0 == 0 and header0.flag >= 2 and not (rest0 and _looks_like_image(rest0))):
        return None, None
    if not np.isfinite(header0.label[:2]).all():
        raise RecordIOError(f"{rec_path}: record 0 is an identity header with labels {header0.label[:2]}, not "
                            "key numbers")
    first, end = int(header0.label[0]), int(header0.label[1])
    if first < 2:
        raise RecordIOError(f"{rec_path}: record 0 is an identity header saying images are keys 1..{first - 1}"
                            ": no images")
    if first - 1 > skeys.size:  # checked before np.arange allocates a key per image it declares
        raise RecordIOError(f"{rec_path}: record 0 is an identity header saying images are keys 1..{first - 1},"
                            f" but {where} has only {skeys.size} records")
    return np.arange(1, first, dtype=np.int64), (end - first if end > first else None)


def _fail(rec_path: str, keys: np.ndarray, offsets: np.ndarray, mask: np.ndarray,
          what: Callable[[int], str]) -> None:
    """RecordIOError naming the first record where `mask` holds, `what(i)` of it, and how many records it hits."""
    if mask.any():
        i = int(np.argmax(mask))
        raise RecordIOError(f"{rec_path}: record {int(keys[i])} at byte {int(offsets[i])}: {what(i)}"
                            f" ({int(mask.sum())} record(s) affected)")


def _parse_headers(buf: np.ndarray, rec_path: str, image_keys: np.ndarray, rec_offsets: np.ndarray):
    """Every image record's framing and IRHeader, parsed vectorised -> (float labels, image offsets (-1 for a
    record split in parts), image lengths, whether each record is whole); errors name the first bad record."""
    size = int(buf.shape[0])
    # Vectorised header parse: framing (8) + IRHeader (24) + first extra label (4).
    head = _gather(buf, rec_offsets, 36)
    magic = head[:, 0:4].copy().view("<u4")[:, 0]
    lrec = head[:, 4:8].copy().view("<u4")[:, 0]
    flag = head[:, 8:12].copy().view("<u4")[:, 0].astype(np.int64)
    label_h = head[:, 12:16].copy().view("<f4")[:, 0]
    label_x = head[:, 32:36].copy().view("<f4")[:, 0]
    cflag = (lrec >> 29).astype(np.int64)
    length = (lrec & _LENGTH_MASK).astype(np.int64)

    fail = functools.partial(_fail, rec_path, image_keys, rec_offsets)
    fail(magic != MAGIC, lambda i: f"bad magic 0x{int(magic[i]):08x} (wrong .idx offset or corrupt .rec)")
    fail((cflag != 0) & (cflag != 1), lambda i: f"starts with continuation flag {int(cflag[i])}; wrong .idx offset?")
    fail(rec_offsets + _FRAME + length > size,
         lambda i: f"needs {int(length[i])} bytes but the file ends at byte {size}; the .rec looks truncated")
    whole = cflag == 0
    fail(whole & ((flag > _MAX_FLAG) | (length < IR_SIZE + 4 * flag)),
         lambda i: f"record of {int(length[i])} bytes is too short for an IRHeader with flag {int(flag[i])}")

    labels_f = np.where(flag > 0, label_x, label_h).astype(np.float64)
    image_offsets = np.where(whole, rec_offsets + _FRAME + IR_SIZE + 4 * flag, -1).astype(np.int64)
    image_lengths = (length - IR_SIZE - 4 * flag).astype(np.int64)
    # Records split at a magic word: walk their parts (rare: ~1 in 10^6 records of random bytes).
    for i in np.flatnonzero(~whole):
        payload, _ = _read_record_at(buf, int(rec_offsets[i]), rec_path=rec_path, key=int(image_keys[i]))
        hdr, img = unpack_record(payload, name=f"{rec_path} record {int(image_keys[i])}")
        labels_f[i] = hdr.label[0] if hdr.flag > 0 else hdr.label
        image_lengths[i] = len(img)
    return labels_f, image_offsets, image_lengths, whole


def read_insightface(path: str) -> InsightfaceIndex:
    """Indexes an insightface RecordIO dataset (dir with train.rec [+ train.idx, property], or a .rec file).

    Headers are parsed vectorised from a memory map (500k records in seconds); the images are not read.
    Uses the .idx offsets when present, otherwise scans the .rec once. Honours the record-0 identity header
    (flag > 0: images are keys 1 .. label[0] - 1) and files without it (every record is an image).
    Raises FileNotFoundError / RecordIOError naming the file and the record for a missing path, a truncated
    .rec or .idx, bad magic, or a label outside [0, num_classes).
    """
    rec_path, idx_path, prop_path = _resolve_paths(path)
    buf = _open_map(rec_path)
    size = int(buf.shape[0])
    if size == 0:
        raise RecordIOError(f"{rec_path}: empty file")
    keys, offsets, where = _record_offsets(buf, rec_path, idx_path)
    order = np.argsort(keys, kind="stable")
    skeys, soffs = keys[order], offsets[order]
    image_keys, header_classes = _image_keys(buf, rec_path, skeys, soffs, where)
    has_header = image_keys is not None
    if has_header:
        pos = np.clip(np.searchsorted(skeys, image_keys), 0, skeys.size - 1)
        missing = skeys[pos] != image_keys
        if missing.any():
            raise RecordIOError(f"{where}: no record with key {int(image_keys[np.argmax(missing)])} "
                                f"({int(missing.sum())} image keys missing; a truncated .idx?)")
        rec_offsets = soffs[pos]
    else:
        image_keys, rec_offsets = skeys, soffs

    # Truncated .idx (records after the last indexed one) would silently drop images in a header-less file.
    if idx_path is not None:
        last = int(soffs.max())
        _, after_last = _read_record_at(buf, last, rec_path=rec_path, key=int(skeys[np.argmax(soffs)]))
        if after_last < size:
            msg = (f"{idx_path} indexes records up to byte {after_last} but {rec_path} has {size} bytes: the .idx "
                   "looks truncated (delete it to rebuild the index by scanning the .rec)")
            if not has_header:
                raise RecordIOError(msg)
            log.warning("%s; the identity header lists every image, so reading goes on", msg)

    labels_f, image_offsets, image_lengths, whole = _parse_headers(buf, rec_path, image_keys, rec_offsets)
    fail = functools.partial(_fail, rec_path, image_keys, rec_offsets)
    fail(~np.isfinite(labels_f) | (labels_f != np.round(labels_f)),
         lambda i: f"label {labels_f[i]!r} is not an integer class id")
    labels = labels_f.astype(np.int64)
    image_size = None
    if prop_path is not None:
        num_classes, h, _w = read_property(prop_path)
        image_size = h
        source = f"{prop_path} says num_classes={num_classes}"
    elif header_classes is not None:
        num_classes, source = header_classes, f"the identity header says {header_classes} classes"
    else:
        num_classes, source = int(labels.max()) + 1 if labels.size else 0, "max label + 1"
    fail((labels < 0) | (labels >= num_classes),
         lambda i: f"label {int(labels[i])} is outside [0, {num_classes}) ({source})")
    return InsightfaceIndex(
        rec_path=rec_path, image_offsets=image_offsets, image_lengths=image_lengths,
        labels=labels.astype(np.int32), keys=image_keys.astype(np.int64), num_classes=int(num_classes),
        image_size=image_size, record_offsets=rec_offsets.astype(np.int64), contiguous=whole,
        has_header=bool(has_header))


def write_insightface(out_dir: str, items: Sequence[Tuple[bytes, int]] | Iterator[Tuple[bytes, int]], *,
                      num_classes: int, image_size: int) -> int:
    """Writes train.rec, train.idx, property in insightface layout from (encoded image, label) pairs.

    Items must come grouped by label in increasing order (identity records are contiguous key ranges).
    Record 0: flag 2, label (first key after the images, end key); images keys 1..N (flag 0, float label);
    identity records keys N+1..N+num_classes with label (first image key, end image key). Returns N.
    """
    os.makedirs(out_dir, exist_ok=True)
    rec_path = os.path.join(out_dir, "train.rec")
    idx_path = os.path.join(out_dir, "train.idx")
    counts = np.zeros(num_classes, np.int64)
    with RecordIOWriter(rec_path, idx_path) as w:
        # Record 0 is rewritten in place at the end, once the image count is known; same size either way.
        w.write(0, pack_record(IRHeader(2, np.zeros(2, np.float32), 0, 0), b""))
        key = 0
        last = -1
        for image, label in items:
            label = int(label)
            if not 0 <= label < num_classes:
                raise RecordIOError(f"{rec_path}: label {label} of record {key + 1} is outside [0, {num_classes})")
            if label < last:
                raise ValueError("write_insightface needs items grouped by increasing label")
            last = label
            key += 1
            w.write(key, pack_record(IRHeader(0, float(label), key, 0), image))
            counts[label] += 1
        n = key
        starts = 1 + np.concatenate([[0], np.cumsum(counts)[:-1]])
        for c in range(num_classes):
            w.write(n + 1 + c, pack_record(IRHeader(2, np.array([starts[c], starts[c] + counts[c]], np.float32),
                                                    n + 1 + c, 0), b""))
    header = frame_record(pack_record(IRHeader(2, np.array([n + 1, n + 1 + num_classes], np.float32), 0, 0), b""))
    with open(rec_path, "r+b") as f:
        old = f.read(len(header))
        if len(old) != len(header) or old[:8] != header[:8]:
            raise RecordIOError(f"{rec_path}: header size changed while rewriting record 0")
        f.seek(0)
        f.write(header)
    with open(os.path.join(out_dir, "property"), "w") as f:
        f.write(f"{num_classes},{image_size},{image_size}\n")
    return n
