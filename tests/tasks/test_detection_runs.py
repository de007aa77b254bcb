"""Object detection through the command line: Fashion-MNIST scenes (YOLO layout) -> `lorakit train
task=object-detection` (YOLOv3-tiny) -> `lorakit eval` gives back the run's last mAP exactly -> `lorakit predict`
lists boxes and draws them into RUN/predictions/."""

from __future__ import annotations

import json

import numpy as np
import pytest

from image_task_fixtures import DETECT, cli, last_valid, needs_yolo, summary, train_ok
from lorakit.data.fashion_mnist import FASHION_MNIST_CLASSES
from lorakit.report.progress import read_metrics

pytestmark = needs_yolo


@pytest.fixture(scope="module")
def run(scenes, tmp_path_factory):
    run = tmp_path_factory.mktemp("detect") / "run"
    train_ok(*DETECT, f"data.train={scenes}", "train.steps=4", f"output_dir={run}")
    return run


def test_a_run_writes_adapter_metrics_and_summary(run):
    metrics = read_metrics(run / "metrics.jsonl")
    assert [m["step"] for m in metrics if "loss" in m] == [1, 2, 3, 4]
    assert [m["step"] for m in metrics if "valid_map50" in m] == [0, 4]
    s = summary(run)
    assert s["data"]["classes"] == list(FASHION_MNIST_CLASSES)
    assert (s["data"]["train_examples"], s["data"]["valid_examples"]) == (24, 8) and s["data"]["train_boxes"] >= 24
    assert s["valid_map50_after"] == last_valid(run)["valid_map50"] and s["valid_map_after"] == last_valid(run)["valid_map"]
    assert 0 <= s["valid_map_after"] <= s["valid_map50_after"] <= 1
    meta = json.loads((run / "adapter" / "lorakit.json").read_text())["task"]
    assert meta == {"task": "object-detection", "classes": list(FASHION_MNIST_CLASSES), "model": "yolov3-tiny",
                    "image_size": 64}


def test_eval_reproduces_the_runs_last_map_exactly(run):
    from lorakit.tasks.vision_runs import evaluate_run

    want = last_valid(run)
    assert evaluate_run(run) == want
    out = cli("eval", run)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == (f"loss {want['valid_loss']:.4f}, map50 {want['valid_map50']:.4f}, "
                                  f"map {want['valid_map']:.4f}")


def test_predict_lists_boxes_and_draws_them(run, scenes):
    from lorakit.data.images import read_image

    images = sorted((scenes.parent / "images" / "val").iterdir())[:3]
    out = cli("predict", run, *images, "--conf", "0.001")  # a 4-step model is unsure: keep its faint boxes
    assert out.returncode == 0, out.stderr
    found, current = {}, None  # image path -> its printed boxes: "  NAME SCORE  [x1, y1, x2, y2]"
    for line in out.stdout.splitlines():
        if line.startswith("  "):
            name_score, box = line.strip().rsplit("[", 1)
            name, score = name_score.rsplit(None, 1)
            found[current].append((name, float(score), [float(v) for v in box.rstrip("]").split(",")]))
        else:
            current = line
            found[current] = []
    assert list(found) == [str(p) for p in images] and any(found.values())
    for image in images:
        drawn, original = read_image(run / "predictions" / f"{image.stem}.boxes.png"), read_image(image)
        assert drawn.shape == original.shape
        assert np.array_equal(drawn, original) == (not found[str(image)])  # boxes drawn where some were found
        for name, score, (x1, y1, x2, y2) in found[str(image)]:
            assert name in FASHION_MNIST_CLASSES and 0.001 <= score <= 1
            assert 0 <= x1 <= x2 <= 64 and 0 <= y1 <= y2 <= 64  # in the 64-pixel scene's own pixels
