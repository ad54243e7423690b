"""A procedurally generated face-identity set: no downloads, deterministic, learnable but not trivial.

Every identity is a face-like template drawn from a parameter vector: face oval and jaw, skin tone, hair
colour, volume and hairline, eye spacing, size and iris colour, brows (gap, length, thickness, tilt), nose,
mouth and lips, a mole, a beard, glasses. Four expression variants of it are drawn once (eyes wide or
narrowed with brows up or down, mouth closed or open).

Every image is a nuisance-varied sample of its identity: expression (a blend of the four variants), pose
(shift, scale, in-plane rotation, and a yaw-like perspective foreshortening), background colour, a lighting
gradient with brightness and colour cast, sometimes an occluding box, and sensor noise.

An image is a pure function of (world seed, identity, sample index): identity c of "synthetic:C:K" is the
same face whatever C and K are, and image (c, j) is the same array in every run, process and batch.
Parameters come from a counter-based hash (splitmix64) in numpy; templates are drawn once per identity;
per image, TensorFlow warps the blended template (one projective-transform op), composites and lights it,
so the tf.data pipeline runs it in graph mode without Python. Verification pairs use identities offset by
`VERIFICATION_IDENTITY_OFFSET`, never overlapping the training identities.

For demos and tests; the training log says when it is used.
"""
from __future__ import annotations

import functools
import math
from typing import Tuple

import numpy as np
import tensorflow as tf

DEFAULT_NUM_CLASSES = 64
DEFAULT_IMAGES_PER_CLASS = 64
# Verification identities start here: far beyond any training identity count anyone will use.
VERIFICATION_IDENTITY_OFFSET = 1_000_000
# Templates are drawn at most this large and warped up to the image size (memory: C x 4 x R x R x 4 bytes).
MAX_TEMPLATE_SIZE = 64

_NOISE_BANK_SIZE = 16
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


# ----------------------------------------------------------------------------------------------------
# Counter-based randomness: a value depends only on its keys, never on batch composition or order.

