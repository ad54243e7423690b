"""The thesis's baseline student: ResNet-56 trained with ArcFace only (no teacher)."""
from configs import default


def get_config(arg: str = ""):
    return default.get_config(arg)
