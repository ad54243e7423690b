"""Image decoding shared by every source: decode, optional crop box, resize to the model's input size.

One implementation for training and verification, so a face is preprocessed the same way in both.
The fast path is TensorFlow's own decoders (JPEG, PNG, BMP, GIF; they release the GIL); anything else
(PGM/PPM, a truncated or corrupt file) goes through Pillow inside `tf.numpy_function`, which also turns a
file that cannot be decoded into a skipped example that is counted and named in the log.
"""
from __future__ import annotations

import functools
import io
import logging
import re
import threading
from typing import Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf
from PIL import Image, UnidentifiedImageError

Crop = Optional[Tuple[int, int, int, int]]

log = logging.getLogger(__name__)


class ImageDecodeError(ValueError):
    """An image could not be decoded; the message names the file or record."""


class _CorruptCounter:
    """Counts (and remembers the names of) images skipped because they could not be decoded."""

    def __init__(self):
        self._lock = threading.Lock()
        self.names: list[str] = []

    def add(self, name: str) -> None:
        with self._lock:
            self.names.append(name)

    @property
    def count(self) -> int:
        return len(self.names)

    def reset(self) -> None:
        with self._lock:
            self.names.clear()


# Process-wide: tf.data runs decoding on its own threads, so the pipeline cannot return the count directly.
CORRUPT = _CorruptCounter()


# Deflate's largest ratio is 1032:1 (a run of one byte): a PNG's pixel rows, inflated, are at most this many
# times its file's size (plus the slack of a few short streams).
_DEFLATE_RATIO, _DEFLATE_SLACK = 1032, 1 << 16
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # by IHDR colour type: grey, RGB, palette, grey+alpha, RGBA


