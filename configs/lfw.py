"""The thesis's suite on real faces with its own teacher: LFW View 1's training people at 32x32, a ResNet-18
teacher trained first, the ArcFace-only ResNet-56 baseline and one student per KD method, 200 steps of 64 each,
evaluated on the 1,000 pairsDevTest pairs (people never trained on).

Every model here stays at 55-66%: a 200-step "teacher" is one of them, so the table shows the machinery on real
images, not the thesis's setting (the real-teacher table is configs/lfw_dlib.py). ArcFace m 0.5 at s 32: at s 64
a 200-step teacher stayed at chance.

  python -m facekd_jax.suite --config=configs/lfw.py --workdir=runs/lfw          (data.root=DIR for another copy)
"""
import os

from facekd_jax import config_lib

_HERE = os.path.dirname(os.path.abspath(__file__))

# The same rows as the demo's table (configs/demo.py), at this table's data and size.
RUNS = config_lib.load_module(os.path.join(_HERE, "demo.py")).RUNS
SUITE = config_lib.Suite(runs=tuple(RUNS), baseline="baseline_resnet56", teacher="teacher_resnet18",
                         descriptions={run: text for run, (_, text) in RUNS.items()})


def get_config(arg: str = ""):
    run, arg = config_lib.split_run(arg, RUNS, "baseline_resnet56")
    c = config_lib.load_config(os.path.join(_HERE, RUNS[run][0] + ".py"))
    c.data.root = "../shared/data/lfw"
    c.data.train = "lfw:{root}"
    c.data.val_targets = ("lfw:{root}",)
    c.data.image_size = 32
    c.embedding_size = c.teacher.embedding_size = 256
    c.batch_size = 64
    c.optimizer.lr = 0.1
    c.scale = 32.0
    c.eval_batch_size = 250
    c.num_train_steps = 200
    if c.teacher.model:
        c.teacher.workdir = "runs/lfw/teacher_resnet18"
    config_lib.apply_arg(c, arg)
    config_lib.suite_budget(c, c.num_train_steps)
    return c
