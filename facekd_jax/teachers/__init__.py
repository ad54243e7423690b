"""Pretrained teachers from outside the project, and the teacher-embedding cache.

dlib_format: dlib's face-descriptor network (dlib_face_recognition_resnet_model_v1.dat, 128-d) read in pure
  Python + NumPy into the variables of facekd_jax.models.dlib_resnet.DlibResNet29.
imported: foreign weights -> an ordinary teacher run (`python -m facekd_jax.teachers import dlib --out=DIR`).
cache: every training image (and its mirror) embedded once by a teacher, memory-mapped, with the teacher's class
  centres (`python -m facekd_jax.teachers cache ...`; training with --config.teacher.cache=DIR).
"""
