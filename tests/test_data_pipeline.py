"""Training input pipeline: sources behind spec strings, bad input, determinism, exact resume, process shares,
the synthetic face set.

Images written here have known content (a solid colour per class, a greyscale gradient, a unique grey level per
example), so what comes out of the pipeline is checked against what went in, not against the decoder itself.
"""
import io
import logging
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from fuzzing import protobuf_field
from facekd_jax.data import corrupt_skipped, make_train_dataset, sources, synthetic
from facekd_jax.data import images as images_lib

SIZE = 32
ONE_PROCESS = dict(process_index=0, process_count=1)
COLOURS = [(200, 40, 40), (40, 190, 60), (50, 60, 210), (220, 200, 50)]


def take(batches, n):
    return [next(batches) for _ in range(n)]


def pixels(batch_images):
    """Normalised float images -> uint8 (inverse of (x - 127.5) / 127.5)."""
    return np.clip(np.round(batch_images * 127.5 + 127.5), 0, 255).astype(np.uint8)


def encode(array, fmt, **kw):
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt, **kw)
    return buf.getvalue()


def solid(colour, h=SIZE, w=SIZE):
    return np.broadcast_to(np.array(colour, np.uint8), (h, w, 3)).copy()


def truncated_jpeg():
    data = encode(solid((9, 9, 9), 64, 64) + np.arange(64, dtype=np.uint8)[:, None, None], "JPEG")
    return data[: len(data) // 2]


def mean_colours(batch):
    return pixels(batch["image"]).reshape(len(batch["label"]), -1, 3).mean(axis=1)


def assert_equal_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["label"], y["label"])


# ------------------------------------------------------------------------------------------------ folders


@pytest.fixture
def people(tmp_path):
    """alice: greyscale PGM, non-square PNG, JPEG; bob: 2 JPEGs + a truncated JPEG + notes; a stray file."""
    root = tmp_path / "people"
    (root / "alice").mkdir(parents=True)
    (root / "bob").mkdir()
    grey = np.tile(np.arange(0, 256, 8, dtype=np.uint8), (SIZE, 1))  # 32x32, columns 0, 8, ..., 248
    Image.fromarray(grey, mode="L").save(root / "alice" / "a1.pgm")
    (root / "alice" / "a2.png").write_bytes(encode(solid(COLOURS[0], 24, 40), "PNG"))
    (root / "alice" / "a3.jpg").write_bytes(encode(solid(COLOURS[3]), "JPEG", quality=95))
    (root / "bob" / "b1.jpg").write_bytes(encode(solid(COLOURS[1]), "JPEG", quality=95))
    (root / "bob" / "b2.jpg").write_bytes(encode(solid(COLOURS[2]), "JPEG", quality=95))
    (root / "bob" / "b3.jpg").write_bytes(truncated_jpeg())
    (root / "bob" / "notes.txt").write_text("not an image")
    (root / "README.txt").write_text("stray file beside the person folders")
    return root, grey


def identify(img, grey):
    """Which file of the `people` fixture an output image (uint8 [S, S, 3]) is."""
    if (img[..., 0] == img[..., 1]).all() and (img[..., 1] == img[..., 2]).all() and img.std() > 20:
        np.testing.assert_array_equal(img[..., 0], grey)  # the PGM: exact pixels, greyscale as RGB
        return "a1.pgm"
    names = {"a2.png": COLOURS[0], "a3.jpg": COLOURS[3], "b1.jpg": COLOURS[1], "b2.jpg": COLOURS[2]}
    mean = img.reshape(-1, 3).mean(0)
    name = min(names, key=lambda k: np.abs(mean - names[k]).max())
    assert np.abs(img.astype(int) - names[name]).max() <= 8, (name, mean)
    return name


# Both ways to get pixels of an indexed source: decoded on every step, and decoded once into memory.
DECODING = {"every_step": dict(decode_once_max_bytes=0), "once": {}}


