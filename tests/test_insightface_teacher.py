"""insightface arcface_torch iResNet teachers (facekd_jax.teachers.insightface and pth_format): the imported Flax
network against arcface_torch's network in PyTorch on the same weights, the safety of the .pth reader, the errors,
and the imported teacher run where a teacher works (eval mode, the teacher-embedding cache, the command line).

The reference below is this test's own transcription of arcface_torch's backbones/iresnet.py (same module names,
so the same state-dict names), randomly initialised with BatchNorm statistics that are neither 0/1 nor the
batch's (calibrated on noise, then perturbed), so that a BN or layout mistake shows. Needs torch (the [test]
extra) and onnx / onnxruntime; a test skips where its part is absent.
"""
from __future__ import annotations

import functools
import io
import json
import os
import pickle
import pickletools
import re
import struct
import subprocess
import sys
import warnings
import zipfile
import zlib

import jax
import numpy as np
import pytest

from runs import REPO, subprocess_env
from facekd_jax import models
from facekd_jax.teachers import insightface, pth_format
from facekd_jax.teachers.insightface import InsightfaceFormatError, read_insightface, to_flax_variables

torch = pytest.importorskip("torch", reason="torch (the [test] extra) is the reference network", exc_type=ImportError)
nn = torch.nn

ATOL = 1e-4   # max abs difference allowed between the imported network and torch's (embeddings of size ~1)
BATCH = 2


# --- arcface_torch's iResNet, transcribed for this test ----------------------------------------------------------


class IBasicBlock(nn.Module):
    """BN -> conv3x3 -> BN -> PReLU -> conv3x3(stride) -> BN, plus the input or a 1x1 conv + BN of it."""

    def __init__(self, cin: int, width: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin, eps=1e-5)
        self.conv1 = nn.Conv2d(cin, width, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width, eps=1e-5)
        self.prelu = nn.PReLU(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(width, eps=1e-5)
        self.downsample = None
        if stride != 1 or cin != width:
            self.downsample = nn.Sequential(nn.Conv2d(cin, width, 1, stride, bias=False),
                                            nn.BatchNorm2d(width, eps=1e-5))

    def forward(self, x):
        y = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return y + (x if self.downsample is None else self.downsample(x))


class TorchIResNet(nn.Module):
    """[B, 3, 112, 112] -> [B, E]: conv1 -> bn1 -> prelu -> layer1..4 -> bn2 -> flatten -> dropout -> fc -> features."""

    def __init__(self, blocks, embedding_size: int = 512):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64, eps=1e-5)
        self.prelu = nn.PReLU(64)
        cin = 64
        for stage, (n, width) in enumerate(zip(blocks, (64, 128, 256, 512)), start=1):
            layers = []
            for j in range(n):
                layers.append(IBasicBlock(cin, width, 2 if j == 0 else 1))
                cin = width
            setattr(self, f"layer{stage}", nn.Sequential(*layers))
        self.bn2 = nn.BatchNorm2d(512, eps=1e-5)
        self.dropout = nn.Dropout(p=0.0)
        self.fc = nn.Linear(512 * 7 * 7, embedding_size)
        self.features = nn.BatchNorm1d(embedding_size, eps=1e-5)
        nn.init.constant_(self.features.weight, 1.0)
        self.features.weight.requires_grad = False

    def forward(self, x):
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.dropout(torch.flatten(self.bn2(x), 1))
        return self.features(self.fc(x))


