"""Eval mode: a finished run's model on the verification sets its caller's config names, with nothing trained.

  python -m facekd_jax.main --config=configs/feature_kd.py --workdir=runs/fkd --mode=eval \
      "--config.data.val_targets=('lfw-view2:../shared/data/lfw',)"
  ... "--config.data.val_targets=('insightface:/data/faces_emore','ijbc:/data/IJB_release/IJBC')"

The architecture comes from the run (WORKDIR/config.json, facekd_jax.rundir); the verification sets, the batch size
and the CPU kernels from the config. Results go to WORKDIR/eval/ (results.json, roc.png), printed as arcface_torch
prints them. A gs:// workdir is evaluated from a local copy and its eval/ pushed back.
"""
from __future__ import annotations

import os
from typing import Any, Dict

import jax
import ml_collections

from facekd_jax import evaluate as eval_lib
from facekd_jax import paths, rundir, sharding
from facekd_jax import step as step_lib
from facekd_jax import train
from facekd_jax.data import specs, verification


def evaluate_workdir(config: ml_collections.ConfigDict, workdir: str, *, which: str = "latest") -> Dict[str, Any]:
    """Evaluates a run's latest (or best) checkpoint on config.data.val_targets; writes WORKDIR/eval/.
    Returns {"step", "results": {set name: metrics}}."""
    train.data_specs(config)
    if not config.data.val_targets:
        raise ValueError("config.data.val_targets is empty: nothing to evaluate")
    if paths.is_url(workdir):  # a local copy, then the eval files pushed back (no lock: training may go on)
        train.single_host_for_url(workdir)
        with paths.RemoteWorkdir(workdir, local=paths.staging_dir(workdir) + "-eval", lock=False) as stage:
            return evaluate_workdir(config, stage.local, which=which)
    config = _teacher_crops(rundir.trained_architecture(config, workdir), workdir)
    mesh = sharding.make_mesh(1)
    # The run's kernels: XLA:CPU's own depthwise convolutions would make a MobileFaceNet's eval 6x slower.
    model = rundir.load_model(workdir, config, which=which, layers=step_lib.model_layers(config, mesh),
                              sharding=sharding.replicated(mesh))
    targets = train.load_val_targets(config)
    results = eval_lib.evaluate_targets(model.apply, model.variables, targets, step=model.step,
                                        batch_size=config.eval_batch_size, mesh=mesh, log=print)
    # Sets with a protocol of their own (IJB-B/C: templates of raw, flip-summed, score-weighted features).
    for spec in verification.protocol_specs(config.data.val_targets, root=config.data.root):
        evaluate_set = spec.info.reader(specs.VERIFICATION)
        results[specs.name(spec)] = evaluate_set(
            spec, eval_lib.raw_embedder(model.apply, model.variables, mesh=mesh),
            image_size=config.data.image_size, batch_size=config.eval_batch_size, work_dir=f"{workdir}/eval",
            log=print)
    if jax.process_index() == 0:
        eval_lib.write_results(f"{workdir}/eval", results, step=model.step)
    return {"step": model.step, "results": results}


def _teacher_crops(config: ml_collections.ConfigDict, workdir: str) -> ml_collections.ConfigDict:
    """An imported teacher's run (teachers.imported: its teacher.json) is evaluated on its own crop where a set
    names none, as the suite's teacher row and its caches are: dlib's box on LFW, its chip in an aligned copy."""
    from facekd_jax.teachers import imported

    if not os.path.isfile(os.path.join(workdir, imported.TEACHER_JSON)):
        return config
    run = imported.read_teacher_run(workdir)
    targets = []
    for text in config.data.val_targets:
        spec = specs.parse(text, specs.VERIFICATION, root=config.data.root)
        crop = run.crop_for(spec) if spec.info.takes_crop and spec.crop is None else None
        targets.append(str(spec.replace(crop=crop)) if crop else text)
    config.data.val_targets = tuple(targets)
    return config
