"""The Ultralytics YOLO layout: data.yaml variants, label files, and a clear file:line error for every bad line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lorakit.data.yolo import label_path, read_yolo


def dataset(root: Path, labels: dict[str, str], yaml_text: str = "path: .\ntrain: images/train\nval: images/val\nnames: [cat, dog]\n",
            size: tuple[int, int] = (40, 20)) -> Path:
    """images/train/<stem>.png (size W x H) for every stem in `labels`; a None text writes no label file."""
    for stem, text in labels.items():
        image = root / "images" / "train" / f"{stem}.png"
        image.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.zeros((size[1], size[0]), np.uint8)).save(image)
        if text is not None:
            label_path(image).parent.mkdir(parents=True, exist_ok=True)
            label_path(image).write_text(text)
    (root / "data.yaml").write_text(yaml_text)
    return root / "data.yaml"


def test_boxes_in_pixels_missing_and_empty_label_files_mean_no_objects(tmp_path):
    yaml = dataset(tmp_path, {"a": "1 0.5 0.5 0.5 0.5\n\n0 0.25 0.25 0.1 0.1\n", "b": None, "c": ""})
    ds = read_yolo(yaml, "train")
    assert ds.classes == ("cat", "dog") and len(ds) == 3
    image, boxes, labels = ds[0]
    assert image.shape == (20, 40, 3)
    assert np.allclose(boxes, [[10, 5, 30, 15], [8, 4, 12, 6]]) and labels.tolist() == [1, 0]
    for i in (1, 2):
        assert ds[i][1].shape == (0, 4) and ds[i][2].shape == (0,)
    assert ds.label_files[1] is None


def test_names_as_mapping_nc_and_txt_lists(tmp_path):
    dataset(tmp_path / "d", {"a": "2 0.5 0.5 0.2 0.2\n"}, "train: list.txt\nnc: 3\nnames: {0: a, 1: b, 2: c}\n")
    (tmp_path / "d" / "list.txt").write_text("images/train/a.png\n")
    ds = read_yolo(tmp_path / "d" / "data.yaml")
    assert ds.classes == ("a", "b", "c") and ds.box_labels[0].tolist() == [2]


def test_label_path_replaces_the_last_images_folder():
    assert label_path(Path("/x/images/data/images/train/a.jpg")) == Path("/x/images/data/labels/train/a.txt")


BAD_LINES = [
    ("2 0.5 0.5 0.1 0.1", r"class id 2 is not an integer in 0..1"),
    ("-1 0.5 0.5 0.1 0.1", r"class id -1 is not an integer"),
    ("0.5 0.5 0.5 0.1 0.1", r"class id 0.5 is not an integer"),
    ("0 0.5 0.5 0.1", r"4 numbers .*'class cx cy w h'"),
    ("0 0.1 0.1 0.2 0.1 0.3 0.3", r"7 numbers .*polygons"),
    ("0 0.5 0.5 one 0.1", r"is not 5 numbers"),
    ("0 120 40 20 20", r"coordinates .* outside 0..1.*divide x and w by the image width"),
    ("0 0.5 -0.1 0.1 0.1", r"outside 0..1"),
    ("0 0.5 0.5 0 0.1", r"width and height must be > 0"),
]


@pytest.mark.parametrize("line,message", BAD_LINES, ids=[m.split()[0] + str(i) for i, (_, m) in enumerate(BAD_LINES)])
def test_bad_label_line_names_file_and_line(tmp_path, line, message):
    yaml = dataset(tmp_path, {"a": f"0 0.5 0.5 0.2 0.2\n{line}\n"})
    with pytest.raises(ValueError, match=rf"labels/train/a\.txt:2: .*{message}"):
        read_yolo(yaml)


@pytest.mark.parametrize("yaml_text,error,message", [
    ("train: images/train\nnames: [a]\nnc: 2\n", ValueError, "nc is 2 but names lists 1"),
    ("train: images/train\n", ValueError, "'names' must be a non-empty list"),
    ("train: images/train\nnames: {1: a}\n", ValueError, r"keys 0..0"),
    ("names: [a]\n", ValueError, "no 'train' entry"),
    ("train: images/nope\nnames: [a]\n", FileNotFoundError, "neither a folder of images nor a .txt list"),
    ("train: [images/train\n", ValueError, "not valid YAML"),
])
def test_bad_data_yaml(tmp_path, yaml_text, error, message):
    yaml = dataset(tmp_path, {"a": ""}, yaml_text)
    with pytest.raises(error, match=message):
        read_yolo(yaml)


def test_unreadable_image_is_an_error_at_read_time(tmp_path):
    yaml = dataset(tmp_path, {"a": "0 0.5 0.5 0.2 0.2\n"})
    (tmp_path / "images" / "train" / "a.png").write_bytes(b"\x89PNG broken")
    ds = read_yolo(yaml)
    with pytest.raises(ValueError, match=r"a\.png: unreadable image"):
        ds[0]
