"""Verification sets: insightface `.bin` files and LFW-style `pairs.txt` + image folder.

Specs (see load_verification):
  bin:FILE                          insightface pickle of (2N encoded images, N issame bools)
  pairs:PAIRS_TXT:IMAGES_DIR[@l,t,r,b]  LFW layout: image i of `name` is IMAGES_DIR/name/name_%04d.jpg
  lfw:DIR[@l,t,r,b]                 View 1 test pairs (DIR/pairsDevTest.txt, 1,000 pairs), images
                                    DIR/lfw-deepfunneled, crop 62,55,188,181 unless given
  lfw-view2:DIR[@l,t,r,b]           View 2 (DIR/pairs.txt, 6,000 pairs in 10 folds), same images and crop
  synthetic[:N_PAIRS[:SEED]]        pairs of synthetic identities (facekd_jax.data.synthetic)
"""
from __future__ import annotations

import logging
import os
import pickle
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, NamedTuple, Sequence, Tuple

import numpy as np

from facekd_jax.data import images as images_lib

log = logging.getLogger(__name__)

LFW_CROP = (62, 55, 188, 181)
LFW_IMAGES = "lfw-deepfunneled"
SYNTHETIC_PAIRS = 600  # default "synthetic" size: 10 folds of 60 pairs
# Tried in this order when IMAGES_DIR/name/name_%04d.jpg is absent (copies re-saved in another format).
_FALLBACK_EXTENSIONS = (".jpeg", ".png", ".bmp", ".pgm", ".ppm", ".pnm", ".tif", ".tiff", ".webp", ".JPG", ".JPEG",
                        ".PNG")


class Pair(NamedTuple):
    """One line of a pairs file: image index1 of name1 against image index2 of name2 (LFW numbers from 1)."""
    name1: str
    index1: int
    name2: str
    index2: int
    issame: bool
    line: int  # 1-based line number in the pairs file, for error messages


def read_pairs(pairs_txt: str) -> List[Pair]:
    """LFW pairs file -> list of Pair, in file order.

    Header: View 1 `N` (N same then N different pairs) or View 2 `FOLDS N` (FOLDS x (N same + N different));
    a file whose first line is already a pair is read without a header. Same lines `name i j`; different lines
    `name1 i name2 j`. Raises FileNotFoundError / ValueError naming the file and line.
    """
    pairs_txt = os.fspath(pairs_txt)
    if not os.path.isfile(pairs_txt):
        raise FileNotFoundError(f"pairs file not found: {pairs_txt}")
    with open(pairs_txt, encoding="utf-8") as f:
        lines = [(n, ln.split()) for n, ln in enumerate(f, 1)]
    lines = [(n, t) for n, t in lines if t]
    if not lines:
        raise ValueError(f"{pairs_txt}: empty pairs file")
    expected = None
    first_n, first = lines[0]
    if len(first) in (1, 2) and all(t.isdigit() for t in first):
        expected = 2 * int(first[0]) if len(first) == 1 else 2 * int(first[0]) * int(first[1])
        lines = lines[1:]
    pairs = []
    for n, t in lines:
        try:
            if len(t) == 3:
                pairs.append(Pair(t[0], int(t[1]), t[0], int(t[2]), True, n))
            elif len(t) == 4:
                pairs.append(Pair(t[0], int(t[1]), t[2], int(t[3]), False, n))
            else:
                raise ValueError
        except ValueError:
            raise ValueError(f"{pairs_txt} line {n}: expected 'name i j' or 'name1 i name2 j', got "
                             f"{' '.join(t)!r}") from None
    if expected is not None and expected != len(pairs):
        raise ValueError(f"{pairs_txt}: header line {first_n} ({' '.join(first)}) promises {expected} pairs but the "
                         f"file has {len(pairs)} (truncated or wrong header?)")
    return pairs


