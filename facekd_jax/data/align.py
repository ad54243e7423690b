"""Face alignment: a similarity transform from five landmarks onto a template, and the warp that applies it.

  M = similarity_transform(landmarks [5, 2], arcface_template(112))   # [2, 3], image -> template coordinates
  chip = warp_affine(image uint8 [H, W, 3], M, 112)                   # uint8 [112, 112, 3]
  chip = align_face(image, landmarks, size=112)                       # the two in one call

The transform is the least-squares similarity (rotation, uniform scale, translation; no reflection) of Umeyama
(1991), as scikit-image's SimilarityTransform.estimate computes it and insightface's `face_align.norm_crop` uses
it; the warp is cv2.warpAffine's: output pixel (x, y) samples the image at M^-1 (x, y) bilinearly, pixel centres at
integer coordinates, black outside the image. NumPy only (no OpenCV, no scikit-image).
"""
from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import numpy as np

# insightface's 112x112 ArcFace template (python-package/insightface/utils/face_align.py, `arcface_dst`): left eye,
# right eye, nose tip, left and right mouth corner, in (x, y) pixels of the 112x112 crop.
ARCFACE_TEMPLATE_112 = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                                 [41.5493, 92.3655], [70.7299, 92.2041]], np.float64)


def arcface_template(size: int = 112) -> np.ndarray:
    """The ArcFace five-point template for a size x size crop, as insightface's `estimate_norm` scales it: sizes
    divisible by 112 scale it by size / 112; others (128, ...) scale by size / 128 and shift x by 8 * that ratio.
    Returns float64 [5, 2] (x, y)."""
    size = int(size)
    if size <= 0:
        raise ValueError(f"arcface_template: size must be positive, got {size}")
    if size % 112 == 0:
        ratio, dx = size / 112.0, 0.0
    else:
        ratio = size / 128.0
        dx = 8.0 * ratio
    dst = ARCFACE_TEMPLATE_112 * ratio
    dst[:, 0] += dx
    return dst


def umeyama(src: np.ndarray, dst: np.ndarray, estimate_scale: bool = True) -> np.ndarray:
    """The least-squares similarity [D+1, D+1] taking points src [N, D] onto dst [N, D] (Umeyama 1991, eq. 40-42):
    rotation (never a reflection), uniform scale (1 unless estimate_scale) and translation. Degenerate input
    (all src points equal) gives NaNs, as scikit-image's does."""
    src = np.asarray(src, np.float64)
    dst = np.asarray(dst, np.float64)
    if src.ndim != 2 or src.shape != dst.shape or src.shape[0] < 2:
        raise ValueError(f"umeyama: src and dst must both be [N >= 2, D], got {src.shape} and {dst.shape}")
    num, dim = src.shape
    src_mean, dst_mean = src.mean(axis=0), dst.mean(axis=0)
    src_demean, dst_demean = src - src_mean, dst - dst_mean
    a = dst_demean.T @ src_demean / num
    d = np.ones(dim)
    if np.linalg.det(a) < 0:
        d[-1] = -1.0
    t = np.eye(dim + 1)
    u, s, vt = np.linalg.svd(a)
    rank = np.linalg.matrix_rank(a)
    if rank == 0:
        return np.full_like(t, np.nan)
    if rank == dim - 1:
        if np.linalg.det(u) * np.linalg.det(vt) > 0:
            t[:dim, :dim] = u @ vt
        else:
            keep = d[-1]
            d[-1] = -1.0
            t[:dim, :dim] = u @ np.diag(d) @ vt
            d[-1] = keep
    else:
        t[:dim, :dim] = u @ np.diag(d) @ vt
    scale = (s @ d) / src_demean.var(axis=0).sum() if estimate_scale else 1.0
    t[:dim, dim] = dst_mean - scale * (t[:dim, :dim] @ src_mean)
    t[:dim, :dim] *= scale
    return t


