"""facekd_jax.cpu: oneDNN's convolution passes and the fused batch norm equal XLA's and flax's, and are handed to
the models only where config.cpu_kernels and the platform allow."""
import importlib.metadata
import platform
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from facekd_jax import cpu
from facekd_jax.cpu import onednn as onednn_conv

NHWC = ("NHWC", "HWIO", "NHWC")


def _pinned_wheels_installed() -> bool:
    try:
        importlib.metadata.version(onednn_conv.RUNTIME_DIST)
        importlib.metadata.version(onednn_conv.HEADERS_DIST)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


needs_onednn = pytest.mark.skipif(not onednn_conv.available(),
                                  reason=f"oneDNN convolutions unavailable: {onednn_conv.unavailable_reason()}")


@pytest.mark.skipif(not (sys.platform.startswith("linux") and platform.machine() == "x86_64"),
                    reason="pyproject pins the oneDNN wheels on Linux x86-64 only")
def test_builds_where_pyproject_installs_it():
    """Where `make test` installs the wheels the handlers must build, or every test below would silently skip."""
    assert _pinned_wheels_installed(), "pip install -e . should have installed the onednn wheels"
    assert onednn_conv.available(), onednn_conv.unavailable_reason()


def _reference(x, w, strides, padding):
    return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=NHWC,
                                    feature_group_count=x.shape[-1] // w.shape[2], precision=lax.Precision.HIGHEST)


# (batch, size, in, out, kernel, stride, padding, groups): resnet's 3x3 blocks, a stride-2 3x3 on an odd size, the
# 1x1 stride-2 shortcut, the ImageNet 7x7 stem, asymmetric padding and a non-square image; MobileFaceNet's
# depthwise 3x3 (stride 1, stride 2 on odd and even sizes) and its global depthwise 3x3 over a 3x3 map (48x48
# input, no padding); a grouped convolution with 2 input and 3 output channels per group (XLA's HWIO output
# blocks per group).
GEOMETRIES = [
    (2, (12, 12), 16, 16, 3, 1, ((1, 1), (1, 1)), 1),
    (3, (15, 15), 8, 16, 3, 2, ((1, 1), (1, 1)), 1),
    (2, (12, 12), 16, 32, 1, 2, ((0, 0), (0, 0)), 1),
    (2, (20, 20), 3, 8, 7, 2, ((3, 3), (3, 3)), 1),
    (1, (9, 11), 5, 7, 3, 1, ((0, 1), (2, 0)), 1),
    (4, (12, 12), 24, 24, 3, 1, ((1, 1), (1, 1)), 24),
    (3, (13, 13), 16, 16, 3, 2, ((1, 1), (1, 1)), 16),
    (2, (12, 12), 32, 32, 3, 2, ((1, 1), (1, 1)), 32),
    (5, (3, 3), 40, 40, 3, 1, ((0, 0), (0, 0)), 40),
    (2, (9, 9), 8, 12, 3, 1, ((1, 1), (1, 1)), 4),
]


@needs_onednn
@pytest.mark.parametrize("n,size,ci,co,k,s,padding,groups", GEOMETRIES)
def test_forward_and_both_gradients_equal_xla(n, size, ci, co, k, s, padding, groups):
    rng = np.random.default_rng(ci * 100 + co)
    x = jnp.asarray(rng.standard_normal((n, *size, ci), dtype=np.float32))
    w = jnp.asarray(rng.standard_normal((k, k, ci // groups, co), dtype=np.float32) * 0.2)
    strides = (s, s)
    y_ref, vjp_ref = jax.vjp(lambda x, w: _reference(x, w, strides, padding), x, w)
    dy = jnp.asarray(rng.standard_normal(y_ref.shape, dtype=np.float32))

    @jax.jit
    def passes(x, w, dy):
        y, vjp = jax.vjp(lambda x, w: onednn_conv.conv2d(x, w, strides, padding), x, w)
        return (y, *vjp(dy))

    y, dx, dw = passes(x, w, dy)
    assert y.shape == y_ref.shape and y.dtype == jnp.float32
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    for name, got, want in (("input grad", dx, vjp_ref(dy)[0]), ("weight grad", dw, vjp_ref(dy)[1])):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(want))),
                                   err_msg=name)


