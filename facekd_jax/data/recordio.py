"""MXNet RecordIO (`.rec` / `.idx`, as insightface ships its datasets) without mxnet.

Framing of one record (dmlc-core `recordio.cc`): uint32 magic 0xced7230a, uint32 lrecord (cflag = lrecord >> 29,
length = lrecord & (2**29 - 1)), `length` payload bytes, zero padding to a multiple of 4. When the payload holds
the magic word at a 4-byte-aligned position, the writer drops that word and splits the payload there into parts
with cflag 1 (first), 2 (middle), 3 (last); a reader joins the parts and puts the magic word back between them.

Payload of an image record (mxnet `recordio.pack`): IRHeader struct `<IfQQ` (flag uint32, label float32, id uint64,
id2 uint64; 24 bytes); when flag > 0, `flag` float32 labels follow (and `label` is 0); then the encoded image.

`.idx`: one line `key<TAB>offset` per record (offset of the record's magic word in the .rec).

insightface's dataset layout on top of this framing (identity header, `property`): insightface_rec.py.
"""
from __future__ import annotations

import logging
import os
import struct
from typing import Iterator, List, NamedTuple, Optional, Tuple, Union

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
