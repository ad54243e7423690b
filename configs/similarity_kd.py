"""Similarity-matrix KD: the student's batch cosine-similarity matrix matches the teacher's (the building
block of evaluation-oriented KD, Huang et al., CVPR 2022), plus ArcFace."""
from configs import kd_common


def get_config(arg: str = ""):
    return kd_common.get_config(arg, similarity_weight=10.0)
