"""Bad input by the thousand, on a small seeded budget: every reader of outside bytes, fed mutants of a valid input
(tests/fuzzing.py: bit flips, overwrites, truncation at structural boundaries, inflated size and count fields, wrong
magic, empty files, duplicated and deleted chunks), gives the right data or one clear error naming the file, in
bounded time and memory; a declared 2**40-byte size or 2**31-item count is refused before anything that size is
allocated; an empty file is a clear error. The large run (10,000 inputs per reader) is benchmarks/fuzz.py.
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
import pickle
import struct

import numpy as np
import pytest

import fuzzing

# Mutants per seed, sized so the whole file takes about half a minute on two cores (dlib's seed is the real 22 MB file,
# shape-predictor's the real 9 MB one; a TFRecord input builds a tf.data pipeline).
BUDGET = {"recordio": 50, "recordio-scan": 30, "bin": 60, "bin-py2": 40, "pairs": 60, "people": 50, "dlib": 10,
          "shape-predictor": 3, "shape-predictor-tiny": 40, "pth": 40, "tfrecord": 8, "cache": 60, "config": 40,
          "jpeg": 8, "png": 8}
# The constant in "10x the file size + a small constant": 1 MiB of Python allocations (tracemalloc), or 32 MiB of
# resident memory for the readers that build TensorFlow graphs (Reader.graphs: TensorFlow's own working memory).
SMALL, SMALL_GRAPHS = 1 << 20, 32 << 20
# The factor, where a reader's own working set on a valid file is larger: the shape predictor's vectorised integer
# walk holds 13x its file, whatever the file declares.
FACTOR = {"shape-predictor": 20}


@pytest.fixture(scope="module")
def box():
    with fuzzing.Sandbox() as sandbox:
        yield sandbox


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("fuzz"))


_SEEDS = {}


def seed_of(name: str, workdir: str) -> fuzzing.Seed:
    """The seed (built once per module); skips where its maker is not installed (torch, face_recognition_models)."""
    if name not in _SEEDS:
        try:
            _SEEDS[name] = fuzzing.build_seed(name, workdir)
        except (ImportError, FileNotFoundError) as e:
            pytest.skip(f"seed {name}: {e}")
    return _SEEDS[name]


@pytest.mark.parametrize("name", list(BUDGET))
def test_mutants_give_the_right_data_or_one_clear_error(name, box, workdir, tmp_path):
    seed = seed_of(name, workdir)
    report = fuzzing.fuzz(seed, BUDGET[name], rng_seed=0, box=box, out=str(tmp_path / "failures"),
                          workdir=os.path.join(workdir, name))
    assert report.inputs == BUDGET[name] and report.errors > 0
    assert not report.failures, report.summary()


def read(seed: fuzzing.Seed, box, changed, tmp_path) -> fuzzing.Outcome:
    """The seed with `changed` ({file: bytes}) read in the sandbox."""
    arg = seed.write(str(tmp_path / "input"), changed)
    return box.run(seed.reader, arg, fuzzing.Consistent(seed.info), must_name=seed.must_name(arg))


def field(seed: fuzzing.Seed, rel: str, name: str, value: int, nth: int = 0) -> bytes:
    """The seed's file `rel` with the nth field called `name` (its Layout) set to `value`."""
    f = [f for f in seed.layouts[rel].fields if f.name == name][nth]
    data = seed.files[rel]
    return data[:f.start] + f.encode(value) + data[f.end:]


def _long1(v: int) -> bytes:
    raw = v.to_bytes((v.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(raw)]) + raw


def _pickle_str(text: str) -> bytes:
    return b"X" + struct.pack("<I", len(text)) + text.encode()


