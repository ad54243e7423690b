"""IJB-B / IJB-C 1:1 template verification, as insightface's `ijb_11.py` and arcface_torch's `eval_ijbc.py` run it.

In: the official layout under ROOT (.../IJBC or .../IJBB; `ijbc` is the target in lower case):
  ROOT/meta/ijbc_face_tid_mid.txt         N lines `name template_id media_id`, one per face crop
  ROOT/meta/ijbc_name_5pts_score.txt      N lines `name x1 y1 ... x5 y5 detector_score`, the same faces in order
  ROOT/meta/ijbc_template_pair_label.txt  P lines `template1 template2 label` (1 genuine, 0 impostor)
  ROOT/loose_crop/<name>                  the face crops
and `embed_fn(crops uint8 [B, S, S, 3]) -> float32 [B, E]`, the model's raw (un-normalised) embeddings.
Out: TAR at FAR 1e-6 ... 1e-1, printed as arcface_torch's table and returned as a dict for eval/results.json.

The protocol (eval_ijbc.py's defaults: use_flip_test, use_norm_score and use_detector_score all True):
  1. each crop aligned by its 5 landmarks onto the ArcFace template (data.align), RGB, S x S;
  2. image feature [E] = embed(crop) + embed(mirrored crop), float32, left un-normalised and multiplied by the
     detector score (the reference's reason: the feature norm and the detector score weigh non-faces down);
  3. media feature = mean of the template's images of that media; template feature = sum of its media features,
     L2-normalised (a media seen by two templates is pooled in each separately);
  4. pair score = dot product of the two template features (float64, as the reference);
  5. sklearn's roc_curve (drop_intermediate=True) and, for each FAR, the TPR of the ROC vertex whose FPR is
     closest to it (first minimum scanning from the highest FPR down: among equal FPRs, the highest TPR).
Sizes: IJB-C 469,375 faces, 23,124 templates, 15,658,489 pairs (19,557 genuine); IJB-B 227,630 faces,
12,115 templates, 8,010,270 pairs.

Memory: the meta files are parsed in 32 MiB blocks by NumPy (no Python object per line); images are decoded and
aligned by a thread pool two batches ahead of the model; image features live in one float32 [N, E] array (a .npy
memmap under work_dir when given); pair scores are computed block by block (an [R, U] slab of template dot
products, or gathered pairs), never as an N x N or P x E array.
"""
from __future__ import annotations

import collections
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterator, Optional, Sequence, Tuple

import numpy as np

from facekd_jax.data import align
from facekd_jax.data import images as images_lib
from facekd_jax.data.ijb_meta import isin_sorted, read_meta
from facekd_jax.data.images import ImageDecodeError
from facekd_jax.errors import InputError

# Exactly the reference's x_labels (10 ** -6 ... 10 ** -1); str() of each is its table header.
FARS = tuple(10 ** -k for k in (6, 5, 4, 3, 2, 1))
ROC_POINTS = 300  # at most this many ROC vertices go to results.json (log-spaced in FPR)
PREFETCH = 2  # batches decoded and aligned ahead of the one being embedded
_trapezoid = getattr(np, "trapezoid", None) or np.trapz  # NumPy 2 renamed trapz
__all__ = ["FARS", "aligned_batches", "image_features", "template_features", "pair_scores",
           "roc_curve", "tar_at_far", "tar_table", "evaluate_ijb", "evaluate_spec"]



# ------------------------------------------------------------------------------------------- images, features

