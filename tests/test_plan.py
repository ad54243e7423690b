"""The TPU plan: the real train step compiled for compile-only TPU topologies (libtpu, the [tpu] extra) on the CPU."""
import importlib.util
import math
import subprocess
import sys

import pytest

from runs import REPO, subprocess_env, tiny_config
from facekd_jax import plan, tpu

needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason=f"libtpu is not installed: {tpu.TPU_EXTRA}")
TINY = str(REPO / "configs" / "baseline_resnet56.py") + ":tiny"


def _param_count(config, num_classes):
    from facekd_jax import models

    backbone = models.model_summary(config.model, image_size=config.data.image_size,
                                    embedding_size=config.embedding_size)["params"]
    return backbone, config.embedding_size * num_classes


@needs_libtpu
def test_the_tiny_plan_compiles_for_a_topology_with_positive_figures_and_per_chip_state():
    topology = "v5e-4"
    config = tiny_config("baseline_resnet56")
    (p,) = plan.plan(config, [topology], classes="8")
    train, embed = p["train"], p["embed"]
    assert train["chips"] == 4 and train["mesh"] == {"data": 4, "model": 1} and train["fits"]
    memory = train["memory_per_chip"]
    # A program this small keeps its temporaries on the chip (0 bytes of HBM); resnet56 at 112x112 needs 5 GiB.
    assert all(memory[k] > 0 for k in ("argument", "output", "alias", "generated_code", "total")), memory
    assert memory["temp"] >= 0 and memory["total"] == (memory["argument"] + memory["output"] - memory["alias"]
                                                       + memory["temp"] + memory["generated_code"])
    assert train["flops_per_chip"] > 0 and train["bytes_accessed_per_chip"] > 0
    # Replicated on a data-parallel mesh: every chip holds all float32 parameters, and SGD's momentum of each.
    backbone, head = _param_count(config, 8)
    assert train["state_bytes_per_chip"]["params"] == 4 * (backbone + head)
    assert train["state_bytes_per_chip"]["opt_state"] >= 4 * (backbone + head)
    # The compiler's count of a step is the model's (forward + backward + head) plus the optimiser and norms.
    assert 0.8 < train["flops_ratio"] < 3.0, train["flops_ratio"]
    chip = tpu.CHIPS[topology.split("-")[0]]
    bound = plan.roofline(train["flops_per_chip"], train["bytes_accessed_per_chip"], chip)
    assert train["images_per_second_bound"] == pytest.approx(16 / bound)
    assert train["epoch_seconds_bound"]["MS1MV2"] == pytest.approx(5_822_653 / train["images_per_second_bound"])
    assert train["collectives"]["all-reduce"]["count"] > 0  # the gradient all-reduce over `data`
    assert embed["memory_per_chip"]["total"] > 0 and embed["images_per_second_bound"] > 0