def random_iresnet(blocks, seed: int = 0) -> TorchIResNet:
    """An eval-mode TorchIResNet with random weights and non-trivial BN statistics: running statistics of noise
    images, then shifted and scaled at random; BN weights and PReLU slopes random. The last BN (features) keeps
    the noise statistics, so that embeddings of noise have ~unit variance per dimension (a norm ~sqrt(512), as a
    trained arcface_torch network's): the scale ATOL is meant for."""
    torch.manual_seed(seed)
    net = TorchIResNet(blocks)
    norms = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="linear")
            elif isinstance(m, nn.PReLU):
                m.weight.uniform_(0.0, 0.4)
        for m in norms:
            if m is not net.features:   # frozen at 1 in arcface_torch
                m.weight.uniform_(0.6, 1.4)
            m.bias.normal_(0.0, 0.1)
            m.momentum = None           # cumulative averages over the calibration batches
        net.train()
        net(torch.rand(4, 3, 112, 112) * 2 - 1)
        for m in norms[:-1]:
            m.running_mean.add_(m.running_var.sqrt() * torch.randn_like(m.running_mean) * 0.2)
            m.running_var.mul_(torch.empty_like(m.running_var).uniform_(0.6, 1.6))
        # features: four samples per dimension are too few for a variance; every fc output has about the same
        # spread, so their mean variance (perturbed) is the better estimate. Embeddings ~1 per dimension.
        assert norms[-1] is net.features
        var = net.features.running_var
        var.copy_(var.mean() * torch.empty_like(var).uniform_(0.8, 1.25))
    return net.eval()


def torch_embed(net: TorchIResNet, images: np.ndarray) -> np.ndarray:
    """NHWC float images -> torch's embeddings (eval mode)."""
    assert not net.training
    with torch.no_grad():
        return net(torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))).numpy()


@functools.lru_cache(maxsize=None)
def flax_embed(model: str):
    """The imported network's eval forward (one compile per architecture)."""
    module = models.build_model(model)
    return jax.jit(lambda variables, images: module.apply(variables, images, train=False))


def max_diff(weights, images, reference, arch=None) -> float:
    model, variables, _ = to_flax_variables(weights, arch)
    got = np.asarray(flax_embed(model)(variables, images))
    assert got.shape == reference.shape and np.all(np.isfinite(got))
    diff = float(np.abs(got - reference).max())
    print(f"{weights.path}: max abs diff {diff:.2e} (max |reference| {np.abs(reference).max():.2f})")
    return diff


