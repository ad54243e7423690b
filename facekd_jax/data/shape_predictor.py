"""dlib's 5-point face landmark model read and run in pure NumPy (the chips built from its landmarks: data.align).

    predictor = read_shape_predictor(find_shape_predictor())  # ShapePredictor: 15 cascade levels x 500 trees
    points = predictor.predict(image, (left, top, right, bottom))   # float64 [5, 2] (x, y) image pixels
    chip = align.align_with_dlib(image, box, predictor)            # uint8 [112, 112, 3], ArcFace-style crop

image: uint8 [H, W, 3] RGB or [H, W] grey; box: the face rectangle (left, top, right, bottom) in pixels, right and
bottom inclusive as in dlib.rectangle (e.g. from dlib's face detector). The five points, in dlib's order: outer
and inner corner of the eye on the image's right, outer and inner corner of the eye on the image's left, the
bottom of the nose.

The model (shape_predictor_5_face_landmarks.dat in face_recognition_models, 9.2 MB) is dlib's serialisation of
`shape_predictor` (dlib/image_processing/shape_predictor.h), an ensemble-of-regression-trees cascade (Kazemi and
Sullivan 2014). Every field is a dlib integer: a control byte (low 4 bits: how many value bytes follow, 1..8,
little-endian; bit 0x80: negative; bits 0x70 zero), then the bytes. A float is two integers, mantissa m and
exponent e (m * 2**e; e = 32000/32001/32002: +inf/-inf/nan); a std::vector is an unsigned count then its items; a
column matrix [n, 1] is rows -n and columns -1 (positive in dlib's older format) then n floats:

  version 1 | initial shape: a [2P, 1] matrix (x0, y0, x1, y1, ...; the mean shape, the box's unit square)
  forests: L levels, each T trees, each: S splits (feature pixel idx1, idx2, threshold), then S + 1 leaves,
      each a [2P, 1] matrix (the shape delta); a tree is complete: node i's children are 2i + 1 (taken when
      pixel[idx1] - pixel[idx2] > threshold) and 2i + 2, leaves follow the S splits
  anchor_idx: L vectors of F part indices | deltas: L vectors of F (x, y) offsets from those parts
  end of file

predict follows shape_predictor::operator(): per level, the similarity taking the initial shape onto the current
one moves each feature pixel (anchor part + rotated, scaled delta), the box maps it into the image, it is rounded
to the nearest pixel (floor(v + 0.5)), read as grey ((R + G + B) // 3, dlib's assign_pixel), 0 outside the image;
every tree of the level adds its leaf to the shape. dlib rounds the final points to integers; these are not.
NumPy only.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Callable, Dict, Optional, Sequence, Tuple

import numpy as np

from facekd_jax.paths import find_packaged_model

SHAPE_PREDICTOR_FILE = "shape_predictor_5_face_landmarks.dat"

_SPECIAL_EXPONENTS = {32000: np.inf, 32001: -np.inf, 32002: np.nan}
# dlib integer kinds -> (most value bytes, may be negative): int, unsigned long, long, int64 mantissa, int16 exponent.
_KINDS = {"int": (4, True), "ulong": (8, False), "long": (8, True), "mantissa": (8, True), "exponent": (2, True)}
_JUMP_LOG2 = 5   # the integer chain is walked 32 integers per Python step
# Control byte -> the length of its integer (1 + value bytes), 0 for a byte that cannot start one.
_INTEGER_LENGTH = np.array([1 + (c & 0x0F) if (c & 0x70) == 0 and 1 <= (c & 0x0F) <= 8 else 0 for c in range(256)],
                           np.uint8)


class ShapePredictorFormatError(ValueError):
    """The file is not (or not entirely) a dlib shape_predictor; says where and why."""


@dataclasses.dataclass(frozen=True, eq=False)
class CascadeLevel:
    """One cascade level: T complete trees of S = 2**depth - 1 splits over F feature pixels, P parts.

    splits int64 [T, S, 2] (idx1, idx2 into the feature pixels), thresholds float32 [T, S], leaves float32
    [T, S + 1, P, 2] (shape deltas, unit-square units), anchors int64 [F] (a part per feature pixel), deltas
    float32 [F, 2] (the pixel's offset from its anchor part in the initial shape)."""
    splits: np.ndarray
    thresholds: np.ndarray
    leaves: np.ndarray
    anchors: np.ndarray
    deltas: np.ndarray

    @property
    def depth(self) -> int:
        return int(self.splits.shape[1] + 1).bit_length() - 1

    @functools.cached_property
    def _flat(self) -> Tuple[np.ndarray, ...]:
        """The level as flat arrays for predict: split idx1, idx2, thresholds [T * S], leaves [T * (S + 1), 2P],
        and each tree's first split and (first leaf - S) in them [T]."""
        n_trees, n_splits = self.splits.shape[:2]
        trees = np.arange(n_trees, dtype=np.intp)
        return (self.splits[..., 0].astype(np.intp).ravel(), self.splits[..., 1].astype(np.intp).ravel(),
                self.thresholds.ravel(), self.leaves.reshape(n_trees * (n_splits + 1), -1),
                trees * n_splits, trees * (n_splits + 1) - n_splits)

    def run(self, values: np.ndarray, shape: np.ndarray) -> np.ndarray:
        """Every tree of the level on feature pixel values float32 [B, F]: the shape float32 [B, P, 2] plus the leaf
        each tree reaches."""
        idx1, idx2, thresholds, leaves, split_base, leaf_base = self._flat
        n = values.shape[0]
        # Every split's decision at once (left when pixel[idx1] - pixel[idx2] > threshold), then the walk down.
        left = (values[:, idx1] - values[:, idx2]) > thresholds                # [B, T * S]
        rows = np.arange(n)[:, None] * left.shape[1]
        node = np.zeros((n, len(split_base)), np.intp)
        for _ in range(self.depth):
            node = 2 * node + 2 - left.ravel()[rows + split_base + node]
        reached = leaves[node + leaf_base]                                    # [B, T, 2P]
        # dlib adds the leaves one tree after another in float32; a cumulative sum keeps that order (a plain sum
        # would pair them up and round differently).
        steps = np.concatenate([shape.reshape(n, 1, -1), reached], axis=1)
        return np.cumsum(steps, axis=1, dtype=np.float32)[:, -1].reshape(shape.shape)


@dataclasses.dataclass(frozen=True, eq=False)
class ShapePredictor:
    """A parsed shape_predictor file. initial_shape: float32 [P, 2], the mean shape in the box's unit square.
    sections: byte offset of each part of the file (version, initial_shape, forests, anchor_idx, deltas, end)."""
    path: str
    initial_shape: np.ndarray
    levels: Tuple[CascadeLevel, ...]
    sections: Dict[str, int]

    @property
    def num_parts(self) -> int:
        return int(self.initial_shape.shape[0])

    def counts(self) -> Dict[str, object]:
        """What the file declares: parts, cascade levels, and per level trees, splits and leaves per tree, feature
        pixels (one value where every level agrees, else a list)."""
        def per_level(values):
            return values[0] if len(set(values)) == 1 else values
        lv = self.levels
        return {"parts": self.num_parts, "levels": len(lv),
                "trees_per_level": per_level([v.splits.shape[0] for v in lv]),
                "splits_per_tree": per_level([v.splits.shape[1] for v in lv]),
                "leaves_per_tree": per_level([v.leaves.shape[1] for v in lv]),
                "tree_depth": per_level([v.depth for v in lv]),
                "feature_pixels": per_level([v.anchors.shape[0] for v in lv])}

    def predict(self, image: np.ndarray, box: Sequence[float]) -> np.ndarray:
        """The P landmarks (x, y) of the face in box (left, top, right, bottom) -> float64 [P, 2] image pixels.
        image: uint8 [H, W, 3] RGB or [H, W] grey."""
        image = np.asarray(image)
        return self.predict_batch(image[None], np.asarray(box, np.float64)[None])[0]

    def predict_batch(self, images: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        """predict for B faces of B same-sized images at once: images uint8 [B, H, W, 3] or [B, H, W], boxes
        [B, 4] (left, top, right, bottom) -> float64 [B, P, 2]."""
        images, boxes = np.asarray(images), np.asarray(boxes, np.float64)
        if images.dtype != np.uint8 or images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[-1] != 3):
            raise ValueError(f"shape predictor: expected uint8 images [B, H, W, 3] (RGB) or [B, H, W] (grey), got "
                             f"{images.dtype} {list(images.shape)}")
        if boxes.shape != (images.shape[0], 4):
            raise ValueError(f"shape predictor: expected boxes [{images.shape[0]}, 4] (left, top, right, bottom), "
                             f"got {list(boxes.shape)}")
        bad = ~np.all(np.isfinite(boxes), axis=1) | (boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])
        if bad.any():
            raise ValueError(f"shape predictor: box {boxes[bad][0].tolist()} is not a finite (left, top, right, "
                             f"bottom) with right > left and bottom > top")
        n, h, w = images.shape[:3]
        pixels, channels = images.reshape(-1), (images.shape[3] if images.ndim == 4 else 1)
        origin, size = boxes[:, None, :2], boxes[:, None, 2:] - boxes[:, None, :2]     # [B, 1, 2]
        first_pixel = (np.arange(n) * (h * w))[:, None]
        to_ab = self._similarity()
        identity = np.tile(np.array([[1.0, 0.0]], np.float32), (n, 1))
        shape = np.repeat(self.initial_shape[None], n, axis=0)                           # float32 [B, P, 2]
        for level in self.levels:
            # The similarity from the initial shape onto the current one, as (a, b): [[a, -b], [b, a]].
            ab = identity if to_ab is None else (shape.reshape(n, -1).astype(np.float64) @ to_ab).astype(np.float32)
            a, b = ab[:, :1], ab[:, 1:]
            anchor = shape[:, level.anchors]                                              # [B, F, 2]
            dx, dy = level.deltas[:, 0], level.deltas[:, 1]
            # float32, as dlib computes tform * delta + location(shape, anchor), tform = [[a, -b], [b, a]] ...
            point = np.stack([a * dx - b * dy + anchor[..., 0], b * dx + a * dy + anchor[..., 1]], axis=-1)
            # ... then maps it into the image in double and rounds it to a dlib::point (floor(v + 0.5)).
            xy = np.floor(point * size + origin + 0.5)                                    # float64 [B, F, 2]
            inside = (xy >= 0).all(axis=-1) & (xy[..., 0] < w) & (xy[..., 1] < h)
            index = (np.where(inside, xy[..., 1] * w + xy[..., 0], 0).astype(np.intp) + first_pixel) * channels
            if channels == 1:
                values = pixels[index]
            else:   # dlib's rgb -> grey (assign_pixel): the integer mean of the three channels
                values = (pixels[index].astype(np.uint16) + pixels[index + 1] + pixels[index + 2]) // 3
            shape = level.run(np.where(inside, values, 0).astype(np.float32), shape)
        return shape.astype(np.float64) * size + origin

    def _similarity(self) -> Optional[np.ndarray]:
        """[2P, 2] taking a flattened shape (x0, y0, x1, ...) to (a, b), the rotation-and-scale [[a, -b], [b, a]]
        of the least-squares similarity from the initial shape onto it: dlib's find_similarity_transform
        (Umeyama, in double). In 2-D that is the complex ratio <src, dst> / |src|^2 with src centred (so dst
        needs no centring), which cannot be a reflection. None for a one-point shape: dlib uses the identity."""
        if self.num_parts == 1:
            return None
        src = self.initial_shape.astype(np.float64)
        src = src - src.mean(axis=0)
        norm = (src ** 2).sum()
        return np.stack([src.ravel(), np.stack([-src[:, 1], src[:, 0]], axis=-1).ravel()], axis=-1) / norm


