"""Tests of facekd_jax.losses against independent float64 NumPy references written here (not the code under test)."""
import math
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from facekd_jax import kd as kd_lib
from facekd_jax import losses as L

HYP = settings(max_examples=25, deadline=None, derandomize=True)
S, M_ARC, M_COS = 64.0, 0.5, 0.35


# ---------------------------------------------------------------------------------------------------------------
# float64 NumPy references (independent formulations: arccos/angles, explicit differences, explicit softmax)
# ---------------------------------------------------------------------------------------------------------------


def np_onehot(labels, c):
    return np.eye(c, dtype=np.float64)[np.asarray(labels)]


def np_ce(logits, labels):
    z = np.asarray(logits, np.float64)
    zmax = z.max(axis=1, keepdims=True)
    lse = zmax[:, 0] + np.log(np.exp(z - zmax).sum(axis=1))
    return float(np.mean(lse - z[np.arange(len(z)), labels]))


def np_arcface_logits(cos, labels, s=S, m=M_ARC):
    """s * cos(theta + m) at the label while theta + m <= pi, else s * (cos - sin(pi - m) * m); s * cos elsewhere."""
    cos = np.asarray(cos, np.float64)
    theta = np.arccos(np.clip(cos, -1.0, 1.0))
    target = np.where(theta + m <= math.pi, np.cos(theta + m), cos - math.sin(math.pi - m) * m)
    oh = np_onehot(labels, cos.shape[1])
    return s * (oh * target + (1 - oh) * cos)


def np_cosface_logits(cos, labels, s=S, m3=M_COS):
    cos = np.asarray(cos, np.float64)
    return s * (cos - m3 * np_onehot(labels, cos.shape[1]))


def np_sphereface_target(cos, m1, m2=0.0, m3=0.0):
    t = m1 * np.arccos(np.clip(np.asarray(cos, np.float64), -1, 1)) + m2
    k = np.floor(t / math.pi)
    return (-1.0) ** k * np.cos(t) - 2 * k - m3


def np_softmax(z):
    z = np.asarray(z, np.float64)
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def np_hinton(zs, zt, temperature):
    ps, pt = np_softmax(np.asarray(zs, np.float64) / temperature), np_softmax(np.asarray(zt, np.float64) / temperature)
    return temperature**2 * float(np.mean(np.sum(pt * (np.log(pt) - np.log(ps)), axis=1)))


def np_unit(x):
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def np_smooth_l1(x):
    a = np.abs(x)
    return np.where(a < 1, 0.5 * x * x, a - 0.5)


def np_rkd_psi_d(x):
    x = np.asarray(x, np.float64)
    d = np.linalg.norm(x[:, None, :] - x[None, :, :], axis=-1)
    return d / d[d > 0].mean()


def np_rkd_distance(s, t):
    """Park et al.'s code: pairwise distances (zero diagonal) / mean of the positive ones, smooth-L1 mean over B^2."""
    return float(np.mean(np_smooth_l1(np_rkd_psi_d(s) - np_rkd_psi_d(t))))


def np_rkd_angle(s, t):
    """Park et al.'s code: e_ij = normalize(x_j - x_i) (zero vector when i == j), <e_ij, e_ik>, mean over B^3."""

    def psi(x):
        x = np.asarray(x, np.float64)
        e = x[None, :, :] - x[:, None, :]
        n = np.linalg.norm(e, axis=-1, keepdims=True)
        e = e / np.maximum(n, 1e-12)
        return np.einsum("ijd,ikd->ijk", e, e)

    return float(np.mean(np_smooth_l1(psi(s) - psi(t))))


def rel_close(a, b, rtol=1e-5, atol=1e-6):
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=rtol, atol=atol)


def random_cosines(seed, b, c, spread=1.0):
    """Uniform cosines in [-spread, spread) (NumPy: jax.random would compile a program per shape)."""
    return jnp.asarray(np.random.default_rng(seed).uniform(-spread, spread, (b, c)), jnp.float32)


