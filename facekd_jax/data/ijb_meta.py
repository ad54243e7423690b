"""IJB-B / IJB-C's meta files, read and cross-checked (facekd_jax.data.ijb runs the protocol on them).

ROOT/meta/<t>_face_tid_mid.txt          N lines `name template_id media_id`, one per face crop
ROOT/meta/<t>_name_5pts_score.txt       N lines `name x1 y1 ... x5 y5 detector_score`, the same faces in order
ROOT/meta/<t>_template_pair_label.txt   P lines `template1 template2 label` (1 genuine, 0 impostor)
(<t>: ijbc or ijbb). The files are parsed in 32 MiB blocks by NumPy (no Python object per line: IJB-C's pairs file
has 15.7 M lines); a malformed line is an InputError naming the file and the line.
"""
from __future__ import annotations

import mmap
import os
import warnings
from typing import Iterator, NamedTuple, Optional, Tuple

import numpy as np

from facekd_jax.errors import InputError

TARGETS = ("IJBC", "IJBB")
_BLOCK_BYTES = 1 << 25  # meta files are parsed 32 MiB at a time
# Byte classes for the tokeniser: 0 part of a token, 1 space, 2 newline, 3 other whitespace (tab, CR, VT, FF).
_CLASS = np.zeros(256, np.uint8)
_CLASS[32], _CLASS[10] = 1, 2
_CLASS[[9, 11, 12, 13]] = 3

__all__ = ["TARGETS", "IJBMeta", "meta_paths", "read_face_tid_mid", "read_template_pairs", "read_landmarks",
           "read_meta"]

class _Table(NamedTuple):
    names: Optional[np.ndarray]  # bytes [n] (first column) or None
    values: np.ndarray  # [n, k] of the parse dtype
    lines: Optional[np.ndarray]  # int64 [n] 1-based line of each row; None when row r is line r + 1


