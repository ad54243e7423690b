"""Data specs: the strings a config or command line names data with, parsed once into a typed value.

  spec = specs.parse("lfw:{root}@62,55,188,181", role="train", root="../shared/data/lfw")
  spec.kind, spec.path, spec.crop, spec.options   # 'lfw', '../shared/data/lfw', (62, 55, 188, 181), ()

`KINDS` is the one registry of data kinds: for each, the role(s) it can play (training source, verification
set), its syntax, the reader behind it (a "module:function" name, imported on first use so that parsing a spec
needs neither TensorFlow nor the reader), the crop it takes when none is given, and what a URL (gs://...) in its
path means: `COPY` (pulled once into a local copy, facekd_jax.paths), `IN_PLACE` (read by TensorFlow's own file
systems) or `LOCAL` (refused: the path must be on this machine). Adding a format is one entry here and its reader.

A spec is `KIND:REST`; REST is the kind's path (a folder, file, glob or dataset name), then its colon-separated
options (a `pairs:` spec's second path, a synthetic spec's counts, a TFDS split), then an optional crop box
`@left,top,right,bottom` cut before resizing. `{root}` in a spec stands for config.data.root.
"""
from __future__ import annotations

import dataclasses
import importlib
import os
from typing import Any, Callable, Dict, Optional, Tuple

from facekd_jax.errors import InputError, NonLocalPathError

Crop = Optional[Tuple[int, int, int, int]]

TRAIN, VERIFICATION = "train", "verification"
COPY, IN_PLACE, LOCAL = "copy", "in_place", "local"

# LFW's 250x250 deep-funnelled images: this box, resized, puts eyes and mouth close to the ArcFace template.
LFW_CROP = (62, 55, 188, 181)
LFW_IMAGES = "lfw-deepfunneled"


@dataclasses.dataclass(frozen=True)
class Kind:
    """One data kind. readers: {role: "module:function"}; the function takes (DataSpec, image_size=...) and
    returns what the role needs (a training source, or verification images and issame flags). syntax:
    {role: "kind:..."}. options: how many ':'-fields follow the path (min, max). url: COPY | IN_PLACE | LOCAL, or
    None for a kind without a path. must_exist: the path is a local file system entry checked before a run.
    protocol: a verification set with a protocol of its own (IJB-B/C templates), not pairs of images: its reader is
    (spec, embed_fn, *, image_size, batch_size, work_dir, log) -> results, run by --mode=eval only."""
    name: str
    readers: Dict[str, str]
    syntax: Dict[str, str]
    help: str
    default_crop: Crop = None
    url: Optional[str] = COPY
    options: Tuple[int, int] = (0, 0)
    must_exist: bool = True
    takes_crop: bool = True
    protocol: bool = False

    def reader(self, role: str) -> Callable[..., Any]:
        module, _, function = self.readers[role].partition(":")
        return getattr(importlib.import_module(module), function)


_SRC, _VER = "facekd_jax.data.sources", "facekd_jax.data.verification"
# The verification sets insightface ships as .bin beside a training set, in arcface_torch's val_targets order.
INSIGHTFACE_SETS = ("lfw", "cfp_fp", "agedb_30", "calfw", "cplfw", "cfp_ff", "vgg2_fp")

