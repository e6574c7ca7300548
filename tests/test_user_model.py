"""One's own model (`model=package.module:function`) and image folder on the command line.

A tiny model module and a folder of PNGs are written into tmp_path; the `jfail` command runs in
this process (`jfail.cli.main`)."""

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jfail import cli, data
from jfail.config import load_config
from jfail.models.user import UserModel, UserModelError, load_user_model

REPO = Path(__file__).resolve().parents[1]
BARLOW = str(REPO / "configs" / "barlow_fmnist.py")
PRIME = str(REPO / "configs" / "prime_fmnist.py")
DEFUSE = str(REPO / "configs" / "defuse_fmnist.py")
CLASSES = ("circle", "square", "triangle")

# Class k is a bright quadrant k of a dark 28x28 image. The model reads the quadrants' brightness
# (its features) and is right on circle and square, and wrong on every triangle: it never
# predicts class 2, so a triangle goes to the class of the brighter of quadrants 0 and 1.
MODELS = '''
import jax
import jax.numpy as jnp
from jfail.models.user import UserModel


def quadrants(x):
    return jnp.stack([x[:, :14, :14].mean((1, 2, 3)), x[:, :14, 14:].mean((1, 2, 3)),
                      x[:, 14:, :14].mean((1, 2, 3)), x[:, 14:, 14:].mean((1, 2, 3))], -1)


def logits(x):
    return (10 * quadrants(x)[:, :3]).at[:, 2].set(-10.0)


def planted():
    return UserModel(classifier=logits, features=quadrants, num_classes=3)


def classifier_only():
    return logits


def as_dict():
    return {"classifier": logits, "features": quadrants}


def returns_int():
    return 3


def bad_key():
    return {"classifier": logits, "weights": 1}


def wrong_size():
    return UserModel(classifier=lambda x: x.reshape(len(x), 32 * 32)[:, :3],
                     features=quadrants)


def four_classes():
    return UserModel(classifier=lambda x: quadrants(x), features=quadrants)


def needs_argument(width):
    return logits


def closure_for_defuse():
    return UserModel(classifier=logits)


def fails():
    raise RuntimeError("weights.npy is missing")


NOT_CALLABLE = 3
'''


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    """tmp_path as the current directory, holding `my_models.py` and `shapes/` (3 classes x 12
    PNGs of 28x28)."""
    (tmp_path / "my_models.py").write_text(MODELS)
    _write_image_folder(tmp_path / "shapes", per_class=12)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("my_models", None)
    yield tmp_path
    sys.modules.pop("my_models", None)


def _write_image_folder(root: Path, per_class: int, size=(28, 28), mode="L", seed=0):
    rng = np.random.default_rng(seed)
    for k, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 60, (*size, 3), dtype=np.uint8)
            row, col = divmod(k, 2)
            h, w = size[0] // 2, size[1] // 2
            pixels[row * h:(row + 1) * h, col * w:(col + 1) * w] = 200 + rng.integers(0, 55)
            image = Image.fromarray(pixels)
            image.convert(mode).save(root / name / f"{i:02d}.png")