def _blocks(path: str, block_bytes: int) -> Iterator[bytes]:
    """The file in pieces of about block_bytes, each ending at a newline (one is added at the end if missing);
    read through mmap, so each piece is copied once."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            return
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            start = 0
            while start < size:
                cut = mm.rfind(b"\n", start, start + block_bytes) + 1 if start + block_bytes < size else size
                if cut <= start:  # a line longer than a block: up to its end
                    cut = mm.find(b"\n", start) + 1 or size
                text = mm[start:cut]
                yield text if text.endswith(b"\n") else text + b"\n"
                start = cut


def _numbers(text: bytes, dtype) -> Optional[np.ndarray]:
    """Whitespace-separated numbers -> 1-d array, or None when some token is not a number of dtype (NumPy 2
    raises; NumPy 1 warned and returned the numbers before it, which the callers' count check catches)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return np.fromstring(text, dtype=dtype, sep=" ")
    except ValueError:
        return None


def _parses(text: bytes, count: int, dtype) -> bool:
    values = _numbers(text, dtype)
    return values is not None and values.size == count


def _parse_block(text: bytes, first_line: int, path: str, ncols: int, named: bool, dtype, form: str
                 ) -> Tuple[Optional[np.ndarray], np.ndarray, Optional[np.ndarray], int]:
    """One block of whole lines -> (names, values [n, k], lines or None, newlines in the block)."""
    buf = np.frombuffer(text, np.uint8)
    is_nl = buf == 10
    sep_pos = np.flatnonzero(is_nl | (buf == 32))
    n_lines = int(np.count_nonzero(is_nl))
    # The official files use single spaces and '\n': then every line has ncols - 1 spaces and its newline (every
    # ncols-th separator is a newline), no two separators touch and no other byte is <= 13 (tab, CR, ...).
    if (sep_pos.size == n_lines * ncols and sep_pos[0] > 0 and is_nl[sep_pos[ncols - 1::ncols]].all()
            and np.diff(sep_pos).min(initial=2) > 1 and np.count_nonzero(buf <= 13) == n_lines):
        ends = sep_pos[ncols - 1::ncols]
        starts = np.r_[0, ends[:-1] + 1]
        lines = None
        row_starts, row_ends = starts, ends + 1
        name_start, name_end = starts, sep_pos[::ncols]
    else:  # any whitespace, blank lines: tokenise, and name the first line with the wrong number of fields
        sep = _CLASS[buf] != 0
        ends = np.flatnonzero(is_nl)
        starts = np.r_[0, ends[:-1] + 1]
        tok_start = np.flatnonzero(~sep & np.r_[True, sep[:-1]])
        tok_end = np.flatnonzero(~sep & np.r_[sep[1:], True]) + 1
        counts = np.bincount(np.searchsorted(ends, tok_start), minlength=n_lines)
        bad = np.flatnonzero((counts != 0) & (counts != ncols))
        if bad.size:
            k = int(bad[0])
            got = text[starts[k]:ends[k]].decode("utf-8", "replace").strip()
            raise InputError(f"{path} line {first_line + k}: expected {ncols} fields `{form}`, got {got!r}")
        rows = np.flatnonzero(counts)
        lines = first_line + rows
        row_starts, row_ends = starts[rows], ends[rows] + 1
        name_start, name_end = tok_start[::ncols], tok_end[::ncols]
    names = None
    if named and row_starts.size:
        lengths = name_end - name_start
        width = int(lengths.max())
        grid = buf[np.minimum(name_start[:, None] + np.arange(width), buf.size - 1)]
        grid[np.arange(width) >= lengths[:, None]] = 0
        names = np.ascontiguousarray(grid).view(f"S{width}").reshape(-1)
        # The numbers are parsed with the names blanked out: one np.fromstring call for the whole block.
        blank = buf.copy()
        offsets = np.cumsum(lengths) - lengths
        blank[np.arange(int(lengths.sum())) + np.repeat(name_start - offsets, lengths)] = 32
        text = blank.tobytes()
    k = ncols - int(named)
    values = _numbers(text, dtype)
    if values is None or values.size != row_starts.size * k:
        lo, hi = 0, row_starts.size  # bisect for the first row that does not parse (rows parse independently)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if _parses(text[row_starts[lo]:row_ends[mid - 1]], (mid - lo) * k, dtype):
                lo = mid
            else:
                hi = mid
        line = first_line + lo if lines is None else int(lines[lo])
        got = buf[row_starts[lo]:row_ends[lo] - 1].tobytes().decode("utf-8", "replace").strip()
        kind = "integers" if np.issubdtype(dtype, np.integer) else "numbers"
        after = " after the name" if named else ""
        raise InputError(f"{path} line {line}: expected `{form}` ({k} {kind}{after}), got {got!r}")
    return names, values.reshape(-1, k), lines, n_lines


def _read_table(path: str, ncols: int, *, named: bool, dtype, form: str, block_bytes: int = _BLOCK_BYTES
                ) -> _Table:
    """A whitespace-separated text file with `ncols` fields per line (the first a name if `named`, the rest
    numbers of `dtype`); blank lines are skipped. InputError names the file and line of a malformed line."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"IJB meta file not found: {path}")
    names, values, lines, first_line = [], [], [], 1
    for text in _blocks(path, block_bytes):
        n, v, ln, n_lines = _parse_block(text, first_line, path, ncols, named, dtype, form)
        names.append(n)
        values.append(v)
        lines.append((first_line, v.shape[0], ln))
        first_line += n_lines
    k = ncols - int(named)
    values = np.concatenate(values) if len(values) > 1 else values[0] if values else np.zeros((0, k), dtype)
    if values.shape[0] == 0:
        raise InputError(f"{path}: no lines (expected `{form}` per line)")
    names = np.concatenate([n for n in names if n is not None]) if named else None
    if all(ln is None for _, _, ln in lines):  # no blank line anywhere: row r is line r + 1
        return _Table(names, values, None)
    return _Table(names, values, np.concatenate([first + np.arange(count) if ln is None else ln
                                                 for first, count, ln in lines]))


def _line(table: _Table, row: int) -> int:
    return int(row) + 1 if table.lines is None else int(table.lines[row])


def _check_ids(path: str, table: _Table, columns: slice, what: str) -> np.ndarray:
    """Columns of ids (int64, a view), each in [0, 2**31) (np.fromstring saturates an overflowing integer)."""
    ids = table.values[:, columns]
    if ids.size == 0 or (ids.min() >= 0 and ids.max() < 2 ** 31):
        return ids
    bad = np.flatnonzero(((ids < 0) | (ids >= 2 ** 31)).any(axis=1))
    if bad.size:
        raise InputError(f"{path} line {_line(table, bad[0])}: {what} must be integers in [0, 2**31), got "
                         f"{ids[bad[0]].tolist()}")
    return ids


def meta_paths(root: str, target: str = "IJBC") -> dict:
    """{"faces", "landmarks", "pairs", "images"}: the official paths under root for target "IJBC" or "IJBB"."""
    if target not in TARGETS:
        raise ValueError(f"IJB target must be one of {TARGETS}, got {target!r}")
    meta = os.path.join(os.fspath(root), "meta")
    low = target.lower()
    return {"faces": os.path.join(meta, f"{low}_face_tid_mid.txt"),
            "landmarks": os.path.join(meta, f"{low}_name_5pts_score.txt"),
            "pairs": os.path.join(meta, f"{low}_template_pair_label.txt"),
            "images": os.path.join(os.fspath(root), "loose_crop")}


def _faces(path: str):
    table = _read_table(path, 3, named=True, dtype=np.int64, form="name template_id media_id")
    ids = _check_ids(path, table, slice(0, 2), "template_id and media_id")
    return table.names, ids[:, 0], ids[:, 1], table


def _pairs(path: str):
    table = _read_table(path, 3, named=False, dtype=np.int64, form="template1 template2 label")
    pairs = _check_ids(path, table, slice(0, 2), "template1 and template2")
    labels = table.values[:, 2]
    bad = np.flatnonzero((labels != 0) & (labels != 1)) if labels.min() < 0 or labels.max() > 1 else []
    if len(bad):
        raise InputError(f"{path} line {_line(table, bad[0])}: label must be 0 or 1, got {labels[bad[0]]}")
    return pairs, labels.astype(bool), table


def _landmarks(path: str):
    table = _read_table(path, 12, named=True, dtype=np.float64, form="name x1 y1 ... x5 y5 score")
    bad = np.flatnonzero(~np.isfinite(table.values).all(axis=1))
    if bad.size:
        raise InputError(f"{path} line {_line(table, bad[0])}: landmarks and score must be finite, got "
                         f"{table.values[bad[0]].tolist()}")
    values = table.values.astype(np.float32)  # float64 then float32: the reference's float(x) -> np.float32
    return table.names, values[:, :10].reshape(-1, 5, 2), values[:, 10].copy(), table


def read_face_tid_mid(path: str) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`name template_id media_id` lines -> (names bytes [N], templates int64 [N], medias int64 [N])."""
    return _faces(path)[:3]


def read_template_pairs(path: str) -> Tuple[np.ndarray, np.ndarray]:
    """`template1 template2 label` lines -> (pairs int64 [P, 2] template ids, labels bool [P]; 1 = same person)."""
    return _pairs(path)[:2]


def read_landmarks(path: str) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`name x1 y1 ... x5 y5 score` lines -> (names bytes [N], landmarks float32 [N, 5, 2] (x, y) in the crop's
    pixels: left eye, right eye, nose, mouth corners; detector scores float32 [N])."""
    return _landmarks(path)[:3]


class IJBMeta(NamedTuple):
    """The three meta files of one target; face i is row i of both face files."""
    names: np.ndarray  # bytes [N]: loose_crop/<name>
    templates: np.ndarray  # int64 [N]
    medias: np.ndarray  # int64 [N]
    landmarks: np.ndarray  # float32 [N, 5, 2]
    scores: np.ndarray  # float32 [N] detector scores
    pairs: np.ndarray  # int64 [P, 2] template ids
    labels: np.ndarray  # bool [P]
    paths: dict  # meta_paths(root, target)
    face_lines: Optional[np.ndarray]  # int64 [N] line of each face in the landmarks file; None: face i is line i+1


def read_meta(root: str, target: str = "IJBC") -> IJBMeta:
    """Reads and cross-checks a target's meta files: both face files list the same names in the same order, and
    every template of the pairs file has faces. Errors name the file and line."""
    paths = meta_paths(root, target)
    names, templates, medias, faces = _faces(paths["faces"])
    names5, landmarks, scores, marks = _landmarks(paths["landmarks"])
    if names.size != names5.size:
        raise InputError(f"{paths['landmarks']} has {names5.size} faces but {paths['faces']} has {names.size}: "
                         "the two files must list the same faces in the same order")
    differ = np.flatnonzero(names != names5)
    if differ.size:
        i = int(differ[0])
        raise InputError(f"{paths['landmarks']} line {_line(marks, i)} is face {names5[i].decode(errors='replace')!r}"
                         f" but {paths['faces']} line {_line(faces, i)} is {names[i].decode(errors='replace')!r}: the "
                         "two files must list the same faces in the same order")
    pairs, labels, pair_table = _pairs(paths["pairs"])
    known = np.unique(templates)
    missing = np.flatnonzero(~(isin_sorted(pairs[:, 0], known) & isin_sorted(pairs[:, 1], known)))
    if missing.size:
        k = int(missing[0])
        template = pairs[k, 0] if not isin_sorted(pairs[k:k + 1, 0], known)[0] else pairs[k, 1]
        raise InputError(f"{paths['pairs']} line {_line(pair_table, k)}: template {template} has no face in "
                         f"{paths['faces']}")
    return IJBMeta(names, templates, medias, landmarks, scores, pairs, labels, paths, marks.lines)


def isin_sorted(values: np.ndarray, sorted_unique: np.ndarray) -> np.ndarray:
    pos = np.minimum(np.searchsorted(sorted_unique, values), sorted_unique.size - 1)
    return sorted_unique[pos] == values