def splitmix64(x) -> np.ndarray:
    """uint64 array -> uint64 array, a bijective avalanche mix (the splitmix64 finaliser)."""
    x = np.asarray(x, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = x + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def hash_keys(*keys) -> np.ndarray:
    """Integer keys (broadcastable arrays; negatives allowed) -> uint64 hash of the whole tuple."""
    h = np.zeros((), np.uint64)
    for k in keys:
        h = splitmix64(h ^ np.asarray(k).astype(np.int64).astype(np.uint64))
    return h


def uniforms(key, n: int) -> np.ndarray:
    """uint64 [B] keys -> float64 [B, n] uniforms in [0, 1), the k-th from hash(key, k)."""
    key = np.asarray(key, np.uint64).reshape(-1)
    z = splitmix64(key[:, None] ^ splitmix64(np.arange(n, dtype=np.uint64))[None, :])
    return (z >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def _lerp(u, lo, hi):
    return lo + (hi - lo) * u


# ----------------------------------------------------------------------------------------------------
# Identities. Face coordinates: the template spans [-1, 1] in x (right) and y (down); colours 0..255.

IDENTITY_PARAMS = (
    "face_rx", "face_ry", "jaw", "skin_r", "skin_g", "skin_b", "hair_r", "hair_g", "hair_b", "hair_w",
    "hair_h", "hair_cy", "fringe", "eye_dx", "eye_y", "eye_rx", "eye_ry", "iris_r", "iris_g", "iris_b",
    "brow_gap", "brow_len", "brow_thick", "brow_tilt", "nose_len", "nose_w", "nose_shade", "mouth_y",
    "mouth_w", "lip_h", "lip_r", "lip_g", "lip_b", "mole_x", "mole_y", "mole_r", "beard", "glasses")
_ID = {name: i for i, name in enumerate(IDENTITY_PARAMS)}
# (eye openness, brow raise, mouth openness, smile) of the four expression variants drawn per identity.
EXPRESSIONS = ((1.15, 0.035, 0.0, 1.0), (0.3, -0.01, 0.0, 1.0), (1.15, 0.035, 1.0, 1.2), (0.3, -0.01, 1.0, 1.2))


def identity_params(identity, seed: int = 0) -> np.ndarray:
    """int [N] identity ids -> float32 [N, len(IDENTITY_PARAMS)]: what makes a face that person's face."""
    identity = np.asarray(identity, np.int64).reshape(-1)
    u = uniforms(hash_keys(seed, 1, identity), 48)
    p = {}
    p["face_rx"] = _lerp(u[:, 0], 0.56, 0.72)
    p["face_ry"] = _lerp(u[:, 1], 0.74, 0.88)
    p["jaw"] = _lerp(u[:, 2], 0.0, 0.45)
    tone = u[:, 3]  # one light -> dark axis plus a little per-channel individuality
    light, dark = np.array([236.0, 200.0, 172.0]), np.array([105.0, 72.0, 52.0])
    skin = light[None] + (dark - light)[None] * tone[:, None] + (u[:, 4:7] - 0.5) * 24.0
    p["skin_r"], p["skin_g"], p["skin_b"] = skin.T
    hpal = np.array([[25, 20, 18], [80, 50, 30], [150, 105, 60], [215, 180, 120], [170, 170, 170]], float)
    hpos = u[:, 7] * (len(hpal) - 1)  # black -> brown -> blond -> grey
    i0 = np.floor(hpos).astype(int).clip(0, len(hpal) - 2)
    f = (hpos - i0)[:, None]
    hair = (hpal[i0] * (1 - f) + hpal[i0 + 1] * f) * _lerp(u[:, 8], 0.8, 1.1)[:, None]
    p["hair_r"], p["hair_g"], p["hair_b"] = hair.T
    p["hair_w"] = _lerp(u[:, 9], 1.0, 1.3)
    p["hair_h"] = np.where(u[:, 10] < 0.1, 0.0, _lerp(u[:, 11], 0.75, 1.2))  # 10% bald
    p["hair_cy"] = _lerp(u[:, 12], -0.30, -0.08)
    p["fringe"] = _lerp(u[:, 13], 0.05, 0.45)
    p["eye_dx"] = _lerp(u[:, 14], 0.22, 0.34)
    p["eye_y"] = _lerp(u[:, 15], -0.18, -0.02)
    p["eye_rx"] = _lerp(u[:, 16], 0.08, 0.13)
    p["eye_ry"] = _lerp(u[:, 17], 0.035, 0.065)
    ipal = np.array([[60, 35, 20], [110, 75, 40], [70, 110, 70], [70, 110, 170], [40, 40, 45]], float)
    iris = ipal[np.minimum((u[:, 18] * len(ipal)).astype(int), len(ipal) - 1)] + (u[:, 19:22] - 0.5) * 30
    p["iris_r"], p["iris_g"], p["iris_b"] = iris.T
    p["brow_gap"] = _lerp(u[:, 22], 0.08, 0.16)
    p["brow_len"] = _lerp(u[:, 23], 0.08, 0.15)
    p["brow_thick"] = _lerp(u[:, 24], 0.015, 0.04)
    p["brow_tilt"] = _lerp(u[:, 25], -0.35, 0.35)
    p["nose_len"] = _lerp(u[:, 26], 0.12, 0.24)
    p["nose_w"] = _lerp(u[:, 27], 0.05, 0.10)
    p["nose_shade"] = _lerp(u[:, 28], 0.15, 0.45)
    p["mouth_y"] = _lerp(u[:, 29], 0.30, 0.46)
    p["mouth_w"] = _lerp(u[:, 30], 0.13, 0.25)
    p["lip_h"] = _lerp(u[:, 31], 0.025, 0.05)
    lip = skin * 0.75 + np.array([40.0, -10.0, -5.0])[None] + (u[:, 32:35] - 0.5) * 30
    p["lip_r"], p["lip_g"], p["lip_b"] = lip.T
    p["mole_x"] = _lerp(u[:, 36], -0.38, 0.38)
    p["mole_y"] = _lerp(u[:, 37], -0.1, 0.45)
    p["mole_r"] = np.where(u[:, 35] < 0.5, _lerp(u[:, 38], 0.02, 0.04), 0.0)
    p["beard"] = np.where(u[:, 39] < 0.25, _lerp(u[:, 40], 0.35, 0.8), 0.0)
    p["glasses"] = (u[:, 41] < 0.2).astype(np.float64)
    return np.stack([p[k] for k in IDENTITY_PARAMS], axis=1).astype(np.float32)


def _ellipse(x, y, cx, cy, rx, ry, px):
    """Anti-aliased filled-ellipse coverage in [0, 1] on grids x [1,1,S], y [1,S,1]; parameters [N,1,1].

    First-order signed distance (q - 1) * r / 2, q the squared normalised radius: exact at the edge, where
    anti-aliasing happens, and cheaper than the true distance.
    """
    dx = (x - cx) / rx
    dy = (y - cy) / ry
    k = tf.minimum(rx, ry) * 0.5 / px
    return tf.clip_by_value((0.5 + k) - (dx * dx + dy * dy) * k, 0.0, 1.0)


def _ring(x, y, cx, cy, rx, ry, width, px):
    """Anti-aliased elliptical ring about `width` wide (face units) along the ellipse's edge."""
    dx = (x - cx) / rx
    dy = (y - cy) / ry
    sd = tf.abs(dx * dx + dy * dy - 1.0) * tf.minimum(rx, ry) * 0.5
    return tf.clip_by_value((0.5 + 0.5 * width / px) - sd / px, 0.0, 1.0)


def _paint(rgb, alpha, colour):
    """Alpha-composite `colour` [N,1,1,3] over `rgb` [N,S,S,3] with coverage `alpha` [N,S,S]."""
    return rgb + alpha[..., None] * (colour - rgb)


def _draw(params: tf.Tensor, expression, size: int) -> tf.Tensor:
    """float32 [N, len(IDENTITY_PARAMS)] -> float32 [N, S, S, 4] premultiplied RGBA, head in canonical pose."""
    col = lambda name: params[:, _ID[name]][:, None, None]  # [N, 1, 1]
    rgb_of = lambda prefix: tf.stack([col(f"{prefix}_{c}") for c in "rgb"], axis=-1)  # [N, 1, 1, 3]
    eye_open, brow_raise, mouth_open, smile = expression
    grid = (tf.range(size, dtype=tf.float32) + 0.5) * (2.0 / size) - 1.0
    x, y = grid[None, None, :], grid[None, :, None]
    px = 2.0 / size
    n = tf.shape(params)[0]
    skin, hair = rgb_of("skin"), rgb_of("hair")
    frx, fry = col("face_rx"), col("face_ry")

    has_hair = tf.cast(col("hair_h") > 0, tf.float32)
    hair_back = _ellipse(x, y, 0.0, col("hair_cy"), frx * col("hair_w"), fry * tf.maximum(col("hair_h"), 0.1), px)
    hair_back = hair_back * has_hair
    jaw_rx = frx * (1.0 - col("jaw") * tf.clip_by_value(y / fry, 0.0, 1.0))  # narrower towards the chin
    face = _ellipse(x, y, 0.0, 0.0, jaw_rx, fry, px)
    alpha = tf.maximum(hair_back, face)
    rgb = tf.zeros((n, size, size, 3)) + hair
    rgb = _paint(rgb, face, skin)
    cap = _ellipse(x, y, 0.0, -fry * (1.05 - col("fringe")), frx * 1.02, fry * col("fringe") * 1.2, px)
    rgb = _paint(rgb, cap * face * has_hair, hair)  # hairline
    beard = _ellipse(x, y, 0.0, fry * 0.55, frx * 0.85, fry * 0.5, px) * face
    rgb = _paint(rgb, beard * col("beard"), hair * 0.9)
    mole_r = tf.maximum(col("mole_r"), 1e-3)
    mole = _ellipse(x, y, col("mole_x"), col("mole_y"), mole_r, mole_r, px) * tf.cast(col("mole_r") > 0, tf.float32)
    rgb = _paint(rgb, mole * 0.85, skin * 0.45)
    nose = _ellipse(x, y, 0.0, col("eye_y") + 0.07 + col("nose_len") * 0.5, col("nose_w"), col("nose_len") * 0.55, px)
    rgb = _paint(rgb, nose * col("nose_shade"), skin * 0.55)
    white = tf.constant([[[[235.0, 232.0, 228.0]]]])
    for side in (-1.0, 1.0):
        ex, ey = side * col("eye_dx"), col("eye_y")
        eye = _ellipse(x, y, ex, ey, col("eye_rx"), tf.maximum(col("eye_ry") * eye_open, 0.004), px)
        rgb = _paint(rgb, eye, white)
        iris = _ellipse(x, y, ex, ey, col("eye_ry") * 0.95, col("eye_ry") * 0.95, px)
        rgb = _paint(rgb, iris * eye, rgb_of("iris"))
        tilt = side * col("brow_tilt")
        brow = _ellipse(x, y + tilt * (x - ex), ex, ey - col("brow_gap") - brow_raise, col("brow_len"),
                        col("brow_thick"), px)
        rgb = _paint(rgb, brow, hair * 0.8)
        rim = _ring(x, y, ex, ey, col("eye_rx") * 1.45 + 0.01, col("eye_ry") * 1.9 + 0.02, 0.02, px)
        rgb = _paint(rgb, rim * col("glasses"), tf.constant([[[[30.0, 30.0, 35.0]]]]))
    mw = col("mouth_w") * smile
    lips = _ellipse(x, y, 0.0, col("mouth_y"), mw, col("lip_h") * (1.0 + mouth_open), px)
    rgb = _paint(rgb, lips, rgb_of("lip"))
    if mouth_open > 0:
        inner = _ellipse(x, y, 0.0, col("mouth_y"), mw * 0.8, col("lip_h") * mouth_open * 0.9, px)
        rgb = _paint(rgb, inner, tf.constant([[[[60.0, 20.0, 25.0]]]]))
    return tf.concat([rgb * alpha[..., None], 255.0 * alpha[..., None]], axis=-1)


def _draw_templates(params: tf.Tensor, size: int) -> tf.Tensor:
    """Eagerly, op by op: tracing this into a tf.function cost ~3 s per process, more than drawing a few hundred
    faces, and made a face's pixels depend on whether it was traced (grappler rewrites changed rare rounding ties)."""
    variants = [_draw(params, e, size) for e in EXPRESSIONS]
    return tf.cast(tf.clip_by_value(tf.round(tf.stack(variants, axis=1)), 0.0, 255.0), tf.uint8)


def template_size(image_size: int) -> int:
    return min(int(image_size), MAX_TEMPLATE_SIZE)


def templates(identity, *, image_size: int, seed: int = 0, batch_size: int = 256) -> np.ndarray:
    """int [N] identity ids -> uint8 [N, 4, R, R, 4]: premultiplied RGBA of the 4 expression variants."""
    identity = np.asarray(identity, np.int64).reshape(-1)
    size = template_size(image_size)
    out = [_draw_templates(tf.constant(identity_params(identity[i:i + batch_size], seed)), size).numpy()
           for i in range(0, len(identity), batch_size)]
    return np.concatenate(out) if out else np.zeros((0, len(EXPRESSIONS), size, size, 4), np.uint8)


# ----------------------------------------------------------------------------------------------------
# Per-image nuisance, and drawing a batch of images from templates.

SAMPLE_PARAMS = (
    "t0", "t1", "t2", "t3", "t4", "t5", "t6", "t7",  # projective transform: output pixel -> template pixel
    "w0", "w1", "w2", "w3",  # expression blend weights of the four variants
    "bg_r", "bg_g", "bg_b", "bright", "grad_x", "grad_y", "cast_r", "cast_g", "cast_b",
    "occ", "occ_x0", "occ_x1", "occ_y0", "occ_y1", "occ_r", "occ_g", "occ_b", "noise_sigma", "noise_idx")
_SP = {name: i for i, name in enumerate(SAMPLE_PARAMS)}


def _pose_transforms(tx, ty, scale, rot, yaw, image_size: int, tsize: int) -> np.ndarray:
    """Pose [B] each -> float32 [B, 8] transforms mapping output pixels to template pixels."""
    b = len(tx)
    s = float(image_size)
    to_norm = np.array([[2 / s, 0, 1 / s - 1], [0, 2 / s, 1 / s - 1], [0, 0, 1]])
    to_tpl = np.array([[tsize / 2, 0, tsize / 2 - 0.5], [0, tsize / 2, tsize / 2 - 0.5], [0, 0, 1]])
    m = np.zeros((b, 3, 3))
    cos, sin = np.cos(rot), np.sin(rot)
    # Image point g -> face point f = R(-rot) (persp(g) - t) / scale; persp divides by (1 + 0.3 yaw gx).
    m[:, 0, 0], m[:, 0, 1] = cos / scale, sin / scale
    m[:, 1, 0], m[:, 1, 1] = -sin / scale, cos / scale
    m[:, 0, 2] = -(cos * tx + sin * ty) / scale
    m[:, 1, 2] = -(-sin * tx + cos * ty) / scale
    m[:, 2, 2] = 1.0
    persp = np.tile(np.eye(3), (b, 1, 1))
    persp[:, 2, 0] = 0.3 * yaw
    full = to_tpl[None] @ m @ persp @ to_norm[None]
    full = full / full[:, 2:3, 2:3]
    return full.reshape(b, 9)[:, :8].astype(np.float32)


def sample_params(identity, sample, *, image_size: int, seed: int = 0) -> np.ndarray:
    """int [B] identities, int [B] sample indices -> float32 [B, len(SAMPLE_PARAMS)]: one photo's nuisance."""
    identity = np.asarray(identity, np.int64).reshape(-1)
    sample = np.asarray(sample, np.int64).reshape(-1)
    u = uniforms(hash_keys(seed, 2, identity, sample), 40)
    bell = lambda i: (u[:, i] + u[:, i + 1] + u[:, i + 2]) / 1.5 - 1.0  # in [-1, 1], peaked at 0
    p = {}
    t = _pose_transforms(tx=0.10 * bell(0), ty=0.10 * bell(3), scale=1.0 + 0.12 * bell(6),
                         rot=math.radians(15.0) * bell(9), yaw=bell(12),
                         image_size=template_size(image_size), tsize=template_size(image_size))
    for i in range(8):
        p[f"t{i}"] = t[:, i]
    eye, mouth = u[:, 15], np.where(u[:, 16] < 0.45, 0.0, u[:, 17])
    p["w0"], p["w1"] = (1 - eye) * (1 - mouth), eye * (1 - mouth)
    p["w2"], p["w3"] = (1 - eye) * mouth, eye * mouth
    bg = _lerp(u[:, 18], 20, 230)[:, None] + (u[:, 19:22] - 0.5) * 70
    p["bg_r"], p["bg_g"], p["bg_b"] = bg.T
    p["bright"] = _lerp(u[:, 22], 0.65, 1.2)
    grad, ang = _lerp(u[:, 23], 0.0, 0.3), u[:, 24] * 2 * math.pi
    p["grad_x"], p["grad_y"] = grad * np.cos(ang), grad * np.sin(ang)
    cast = 1.0 + (u[:, 25:28] - 0.5) * 0.24
    p["cast_r"], p["cast_g"], p["cast_b"] = cast.T
    # An occluding box (hand, scarf, microphone) on 15% of the images, in image coordinates [-1, 1].
    p["occ"] = (u[:, 28] < 0.15).astype(np.float64)
    cx, cy = _lerp(u[:, 29], -0.8, 0.8), _lerp(u[:, 30], -0.5, 1.0)
    hw, hh = _lerp(u[:, 31], 0.15, 0.45), _lerp(u[:, 32], 0.1, 0.35)
    p["occ_x0"], p["occ_x1"], p["occ_y0"], p["occ_y1"] = cx - hw, cx + hw, cy - hh, cy + hh
    occ = _lerp(u[:, 33:36], 20, 230)
    p["occ_r"], p["occ_g"], p["occ_b"] = occ.T
    p["noise_sigma"] = _lerp(u[:, 36], 3.0, 16.0) * np.where(u[:, 37] < 0.5, 1.0, -1.0)
    p["noise_idx"] = np.floor(u[:, 38] * _NOISE_BANK_SIZE)
    return np.stack([p[k] for k in SAMPLE_PARAMS], axis=1).astype(np.float32)


@functools.lru_cache(maxsize=8)
def _noise_bank(size: int) -> np.ndarray:
    """A fixed bank of unit gaussian noise fields, float32 [M, S, S, 3] (the same on every machine)."""
    return np.random.default_rng(20240611).standard_normal((_NOISE_BANK_SIZE, size, size, 3)).astype(np.float32)


def compose(tpl: tf.Tensor, sp: tf.Tensor, image_size: int) -> tf.Tensor:
    """Templates uint8 [B, 4, R, R, 4], nuisance float32 [B, len(SAMPLE_PARAMS)] -> uint8 [B, S, S, 3].

    Pose, background, occluder and lighting are done at the template size R (every op there costs
    (R/S)^2 of one at S); one bilinear resize brings the picture to S, where the sensor noise is added.
    """
    r = tpl.shape[2]
    col = lambda name: sp[:, _SP[name]]
    c4 = lambda name: col(name)[:, None, None, None]
    rgb_of = lambda prefix: tf.stack([col(f"{prefix}_{c}") for c in "rgb"], axis=-1)[:, None, None, :]
    weights = tf.stack([col(f"w{i}") for i in range(4)], axis=1)  # [B, 4]
    head = tf.einsum("be,behwc->bhwc", weights, tf.cast(tpl, tf.float32))
    transforms = tf.stack([col(f"t{i}") for i in range(8)], axis=1)
    head = tf.raw_ops.ImageProjectiveTransformV3(
        images=head, transforms=transforms, output_shape=tf.constant([r, r], tf.int32),
        fill_value=tf.constant(0.0), interpolation="BILINEAR", fill_mode="CONSTANT")
    img = head[..., :3] + rgb_of("bg") * (1.0 - head[..., 3:] * (1.0 / 255.0))
    grid = (tf.range(r, dtype=tf.float32) + 0.5) * (2.0 / r) - 1.0
    gx, gy = grid[None, None, :, None], grid[None, :, None, None]
    # An occluding box, anti-aliased over one pixel; the mask is separable, so it is cheap.
    px = 2.0 / r
    inside_x = tf.clip_by_value((gx - c4("occ_x0")) / px, 0, 1) * tf.clip_by_value((c4("occ_x1") - gx) / px, 0, 1)
    inside_y = tf.clip_by_value((gy - c4("occ_y0")) / px, 0, 1) * tf.clip_by_value((c4("occ_y1") - gy) / px, 0, 1)
    img = img + (inside_x * inside_y * c4("occ")) * (rgb_of("occ") - img)
    # Lighting: brightness times a linear gradient, and a colour cast.
    light = c4("bright") * (1.0 + c4("grad_x") * gx + c4("grad_y") * gy)
    img = img * (light * rgb_of("cast"))
    if r != image_size:
        img = tf.image.resize(img, (image_size, image_size), method="bilinear")
    noise = tf.gather(tf.constant(_noise_bank(image_size)), tf.cast(col("noise_idx"), tf.int32))
    img = img + noise * c4("noise_sigma")
    return tf.cast(tf.clip_by_value(tf.round(img), 0.0, 255.0), tf.uint8)


# ----------------------------------------------------------------------------------------------------
# The training set, eager rendering, specs and verification pairs.

class SyntheticFaces:
    """The "synthetic:C:K[:SEED]" set at one image size: C identities x K images, rendered on the fly.

    labels: int32 [C*K] (example i is identity i // K, sample i % K). `images_tf(index int64 [B])` -> uint8
    [B, S, S, 3] in graph mode; it gathers precomputed templates (C x 4 x R x R x 4 bytes) and nuisances.
    """

    def __init__(self, num_classes: int, images_per_class: int, *, image_size: int, seed: int = 0):
        self.num_classes, self.images_per_class = int(num_classes), int(images_per_class)
        self.image_size, self.seed = int(image_size), int(seed)
        n = self.num_classes * self.images_per_class
        size = template_size(image_size)
        table_bytes = self.num_classes * len(EXPRESSIONS) * size * size * 4
        if table_bytes > 4 << 30:
            raise ValueError(f"synthetic:{num_classes}:{images_per_class} at {image_size} px needs "
                             f"{table_bytes / 2**30:.1f} GiB of face templates; use fewer identities (they are "
                             f"{len(EXPRESSIONS) * size * size * 4 / 2**10:.0f} KiB each)")
        self.labels = (np.arange(n) // self.images_per_class).astype(np.int32)
        self._templates = tf.constant(templates(np.arange(self.num_classes), image_size=image_size, seed=seed))
        self._nuisance = tf.constant(sample_params(self.labels, np.arange(n) % self.images_per_class,
                                                   image_size=image_size, seed=seed))

    def __len__(self) -> int:
        return len(self.labels)

    def images_tf(self, index: tf.Tensor) -> tf.Tensor:
        index = tf.cast(index, tf.int64)
        tpl = tf.gather(self._templates, index // self.images_per_class)
        return compose(tpl, tf.gather(self._nuisance, index), self.image_size)


@functools.lru_cache(maxsize=8)
def _compose_fn(image_size: int):
    size = template_size(image_size)
    return tf.function(lambda t, p: compose(t, p, image_size), input_signature=[
        tf.TensorSpec((None, len(EXPRESSIONS), size, size, 4), tf.uint8),
        tf.TensorSpec((None, len(SAMPLE_PARAMS)), tf.float32)], autograph=False)


def render(identity, sample, *, image_size: int = 112, seed: int = 0, batch_size: int = 256) -> np.ndarray:
    """int [N] identities, int [N] sample indices -> uint8 [N, S, S, 3].

    The pipeline's pixels for the same (identity, sample), up to 1 grey level here and there: the same ops,
    but tf.data's optimised kernels may round a value sitting on .5 the other way.
    """
    identity = np.asarray(identity, np.int64).reshape(-1)
    sample = np.asarray(sample, np.int64).reshape(-1)
    if len(identity) != len(sample):
        raise ValueError(f"render: {len(identity)} identities but {len(sample)} sample indices")
    uniq, inverse = np.unique(identity, return_inverse=True)
    tpl = templates(uniq, image_size=image_size, seed=seed)
    fn = _compose_fn(image_size)
    out = []
    for i in range(0, len(identity), batch_size):
        sl = slice(i, i + batch_size)
        sp = sample_params(identity[sl], sample[sl], image_size=image_size, seed=seed)
        out.append(fn(tpl[inverse[sl]], sp).numpy())
    return np.concatenate(out) if out else np.zeros((0, image_size, image_size, 3), np.uint8)


def parse_spec(spec: str) -> Tuple[int, int, int]:
    """'synthetic' | 'synthetic:C:K[:SEED]' -> (num_classes, images_per_class, seed)."""
    parts = spec.split(":")
    usage = "use 'synthetic' or 'synthetic:NUM_CLASSES:IMAGES_PER_CLASS[:SEED]'"
    if parts[0] != "synthetic" or len(parts) not in (1, 3, 4):
        raise ValueError(f"bad synthetic spec {spec!r}: {usage}")
    if len(parts) == 1:
        return DEFAULT_NUM_CLASSES, DEFAULT_IMAGES_PER_CLASS, 0
    try:
        values = [int(v) for v in parts[1:]]
    except ValueError:
        raise ValueError(f"bad synthetic spec {spec!r}: {usage} (integers)") from None
    c, k = values[0], values[1]
    if not 2 <= c < VERIFICATION_IDENTITY_OFFSET or k < 1:
        raise ValueError(f"bad synthetic spec {spec!r}: need 2 <= NUM_CLASSES < {VERIFICATION_IDENTITY_OFFSET} "
                         "and IMAGES_PER_CLASS >= 1")
    return c, k, values[2] if len(values) == 3 else 0


def verification_pairs(n_pairs: int, *, image_size: int = 112, seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """n_pairs -> (images uint8 [2N, S, S, 3], issame bool [N]); pair k is images[2k], images[2k+1].

    Pairs alternate same / different, so each of 10 in-order folds is balanced; identities come from ids
    >= VERIFICATION_IDENTITY_OFFSET, disjoint from every training identity. Deterministic in `seed`.
    """
    n = int(n_pairs)
    if n < 1:
        raise ValueError(f"verification_pairs: n_pairs must be >= 1, got {n_pairs}")
    pool = max(2, n)  # about one new person per pair, as in LFW
    k = np.arange(n)
    u = uniforms(hash_keys(seed, 4, k), 4)
    issame = (k % 2) == 0
    first = (u[:, 0] * pool).astype(np.int64)
    other = (first + 1 + (u[:, 1] * (pool - 1)).astype(np.int64)) % pool
    id1 = VERIFICATION_IDENTITY_OFFSET + first
    id2 = VERIFICATION_IDENTITY_OFFSET + np.where(issame, first, other)
    s1 = (u[:, 2] * (1 << 30)).astype(np.int64)
    s2 = s1 + 1 + (u[:, 3] * 1000).astype(np.int64)  # never the same photo twice
    identity = np.stack([id1, id2], axis=1).reshape(-1)
    sample = np.stack([s1, s2], axis=1).reshape(-1)
    return render(identity, sample, image_size=image_size, seed=seed), issame
