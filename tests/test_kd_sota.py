"""SP, Grouped KD, EKD and AdaDistill in facekd_jax.losses against float64 NumPy transcriptions written here from the
papers / authors' code (RepDistiller SP.py, WisonZ/GKD gkd_adaptive.py, TFace ekd.py, AdaDistill utils/losses.py)."""
import math

import jax
import jax.numpy as jnp
import numpy as np

from facekd_jax import kd as kd_lib
from facekd_jax import losses as L


def close(a, b, rtol=1e-5, atol=1e-7):
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=rtol, atol=atol)


def l2n(x, axis=-1):
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), 1e-12)


def softmax(z):
    z = np.asarray(z, np.float64)
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def kl(a, b):  # sum a (log a - log b), 0 log 0 = 0
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    m = a > 0
    return float(np.sum(a[m] * (np.log(a[m]) - np.log(b[m]))))


# ----------------------------------------------- Similarity-preserving KD (Tung & Mori 2019)
def np_sp(fs, ft):
    b = fs.shape[0]
    gram = lambda f: l2n(np.asarray(f, np.float64).reshape(b, -1) @ np.asarray(f, np.float64).reshape(b, -1).T)
    return float(np.sum((gram(ft) - gram(fs)) ** 2) / b ** 2)


def test_sp_matches_reference_2d_and_4d():
    r = np.random.default_rng(0)
    for s_shape, t_shape in [((6, 5), (6, 9)), ((5, 4, 4, 3), (5, 2, 2, 7))]:
        fs, ft = r.normal(size=s_shape).astype(np.float32), r.normal(size=t_shape).astype(np.float32)
        close(L.similarity_preserving(jnp.asarray(fs), jnp.asarray(ft)), np_sp(fs, ft))


def test_sp_scale_invariance_global_not_per_row():
    r = np.random.default_rng(1)
    fs, ft = r.normal(size=(6, 10)).astype(np.float32), r.normal(size=(6, 12)).astype(np.float32)
    base = float(L.similarity_preserving(fs, ft))
    close(L.similarity_preserving(fs * 3.7, ft), base)
    close(L.similarity_preserving(fs, ft * 0.2), base)
    rows = r.uniform(0.2, 5.0, size=(6, 1)).astype(np.float32)  # per-row scaling of Q changes G's rows' directions
    got = float(L.similarity_preserving(fs * rows, ft))
    close(got, np_sp(fs * rows, ft))
    assert abs(got - base) > 1e-3 * base


# ----------------------------------------------- Grouped KD (Zhao et al. AAAI 2023, gkd_adaptive.py)
def np_group_size(zs, tau, step):
    b, c = zs.shape
    p = np.sort(softmax(zs).sum(0))[::-1]
    for idx in range(1, c + 1, step):
        if p[:idx].sum() >= tau * b:
            return idx
    return c


def np_gkd(zs, zt, y, T, tau, step):
    zs, zt = np.asarray(zs, np.float64), np.asarray(zt, np.float64)
    (b, c), k = zs.shape, np_group_size(zs, tau, step)
    ps, pt = softmax(zs / T), softmax(zt / T)
    binary = primary = 0.0
    for i in range(b):
        score = zs[i].copy()
        score[y[i]] = np.inf  # label forced in; the group holds k classes in all (authors: scatter 999999, [:k])
        g = np.zeros(c, bool)
        g[np.argsort(-score)[:k]] = True
        binary += kl([pt[i, g].sum(), pt[i, ~g].sum()], [ps[i, g].sum(), ps[i, ~g].sum()])
        primary += kl(pt[i, g] / pt[i, g].sum(), ps[i, g] / ps[i, g].sum())
    return binary * T * T / b, primary * T * T / b, k


def _tau_for(zs, k):  # a tau between the top-(k-1) and top-k mass of P: group size k when k is a candidate
    cum = np.cumsum(np.sort(softmax(zs).sum(0))[::-1]) / zs.shape[0]
    return 0.5 * (cum[k - 2] + cum[k - 1])


def _check_gkd(zs, zt, y, tau, step, expect_k):
    want_b, want_p, k = np_gkd(zs, zt, y, 4.0, tau, step)
    assert k == expect_k
    got_b, got_p = L.grouped_kd(jnp.asarray(zs), jnp.asarray(zt), jnp.asarray(y), temperature=4.0, tau=tau,
                                group_step=step)
    close([got_b, got_p], [want_b, want_p], atol=1e-5)  # float32 noise where a term is 0
    return want_b, want_p


