"""Will it fit, and how fast? A config's train step and its embed-and-verify program compiled for a TPU topology
on any machine, with the TPU compiler's own memory and cost figures.

  python -m facekd_jax.plan --config=configs/feature_kd.py --topology=v5e-8 --topology=v4-8 --classes=casia
  python -m facekd_jax.plan --config=configs/lfw_dlib.py:label_free_kd --topology=colab --max-batch \
      --json=plan.json --config.dtype=bfloat16

The step is built exactly as training builds it (facekd_jax.step.setup: the mesh of data x model axes, the
shardings, the donated state, the dtype, a live teacher or its cache, the KD state), lowered with abstract inputs
at the real shapes (the global batch, the image size, the class count of the data or --classes) and compiled for
compile-only TPU devices (jax.experimental.topologies with libtpu: the [tpu] extra). Printed per chip: parameter,
optimiser-state and KD-state bytes; argument, output, temporary and generated-code bytes (memory_analysis); the
chip's HBM and whether it fits with --headroom; FLOPs per step (cost_analysis) beside the model's own count; a
roofline lower bound on the step time, max(FLOPs / peak bf16 FLOP/s, bytes / HBM bandwidth), hence an upper bound on
images/s and a lower bound on the time per epoch of CASIA-WebFace, MS1MV2 and WebFace42M; the collectives of the
compiled program (count and bytes), with a check that a class-sharded margin head is never gathered; the images/s
each host must feed and the cores that takes at the input pipeline's measured decode rate.

These are compiler figures and roofline bounds, not measurements: a real step is slower than its bound.
benchmarks/accelerator.sh measures the step where a GPU or TPU is at hand.

Exit status: 0 every topology fits, 3 one does not (the shortfall in bytes and the largest batch that fits are
printed), 2 a usage error (an unknown topology, no libtpu: one line).
"""
from __future__ import annotations

import functools
import json
import math
import re
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

from facekd_jax.tpu import CHIPS, TOPOLOGIES, Chip, PlanError, Topology, find_topology, topology_devices

EXIT_DOES_NOT_FIT = 3



# Identities and images of the training sets people train face recognition on.
CLASSES = {"casia": 10_572, "ms1mv2": 85_742, "webface42m": 2_059_906}
DATASETS = {"CASIA-WebFace": 494_414, "MS1MV2": 5_822_653, "WebFace42M": 42_474_557}
# Images/s one host core decodes, crops, flips and normalises for insightface RecordIO of 112x112 JPEGs: the lower
# end of `python benchmarks/input_pipeline.py --spec recordio:DIR` on a 2-core Zen 4 VM (README, "Data").
DECODE_PER_CORE = 3843

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
                "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")


class DoesNotFit(Exception):
    """The TPU compiler refused the program for the chip's HBM (`required` and `available` bytes, as it says)."""

    def __init__(self, message: str, required: int, available: int):
        super().__init__(message)
        self.required, self.available = required, available


# The two ways libtpu words a program too large for HBM: the sizes it needs and has, (required, available).
_OOM = (re.compile(r"required for [\w ]+\(([\d.]+)([KMGT]?)\) exceeds available HBM \(([\d.]+)([KMGT]?)\)"),
        re.compile(r"Ran out of memory in memory space hbm\. Used ([\d.]+)([KMGT]?) of ([\d.]+)([KMGT]?) hbm"))
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def out_of_memory(message: str) -> Optional[Tuple[int, int]]:
    """(required, available) bytes where a compile error says the program does not fit the chip's HBM, else None."""
    for pattern in _OOM:
        m = pattern.search(message)
        if m is not None:
            return (int(float(m.group(1)) * _UNITS[m.group(2)]), int(float(m.group(3)) * _UNITS[m.group(4)]))
    return None


def _compile(lowered):
    """lowered.compile() without the persistent compilation cache (it holds this host's CPU programs, and a
    compile-only TPU executable can be neither read from it nor run); DoesNotFit where the compiler says the
    program exceeds the chip's HBM."""
    import jax

    previous = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    try:
        return lowered.compile()
    except Exception as e:  # noqa: BLE001 (XlaRuntimeError: RESOURCE_EXHAUSTED)
        sizes = out_of_memory(str(e))
        if sizes is None:
            raise
        raise DoesNotFit(str(e).splitlines()[0][:300], *sizes) from None
    finally:
        jax.config.update("jax_enable_compilation_cache", previous)