def _png_header(data: bytes) -> Optional[Tuple[int, int, int]]:
    """(width, height, bytes of pixel rows) a PNG's IHDR declares, or None for bytes that are not a PNG with an
    IHDR. The row bytes leave the filter bytes out: a lower bound, interlaced or not (an interlaced pass row holds
    pixels of one image row, so its rounding up only adds)."""
    if len(data) < 26 or not data.startswith(_PNG_SIGNATURE) or data[12:16] != b"IHDR":
        return None
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    bits = data[24] * _PNG_CHANNELS.get(data[25], 1)
    return width, height, height * ((width * bits + 7) // 8)


def _check_png_size(data: bytes, name: str) -> None:
    """ImageDecodeError for a PNG whose IHDR declares more pixel rows than its bytes can inflate to: a short or
    altered file whose decoders would allocate the declared image (hundreds of MB under Pillow's pixel limit for a
    1 KB file) before finding it short."""
    header = _png_header(data)
    if header is not None and header[2] > _DEFLATE_RATIO * len(data) + _DEFLATE_SLACK:
        width, height, rows = header
        raise ImageDecodeError(f"cannot decode image {name}: its header declares {width}x{height} pixels, "
                               f"{rows:,} bytes of rows, more than its {len(data):,} bytes can hold")


def _pil_decode(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """Bytes -> uint8 [H, W, 3] RGB with Pillow; raises ImageDecodeError naming `name`."""
    _check_png_size(data, name)
    try:
        with Image.open(io.BytesIO(data)) as img:
            # Pillow only warns between MAX_IMAGE_PIXELS and twice that (DecompressionBombError above), and
            # allocates the whole image before it finds a short file short: a header that declares more is refused.
            if Image.MAX_IMAGE_PIXELS and img.width * img.height > Image.MAX_IMAGE_PIXELS:
                raise ImageDecodeError(f"cannot decode image {name}: its header declares {img.width}x{img.height} "
                                       f"pixels, over Pillow's limit of {Image.MAX_IMAGE_PIXELS} (a decompression "
                                       "bomb?)")
            img.load()  # Pillow is lazy: force the decode so truncation is caught here.
            return np.asarray(img.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        if isinstance(e, ImageDecodeError):
            raise
        raise ImageDecodeError(f"cannot decode image {name}: {e}") from e


@functools.lru_cache(maxsize=16)
def _crop_resize_graph(image_size: int, crop: Crop):
    # One traced graph per (size, crop): op-by-op eager execution costs ~3x more per image.
    return tf.function(functools.partial(_crop_resize_tf, image_size=image_size, crop=crop), autograph=False,
                       input_signature=[tf.TensorSpec([None, None, 3], tf.uint8)])


def _crop_resize_np(img: np.ndarray, image_size: int, crop: Crop) -> np.ndarray:
    if crop is None and img.shape[:2] == (image_size, image_size):
        return img  # nothing to do: skip TF entirely (converters call this once per image)
    return _crop_resize_graph(int(image_size), None if crop is None else tuple(crop))(img).numpy()


def decode_rgb(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """Encoded image bytes -> uint8 [H, W, 3] RGB at the image's own size (the alignment converter's input).
    Raises ImageDecodeError naming `name`."""
    return _pil_decode(data, name)


def decode_image_np(data: bytes, *, image_size: int, crop: Crop = None, name: str = "<bytes>") -> np.ndarray:
    """Encoded image bytes -> uint8 [image_size, image_size, 3] RGB (eager; for converters and small sets).

    Raises ImageDecodeError naming `name` when the bytes are not a decodable image.
    """
    return _crop_resize_np(_pil_decode(data, name), image_size, crop)


def _crop_box(h: tf.Tensor, w: tf.Tensor, crop: Tuple[int, int, int, int]):
    """(left, top, right, bottom) clipped to an h x w image -> (top, left, height, width), each >= 1 pixel."""
    left = tf.clip_by_value(crop[0], 0, w - 1)
    top = tf.clip_by_value(crop[1], 0, h - 1)
    right = tf.clip_by_value(crop[2], left + 1, w)
    bottom = tf.clip_by_value(crop[3], top + 1, h)
    return top, left, bottom - top, right - left


def _crop_resize_tf(img: tf.Tensor, image_size: int, crop: Crop) -> tf.Tensor:
    """uint8 [H, W, 3] -> uint8 [S, S, 3]: crop box (clipped to the image), then bilinear resize (antialiased
    when shrinking by more than 2x)."""
    if crop is not None:
        top, left, height, width = _crop_box(tf.shape(img)[0], tf.shape(img)[1], crop)
        img = img[top:top + height, left:left + width]
    shape = tf.shape(img)
    same = tf.logical_and(tf.equal(shape[0], image_size), tf.equal(shape[1], image_size))

    def resize(antialias):
        out = tf.image.resize(img, (image_size, image_size), method="bilinear", antialias=antialias)
        return tf.cast(tf.clip_by_value(tf.round(out), 0, 255), tf.uint8)

    # Antialiasing only where it matters: shrinking by more than 2x. Up to 2x, plain bilinear already
    # averages every input pixel (LFW's 126 px crop -> 112: 0.35 grey levels apart on average) and is
    # ~5x cheaper than TF's antialiased kernel, which would otherwise cost more than the JPEG decode.
    big = tf.greater(tf.maximum(shape[0], shape[1]), 2 * image_size)
    out = tf.cond(same, lambda: img, lambda: tf.cond(big, lambda: resize(True), lambda: resize(False)))
    return tf.ensure_shape(out, (image_size, image_size, 3))


def _looks_complete(encoded: tf.Tensor) -> tf.Tensor:
    """True for a JPEG with its end marker, or a PNG/BMP/GIF header: TF's fast decoders take those.

    A truncated JPEG has no FFD9 end marker; TF would either fail the whole pipeline or return a grey
    half-image silently, so such files go to Pillow, which names and skips them.
    """
    head2 = tf.strings.substr(encoded, 0, 2)
    png = tf.logical_and(tf.equal(tf.strings.substr(encoded, 0, 8), _PNG_SIGNATURE), _png_size_possible(encoded))
    bmp = tf.equal(head2, b"BM")
    gif = tf.equal(tf.strings.substr(encoded, 0, 4), b"GIF8")
    return tf.logical_or(_complete_jpeg(encoded), tf.logical_or(png, tf.logical_or(bmp, gif)))


def _png_size_possible(encoded: tf.Tensor) -> tf.Tensor:
    """`_check_png_size` in the graph: False sends the PNG to Pillow's path, which names and skips it."""
    n = tf.strings.length(encoded)
    head = tf.io.decode_raw(tf.strings.substr(tf.strings.join([encoded, b"\0" * 26]), 0, 26), tf.uint8)
    b = tf.cast(head, tf.float64)  # float: width x height x bits overflows int64 for a 2**32 x 2**32 header
    width = ((b[16] * 256 + b[17]) * 256 + b[18]) * 256 + b[19]
    height = ((b[20] * 256 + b[21]) * 256 + b[22]) * 256 + b[23]
    colour = tf.minimum(tf.cast(head[25], tf.int32), 7)
    channels = tf.gather(tf.constant([_PNG_CHANNELS.get(c, 1) for c in range(8)], tf.float64), colour)
    rows = height * tf.math.ceil(width * b[24] * channels / 8)
    return rows <= _DEFLATE_RATIO * tf.cast(n, tf.float64) + _DEFLATE_SLACK


def _complete_jpeg(encoded: tf.Tensor) -> tf.Tensor:
    """True for JPEG bytes that start with FFD8 and end with the FFD9 end marker."""
    n = tf.strings.length(encoded)
    tail = tf.strings.substr(encoded, tf.maximum(n - 2, 0), 2)
    return tf.logical_and(tf.equal(tf.strings.substr(encoded, 0, 2), b"\xff\xd8"), tf.equal(tail, b"\xff\xd9"))


def _pil_decode_or_flag(data: bytes, name: bytes):
    """numpy_function body: (image, True) or (1x1 black, False) after logging and counting the bad file."""
    # tf.numpy_function hands scalar strings over as 0-d object arrays.
    data = data.item() if isinstance(data, np.ndarray) else data
    name = name.item() if isinstance(name, np.ndarray) else name
    label = name.decode("utf-8", "replace") if isinstance(name, bytes) else str(name)
    try:
        return _pil_decode(data, label), np.bool_(True)
    except ImageDecodeError as e:
        CORRUPT.add(label)
        log.warning("skipping corrupt image (%d so far): %s", CORRUPT.count, e)
        return np.zeros((1, 1, 3), np.uint8), np.bool_(False)


def decode_image_tf(encoded: tf.Tensor, *, image_size: int, crop: Crop = None,
                    name: tf.Tensor | str = "<bytes>") -> Tuple[tf.Tensor, tf.Tensor]:
    """Graph-mode decode for tf.data: scalar string -> (uint8 [S, S, 3] RGB, ok bool scalar).

    `name` (a file path or record key) is what the log says when the image is corrupt; filter on `ok` to
    skip it. Greyscale and palette images become RGB; non-square images are resized (after `crop`).
    """
    name = tf.convert_to_tensor(name, tf.string)

    def fast():
        img = tf.io.decode_image(encoded, channels=3, expand_animations=False)
        return tf.cast(img, tf.uint8), tf.constant(True)

    def slow():
        img, ok = tf.numpy_function(_pil_decode_or_flag, [encoded, name], (tf.uint8, tf.bool), stateful=False)
        return tf.reshape(img, (-1, tf.shape(img)[1], 3)), tf.reshape(ok, ())

    def decode():
        img, ok = tf.cond(_looks_complete(encoded), fast, slow)
        img.set_shape((None, None, 3))
        return img, ok

    if crop is None:
        img, ok = decode()
        return _crop_resize_tf(img, image_size, None), ok

    def jpeg_box():
        # Decode only the JPEG blocks under the crop box: ~25% less decoding on LFW. Pixels equal those of
        # decode-then-crop except in the box's outer 1-2 px (chroma upsampling at the edge; 0.2% of pixels).
        shape = tf.io.extract_jpeg_shape(encoded)
        box = tf.stack(_crop_box(shape[0], shape[1], crop))
        return tf.io.decode_and_crop_jpeg(encoded, box, channels=3), tf.constant(True)

    def decode_then_crop():
        img, ok = decode()
        top, left, height, width = _crop_box(tf.shape(img)[0], tf.shape(img)[1], crop)
        return img[top:top + height, left:left + width], ok

    img, ok = tf.cond(_complete_jpeg(encoded), jpeg_box, decode_then_crop)
    img.set_shape((None, None, 3))
    return _crop_resize_tf(img, image_size, None), ok


def _tf_reason(error: tf.errors.OpError) -> str:
    """The first line of a TensorFlow error, without its {{function_node ...}} and [Op:...] decorations."""
    text = re.sub(r"\{\{[^}]*\}\}|\[Op:\w+\]", "", error.message)
    return " ".join(text.split("\n")[0].split()) or type(error).__name__


def decode_many(encoded: Sequence[bytes], *, image_size: int, crop: Crop = None,
                names: Optional[Sequence[str]] = None, num_parallel_calls: int = 8) -> np.ndarray:
    """Decode a list of encoded images in parallel -> uint8 [N, S, S, 3]; a corrupt one raises, naming it.

    For verification sets, where skipping a pair would silently change the protocol.
    """
    if names is None:
        names = [f"image {i}" for i in range(len(encoded))]
    if len(encoded) == 0:
        return np.zeros((0, image_size, image_size, 3), np.uint8)
    ds = tf.data.Dataset.from_tensor_slices((list(encoded), list(names)))
    ds = ds.map(lambda e, n: decode_image_tf(e, image_size=image_size, crop=crop, name=n),
                num_parallel_calls=num_parallel_calls, deterministic=True)
    images, oks = [], []
    try:
        for img, ok in ds.batch(256).as_numpy_iterator():
            images.append(img)
            oks.append(ok)
    except tf.errors.OpError as e:
        # TensorFlow's fast decoder failed on an image whose header it accepted (a JPEG with a corrupt body, a
        # truncated PNG, a size past its limits): decode them one at a time to name it.
        for data, name in zip(encoded, names):
            try:
                decode_image_tf(tf.constant(data), image_size=image_size, crop=crop, name=name)
            except tf.errors.OpError as one:
                raise ImageDecodeError(f"cannot decode image {name}: {_tf_reason(one)}") from None
        raise ImageDecodeError(f"{len(encoded)} images: TensorFlow failed decoding them: {_tf_reason(e)}") from None
    ok = np.concatenate(oks)
    if not ok.all():
        bad = [names[i] for i in np.flatnonzero(~ok)[:5]]
        raise ImageDecodeError(f"{int((~ok).sum())} image(s) could not be decoded, e.g. {', '.join(bad)}")
    return np.concatenate(images)