def similarity_transform(landmarks: np.ndarray, template: np.ndarray) -> np.ndarray:
    """The [2, 3] similarity taking image landmarks [N, 2] (x, y) onto template points [N, 2]; ValueError on
    non-finite or degenerate landmarks (the message says which)."""
    landmarks = np.asarray(landmarks, np.float64)
    if not np.all(np.isfinite(landmarks)):
        raise ValueError(f"similarity_transform: landmarks are not finite: {landmarks.tolist()}")
    m = umeyama(landmarks, template)[:2]
    if not np.all(np.isfinite(m)):
        raise ValueError(f"similarity_transform: degenerate landmarks (all at one point?): {landmarks.tolist()}")
    return m


def _as_hw(size: Union[int, tuple]) -> tuple:
    if isinstance(size, (int, np.integer)):
        return int(size), int(size)
    w, h = size
    return int(h), int(w)


def warp_affine(image: np.ndarray, m: np.ndarray, size: Union[int, tuple], *, border_value: float = 0.0
                ) -> np.ndarray:
    """cv2.warpAffine(image, m, size) with bilinear interpolation and a constant border.

    image: [H, W] or [H, W, C] (uint8 or float); m: [2, 3], taking image coordinates to output coordinates;
    size: the output side, or (width, height) as OpenCV takes it. Output pixel (x, y) is the image sampled at
    m^-1 (x, y), pixel centres at integer coordinates; neighbours outside the image count as border_value.
    Returns the image's dtype (uint8 rounded to nearest), shape [h, w(, C)]."""
    image = np.asarray(image)
    h_out, w_out = _as_hw(size)
    full = np.vstack([np.asarray(m, np.float64).reshape(2, 3), [0.0, 0.0, 1.0]])
    inv = np.linalg.inv(full)
    ys, xs = np.mgrid[0:h_out, 0:w_out].astype(np.float64)
    sx = inv[0, 0] * xs + inv[0, 1] * ys + inv[0, 2]
    sy = inv[1, 0] * xs + inv[1, 1] * ys + inv[1, 2]
    x0, y0 = np.floor(sx), np.floor(sy)
    fx, fy = sx - x0, sy - y0
    x0, y0 = x0.astype(np.int64), y0.astype(np.int64)
    squeeze = image.ndim == 2
    src = image[..., None] if squeeze else image
    h, w = src.shape[:2]
    src = src.astype(np.float64)

    def tap(yy, xx):
        inside = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
        values = src[np.clip(yy, 0, h - 1), np.clip(xx, 0, w - 1)]
        return np.where(inside[..., None], values, border_value)

    out = (tap(y0, x0) * ((1 - fx) * (1 - fy))[..., None] + tap(y0, x0 + 1) * (fx * (1 - fy))[..., None]
           + tap(y0 + 1, x0) * ((1 - fx) * fy)[..., None] + tap(y0 + 1, x0 + 1) * (fx * fy)[..., None])
    if squeeze:
        out = out[..., 0]
    if np.issubdtype(image.dtype, np.integer):
        info = np.iinfo(image.dtype)
        return np.clip(np.rint(out), info.min, info.max).astype(image.dtype)
    return out.astype(image.dtype)


def align_face(image: np.ndarray, landmarks: np.ndarray, size: int = 112, template: np.ndarray = None
               ) -> np.ndarray:
    """The size x size crop whose landmarks fall on `template` (default: the ArcFace template for `size`), as
    insightface's norm_crop makes it. landmarks: [5, 2] (x, y): left eye, right eye, nose, mouth corners."""
    template = arcface_template(size) if template is None else np.asarray(template, np.float64)
    return warp_affine(image, similarity_transform(landmarks, template), size)


# dlib's mean-face positions of its five points in the unit square, in its shape predictor's part order (eye
# corners, nose bottom; get_face_chip_details in dlib/image_transforms/interpolation.h).
DLIB_MEAN_FACE_5 = np.array([[0.8595674595992, 0.2134981538014], [0.6460604764104, 0.2289674387677],
                             [0.1205750620789, 0.2137274526848], [0.3340850613712, 0.2290642403242],
                             [0.4901123135679, 0.6277975316475]], np.float64)