@pytest.mark.parametrize("decoding", DECODING)
def test_folder_greyscale_non_square_stray_and_corrupt(people, caplog, decoding):
    root, grey = people
    before = corrupt_skipped()
    caplog.set_level(logging.WARNING)
    batches, info = make_train_dataset(f"folder:{root}", batch_size=4, image_size=SIZE, augment=False,
                                       **ONE_PROCESS, **DECODING[decoding])
    assert info["num_classes"] == 2 and info["num_images"] == 6 and not info["synthetic"]
    seen = []
    for batch in take(batches, 3):  # 12 examples = 2 epochs of the 6 listed files
        assert batch["image"].shape == (4, SIZE, SIZE, 3) and batch["image"].dtype == np.float32
        assert batch["label"].dtype == np.int32
        assert -1.0 <= batch["image"].min() and batch["image"].max() <= 1.0
        for img, label in zip(pixels(batch["image"]), batch["label"]):
            name = identify(img, grey)
            assert label == (0 if name.startswith("a") else 1), name
            seen.append(name)
    # The truncated b3.jpg (index 5) is replaced by the next example in index order, a1.pgm (index 0).
    counts = {n: seen.count(n) for n in set(seen)}
    assert counts == {"a1.pgm": 4, "a2.png": 2, "a3.jpg": 2, "b1.jpg": 2, "b2.jpg": 2}
    bad = str(root / "bob" / "b3.jpg")
    # Decoding every step counts each encounter (prefetching may have met it again); decoding once, once.
    assert corrupt_skipped() - before == 1 if decoding == "once" else corrupt_skipped() - before >= 2
    assert set(images_lib.CORRUPT.names[before:]) == {bad}
    assert any(bad in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("decoding", DECODING)
def test_folder_resume_with_a_corrupt_file(people, decoding):
    root, _ = people
    spec = f"folder:{root}"
    kw = dict(batch_size=4, image_size=SIZE, seed=5, **ONE_PROCESS, **DECODING[decoding])
    full = take(make_train_dataset(spec, **kw)[0], 5)
    tail = take(make_train_dataset(spec, start_step=2, **kw)[0], 3)
    assert_equal_batches(full[2:], tail)


def test_decoding_once_gives_the_batches_of_decoding_every_step_and_decodes_once(people, monkeypatch):
    """Same images, labels, flips and teacher rows (a corrupt file's replacement brings its own label and teacher
    row); a second pipeline over the same data in the process decodes nothing."""
    from facekd_jax.data import pipeline

    root, _ = people
    spec = f"folder:{root}"
    teacher = np.random.default_rng(0).normal(size=(6, 2, 5)).astype(np.float32)
    kw = dict(batch_size=4, image_size=SIZE, seed=2, start_step=1, teacher_embeddings=teacher, **ONE_PROCESS)
    every = take(make_train_dataset(spec, decode_once_max_bytes=0, **kw)[0], 6)
    traced = []
    decode = images_lib.decode_image_tf
    monkeypatch.setattr(images_lib, "decode_image_tf", lambda *a, **k: traced.append(1) or decode(*a, **k))
    once = take(make_train_dataset(spec, **kw)[0], 6)
    assert traced, "the first pipeline decodes"
    for a, b in zip(every, once):
        assert set(a) == set(b) == {"image", "label", "teacher_embedding"}
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    traced.clear()
    again = take(make_train_dataset(spec, **kw)[0], 6)
    assert not traced, "decoded again"
    assert_equal_batches(once, again)
    # Too large for the limit: decoded every step, as before.
    assert pipeline.DECODE_ONCE_MAX_BYTES >= 6 * SIZE * SIZE * 3
    make_train_dataset(spec, decode_once_max_bytes=6 * SIZE * SIZE * 3 - 1, **kw)
    assert traced


def test_folder_crop_box(tmp_path):
    img = solid((20, 20, 20), 40, 40)
    img[10:30, 5:25] = (250, 120, 0)  # the face box: left 5, top 10, right 25, bottom 30
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "x.png").write_bytes(encode(img, "PNG"))
    (tmp_path / "q").mkdir()
    (tmp_path / "q" / "y.png").write_bytes(encode(img, "PNG"))
    batch = next(make_train_dataset(f"folder:{tmp_path}@5,10,25,30", batch_size=2, image_size=SIZE,
                                    **ONE_PROCESS)[0])
    assert (pixels(batch["image"]) == np.array([250, 120, 0], np.uint8)).all()