def image_path(images_dir: str, name: str, index: int) -> str:
    """LFW file of image `index` of `name`: images_dir/name/name_%04d.jpg (or the same stem in another format)."""
    base = os.path.join(images_dir, name, f"{name}_{index:04d}")
    path = base + ".jpg"
    if os.path.isfile(path):
        return path
    for ext in _FALLBACK_EXTENSIONS:
        if os.path.isfile(base + ext):
            return base + ext
    return path


def pair_image_paths(pairs: Sequence[Pair], images_dir: str, *, pairs_txt: str = "pairs file") -> List[str]:
    """2N image paths (pair k = paths[2k], paths[2k+1]); FileNotFoundError names the pairs line and the path."""
    if not os.path.isdir(images_dir):
        raise FileNotFoundError(f"image folder not found: {images_dir} (for {pairs_txt})")
    paths = []
    for p in pairs:
        for name, index in ((p.name1, p.index1), (p.name2, p.index2)):
            path = image_path(images_dir, name, index)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{pairs_txt} line {p.line} ({name} {index}): image not found: {path}")
            paths.append(path)
    return paths


def _read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def read_files(paths: Sequence[str], *, workers: int = 16) -> List[bytes]:
    """Reads many files concurrently (I/O bound) -> their bytes, in order."""
    with ThreadPoolExecutor(max_workers=workers) as ex:
        return list(ex.map(_read_bytes, paths))


def decode_paths(paths: Sequence[str], *, image_size: int, crop=None) -> np.ndarray:
    """Image files -> uint8 [len(paths), S, S, 3]; each distinct file decoded once; a corrupt file raises naming it."""
    unique: Dict[str, int] = {}
    where = np.array([unique.setdefault(p, len(unique)) for p in paths], dtype=np.int64)
    names = list(unique)
    decoded = images_lib.decode_many(read_files(names), image_size=image_size, crop=crop, names=names)
    return decoded[where]


def load_pairs(pairs_txt: str, images_dir: str, *, image_size: int = 112, crop=None
               ) -> Tuple[np.ndarray, np.ndarray]:
    """pairs.txt + LFW-layout folder -> (uint8 [2N, S, S, 3], issame bool [N]). Crop box applied before resizing.

    Pairs come in `protocol_order`: a View 1 file (header `N`: N same pairs, then N different) is returned interleaved (same, different, same,
    ...): the protocol's 10 folds are taken in order, and in file order every fold would hold one class only,
    so the threshold chosen on the other folds would be biased against the held-out one. View 2 files are
    already balanced fold by fold and keep their order.
    """
    pairs = protocol_order(read_pairs(pairs_txt), pairs_txt)
    paths = pair_image_paths(pairs, images_dir, pairs_txt=pairs_txt)
    images = decode_paths(paths, image_size=image_size, crop=crop)
    return images, np.array([p.issame for p in pairs], dtype=bool)


def protocol_order(pairs: List[Pair], pairs_txt: str) -> List[Pair]:
    """The order in which the 10-fold protocol should see the pairs of `pairs_txt` (see load_pairs)."""
    with open(pairs_txt) as f:
        view1 = len(f.readline().split()) == 1
    same = [p for p in pairs if p.issame]
    diff = [p for p in pairs if not p.issame]
    blocked = [p.issame for p in pairs] == [True] * len(same) + [False] * len(diff)
    if not view1 or not blocked or len(same) != len(diff):
        return pairs  # already mixed (or not View 1): keep the file's order
    return [p for pair in zip(same, diff) for p in pair]