DLIB_CHIP_SIZE, DLIB_CHIP_PADDING = 150, 0.25   # what dlib's face descriptor takes: get_face_chip(img, s, 150, 0.25)


# ----------------------------------------------------------------------------------------------- dlib's landmarks


def _check_landmarks(landmarks: np.ndarray, who: str) -> np.ndarray:
    landmarks = np.asarray(landmarks, np.float64)
    if landmarks.shape != (5, 2):
        raise ValueError(f"{who}: expected dlib's five landmarks [5, 2] (x, y), got {list(landmarks.shape)}")
    if not np.all(np.isfinite(landmarks)):
        raise ValueError(f"{who}: landmarks are not finite: {landmarks.tolist()}")
    # The eye corners fix the face's scale and angle: less than a pixel apart, there is no face to align.
    if np.ptp(landmarks[:4], axis=0).max() < 1.0:
        raise ValueError(f"{who}: degenerate landmarks (the eye corners lie within one pixel): {landmarks.tolist()}")
    return landmarks


def dlib_chip_transform(landmarks: np.ndarray, size: int = DLIB_CHIP_SIZE, padding: float = DLIB_CHIP_PADDING
                        ) -> np.ndarray:
    """The [2, 3] affine taking image coordinates to the coordinates of dlib's size x size face chip, as
    get_face_chip_details(shape, size, padding) and extract_image_chip place it. landmarks: float [5, 2] (x, y)
    in the predictor's order.

    dlib fits the least-squares similarity from its mean-face points, (padding + p) / (1 + 2 padding) * size,
    onto the landmarks; keeps its angle and scale s and the image point c of the chip point (size / 2, size / 2);
    and samples the chip over the rectangle of side size * s - 1 centred on c (centered_drect), chip column 0 at
    its left edge and size - 1 at its right. So the chip's step is (size * s - 1) / (size - 1) image pixels, not
    s, and c falls on chip pixel (size - 1) / 2."""
    landmarks = _check_landmarks(landmarks, "dlib_chip_transform")
    size = int(size)
    if size < 2 or not padding >= 0:
        raise ValueError(f"dlib_chip_transform: need size >= 2 and padding >= 0, got {size}, {padding}")
    chip_points = (padding + DLIB_MEAN_FACE_5) / (2 * padding + 1) * size
    fit = umeyama(chip_points, landmarks)                       # chip -> image, dlib's find_similarity_transform
    scale, angle = np.hypot(fit[0, 0], fit[1, 0]), np.arctan2(fit[1, 0], fit[0, 0])
    centre = fit[:2, :2] @ np.array([size / 2, size / 2]) + fit[:2, 2]
    step = (size * scale - 1) / (size - 1)
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    # Image -> chip: the inverse of chip -> image, centre + step * R (u - (size - 1) / 2).
    inverse = rotation.T / step
    return np.hstack([inverse, ((size - 1) / 2 - inverse @ centre)[:, None]])


