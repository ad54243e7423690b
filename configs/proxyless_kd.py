"""ProxylessKD (Shi et al. 2020): the student is trained with ArcFace on the teacher's frozen class centres,
so its embeddings land in the teacher's space."""
from configs import kd_common


def get_config(arg: str = ""):
    return kd_common.get_config(arg, teacher_centres=True)
