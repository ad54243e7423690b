"""Every experiment file in configs/ at every variant: resolves, and the KD registry accepts its kd block."""
import importlib
import pathlib

import pytest

from facekd_jax import config_lib, losses, models, suite

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = sorted(p.stem for p in (REPO / "configs").glob("*.py") if p.stem != "__init__")


def _flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        if hasattr(v, "items"):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


@pytest.mark.parametrize("variant", [""] + sorted(config_lib.VARIANTS))
@pytest.mark.parametrize("module", CONFIGS)
def test_every_config_and_variant_resolves_and_the_kd_registry_accepts_it(module, variant):
    c = importlib.import_module(f"configs.{module}").get_config(variant)
    settings = losses.kd_settings(c.kd)  # unknown keys or choices raise
    assert c.model in models.MODEL_NAMES
    # A KD experiment turns on at least one registered term and names a teacher; the others need no teacher.
    assert bool(losses.active_methods(settings)) == bool(c.teacher.model), (module, variant)
    if variant:
        assert c.num_train_steps > 0 and c.data.image_size > 0


def test_the_suites_sizes_are_the_variants(tmp_path):
    """One definition of each table's size: a suite model is configs/FILE.py:VARIANT with only its data paths and
    teacher location filled in, whichever variant the suite is given."""
    for data, variant, module in [("synthetic", "demo", "feature_kd"), ("lfw:/d/lfw", "lfw", "conventional_kd"),
                                  ("lfw:/d/lfw", "lfw_dlib", "conventional_kd"), ("synthetic", "tiny", "rkd")]:
        from_suite = _flat(suite.suite_config(module, data=data, workdir=str(tmp_path), steps=None, overrides={},
                                              variant=variant))
        direct = _flat(importlib.import_module(f"configs.{module}").get_config(variant))
        differ = {k for k in direct if direct[k] != from_suite[k]}
        allowed = {"teacher.workdir", "data.train", "data.val_targets"}
        if variant == "tiny":  # the suite's budget policy on the variant's step count
            allowed |= {"optimizer.schedule", "optimizer.step_fractions", "log_every_steps", "checkpoint_every_steps",
                        "keep_checkpoints", "best_metric"}
        assert differ <= allowed, (variant, differ - allowed)
        assert from_suite["num_train_steps"] == direct["num_train_steps"], variant
    # without a variant the data kind decides: lfw -> `lfw`
    lfw = importlib.import_module("configs.baseline_resnet56").get_config("lfw")
    c = suite.suite_config("baseline_resnet56", data="lfw:/d", workdir=str(tmp_path), steps=None, overrides={})
    assert (c.data.image_size, c.embedding_size, c.num_train_steps) == (lfw.data.image_size, lfw.embedding_size,
                                                                        lfw.num_train_steps)
