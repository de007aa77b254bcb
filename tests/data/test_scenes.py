"""Synthetic Fashion-MNIST detection scenes (YOLO layout, exact boxes) and the ImageFolder export,
both read back through lorakit's own readers."""

from __future__ import annotations

import numpy as np
import pytest

from lorakit.data.fashion_mnist import COARSE_CLASSES, FASHION_MNIST_CLASSES, FASHION_MNIST_ROOT, load_fashion_mnist
from lorakit.data.image_folder import read_image_folder
from lorakit.data.scenes import export_image_folder, make_detection_scenes
from lorakit.data.yolo import read_yolo

pytestmark = pytest.mark.skipif(not FASHION_MNIST_ROOT.is_dir(), reason="sudo apt install dataset-fashion-mnist")


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    return make_detection_scenes(tmp_path_factory.mktemp("s") / "scenes", {"train": 30, "val": 10}, seed=3, canvas=80)


def test_scenes_read_back_with_exact_boxes(scenes):
    ds = read_yolo(scenes, "train")
    assert len(ds) == 30 and ds.classes == FASHION_MNIST_CLASSES and len(read_yolo(scenes, "val")) == 10
    counts = [len(b) for b in ds.box_labels]
    assert min(counts) >= 1 and max(counts) <= 3 and len(set(counts)) > 1
    for i in range(len(ds)):
        image, boxes, _ = ds[i]
        assert image.shape == (80, 80, 3)
        lit = image[..., 0] > 0  # black background: every nonzero pixel belongs to an item
        covered = np.zeros_like(lit)
        assert np.allclose(boxes, boxes.round(), atol=1e-3), "boxes are whole pixels (6 decimals in the label file)"
        for x1, y1, x2, y2 in np.round(boxes).astype(int):
            inside = lit[y1:y2, x1:x2]
            assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any(), "box not tight"
            assert not covered[y1:y2, x1:x2].any(), "boxes overlap"
            covered[y1:y2, x1:x2] = True
        assert not (lit & ~covered).any(), "an item pixel outside every box"


def test_same_seed_same_bytes_other_seed_other_scenes(scenes, tmp_path):
    again = make_detection_scenes(tmp_path / "again", {"train": 30, "val": 10}, seed=3, canvas=80)
    other = make_detection_scenes(tmp_path / "other", {"train": 30, "val": 10}, seed=4, canvas=80)
    first = sorted((p.relative_to(scenes.parent), p.read_bytes()) for p in scenes.parent.rglob("*") if p.is_file())
    assert first == sorted((p.relative_to(again.parent), p.read_bytes()) for p in again.parent.rglob("*") if p.is_file())
    assert (scenes.parent / "labels/train/00000.txt").read_text() != (other.parent / "labels/train/00000.txt").read_text()


def test_coarse_scenes_and_argument_errors(tmp_path):
    yaml = make_detection_scenes(tmp_path / "c", {"val": 5}, coarse=True, background_noise=30)
    ds = read_yolo(yaml, "val")
    assert ds.classes == COARSE_CLASSES and all(l.max() < 4 for l in ds.box_labels)
    with pytest.raises(FileExistsError, match="exists"):
        make_detection_scenes(tmp_path / "c", {"val": 1})
    with pytest.raises(ValueError, match="28·high <= canvas"):
        make_detection_scenes(tmp_path / "d", {"val": 1}, canvas=40, scale=(1, 2))
    with pytest.raises(ValueError, match=r"splits \['test'\]"):
        make_detection_scenes(tmp_path / "d", {"test": 1})
    assert not (tmp_path / "d").exists() and not list(tmp_path.glob(".d.tmp-*"))


def test_image_folder_export_reads_back(tmp_path):
    source = load_fashion_mnist("test")
    root = export_image_folder(source, tmp_path / "folder", per_class=3)
    ds = read_image_folder(root)
    assert len(ds) == 30 and "T-shirt-top" in ds.classes and ds.classes == tuple(sorted(ds.classes))
    image, label = ds[0]
    index = int(ds.paths[0].stem)
    assert np.array_equal(image[..., 0], source.images[index])
    assert FASHION_MNIST_CLASSES[source.labels[index]].replace("/", "-") == ds.classes[label]
