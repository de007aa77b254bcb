"""Synthetic detection scenes from real Fashion-MNIST items, written in the YOLO layout, and an
ImageFolder export of a classification set. No packaged detection dataset with boxes is available
offline; these give one with exact boxes.

A scene is a square `canvas` × `canvas` grayscale image (black, plus uniform noise up to
`background_noise`) holding 1 to `max_items` Fashion-MNIST items, each resized by a factor drawn
from `scale` and pasted where its 28·f-pixel square overlaps no other item's square. The box of an
item is the tight box of its nonzero pixels after resizing: exact, in pixels, and written
normalised ("class cx cy w h"). Train scenes use Fashion-MNIST's train images, val scenes its test
images, each item at most once, so no item is in both splits. Everything is a function of `seed`.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np

from lorakit.data.fashion_mnist import COARSE_CLASSES, FASHION_MNIST_CLASSES, FASHION_MNIST_ROOT, coarse_labels, load_fashion_mnist
from lorakit.data.images import ArrayImages, to_normalized_cxcywh
from lorakit.data.yolo import data_yaml_text, label_text
from lorakit.io import temp_dir_beside

SOURCE_SPLIT = {"train": "train", "val": "test"}  # scene split -> Fashion-MNIST split


def make_detection_scenes(
    out_dir: str | Path,
    n_images: dict[str, int] | None = None,
    seed: int = 0,
    canvas: int = 96,
    scale: tuple[float, float] = (1.0, 2.0),
    max_items: int = 3,
    coarse: bool = False,
    background_noise: int = 0,
    root: str | Path = FASHION_MNIST_ROOT,
) -> Path:
    """Write a YOLO dataset (data.yaml, images/{train,val}/*.png, labels/{train,val}/*.txt) to `out_dir`.

    `n_images` per split (default {"train": 200, "val": 50}); classes are Fashion-MNIST's 10, or the
    4 coarse groups with `coarse=True`. `out_dir` must not exist yet; it appears complete or not at all.
    Returns the path of data.yaml.
    """
    n_images = {"train": 200, "val": 50} if n_images is None else dict(n_images)
    unknown = sorted(set(n_images) - set(SOURCE_SPLIT))
    if unknown:
        raise ValueError(f"splits {unknown} are not among {sorted(SOURCE_SPLIT)}")
    if round(28 * scale[1]) > canvas or not 0 < scale[0] <= scale[1]:
        raise ValueError(f"scale {scale} must satisfy 0 < low <= high and 28·high <= canvas ({canvas})")
    if not 1 <= max_items or not 0 <= background_noise <= 255:
        raise ValueError(f"max_items must be >= 1 (got {max_items}) and background_noise in 0..255 (got {background_noise})")
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} exists; remove it or choose another folder")
    names = COARSE_CLASSES if coarse else FASHION_MNIST_CLASSES
    tmp = temp_dir_beside(out_dir)
    try:
        for split, count in n_images.items():
            source = load_fashion_mnist(SOURCE_SPLIT[split], root)
            labels = coarse_labels(source.labels) if coarse else source.labels
            rng = np.random.default_rng([seed, list(SOURCE_SPLIT).index(split)])
            _write_split(tmp, split, count, source.images, labels, rng, canvas, scale, max_items, background_noise)
        (tmp / "data.yaml").write_text(data_yaml_text(names, {s: f"images/{s}" for s in n_images}))
        os.rename(tmp, out_dir)
    except BaseException:
        _remove_tree(tmp)
        raise
    return out_dir / "data.yaml"


def _write_split(root: Path, split: str, count: int, images: np.ndarray, labels: np.ndarray, rng: np.random.Generator,
                 canvas: int, scale: tuple[float, float], max_items: int, noise: int) -> None:
    from PIL import Image

    (root / "images" / split).mkdir(parents=True)
    (root / "labels" / split).mkdir(parents=True)
    order = rng.permutation(len(images))  # each source item used at most once
    used = 0
    for i in range(count):
        scene = rng.integers(0, noise + 1, (canvas, canvas), dtype=np.uint8) if noise else np.zeros((canvas, canvas), np.uint8)
        placed: list[tuple[int, int, int]] = []  # (top, left, side) of pasted squares
        boxes, classes = [], []
        for _ in range(int(rng.integers(1, max_items + 1))):
            if used >= len(order):
                raise ValueError(f"{count} {split} scenes need more Fashion-MNIST items than the {len(images)} in its split")
            side = round(28 * rng.uniform(*scale))
            spot = _free_spot(placed, side, canvas, rng)
            if spot is None:
                continue
            item = order[used]
            used += 1
            patch = np.asarray(Image.fromarray(images[item]).resize((side, side), Image.BILINEAR))
            top, left = spot
            region = scene[top : top + side, left : left + side]
            np.maximum(region, patch, out=region)
            rows, cols = np.flatnonzero(patch.any(1)), np.flatnonzero(patch.any(0))
            if len(rows) == 0:  # an all-black item: nothing to box
                continue
            placed.append((top, left, side))
            boxes.append([left + cols[0], top + rows[0], left + cols[-1] + 1, top + rows[-1] + 1])
            classes.append(int(labels[item]))
        Image.fromarray(scene).save(root / "images" / split / f"{i:05d}.png")
        normalized = to_normalized_cxcywh(np.array(boxes, dtype=np.float64), canvas, canvas)
        (root / "labels" / split / f"{i:05d}.txt").write_text(label_text(normalized, np.array(classes)))


def _free_spot(placed: list[tuple[int, int, int]], side: int, canvas: int, rng: np.random.Generator, tries: int = 50):
    """(top, left) of a side × side square inside the canvas overlapping no placed square, or None."""
    for _ in range(tries):
        top, left = (int(v) for v in rng.integers(0, canvas - side + 1, 2))
        if all(top + side <= t or t + s <= top or left + side <= l or l + s <= left for t, l, s in placed):
            return top, left
    return None


def export_image_folder(dataset: ArrayImages, out_dir: str | Path, per_class: int | None = None, seed: int = 0) -> Path:
    """Write a classification set as an ImageFolder (out_dir/<class>/<index>.png); `per_class` caps each class.

    '/' in a class name becomes '-' (a folder name cannot hold it: "T-shirt/top" -> "T-shirt-top").
    ImageFolder numbers classes by sorted folder name, so the indices may differ from the source's.
    """
    from PIL import Image

    out_dir = Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} exists; remove it or choose another folder")
    rng = np.random.default_rng(seed)
    tmp = temp_dir_beside(out_dir)
    try:
        for label, name in enumerate(dataset.classes):
            folder = tmp / name.replace("/", "-")
            folder.mkdir()
            members = np.flatnonzero(dataset.labels == label)
            if per_class is not None:
                members = np.sort(rng.permutation(members)[:per_class])
            for index in members:
                Image.fromarray(dataset.images[index]).save(folder / f"{index:05d}.png")
        os.rename(tmp, out_dir)
    except BaseException:
        _remove_tree(tmp)
        raise
    return out_dir


def _remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
