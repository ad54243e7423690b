"""Data formats: MXNet RecordIO (read/write, insightface layout), folders, verification sets, converters, bad input.

RecordIO files are produced by a small reference writer written here from the dmlc-core description (not by
facekd_jax), so the reader is checked against an independent implementation of the format.
"""
import io
import logging
import os
import pickle
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from facekd_jax.data import convert, insightface_rec, recordio, specs, verification
from facekd_jax.data import images as images_lib
from facekd_jax.data.folder import list_folder

MAGIC = struct.pack("<I", 0xCED7230A)


# ------------------------------------------------------------------------------------------- reference writer


def ref_pack(label, image, id_=0, id2=0):
    """mxnet.recordio.pack: scalar label in the header; a list goes after it with flag = len."""
    if isinstance(label, (list, tuple)):
        return struct.pack("<IfQQ", len(label), 0.0, id_, id2) + struct.pack(f"<{len(label)}f", *label) + image
    return struct.pack("<IfQQ", 0, label, id_, id2) + image


def ref_frame(payload):
    """dmlc-core RecordIOWriter::WriteRecord, transcribed loop for loop."""
    out = b""
    lower = (len(payload) >> 2) << 2
    dptr = 0
    for i in range(0, lower, 4):
        if payload[i:i + 4] == MAGIC:
            out += MAGIC + struct.pack("<I", ((1 if dptr == 0 else 2) << 29) | (i - dptr)) + payload[dptr:i]
            dptr = i + 4
    out += MAGIC + struct.pack("<I", ((3 if dptr else 0) << 29) | (len(payload) - dptr)) + payload[dptr:]
    return out + b"\0" * (-(len(payload) - dptr) % 4)


def ref_write(rec_path, records, idx_path=None):
    """records: [(key, payload)] -> .rec (+ .idx 'key\\toffset')."""
    data, idx = b"", ""
    for key, payload in records:
        idx += f"{key}\t{len(data)}\n"
        data += ref_frame(payload)
    with open(rec_path, "wb") as f:
        f.write(data)
    if idx_path:
        with open(idx_path, "w") as f:
            f.write(idx)


