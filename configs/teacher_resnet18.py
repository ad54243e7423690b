"""The thesis's teacher: ResNet-18 (GAP head, 11.4 M params, ~12.9x the ResNet-56 student) with ArcFace."""
from facekd_jax import config_lib


def get_config(arg: str = ""):
    c = config_lib.default_config()
    c.model = "resnet18"
    return config_lib.apply_arg(c, arg)