@needs_libtpu
def test_a_class_sharded_head_is_split_over_the_model_axis_and_never_gathered():
    config = tiny_config("baseline_resnet56", **{"mesh.model_parallelism": 2})
    classes = 1000
    train = plan.plan_train(config, tpu.TOPOLOGIES["v4-8"], classes)
    assert train["mesh"] == {"data": 2, "model": 2} and train["fits"] and train["head_gathered"] == []
    backbone, head = _param_count(config, classes)
    assert train["state_bytes_per_chip"]["params"] == 4 * (backbone + head // 2)


def test_both_ways_libtpu_says_a_program_exceeds_hbm_are_read_as_does_not_fit():
    """libtpu 0.0.42's words (the second came from a WebFace42M head at batch 512 on one v5e; unread, it stopped
    the largest-batch search with a traceback)."""
    first = ("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Program hbm requirement 17.63G: ... Total hbm "
             "usage >= 17.63G: required for program (17.63G) exceeds available HBM (15.75G)")
    second = ("RESOURCE_EXHAUSTED: E1000: CompileTimeHbmOom: XLA:TPU compile permanent error. Ran out of memory in "
              "memory space hbm. Used 15.76G of 15.75G hbm. Exceeded hbm capacity by 16.84M.")
    assert plan.out_of_memory(first) == (int(17.63 * 2**30), int(15.75 * 2**30))
    assert plan.out_of_memory(second) == (int(15.76 * 2**30), int(15.75 * 2**30))
    assert plan.out_of_memory("INTERNAL: something else") is None


def test_the_collective_and_gather_readers_on_hlo_text():
    hlo = """
  %all-reduce.3 = f32[64,32]{1,0} all-reduce(f32[64,32]{1,0} %p), replica_groups={{0,1}}
  %ag = (f32[32,1000]{1,0}, u32[]) all-gather-start(f32[32,500]{1,0} %h), dimensions={1}
  %agd = f32[32,1000]{1,0} all-gather-done((f32[32,1000]{1,0}, u32[]) %ag)
  ROOT %cp = bf16[8]{0} collective-permute(bf16[8]{0} %x), source_target_pairs={{0,1}}
"""
    found = plan.collectives(hlo)
    assert found["all-reduce"] == {"count": 1, "bytes": 64 * 32 * 4}
    assert found["all-gather"]["count"] == 1 and found["all-gather"]["bytes"] == 32 * 1000 * 4 + 4
    assert found["collective-permute"] == {"count": 1, "bytes": 16}
    assert plan.gathered_head(hlo, 32, 1000) and not plan.gathered_head(hlo, 32, 2000)


@pytest.mark.slow
@needs_libtpu
def test_a_config_too_large_for_one_chip_exits_3_naming_the_shortfall(tmp_path):
    """40 M classes: a [32, 40 M] float32 head, its momentum and gradient (15 GiB) exceed a v5e's 16 GiB budget
    at any batch."""
    out = subprocess.run([sys.executable, "-m", "facekd_jax.plan", f"--config={TINY}", "--topology=colab",
                          "--classes=40000000", f"--json={tmp_path / 'plan.json'}"],
                         cwd=REPO, env=subprocess_env(1), capture_output=True, text=True, timeout=600)
    assert out.returncode == plan.EXIT_DOES_NOT_FIT, out.stderr[-3000:]
    last = out.stderr.strip().splitlines()[-1]
    assert "colab: does not fit by" in last and "bytes per chip" in last and "largest batch that fits: none" in last
    import json

    saved = json.loads((tmp_path / "plan.json").read_text())["plans"][0]["train"]
    assert not saved["fits"] and saved["shortfall_bytes"] > 0 and saved["max_batch"] is None
    assert saved["state_bytes_per_chip"]["params"] > 40_000_000 * 32 * 4


def test_an_unknown_topology_and_a_missing_libtpu_are_one_line_errors(monkeypatch):
    with pytest.raises(plan.PlanError, match=r"unknown topology 'v9-8'; known: v4-8, .*v5e-8.*colab"):
        plan.find_topology("v9-8")
    out = subprocess.run([sys.executable, "-m", "facekd_jax.plan", f"--config={TINY}", "--topology=v9-8"],
                         cwd=REPO, env=subprocess_env(1), capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0, out.stderr[-2000:]
    assert out.stderr.startswith("error: unknown topology 'v9-8'")

    from jax.experimental import topologies

    def no_plugin(**kwargs):
        raise RuntimeError("Unable to initialize backend 'tpu': no TPU plugin")
    monkeypatch.setattr(topologies, "get_topology_desc", no_plugin)
    with pytest.raises(plan.PlanError, match=r"needs libtpu.*pip install 'facekd_jax\[tpu\]'"):
        plan.topology_devices(tpu.TOPOLOGIES["v5e-8"])


def test_the_topology_table_counts_chips_and_hosts_as_cloud_tpu_names_them():
    assert tpu.TOPOLOGIES["v4-8"].chips == 4 and tpu.TOPOLOGIES["v5p-16"].chips == 8  # TensorCores, 2 per chip
    assert tpu.TOPOLOGIES["v5e-8"].chips == 8 and tpu.TOPOLOGIES["v5e-8"].hosts == 1
    assert tpu.TOPOLOGIES["v5e-16"].hosts == 4 and tpu.TOPOLOGIES["colab"].chips == 1
    for chip in tpu.CHIPS.values():
        assert chip.peak_bf16_flops > 1e14 and chip.hbm_bytes > 1e10 and chip.source.startswith("https://")
    assert math.isclose(plan.roofline(2e12, 1e9, tpu.CHIPS["v5e"]), max(2e12 / 197e12, 1e9 / 819e9))


@needs_libtpu
@pytest.mark.parametrize("largest", [1, 4, 64, 512, 1 << 16])
def test_the_batch_search_walks_from_the_configs_batch_to_the_largest_that_fits(monkeypatch, largest):
    """max_batch on a fitting rule (the compile stubbed: its figures are tested above): the answer is the largest
    power of two times the data axis that fits, found in few compiles when it is near the config's batch."""
    compiled = []
    monkeypatch.setattr(plan, "plan_train", lambda config, topology, n, batch, headroom: compiled.append(batch)
                        or {"fits": batch <= 4 * largest})
    config = tiny_config("baseline_resnet56")
    known = {"global_batch": 64, "fits": 64 <= 4 * largest, "state_bytes_per_chip": {"params": 1}, "budget_bytes": 2}
    best, tried = plan.max_batch(config, tpu.TOPOLOGIES["v5e-4"], 8, known=known, limit=1 << 18)
    assert best == 4 * largest and all(tried[b] == (b <= best) for b in tried)
    assert 4 * largest * 2 in tried or best == 1 << 18   # the next batch up was compiled and refused
    if largest in (4, 64):
        assert len(compiled) <= 3, compiled


def test_the_slice_a_tpu_host_sees_is_named_as_the_plan_names_it():
    class Device:
        def __init__(self, kind):
            self.device_kind = kind

    assert tpu.topology_of([Device("TPU v5 lite")]) == "colab"
    assert tpu.topology_of([Device("TPU v5 lite")] * 8) == "v5e-8"
    assert tpu.topology_of([Device("TPU v4")] * 4) == "v4-8"      # 4 megacore chips = v4-8 (TensorCores)
    assert tpu.topology_of([Device("TPU v6 lite")]) == "colab-v6e"
    with pytest.raises(tpu.PlanError, match="no plan topology for 3 x TPU v5 lite"):
        tpu.topology_of([Device("TPU v5 lite")] * 3)
    with pytest.raises(plan.PlanError, match="NVIDIA H200"):
        tpu.topology_of([Device("NVIDIA H200")])


def test_the_plan_table_names_the_largest_batch_of_a_row_that_does_not_fit_even_without_the_search():
    """benchmarks/plan_table.py --no-search: a row that fits says "not searched"; one that does not, the batch the
    plan halved down to (plan.plan always finds it then)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import plan_table

    train = {"topology": "colab", "global_batch": 512, "fits": False, "shortfall_bytes": 2**28, "head_gathered": [],
             "memory_per_chip": {"total": 15 * 2**30}, "images_per_second_bound": 2360.0, "max_batch": 256,
             "epoch_seconds_bound": {"CASIA-WebFace": 60.0, "MS1MV2": 600.0, "WebFace42M": 3600.0},
             "collectives": {"all-reduce": {"count": 0, "bytes": 0}}}
    cells = [c.strip() for c in plan_table.row_markdown("thesis", train, searched=False).split("|")]
    assert cells[5:7] == ["no (+0.25 GiB)", "256"], cells
    fits = dict(train, fits=True, shortfall_bytes=0)
    del fits["max_batch"]
    cells = [c.strip() for c in plan_table.row_markdown("thesis", fits, searched=False).split("|")]
    assert cells[5:7] == ["yes", "not searched"], cells
