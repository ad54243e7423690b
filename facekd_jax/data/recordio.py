"""MXNet RecordIO (insightface `train.rec` / `train.idx` / `property`) without mxnet.

Framing of one record (dmlc-core `recordio.cc`): uint32 magic 0xced7230a, uint32 lrecord (cflag = lrecord >> 29,
length = lrecord & (2**29 - 1)), `length` payload bytes, zero padding to a multiple of 4. When the payload holds
the magic word at a 4-byte-aligned position, the writer drops that word and splits the payload there into parts
with cflag 1 (first), 2 (middle), 3 (last); a reader joins the parts and puts the magic word back between them.

Payload of an image record (mxnet `recordio.pack`): IRHeader struct `<IfQQ` (flag uint32, label float32, id uint64,
id2 uint64; 24 bytes); when flag > 0, `flag` float32 labels follow (and `label` is 0); then the encoded image.

`.idx`: one line `key<TAB>offset` per record (offset of the record's magic word in the .rec).

insightface datasets: record 0 has flag > 0 and label (first key after the images, end key); images are keys
1 .. label[0] - 1; identity records (flag 2, label (first image key, end image key)) follow. Files without that
header (record 0 is an image) are read as "every record is an image". `property` holds "num_classes,H,W".
"""
from __future__ import annotations

import dataclasses
import logging
import os
import struct
from typing import Callable, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np

log = logging.getLogger(__name__)

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_LENGTH_MASK = (1 << 29) - 1
_IR = struct.Struct("<IfQQ")
IR_SIZE = _IR.size  # 24
_FRAME = 8  # magic + lrecord
_MAX_FLAG = 1 << 16  # more extra labels than this means the bytes are not an IRHeader


class RecordIOError(ValueError):
    """A .rec/.idx/property file is malformed; the message names the file and the record."""


class IRHeader(NamedTuple):
    """MXNet image-record header. label: float (flag 0) or float32 array [flag] (flag > 0)."""
    flag: int
    label: Union[float, np.ndarray]
    id: int
    id2: int


def pack_record(header: IRHeader | tuple, image_bytes: bytes) -> bytes:
    """IRHeader + encoded image -> record payload bytes (the semantics of mxnet.recordio.pack).

    A scalar label is stored in the header (flag forced to 0); a sequence label is stored as `len(label)`
    float32 values after the header (flag = len, header label 0).
    """
    flag, label, id_, id2 = header
    if np.ndim(label) == 0:
        head = _IR.pack(0, float(label), int(id_), int(id2))
        return head + bytes(image_bytes)
    extra = np.asarray(label, dtype="<f4").ravel()
    head = _IR.pack(int(extra.size), 0.0, int(id_), int(id2))
    return head + extra.tobytes() + bytes(image_bytes)


def unpack_record(payload: bytes, *, name: str = "record") -> Tuple[IRHeader, bytes]:
    """Record payload -> (IRHeader, encoded image bytes); inverse of pack_record.

    With flag > 0 the header's label is the float32 array [flag] of extra labels (as mxnet.recordio.unpack).
    Raises RecordIOError naming `name` when the payload is too short for its header.
    """
    if len(payload) < IR_SIZE:
        raise RecordIOError(f"{name}: payload of {len(payload)} bytes is shorter than the 24-byte IRHeader")
    flag, label, id_, id2 = _IR.unpack_from(payload, 0)
    if flag > 0:
        end = IR_SIZE + 4 * flag
        if flag > _MAX_FLAG or end > len(payload):
            raise RecordIOError(f"{name}: IRHeader flag {flag} asks for {flag} labels but the payload has "
                                f"{len(payload)} bytes")
        labels = np.frombuffer(payload, dtype="<f4", count=flag, offset=IR_SIZE).astype(np.float32)
        return IRHeader(flag, labels, id_, id2), bytes(payload[end:])
    return IRHeader(flag, float(label), id_, id2), bytes(payload[IR_SIZE:])


def _encode_lrec(cflag: int, length: int) -> bytes:
    return struct.pack("<II", MAGIC, (cflag << 29) | length)


