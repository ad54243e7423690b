"""MarginDistillation (Svitov & Alyamkin 2020): the teacher's frozen centres with a per-sample margin
m_i = (Mmax - Mmin) / max_batch(d) * d_i + Mmin, d_i the teacher's cosine to its own centre."""
from configs import kd_common


def get_config(arg: str = ""):
    return kd_common.get_config(arg, teacher_centres=True, adaptive_margin=True, margin_min=0.2, margin_max=0.5)
