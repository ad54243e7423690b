"""LFW's development split (facekd_jax.data.lfw_dev): held out of every training set, disjoint from the reported
test people, and the only LFW pairs a development run may read."""
import numpy as np
import pytest

from runs import REPO
from facekd_jax import errors, suite
from facekd_jax.data import lfw_dev, sources, verification


def _names_in(pairs_txt):
    names = set()
    for line in pairs_txt.read_text().splitlines()[1:]:
        fields = line.split()
        names.update([fields[0]] if len(fields) == 3 else [fields[0], fields[2]])
    return names


def test_the_development_people_are_held_out_of_every_training_set_and_apart_from_the_test(lfw_dir):
    root = str(lfw_dir)
    dev = set(lfw_dev.dev_people(root))
    assert len(dev) == lfw_dev.DEV_PEOPLE and dev == set(lfw_dev.dev_people(root))  # seeded: the same each time
    train_people = dict(lfw_dev.read_people(str(lfw_dir / lfw_dev.PEOPLE_TRAIN)))
    assert dev <= set(train_people) and all(2 <= train_people[p] <= lfw_dev.MAX_IMAGES for p in dev)
    for kind in ("lfw", "lfw-all"):  # labelled and label-free training sets (and so every teacher cache)
        source = sources.open_source(f"{kind}:{root}", image_size=16)
        assert not dev & set(source.class_names), kind
    assert len(sources.open_source(f"lfw-all:{root}", image_size=16).class_names) == len(train_people) - len(dev)
    test_people = {line.split()[0] for line in (lfw_dir / lfw_dev.PEOPLE_TEST).read_text().splitlines()[1:]}
    assert not dev & test_people and not dev & _names_in(lfw_dir / "pairsDevTest.txt")


def test_the_development_pairs_are_view_1_style_pairs_of_the_held_out_people(lfw_dir):
    pairs = lfw_dev.dev_pairs(str(lfw_dir))
    dev = set(lfw_dev.dev_people(str(lfw_dir)))
    assert len(pairs) == 2 * lfw_dev.DEV_PAIRS == len(set(pairs))
    assert [same for *_, same in pairs[:6]] == [True, False] * 3  # interleaved: every fold holds both kinds
    for name1, index1, name2, index2, same in pairs:
        assert {name1, name2} <= dev and (name1 == name2) == same
        assert not same or index1 != index2
    images, issame = verification.load_verification(f"lfw-dev:{lfw_dir}", image_size=16)
    assert images.shape == (4 * lfw_dev.DEV_PAIRS, 16, 16, 3) and issame.sum() == lfw_dev.DEV_PAIRS
    assert images.std() > 20  # real faces


def test_a_development_run_cannot_read_the_reported_pairs(lfw_dir, tmp_path):
    lfw_dev.refuse_test_pairs(True)
    try:
        for spec in (f"lfw:{lfw_dir}", f"lfw-view2:{lfw_dir}",
                     f"pairs:{lfw_dir}/pairsDevTest.txt:{lfw_dir}/lfw-deepfunneled"):
            with pytest.raises(errors.InputError, match="not read on the development split"):
                verification.load_verification(spec, image_size=16)
        verification.load_verification(f"lfw-dev:{lfw_dir}", image_size=16)  # allowed
    finally:
        lfw_dev.refuse_test_pairs(False)
    # The suite's development split: LFW sets become the development pairs, everything else stays.
    table = suite.load_table(str(REPO / "configs" / "lfw_dlib.py"))
    c = table.config("label_free_kd", split="dev")
    assert c.data.val_targets == ("lfw-dev:{root}",) and c.data.train == "lfw-all:{root}"
    assert suite.dev_spec("bin:/x/agedb_30.bin") == "bin:/x/agedb_30.bin"
    assert suite.dev_spec("lfw-view2:/d@1,2,3,4") == "lfw-dev:/d@1,2,3,4"
    # ...and the refusal ends with the suite, even when it fails.
    with pytest.raises(ValueError, match="unknown suite runs"):
        suite.run_suite(str(REPO / "configs" / "lfw_dlib.py"), str(tmp_path), runs=["nope"], split="dev")
    assert verification.load_verification(f"lfw:{lfw_dir}", image_size=16)[1].shape == (1000,)
    assert np.asarray(lfw_dev.dev_people(str(lfw_dir))).size == lfw_dev.DEV_PEOPLE


@pytest.mark.parametrize("aligned", [False, True])
def test_the_teacher_is_evaluated_on_the_development_pairs_with_its_own_crop(lfw_dir, tmp_path, monkeypatch,
                                                                             aligned):
    """The suite's teacher row on the table's first set as the table names it ('lfw-dev:{root}'): {root} resolved,
    the teacher's crop for that data (dlib's box on LFW, its chip's box in an aligned copy)."""
    import json

    from facekd_jax import eval_only
    from facekd_jax.data import align
    from facekd_jax.teachers.imported import TeacherRun

    root = tmp_path / "aligned" if aligned else lfw_dir
    if aligned:
        root.mkdir()
        (root / align.ALIGNMENT).write_text(json.dumps({"boxes": align.chip_boxes()}))
    (tmp_path / "teacher").mkdir()
    seen = []
    monkeypatch.setattr(eval_only, "evaluate_workdir",
                        lambda c, workdir: seen.append(c.data.val_targets[0]) or {"results": {}})
    run = TeacherRun(workdir=str(tmp_path / "teacher"), model="dlib_resnet29", image_size=150, embedding_size=128, crops={"lfw": (68, 77, 184, 193)},
                     imported=True, template="dlib")
    table = suite.load_table(str(REPO / "configs" / "lfw_dlib.py") + f":data.root={root}")
    config = table.config("label_free_kd", split="dev")
    suite.teacher_record(suite.Teacher(str(tmp_path / "teacher"), run), config, log=lambda *_: None)
    box = align.chip_boxes()["dlib"] if aligned else (68, 77, 184, 193)
    assert seen == [f"lfw-dev:{root}@{','.join(map(str, box))}"]
