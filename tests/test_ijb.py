"""facekd_jax.data.ijb: IJB-B/C 1:1 verification against a loop-for-loop NumPy transcription of arcface_torch's
eval_ijbc.py written here (its own meta parsing, pooling loops, pair loop and sklearn's roc_curve with the closest-FPR
pick), on a synthetic mini-IJB with real JPEG crops; malformed meta files; chunked scoring."""
import functools
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from facekd_jax.data import align, ijb, ijb_meta
from facekd_jax.errors import InputError

sklearn_metrics = pytest.importorskip("sklearn.metrics")  # the [test] extra's reference ROC
sklearn_preprocessing = pytest.importorskip("sklearn.preprocessing")

SIZE = 112
DIM = 24
IDENTITIES = 5
TEMPLATES_PER_IDENTITY = 3  # 15 templates, 105 pairs (15 genuine)


# ------------------------------------------------------------------------------------------ the mini IJB-C

def _face(rng, identity_tone, size):
    """A face-like RGB crop (skin ellipse, dark eyes and mouth) and its 5 landmarks (x, y)."""
    h = w = int(size)
    yy, xx = np.mgrid[0:h, 0:w]
    cx, cy = w * rng.uniform(0.45, 0.55), h * rng.uniform(0.45, 0.55)
    img = np.empty((h, w, 3), np.float64)
    img[:] = rng.uniform(20, 90, 3)  # background
    face = ((xx - cx) / (0.33 * w)) ** 2 + ((yy - cy) / (0.42 * h)) ** 2 <= 1
    img[face] = identity_tone
    s = w / 112.0
    marks = np.array([[-18, -12], [18, -12], [0, 6], [-14, 26], [14, 26]], np.float64) * s * rng.uniform(0.9, 1.1)
    angle = rng.uniform(-0.2, 0.2)
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    marks = marks @ rot.T + [cx, cy]
    for (x, y), r in zip(marks, [4, 4, 3, 3, 3]):
        img[(xx - x) ** 2 + (yy - y) ** 2 <= (r * s) ** 2] = (30, 20, 20)
    img += rng.normal(0, 6, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8), marks


def _write_mini_ijb(root: Path, target="IJBC", seed=0):
    """ROOT/meta (three files) and ROOT/loose_crop (JPEGs): several templates per identity, several media per
    template, several images per media, one media id shared by two templates, the faces of templates and media
    interleaved in the files (face k is line k, named k.jpg); all template pairs, shuffled."""
    rng = np.random.default_rng(seed)
    low = target.lower()
    (root / "meta").mkdir(parents=True)
    (root / "loose_crop").mkdir()
    faces, template_identity = [], {}
    tones = rng.uniform(120, 230, (IDENTITIES, 3))
    for identity in range(IDENTITIES):
        for k in range(TEMPLATES_PER_IDENTITY):
            template = 100 + identity * 10 + k  # ids not contiguous, not starting at 0
            template_identity[template] = identity
            for m in range(int(rng.integers(1, 4))):
                media = 5000 + template * 7 + m
                if identity == 0 and k == 1 and m == 0:
                    media = 5000 + 100 * 7  # the same media id as template 100's first media
                faces += [(template, media, identity) for _ in range(int(rng.integers(1, 4)))]
    face_lines, mark_lines = [], []
    for line, f in enumerate(rng.permutation(len(faces)), 1):
        template, media, identity = faces[f]
        name = f"{line}.jpg" if target == "IJBC" else f"ijbb_{line}.jpg"
        img, marks = _face(rng, tones[identity] + rng.normal(0, 8, 3), rng.integers(90, 170))
        Image.fromarray(img).save(root / "loose_crop" / name, quality=90)
        face_lines.append(f"{name} {template} {media}")
        mark_lines.append(" ".join([name] + [f"{v:.3f}" for v in marks.reshape(-1)] + [f"{rng.uniform(0.3, 1):.6f}"]))
    templates = sorted(template_identity)
    pair_lines = [f"{a} {b} {int(template_identity[a] == template_identity[b])}"
                  for i, a in enumerate(templates) for b in templates[i + 1:]]
    order = rng.permutation(len(pair_lines))
    (root / "meta" / f"{low}_face_tid_mid.txt").write_text("\n".join(face_lines) + "\n")
    (root / "meta" / f"{low}_name_5pts_score.txt").write_text("\n".join(mark_lines) + "\n")
    (root / "meta" / f"{low}_template_pair_label.txt").write_text("\n".join(pair_lines[i] for i in order) + "\n")
    return root