def export_onnx(net, path, *, training=None, normalise=False):
    """torch.onnx.export with the TorchScript exporter (dynamo=False: the dynamo one needs onnxscript). training
    EVAL folds conv -> BN pairs into the conv; PRESERVE keeps every BN as a node. normalise: the graph takes raw
    pixels and computes (x - 127.5) / 127.5 itself (Sub, Div)."""
    class Normalised(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner((x - 127.5) / 127.5)

    # eval(): the exporter puts the module back in the mode it found it in, and a new wrapper is in train mode.
    module = Normalised(net).eval() if normalise else net
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(module, torch.zeros(1, 3, 112, 112), str(path), dynamo=False, input_names=["data"],
                          output_names=["embedding"], dynamic_axes={"data": {0: "batch"}},
                          training=torch.onnx.TrainingMode.EVAL if training is None else training)
    return str(path)


@pytest.fixture(scope="module")
def images():
    """float32 [BATCH, 112, 112, 3] in [-1, 1], as (pixel - 127.5) / 127.5."""
    pixels = np.random.default_rng(0).integers(0, 256, (BATCH, 112, 112, 3)).astype(np.float32)
    return (pixels - 127.5) / 127.5


@pytest.fixture(scope="module")
def r18(tmp_path_factory, images):
    """(torch net, its embeddings of `images`, the .pth path)."""
    net = random_iresnet((2, 2, 2, 2))
    path = tmp_path_factory.mktemp("r18") / "r18_backbone.pth"
    torch.save(net.state_dict(), path)
    reference = torch_embed(net, images)
    assert 0.3 < np.abs(reference).max() < 30   # O(1): the tolerance means something
    return net, reference, str(path)


@pytest.fixture(scope="module")
def r18_onnx(r18, tmp_path_factory):
    pytest.importorskip("onnx", reason="onnx (the [teachers] extra) reads ONNX files", exc_type=ImportError)
    return export_onnx(r18[0], tmp_path_factory.mktemp("onnx") / "r18.onnx")


# --- parity ------------------------------------------------------------------------------------------------------


def test_pth_through_torch_and_through_the_pure_reader_equals_torch(r18, images):
    net, reference, path = r18
    through_torch = read_insightface(path, use_torch=True)
    pure = read_insightface(path, use_torch=False)
    assert through_torch.fmt["reader"].startswith("torch.load") and "pth_format" in pure.fmt["reader"]
    assert list(pure.state) == list(through_torch.state) == list(net.state_dict())
    for name, value in through_torch.state.items():
        np.testing.assert_array_equal(pure.state[name], value, err_msg=name)
    model, variables, notes = to_flax_variables(pure)
    assert (model, notes["blocks_per_stage"], notes["embedding_size"]) == ("iresnet18", [2, 2, 2, 2], 512)
    assert notes["features_weight"].startswith("1 ")
    # Layouts: conv OIHW -> HWIO; fc inputs from torch's (c, h, w) order to Flax's (h, w, c).
    conv = net.layer2[0].conv2.weight.detach().numpy()
    np.testing.assert_array_equal(variables["params"]["layer2_0"]["conv2"]["kernel"][2, 1, 5, 7], conv[7, 5, 2, 1])
    fc = net.fc.weight.detach().numpy()
    kernel = variables["params"]["head"]["fc"]["kernel"]
    assert kernel[(3 * 7 + 4) * 512 + 100, 9] == fc[9, 100 * 49 + 3 * 7 + 4]
    bn = net.layer3[1].bn1
    np.testing.assert_array_equal(variables["batch_stats"]["layer3_1"]["bn1"]["var"], bn.running_var.numpy())
    for weights in (through_torch, pure):
        assert max_diff(weights, images, reference) <= ATOL


def test_without_torch_the_pure_reader_is_used(r18, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)   # `import torch` now fails, as where it is not installed
    weights = read_insightface(r18[2])
    assert "pth_format" in weights.fmt["reader"] and weights.state["fc.weight"].shape == (512, 25088)


def test_onnx_with_folded_and_with_kept_batch_norms_equals_torch_and_onnxruntime(r18, r18_onnx, images, tmp_path):
    net, reference, _ = r18
    ort = pytest.importorskip("onnxruntime", exc_type=ImportError)
    kept = export_onnx(net, tmp_path / "kept.onnx", training=torch.onnx.TrainingMode.PRESERVE)
    raw = export_onnx(net, tmp_path / "raw.onnx", normalise=True)
    pixels = images * 127.5 + 127.5
    for path, feed in ((r18_onnx, images), (kept, images), (raw, pixels)):
        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        runtime = session.run(None, {"data": np.ascontiguousarray(feed.transpose(0, 3, 1, 2))})[0]
        print(f"{path}: onnxruntime vs torch: max abs diff {np.abs(runtime - reference).max():.2e}")
        assert np.abs(runtime - reference).max() <= ATOL, path
    folded = read_insightface(r18_onnx)
    assert folded.fmt["batch_norm"].startswith("folded into the preceding Conv (21 of 21")
    assert read_insightface(kept).fmt["batch_norm"] == "kept as BatchNormalization nodes"
    normalised = read_insightface(raw)
    assert "folded into conv1" in normalised.fmt["input_normalisation"]
    # A folded BN maps to the identity plus the folded bias; the pre-conv BNs stay as they were.
    _, variables, _ = to_flax_variables(folded)
    stats = variables["batch_stats"]["layer1_0"]
    np.testing.assert_allclose(stats["bn2"]["var"], 1 - 1e-5)
    np.testing.assert_array_equal(stats["bn2"]["mean"], 0)
    np.testing.assert_array_equal(stats["bn1"]["var"], net.layer1[0].bn1.running_var.numpy())
    assert "folded into node" in folded.where("layer1.0.bn2.bias")
    for weights in (folded, read_insightface(kept), normalised):
        assert max_diff(weights, images, reference) <= ATOL, weights.path


def test_onnx_as_other_exporters_write_it_equals_torch(r18, r18_onnx, images, tmp_path):
    """The head as Reshape(x, [0, -1]) and MatMul + Add instead of Flatten and Gemm, and a BatchNormalization with
    an epsilon other than 1e-5 (MXNet-born models have 2e-5) and its variance lower by the difference."""
    import onnx
    from onnx import helper, numpy_helper

    proto = onnx.load(r18_onnx)
    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    flat = next(n for n in graph.node if n.op_type == "Flatten")
    gemm = next(n for n in graph.node if n.op_type == "Gemm")
    weight = numpy_helper.to_array(inits[gemm.input[1]])
    graph.initializer.extend([numpy_helper.from_array(np.array([0, -1], np.int64), "flat_shape"),
                              numpy_helper.from_array(np.ascontiguousarray(weight.T), "fc_matmul_weight")])
    at = list(graph.node).index(flat)
    graph.node.remove(flat)
    graph.node.insert(at, helper.make_node("Reshape", [flat.input[0], "flat_shape"], [flat.output[0]], name="flat"))
    at = list(graph.node).index(gemm)
    graph.node.remove(gemm)
    graph.node.insert(at, helper.make_node("MatMul", [gemm.input[0], "fc_matmul_weight"], ["fc_mm"], name="fc_mm"))
    graph.node.insert(at + 1, helper.make_node("Add", ["fc_mm", gemm.input[2]], [gemm.output[0]], name="fc_add"))
    bn = next(n for n in graph.node if n.op_type == "BatchNormalization" and "layer2.1" in n.name)
    var = inits[bn.input[4]]
    shift = np.float32(numpy_helper.to_array(var).min() / 2)   # large enough to show if epsilon were ignored
    next(a for a in bn.attribute if a.name == "epsilon").f = 1e-5 + shift
    var.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(var) - shift, var.name))
    path = tmp_path / "other_exporter.onnx"
    onnx.save(proto, path)
    assert max_diff(read_insightface(path), images, r18[1]) <= ATOL


