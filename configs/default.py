"""Default config: the thesis's ResNet-56 student with ArcFace on CASIA-WebFace (insightface format).

Every experiment file imports this and overrides a few fields. `get_config("smoke")` shrinks the run to
synthetic data at toy size (a couple of minutes on 2 CPU cores), e.g.
  python -m facekd_jax.main --config=configs/baseline_resnet56.py:smoke --workdir=runs/smoke
Data specs may use `{root}` for `data.root` (insightface's faces_webface_112x112 folder).
"""
import ml_collections


def get_config(arg: str = ""):
    c = ml_collections.ConfigDict()
    c.seed = 0
    # Student model (facekd_jax.models.build_model).
    c.model = "resnet56"
    c.embedding_size = 512
    c.head = ""              # "" = the model's default head ("gap" for resnet18/56, "flatten" for iresnet)
    c.dropout = 0.0
    c.dtype = "float32"      # "bfloat16": bf16 compute, fp32 parameters
    # Margin head (arcface_torch names): ArcFace (1, 0.5, 0), CosFace (1, 0, 0.4).
    c.margin_list = (1.0, 0.5, 0.0)
    c.scale = 64.0

    c.batch_size = 512       # global, over all devices and processes
    c.num_epochs = 34        # used when num_train_steps <= 0
    c.num_train_steps = -1
    c.optimizer = ml_collections.ConfigDict(dict(
        lr=0.1, momentum=0.9, nesterov=False, weight_decay=5e-4, grad_clip=5.0, head_lr_multiplier=1.0,
        schedule="step",                      # "step" | "poly" | "constant"
        step_fractions=(20 / 34, 28 / 34, 32 / 34), decay_factor=0.1,   # CASIA-WebFace: epochs 20, 28, 32 of 34
        warmup_steps=0, power=1.0, end_lr_factor=0.0))                   # poly (arcface_torch)

    c.data = ml_collections.ConfigDict()
    c.data.root = "~/data/faces_webface_112x112"
    c.data.train = "recordio:{root}"
    # A tuple, so the command line can override it: --config.data.val_targets="('bin:/x/lfw.bin',)"
    c.data.val_targets = ("bin:{root}/lfw.bin", "bin:{root}/agedb_30.bin", "bin:{root}/cfp_fp.bin")
    c.data.image_size = 112

    # The frozen teacher a KD run distils from: a finished run of configs/teacher_resnet18.py.
    c.teacher = ml_collections.ConfigDict(dict(model="", embedding_size=512, head="", workdir="",
                                               checkpoint="latest"))
    # Loss = ce_weight * ArcFace CE + the weighted KD terms (facekd_jax.losses.compute_loss).
    c.kd = ml_collections.ConfigDict(dict(
        ce_weight=1.0,
        hinton_weight=0.0, temperature=4.0, hinton_logits="plain",
        feature_weight=0.0, feature_kind="mse",
        rkd_distance_weight=0.0, rkd_angle_weight=0.0,
        similarity_weight=0.0,
        teacher_centres=False,
        adaptive_margin=False, margin_min=0.2, margin_max=0.5))

    c.mesh = ml_collections.ConfigDict(dict(model_parallelism=1))
    # Multi-host: jax.distributed.initialize(); on Cloud TPU / SLURM the empty fields are auto-detected.
    c.distributed = ml_collections.ConfigDict(dict(enabled=False, coordinator_address="", num_processes=0,
                                                   process_id=-1))
    c.log_every_steps = 100
    c.eval_every_steps = 2000          # arcface_torch's verbose=2000
    c.eval_batch_size = 256
    c.checkpoint_every_steps = 1000
    c.keep_checkpoints = 3
    c.async_checkpoints = True
    c.best_metric = "lfw/accuracy"     # "" to keep no best checkpoint
    c.nonfinite = "stop"               # "stop": fail with the step and term; "skip": skip the update, count it
    c.debug_nan_step = -1              # tests: poison the loss at this step
    c.debug_step_sleep = 0.0           # tests: seconds to sleep after each step (to kill a run mid-way)

    if arg:
        apply_variant(c, arg)
    return c


def apply_variant(c, arg: str) -> None:
    """`smoke`: synthetic data, 32x32, a few hundred images a step budget of ~2 min on 2 CPU cores."""
    if arg != "smoke":
        raise ValueError(f"unknown config variant {arg!r}: expected '' or 'smoke'")
    c.data.train = "synthetic:32:32"
    c.data.val_targets = ("synthetic:200",)
    c.data.image_size = 32
    c.embedding_size = 64
    c.teacher.embedding_size = 64
    c.batch_size = 64
    c.num_train_steps = 60
    c.optimizer.schedule = "constant"
    c.optimizer.lr = 0.05
    c.log_every_steps = 10
    c.eval_every_steps = 30
    c.eval_batch_size = 200
    c.checkpoint_every_steps = 30
    c.best_metric = "synthetic/accuracy"
