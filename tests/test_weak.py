"""The weakly supervised setting's data: the seeded 2 % split, a user's own anomalous folder, no
mask ever read, and chosen images kept out of the test set."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from cavga.cli import main
from cavga.data import anomalous_folder, list_split, make_demo_data, weak_split
from cavga.engine.run import load_checkpoint
from cavga.errors import DataError
from test_cli import SIZE, train_args


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_demo_data(
        tmp_path_factory.mktemp("weak"),
        seed=1,
        image_size=SIZE,
        n_train=10,
        n_test_good=3,
        n_test_defect=4,
        categories=("brick", "grass"),
    )


def test_weak_split_is_seeded_and_picks_only_anomalous_images(data: Path) -> None:
    """Same seed, same images; another seed, others; 2 % of 20 rounds to one image (never zero);
    only anomalous test images are chosen, in test-set order."""
    tests = list_split(data / "brick", "test")
    assert len([s for s in tests if s.label]) == 20
    a = weak_split(tests, 0.2, seed=3)
    assert [s.path for s in a] == [s.path for s in weak_split(tests, 0.2, seed=3)]
    assert len(a) == 4 and all(s.label == 1 for s in a)
    assert a == sorted(a, key=tests.index)
    assert {s.path for s in a} != {s.path for s in weak_split(tests, 0.2, seed=4)}
    assert len(weak_split(tests, 0.02, seed=0)) == 1
    with pytest.raises(DataError, match="anomalous-dir"):
        weak_split([s for s in tests if not s.label], 0.02, seed=0)
    with pytest.raises(DataError, match="fraction"):
        weak_split(tests, 1.5, seed=0)


def test_training_never_reads_masks_and_testing_leaves_the_chosen_images_out(data: Path, tmp_path: Path):
    """With every mask file replaced by garbage a weakly supervised run still trains (masks are never
    read); the run records the chosen image, and evaluation, with the masks back, removes exactly it."""
    root = tmp_path / "data"
    shutil.copytree(data, root)
    masks = sorted((root / "brick" / "ground_truth").rglob("*.png"))
    originals = {m: m.read_bytes() for m in masks}
    for m in masks:
        m.write_bytes(b"not a png")
    run = tmp_path / "run"
    assert main(train_args(root, run, "cavga-dw", 2, "--seed", "5")) == 0
    ckpt = load_checkpoint(run)
    expected = weak_split(list_split(root / "brick", "test"), 0.02, seed=5)
    assert ckpt["data"]["anomalous_files"] == [str(s.path.resolve()) for s in expected]
    assert ckpt["data"]["anomalous_source"] == "test split"
    assert json.loads((run / "train_summary.json").read_text())["n_anomalous_train"] == 1
    for m, b in originals.items():
        m.write_bytes(b)
    assert main(["test", str(run), "--device", "cpu"]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["n_removed_for_training"] == 1 and metrics["n_images"] == 3 + 20 - 1
    chosen = expected[0]
    assert not (run / "panels" / f"{chosen.defect_type}_{chosen.path.stem}.png").exists()
    assert len(list((run / "panels").glob("*.png"))) == 22


def test_own_anomalous_folder_replaces_the_split(data: Path, tmp_path: Path) -> None:
    """--anomalous-dir trains on the user's images (found in subfolders too) and takes nothing from
    the test set; an empty folder is a clear error."""
    own = tmp_path / "own" / "sub"
    own.mkdir(parents=True)
    for p in sorted((data / "grass" / "test" / "hole").glob("*.png"))[:2]:
        shutil.copy(p, own / p.name)
    assert len(anomalous_folder(tmp_path / "own")) == 2
    run = tmp_path / "run"
    assert main(train_args(data, run, "cavga-dw", 2, "--anomalous-dir", str(tmp_path / "own"))) == 0
    ckpt = load_checkpoint(run)
    assert len(ckpt["data"]["anomalous_files"]) == 2
    assert main(["test", str(run), "--device", "cpu", "--no-panels"]) == 0
    assert json.loads((run / "metrics.json").read_text())["n_removed_for_training"] == 0
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images found"):
        anomalous_folder(tmp_path / "empty")


def test_test_refuses_another_category_unless_forced(data: Path, tmp_path: Path, capsys) -> None:
    """A run trained on brick is not silently tested on grass: a one-line error naming both, and
    --force to do it anyway."""
    run = tmp_path / "run"
    assert main(train_args(data, run, "cavga-dw", 2)) == 0
    capsys.readouterr()
    assert main(["test", str(run), "--category", "grass", "--device", "cpu", "--no-panels"]) == 2
    err = capsys.readouterr().err
    assert "'brick'" in err and "'grass'" in err and "cavga-dw" in err and "--force" in err
    args = ["test", str(run), "--category", "grass", "--device", "cpu", "--no-panels", "--force"]
    assert main(args) == 0