KINDS: Dict[str, Kind] = {k.name: k for k in [
    Kind("synthetic", {TRAIN: f"{_SRC}:synthetic_source", VERIFICATION: f"{_VER}:synthetic_pairs"},
         {TRAIN: "synthetic[:NUM_CLASSES:IMAGES_PER_CLASS[:SEED]]", VERIFICATION: "synthetic[:N_PAIRS[:SEED]]"},
         "procedurally generated face identities (demos and tests; not real data)",
         url=None, options=(0, 3), must_exist=False, takes_crop=False),
    Kind("folder", {TRAIN: f"{_SRC}:folder_source"}, {TRAIN: "folder:DIR[@l,t,r,b]"},
         "one sub-folder per person; JPEG/PNG/BMP/PGM; greyscale to RGB"),
    Kind("lfw", {TRAIN: f"{_SRC}:lfw_source", VERIFICATION: f"{_VER}:lfw_pairs"},
         {TRAIN: "lfw:DIR[@l,t,r,b]", VERIFICATION: "lfw:DIR[@l,t,r,b]"},
         "LFW: training = View 1's training people with >= 2 images (peopleDevTrain.txt); verification = "
         "View 1's 1,000 test pairs (pairsDevTest.txt), people disjoint from training", default_crop=LFW_CROP),
    Kind("lfw-all", {TRAIN: f"{_SRC}:lfw_source"}, {TRAIN: "lfw-all:DIR[@l,t,r,b]"},
         "every image of LFW's View 1 training people, singletons too (label-free KD)", default_crop=LFW_CROP),
    Kind("lfw-view2", {VERIFICATION: f"{_VER}:lfw_pairs"}, {VERIFICATION: "lfw-view2:DIR[@l,t,r,b]"},
         "LFW View 2: the 6,000 pairs of pairs.txt in 10 folds (its people include View 1's training people)",
         default_crop=LFW_CROP),
    Kind("lfw-dev", {VERIFICATION: f"{_VER}:lfw_dev_pairs"}, {VERIFICATION: "lfw-dev:DIR[@l,t,r,b]"},
         "LFW's development split: 500 same + 500 different pairs of 150 training people held out of every training "
         "set (data.lfw_dev)", default_crop=LFW_CROP),
    Kind("recordio", {TRAIN: f"{_SRC}:recordio_source"}, {TRAIN: "recordio:DIR[@l,t,r,b]"},
         "insightface train.rec / train.idx / property (read without MXNet)"),
    Kind("tfrecord", {TRAIN: f"{_SRC}:tfrecord_source"}, {TRAIN: "tfrecord:GLOB[@l,t,r,b]"},
         "tf.train.Example files: image (encoded bytes) and label (int64)", url=IN_PLACE, must_exist=False),
    Kind("tfds", {TRAIN: f"{_SRC}:tfds_source"}, {TRAIN: "tfds:NAME[:SPLIT] | tfds:DIR[:SPLIT]"},
         "a prepared TFDS dataset (catalog name under TFDS_DATA_DIR, or a directory)", url=LOCAL, options=(0, 1),
         must_exist=False, takes_crop=False),
    Kind("bin", {VERIFICATION: f"{_VER}:bin_pairs"}, {VERIFICATION: "bin:FILE[@l,t,r,b]"},
         "insightface .bin: pickle of (2N encoded images, N issame flags)"),
    Kind("pairs", {VERIFICATION: f"{_VER}:txt_pairs"}, {VERIFICATION: "pairs:PAIRS_TXT:IMAGES_DIR[@l,t,r,b]"},
         "LFW-layout pairs file and image folder (image i of name: IMAGES_DIR/name/name_%04d.jpg)", url=LOCAL,
         options=(1, 1)),
    Kind("insightface", {VERIFICATION: f"{_VER}:bin_pairs"}, {VERIFICATION: "insightface:DIR"},
         "the .bin sets of an insightface training folder (faces_emore, ms1m-retinaface-t1, ...): each of "
         f"{', '.join(INSIGHTFACE_SETS)} found in DIR, as bin:DIR/NAME.bin", url=LOCAL, takes_crop=False),
    Kind("ijbc", {VERIFICATION: "facekd_jax.data.ijb:evaluate_spec"}, {VERIFICATION: "ijbc:DIR"},
         "IJB-C 1:1 template verification, TAR at FAR 1e-6..1e-1 (insightface's IJB_release/IJBC: meta/, "
         "loose_crop/); --mode=eval only", url=LOCAL, takes_crop=False, protocol=True),
    Kind("ijbb", {VERIFICATION: "facekd_jax.data.ijb:evaluate_spec"}, {VERIFICATION: "ijbb:DIR"},
         "IJB-B 1:1 template verification, as ijbc: (IJB_release/IJBB)", url=LOCAL, takes_crop=False,
         protocol=True),
]}


