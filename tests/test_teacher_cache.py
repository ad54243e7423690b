"""facekd_jax.teachers: teacher runs, the teacher-embedding cache, and KD fed from it (the teacher never runs)."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from runs import tiny_config
from facekd_jax import checkpoint as ckpt_lib
from facekd_jax import models, sharding, train
from facekd_jax import step as step_lib
from facekd_jax.teachers import load as teacher_load
from facekd_jax.data import pipeline, sources
from facekd_jax.teachers import cache as cache_lib
from facekd_jax.teachers.imported import read_teacher_run

SPEC = "synthetic:6:4"           # 6 identities x 4 images
SIZE, WIDTH = 16, 32


def make_teacher_run(workdir, seed=0, model="resnet8"):
    """A teacher run as train/import leave one: config.json and a checkpoint with random (seeded) weights."""
    config = tiny_config("teacher_resnet18", **{"model": model})
    net = models.build_model(model, embedding_size=WIDTH, image_size=SIZE)
    variables = net.init({"params": jax.random.PRNGKey(seed), "dropout": jax.random.PRNGKey(1)},
                         jnp.zeros((1, SIZE, SIZE, 3)), train=False)
    # Running statistics of real activations (60 train-mode passes on noise), so that eval-mode embeddings are O(1)
    # and not the blown-up outputs of an unnormalised random network.
    x = jax.random.uniform(jax.random.PRNGKey(seed + 2), (32, SIZE, SIZE, 3), minval=-1.0, maxval=1.0)

    def calibrate(_, stats):
        _, upd = net.apply({"params": variables["params"], "batch_stats": stats}, x, train=True,
                           mutable=["batch_stats"], rngs={"dropout": jax.random.PRNGKey(0)})
        return upd["batch_stats"]

    stats = jax.jit(lambda s: jax.lax.fori_loop(0, 60, calibrate, s))(variables["batch_stats"])
    variables = {"params": variables["params"], "batch_stats": stats}
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort())
    ckpt = ckpt_lib.Checkpointer(str(workdir), max_to_keep=1, async_save=False)
    ckpt.save(0, {"params": {"backbone": variables["params"]}, "batch_stats": variables["batch_stats"]},
              {"step": 0})
    ckpt.close()
    return net, variables


def rendered(spec, indices):
    src = sources.open_source(spec, image_size=SIZE)
    return np.asarray(src.render(np.asarray(indices, np.int64)))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    net, variables = make_teacher_run(root / "teacher")
    cache = cache_lib.build_cache(str(root / "teacher"), SPEC, str(root / "cache"), batch_size=5, progress=False)
    return root, net, variables, cache


def test_cache_holds_each_image_and_its_mirror_in_source_order(built):
    _, net, variables, cache = built
    src = sources.open_source(SPEC, image_size=SIZE)
    assert cache.embeddings.shape == (src.num_images, 2, WIDTH)
    x = (rendered(SPEC, range(src.num_images)).astype(np.float32) - 127.5) / 127.5
    want = np.asarray(net.apply(variables, x, train=False))
    want_flip = np.asarray(net.apply(variables, x[:, :, ::-1], train=False))
    np.testing.assert_allclose(cache.embeddings[:, 0], want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(cache.embeddings[:, 1], want_flip, rtol=1e-4, atol=1e-5)
    assert not np.allclose(want, want_flip, atol=1e-3)  # the mirror is a different input
    np.testing.assert_array_equal(cache.labels(), src.labels)
    h = cache.header
    assert h["complete"] and h["data"]["num_images"] == 24 and h["data"]["num_classes"] == 6
    assert h["teacher"]["model"] == "resnet8" and h["embedding_size"] == WIDTH


def test_centres_are_the_normalised_mean_of_unit_embeddings(built):
    _, _, _, cache = built
    e = np.asarray(cache.embeddings, np.float64)
    labels = cache.labels()
    centres = cache.centres()
    assert centres.shape == (WIDTH, 6) and centres.dtype == np.float32
    for c in range(6):
        rows = [v / np.linalg.norm(v) for i in np.flatnonzero(labels == c) for v in e[i]]
        mean = np.mean(rows, axis=0)
        np.testing.assert_allclose(centres[:, c], mean / np.linalg.norm(mean), rtol=1e-5, atol=1e-6)


def test_a_stopped_build_resumes_and_fills_only_the_missing_rows(built, tmp_path):
    root, _, _, cache = built
    out = tmp_path / "cache"
    import shutil

    shutil.copytree(cache.directory, out)
    done = np.load(out / "done.npy", mmap_mode="r+")
    emb = np.load(out / "embeddings.npy", mmap_mode="r+")
    done[7:13] = False
    emb[7:13] = 0.0
    done.flush()
    emb.flush()
    del done, emb
    header = json.loads((out / "header.json").read_text())
    header["complete"] = False
    (out / "header.json").write_text(json.dumps(header))
    with pytest.raises(cache_lib.CacheMismatchError, match="incomplete"):
        cache_lib.open_cache(str(out)).check_matches(SPEC, sources.open_source(SPEC, image_size=SIZE))
    resumed = cache_lib.build_cache(str(root / "teacher"), SPEC, str(out), batch_size=4, progress=False)
    # Other batches (4 here, 5 before) may round differently in float32 on some CPUs (AMD Zen 3: 4e-7).
    np.testing.assert_allclose(resumed.embeddings, cache.embeddings, rtol=1e-5, atol=1e-6)
    assert resumed.header["complete"]


def test_a_cache_for_other_data_or_another_teacher_is_refused(built, tmp_path):
    root, _, _, cache = built
    src = sources.open_source(SPEC, image_size=SIZE)
    cache.check_matches(SPEC, src, teacher_workdir=str(root / "teacher"), teacher_model="resnet8",
                        embedding_size=WIDTH)
    other = "synthetic:6:5"
    with pytest.raises(cache_lib.CacheMismatchError, match="another dataset: data.spec"):
        cache.check_matches(other, sources.open_source(other, image_size=SIZE))
    with pytest.raises(cache_lib.CacheMismatchError, match="teacher"):
        cache.check_matches(SPEC, src, teacher_workdir=str(tmp_path / "elsewhere"))
    with pytest.raises(cache_lib.CacheMismatchError, match="teacher.embedding_size=64"):
        cache.check_matches(SPEC, src, embedding_size=64)
    # Building into it from another teacher is refused, and nothing in it changes.
    make_teacher_run(tmp_path / "teacher2", seed=5)
    before = {name: (root / "cache" / name).read_bytes() for name in os.listdir(root / "cache")}
    with pytest.raises(cache_lib.CacheMismatchError, match="another teacher"):
        cache_lib.build_cache(str(tmp_path / "teacher2"), SPEC, str(root / "cache"), progress=False)
    assert {name: (root / "cache" / name).read_bytes() for name in os.listdir(root / "cache")} == before
    with pytest.raises(FileNotFoundError, match="not a teacher-embedding cache"):
        cache_lib.open_cache(str(tmp_path))


def test_pipeline_feeds_the_embedding_of_the_flip_each_image_got(built):
    _, _, _, cache = built
    batches, _ = pipeline.make_train_dataset(SPEC, batch_size=8, image_size=SIZE, seed=3, process_index=0,
                                             process_count=1, teacher_embeddings=cache.embeddings)
    images = rendered(SPEC, range(24))
    seen_flips = set()
    for _, batch in zip(range(6), batches):
        assert batch["teacher_embedding"].shape == (8, WIDTH)
        for img, t in zip(batch["image"], batch["teacher_embedding"]):
            pixels = np.round(img * 127.5 + 127.5).astype(np.uint8)
            matches = [(i, f) for i in range(24) for f in (0, 1)
                       if np.array_equal(pixels, images[i] if f == 0 else images[i][:, ::-1])]
            assert matches, "batch image not found among the source's images"
            i, f = matches[0]
            np.testing.assert_array_equal(t, cache.embeddings[i, f])
            seen_flips.add(f)
    assert seen_flips == {0, 1}
    batches.close()


# One method per way a KD term takes the teacher: its embeddings (feature KD; SP-KD, Grouped KD and RKD read the
# same batch field), embeddings and its class centres (ArcFace-logit KD), the centres alone (ProxylessKD),
# embeddings into a state carried across steps (AdaDistill; EKD's state the same way).
@pytest.mark.parametrize("module", ["feature_kd", "arcface_kd", "proxyless_kd", "adadistill"])
def test_kd_step_from_the_cache_equals_the_live_teacher(module, built):
    """Same teacher inputs: the step fed cached embeddings (teacher never run) = the step running the teacher."""
    _, net, variables, cache = built
    # flax's layers in both (the cpu layers would change the summation order between the two teacher runs)
    overrides = {"teacher.model": "resnet8", "cpu_kernels": "xla"}
    live_cfg = tiny_config(module, **overrides)
    cached_cfg = tiny_config(module, **overrides, **{"teacher.cache": cache.directory})
    mesh = sharding.make_mesh(1, devices=jax.devices()[:1])
    centres = jnp.asarray(cache.centres())
    live = step_lib.setup(live_cfg, num_classes=6, mesh=mesh)
    cached = step_lib.setup(cached_cfg, num_classes=6, mesh=mesh)
    assert cached.teacher is None  # never runs
    assert (live.teacher is not None) == (module != "proxyless_kd")  # ProxylessKD needs only the centres
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (16, SIZE, SIZE, 3)).astype(np.float32)
    labels = rng.integers(0, 6, 16).astype(np.int32)
    t_emb = np.asarray(net.apply(variables, images, train=False))
    live_vars = {"params": {"backbone": variables["params"], "head": {"kernel": centres}},
                 "batch_stats": variables["batch_stats"]}
    cached_vars = {"params": {"head": {"kernel": centres}}}
    s_live, m_live = live.train_step(live.init_state(), sharding.put_batch({"image": images, "label": labels}, mesh),
                                     live_vars)
    s_cached, m_cached = cached.train_step(
        cached.init_state(), sharding.put_batch({"image": images, "label": labels, "teacher_embedding": t_emb}, mesh),
        cached_vars)
    assert float(m_live["total"]) > float(m_live["ce"]) or module in ("proxyless_kd", "adadistill")
    if module == "adadistill":  # stateful: the state moved, the same in both
        jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6),
                     s_cached.kd_state, s_live.kd_state)
        assert any(float(np.abs(np.asarray(x)).max()) > 0 for x in jax.tree.leaves(s_cached.kd_state))
    for key in m_live:
        np.testing.assert_allclose(np.asarray(m_cached[key]), np.asarray(m_live[key]), rtol=1e-4, atol=1e-6,
                                   err_msg=key)
    for a, b in zip(jax.tree.leaves(s_cached.params), jax.tree.leaves(s_live.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_projection_maps_a_smaller_student_into_the_teacher_space():
    cfg = tiny_config("feature_kd", **{"embedding_size": 16, "teacher.model": "resnet8"})
    mesh = sharding.make_mesh(1, devices=jax.devices()[:1])
    with pytest.raises(ValueError, match="kd.projection=True"):
        step_lib.setup(cfg, num_classes=6, mesh=mesh)
    cfg.kd.projection = True
    run = step_lib.setup(cfg, num_classes=6, mesh=mesh)
    state = run.init_state()
    assert state.params["projection"]["kernel"].shape == (16, WIDTH)
    rng = np.random.default_rng(0)
    batch = {"image": rng.uniform(-1, 1, (16, SIZE, SIZE, 3)).astype(np.float32),
             "label": rng.integers(0, 6, 16).astype(np.int32),
             "teacher_embedding": rng.standard_normal((16, WIDTH)).astype(np.float32)}
    cfg.teacher.cache = "(embeddings in the batch)"
    run = step_lib.setup(cfg, num_classes=6, mesh=mesh)
    before = np.array(state.params["projection"]["kernel"])  # the step donates the state
    new, metrics = run.train_step(state, sharding.put_batch(batch, mesh), {})
    assert np.isfinite(float(metrics["feature"]))
    assert not np.allclose(new.params["projection"]["kernel"], before)
    # The evaluated student is the backbone alone: the projection is not part of its apply.
    assert "projection" not in jax.eval_shape(run.student.init, jax.random.PRNGKey(0), batch["image"][:1])["params"]


def test_teacher_run_describes_its_network(tmp_path):
    make_teacher_run(tmp_path / "t")
    run = read_teacher_run(str(tmp_path / "t"))
    assert (run.model, run.image_size, run.embedding_size, run.imported) == ("resnet8", SIZE, WIDTH, False)
    assert run.crop_for("lfw:/x") is None
    with pytest.raises(FileNotFoundError, match="not a facekd_jax run"):
        read_teacher_run(str(tmp_path / "missing"))


def test_train_loop_distils_from_the_cache_with_teacher_centres(built, tmp_path, one_device):
    """The loop end to end with a cache and a method that needs the teacher's centres (ArcFace-logit KD)."""
    root, _, _, cache = built
    cfg = tiny_config("arcface_kd", **{"teacher.model": "resnet8", "teacher.workdir": str(root / "teacher"),
                                       "teacher.cache": cache.directory, "data.train": SPEC, "num_train_steps": 2,
                                       "data.val_targets": ()})
    out = train.train_and_evaluate(cfg, str(tmp_path / "student"))
    assert out["step"] == 2 and np.isfinite(out["metrics"]["hinton"]) and out["metrics"]["hinton"] > 0
    cfg.data.train = "synthetic:6:5"  # other data than the cache was built for: refused before any step
    with pytest.raises(cache_lib.CacheMismatchError, match="another dataset"):
        train.train_and_evaluate(cfg, str(tmp_path / "other"))


