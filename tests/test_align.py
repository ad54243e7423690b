"""Face alignment: facekd_jax.data.align (Umeyama similarity, warpAffine-style warp) checked against independent
transcriptions, and facekd_jax.data.shape_predictor (dlib's 5-point landmark model in NumPy, dlib's face chip)
checked against the real model file and against dlib itself on real LFW faces.

The reader tests need face_recognition_models (the .dat); the parity tests also need dlib (dlib-bin) and
../shared/data/lfw; each skips with the reason where its part is absent. The align.py tests need none of them.
"""
import os
import tracemalloc

import numpy as np
import pytest

from facekd_jax.data import align
from facekd_jax.data.align import (DLIB_MEAN_FACE_5, align_with_dlib, arcface_template_for_dlib, dlib_chip_transform,
                                   dlib_face_chip)
from facekd_jax.data.shape_predictor import (SHAPE_PREDICTOR_FILE, ShapePredictorFormatError, find_shape_predictor,
                                             read_shape_predictor)
from facekd_jax import paths

# What shape_predictor_5_face_landmarks.dat declares (dlib's trainer: cascade depth 15, 500 trees of depth 4).
EXPECTED_COUNTS = {"parts": 5, "levels": 15, "trees_per_level": 500, "splits_per_tree": 15, "leaves_per_tree": 16,
                   "tree_depth": 4, "feature_pixels": 800}
N_FACES = 8
FIXED_BOX = (68, 77, 184, 193)   # the face in LFW's 250x250 deep-funnelled images (dlib_format.DLIB_CROP)


def _dlib_ints(data: bytes, pos: int, count: int):
    """`count` dlib integers from byte `pos` (control byte: low 4 bits = value bytes, 0x80 = negative; then the
    value, little-endian) -> (values, next pos). Written here apart from the reader, to check what it reports."""
    values = []
    for _ in range(count):
        control = data[pos]
        size = control & 0x0F
        value = int.from_bytes(data[pos + 1:pos + 1 + size], "little")
        values.append(-value if control & 0x80 else value)
        pos += 1 + size
    return values, pos


@pytest.fixture(scope="module")
def model_path():
    try:
        return find_shape_predictor()
    except FileNotFoundError as e:
        pytest.skip(f"dlib's 5-point landmark model is not installed: {e}")


@pytest.fixture(scope="module")
def raw(model_path):
    with open(model_path, "rb") as fh:
        return fh.read()


@pytest.fixture(scope="module")
def predictor(model_path):
    return read_shape_predictor(model_path)


# --- the reader ---------------------------------------------------------------------------------------------------


def test_reader_counts_equal_what_the_file_declares(predictor, raw):
    assert predictor.counts() == EXPECTED_COUNTS
    assert predictor.sections["end"] == len(raw)   # consumed exactly to the end
    # The file's own declarations, decoded here independently of the reader.
    (version, rows, cols), pos = _dlib_ints(raw, 0, 3)
    assert (version, rows, cols) == (1, -10, -1)   # version 1, a [10, 1] matrix: 5 (x, y) points
    pairs, pos = _dlib_ints(raw, pos, 20)
    mean_shape = np.float32([m * 2.0 ** e for m, e in zip(pairs[::2], pairs[1::2])]).reshape(5, 2)
    np.testing.assert_array_equal(predictor.initial_shape, mean_shape)
    assert np.all((mean_shape > 0) & (mean_shape < 1))   # inside the box's unit square
    assert pos == predictor.sections["forests"]
    assert _dlib_ints(raw, pos, 3)[0] == [15, 500, 15]   # levels, trees of level 0, splits of its tree 0
    assert _dlib_ints(raw, predictor.sections["anchor_idx"], 2)[0] == [15, 800]   # vectors, pixels of level 0
    assert _dlib_ints(raw, predictor.sections["deltas"], 2)[0] == [15, 800]
    for level in predictor.levels:
        assert level.splits.shape == (500, 15, 2) and level.thresholds.shape == (500, 15)
        assert level.leaves.shape == (500, 16, 5, 2) and level.anchors.shape == (800,)
        assert level.deltas.shape == (800, 2)
        assert level.splits.min() >= 0 and level.splits.max() < 800 and level.anchors.max() < 5
        assert np.all(np.isfinite(level.thresholds)) and np.all(np.isfinite(level.leaves))


