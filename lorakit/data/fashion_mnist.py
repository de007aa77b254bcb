"""Fashion-MNIST (Xiao, Rasul, Vollgraf 2017, Zalando; MIT licence): 70,000 grayscale 28×28 clothing
images in 10 classes, 60,000 train + 10,000 test. Debian's dataset-fashion-mnist installs the four IDX
files under /usr/share/datasets/fashion-mnist (`sudo apt install dataset-fashion-mnist`).

A coarse 4-class task over the same images groups the classes by what they are worn for:

    tops      T-shirt/top, Pullover, Coat, Shirt
    bottoms   Trouser, Dress            (bottoms and full-body)
    footwear  Sandal, Sneaker, Ankle boot
    bags      Bag
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lorakit.data.idx import read_idx_pair
from lorakit.data.images import ArrayImages

FASHION_MNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
COARSE_CLASSES = ("tops", "bottoms", "footwear", "bags")
COARSE_GROUPS = {
    "tops": ("T-shirt/top", "Pullover", "Coat", "Shirt"),
    "bottoms": ("Trouser", "Dress"),
    "footwear": ("Sandal", "Sneaker", "Ankle boot"),
    "bags": ("Bag",),
}
# fine label -> coarse label, indexed by the fine label
COARSE_OF_FINE = np.array(
    [COARSE_CLASSES.index(next(g for g, members in COARSE_GROUPS.items() if name in members)) for name in FASHION_MNIST_CLASSES],
    dtype=np.int64,
)
_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"), "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def load_fashion_mnist(split: str = "train", root: str | Path = FASHION_MNIST_ROOT) -> ArrayImages:
    """Fashion-MNIST's `split` ("train": 60,000, "test": 10,000) as uint8 (N, 28, 28) images and labels."""
    if split not in _FILES:
        raise ValueError(f"split {split!r} is not one of {sorted(_FILES)}")
    root = Path(root)
    paths = [_existing(root / name) for name in _FILES[split]]
    return read_idx_pair(paths[0], paths[1], FASHION_MNIST_CLASSES)


def _existing(stem: Path) -> Path:
    for candidate in (stem.with_name(stem.name + ".gz"), stem):
        if candidate.is_file():
            return candidate
    hint = " (sudo apt install dataset-fashion-mnist)" if stem.parent == FASHION_MNIST_ROOT else ""
    raise FileNotFoundError(f"{stem}.gz (or {stem.name}) not found{hint}")


def coarse_labels(fine: np.ndarray) -> np.ndarray:
    """Fine Fashion-MNIST labels (0..9) -> coarse labels (0..3, `COARSE_CLASSES`)."""
    fine = np.asarray(fine)
    if fine.size and (fine.min() < 0 or fine.max() >= len(FASHION_MNIST_CLASSES)):
        raise ValueError(f"fine labels must be in 0..9, got {fine.min()}..{fine.max()}")
    return COARSE_OF_FINE[fine]


def coarse(dataset: ArrayImages) -> ArrayImages:
    """The same images, labelled with the 4 coarse classes."""
    if dataset.classes != FASHION_MNIST_CLASSES:
        raise ValueError(f"coarse() maps Fashion-MNIST's 10 classes; this dataset has {dataset.classes}")
    return ArrayImages(dataset.images, coarse_labels(dataset.labels), COARSE_CLASSES)