def _shard_bytes(tree) -> int:
    """Bytes one device holds of a tree of ShapeDtypeStructs with shardings (its shard of each leaf)."""
    import jax
    import numpy as np

    total = 0
    for leaf in jax.tree.leaves(tree):
        total += math.prod(leaf.sharding.shard_shape(leaf.shape)) * np.dtype(leaf.dtype).itemsize
    return int(total)


def _shape_bytes(text: str) -> int:
    """Bytes of an HLO result type such as 'f32[64,512]{1,0}' or a tuple of them."""
    total = 0
    for dtype, dims in re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]", text):
        if dtype in _DTYPE_BYTES:
            total += _DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
    return total


def collectives(hlo: str) -> Dict[str, Dict[str, int]]:
    """{op: {"count", "bytes"}} of the collectives in compiled HLO text (async -start ops counted once, their
    result's size as the bytes moved per device)."""
    out = {op: {"count": 0, "bytes": 0} for op in COLLECTIVES}
    for line in hlo.splitlines():
        m = re.match(r"\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.+?)\s+([a-z\-]+)\(", line)
        if not m:
            continue
        op = m.group(2)
        base = op[:-len("-start")] if op.endswith("-start") else op
        if base in out and not op.endswith("-done"):
            out[base]["count"] += 1
            out[base]["bytes"] += _shape_bytes(m.group(1))
    return out


def gathered_head(hlo: str, embedding_size: int, columns: int) -> List[str]:
    """The all-gathers of the compiled program whose result holds a whole [E, C] class-centre matrix."""
    found = []
    for line in hlo.splitlines():
        m = re.match(r"\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.+?)\s+(all-gather(?:-start)?)\(", line)
        if not m:
            continue
        for dims in re.findall(r"\[([\d,]*)\]", m.group(1)):
            shape = tuple(int(d) for d in dims.split(",") if d)
            if len(shape) == 2 and set(shape) == {embedding_size, columns}:
                found.append(line.strip()[:160])
    return found


def _memory(compiled) -> Dict[str, int]:
    m = compiled.memory_analysis()
    fields = {"argument": "argument_size_in_bytes", "output": "output_size_in_bytes", "alias": "alias_size_in_bytes",
              "temp": "temp_size_in_bytes", "generated_code": "generated_code_size_in_bytes"}
    out = {k: int(getattr(m, v, 0) or 0) for k, v in fields.items()}
    out["total"] = out["argument"] + out["output"] - out["alias"] + out["temp"] + out["generated_code"]
    return out


def _cost(compiled) -> Dict[str, float]:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return {"flops": float(cost.get("flops", 0.0)), "bytes_accessed": float(cost.get("bytes accessed", 0.0)),
            "optimal_seconds": float(cost.get("optimal_seconds", 0.0))}


def roofline(flops: float, bytes_accessed: float, chip: Chip) -> float:
    """The step time no chip can beat: max(FLOPs / peak bf16 FLOP/s, bytes / HBM bandwidth), in seconds."""
    return max(flops / chip.peak_bf16_flops, bytes_accessed / chip.hbm_bandwidth)


# ----------------------------------------------------------------------------------------------- the programs


def _config_at(config, batch: int):
    import ml_collections

    c = ml_collections.ConfigDict(config.to_dict())
    c.batch_size = int(batch)
    return c