# --- reading the file -------------------------------------------------------------------------------------------


class _Ints:
    """The file as its sequence of dlib integers (every field of a shape_predictor is one; a float is two), with
    a cursor; every read names what it reads so that errors say where and what."""

    def __init__(self, data: bytes, name: str):
        self.name, self.size, self.data = name, len(data), data
        n = len(data)
        b = np.frombuffer(data, np.uint8)
        index_type = np.int64 if n >= 2 ** 31 - 16 else np.int32
        # next[p]: where the integer starting at byte p ends; a byte that cannot start one (or whose integer would
        # run past the end) points at itself, so the chain from byte 0 stops there.
        nxt = np.arange(n + 1, dtype=index_type)
        nxt[:n] += _INTEGER_LENGTH[b]
        for q in range(max(0, n - 9), n):   # only the last few integers can run past the end
            if nxt[q] > n:
                nxt[q] = q
        # Walk the chain 32 integers at a time (by a jump table), then fill in the steps between, vectorised.
        jump = nxt
        for _ in range(_JUMP_LOG2):
            jump = jump[jump]
        marks, p = [0], 0
        while int(jump[p]) != p:
            p = int(jump[p])
            marks.append(p)
        del jump
        steps = [np.asarray(marks, index_type)]
        for _ in range((1 << _JUMP_LOG2) - 1):
            steps.append(nxt[steps[-1]])
        del nxt
        chain = np.stack(steps, axis=1).reshape(-1)
        self.stop = p                          # where the chain ends: n, or a byte that does not start an integer
        self.stop_byte = int(b[p]) if p < n else -1
        self.offsets = chain[chain < p]
        del steps, chain
        self.nbytes = b[self.offsets] & 0x0F
        self.negative = (b[self.offsets] & 0x80) != 0
        # A magnitude of 2**63 or more in 8 bytes: dlib reads it into an int64 and it wraps; refused where signed.
        self.wraps = (self.nbytes == 8) & ((b[np.minimum(self.offsets + 8, n - 1)] & 0x80) != 0)
        # Each integer's value bytes read as one little-endian uint64 (an overlapping view), masked to its length.
        padded = np.concatenate([b, np.zeros(8, np.uint8)])
        words = np.ndarray((n + 1,), "<u8", padded, strides=(1,))[self.offsets + 1]
        masks = np.array([(1 << (8 * k)) - 1 for k in range(9)], np.uint64)
        np.bitwise_and(words, masks[self.nbytes], out=words)
        # Values beyond 2**62 are refused as counts and out of range as anything else; capped to stay int64
        # (exact() has the true value).
        values = np.minimum(words, np.uint64(2 ** 62)).astype(np.int64)
        del words
        np.negative(values, out=values, where=self.negative)
        self.values = values
        self.pos = 0

    def offset(self, index: int) -> int:
        return int(self.offsets[index]) if index < len(self.offsets) else self.stop

    def remaining(self) -> int:
        return len(self.offsets) - self.pos

    def error(self, index: int, expected: str, found: str) -> ShapePredictorFormatError:
        return ShapePredictorFormatError(f"{self.name}: at byte {self.offset(index)}: expected {expected}, "
                                         f"found {found}")

    def _missing(self, what: str, needed: int) -> ShapePredictorFormatError:
        """The error for `needed` more integers where the chain has none: a bad control byte or the end."""
        control, size = self.stop_byte, self.stop_byte & 0x0F
        if self.stop < self.size and (control & 0x70 or not 1 <= size <= 8):
            return ShapePredictorFormatError(
                f"{self.name}: at byte {self.stop}: expected {what} (a dlib integer: control byte 0x01..0x08 or "
                f"0x81..0x88), found 0x{control:02x}")
        need = size + 1 if self.stop < self.size else 2 * needed   # an integer takes at least 2 bytes
        return ShapePredictorFormatError(
            f"{self.name}: truncated at byte {self.size} while reading {what} from byte {self.stop} (needed "
            f"{'' if self.stop < self.size else 'at least '}{need} bytes, {self.size - self.stop} left)")

    def exact(self, index: int) -> int:
        """Integer `index` as a Python int (values are capped in self.values)."""
        at = int(self.offsets[index]) + 1
        value = int.from_bytes(self.data[at:at + int(self.nbytes[index])], "little")
        return -value if self.negative[index] else value

    def take(self, count: int, kinds: Sequence[str], what: Callable[[int], str]) -> np.ndarray:
        """The next `count` integers -> int64 [count]; kinds[i % len(kinds)] is integer i's kind (_KINDS), what(i)
        names it for errors."""
        start, available = self.pos, min(count, self.remaining())
        sl = slice(start, start + available)
        kind = np.resize(np.arange(len(kinds)), available)
        limits = np.array([_KINDS[k][0] for k in kinds])[kind]
        signed = np.array([_KINDS[k][1] for k in kinds])[kind]
        bad = (self.nbytes[sl] > limits) | (self.negative[sl] & ~signed) | (self.wraps[sl] & signed & (limits == 8))
        exponent = np.array([k == "exponent" for k in kinds])[kind]
        bad |= exponent & ((self.values[sl] > 32767) | (self.values[sl] < -32768))
        if bad.any():
            i = int(np.argmax(bad))
            k = kinds[i % len(kinds)]
            value = self.exact(start + i)
            raise self.error(start + i, f"{what(i)} (a dlib {k}: at most {_KINDS[k][0]} bytes"
                             f"{', magnitude below 2**63' if _KINDS[k] == (8, True) else ''}"
                             f"{'' if _KINDS[k][1] else ', not negative'})",
                             f"{value} in {int(self.nbytes[start + i])} bytes")
        if available < count:
            raise self._missing(what(available), count - available)
        self.pos += count
        return self.values[sl]

    def one(self, kind: str, what: str) -> int:
        self.take(1, (kind,), lambda i: what)
        return self.exact(self.pos - 1)

    def expect(self, kind: str, value: int, what: str) -> None:
        found = self.one(kind, what)
        if found != value:
            raise self.error(self.pos - 1, f"{what} {value}", str(found))

    def count(self, what: str, ints_each: int, exact: Optional[int] = None) -> int:
        """A vector's length (unsigned), refused before anything is allocated when the rest of the file cannot
        hold that many items of at least `ints_each` integers."""
        n = self.one("ulong", what)
        if exact is not None and n != exact:
            raise self.error(self.pos - 1, f"{what} {exact}", str(n))
        if n * ints_each > self.remaining():
            raise self.error(self.pos - 1, f"{what} (at most {self.remaining() // ints_each}: what the remaining "
                             f"{self.size - self.offset(self.pos)} bytes can hold)", str(n))
        return n

    def floats(self, count: int, what: Callable[[int], str]) -> np.ndarray:
        """`count` floats (mantissa, exponent pairs) -> float32 [count], as dlib's float_details converts them."""
        pairs = self.take(2 * count, ("mantissa", "exponent"), lambda i: f"{what(i // 2)}'s "
                          f"{'mantissa' if i % 2 == 0 else 'exponent'}").reshape(count, 2)
        return _to_float32(pairs[:, 0], pairs[:, 1])