def jpeg_bytes(seed, size=(16, 16), mode="RGB", fmt="JPEG"):
    rng = np.random.RandomState(seed)
    arr = rng.randint(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    img = Image.fromarray(arr).convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


def insightface_records(labels, *, magic_in=None, array_label=None):
    """Record 0 header, images keys 1..N (flag 0 float label; optional flag-2 label array), identity records."""
    n, classes = len(labels), max(labels) + 1
    images = {}
    records = [(0, ref_pack([n + 1.0, n + 1.0 + classes], b""))]
    for k, lab in enumerate(labels, 1):
        img = jpeg_bytes(k)
        if k == magic_in:  # aligned magic inside the payload (24 + 16 = 40): MXNet splits this record
            img = img[:16] + MAGIC + img[16:]
        images[k] = img
        label = [float(lab), 3.0] if k == array_label else float(lab)
        records.append((k, ref_pack(label, img, id_=k)))
    start = 1
    for c in range(classes):
        end = start + labels.count(c)
        records.append((n + 1 + c, ref_pack([float(start), float(end)], b"", id_=n + 1 + c)))
        start = end
    return records, images


def write_dataset(d, records, *, idx=True, prop=None):
    os.makedirs(d, exist_ok=True)
    ref_write(os.path.join(d, "train.rec"), records, os.path.join(d, "train.idx") if idx else None)
    if prop:
        with open(os.path.join(d, "property"), "w") as f:
            f.write(prop)
    return str(d)


# ------------------------------------------------------------------------------------------- RecordIO


def test_pack_unpack_roundtrip():
    hdr, img = recordio.unpack_record(recordio.pack_record(recordio.IRHeader(0, 7.0, 3, 4), b"abc"))
    assert (hdr.flag, hdr.label, hdr.id, hdr.id2, img) == (0, 7.0, 3, 4, b"abc")
    payload = recordio.pack_record(recordio.IRHeader(0, [5.0, 9.0], 1, 0), b"xy")
    assert payload == ref_pack([5.0, 9.0], b"xy", id_=1)
    hdr, img = recordio.unpack_record(payload)
    assert hdr.flag == 2 and list(hdr.label) == [5.0, 9.0] and img == b"xy"
    with pytest.raises(recordio.RecordIOError, match="flag 5"):
        recordio.unpack_record(struct.pack("<IfQQ", 5, 0.0, 0, 0) + b"1234")


def test_read_insightface_with_header(tmp_path):
    labels = [0, 0, 1, 2, 2, 2]
    records, images = insightface_records(labels, magic_in=2, array_label=5)
    d = write_dataset(tmp_path / "ds", records, prop="3,112,112")
    index = insightface_rec.read_insightface(d)
    assert index.has_header and index.num_classes == 3 and index.image_size == 112
    np.testing.assert_array_equal(index.keys, np.arange(1, 7))
    np.testing.assert_array_equal(index.labels, labels)
    assert index.labels.dtype == np.int32
    np.testing.assert_array_equal(index.contiguous, [k != 2 for k in range(1, 7)])
    raw = open(os.path.join(d, "train.rec"), "rb").read()
    for i, k in enumerate(index.keys):
        assert index.read_image(i) == images[k]
        assert index.image_lengths[i] == len(images[k])
        if index.contiguous[i]:  # the documented fast path: one slice of the file
            o = index.image_offsets[i]
            assert raw[o:o + index.image_lengths[i]] == images[k]
    reader = recordio.RecordIOReader(os.path.join(d, "train.rec"), os.path.join(d, "train.idx"))
    assert sorted(reader.keys.tolist()) == list(range(10))
    for key, payload in records:
        assert reader.read(key) == payload  # multi-part record 2 comes back whole, magic re-inserted
    hdr, _ = recordio.unpack_record(reader.read(8))  # identity record of class 1: images 3..3
    assert list(hdr.label) == [3.0, 4.0]


def test_read_without_header_idx_or_property(tmp_path):
    labels = [4, 1, 1, 0]
    records = [(k, ref_pack(float(lab), jpeg_bytes(k))) for k, lab in enumerate(labels)]
    d = write_dataset(tmp_path / "plain", records, idx=False)
    index = insightface_rec.read_insightface(d)
    assert not index.has_header and index.image_size is None
    assert index.num_classes == 5  # max label + 1
    np.testing.assert_array_equal(index.keys, [0, 1, 2, 3])
    np.testing.assert_array_equal(index.labels, labels)
    assert [index.read_image(i) for i in range(4)] == [jpeg_bytes(k) for k in range(4)]
    assert len(recordio.RecordIOReader(os.path.join(d, "train.rec"))) == 4


def test_writer_is_byte_identical_to_reference(tmp_path):
    records, _ = insightface_records([0, 1, 1], magic_in=1)
    records.append((99, MAGIC * 3 + b"ab" + MAGIC))  # leading, consecutive and unaligned-at-end magic words
    ref_write(tmp_path / "ref.rec", records, tmp_path / "ref.idx")
    with recordio.RecordIOWriter(tmp_path / "our.rec", tmp_path / "our.idx") as w:
        for key, payload in records:
            w.write(key, payload)
    assert (tmp_path / "our.rec").read_bytes() == (tmp_path / "ref.rec").read_bytes()
    assert (tmp_path / "our.idx").read_text() == (tmp_path / "ref.idx").read_text()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.binary(max_size=40), st.lists(st.integers(0, 40), max_size=4)), min_size=1,
                max_size=6))
def test_framing_roundtrip_with_magic_anywhere(tmp_path, specs):
    payloads = []
    for body, cuts in specs:
        for c in sorted(cuts, reverse=True):  # magic words at arbitrary (aligned or not) positions
            c = min(c, len(body))
            body = body[:c] + MAGIC + body[c:]
        payloads.append(body)
    assert b"".join(recordio.frame_record(p) for p in payloads) == b"".join(ref_frame(p) for p in payloads)
    path = tmp_path / "h.rec"
    ref_write(path, list(enumerate(payloads)))
    reader = recordio.RecordIOReader(path)
    assert [p for _, p in reader] == payloads