def frame_record(payload: bytes) -> bytes:
    """Payload -> the bytes one record takes in a .rec file, split at aligned magic words as dmlc-core does."""
    payload = bytes(payload)
    if len(payload) > _LENGTH_MASK:
        raise RecordIOError(f"record of {len(payload)} bytes exceeds RecordIO's 2**29-byte limit")
    out = []
    start = 0
    pos = payload.find(_MAGIC_BYTES)
    while pos != -1:
        if pos % 4 == 0:  # dmlc-core only looks at 4-byte-aligned words
            out.append(_encode_lrec(1 if start == 0 else 2, pos - start))
            out.append(payload[start:pos])
            start = pos + 4
            pos = payload.find(_MAGIC_BYTES, start)
        else:
            pos = payload.find(_MAGIC_BYTES, pos + 1)
    out.append(_encode_lrec(3 if start != 0 else 0, len(payload) - start))
    out.append(payload[start:])
    out.append(b"\0" * (-(len(payload) - start) % 4))
    return b"".join(out)


class RecordIOWriter:
    """Writes an MXNet-compatible .rec (and .idx `key<TAB>offset` lines when idx_path is given).

    with RecordIOWriter("train.rec", "train.idx") as w: w.write(key, pack_record(header, jpeg_bytes))
    """

    def __init__(self, rec_path: str, idx_path: Optional[str] = None):
        self.rec_path = os.fspath(rec_path)
        self.idx_path = os.fspath(idx_path) if idx_path is not None else None
        self._rec = open(self.rec_path, "wb")
        self._idx = open(self.idx_path, "w") if self.idx_path is not None else None
        self._keys = set()

    def write(self, key: int, payload: bytes) -> int:
        """Appends one record; returns its byte offset in the .rec."""
        key = int(key)
        if key in self._keys:
            raise RecordIOError(f"{self.rec_path}: key {key} written twice")
        self._keys.add(key)
        offset = self._rec.tell()
        self._rec.write(frame_record(payload))
        if self._idx is not None:
            self._idx.write(f"{key}\t{offset}\n")
        return offset

    def close(self) -> None:
        for f in (self._rec, self._idx):
            if f is not None and not f.closed:
                f.close()

    def __enter__(self) -> "RecordIOWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _open_map(path: str) -> np.ndarray:
    """Read-only uint8 view of a file (an empty array for an empty file: mmap refuses those)."""
    if os.path.getsize(path) == 0:
        return np.zeros(0, np.uint8)
    return np.memmap(path, dtype=np.uint8, mode="r")


def _read_record_at(buf: np.ndarray, offset: int, *, rec_path: str, key) -> Tuple[bytes, int]:
    """Reads the (possibly multi-part) record whose first part starts at `offset`.

    Returns (payload, offset just after the record and its padding). Errors name the file, key and offset.
    """
    size = buf.shape[0]
    parts: List[bytes] = []
    pos = offset
    first = True
    while True:
        if pos + _FRAME > size:
            raise RecordIOError(f"{rec_path}: record {key} at byte {pos} is truncated (file ends at byte {size}); "
                                "the .rec file looks cut short")
        magic, lrec = struct.unpack("<II", buf[pos:pos + _FRAME].tobytes())
        if magic != MAGIC:
            raise RecordIOError(f"{rec_path}: record {key}: bad magic 0x{magic:08x} at byte {pos} "
                                f"(expected 0x{MAGIC:08x}); wrong offset in the .idx or a corrupt .rec")
        cflag, length = lrec >> 29, lrec & _LENGTH_MASK
        if first and cflag not in (0, 1):
            raise RecordIOError(f"{rec_path}: record {key} at byte {pos} starts with continuation flag {cflag} "
                                "(the middle of a split record); wrong offset in the .idx?")
        if not first and cflag not in (2, 3):
            raise RecordIOError(f"{rec_path}: record {key}: part at byte {pos} has flag {cflag}, expected a "
                                "continuation (2 or 3) of the split record")
        end = pos + _FRAME + length
        if end > size:
            raise RecordIOError(f"{rec_path}: record {key} at byte {pos} needs {length} bytes but the file ends "
                                f"at byte {size}; the .rec file looks truncated")
        parts.append(buf[pos + _FRAME:end].tobytes())
        pos = end + (-length % 4)
        if cflag in (0, 3):
            break
        first = False
    return _MAGIC_BYTES.join(parts), min(pos, size)


