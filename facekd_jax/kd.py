"""The KD methods, one registry entry each, and the composer the train step calls.

  kd.KD_METHODS       every method: its loss (a function of facekd_jax.losses), what it needs from the teacher, its
                      config keys with their defaults; the `kd` config block, whether a run needs a teacher, the
                      logged terms and the validation of `kd.*` all derive from it
  kd.compute_loss     total = kd.ce_weight * ArcFace CE + the weighted KD terms, and each term for the logs
  kd.init_kd_state / update_kd_state   the state of stateful methods (EKD's thresholds, AdaDistill's centres)

Adding a method is one KDMethod entry here (and its loss in facekd_jax/losses.py) and a config file.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax

from facekd_jax.losses import (_f32, adadistill_init, adadistill_loss, adadistill_update, adaptive_margin,
                               cosine_matrix_kd, cross_entropy, ekd_init, ekd_loss, ekd_update, feature_kd,
                               grouped_kd, hinton_kd, margin_logits, rkd_angle, rkd_distance, similarity_preserving)

__all__ = ["KD_DEFAULTS", "KD_METHODS", "KDMethod", "active_methods", "compute_loss", "init_kd_state", "kd_needs",
           "kd_settings", "update_kd_state"]




@dataclasses.dataclass(frozen=True)
class KDMethod:
    """One KD method: the one place that says what it computes, what it needs and its config keys.

    name: the logged term (and `terms` key of compute_loss).
    switch: the config key that turns it on: a weight (on when != 0, the term's factor in the total) or, for a
      method with no loss of its own (loss None: it changes the CE instead), a bool flag.
    needs: what the train step must supply while it is on: "teacher_embeddings" (per image), "teacher_cosine"
      (teacher embeddings against the teacher's class centres), "teacher_centres" (the centres themselves).
    options: its further config keys with their defaults; choices: the allowed values of string options.
    loss: (inputs dict, settings dict) -> float32 scalar. inputs: labels, student_embeddings,
      student_kd_embeddings, student_cosine, logits (the student's CE logits), teacher_embeddings,
      teacher_cosine, scale, margin, kd_state (this method's state, for a stateful one).
    init, update: a stateful method's state (carried in the train state, checkpointed, never differentiated):
      init(num_classes, teacher_embedding_size) -> dict of arrays; update(state, inputs, settings) -> state, run
      before the loss of the same step reads it.
    """

    name: str
    switch: str
    needs: tuple[str, ...]
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    choices: Mapping[str, tuple] = dataclasses.field(default_factory=dict)
    loss: Callable[[dict, dict], jax.Array] | None = None
    switch_default: Any = 0.0
    init: Callable[[int, int], dict] | None = None
    update: Callable[[Mapping[str, jax.Array], dict, dict], dict] | None = None

    def active(self, settings: Mapping[str, Any]) -> bool:
        value = settings[self.switch]
        return bool(value) if isinstance(value, bool) or self.loss is None else float(value) != 0.0


def _hinton_term(x: dict, cfg: dict) -> jax.Array:
    m1, m2, m3 = x["margin"]
    if cfg["hinton_logits"] == "margin":  # the student's CE logits against the teacher's, margin at the label
        s_logits = x["logits"]
        t_logits = margin_logits(x["teacher_cosine"], x["labels"], s=x["scale"], m1=m1, m2=m2, m3=m3)
    else:
        s_logits, t_logits = x["scale"] * _f32(x["student_cosine"]), x["scale"] * x["teacher_cosine"]
    return hinton_kd(s_logits, t_logits, float(cfg["temperature"]))


def _pair_term(fn: Callable[..., jax.Array], student: str = "student_kd_embeddings",
               **option_keys: str) -> Callable[[dict, dict], jax.Array]:
    """A loss of (student embeddings, teacher embeddings) with keyword options read from the settings."""
    def term(x: dict, cfg: dict) -> jax.Array:
        return fn(x[student], x["teacher_embeddings"], **{arg: cfg[key] for arg, key in option_keys.items()})
    return term


def _grouped_term(x: dict, cfg: dict) -> jax.Array:
    """Binary KD + grouped_primary_weight * primary KD, on both networks' margin logits (the authors' CosFace
    heads carry the margin in both; here the run's margin)."""
    m1, m2, m3 = x["margin"]
    t_logits = margin_logits(x["teacher_cosine"], x["labels"], s=x["scale"], m1=m1, m2=m2, m3=m3)
    binary, primary = grouped_kd(x["logits"], t_logits, x["labels"], temperature=float(cfg["grouped_temperature"]),
                                 tau=float(cfg["grouped_tau"]), group_step=int(cfg["grouped_step"]))
    return binary + float(cfg["grouped_primary_weight"]) * primary


def _ekd_term(x: dict, cfg: dict) -> jax.Array:
    return ekd_loss(x["kd_state"], x["student_kd_embeddings"], x["teacher_embeddings"], x["labels"],
                    tau=float(cfg["ekd_tau"]), hard_negatives=int(cfg["ekd_hard_negatives"]))


def _ekd_update(state, x: dict, cfg: dict) -> dict:
    return ekd_update(state, x["student_kd_embeddings"], x["teacher_embeddings"], x["labels"])


def _adadistill_term(x: dict, cfg: dict) -> jax.Array:
    return adadistill_loss(x["kd_state"], x["student_kd_embeddings"], x["labels"], scale=x["scale"],
                           margin_list=x["margin"])


def _adadistill_update(state, x: dict, cfg: dict) -> dict:
    return adadistill_update(state, x["student_kd_embeddings"], x["teacher_embeddings"], x["labels"])


# Registry order is the order of the logged terms. A new method: one entry here and one config file.
KD_METHODS: tuple[KDMethod, ...] = (
    KDMethod("hinton", "hinton_weight", ("teacher_cosine",), {"temperature": 4.0, "hinton_logits": "plain"},
             {"hinton_logits": ("plain", "margin")}, _hinton_term),
    KDMethod("feature", "feature_weight", ("teacher_embeddings",), {"feature_kind": "mse"},
             {"feature_kind": ("mse", "cosine")}, _pair_term(feature_kd, kind="feature_kind")),
    KDMethod("rkd_distance", "rkd_distance_weight", ("teacher_embeddings",), loss=_pair_term(rkd_distance)),
    KDMethod("rkd_angle", "rkd_angle_weight", ("teacher_embeddings",), loss=_pair_term(rkd_angle)),
    KDMethod("cosine_matrix", "cosine_matrix_weight", ("teacher_embeddings",), loss=_pair_term(cosine_matrix_kd)),
    # Tung & Mori's similarity-preserving KD: B x B Gram matrices, so the student needs no projection.
    KDMethod("sp", "sp_weight", ("teacher_embeddings",),
             loss=_pair_term(similarity_preserving, student="student_embeddings")),
    KDMethod("grouped", "grouped_weight", ("teacher_cosine",),
             {"grouped_temperature": 4.0, "grouped_tau": 0.93, "grouped_step": 100, "grouped_primary_weight": 4.0},
             loss=_grouped_term),
    KDMethod("ekd", "ekd_weight", ("teacher_embeddings",), {"ekd_tau": 0.01, "ekd_hard_negatives": 2000},
             loss=_ekd_term, init=ekd_init, update=_ekd_update),
    KDMethod("adadistill", "adadistill_weight", ("teacher_embeddings",), loss=_adadistill_term,
             init=adadistill_init, update=_adadistill_update),
    # ProxylessKD: the student's CE runs on the teacher's frozen class centres (no loss of its own).
    KDMethod("teacher_centres", "teacher_centres", ("teacher_centres",), switch_default=False),
    # MarginDistillation: per-sample ArcFace margin from the teacher's cosine to its own centre.
    KDMethod("adaptive_margin", "adaptive_margin", ("teacher_cosine",), {"margin_min": 0.2, "margin_max": 0.5},
             switch_default=False),
)
KD_METHOD_BY_NAME = {m.name: m for m in KD_METHODS}

# Keys of the `kd` config block that belong to no single method.
KD_COMMON: dict[str, Any] = {
    "ce_weight": 1.0,
    # Where student and teacher embedding sizes differ, the teacher-space terms see the student's embedding
    # through a learned linear map used only in training (params["projection"]); False: sizes must match.
    "projection": False,
}


def _defaults() -> dict[str, Any]:
    out = dict(KD_COMMON)
    for m in KD_METHODS:
        out[m.switch] = m.switch_default
        out.update(m.options)
    return out


KD_DEFAULTS: dict[str, Any] = _defaults()


def kd_settings(kd: Mapping[str, Any] | None) -> dict[str, Any]:
    """KD_DEFAULTS overridden by `kd` (dict or ml_collections.ConfigDict); an unknown key -> KeyError naming it,
    a string option outside its method's choices -> ValueError."""
    settings = dict(KD_DEFAULTS)
    if kd is None:
        return settings
    for key in kd.keys():
        if key not in KD_DEFAULTS:
            raise KeyError(f"unknown kd config key kd.{key}; valid keys: {', '.join(sorted(KD_DEFAULTS))}")
        settings[key] = kd[key]
    for m in KD_METHODS:
        for key, allowed in m.choices.items():
            if settings[key] not in allowed:
                raise ValueError(f"kd.{key} must be one of {', '.join(map(repr, allowed))}, got {settings[key]!r}")
    return settings


def active_methods(kd: Mapping[str, Any] | None) -> tuple[KDMethod, ...]:
    """The methods `kd` turns on, in registry order."""
    settings = kd_settings(kd)
    return tuple(m for m in KD_METHODS if m.active(settings))


def kd_needs(kd: Mapping[str, Any] | None) -> frozenset[str]:
    """What the active methods need from the teacher (see KDMethod.needs); empty: no teacher at all."""
    return frozenset(n for m in active_methods(kd) for n in m.needs)


def init_kd_state(kd: Mapping[str, Any] | None, num_classes: int, teacher_embedding_size: int) -> dict | None:
    """{method name: its initial state} of the active stateful methods; None when there are none."""
    state = {m.name: m.init(num_classes, teacher_embedding_size) for m in active_methods(kd) if m.init is not None}
    return state or None


def update_kd_state(kd: Mapping[str, Any] | None, kd_state: Mapping[str, Any] | None, *, labels: jax.Array,
                    student_kd_embeddings: jax.Array, teacher_embeddings: jax.Array) -> dict | None:
    """Each active stateful method's state after this batch (no gradient flows into or out of it)."""
    if not kd_state:
        return kd_state
    cfg = kd_settings(kd)
    x = {"labels": labels, "student_kd_embeddings": jax.lax.stop_gradient(_f32(student_kd_embeddings)),
         "teacher_embeddings": jax.lax.stop_gradient(_f32(teacher_embeddings))}
    return {name: KD_METHOD_BY_NAME[name].update(state, x, cfg) for name, state in kd_state.items()}


def compute_loss(
    kd: Mapping[str, Any] | None,
    *,
    labels: jax.Array,
    student_embeddings: jax.Array,
    student_cosine: jax.Array,
    teacher_embeddings: jax.Array | None = None,
    teacher_cosine: jax.Array | None = None,
    scale: float = 64.0,
    margin_list: tuple[float, float, float] = (1.0, 0.5, 0.0),
    student_kd_embeddings: jax.Array | None = None,
    kd_state: Mapping[str, Any] | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Total loss = kd.ce_weight * CE(margin logits) + sum of the active KD terms (KD_METHODS) times their weights.

    Args:
      kd: mapping with keys of KD_DEFAULTS (missing keys take those defaults; an unknown key raises
        KeyError naming it). Weights are static Python numbers: a term with weight 0 is not computed.
      labels: int [B]. student_embeddings: float [B, E_s] raw backbone output.
      student_cosine: float [B, C], student embeddings against the centres in use (its own head, or the
        teacher's frozen head when kd.teacher_centres: ProxylessKD; the train step decides).
      teacher_embeddings: float [B, E_t] or None; teacher_cosine: float [B, C] (teacher embeddings against the
        teacher's centres) or None. Both are wrapped in stop_gradient here: no gradient reaches the teacher.
      scale, margin_list: s and (m1, m2, m3) of `margin_logits`.
      student_kd_embeddings: what the embedding terms compare with the teacher's (the student's embedding
        through kd.projection's map where sizes differ); default student_embeddings.
      kd_state: the stateful methods' states after this batch's update_kd_state ({name: state}).

    Terms (unweighted values, float32 scalars): "ce" (always), "total" (always), and one per active method
    with a loss: "hinton" (kd.hinton_logits "plain": conventional KD on s * cos of both; "margin": on the
    margin logits of both, the thesis's KD matched to the ArcFace objective), "feature", "rkd_distance",
    "rkd_angle", "cosine_matrix", "sp", "grouped", "ekd", "adadistill". kd.adaptive_margin (MarginDistillation): the student's m2 becomes
    adaptive_margin(teacher_cosine, labels, m_min=kd.margin_min, m_max=kd.margin_max) instead of margin_list[1].

    Returns: (total float32 scalar, terms dict[str, float32 scalar]).
    """
    cfg = kd_settings(kd)
    m1, m2, m3 = (float(m) for m in margin_list)
    given = {
        "teacher_embeddings": (None if teacher_embeddings is None
                               else jax.lax.stop_gradient(_f32(teacher_embeddings))),
        "teacher_cosine": None if teacher_cosine is None else jax.lax.stop_gradient(_f32(teacher_cosine)),
    }
    methods = [m for m in KD_METHODS if m.active(cfg)]
    for m in methods:
        for need in m.needs:
            if need in given and given[need] is None:
                raise ValueError(f"kd.{m.switch} is on but compute_loss got no {need}")

    student_m2 = m2
    if cfg["adaptive_margin"]:
        student_m2 = adaptive_margin(given["teacher_cosine"], labels, m_min=float(cfg["margin_min"]),
                                     m_max=float(cfg["margin_max"]))
    logits = margin_logits(student_cosine, labels, s=scale, m1=m1, m2=student_m2, m3=m3)
    terms: dict[str, jax.Array] = {"ce": cross_entropy(logits, labels)}
    total = float(cfg["ce_weight"]) * terms["ce"]
    inputs = dict(given, labels=labels, student_embeddings=student_embeddings, student_cosine=student_cosine,
                  logits=logits, scale=scale, margin=(m1, m2, m3),
                  student_kd_embeddings=student_embeddings if student_kd_embeddings is None
                  else student_kd_embeddings)
    for m in methods:
        if m.loss is None:
            continue
        if m.init is not None:
            if not kd_state or m.name not in kd_state:
                raise ValueError(f"kd.{m.switch} is on but compute_loss got no kd_state[{m.name!r}] "
                                 "(losses.init_kd_state, then update_kd_state each step)")
            inputs["kd_state"] = kd_state[m.name]
        terms[m.name] = m.loss(inputs, cfg)
        total = total + float(cfg[m.switch]) * terms[m.name]
    terms["total"] = total
    return total, terms
