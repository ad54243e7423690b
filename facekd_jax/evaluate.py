"""Face verification: jitted flip-sum embedding, the insightface 10-fold protocol, and its reports (facekd_jax.stats: is a gain more than noise).

`verify` computes exactly what insightface's `verification.evaluate` computes (so an accuracy here means what it
means in papers), plus biometric error rates over all pairs (EER, FNMR at fixed FMR, ISO/IEC 19795-1 names), an
ROC, and the per-pair decisions that paired statistics (`mcnemar`, `bootstrap_ci`) need. Every threshold of a grid
is evaluated at once: distances are binned into the sorted grid (`searchsorted`) and counted with a cumulative sum,
per fold and class, in one jitted function; only per-fold scalars are finished in float64 NumPy on the host.
"""
from __future__ import annotations

import functools
import json
import os
import pathlib
import tempfile
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from facekd_jax import errors

# insightface verification.py grids; the same np.arange values, so float rounding matches.
ACCURACY_THRESHOLDS = np.arange(0, 4, 0.01)
VAL_THRESHOLDS = np.arange(0, 4, 0.001)
# Keys of fnmr_at_fmr / tar_at_far (strings, so the dict stays JSON-serialisable).
FMR_TARGETS = {"1e-2": 1e-2, "1e-3": 1e-3, "1e-4": 1e-4}
ROC_POINTS = 200  # at most this many ROC vertices are kept (log-spaced in FMR)

__all__ = [
    "ACCURACY_THRESHOLDS", "VAL_THRESHOLDS", "FMR_TARGETS", "embed", "embed_program", "raw_embedder", "verify",
    "plot_roc", "evaluate_targets", "write_results",
]


# ----------------------------------------------------------------------------------------------------- embedding

def _model_input(images: jax.Array) -> jax.Array:
    """The model's input: uint8 [B,S,S,3] -> float32 (x - 127.5) / 127.5; float images are used as given."""
    if images.dtype == jnp.uint8:
        return (images.astype(jnp.float32) - 127.5) / 127.5
    return images.astype(jnp.float32)


def _build_embed_fn(apply_fn: Callable, flip: bool, mesh: jax.sharding.Mesh | None) -> Callable:
    """jitted (variables, images [B,S,S,3]) -> (L2-normalised embeddings [B,E] f32, mean norm [B] f32)."""

    def embed_batch(variables, images):
        x = _model_input(images)
        e = apply_fn(variables, x).astype(jnp.float32)
        norm = jnp.linalg.norm(e, axis=-1)
        if flip:  # insightface "Accuracy-Flip": embedding of the image plus that of its mirror
            e_flip = apply_fn(variables, jnp.flip(x, axis=2)).astype(jnp.float32)
            norm = 0.5 * (norm + jnp.linalg.norm(e_flip, axis=-1))
            e = e + e_flip
        total = jnp.linalg.norm(e, axis=-1, keepdims=True)
        return e / jnp.maximum(total, 1e-12), norm

    if mesh is None:
        return jax.jit(embed_batch)
    replicated = NamedSharding(mesh, PartitionSpec())
    # Replicated outputs: every process can read the whole batch back (multi-host safe).
    return jax.jit(embed_batch, out_shardings=(replicated, replicated))


@functools.lru_cache(maxsize=16)
def _cached_embed_fn(apply_fn, flip, mesh):
    return _build_embed_fn(apply_fn, flip, mesh)


def embed_program(apply_fn: Callable, flip: bool, mesh: jax.sharding.Mesh | None) -> Callable:
    """The jitted (variables, images uint8 or float [B, S, S, 3]) -> (L2-normalised embeddings [B, E] float32,
    mean embedding norm [B]) that `embed` runs batch by batch (facekd_jax.plan compiles it for a TPU topology)."""
    try:  # one compilation per (apply_fn, flip, mesh): evaluate_targets reuses it across sets
        return _cached_embed_fn(apply_fn, flip, mesh)
    except TypeError:  # unhashable callable: compiled per call instead
        return _build_embed_fn(apply_fn, flip, mesh)