def _pth(numel: int, size, stride, data: bytes = b"\0" * 16, usize: int = 0) -> bytes:
    """A torch.save zip whose data.pkl (written opcode by opcode) holds one tensor "w" of the given view of
    storage 0 (declared to hold `numel` floats; `data` its bytes); usize: data.pkl's declared size, if set."""
    ints = b"".join(_long1(v) for v in size), b"".join(_long1(v) for v in stride)
    storage = (b"(" + _pickle_str("storage") + b"ctorch\nFloatStorage\n" + _pickle_str("0") + _pickle_str("cpu")
               + _long1(numel) + b"tQ")
    tensor = b"ctorch._utils\n_rebuild_tensor_v2\n(" + storage + _long1(0) + b"(" + ints[0] + b"t(" + ints[1] + b"ttR"
    pkl = b"\x80\x02}(" + _pickle_str("w") + tensor + b"u."
    out = fuzzing._zip_join([("archive/data.pkl", pkl), ("archive/byteorder", b"little"), ("archive/data/0", data)])
    if usize:  # data.pkl is the first entry: its local header and its central directory record
        eocd = out.rfind(b"PK\x05\x06")
        cd = struct.unpack_from("<I", out, eocd + 16)[0]
        out = bytearray(out)
        out[22:26] = out[cd + 24:cd + 28] = struct.pack("<I", usize)
        out = bytes(out)
    return out


def _huge_png(seed: fuzzing.Seed, width: int = 60000, height: int = 60000) -> bytes:
    parts = fuzzing._png_split(seed.files["face.png"])
    parts[0] = ("IHDR", struct.pack(">II", width, height) + parts[0][1][8:])
    return fuzzing._png_join(parts)  # checksums recomputed: only the size is wrong


def _huge_jpeg(seed: fuzzing.Seed) -> bytes:
    data = field(seed, "face.jpg", "height", 60000)
    return field(dataclasses.replace(seed, files={"face.jpg": data}, layouts={"face.jpg": fuzzing.jpeg_layout(data)}),
                 "face.jpg", "width", 60000)


class _HugeArray:
    """Pickles as numpy pickles an array (protocol 2: _reconstruct, then BUILD with the state), but its state
    declares 2**40 bytes of data and holds 3."""

    def __reduce__(self):
        return (np.ndarray.__reduce__(np.zeros(1, np.uint8))[0], (np.ndarray, (0,), b"b"),
                (1, (1 << 40,), np.dtype(np.uint8), False, b"abc"))


def _levels(seed: fuzzing.Seed, count: int) -> bytes:
    """The shape predictor with its number of cascade levels (the unsigned long after the initial shape) set."""
    data = seed.files["landmarks.dat"]
    rows = int.from_bytes(data[3:3 + (data[2] & 0x0F)], "little")  # integer 1: the initial shape's rows, negated
    f = seed.layouts["landmarks.dat"].fields[3 + 2 * rows]  # version, rows, columns, then a float is 2 integers
    return data[:f.start] + f.encode(count) + data[f.end:]


def _tfrecord_length(seed: fuzzing.Seed, length: int) -> bytes:
    head = struct.pack("<Q", length)
    return head + struct.pack("<I", fuzzing.masked_crc32c(head)) + seed.files["a.tfrecord"][12:]


def _npy_shape(seed: fuzzing.Seed, name: str, shape) -> bytes:
    data = seed.files[name]
    start = 10 + int.from_bytes(data[8:10], "little")
    old = data[10:start]
    new = old.replace(str(tuple(np.load(io.BytesIO(data)).shape)).encode(), str(tuple(shape)).encode())
    return data[:8] + len(new).to_bytes(2, "little") + new + data[start:]