def dlib_face_chip(image: np.ndarray, landmarks: np.ndarray, size: int = DLIB_CHIP_SIZE,
                   padding: float = DLIB_CHIP_PADDING) -> np.ndarray:
    """dlib.get_face_chip(image, shape, size, padding): the face chip dlib's descriptor takes (150, 0.25).
    image: uint8 [H, W, 3] or [H, W]; landmarks: float [5, 2] -> uint8 [size, size(, 3)].

    Sampled as dlib's interpolate_bilinear does: bilinear at pixel centres, the value truncated (not rounded) to
    uint8, and black wherever one of the four neighbours is outside the image. Where the chip shrinks the face by
    more than about 2x, dlib first halves the image (pyramid_down); this does not (no such faces in 250 x 250
    LFW images)."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim not in (2, 3):
        raise ValueError(f"dlib_face_chip: expected a uint8 image [H, W, 3] or [H, W], got {image.dtype} "
                         f"{list(image.shape)}")
    m = dlib_chip_transform(landmarks, size, padding)
    to_image = np.linalg.inv(np.vstack([m, [0.0, 0.0, 1.0]]))[:2]
    h, w = image.shape[:2]
    v, u = np.mgrid[0:size, 0:size].astype(np.float64)
    x = np.floor(to_image[0, 0] * u + to_image[0, 1] * v + to_image[0, 2])
    y = np.floor(to_image[1, 0] * u + to_image[1, 1] * v + to_image[1, 2])
    inside = (x >= 0) & (x + 1 < w) & (y >= 0) & (y + 1 < h)
    chip = np.zeros((size, size) + image.shape[2:], np.uint8)
    if not inside.any():
        return chip
    # Warp only the part of the image the chip covers (as dlib does), in float so that it can be truncated.
    x0, y0 = int(x[inside].min()), int(y[inside].min())
    x1, y1 = int(x[inside].max()) + 2, int(y[inside].max()) + 2
    crop = image[y0:y1, x0:x1].astype(np.float64)
    shifted = m.copy()
    shifted[:, 2] += m[:, :2] @ np.array([x0, y0], np.float64)
    sampled = warp_affine(crop, shifted, size)
    if chip.ndim == 3:
        inside = inside[..., None]
    return np.where(inside, np.clip(np.floor(sampled), 0, 255), 0).astype(np.uint8)


def arcface_template_for_dlib(size: int = 112) -> np.ndarray:
    """Where dlib's five points belong in the size x size ArcFace crop -> float64 [5, 2] (x, y), dlib's order.

    dlib's points (eye corners, bottom of the nose) are not ArcFace's (eye centres, nose tip, mouth corners), so
    they are not mapped point by point. Instead dlib's own mean face (DLIB_MEAN_FACE_5, the unit-square template
    of get_face_chip_details) is placed in the crop by the similarity that takes its two eye centres (the mean of
    each eye's two corners) exactly onto the ArcFace template's two eye points (align.arcface_template(size)):
    the eyes land where ArcFace puts them and the nose where dlib's mean face puts it relative to the eyes.
    similarity_transform(dlib_landmarks, arcface_template_for_dlib(112)) then gives an ArcFace-style crop."""
    dst = arcface_template(size)
    z = DLIB_MEAN_FACE_5 @ np.array([1.0, 1.0j])                 # points as complex numbers
    eye_left, eye_right = z[[2, 3]].mean(), z[[0, 1]].mean()    # the eye on the image's left, then right
    target_left, target_right = complex(*dst[0]), complex(*dst[1])
    # Two point pairs fix a similarity z -> a z + c exactly.
    a = (target_right - target_left) / (eye_right - eye_left)
    out = a * (z - eye_left) + target_left
    return np.stack([out.real, out.imag], axis=-1)


def align_with_dlib(image: np.ndarray, box: Sequence[float], predictor: Any, template: str = "arcface",
                    size: Optional[int] = None) -> np.ndarray:
    """The aligned face in box (left, top, right, bottom) of image (uint8 [H, W, 3] or [H, W]), from the
    predictor's five landmarks -> uint8 [size, size(, 3)].

    template "arcface" (size 112 by default): the similarity onto arcface_template_for_dlib(size), warped as
    insightface's norm_crop; "dlib" (size 150 by default): dlib's face chip (padding 0.25), what its face
    descriptor takes, from the landmarks rounded to whole pixels as dlib's predictor returns them (so it equals
    dlib.get_face_chip(image, predictor(image, box), 150, 0.25)). ValueError naming what failed when the
    landmarks are not finite or degenerate."""
    if template not in ("arcface", "dlib"):
        raise ValueError(f"align_with_dlib: template must be 'arcface' or 'dlib', got {template!r}")
    # predictor: facekd_jax.data.shape_predictor.ShapePredictor (or anything with its predict(image, box)).
    landmarks = _check_landmarks(predictor.predict(image, box), f"align_with_dlib (box {list(box)})")
    if template == "dlib":
        # dlib's shape predictor hands get_face_chip integer points: rounded the same way, the chip is dlib's.
        return dlib_face_chip(image, np.floor(landmarks + 0.5), DLIB_CHIP_SIZE if size is None else size)
    size = 112 if size is None else int(size)
    return warp_affine(np.asarray(image), similarity_transform(landmarks, arcface_template_for_dlib(size)), size)


# ----------------------------------------------------------------------------------------------- aligned copies

ALIGNMENT = "alignment.json"   # in the root of an aligned copy (python -m facekd_jax.data.convert align)


def read_alignment(root: str) -> Optional[dict]:
    """The alignment.json of an aligned copy at `root` (its template, size, the boxes within its chips, the
    images it could not align), or None where `root` is not one."""
    import json
    import os

    path = os.path.join(str(root), ALIGNMENT)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            record = json.load(f)
        record["boxes"] = {k: tuple(int(v) for v in box) for k, box in record["boxes"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{path}: unreadable alignment record ({type(e).__name__}: {e})") from None
    return record


def aligned_crop(root: str, template: str = "arcface") -> Optional[tuple]:
    """The box within an aligned copy's chips that is `template`'s crop ("arcface": the ArcFace crop a student
    takes; "dlib": dlib's face chip, the whole of a dlib-chip copy), or None where `root` is not an aligned copy."""
    record = read_alignment(root)
    if record is None:
        return None
    if template not in record["boxes"]:
        raise ValueError(f"{root}/{ALIGNMENT}: no {template!r} box (has {', '.join(record['boxes'])})")
    return record["boxes"][template]


# An aligned copy stores wide dlib chips, from which both crops are cut: dlib's descriptor chip (padding 0.25) and
# the ArcFace crop (which reaches further up the forehead: padding 0.6 or more). At 230 px with padding 0.65 the
# descriptor chip is 150 px wide, its own resolution.
COPY_SIZE, COPY_PADDING = 230, 0.65


def chip_boxes(size: int = COPY_SIZE, padding: float = COPY_PADDING, arcface: int = 112) -> dict:
    """The crops within a wide dlib chip (size, padding): "dlib" dlib's descriptor chip (150, padding 0.25), and
    "arcface" the ArcFace crop, as (left, top, right, bottom) boxes rounded out to whole pixels.

    Every chip here is a least-squares similarity from the same five landmarks onto templates that are a
    similarity apart (arcface_template_for_dlib places dlib's mean face in the ArcFace crop), so each crop is the
    same box of every wide chip: the one measured on a face whose landmarks sit exactly on the ArcFace template.
    The ArcFace crop's tilt (its template's eye line differs from dlib's by 0.3 degrees) is ignored."""
    face = arcface_template_for_dlib(arcface)            # landmarks of a face already in the ArcFace crop
    wide = np.vstack([dlib_chip_transform(face, size, padding), [0.0, 0.0, 1.0]])

    def box(corners_in_face: np.ndarray) -> tuple:
        mapped = corners_in_face @ wide[:2, :2].T + wide[:2, 2]
        lo, hi = np.floor(mapped.min(axis=0) + 1e-6), np.ceil(mapped.max(axis=0) - 1e-6)
        return int(lo[0]), int(lo[1]), int(hi[0]), int(hi[1])

    n = float(DLIB_CHIP_SIZE)
    square = np.array([[0, 0], [n, 0], [0, n], [n, n]], np.float64)
    standard = np.linalg.inv(np.vstack([dlib_chip_transform(face), [0.0, 0.0, 1.0]]))  # dlib chip -> face
    dlib_corners = square @ standard[:2, :2].T + standard[:2, 2]
    a = float(arcface)
    return {"dlib": box(dlib_corners), "arcface": box(np.array([[0, 0], [a, 0], [0, a], [a, a]], np.float64))}
