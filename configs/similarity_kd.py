"""Similarity-matrix KD: the student's batch cosine-similarity matrix matches the teacher's (the building
block of evaluation-oriented KD, Huang et al., CVPR 2022), plus ArcFace."""
from facekd_jax import config_lib


def get_config(arg: str = ""):
    return config_lib.kd_config(arg, similarity_weight=10.0)