def _aligned_face(path: str, landmarks: np.ndarray, template: np.ndarray, size: int, where: str) -> np.ndarray:
    """Decodes `path` (RGB) and warps it so its landmarks [5, 2] fall on template: uint8 [size, size, 3]."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"{where}: image not found: {path}") from None
    try:  # the package's one Pillow decode (no resize here: the landmarks are in the file's pixels)
        rgb = images_lib.decode_rgb(data, path)
    except ImageDecodeError as e:
        raise ImageDecodeError(f"{where}: {e}") from e
    try:
        m = align.similarity_transform(landmarks, template)
    except ValueError as e:
        raise InputError(f"{where}: {e}") from None
    return align.warp_affine(rgb, m, size)


def aligned_batches(image_dir: str, names: np.ndarray, landmarks: np.ndarray, *, image_size: int = 112,
                    batch_size: int = 128, workers: Optional[int] = None,
                    describe: Callable[[int], str] = lambda i: f"face {i + 1}") -> Iterator[Tuple[int, np.ndarray]]:
    """Yields (start, crops uint8 [B, S, S, 3]) for faces start .. start+B-1 (B = batch_size, the last batch
    shorter): image_dir/name decoded and aligned on the ArcFace template by a thread pool that works PREFETCH
    batches ahead. describe(i): how errors name face i (e.g. its meta file and line)."""
    template = align.arcface_template(image_size)
    n = int(names.shape[0])
    workers = workers or min(32, os.cpu_count() or 1)

    def load(i: int) -> np.ndarray:
        path = os.path.join(image_dir, os.fsdecode(names[i]))
        return _aligned_face(path, landmarks[i], template, image_size, describe(i))

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ijb-align") as pool:
        pending: collections.deque = collections.deque()
        try:
            for start in range(0, n, batch_size):
                pending.append((start, [pool.submit(load, i) for i in range(start, min(start + batch_size, n))]))
                if len(pending) > PREFETCH:  # the next PREFETCH batches load while this one is used
                    yield _collect(*pending.popleft(), image_size)
            while pending:
                yield _collect(*pending.popleft(), image_size)
        finally:
            for _, futures in pending:
                for f in futures:
                    f.cancel()


def _collect(start: int, futures: list, size: int) -> Tuple[int, np.ndarray]:
    crops = np.empty((len(futures), size, size, 3), np.uint8)
    for j, f in enumerate(futures):
        crops[j] = f.result()
    return start, crops


def _embed(embed_fn: Callable, crops: np.ndarray, batch_size: int) -> np.ndarray:
    """embed_fn on a batch padded to batch_size (one shape: one compilation of a jitted model) -> float32 [B, E]."""
    n = crops.shape[0]
    if n < batch_size:
        crops = np.concatenate([crops, np.zeros((batch_size - n,) + crops.shape[1:], np.uint8)])
    out = np.asarray(embed_fn(crops), np.float32)
    if out.ndim != 2 or out.shape[0] != batch_size:
        raise ValueError(f"embed_fn returned shape {out.shape} for {batch_size} images; expected [B, E]")
    return out[:n]


def image_features(embed_fn: Callable[[np.ndarray], np.ndarray], image_dir: str, names: np.ndarray,
                   landmarks: np.ndarray, *, image_size: int = 112, batch_size: int = 128, use_flip: bool = True,
                   out_path: Optional[str] = None, workers: Optional[int] = None,
                   describe: Callable[[int], str] = lambda i: f"face {i + 1}", log: Callable[[str], Any] = print
                   ) -> np.ndarray:
    """Image features float32 [N, E]: embed_fn(aligned crop) (+ embed_fn(mirrored crop) when use_flip), not
    normalised. out_path: written there as a .npy memmap (returned open), else an in-memory array."""
    n = int(names.shape[0])
    if n == 0:
        raise ValueError("image_features: no faces")
    feats = None
    t0 = last = time.perf_counter()
    for start, crops in aligned_batches(image_dir, names, landmarks, image_size=image_size, batch_size=batch_size,
                                        workers=workers, describe=describe):
        f = _embed(embed_fn, crops, batch_size)
        if use_flip:  # eval_ijbc's F2: the two embeddings summed (F1, concatenation, is commented out there)
            f = f + _embed(embed_fn, np.ascontiguousarray(crops[:, :, ::-1]), batch_size)
        if feats is None:
            shape = (n, f.shape[1])
            feats = (np.empty(shape, np.float32) if out_path is None else
                     np.lib.format.open_memmap(out_path, mode="w+", dtype=np.float32, shape=shape))
        feats[start:start + f.shape[0]] = f
        now = time.perf_counter()
        if now - last >= 60 or start + f.shape[0] == n:
            done = start + f.shape[0]
            log(f"images {done}/{n} ({done / (now - t0):.1f} images/s)")
            last = now
    if isinstance(feats, np.memmap):
        feats.flush()
    return feats


def _group_index(keys: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(sorted unique keys, index of each key in them)."""
    unique, index = np.unique(keys, return_inverse=True)
    return unique, index.reshape(-1)


