"""A trained student's embedding function, exported for phones and servers: LiteRT (TFLite) and ONNX, fp32, fp16
or int8 (static, calibrated on real faces), each gated on its parity with JAX.

  python -m facekd_jax.export --workdir=RUN --format=tflite --precision=int8 --out=student.tflite
  python -m facekd_jax.export --workdir=RUN --checkpoint=best --format=onnx --precision=fp32 --out=student.onnx \
      --parity=lfw:../shared/data/lfw --verify=lfw:../shared/data/lfw

What is exported: the student's eval-mode backbone only (no margin head, no training-only projection), batch 1,
input float32 [1, S, S, 3] RGB pixel values in 0..255 (NHWC; the (x - 127.5) / 127.5 of training is inside the
graph), output float32 [1, E], the raw embedding: L2-normalise it (after adding the mirror image's embedding, as
the JAX evaluation does) and compare by cosine. FILE.json beside the model says all of this, with the crop the
student was trained on and the parity measured.

The route (versions in README, "Export"): jax.experimental.jax2tf (StableHLO inside a TF graph) -> TF's
TFLiteConverter (fp16: float16 weights; int8: full-integer with int8 kernels, float input and output, calibrated
on --calibration images); ONNX from that fp32 LiteRT model with tf2onnx (fp16: onnxconverter-common, float I/O;
int8: onnxruntime's static QDQ quantisation, per channel, calibrated the same way). jax2onnx, the direct route,
declares orbax-checkpoint < 0.11.37 and so cannot be installed beside this package's Orbax.

The parity gate: the mean and the least cosine between the exported model's embeddings and JAX's on at least
MIN_PARITY_IMAGES --parity images (never the calibration images) reach PARITY_GATES[precision]; below either the
command fails and writes nothing final (the model is written to FILE.tmp first and renamed only after it passes;
a failed one is deleted). The least cosine catches the int8 failure a mean hides: a few faces whose embeddings
collapse.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import time
from typing import Any, Callable, Dict, Optional

import numpy as np

FORMATS = ("tflite", "onnx")
PRECISIONS = ("fp32", "fp16", "int8")
# Per precision: the mean and the least cosine to JAX's embeddings an export must reach on the held-back images.
PARITY_GATES = {"fp32": {"mean": 0.9999, "min": 0.999}, "fp16": {"mean": 0.999, "min": 0.995},
                "int8": {"mean": 0.98, "min": 0.95}}
MIN_PARITY_IMAGES = 100  # fewer says little about the least cosine
INPUT_MEAN, INPUT_SCALE = 127.5, 127.5   # the training pipeline's normalisation (facekd_jax.data.pipeline)
INSTALL = "pip install 'facekd_jax[export]'  (or: .venv/bin/pip install -e '.[export]')"


class ExportError(RuntimeError):
    """The export failed (a parity gate, a converter, a missing extra)."""
    exit_status = 1


def _require(module: str):
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ExportError(f"exporting needs {module!r}, from the [export] extra: {INSTALL}") from e


# ------------------------------------------------------------------------------------------------ the student


@dataclasses.dataclass
class Student:
    """A trained student's eval-mode embedding function and what a caller must know to feed it."""
    model: str
    image_size: int
    embedding_size: int
    step: int
    workdir: str
    checkpoint: str
    train_spec: str
    apply: Callable[[Any, Any], Any]        # (variables, float32 images normalised) -> raw embeddings
    variables: Dict[str, Any]


def load_student(workdir: str, checkpoint: str = "latest") -> Student:
    """The student of a finished run (its config.json decides the architecture), with flax's own layers."""
    from facekd_jax import rundir

    saved = rundir.read_config(workdir)
    # Flax's portable layers: the exported graph has no custom calls.
    model = rundir.load_model(workdir, which=checkpoint, layers={})
    config = model.config
    return Student(model=config.model, image_size=int(config.data.image_size),
                   embedding_size=int(config.embedding_size), step=model.step, workdir=workdir,
                   checkpoint=checkpoint, train_spec=_with_root(saved.get("data", {}).get("train", ""), saved),
                   apply=model.apply, variables=model.variables)


