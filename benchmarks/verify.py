"""Benchmark: facekd_jax.evaluate.verify against a plain NumPy threshold-grid loop (insightface's verification.py).

Both run the 6,000-pair protocol (10 folds; accuracy on the 400-threshold grid, VAL on the 4,000-threshold grid)
on the same random 512-d embeddings, tuned to about 99 % accuracy. "Cold" is the first call in this process
(verify's includes its jit compilation), "warm" the median of the next calls. The last line is
`speedup_warm=<float>` (NumPy loop warm time / verify warm time).

    python benchmarks/verify.py [--pairs 6000] [--dim 512] [--repeats 5]
"""
import argparse
import statistics
import time

import numpy as np
from scipy import interpolate

from facekd_jax.evaluate import verify


def _accuracy(threshold, dist, issame):  # insightface calculate_accuracy
    predict = np.less(dist, threshold)
    tp = np.sum(np.logical_and(predict, issame))
    fp = np.sum(np.logical_and(predict, np.logical_not(issame)))
    tn = np.sum(np.logical_and(np.logical_not(predict), np.logical_not(issame)))
    fn = np.sum(np.logical_and(np.logical_not(predict), issame))
    tpr = 0 if tp + fn == 0 else float(tp) / float(tp + fn)
    fpr = 0 if fp + tn == 0 else float(fp) / float(fp + tn)
    return tpr, fpr, float(tp + tn) / dist.size


def _val_far(threshold, dist, issame):  # insightface calculate_val_far
    predict = np.less(dist, threshold)
    true_accept = np.sum(np.logical_and(predict, issame))
    false_accept = np.sum(np.logical_and(predict, np.logical_not(issame)))
    return float(true_accept) / float(np.sum(issame)), float(false_accept) / float(np.sum(~issame))


def _slinear(x, y, x_new):
    """interp1d(x, y, kind='slinear')(x_new) as scipy < 1.9 computed it (scipy >= 1.9 rejects repeated x)."""
    order = np.argsort(x, kind="mergesort")
    x, y = x[order], y[order]
    return float(interpolate.BSpline.construct_fast(np.r_[x[0], x, x[-1]], y, 1)(x_new))


def _splits(n, folds):  # sklearn KFold(shuffle=False)
    sizes = [n // folds + (1 if f < n % folds else 0) for f in range(folds)]
    bounds = np.r_[0, np.cumsum(sizes)]
    idx = np.arange(n)
    return [(np.r_[idx[:a], idx[b:]], idx[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]


def numpy_protocol(embeddings1, embeddings2, issame, folds=10, far_target=1e-3):
    """insightface verification.evaluate, loop for loop: returns (accuracy, std, threshold, val, val_std, far)."""
    e1 = embeddings1 / np.linalg.norm(embeddings1, axis=1, keepdims=True)
    e2 = embeddings2 / np.linalg.norm(embeddings2, axis=1, keepdims=True)
    dist = np.sum(np.square(np.subtract(e1, e2)), 1)
    splits = _splits(len(issame), folds)
    thresholds = np.arange(0, 4, 0.01)
    accuracy, best = np.zeros(folds), np.zeros(folds)
    for f, (train, test) in enumerate(splits):
        acc_train = np.array([_accuracy(t, dist[train], issame[train])[2] for t in thresholds])
        best[f] = thresholds[np.argmax(acc_train)]
        for t in thresholds:  # insightface also computes the test fold's ROC at every threshold
            _accuracy(t, dist[test], issame[test])
        accuracy[f] = _accuracy(best[f], dist[test], issame[test])[2]
    thresholds = np.arange(0, 4, 0.001)
    val, far = np.zeros(folds), np.zeros(folds)
    for f, (train, test) in enumerate(splits):
        far_train = np.array([_val_far(t, dist[train], issame[train])[1] for t in thresholds])
        threshold = _slinear(far_train, thresholds, far_target) if far_train.max() >= far_target else 0.0
        val[f], far[f] = _val_far(threshold, dist[test], issame[test])
    return accuracy.mean(), accuracy.std(), best.mean(), val.mean(), val.std(), far.mean()


def _timed(fn, repeats):
    start = time.perf_counter()
    out = fn()
    cold = time.perf_counter() - start
    warm = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        warm.append(time.perf_counter() - start)
    return out, cold, statistics.median(warm)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=6000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5, help="warm calls of the NumPy loop (verify: 10x)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rng = np.random.default_rng(args.seed)
    issame = np.arange(args.pairs) % 2 == 0  # 3,000 + 3,000, as LFW's 6,000 pairs
    e1 = rng.standard_normal((args.pairs, args.dim)).astype(np.float32)
    # Cosine of a same pair about 0.2 against 0 +- 0.044 for different ones: about 99 % accuracy at 512-d.
    e2 = np.where(issame[:, None], e1 + 4.8 * rng.standard_normal(e1.shape), rng.standard_normal(e1.shape))
    e2 = e2.astype(np.float32)

    ours, ours_cold, ours_warm = _timed(lambda: verify(e1, e2, issame), 10 * args.repeats)
    ref, ref_cold, ref_warm = _timed(lambda: numpy_protocol(e1, e2, issame), args.repeats)
    print(f"{args.pairs} pairs, {args.dim}-d float32 embeddings, 10 folds, grids of 400 and 4,000 thresholds")
    print(f"verify (jax):       cold {ours_cold * 1e3:9.1f} ms   warm {ours_warm * 1e3:9.2f} ms")
    print(f"numpy loop:         cold {ref_cold * 1e3:9.1f} ms   warm {ref_warm * 1e3:9.2f} ms")
    print(f"accuracy  verify {ours['accuracy']:.6f} +- {ours['accuracy_std']:.6f}   "
          f"numpy {ref[0]:.6f} +- {ref[1]:.6f}   equal: {ours['accuracy'] == ref[0]}")
    print(f"threshold verify {ours['threshold']:.4f}   numpy {ref[2]:.4f}   equal: {ours['threshold'] == ref[2]}")
    print(f"VAL@FAR=1e-3 verify {ours['val']:.6f} +- {ours['val_std']:.6f} (FAR {ours['far']:.6f})   "
          f"numpy {ref[3]:.6f} +- {ref[4]:.6f} (FAR {ref[5]:.6f})")
    print(f"EER {ours['eer']:.5f}  FNMR@FMR=1e-3 {ours['fnmr_at_fmr']['1e-3']:.5f} (verify only)")
    print(f"speedup cold {ref_cold / ours_cold:.1f}x")
    print(f"speedup_warm={ref_warm / ours_warm:.1f}")


if __name__ == "__main__":
    main()
