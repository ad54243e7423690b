"""The thesis's question on real faces: dlib's face descriptor (imported) teaches a MobileFaceNet on LFW View 1's
training people; the KD methods against the ArcFace-only baseline, evaluated on the 1,000 pairsDevTest pairs,
whose people are never trained on.

  make lfw-aligned    # once: LFW aligned by dlib's five landmarks into runs/lfw_aligned (about 15 min on 2 cores)
  python -m facekd_jax.suite --config=configs/lfw_dlib.py --workdir=runs/lfw_dlib --seeds=3     (make lfw-dlib)
  python -m facekd_jax.suite ... --runs=all                                                     every method
  python -m facekd_jax.main --config=configs/lfw_dlib.py:label_free_kd,seed=1 --workdir=...     one row
  python -m facekd_jax.sweep --config=configs/lfw_dlib.py --workdir=runs/lfw_dlib_sweep          the SWEEP below

The suite imports the teacher into WORKDIR/teacher_dlib (python -m facekd_jax.teachers import dlib) and builds its
embedding caches there (one per training set: `lfw:` the people with >= 2 images, `lfw-all:` every training image,
for the label-free row), so the teacher never runs in training.

Settings, each chosen on the development split (data.lfw_dev; SWEEP below, docs/results.md): the aligned copy
(dlib's chip crop, resized to 48x48; aligned beat the fixed box of the unaligned images by 3 points for the
baseline and conventional KD at 250 steps), 500 steps of 64 images (every row better than at 250; the baseline
most), 128-d embeddings (the teacher's width, no projection), SGD 0.1 with 5% warmup and x0.1 at 60% and 85%
(suite_budget), ArcFace m 0.5 at s 32, Hinton T 4 (T 2: 3.4 points worse), the teacher's embeddings centred
(dlib's unit embeddings share one direction, |mean| 0.915; uncentred, label-free KD loses 20 points). The
label-free row trains on every training image, singletons too, with the teacher's embeddings as its only target
(kd.ce_weight 0). 48x48, not 112x112: a 112 run costs about 5x the CPU time, which the 90-minute budget of the
table on 2 cores does not hold; the sweep has not tried it.
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
# The default rows are the ones the sweep found worth the table's 90 minutes; --runs=all trains every method.
SUITE = config_lib.Suite(runs=tuple(RUNS), baseline="baseline", teacher="import:dlib", seeds=3,
                         descriptions={run: text for run, (_, text) in RUNS.items()},
                         default=("baseline", "conventional_kd", "label_free_kd"))

# LFW as given (deep-funnelled, a fixed box) and its 5-point aligned copy (python -m facekd_jax.data.convert align
# --lfw=../shared/data/lfw --output=runs/lfw_aligned; make lfw-aligned).
BOXED, ALIGNED = "../shared/data/lfw", "runs/lfw_aligned"
# Every setting tried, on the development split only (python -m facekd_jax.sweep --config=configs/lfw_dlib.py
# --workdir=runs/lfw_dlib_sweep; make lfw-dlib-sweep; docs/results.md has its table): entry -> (the runs it
# trains beside the baseline, key=value settings). Steps and the crop at the KD rows that matter; the finer
# settings at 250 steps, one seed, where a few points are within the noise of 1,000 pairs.
_AL, _250 = f"data.root={ALIGNED}", "num_train_steps=250"
SWEEP = {
    "boxed_250": (("conventional_kd", "label_free_kd"), f"data.root={BOXED},{_250}"),
    "aligned_250": (("conventional_kd", "label_free_kd"), f"{_AL},{_250}"),
    "aligned_500": (("conventional_kd", "label_free_kd"), f"{_AL},num_train_steps=500"),
    "aligned_uncentred_250": (("label_free_kd",), f"{_AL},{_250},teacher.centre=False"),
    "aligned_T2_250": (("conventional_kd",), f"{_AL},{_250},kd.temperature=2.0"),
    "aligned_thesis_feature_250": (("feature_kd",), f"{_AL},{_250}"),
}


def get_config(arg: str = ""):
    run, arg = config_lib.split_run(arg, RUNS, "baseline")
    c = config_lib.load_config(os.path.join(_HERE, RUNS[run][0] + ".py"))
    c.model = "mobilefacenet"
    c.data.root = ALIGNED
    c.data.train = "lfw:{root}"
    c.data.val_targets = ("lfw:{root}",)
    c.data.image_size = 48
    c.embedding_size = c.teacher.embedding_size = 128
    c.batch_size = 64
    c.optimizer.lr = 0.1
    c.scale = 32.0
    c.eval_batch_size = 250
    c.num_train_steps = 500
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
