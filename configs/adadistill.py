"""AdaDistill (Boutros et al., ECCV 2024): the student's only classifier is a table of class centres in the
teacher's space, each moved toward the teacher's embeddings of its class with an adaptive rate
(alpha = clamp(cos(s, t) * clamp(cos(W_y, t), 1e-6, 1), 1e-6, 1); W_y <- alpha W_y + (1 - alpha) t), before
the ArcFace CE on them. The student's own margin head is not used (kd.ce_weight 0), as the authors' optimiser holds
only the backbone. It needs only teacher embeddings, so it trains from a teacher-embedding cache.

Choices (the paper is silent): a class seen several times in one batch takes the mean of its samples' updates
(the authors' indexed write keeps one of them); centres start at zero (theirs at N(0, 0.01): either way a class's
first update makes its centre that teacher embedding). The authors use m = 0.45; here the run's margin_list, with
arcface_torch's linear fallback where theta + m passes 180 degrees (the authors apply plain cos(theta + m): the two
differ only for target angles above 151 degrees at m = 0.5; losses.adadistill_loss)."""
from facekd_jax import config_lib


def get_config(arg: str = ""):
    return config_lib.kd_config(arg, adadistill_weight=1.0, ce_weight=0.0)