def _scan_offsets(buf: np.ndarray, rec_path: str) -> np.ndarray:
    """Offsets of every record in a .rec, by walking the framing once (no .idx). int64 [num_records]."""
    size = buf.shape[0]
    offsets = []
    pos = 0
    ordinal = 0
    mv = memoryview(buf)  # struct.unpack_from on a memoryview avoids a copy per record
    while pos < size:
        record_start = pos
        first = True
        while True:
            if pos + _FRAME > size:
                raise RecordIOError(f"{rec_path}: record #{ordinal} at byte {pos} is truncated (file ends at byte "
                                    f"{size}); the .rec file looks cut short")
            magic, lrec = struct.unpack_from("<II", mv, pos)
            if magic != MAGIC:
                raise RecordIOError(f"{rec_path}: record #{ordinal}: bad magic 0x{magic:08x} at byte {pos}; "
                                    "not a RecordIO file or corrupt")
            cflag, length = lrec >> 29, lrec & _LENGTH_MASK
            if (first and cflag not in (0, 1)) or (not first and cflag not in (2, 3)):
                raise RecordIOError(f"{rec_path}: record #{ordinal}: unexpected continuation flag {cflag} at byte "
                                    f"{pos}")
            end = pos + _FRAME + length
            if end > size:
                raise RecordIOError(f"{rec_path}: record #{ordinal} at byte {pos} needs {length} bytes but the "
                                    f"file ends at byte {size}; the .rec file looks truncated")
            pos = end + (-length % 4)
            if cflag in (0, 3):
                break
            first = False
        offsets.append(record_start)
        ordinal += 1
    return np.asarray(offsets, dtype=np.int64)


