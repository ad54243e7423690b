"""facekd_jax.models.onednn_conv: oneDNN's convolution passes equal XLA's, and are used only where they apply."""
import importlib.metadata
import platform
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from facekd_jax.models import onednn_conv

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
                                    precision=lax.Precision.HIGHEST)


# (batch, size, in, out, kernel, stride, padding): resnet's 3x3 blocks, a stride-2 3x3 on an odd size, the 1x1
# stride-2 shortcut, the ImageNet 7x7 stem, asymmetric padding and a non-square image.
GEOMETRIES = [
    (2, (12, 12), 16, 16, 3, 1, ((1, 1), (1, 1))),
    (3, (15, 15), 8, 16, 3, 2, ((1, 1), (1, 1))),
    (2, (12, 12), 16, 32, 1, 2, ((0, 0), (0, 0))),
    (2, (20, 20), 3, 8, 7, 2, ((3, 3), (3, 3))),
    (1, (9, 11), 5, 7, 3, 1, ((0, 1), (2, 0))),
]


@needs_onednn
@pytest.mark.parametrize("n,size,ci,co,k,s,padding", GEOMETRIES)
def test_forward_and_both_gradients_equal_xla(n, size, ci, co, k, s, padding):
    rng = np.random.default_rng(ci * 100 + co)
    x = jnp.asarray(rng.standard_normal((n, *size, ci), dtype=np.float32))
    w = jnp.asarray(rng.standard_normal((k, k, ci, co), dtype=np.float32) * 0.2)
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
def test_bfloat16_matches_xla_to_bfloat16_precision():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((4, 14, 14, 16), dtype=np.float32))
    w = jnp.asarray(rng.standard_normal((3, 3, 16, 16), dtype=np.float32) * 0.2)
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
    assert not onednn_conv.supports(x, w, **dict(ok, feature_group_count=2))
    assert not onednn_conv.supports(x, w, **dict(ok, dimension_numbers=("NCHW", "OIHW", "NCHW")))
    assert not onednn_conv.supports(x, w, **dict(ok, dimension_numbers=None))  # lax's default is NCHW
    assert not onednn_conv.supports(x, jax.ShapeDtypeStruct(w.shape, jnp.bfloat16), **ok)  # mixed dtypes
    xi = jax.ShapeDtypeStruct(x.shape, jnp.int32)
    assert not onednn_conv.supports(xi, jax.ShapeDtypeStruct(w.shape, jnp.int32), **ok)
    assert not onednn_conv.supports(jax.ShapeDtypeStruct((8, 8, 4), jnp.float32),
                                    jax.ShapeDtypeStruct((3, 4, 8), jnp.float32), **ok)


def test_several_devices_disabled_block_and_opt_out_use_xla(monkeypatch):
    """The tests run on 8 fake CPU devices, where a batch may be sharded: XLA's convolution is traced."""
    assert jax.device_count() > 1
    assert not onednn_conv.enabled()
    x = jnp.ones((2, 8, 8, 4))
    w = jnp.ones((3, 3, 4, 8))
    conv = lambda x, w: onednn_conv.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=NHWC)
    hlo = jax.jit(conv).lower(x, w).as_text()
    assert "facekd_onednn" not in hlo and "convolution" in hlo
    np.testing.assert_allclose(jax.jit(conv)(x, w), _reference(x, w, (1, 1), ((1, 1), (1, 1))))

    monkeypatch.setattr(jax, "device_count", lambda *a: 1)  # as on a real single-device CPU
    if onednn_conv.available():
        assert onednn_conv.enabled()
        # a new function to jit: jit's cache would hand back the trace made above with XLA's convolution
        assert "facekd_onednn_conv_fwd" in jax.jit(lambda x, w: conv(x, w)).lower(x, w).as_text()
        np.testing.assert_allclose(jax.jit(lambda x, w: conv(x, w))(x, w), _reference(x, w, (1, 1), ((1, 1), (1, 1))), rtol=1e-6)
        cropped = lambda x, w: onednn_conv.conv_general_dilated(x, w, (1, 1), ((-1, 0), (1, 1)),
                                                                dimension_numbers=NHWC)
        assert "facekd_onednn" not in jax.jit(cropped).lower(x, w).as_text()  # negative padding: XLA's
        np.testing.assert_allclose(jax.jit(cropped)(x, w), _reference(x, w, (1, 1), ((-1, 0), (1, 1))))
    with onednn_conv.disabled():
        assert not onednn_conv.enabled()
        assert "facekd_onednn" not in jax.jit(lambda x, w: conv(x, w)).lower(x, w).as_text()
    monkeypatch.setenv(onednn_conv.OPT_OUT, "0")
    assert not onednn_conv.enabled()


def test_a_failed_build_names_the_cause(monkeypatch, tmp_path):
    if not _pinned_wheels_installed():
        with pytest.raises(onednn_conv.BuildError, match="wheel is not installed"):
            onednn_conv.build()
        return
    monkeypatch.setenv("FACEKD_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", "false")  # a "compiler" that always fails
    with pytest.raises(onednn_conv.BuildError, match="compiling onednn_conv.cc failed"):
        onednn_conv.build()
    assert list(tmp_path.iterdir()) == []  # nothing half-written left in the cache