def test_write_insightface_roundtrip(tmp_path):
    items = [(jpeg_bytes(i), lab) for i, lab in enumerate([0, 0, 2, 2, 2])]  # class 1 has no image
    n = insightface_rec.write_insightface(tmp_path / "w", iter(items), num_classes=3, image_size=16)
    assert n == 5
    index = insightface_rec.read_insightface(tmp_path / "w")
    assert index.has_header and index.num_classes == 3 and index.image_size == 16
    np.testing.assert_array_equal(index.labels, [0, 0, 2, 2, 2])
    assert [index.read_image(i) for i in range(5)] == [b for b, _ in items]
    reader = recordio.RecordIOReader(tmp_path / "w" / "train.rec", tmp_path / "w" / "train.idx")
    hdr0, _ = recordio.unpack_record(reader.read(0))
    assert list(hdr0.label) == [6.0, 9.0]
    ranges = [list(recordio.unpack_record(reader.read(k))[0].label) for k in (6, 7, 8)]
    assert ranges == [[1.0, 3.0], [3.0, 3.0], [3.0, 6.0]]


def test_truncated_rec_names_file_and_record(tmp_path):
    records, _ = insightface_records([0, 1, 1])
    d = write_dataset(tmp_path / "t", records, prop="2,112,112")
    rec = os.path.join(d, "train.rec")
    keys, offs = recordio.read_idx(os.path.join(d, "train.idx"))
    offsets = dict(zip(keys.tolist(), offs.tolist()))
    with open(rec, "r+b") as f:
        f.truncate(offsets[3] + 20)  # record 3 cut inside its image
    with pytest.raises(recordio.RecordIOError, match=r"train\.rec.*record 3"):
        insightface_rec.read_insightface(d)
    os.remove(os.path.join(d, "train.idx"))  # scanning a truncated file fails as clearly
    with pytest.raises(recordio.RecordIOError, match=r"train\.rec.*record #3.*truncated"):
        insightface_rec.read_insightface(d)


def test_truncated_idx_names_file(tmp_path):
    records = [(k, ref_pack(float(k % 2), jpeg_bytes(k))) for k in range(4)]
    d = write_dataset(tmp_path / "i", records)
    idx = os.path.join(d, "train.idx")
    text = open(idx).read()
    with open(idx, "w") as f:
        f.write(text[:-3])  # last line cut inside the offset: points into the middle of a record
    with pytest.raises(recordio.RecordIOError, match=r"train\.idx|record 3"):
        insightface_rec.read_insightface(d)
    with open(idx, "w") as f:
        f.write(text.rsplit("\n", 2)[0] + "\n")  # last line missing: a record would silently disappear
    with pytest.raises(recordio.RecordIOError, match=r"train\.idx.*truncated"):
        insightface_rec.read_insightface(d)
    with open(idx, "w") as f:
        f.write(text.replace("\t", "\tx", 1))
    with pytest.raises(recordio.RecordIOError, match=r"train\.idx.*line 1"):
        insightface_rec.read_insightface(d)


def test_label_out_of_range_and_missing_path(tmp_path):
    records = [(k, ref_pack(float(lab), jpeg_bytes(k))) for k, lab in enumerate([0, 1, 5])]
    d = write_dataset(tmp_path / "l", records, prop="3,112,112")
    with pytest.raises(recordio.RecordIOError, match=r"record 2 .*label 5 is outside \[0, 3\)"):
        insightface_rec.read_insightface(d)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        insightface_rec.read_insightface(tmp_path / "nowhere")
    with open(os.path.join(d, "train.idx"), "w") as f:
        f.write("0\t0\n1\t6\n2\t0\n")  # offset 6 is not a record start
    with pytest.raises(recordio.RecordIOError, match=r"record 1\b.*bad magic"):
        insightface_rec.read_insightface(d)


# ------------------------------------------------------------------------------------------- folders & converters