def lower_train_step(config, topology: Topology, num_classes: int, batch: int):
    """(setup, lowered train step) of `config` at global batch `batch` on the slice's compile-only devices."""
    import jax
    import numpy as np

    from facekd_jax import sharding
    from facekd_jax import step as step_lib
    from facekd_jax.teachers import load as teacher_load

    devices = topology_devices(topology)
    config = _config_at(config, batch)
    mesh = sharding.make_mesh(config.mesh.model_parallelism, devices=devices)
    if batch % mesh.shape["data"]:
        raise PlanError(f"batch_size={batch} does not divide over the {mesh.shape['data']} data-parallel devices of "
                        f"{topology.name}")
    run = step_lib.setup(config, num_classes=num_classes, mesh=mesh, num_train_steps=1000)
    rows = sharding.batch_sharding(mesh)
    s = int(config.data.image_size)
    batch_spec = {"image": jax.ShapeDtypeStruct((batch, s, s, 3), np.float32, sharding=rows),
                  "label": jax.ShapeDtypeStruct((batch,), np.int32, sharding=rows)}
    if config.teacher.cache and step_lib.needs_teacher_embeddings(config.kd):
        batch_spec["teacher_embedding"] = jax.ShapeDtypeStruct((batch, int(config.teacher.embedding_size)),
                                                               np.float32, sharding=rows)
    return run, run.train_step.lower(run.abstract, batch_spec, teacher_load.abstract_teacher(run))