# (seed, what, the file and its new bytes from the seed)
HUGE = [
    ("recordio", ".idx offset 2**40", lambda s: {"train.idx": s.files["train.idx"].replace(
        b"\n1\t", b"\n1\t1099511627776\n99\t", 1)}),
    ("recordio", "record length 2**29-1", lambda s: {"train.rec": field(s, "train.rec", "length", (1 << 29) - 1, 1)}),
    ("recordio", "identity header: 2**31 images", lambda s: {"train.rec": field(s, "train.rec", "extra label",
                                                                               1 << 31)}),
    ("recordio", "IRHeader flag 2**31 labels", lambda s: {"train.rec": field(s, "train.rec", "flag", 1 << 31, 1)}),
    ("recordio-scan", "record length 2**29-1", lambda s: {"train.rec": field(s, "train.rec", "length", (1 << 29) - 1)}),
    ("bin", "BINBYTES8 of 2**40 bytes", lambda s: {"set.bin": b"\x80\x04\x8e" + struct.pack("<Q", 1 << 40) + b"ab."}),
    ("bin", "FRAME of 2**40 bytes", lambda s: {"set.bin": b"\x80\x04\x95" + struct.pack("<Q", 1 << 40) + b"N."}),
    ("bin", "memo index 2**31", lambda s: {"set.bin": b"\x80\x04Nr" + struct.pack("<I", 1 << 31) + b"."}),
    ("bin", "bytearray(2**40)", lambda s: {"set.bin": b"\x80\x02c__builtin__\nbytearray\n" + _long1(1 << 40)
                                           + b"\x85R."}),
    ("bin-py2", "a numpy array of 2**40 bytes", lambda s: {"set.bin": pickle.dumps(([_HugeArray(), b"x"], [True]),
                                                                                    protocol=2)}),
    ("pairs", "header: 2**40 pairs", lambda s: {"pairs.txt": b"1099511627776\n" + s.files["pairs.txt"][5:]}),
    ("pairs", "header: 2**31 folds of 2**31", lambda s: {"pairs.txt": b"2147483648\t2147483648\n"
                                                         + s.files["pairs.txt"][5:]}),
    ("people", "count line: 2**31 people", lambda s: {"people.txt": b"2147483648\n" + s.files["people.txt"][2:]}),
    ("dlib", "a tensor of 2**40 values", lambda s: {"model.dat": field(s, "model.dat", "params k", 1 << 40)}),
    ("dlib", "a layer name of 2**40 bytes", lambda s: {"model.dat": field(s, "model.dat", "the length of a layer name",
                                                                        1 << 40)}),
    ("shape-predictor", "an initial shape of 2**40 rows", lambda s: {"landmarks.dat": field(s, "landmarks.dat",
                                                                                         "integer 1", -(1 << 40))}),
    ("shape-predictor", "2**31 cascade levels", lambda s: {"landmarks.dat": _levels(s, 1 << 31)}),
    ("pth", "a storage of 2**40 floats", lambda s: {"backbone.pth": _pth(1 << 40, (4,), (1,))}),
    ("pth", "a view of 2**28 floats of a 4-float storage", lambda s: {"backbone.pth": _pth(4, (1 << 28,), (0,))}),
    ("pth", "data.pkl declaring 2**31 bytes", lambda s: {"backbone.pth": _pth(4, (4,), (1,), usize=1 << 31)}),
    ("tfrecord", "record of 2**40 bytes, length checksum valid", lambda s: {"a.tfrecord": _tfrecord_length(s,
                                                                                                          1 << 40)}),
    ("tfrecord", "record of 2**34 bytes, length checksum valid", lambda s: {"a.tfrecord": _tfrecord_length(s,
                                                                                                          1 << 34)}),
    ("cache", "embeddings.npy of 2**40 rows", lambda s: {"embeddings.npy": _npy_shape(s, "embeddings.npy",
                                                                                       (1 << 40, 2, 8))}),
    ("cache", "labels.npy of 2**31 labels", lambda s: {"labels.npy": _npy_shape(s, "labels.npy", (1 << 31,))}),
    ("cache", "header.json: 2**40 images", lambda s: {"header.json": s.files["header.json"].replace(
        b'"num_images": 6', b'"num_images": 1099511627776')}),
    ("config", "JSON nested 100,000 deep", lambda s: {"config.json": b"[" * 100_000 + b"]" * 100_000}),
    ("config", "embedding_size of a million digits", lambda s: {"config.json": s.files["config.json"].replace(
        b'"embedding_size": 512', b'"embedding_size": ' + b"9" * 1_000_000)}),
    ("png", "IHDR 60000x60000, checksums valid", lambda s: {"face.png": _huge_png(s)}),
    # Under Pillow's pixel limit (36.7 M of 89 M): found by the 1,000-per-reader run, 374 MiB for a 1.2 KB file.
    ("png", "IHDR 24x1528592, more rows than its bytes inflate to", lambda s: {"face.png": _huge_png(s, 24, 1528592)}),
    ("jpeg", "SOF 60000x60000", lambda s: {"face.jpg": _huge_jpeg(s)}),
]