def _embed_with_norms(apply_fn, variables, images, *, batch_size=256, flip=True, mesh=None):
    """embed(), also returning the mean embedding norm per image (arcface_torch's XNorm) [N]."""
    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"embed: images must be [N, H, W, C], got shape {images.shape}")
    n = images.shape[0]
    if n == 0:
        raise ValueError("embed: no images")
    if batch_size < 1:
        raise ValueError(f"embed: batch_size must be >= 1, got {batch_size}")
    if images.dtype != np.uint8 and not np.issubdtype(images.dtype, np.floating):
        raise ValueError(f"embed: images must be uint8 or float, got {images.dtype}")
    shards, batch_sharding, variables = _on_mesh(mesh, variables, "embed")
    # Static batch: one compilation; small sets use a smaller (still static) batch, a multiple of the shards.
    bs = -(-min(batch_size, n) // shards) * shards
    fn = embed_program(apply_fn, bool(flip), mesh)
    outputs = []
    for start in range(0, n, bs):
        chunk = images[start:start + bs]
        if len(chunk) < bs:  # pad the last batch rather than compile a second shape
            chunk = np.concatenate([chunk, np.zeros((bs - len(chunk),) + chunk.shape[1:], chunk.dtype)])
        if mesh is None:
            batch = jax.device_put(chunk)
        else:
            batch = jax.make_array_from_callback(chunk.shape, batch_sharding, lambda idx, c=chunk: c[idx])
        outputs.append(fn(variables, batch))  # asynchronous: the next batch is prepared meanwhile
    emb = np.concatenate([np.asarray(e) for e, _ in outputs])[:n]
    norms = np.concatenate([np.asarray(m) for _, m in outputs])[:n]
    return emb.astype(np.float32), norms.astype(np.float32)


def _on_mesh(mesh, variables, who: str):
    """(shards, the batch's sharding, the variables replicated) of an embedding program on `mesh`'s data axis;
    (1, None, variables) without a mesh."""
    if mesh is None:
        return 1, None, variables
    if "data" not in mesh.axis_names:
        raise ValueError(f"{who}: the mesh needs a 'data' axis, it has {mesh.axis_names}")
    return (mesh.shape["data"], NamedSharding(mesh, PartitionSpec("data")),
            jax.device_put(variables, NamedSharding(mesh, PartitionSpec())))


def embed(apply_fn: Callable, variables: Any, images, *, batch_size: int = 256, flip: bool = True,
          mesh: jax.sharding.Mesh | None = None) -> np.ndarray:
    """Embeds images in fixed-size jitted batches.

    apply_fn(variables, images float32 [B,H,W,3] normalised (x-127.5)/127.5) -> embeddings [B,E].
    images: uint8 [N,H,W,3] (normalised inside) or float [N,H,W,3] (used as given).
    flip: sum the embeddings of each image and of its horizontal mirror before normalising.
    mesh: a Mesh with a "data" axis; batches are sharded over it (padded to a multiple of its size).
      None: the default device only.
    Returns np.float32 [N, E], L2-normalised rows.
    """
    return _embed_with_norms(apply_fn, variables, images, batch_size=batch_size, flip=flip, mesh=mesh)[0]


@functools.lru_cache(maxsize=16)
def _raw_embed_program(apply_fn: Callable, mesh: jax.sharding.Mesh | None) -> Callable:
    """jitted (variables, images [B,S,S,3]) -> the model's embeddings [B,E] float32, not normalised."""

    def embed_raw(variables, images):
        return apply_fn(variables, _model_input(images)).astype(jnp.float32)

    if mesh is None:
        return jax.jit(embed_raw)
    return jax.jit(embed_raw, out_shardings=NamedSharding(mesh, PartitionSpec()))


def raw_embedder(apply_fn: Callable, variables: Any, *, mesh: jax.sharding.Mesh | None = None
                 ) -> Callable[[np.ndarray], np.ndarray]:
    """A function (images uint8 or float [B,S,S,3]) -> embeddings np.float32 [B,E], neither flipped nor
    normalised: for protocols that weigh and pool features before normalising (IJB-B/C, facekd_jax.data.ijb).

    uint8 images are normalised (x - 127.5) / 127.5 as in `embed`. One compilation per batch shape: call it with
    a fixed B (ijb pads its last batch). mesh: batches are sharded over its "data" axis (padded to a multiple of
    its size here); None: the default device only.
    """
    try:
        program = _raw_embed_program(apply_fn, mesh)
    except TypeError:  # unhashable callable: compiled per embedder instead
        program = _raw_embed_program.__wrapped__(apply_fn, mesh)
    shards, batch_sharding, variables = _on_mesh(mesh, variables, "raw_embedder")

    def embed_raw(images) -> np.ndarray:
        images = np.asarray(images)
        if images.ndim != 4:
            raise ValueError(f"raw_embedder: images must be [B, H, W, C], got shape {images.shape}")
        n = images.shape[0]
        if n % shards:
            pad = np.zeros((shards - n % shards,) + images.shape[1:], images.dtype)
            images = np.concatenate([images, pad])
        if batch_sharding is None:
            batch = jax.device_put(images)
        else:
            batch = jax.make_array_from_callback(images.shape, batch_sharding, lambda idx: images[idx])
        return np.asarray(program(variables, batch), np.float32)[:n]

    return embed_raw


# ------------------------------------------------------------------------------------------------ the protocol

def fold_sizes(n: int, folds: int) -> np.ndarray:
    """Sizes of sklearn KFold(n_splits=folds, shuffle=False) test folds over n items: int [folds]."""
    sizes = np.full(folds, n // folds, dtype=np.int64)
    sizes[: n % folds] += 1
    return sizes


def _strict_grid(thresholds: np.ndarray, dtype) -> np.ndarray:
    """Grid g with (d < g[j]) == (d < thresholds[j]) for every d of `dtype` (NumPy 2 compares in float64)."""
    if np.dtype(dtype) == np.float64:
        return thresholds
    g = thresholds.astype(np.float32)
    # The smallest float32 >= t: below it, no float32 lies between t and g.
    return np.where(g < thresholds, np.nextafter(g, np.float32(np.inf)), g).astype(np.float32)


def _accept_counts(dist, fold, cls, grid, folds):
    """Pairs accepted (dist < grid[j]) per fold, class and threshold: int [folds, 2, T]."""
    t = grid.shape[0]
    first = jnp.searchsorted(grid, dist, side="right")  # a pair is accepted from this grid index on
    index = (fold * 2 + cls) * (t + 1) + first
    hist = jax.ops.segment_sum(jnp.ones_like(index), index, folds * 2 * (t + 1)).reshape(folds, 2, t + 1)
    return jnp.cumsum(hist, axis=-1)[..., :t], hist.sum(-1)


@functools.partial(jax.jit, static_argnames=("folds",))
def _protocol_counts(e1, e2, same, *, folds):
    """The grid work of verify: distances, best accuracy threshold index per fold, train false accepts."""
    e1 = e1 / jnp.linalg.norm(e1, axis=1, keepdims=True)
    e2 = e2 / jnp.linalg.norm(e2, axis=1, keepdims=True)
    dist = jnp.sum(jnp.square(e1 - e2), axis=1)
    n = dist.shape[0]
    fold = jnp.asarray(np.repeat(np.arange(folds, dtype=np.int32), fold_sizes(n, folds)))
    cls = same.astype(jnp.int32)

    def train(counts):  # counts on the other folds (one fold: train on all, as insightface's LFold)
        return counts.sum(0, keepdims=True) - counts if folds > 1 else counts

    acc, per_fold = _accept_counts(dist, fold, cls, _strict_grid(ACCURACY_THRESHOLDS, dist.dtype), folds)
    acc_train, n_train = train(acc), train(per_fold)
    correct_train = acc_train[:, 1] + (n_train[:, 0:1] - acc_train[:, 0])  # true accepts + true rejects
    best = jnp.argmax(correct_train, axis=1)  # first maximum, as np.argmax

    val, _ = _accept_counts(dist, fold, cls, _strict_grid(VAL_THRESHOLDS, dist.dtype), folds)
    return {"dist": dist, "best": best, "false_accepts_train": train(val)[:, 0], "diff_train": n_train[:, 0]}


def _device_array(x: np.ndarray, dtype) -> jax.Array:
    """x as a jax array of dtype; on CPU through a 64-byte aligned host copy, which XLA uses without copying
    (a plain device_put of an unaligned array is several times slower than the copy)."""
    if isinstance(x, jax.Array) or jax.default_backend() != "cpu":
        return jnp.asarray(x, dtype)
    x = np.asarray(x, dtype)
    if x.ctypes.data % 64:
        raw = np.empty(x.nbytes + 64, np.uint8)
        start = -raw.ctypes.data % 64
        aligned = raw[start:start + x.nbytes].view(dtype).reshape(x.shape)
        np.copyto(aligned, x)
        x = aligned
    return jax.device_put(x)


def _interp_slinear(x: np.ndarray, y: np.ndarray, x_new: float) -> np.ndarray:
    """scipy interp1d(x, y, kind='slinear')(x_new) row-wise, as scipy < 1.9 evaluated it.

    x, y float64 [R, T] (x may repeat values; scipy >= 1.9 refuses those, and insightface's grids always have
    them). interp1d stably argsorts x, builds a degree-1 B-spline on knots (x0, x..., x_last) and evaluates it by
    de Boor on the last knot interval [x[i], x[i+1]) with x[i] <= x_new (an empty interval gives 0).
    Returns float64 [R].
    """
    if np.any(x[:, 1:] < x[:, :-1]):  # FAR curves are already sorted; the stable sort is then the identity
        order = np.argsort(x, axis=1, kind="stable")
        x, y = np.take_along_axis(x, order, 1), np.take_along_axis(y, order, 1)
    i = np.clip((x <= x_new).sum(1) - 1, 0, x.shape[1] - 2)[:, None]
    xa, xb = np.take_along_axis(x, i, 1)[:, 0], np.take_along_axis(x, i + 1, 1)[:, 0]
    ya, yb = np.take_along_axis(y, i, 1)[:, 0], np.take_along_axis(y, i + 1, 1)[:, 0]
    with np.errstate(divide="ignore", invalid="ignore"):
        w = 1.0 / (xb - xa)
        value = ya * (w * (xb - x_new)) + yb * (w * (x_new - xa))
    return np.where(xb == xa, 0.0, value)


def _ratio(num, den):
    """num / den as float64, 0 where den == 0 (insightface's convention for tpr/fpr)."""
    num, den = np.asarray(num, np.float64), np.asarray(den, np.float64)
    return np.divide(num, den, out=np.zeros(np.broadcast(num, den).shape), where=den != 0)


def _error_rates(sorted_dist, sorted_same):
    """ROC over all pairs, accepting dist <= tau for tau at each distinct distance (and below all).

    Returns (fmr, fnmr, tau) float64 [K+1]: fmr nondecreasing from 0 to 1, fnmr nonincreasing from 1 to 0.
    """
    same = sorted_same.astype(bool)
    last = np.r_[sorted_dist[1:] != sorted_dist[:-1], True]  # ties are accepted together
    true_accepts = np.r_[0, np.cumsum(same)[last]]
    false_accepts = np.r_[0, np.cumsum(~same)[last]]
    fmr = false_accepts / max(int((~same).sum()), 1)
    fnmr = 1.0 - true_accepts / max(int(same.sum()), 1)
    lowest = np.nextafter(sorted_dist[0], -np.inf) if len(sorted_dist) else 0.0
    tau = np.r_[lowest, sorted_dist[last]].astype(np.float64)
    return fmr, fnmr, tau


def _eer(fmr, fnmr, tau):
    """Equal error rate and its distance threshold, linear between the ROC vertices around FMR == FNMR."""
    gap = fmr - fnmr  # strictly increasing from -1 to 1
    k = int(np.argmax(gap >= 0))
    a = k - 1
    alpha = gap[a] / (gap[a] - gap[k])
    return float(fmr[a] + alpha * (fmr[k] - fmr[a])), float(tau[a] + alpha * (tau[k] - tau[a]))


def verify(embeddings1, embeddings2, issame, *, folds: int = 10, far_target: float = 1e-3) -> dict:
    """insightface's verification protocol, plus EER, FNMR at fixed FMR, an ROC and per-pair decisions.

    embeddings1, embeddings2: [N, E] (any scale; rows are L2-normalised here), pair k = (embeddings1[k],
      embeddings2[k]); float64 inputs are computed in float64, anything else in float32.
    issame: bool [N].
    folds: KFold(folds, shuffle=False) test folds in order, sizes as sklearn (the first N % folds get one more).
    Returns a JSON-serialisable dict (floats, lists):
      accuracy, accuracy_std (np.std over folds), fold_accuracy [folds], threshold (mean of the fold thresholds,
        squared L2 distance), fold_threshold [folds]: each fold's threshold is the first maximum of the other folds'
        accuracy over 0, 0.01, ..., 3.99; a pair is called "same" when dist < threshold.
      val, val_std, far (VAL at far_target, thresholds 0, 0.001, ..., 3.999 interpolated on the other folds),
      eer, eer_threshold, fnmr_at_fmr and tar_at_far ({"1e-2", "1e-3", "1e-4"}: the smallest FNMR, over all
        pairs, among thresholds with FMR <= target; TAR = 1 - FNMR),
      roc {"fmr", "fnmr", "threshold"} (at most ROC_POINTS vertices, accept dist <= threshold),
      correct [N] bool (the pair's decision under its held-out fold's threshold was right), pairs, folds.
    """
    e1 = embeddings1 if isinstance(embeddings1, jax.Array) else np.asarray(embeddings1)
    e2 = embeddings2 if isinstance(embeddings2, jax.Array) else np.asarray(embeddings2)
    same = np.asarray(issame).astype(bool).reshape(-1)
    if e1.ndim != 2 or e1.shape != e2.shape:
        raise ValueError(f"verify: embeddings1 {e1.shape} and embeddings2 {e2.shape} must both be [N, E]")
    n = e1.shape[0]
    if same.shape[0] != n:
        raise ValueError(f"verify: issame has {same.shape[0]} entries for {n} pairs")
    if not isinstance(folds, (int, np.integer)) or not 1 <= folds <= n:
        raise ValueError(f"verify: folds must be an int in [1, {n}] (number of pairs), got {folds!r}")
    if same.all() or not same.any():
        raise ValueError(f"verify: need both same and different pairs ({int(same.sum())} same of {n})")
    folds = int(folds)
    dtype = np.float64 if np.result_type(e1.dtype, e2.dtype) == np.float64 else np.float32
    with jax.enable_x64(dtype == np.float64):
        out = jax.device_get(_protocol_counts(_device_array(e1, dtype), _device_array(e2, dtype),
                                              jnp.asarray(same), folds=folds))
    dist = out["dist"]
    sizes = fold_sizes(n, folds)
    starts = np.r_[0, np.cumsum(sizes)[:-1]]
    fold_of = np.repeat(np.arange(folds), sizes)

    # Accuracy: each fold's best training threshold applied to the fold (float64 compare, as NumPy does).
    fold_threshold = ACCURACY_THRESHOLDS[out["best"]]
    correct = (dist < fold_threshold[fold_of]) == same
    fold_accuracy = np.add.reduceat(correct.astype(np.int64), starts) / sizes

    # VAL at far_target: interpolate the threshold on the training FAR curve (0 when the target is out of reach).
    far_train = _ratio(out["false_accepts_train"], out["diff_train"][:, None])
    reach = far_train.max(1) >= far_target
    grid = np.broadcast_to(VAL_THRESHOLDS, far_train.shape)
    val_threshold = np.where(reach, _interp_slinear(far_train, grid, far_target), 0.0)
    accepted = dist < val_threshold[fold_of]
    true_accepts = np.add.reduceat((accepted & same).astype(np.int64), starts)
    false_accepts = np.add.reduceat((accepted & ~same).astype(np.int64), starts)
    fold_val = _ratio(true_accepts, np.add.reduceat(same.astype(np.int64), starts))
    fold_far = _ratio(false_accepts, np.add.reduceat((~same).astype(np.int64), starts))

    order = np.argsort(dist, kind="stable")
    fmr, fnmr, tau = _error_rates(dist[order].astype(np.float64), same[order])
    eer, eer_threshold = _eer(fmr, fnmr, tau)
    at = {key: int(np.searchsorted(fmr, target, side="right")) - 1 for key, target in FMR_TARGETS.items()}
    n_diff = int((~same).sum())
    keep = np.unique(np.searchsorted(fmr, np.geomspace(1.0 / n_diff, 1.0, ROC_POINTS), side="right") - 1)
    return {
        "accuracy": float(np.mean(fold_accuracy)),
        "accuracy_std": float(np.std(fold_accuracy)),
        "threshold": float(np.mean(fold_threshold)),
        "fold_accuracy": fold_accuracy.tolist(),
        "fold_threshold": fold_threshold.tolist(),
        "val": float(np.mean(fold_val)),
        "val_std": float(np.std(fold_val)),
        "far": float(np.mean(fold_far)),
        "val_threshold": float(np.mean(val_threshold)),
        "far_target": float(far_target),
        "eer": eer,
        "eer_threshold": eer_threshold,
        "fnmr_at_fmr": {key: float(fnmr[k]) for key, k in at.items()},
        "tar_at_far": {key: float(1.0 - fnmr[k]) for key, k in at.items()},
        "roc": {"fmr": fmr[keep].tolist(), "fnmr": fnmr[keep].tolist(), "threshold": tau[keep].tolist()},
        "correct": correct.tolist(),
        "pairs": n,
        "folds": folds,
    }


# ----------------------------------------------------------------------------------------------------- reports

def _atomic_write(path: pathlib.Path, write: Callable[[Any], None], mode: str = "w") -> None:
    """Writes through a temporary file in the same folder, renamed over path when complete; the file gets the
    permissions the umask allows (mkstemp's are 0600)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    try:
        with errors.writing(path), os.fdopen(fd, mode) as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def plot_roc(curves: Mapping[str, tuple[Sequence[float], Sequence[float]]], path, title: str | None = None) -> None:
    """Writes a PNG of FNMR against FMR (both log scale) with one line per name.

    curves: name -> (fmr [K], fnmr [K]) (e.g. verify()["roc"]). Points with FMR 0 are left out (log axis);
    FNMR 0 is drawn on the bottom edge, half the smallest positive FNMR of all curves (1e-4 when there is none).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # Agg without touching pyplot's global backend
    from matplotlib.figure import Figure

    curves = {name: (np.asarray(fmr, np.float64), np.asarray(fnmr, np.float64)) for name, (fmr, fnmr) in
              curves.items()}
    positive = [fnmr[(fmr > 0) & (fnmr > 0)] for fmr, fnmr in curves.values()]
    floor = 0.5 * min((p.min() for p in positive if p.size), default=2e-4)
    fig = Figure(figsize=(8.4, 4.8))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    # Colour and line style both change from curve to curve (ten colours x four styles: 20 distinct pairs in a row),
    # so neighbouring curves of a 10-model suite differ twice; the teacher is drawn thicker.
    styles = ["-", "--", "-.", ":"]
    for k, (name, (fmr, fnmr)) in enumerate(curves.items()):
        keep = fmr > 0
        ax.plot(fmr[keep], np.maximum(fnmr[keep], floor), label=name, color=f"C{k % 10}",
                linestyle=styles[k % len(styles)], linewidth=2.5 if name.startswith("teacher") else 1.5)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_ylim(floor, 1.05)
    if not any((fmr > 0).any() for fmr, _ in curves.values()):
        ax.set_xlim(1e-6, 1.0)
    ax.set_xlabel("FMR (false match rate)")
    ax.set_ylabel("FNMR (false non-match rate)")
    ax.grid(True, which="both", alpha=0.3)
    if curves:  # beside the axes: inside, a 14-curve legend covered the teacher's curve
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize="small")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    _atomic_write(pathlib.Path(path), lambda f: fig.savefig(f, format="png", dpi=120), mode="wb")


def evaluate_targets(apply_fn: Callable, variables: Any, targets: Mapping[str, tuple[np.ndarray, np.ndarray]], *,
                     step: int, batch_size: int = 256, mesh: jax.sharding.Mesh | None = None,
                     log: Callable[[str], Any] = print) -> dict[str, dict]:
    """Embeds (with flip) and verifies each verification set, logging arcface_torch-style lines.

    targets: name -> (images uint8 [2N,S,S,3], pair k = images[2k], images[2k+1]; issame bool [N]).
    Logs "[name][step]XNorm: ...", "[name][step]Accuracy-Flip: 0.99417+-0.00350" and a line of error rates.
    Returns name -> verify() dict, plus "xnorm" (mean norm of the unnormalised embeddings, flipped ones included).
    """
    results = {}
    for name, (images, issame) in targets.items():
        issame = np.asarray(issame, bool).reshape(-1)
        if len(images) != 2 * len(issame):
            raise ValueError(f"evaluate_targets: set {name!r} has {len(images)} images for {len(issame)} pairs")
        emb, norms = _embed_with_norms(apply_fn, variables, images, batch_size=batch_size, flip=True, mesh=mesh)
        result = verify(emb[0::2], emb[1::2], issame)
        result["xnorm"] = float(norms.mean())
        log(f"[{name}][{step}]XNorm: {result['xnorm']:f}")
        log(f"[{name}][{step}]Accuracy-Flip: {result['accuracy']:1.5f}+-{result['accuracy_std']:1.5f}")
        log(f"[{name}][{step}]EER: {result['eer']:1.5f} FNMR@FMR=1e-3: {result['fnmr_at_fmr']['1e-3']:1.5f} "
            f"VAL@FAR={result['far_target']:g}: {result['val']:1.5f}+-{result['val_std']:1.5f}")
        results[name] = result
    return results


def write_results(eval_dir, results: Mapping[str, dict], *, step: int) -> None:
    """Writes eval_dir/results.json ({"step": step, name: verify() dict with its own "step"}) and eval_dir/roc.png,
    each atomically. Sets evaluated earlier under other names are kept (an eval on AgeDB does not erase LFW's);
    a set of the same name is replaced."""
    if "step" in results:
        raise ValueError("write_results: a verification set may not be named 'step'")
    eval_dir = pathlib.Path(eval_dir)
    kept = {}
    if (eval_dir / "results.json").exists():
        try:
            kept = json.loads((eval_dir / "results.json").read_text())
        except ValueError:
            kept = {}  # unreadable: replaced by this evaluation
        kept.pop("step", None)
    merged = {**kept, **{name: dict(r, step=int(step)) for name, r in results.items()}}
    payload = {"step": int(step), **merged}
    _atomic_write(eval_dir / "results.json", lambda f: json.dump(payload, f, indent=1))
    curves = {name: (r["roc"]["fmr"], r["roc"]["fnmr"]) for name, r in merged.items()
              if isinstance(r, dict) and "roc" in r}
    plot_roc(curves, eval_dir / "roc.png", title=f"step {step}")