def _with_root(spec: str, run_config: Dict[str, Any]) -> str:
    """A spec of the run's config.json with `{root}` replaced by its data.root."""
    root = os.path.expanduser(str(run_config.get("data", {}).get("root", "")))
    return spec.replace("{root}", root) if spec else spec


def pixel_function(student: Student, *, mean: float = INPUT_MEAN, scale: float = INPUT_SCALE) -> Callable:
    """float32 RGB pixels [B, S, S, 3] in 0..255 -> raw embeddings [B, E]: the exported function. `mean`/`scale`
    are the training pipeline's; any other value is a broken export (the parity gate's test uses one)."""
    import jax.numpy as jnp

    def embed(pixels):
        return student.apply(student.variables, (pixels.astype(jnp.float32) - mean) / scale).astype(jnp.float32)
    return embed


def jax_embeddings(student: Student, pixels: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """The reference: JAX's raw embeddings of uint8/float pixels [N, S, S, 3] (no flip), float32 [N, E]."""
    import jax

    fn = jax.jit(pixel_function(student))
    out = [np.asarray(fn(pixels[i:i + batch_size].astype(np.float32))) for i in range(0, len(pixels), batch_size)]
    return np.concatenate(out).astype(np.float32)


# ------------------------------------------------------------------------------------------------ images


def spec_images(spec: str, image_size: int, limit: int, *, seed: int = 0, verification: bool) -> np.ndarray:
    """Up to `limit` distinct real images uint8 [N, S, S, 3], a fixed random subset, with the spec's crop: of a
    verification set (`verification`: bin:, pairs:, lfw: = pairsDevTest, lfw-view2:) or of training data
    (folder:, lfw: = View 1's training people, lfw-all:, recordio:; a spec only verification takes, such as
    bin: or pairs:, is read as verification)."""
    from facekd_jax import data as data_lib
    from facekd_jax.data import images as images_lib
    from facekd_jax.data import sources, specs

    train_spec = None
    if not verification:
        try:
            train_spec = specs.parse(spec, specs.TRAIN)
        except specs.SpecError:  # a spec only verification takes (bin:, pairs:, lfw-view2:)
            train_spec = None
    if train_spec is None:
        images, _ = data_lib.load_verification(spec, image_size=image_size)
        pool = np.unique(images.reshape(len(images), -1), axis=0).reshape((-1,) + images.shape[1:])
        order = np.random.default_rng(seed).permutation(len(pool))[:limit]
        return pool[order]
    source = sources.open_source(train_spec, image_size=image_size)
    if not isinstance(source, sources.IndexedSource) or source.read_bytes is None:
        raise ValueError(f"{spec!r}: give real face images with random access (folder:, lfw:, lfw-all:, recordio:, "
                         "bin:, pairs:)")
    order = np.random.default_rng(seed).permutation(source.num_images)[:limit]
    return np.stack([images_lib.decode_image_np(source.read_bytes(i), image_size=image_size, crop=source.crop,
                                                name=source.name_of(i)) for i in order])


# ------------------------------------------------------------------------------------------------ converters


def _tf_function(student: Student, mean: float, scale: float):
    import tensorflow as tf
    from jax.experimental import jax2tf

    s = student.image_size
    return tf.function(jax2tf.convert(pixel_function(student, mean=mean, scale=scale), with_gradient=False),
                       autograph=False, input_signature=[tf.TensorSpec([1, s, s, 3], tf.float32, name="pixels")])


def to_tflite(student: Student, precision: str, calibration: Optional[np.ndarray], *, mean: float = INPUT_MEAN,
              scale: float = INPUT_SCALE) -> bytes:
    """The LiteRT flatbuffer of the student at `precision` (int8: full-integer kernels, float32 input/output)."""
    import tensorflow as tf

    fn = _tf_function(student, mean, scale)
    converter = tf.lite.TFLiteConverter.from_concrete_functions([fn.get_concrete_function()], fn)
    if precision in ("fp16", "int8"):
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if precision == "fp16":
        converter.target_spec.supported_types = [tf.float16]
    if precision == "int8":
        if calibration is None or not len(calibration):
            raise ExportError("int8 needs calibration images (--calibration=SPEC)")
        converter.representative_dataset = lambda: ([calibration[i:i + 1].astype(np.float32)]
                                                    for i in range(len(calibration)))
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    return converter.convert()


def to_onnx(student: Student, precision: str, calibration: Optional[np.ndarray], *, mean: float = INPUT_MEAN,
            scale: float = INPUT_SCALE, workdir: str) -> bytes:
    """The ONNX model (opset 17) of the student at `precision`, through the fp32 LiteRT model."""
    onnx = _require("onnx")
    tf2onnx = _require("tf2onnx")
    fp32_tflite = os.path.join(workdir, "fp32.tflite")
    with open(fp32_tflite, "wb") as f:
        f.write(to_tflite(student, "fp32", None, mean=mean, scale=scale))
    model, _ = tf2onnx.convert.from_tflite(fp32_tflite, opset=17)
    if precision == "fp32":
        return model.SerializeToString()
    if precision == "fp16":
        from onnxconverter_common import float16
        # PReLU arrives as compare, Cast(bool -> float) and Mul: the Casts (and any Where) stay float32, or their
        # outputs would be float16 while their `to` attribute still says float.
        return float16.convert_float_to_float16(
            model, keep_io_types=True, op_block_list=list(float16.DEFAULT_OP_BLOCK_LIST) + ["Where", "Cast"]
        ).SerializeToString()
    if calibration is None or not len(calibration):
        raise ExportError("int8 needs calibration images (--calibration=SPEC)")
    from onnxruntime import quantization as q
    from onnxruntime.quantization.shape_inference import quant_pre_process

    fp32_path, prep_path, int8_path = (os.path.join(workdir, n) for n in ("fp32.onnx", "prep.onnx", "int8.onnx"))
    onnx.save(model, fp32_path)
    quant_pre_process(fp32_path, prep_path)
    input_name = model.graph.input[0].name

    class Reader(q.CalibrationDataReader):
        def __init__(self):
            self._it = iter({input_name: calibration[i:i + 1].astype(np.float32)} for i in range(len(calibration)))

        def get_next(self):
            return next(self._it, None)

    q.quantize_static(prep_path, int8_path, Reader(), quant_format=q.QuantFormat.QDQ, per_channel=True,
                      activation_type=q.QuantType.QInt8, weight_type=q.QuantType.QInt8,
                      calibrate_method=q.CalibrationMethod.MinMax)
    with open(int8_path, "rb") as f:
        return f.read()


# ------------------------------------------------------------------------------------------------ runtimes


class Runtime:
    """An exported model in its own runtime, batch 1: __call__(pixels float32 [N, S, S, 3]) -> float32 [N, E]."""

    def __init__(self, path: str, fmt: str, *, threads: int = 2):
        self.path, self.format = path, fmt
        if self.format == "tflite":
            litert = _require("ai_edge_litert.interpreter")
            self._interp = litert.Interpreter(model_path=path, num_threads=threads)
            self._interp.allocate_tensors()
            self._in = self._interp.get_input_details()[0]["index"]
            self._out = self._interp.get_output_details()[0]["index"]
        else:
            ort = _require("onnxruntime")
            options = ort.SessionOptions()
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
            options.log_severity_level = 3
            self._session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
            self._in = self._session.get_inputs()[0].name

    def one(self, pixels: np.ndarray) -> np.ndarray:
        """pixels float32 [1, S, S, 3] -> [1, E]."""
        if self.format == "tflite":
            self._interp.set_tensor(self._in, pixels)
            self._interp.invoke()
            return self._interp.get_tensor(self._out)
        return self._session.run(None, {self._in: pixels})[0]

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        return np.concatenate([self.one(pixels[i:i + 1].astype(np.float32)) for i in range(len(pixels))])


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.astype(np.float64) / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b.astype(np.float64) / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return np.sum(a * b, axis=1)


def verify_runtime(embed: Callable[[np.ndarray], np.ndarray], spec: str, image_size: int) -> Dict[str, float]:
    """A verification set through `embed` (raw embeddings of float pixels), flip-sum and L2 as in JAX's
    evaluation, then facekd_jax.evaluate.verify: {"accuracy", "std", ...}."""
    from facekd_jax import data as data_lib
    from facekd_jax import evaluate

    images, issame = data_lib.load_verification(spec, image_size=image_size)
    pixels = images.astype(np.float32)
    e = embed(pixels) + embed(pixels[:, :, ::-1].copy())
    e = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
    result = evaluate.verify(e[0::2], e[1::2], issame)
    return {k: float(v) for k, v in result.items() if isinstance(v, (int, float, np.floating, np.integer))}


# ------------------------------------------------------------------------------------------------ the command


def _contract(student, mean: float, scale: float) -> Dict[str, Any]:
    """The exported model's input and output, as its FILE.json states them."""
    return {"input": {"name": "pixels", "shape": [1, student.image_size, student.image_size, 3], "layout": "NHWC",
                      "dtype": "float32", "colour": "RGB", "range": [0, 255],
                      "normalisation": f"inside the model: (x - {mean}) / {scale}",
                      "crop": f"as the training data {student.train_spec!r}: crop box, then resize to "
                              f"{student.image_size}x{student.image_size}", "batch": 1},
            "output": {"shape": [1, student.embedding_size], "dtype": "float32",
                       "meaning": "raw embedding: add the mirror image's embedding, L2-normalise, compare by cosine"}}


def export(workdir: str, *, fmt: str, precision: str, out: str, checkpoint: str = "latest",
           calibration: str = "", parity: str = "", verify: str = "", calibration_images: int = 300,
           parity_images: int = 200, mean: float = INPUT_MEAN, scale: float = INPUT_SCALE,
           log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Exports the run's student to `out` (and `out`.json) if it passes the parity gate; returns the record.

    calibration / parity: image specs (default: the run's training data / its first verification set). `mean`
    and `scale` are the normalisation built into the graph: leave them (another value is a broken export).
    Raises ExportError (nothing final written) when the parity gate fails.
    """
    if fmt not in FORMATS or precision not in PRECISIONS:
        raise ValueError(f"--format must be one of {FORMATS} and --precision one of {PRECISIONS}")
    from facekd_jax import rundir

    student = load_student(workdir, checkpoint)
    run_config = rundir.read_config(workdir)
    parity = parity or _with_root((run_config.get("data", {}).get("val_targets") or [""])[0], run_config)
    if not parity:
        raise ValueError("--parity=SPEC: the run names no verification set to check parity on")
    calibration = calibration or student.train_spec
    t0 = time.time()
    calib = (spec_images(calibration, student.image_size, calibration_images, seed=1, verification=False)
             if precision == "int8" else None)
    held_back = spec_images(parity, student.image_size, parity_images, seed=2, verification=True).astype(np.float32)
    if calib is not None:  # held back: no parity image is a calibration image
        seen = {c.tobytes() for c in calib.astype(np.float32)}
        held_back = np.stack([x for x in held_back if x.tobytes() not in seen])
    if len(held_back) < MIN_PARITY_IMAGES:
        raise ExportError(f"--parity={parity}: {len(held_back)} held-back images (--parity_images={parity_images}); "
                          f"the parity gate needs at least {MIN_PARITY_IMAGES}: give a larger set or more images")
    os.makedirs(os.path.dirname(os.path.abspath(out)) or ".", exist_ok=True)
    tmp = out + ".tmp"
    with tempfile.TemporaryDirectory() as scratch:
        blob = (to_tflite(student, precision, calib, mean=mean, scale=scale) if fmt == "tflite" else
                to_onnx(student, precision, calib, mean=mean, scale=scale, workdir=scratch))
    from facekd_jax import errors

    try:  # a full disk: no half-written FILE.tmp left behind
        with errors.writing(tmp), open(tmp, "wb") as f:
            f.write(blob)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    try:
        runtime = Runtime(tmp, fmt)
        cos = cosines(runtime(held_back), jax_embeddings(student, held_back))
        gate = PARITY_GATES[precision]
        parity_record = {"images": int(len(held_back)), "spec": parity, "mean_cosine": float(cos.mean()),
                         "min_cosine": float(cos.min()), "gate": gate}
        log(f"parity {fmt} {precision} vs JAX on {len(held_back)} held-back images of {parity}: mean cosine "
            f"{cos.mean():.6f}, min {cos.min():.6f} (gate: mean >= {gate['mean']}, min >= {gate['min']})")
        if not (cos.mean() >= gate["mean"] and cos.min() >= gate["min"]):
            raise ExportError(f"{fmt} {precision} export of {workdir} failed its parity gate: cosine to JAX mean "
                              f"{cos.mean():.6f} (gate {gate['mean']}), min {cos.min():.6f} (gate {gate['min']}) on "
                              f"{len(held_back)} images of {parity}; nothing was written to {out}")
        record = {
            "format": fmt, "precision": precision, "file": os.path.basename(out), "bytes": len(blob),
            "model": student.model, "workdir": os.path.abspath(workdir), "checkpoint": checkpoint,
            "step": student.step,
            **_contract(student, mean, scale),
            "parity": parity_record, "calibration": ({"spec": calibration, "images": int(len(calib))}
                                                     if calib is not None else None),
            "seconds": round(time.time() - t0, 1),
        }
        if verify:
            record["verification"] = {"spec": verify,
                                      "exported": verify_runtime(runtime, verify, student.image_size),
                                      "jax": verify_runtime(lambda p: jax_embeddings(student, p), verify,
                                                            student.image_size)}
            log(f"verification on {verify}: exported {record['verification']['exported']['accuracy']:.4f}, "
                f"JAX {record['verification']['jax']['accuracy']:.4f}")
        with errors.writing(out + ".json.tmp"), open(out + ".json.tmp", "w") as f:
            json.dump(record, f, indent=2)
    except BaseException:  # a failed gate or a full disk: the files of an earlier export stay as they were
        for path in (tmp, out + ".json.tmp"):
            if os.path.exists(path):
                os.remove(path)
        raise
    os.replace(tmp, out)
    os.replace(out + ".json.tmp", out + ".json")
    log(f"wrote {out} ({len(blob) / 2**20:.2f} MiB) and {out}.json")
    return record


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="a trained run (facekd_jax.main or the suite)")
    parser.add_argument("--checkpoint", default="latest", choices=["latest", "best"])
    parser.add_argument("--format", required=True, choices=FORMATS)
    parser.add_argument("--precision", default="fp32", choices=PRECISIONS)
    parser.add_argument("--out", required=True, help="the model file; FILE.json gets the input contract")
    parser.add_argument("--calibration", default="", help="int8: image spec to calibrate on (default: the run's "
                        "training data)")
    parser.add_argument("--calibration-images", type=int, default=300)
    parser.add_argument("--parity", default="", help="image spec for the parity gate (default: the run's first "
                        "verification set)")
    parser.add_argument("--parity-images", type=int, default=200)
    parser.add_argument("--verify", default="", help="also report verification accuracy on this set, exported "
                        "model and JAX side by side (flip-sum, facekd_jax.evaluate.verify)")
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from facekd_jax import errors

    with errors.command_line():  # one line, the cause last (exit 1 for a failed gate, 2 for bad input)
        export(args.workdir, fmt=args.format, precision=args.precision, out=args.out, checkpoint=args.checkpoint,
               calibration=args.calibration, parity=args.parity, verify=args.verify,
               calibration_images=args.calibration_images, parity_images=args.parity_images)


if __name__ == "__main__":
    main()
