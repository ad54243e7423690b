"""ProxylessKD (Shi et al. 2020): the student is trained with ArcFace on the teacher's frozen class centres,
so its embeddings land in the teacher's space."""
from facekd_jax import config_lib


def get_config(arg: str = ""):
    return config_lib.kd_config(arg, teacher_centres=True)