class SpecError(InputError):
    """A data spec that cannot be parsed or does not fit its role; the message names the spec and the syntax."""


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """A parsed data spec. path: the kind's folder, file, glob or name ('' for synthetic without options);
    options: the further ':'-fields (strings); crop: the box cut before resizing, or None (`default_crop` applies:
    an aligned copy's, or the kind's)."""
    kind: str
    path: str = ""
    options: Tuple[str, ...] = ()
    crop: Crop = None

    def __str__(self) -> str:
        fields = ([self.path] if KINDS[self.kind].url is not None else []) + list(self.options)
        text = ":".join([self.kind] + fields)
        return text + (f"@{','.join(str(v) for v in self.crop)}" if self.crop else "")

    @property
    def info(self) -> Kind:
        return KINDS[self.kind]

    def replace(self, **changes) -> "DataSpec":
        return dataclasses.replace(self, **changes)

    def is_url(self) -> bool:
        from facekd_jax import paths
        return paths.is_url(self.path) or any(paths.is_url(o) for o in self.options)


def default_crop(spec: DataSpec, template: str = "arcface") -> Crop:
    """The crop a reader cuts where the spec names none: in an aligned copy (python -m facekd_jax.data.convert
    align; its alignment.json) the box of `template`'s crop within its chips, else the kind's default (LFW's
    deep-funnelled box) or None."""
    if spec.crop:
        return spec.crop
    if spec.path and not spec.is_url():
        from facekd_jax.data import align
        box = align.aligned_crop(spec.path, template)
        if box is not None:
            return box
    return spec.info.default_crop


def kinds_table() -> str:
    """The registry as the markdown table docs/data.md shows (tests/test_docs.py keeps the two equal)."""
    lines = ["| spec | training | verification | what |", "|---|:-:|:-:|---|"]
    for kind in KINDS.values():
        forms = " or ".join(dict.fromkeys(f"`{s}`" for s in kind.syntax.values())).replace("|", "\\|")
        url = {COPY: " A gs:// path is copied once to local disk.", IN_PLACE: " A gs:// path is read in place.",
               LOCAL: " Local paths only.", None: ""}[kind.url]
        lines.append(f"| {forms} | {'yes' if TRAIN in kind.readers else ''} | "
                     f"{'yes' if VERIFICATION in kind.readers else ''} | {kind.help}.{url} |")
    return "\n".join(lines) + "\n"


def syntax(role: str) -> str:
    """Every spec a role accepts, for messages: 'synthetic[...] | folder:DIR[@l,t,r,b] | ...'."""
    return " | ".join(k.syntax[role] for k in KINDS.values() if role in k.syntax)


def parse_crop(text: str, spec: str) -> Tuple[int, int, int, int]:
    """'l,t,r,b' -> (l, t, r, b); SpecError naming the spec unless right > left and bottom > top."""
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 4 or values[2] <= values[0] or values[3] <= values[1]:
        raise SpecError(f"crop box {text!r} in spec {spec!r} must be '@left,top,right,bottom' with right > left and "
                        "bottom > top")
    return values  # type: ignore[return-value]


def _split_url(rest: str) -> Tuple[str, str]:
    """'gs://b/x:opt' -> ('gs://b/x', ':opt'): a URL's own '://' is not a field separator."""
    scheme, sep, tail = rest.partition("://")
    if sep and scheme.isalnum():
        path, colon, more = tail.partition(":")
        return f"{scheme}://{path}", colon + more
    path, colon, more = rest.partition(":")
    return path, colon + more


