"""The thesis's baseline student: ResNet-56 trained with ArcFace only (no teacher)."""
from facekd_jax import config_lib


def get_config(arg: str = ""):
    return config_lib.apply_arg(config_lib.default_config(), arg)
