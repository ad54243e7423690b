"""KD on the ArcFace margin logits: Hinton's KL between teacher and student logits with the additive
angular margin applied at the label and scale s (the "KD matched to the ArcFace objective" read at the
classification layer; the student keeps its own head)."""
from facekd_jax import config_lib


def get_config(arg: str = ""):
    return config_lib.kd_config(arg, hinton_weight=1.0, temperature=4.0, hinton_logits="margin")