def parse(text: "str | DataSpec", role: str, *, root: Optional[str] = None, field: str = "") -> DataSpec:
    """A spec string (or an already parsed DataSpec, returned as it is) for `role` (TRAIN or VERIFICATION), with
    `{root}` replaced by `root`. SpecError names the spec, the field it came from and the syntax of the role."""
    if isinstance(text, DataSpec):
        return text
    where = f"{field}={text!r}" if field else repr(text)
    if not isinstance(text, str) or not text:
        raise SpecError(f"{where}: empty data spec; expected one of: {syntax(role)}")
    if "{root}" in text:
        if root is None:
            raise SpecError(f"{where}: '{{root}}' needs config.data.root")
        text = text.replace("{root}", os.path.expanduser(root))
    kind_name, sep, rest = text.partition(":")
    kind = KINDS.get(kind_name)
    if kind is None and role == VERIFICATION and text.endswith(".bin"):  # a bare .bin path
        kind_name, sep, rest, kind = "bin", ":", text, KINDS["bin"]
    if kind is None or role not in kind.readers or (sep and not rest) or (not sep and kind.url is not None):
        raise SpecError(f"{where}: unknown {role} spec; expected one of: {syntax(role)}")
    if kind.url == LOCAL and "://" in rest:  # a URL's colons cannot be told from the kind's separators
        _refuse_url(kind.name, text, field or "spec")
    crop = None
    if kind.takes_crop and "@" in rest:
        rest, _, box = rest.rpartition("@")
        crop = parse_crop(box, text)
    if kind.url is None:  # no path: every field is an option
        path, options = "", tuple(rest.split(":")) if rest else ()
    else:
        path, tail = _split_url(rest)
        options = tuple(tail[1:].split(":")) if tail else ()
        if kind.name == "tfds" and options:  # a split may hold colons itself ('train[:90%]')
            options = (":".join(options),)
    low, high = kind.options
    if not low <= len(options) <= high or (kind.url is not None and not path):
        raise SpecError(f"{where}: expected {kind.syntax[role]}")
    return DataSpec(kind_name, path, options, crop)


def _refuse_url(kind: str, text: str, field: str) -> None:
    raise NonLocalPathError(
        f"{field}={text}: a {kind}: spec must name local paths; copy the files to this machine's disk (gsutil -m cp "
        "-r), or mount the bucket (gcsfuse gs://BUCKET /mnt/BUCKET, or Drive on Colab) and give the mounted path"
        + ("; for TFDS give tfds:NAME with TFDS_DATA_DIR=gs://..." if kind == "tfds" else ""))


def check_urls(spec: DataSpec, field: str) -> None:
    """NonLocalPathError naming the field where the spec holds a URL its kind cannot take (kind.url == LOCAL)."""
    if spec.info.url == LOCAL and spec.is_url():
        _refuse_url(spec.kind, str(spec), field)


def check_exists(spec: DataSpec, field: str) -> None:
    """FileNotFoundError naming the field when a local path the kind reads directly does not exist."""
    if not spec.info.must_exist or spec.is_url():
        return
    for path in (spec.path,) + (spec.options if spec.kind == "pairs" else ()):
        if not os.path.exists(path):
            raise FileNotFoundError(f"{field}={spec}: {path} does not exist")


def expand(spec: DataSpec) -> Tuple[DataSpec, ...]:
    """The sets a verification spec stands for: `insightface:DIR` -> bin:DIR/NAME.bin for each of INSIGHTFACE_SETS
    present (FileNotFoundError naming DIR and the names where none is); any other spec -> itself."""
    if spec.kind != "insightface":
        return (spec,)
    found = tuple(DataSpec("bin", os.path.join(spec.path, f"{n}.bin")) for n in INSIGHTFACE_SETS
                  if os.path.isfile(os.path.join(spec.path, f"{n}.bin")))
    if not found:
        raise FileNotFoundError(f"{spec}: none of {', '.join(n + '.bin' for n in INSIGHTFACE_SETS)} in {spec.path}")
    return found


def local(spec: DataSpec) -> DataSpec:
    """The spec with a URL path of a COPY kind replaced by its local copy (pulled once per process); any other
    spec as it is."""
    if spec.info.url != COPY or not spec.is_url():
        return spec
    from facekd_jax import paths
    return spec.replace(path=paths.local_copy(spec.path))


def canonical_path(spec: DataSpec) -> str:
    """The spec without its crop, a local path made absolute (a URL as given): what identifies the data."""
    from facekd_jax import paths
    return str(spec.replace(crop=None, path=paths.canonical(spec.path) if spec.path else ""))


def name(spec: DataSpec) -> str:
    """Short name for logs and results: bin -> the file's stem ("agedb_30"), pairs -> the pairs file's folder when
    the file is called pairs.txt, else its stem; every other kind -> the kind ("lfw", "lfw-view2", ...)."""
    if spec.kind == "bin":
        return os.path.splitext(os.path.basename(spec.path))[0]
    if spec.kind == "pairs":
        stem = os.path.splitext(os.path.basename(spec.path))[0]
        if stem.lower() == "pairs":
            return os.path.basename(os.path.dirname(os.path.abspath(spec.path))) or stem
        return stem
    return spec.kind