def normal(seed, shape):
    """Standard normal samples, float32 (NumPy, as random_cosines)."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def random_unit_cosines(seed, b=32, c=100, e=64):
    """Cosines of random unit embeddings and unit centres (the regime of a real head)."""
    rng = np.random.default_rng(seed)
    emb, w = np_unit(rng.normal(size=(b, e))), np_unit(rng.normal(size=(c, e)))
    return (emb @ w.T).astype(np.float32), rng.integers(0, c, size=b)


# ---------------------------------------------------------------------------------------------------------------
# margin_logits
# ---------------------------------------------------------------------------------------------------------------


def test_zero_margin_gives_s_cos():
    cos = random_cosines(0, 8, 11)
    labels = jnp.arange(8) % 11
    out = jax.jit(lambda c: L.margin_logits(c, labels, s=S, m1=1.0, m2=0.0, m3=0.0))(cos)
    rel_close(out, S * np.asarray(cos, np.float64), rtol=1e-6)
    # The same through the angular code path (m2 given as an array of zeros): cos*1 - sin*0.
    out_arr = jax.jit(lambda c: L.margin_logits(c, labels, s=S, m2=jnp.zeros(8)))(cos)
    rel_close(out_arr, S * np.asarray(cos, np.float64), rtol=1e-6)


def test_cosface_subtracts_s_m3_at_label_only():
    cos = random_cosines(1, 6, 9)
    labels = jnp.array([0, 3, 8, 8, 1, 5])
    out = np.asarray(L.margin_logits(cos, labels, s=S, m2=0.0, m3=M_COS), np.float64)
    plain = S * np.asarray(cos, np.float64)
    diff = plain - out
    expected = S * M_COS * np_onehot(labels, 9)
    np.testing.assert_allclose(diff, expected, atol=1e-4)
    rel_close(out, np_cosface_logits(cos, labels), rtol=1e-6)


@pytest.mark.parametrize("spread", [1.0, 0.3])
def test_arcface_values_match_arccos_reference(spread):
    cos = np.array(random_cosines(2, 64, 16, spread))
    labels = np.arange(64) % 16
    # Edges at the label: +-1, 0, either side of the fallback threshold cos(pi - m) (where the standard fallback
    # jumps: -1 vs cos(pi - m) - sin(pi - m) * m), and points beyond it.
    th = math.cos(math.pi - M_ARC)
    edges = [1.0, -1.0, 0.0, th + 1e-3, th - 1e-3, -0.99]
    cos[np.arange(6), labels[:6]] = edges
    out = L.margin_logits(cos, labels, s=S, m2=M_ARC)
    np.testing.assert_allclose(np.asarray(out, np.float64), np_arcface_logits(cos, labels), atol=2e-4 * S)
    if spread == 1.0:  # the fallback region theta + m > pi is exercised
        target = cos[np.arange(64), labels]
        assert (np.arccos(target) + M_ARC > math.pi).sum() >= 3


def test_label_row_only_changes():
    cos = random_cosines(3, 4, 7)
    labels = jnp.array([2, -1, 6, 0])  # -1: not on this shard, row unchanged
    out = np.asarray(L.margin_logits(cos, labels))
    plain = 64.0 * np.asarray(cos)
    changed = ~np.isclose(out, plain, rtol=0, atol=1e-4)
    expected = np.zeros((4, 7), bool)
    expected[[0, 2, 3], [2, 6, 0]] = True
    np.testing.assert_array_equal(changed, expected)


@pytest.mark.parametrize("name", ["arcface", "cosface"])
@pytest.mark.parametrize("data", ["uniform", "unit_embeddings"])
def test_margin_cross_entropy_matches_float64_reference(name, data):
    if data == "uniform":
        cos = np.asarray(random_cosines(4, 128, 50))
        labels = np.random.default_rng(5).integers(0, 50, 128)
    else:
        cos, labels = random_unit_cosines(6, b=128, c=200, e=64)
    if name == "arcface":
        ours = L.cross_entropy(L.margin_logits(cos, labels, s=S, m1=1.0, m2=M_ARC, m3=0.0), labels)
        ref = np_ce(np_arcface_logits(cos, labels), labels)
    else:
        ours = L.cross_entropy(L.margin_logits(cos, labels, s=S, m1=1.0, m2=0.0, m3=M_COS), labels)
        ref = np_ce(np_cosface_logits(cos, labels), labels)
    rel_close(ours, ref, rtol=1e-5)


def test_arcface_on_unit_embeddings_equals_plain_cos_theta_plus_m():
    # Real heads (random unit vectors) never reach the fallback, so cos(arccos(c) + m) is the whole story there.
    cos, labels = random_unit_cosines(7, b=64, c=300, e=128)
    oh = np_onehot(labels, 300)
    c64 = cos.astype(np.float64)
    ref = S * (oh * np.cos(np.arccos(c64) + M_ARC) + (1 - oh) * c64)
    rel_close(L.cross_entropy(L.margin_logits(cos, labels), labels), np_ce(ref, labels), rtol=1e-5)


def test_easy_margin_only_where_cos_positive():
    cos = np.asarray(random_cosines(8, 32, 5))
    labels = np.arange(32) % 5
    out = np.asarray(L.margin_logits(cos, labels, easy_margin=True), np.float64)
    c = cos.astype(np.float64)[np.arange(32), labels]
    expected_target = np.where(c > 0, np.cos(np.arccos(c) + M_ARC), c)
    rel_close(out[np.arange(32), labels], S * expected_target, rtol=1e-4, atol=1e-3)


def test_sphereface_matches_reference_and_is_monotonic():
    theta = np.linspace(0.0, math.pi, 721)
    cos = np.cos(theta).astype(np.float32)[:, None]
    labels = np.zeros(len(theta), np.int64)
    for m1, m2, m3 in [(1.35, 0.0, 0.0), (4.0, 0.0, 0.0), (1.2, 0.2, 0.1)]:
        out = np.asarray(L.margin_logits(cos, labels, s=1.0, m1=m1, m2=m2, m3=m3))[:, 0]
        np.testing.assert_allclose(out, np_sphereface_target(cos[:, 0], m1, m2, m3), atol=5e-3)
        assert np.all(np.diff(out) <= 1e-5), (m1, m2, m3)  # monotonic in theta: a margin, not a bump


def test_per_sample_margin_equals_scalar_rows():
    cos = random_cosines(9, 5, 6)
    labels = jnp.array([0, 1, 2, 3, 4])
    margins = [0.2, 0.25, 0.3, 0.45, 0.5]
    out = L.margin_logits(cos, labels, m2=jnp.array(margins))
    for i, m in enumerate(margins):
        np.testing.assert_allclose(out[i], L.margin_logits(cos, labels, m2=m)[i], rtol=1e-6, atol=1e-5)


MARGIN_VARIANTS = {
    "arcface": dict(m2=0.5),
    "arcface_easy": dict(m2=0.5, easy_margin=True),
    "arcface_straight_through": dict(m2=0.5, straight_through=True),
    "cosface": dict(m2=0.0, m3=0.35),
    "combined": dict(m1=1.0, m2=0.3, m3=0.2),
    "sphereface": dict(m1=1.35, m2=0.0),
    "sphere_arc_cos": dict(m1=1.2, m2=0.3, m3=0.1),
    "per_sample_m2": dict(m2=jnp.array([0.2, 0.3, 0.4, 0.5, 0.5, 0.2])),
}


@pytest.mark.parametrize("variant", sorted(MARGIN_VARIANTS))
def test_margin_values_and_gradients_finite_at_edges(variant):
    kw = MARGIN_VARIANTS[variant]
    cos = jnp.array(
        [[1.0, 0.5, -1.0], [-1.0, 0.0, 1.0], [0.0, 1.0, -1.0], [math.cos(math.pi - 0.5), 0.2, 0.3],
         [np.nextafter(np.float32(1), np.float32(0)), 0.0, 0.0], [1.0000001, -1.0000001, 0.0]],
        jnp.float32,
    )
    labels = jnp.array([0, 0, 0, 0, 0, 1])

    def loss(c):
        return L.cross_entropy(L.margin_logits(c, labels, **kw), labels)

    value, grad = jax.jit(jax.value_and_grad(loss))(cos)
    assert np.isfinite(value)
    assert np.all(np.isfinite(np.asarray(grad)))
    jac = jax.jit(jax.jacrev(lambda c: L.margin_logits(c, labels, **kw)))(cos)
    assert np.all(np.isfinite(np.asarray(jac)))


def test_arcface_gradient_matches_analytic_derivative():
    c = np.array([0.9, 0.5, 0.0, -0.5, -0.85, -0.95], np.float32)
    cos = jnp.asarray(c)[:, None]
    labels = jnp.zeros(len(c), jnp.int32)
    grad = jax.grad(lambda x: jnp.sum(L.margin_logits(x, labels, s=S, m2=M_ARC)))(cos)[:, 0]
    c64 = c.astype(np.float64)
    d = np.where(
        np.arccos(c64) + M_ARC <= math.pi,
        math.cos(M_ARC) + c64 * math.sin(M_ARC) / np.sqrt(1 - c64**2),
        1.0,
    )
    rel_close(grad, S * d, rtol=1e-4)


def test_straight_through_same_values_identity_gradient():
    cos = random_cosines(10, 8, 5, spread=0.9)
    labels = jnp.arange(8) % 5
    w = normal(11, (8, 5))
    st_out, g = jax.jit(jax.value_and_grad(
        lambda c: jnp.sum(w * L.margin_logits(c, labels, straight_through=True))))(cos)
    ref_out, g_true = jax.jit(jax.value_and_grad(lambda c: jnp.sum(w * L.margin_logits(c, labels))))(cos)
    np.testing.assert_allclose(st_out, ref_out, rtol=1e-6, atol=1e-4)
    np.testing.assert_allclose(g, S * w, rtol=1e-6)
    assert not np.allclose(g_true, S * w)  # the default path does differentiate through the margin


# ---------------------------------------------------------------------------------------------------------------
# MarginHead
# ---------------------------------------------------------------------------------------------------------------


def test_margin_head_init_and_cosine():
    head = L.MarginHead(num_classes=1000)
    emb = normal(12, (6, 64)) * 3.0
    variables = head.init(jax.random.key(13), emb)
    kernel = np.asarray(variables["params"]["kernel"])
    assert kernel.shape == (64, 1000) and kernel.dtype == np.float32
    assert abs(kernel.std() - 0.01) < 0.0005 and abs(kernel.mean()) < 0.0005
    cos = np.asarray(head.apply(variables, emb))
    ref = np_unit(np.asarray(emb)) @ np_unit(kernel.T).T
    np.testing.assert_allclose(cos, ref, atol=1e-5)
    assert cos.shape == (6, 1000) and np.all(np.abs(cos) <= 1 + 1e-6)


def test_margin_head_class_axis_shards_without_gather():
    if jax.device_count() < 8:
        pytest.skip("needs the 8 fake CPU devices of tests/conftest.py")
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    head = L.MarginHead(num_classes=64)
    emb = normal(14, (16, 8))
    labels = jnp.arange(16) % 64
    params = head.init(jax.random.key(15), emb)

    def loss(p, e, y):
        return L.cross_entropy(L.margin_logits(head.apply(p, e), y), y)

    shard = (
        jax.tree.map(lambda _: NamedSharding(mesh, P(None, "model")), params),
        NamedSharding(mesh, P("data", None)),
        NamedSharding(mesh, P("data")),
    )
    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)), in_shardings=shard)
    hlo = fn.lower(params, emb, labels).compile().as_text()
    ops = set(re.findall(r"\b(all-gather|gather|all-to-all|all-reduce)\b", hlo))
    assert "all-gather" not in ops and "gather" not in ops, ops
    assert "all-reduce" in ops  # the class axis really is split (softmax sums across shards)
    value, _ = fn(params, emb, labels)
    np.testing.assert_allclose(value, loss(params, emb, labels), rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# KD losses
# ---------------------------------------------------------------------------------------------------------------

_hinton_jit = jax.jit(L.hinton_kd)
logits_strategy = hnp.arrays(np.float32, (4, 7), elements=st.floats(-60, 60, width=32))


@HYP
@given(zs=logits_strategy, zt=logits_strategy, temperature=st.floats(0.5, 10.0))
def test_hinton_nonnegative_and_zero_on_itself(zs, zt, temperature):
    value = float(_hinton_jit(zs, zt, temperature))
    assert value >= -1e-5 * temperature**2
    assert float(_hinton_jit(zs, zs, temperature)) == 0.0


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_hinton_matches_textbook(temperature):
    zs = np.asarray(normal(16, (16, 30)) * 5)
    zt = np.asarray(normal(17, (16, 30)) * 5)
    rel_close(L.hinton_kd(zs, zt, temperature), np_hinton(zs, zt, temperature), rtol=1e-5)


def test_hinton_is_not_symmetric_direction_teacher_to_student():
    zs = np.array([[4.0, 0.0, 0.0]], np.float32)
    zt = np.array([[0.0, 0.0, 0.0]], np.float32)
    rel_close(L.hinton_kd(zs, zt, 1.0), np_hinton(zs, zt, 1.0), rtol=1e-5)
    assert abs(float(L.hinton_kd(zs, zt, 1.0)) - np_hinton(zt, zs, 1.0)) > 0.1


def test_feature_kd_matches_textbook_and_zero_on_itself():
    s = np.asarray(normal(18, (10, 32)))
    t = np.asarray(normal(19, (10, 32))) * 7
    cos = np.sum(np_unit(s) * np_unit(t), axis=1)
    rel_close(L.feature_kd(s, t, kind="mse"), np.mean((np_unit(s) - np_unit(t)) ** 2), rtol=1e-5)
    rel_close(L.feature_kd(s, t, kind="mse"), np.mean(2 - 2 * cos) / 32, rtol=1e-5)
    rel_close(L.feature_kd(s, t, kind="cosine"), np.mean(1 - cos), rtol=1e-5)
    for kind in ("mse", "cosine"):
        assert abs(float(L.feature_kd(s, s, kind=kind))) < 1e-6
    with pytest.raises(ValueError, match="kind"):
        L.feature_kd(s, t, kind="l1")


_feature_jit = {k: jax.jit(lambda a, b, k=k: L.feature_kd(a, b, kind=k)) for k in ("mse", "cosine")}
emb_strategy = hnp.arrays(np.float32, (5, 8), elements=st.floats(-3, 3, width=32)).filter(
    lambda x: np.all(np.linalg.norm(x, axis=1) > 0.1))


@HYP
@given(s=emb_strategy, t=emb_strategy, a=st.floats(1e-2, 1e2), b=st.floats(1e-2, 1e2))
def test_feature_kd_scale_invariant(s, t, a, b):
    for fn in _feature_jit.values():
        np.testing.assert_allclose(fn(a * s, b * t), fn(s, t), rtol=1e-4, atol=1e-6)


_rkd_d_jit, _rkd_a_jit = jax.jit(L.rkd_distance), jax.jit(L.rkd_angle)


def test_rkd_matches_textbook():
    s = np.asarray(normal(20, (12, 16)))
    t = np.asarray(normal(21, (12, 24))) * 3 + 1
    rel_close(_rkd_d_jit(s, t), np_rkd_distance(s, t), rtol=1e-4)
    rel_close(_rkd_a_jit(s, t), np_rkd_angle(s, t), rtol=1e-4)
    assert float(_rkd_d_jit(s, s)) < 1e-8 and float(_rkd_a_jit(s, s)) < 1e-8
    # An outlier row puts the normalised-distance differences in the linear part of smooth-L1 (|x| > 1).
    outlier = s.copy()
    outlier[0] = 30.0
    rel_close(_rkd_d_jit(outlier, t), np_rkd_distance(outlier, t), rtol=1e-4)
    assert np.abs(np_rkd_psi_d(outlier) - np_rkd_psi_d(t)).max() > 1.5  # the linear regime really is reached


@HYP
@given(a=st.floats(1e-2, 1e2), b=st.floats(1e-2, 1e2), shift=st.floats(-5, 5))
def test_rkd_scale_and_translation_invariant(a, b, shift):
    s = np.asarray(normal(22, (8, 6)))
    t = np.asarray(normal(23, (8, 10)))
    base_d, base_a = _rkd_d_jit(s, t), _rkd_a_jit(s, t)
    np.testing.assert_allclose(_rkd_d_jit(a * s, a * t), base_d, rtol=1e-4)  # common scale
    np.testing.assert_allclose(_rkd_d_jit(a * s + shift, b * t), base_d, rtol=1e-4)
    np.testing.assert_allclose(_rkd_a_jit(a * s + shift, b * t - shift), base_a, rtol=1e-4)



def test_rkd_angle_is_accurate_for_near_duplicate_embeddings():
    """Nearly equal rows (one person's crops) among distant ones: float32 must follow float64, not blow up (the
    Gram-matrix form gave 1.4e7 here where float64 gives 0.05)."""
    rng = np.random.default_rng(5)
    far = rng.standard_normal((4, 64)) * 10
    near = far[0] + 1e-4 * rng.standard_normal((4, 64))
    s = np.concatenate([far, near]).astype(np.float32)
    t = rng.standard_normal((8, 32)).astype(np.float32)
    got = float(_rkd_a_jit(s, t))
    want = np_rkd_angle(s.astype(np.float64), t)
    assert np.isfinite(got) and got == pytest.approx(want, rel=1e-3)


def test_rkd_finite_gradient_with_duplicate_rows():
    s = normal(24, (6, 4)).at[1].set(0).at[2].set(0)  # two identical rows
    t = normal(25, (6, 5))
    for fn in (L.rkd_distance, L.rkd_angle):
        g = jax.jit(jax.grad(fn))(s, t)
        assert np.all(np.isfinite(np.asarray(g))) and np.any(np.asarray(g) != 0)


def test_cosine_matrix_kd_matches_textbook():
    s = np.asarray(normal(26, (9, 12)))
    t = np.asarray(normal(27, (9, 20)))
    ss, tt = np_unit(s) @ np_unit(s).T, np_unit(t) @ np_unit(t).T
    rel_close(L.cosine_matrix_kd(s, t), np.mean((ss - tt) ** 2), rtol=1e-5)
    assert float(L.cosine_matrix_kd(s, s)) < 1e-10
    row_scales = np.linspace(0.1, 10, 9)[:, None]
    rel_close(L.cosine_matrix_kd(s * row_scales, t * 3), np.mean((ss - tt) ** 2), rtol=1e-4)


def test_adaptive_margin_formula_and_constant():
    tc = np.asarray(random_cosines(28, 8, 5))
    labels = np.arange(8) % 5
    d = np.maximum(tc[np.arange(8), labels].astype(np.float64), 0)
    expected = (0.5 - 0.2) / d.max() * d + 0.2
    m = L.adaptive_margin(tc, labels, m_min=0.2, m_max=0.5)
    rel_close(m, expected, rtol=1e-6)
    assert float(m.min()) >= 0.2 - 1e-7 and abs(float(m.max()) - 0.5) < 1e-6
    g = jax.grad(lambda c: jnp.sum(L.adaptive_margin(c, labels)))(jnp.asarray(tc))
    assert np.all(np.asarray(g) == 0)


KD_FUNCS = {
    "margin_ce": lambda a, b: L.cross_entropy(L.margin_logits(a[:, :7], jnp.arange(6) % 7), jnp.arange(6) % 7),
    "hinton": lambda a, b: L.hinton_kd(a, b, 4.0),
    "feature_mse": lambda a, b: L.feature_kd(a, b, "mse"),
    "feature_cosine": lambda a, b: L.feature_kd(a, b, "cosine"),
    "rkd_distance": L.rkd_distance,
    "rkd_angle": L.rkd_angle,
    "cosine_matrix": L.cosine_matrix_kd,
}


@pytest.mark.parametrize("name", sorted(KD_FUNCS))
def test_every_loss_under_jit_and_grad(name):
    fn = KD_FUNCS[name]
    a = jnp.tanh(normal(29, (6, 8)))
    b = jnp.tanh(normal(30, (6, 8)))
    eager = fn(a, b)
    value, (ga, gb) = jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))(a, b)
    np.testing.assert_allclose(value, eager, rtol=1e-5, atol=1e-7)
    assert value.shape == () and value.dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(ga))) and np.any(np.asarray(ga) != 0)
    assert np.all(np.isfinite(np.asarray(gb)))


# ---------------------------------------------------------------------------------------------------------------
# compute_loss
# ---------------------------------------------------------------------------------------------------------------


def _batch(b=8, c=10, e_s=16, e_t=24, seed=31):
    keys = jax.random.split(jax.random.key(seed), 4)
    return dict(
        labels=jnp.arange(b) % c,
        student_embeddings=jax.random.normal(keys[0], (b, e_s)),
        student_cosine=jnp.tanh(jax.random.normal(keys[1], (b, c))),
        teacher_embeddings=jax.random.normal(keys[2], (b, e_t)),
        teacher_cosine=jnp.tanh(jax.random.normal(keys[3], (b, c))),
    )


def test_compute_loss_ce_only_by_default():
    batch = _batch()
    total, terms = kd_lib.compute_loss({}, labels=batch["labels"], student_embeddings=batch["student_embeddings"],
                                  student_cosine=batch["student_cosine"])
    assert set(terms) == {"ce", "total"}
    ref = np_ce(np_arcface_logits(np.asarray(batch["student_cosine"]), np.asarray(batch["labels"])),
                np.asarray(batch["labels"]))
    rel_close(total, ref, rtol=1e-5)
    rel_close(terms["ce"], ref, rtol=1e-5)


def test_compute_loss_only_weighted_terms_and_weighted_sum():
    batch = _batch()
    b = {k: np.asarray(v) for k, v in batch.items()}
    kd = ml_collections.ConfigDict(dict(
        ce_weight=0.5, hinton_weight=0.7, temperature=2.0, hinton_logits="plain",
        feature_weight=100.0, feature_kind="cosine", rkd_distance_weight=0.0, rkd_angle_weight=2.0,
        cosine_matrix_weight=3.0))
    b["teacher_embeddings"] = b["teacher_embeddings"][:, :16]  # feature KD needs equal sizes
    total, terms = jax.jit(lambda x: kd_lib.compute_loss(kd, scale=32.0, **x))(b)
    assert set(terms) == {"ce", "hinton", "feature", "rkd_angle", "cosine_matrix", "total"}
    y = b["labels"]
    ref = dict(
        ce=np_ce(np_arcface_logits(b["student_cosine"], y, s=32.0), y),
        hinton=np_hinton(32.0 * b["student_cosine"], 32.0 * b["teacher_cosine"], 2.0),
        feature=float(np.mean(1 - np.sum(np_unit(b["student_embeddings"]) * np_unit(b["teacher_embeddings"]), 1))),
        rkd_angle=np_rkd_angle(b["student_embeddings"], b["teacher_embeddings"]),
        cosine_matrix=float(np.mean((np_unit(b["student_embeddings"]) @ np_unit(b["student_embeddings"]).T
                                  - np_unit(b["teacher_embeddings"]) @ np_unit(b["teacher_embeddings"]).T) ** 2)),
    )
    for name, value in ref.items():
        rel_close(terms[name], value, rtol=1e-4)
    weights = dict(ce=0.5, hinton=0.7, feature=100.0, rkd_angle=2.0, cosine_matrix=3.0)
    rel_close(total, sum(weights[k] * ref[k] for k in weights), rtol=1e-4)
    rel_close(terms["total"], total, rtol=0, atol=0)


def test_compute_loss_margin_hinton_and_adaptive_margin():
    batch = _batch()
    b = {k: np.asarray(v) for k, v in batch.items()}
    y = b["labels"]
    kd = dict(hinton_weight=1.0, hinton_logits="margin", temperature=4.0, adaptive_margin=True,
              margin_min=0.2, margin_max=0.5, teacher_centres=True)
    total, terms = kd_lib.compute_loss(kd, **batch)
    d = np.maximum(b["teacher_cosine"][np.arange(len(y)), y].astype(np.float64), 0)
    m_i = 0.3 / d.max() * d + 0.2
    c = b["student_cosine"][np.arange(len(y)), y].astype(np.float64)
    theta = np.arccos(c)
    student = S * b["student_cosine"].astype(np.float64)
    student[np.arange(len(y)), y] = S * np.where(
        theta + m_i <= math.pi, np.cos(theta + m_i), c - np.sin(math.pi - m_i) * m_i)
    teacher = np_arcface_logits(b["teacher_cosine"], y)
    rel_close(terms["ce"], np_ce(student, y), rtol=1e-5)
    rel_close(terms["hinton"], np_hinton(student, teacher, 4.0), rtol=1e-4)
    rel_close(total, np_ce(student, y) + np_hinton(student, teacher, 4.0), rtol=1e-4)


def test_compute_loss_unknown_key_and_missing_teacher():
    batch = _batch()
    with pytest.raises(KeyError, match="kd.hinton_wieght") as info:
        kd_lib.compute_loss({"hinton_wieght": 1.0}, **batch)
    assert "hinton_weight" in str(info.value)  # lists the valid keys
    with pytest.raises(ValueError, match="kd.feature_weight"):
        kd_lib.compute_loss({"feature_weight": 1.0}, labels=batch["labels"],
                       student_embeddings=batch["student_embeddings"], student_cosine=batch["student_cosine"])
    with pytest.raises(ValueError, match="kd.hinton_logits"):
        kd_lib.compute_loss({"hinton_weight": 1.0, "hinton_logits": "soft"}, **batch)


def test_compute_loss_teacher_gradient_is_exactly_zero():
    batch = _batch(e_t=16)
    kd = dict(ce_weight=1.0, hinton_weight=1.0, hinton_logits="margin", feature_weight=100.0, rkd_distance_weight=1.0,
              rkd_angle_weight=2.0, cosine_matrix_weight=1.0, adaptive_margin=True)

    def loss(s_emb, s_cos, t_emb, t_cos):
        return kd_lib.compute_loss(kd, labels=batch["labels"], student_embeddings=s_emb, student_cosine=s_cos,
                              teacher_embeddings=t_emb, teacher_cosine=t_cos)[0]

    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(
        batch["student_embeddings"], batch["student_cosine"], batch["teacher_embeddings"], batch["teacher_cosine"])
    assert np.all(np.asarray(grads[2]) == 0) and np.all(np.asarray(grads[3]) == 0)
    assert np.any(np.asarray(grads[0]) != 0) and np.any(np.asarray(grads[1]) != 0)
    assert all(np.all(np.isfinite(np.asarray(g))) for g in grads)