@pytest.mark.parametrize("keep", ["5", "in_level_0", "half", "all_but_3"])
def test_truncated_file_names_the_offset(raw, predictor, tmp_path, keep):
    n = {"5": 5, "in_level_0": predictor.sections["forests"] + 20001, "half": len(raw) // 2,
         "all_but_3": len(raw) - 3}[keep]
    path = tmp_path / SHAPE_PREDICTOR_FILE
    path.write_bytes(raw[:n])
    if keep == "all_but_3":
        # The last level's 800 pixel deltas no longer fit: their count is refused where it stands.
        pattern = (rf"{SHAPE_PREDICTOR_FILE}: at byte \d+: expected the number of pixel deltas of cascade level 14, "
                   r"one per anchor \(at most 799: what the remaining \d+ bytes can hold\), found 800")
    else:
        pattern = rf"{SHAPE_PREDICTOR_FILE}: truncated at byte {n} while reading .+ from byte \d+ \(needed"
    with pytest.raises(ShapePredictorFormatError, match=pattern):
        read_shape_predictor(path)


def test_foreign_and_damaged_files_say_what_was_expected(raw, predictor, tmp_path):
    path = tmp_path / "model.dat"

    def error(data: bytes) -> str:
        path.write_bytes(data)
        with pytest.raises(ShapePredictorFormatError) as info:
            read_shape_predictor(path)
        assert str(path) in str(info.value)
        return str(info.value)

    assert "at byte 0: expected the shape_predictor version 1, found 2" in error(raw[:1] + b"\x02" + raw[2:100])
    assert "at byte 0: expected the shape_predictor version (a dlib integer: control byte 0x01..0x08 or " \
           "0x81..0x88), found 0x89" in error(b"\x89PNG\r\n\x1a\n" + bytes(200))
    # Another dlib file (the face-descriptor network): version 1, then a string where the mean shape should be.
    assert "at byte 4: expected the initial shape's columns (a dlib integer" in \
        error(b"\x01\x01\x01\x0dloss_metric_2" + bytes(40))
    assert f"at byte {len(raw)}: expected the end of the file after 15 pixel delta vectors, found 2 more bytes" in \
        error(raw + b"\x01\x00")
    forests = predictor.sections["forests"]
    assert raw[forests:forests + 10] == b"\x01\x0f\x02\xf4\x01\x01\x0f\x02\x5a\x01"   # 15, 500, 15, idx1 346
    # A split pointing past the level's 800 feature pixels (same length, so everything else stays in place).
    at = forests + 7
    assert f"at byte {at}: expected split 0 of tree 0 of cascade level 0's idx1 (a feature pixel below 800), " \
           "found 32767" in error(raw[:at] + b"\x02\xff\x7f" + raw[at + 3:])
    # A tree that is not complete (14 splits cannot make a full binary tree).
    at = forests + 5
    assert f"at byte {at}: expected the number of splits of tree 0 of cascade level 0 (2**depth - 1: a complete " \
           "tree), found 14" in error(raw[:at] + b"\x01\x0e" + raw[at + 2:at + 50_000])


@pytest.mark.parametrize("field,offset,length", [("cascade levels", 0, 2), ("trees of cascade level 0", 2, 3)])
def test_inflated_count_is_refused_before_allocating(raw, predictor, tmp_path, field, offset, length):
    at = predictor.sections["forests"] + offset
    inflated = tmp_path / "inflated.dat"
    # 2**28 where 15 or 500 stood, in the first 200 kB of the file (the rest does not change what is refused).
    data = raw[:at] + b"\x04\x00\x00\x00\x10" + raw[at + length:200_000]
    inflated.write_bytes(data)
    tracemalloc.start()
    try:
        with pytest.raises(ShapePredictorFormatError, match=rf"at byte {at}: expected the number of {field} \(at "
                                                            r"most \d+: what the remaining \d+ bytes can hold\), "
                                                            r"found 268435456"):
            read_shape_predictor(inflated)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Refused before anything the size of the count (2**28 items: gigabytes) was allocated: the peak is what
    # decoding the file takes (about 19 times its size, measured: the integer chain's index arrays).
    assert peak < 25 * len(data)


def test_missing_package_names_the_install_command(monkeypatch):
    monkeypatch.setattr(paths.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=rf"{SHAPE_PREDICTOR_FILE} not found: pip install "
                                                r"'facekd_jax\[teachers\]'"):
        find_shape_predictor()