def _gkd_inputs(seed, b=5, c=7):
    r = np.random.default_rng(seed)
    return *(2 * r.normal(size=(2, b, c))).astype(np.float32), r


def test_gkd_label_inside_top_k():
    zs, zt, _ = _gkd_inputs(2)
    y = np.argmax(zs, 1)  # the label is the student's top class: "top-k plus label" has k classes either way
    _check_gkd(zs, zt, y, _tau_for(zs, 3), 2, 3)  # 1 < k < C, candidates 1, 3, 5, 7
    _check_gkd(zs, zt, y, _tau_for(zs, 5), 2, 5)
    b, p = _check_gkd(zs, zt, y, 0.999, 100, 7)  # no candidate but 1 reaches tau: k = C, binary = 0
    assert abs(b) < 1e-6 and p > 0
    zc = zs.copy()  # confident student, one label: k = 1, the group is the label alone, primary = 0
    zc[:, 3] += 12.0
    b, p = _check_gkd(zc, zt, np.full(5, 3), 0.93, 100, 1)
    assert abs(p) < 1e-6 and b > 0


def test_gkd_label_outside_top_k():
    zs, zt, _ = _gkd_inputs(3)
    y = np.argmin(zs, 1)  # the label is the student's lowest class: authors' group = label + top (k - 1) others
    _check_gkd(zs, zt, y, _tau_for(zs, 3), 2, 3)
    b, p = _check_gkd(zs, zt, y, 0.05, 100, 1)  # k = 1: the group is only the label, so primary KD is 0
    assert abs(p) < 1e-6


def test_gkd_gradients():
    zs, zt, r = _gkd_inputs(4)
    y = r.integers(0, 7, size=5)
    f = lambda a, b: sum(w * v for w, v in zip((1.0, 4.0), L.grouped_kd(a, b, jnp.asarray(y), group_step=2,
                                                                          tau=_tau_for(zs, 3))))
    gs, gt = jax.grad(f, argnums=(0, 1))(jnp.asarray(zs), jnp.asarray(zt))
    assert np.all(np.asarray(gt) == 0)
    assert np.all(np.isfinite(np.asarray(gs))) and np.abs(np.asarray(gs)).max() > 0


# ----------------------------------------------- EKD (Huang et al. CVPR 2022, TFace ekd.py)
ANCHOR_DIV = (10, 100, 1000, 10_000, 100_000, 1_000_000)


def np_pairs(emb, y):  # upper triangle i < j, row-major like torch.masked_select
    g, (i, j) = l2n(emb), np.triu_indices(len(y), 1)
    return (g @ g.T)[i, j], y[i] == y[j]


