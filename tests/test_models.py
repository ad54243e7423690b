"""Tests of facekd_jax.models: shapes, BatchNorm behaviour, sizes against insightface, bf16, naming.

Forward passes use image_size 32 and batch 2 (CPU-cheap); sizes at 112 use jax.eval_shape (no FLOPs).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from facekd_jax.models import FIXED_SHAPES, MODEL_NAMES, build_model, count_params, model_summary

TRAINABLE = [name for name in MODEL_NAMES if name not in FIXED_SHAPES]  # imported networks are eval-only
from facekd_jax.models.__main__ import main as table_main
from facekd_jax.models.heads import EmbeddingHead
from facekd_jax.models.layers import batch_norm

SMALL = 32  # image side for forward passes
BATCH = 2
FORWARD_MODELS = ("resnet18", "resnet56", "iresnet18", "iresnet50")

# Published sizes (insightface arcface_torch README / REFERENCES.md), in parameters.
INSIGHTFACE_PARAMS = {"iresnet18": 24.03e6, "iresnet50": 43.59e6, "iresnet100": 65.16e6}


def _images(seed=0, size=SMALL, batch=BATCH):
    """Uniform in [-1, 1) (NumPy: jax.random would compile a program per shape)."""
    return jnp.asarray(np.random.default_rng(seed).uniform(-1.0, 1.0, (batch, size, size, 3)), jnp.float32)


def _init_shapes(model, size):
    """Variable shapes of model at image side ``size``, without computing anything."""
    x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    rngs = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
    return jax.eval_shape(lambda x: model.init(rngs, x, train=False), x)


def _fill(shapes, seed=0):
    """Concrete variables for the shapes of ``model.init``: He-normal kernels, small random biases, BN scale 1,
    PReLU 0.25, running stats (0, 1), i.e. the values of a fresh init.

    Forward tests use this instead of ``model.init`` because XLA:CPU needs ~10 s to compile the threefry draws
    of 200+ parameters (iresnet50); ``model.init`` itself is tested once in test_init_matches_eval_shape.
    """
    rng = np.random.default_rng(seed)

    def leaf(path, s):
        name = path[-1].key
        if name == "kernel":
            value = rng.normal(size=s.shape) * np.sqrt(2.0 / np.prod(s.shape[:-1]))
        elif name == "bias":
            value = rng.normal(size=s.shape) * 0.01
        elif name == "negative_slope":
            value = np.full(s.shape, 0.25)
        elif name in ("scale", "var"):
            value = np.ones(s.shape)
        else:  # running mean
            value = np.zeros(s.shape)
        return jnp.asarray(value, s.dtype)

    return jax.tree_util.tree_map_with_path(leaf, shapes)


@functools.lru_cache(maxsize=None)
def _initialised(name):
    """(model, variables) at image_size SMALL; cached so each model is set up once per process."""
    model = build_model(name, image_size=SMALL)
    return model, _fill(_init_shapes(model, SMALL))


def _leaves_with_names(tree):
    """[(path tuple of str, leaf)] of a nested dict of arrays."""
    return [(tuple(k.key for k in path), leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)]


# ---------------------------------------------------------------- registry


def test_unknown_name_lists_known_names():
    with pytest.raises(ValueError) as info:
        build_model("resnet1000")
    message = str(info.value)
    assert "resnet1000" in message
    for name in ("resnet18", "resnet56", "iresnet18", "iresnet50"):
        assert name in message
    assert set(MODEL_NAMES) >= {"resnet18", "resnet56", "iresnet18", "iresnet50"}


def test_unknown_head_and_bad_dtype_are_rejected():
    with pytest.raises(ValueError, match="gap"):
        build_model("resnet18", head="avgpool")
    with pytest.raises(ValueError, match="floating"):
        build_model("resnet18", dtype="int32")


def test_default_heads():
    assert build_model("resnet18").head == "gap"
    assert build_model("resnet56").head == "gap"
    assert build_model("iresnet18").head == "flatten"
    assert build_model("iresnet50", head="gap").head == "gap"


def test_mobilefacenet_matches_the_paper_in_size_and_compute():
    """Chen et al. 2018: 0.99 M parameters and 221 M multiply-adds at 112x112 with a 128-d embedding."""
    summary = model_summary("mobilefacenet", image_size=112, embedding_size=128)
    assert summary["params"] == pytest.approx(0.99e6, rel=0.02), summary["params"]
    assert summary["gmacs"] == pytest.approx(0.221, rel=0.05), summary["gmacs"]
    assert summary["head"] == "gdc"
    with pytest.raises(ValueError, match="its own"):
        build_model("mobilefacenet", head="gap")
    # The GDConv covers whatever the last map is: a 64x64 input (4x4 map) builds and embeds.
    small = build_model("mobilefacenet", image_size=64, embedding_size=32)
    variables = small.init(jax.random.PRNGKey(0), jnp.zeros((2, 64, 64, 3)))
    assert variables["params"]["gdc"]["conv"]["kernel"].shape == (4, 4, 1, 512)
    assert small.apply(variables, jnp.zeros((2, 64, 64, 3))).shape == (2, 32)


# ---------------------------------------------------------------- sizes at 112 (eval_shape only)


@pytest.mark.parametrize("name", sorted(INSIGHTFACE_PARAMS))
def test_iresnet_param_counts_match_insightface(name):
    params = count_params(_init_shapes(build_model(name), 112)["params"])
    expected = INSIGHTFACE_PARAMS[name]
    assert abs(params - expected) / expected < 0.01, (name, params, expected)


def test_teacher_is_about_twelve_times_the_student():
    teacher = count_params(_init_shapes(build_model("resnet18"), 112)["params"])
    student = count_params(_init_shapes(build_model("resnet56"), 112)["params"])
    # REFERENCES.md: torchvision ResNet-18 body + BN-FC-BN head 11.44 M; CIFAR ResNet-56 + FC(64->512)+BN 0.89 M.
    assert abs(teacher - 11.44e6) / 11.44e6 < 0.01, teacher
    assert abs(student - 0.89e6) / 0.89e6 < 0.01, student
    assert 10 <= teacher / student <= 14, teacher / student


def test_count_params_excludes_nothing_it_is_given():
    tree = {"a": jnp.zeros((3, 4)), "b": {"c": jnp.zeros((5,))}, "d": jax.ShapeDtypeStruct((2, 2, 2), jnp.float32)}
    assert count_params(tree) == 3 * 4 + 5 + 8


@pytest.mark.parametrize(
    "name,head,size,fc_in",
    [
        ("iresnet18", None, 112, 512 * 7 * 7),  # insightface: FC(512*7*7 -> 512)
        ("iresnet18", None, 32, 512 * 2 * 2),  # 32 -> 16 -> 8 -> 4 -> 2
        ("iresnet18", "gap", 112, 512),
        ("resnet18", None, 112, 512),
        ("resnet56", None, 112, 64),
        ("resnet18", "flatten", 112, 512 * 4 * 4),  # 112 -> 56 -> 28 (pool) -> 28 -> 14 -> 7 -> 4
    ],
)
def test_head_fc_input_follows_head_kind_and_image_size(name, head, size, fc_in):
    variables = _init_shapes(build_model(name, image_size=size, head=head, embedding_size=128), size)
    assert variables["params"]["head"]["fc"]["kernel"].shape == (fc_in, 128)
    # BN1d with scale fixed to 1: only a bias is learnt.
    assert set(variables["params"]["head"]["features"]) == {"bias"}


@pytest.mark.parametrize("name", TRAINABLE)
def test_weight_leaves_are_named_kernel_and_nothing_else_is(name):
    params = _init_shapes(build_model(name, dtype="bfloat16"), 112)["params"]
    leaves = _leaves_with_names(params)
    assert leaves
    for path, leaf in leaves:
        leaf_name, module = path[-1], path[-2]
        assert leaf.dtype == jnp.float32, (path, leaf.dtype)  # params fp32 even for bf16 compute
        assert leaf_name in {"kernel", "bias", "scale", "negative_slope"}, path
        if leaf_name == "kernel":
            assert leaf.ndim in (2, 4), path  # dense [in, out] or conv [kh, kw, in, out]
        else:
            assert leaf.ndim == 1, path  # BN scale/bias, PReLU slope, dense bias: per channel
        if leaf_name == "scale":
            assert "bn" in module, path
        if leaf_name == "negative_slope":
            assert "prelu" in module, path
        if "bn" in module or "prelu" in module or module == "features":
            assert leaf_name != "kernel", path


def test_shape_mismatch_names_the_expected_shape():
    model, variables = _initialised("resnet56")
    with pytest.raises(ValueError, match=r"\[B, 32, 32, 3\]"):
        model.apply(variables, _images(0, size=48), train=False)


# ---------------------------------------------------------------- forward passes at 32x32


def test_init_matches_eval_shape():
    model = build_model("iresnet18", image_size=SMALL)
    rngs = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
    variables = jax.jit(lambda x: model.init(rngs, x, train=False))(_images(0))
    shapes = _init_shapes(model, SMALL)
    assert set(variables) == {"params", "batch_stats"}
    assert jax.tree.structure(variables) == jax.tree.structure(shapes)
    for (path, leaf), (_, s) in zip(_leaves_with_names(variables), _leaves_with_names(shapes)):
        assert leaf.shape == s.shape and leaf.dtype == jnp.float32, path
        assert np.isfinite(np.asarray(leaf)).all(), path
    np.testing.assert_array_equal(variables["params"]["prelu"]["negative_slope"], np.full(64, 0.25, np.float32))
    np.testing.assert_array_equal(variables["batch_stats"]["bn1"]["var"], np.ones(64, np.float32))
    assert float(jnp.std(variables["params"]["layer1_0"]["conv1"]["kernel"])) > 0
    emb = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, _images(1))
    assert emb.shape == (BATCH, 512) and bool(jnp.all(jnp.isfinite(emb)))


@pytest.mark.parametrize("name", FORWARD_MODELS)
def test_forward_shapes_finite_and_batch_stats(name):
    model, variables = _initialised(name)
    x = _images(1)

    @jax.jit
    def run(variables, x):
        emb = model.apply(variables, x, train=False)
        emb_train, updates = model.apply(
            variables, x, train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.key(2)}
        )
        _, eval_updates = model.apply(variables, x, train=False, mutable=["batch_stats"])
        return emb, emb_train, updates, eval_updates

    emb, emb_train, updates, eval_updates = run(variables, x)
    for e in (emb, emb_train):
        assert e.shape == (BATCH, 512) and e.dtype == jnp.float32
        assert bool(jnp.all(jnp.isfinite(e)))
        assert float(jnp.std(e)) > 0
    assert not np.allclose(emb_train, emb)  # train mode normalises with batch statistics

    # Train mode: every BatchNorm's running statistics move (its mean may stay 0 where its input is itself
    # batch-normalised, e.g. after a residual sum of two BNs, so mean or var).
    old = dict(_leaves_with_names(variables["batch_stats"]))
    new = dict(_leaves_with_names(updates["batch_stats"]))
    assert old.keys() == new.keys() and len(old) > 0
    modules = {path[:-1] for path in old}
    for module in modules:
        moved = [not np.allclose(old[module + (k,)], new[module + (k,)]) for k in ("mean", "var")]
        assert any(moved), f"running stats of {'/'.join(module)} did not move in train mode"

    # Eval mode: running statistics are read, never written.
    for path, leaf in _leaves_with_names(eval_updates["batch_stats"]):
        np.testing.assert_array_equal(leaf, old[path])


def test_batch_norm_uses_torch_momentum_and_eps():
    x = jax.random.normal(jax.random.key(3), (8, 4)) * 3.0 + 1.0
    bn = batch_norm(True, dtype=jnp.float32)
    variables = bn.init(jax.random.key(0), x)
    y, updates = jax.jit(lambda v, x: bn.apply(v, x, mutable=["batch_stats"]))(variables, x)
    # torch momentum 0.1: running = 0.9 * running + 0.1 * batch.
    np.testing.assert_allclose(updates["batch_stats"]["mean"], 0.1 * x.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(updates["batch_stats"]["var"], 0.9 + 0.1 * x.var(0), rtol=1e-5)
    np.testing.assert_allclose(y, (x - x.mean(0)) / jnp.sqrt(x.var(0) + 1e-5), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["resnet56", "iresnet18"])
def test_bfloat16_forward_close_to_float32(name):
    model32, variables = _initialised(name)
    model16 = build_model(name, image_size=SMALL, dtype="bfloat16")
    x = _images(4)
    e32 = jax.jit(lambda v, x: model32.apply(v, x, train=False))(variables, x)
    e16 = jax.jit(lambda v, x: model16.apply(v, x, train=False))(variables, x)  # same fp32 params
    assert e16.dtype == jnp.float32
    assert not np.array_equal(e16, e32)  # bf16 really was used
    n32 = e32 / jnp.linalg.norm(e32, axis=1, keepdims=True)
    n16 = e16 / jnp.linalg.norm(e16, axis=1, keepdims=True)
    cosine = jnp.sum(n32 * n16, axis=1)
    assert float(cosine.min()) > 0.99, cosine


def test_dropout_only_in_train_mode():
    feats = jnp.asarray(np.random.default_rng(5).standard_normal((4, 2, 2, 8)), jnp.float32)
    head = EmbeddingHead(kind="flatten", embedding_size=16, dropout=0.5)
    no_dropout = EmbeddingHead(kind="flatten", embedding_size=16, dropout=0.0)
    variables = head.init(jax.random.key(0), feats, train=False)

    @jax.jit
    def outputs(variables, feats):
        def train(module, key):
            return module.apply(variables, feats, train=True, mutable=["batch_stats"], rngs={"dropout": key})[0]

        return (
            head.apply(variables, feats, train=False),
            no_dropout.apply(variables, feats, train=False),
            train(head, jax.random.key(1)),
            train(head, jax.random.key(2)),
            train(no_dropout, jax.random.key(1)),
        )

    eval_out, eval_ref, a, b, train_ref = outputs(variables, feats)
    np.testing.assert_allclose(eval_out, eval_ref, rtol=1e-6)  # eval: dropout off
    assert not np.allclose(a, b)  # train: a different mask per key
    assert not np.allclose(a, train_ref)


# ---------------------------------------------------------------- measured compute


def _resnet56_macs(size):
    """Multiply-adds of a CIFAR ResNet-56 with a gap head on a size x size image, padded taps included."""
    macs, h, cin = size * size * 3 * 16 * 9, size, 16  # stem conv3x3
    for stage, width in enumerate((16, 32, 64)):
        for block in range(9):
            stride = 2 if stage > 0 and block == 0 else 1
            h = -(-h // stride)
            macs += h * h * cin * width * 9 + h * h * width * width * 9
            if cin != width:
                macs += h * h * cin * width  # 1x1 projection
            cin = width
    return macs + 64 * 512  # FC


def test_model_summary_counts_flops_as_two_per_multiply_add():
    summary = model_summary("resnet56", image_size=SMALL)
    assert summary["params"] == count_params(_init_shapes(build_model("resnet56", image_size=SMALL), SMALL)["params"])
    assert summary["mb"] == pytest.approx(summary["params"] * 4 / 2**20)
    ratio = summary["gflops"] * 1e9 / (2 * _resnet56_macs(SMALL))
    # Below 1: XLA skips taps on zero padding (about 10% at 8x8 maps); far above 0.5, so FLOPs not MACs.
    assert 0.8 < ratio < 1.05, ratio


def test_table_cli_prints_markdown_with_ratio(capsys):
    table_main(["--models", "resnet18,resnet56", "--image-size", str(SMALL)])
    out = capsys.readouterr().out
    assert out.startswith("| model | head | params (M) |")
    assert "| resnet18 | gap | 11.44 |" in out and "| resnet56 | gap | 0.89 |" in out
    assert "FLOPs (not MACs)" in out
    assert "resnet18 / resnet56" in out and "params 12.9x" in out