@needs_onednn
@pytest.mark.parametrize("groups", [1, 16])
def test_bfloat16_matches_xla_to_bfloat16_precision(groups):
    if not onednn_conv.bfloat16_supported():
        pytest.skip("this CPU's oneDNN has no bfloat16 convolution (it needs AVX-512): "
                    "test_bfloat16_falls_back_to_xla_without_onednn_support covers it")
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((4, 14, 14, 16), dtype=np.float32))
    w = jnp.asarray(rng.standard_normal((3, 3, 16 // groups, 16), dtype=np.float32) * 0.2)
    pad = ((1, 1), (1, 1))
    xb, wb = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
    y, vjp = jax.vjp(lambda x, w: onednn_conv.conv2d(x, w, (1, 1), pad), xb, wb)
    assert y.dtype == jnp.bfloat16
    y_ref, vjp_ref = jax.vjp(lambda x, w: _reference(x, w, (1, 1), pad), xb.astype(jnp.float32),
                             wb.astype(jnp.float32))
    scale = float(jnp.max(jnp.abs(y_ref)))
    np.testing.assert_allclose(y.astype(jnp.float32), y_ref, atol=2e-2 * scale)
    dy = jnp.asarray(rng.standard_normal(y.shape, dtype=np.float32))
    for got, want in zip(vjp(dy.astype(jnp.bfloat16)), vjp_ref(dy)):
        assert got.dtype == jnp.bfloat16
        np.testing.assert_allclose(got.astype(jnp.float32), want, atol=2e-2 * float(jnp.max(jnp.abs(want))))


def test_bfloat16_falls_back_to_xla_without_onednn_support(monkeypatch):
    """A bfloat16 convolution on a CPU whose oneDNN has none (AVX2 only) is XLA's: the same result, no error."""
    monkeypatch.setitem(onednn_conv._state, "bf16", False)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 8, 8, 4)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((3, 3, 4, 8)) * 0.2, jnp.bfloat16)
    pad = ((1, 1), (1, 1))
    got = jax.jit(lambda x, w: onednn_conv.conv_general_dilated(x, w, (1, 1), pad, dimension_numbers=NHWC))(x, w)
    np.testing.assert_array_equal(np.asarray(got, np.float32),
                                  np.asarray(_reference(x, w, (1, 1), pad), np.float32))
    hlo = jax.jit(lambda x, w: onednn_conv.conv_general_dilated(x, w, (1, 1), pad, dimension_numbers=NHWC)
                  ).lower(x, w).as_text()
    assert "onednn" not in hlo


def test_supports_only_what_onednn_computes_exactly():
    x = jax.ShapeDtypeStruct((2, 8, 8, 4), jnp.float32)
    w = jax.ShapeDtypeStruct((3, 3, 4, 8), jnp.float32)
    ok = dict(window_strides=(1, 1), padding=((1, 1), (1, 1)), lhs_dilation=None, rhs_dilation=None,
              dimension_numbers=NHWC, feature_group_count=1)
    assert onednn_conv.supports(x, w, **ok)
    assert onednn_conv.supports(x, w, **dict(ok, dimension_numbers=lax.conv_dimension_numbers(
        x.shape, w.shape, NHWC)))  # flax passes ConvDimensionNumbers
    assert not onednn_conv.supports(x, w, **dict(ok, rhs_dilation=(2, 2)))
    assert not onednn_conv.supports(x, w, **dict(ok, lhs_dilation=(2, 2)))
    assert onednn_conv.supports(x, jax.ShapeDtypeStruct((3, 3, 2, 8), jnp.float32), **dict(ok, feature_group_count=2))
    assert onednn_conv.supports(x, jax.ShapeDtypeStruct((3, 3, 1, 4), jnp.float32),
                                **dict(ok, feature_group_count=4))  # depthwise
    assert not onednn_conv.supports(x, w, **dict(ok, feature_group_count=2))  # w's Ci is not 4 / 2
    assert not onednn_conv.supports(x, jax.ShapeDtypeStruct((3, 3, 1, 6), jnp.float32),
                                    **dict(ok, feature_group_count=4))  # 6 outputs in 4 groups
    assert not onednn_conv.supports(x, w, **dict(ok, dimension_numbers=("NCHW", "OIHW", "NCHW")))
    assert not onednn_conv.supports(x, w, **dict(ok, dimension_numbers=None))  # lax's default is NCHW
    assert not onednn_conv.supports(x, jax.ShapeDtypeStruct(w.shape, jnp.bfloat16), **ok)  # mixed dtypes
    xi = jax.ShapeDtypeStruct(x.shape, jnp.int32)
    assert not onednn_conv.supports(xi, jax.ShapeDtypeStruct(w.shape, jnp.int32), **ok)
    assert not onednn_conv.supports(jax.ShapeDtypeStruct((8, 8, 4), jnp.float32),
                                    jax.ShapeDtypeStruct((3, 4, 8), jnp.float32), **ok)


def test_conv_takes_onednn_only_where_it_computes_the_call_exactly():
    x = jnp.ones((2, 8, 8, 4))
    w = jnp.ones((3, 3, 4, 8))
    conv = lambda x, w: onednn_conv.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=NHWC)
    if onednn_conv.available():
        assert "facekd_onednn_conv_fwd" in jax.jit(conv).lower(x, w).as_text()
    np.testing.assert_allclose(jax.jit(conv)(x, w), _reference(x, w, (1, 1), ((1, 1), (1, 1))), rtol=1e-6)
    cropped = lambda x, w: onednn_conv.conv_general_dilated(x, w, (1, 1), ((-1, 0), (1, 1)), dimension_numbers=NHWC)
    assert "facekd_onednn" not in jax.jit(cropped).lower(x, w).as_text()  # negative padding: XLA's
    np.testing.assert_allclose(jax.jit(cropped)(x, w), _reference(x, w, (1, 1), ((-1, 0), (1, 1))))