def make_folder(root, *, corrupt=True):
    """3 people: JPEG 16x16 (kept byte for byte), greyscale non-square PGM, PNG; stray and corrupt files."""
    os.makedirs(root / "alice")
    os.makedirs(root / "bob")
    os.makedirs(root / "carol")
    os.makedirs(root / "empty")
    os.makedirs(root / ".hidden")
    for i in range(2):
        (root / "alice" / f"a{i}.jpg").write_bytes(jpeg_bytes(i))
    for i in range(3):
        (root / "bob" / f"b{i}.pgm").write_bytes(jpeg_bytes(10 + i, size=(20, 30), mode="L", fmt="PPM"))
    (root / "carol" / "c0.png").write_bytes(jpeg_bytes(20, size=(24, 24), fmt="PNG"))
    (root / "carol" / "notes.txt").write_text("not an image")
    (root / "stray.jpg").write_bytes(jpeg_bytes(30))  # beside the person folders: ignored
    (root / "README").write_text("stray")
    (root / ".hidden" / "x.jpg").write_bytes(jpeg_bytes(31))
    if corrupt:
        (root / "carol" / "c1_truncated.jpg").write_bytes(jpeg_bytes(21, size=(40, 40))[:300])
        (root / "carol" / "c2_garbage.jpg").write_bytes(b"this is not a jpeg at all")
    return root


def test_list_folder(tmp_path):
    root = make_folder(tmp_path / "f")
    paths, labels, names = list_folder(root)
    assert names == ["alice", "bob", "carol"]
    assert [os.path.basename(p) for p in paths] == ["a0.jpg", "a1.jpg", "b0.pgm", "b1.pgm", "b2.pgm", "c0.png",
                                                    "c1_truncated.jpg", "c2_garbage.jpg"]
    np.testing.assert_array_equal(labels, [0, 0, 1, 1, 1, 2, 2, 2])
    assert labels.dtype == np.int32
    with pytest.raises(FileNotFoundError, match="missing"):
        list_folder(tmp_path / "missing")


def test_convert_folder_to_recordio_skips_corrupt(tmp_path, caplog):
    root = make_folder(tmp_path / "f")
    out = tmp_path / "rec"
    with caplog.at_level(logging.WARNING):
        rc = convert.main(["--input", f"folder:{root}", "--output-format", "recordio", "--output", str(out),
                           "--image-size", "16", "--no-progress"])
    assert rc == 0
    assert "c1_truncated.jpg" in caplog.text and "c2_garbage.jpg" in caplog.text
    assert sorted(os.listdir(out)) == ["property", "train.idx", "train.rec"]
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]
    index = insightface_rec.read_insightface(out)
    assert index.has_header and index.num_classes == 3 and index.image_size == 16
    np.testing.assert_array_equal(index.labels, [0, 0, 1, 1, 1, 2])
    assert index.read_image(0) == (root / "alice" / "a0.jpg").read_bytes()  # right-sized JPEG stored as is
    for i in range(index.num_images):
        data = index.read_image(i)
        assert data[:2] == b"\xff\xd8"  # PGM/PNG re-encoded as JPEG
        img = images_lib.decode_image_np(data, image_size=16, name=str(i))
        assert Image.open(io.BytesIO(data)).size == (16, 16) and img.shape == (16, 16, 3)
    grey = images_lib.decode_image_np(index.read_image(2), image_size=16)
    assert np.abs(grey[..., 0].astype(int) - grey[..., 2]).max() <= 8  # greyscale stays grey in RGB

    # no overwrite without --overwrite: error names the path, old output untouched
    before = (out / "train.rec").read_bytes()
    with caplog.at_level(logging.ERROR):
        rc = convert.main(["--input", f"folder:{root}", "--output", str(out), "--image-size", "8", "--no-progress"])
    assert rc == 2 and str(out) in caplog.text and "--overwrite" in caplog.text
    assert (out / "train.rec").read_bytes() == before
    rc = convert.main(["--input", f"folder:{root}", "--output", str(out), "--image-size", "8", "--overwrite",
                       "--no-progress"])
    assert rc == 0 and insightface_rec.read_insightface(out).image_size == 8


