"""Command line: train or evaluate one run from an ml_collections config file.

  python -m facekd_jax.main --config=configs/feature_kd.py --workdir=runs/fkd [--config.field=value ...]
  python -m facekd_jax.main --config=configs/feature_kd.py:smoke --workdir=runs/fkd_smoke
  python -m facekd_jax.main --config=configs/feature_kd.py --workdir=runs/fkd --mode=eval

Configs: FILE.py[:ARG], ARG = comma-separated variants (smoke: synthetic data, about a minute; tiny: the unit
tests' size) and key=value parts, then any --config.FIELD=VALUE flags (facekd_jax/config_lib.py; README, "Train, distil, evaluate").

Exit status (facekd_jax.errors): 0 done; 2 a usage or input error (a missing path, a malformed spec or file, an
unknown config key, a workdir trained with another config); 75 (EX_TEMPFAIL) preempted by SIGTERM after saving a
checkpoint: rerun the same command to resume; 1 anything else (a full disk, a workdir in use by another run, a
NaN loss, a failed checkpoint save). Expected failures print one line, `error: ...`; FACEKD_TRACEBACK=1 adds the
traceback.
"""
import os
import sys

# TensorFlow is only the input pipeline: keep it off the accelerators JAX uses, and quiet.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from facekd_jax import errors  # noqa: E402

FLAGS = flags.FLAGS
EXIT_PREEMPTED = errors.EXIT_PREEMPTED  # EX_TEMPFAIL: a scheduler tells "preempted, resumable" from done and failed
config_flags.DEFINE_config_file(
    "config", None, "An ml_collections config file, FILE.py[:ARG]; ARG is comma-separated variants (smoke, tiny) "
    "and key=value overrides (facekd_jax/config_lib.py). Fields can also be set with --config.FIELD=VALUE.",
    lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and eval results.")
flags.DEFINE_enum("mode", "train", ["train", "eval"], "train: train (resuming if possible); eval: evaluate.")
flags.DEFINE_enum("checkpoint", "latest", ["latest", "best"], "eval mode: which checkpoint to evaluate.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from facekd_jax import logs
    logs.quiet(logging.get_absl_handler())
    logs.skip_absent_tpu()
    import tensorflow as tf
    tf.config.set_visible_devices([], "GPU")
    from facekd_jax.cpu import xla_flags  # pure Python: flags only, no native code
    xla_flags.apply_cpu_defaults(onednn=FLAGS.config.cpu_kernels not in ("taps", "xla"))  # before JAX starts
    from facekd_jax import eval_only, train  # noqa: E402 (after TF is kept off the GPU)

    logging.info("config:\n%s", FLAGS.config)
    with errors.command_line():  # expected failures: one line, the cause last, not buried in a traceback
        if FLAGS.mode == "train":
            out = train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
            if out.get("preempted"):
                logging.warning("preempted at step %d: exit status %d (rerun the same command to resume)",
                                out["step"], errors.EXIT_PREEMPTED)
                sys.exit(errors.EXIT_PREEMPTED)
        else:
            eval_only.evaluate_workdir(FLAGS.config, FLAGS.workdir, which=FLAGS.checkpoint)


def run():
    from facekd_jax import config_lib
    config_lib.check_overrides(sys.argv[1:], required=("--config", "--workdir"))
    app.run(main)


if __name__ == "__main__":
    run()