# --- landmarks: parity with dlib on real LFW faces ----------------------------------------------------------------


@pytest.fixture(scope="module")
def dlib():
    return pytest.importorskip("dlib", reason="dlib (pip install dlib-bin) is needed to compare with dlib",
                               exc_type=ImportError)


@pytest.fixture(scope="module")
def lfw_faces(lfw_dir, dlib):
    """[(image uint8 [250, 250, 3], detector box)] for the first images of LFW's first people with a detection."""
    from PIL import Image

    root = lfw_dir / "lfw-deepfunneled"
    if not root.is_dir():
        pytest.skip(f"LFW deep-funnelled images not found at {root}")
    detector = dlib.get_frontal_face_detector()
    faces = []
    for person in sorted(os.listdir(root))[:N_FACES + 4]:
        with Image.open(root / person / f"{person}_0001.jpg") as im:
            image = np.asarray(im.convert("RGB"))
        found = detector(image, 0)
        if len(found):
            d = max(found, key=lambda r: r.area())
            faces.append((image, (d.left(), d.top(), d.right(), d.bottom())))
        if len(faces) == N_FACES:
            break
    assert len(faces) >= 6, f"dlib's detector found faces in only {len(faces)} LFW images"
    return faces


def _dlib_points(detection) -> np.ndarray:
    return np.array([(detection.part(i).x, detection.part(i).y) for i in range(detection.num_parts)], np.float64)


def test_landmarks_equal_dlib(predictor, model_path, lfw_faces, dlib):
    reference = dlib.shape_predictor(model_path)
    worst = 0.0
    for image, detected in lfw_faces:
        for box in (detected, FIXED_BOX):
            expected = _dlib_points(reference(image, dlib.rectangle(*box)))
            got = predictor.predict(image, box)
            assert got.shape == (5, 2) and got.dtype == np.float64
            worst = max(worst, float(np.abs(got - expected).max()))
            # dlib rounds its points to whole pixels (floor(v + 0.5)); rounded, ours are the same points.
            np.testing.assert_array_equal(np.floor(got + 0.5), expected)
    assert worst <= 0.5
    # Grey images: dlib reads them as they are.
    grey = np.ascontiguousarray(lfw_faces[0][0][..., 1])
    expected = _dlib_points(reference(grey, dlib.rectangle(*lfw_faces[0][1])))
    assert np.abs(predictor.predict(grey, lfw_faces[0][1]) - expected).max() <= 0.5


def test_predict_batch_equals_predict(predictor, lfw_faces):
    images = np.stack([image for image, _ in lfw_faces[:3]])
    boxes = np.array([box for _, box in lfw_faces[:3]], np.float64)
    one_by_one = np.stack([predictor.predict(image, box) for image, box in zip(images, boxes)])
    np.testing.assert_allclose(predictor.predict_batch(images, boxes), one_by_one, rtol=0, atol=1e-4)


def test_predict_rejects_bad_input(predictor):
    with pytest.raises(ValueError, match=r"expected uint8 images"):
        predictor.predict(np.zeros((50, 50, 3), np.float32), (10, 10, 40, 40))
    with pytest.raises(ValueError, match=r"expected uint8 images"):
        predictor.predict(np.zeros((50, 50, 4), np.uint8), (10, 10, 40, 40))
    with pytest.raises(ValueError, match=r"box \[40.0, 10.0, 10.0, 40.0\] is not a finite"):
        predictor.predict(np.zeros((50, 50), np.uint8), (40, 10, 10, 40))


# --- align.py: the similarity and the warp against independent transcriptions -------------------------------------