def test_model_layers_decided_once_from_the_config_choice():
    """The tests run on 8 fake CPU devices: "auto" gives flax's layers there with depthwise taps (the custom calls
    have no SPMD rule), "onednn" refuses naming why, "xla" never asks; on one device "auto" gives the oneDNN layers
    where available."""
    from facekd_jax.cpu.layers import TapsConv

    assert cpu.model_layers("xla", num_devices=1) == {}
    assert cpu.model_layers("auto", num_devices=8) == {"conv": TapsConv}
    assert cpu.model_layers("taps", num_devices=1) == {"conv": TapsConv}   # XLA's kernels even where oneDNN runs
    assert cpu.model_layers("taps", num_devices=1, platform="tpu") == {}
    with pytest.raises(RuntimeError, match="8 devices"):
        cpu.model_layers("onednn", num_devices=8)
    with pytest.raises(ValueError, match="cpu_kernels='fast'"):
        cpu.model_layers("fast", num_devices=1)
    one = cpu.model_layers("auto", num_devices=1)
    if onednn_conv.available():
        from facekd_jax.cpu.layers import FusedBatchNorm, OnednnConv
        assert one == {"conv": OnednnConv, "norm": FusedBatchNorm}
    else:
        assert one == {"conv": TapsConv}


@pytest.mark.parametrize("stride,kernel,pad", [(1, 3, 1), (2, 3, 1), (1, 4, 0), (2, 3, 0)])
def test_depthwise_taps_equal_the_grouped_convolution_and_its_gradients(stride, kernel, pad):
    """cpu.layers' depthwise path (MobileFaceNet's 3x3 and GDConv layers) against lax's grouped convolution."""
    from facekd_jax.cpu.layers import TapsConv

    rng = np.random.default_rng(stride * 10 + kernel)
    x = jnp.asarray(rng.standard_normal((2, 9, 9, 6), dtype=np.float32))
    w = jnp.asarray(rng.standard_normal((kernel, kernel, 1, 6), dtype=np.float32))
    pads = ((pad, pad), (pad, pad))

    def grouped(x, w):
        return lax.conv_general_dilated(x, w, (stride, stride), pads, dimension_numbers=NHWC,
                                        feature_group_count=6, precision=lax.Precision.HIGHEST)

    def taps(x, w):
        module = TapsConv(6, (kernel, kernel), strides=(stride, stride), padding=pads, feature_group_count=6,
                          use_bias=False)
        return module.apply({"params": {"kernel": w}}, x)

    hlo = jax.jit(taps).lower(x, w).as_text()
    assert "feature_group_count" not in hlo  # no grouped convolution left
    np.testing.assert_allclose(taps(x, w), grouped(x, w), rtol=1e-5, atol=1e-5)
    g_taps = jax.grad(lambda x, w: jnp.sum(jnp.sin(taps(x, w))), argnums=(0, 1))(x, w)
    g_ref = jax.grad(lambda x, w: jnp.sum(jnp.sin(grouped(x, w))), argnums=(0, 1))(x, w)
    for a, b in zip(g_taps, g_ref):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_a_failed_build_names_the_cause(monkeypatch, tmp_path):
    if not _pinned_wheels_installed():
        with pytest.raises(onednn_conv.BuildError, match="wheel is not installed"):
            onednn_conv.build()
        return
    monkeypatch.setenv("FACEKD_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", "false")  # a "compiler" that always fails
    with pytest.raises(onednn_conv.BuildError, match="compiling onednn.cc failed"):
        onednn_conv.build()
    assert list(tmp_path.iterdir()) == []  # nothing half-written left in the cache