# ------------------------------------------------------------------------------------ determinism and resume


SYN = "synthetic:6:5"  # 30 images: batches of 8 cross epoch boundaries


def test_same_seed_same_batches_other_seed_differs():
    kw = dict(batch_size=8, image_size=SIZE, **ONE_PROCESS)
    a = take(make_train_dataset(SYN, seed=1, **kw)[0], 4)
    b = take(make_train_dataset(SYN, seed=1, **kw)[0], 4)
    c = take(make_train_dataset(SYN, seed=2, **kw)[0], 4)
    assert_equal_batches(a, b)
    assert not all(np.array_equal(x["label"], y["label"]) for x, y in zip(a, c))


@pytest.mark.parametrize("start", [3, 7])
def test_resume_at_step_k_equals_the_tail(start):
    kw = dict(batch_size=8, image_size=SIZE, seed=3, **ONE_PROCESS)
    full = take(make_train_dataset(SYN, **kw)[0], start + 3)
    tail = take(make_train_dataset(SYN, start_step=start, **kw)[0], 3)
    assert_equal_batches(full[start:], tail)


def test_epochs_are_permutations_and_flip_is_only_a_mirror():
    n, per_class = 30, 5
    rendered = synthetic.render(np.arange(n) // per_class, np.arange(n) % per_class, image_size=SIZE).astype(int)

    def lookup(img):
        # Within 1 grey level: render() runs the same ops outside tf.data, where kernels may round differently.
        err = np.abs(rendered - img).reshape(n, -1).max(axis=1)
        assert np.sort(err)[0] <= 1 < np.sort(err)[1]
        return int(err.argmin())

    kw = dict(batch_size=8, image_size=SIZE, seed=4, **ONE_PROCESS)
    plain = take(make_train_dataset(SYN, augment=False, **kw)[0], 15)  # 120 positions = 4 epochs
    flipped = take(make_train_dataset(SYN, augment=True, **kw)[0], 15)
    order, mirrored = [], 0
    for p, f in zip(plain, flipped):
        for img, aug, label in zip(pixels(p["image"]), pixels(f["image"]), p["label"]):
            i = lookup(img)  # every output is one rendered (identity, sample) image
            assert label == i // per_class
            order.append(i)
            if not np.array_equal(aug, img):
                np.testing.assert_array_equal(aug, img[:, ::-1])
                mirrored += 1
    for e in range(4):
        assert sorted(order[e * n:(e + 1) * n]) == list(range(n))
    assert order[:n] != order[n:2 * n]  # reshuffled every epoch
    assert 30 <= mirrored <= 90  # about half of 120 (fails for flips never, or always)


def test_process_shares_make_the_global_batch():
    one = take(make_train_dataset(SYN, batch_size=12, image_size=SIZE, seed=9, process_index=0,
                                  process_count=1)[0], 4)
    shares = [take(make_train_dataset(SYN, batch_size=6, image_size=SIZE, seed=9, process_index=p,
                                      process_count=2)[0], 4) for p in (0, 1)]
    for t in range(4):
        np.testing.assert_array_equal(np.concatenate([shares[0][t]["image"], shares[1][t]["image"]]),
                                      one[t]["image"])
        np.testing.assert_array_equal(np.concatenate([shares[0][t]["label"], shares[1][t]["label"]]),
                                      one[t]["label"])
        assert not np.array_equal(shares[0][t]["image"], shares[1][t]["image"])


# ------------------------------------------------------------------------------------------------ synthetic


def test_synthetic_image_is_a_function_of_identity_and_index():
    a = synthetic.render([1, 2, 3], [0, 4, 0], image_size=SIZE)
    np.testing.assert_array_equal(a[1], synthetic.render([2], [4], image_size=SIZE)[0])
    faces = synthetic.SyntheticFaces(4, 4, image_size=SIZE)
    other = synthetic.SyntheticFaces(8, 2, image_size=SIZE)
    expected = synthetic.render([2], [1], image_size=SIZE)[0]
    # Identity 2, image 1 is example 9 of a 4 x 4 set and example 5 of an 8 x 2 set: the same picture.
    np.testing.assert_array_equal(faces.images_tf(tf.constant([9], tf.int64)).numpy()[0], expected)
    np.testing.assert_array_equal(other.images_tf(tf.constant([5], tf.int64)).numpy()[0], expected)
    assert a.dtype == np.uint8 and a.shape == (3, SIZE, SIZE, 3)
    assert not np.array_equal(a[0], a[2])  # other identity
    same_person = synthetic.render([1, 1], [0, 1], image_size=SIZE)
    assert np.abs(same_person[0].astype(int) - same_person[1]).mean() > 5  # nuisance: not a copy
    other_world = synthetic.render([1], [0], image_size=SIZE, seed=1)
    assert not np.array_equal(other_world[0], a[0])


def test_synthetic_spec_and_log(caplog):
    assert synthetic.parse_spec("synthetic") == (64, 64, 0)
    assert synthetic.parse_spec("synthetic:10:3:7") == (10, 3, 7)
    for bad in ("synthetic:1:5", "synthetic:x:5", "synthetic:5"):
        with pytest.raises(ValueError, match="synthetic"):
            synthetic.parse_spec(bad)
    caplog.set_level(logging.WARNING)
    _, info = make_train_dataset("synthetic:5:2", batch_size=2, image_size=SIZE, **ONE_PROCESS)
    assert info["synthetic"] and info["num_classes"] == 5 and info["num_images"] == 10
    assert any("SYNTHETIC" in r.getMessage() for r in caplog.records)


def test_verification_pairs_disjoint_balanced_deterministic(monkeypatch):
    images, issame = synthetic.verification_pairs(20, image_size=SIZE, seed=0)
    again, _ = synthetic.verification_pairs(20, image_size=SIZE, seed=0)
    other, _ = synthetic.verification_pairs(20, image_size=SIZE, seed=1)
    assert images.shape == (40, SIZE, SIZE, 3) and images.dtype == np.uint8 and issame.dtype == bool
    assert issame.sum() == 10 and issame[0::2].all() and not issame[1::2].any()  # balanced in every fold
    np.testing.assert_array_equal(images, again)
    assert not np.array_equal(images, other)
    assert all(not np.array_equal(images[2 * k], images[2 * k + 1]) for k in range(20))
    calls = []
    real = synthetic.render
    monkeypatch.setattr(synthetic, "render", lambda i, s, **kw: calls.append((np.array(i), np.array(s))) or
                        real(i, s, **kw))
    synthetic.verification_pairs(50, image_size=SIZE, seed=3)
    ids, samples = calls[0]
    assert ids.min() >= synthetic.VERIFICATION_IDENTITY_OFFSET  # never a training identity
    same = ids[0::2] == ids[1::2]
    np.testing.assert_array_equal(same, np.arange(50) % 2 == 0)
    assert (samples[0::2] != samples[1::2]).all()


# ------------------------------------------------------------------------------------------ record formats


def write_tfrecord(path, items, image_key="image", label_key="label"):
    with tf.io.TFRecordWriter(str(path)) as w:
        for data, label in items:
            ex = tf.train.Example(features=tf.train.Features(feature={
                image_key: tf.train.Feature(bytes_list=tf.train.BytesList(value=[data])),
                label_key: tf.train.Feature(int64_list=tf.train.Int64List(value=[label]))}))
            w.write(ex.SerializeToString())


def colour_items(n_per_class=3):
    return [(encode(solid(COLOURS[c]), "JPEG", quality=95), c) for c in range(len(COLOURS))
            for _ in range(n_per_class)]


def assert_colours_match_labels(batch):
    for mean, label in zip(mean_colours(batch), batch["label"]):
        assert np.abs(mean - COLOURS[label]).max() <= 8, (mean, label)


def test_tfrecord_source_keys_corrupt_and_determinism(tmp_path, caplog):
    items = colour_items()
    write_tfrecord(tmp_path / "a.tfrecord", items[:6], "image/encoded", "image/class/label")
    # A truncated JPEG (found while decoding) and one whose header TensorFlow accepts but whose body it cannot
    # decode (the pipeline fails on it; found, named once and dropped, the stream restarted without it).
    write_tfrecord(tmp_path / "b.tfrecord", items[6:] + [(truncated_jpeg(), 0), (corrupt_body_jpeg(), 1)],
                   "image/encoded", "image/class/label")
    spec = f"tfrecord:{tmp_path}/*.tfrecord"
    before, named = corrupt_skipped(), len(images_lib.CORRUPT.names)
    caplog.set_level(logging.WARNING)
    batches, info = make_train_dataset(spec, batch_size=4, image_size=SIZE, shuffle_buffer=8, **ONE_PROCESS)
    assert info["num_images"] == 14 and info["num_classes"] == 4
    got = take(batches, 7)  # > 2 epochs
    for batch in got:
        assert_colours_match_labels(batch)
    assert corrupt_skipped() - before >= 2
    assert any("b.tfrecord:record 6" in r.getMessage() for r in caplog.records)
    assert images_lib.CORRUPT.names[named:].count(f"{tmp_path}/b.tfrecord:record 7") == 1
    again = take(make_train_dataset(spec, batch_size=4, image_size=SIZE, shuffle_buffer=8, **ONE_PROCESS)[0], 7)
    assert_equal_batches(got, again)


def test_a_tfrecord_example_that_only_tensorflows_lenient_parser_accepts_is_named(tmp_path):
    """An Example whose Features length runs 8 bytes past its message, with valid CRCs: TensorFlow's fast parser
    (tf.io.parse_example) yields an image and a label from it, protobuf refuses it. Found by the fuzz harness (6
    in 1,000 mutants)."""
    image = encode(solid(COLOURS[0]), "PNG") + bytes(200)  # over 128 bytes: the lengths are two-byte varints
    f = protobuf_field
    image_entry = f(1, f(1, b"image") + f(2, f(1, f(1, image))))            # feature map entry: bytes_list
    label_entry = f(1, f(1, b"label") + f(2, f(3, f(1, bytes([1])))))        # int64_list, packed
    good = f(1, image_entry + label_entry)  # Example{features{feature map}}
    assert tf.train.Example.FromString(good).features.feature["label"].int64_list.value == [1]
    bad = bytearray(good)
    bad[1] += 8  # the low byte of Example.features's length
    bad = bytes(bad)
    spec = {"image": tf.io.FixedLenFeature([], tf.string), "label": tf.io.FixedLenFeature([], tf.int64)}
    assert tf.io.parse_example([bad], spec)["label"].numpy().tolist() == [1]  # the leniency this guards against
    with pytest.raises(Exception):
        tf.train.Example.FromString(bad)
    write_tfrecord(tmp_path / "a.tfrecord", colour_items(1))
    with tf.io.TFRecordWriter(str(tmp_path / "b.tfrecord")) as w:
        w.write(good)
        w.write(bad)
    with pytest.raises(ValueError, match=rf"{tmp_path}/b.tfrecord: record 1: not a tf.train.Example"):
        make_train_dataset(f"tfrecord:{tmp_path}/*.tfrecord", batch_size=2, image_size=SIZE, **ONE_PROCESS)
    # A record without its image is named the same way, by file and record.
    with tf.io.TFRecordWriter(str(tmp_path / "b.tfrecord")) as w:
        w.write(good)
        w.write(f(1, label_entry))
    with pytest.raises(ValueError, match=r"b.tfrecord: record 1: feature 'image' is not one bytes value"):
        make_train_dataset(f"tfrecord:{tmp_path}/*.tfrecord", batch_size=2, image_size=SIZE, **ONE_PROCESS)
    # And a negative label.
    write_tfrecord(tmp_path / "b.tfrecord", [(image, 2), (image, -3)])
    with pytest.raises(ValueError, match=r"b.tfrecord: record 1: negative label -3"):
        make_train_dataset(f"tfrecord:{tmp_path}/*.tfrecord", batch_size=2, image_size=SIZE, **ONE_PROCESS)


def test_tfrecord_data_in_a_bucket_is_read_through_tensorflows_file_systems(tmp_path):
    """tfrecord:URL specs pass the local-path check and train from the URL; TensorFlow's in-memory ram:// file
    system stands in for gs:// (both go through tf.io.gfile)."""
    from facekd_jax import train
    from runs import tiny_config

    bucket = f"ram://bucket-{tmp_path.name}/faces"
    tf.io.gfile.makedirs(bucket)
    items = colour_items()
    write_tfrecord(f"{bucket}/a.tfrecord", items[:6])
    write_tfrecord(f"{bucket}/b.tfrecord", items[6:])
    config = tiny_config("baseline_resnet56")
    config.data.root = bucket
    config.data.train = "tfrecord:{root}/*.tfrecord"
    spec, _ = train.data_specs(config)  # no NonLocalPathError
    batches, info = make_train_dataset(spec, batch_size=4, image_size=SIZE, shuffle_buffer=8, **ONE_PROCESS)
    assert info["num_images"] == 12 and info["num_classes"] == 4 and bucket in info["source"]
    seen = set()
    for batch in take(batches, 3):  # one epoch
        assert_colours_match_labels(batch)
        seen.update(batch["label"].tolist())
    assert seen == {0, 1, 2, 3}


def test_tfrecord_resume(tmp_path):
    grey = [(encode(solid((10 * i,) * 3), "PNG"), i % 3) for i in range(20)]
    write_tfrecord(tmp_path / "x.tfrecord", grey[:10])
    write_tfrecord(tmp_path / "y.tfrecord", grey[10:])
    spec = f"tfrecord:{tmp_path}/*.tfrecord"
    kw = dict(batch_size=4, image_size=SIZE, seed=2, shuffle_buffer=6, **ONE_PROCESS)
    full = take(make_train_dataset(spec, **kw)[0], 9)
    tail = take(make_train_dataset(spec, start_step=6, **kw)[0], 3)
    assert_equal_batches(full[6:], tail)
    levels = [int(round(m[0])) // 10 for b in full[:5] for m in mean_colours(b)]
    assert sorted(levels) == sorted(list(range(20)))  # the first epoch holds every example once


def test_tfds_directory_and_process_split(tmp_path):
    from facekd_jax.data import convert

    out = tmp_path / "faces_tfds"
    items = [(encode(solid((20 * i,) * 3), "PNG"), i % 3) for i in range(12)]
    convert.write_tfds(str(out), iter(items), num_classes=3, image_size=SIZE)
    spec = f"tfds:{out}"
    batches, info = make_train_dataset(spec, batch_size=3, image_size=SIZE, shuffle_buffer=4, **ONE_PROCESS)
    assert info["num_images"] == 12 and info["num_classes"] == 3
    first = take(batches, 6)
    again = take(make_train_dataset(spec, batch_size=3, image_size=SIZE, shuffle_buffer=4, **ONE_PROCESS)[0], 6)
    assert_equal_batches(first, again)
    tail = take(make_train_dataset(spec, batch_size=3, image_size=SIZE, shuffle_buffer=4, start_step=3,
                                   **ONE_PROCESS)[0], 3)
    assert_equal_batches(first[3:], tail)
    first = first[:4]
    levels = [int(round(m[0] / 20)) for b in first for m in mean_colours(b)]
    assert sorted(levels) == list(range(12))
    labels = np.concatenate([b["label"] for b in first])
    np.testing.assert_array_equal(labels, np.array(levels) % 3)
    shares = []
    for p in (0, 1):
        b = take(make_train_dataset(spec, batch_size=3, image_size=SIZE, shuffle_buffer=4, process_index=p,
                                    process_count=2)[0], 2)
        shares.append({int(round(m[0] / 20)) for x in b for m in mean_colours(x)})
    assert not shares[0] & shares[1] and shares[0] | shares[1] == set(range(12))
    half, info = make_train_dataset(f"{spec}:train[:50%]", batch_size=3, image_size=SIZE, **ONE_PROCESS)
    assert info["num_images"] == 6
    epochs = [[int(round(m[0] / 20)) for b in take(half, 2) for m in mean_colours(b)] for _ in range(2)]
    assert len(set(epochs[0])) == 6 and set(epochs[0]) == set(epochs[1])  # the same half, every epoch


def test_tfds_text_labels_map_through_sorted_vocabulary(tmp_path):
    """The catalog's lfw has Text labels (person names): they become ints in sorted-name order."""
    import tensorflow_datasets as tfds

    names = ["zed", "amy", "bob"]
    examples = [(i, {"image": encode(solid((20 * i,) * 3), "PNG"), "label": names[i % 3]}) for i in range(9)]
    features = tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(SIZE, SIZE, 3), encoding_format="png"), "label": tfds.features.Text()})
    try:
        builder = tfds.dataset_builders.store_as_tfds_dataset(
            name="faces_text", version="1.0.0", features=features, split_datasets={"train": examples},
            data_dir=str(tmp_path))
    except Exception as e:  # an optional TFDS helper dependency missing on this machine
        pytest.skip(f"tfds.dataset_builders.store_as_tfds_dataset unavailable here: {e!r}")
    batches, info = make_train_dataset(f"tfds:{builder.data_dir}", batch_size=3, image_size=SIZE, **ONE_PROCESS)
    assert info["num_classes"] == 3 and info["num_images"] == 9
    vocab = sorted(names)
    for batch in take(batches, 3):
        for mean, label in zip(mean_colours(batch), batch["label"]):
            i = int(round(mean[0] / 20))
            assert label == vocab.index(names[i % 3])