def _to_float32(mantissa: np.ndarray, exponent: np.ndarray) -> np.ndarray:
    out = np.ldexp(mantissa.astype(np.float32), np.clip(exponent, -32768, 32767).astype(np.int32))
    for code, value in _SPECIAL_EXPONENTS.items():
        out[exponent == code] = value
    return out.astype(np.float32)


def _read_level(r: _Ints, index: int, parts: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One forest: -> splits int64 [T, S, 2], thresholds float32 [T, S], leaves float32 [T, S + 1, P, 2] and the
    integer positions of the split indices (for their range check once the level's pixel count is known)."""
    level = f"cascade level {index}"
    n_trees = r.count(f"the number of trees of {level}", ints_each=2)
    if n_trees == 0:
        return (np.zeros((0, 0, 2), np.int64), np.zeros((0, 0), np.float32),
                np.zeros((0, 1, parts, 2), np.float32), np.zeros((0, 0, 2), np.int64))
    # Every tree of a level has one depth (dlib's trainer grows them so): the first tree fixes the layout, and the
    # whole level is read as one block of integers checked against it.
    n_splits = r.count(f"the number of splits of tree 0 of {level}", ints_each=4)
    r.pos -= 1
    n_leaves = n_splits + 1
    if n_leaves & n_splits:
        raise r.error(r.pos, f"the number of splits of tree 0 of {level} (2**depth - 1: a complete tree)",
                      str(n_splits))
    leaf_ints = 2 + 4 * parts
    stride = 2 + 4 * n_splits + n_leaves * leaf_ints
    kinds = (["ulong"] + ["ulong", "ulong", "mantissa", "exponent"] * n_splits + ["ulong"]
             + (["long", "long"] + ["mantissa", "exponent"] * (2 * parts)) * n_leaves)
    split_cols = 1 + np.arange(4 * n_splits)
    leaf_cols = 2 + 4 * n_splits + np.arange(n_leaves * leaf_ints)

    def what(i: int) -> str:
        tree, col = divmod(i, stride)
        where = f"of tree {tree} of {level}"
        if col == 0:
            return f"the number of splits {where}"
        if col < 1 + 4 * n_splits:
            split, field = divmod(col - 1, 4)
            return (f"split {split} {where}'s "
                    f"{('idx1', 'idx2', 'threshold mantissa', 'threshold exponent')[field]}")
        if col == 1 + 4 * n_splits:
            return f"the number of leaves {where}"
        leaf, field = divmod(col - 2 - 4 * n_splits, leaf_ints)
        if field < 2:
            return f"the {('rows', 'columns')[field]} of leaf {leaf} {where}"
        value, part = divmod(field - 2, 2)
        return f"the {'xy'[value % 2]} {('mantissa', 'exponent')[part]} of point {value // 2} of leaf {leaf} {where}"

    # Before reading values, the fixed fields of every tree present: split and leaf counts, and leaf headers,
    # (-2P, -1) as dlib writes them (or (2P, 1), its older format).
    start = r.pos
    block = r.values[start:start + min(n_trees * stride, r.remaining())]
    col = np.arange(len(block)) % stride
    counts = {0: n_splits, 1 + 4 * n_splits: n_leaves}
    is_count, is_rows, is_cols = np.zeros(stride, bool), np.zeros(stride, bool), np.zeros(stride, bool)
    is_count[list(counts)] = True
    heads = 2 + 4 * n_splits + leaf_ints * np.arange(n_leaves)
    is_rows[heads], is_cols[heads + 1] = True, True
    expected = np.zeros(stride, np.int64)
    expected[list(counts)] = list(counts.values())
    previous = np.r_[0, block[:-1]]
    wrong = (is_count[col] & (block != expected[col])) | (is_rows[col] & (np.abs(block) != 2 * parts))
    wrong |= is_cols[col] & (block != np.where(previous < 0, -1, 1))
    if wrong.any():
        i = int(np.argmax(wrong))
        if is_count[i % stride]:
            raise r.error(start + i, f"{what(i)} {expected[i % stride]} (every tree of a level has one depth)",
                          str(block[i]))
        raise r.error(start + i, f"{what(i)}: a [{2 * parts}, 1] matrix as (-{2 * parts}, -1)",
                      f"{block[i]} after {previous[i]}" if is_cols[i % stride] else str(block[i]))
    ints = r.take(n_trees * stride, kinds, what).reshape(n_trees, stride)
    split_ints = ints[:, split_cols].reshape(n_trees, n_splits, 4)
    split_pos = start + stride * np.arange(n_trees)[:, None, None] + split_cols.reshape(n_splits, 4)[None, :, :2]
    thresholds = _to_float32(split_ints[..., 2], split_ints[..., 3])
    leaf_ints_all = ints[:, leaf_cols].reshape(n_trees, n_leaves, leaf_ints)[:, :, 2:].reshape(n_trees, n_leaves,
                                                                                                parts, 2, 2)
    leaves = _to_float32(leaf_ints_all[..., 0], leaf_ints_all[..., 1])
    return split_ints[..., :2].copy(), thresholds, leaves, split_pos


def read_shape_predictor(path: "str | os.PathLike") -> ShapePredictor:
    """Parse dlib's shape_predictor file -> ShapePredictor; ShapePredictorFormatError (the file, the byte offset,
    what was expected there) when it is foreign, truncated, inconsistent or not consumed exactly to its end."""
    path = os.fspath(path)
    with open(path, "rb") as fh:
        data = fh.read()
    r = _Ints(data, path)
    sections = {"version": r.offset(r.pos)}
    r.expect("int", 1, "the shape_predictor version")

    sections["initial_shape"] = r.offset(r.pos)
    rows, cols = (int(v) for v in r.take(2, ("long",), lambda i: f"the initial shape's {('rows', 'columns')[i]}"))
    if (rows < 0) != (cols < 0) or abs(cols) != 1 or rows == 0 or rows % 2:
        raise r.error(r.pos - 2, "the initial shape's rows and columns: a column of 2 * parts values, written as "
                      "(-rows, -1) (or (rows, 1) in dlib's older format)", f"({rows}, {cols})")
    if 2 * abs(rows) > r.remaining():
        raise r.error(r.pos - 2, f"the initial shape's rows (at most {r.remaining() // 2}: what the rest of the file "
                      f"can hold)", str(rows))
    parts = abs(rows) // 2
    initial = r.floats(2 * parts, lambda i: f"value {i} of the initial shape").reshape(parts, 2)

    sections["forests"] = r.offset(r.pos)
    n_levels = r.count("the number of cascade levels", ints_each=1)
    forests = [_read_level(r, i, parts) for i in range(n_levels)]

    sections["anchor_idx"] = r.offset(r.pos)
    r.count("the number of anchor index vectors, one per cascade level", ints_each=1, exact=n_levels)
    anchors = []
    for i in range(n_levels):
        n = r.count(f"the number of feature pixels of cascade level {i}", ints_each=1)
        at = r.pos
        idx = r.take(n, ("ulong",), lambda k, i=i: f"anchor {k} of cascade level {i}")
        if (idx >= parts).any():
            k = int(np.argmax(idx >= parts))
            raise r.error(at + k, f"anchor {k} of cascade level {i} (a part index below {parts})", str(idx[k]))
        anchors.append(idx.copy())

    sections["deltas"] = r.offset(r.pos)
    r.count("the number of pixel delta vectors, one per cascade level", ints_each=1, exact=n_levels)
    levels = []
    for i, ((splits, thresholds, leaves, split_pos), idx) in enumerate(zip(forests, anchors)):
        n = r.count(f"the number of pixel deltas of cascade level {i}, one per anchor", ints_each=4,
                    exact=len(idx))
        deltas = r.floats(2 * n, lambda k, i=i: f"{'xy'[k % 2]} of pixel delta {k // 2} of cascade level {i}")
        if (splits >= n).any():
            k = np.unravel_index(int(np.argmax(splits >= n)), splits.shape)
            raise r.error(int(split_pos[k]), f"split {k[1]} of tree {k[0]} of cascade level {i}'s "
                          f"idx{k[2] + 1} (a feature pixel below {n})", str(splits[k]))
        levels.append(CascadeLevel(splits=splits, thresholds=thresholds, leaves=leaves, anchors=idx,
                                   deltas=deltas.reshape(n, 2)))

    end = r.offset(r.pos)
    if end != len(data):
        raise ShapePredictorFormatError(f"{path}: at byte {end}: expected the end of the file after {n_levels} "
                                        f"pixel delta vectors, found {len(data) - end} more bytes")
    sections["end"] = end
    for level in levels:
        for field in dataclasses.fields(level):
            getattr(level, field.name).setflags(write=False)
    initial.setflags(write=False)
    return ShapePredictor(path=path, initial_shape=initial, levels=tuple(levels), sections=sections)


def find_shape_predictor() -> str:
    """The path of shape_predictor_5_face_landmarks.dat in the installed face_recognition_models package;
    FileNotFoundError with the install command when it is not there."""
    return find_packaged_model(SHAPE_PREDICTOR_FILE, "dlib's 5-point landmark model")
