"""Evaluation-oriented KD (Huang et al., CVPR 2022), plus ArcFace: the student's soft rank of each pair of the
batch against its thresholds at false-positive rates 1e-1 ... 1e-6 matches the teacher's; 0.02 x MSE over
positive pairs + 0.01 x MSE over the 2000 hardest negatives, sigmoid temperature 0.01, thresholds an EMA
(rate 0.01, from 0) of each model's own batch negatives (TFace recognition/tasks/ekd/distillation/ekd.py).

Not followed: the authors add 32 identity-balanced images (8 people x 4) per GPU for the KD term; here the batch is
the run's. With a small batch the rarest thresholds are the hardest negative (floor(n_neg * fpr) = 0), and all
negatives are "hard" when there are fewer than 2000 (a batch of 64 has about 2,000 pairs)."""
from facekd_jax import config_lib


def get_config(arg: str = ""):
    return config_lib.kd_config(arg, ekd_weight=1.0)