def test_features_weight_other_than_one_is_folded_exactly(r18, images, tmp_path):
    net, _, _ = r18
    state = {k: v.clone() for k, v in net.state_dict().items()}
    state["features.weight"] = torch.empty(512).uniform_(-1.5, 1.5)
    other = TorchIResNet((2, 2, 2, 2)).eval()
    other.load_state_dict(state)
    path = tmp_path / "features.pth"
    torch.save(state, path)
    weights = read_insightface(path)
    assert to_flax_variables(weights)[2]["features_weight"].startswith("folded into fc")
    assert max_diff(weights, images, torch_embed(other, images)) <= ATOL


@pytest.mark.slow
def test_r50_from_pth_equals_torch(images, tmp_path):
    """The deeper variant, its architecture inferred from the names (3, 4, 14, 3 blocks)."""
    net = random_iresnet((3, 4, 14, 3), seed=1)
    path = tmp_path / "r50.pth"
    torch.save(net.state_dict(), path)
    weights = read_insightface(path, use_torch=False)
    model, variables, _ = to_flax_variables(weights)
    assert model == "iresnet50"
    assert models.count_params(variables["params"]) == sum(p.numel() for p in net.parameters()) - 512
    assert max_diff(weights, images, torch_embed(net, images)) <= ATOL


# --- safety -----------------------------------------------------------------------------------------------------


def _pickle_naming(tmp_path, name, call, marker):
    """A torch.save-style zip whose data.pkl calls `call(arg)` when unpickled (arg creates `marker`)."""
    class Payload:
        def __reduce__(self):
            return call

    path = tmp_path / name
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps(Payload(), protocol=2))
        z.writestr("archive/byteorder", "little")
        z.writestr("archive/version", "3\n")
        z.writestr("archive/.data/serialization_id", "0")
    return str(path)