def test_convert_recordio_to_tfds(tmp_path):
    import tensorflow_datasets as tfds

    labels = [2, 0, 1, 0]  # header-less input, labels not grouped
    records = [(k, ref_pack(float(lab), jpeg_bytes(k, size=(20, 20)))) for k, lab in enumerate(labels)]
    records.append((4, ref_pack(1.0, b"\xff\xd8\xff\xe0 truncated")))
    src = write_dataset(tmp_path / "src", records)
    summary = convert.convert_dataset(f"recordio:{src}", tmp_path / "tfds_out", output_format="tfds",
                                      image_size=16, progress=False)
    assert summary["num_images"] == 4 and len(summary["skipped"]) == 1 and "record 4" in summary["skipped"][0]
    builder = tfds.builder_from_directory(str(tmp_path / "tfds_out"))
    assert builder.info.features["label"].num_classes == 3
    got = sorted(int(ex["label"]) for ex in builder.as_dataset(split="train").as_numpy_iterator())
    assert got == sorted(labels)
    ex = next(iter(builder.as_dataset(split="train").as_numpy_iterator()))
    assert ex["image"].shape == (16, 16, 3) and ex["image"].dtype == np.uint8
    # and the same input to insightface RecordIO: images regrouped by label, identity header added
    convert.convert_dataset(f"recordio:{src}", tmp_path / "rec_out", image_size=16, progress=False)
    index = insightface_rec.read_insightface(tmp_path / "rec_out")
    np.testing.assert_array_equal(index.labels, [0, 0, 1, 2])


# ------------------------------------------------------------------------------------------- verification


def make_lfw_layout(root, *, header="2\t2"):
    """LFW layout with greyscale, non-square images; View 2 style header: 2 folds x (2 same + 2 different)."""
    people = {"Ann_A": 3, "Bo_B": 2, "Cy_C": 1}
    for p, n in people.items():
        os.makedirs(root / p)
        for i in range(1, n + 1):
            (root / p / f"{p}_{i:04d}.jpg").write_bytes(
                jpeg_bytes(hash((p, i)) % 1000, size=(30, 40), mode="L"))
    lines = [header, "Ann_A\t1\t2", "Bo_B\t1\t2", "Ann_A\t1\tCy_C\t1", "Bo_B\t2\tCy_C\t1",
             "Ann_A\t2\t3", "Ann_A\t1\t3", "Bo_B\t1\tAnn_A\t3", "Cy_C\t1\tAnn_A\t2"]
    (root / "pairs.txt").write_text("\n".join(lines) + "\n")
    return root