@pytest.fixture(scope="module")
def mini_ijb(tmp_path_factory):
    return _write_mini_ijb(tmp_path_factory.mktemp("ijb") / "IJBC")


_PROJECTION = np.random.default_rng(7).integers(-3, 4, (14 * 14 * 3, DIM))


def fake_embed(crops):
    """A deterministic raw embedding (not unit norm): a fixed random integer projection of the 8 x 8 pixel sums,
    computed exactly in int64 and rounded once to float32, so an image's embedding has the same bits whatever
    batch it is in (a float product's rounding may depend on the batch size)."""
    x = crops.astype(np.int64).reshape(len(crops), 14, 8, 14, 8, 3).sum(axis=(2, 4)) - 8192
    return (x.reshape(len(x), -1) @ _PROJECTION).astype(np.float32) / np.float32(1e5)


# ------------------------------------------------------------- the reference (eval_ijbc.py, loop for loop)

@functools.lru_cache(maxsize=4)
def reference_image_features(root, target):
    """eval_ijbc.py's get_image_feature (cv2.imread and the skimage/cv2 alignment replaced by PIL and
    facekd_jax.data.align): (img_feats float32 [N, 2E] = embedding of the image, then of its mirror;
    faceness_scores float32 [N])."""
    files = open(os.path.join(root, "meta", f"{target.lower()}_name_5pts_score.txt")).readlines()
    img_feats, faceness_scores = [], []
    for each_line in files:
        name_lmk_score = each_line.strip().split(" ")
        img = np.asarray(Image.open(os.path.join(root, "loose_crop", name_lmk_score[0])).convert("RGB"))
        lmk = np.array([float(x) for x in name_lmk_score[1:-1]], dtype=np.float32).reshape((5, 2))
        crop = align.align_face(img, lmk, SIZE)
        blob = np.stack([crop, np.fliplr(crop)])  # input_blob: image, then its mirror
        img_feats.append(fake_embed(blob).reshape(-1))  # forward_db: [2, E] -> [2E]
        faceness_scores.append(name_lmk_score[-1])
    return np.array(img_feats).astype(np.float32), np.array(faceness_scores).astype(np.float32)