@pytest.mark.parametrize("use_torch", [False, True])
def test_a_pth_naming_a_callable_is_refused_without_running_it(tmp_path, use_torch):
    marker = tmp_path / "ran"
    system = _pickle_naming(tmp_path, "system.pth", (os.system, (f"touch {marker}",)), marker)
    evil = _pickle_naming(tmp_path, "eval.pth", (eval, (f"open({str(marker)!r}, 'w')",)), marker)
    # (Protocol 2, torch.save's, spells the builtins module "__builtin__".)
    # (torch.save's protocol 2 spells the builtins "__builtin__"; torch's own refusal says just "eval".)
    for path, global_name in ((system, rf"{os.system.__module__}\.system"), (evil, r"(__builtin__\.|builtins\.)?eval")):
        with pytest.raises(pth_format.PthFormatError) as info:
            pth_format.read_state_dict(path, use_torch=use_torch)
        message = str(info.value)
        assert message.startswith(f"{path}: refused") and "\n" not in message
        assert re.search(rf"names the global {global_name}, ", message), message
        assert not marker.exists()
    # The importer stops at the same point and leaves no teacher run behind.
    with pytest.raises(pth_format.PthFormatError, match="refused"):
        insightface.import_insightface(str(tmp_path / "run"), system, log=lambda _: None)
    assert not marker.exists() and not (tmp_path / "run" / "teacher.json").exists()


