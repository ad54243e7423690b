"""LFW's development split: people held out of every training set, with View-1-style pairs to choose settings on.

LFW's View 1 has two sets of people: peopleDevTrain.txt (4,038, trained on: `lfw:` and `lfw-all:`) and
peopleDevTest.txt (1,711, whose 1,000 pairsDevTest.txt pairs are the reported test). pairsDevTrain.txt is drawn
from the training people, so it cannot tell how a setting does on unseen faces. This module sets aside
DEV_PEOPLE of the training people instead:

  people  DEV_PEOPLE people drawn with numpy's default_rng(DEV_SEED) from the peopleDevTrain people with 2 to
          MAX_IMAGES images (so that no one person's images, such as George W. Bush's 530, leave training), in
          sorted order before the draw; removed from `lfw:` and `lfw-all:` (and so from every teacher cache).
  pairs   DEV_PAIRS distinct same-person pairs (a dev person, then two of their images, all drawn uniformly) and
          DEV_PAIRS distinct different-person pairs (two dev people, an image of each), drawn with
          default_rng(DEV_SEED + 1), a pair drawn twice drawn again, and interleaved same, different, ... as the
          protocol's 10 folds need: the `lfw-dev:DIR` verification set.

While `refuse_test_pairs()` is in force (python -m facekd_jax.suite --split=dev), reading the reported pairs
(pairsDevTest.txt through `lfw:`, pairs.txt through `lfw-view2:`) raises instead.
"""
from __future__ import annotations

import functools
import os
from typing import List, Set, Tuple

import numpy as np

DEV_SEED = 0
DEV_PEOPLE = 150
DEV_PAIRS = 500
MAX_IMAGES = 30
PEOPLE_TRAIN, PEOPLE_TEST = "peopleDevTrain.txt", "peopleDevTest.txt"

_REFUSED = {"refused": False}


def refuse_test_pairs(refuse: bool = True) -> None:
    """While on, `check_test_pairs_allowed` raises: a development run cannot read the reported pairs."""
    _REFUSED["refused"] = bool(refuse)


def check_test_pairs_allowed(what: str) -> None:
    if _REFUSED["refused"]:
        from facekd_jax.errors import InputError
        raise InputError(f"{what}: the reported test pairs are not read on the development split (--split=dev); "
                         "evaluate on lfw-dev:DIR, and read the test pairs once, at the end, without --split=dev")


def read_people(path: str) -> List[Tuple[str, int]]:
    """LFW people file (peopleDevTrain.txt: a count line, then 'name<TAB>n_images') -> [(name, n_images)].

    ValueError names the file and line: a malformed line, text that is not UTF-8, or fewer or more people than the
    count line says (a truncated file would otherwise lose people silently)."""
    people = []
    try:
        with open(path, encoding="utf-8") as f:
            lines = [line.split() for line in f if line.strip()]
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start} of a block)") from None
    count = None
    for lineno, fields in enumerate(lines, 1):
        if len(fields) == 1 and lineno == 1 and fields[0].isdecimal():
            count = int(fields[0])  # the count header
            continue
        # isdecimal, not isdigit: int() refuses digits such as '²' that isdigit accepts
        if len(fields) != 2 or not fields[1].isdecimal():
            raise ValueError(f"{path}:{lineno}: expected 'name<TAB>count', got {' '.join(fields)!r}")
        people.append((fields[0], int(fields[1])))
    if not people:
        raise ValueError(f"{path}: no people in the file (expected a count line, then 'name<TAB>count' lines)")
    if count is not None and count != len(people):
        raise ValueError(f"{path}:1: the count line says {count} people but the file lists {len(people)} (a "
                         "truncated or edited file?)")
    return people


@functools.lru_cache(maxsize=4)
def dev_people(root: str) -> Tuple[str, ...]:
    """The held-out people of the LFW folder `root` (see the module docstring), sorted."""
    people = sorted((name, n) for name, n in read_people(os.path.join(root, PEOPLE_TRAIN)) if 2 <= n <= MAX_IMAGES)
    if len(people) < DEV_PEOPLE:
        raise ValueError(f"{root}/{PEOPLE_TRAIN}: {len(people)} people with 2 to {MAX_IMAGES} images, the "
                         f"development split takes {DEV_PEOPLE}")
    chosen = np.random.default_rng(DEV_SEED).choice(len(people), size=DEV_PEOPLE, replace=False)
    return tuple(sorted(people[i][0] for i in chosen))


def held_out(root: str) -> Set[str]:
    return set(dev_people(root))


def dev_pairs(root: str) -> List[Tuple[str, int, str, int, bool]]:
    """The development pairs of `root`, (name1, image1, name2, image2, same) with image numbers from 1 as in LFW's
    files, interleaved same, different, same, ..."""
    counts = dict(read_people(os.path.join(root, PEOPLE_TRAIN)))
    names = list(dev_people(root))
    rng = np.random.default_rng(DEV_SEED + 1)
    same: dict = {}
    while len(same) < DEV_PAIRS:
        name = names[rng.integers(len(names))]
        i, j = sorted(int(v) + 1 for v in rng.choice(counts[name], size=2, replace=False))
        same.setdefault((name, i, j), (name, i, name, j, True))
    different: dict = {}
    while len(different) < DEV_PAIRS:
        a, b = sorted(rng.choice(len(names), size=2, replace=False))
        i, j = int(rng.integers(counts[names[a]])) + 1, int(rng.integers(counts[names[b]])) + 1
        different.setdefault((a, i, b, j), (names[a], i, names[b], j, False))
    return [p for pair in zip(same.values(), different.values()) for p in pair]
