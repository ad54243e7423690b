"""Folder-per-person datasets: DIR/<person>/<image>. One listing shared by the converter and the training source."""
from __future__ import annotations

import logging
import os
from typing import List, Tuple

import numpy as np

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".pgm", ".ppm", ".pnm", ".pbm", ".tif", ".tiff", ".webp",
                    ".gif")


def is_image_file(name: str) -> bool:
    """By extension (case-insensitive); hidden files (".xyz", macOS "._x.jpg") are never images."""
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def list_folder(root: str) -> Tuple[List[str], np.ndarray, List[str]]:
    """DIR with one sub-folder per person -> (paths [N], labels int32 [N], class_names [C]).

    Sub-folders sorted by name give labels 0..C-1; images inside sorted by name (JPEG/PNG/BMP/PGM/PPM/...).
    Files beside the sub-folders, hidden entries and non-image files are ignored; a sub-folder without any
    image is skipped with a warning (so labels stay contiguous). Raises FileNotFoundError for a missing DIR
    and ValueError when no image is found.
    """
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image folder not found: {root} (expected one sub-folder per person)")
    paths: List[str] = []
    labels: List[int] = []
    class_names: List[str] = []
    ignored_files = 0
    with os.scandir(root) as it:
        people = sorted(e.name for e in it if not e.name.startswith(".") and e.is_dir())
    for person in people:
        pdir = os.path.join(root, person)
        with os.scandir(pdir) as it:
            entries = sorted(e.name for e in it if e.is_file())
        files = [f for f in entries if is_image_file(f)]
        ignored_files += len(entries) - len(files)
        if not files:
            log.warning("%s: no image files, skipped (not a class)", pdir)
            continue
        label = len(class_names)
        class_names.append(person)
        paths.extend(os.path.join(pdir, f) for f in files)
        labels.extend([label] * len(files))
    if ignored_files:
        log.info("%s: ignored %d non-image file(s) inside person folders", root, ignored_files)
    if not paths:
        raise ValueError(f"{root}: no images found in sub-folders (expected DIR/<person>/<image>.jpg|png|bmp|pgm|"
                         "ppm)")
    return paths, np.asarray(labels, np.int32), class_names
