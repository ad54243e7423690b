"""`make demo`: the thesis in miniature on the embedded synthetic faces, one table.

A ResNet-18 teacher (trained first), the ArcFace-only ResNet-56 baseline and one ResNet-56 student per KD method,
each 60 steps of 32 synthetic images at 24x24 (about 25 s a model on 2 CPU cores). At this size every model stays
near chance: the table shows the machinery (the same budget, one protocol, McNemar against the baseline), not a
result; the real-faces table is configs/lfw_dlib.py.

  python -m facekd_jax.suite --config=configs/demo.py --workdir=runs/demo      the table
  python -m facekd_jax.main --config=configs/demo.py:feature_kd --workdir=...   one row (its teacher trained first)
"""
import os

from facekd_jax import config_lib

_HERE = os.path.dirname(os.path.abspath(__file__))

# run -> (the method's own config file in configs/, what the table says of the row)
RUNS = {
    "teacher_resnet18": ("teacher_resnet18", "ResNet-18 ArcFace teacher"),
    "baseline_resnet56": ("baseline_resnet56", "ResNet-56, ArcFace only"),
    "conventional_kd": ("conventional_kd", "ResNet-56, Hinton KD on the classification layer"),
    "feature_kd": ("feature_kd", "ResNet-56, feature KD matched to ArcFace (thesis)"),
    "arcface_kd": ("arcface_kd", "ResNet-56, KD on ArcFace margin logits"),
    "rkd": ("rkd", "ResNet-56, relational KD"),
    "cosine_matrix_kd": ("cosine_matrix_kd", "ResNet-56, cosine-matrix KD"),
    "proxyless_kd": ("proxyless_kd", "ResNet-56, teacher's frozen centres"),
    "margin_distillation": ("margin_distillation", "ResNet-56, MarginDistillation"),
}
SUITE = config_lib.Suite(runs=tuple(RUNS), baseline="baseline_resnet56", teacher="teacher_resnet18",
                         descriptions={run: text for run, (_, text) in RUNS.items()})


def get_config(arg: str = ""):
    run, arg = config_lib.split_run(arg, RUNS, "baseline_resnet56")
    c = config_lib.load_config(os.path.join(_HERE, RUNS[run][0] + ".py"))
    c.data.train = "synthetic:32:32"
    c.data.val_targets = ("synthetic:400",)
    c.data.image_size = 24
    c.embedding_size = c.teacher.embedding_size = 128
    c.batch_size = 32
    c.optimizer.lr = 0.05
    c.eval_batch_size = 200
    c.num_train_steps = 60
    if c.teacher.model:
        c.teacher.workdir = "runs/demo/teacher_resnet18"
    config_lib.apply_arg(c, arg)
    config_lib.suite_budget(c, c.num_train_steps)
    return c