def test_legacy_and_torchscript_files_are_refused_by_the_pure_reader(r18, tmp_path):
    legacy = tmp_path / "legacy.pth"
    torch.save({"w": torch.ones(2)}, legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(pth_format.PthFormatError, match=r"legacy\.pth: not a zip archive: a legacy torch\.save"):
        pth_format.read_state_dict(legacy, use_torch=False)
    np.testing.assert_array_equal(pth_format.read_state_dict(legacy, use_torch=True)["w"], np.ones(2))
    scripted = tmp_path / "scripted.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit's deprecation notices
        torch.jit.save(torch.jit.script(nn.Linear(2, 2)), scripted)
    for use_torch in (False, True):
        with pytest.raises(pth_format.PthFormatError, match="a TorchScript archive"):
            pth_format.read_state_dict(scripted, use_torch=use_torch)


def test_a_damaged_zip_directory_or_pickle_is_one_error_naming_the_file(tmp_path):
    """The fuzz harness's .pth findings: zipfile raised BadZipFile from is_zipfile and RuntimeError for an entry
    flagged encrypted, outside the reader's errors; a memo index in data.pkl made the unpickler allocate gigabytes."""
    path = tmp_path / "w.pth"
    torch.save({"w": torch.ones(3)}, path)
    good = path.read_bytes()
    np.testing.assert_array_equal(pth_format.read_state_dict(path, use_torch=False)["w"], np.ones(3))

    def refused(data: bytes, match: str, readers=(False, True)) -> None:
        path.write_bytes(data)
        for use_torch in readers:
            with pytest.raises(pth_format.PthFormatError, match=match) as e:
                pth_format.read_state_dict(path, use_torch=use_torch)
            assert str(e.value).startswith(f"{path}: ")

    locator = good.rindex(b"PK\x06\x07")  # torch writes zip64: the locator's "total number of disks" at +16
    refused(good[:locator + 16] + struct.pack("<I", 2) + good[locator + 20:], "damaged zip archive .*multiple disks")
    central = good.index(b"PK\x01\x02")  # the first entry's record (data.pkl): general purpose flags at +8
    flags = struct.unpack("<H", good[central + 8:central + 10])[0] | 1
    # (torch's reader ignores the flag and reads the entry: only the pure reader is asked)
    refused(good[:central + 8] + struct.pack("<H", flags) + good[central + 10:], "damaged zip archive .*encrypted",
            readers=(False,))
    with zipfile.ZipFile(io.BytesIO(good)) as z:
        info = z.getinfo(next(n for n in z.namelist() if n.endswith("data.pkl")))
        pickled = z.read(info)
    name_length, extra_length = struct.unpack("<HH", good[info.header_offset + 26:info.header_offset + 30])
    start = info.header_offset + 30 + name_length + extra_length  # the local header's own lengths (torch pads)
    assert good[start:start + len(pickled)] == pickled
    last_put = [pos for op, arg, pos in pickletools.genops(pickled) if op.name == "BINPUT"][-1]
    damaged = bytearray(good)
    damaged[start + last_put + 1] = 250  # a memo slot this pickle cannot have made yet
    crc = struct.pack("<I", zlib.crc32(bytes(damaged[start:start + len(pickled)])))  # zipfile checks it: mend it
    damaged[info.header_offset + 14:info.header_offset + 18] = crc
    damaged[central + 16:central + 20] = crc
    refused(bytes(damaged), r"data\.pkl is not a readable state dict: at byte \d+: memo index 250",
            readers=(False,))


# --- errors -----------------------------------------------------------------------------------------------------


def test_wrong_architecture_missing_extra_and_misshapen_tensors_are_named(r18, tmp_path):
    net, _, path = r18
    with pytest.raises(InsightfaceFormatError, match=rf"{path}: tensor layer1\.2\.bn1\.weight of iresnet50 is "
                                                     r"missing .*blocks per stage \[2, 2, 2, 2\] are iresnet18's"):
        to_flax_variables(read_insightface(path), "r50")
    state = net.state_dict()

    def error(change) -> str:
        changed = dict(state)
        change(changed)
        file = tmp_path / "changed.pth"
        torch.save(changed, file)
        with pytest.raises(InsightfaceFormatError) as info:
            to_flax_variables(read_insightface(file))
        assert str(info.value).startswith(f"{file}: ")
        return str(info.value)

    assert "tensor layer2.1.conv1.weight of iresnet18 is missing" in error(lambda s: s.pop("layer2.1.conv1.weight"))
    assert "tensor layer3.0.bn2.running_var has shape [255], iresnet18 needs [256]" in error(
        lambda s: s.update({"layer3.0.bn2.running_var": torch.ones(255)}))
    assert "tensor layer4.1.attention.weight is not part of iresnet18" in error(
        lambda s: s.update({"layer4.1.attention.weight": torch.ones(3)}))
    assert "tensor fc.weight has shape [512, 8192], iresnet18 needs [512, 25088]" in error(
        lambda s: s.update({"fc.weight": torch.ones(512, 8192)}))
    assert "blocks per stage [2, 2, 3, 2] are no arcface_torch iResNet's" in error(
        lambda s: s.update({"layer3.2.bn1.weight": torch.ones(256)}))
    with pytest.raises(ValueError, match="--arch=r77: unknown; known: r18, r34, r50, r100, r200"):
        to_flax_variables(read_insightface(path), "r77")


def test_an_unexpected_onnx_node_is_named(r18_onnx, tmp_path):
    import onnx

    proto = onnx.load(r18_onnx)
    prelu = next(n for n in proto.graph.node if n.op_type == "PRelu" and "layer1.0" in n.name)
    prelu.op_type = "Relu"
    path = tmp_path / "relu.onnx"
    onnx.save(proto, path)
    with pytest.raises(InsightfaceFormatError, match=rf"{path}: node '{prelu.name}' \(Relu\): expected the block's "
                                                     r"PReLU \(PRelu\)"):
        read_insightface(path)


def test_onnx_without_the_onnx_package_names_the_extra(r18_onnx, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(ImportError, match=r"pip install 'facekd_jax\[teachers\]'"):
        read_insightface(r18_onnx)


# --- the teacher run --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def teacher_run(r18, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("teacher") / "r18")
    logs = []
    run = insightface.import_insightface(out, r18[2], log=logs.append)
    return out, run, logs


def test_import_writes_a_teacher_run_and_is_idempotent(teacher_run, r18, r18_onnx):
    out, run, logs = teacher_run
    assert (run.model, run.image_size, run.embedding_size, run.imported) == ("iresnet18", 112, 512, True)
    assert logs == [f"imported iresnet18 (24,025,088 parameters) from {r18[2]} into {out}"]
    meta = json.loads(open(os.path.join(out, "teacher.json")).read())
    assert meta["source"] == os.path.abspath(r18[2]) and len(meta["sha256"]) == 64
    assert meta["parameters"] == 24_025_088 and meta["format"]["kind"] == "pth" and meta["crops"] == {}
    assert meta["normalisation"].startswith("(pixel - 127.5) / 127.5") and "cosine" in meta["compare"]
    config = json.loads(open(os.path.join(out, "config.json")).read())
    assert (config["model"], config["embedding_size"], config["data"]["image_size"]) == ("iresnet18", 512, 112)
    again = []
    insightface.import_insightface(out, r18[2], log=again.append)
    assert again[0].endswith("nothing to do")
    with pytest.raises(FileExistsError, match="holds a teacher imported from another file"):
        insightface.import_insightface(out, r18_onnx, log=again.append)


def test_imported_run_evaluates_and_builds_a_cache_equal_to_torch(teacher_run, r18, tmp_path, one_device):
    from facekd_jax import config_lib
    from facekd_jax.data import sources
    from facekd_jax.teachers import cache as cache_lib
    from facekd_jax.eval_only import evaluate_workdir

    out, _, _ = teacher_run
    config = config_lib.default_config()
    config.data.val_targets = ("synthetic:10",)   # 10 folds of one pair: 40 forward passes with the mirrors
    config.eval_batch_size = 8
    config.cpu_kernels = "xla"   # flax's layers: this checks the teacher run, not the oneDNN kernels
    results = evaluate_workdir(config, out)
    assert results["step"] == 0 and 0.0 <= results["results"]["synthetic"]["accuracy"] <= 1.0
    spec = "synthetic:2:2"
    cache = cache_lib.build_cache(out, spec, str(tmp_path / "cache"), batch_size=4, progress=False)
    assert cache.embeddings.shape == (4, 2, 512) and cache.header["teacher"]["model"] == "iresnet18"
    # Rendered as the cache renders them, inside tf.data (graph mode): an eager render can differ by one level
    # in a pixel now and then, which moves an embedding by ~1e-3.
    import tensorflow as tf
    source = sources.open_source(spec, image_size=112)
    indices = tf.data.Dataset.from_tensor_slices(np.arange(4, dtype=np.int64))
    pixels = np.stack(list(indices.map(lambda i: source.render(i[None])[0]).as_numpy_iterator()))
    x = (pixels.astype(np.float32) - 127.5) / 127.5
    # Faces are not the noise the statistics came from: embeddings up to ~20 here, hence a relative term too.
    np.testing.assert_allclose(cache.embeddings[:, 0], torch_embed(r18[0], x), rtol=1e-5, atol=ATOL)
    np.testing.assert_allclose(cache.embeddings[:, 1], torch_embed(r18[0], x[:, :, ::-1]), rtol=1e-5, atol=ATOL)


def test_command_line_imports_an_onnx_file(r18_onnx, tmp_path):
    out = tmp_path / "cli"
    proc = subprocess.run([sys.executable, "-m", "facekd_jax.teachers", "import", "insightface",
                           f"--weights={r18_onnx}", "--arch=r18", f"--out={out}"], cwd=REPO,
                          env=subprocess_env(1), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"imported iresnet18 (24,025,088 parameters) from {r18_onnx} into {out}" in proc.stdout
    meta = json.loads((out / "teacher.json").read_text())
    assert meta["format"]["kind"] == "onnx" and meta["arch"] == "iresnet18"


def test_command_line_errors_are_one_line(r18_onnx, tmp_path, capsys):
    from facekd_jax.teachers.__main__ import main

    for args, said in ((["--arch=r50", f"--weights={r18_onnx}"], "tensor layer1.2.bn1.weight of iresnet50"),
                       ([], "needs --weights=FILE.pth or --weights=FILE.onnx")):
        assert main(["import", "insightface", *args, f"--out={tmp_path / 'y'}"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and said in err, err
    assert not (tmp_path / "y" / "teacher.json").exists()