class _BinUnpickler(pickle.Unpickler):
    """Unpickles only lists/tuples of bytes, bools and numpy arrays: a .bin from the internet cannot run code."""
    _NUMPY = {"_reconstruct", "ndarray", "dtype", "scalar", "_frombuffer", "bool_", "uint8", "bool"}

    def find_class(self, module, name):
        if module == "_codecs" and name == "encode":  # how protocol <= 2 pickles store Python 3 bytes
            import _codecs
            return _codecs.encode
        if module in ("builtins", "__builtin__") and name in ("bytearray", "bytes", "bool", "list", "tuple"):
            import builtins
            return getattr(builtins, name)
        if (module == "numpy" or module.startswith(("numpy.core", "numpy._core"))) and name in self._NUMPY:
            import importlib
            try:
                return getattr(importlib.import_module(module), name)
            except (ImportError, AttributeError):
                mod = module.replace("numpy.core", "numpy._core", 1)  # pickles from numpy 1.x read under numpy 2
                return getattr(importlib.import_module(mod), name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: a verification .bin holds only encoded "
                                     "images and booleans")


def _as_bytes(item, path: str, i: int) -> bytes:
    if isinstance(item, (bytes, bytearray, memoryview)):
        return bytes(item)
    if isinstance(item, np.ndarray):
        return item.tobytes()
    if isinstance(item, str):  # a py2 str read with encoding="latin1"
        return item.encode("latin1")
    raise ValueError(f"{path}: image {i} is a {type(item).__name__}, expected encoded image bytes")