def reference_ijbc(root, target="IJBC", use_flip_test=True, use_norm_score=True, use_detector_score=True):
    """arcface_torch eval_ijbc.py with pandas' reads replaced by Python splits; everything after the image
    features as there. Returns (template feats, unique templates, scores, labels, TAR row, fpr, tpr)."""
    low = target.lower()
    meta = os.path.join(root, "meta")
    rows = [line.split(" ") for line in open(os.path.join(meta, f"{low}_face_tid_mid.txt")).read().splitlines()]
    templates = np.array([int(r[1]) for r in rows])
    medias = np.array([int(r[2]) for r in rows])
    rows = [line.split(" ") for line in open(os.path.join(meta, f"{low}_template_pair_label.txt")).read().splitlines()]
    p1 = np.array([int(r[0]) for r in rows])
    p2 = np.array([int(r[1]) for r in rows])
    label = np.array([int(r[2]) for r in rows])

    img_feats, faceness_scores = reference_image_features(root, target)
    if use_flip_test:
        img_input_feats = img_feats[:, 0:img_feats.shape[1] // 2] + img_feats[:, img_feats.shape[1] // 2:]
    else:
        img_input_feats = img_feats[:, 0:img_feats.shape[1] // 2]
    if not use_norm_score:
        img_input_feats = img_input_feats / np.sqrt(np.sum(img_input_feats ** 2, -1, keepdims=True))
    if use_detector_score:
        img_input_feats = img_input_feats * faceness_scores[:, np.newaxis]

    # image2template_feature
    unique_templates = np.unique(templates)
    template_feats = np.zeros((len(unique_templates), img_input_feats.shape[1]))
    for count_template, uqt in enumerate(unique_templates):
        (ind_t,) = np.where(templates == uqt)
        face_norm_feats = img_input_feats[ind_t]
        face_medias = medias[ind_t]
        unique_medias, unique_media_counts = np.unique(face_medias, return_counts=True)
        media_norm_feats = []
        for u, ct in zip(unique_medias, unique_media_counts):
            (ind_m,) = np.where(face_medias == u)
            if ct == 1:
                media_norm_feats += [face_norm_feats[ind_m]]
            else:
                media_norm_feats += [np.mean(face_norm_feats[ind_m], axis=0, keepdims=True)]
        media_norm_feats = np.array(media_norm_feats)
        template_feats[count_template] = np.sum(media_norm_feats, axis=0)
    template_norm_feats = sklearn_preprocessing.normalize(template_feats)

    # verification
    template2id = np.zeros((max(unique_templates) + 1, 1), dtype=int)
    for count_template, uqt in enumerate(unique_templates):
        template2id[uqt] = count_template
    score = np.zeros((len(p1),))
    total_pairs = np.array(range(len(p1)))
    batchsize = 100000
    for s in [total_pairs[i:i + batchsize] for i in range(0, len(p1), batchsize)]:
        feat1 = template_norm_feats[template2id[p1[s]]]
        feat2 = template_norm_feats[template2id[p2[s]]]
        score[s] = np.sum(feat1 * feat2, -1).flatten()

    fpr, tpr, _ = sklearn_metrics.roc_curve(label, score)
    return template_norm_feats, unique_templates, score, label, reference_tar_row(fpr, tpr), fpr, tpr


def reference_tar_row(fpr, tpr, x_labels=(10 ** -6, 10 ** -5, 10 ** -4, 10 ** -3, 10 ** -2, 10 ** -1)):
    """The TAR row of the reference's table (before its '%.2f' formatting)."""
    fpr = np.flipud(fpr)
    tpr = np.flipud(tpr)
    row = []
    for fpr_iter in np.arange(len(x_labels)):
        _, min_index = min(list(zip(abs(fpr - x_labels[fpr_iter]), range(len(fpr)))))
        row.append(tpr[min_index])
    return np.array(row)


# ------------------------------------------------------------------------------------------------ end to end

@pytest.mark.parametrize("flip,norm,detector", [(True, True, True), (False, False, True), (True, True, False)])
def test_matches_reference_pipeline(mini_ijb, tmp_path, flip, norm, detector):
    lines = []
    result = ijb.evaluate_ijb(fake_embed, str(mini_ijb), target="IJBC", batch_size=7, use_flip=flip,
                              use_norm_score=norm, use_detector_score=detector, log=lines.append, workers=2,
                              work_dir=str(tmp_path))
    feats, ids, score, label, tar, fpr, tpr = reference_ijbc(str(mini_ijb), use_flip_test=flip,
                                                             use_norm_score=norm, use_detector_score=detector)
    np.testing.assert_allclose(np.load(tmp_path / "ijbc.npy"), score, rtol=0, atol=1e-14)
    got = [result["tar_at_far"][k] for k in ("1e-6", "1e-5", "1e-4", "1e-3", "1e-2", "1e-1")]
    assert got == tar.tolist()  # the same ROC vertices, so exactly the same TARs
    assert 0 < min(got) < max(got)  # a ROC that is not trivial
    assert result["pairs"] == len(label) and result["genuine"] == int(label.sum())
    assert result["templates"] == len(ids) and result["feature_dim"] == DIM
    assert result["auc"] == pytest.approx(sklearn_metrics.auc(fpr, tpr), abs=1e-12)
    assert ijb.tar_table({"ijbc-IJBC": tar}) in "\n".join(lines)  # the table, as the reference would print it


def test_pieces_match_reference(mini_ijb, tmp_path):
    feats_ref, ids_ref, score_ref, label, tar, _, _ = reference_ijbc(str(mini_ijb))
    meta = ijb_meta.read_meta(str(mini_ijb), "IJBC")
    image_feats = ijb.image_features(fake_embed, meta.paths["images"], meta.names, meta.landmarks, batch_size=5,
                                     out_path=str(tmp_path / "f.npy"), workers=3, log=lambda s: None)
    assert isinstance(image_feats, np.memmap) and image_feats.shape == (meta.names.size, DIM)
    ids, feats = ijb.template_features(image_feats, meta.templates, meta.medias, detector_scores=meta.scores,
                                       chunk=4)
    assert np.array_equal(ids, ids_ref)
    assert np.array_equal(feats, feats_ref)  # the reference's float32 means and sums on the same features: same bits
    scores = ijb.pair_scores(feats, ids, meta.pairs)
    np.testing.assert_allclose(scores, score_ref, rtol=0, atol=1e-14)  # a BLAS product instead of np.sum
    assert np.array_equal(meta.labels, label.astype(bool))
    assert ijb.tar_at_far(scores, meta.labels).tolist() == tar.tolist()
    # work_dir keeps the features (memmap) and the scores, as eval_ijbc saves <target>.npy
    result = ijb.evaluate_ijb(fake_embed, str(mini_ijb), batch_size=16, log=lambda s: None, work_dir=str(tmp_path))
    np.testing.assert_allclose(np.load(tmp_path / "ijbc.npy"), score_ref, rtol=0, atol=1e-14)
    assert np.load(tmp_path / "ijbc_features.npy").shape == (meta.names.size, DIM)
    assert [result["tar_at_far"][k] for k in sorted(result["tar_at_far"], key=float)] == tar.tolist()


def test_ijbb_layout(tmp_path):
    root = _write_mini_ijb(tmp_path / "IJBB", target="IJBB", seed=3)
    result = ijb.evaluate_ijb(fake_embed, str(root), target="IJBB", batch_size=32, log=lambda s: None)
    assert result["target"] == "IJBB"
    assert [result["tar_at_far"][k] for k in ("1e-6", "1e-5", "1e-4", "1e-3", "1e-2", "1e-1")] == \
        reference_ijbc(str(root), target="IJBB")[4].tolist()


# ------------------------------------------------------------------------------------------- ROC and TAR

@pytest.mark.parametrize("seed", range(6))
def test_roc_and_tar_match_sklearn_and_reference(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(50, 20000))
    labels = rng.random(n) < rng.uniform(0.01, 0.5)
    labels[:2] = [True, False]
    scores = rng.standard_normal(n) + 1.5 * labels
    scores = np.round(scores, int(rng.integers(0, 4)))  # many ties: collinear vertices for drop_intermediate
    fpr, tpr, thr = sklearn_metrics.roc_curve(labels.astype(int), scores)
    got = ijb.roc_curve(scores, labels)
    assert np.array_equal(got[0], fpr) and np.array_equal(got[1], tpr) and np.array_equal(got[2], thr)
    fars = list(ijb.FARS) + sorted(rng.uniform(0, 1, 5))
    assert ijb.tar_at_far(scores, labels, fars).tolist() == reference_tar_row(fpr, tpr, fars).tolist()


def test_tar_ties_pick_as_the_reference():
    # 4 impostors: FPR steps of 0.25; 0.375 is exactly between 0.25 and 0.5, and FPR 0.5 has two vertices.
    scores = np.array([9, 8, 7, 6, 6, 5, 4, 3, 2, 1], np.float64)
    labels = np.array([1, 0, 1, 0, 1, 1, 0, 1, 0, 1], bool)
    fars = [0.375, 0.5, 0.0, 1e-6, 0.125]
    fpr, tpr, _ = sklearn_metrics.roc_curve(labels, scores)
    expected = reference_tar_row(fpr, tpr, fars)
    assert ijb.tar_at_far(scores, labels, fars).tolist() == expected.tolist()
    with pytest.raises(ValueError, match="genuine and impostor"):
        ijb.tar_at_far(scores, np.ones(10, bool))
    with pytest.raises(ValueError, match="not finite"):
        ijb.tar_at_far(np.r_[scores[:-1], np.nan], labels)


def test_verification_result_is_json_ready():
    import json
    rng = np.random.default_rng(0)
    labels = rng.random(50000) < 0.01
    scores = rng.standard_normal(50000) + 2 * labels
    result = ijb.verification_result(scores, labels)
    text = json.dumps(result, allow_nan=False)
    assert "Infinity" not in text and len(result["roc"]["fmr"]) <= ijb.ROC_POINTS
    assert set(result["tar_at_far"]) == {"1e-6", "1e-5", "1e-4", "1e-3", "1e-2", "1e-1"}
    assert result["genuine"] + result["impostor"] == 50000


def test_tar_table_is_prettytables_default():
    table = ijb.tar_table({"ijbc-IJBC": [0.8681, 0.93043, 0.958, 0.97349, 0.98412, 0.991]})
    assert table.splitlines() == [
        "+-----------+-------+-------+--------+-------+-------+-------+",
        "|  Methods  | 1e-06 | 1e-05 | 0.0001 | 0.001 |  0.01 |  0.1  |",
        "+-----------+-------+-------+--------+-------+-------+-------+",
        "| ijbc-IJBC | 86.81 | 93.04 | 95.80  | 97.35 | 98.41 | 99.10 |",
        "+-----------+-------+-------+--------+-------+-------+-------+",
    ]


# ------------------------------------------------------------------------------------------- pooling, scoring

def test_template_pooling_by_hand():
    feats = np.array([[1, 0], [3, 0], [0, 2], [5, 5], [0, 1]], np.float32)
    templates = np.array([7, 7, 7, 3, 7])
    medias = np.array([1, 1, 2, 1, 2])  # media 1 is in templates 7 and 3: pooled in each separately
    ids, out = ijb.template_features(feats, templates, medias, chunk=2)
    assert ids.tolist() == [3, 7]
    # template 7: mean(media 1) = (2, 0), mean(media 2) = (0, 1.5); sum (2, 1.5) -> (0.8, 0.6)
    np.testing.assert_allclose(out, [[2 ** -0.5, 2 ** -0.5], [0.8, 0.6]], atol=1e-15)
    scores = np.array([1, 1, 1, 0.5, 1], np.float32)
    _, weighted = ijb.template_features(feats, templates, medias, detector_scores=scores)
    np.testing.assert_allclose(weighted, out, atol=1e-15)  # a common factor within a template
    _, unit = ijb.template_features(feats, templates, medias, use_norm_score=False)
    np.testing.assert_allclose(unit[1], np.array([1, 1]) / 2 ** 0.5, atol=1e-7)
    _, zero = ijb.template_features(np.zeros((2, 3), np.float32), [1, 2], [1, 1])
    assert np.array_equal(zero, np.zeros((2, 3)))  # stays zero, as sklearn's normalize leaves it


@pytest.mark.parametrize("method", ["gram", "gather", "auto"])
def test_chunked_scoring_equals_unchunked(method):
    rng = np.random.default_rng(1)
    feats = rng.standard_normal((40, 16))
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    ids = np.sort(rng.choice(10 ** 6, 40, replace=False))
    pairs = np.stack([rng.choice(ids[:9], 3001), rng.choice(ids[5:], 3001)], axis=1)
    lookup = {t: i for i, t in enumerate(ids)}
    expected = np.array([feats[lookup[a]] @ feats[lookup[b]] for a, b in pairs])
    for chunk in (1, 7, 64, 10 ** 6):
        np.testing.assert_allclose(ijb.pair_scores(feats, ids, pairs, chunk=chunk, method=method), expected,
                                   rtol=0, atol=1e-14)
    with pytest.raises(ValueError, match=r"template 5 \(pairs\[2\]\) has no features"):
        ijb.pair_scores(feats, ids, np.r_[pairs[:2], [[5, ids[0]]]], method=method)


# ------------------------------------------------------------------------------------------- bad meta files

def _copy_meta(src: Path, dst: Path):
    (dst / "meta").mkdir(parents=True)
    os.symlink(src / "loose_crop", dst / "loose_crop")
    for f in (src / "meta").iterdir():
        (dst / "meta" / f.name).write_bytes(f.read_bytes())
    return dst


def _edit(path: Path, line: int, text: str):
    lines = path.read_text().splitlines()
    lines[line - 1] = text
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("file,line,text,message", [
    ("ijbc_face_tid_mid.txt", 4, "4.jpg 101", r"ijbc_face_tid_mid.txt line 4: expected 3 fields"),
    ("ijbc_face_tid_mid.txt", 9, "9.jpg 1x1 5", r"ijbc_face_tid_mid.txt line 9: expected .*got '9.jpg 1x1 5'"),
    ("ijbc_face_tid_mid.txt", 2, "2.jpg -1 5", r"ijbc_face_tid_mid.txt line 2: template_id and media_id"),
    ("ijbc_name_5pts_score.txt", 3, "3.jpg 1 2 3", r"ijbc_name_5pts_score.txt line 3: expected 12 fields"),
    ("ijbc_name_5pts_score.txt", 5, "5.jpg " + "1.5 " * 10 + "nan", r"ijbc_name_5pts_score.txt line 5: .*finite"),
    ("ijbc_name_5pts_score.txt", 6, "6.jpg " + "1,5 " * 10 + "0.9", r"ijbc_name_5pts_score.txt line 6: expected"),
    ("ijbc_name_5pts_score.txt", 7, "other.jpg " + "1.5 " * 10 + "0.9", r"ijbc_name_5pts_score.txt line 7 is face "
                                                                         r"'other.jpg' but .*line 7 is '7.jpg'"),
    ("ijbc_template_pair_label.txt", 11, "100 101 2", r"ijbc_template_pair_label.txt line 11: label must be 0 or 1"),
    ("ijbc_template_pair_label.txt", 12, "100 101 1.0", r"ijbc_template_pair_label.txt line 12: expected"),
    ("ijbc_template_pair_label.txt", 13, "100 101", r"ijbc_template_pair_label.txt line 13: expected 3 fields"),
    ("ijbc_template_pair_label.txt", 14, "100 101 1 1", r"ijbc_template_pair_label.txt line 14: expected 3 fields"),
    ("ijbc_template_pair_label.txt", 15, "100 99999999999999999999999 1", r"line 15: template1 and template2 must"),
    ("ijbc_template_pair_label.txt", 16, "100 777 0", r"ijbc_template_pair_label.txt line 16: template 777 has no "
                                                      r"face in .*ijbc_face_tid_mid.txt"),
])
def test_malformed_meta_names_file_and_line(mini_ijb, tmp_path, file, line, text, message):
    root = _copy_meta(mini_ijb, tmp_path / "IJBC")
    _edit(root / "meta" / file, line, text)
    with pytest.raises(InputError, match=message):
        ijb_meta.read_meta(str(root), "IJBC")


def test_blank_lines_crlf_and_block_edges(mini_ijb, tmp_path):
    root = _copy_meta(mini_ijb, tmp_path / "IJBC")
    pairs_path = root / "meta" / "ijbc_template_pair_label.txt"
    expected = ijb_meta.read_template_pairs(str(pairs_path))
    lines = pairs_path.read_text().splitlines()
    # CRLF, tabs, double spaces and blank lines are read (the general tokeniser), line numbers stay the file's
    pairs_path.write_bytes(("\r\n".join(lines[:3]) + "\r\n\r\n\t" + "  ".join(lines[3].split()) + "\n\n"
                            + "\n".join(lines[4:])).encode())
    got = ijb_meta.read_template_pairs(str(pairs_path))
    assert np.array_equal(got[0], expected[0]) and np.array_equal(got[1], expected[1])
    _edit(pairs_path, 9, "100 101 x")  # line 9 of the file is pair 7
    with pytest.raises(InputError, match=r"line 9: expected .*got '100 101 x'"):
        ijb_meta.read_template_pairs(str(pairs_path))
    # tiny blocks: every block edge falls somewhere; same values, same line numbers; no final newline
    faces = root / "meta" / "ijbc_face_tid_mid.txt"
    whole = ijb_meta._read_table(str(faces), 3, named=True, dtype=np.int64, form="f")
    faces.write_bytes(faces.read_bytes().rstrip(b"\n"))
    for block in (7, 16, 33, 100):
        part = ijb_meta._read_table(str(faces), 3, named=True, dtype=np.int64, form="f", block_bytes=block)
        assert np.array_equal(part.names, whole.names) and np.array_equal(part.values, whole.values)
    _edit(faces, 20, "20.jpg 1 1 1")
    with pytest.raises(InputError, match="line 20: expected 3 fields"):
        ijb_meta._read_table(str(faces), 3, named=True, dtype=np.int64, form="f", block_bytes=40)
    _edit(faces, 20, "20.jpg 1 x")
    with pytest.raises(InputError, match="line 20: expected"):
        ijb_meta._read_table(str(faces), 3, named=True, dtype=np.int64, form="f", block_bytes=40)


def test_missing_files_and_images(mini_ijb, tmp_path):
    with pytest.raises(FileNotFoundError, match="ijbc_face_tid_mid.txt"):
        ijb_meta.read_meta(str(tmp_path / "nowhere"), "IJBC")
    with pytest.raises(ValueError, match="IJBC"):
        ijb_meta.meta_paths(str(mini_ijb), "IJBD")
    root = tmp_path / "IJBC"
    (root / "meta").mkdir(parents=True)
    (root / "loose_crop").mkdir()
    for f in (mini_ijb / "meta").iterdir():
        (root / "meta" / f.name).write_bytes(f.read_bytes())
    for f in (mini_ijb / "loose_crop").iterdir():
        if f.name != "5.jpg":
            os.symlink(f, root / "loose_crop" / f.name)
    with pytest.raises(FileNotFoundError, match=r"ijbc_name_5pts_score.txt line 5: image not found: .*5.jpg"):
        ijb.evaluate_ijb(fake_embed, str(root), log=lambda s: None)
    (root / "loose_crop" / "5.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match=r"ijbc_name_5pts_score.txt line 5: cannot decode image .*5.jpg"):
        ijb.evaluate_ijb(fake_embed, str(root), log=lambda s: None)


def test_raw_embedder_is_not_normalised():
    import jax
    import jax.numpy as jnp

    from facekd_jax import evaluate

    w = np.random.default_rng(0).standard_normal((4 * 4 * 3, 5)).astype(np.float32)

    def apply_fn(variables, x):
        return x.reshape(x.shape[0], -1) @ variables["w"]

    crops = np.random.default_rng(1).integers(0, 256, (3, 4, 4, 3), dtype=np.uint8)
    expected = ((crops.astype(np.float32) - 127.5) / 127.5).reshape(3, -1) @ w
    embed = evaluate.raw_embedder(apply_fn, {"w": jnp.asarray(w)})
    np.testing.assert_allclose(embed(crops), expected, rtol=1e-5, atol=1e-5)
    # sharded over the test session's fake CPU devices: 3 images padded to a multiple of the data axis
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    sharded = evaluate.raw_embedder(apply_fn, {"w": jnp.asarray(w)}, mesh=mesh)
    np.testing.assert_allclose(sharded(crops), expected, rtol=1e-5, atol=1e-5)


def _write_bin(path: Path, pairs: int, seed: int) -> None:
    """An insightface .bin: a pickle of (2N JPEG bytes, N issame flags)."""
    import io
    import pickle

    from PIL import Image

    rng = np.random.default_rng(seed)
    images = []
    for _ in range(2 * pairs):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(buf, format="JPEG")
        images.append(buf.getvalue())
    with open(path, "wb") as f:
        pickle.dump((images, [bool(i % 2) for i in range(pairs)]), f, protocol=4)


def test_eval_mode_reports_the_bin_folder_and_ijbc_from_one_config(mini_ijb, tmp_path, capsys, one_device):
    """--mode=eval with val_targets ('insightface:DIR', 'ijbc:DIR'): every .bin of the folder as its own set, in
    insightface's order, one arcface_torch line each, and IJB-C by its protocol with the run's raw embeddings, all
    in eval/results.json."""
    from facekd_jax import config_lib, evaluate, rundir
    from facekd_jax.data import specs
    from facekd_jax.eval_only import evaluate_workdir
    from test_teacher_cache import make_teacher_run

    make_teacher_run(tmp_path / "run")
    bins = tmp_path / "faces_emore"
    bins.mkdir()
    _write_bin(bins / "agedb_30.bin", 20, 0)
    _write_bin(bins / "lfw.bin", 10, 1)
    (bins / "train.rec").write_bytes(b"")   # the rest of an insightface folder is not a verification set
    assert [s.path for s in specs.expand(specs.parse(f"insightface:{bins}", specs.VERIFICATION))] == [
        str(bins / "lfw.bin"), str(bins / "agedb_30.bin")]
    config = config_lib.default_config()
    config.data.val_targets = (f"insightface:{bins}", f"ijbc:{mini_ijb}")
    config.eval_batch_size = 8
    config.cpu_kernels = "xla"
    out = evaluate_workdir(config, str(tmp_path / "run"))
    printed = capsys.readouterr().out
    assert list(out["results"]) == ["lfw", "agedb_30", "ijbc"]
    assert "[lfw][0]Accuracy-Flip:" in printed and "[agedb_30][0]Accuracy-Flip:" in printed
    assert "TAR@FAR" in printed and "ijbc-IJBC" in printed
    saved = json.loads((tmp_path / "run" / "eval" / "results.json").read_text())
    assert set(saved) == {"step", "lfw", "agedb_30", "ijbc"} and len(saved["ijbc"]["tar_at_far"]) == 6
    # The IJB-C figures are the protocol's on the run's raw embeddings at the run's size.
    trained = rundir.trained_architecture(config, str(tmp_path / "run"))
    model = rundir.load_model(str(tmp_path / "run"), trained, layers={})
    direct = ijb.evaluate_ijb(evaluate.raw_embedder(model.apply, model.variables), str(mini_ijb),
                              image_size=trained.data.image_size, batch_size=8, log=lambda s: None)
    assert saved["ijbc"]["tar_at_far"] == pytest.approx(direct["tar_at_far"], abs=1e-9)
    assert saved["ijbc"]["auc"] == pytest.approx(direct["auc"], abs=1e-6)
    with pytest.raises(FileNotFoundError, match="none of lfw.bin"):
        specs.expand(specs.parse(f"insightface:{tmp_path / 'run'}", specs.VERIFICATION))
