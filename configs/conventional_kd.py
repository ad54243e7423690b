"""Conventional KD (Hinton et al. 2015) on the classification layer: KL between the softened class
probabilities of teacher and student (s * cos logits, T = 4), next to the student's ArcFace loss."""
from facekd_jax import config_lib


def get_config(arg: str = ""):
    return config_lib.kd_config(arg, hinton_weight=1.0, temperature=4.0, hinton_logits="plain")