def read_bin(path: str) -> Tuple[List[bytes], np.ndarray]:
    """insightface .bin -> (2N encoded images, issame bool [N]). Loaded with encoding="bytes" (py2 pickles too)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"verification .bin not found: {path}")
    errors = (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError, UnicodeError)
    try:
        with open(path, "rb") as f:
            obj = _BinUnpickler(f, encoding="bytes").load()
    except errors as e:
        try:  # Python 2 pickles holding numpy arrays need latin1 (numpy's own advice); images come back as str
            with open(path, "rb") as f:
                obj = _BinUnpickler(f, encoding="latin1").load()
        except errors:
            raise ValueError(f"{path}: not a readable insightface .bin (pickle of (images, issame)): {e}") from e
    if not (isinstance(obj, (tuple, list)) and len(obj) == 2):
        raise ValueError(f"{path}: expected a pickled pair (encoded images, issame list), got {type(obj).__name__}")
    bins, issame = obj
    issame = np.asarray(list(issame), dtype=bool).reshape(-1)
    bins = [_as_bytes(b, path, i) for i, b in enumerate(bins)]
    if len(bins) != 2 * issame.shape[0]:
        raise ValueError(f"{path}: {len(bins)} images for {issame.shape[0]} pairs (expected {2 * issame.shape[0]})")
    return bins, issame


def load_bin(path: str, *, image_size: int = 112, crop=None) -> Tuple[np.ndarray, np.ndarray]:
    """insightface .bin -> (uint8 [2N, S, S, 3], issame bool [N]); a corrupt image raises naming FILE[index]."""
    bins, issame = read_bin(path)
    names = [f"{path}[{i}]" for i in range(len(bins))]
    return images_lib.decode_many(bins, image_size=image_size, crop=crop, names=names), issame


def write_bin(path: str, encoded: Sequence[bytes], issame: Sequence[bool]) -> None:
    """Writes an insightface .bin: pickle (list of 2N encoded images, list of N bools), protocol 4.

    Writes PATH.tmp-PID then renames, so a reader never sees half a file.
    """
    encoded = [bytes(e) for e in encoded]
    issame = [bool(s) for s in issame]
    if len(encoded) != 2 * len(issame):
        raise ValueError(f"{path}: {len(encoded)} images for {len(issame)} pairs")
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            pickle.dump((encoded, issame), f, protocol=4)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _split_pairs_spec(rest: str, spec: str) -> Tuple[str, str]:
    if ":" not in rest:
        raise ValueError(f"verification spec {spec!r}: expected 'pairs:PAIRS_TXT:IMAGES_DIR[@l,t,r,b]'")
    pairs_txt, images_dir = rest.split(":", 1)
    return pairs_txt, images_dir


def _lfw_dirs(root: str) -> str:
    images = os.path.join(root, LFW_IMAGES)
    if not os.path.isdir(images):
        raise FileNotFoundError(f"LFW images not found: {images} (expected DIR/{LFW_IMAGES}/<name>/<name>_0001.jpg)")
    return images


def load_verification(spec: str, *, image_size: int = 112) -> Tuple[np.ndarray, np.ndarray]:
    """Verification spec -> (images uint8 [2N, S, S, 3] RGB, issame bool [N]); pair k is images[2k], images[2k+1].

    Specs: "bin:FILE" | "pairs:PAIRS_TXT:IMAGES_DIR[@l,t,r,b]" | "lfw:DIR[@l,t,r,b]" (pairsDevTest.txt, crop
    62,55,188,181 by default) | "lfw-view2:DIR[@l,t,r,b]" (pairs.txt) | "synthetic[:N_PAIRS[:SEED]]".
    Greyscale and non-square images become RGB S x S (crop box first, then resize). The FILE or DIR of bin, lfw and
    lfw-view2 may be a URL (read from a local copy, sources.local_spec).
    """
    from facekd_jax.data.sources import local_spec

    kind, _, rest = local_spec(spec).partition(":")
    if kind == "bin":
        path, crop = images_lib.split_crop(rest)
        return load_bin(path, image_size=image_size, crop=crop)
    if kind == "pairs":
        body, crop = images_lib.split_crop(rest)
        pairs_txt, images_dir = _split_pairs_spec(body, spec)
        return load_pairs(pairs_txt, images_dir, image_size=image_size, crop=crop)
    if kind in ("lfw", "lfw-view2"):
        root, crop = images_lib.split_crop(rest)
        if not os.path.isdir(root):
            raise FileNotFoundError(f"LFW folder not found: {root} (spec {spec!r})")
        pairs_txt = os.path.join(root, "pairsDevTest.txt" if kind == "lfw" else "pairs.txt")
        return load_pairs(pairs_txt, _lfw_dirs(root), image_size=image_size, crop=crop or LFW_CROP)
    if kind == "synthetic":
        fields = rest.split(":") if rest else []
        if len(fields) > 2:
            raise ValueError(f"verification spec {spec!r}: expected 'synthetic[:N_PAIRS[:SEED]]'")
        n_pairs = int(fields[0]) if fields else SYNTHETIC_PAIRS
        seed = int(fields[1]) if len(fields) > 1 else 0
        from facekd_jax.data import synthetic
        return synthetic.verification_pairs(n_pairs, image_size=image_size, seed=seed)
    if spec.endswith(".bin") and os.path.isfile(spec):
        return load_bin(spec, image_size=image_size)
    raise ValueError(f"unknown verification spec {spec!r}: expected bin:FILE, pairs:PAIRS_TXT:IMAGES_DIR[@l,t,r,b], "
                     "lfw:DIR, lfw-view2:DIR or synthetic[:N_PAIRS[:SEED]]")


def verification_name(spec: str) -> str:
    """Short name for logs: "bin:/d/agedb_30.bin" -> "agedb_30", "lfw:DIR" -> "lfw", "lfw-view2:DIR" -> "lfw-view2",
    "pairs:/d/lfw/pairs.txt:/d/lfw/imgs" -> "lfw" (the pairs file's folder when the file is called pairs.txt),
    "synthetic..." -> "synthetic"."""
    kind, _, rest = spec.partition(":")
    if kind in ("lfw", "lfw-view2", "synthetic"):
        return kind
    if kind == "bin" or (not rest and spec.endswith(".bin")):
        path, _ = images_lib.split_crop(rest if kind == "bin" else spec)
        return os.path.splitext(os.path.basename(path))[0]
    if kind == "pairs":
        body, _ = images_lib.split_crop(rest)
        pairs_txt = body.split(":", 1)[0]
        stem = os.path.splitext(os.path.basename(pairs_txt))[0]
        if stem.lower() == "pairs":
            parent = os.path.basename(os.path.dirname(os.path.abspath(pairs_txt)))
            return parent or stem
        return stem
    return kind
