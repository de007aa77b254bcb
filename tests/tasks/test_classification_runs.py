"""Image classification through the command line: `lorakit train task=image-classification` writes its
adapter, metrics and summary; `lorakit eval` gives back the run's last validation numbers exactly;
`lorakit predict` names the task's classes; an ImageFolder directory and an IDX file pair train too, with a
held-out validation fraction."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors import safe_open

from image_task_fixtures import (DOG, cli, last_valid, needs_fashion_mnist, needs_mobilenet, needs_pillow, summary,
                                 train_ok, write_idx, write_png)
from lorakit.data.fashion_mnist import FASHION_MNIST_CLASSES
from lorakit.report.progress import read_metrics

pytestmark = needs_mobilenet


@needs_fashion_mnist
def test_a_run_writes_adapter_metrics_and_summary(fine_run):
    assert {p.name for p in fine_run.iterdir()} >= {"adapter", "metrics.jsonl", "summary.json", "config.yaml",
                                                    "checkpoints"}
    metrics = read_metrics(fine_run / "metrics.jsonl")
    assert [m["step"] for m in metrics if "loss" in m] == [1, 2, 3, 4, 5, 6]
    assert [m["step"] for m in metrics if "valid_accuracy" in m] == [0, 6]  # before training and at the end
    s = summary(fine_run)
    assert s["method"] == "lora" and s["steps"] == 6
    assert s["data"] == {"classes": list(FASHION_MNIST_CLASSES), "train_examples": 256, "valid_examples": 96}
    assert s["valid_accuracy_after"] == last_valid(fine_run)["valid_accuracy"]
    assert s["valid_loss"] == last_valid(fine_run)["valid_loss"]
    meta = json.loads((fine_run / "adapter" / "lorakit.json").read_text())["task"]
    assert meta == {"task": "image-classification", "classes": list(FASHION_MNIST_CLASSES), "model": "mobilenet-v2",
                    "image_size": 32}
    with safe_open(str(fine_run / "adapter" / "adapter_model.safetensors"), "pt") as f:
        head = [k for k in f.keys() if "classifier.1" in k]
        assert f.get_slice(next(k for k in head if k.endswith("weight"))).get_shape() == [10, 1280]  # the new head
        assert any(".lora_A." in k for k in f.keys())  # and LoRA on the convs ("all-conv")


@needs_fashion_mnist
def test_eval_reproduces_the_runs_last_validation_metrics_exactly(fine_run):
    from lorakit.tasks.vision_runs import evaluate_run

    want = last_valid(fine_run)
    assert evaluate_run(fine_run) == want  # bit for bit: the base (BatchNorm statistics included) did not move
    out = cli("eval", fine_run)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"loss {want['valid_loss']:.4f}, accuracy {want['valid_accuracy']:.4f}"


@needs_fashion_mnist
@needs_pillow
@pytest.mark.skipif(not DOG.is_file(), reason="apt-get install darknet (sample photos)")
def test_predict_lists_the_tasks_classes_best_first(fine_run):
    out = cli("predict", fine_run, DOG, "--top", "3")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == str(DOG) and len(lines) == 4
    found = [line.strip().rsplit(None, 1) for line in lines[1:]]
    names, scores = [n for n, _ in found], [float(s) for _, s in found]
    assert set(names) <= set(FASHION_MNIST_CLASSES) and len(set(names)) == 3
    assert scores == sorted(scores, reverse=True) and 0 < sum(scores) <= 1.001


@needs_pillow
def test_an_image_folder_trains_with_a_held_out_fraction(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(10):  # two classes told apart by brightness, images of several sizes, one in a nested folder
        h, w = 30 + i, 44 - i
        write_png(tmp_path / "data" / "bright" / ("deep" if i == 0 else "") / f"{i}.png",
                  rng.integers(150, 255, (h, w, 3), dtype=np.uint8))
        write_png(tmp_path / "data" / "dark" / f"{i}.png", rng.integers(0, 100, (h, w), dtype=np.uint8))  # grayscale
    (tmp_path / "data" / "dark" / "notes.txt").write_text("not an image")
    run = tmp_path / "run"
    train_ok("task=image-classification", f"data.train={tmp_path / 'data'}", "data.valid_fraction=0.25",
             "data.image_size=32", "train.steps=2", "train.batch_size=8", "adapter.r=2", f"output_dir={run}")
    s = summary(run)
    assert s["data"] == {"classes": ["bright", "dark"], "train_examples": 15, "valid_examples": 5}
    assert 0 <= s["valid_accuracy_after"] <= 1 and s["steps"] == 2


def test_an_idx_file_pair_trains_with_a_held_out_fraction(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.arange(30, dtype=np.uint8) % 3
    images = rng.integers(0, 60, (30, 28, 28), dtype=np.uint8) + (labels * 60)[:, None, None].astype(np.uint8)
    data = write_idx(tmp_path / "tiny-images-idx3-ubyte.gz", images)
    write_idx(tmp_path / "tiny-labels-idx1-ubyte.gz", labels)
    run = tmp_path / "run"
    train_ok("task=image-classification", f"data.train={data}", "data.valid_fraction=0.2", "data.image_size=32",
             "train.steps=2", "train.batch_size=8", "adapter.r=2", f"output_dir={run}")
    s = summary(run)
    assert s["data"] == {"classes": ["0", "1", "2"], "train_examples": 24, "valid_examples": 6}
    assert [m["step"] for m in read_metrics(run / "metrics.jsonl") if "valid_accuracy" in m] == [0, 2]