def test_recordio_source(tmp_path, caplog):
    from facekd_jax.data import insightface_rec

    items = colour_items(2)
    items.insert(2, (truncated_jpeg(), 1))  # labels stay grouped: 0 0 1(corrupt) 1 1 2 2 3 3
    items[2], items[3] = items[3], items[2]
    items = sorted(items, key=lambda x: x[1])
    insightface_rec.write_insightface(str(tmp_path), iter(items), num_classes=4, image_size=SIZE)
    caplog.set_level(logging.WARNING)
    before = corrupt_skipped()
    batches, info = make_train_dataset(f"recordio:{tmp_path}", batch_size=3, image_size=SIZE, **ONE_PROCESS)
    assert info["num_images"] == 9 and info["num_classes"] == 4
    for batch in take(batches, 6):
        assert_colours_match_labels(batch)
    assert corrupt_skipped() > before
    assert any("train.rec record" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------------------------------------ LFW, errors


def test_lfw_training_people_never_in_dev_test(lfw_dir):
    src = sources.open_source(f"lfw:{lfw_dir}", image_size=SIZE)
    from facekd_jax.data import lfw_dev
    people = lfw_dev.read_people(str(lfw_dir / "peopleDevTrain.txt"))
    held_out = lfw_dev.held_out(str(lfw_dir))  # the development split's people
    assert src.num_classes == sum(1 for name, n in people if n >= 2 and name not in held_out)
    test_names = set()
    for line in (lfw_dir / "pairsDevTest.txt").read_text().splitlines()[1:]:
        fields = line.split()
        test_names.update([fields[0]] if len(fields) == 3 else [fields[0], fields[2]])
    assert not set(src.class_names) & test_names
    assert np.bincount(src.labels).min() >= 2
    batch = next(make_train_dataset(f"lfw:{lfw_dir}", batch_size=4, image_size=SIZE, **ONE_PROCESS)[0])
    assert batch["image"].shape == (4, SIZE, SIZE, 3) and batch["label"].max() < src.num_classes


def test_bad_specs(tmp_path):
    with pytest.raises(ValueError, match="synthetic.*folder:DIR"):
        make_train_dataset("nonsense:x", batch_size=2, **ONE_PROCESS)
    with pytest.raises(FileNotFoundError, match="missing"):
        make_train_dataset(f"folder:{tmp_path}/missing", batch_size=2, **ONE_PROCESS)
    with pytest.raises(FileNotFoundError, match="no TFRecord"):
        make_train_dataset(f"tfrecord:{tmp_path}/*.none", batch_size=2, **ONE_PROCESS)


@pytest.mark.parametrize("decoding", DECODING)
def test_interpreter_exits_with_a_live_python_calling_pipeline(people, decoding):
    """A pipeline that calls Python (Pillow for PGM; the gather from decoded images) must not hang at exit with
    its iterator still alive."""
    root, _ = people
    code = textwrap.dedent(f"""
        from facekd_jax.data import make_train_dataset
        batches, _ = make_train_dataset("folder:{root}", batch_size=4, image_size=16, process_index=0,
                                        process_count=1, **{DECODING[decoding]!r})
        next(batches)
        print("ok")
    """)
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="3")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180, env=env,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-2000:]