def test_centred_teacher_takes_the_cache_mean_out_of_targets_and_centres(built):
    """teacher.centre: the KD terms see unit teacher embeddings minus their mean over the cache, and centres made
    from those; the mean is that of every image and mirror."""
    root, net, variables, cache = built
    e = np.asarray(cache.embeddings, np.float64)
    unit = e / np.linalg.norm(e, axis=-1, keepdims=True)
    mean = unit.reshape(-1, unit.shape[-1]).mean(0)
    np.testing.assert_allclose(cache.mean(), mean, rtol=1e-5, atol=1e-7)
    labels = cache.labels()
    expected = np.stack([(unit[labels == c] - mean).sum(axis=(0, 1)) for c in range(6)], axis=1)
    expected /= np.linalg.norm(expected, axis=0, keepdims=True)
    np.testing.assert_allclose(cache.centres(cache.mean()), expected, rtol=1e-4, atol=1e-6)
    # One feature-KD step: the logged term is the loss against the centred targets.
    cfg = tiny_config("feature_kd", **{"teacher.model": "resnet8", "teacher.cache": cache.directory,
                                       "teacher.centre": True, "cpu_kernels": "xla"})
    mesh = sharding.make_mesh(1, devices=jax.devices()[:1])
    run = step_lib.setup(cfg, num_classes=6, mesh=mesh)
    tvars = teacher_load.load_teacher(run, cache)
    np.testing.assert_allclose(np.asarray(tvars["embedding_mean"]), mean, rtol=1e-5, atol=1e-7)
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (16, SIZE, SIZE, 3)).astype(np.float32)
    t = np.asarray(cache.embeddings[rng.integers(0, 24, 16), 0])
    state = run.init_state()
    student_emb = run.student.apply({"params": state.params["backbone"], "batch_stats": state.batch_stats},
                                    images, train=True, mutable=["batch_stats"])[0]
    _, metrics = run.train_step(state, sharding.put_batch({"image": images, "label": rng.integers(0, 6, 16).astype(
        np.int32), "teacher_embedding": t}, mesh), tvars)
    t_unit = t / np.linalg.norm(t, axis=-1, keepdims=True)
    from facekd_jax import losses
    want = losses.feature_kd(student_emb, t_unit - mean, "mse")
    np.testing.assert_allclose(float(metrics["feature"]), float(want), rtol=1e-4)
    assert abs(float(losses.feature_kd(student_emb, t, "mse")) - float(want)) > 1e-4  # centring changed it
    with pytest.raises(ValueError, match=r"teacher.centre=True .* --config.teacher.cache=DIR"):
        cfg_live = tiny_config("feature_kd", **{"teacher.model": "resnet8", "teacher.centre": True,
                                                "teacher.workdir": str(root / "teacher")})
        teacher_load.load_teacher(step_lib.setup(cfg_live, num_classes=6, mesh=mesh))