def compile_embed(config, topology: Topology):
    """(mesh, batch, compiled embed-and-verify program: flip-sum embeddings of an eval batch) on the slice."""
    import jax
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P

    from facekd_jax import evaluate, sharding
    from facekd_jax import step as step_lib

    devices = topology_devices(topology)
    mesh = sharding.make_mesh(1, devices=devices)
    model = step_lib.build_student(config, step_lib.model_layers(config, mesh))
    shapes = jax.eval_shape(lambda rng: step_lib.init_variables(model, None, config.data.image_size, rng,
                                                                config.embedding_size), jax.random.PRNGKey(0))
    variables = {"params": shapes["params"]["backbone"], "batch_stats": shapes["batch_stats"]}
    variables = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=NamedSharding(mesh, P())),
                             variables)
    shards = mesh.shape["data"]
    batch = -(-int(config.eval_batch_size) // shards) * shards
    s = int(config.data.image_size)
    images = jax.ShapeDtypeStruct((batch, s, s, 3), np.uint8, sharding=NamedSharding(mesh, P("data")))
    program = evaluate.embed_program(step_lib.eval_apply(model), True, mesh)
    return batch, _compile(program.lower(variables, images))


@functools.lru_cache(maxsize=32)
def _forward_flops(model: str, image_size: int, embedding_size: int, head: Optional[str]) -> float:
    from facekd_jax import models

    return models.model_summary(model, image_size=image_size, embedding_size=embedding_size, head=head)["gflops"] * 1e9


def _analytic_train_flops(config, run, batch: int) -> float:
    """The model's own count for one chip's share of a step: 3 x the forward FLOPs of the student per image (the
    forward and a backward of twice its cost), the live teacher's forward, and the margin head's three products."""
    from facekd_jax import sharding
    from facekd_jax import step as step_lib

    mesh = run.mesh
    per_chip = batch / mesh.shape["data"]
    student = _forward_flops(config.model, int(config.data.image_size), int(config.embedding_size),
                             config.head or None)
    teacher = 0.0
    if run.teacher is not None:
        teacher = _forward_flops(config.teacher.model, int(step_lib.teacher_image_size(config)),
                                 int(config.teacher.embedding_size), config.teacher.head or None)
    columns = sharding.head_classes(run.num_classes, mesh.shape["model"]) / mesh.shape["model"]
    head = 6.0 * per_chip * config.embedding_size * columns
    return per_chip * (3.0 * student + teacher) + head


def plan_train(config, topology: Topology, num_classes: int, *, batch: Optional[int] = None, headroom: float = 0.9,
               decode_per_core: float = DECODE_PER_CORE) -> Dict[str, Any]:
    """Everything the plan reports of the train step of `config` on `topology` (see the module docstring). Where
    the TPU compiler itself refuses the program for the chip's memory, the memory figures are its own numbers."""
    from facekd_jax import sharding

    chip = CHIPS[topology.chip]
    batch = int(batch or config.batch_size)
    run, lowered = lower_train_step(config, topology, num_classes, batch)
    state = run.abstract
    budget = int(chip.hbm_bytes * headroom)
    out = {
        "topology": topology.name, "chip": chip.kind, "chips": topology.chips, "hosts": topology.hosts,
        "mesh": dict(run.mesh.shape), "global_batch": batch, "batch_per_chip": batch // run.mesh.shape["data"],
        "num_classes": num_classes, "dtype": str(config.dtype),
        "state_bytes_per_chip": {"params": _shard_bytes(state.params), "opt_state": _shard_bytes(state.opt_state),
                                 "batch_stats": _shard_bytes(state.batch_stats),
                                 "kd_state": _shard_bytes(state.kd_state) if state.kd_state is not None else 0},
        "hbm_bytes": chip.hbm_bytes, "headroom": headroom, "budget_bytes": budget, "chip_source": chip.source,
        "analytic_flops_per_chip": _analytic_train_flops(config, run, batch),
        "decode_images_per_second_per_core": decode_per_core,
    }
    try:
        compiled = _compile(lowered)
    except DoesNotFit as e:
        return dict(out, fits=False, shortfall_bytes=e.required - min(budget, e.available),
                    memory_per_chip={"total": e.required, "available": e.available, "compiler": str(e)})
    memory, cost = _memory(compiled), _cost(compiled)
    hlo = compiled.as_text()
    step_seconds = roofline(cost["flops"], cost["bytes_accessed"], chip)
    images_per_second = batch / step_seconds if step_seconds > 0 else float("inf")
    columns = sharding.head_classes(num_classes, run.mesh.shape["model"])
    per_host = images_per_second / topology.hosts
    return dict(
        out, memory_per_chip=memory, fits=memory["total"] <= budget, shortfall_bytes=max(0, memory["total"] - budget),
        flops_per_chip=cost["flops"], flops_ratio=cost["flops"] / out["analytic_flops_per_chip"],
        bytes_accessed_per_chip=cost["bytes_accessed"], compiler_optimal_seconds=cost["optimal_seconds"],
        roofline_step_seconds=step_seconds, images_per_second_bound=images_per_second,
        epoch_seconds_bound={name: n / images_per_second for name, n in DATASETS.items()},
        collectives=collectives(hlo),
        head_gathered=gathered_head(hlo, int(config.embedding_size), columns) if run.mesh.shape["model"] > 1 else [],
        input_images_per_second_per_host=per_host, host_cores_needed=per_host / decode_per_core)


def plan_embed(config, topology: Topology, *, headroom: float = 0.9) -> Dict[str, Any]:
    """The embed-and-verify program's memory and roofline on the slice (None where it does not compile)."""
    chip = CHIPS[topology.chip]
    try:
        batch, compiled = compile_embed(config, topology)
    except DoesNotFit as e:
        return {"fits": False, "memory_per_chip": {"total": e.required}, "compiler": str(e)}
    memory, cost = _memory(compiled), _cost(compiled)
    seconds = roofline(cost["flops"], cost["bytes_accessed"], chip)
    return {"eval_batch": batch, "memory_per_chip": memory, "fits": memory["total"] <= chip.hbm_bytes * headroom,
            "flops_per_chip": cost["flops"], "roofline_batch_seconds": seconds,
            "images_per_second_bound": batch / seconds if seconds > 0 else float("inf"),
            "collectives": collectives(compiled.as_text())}


def max_batch(config, topology: Topology, num_classes: int, *, headroom: float = 0.9, limit: int = 1 << 16,
              known: Optional[Dict[str, Any]] = None) -> Tuple[Optional[int], Dict[int, bool]]:
    """The largest global batch, a power of two times the data-parallel device count, whose step fits (None: not
    even one image per device), and {batch: fits} of every batch compiled on the way. `known`: the plan of the
    config's own batch, already made."""
    tried: Dict[int, bool] = {}
    if known is not None:
        tried[known["global_batch"]] = known["fits"]
        state = sum(known["state_bytes_per_chip"].values())
        if state > known["budget_bytes"]:  # the state alone is over the budget: no batch fits, nothing to compile
            return None, tried
    from facekd_jax import sharding

    data = sharding.make_mesh(config.mesh.model_parallelism, devices=topology_devices(topology)).shape["data"]

    def fits(b: int) -> bool:
        if b not in tried:
            tried[b] = plan_train(config, topology, num_classes, batch=b, headroom=headroom)["fits"]
        return tried[b]

    # Exponents: batch = data * 2**k. Walked from the config's own batch, doubling while it fits or halving until
    # it does (fitting is monotone in the batch): two or three compiles where the answer is near the config's,
    # and no compile of a batch far past it.
    top = int(math.log2(max(limit // data, 1)))
    k = min(max(int(math.log2(max((known or {}).get("global_batch", data) // data, 1))), 0), top)
    if fits(data * 2 ** k):
        while k < top and fits(data * 2 ** (k + 1)):
            k += 1
        return data * 2 ** k, tried
    while k > 0:
        k -= 1
        if fits(data * 2 ** k):
            return data * 2 ** k, tried
    return None, tried


# ----------------------------------------------------------------------------------------------- the report


def _gib(n: float) -> str:
    """Bytes in the unit that reads best: 512 B, 3.2 MiB, 14.40 GiB."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def _duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.1f} s"


def report(train: Dict[str, Any], embed: Optional[Dict[str, Any]] = None) -> str:
    m, s = train["memory_per_chip"], train["state_bytes_per_chip"]
    head = [f"== {train['topology']}: {train['chips']} x {train['chip']} ({train['hosts']} host(s)), mesh "
             f"{train['mesh']}, global batch {train['global_batch']} ({train['batch_per_chip']} per chip), "
             f"{train['num_classes']:,} classes, {train['dtype']} ==",
             f"state per chip: params {_gib(s['params'])}, optimizer {_gib(s['opt_state'])}, batch stats "
             f"{_gib(s['batch_stats'])}, KD state {_gib(s['kd_state'])}"]
    if "compiler" in m:  # the TPU compiler refused it
        return "\n".join(head + [f"memory per chip: DOES NOT FIT: the compiler needs {_gib(m['total'])} of "
                                 f"{_gib(m['available'])} HBM ({train['shortfall_bytes']:,} bytes over the budget); "
                                 f"largest global batch that fits: {train.get('max_batch') or 'none'}"])
    lines = head + [
             f"memory per chip (compiler): arguments {_gib(m['argument'])}, outputs {_gib(m['output'])} (aliased "
             f"{_gib(m['alias'])}), temporaries {_gib(m['temp'])}, code {_gib(m['generated_code'])}; total "
             f"{_gib(m['total'])} of {_gib(train['hbm_bytes'])} HBM -> "
             + (f"fits ({train['headroom']:.0%} headroom: {_gib(train['budget_bytes'])})" if train["fits"] else
                f"DOES NOT FIT: {train['shortfall_bytes']:,} bytes over the {train['headroom']:.0%} budget"),
             f"FLOPs per chip and step: {train['flops_per_chip']:.3e} (compiler), {train['analytic_flops_per_chip']:.3e}"
             f" (the model's count; ratio {train['flops_ratio']:.2f}); bytes accessed {train['bytes_accessed_per_chip']:.3e}",
             f"roofline: step >= {train['roofline_step_seconds'] * 1e3:.2f} ms -> <= "
             f"{train['images_per_second_bound']:,.0f} images/s; epoch >= "
             + ", ".join(f"{name} {_duration(t)}" for name, t in train["epoch_seconds_bound"].items()),
             "collectives: " + ", ".join(f"{op} {c['count']} ({_gib(c['bytes'])})"
                                         for op, c in train["collectives"].items() if c["count"]) or "collectives: none",
             f"input: {train['input_images_per_second_per_host']:,.0f} images/s per host at the bound = "
             f"{train['host_cores_needed']:.1f} cores at {train['decode_images_per_second_per_core']:,.0f} images/s "
             "per core (RecordIO 112x112)"]
    if train["mesh"].get("model", 1) > 1:
        lines.append("margin head: " + ("GATHERED: " + train["head_gathered"][0] if train["head_gathered"]
                                        else "class-sharded, never gathered"))
    if "max_batch" in train:
        lines.append(f"largest global batch that fits: {train.get('max_batch') or 'none'}")
    if embed and "eval_batch" in embed:
        lines.append(f"embed-and-verify (flip-sum, batch {embed['eval_batch']}): memory {_gib(embed['memory_per_chip']['total'])}"
                     f", {'fits' if embed['fits'] else 'DOES NOT FIT'}; <= {embed['images_per_second_bound']:,.0f} "
                     "images/s (roofline)")
    return "\n".join(lines)


def num_classes_of(config, classes: str) -> int:
    """--classes (a count, or casia / ms1mv2 / webface42m), else the class count of config.data.train."""
    if classes:
        if classes.lower() in CLASSES:
            return CLASSES[classes.lower()]
        try:
            return int(classes)
        except ValueError:
            raise PlanError(f"--classes={classes}: a count, or one of {', '.join(CLASSES)}") from None
    from facekd_jax import data as data_lib
    from facekd_jax.data import specs

    spec = specs.parse(config.data.train, specs.TRAIN, root=config.data.root, field="config.data.train")
    try:
        return int(data_lib.open_source(spec, image_size=config.data.image_size).num_classes)
    except (FileNotFoundError, OSError) as e:
        raise PlanError(f"{e}; give the class count with --classes=N (or casia, ms1mv2, webface42m)") from None


def plan(config, topologies: Sequence[str], *, classes: str = "", search: bool = False, headroom: float = 0.9,
         decode_per_core: float = DECODE_PER_CORE) -> List[Dict[str, Any]]:
    """The plan of `config` on each topology: [{"train": ..., "embed": ...}] (see plan_train, plan_embed); with
    `search` or where the batch does not fit, the largest batch that fits in train["max_batch"]."""
    slices = [find_topology(t) for t in topologies]
    n = num_classes_of(config, classes)
    out = []
    for topology in slices:
        train = plan_train(config, topology, n, headroom=headroom, decode_per_core=decode_per_core)
        if search or not train["fits"]:
            train["max_batch"], tried = max_batch(config, topology, n, headroom=headroom, known=train)
            train["batches_tried"] = {str(k): v for k, v in sorted(tried.items())}
        out.append({"train": train, "embed": plan_embed(config, topology, headroom=headroom)})
    return out


def main(argv) -> None:
    from absl import app, flags

    FLAGS = flags.FLAGS
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from facekd_jax import logs
    logs.quiet(__import__("absl.logging", fromlist=["get_absl_handler"]).get_absl_handler())
    from facekd_jax import errors

    with errors.command_line():
        plans = plan(FLAGS.config, FLAGS.topology or ["v5e-8"], classes=FLAGS.classes, search=FLAGS.max_batch,
                     headroom=FLAGS.headroom, decode_per_core=FLAGS.decode_rate)
    for p in plans:
        print(report(p["train"], p["embed"]))
    print("(compiler figures and roofline bounds, not measurements; chips: "
          + ", ".join(f"{c.kind} {c.source}" for c in CHIPS.values()) + ")")
    if FLAGS.json:
        with open(FLAGS.json, "w") as f:
            json.dump({"config": json.loads(FLAGS.config.to_json_best_effort()), "plans": plans}, f, indent=2)
    unfit = [p["train"] for p in plans if not p["train"]["fits"]]
    if unfit:
        for t in unfit:
            print(f"error: {t['topology']}: does not fit by {t['shortfall_bytes']:,} bytes per chip at global batch "
                  f"{t['global_batch']}; largest batch that fits: {t.get('max_batch') or 'none'}", file=sys.stderr)
        sys.exit(EXIT_DOES_NOT_FIT)


def run() -> None:
    from absl import app, flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "A config file, FILE.py[:ARG] (as facekd_jax.main takes it).",
                                    lock_config=True)
    flags.DEFINE_multi_string("topology", None, f"a TPU slice (repeatable): {', '.join(TOPOLOGIES)}")
    flags.DEFINE_string("classes", "", "class count of the margin head (or casia, ms1mv2, webface42m); default: "
                        "that of config.data.train")
    flags.DEFINE_bool("max_batch", False, "also search the largest global batch that fits (powers of two)")
    flags.DEFINE_float("headroom", 0.9, "the share of HBM a plan may use")
    flags.DEFINE_float("decode_rate", DECODE_PER_CORE, "input images/s one host core prepares")
    flags.DEFINE_string("json", "", "write the whole plan to this file")
    flags.mark_flags_as_required(["config"])
    from facekd_jax import config_lib
    config_lib.check_overrides(sys.argv[1:])
    app.run(main)


if __name__ == "__main__":
    run()