@pytest.mark.parametrize("name,what,change", HUGE, ids=[f"{n}: {w}" for n, w, _ in HUGE])
def test_a_declared_huge_size_is_refused_before_allocating(name, what, change, box, workdir, tmp_path):
    seed = seed_of(name, workdir)
    changed = change(seed)
    outcome = read(seed, box, changed, tmp_path)
    assert outcome.kind == "error", f"{what}: {outcome.kind}: {outcome.detail}"
    size = sum(len(changed.get(rel, data)) for rel, data in seed.files.items())
    small = SMALL_GRAPHS if fuzzing.READERS[seed.reader].graphs else SMALL
    limit = FACTOR.get(seed.reader, 10) * size + small
    assert outcome.peak < limit, f"{what}: allocated {outcome.peak} bytes for {size} bytes of input"


# What each reader makes of its main file emptied: a clear error, or (RecordIOReader) no records.
EMPTY = {"recordio": ("train.rec", "error"), "recordio-scan": ("train.rec", "right"), "bin": ("set.bin", "error"),
         "pairs": ("pairs.txt", "error"), "people": ("people.txt", "error"), "dlib": ("model.dat", "error"),
         "shape-predictor": ("landmarks.dat", "error"), "pth": ("backbone.pth", "error"),
         "tfrecord": ("a.tfrecord", "error"), "cache": ("header.json", "error"),
         "config": ("config.json", "error"), "jpeg": ("face.jpg", "error"), "png": ("face.png", "error")}


@pytest.mark.parametrize("name", list(EMPTY))
def test_an_empty_file_is_a_clear_error(name, box, workdir, tmp_path):
    seed = seed_of(name, workdir)
    rel, kind = EMPTY[name]
    outcome = read(seed, box, {rel: b""}, tmp_path)
    assert outcome.kind == kind, f"{outcome.kind}: {outcome.detail}"
    if kind == "error":
        assert rel in outcome.detail or name in ("cache", "config", "recordio"), outcome.detail


def test_a_pickle_naming_a_callable_is_refused_without_running_it(box, workdir, tmp_path):
    marker = tmp_path / "ran"
    evil = b"cos\nsystem\n(" + _pickle_str(f"touch {marker}") + b"tR."
    for name, rel, data in (("bin", "set.bin", evil),
                            ("pth", "backbone.pth", fuzzing._zip_join([("archive/data.pkl", evil)]))):
        outcome = read(seed_of(name, workdir), box, {rel: data}, tmp_path / name)
        assert outcome.kind == "error" and "os.system" in outcome.detail.replace("posix", "os"), outcome.detail
    assert not marker.exists()


def test_the_mutator_is_seeded_and_covers_every_kind(workdir):
    seed = seed_of("recordio", workdir)
    first = [seed.mutant(np.random.default_rng(5)) for _ in range(3)]
    again = [seed.mutant(np.random.default_rng(5)) for _ in range(3)]
    assert first == again
    rng = np.random.default_rng(0)
    kinds = {seed.mutant(rng)[0].split(":")[-1].split("(")[0] for _ in range(400)}
    assert kinds == set(fuzzing.KINDS)
    lay = seed.layouts["train.rec"]
    assert {"lrecord", "length", "flag", "label", "id"} <= {f.name for f in lay.fields} and len(lay.magic) >= 10


def test_the_sandbox_classifies_hangs_crashes_wrong_data_and_big_allocations(box, tmp_path):
    """The harness itself: each way a reader can fail is a failure, with the reason."""
    path = str(tmp_path / "x")
    with open(path, "w") as f:
        json.dump({"sleep": 0}, f)
    cases = {"hang": "timeout", "crash": "crash", "wrong": "wrong data", "big": "allocated", "unnamed": "does not name",
             "other": "KeyError"}
    for case, reason in cases.items():
        outcome = box.run(f"selftest-{case}", path, fuzzing.Consistent(), timeout=2)
        assert outcome.kind == "failure" and reason in outcome.detail, (case, outcome)
    assert box.run("selftest-ok", path, fuzzing.Consistent()).kind == "right"
    assert box.run("selftest-error", path, fuzzing.Consistent()).kind == "error"
