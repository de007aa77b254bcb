"""Reading image files (Pillow) and the ImageFolder layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lorakit.data.image_folder import read_image_folder
from lorakit.data.images import ArrayImages, read_image, to_normalized_cxcywh, to_pixel_xyxy


def save(path: Path, array: np.ndarray, mode: str | None = None, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode).save(path, **kw) if mode else Image.fromarray(array).save(path, **kw)
    return path


def test_read_image_gives_uint8_rgb_from_gray_rgba_and_palette(tmp_path):
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    assert np.array_equal(read_image(save(tmp_path / "g.png", gray)), np.repeat(gray[:, :, None], 3, axis=2))
    rgba = np.zeros((3, 4, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 255
    out = read_image(save(tmp_path / "a.png", rgba))
    assert out.shape == (3, 4, 3) and out.dtype == np.uint8 and (out[..., 0] == 200).all()
    palette = Image.fromarray(gray).convert("P")
    palette.save(tmp_path / "p.png")
    assert read_image(tmp_path / "p.png").shape == (3, 4, 3)


def test_read_image_applies_exif_orientation(tmp_path):
    wide = np.zeros((2, 6, 3), np.uint8)
    image = Image.fromarray(wide)
    exif = image.getexif()
    exif[0x0112] = 6  # Orientation: rotate 90° clockwise to display
    image.save(tmp_path / "r.jpg", exif=exif)
    assert read_image(tmp_path / "r.jpg").shape == (6, 2, 3)


def test_unreadable_and_missing_images_name_the_file(tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match=r"broken\.jpg: unreadable image .*re-export or delete"):
        read_image(bad)
    with pytest.raises(FileNotFoundError, match="nothere.png"):
        read_image(tmp_path / "nothere.png")


def test_image_folder_sorted_classes_nested_files_and_extensions(tmp_path):
    px = np.full((4, 4), 128, np.uint8)
    save(tmp_path / "zebra" / "b.PNG", px)
    save(tmp_path / "zebra" / "deep" / "a.jpg", px)
    save(tmp_path / "ant" / "x.bmp", px)
    (tmp_path / "ant" / "notes.txt").write_text("skipped")
    (tmp_path / "stray.png").write_bytes(b"")  # a file at the root is not a class
    ds = read_image_folder(tmp_path)
    assert ds.classes == ("ant", "zebra")
    assert [p.relative_to(tmp_path).as_posix() for p in ds.paths] == ["ant/x.bmp", "zebra/b.PNG", "zebra/deep/a.jpg"]
    assert ds.labels.tolist() == [0, 1, 1]
    image, label = ds[2]
    assert image.shape == (4, 4, 3) and label == 1


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        read_image_folder(tmp_path / "missing")
    with pytest.raises(ValueError, match="no class subfolders"):
        read_image_folder(tmp_path)
    save(tmp_path / "cat" / "1.png", np.zeros((2, 2), np.uint8))
    (tmp_path / "dog").mkdir()
    with pytest.raises(ValueError, match=r"class folders \['dog'\] hold no image"):
        read_image_folder(tmp_path)


def test_array_images_checks_its_labels():
    with pytest.raises(ValueError, match="labels span 0..3 but there are 2 classes"):
        ArrayImages(np.zeros((2, 3, 3), np.uint8), np.array([0, 3]), ("a", "b"))


def test_box_conversions_round_trip():
    xyxy = np.array([[10, 20, 30, 40], [0, 0, 64, 48]], np.float32)
    back = to_pixel_xyxy(to_normalized_cxcywh(xyxy, 64, 48), 64, 48)
    assert np.allclose(back, xyxy, atol=1e-4)
