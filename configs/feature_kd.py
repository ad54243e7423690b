"""The thesis's KD matched to the ArcFace objective, at the feature level: ArcFace's objective lives on the
unit hypersphere, so the student mimics the teacher's L2-normalised embedding (PocketNet template KD,
weight 100 on the MSE of unit vectors, i.e. 100 * (2 - 2 cos) / d)."""
from facekd_jax import config_lib


def get_config(arg: str = ""):
    return config_lib.kd_config(arg, feature_weight=100.0, feature_kind="mse")