def template_features(image_features: np.ndarray, templates: np.ndarray, medias: np.ndarray, *,
                      detector_scores: Optional[np.ndarray] = None, use_norm_score: bool = True,
                      chunk: int = 65536) -> Tuple[np.ndarray, np.ndarray]:
    """Pools image features into L2-normalised template features, as eval_ijbc's image2template_feature.

    image_features: float32 [N, E] (a memmap is read about `chunk` rows at a time); templates, medias: int [N].
    detector_scores: float32 [N] or None; each image feature is multiplied by its score (eval_ijbc's D1).
    use_norm_score: keep the features' norms (N1, the default); False L2-normalises each image feature first.
    Media feature = float32 mean of a template's images of that media (in file order); template feature = float32
    sum of its media features, then float64 and L2-normalised as sklearn.preprocessing.normalize does (a zero
    feature stays zero): the reference's operations on the same arrays, so the same bits.
    Returns (template ids int64 [T], sorted; features float64 [T, E]).
    """
    n, e = image_features.shape
    templates = np.asarray(templates).reshape(-1)
    medias = np.asarray(medias).reshape(-1)
    if templates.shape[0] != n or medias.shape[0] != n:
        raise ValueError(f"template_features: {n} features, {templates.shape[0]} templates, {medias.shape[0]} "
                         "medias: one of each per image")
    if detector_scores is not None and np.shape(detector_scores) != (n,):
        raise ValueError(f"template_features: {np.shape(detector_scores)} detector scores for {n} images")
    template_ids, t_index = _group_index(templates)
    _, m_index = _group_index(medias)
    order = np.lexsort((m_index, t_index))  # by template, then media, then file order (lexsort is stable)
    t_sorted, m_sorted = t_index[order], m_index[order]
    new_template = np.r_[True, t_sorted[1:] != t_sorted[:-1]]
    group_start = np.r_[np.flatnonzero(new_template | np.r_[True, m_sorted[1:] != m_sorted[:-1]]), n]
    template_start = np.r_[np.flatnonzero(new_template), n]  # template k's images: order[start[k]:start[k + 1]]
    first_group = np.searchsorted(group_start, template_start)  # template k's media: groups first[k]:first[k + 1]
    pooled = np.empty((template_ids.size, e), np.float64)
    k = 0
    while k < template_ids.size:  # blocks of whole templates, about `chunk` images each
        k_end = min(max(k + 1, int(np.searchsorted(template_start, template_start[k] + chunk, "right")) - 1),
                    template_ids.size)
        r0, r1 = template_start[k], template_start[k_end]
        rows = order[r0:r1]
        f = np.asarray(image_features[rows], np.float32)
        if not use_norm_score:  # the reference's float32 expressions, element for element
            f = f / np.sqrt(np.sum(f ** 2, -1, keepdims=True))
        if detector_scores is not None:
            f = f * np.asarray(detector_scores, np.float32)[rows][:, None]
        for t in range(k, k_end):  # a loop over media, not images (IJB-C: about 7 images per media)
            media = []
            for g in range(first_group[t], first_group[t + 1]):
                block = f[group_start[g] - r0:group_start[g + 1] - r0]
                media.append(block if block.shape[0] == 1 else np.mean(block, axis=0, keepdims=True))
            pooled[t] = np.sum(np.array(media), axis=0)
        k = k_end
    norms = np.sqrt(np.einsum("ij,ij->i", pooled, pooled))
    norms[norms == 0] = 1.0
    pooled /= norms[:, None]
    return template_ids, pooled