def _bad_idx_line(idx_path: str) -> str:
    """Finds the first malformed line of a .idx for an error message (only called when parsing failed)."""
    with open(idx_path, "rb") as f:
        for n, line in enumerate(f, 1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 2 or not all(x.lstrip(b"-").isdigit() for x in fields):
                return f"line {n}: {line[:80]!r}"
    return "unknown line"


def read_idx(idx_path: str) -> Tuple[np.ndarray, np.ndarray]:
    """.idx file -> (keys int64 [M], offsets int64 [M]) in file order; RecordIOError names a malformed line."""
    idx_path = os.fspath(idx_path)
    with open(idx_path, "rb") as f:
        data = f.read()
    tokens = data.split()
    try:
        values = np.array(tokens, dtype=np.int64) if tokens else np.zeros(0, np.int64)
    except (ValueError, OverflowError):  # OverflowError: a number past int64
        raise RecordIOError(f"{idx_path}: malformed index ({_bad_idx_line(idx_path)}); expected lines "
                            "'key<TAB>offset'") from None
    lines = [ln for ln in data.splitlines() if ln.strip()]
    if values.size % 2 or values.size != 2 * len(lines):
        raise RecordIOError(f"{idx_path}: malformed index ({_bad_idx_line(idx_path)}); expected lines "
                            "'key<TAB>offset' (a truncated .idx?)")
    values = values.reshape(-1, 2)
    return values[:, 0].copy(), values[:, 1].copy()


class RecordIOReader:
    """Random access to the records of a .rec file, by key (from the .idx) or by offset.

    Without an .idx the .rec is scanned once and records get keys 0, 1, 2, ... in file order.
    `keys`: int64 [M]; `read(key)` -> payload bytes (multi-part records joined); thread-safe (read-only map).
    """

    def __init__(self, rec_path: str, idx_path: Optional[str] = None):
        self.rec_path = os.fspath(rec_path)
        if not os.path.isfile(self.rec_path):
            raise FileNotFoundError(f"RecordIO file not found: {self.rec_path}")
        self.idx_path = os.fspath(idx_path) if idx_path is not None else None
        self._buf = _open_map(self.rec_path)
        if self.idx_path is not None:
            if not os.path.isfile(self.idx_path):
                raise FileNotFoundError(f"RecordIO index not found: {self.idx_path}")
            self.keys, self.offsets = read_idx(self.idx_path)
        else:
            self.offsets = _scan_offsets(self._buf, self.rec_path)
            self.keys = np.arange(self.offsets.size, dtype=np.int64)
        self._where = {}

    @property
    def size(self) -> int:
        return int(self._buf.shape[0])

    def offset_of(self, key: int) -> int:
        if not self._where:
            self._where = {int(k): int(o) for k, o in zip(self.keys, self.offsets)}
        try:
            return self._where[int(key)]
        except KeyError:
            where = self.idx_path or self.rec_path
            raise KeyError(f"{where}: no record with key {key}") from None

    def read(self, key: int) -> bytes:
        """Payload of the record with this key (IRHeader + image for image records)."""
        return self.read_at(self.offset_of(key), key=key)

    def read_at(self, offset: int, *, key="?") -> bytes:
        """Payload of the record that starts at byte `offset` of the .rec."""
        if not 0 <= offset < self.size:
            raise RecordIOError(f"{self.rec_path}: record {key}: offset {offset} is outside the file "
                                f"({self.size} bytes)")
        return _read_record_at(self._buf, int(offset), rec_path=self.rec_path, key=key)[0]

    def __iter__(self) -> Iterator[Tuple[int, bytes]]:
        """(key, payload) in .idx (or file) order."""
        for k, o in zip(self.keys, self.offsets):
            yield int(k), self.read_at(int(o), key=int(k))

    def __len__(self) -> int:
        return int(self.keys.size)


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
    if idx_path is not None:
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
        where = idx_path
    else:
        log.info("%s: no .idx beside it; scanning the file once", rec_path)
        offsets = _scan_offsets(buf, rec_path)
        keys = np.arange(offsets.size, dtype=np.int64)
        where = rec_path
    order = np.argsort(keys, kind="stable")
    skeys, soffs = keys[order], offsets[order]

    def offsets_of(wanted: np.ndarray) -> np.ndarray:
        pos = np.clip(np.searchsorted(skeys, wanted), 0, skeys.size - 1)
        missing = skeys[pos] != wanted
        if missing.any():
            raise RecordIOError(f"{where}: no record with key {int(wanted[np.argmax(missing)])} "
                                f"({int(missing.sum())} image keys missing; a truncated .idx?)")
        return soffs[pos]

    # Record 0: the insightface identity header, or an image.
    reader_key0 = int(skeys[0])
    payload0, _ = _read_record_at(buf, int(soffs[0]), rec_path=rec_path, key=reader_key0)
    header0, rest0 = unpack_record(payload0, name=f"{rec_path} record {reader_key0}")
    has_header = (reader_key0 == 0 and header0.flag >= 2 and not (rest0 and _looks_like_image(rest0)))
    header_classes = None
    if has_header:
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
        image_keys = np.arange(1, first, dtype=np.int64)
        if end > first:
            header_classes = end - first
    else:
        image_keys = skeys
    rec_offsets = offsets_of(image_keys) if has_header else soffs

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

    # Vectorised header parse: framing (8) + IRHeader (24) + first extra label (4).
    head = _gather(buf, rec_offsets, 36)
    magic = head[:, 0:4].copy().view("<u4")[:, 0]
    lrec = head[:, 4:8].copy().view("<u4")[:, 0]
    flag = head[:, 8:12].copy().view("<u4")[:, 0].astype(np.int64)
    label_h = head[:, 12:16].copy().view("<f4")[:, 0]
    label_x = head[:, 32:36].copy().view("<f4")[:, 0]
    cflag = (lrec >> 29).astype(np.int64)
    length = (lrec & _LENGTH_MASK).astype(np.int64)

    def fail(mask: np.ndarray, what: Callable[[int], str]) -> None:
        if mask.any():
            i = int(np.argmax(mask))
            raise RecordIOError(f"{rec_path}: record {int(image_keys[i])} at byte {int(rec_offsets[i])}: {what(i)}"
                                f" ({int(mask.sum())} record(s) affected)")

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
