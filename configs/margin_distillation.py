"""MarginDistillation (Svitov & Alyamkin 2020): the teacher's frozen centres with a per-sample margin
m_i = (Mmax - Mmin) / max_batch(d) * d_i + Mmin, d_i the teacher's cosine to its own centre."""
from facekd_jax import config_lib


def get_config(arg: str = ""):
    return config_lib.kd_config(arg, teacher_centres=True, adaptive_margin=True, margin_min=0.2, margin_max=0.5)