def corrupt_body_jpeg():
    """A JPEG with its start and end markers intact and garbage in its entropy-coded body: TensorFlow's fast
    decoder accepts the header, then fails ("Unsupported marker type")."""
    rng = np.random.default_rng(0)
    data = bytearray(encode(rng.uniform(0, 255, (64, 64, 3)).astype(np.uint8), "JPEG"))
    for i in rng.integers(700, len(data) - 10, 200):
        data[i] = int(rng.integers(0, 256))
    return bytes(data)


@pytest.mark.slow
@pytest.mark.parametrize("decoding", DECODING)
def test_images_tensorflow_cannot_decode_are_skipped_named_once_and_never_hang(tmp_path, decoding):
    """A corrupt-body JPEG and a truncated PNG (headers intact) in a folder: every batch is full, each bad file is
    named once over several epochs, and training through main finishes (no hang at exit)."""
    root = tmp_path / "faces"
    for person, colour in (("ann", COLOURS[0]), ("bob", COLOURS[1])):
        (root / person).mkdir(parents=True)
        for k in range(4):
            (root / person / f"{person}{k}.png").write_bytes(encode(solid(colour), "PNG"))
    (root / "ann" / "ann_bad.jpg").write_bytes(corrupt_body_jpeg())
    png = encode(solid(COLOURS[1], 64, 64) + np.arange(64, dtype=np.uint8)[:, None, None], "PNG")
    (root / "bob" / "bob_bad.png").write_bytes(png[: len(png) // 2])
    with pytest.raises(tf.errors.OpError):  # really undecodable by TensorFlow, headers intact
        tf.io.decode_image(corrupt_body_jpeg(), channels=3)
    before = len(images_lib.CORRUPT.names)
    batches, info = make_train_dataset(f"folder:{root}", batch_size=4, image_size=SIZE, augment=False,
                                       **ONE_PROCESS, **DECODING[decoding])
    assert info["num_images"] == 10
    for batch in take(batches, 10):  # 40 examples: 4 epochs
        assert batch["image"].shape == (4, SIZE, SIZE, 3)
        for img, label in zip(mean_colours(batch), batch["label"]):
            np.testing.assert_allclose(img, COLOURS[int(label)], atol=3)  # never a bad file's pixels
    batches.close()
    named = images_lib.CORRUPT.names[before:]
    assert sorted(named) == sorted([str(root / "ann" / "ann_bad.jpg"), str(root / "bob" / "bob_bad.png")]), named
    if decoding != "once":
        return  # the command line below decodes a set this small once
    # The same data through the command line: it trains, evaluates and exits (bounded by the timeout).
    from runs import run_main
    proc = run_main("configs/baseline_resnet56.py", tmp_path / "run",
                    {"data.train": f"folder:{root}", "batch_size": 4, "data.val_targets": "('synthetic:20',)",
                     "eval_batch_size": 20, "num_train_steps": 8}, timeout=240)
    assert "ann_bad.jpg" in proc.stderr and "bob_bad.png" in proc.stderr
