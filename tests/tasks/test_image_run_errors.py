"""Image-task runs the user set up wrong fail as one clear line on stderr with exit status 2 (`lorakit
train: error: ...` naming the value and the fix, file:line for a data file); and a head-only run
(adapter.target_modules=[]) is not an error: it trains the new head alone. The first check runs `lorakit`
in a subprocess; the others call `lorakit.cli.main`, what that process runs, without its start-up cost."""

from __future__ import annotations

import numpy as np
import pytest
from safetensors import safe_open

from image_task_fixtures import (CLASSIFY, cli_error, main_error, needs_fashion_mnist, needs_mobilenet, needs_pillow,
                                 needs_yolo, summary, train_ok, write_idx, write_png)
from lorakit.data.fashion_mnist import COARSE_CLASSES


def test_a_quantized_method_with_an_image_task(tmp_path):
    error = cli_error("train", "task=image-classification", "method=qalora", f"output_dir={tmp_path}")
    assert "method=qalora does not apply to task=image-classification" in error and "method=lora" in error


def test_an_image_setting_with_a_causal_lm(capsys, tmp_path):
    error = main_error(capsys, "train", "data.image_size=64", f"output_dir={tmp_path}")
    assert "data.image_size applies to image tasks only" in error and "task=causal-lm" in error


def test_a_half_precision_dtype_with_an_image_task(capsys, tmp_path):
    error = main_error(capsys, "train", "task=object-detection", "model.dtype=bfloat16", f"output_dir={tmp_path}")
    assert "model.dtype=bfloat16 does not apply to task=object-detection" in error and "float32" in error


def test_an_unknown_classifier(capsys, tmp_path):
    error = main_error(capsys, "train", "task=image-classification", "model.path=resnet-50",
                        f"output_dir={tmp_path}")
    assert "'resnet-50'" in error and "efficientnet-lite0" in error and "mobilenet-v2" in error


def test_an_unknown_detector(capsys, tmp_path):
    error = main_error(capsys, "train", "task=object-detection", "model.path=yolov8n.pt", "data.train=x/data.yaml",
                       f"output_dir={tmp_path}")
    assert "'yolov8n.pt'" in error and "'yolov3-tiny'" in error and ".cfg" in error


def test_an_idx_file_without_its_labels(capsys, tmp_path):
    data = write_idx(tmp_path / "tiny-images-idx3-ubyte.gz", np.zeros((4, 28, 28), np.uint8))
    error = main_error(capsys, "train", "task=image-classification", f"data.train={data}",
                       f"output_dir={tmp_path / 'run'}")
    assert "tiny-labels-idx1-ubyte.gz" in error and "pair" in error


@needs_yolo
def test_a_detection_size_that_is_not_a_multiple_of_32(capsys, tmp_path):
    error = main_error(capsys, "train", "task=object-detection", "data.image_size=100", "data.train=x/data.yaml",
                       f"output_dir={tmp_path}")
    assert "data.image_size=100" in error and "multiple of 32" in error and "use 96" in error


@needs_yolo
@needs_pillow
def test_a_bad_yolo_label_line_names_its_file_and_line(capsys, tmp_path):
    for name in ("a", "b"):
        write_png(tmp_path / "images" / "train" / f"{name}.png", np.zeros((32, 32, 3), np.uint8))
    (tmp_path / "labels" / "train").mkdir(parents=True)
    (tmp_path / "labels" / "train" / "a.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    bad = tmp_path / "labels" / "train" / "b.txt"
    bad.write_text("1 0.5 0.5 0.2 0.2\n\n0 0.4 0.4 0.3\n")  # line 3 lacks the height
    (tmp_path / "data.yaml").write_text("path: .\ntrain: images/train\nval: images/train\nnames: [cat, dog]\n")
    error = main_error(capsys, "train", "task=object-detection", f"data.train={tmp_path / 'data.yaml'}",
                       "data.image_size=64", "train.steps=1", f"output_dir={tmp_path / 'run'}")
    assert f"{bad}:3" in error and "'class cx cy w h'" in error


@needs_fashion_mnist
@needs_mobilenet
def test_head_only_trains_the_new_head_alone(tmp_path):
    run = tmp_path / "run"
    train_ok(*CLASSIFY, "data.train=fashion-mnist-coarse", "data.max_examples=32", "data.max_valid_examples=16",
             "adapter.target_modules=[]", "train.steps=2", f"output_dir={run}")
    s = summary(run)
    assert s["trainable_parameters"] == 1280 * len(COARSE_CLASSES) + len(COARSE_CLASSES)  # MobileNetV2's head
    with safe_open(str(run / "adapter" / "adapter_model.safetensors"), "pt") as f:
        keys = sorted(f.keys())
        assert [k.rsplit(".", 1)[1] for k in keys] == ["bias", "weight"] and all("classifier.1" in k for k in keys)
        assert f.get_slice(keys[1]).get_shape() == [len(COARSE_CLASSES), 1280]
    assert s["valid_accuracy_after"] is not None and s["steps"] == 2


@pytest.mark.parametrize("task, flags, message", [
    ("image-classification", ["--conf", "0.1"], "--conf does not apply to this task=image-classification run; "
                                                 "classification takes --top"),
    ("image-classification", ["--out", "pictures"], "--out does not apply"),
    ("object-detection", ["--top", "3"], "--top does not apply to this task=object-detection run; detection takes "
                                         "--conf and --out"),
    ("image-classification", ["--top", "0"], "--top 0: list at least 1 class"),
    ("object-detection", ["--conf", "1.5"], "--conf 1.5: a detection score threshold is in 0..1"),
])
def test_predict_options_of_the_other_task(capsys, tmp_path, task, flags, message):
    from lorakit.training.run_config import load_config, save_config

    save_config(load_config(None, [f"task={task}"]), tmp_path / "config.yaml")  # checked before anything loads
    image = tmp_path / "x.png"
    image.write_bytes(b"")
    assert main_error(capsys, "predict", tmp_path, image, *flags).startswith(f"lorakit predict: error: {message}")


@pytest.mark.parametrize("command", ["eval", "predict"])
def test_a_run_that_has_not_finished(capsys, tmp_path, command):
    from lorakit.training.run_config import load_config, save_config

    save_config(load_config(None, ["task=image-classification"]), tmp_path / "config.yaml")  # no adapter/ yet
    image = tmp_path / "x.png"
    image.write_bytes(b"")
    error = main_error(capsys, command, tmp_path, *([image] if command == "predict" else []))
    assert f"{tmp_path} has no adapter/ yet" in error and f"lorakit train --resume {tmp_path}" in error


def test_predict_names_a_missing_image_before_loading_the_model(capsys, tmp_path):
    from lorakit.training.run_config import load_config, save_config

    save_config(load_config(None, ["task=image-classification"]), tmp_path / "config.yaml")
    error = main_error(capsys, "predict", tmp_path, tmp_path / "nope.jpg", tmp_path / "gone.png")
    assert error == f"lorakit predict: error: {tmp_path / 'nope.jpg'}: no such image file (1 more missing)"