# --- the fused training-mode batch norm (cpu.layers.FusedBatchNorm) ---

def _bn_reference(x, scale, bias, residual, relu):
    """float64 y = [relu](BN(x) [+ residual]) with the biased batch variance, as torch/flax train mode."""
    mean = x.mean((0, 1, 2))
    var = ((x - mean) ** 2).mean((0, 1, 2))
    y = (x - mean) / np.sqrt(var + 1e-5) * scale + bias
    if residual is not None:
        y = y + residual
    return (np.maximum(y, 0) if relu else y), mean, var


@needs_onednn
@pytest.mark.parametrize("mode", ["none", "relu", "add_relu"])
@pytest.mark.parametrize("shape,dtype", [((4, 9, 7, 16), "float32"), ((3, 5, 6, 13), "float32"),
                                         ((4, 9, 7, 16), "bfloat16")])  # 13: not a vector width of channels
def test_batch_norm_forward_and_gradients_match_float64(mode, shape, dtype):
    rng = np.random.default_rng(len(mode) + shape[-1])
    bf16 = dtype == "bfloat16"
    data = lambda a: jnp.asarray(a, dtype)  # noqa: E731  (the N,H,W,C operands; scale/bias stay float32)
    x = data(rng.standard_normal(shape).astype(np.float32) * 3 + 1)  # a mean away from 0 exercises the variance
    scale, bias = (rng.standard_normal(shape[-1]).astype(np.float32) for _ in range(2))
    residual = data(rng.standard_normal(shape).astype(np.float32)) if mode == "add_relu" else None
    dy = data(rng.standard_normal(shape).astype(np.float32))
    relu = mode != "none"
    out_tol = dict(rtol=1e-2, atol=1e-2) if bf16 else dict(rtol=1e-5, atol=1e-5)  # bf16: one rounding, 2^-8

    @jax.jit
    def run(x, scale, bias, residual, dy):
        (y, mean, var), vjp = jax.vjp(
            lambda *a: onednn_conv.batch_norm_train(*a, epsilon=1e-5, relu=relu), x, scale, bias, residual)
        return y, mean, var, vjp((dy, jnp.zeros_like(mean), jnp.zeros_like(var)))

    y, mean, var, grads = run(x, scale, bias, residual, dy)
    assert y.dtype == x.dtype and mean.dtype == var.dtype == jnp.float32
    f64 = lambda a: None if a is None else np.asarray(jnp.asarray(a, jnp.float32), np.float64)  # noqa: E731
    y_ref, mean_ref, var_ref = _bn_reference(f64(x), f64(scale), f64(bias), f64(residual), relu)
    np.testing.assert_allclose(f64(y), y_ref, **out_tol)
    np.testing.assert_allclose(mean, mean_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(var, var_ref, rtol=1e-5)
    # float64 gradients by the textbook formulas: g = dy where the output's pre-activation > 0,
    # dx = scale / std * (g - mean(g) - xhat * mean(g * xhat)), dscale = sum(g * xhat), dbias = sum(g), dr = g.
    x64, dy64 = f64(x), f64(dy)  # the bfloat16 values themselves: the reference sees what the kernel saw
    xhat = (x64 - mean_ref) / np.sqrt(var_ref + 1e-5)
    pre = xhat * f64(scale) + f64(bias) + (f64(residual) if residual is not None else 0.0)
    g = dy64 * (pre > 0) if relu else dy64
    want = [f64(scale) / np.sqrt(var_ref + 1e-5) * (g - g.mean((0, 1, 2)) - xhat * (g * xhat).mean((0, 1, 2))),
            (g * xhat).sum((0, 1, 2)), g.sum((0, 1, 2))] + ([g] if residual is not None else [])
    for name, got, ref in zip(["x", "scale", "bias", "residual"], grads, want):
        rtol = 1e-2 if bf16 and name in ("x", "residual") else 1e-4  # bf16-stored gradients; [C] ones in float32
        np.testing.assert_allclose(f64(got), ref, rtol=rtol, atol=rtol * 0.1 * float(np.abs(ref).max()),
                                   err_msg=name)
    if residual is None:
        assert grads[3] is None


@needs_onednn
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("fuse", ["plain", "relu", "residual"])
def test_batch_norm_module_equals_flax_batch_norm(fuse, dtype):
    """cpu.layers.FusedBatchNorm: the same variables, outputs, running statistics and gradients as flax's
    nn.BatchNorm followed by the add and ReLU (models.layers.norm_act with flax's module)."""
    import flax.linen as nn

    from facekd_jax.cpu.layers import FusedBatchNorm
    from facekd_jax.models import layers

    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((4, 6, 6, 8), dtype=np.float32) * 2 + 0.5).astype(dtype)
    r = jnp.asarray(rng.standard_normal(x.shape, dtype=np.float32)).astype(dtype) if fuse == "residual" else None
    kwargs = dict(relu=fuse != "plain", residual=r)
    fused = layers.batch_norm(train=True, dtype=jnp.dtype(dtype), module=FusedBatchNorm)
    plain = layers.batch_norm(train=True, dtype=jnp.dtype(dtype), module=nn.BatchNorm)
    variables = plain.init(jax.random.PRNGKey(0), x)
    assert jax.tree.structure(fused.init(jax.random.PRNGKey(0), x, **kwargs)) == jax.tree.structure(variables)
    variables = jax.tree.map(lambda a: a + 0.1 * jnp.arange(a.size, dtype=a.dtype), variables)

    def loss_of(bn):
        def loss(params, x):
            y, updates = bn.apply({"params": params, "batch_stats": variables["batch_stats"]}, x,
                                  method=lambda m, x: layers.norm_act(m, x, **kwargs), mutable=["batch_stats"])
            assert y.dtype == x.dtype
            y = y.astype(jnp.float32)
            return jnp.sum(y * jnp.cos(y)), (y, updates)
        return loss

    fast = jax.jit(jax.grad(loss_of(fused), argnums=(0, 1), has_aux=True))
    slow = jax.jit(jax.grad(loss_of(plain), argnums=(0, 1), has_aux=True))
    want = slow(variables["params"], x)
    assert "facekd_batch_norm_fwd" in fast.lower(variables["params"], x).compile().as_text()
    assert "facekd_batch_norm_fwd" not in slow.lower(variables["params"], x).compile().as_text()
    got = fast(variables["params"], x)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    # bfloat16: flax rounds the BN output before the add, the kernel after it (one rounding, 2^-8 relative)
    tol = dict(rtol=2e-4, atol=2e-5) if dtype == "float32" else dict(rtol=5e-2, atol=5e-2)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), **tol)


def test_batch_norm_rejects_a_residual_without_relu():
    with pytest.raises(ValueError, match="residual"):
        onednn_conv.batch_norm_train(jnp.ones((1, 2, 2, 3)), jnp.ones(3), jnp.zeros(3), jnp.ones((1, 2, 2, 3)),
                                     epsilon=1e-5, relu=False)
