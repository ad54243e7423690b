"""Cosine-matrix KD: the student's batch matrix of embedding cosines matches the teacher's (MSE), plus ArcFace.
TFace's face variant of similarity-preserving KD (ekd/distillation/similarity_perserving.py); Tung & Mori's own
loss is configs/sp_kd.py."""
from facekd_jax import config_lib


def get_config(arg: str = ""):
    return config_lib.kd_config(arg, cosine_matrix_weight=10.0)