def _umeyama_reference(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Umeyama (1991) eq. 34-43, transcribed here: [3, 3] least-squares similarity src -> dst, no reflection."""
    mu_src, mu_dst = src.mean(axis=0), dst.mean(axis=0)
    var_src = ((src - mu_src) ** 2).sum(axis=1).mean()
    cov = (dst - mu_dst).T @ (src - mu_src) / len(src)
    u, d, vt = np.linalg.svd(cov)
    s = np.eye(2)
    if np.linalg.det(cov) < 0:
        s[1, 1] = -1.0
    rotation = u @ s @ vt
    scale = np.trace(np.diag(d) @ s) / var_src
    out = np.eye(3)
    out[:2, :2] = scale * rotation
    out[:2, 2] = mu_dst - scale * rotation @ mu_src
    return out


def test_similarity_recovers_a_known_transform_exactly():
    rng = np.random.default_rng(0)
    src = rng.uniform(0, 100, (5, 2))
    angle, scale, shift = 0.3, 1.7, np.array([12.5, -4.0])
    known = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    dst = src @ known.T + shift
    np.testing.assert_allclose(align.umeyama(src, dst), np.vstack([np.hstack([known, shift[:, None]]),
                                                                   [0, 0, 1]]), rtol=0, atol=1e-12)
    m = align.similarity_transform(src, dst)
    assert m.shape == (2, 3)
    np.testing.assert_allclose(m[:, :2], known, rtol=0, atol=1e-12)
    np.testing.assert_allclose(m[:, 2], shift, rtol=0, atol=1e-10)


def test_similarity_equals_umeyama_transcription_on_noisy_points():
    rng = np.random.default_rng(1)
    for _ in range(20):
        src = rng.uniform(0, 250, (5, 2))
        angle, scale = rng.uniform(-np.pi, np.pi), rng.uniform(0.2, 3.0)
        rot = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        dst = src @ rot.T + rng.uniform(-50, 50, 2) + rng.normal(0, 3.0, src.shape)
        np.testing.assert_allclose(align.umeyama(src, dst), _umeyama_reference(src, dst), rtol=0, atol=1e-9)


def test_similarity_never_reflects():
    rng = np.random.default_rng(2)
    for _ in range(10):
        src = rng.uniform(0, 100, (5, 2))
        mirrored = src * np.array([-1.0, 1.0]) + rng.normal(0, 1.0, src.shape)   # best fit would be a reflection
        m = align.similarity_transform(src, mirrored)
        assert np.linalg.det(m[:, :2]) > 0
        np.testing.assert_allclose(align.umeyama(src, mirrored), _umeyama_reference(src, mirrored), atol=1e-9)


def _warp_reference(image: np.ndarray, m: np.ndarray, width: int, height: int) -> np.ndarray:
    """Bilinear sampling, one output pixel at a time: output (x, y) reads the image at m^-1 (x, y), pixel centres
    at integer coordinates, neighbours outside the image count as 0."""
    inv = np.linalg.inv(np.vstack([m, [0, 0, 1]]))
    h, w = image.shape[:2]
    out = np.zeros((height, width) + image.shape[2:])

    def pixel(yy, xx):
        return image[yy, xx] if 0 <= yy < h and 0 <= xx < w else 0.0

    for y in range(height):
        for x in range(width):
            sx, sy, _ = inv @ np.array([x, y, 1.0])
            x0, y0 = int(np.floor(sx)), int(np.floor(sy))
            fx, fy = sx - x0, sy - y0
            out[y, x] = ((1 - fx) * (1 - fy) * pixel(y0, x0) + fx * (1 - fy) * pixel(y0, x0 + 1)
                         + (1 - fx) * fy * pixel(y0 + 1, x0) + fx * fy * pixel(y0 + 1, x0 + 1))
    return out


def test_warp_affine_equals_per_pixel_bilinear():
    rng = np.random.default_rng(3)
    image = rng.uniform(0, 255, (9, 11, 2))
    angle, scale = 0.5, 1.3
    m = np.array([[scale * np.cos(angle), -scale * np.sin(angle), 2.5],
                  [scale * np.sin(angle), scale * np.cos(angle), -3.25]])
    expected = _warp_reference(image, m, width=13, height=10)
    np.testing.assert_allclose(align.warp_affine(image, m, (13, 10)), expected, rtol=0, atol=1e-9)
    np.testing.assert_allclose(align.warp_affine(image[..., 0], m, (13, 10)), expected[..., 0], rtol=0, atol=1e-9)
    as_uint8 = align.warp_affine(image.astype(np.uint8), m, (13, 10))
    reference = _warp_reference(image.astype(np.uint8).astype(np.float64), m, width=13, height=10)
    np.testing.assert_array_equal(as_uint8, np.clip(np.rint(reference), 0, 255).astype(np.uint8))


# --- dlib's face chip and the ArcFace crop --------------------------------------------------------------------------


def test_dlib_face_chip_equals_dlib(predictor, model_path, lfw_faces, dlib):
    reference = dlib.shape_predictor(model_path)
    for image, box in lfw_faces:
        detection = reference(image, dlib.rectangle(*box))
        expected = np.asarray(dlib.get_face_chip(image, detection, 150, 0.25)).astype(np.int64)
        # The same (dlib's, whole-pixel) landmarks: the same geometry and sampling; dlib truncates the bilinear
        # value to uint8 as this does, but sums the four weights in another order, so a value that is a whole
        # number may land one level lower in one of the two: measured 0.0003-0.0016 mean, 1 at most.
        chip = dlib_face_chip(image, _dlib_points(detection))
        assert chip.shape == (150, 150, 3) and chip.dtype == np.uint8
        diff = np.abs(chip.astype(np.int64) - expected)
        assert diff.mean() < 0.01 and diff.max() <= 1
        # The whole pipeline (our landmarks, rounded as dlib's are): the same chip.
        diff = np.abs(align_with_dlib(image, box, predictor, template="dlib").astype(np.int64) - expected)
        assert diff.mean() < 0.01 and diff.max() <= 1
        # Unrounded landmarks move the chip by up to ~0.6 chip pixels: a few grey levels on average (measured
        # 0.7-3.2 on these faces), a bound that catches a wrong transform (tens of levels), not a fine difference.
        diff = np.abs(dlib_face_chip(image, predictor.predict(image, box)).astype(np.int64) - expected)
        assert diff.mean() < 6


def test_dlib_chip_transform_follows_dlibs_rectangle():
    # Landmarks on dlib's chip template itself (scale 1): the chip is the image shifted by half a pixel, because
    # dlib centres the chip's pixels 0..size-1 on the template's point (size/2, size/2).
    points = (0.25 + DLIB_MEAN_FACE_5) / 1.5 * 150
    np.testing.assert_allclose(dlib_chip_transform(points), [[1, 0, -0.5], [0, 1, -0.5]], rtol=0, atol=1e-9)
    # A face twice as large: chip pixels step (size * 2 - 1) / (size - 1) image pixels, not 2.
    m = dlib_chip_transform(points * 2 + 10.0)
    np.testing.assert_allclose(m[:, :2], np.eye(2) * 149 / 299, rtol=0, atol=1e-12)
    np.testing.assert_allclose(m @ [160.0, 160.0, 1.0], [74.5, 74.5], rtol=0, atol=1e-9)


@pytest.mark.parametrize("size", [112, 224, 128])
def test_arcface_template_for_dlib_puts_the_eyes_on_arcface_eyes(size):
    template = arcface_template_for_dlib(size)
    arcface = align.arcface_template(size)
    assert template.shape == (5, 2) and template.dtype == np.float64
    np.testing.assert_allclose(template[[2, 3]].mean(axis=0), arcface[0], rtol=0, atol=1e-9)   # image-left eye
    np.testing.assert_allclose(template[[0, 1]].mean(axis=0), arcface[1], rtol=0, atol=1e-9)   # image-right eye
    # The nose bottom falls between the mouth corners and the eyes, below ArcFace's nose tip.
    assert arcface[2, 1] < template[4, 1] < arcface[3, 1]


def test_align_with_dlib_gives_arcface_crops(predictor, lfw_faces):
    template = arcface_template_for_dlib(112)
    for image, box in lfw_faces:
        crop = align_with_dlib(image, box, predictor)
        assert crop.shape == (112, 112, 3) and crop.dtype == np.uint8
        landmarks = predictor.predict(image, box)
        m = align.similarity_transform(landmarks, template)
        mapped = landmarks @ m[:, :2].T + m[:, 2]
        # A real face fits dlib's mean face to within a few pixels of the 112-pixel crop (at most 5.3 measured on
        # 100 LFW faces, 2.0 typical).
        assert np.abs(mapped - template).max() < 8
    assert align_with_dlib(image, box, predictor, template="dlib").shape == (150, 150, 3)
    assert align_with_dlib(image, box, predictor, size=224).shape == (224, 224, 3)


class _Fixed:
    """A stand-in predictor that returns the given landmarks."""

    def __init__(self, points):
        self.points = np.asarray(points, np.float64)

    def predict(self, image, box):
        return self.points


def test_align_with_dlib_says_what_failed():
    image = np.zeros((100, 100, 3), np.uint8)
    nan = np.full((5, 2), np.nan)
    with pytest.raises(ValueError, match=r"align_with_dlib \(box \[1, 2, 60, 70\]\): landmarks are not finite"):
        align_with_dlib(image, (1, 2, 60, 70), _Fixed(nan))
    with pytest.raises(ValueError, match=r"degenerate landmarks"):
        align_with_dlib(image, (1, 2, 60, 70), _Fixed(np.full((5, 2), 30.0)), template="dlib")
    with pytest.raises(ValueError, match=r"template must be 'arcface' or 'dlib', got 'insightface'"):
        align_with_dlib(image, (1, 2, 60, 70), _Fixed(nan), template="insightface")
    with pytest.raises(ValueError, match=r"dlib_chip_transform: landmarks are not finite"):
        dlib_face_chip(image, nan)


# --- the converter: python -m facekd_jax.data.convert align -----------------------------------------------------

def _small_lfw(lfw_dir, root, people=3):
    """A small LFW folder at `root`: `people` people's first two images, LFW's protocol files, and a corrupt JPEG."""
    import shutil

    src = lfw_dir / "lfw-deepfunneled"
    if not src.is_dir():
        pytest.skip(f"LFW deep-funnelled images not found at {src}")
    names = [p for p in sorted(os.listdir(src)) if os.path.isfile(src / p / f"{p}_0002.jpg")][:people]
    for p in names:
        (root / "lfw-deepfunneled" / p).mkdir(parents=True)
        for i in (1, 2):
            shutil.copy(src / p / f"{p}_000{i}.jpg", root / "lfw-deepfunneled" / p)
    for text in ("pairs.txt", "peopleDevTrain.txt"):
        shutil.copy(lfw_dir / text, root / text)
    (root / "lfw-deepfunneled" / "Broken_Person").mkdir()
    (root / "lfw-deepfunneled" / "Broken_Person" / "Broken_Person_0001.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    return names


def test_convert_align_cuts_both_crops_from_one_copy(lfw_dir, predictor, tmp_path):
    from PIL import Image

    from facekd_jax.data import convert, specs

    names = _small_lfw(lfw_dir, tmp_path / "lfw")
    out = tmp_path / "aligned"
    summary = convert.align_lfw(str(tmp_path / "lfw"), str(out), progress=False, workers=1)
    assert summary["images"] == 2 * len(names) + 1
    # The corrupt image is stored (pairs stay complete) and named, with why.
    record = align.read_alignment(str(out))
    assert [f["image"] for f in record["failed"]] == ["Broken_Person/Broken_Person_0001.jpg"]
    assert "cannot decode" in record["failed"][0]["error"]
    assert (out / "pairs.txt").read_bytes() == (lfw_dir / "pairs.txt").read_bytes()
    assert not list(tmp_path.glob("aligned.tmp-*"))
    # Every spec on the copy cuts the aligned ArcFace crop; a teacher taking dlib's chip gets its box.
    assert specs.default_crop(specs.parse(f"lfw:{out}", specs.TRAIN)) == align.chip_boxes()["arcface"]
    assert align.aligned_crop(str(out), "dlib") == align.chip_boxes()["dlib"]
    # That crop is the ArcFace crop align_with_dlib makes from the original image (up to resampling twice).
    for p in names:
        with Image.open(lfw_dir / "lfw-deepfunneled" / p / f"{p}_0001.jpg") as im:
            direct = align_with_dlib(np.asarray(im.convert("RGB")), convert.LFW_FACE_BOX, predictor)
        with Image.open(out / "lfw-deepfunneled" / p / f"{p}_0001.jpg") as im:
            chip = np.asarray(im.convert("RGB"))
        assert chip.shape == (align.COPY_SIZE, align.COPY_SIZE, 3)
        l, t, r, b = align.chip_boxes()["arcface"]
        cut = np.asarray(Image.fromarray(chip[t:b, l:r]).resize((112, 112), Image.BILINEAR), np.float64)
        assert np.abs(cut - direct).mean() < 12, p
        other = np.asarray(Image.fromarray(chip[t:b, l:r]).resize((112, 112), Image.BILINEAR).rotate(15), np.float64)
        assert np.abs(other - direct).mean() > np.abs(cut - direct).mean() + 5   # the check can tell faces apart
    # A second conversion onto the copy refuses and leaves it as it was.
    before = (out / align.ALIGNMENT).read_bytes()
    with pytest.raises(FileExistsError, match="already exists; pass --overwrite"):
        convert.align_lfw(str(tmp_path / "lfw"), str(out), progress=False)
    assert (out / align.ALIGNMENT).read_bytes() == before