def _tree(root: Path) -> dict:
    """Every path under `root` with its size and modification time."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*"))}


def test_barlow_explains_the_errors_of_ones_own_model_on_an_image_folder(workspace, capsys):
    untouched = workspace / "runs" / "classifiers" / "resnet18_fmnist"  # the config's run
    argv = ["barlow", "--config", BARLOW, "--quiet", "--workdir", "run",
            "--set", "model=my_models:planted", "--set", "dataset=imagefolder:shapes",
            "--set", "split=train", "--set", "evidence_split=test", "--set", "depths=(1,)",
            "--set", "attack_steps=2", "--set", "panel_images=2"]
    assert cli.main(argv) == 0, capsys.readouterr().err
    summary = json.loads((workspace / "run" / "barlow_fmnist.json").read_text())
    # the planted model: wrong on every triangle, right on every other image
    assert summary["class_error_rates"] == {"circle": 0.0, "square": 0.0, "triangle": 1.0}
    assert summary["data"]["images"] + summary["data"]["evidence_images"] == 36
    by_label = {row["name"]: row for row in summary["tables"]["user_label"]}
    assert [by_label[name]["ber"] for name in CLASSES] == [0.0, 0.0, 1.0]
    # grouped by prediction, the top leaf holds exactly the errors (the triangles sent to that
    # class), split off by the brightness of the triangle's quadrant (feature 2) or of the
    # group's own class quadrant, the two features that tell them apart
    groups_with_errors = 0
    for row in summary["tables"]["user_prediction"]:
        if row["errors_in_group"]:
            groups_with_errors += 1
            assert row["valid"] and row["er"] == 1.0 and row["ec"] == 1.0, row
            assert row["feature"][0] in (2, CLASSES.index(row["name"])), row
    assert groups_with_errors >= 1
    assert summary["models"] == {"user": "my_models:planted"}
    report = (workspace / "run" / "barlow_fmnist.md").read_text()
    assert "with the model my_models:planted" in report and "triangle 100.0 %" in report
    assert (workspace / "run" / "report.html").is_file()
    assert not untouched.exists()  # no classifier was trained


def test_prime_runs_on_ones_own_model(workspace, capsys):
    argv = ["prime", "--config", PRIME, "--quiet", "--workdir", "run",
            "--set", "model=my_models:classifier_only", "--set", "dataset=./shapes",
            "--set", "search_split=train", "--set", "min_size=3", "--set", "min_tag_count=2",
            "--set", "planted_images_per_class=300", "--set", "planted_prevalence=(0.5, 0.3)",
            "--set", "planted_num_tags=12", "--set", "sweep_min_sizes=(3,)",
            "--set", "sweep_min_drops=(0.3,)", "--set", "greedy_beam_width=2",
            "--set", "max_tags=2", "--set", "min_gain=(0.1,)"]
    assert cli.main(argv) == 0, capsys.readouterr().err
    report = json.loads((workspace / "run" / "prime_fmnist.json").read_text())
    assert report["classifier"]["model"] == "my_models:classifier_only"
    assert report["class_names"] == list(CLASSES)
    assert report["class_accuracy"]["search"] == [1.0, 1.0, 0.0]
    assert report["class_accuracy"]["heldout"] == [1.0, 1.0, 0.0]


def test_a_classifier_run_without_a_finished_run_is_an_error_and_left_untouched(
        workspace, capsys):
    folder = workspace / "my_classifier"
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "checkpoints" / "note.txt").write_text("interrupted")
    before = _tree(folder)
    status = cli.main(["prime", "--config", PRIME, "--workdir", "run",
                       "--set", f"classifier_run={folder}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1, err
    assert (f"no trained classifier in {folder}: train one with `jfail train --config "
            "configs/defuse_cnn_fmnist.py --workdir") in err[0]
    assert "or give model=package.module:function" in err[0]
    assert _tree(folder) == before and not (workspace / "run").exists()


def test_a_classifier_run_inside_the_run_directory_may_be_trained_there(workspace):
    run_dir = (workspace / "run").absolute()
    config = load_config(PRIME, [f"classifier_run={run_dir / 'models' / 'classifier'}"])
    cli._check_models(config, run_dir)  # no error: the pipeline trains it into the run
    outside = load_config(PRIME, [f"classifier_run={workspace / 'models' / 'classifier'}"])
    with pytest.raises(ValueError, match="no trained classifier in"):
        cli._check_models(outside, run_dir)


BAD_MODELS = [
    ("barlow", "no_such_module:planted", "no module named 'no_such_module' in the current"),
    ("barlow", "my_models:plantd", "has no attribute 'plantd'; its callables: "),
    ("barlow", "my_models:NOT_CALLABLE", "NOT_CALLABLE is of type int, not a function"),
    ("barlow", "my_models:returns_int", "returned an object of type int; return the model"),
    ("barlow", "my_models:bad_key", "unknown: weights"),
    ("barlow", "my_models:needs_argument", "name a function of no arguments"),
    ("barlow", "my_models:fails", "fails() failed with RuntimeError: weights.npy is missing"),
    ("barlow", "my_models:wrong_size", "classifier cannot be called on the data's images [B, 28"),
    ("barlow", "my_models:four_classes", "the classifier returns 4 logits but the data has 3"),
    ("barlow", "my_models:classifier_only", "this method needs the model's features"),
    ("barlow", "my_models", "model must look like package.module:function"),
    ("defuse", "my_models:closure_for_defuse", "this method fine-tunes the classifier"),
]


@pytest.mark.parametrize("command, spec, message", BAD_MODELS,
                         ids=[f"{c}-{s}" for c, s, _ in BAD_MODELS])
def test_a_bad_model_is_one_line_and_status_2_before_the_workdir_exists(
        workspace, capsys, command, spec, message):
    config = {"barlow": BARLOW, "defuse": DEFUSE}[command]
    status = cli.main([command, "--config", config, "--workdir", "run", "--set",
                       f"model={spec}", "--set", "dataset=imagefolder:shapes"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and message in err[0], err
    assert err[0].startswith(f"jfail {command}: ")
    assert not (workspace / "run").exists()


@pytest.mark.parametrize("overrides, message", [
    (("dataset=imagefolder:nowhere",), "image folder 'nowhere' is not a directory"),
    (("dataset=shapes",), "'shapes' is a folder here: write 'imagefolder:shapes'"),
    (("parts=('table9',)",), "unknown parts ['table9']"),
    (("methods=('gradient', 'magic')",), "unknown methods ['magic']"),
])
def test_a_bad_config_leaves_no_work_directory(workspace, capsys, overrides, message):
    argv = ["debugtests", "--config", str(REPO / "configs" / "debug_tests.py"),
            "--workdir", "run", *[item for o in overrides for item in ("--set", o)]]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (workspace / "run").exists()


def test_load_user_model_accepts_a_user_model_a_dict_or_a_bare_callable(workspace):
    assert isinstance(load_user_model("my_models:planted"), UserModel)
    assert load_user_model("my_models:as_dict").features is not None
    bare = load_user_model("my_models:classifier_only")
    assert callable(bare.classifier) and bare.features is None
    with pytest.raises(UserModelError, match="give both encoder and decoder"):
        from jfail.models.user import check_user_model

        check_user_model(UserModel(classifier=bare.classifier, decoder=bare.classifier),
                         (28, 28, 1))


def test_an_image_folder_loads_with_sorted_labels_splits_and_modifiers(tmp_path):
    _write_image_folder(tmp_path / "flat", per_class=10)
    everything = data.load(f"imagefolder:{tmp_path / 'flat'}", "all")
    assert everything.class_names == CLASSES
    assert everything.images.shape == (30, 28, 28, 1) and everything.images.dtype == np.float32
    np.testing.assert_array_equal(everything.labels, np.repeat([0, 1, 2], 10))
    # the bright quadrant of class k is where it was drawn
    assert everything.images[everything.labels == 1, :14, 14:].mean() > 0.75
    train, test = (data.load(str(tmp_path / "flat"), split) for split in ("train", "test"))
    assert len(train.labels) == 24 and np.bincount(test.labels).tolist() == [2, 2, 2]
    small = data.load(f"imagefolder:{tmp_path / 'flat'}@14[:50%]", "train")
    assert small.images.shape == (12, 14, 14, 1)
    assert data.dataset_image_shape(f"imagefolder:{tmp_path / 'flat'}@14") == (14, 14, 1)

    # train/ and test/ subfolders are the splits; colour files give 3 channels
    for split, count in (("train", 4), ("test", 2)):
        _write_image_folder(tmp_path / "split" / split, per_class=count, size=(12, 16),
                            mode="RGB")
    test = data.load(f"imagefolder:{tmp_path / 'split'}", "test")
    assert test.images.shape == (6, 12, 16, 3)
    with pytest.raises(ValueError, match="Unknown split 'all'"):
        data.load(f"imagefolder:{tmp_path / 'split'}", "all")

    # mixed sizes need @S
    _write_image_folder(tmp_path / "mixed", per_class=2)
    Image.new("L", (20, 20)).save(tmp_path / "mixed" / "circle" / "odd.png")
    with pytest.raises(ValueError, match="2 sizes .*add @S"):
        data.load(f"imagefolder:{tmp_path / 'mixed'}", "train")
    assert data.load(f"imagefolder:{tmp_path / 'mixed'}@20", "all").images.shape[1:] == (20, 20, 1)
    os.remove(tmp_path / "mixed" / "circle" / "odd.png")
    (tmp_path / "mixed" / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no .png"):
        data.check_dataset_name(f"imagefolder:{tmp_path / 'mixed'}")
