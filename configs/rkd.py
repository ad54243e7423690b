"""Relational KD (Park et al., CVPR 2019): distance (weight 1) and angle (weight 2) terms, plus ArcFace."""
from facekd_jax import config_lib


def get_config(arg: str = ""):
    return config_lib.kd_config(arg, rkd_distance_weight=1.0, rkd_angle_weight=2.0)
