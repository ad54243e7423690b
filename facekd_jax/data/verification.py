"""Verification sets: the readers behind the verification specs (facekd_jax.data.specs has their syntax).

  bin:FILE                          insightface pickle of (2N encoded images, N issame bools)
  pairs:PAIRS_TXT:IMAGES_DIR[@l,t,r,b]  LFW layout: image i of `name` is IMAGES_DIR/name/name_%04d.jpg
  lfw:DIR[@l,t,r,b]                 View 1 test pairs (DIR/pairsDevTest.txt, 1,000 pairs), images
                                    DIR/lfw-deepfunneled, crop 62,55,188,181 unless given
  lfw-view2:DIR[@l,t,r,b]           View 2 (DIR/pairs.txt, 6,000 pairs in 10 folds), same images and crop
  synthetic[:N_PAIRS[:SEED]]        pairs of synthetic identities (facekd_jax.data.synthetic)

Each reader takes a parsed specs.DataSpec and returns (images uint8 [2N, S, S, 3] RGB, issame bool [N]).
"""
from __future__ import annotations

import io
import logging
import os
import pickle
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from facekd_jax import safe_pickle
from facekd_jax.data import images as images_lib
from facekd_jax.data import specs as specs_lib
from facekd_jax.data.specs import LFW_IMAGES, DataSpec

