"""facekd_jax.evaluate: the verification protocol against a plain NumPy transliteration of insightface's
verification.py (written here), hand-made cases with exact answers, statistics, reports and embedding."""
import json
import os
import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import interpolate
from scipy import stats as scipy_stats

from facekd_jax import evaluate as ev
from facekd_jax import stats


# --------------------------------------------------------------------------- reference (insightface, NumPy loops)

def _ref_kfold(n, folds):
    """sklearn KFold(n_splits=folds, shuffle=False) as insightface's LFold uses it (one fold: train = test)."""
    idx = np.arange(n)
    if folds == 1:
        return [(idx, idx)]
    sizes = [n // folds + (1 if f < n % folds else 0) for f in range(folds)]
    out, start = [], 0
    for size in sizes:
        test = idx[start:start + size]
        out.append((np.setdiff1d(idx, test), test))
        start += size
    return out


def _ref_accuracy(threshold, dist, issame):
    predict = np.less(dist, threshold)
    tp = np.sum(predict & issame)
    tn = np.sum(~predict & ~issame)
    return float(tp + tn) / dist.size


def _ref_val_far(threshold, dist, issame):
    predict = np.less(dist, threshold)
    return np.sum(predict & issame) / np.sum(issame), np.sum(predict & ~issame) / np.sum(~issame)


def _ref_slinear(x, y, x_new):
    """scipy < 1.9 interp1d(x, y, kind='slinear')(x_new): a linear B-spline on knots (x0, x..., x_last)."""
    order = np.argsort(x, kind="mergesort")
    x, y = x[order], y[order]
    assert x[0] <= x_new <= x[-1], "insightface's interp1d would raise (bounds_error)"
    return float(interpolate.BSpline.construct_fast(np.r_[x[0], x, x[-1]], y.astype(np.float64), 1)(x_new))


def reference_protocol(e1, e2, issame, folds=10, far_target=1e-3):
    e1 = e1 / np.linalg.norm(e1, axis=1, keepdims=True)
    e2 = e2 / np.linalg.norm(e2, axis=1, keepdims=True)
    dist = np.sum(np.square(np.subtract(e1, e2)), 1)
    splits = _ref_kfold(len(issame), folds)
    thresholds = np.arange(0, 4, 0.01)
    accuracy, best, correct = [], [], np.zeros(len(issame), bool)
    for train, test in splits:
        acc_train = np.array([_ref_accuracy(t, dist[train], issame[train]) for t in thresholds])
        b = np.argmax(acc_train)
        best.append(thresholds[b])
        accuracy.append(_ref_accuracy(thresholds[b], dist[test], issame[test]))
        correct[test] = np.less(dist[test], thresholds[b]) == issame[test]
    thresholds = np.arange(0, 4, 0.001)
    val, far = [], []
    for train, test in splits:
        far_train = np.array([_ref_val_far(t, dist[train], issame[train])[1] for t in thresholds])
        threshold = _ref_slinear(far_train, thresholds, far_target) if far_train.max() >= far_target else 0.0
        v, f = _ref_val_far(threshold, dist[test], issame[test])
        val.append(v)
        far.append(f)
    return {"accuracy": np.mean(accuracy), "accuracy_std": np.std(accuracy), "fold_accuracy": accuracy,
            "threshold": np.mean(best), "val": np.mean(val), "val_std": np.std(val), "far": np.mean(far),
            "correct": correct, "dist": dist}


def reference_error_rates(dist, issame, targets=(1e-2, 1e-3, 1e-4)):
    """Brute force over every distinct distance: accept dist <= tau. Returns eer, {target: fnmr}."""
    taus = np.r_[-np.inf, np.unique(dist)]
    accept = dist[None, :] <= taus[:, None]
    fmr = (accept & ~issame).sum(1) / (~issame).sum()
    fnmr = 1 - (accept & issame).sum(1) / issame.sum()
    k = np.nonzero(fmr >= fnmr)[0][0]
    a = k - 1
    t = (fnmr[a] - fmr[a]) / ((fmr[k] - fmr[a]) - (fnmr[k] - fnmr[a]))
    eer = fmr[a] + t * (fmr[k] - fmr[a])
    return eer, {x: fnmr[fmr <= x].min() for x in targets}


def random_pairs(seed, n, dim, dtype=np.float64, noise=1.0):
    rng = np.random.default_rng(seed)
    same = rng.random(n) < 0.5
    e1 = rng.standard_normal((n, dim))
    e2 = np.where(same[:, None], e1 + noise * rng.standard_normal((n, dim)), rng.standard_normal((n, dim)))
    # Unnormalised rows of varied norm: verify must normalise.
    e1 *= rng.uniform(0.5, 3.0, (n, 1))
    e2 *= rng.uniform(0.5, 3.0, (n, 1))
    return e1.astype(dtype), e2.astype(dtype), same


# ------------------------------------------------------------------------------------------------ the protocol

@pytest.mark.parametrize("n,dim,folds,noise", [
    (1003, 16, 10, 1.0),   # pairs not divisible by 10: the first 3 folds get 101 pairs
    (997, 4, 10, 0.8),     # low dimension: broad, overlapping distance distributions
    (600, 64, 10, 1.2),
    (203, 8, 7, 0.7),
    (150, 8, 1, 0.7),      # one fold: insightface trains and tests on everything
])
def test_verify_equals_numpy_reference(n, dim, folds, noise):
    e1, e2, same = random_pairs(n + dim, n, dim, noise=noise)
    got = ev.verify(e1, e2, same, folds=folds)
    ref = reference_protocol(e1, e2, same, folds=folds)
    assert got["fold_accuracy"] == ref["fold_accuracy"]
    assert got["accuracy"] == pytest.approx(ref["accuracy"], abs=1e-15)
    assert got["accuracy_std"] == pytest.approx(ref["accuracy_std"], abs=1e-15)
    assert got["threshold"] == pytest.approx(ref["threshold"], abs=1e-12)
    assert got["correct"] == ref["correct"].tolist()
    assert got["val"] == pytest.approx(ref["val"], abs=1e-12)
    assert got["val_std"] == pytest.approx(ref["val_std"], abs=1e-12)
    assert got["far"] == pytest.approx(ref["far"], abs=1e-12)
    eer, fnmr = reference_error_rates(ref["dist"], same)
    assert got["eer"] == pytest.approx(eer, abs=1e-12)
    for key, target in ev.FMR_TARGETS.items():
        assert got["fnmr_at_fmr"][key] == pytest.approx(fnmr[target], abs=1e-12)
        assert got["tar_at_far"][key] == pytest.approx(1 - fnmr[target], abs=1e-12)
    assert 0.55 < got["accuracy"] < 0.999  # the case is neither trivial nor chance
    json.dumps(got)  # JSON-serialisable as it is


def test_verify_float32_matches_reference_up_to_rounding():
    e1, e2, same = random_pairs(7, 1001, 32, dtype=np.float32)
    got = ev.verify(e1, e2, same)
    ref = reference_protocol(e1, e2, same)
    # float32 distances are summed in another order than NumPy's: a pair may sit within an ulp of a threshold.
    assert np.abs(np.array(got["fold_accuracy"]) - ref["fold_accuracy"]).max() <= 1.0 / 100
    assert got["threshold"] == pytest.approx(ref["threshold"], abs=0.011)
    assert got["val"] == pytest.approx(ref["val"], abs=0.02)


def test_verify_hand_made_case():
    # Two folds of 10 pairs; distances chosen away from both threshold grids.
    def pair(d):  # unit vectors at squared distance d
        c = 1 - d / 2
        return [1.0, 0.0], [c, math.sqrt(1 - c * c)]

    ds = [0.5055, 1.5055] * 5 + [0.5055] * 4 + [1.5055] + [1.5055] * 5
    same = np.array([True, False] * 5 + [True] * 5 + [False] * 5)
    e1, e2 = map(np.array, zip(*[pair(d) for d in ds]))
    r = ev.verify(e1, e2, same, folds=2)
    # Fold 0 trains to 0.51 (first threshold above 0.5055, 10/10); fold 1 also trains best (9/10) at 0.51.
    assert r["fold_threshold"] == [0.51, 0.51]
    assert r["fold_accuracy"] == [1.0, 0.9]
    assert r["accuracy"] == pytest.approx(0.95, abs=1e-15)
    assert r["accuracy_std"] == pytest.approx(0.05, abs=1e-15)
    assert r["threshold"] == pytest.approx(0.51, abs=1e-15)
    assert r["correct"] == [True] * 14 + [False] + [True] * 5
    # VAL: the training FAR jumps 0 -> 1 between 1.505 and 1.506; slinear gives 1.505 + 1e-6.
    assert r["val_threshold"] == pytest.approx(1.505001, abs=1e-12)
    assert r["val"] == pytest.approx(0.9)  # 5/5 and 4/5 same pairs below 1.505001
    assert r["val_std"] == pytest.approx(0.1)
    assert r["far"] == 0.0
    # All pairs: ROC (0, 1) -> (0, 0.1) at 0.5055 -> (1, 0) at 1.5055; FMR == FNMR at 1/11 on the last segment.
    assert r["eer"] == pytest.approx(1 / 11, abs=1e-12)
    assert r["fnmr_at_fmr"] == pytest.approx({"1e-2": 0.1, "1e-3": 0.1, "1e-4": 0.1})


def test_verify_threshold_is_strictly_less_than():
    # A distance exactly on a grid value is not accepted at that value: dist < threshold.
    same = np.array([True, False] * 10)
    d = np.where(same, 0.25, 3.0)  # 0.25 == np.arange(0, 4, 0.01)[25] exactly
    assert np.arange(0, 4, 0.01)[25] == 0.25
    e1 = np.tile([[1.0, 0.0]], (20, 1))
    e2 = np.stack([1 - d / 2, np.sqrt(1 - (1 - d / 2) ** 2)], 1)
    r = ev.verify(e1, e2, same, folds=2)
    assert r["fold_threshold"] == [0.26, 0.26]


def test_strict_grid_matches_float64_comparison():
    thresholds = np.arange(0, 4, 0.001)
    g = ev._strict_grid(thresholds, np.float32)
    t32 = thresholds.astype(np.float32)
    d = np.concatenate([t32, np.nextafter(t32, np.float32(-1)), np.nextafter(t32, np.float32(9)),
                        np.random.default_rng(0).uniform(0, 4, 5000).astype(np.float32)])
    assert np.array_equal(d[:, None] < g[None, :], d[:, None].astype(np.float64) < thresholds[None, :])


def test_perfect_separation():
    rng = np.random.default_rng(3)
    n = 501
    same = np.arange(n) % 3 == 0
    d = np.where(same, rng.uniform(0.2, 0.8, n), rng.uniform(1.5, 2.5, n))
    c = 1 - d / 2
    e1 = np.tile([[1.0, 0.0]], (n, 1))
    e2 = np.stack([c, np.sqrt(1 - c * c)], 1)
    r = ev.verify(e1, e2, same)
    assert r["accuracy"] == 1.0 and r["accuracy_std"] == 0.0
    assert r["eer"] == 0.0
    assert r["fnmr_at_fmr"] == {"1e-2": 0.0, "1e-3": 0.0, "1e-4": 0.0}
    assert r["val"] == 1.0 and all(r["correct"])
    # The VAL threshold is interpolated past the first training false accept, so FAR need not be 0.
    assert r["far"] == pytest.approx(reference_protocol(e1, e2, same)["far"], abs=1e-12)


def test_verify_roc_points_and_validation():
    e1, e2, same = random_pairs(11, 3000, 8)
    r = ev.verify(e1, e2, same)
    fmr, fnmr = np.array(r["roc"]["fmr"]), np.array(r["roc"]["fnmr"])
    assert 10 < len(fmr) <= ev.ROC_POINTS
    assert np.all(np.diff(fmr) > 0) and np.all(np.diff(fnmr) <= 0)
    assert np.all(np.diff(r["roc"]["threshold"]) > 0)
    with pytest.raises(ValueError, match="issame"):
        ev.verify(e1, e2, same[:-1])
    with pytest.raises(ValueError, match="both same and different"):
        ev.verify(e1, e2, np.ones_like(same))
    with pytest.raises(ValueError, match="folds"):
        ev.verify(e1[:5], e2[:5], same[:5], folds=10)


@pytest.mark.parametrize("seed", range(5))
def test_interp_slinear_is_scipy_slinear(seed):
    rng = np.random.default_rng(seed)
    # FAR-like curves: nondecreasing, many repeated values (scipy >= 1.9 refuses those, older scipy did this).
    x = np.sort(np.round(rng.uniform(0, 1, (4, 300)) ** 3, 2), axis=1)
    x[:, 0] = 0.0
    y = np.broadcast_to(np.arange(300) * 0.01, x.shape)
    for target in (1e-3, 0.0, 0.01, 0.25, x[0, 150]):
        got = ev._interp_slinear(x, y, target)
        assert got == pytest.approx([_ref_slinear(xr, yr, target) for xr, yr in zip(x, y)], rel=1e-12, abs=1e-15)
    xs, ys = x[:, :150], y[:, :150]
    perm = rng.permutation(150)
    got = ev._interp_slinear(xs[:, perm], ys[:, perm], 0.02)
    assert got == pytest.approx([_ref_slinear(xr, yr, 0.02) for xr, yr in zip(xs[:, perm], ys[:, perm])], rel=1e-12)
    xu = np.unique(x[0])
    yu = rng.uniform(0, 4, len(xu))
    assert ev._interp_slinear(xu[None], yu[None], 0.123)[0] == pytest.approx(
        float(interpolate.interp1d(xu, yu, kind="slinear")(0.123)), rel=1e-12)


# -------------------------------------------------------------------------------------------------- statistics

@pytest.mark.parametrize("b,c,p", [(3, 7, 352 / 1024), (0, 5, 2 / 32), (1, 10, 24 / 2048), (2, 2, 1.0), (0, 0, 1.0)])
def test_mcnemar_known_tables(b, c, p):
    # Concordant pairs (both right, both wrong) must not matter.
    a = [True] * b + [False] * c + [True] * 50 + [False] * 9
    bb = [False] * b + [True] * c + [True] * 50 + [False] * 9
    r = stats.mcnemar(a, bb)
    assert (r["b"], r["c"]) == (b, c)
    assert r["p_value"] == pytest.approx(p, rel=1e-12)


def test_mcnemar_matches_scipy_binomtest():
    rng = np.random.default_rng(0)
    a, b = rng.random(6000) < 0.99, rng.random(6000) < 0.985
    r = stats.mcnemar(a, b)
    n = r["b"] + r["c"]
    assert r["p_value"] == pytest.approx(scipy_stats.binomtest(r["b"], n, 0.5).pvalue, rel=1e-9)
    with pytest.raises(ValueError, match="share the pairs"):
        stats.mcnemar(a, b[:-1])


def test_bootstrap_ci():
    correct = np.arange(6000) % 100 != 0  # 99 % right
    low, high = stats.bootstrap_ci(correct, n_resamples=4000, seed=1)
    assert low < 0.99 < high
    half = 1.96 * math.sqrt(0.99 * 0.01 / 6000)  # normal approximation of the same interval
    assert low == pytest.approx(0.99 - half, abs=6e-4) and high == pytest.approx(0.99 + half, abs=6e-4)
    assert stats.bootstrap_ci(correct, seed=1) == stats.bootstrap_ci(correct, seed=1)
    assert stats.bootstrap_ci(np.ones(100, bool)) == (1.0, 1.0)
    narrow = stats.bootstrap_ci(correct, alpha=0.5, seed=1)
    assert low < narrow[0] <= narrow[1] < high


# ----------------------------------------------------------------------------------------------------- reports

def test_compare_table():
    base = [True] * 90 + [False] * 10
    better = [True] * 88 + [False] * 2 + [True] * 10  # b = 2, c = 10
    runs = {
        "teacher": {"accuracy": 0.99417, "accuracy_std": 0.0035, "eer": 0.006, "fnmr_at_fmr": {"1e-3": 0.012},
                    "correct": base, "params": 11_440_000, "gflops": 1.82, "mb": 45.8},
        "student": {"accuracy": 0.99267, "accuracy_std": 0.004, "eer": 0.008, "fnmr_at_fmr": {"1e-3": 0.02},
                    "correct": better, "params": 890_000, "gflops": 0.5},
        "no-decisions": {"accuracy": 0.5, "accuracy_std": 0.1, "eer": 0.5, "fnmr_at_fmr": {"1e-3": 1.0}},
    }
    table = stats.compare(runs, baseline="teacher")
    lines = table.strip().splitlines()
    assert len(lines) == 5 and lines[0].startswith("| model") and "p vs teacher" in lines[0]
    teacher, student, other = (line.split(" | ") for line in lines[2:])
    assert teacher[1:7] == ["99.417 ± 0.350", "0.60", "1.20", "11.44", "1.82", "45.8"]
    assert student[6] == "n/a"  # no MB given
    p = stats.mcnemar(base, better)["p_value"]
    assert student[7].rstrip(" |") == f"{p:.3g} (2, 10)"
    assert teacher[7].rstrip(" |") == "baseline" and other[7].rstrip(" |") == "n/a"
    assert "p vs" not in stats.compare(runs)
    with pytest.raises(KeyError, match="baseline"):
        stats.compare(runs, baseline="nobody")


def test_plot_roc_writes_png(tmp_path):
    e1, e2, same = random_pairs(5, 800, 8)
    r = ev.verify(e1, e2, same)
    path = tmp_path / "sub" / "roc.png"
    ev.plot_roc({"a": (r["roc"]["fmr"], r["roc"]["fnmr"]), "b": ([0.0, 0.1, 1.0], [1.0, 0.2, 0.0])}, path,
                title="t")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert [p.name for p in path.parent.iterdir()] == ["roc.png"]  # no temporary file left


# --------------------------------------------------------------------------------------------------- embedding

class TinyNet(nn.Module):
    """Conv + flatten + Dense: position dependent, so an image and its mirror embed differently."""

    @nn.compact
    def __call__(self, x, train=False):
        x = nn.relu(nn.Conv(4, (3, 3), strides=2)(x))
        return nn.Dense(8)(x.reshape(x.shape[0], -1))


@pytest.fixture(scope="module")
def tiny():
    model = TinyNet()
    variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
    images = np.random.default_rng(0).integers(0, 256, (10, 8, 8, 3), dtype=np.uint8)
    return model.apply, variables, images


def _normalised(e):
    e = np.asarray(e, np.float64)
    return e / np.linalg.norm(e, axis=1, keepdims=True)


def test_embed_flip_is_the_normalised_sum_of_two_embeddings(tiny):
    apply, variables, images = tiny
    x = (images.astype(np.float32) - 127.5) / 127.5
    direct = np.asarray(apply(variables, x)) + np.asarray(apply(variables, x[:, :, ::-1]))
    got = ev.embed(apply, variables, images, batch_size=4)
    assert got.dtype == np.float32 and got.shape == (10, 8)
    np.testing.assert_allclose(got, _normalised(direct), atol=1e-6)
    np.testing.assert_allclose(ev.embed(apply, variables, images, flip=False, batch_size=4),
                               _normalised(apply(variables, x)), atol=1e-6)
    # Flip-summed embeddings do not change when the images are mirrored.
    np.testing.assert_allclose(ev.embed(apply, variables, images[:, :, ::-1], batch_size=4), got, atol=1e-6)
    assert not np.allclose(ev.embed(apply, variables, images, flip=False), got, atol=1e-3)


def test_embed_batches_dtypes_and_mesh(tiny):
    apply, variables, images = tiny
    reference = ev.embed(apply, variables, images, batch_size=64)
    x = (images.astype(np.float32) - 127.5) / 127.5
    np.testing.assert_allclose(ev.embed(apply, variables, x, batch_size=3), reference, atol=1e-6)  # 3+3+3+1(pad)
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    assert len(mesh.devices.flat) == 8
    # batch 4 -> 8 (a multiple of the devices), 10 images -> 2 batches, the second padded with 6 zeros
    np.testing.assert_allclose(ev.embed(apply, variables, images, batch_size=4, mesh=mesh), reference, atol=1e-6)
    with pytest.raises(ValueError, match="images"):
        ev.embed(apply, variables, images[0])


def test_evaluate_targets_and_write_results(tiny, tmp_path):
    apply, variables, _ = tiny
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (60, 8, 8, 3), dtype=np.uint8)
    images[1::4] = images[0::4]  # even pairs: the same image twice
    issame = np.arange(30) % 2 == 0
    lines = []
    results = ev.evaluate_targets(apply, variables, {"syn": (images, issame)}, step=7, batch_size=16,
                                  log=lines.append)
    assert any(re.fullmatch(r"\[syn\]\[7\]Accuracy-Flip: \d\.\d{5}\+-\d\.\d{5}", line) for line in lines)
    assert any(line.startswith("[syn][7]XNorm: ") for line in lines)
    emb = ev.embed(apply, variables, images, batch_size=16)
    expected = ev.verify(emb[0::2], emb[1::2], issame)
    assert results["syn"]["accuracy"] == expected["accuracy"] == 1.0  # identical images: distance 0
    assert results["syn"]["xnorm"] > 0
    ev.write_results(tmp_path / "eval", results, step=7)
    saved = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert saved["step"] == 7 and saved["syn"]["accuracy"] == 1.0 and len(saved["syn"]["correct"]) == 30
    assert (tmp_path / "eval" / "roc.png").read_bytes()[:4] == b"\x89PNG"
    # Readable as the umask allows (not mkstemp's 0600); a second set evaluated later keeps the first one's results.
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "eval" / "results.json").stat().st_mode & 0o777 == 0o666 & ~umask
    ev.write_results(tmp_path / "eval", {"other": dict(results["syn"], accuracy=0.5)}, step=9)
    saved = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert saved["step"] == 9 and saved["other"]["step"] == 9 and saved["other"]["accuracy"] == 0.5
    assert saved["syn"]["step"] == 7 and saved["syn"]["accuracy"] == 1.0
    with pytest.raises(ValueError, match="images for"):
        ev.evaluate_targets(apply, variables, {"bad": (images[:59], issame)}, step=0, log=lines.append)