def test_pairs_layout_greyscale_non_square(tmp_path):
    root = make_lfw_layout(tmp_path / "lfwish")
    pairs = verification.read_pairs(root / "pairs.txt")
    assert len(pairs) == 8 and [p.issame for p in pairs] == [True, True, False, False] * 2
    images, issame = verification.load_verification(f"pairs:{root}/pairs.txt:{root}@2,3,28,35", image_size=16)
    assert images.shape == (16, 16, 16, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(issame, [True, True, False, False] * 2)
    direct = images_lib.decode_many([(root / "Cy_C" / "Cy_C_0001.jpg").read_bytes()], image_size=16,
                                    crop=(2, 3, 28, 35))[0]
    np.testing.assert_array_equal(images[5], direct)  # pair 2, second image
    assert not np.array_equal(images[4], images[5])
    assert verification.verification_name(f"pairs:{root}/pairs.txt:{root}") == "lfwish"

    os.remove(root / "Bo_B" / "Bo_B_0002.jpg")
    with pytest.raises(FileNotFoundError, match=r"pairs\.txt line 3 .*Bo_B_0002\.jpg"):
        verification.load_verification(f"pairs:{root}/pairs.txt:{root}", image_size=16)
    (root / "short.txt").write_text("3 2\nAnn_A 1 2\n")
    with pytest.raises(ValueError, match=r"short\.txt.*promises 12 pairs"):
        verification.read_pairs(root / "short.txt")


def test_bin_roundtrip_via_cli(tmp_path, caplog):
    root = make_lfw_layout(tmp_path / "lfwish", header="4")  # View 1 style header
    out = tmp_path / "my.bin"
    argv = ["pairs-to-bin", "--pairs", str(root / "pairs.txt"), "--images", str(root), "--crop", "2,3,28,35",
            "--image-size", "16", "--output", str(out), "--no-progress"]
    assert convert.main(argv) == 0
    with open(out, "rb") as f:
        bins, issame = pickle.load(f, encoding="bytes")  # what insightface's load_bin does
    assert len(bins) == 16 and issame == [True, True, False, False] * 2 and all(b[:2] == b"\xff\xd8" for b in bins)
    images, same = verification.load_verification(f"bin:{out}", image_size=16)
    ref, _ = verification.load_verification(f"pairs:{root}/pairs.txt:{root}@2,3,28,35", image_size=16)
    np.testing.assert_array_equal(same, issame)
    assert np.abs(images.astype(int) - ref).mean() < 3  # JPEG q95 of the same crops
    assert verification.verification_name(f"bin:{out}") == "my"
    with caplog.at_level(logging.ERROR):
        assert convert.main(argv) == 2  # exists, no --overwrite
    assert str(out) in caplog.text


def test_bin_written_by_insightface_style_py2_pickle(tmp_path):
    imgs = [jpeg_bytes(i) for i in range(4)]
    path = tmp_path / "agedb_30.bin"
    with open(path, "wb") as f:  # protocol 2, numpy uint8 arrays and numpy bools, as older scripts wrote them
        pickle.dump(([np.frombuffer(b, np.uint8) for b in imgs[:2]] + imgs[2:], list(np.array([True, False]))), f,
                    protocol=2)
    images, issame = verification.load_verification(f"bin:{path}", image_size=16)
    assert images.shape == (4, 16, 16, 3)
    np.testing.assert_array_equal(issame, [True, False])
    np.testing.assert_array_equal(images[3], images_lib.decode_many([imgs[3]], image_size=16)[0])
    assert verification.verification_name(f"bin:{path}") == "agedb_30"

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    with open(tmp_path / "evil.bin", "wb") as f:
        pickle.dump(([Evil()], []), f)
    with pytest.raises(ValueError, match="refusing"):
        verification.read_bin(tmp_path / "evil.bin")
    with pytest.raises(FileNotFoundError, match="absent.bin"):
        verification.load_verification(f"bin:{tmp_path}/absent.bin")


def test_bin_numpy_arrays_are_rebuilt_from_data_never_by_numpy_s_own_unpickling(tmp_path):
    """The fuzz harness's two .bin findings: a dtype state one field short crashed the interpreter inside NumPy
    (SIGSEGV), and an array whose shape said 57,771,264 made NumPy allocate that before its data replaced it."""
    import tracemalloc

    imgs = [jpeg_bytes(i) for i in range(2)]
    good = pickle.dumps(([np.frombuffer(imgs[0], np.uint8), imgs[1]], np.array([True])), protocol=2)
    path = tmp_path / "a.bin"
    path.write_bytes(good)
    bins, issame = verification.read_bin(path)
    assert bins == imgs and issame.dtype == bool and issame.tolist() == [True]
    assert good.count(b"NNN") == 2  # the two dtype states: (3, '|', None, None, None, -1, -1, 0)
    path.write_bytes(good.replace(b"NNN", b"NN", 1))
    with pytest.raises(ValueError, match=r"a\.bin: not a readable insightface \.bin .*a dtype state"):
        verification.read_bin(path)
    # _reconstruct(ndarray, (0,), b'b'): the placeholder shape, inflated.
    at = good.index(b"K\x00\x85")  # BININT1 0, TUPLE1
    path.write_bytes(good[:at] + b"J" + struct.pack("<i", 57_771_264) + good[at + 2:])
    tracemalloc.start()
    try:
        bins, issame = verification.read_bin(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert bins == imgs and issame.tolist() == [True] and peak < 10 * 2**20, peak


def py2_pickle(bins, issame):
    """Opcodes a Python 2 pickle.dump((bins, issame), f, protocol=2) produces (py2 str = BINSTRING), as in
    insightface's own lfw.bin / agedb_30.bin / cfp_fp.bin."""
    out = b"\x80\x02](" + b"".join(b"T" + struct.pack("<I", len(b)) + b for b in bins) + b"e"
    out += b"](" + b"".join(b"\x88" if s else b"\x89" for s in issame) + b"e"
    return out + b"\x86."


def test_bin_python2_pickle(tmp_path):
    imgs = [jpeg_bytes(i, size=(20, 20)) for i in range(6)]
    path = tmp_path / "lfw.bin"
    path.write_bytes(py2_pickle(imgs, [False, True, True]))
    with open(path, "rb") as f:
        assert pickle.load(f, encoding="bytes") == (imgs, [False, True, True])  # the crafted file is well formed
    images, issame = verification.load_verification(f"bin:{path}", image_size=16)
    assert images.shape == (6, 16, 16, 3)
    np.testing.assert_array_equal(issame, [False, True, True])
    np.testing.assert_array_equal(images[4], images_lib.decode_many([imgs[4]], image_size=16)[0])


def test_bin_corrupt_image_is_named(tmp_path):
    path = tmp_path / "bad.bin"
    verification.write_bin(path, [jpeg_bytes(0), b"garbage"], [True])
    with pytest.raises(images_lib.ImageDecodeError, match=r"bad\.bin\[1\]"):
        verification.load_verification(f"bin:{path}", image_size=16)


def test_verification_names():
    assert verification.verification_name("lfw:/data/lfw") == "lfw"
    assert verification.verification_name("lfw-view2:/data/lfw@1,2,3,4") == "lfw-view2"
    assert verification.verification_name("synthetic:100:3") == "synthetic"
    assert verification.verification_name("bin:/x/cfp_fp.bin") == "cfp_fp"
    assert verification.verification_name("pairs:/x/dev_pairs.txt:/x/imgs") == "dev_pairs"
    with pytest.raises(ValueError, match="unknown verification spec"):
        verification.load_verification("nonsense:1")


def test_real_lfw_pairs(lfw_dir):
    view2 = verification.read_pairs(lfw_dir / "pairs.txt")
    assert len(view2) == 6000 and sum(p.issame for p in view2) == 3000
    assert [p.issame for p in view2[:600]] == [True] * 300 + [False] * 300  # fold 1: 300 same, 300 different
    dev_test = verification.read_pairs(lfw_dir / "pairsDevTest.txt")
    assert len(dev_test) == 1000 and sum(p.issame for p in dev_test) == 500
    paths = verification.pair_image_paths(view2, str(lfw_dir / "lfw-deepfunneled"), pairs_txt="pairs.txt")
    assert len(paths) == 12000 and all(os.path.isfile(p) for p in paths[::97])

    images, issame = verification.load_verification(f"lfw:{lfw_dir}", image_size=32)
    assert images.shape == (2000, 32, 32, 3) and issame.sum() == 500
    p = dev_test[700]
    data = open(verification.image_path(str(lfw_dir / "lfw-deepfunneled"), p.name2, p.index2), "rb").read()
    direct = images_lib.decode_many([data], image_size=32, crop=specs.LFW_CROP)[0]
    slot = 2 * (700 - 500) + 1  # View 1 is interleaved: file pair 700 is the 200th different pair -> pair 401
    np.testing.assert_array_equal(images[2 * slot + 1], direct)  # right file, right crop, right slot
    assert issame[slot - 1] and not issame[slot]
    assert images.std() > 20  # real faces, not blank


def test_synthetic_spec_reaches_the_synthetic_source():
    pytest.importorskip("facekd_jax.data.synthetic")
    images, issame = verification.load_verification("synthetic:6:1", image_size=16)
    assert images.shape == (12, 16, 16, 3) and images.dtype == np.uint8
    assert issame.shape == (6,) and issame.dtype == bool and 0 < issame.sum() < 6


def test_view1_pairs_are_interleaved_so_every_fold_has_both_classes(lfw_dir):
    from facekd_jax.data.verification import load_pairs

    _, issame = load_pairs(str(lfw_dir / "pairsDevTrain.txt"), str(lfw_dir / "lfw-deepfunneled"), image_size=8)
    assert len(issame) == 2200
    for fold in np.array_split(issame, 10):
        assert 0.4 <= fold.mean() <= 0.6
