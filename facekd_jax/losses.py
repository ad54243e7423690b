"""Margin logits (ArcFace / CosFace / SphereFace), cross-entropy and knowledge-distillation losses.

Every function here is pure `jax.numpy`, safe under `jax.jit` and `jax.grad`, and does its math in float32
(inputs are cast). Shapes: B = batch, C = classes, E / D = embedding sizes. The class axis C is only touched by
element-wise ops, reductions and a matmul, never by a gather, so it can be sharded over a ``"model"`` mesh axis
(class-parallel head, as PartialFC with sample_rate = 1) and XLA inserts all-reduces, not all-gathers.

The registry of KD methods and the composer the train step calls (CE on the margin logits plus the configured
KD terms) are facekd_jax.kd.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = [
    "MarginHead",
    "adaptive_margin",
    "cross_entropy",
    "feature_kd",
    "hinton_kd",
    "l2_normalize",
    "margin_logits",
    "rkd_angle",
    "rkd_distance",
    "cosine_matrix_kd",
    "similarity_preserving",
    "grouped_kd",
    "ekd_loss",
    "ekd_update",
    "adadistill_loss",
    "adadistill_update",
]

# Floor of 1 - cos^2 under the square root: keeps sin and its gradient finite at cos = +-1. float32 values of
# 1 - cos^2 are either 0 or >= ~1.2e-7, so this floor only changes the value at exactly +-1 (by ~1e-6).
_SIN2_FLOOR = 1e-12
# Batch Gram matrices of the KD losses are cheap ([B, B]) but cancel (distances from Gram entries), so they use
# full float32 even where a float32 matmul would default to bf16 passes (TPU) or TF32 (GPU).
_GRAM_PRECISION = jax.lax.Precision.HIGHEST
# Floor of the squared norm in L2 normalisation (as torch.nn.functional.normalize's eps=1e-12 on the norm).
_NORM2_FLOOR = 1e-24
# log(0) as a finite number (see grouped_kd).
_LOG_ZERO = -1e30


def _f32(x) -> jax.Array:
    return jnp.asarray(x, jnp.float32)


def _is_static(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _clip_unit(x: jax.Array) -> jax.Array:
    """Clip to [-1, 1] with gradient 1 on the closed interval (jnp.clip gives 0.5 at exactly +-1), 0 outside."""
    return jnp.where((x >= -1.0) & (x <= 1.0), x, jnp.clip(x, -1.0, 1.0))


def _safe_sin(cos: jax.Array) -> jax.Array:
    """sin(arccos(cos)) = sqrt(1 - cos^2) for cos in [-1, 1]; finite value and gradient at +-1."""
    return jnp.sqrt(jnp.maximum(1.0 - cos * cos, _SIN2_FLOOR))


@jax.custom_jvp
def _safe_arccos(cos: jax.Array) -> jax.Array:
    """arccos for cos in [-1, 1] with derivative -1/sin(theta), sin floored at 1e-6 (finite at +-1)."""
    return jnp.arctan2(_safe_sin(cos), cos)


@_safe_arccos.defjvp
def _safe_arccos_jvp(primals, tangents):
    (cos,), (dcos,) = primals, tangents
    # Keeps the chain rule's limit: d cos(m1*theta)/dcos -> m1^2 at cos = 1 (sin(m1*theta)/sin(theta) -> m1).
    return _safe_arccos(cos), -dcos / _safe_sin(cos)


def l2_normalize(x: jax.Array, axis: int = -1) -> jax.Array:
    """x / ||x|| along `axis` in float32; a zero vector stays zero (finite gradient)."""
    x = _f32(x)
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=axis, keepdims=True), _NORM2_FLOOR))


def _label_mask(labels: jax.Array, num_classes: int) -> jax.Array:
    """bool [B, C], True at (i, labels[i]); a label outside [0, C) (e.g. -1) gives an all-False row."""
    labels = jnp.asarray(labels)
    # An iota comparison (element-wise over C, so a sharded class axis needs no gather; no take_along_axis).
    return labels[:, None] == jnp.arange(num_classes, dtype=labels.dtype)[None, :]


# --------------------------------------------------------------------------------------------------------------
# Margin logits and the margin head
# --------------------------------------------------------------------------------------------------------------


def _angular_target(cos: jax.Array, m1: float, m2, easy_margin: bool) -> jax.Array:
    """cos(m1 * theta + m2) for the target cosines `cos` [B] (already in [-1, 1]), with the fallbacks.

    m1 == 1 (ArcFace): cos*cos(m2) - sin*sin(m2) where cos > cos(pi - m2), else cos - sin(pi - m2) * m2.
    m1 != 1 (SphereFace): psi(t) = (-1)^k cos(t) - 2k, t = m1 * theta + m2, k = floor(t / pi), the
    monotonic extension of Liu et al. 2017; theta from a safe arccos (derivative -1/sin, sin floored).
    easy_margin: the margin value where cos > 0, cos itself elsewhere (replaces the fallback).
    """
    if m1 == 1.0:
        sin = _safe_sin(cos)
        if _is_static(m2):
            cos_m, sin_m = math.cos(m2), math.sin(m2)
            threshold, penalty = math.cos(math.pi - m2), math.sin(math.pi - m2) * m2
        else:
            m2 = _f32(m2)
            cos_m, sin_m = jnp.cos(m2), jnp.sin(m2)
            threshold, penalty = jnp.cos(jnp.pi - m2), jnp.sin(jnp.pi - m2) * m2
        with_margin = cos * cos_m - sin * sin_m
        if easy_margin:
            return jnp.where(cos > 0.0, with_margin, cos)
        # Beyond theta + m2 = pi, cos(theta + m2) would increase again: use the CosFace-like linear fallback.
        return jnp.where(cos > threshold, with_margin, cos - penalty)
    theta = _safe_arccos(cos)
    t = m1 * theta + (m2 if _is_static(m2) else _f32(m2))
    k = jax.lax.stop_gradient(jnp.floor(t / jnp.pi))
    psi = jnp.where(jnp.mod(k, 2.0) == 0.0, 1.0, -1.0) * jnp.cos(t) - 2.0 * k
    if easy_margin:
        return jnp.where(cos > 0.0, psi, cos)
    return psi


def margin_logits(
    cosine: jax.Array,
    labels: jax.Array,
    *,
    s: float = 64.0,
    m1: float = 1.0,
    m2: float | jax.Array = 0.5,
    m3: float = 0.0,
    easy_margin: bool = False,
    straight_through: bool = False,
) -> jax.Array:
    """Combined-margin logits of arcface_torch (SphereFace m1, ArcFace m2, CosFace m3), scaled by s.

    Args:
      cosine: float [B, C], cosines of L2-normalised embeddings and class centres, in [-1, 1] (values
        slightly outside are clipped for the angular part).
      labels: int [B], the class of each row; a label outside [0, C) (e.g. -1 for "not on this shard")
        leaves the row as s * cosine.
      s: scale. m1: multiplicative angular margin (static Python float). m2: additive angular margin, a float
        or a float array [B] (a per-sample margin, as MarginDistillation). m3: additive cosine margin.
      easy_margin: apply the angular margin only where cos > 0 (instead of the fallback below).
      straight_through: the values are the same, but the gradient is that of s * cosine (the margin is applied
        without gradient, as arcface_torch's current CombinedMarginLoss does under torch.no_grad()).

    Returns:
      float32 [B, C]: at (i, labels[i]) s * (f(cos) - m3), elsewhere s * cos, where with theta = arccos(cos)
      f = cos(theta + m2) = cos*cos(m2) - sin*sin(m2) when m1 == 1 and theta + m2 <= pi, and the standard
      fallback cos - sin(pi - m2) * m2 beyond (arcface_torch's older form, with true gradients; it jumps from
      -1 to cos(pi - m2) - sin(pi - m2) * m2 at the threshold, as the original does);
      f = (-1)^k cos(m1*theta + m2) - 2k, k = floor((m1*theta + m2) / pi) when m1 != 1 (SphereFace's
      monotonic extension). The m1 == 1 path never calls arccos. Values and gradients are finite for every
      cosine in [-1, 1], including exactly +-1 (sin is floored at 1e-6 under the square root).
      ArcFace = (1, 0.5, 0), CosFace = (1, 0, 0.35..0.4); (1, 0, 0) gives s * cos exactly.
    """
    cosine = _f32(cosine)
    if cosine.ndim != 2:
        raise ValueError(f"margin_logits: cosine must be [B, C], got shape {cosine.shape}")
    m1 = float(m1)
    mask = _label_mask(labels, cosine.shape[1])
    # Target cosines [B] by a masked reduction over C (an all-reduce when C is sharded, never a gather).
    target = jnp.sum(jnp.where(mask, cosine, 0.0), axis=1)
    angular = m1 != 1.0 or not (_is_static(m2) and m2 == 0.0)
    if angular:
        clipped = _clip_unit(target)
        new_target = _angular_target(clipped, m1, m2, easy_margin)
    else:
        new_target = target
    if not (_is_static(m3) and m3 == 0.0):
        new_target = new_target - m3
    if straight_through:
        new_target = target + jax.lax.stop_gradient(new_target - target)
    return s * jnp.where(mask, new_target[:, None], cosine)


class MarginHead(nn.Module):
    """Class centres W [E, C] (no bias), N(0, 0.01) init as arcface_torch / PartialFC.

    __call__(embeddings float [B, E]) -> cosine float32 [B, C] between the L2-normalised embeddings and the
    L2-normalised centres. W is normalised along axis 0 (per class column) only, so sharding W's class axis
    over a "model" mesh axis (PartitionSpec(None, "model")) needs no gather: the cosine comes out sharded on C.
    Feed it to `margin_logits`. `precision` is the matmul precision (None: the backend's float32 default,
    which is TF32 on recent GPUs and bf16 passes on TPU, like arcface_torch's fp16 head; "highest" for exact).
    `padded_classes` (> num_classes): W gets that many columns, so that its class axis splits evenly over the
    "model" axis (jit needs even shards; PartialFC splits unevenly); the extra columns are never read: the
    cosine returned is the first num_classes columns, so no loss, softmax or gradient sees them.
    """

    num_classes: int
    kernel_init: Any = nn.initializers.normal(stddev=0.01)
    precision: Any = None
    padded_classes: int = 0

    @nn.compact
    def __call__(self, embeddings: jax.Array) -> jax.Array:
        embeddings = _f32(embeddings)
        columns = max(self.num_classes, self.padded_classes)
        kernel = self.param("kernel", self.kernel_init, (embeddings.shape[-1], columns), jnp.float32)
        cos = jnp.matmul(l2_normalize(embeddings, axis=-1), l2_normalize(kernel, axis=0), precision=self.precision)
        return cos[..., :self.num_classes] if columns > self.num_classes else cos


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Batch mean of -log softmax(logits)[label]; logits float [B, C], labels int [B] -> float32 scalar."""
    log_probs = jax.nn.log_softmax(_f32(logits), axis=-1)
    mask = _label_mask(labels, log_probs.shape[-1])
    return -jnp.mean(jnp.sum(jnp.where(mask, log_probs, 0.0), axis=-1))


# --------------------------------------------------------------------------------------------------------------
# Knowledge-distillation losses
# --------------------------------------------------------------------------------------------------------------


def hinton_kd(student_logits: jax.Array, teacher_logits: jax.Array, temperature: float) -> jax.Array:
    """Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural Network".

    T^2 * mean_i KL(softmax(z_t,i / T) || softmax(z_s,i / T))
        = T^2 / B * sum_i sum_c p_t,ic (log p_t,ic - log p_s,ic).
    student_logits, teacher_logits: float [B, C] -> float32 scalar >= 0 (up to rounding, ~1e-7 relative).
    The T^2 factor keeps the gradient magnitude comparable to the CE term across temperatures.
    Applied to the ArcFace margin logits of both networks it is the thesis's "KD matched to the ArcFace
    objective" (see `compute_loss`, kd.hinton_logits = "margin"; MarginDistillation's logit KD, T = 4).
    """
    log_p_s = jax.nn.log_softmax(_f32(student_logits) / temperature, axis=-1)
    log_p_t = jax.nn.log_softmax(_f32(teacher_logits) / temperature, axis=-1)
    kl = jnp.sum(jnp.exp(log_p_t) * (log_p_t - log_p_s), axis=-1)
    return temperature**2 * jnp.mean(kl)


def feature_kd(student_embeddings: jax.Array, teacher_embeddings: jax.Array, kind: str = "mse") -> jax.Array:
    """Embedding (template) KD on L2-normalised embeddings; both float [B, D] -> float32 scalar.

    kind="mse": mean over B and D of (s_hat - t_hat)^2 = mean_i (2 - 2 cos_i) / D, the template KD of PocketNet
      (Boutros et al. 2022; used there as 100 * mse next to ArcFace).
    kind="cosine": mean_i (1 - cos(s_i, t_i)), the angular KD of ShrinkTeaNet (Duong et al. 2019).
    Invariant to a positive rescaling of either input (each row is normalised).
    """
    s_hat, t_hat = l2_normalize(student_embeddings), l2_normalize(teacher_embeddings)
    if s_hat.shape != t_hat.shape:
        raise ValueError(
            f"feature_kd: student {s_hat.shape} and teacher {t_hat.shape} embeddings must have the same shape")
    if kind == "mse":
        return jnp.mean(jnp.square(s_hat - t_hat))
    if kind == "cosine":
        return jnp.mean(1.0 - jnp.sum(s_hat * t_hat, axis=-1))
    raise ValueError(f"feature_kd: kind must be 'mse' or 'cosine', got {kind!r}")


def _smooth_l1(x: jax.Array) -> jax.Array:
    """Huber with delta 1 (torch smooth_l1_loss, beta=1): 0.5 x^2 if |x| < 1 else |x| - 0.5."""
    a = jnp.abs(x)
    return jnp.where(a < 1.0, 0.5 * x * x, a - 0.5)


def _pairwise_sq_dist(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Centred Gram form of squared Euclidean distances: (gram [B, B], sq [B, B]), x float32 [B, D]."""
    # Distances and angles are translation invariant; centring first limits the Gram-form cancellation.
    x = x - jnp.mean(x, axis=0, keepdims=True)
    gram = jnp.matmul(x, x.T, precision=_GRAM_PRECISION)
    sq_norm = jnp.diagonal(gram)
    return gram, jnp.maximum(sq_norm[:, None] + sq_norm[None, :] - 2.0 * gram, 0.0)


def _normalised_distances(x: jax.Array) -> jax.Array:
    """Pairwise Euclidean distances [B, B], zero diagonal, divided by the mean off-diagonal distance."""
    b = x.shape[0]
    _, sq = _pairwise_sq_dist(_f32(x))
    off = ~jnp.eye(b, dtype=bool)
    # Double where: the diagonal never reaches sqrt(0), whose gradient is infinite.
    d = jnp.where(off, jnp.sqrt(jnp.where(off, jnp.maximum(sq, 1e-12), 1.0)), 0.0)
    mean = jnp.sum(d) / (b * (b - 1))
    return d / jnp.maximum(mean, 1e-12)


def rkd_distance(student_embeddings: jax.Array, teacher_embeddings: jax.Array) -> jax.Array:
    """Distance-wise relational KD, Park, Kim, Lu & Cho 2019, "Relational Knowledge Distillation" (RKD-D).

    psi_D(x_i, x_j) = ||x_i - x_j|| / mu, mu = mean of the B(B-1) off-diagonal distances of the batch;
    loss = mean over all B x B pairs (diagonal included, where both are 0, as the authors' code) of
    smooth_l1(psi_D(s_i, s_j) - psi_D(t_i, t_j)).
    student_embeddings float [B, D_s], teacher_embeddings float [B, D_t] (D_s may differ from D_t), B >= 2
    -> float32 scalar. Takes the raw embeddings (the paper applies RKD to the embedding-network output, not to
    L2-normalised vectors). Invariant to translation and to a positive scale of either input. Memory O(B^2).
    Duplicate rows (distance 0) have a finite (zero) gradient.
    """
    if student_embeddings.shape[0] < 2:
        raise ValueError(f"rkd_distance: needs a batch of at least 2, got {student_embeddings.shape[0]}")
    d_s = _normalised_distances(student_embeddings)
    d_t = _normalised_distances(teacher_embeddings)
    return jnp.mean(_smooth_l1(d_s - d_t))


def _triplet_cosines(x: jax.Array) -> jax.Array:
    """[B, B, B] with [i, j, k] = cos of the angle at x_i between x_j and x_k; 0 where j == i or k == i.

    From normalised difference vectors e_ij = (x_j - x_i) / ||x_j - x_i||, as the RKD authors compute them: a
    Gram-matrix form (G_jk - G_ij - G_ik + G_ii) cancels catastrophically in float32 for near-duplicate rows
    (its "cosines" reached 1e7, the loss 20,489 where float64 gives 0.005). Memory O(B^2 D) for the differences.
    """
    x = _f32(x)
    diff = x[None, :, :] - x[:, None, :]                      # [i, j] = x_j - x_i
    sq = jnp.sum(diff * diff, axis=-1, keepdims=True)
    e = diff * jax.lax.rsqrt(jnp.maximum(sq, _NORM2_FLOOR))    # zero vector where x_j == x_i (e.g. j == i)
    return jnp.einsum("ijd,ikd->ijk", e, e, precision=_GRAM_PRECISION)


def rkd_angle(student_embeddings: jax.Array, teacher_embeddings: jax.Array) -> jax.Array:
    """Angle-wise relational KD, Park, Kim, Lu & Cho 2019, "Relational Knowledge Distillation" (RKD-A).

    psi_A(x_i, x_j, x_k) = <e_ij, e_ik>, e_ij = (x_j - x_i) / ||x_j - x_i||, the cosine of the angle at x_i;
    loss = mean over all B^3 triplets (0 for both where j == i or k == i, as the authors' code) of
    smooth_l1(psi_A(s) - psi_A(t)).
    student_embeddings float [B, D_s], teacher_embeddings float [B, D_t], B >= 3 -> float32 scalar.
    Raw embeddings, as the paper. Invariant to translation, rotation and positive scale of either input.
    Memory O(B^3): two [B, B, B] float32 tensors (B = 512: 0.5 GiB each), plus their gradients under grad.
    The paper weights it 2 against 1 for the distance term.
    """
    if student_embeddings.shape[0] < 3:
        raise ValueError(f"rkd_angle: needs a batch of at least 3, got {student_embeddings.shape[0]}")
    return jnp.mean(_smooth_l1(_triplet_cosines(student_embeddings) - _triplet_cosines(teacher_embeddings)))


def cosine_matrix_kd(student_embeddings: jax.Array, teacher_embeddings: jax.Array) -> jax.Array:
    """Cosine-matrix KD: mean over the B x B pairs of (S_s - S_t)^2, S = X_hat X_hat^T (cosines of unit rows).

    The face variant of similarity-preserving KD in TFace (`ekd/distillation/similarity_perserving.py`: unit
    embeddings, no row normalisation of S; there /B^2 of the summed squares, the same as this mean); Tung & Mori's
    own loss is `similarity_preserving`. student_embeddings float [B, D_s], teacher_embeddings float [B, D_t] ->
    float32 scalar; invariant to a positive rescaling of any row of either input.
    """
    s_hat, t_hat = l2_normalize(student_embeddings), l2_normalize(teacher_embeddings)
    s_sim = jnp.matmul(s_hat, s_hat.T, precision=_GRAM_PRECISION)
    t_sim = jnp.matmul(t_hat, t_hat.T, precision=_GRAM_PRECISION)
    return jnp.mean(jnp.square(s_sim - t_sim))


def similarity_preserving(student_features: jax.Array, teacher_features: jax.Array) -> jax.Array:
    """Similarity-preserving KD (Tung & Mori, ICCV 2019, eq. 2-4): G = Q Q^T of the flattened features Q [B, -1]
    (not normalised), each row of G L2-normalised, loss = ||G_t - G_s||_F^2 / B^2.

    The paper (and RepDistiller's distiller_zoo/SP.py, which its authors verified) compares activation maps before
    pooling; with an embedding-only teacher (a cache) the features are the embeddings. Any trailing shape is
    flattened. Invariant to one positive scale of all of either input (not per row: rows of G, not of Q, are
    normalised). -> float32 scalar.
    """
    b = student_features.shape[0]
    qs, qt = _f32(student_features).reshape(b, -1), _f32(teacher_features).reshape(b, -1)
    gs = l2_normalize(jnp.matmul(qs, qs.T, precision=_GRAM_PRECISION))
    gt = l2_normalize(jnp.matmul(qt, qt.T, precision=_GRAM_PRECISION))
    return jnp.sum(jnp.square(gt - gs)) / (b * b)


def grouped_kd(student_logits: jax.Array, teacher_logits: jax.Array, labels: jax.Array, *,
               temperature: float = 4.0, tau: float = 0.93, group_step: int = 100) -> tuple[jax.Array, jax.Array]:
    """Grouped KD (Zhao et al., AAAI 2023): (binary KD, primary KD), each KL(teacher || student) summed, times
    T^2 / B. The caller weighs them (the authors' gkd_adaptive.py, whose grouping this is: 1 and 4; secondary KD
    has weight 0 and is not computed).

    Grouping, as the authors' gkd_adaptive.py: P = the batch sum of the student's softmax (T = 1) per class,
    sorted; k = the smallest of 1, 1 + group_step, 1 + 2 group_step, ... whose top-k mass of P reaches tau * B
    (C if none); the primary group of sample i = its label and the k - 1 other classes of its highest student
    logits (the label's logit set above all others before the top-k). Binary KD: the two-way distributions (mass in the primary group, mass
    outside) at temperature T; primary KD: both softmaxes at T restricted to the primary group.
    student_logits, teacher_logits float [B, C] (margin logits of each network's own head), labels int [B].
    """
    s, t = _f32(student_logits), jax.lax.stop_gradient(_f32(teacher_logits))
    b, c = s.shape
    label_mask = _label_mask(labels, c)
    # The group size k from the student's batch confidence (no gradient through the grouping).
    mass = jnp.sort(jnp.sum(jax.nn.softmax(jax.lax.stop_gradient(s), axis=-1), axis=0))[::-1]
    cum = jnp.cumsum(mass)
    candidates = jnp.arange(1, c + 1, group_step)
    reached = cum[candidates - 1] >= tau * b
    k = jnp.where(jnp.any(reached), candidates[jnp.argmax(reached)], c)
    # Rank of each class in its row by the student's logits with the label put first (0 = highest): the group is
    # the label and the k - 1 other classes the student scores highest.
    order = jnp.argsort(-jnp.where(label_mask, jnp.inf, jax.lax.stop_gradient(s)), axis=-1)
    rank = jnp.argsort(order, axis=-1)
    primary = rank < k
    log_ps, log_pt = jax.nn.log_softmax(s / temperature, axis=-1), jax.nn.log_softmax(t / temperature, axis=-1)

    # Masked entries get a huge negative log instead of -inf: an empty group then has mass exp(-1e30) = 0 and
    # every gradient stays finite (the authors subtract 1000 from masked logits for the same reason).
    def group_mass(logp, mask):  # log of the probability mass inside / outside the group
        return (jax.nn.logsumexp(jnp.where(mask, logp, _LOG_ZERO), axis=-1),
                jax.nn.logsumexp(jnp.where(mask, _LOG_ZERO, logp), axis=-1))

    (si, so), (ti, to) = group_mass(log_ps, primary), group_mass(log_pt, primary)

    def kl_term(log_t, log_s):  # p_t (log p_t - log p_s)
        return jnp.exp(log_t) * (log_t - log_s)

    binary = jnp.sum(kl_term(ti, si) + kl_term(to, so))
    # Within the group: log-softmax restricted to it = log p - log(group mass).
    log_ps_p, log_pt_p = log_ps - si[:, None], log_pt - ti[:, None]
    primary_kl = jnp.sum(jnp.where(primary, kl_term(log_pt_p, log_ps_p), 0.0))
    scale = temperature * temperature / b
    return binary * scale, primary_kl * scale


# EKD's false-positive rates (1e-1 ... 1e-6) and its constants (TFace recognition/tasks/ekd/distillation/ekd.py).
EKD_FPRS = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6)


def _upper_pairs(x: jax.Array, labels: jax.Array):
    """Cosines of the unit rows of x for the pairs i < j: (values [P], same-label [P]), P = B(B-1)/2."""
    b = x.shape[0]
    x_hat = l2_normalize(x)
    sim = jnp.matmul(x_hat, x_hat.T, precision=_GRAM_PRECISION)
    i, j = jnp.triu_indices(b, k=1)
    return sim[i, j], labels[i] == labels[j]


def ekd_thresholds(similarities: jax.Array, negative: jax.Array) -> jax.Array:
    """The similarity at each EKD_FPRS of the negative pairs: the sorted (descending) negatives at
    floor(n_neg * fpr) (the hardest where that is 0). -> float32 [len(EKD_FPRS)]."""
    n_neg = jnp.sum(negative)
    ordered = jnp.sort(jnp.where(negative, similarities, -jnp.inf))[::-1]
    index = jnp.floor(n_neg * jnp.asarray(EKD_FPRS, jnp.float32)).astype(jnp.int32)
    return jnp.where(n_neg > 0, ordered[jnp.clip(index, 0, ordered.shape[0] - 1)], 0.0)


def ekd_init(num_classes: int, teacher_size: int) -> dict:
    """EKD's state: the EMA of each model's thresholds, starting at 0 (as the authors' buffers)."""
    del num_classes, teacher_size
    k = len(EKD_FPRS)
    return {"student_anchors": jnp.zeros((k,), jnp.float32), "teacher_anchors": jnp.zeros((k,), jnp.float32)}


def ekd_update(state: Mapping[str, jax.Array], student_embeddings, teacher_embeddings, labels, *,
               momentum: float = 0.01) -> dict:
    """anchors <- momentum * this batch's thresholds + (1 - momentum) * anchors, each model from its own negative
    pairs (before the loss uses them, as the authors do). No gradient."""
    s_sim, same = _upper_pairs(jax.lax.stop_gradient(_f32(student_embeddings)), labels)
    t_sim, _ = _upper_pairs(jax.lax.stop_gradient(_f32(teacher_embeddings)), labels)
    ema = lambda old, new: momentum * new + (1.0 - momentum) * old  # noqa: E731
    return {"student_anchors": ema(state["student_anchors"], ekd_thresholds(s_sim, ~same)),
            "teacher_anchors": ema(state["teacher_anchors"], ekd_thresholds(t_sim, ~same))}


def ekd_rank(similarities: jax.Array, anchors: jax.Array, tau: float = 0.01) -> jax.Array:
    """Soft count of the thresholds a pair passes: sum_a sigmoid((x - anchor_a) / tau), exponent within +-50."""
    z = jnp.clip((similarities[:, None] - anchors[None, :]) / tau, -50.0, 50.0)
    return jnp.sum(jax.nn.sigmoid(z), axis=-1)


def ekd_loss(state: Mapping[str, jax.Array], student_embeddings, teacher_embeddings, labels, *,
             tau: float = 0.01, hard_negatives: int = 2000, positive_weight: float = 0.02,
             negative_weight: float = 0.01) -> jax.Array:
    """Evaluation-oriented KD (Huang et al., CVPR 2022): the student's soft rank of each pair against its own
    thresholds at EKD_FPRS matches the teacher's (against the teacher's). positive_weight * MSE over the positive
    pairs + negative_weight * MSE over the `hard_negatives` negatives the student finds most similar (all of them
    when there are fewer). A batch without positive pairs contributes 0 for them. -> float32 scalar."""
    s_sim, same = _upper_pairs(student_embeddings, labels)
    t_sim, _ = _upper_pairs(jax.lax.stop_gradient(_f32(teacher_embeddings)), labels)
    diff2 = jnp.square(ekd_rank(s_sim, state["student_anchors"], tau) - ekd_rank(t_sim, state["teacher_anchors"], tau))
    positive = jnp.sum(jnp.where(same, diff2, 0.0)) / jnp.maximum(jnp.sum(same), 1)
    k = min(int(hard_negatives), s_sim.shape[0])
    _, hardest = jax.lax.top_k(jnp.where(same, -jnp.inf, jax.lax.stop_gradient(s_sim)), k)
    chosen = ~same[hardest]
    negative = jnp.sum(jnp.where(chosen, diff2[hardest], 0.0)) / jnp.maximum(jnp.sum(chosen), 1)
    return positive_weight * positive + negative_weight * negative


def adadistill_init(num_classes: int, teacher_size: int) -> dict:
    """AdaDistill's class centres [E_t, C] in the teacher's space, zero until a class is first seen (its first
    update then makes it that sample's teacher embedding: the rate's lower clamp; the authors start from small
    random values, with the same effect)."""
    return {"centres": jnp.zeros((teacher_size, num_classes), jnp.float32)}


def adadistill_update(state: Mapping[str, jax.Array], student_embeddings, teacher_embeddings, labels) -> dict:
    """AdaDistill (Boutros et al., ECCV 2024) centre update, before the loss uses the centres (authors'
    utils/losses.py, AdaptiveAArcFace, weighted rate): per sample, with unit s_i, t_i and the centre W_y before
    the update, lambda_i = clamp(cos(W_y, t_i), 1e-6, 1), alpha_i = clamp(cos(s_i, t_i) lambda_i, 1e-6, 1),
    W_y <- alpha_i W_y + (1 - alpha_i) t_i (not renormalised). Where a class occurs several times in a batch the
    authors' indexed write keeps an arbitrary one; here the class gets the mean of its samples' updates. The
    centres get no gradient. Returns the new state."""
    centres = state["centres"]
    s_hat = l2_normalize(jax.lax.stop_gradient(_f32(student_embeddings)))
    t_hat = l2_normalize(jax.lax.stop_gradient(_f32(teacher_embeddings)))
    onehot = _label_mask(labels, centres.shape[1]).astype(jnp.float32)                 # [B, C]
    w_y = jnp.matmul(onehot, centres.T, precision=_GRAM_PRECISION)                       # [B, E], class-axis matmul
    lam = jnp.clip(jnp.sum(l2_normalize(w_y) * t_hat, axis=-1), 1e-6, 1.0)
    alpha = jnp.clip(jnp.clip(jnp.sum(s_hat * t_hat, axis=-1), -1.0, 1.0) * lam, 1e-6, 1.0)
    updated = alpha[:, None] * w_y + (1.0 - alpha[:, None]) * t_hat                      # [B, E]
    count = jnp.sum(onehot, axis=0)                                                       # [C]
    summed = jnp.matmul(updated.T, onehot, precision=_GRAM_PRECISION)                     # [E, C]
    return {"centres": jnp.where(count[None, :] > 0, summed / jnp.maximum(count, 1.0)[None, :], centres)}


def adadistill_loss(state: Mapping[str, jax.Array], student_embeddings, labels, *, scale: float,
                    margin_list: tuple[float, float, float]) -> jax.Array:
    """CE of the margin logits (the run's margin: ArcFace's m2 or CosFace's m3) of the unit student embeddings
    against the unit AdaDistill centres: the student's only classifier in the paper (kd.ce_weight 0).

    The margin is `margin_logits`', the one every method here trains with: arcface_torch's cos(theta + m) with its
    linear fallback cos - m sin(pi - m) where theta + m would pass pi. The authors' AdaptiveAArcFace applies plain
    cos(theta + m) everywhere; the two differ only for target angles above 180 - m degrees (151 for m = 0.5), where
    plain cos(theta + m) turns back up and rewards a larger angle."""
    m1, m2, m3 = margin_list
    cos = jnp.matmul(l2_normalize(student_embeddings), l2_normalize(state["centres"], axis=0),
                     precision=_GRAM_PRECISION)
    return cross_entropy(margin_logits(_clip_unit(cos), labels, s=scale, m1=m1, m2=m2, m3=m3), labels)


def adaptive_margin(
    teacher_cosine: jax.Array, labels: jax.Array, *, m_min: float = 0.2, m_max: float = 0.5
) -> jax.Array:
    """Per-sample ArcFace margin of MarginDistillation (Svitov & Alyamkin 2020).

    d_i = max(cos(t_i, W_T[y_i]), 0) (teacher embedding vs its own class centre), then
    m_i = (m_max - m_min) / max_batch(d) * d_i + m_min, in [m_min, m_max]: samples the teacher finds easy get
    a larger margin. teacher_cosine float [B, C], labels int [B] -> float32 [B], a constant (stop_gradient).
    Pass the result as `m2` to `margin_logits` for the student (on the teacher's frozen centres).
    """
    teacher_cosine = jax.lax.stop_gradient(_f32(teacher_cosine))
    mask = _label_mask(labels, teacher_cosine.shape[1])
    d = jnp.maximum(jnp.sum(jnp.where(mask, teacher_cosine, 0.0), axis=1), 0.0)
    return (m_max - m_min) / jnp.maximum(jnp.max(d), 1e-12) * d + m_min
