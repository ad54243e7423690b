"""Data: training sources and the tf.data pipeline, verification sets, converters.

  make_train_dataset(spec, *, batch_size, image_size=112, seed=0, start_step=0, ...) -> (batches, info)
  load_verification(spec, *, image_size=112) -> (images uint8 [2N, S, S, 3], issame bool [N])
  verification_name(spec) -> short name for logs ("lfw", "agedb_30", "synthetic", ...)

Specs (strings, parsed once by facekd_jax.data.specs, whose KINDS registry lists every kind with its reader):
training synthetic[:C:K[:SEED]] | folder:DIR[@l,t,r,b] | lfw:DIR | lfw-all:DIR | recordio:DIR | tfrecord:GLOB |
tfds:NAME[:SPLIT]; verification bin:FILE | pairs:PAIRS_TXT:IMAGES_DIR[@l,t,r,b] | lfw:DIR | lfw-view2:DIR |
synthetic[:N_PAIRS[:SEED]].
"""
from facekd_jax.data.images import CORRUPT, ImageDecodeError
from facekd_jax.data.pipeline import corrupt_skipped, dataset_options, make_train_dataset
from facekd_jax.data.sources import open_source
from facekd_jax.data.specs import DataSpec, SpecError, parse as parse_spec
from facekd_jax.data.synthetic import parse_spec as parse_synthetic_spec
from facekd_jax.data.synthetic import verification_pairs
from facekd_jax.data.verification import load_verification, verification_name

__all__ = [
    "CORRUPT", "DataSpec", "ImageDecodeError", "SpecError", "corrupt_skipped", "dataset_options", "load_verification",
    "make_train_dataset", "open_source", "parse_spec", "parse_synthetic_spec", "verification_name",
    "verification_pairs",
]
