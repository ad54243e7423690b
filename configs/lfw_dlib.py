"""The thesis's question on real faces: dlib's face descriptor (imported, 98.6% on pairsDevTest) teaches a
MobileFaceNet on LFW View 1's training people; every KD method against the ArcFace-only baseline, evaluated on
the 1,000 pairsDevTest pairs, whose people are never trained on.

  python -m facekd_jax.suite --config=configs/lfw_dlib.py --workdir=runs/lfw_dlib --seeds=3     (make lfw-dlib)
  python -m facekd_jax.main --config=configs/lfw_dlib.py:label_free_kd,seed=1 --workdir=...     one row

The suite imports the teacher into runs/lfw_dlib/teacher_dlib (python -m facekd_jax.teachers import dlib) and
builds its embedding caches there (cache_lfw: the 6,671 images of the 1,184 people with >= 2 images; cache_lfw_all:
all 9,525 images of the 4,038 training people, for the label-free row), so the teacher never runs in training.

Settings: 48x48 crops (box 62,55,188,181), 128-d embeddings (the teacher's width, no projection), 250 steps of 64
images, SGD 0.1 with 5% warmup and x0.1 at 60% and 85% (suite_budget), ArcFace m 0.5 at s 32, the teacher's
embeddings centred (dlib's unit embeddings share one direction: |mean| 0.915). The label-free row trains on every
training image, singletons too, with the teacher's embeddings as its only target (kd.ce_weight 0).
"""
import os

from facekd_jax import config_lib

_HERE = os.path.dirname(os.path.abspath(__file__))

# run -> (the method's own config file in configs/, what the table says of the row)
RUNS = {
    "baseline": ("baseline_resnet56", "ArcFace only, no teacher"),
    "conventional_kd": ("conventional_kd", "Hinton KD on s*cos logits (teacher: its class centres)"),
    "feature_kd": ("feature_kd", "feature KD (thesis): 100 x MSE of unit embeddings"),
    "arcface_kd": ("arcface_kd", "Hinton KD on ArcFace margin logits"),
    "rkd": ("rkd", "relational KD (distance 1, angle 2)"),
    "cosine_matrix_kd": ("cosine_matrix_kd", "MSE of batch cosine matrices"),
    "sp_kd": ("sp_kd", "similarity-preserving KD (Tung & Mori), exact"),
    "grouped_kd": ("grouped_kd", "Grouped KD: binary + 4 x primary group"),
    "ekd": ("ekd", "EKD: soft ranks at FPR 1e-1..1e-6"),
    "adadistill": ("adadistill", "AdaDistill: adaptive EMA centres of teacher embeddings"),
    "proxyless_kd": ("proxyless_kd", "ArcFace on the teacher's class centres"),
    "margin_distillation": ("margin_distillation", "teacher's centres, per-sample margin"),
    "label_free_kd": ("feature_kd", "feature KD alone, every image (singletons too), no labels"),
}
SUITE = config_lib.Suite(runs=tuple(RUNS), baseline="baseline", teacher="import:dlib", seeds=3,
                         descriptions={run: text for run, (_, text) in RUNS.items()})

# LFW as given (deep-funnelled, a fixed box) and its 5-point aligned copy (python -m facekd_jax.data.convert align
# --lfw=../shared/data/lfw --output=runs/lfw_aligned; make lfw-aligned).
BOXED, ALIGNED = "../shared/data/lfw", "runs/lfw_aligned"
# Every setting tried, on the development split only (python -m facekd_jax.sweep --config=configs/lfw_dlib.py
# --workdir=runs/lfw_dlib_sweep; make lfw-dlib-sweep; docs/results.md has its table): entry -> (the runs it
# trains beside the baseline, key=value settings). Steps and the crop at the KD rows that matter; the finer
# settings at 250 steps, one seed, where a few points are within the noise of 1,000 pairs.
_AL = f"data.root={ALIGNED}"
SWEEP = {
    "boxed_250": (("conventional_kd", "label_free_kd"), f"data.root={BOXED}"),
    "aligned_250": (("conventional_kd", "label_free_kd"), _AL),
    "aligned_500": (("conventional_kd", "label_free_kd"), f"{_AL},num_train_steps=500"),
    "aligned_1000": (("label_free_kd",), f"{_AL},num_train_steps=1000"),
    "aligned_64px_250": (("label_free_kd",), f"{_AL},data.image_size=64"),
    "aligned_uncentred_250": (("label_free_kd",), f"{_AL},teacher.centre=False"),
    "aligned_feature_w300_250": (("label_free_kd",), f"{_AL},kd.feature_weight=300.0"),
    "aligned_T2_250": (("conventional_kd",), f"{_AL},kd.temperature=2.0"),
    "aligned_thesis_feature_250": (("feature_kd",), _AL),
    "aligned_s64_250": (("label_free_kd",), f"{_AL},scale=64.0"),
    "aligned_m0.3_250": (("label_free_kd",), f"{_AL},margin_list=(1.0,0.3,0.0)"),
    "aligned_lr0.2_250": (("label_free_kd",), f"{_AL},optimizer.lr=0.2"),
    "aligned_poly_250": (("label_free_kd",), f"{_AL},optimizer.schedule=poly"),
}


def get_config(arg: str = ""):
    run, arg = config_lib.split_run(arg, RUNS, "baseline")
    c = config_lib.load_config(os.path.join(_HERE, RUNS[run][0] + ".py"))
    c.model = "mobilefacenet"
    c.data.root = "../shared/data/lfw"
    c.data.train = "lfw:{root}"
    c.data.val_targets = ("lfw:{root}",)
    c.data.image_size = 48
    c.embedding_size = c.teacher.embedding_size = 128
    c.batch_size = 64
    c.optimizer.lr = 0.1
    c.scale = 32.0
    c.eval_batch_size = 250
    c.num_train_steps = 250
    c.optimizer.schedule, c.optimizer.step_fractions = "step", (0.6, 0.85)   # x0.1 at 60% and 85% of the steps
    if c.teacher.model:  # a KD row: dlib's teacher through its centred embedding cache
        c.teacher.model = "dlib_resnet29"
        c.teacher.workdir = "runs/lfw_dlib/teacher_dlib"
        c.teacher.cache = "{teacher}/cache_{data}"   # one per training set: lfw-<digest>, lfw-all-<digest>
        c.teacher.centre = True
    if run == "label_free_kd":
        c.kd.ce_weight = 0.0
        c.data.train = "lfw-all:{root}"
    config_lib.apply_arg(c, arg)
    config_lib.suite_budget(c, c.num_train_steps, schedule=False)
    return c