def np_thresholds(sims, neg):
    v = np.sort(np.asarray(sims, np.float64)[neg])[::-1]
    return np.array([v[min(len(v) // a, len(v) - 1)] for a in ANCHOR_DIV])


def np_rank(x, anchors, tau=0.01):
    e = np.clip((np.asarray(x, np.float64)[:, None] - anchors[None]) / tau, -50, 50)
    return (1 / (1 + np.exp(-e))).sum(1)


def np_ekd_update(sa, ta, es, et, y, m=0.01):
    (s, pos), (t, _) = np_pairs(es, y), np_pairs(et, y)
    return m * np_thresholds(s, ~pos) + (1 - m) * sa, m * np_thresholds(t, ~pos) + (1 - m) * ta


def np_ekd_loss(sa, ta, es, et, y, tau=0.01, hard=2000, wp=0.02, wn=0.01):
    (s, pos), (t, _) = np_pairs(es, y), np_pairs(et, y)
    d = (np_rank(s, sa, tau) - np_rank(t, ta, tau)) ** 2
    lp = d[pos].mean() if pos.any() else 0.0
    order = np.argsort(-s[~pos], kind="stable")[:hard]
    return wp * lp + wn * d[~pos][order].mean()


def test_ekd_fprs_and_thresholds_hand_made():
    assert tuple(L.EKD_FPRS) == (1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6)
    r = np.random.default_rng(5)
    for n in (7, 150, 1200):
        neg_vals = np.arange(n) / n  # sorted descending: (n - 1 - idx) / n
        sims = np.concatenate([neg_vals, [0.999, 0.998, 0.9995]]).astype(np.float32)  # positives must be ignored
        neg = np.concatenate([np.ones(n, bool), np.zeros(3, bool)])
        p = r.permutation(n + 3)
        want = np.array([(n - 1 - min(n // a, n - 1)) / n for a in ANCHOR_DIV])
        close(L.ekd_thresholds(jnp.asarray(sims[p]), jnp.asarray(neg[p])), want, rtol=1e-6)
    close(want, [(1199 - 120) / 1200, (1199 - 12) / 1200, (1199 - 1) / 1200] + [1199 / 1200] * 3, rtol=1e-12)


def _ekd_batch(seed, b=12, labels=4):
    r = np.random.default_rng(seed)
    y = np.repeat(np.arange(labels), b // labels)[r.permutation(b)]
    return r.normal(size=(b, 8)).astype(np.float32), r.normal(size=(b, 16)).astype(np.float32), y


def test_ekd_init_and_update_from_zero():
    st = L.ekd_init(10, 16)
    assert set(st) == {"student_anchors", "teacher_anchors"}
    close(st["student_anchors"], np.zeros(6)), close(st["teacher_anchors"], np.zeros(6))
    sa = ta = np.zeros(6)
    for seed in (6, 7):  # two EMA steps, each model from its own negatives
        es, et, y = _ekd_batch(seed)
        st = L.ekd_update(st, jnp.asarray(es), jnp.asarray(et), jnp.asarray(y), momentum=0.01)
        sa, ta = np_ekd_update(sa, ta, es, et, y)
        close(st["student_anchors"], sa), close(st["teacher_anchors"], ta)
    assert not np.allclose(sa, ta)


def test_ekd_loss_matches_reference():
    es0, et0, y0 = _ekd_batch(8)
    es, et, y = _ekd_batch(9)
    sa, ta = np_ekd_update(np.zeros(6), np.zeros(6), es0, et0, y0)
    sa, ta = np_ekd_update(sa, ta, es, et, y)
    # a state near convergence too (anchors = this batch's thresholds), where the sigmoids are not saturated
    (s, pos), (t, _) = np_pairs(es, y), np_pairs(et, y)
    states = [(sa, ta), (np_thresholds(s, ~pos), np_thresholds(t, ~pos))]
    assert (~pos).sum() == 54 and pos.sum() == 12
    for a_s, a_t in states:
        state = {"student_anchors": jnp.asarray(a_s, jnp.float32), "teacher_anchors": jnp.asarray(a_t, jnp.float32)}
        close(L.ekd_rank(jnp.asarray(s, jnp.float32), state["student_anchors"]), np_rank(s, a_s), rtol=1e-5)
        for hard in (2000, 20):
            got = L.ekd_loss(state, jnp.asarray(es), jnp.asarray(et), jnp.asarray(y), hard_negatives=hard)
            close(got, np_ekd_loss(a_s, a_t, es, et, y, hard=hard), rtol=1e-5)
        assert np_ekd_loss(a_s, a_t, es, et, y, hard=20) != np_ekd_loss(a_s, a_t, es, et, y, hard=2000)
    yd = np.arange(12)  # no positive pairs: only the negative part
    got = L.ekd_loss(state, jnp.asarray(es), jnp.asarray(et), jnp.asarray(yd), hard_negatives=30)
    close(got, np_ekd_loss(states[1][0], states[1][1], es, et, yd, hard=30), rtol=1e-5)


# ----------------------------------------------- AdaDistill (Boutros et al. ECCV 2024)
def np_ada_update(w, es, et, y):
    w, s, t, upd = np.asarray(w, np.float64), l2n(es), l2n(et), {}
    for i, c in enumerate(y):
        wc, nw = w[:, c], np.linalg.norm(w[:, c])  # the centre before this batch's update
        lam = np.clip(wc @ t[i] / nw if nw > 0 else 0.0, 1e-6, 1)  # zero centre: cos 0 -> 1e-6
        alpha = np.clip((s[i] @ t[i]) * lam, 1e-6, 1)
        upd.setdefault(c, []).append(alpha * wc + (1 - alpha) * t[i])
    out = w.copy()
    for c, v in upd.items():
        out[:, c] = np.mean(v, axis=0)  # a class seen several times: the mean of its samples' updates
    return out


def np_arc_ce(cos, y, scale, m2):
    cos = np.clip(np.asarray(cos, np.float64), -1, 1)
    theta = np.arccos(cos)
    tgt = np.where(theta + m2 <= math.pi, np.cos(theta + m2), cos - math.sin(math.pi - m2) * m2)
    oh = np.eye(cos.shape[1])[y]
    z = scale * (oh * tgt + (1 - oh) * cos)
    lse = z.max(1) + np.log(np.exp(z - z.max(1, keepdims=True)).sum(1))
    return float(np.mean(lse - z[np.arange(len(y)), y]))


def test_adadistill_update_and_loss():
    r = np.random.default_rng(10)
    E, C, history = 8, 6, []
    st = L.adadistill_init(C, E)
    assert set(st) == {"centres"} and st["centres"].shape == (E, C)
    close(st["centres"], np.zeros((E, C)))
    w = np.zeros((E, C))
    t_base = r.normal(size=(C, E))  # students near their teachers so cos(s, t) > 0 and alpha is not clamped
    for y in (np.array([0, 1, 2, 3, 4, 0]), np.array([0, 1, 1, 2, 0, 3, 1])):  # duplicates; class 5 never seen
        et = (t_base[y] + 0.3 * r.normal(size=(len(y), E))).astype(np.float32)
        es = (et + 0.5 * r.normal(size=et.shape)).astype(np.float32)
        st = L.adadistill_update(st, jnp.asarray(es), jnp.asarray(et), jnp.asarray(y))
        w = np_ada_update(w, es, et, y)
        close(st["centres"], w, atol=1e-6)
        history.append(np.asarray(st["centres"]))
    assert np.all(history[1][:, 5] == 0)  # never seen: still zero
    assert np.array_equal(history[1][:, 4], history[0][:, 4])  # class 4 absent from batch 2: kept as it was
    # the loss: all centres non-zero (put a fixed vector into class 5 by hand), s = 16, ArcFace m = 0.5
    w5 = w.copy()
    w5[:, 5] = r.normal(size=E)
    state = {"centres": jnp.asarray(w5, jnp.float32)}
    es = r.normal(size=(7, E)).astype(np.float32)
    ys = np.array([0, 1, 2, 3, 4, 5, 1])
    close(L.adadistill_loss(state, jnp.asarray(es), jnp.asarray(ys), scale=16.0, margin_list=(1.0, 0.5, 0.0)),
          np_arc_ce(l2n(es) @ l2n(w5, axis=0), ys, 16.0, 0.5))
    got = L.adadistill_loss({"centres": jnp.asarray(w, jnp.float32)}, jnp.asarray(es[:6]), jnp.asarray(ys[:6]),
                            scale=16.0, margin_list=(1.0, 0.5, 0.0))  # zero (unseen) centre: finite
    assert np.isfinite(float(got))


def test_adadistill_first_visit_takes_teacher():
    r = np.random.default_rng(11)
    es, et = r.normal(size=(3, 8)).astype(np.float32), r.normal(size=(3, 8)).astype(np.float32)
    st = L.adadistill_update(L.adadistill_init(4, 8), jnp.asarray(es), jnp.asarray(et), jnp.asarray([2, 0, 3]))
    want = np.zeros((8, 4))
    want[:, [2, 0, 3]] = (1 - 1e-6) * l2n(et).T
    close(st["centres"], want, atol=1e-6)


# ----------------------------------------------- registry wiring
def test_compute_loss_wires_sp():
    r = np.random.default_rng(12)
    y = np.array([0, 3, 1, 2, 3])
    es, et = r.normal(size=(5, 6)).astype(np.float32), r.normal(size=(5, 10)).astype(np.float32)
    cos = np.tanh(r.normal(size=(5, 4))).astype(np.float32)
    total, terms = kd_lib.compute_loss({"sp_weight": 2.0}, labels=jnp.asarray(y), student_embeddings=jnp.asarray(es),
                                  student_cosine=jnp.asarray(cos), teacher_embeddings=jnp.asarray(et), scale=16.0,
                                  margin_list=(1.0, 0.5, 0.0))
    ce = np_arc_ce(cos, y, 16.0, 0.5)
    close(terms["sp"], np_sp(es, et)), close(terms["ce"], ce)
    close(total, ce + 2.0 * np_sp(es, et))
