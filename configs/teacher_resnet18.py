"""The thesis's teacher: ResNet-18 (GAP head, 11.4 M params, ~12.9x the ResNet-56 student) with ArcFace."""
from configs import default


def get_config(arg: str = ""):
    c = default.get_config(arg)
    c.model = "resnet18"
    return c
