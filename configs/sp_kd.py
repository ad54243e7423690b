"""Similarity-preserving KD (Tung & Mori, ICCV 2019), exactly: row-normalised Gram matrices of the features,
||G_t - G_s||_F^2 / B^2, weight 3000 on top of ArcFace (the authors' CIFAR setting, RepDistiller's `-b 3000`).
The features are the embeddings (the paper takes the last activation map; an embedding cache has only these)."""
from facekd_jax import config_lib


def get_config(arg: str = ""):
    return config_lib.kd_config(arg, sp_weight=3000.0)
