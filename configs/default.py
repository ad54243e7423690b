"""Default config: the thesis's ResNet-56 student with ArcFace on CASIA-WebFace (insightface format).

The fields and their meaning live in facekd_jax/config_lib.py; `:smoke`, `:tiny` and `key=value` parts after the
file name shrink or change a run, e.g.
  python -m facekd_jax.main --config=configs/baseline_resnet56.py:smoke --workdir=runs/smoke
Data specs may use `{root}` for `data.root` (insightface's faces_webface_112x112 folder).
"""
from facekd_jax import config_lib


def get_config(arg: str = ""):
    return config_lib.apply_arg(config_lib.default_config(), arg)