def pair_scores(template_feats: np.ndarray, template_ids: np.ndarray, pairs: np.ndarray, *, chunk: int = 32768,
                method: str = "auto") -> np.ndarray:
    """Cosine similarity of template pairs: float64 [P], pair k = dot(features of pairs[k, 0], of pairs[k, 1]).

    template_feats: float [T, E] (L2-normalised); template_ids: int [T] sorted; pairs: int [P, 2] template ids.
    method "gram": dot products of every first template of a pair with every second one, an [R, U2] block at a
    time (U2 distinct second templates, R x U2 <= chunk x E), read at the pairs: one BLAS matrix product per
    block; IJB's pairs are about a quarter of that product (few gallery templates x many probes), so this is
    several times faster than "gather", which multiplies the gathered rows of `chunk` pairs at a time.
    "auto": "gram" unless fewer than 1/64 of the products are pairs. Memory: a few int32 [P] indices, and about
    chunk x E float64 (plus the [E, U2] second templates for "gram"). A template missing from template_ids raises
    ValueError naming it.
    """
    feats = np.asarray(template_feats, np.float64)
    template_ids = np.asarray(template_ids).reshape(-1)
    pairs = np.asarray(pairs)
    if pairs.ndim != 2 or pairs.shape[1] != 2:
        raise ValueError(f"pair_scores: pairs must be [P, 2], got shape {pairs.shape}")
    if method not in ("auto", "gram", "gather"):
        raise ValueError(f"pair_scores: method must be 'auto', 'gram' or 'gather', got {method!r}")
    if chunk < 1:
        raise ValueError(f"pair_scores: chunk must be >= 1, got {chunk}")
    index = []
    for column in range(2):
        ids = pairs[:, column]
        found = isin_sorted(ids, template_ids)
        if not found.all():
            k = int(np.flatnonzero(~found)[0])
            raise ValueError(f"pair_scores: template {ids[k]} (pairs[{k}]) has no features")
        index.append(np.searchsorted(template_ids, ids).astype(np.int32))
    i1, i2 = index
    p, t = i1.size, template_ids.size
    scores = np.empty(p, np.float64)
    if p == 0:
        return scores
    used1, used2 = np.zeros(t, bool), np.zeros(t, bool)
    used1[i1], used2[i2] = True, True
    u1, u2 = np.flatnonzero(used1), np.flatnonzero(used2)
    if method == "gather" or (method == "auto" and p * 64 < u1.size * u2.size):
        for a in range(0, p, chunk):
            b = min(a + chunk, p)
            scores[a:b] = np.einsum("ij,ij->i", feats[i1[a:b]], feats[i2[a:b]])
        return scores
    row = (np.cumsum(used1, dtype=np.int32) - 1)[i1]  # pair -> row of u1
    col = (np.cumsum(used2, dtype=np.int32) - 1)[i2]  # pair -> column of u2
    del i1, i2
    second = np.ascontiguousarray(feats[u2].T)  # [E, U2]
    rows = max(1, chunk * feats.shape[1] // max(u2.size, 1))
    n_blocks = -(-u1.size // rows)
    # Pairs grouped by block; NumPy's stable sort of 16-bit integers is a radix sort (linear in P).
    block = (row // rows).astype(np.int16 if n_blocks < 2 ** 15 else np.int32)
    order = np.argsort(block, kind="stable")
    bounds = np.searchsorted(block[order], np.arange(n_blocks + 1))
    for k in range(bounds.size - 1):
        sel = order[bounds[k]:bounds[k + 1]]
        if sel.size == 0:
            continue
        gram = feats[u1[k * rows:(k + 1) * rows]] @ second
        scores[sel] = gram[row[sel] - k * rows, col[sel]]
    return scores


# ----------------------------------------------------------------------------------------------- ROC and TAR

def roc_curve(scores: np.ndarray, labels: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """sklearn.metrics.roc_curve(labels, scores) with its default drop_intermediate=True: (fpr, tpr, thresholds)
    float64 [K], thresholds decreasing from inf (accept score >= threshold), vertices collinear with both
    neighbours dropped. Sorts the scores once (no argsort: the genuine scores are few and counted separately)."""
    scores = np.asarray(scores, np.float64).reshape(-1)
    labels = np.asarray(labels).reshape(-1).astype(bool)
    if scores.shape != labels.shape:
        raise ValueError(f"roc_curve: {scores.size} scores for {labels.size} labels")
    if not np.isfinite(scores).all():
        raise ValueError(f"roc_curve: {int((~np.isfinite(scores)).sum())} scores are not finite")
    genuine = int(labels.sum())
    if genuine == 0 or genuine == labels.size:
        raise ValueError(f"roc_curve: need genuine and impostor pairs ({genuine} genuine of {labels.size})")
    ordered = np.sort(scores)
    first = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])  # first index of each distinct value
    thresholds = ordered[first][::-1]
    accepted = (scores.size - first)[::-1]  # pairs with score >= threshold
    tps = genuine - np.searchsorted(np.sort(scores[labels]), thresholds, side="left")
    fps = accepted - tps
    if fps.size > 2:
        keep = np.flatnonzero(np.r_[True, (np.diff(fps, 2) != 0) | (np.diff(tps, 2) != 0), True])
        fps, tps, thresholds = fps[keep], tps[keep], thresholds[keep]
    fpr = np.r_[0, fps] / fps[-1]
    tpr = np.r_[0, tps] / tps[-1]
    return fpr, tpr, np.r_[np.inf, thresholds]


def _closest(fpr: np.ndarray, fars: Sequence[float]) -> np.ndarray:
    """For each far, the index into fpr that the reference picks: the minimum of |fpr - far| over the reversed
    curve, first occurrence (ties go to the later vertex, i.e. the highest TPR among equal FPRs)."""
    flipped = fpr[::-1]
    return np.array([fpr.size - 1 - int(np.argmin(np.abs(flipped - far))) for far in fars], np.int64)


def tar_at_far(scores: np.ndarray, labels: np.ndarray, fars: Sequence[float] = FARS) -> np.ndarray:
    """TAR (TPR) at each FAR as insightface's IJB table picks it (see roc_curve, _closest): float64 [len(fars)]."""
    fpr, tpr, _ = roc_curve(scores, labels)
    return tpr[_closest(fpr, fars)]


def tar_table(rows: dict, fars: Sequence[float] = FARS) -> str:
    """The table arcface_torch prints (PrettyTable's default style, TAR in % with 2 decimals):
    rows: {method: TAR [len(fars)]} -> str."""
    header = ["Methods"] + [str(far) for far in fars]
    body = [[name] + ["%.2f" % (float(v) * 100) for v in tars] for name, tars in rows.items()]
    widths = [max(len(r[c]) for r in [header] + body) for c in range(len(header))]
    rule = "+" + "+".join("-" * (w + 2) for w in widths) + "+"

    def line(cells):  # centred as str.center, which is what PrettyTable's centring reproduces
        return "|" + "|".join(" " + cell.center(w) + " " for cell, w in zip(cells, widths)) + "|"

    return "\n".join([rule, line(header), rule] + [line(r) for r in body] + [rule])


def _far_key(far: float) -> str:
    return f"{far:.0e}".replace("e-0", "e-")  # 1e-06 -> "1e-6", as evaluate.FMR_TARGETS spells them


# ----------------------------------------------------------------------------------------------- the protocol

def evaluate_ijb(embed_fn: Callable[[np.ndarray], np.ndarray], root: str, *, target: str = "IJBC",
                 image_size: int = 112, batch_size: int = 128, use_detector_score: bool = True,
                 use_flip: bool = True, use_norm_score: bool = True, log: Callable[[str], Any] = print,
                 work_dir: Optional[str] = None, workers: Optional[int] = None, method: Optional[str] = None
                 ) -> dict:
    """IJB-B/IJB-C 1:1 verification of a model (see the module docstring for the protocol and its defaults).

    embed_fn: crops uint8 [B, S, S, 3] (aligned, RGB; B = batch_size always, the last batch zero-padded) ->
      raw embeddings float32 [B, E]; normalising the pixels is the model's business (evaluate.raw_embedder).
    root: the target's folder (meta/, loose_crop/). work_dir: image features go to WORK_DIR/<target>_features.npy
      (a memmap) and pair scores to WORK_DIR/<target>.npy (as eval_ijbc saves them); None keeps both in memory.
    method: the table's row name (default: target in lower case, as arcface_torch names it "ijbc-IJBC").
    Logs progress and the TAR table; returns a JSON-serialisable dict: target, tar_at_far {"1e-6": ..., "1e-1"},
    far_at (the FPR of each chosen ROC vertex), auc, roc {"fmr", "fnmr", "threshold"} (at most ROC_POINTS
    vertices, accept score >= threshold), images, templates, pairs, genuine, impostor, feature_dim and the options.
    """
    low = target.lower()
    t = time.perf_counter()
    meta = read_meta(root, target)
    log(f"[{low}] {meta.names.size} faces, {np.unique(meta.templates).size} templates, {meta.labels.size} pairs "
        f"({int(meta.labels.sum())} genuine). Time: {time.perf_counter() - t:.2f} s. ")
    image_dir = meta.paths["images"]

    def describe(i: int) -> str:  # a face, as the user finds it: its line in the landmarks file
        line = i + 1 if meta.face_lines is None else int(meta.face_lines[i])
        return f"{meta.paths['landmarks']} line {line}"

    _check_images(image_dir, meta.names, describe)
    if work_dir is not None:
        os.makedirs(work_dir, exist_ok=True)
    t = time.perf_counter()
    feats = image_features(embed_fn, image_dir, meta.names, meta.landmarks, image_size=image_size,
                           batch_size=batch_size, use_flip=use_flip, workers=workers,
                           out_path=None if work_dir is None else os.path.join(work_dir, f"{low}_features.npy"),
                           describe=describe, log=lambda s: log(f"[{low}] {s}"))
    log(f"[{low}] Feature Shape: ({feats.shape[0]} , {feats.shape[1]}) . Time: {time.perf_counter() - t:.2f} s. ")
    t = time.perf_counter()
    template_ids, template_feats = template_features(
        feats, meta.templates, meta.medias, detector_scores=meta.scores if use_detector_score else None,
        use_norm_score=use_norm_score)
    log(f"[{low}] template features {template_feats.shape}. Time: {time.perf_counter() - t:.2f} s. ")
    t = time.perf_counter()
    scores = pair_scores(template_feats, template_ids, meta.pairs)
    log(f"[{low}] pair scores {scores.size}. Time: {time.perf_counter() - t:.2f} s. ")
    if work_dir is not None:
        np.save(os.path.join(work_dir, f"{low}.npy"), scores)
    result = verification_result(scores, meta.labels)
    name = f"{method or low}-{target}"
    log(f"[{low}] TAR@FAR (%)\n" + tar_table({name: [result["tar_at_far"][_far_key(f)] for f in FARS]}))
    result.update(target=target, images=int(meta.names.size), templates=int(template_ids.size),
                  feature_dim=int(feats.shape[1]), use_flip=bool(use_flip),
                  use_detector_score=bool(use_detector_score), use_norm_score=bool(use_norm_score))
    return result


def evaluate_spec(spec, embed_fn: Callable[[np.ndarray], np.ndarray], *, image_size: int, batch_size: int,
                  work_dir: Optional[str], log: Callable[[str], Any] = print) -> dict:
    """An `ijbc:DIR` / `ijbb:DIR` verification spec (data.specs) evaluated by evaluate_ijb with the protocol's
    defaults; the features and pair scores are kept in WORK_DIR/<target>_features.npy and <target>.npy."""
    return evaluate_ijb(embed_fn, spec.path, target=spec.kind.upper(), image_size=image_size,
                        batch_size=batch_size, work_dir=work_dir, log=log)


def verification_result(scores: np.ndarray, labels: np.ndarray, fars: Sequence[float] = FARS) -> dict:
    """Pair scores and labels -> the dict evaluate_ijb returns (without the target's counts of images)."""
    labels = np.asarray(labels).astype(bool)
    fpr, tpr, thresholds = roc_curve(scores, labels)
    chosen = _closest(fpr, fars)
    impostor = int((~labels).sum())
    keep = np.searchsorted(fpr, np.geomspace(1.0 / impostor, 1.0, ROC_POINTS), side="right") - 1
    keep = np.unique(np.clip(keep, 1, fpr.size - 1))  # vertex 0 is the (0, 0) start at threshold inf
    return {
        "tar_at_far": {_far_key(f): float(tpr[i]) for f, i in zip(fars, chosen)},
        "far_at": {_far_key(f): float(fpr[i]) for f, i in zip(fars, chosen)},
        "auc": float(_trapezoid(tpr, fpr)),  # sklearn.metrics.auc of the same curve
        "roc": {"fmr": fpr[keep].tolist(), "fnmr": (1.0 - tpr[keep]).tolist(), "threshold": thresholds[keep].tolist()},
        "pairs": int(labels.size), "genuine": int(labels.sum()), "impostor": impostor,
    }


def _check_images(image_dir: str, names: np.ndarray, describe: Callable[[int], str]) -> None:
    """Fails before hours of embedding when a face's image is missing (one directory listing, not N stats)."""
    if not os.path.isdir(image_dir):
        raise FileNotFoundError(f"IJB image folder not found: {image_dir}")
    listed = np.array([os.fsencode(e.name) for e in os.scandir(image_dir)], dtype=bytes)
    missing = np.flatnonzero(~np.isin(names, listed))
    for i in missing:  # names with a sub-folder are not in the listing: looked up one by one
        path = os.path.join(image_dir, os.fsdecode(names[i]))
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{describe(i)}: image not found: {path}")
