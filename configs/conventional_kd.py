"""Conventional KD (Hinton et al. 2015) on the classification layer: KL between the softened class
probabilities of teacher and student (s * cos logits, T = 4), next to the student's ArcFace loss."""
from configs import kd_common


def get_config(arg: str = ""):
    return kd_common.get_config(arg, hinton_weight=1.0, temperature=4.0, hinton_logits="plain")
