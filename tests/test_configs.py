"""Every config file in configs/ at every variant it declares: resolves, and the KD registry accepts its kd
block; a table's runs are its own variants, loaded from a path."""
import pathlib

import pytest

from facekd_jax import config_lib, models
from facekd_jax import kd as kd_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = sorted(p for p in (REPO / "configs").glob("*.py") if p.stem != "__init__")


def _variants(path):
    module = config_lib.load_module(str(path))
    runs = list(module.SUITE.runs) if hasattr(module, "SUITE") else [""]
    return [(run, size) for run in runs for size in [""] + sorted(config_lib.SIZES)]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_config_and_variant_resolves_and_the_kd_registry_accepts_it(path):
    for run, size in _variants(path):
        arg = ",".join(p for p in (run, size) if p)
        c = config_lib.load_config(f"{path}:{arg}" if arg else str(path))
        settings = kd_lib.kd_settings(c.kd)  # unknown keys or choices raise
        assert c.model in models.MODEL_NAMES, (path.stem, arg)
        # A KD experiment turns on at least one registered term and names a teacher; the others need no teacher.
        assert bool(kd_lib.active_methods(settings)) == bool(c.teacher.model), (path.stem, arg)
        assert c.num_train_steps > 0 or c.num_epochs > 0


def test_config_args_take_variants_fields_and_bracketed_values():
    c = config_lib.load_config(f"{REPO}/configs/lfw_dlib.py:label_free_kd,seed=2,data.val_targets=('bin:a.bin', "
                               "'lfw:{root}')")
    assert c.seed == 2 and c.kd.ce_weight == 0.0 and c.data.val_targets == ("bin:a.bin", "lfw:{root}")
    with pytest.raises(KeyError, match="no field 'nope'"):
        config_lib.load_config(f"{REPO}/configs/demo.py:nope=1")
    with pytest.raises(ValueError, match="unknown config variant 'huge'"):
        config_lib.load_config(f"{REPO}/configs/feature_kd.py:huge")
    with pytest.raises(FileNotFoundError, match="absent.py"):
        config_lib.load_config(f"{REPO}/configs/absent.py")


def test_a_teacher_cache_in_its_teachers_folder():
    c = config_lib.load_config(f"{REPO}/configs/lfw_dlib.py:feature_kd,teacher.workdir=/t/dlib/")
    labelled = config_lib.teacher_cache_dir(c)
    assert labelled.startswith("/t/dlib/cache_lfw-") and len(labelled) == len("/t/dlib/cache_lfw-") + 8
    free = config_lib.load_config(f"{REPO}/configs/lfw_dlib.py:label_free_kd,teacher.workdir=/t/dlib")
    assert config_lib.teacher_cache_dir(free).startswith("/t/dlib/cache_lfw-all-")  # one cache per training set
    c.data.root = "/elsewhere"  # another copy of the data: another cache
    assert config_lib.teacher_cache_dir(c) != labelled
    c.teacher.cache = "/caches/x"
    assert config_lib.teacher_cache_dir(c) == "/caches/x"