log = logging.getLogger(__name__)
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
    with open(pairs_txt, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise ValueError(f"{pairs_txt} line {line}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    lines = [(n, ln.split()) for n, ln in enumerate(io.StringIO(text, newline=None), 1)]
    lines = [(n, t) for n, t in lines if t]
    if not lines:
        raise ValueError(f"{pairs_txt}: empty pairs file")
    expected = None
    first_n, first = lines[0]
    # isdecimal, not isdigit: int() refuses digits such as '²' that isdigit accepts
    if len(first) in (1, 2) and all(t.isdecimal() for t in first):
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
    with open(pairs_txt, encoding="utf-8") as f:
        view1 = len(f.readline().split()) == 1
    same = [p for p in pairs if p.issame]
    diff = [p for p in pairs if not p.issame]
    blocked = [p.issame for p in pairs] == [True] * len(same) + [False] * len(diff)
    if not view1 or not blocked or len(same) != len(diff):
        return pairs  # already mixed (or not View 1): keep the file's order
    return [p for pair in zip(same, diff) for p in pair]


class _BinUnpickler(pickle.Unpickler):
    """Unpickles only lists/tuples of bytes, bools and numpy arrays: a .bin from the internet cannot run code."""
    _NUMPY = set(safe_pickle.NUMPY_GLOBALS)

    def find_class(self, module, name):
        if module == "_codecs" and name == "encode":  # how protocol <= 2 pickles store Python 3 bytes
            import _codecs
            return _codecs.encode
        if module in ("builtins", "__builtin__") and name in ("bytearray", "bytes"):
            import builtins
            return _from_data(getattr(builtins, name))
        if module in ("builtins", "__builtin__") and name in ("bool", "list", "tuple"):
            import builtins
            return getattr(builtins, name)
        if (module == "numpy" or module.startswith(("numpy.core", "numpy._core"))) and name in self._NUMPY:
            return safe_pickle.NUMPY_GLOBALS[name]  # arrays rebuilt from data, never by NumPy's own unpickling
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: a verification .bin holds only encoded "
                                     "images and booleans")


def _from_data(kind):
    """bytes / bytearray for the unpickler, from data only: bytes(2**40) would allocate the size the file names."""
    def build(*args):
        if args and isinstance(args[0], int):
            raise pickle.UnpicklingError(f"{kind.__name__}({args[0]}) asks for a size, not data")
        return kind(*args)
    return build


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
    with open(path, "rb") as f:
        data = f.read()
    safe_pickle.scan(data, f"{path}: not a readable insightface .bin (pickle of (images, issame))")
    try:
        obj = _BinUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as e:  # noqa: BLE001 - any failure of a foreign pickle (numpy's SystemError too) is the file's
        try:  # Python 2 pickles holding numpy arrays need latin1 (numpy's own advice); images come back as str
            obj = _BinUnpickler(io.BytesIO(data), encoding="latin1").load()
        except Exception:  # noqa: BLE001
            raise ValueError(f"{path}: not a readable insightface .bin (pickle of (images, issame)): {e}") from e
    try:
        obj = safe_pickle.resolve(obj)
    except ValueError as e:
        raise ValueError(f"{path}: not a readable insightface .bin (pickle of (images, issame)): {e}") from None
    if not (isinstance(obj, (tuple, list)) and len(obj) == 2 and all(isinstance(x, (tuple, list, np.ndarray))
                                                                      for x in obj)):
        raise ValueError(f"{path}: expected a pickled pair (encoded images, issame list), got {type(obj).__name__}")
    bins, issame = obj
    try:
        issame = np.asarray(list(issame), dtype=bool).reshape(-1)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: issame is not a list of booleans ({e})") from None
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


def _lfw_dirs(root: str) -> str:
    images = os.path.join(root, LFW_IMAGES)
    if not os.path.isdir(images):
        raise FileNotFoundError(f"LFW images not found: {images} (expected DIR/{LFW_IMAGES}/<name>/<name>_0001.jpg)")
    return images


def bin_pairs(spec: DataSpec, *, image_size: int) -> Tuple[np.ndarray, np.ndarray]:
    return load_bin(spec.path, image_size=image_size, crop=spec.crop)


def txt_pairs(spec: DataSpec, *, image_size: int) -> Tuple[np.ndarray, np.ndarray]:
    if os.path.basename(spec.path) in LFW_PAIRS.values():
        from facekd_jax.data import lfw_dev
        lfw_dev.check_test_pairs_allowed(str(spec))
    return load_pairs(spec.path, spec.options[0], image_size=image_size, crop=spec.crop)


# The pairs file of each LFW verification kind, in DIR.
LFW_PAIRS = {"lfw": "pairsDevTest.txt", "lfw-view2": "pairs.txt"}


def lfw_pairs(spec: DataSpec, *, image_size: int) -> Tuple[np.ndarray, np.ndarray]:
    from facekd_jax.data import lfw_dev

    lfw_dev.check_test_pairs_allowed(str(spec))
    if not os.path.isdir(spec.path):
        raise FileNotFoundError(f"LFW folder not found: {spec.path} (spec {str(spec)!r})")
    return load_pairs(os.path.join(spec.path, LFW_PAIRS[spec.kind]), _lfw_dirs(spec.path), image_size=image_size,
                      crop=specs_lib.default_crop(spec))


def lfw_dev_pairs(spec: DataSpec, *, image_size: int) -> Tuple[np.ndarray, np.ndarray]:
    """The development split's pairs (data.lfw_dev): people never trained on and never reported."""
    from facekd_jax.data import lfw_dev

    if not os.path.isdir(spec.path):
        raise FileNotFoundError(f"LFW folder not found: {spec.path} (spec {str(spec)!r})")
    pairs = [Pair(*pair, line) for line, pair in enumerate(lfw_dev.dev_pairs(spec.path), 1)]
    paths = pair_image_paths(pairs, _lfw_dirs(spec.path), pairs_txt=f"{spec.path} development pairs")
    images = decode_paths(paths, image_size=image_size, crop=specs_lib.default_crop(spec))
    return images, np.array([p.issame for p in pairs], dtype=bool)


def synthetic_pairs(spec: DataSpec, *, image_size: int) -> Tuple[np.ndarray, np.ndarray]:
    if len(spec.options) > 2:
        raise specs_lib.SpecError(f"verification spec {str(spec)!r}: expected 'synthetic[:N_PAIRS[:SEED]]'")
    try:
        n_pairs = int(spec.options[0]) if spec.options else SYNTHETIC_PAIRS
        seed = int(spec.options[1]) if len(spec.options) > 1 else 0
    except ValueError:
        raise specs_lib.SpecError(f"verification spec {str(spec)!r}: N_PAIRS and SEED are integers") from None
    from facekd_jax.data import synthetic
    return synthetic.verification_pairs(n_pairs, image_size=image_size, seed=seed)


def load_verification(spec: "str | DataSpec", *, image_size: int = 112) -> Tuple[np.ndarray, np.ndarray]:
    """Verification spec -> (images uint8 [2N, S, S, 3] RGB, issame bool [N]); pair k is images[2k], images[2k+1].

    Specs: see the module docstring and specs.KINDS. Greyscale and non-square images become RGB S x S (crop box
    first, then resize). A URL path of a COPY kind (bin, lfw, lfw-view2) is read from a local copy.
    """
    spec = specs_lib.parse(spec, specs_lib.VERIFICATION)
    if spec.info.protocol or specs_lib.expand(spec) != (spec,):
        raise ValueError(f"{spec}: not one set of pairs ({spec.info.help}); load_targets reads it")
    return spec.info.reader(specs_lib.VERIFICATION)(specs_lib.local(spec), image_size=image_size)


def verification_name(spec: "str | DataSpec") -> str:
    """Short name for logs: "bin:/d/agedb_30.bin" -> "agedb_30", "lfw:DIR" -> "lfw", "lfw-view2:DIR" -> "lfw-view2",
    "pairs:/d/lfw/pairs.txt:/d/lfw/imgs" -> "lfw" (the pairs file's folder when the file is called pairs.txt),
    "synthetic..." -> "synthetic"."""
    return specs_lib.name(specs_lib.parse(spec, specs_lib.VERIFICATION))


def load_targets(specs: Sequence[str], *, image_size: int, root: Optional[str] = None, log_fn=log.info
                 ) -> Dict[str, Tuple[np.ndarray, np.ndarray]]:
    """{short name: (images, issame)} of every verification spec in `specs` (config.data.val_targets; `{root}`
    stands for `root`), in order."""
    targets = {}
    for i, text in enumerate(specs):
        for spec in specs_lib.expand(specs_lib.parse(text, specs_lib.VERIFICATION, root=root,
                                                     field=f"config.data.val_targets[{i}]")):
            name = specs_lib.name(spec)
            if spec.info.protocol:
                log_fn("verification set %s (%s): a protocol of its own, evaluated by --mode=eval", name, spec)
                continue
            targets[name] = load_verification(spec, image_size=image_size)
            log_fn("verification set %s: %d pairs from %s", name, len(targets[name][1]), spec)
    return targets


def protocol_specs(specs: Sequence[str], *, root: Optional[str] = None) -> List[DataSpec]:
    """The verification specs in `specs` whose kind has a protocol of its own (ijbc:, ijbb:), parsed."""
    parsed = [specs_lib.parse(text, specs_lib.VERIFICATION, root=root, field=f"config.data.val_targets[{i}]")
              for i, text in enumerate(specs)]
    return [spec for spec in parsed if spec.info.protocol]
