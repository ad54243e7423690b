"""Shared set-up of every distillation config: the ResNet-18 teacher from `teacher.workdir`."""
from configs import default


def get_config(arg: str = "", **kd):
    c = default.get_config(arg)
    c.teacher.model = "resnet18"
    c.teacher.workdir = "runs/teacher_resnet18" if not arg else "runs/smoke_teacher"
    for key, value in kd.items():
        if key not in c.kd:
            raise KeyError(f"unknown kd key {key!r}; valid keys: {sorted(c.kd.keys())}")
        c.kd[key] = value
    return c
