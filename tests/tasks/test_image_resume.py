"""Exact resume of image runs: a run SIGKILLed between two checkpoints (after step 3; the newest checkpoint
is step 2) and resumed with `lorakit train --resume` ends with the same adapter tensors and logs the same
numbers as an uninterrupted run, with augmentation on and an epoch boundary after the restart (each image's
crop and flip are a function of (seed, epoch, index), the batch order of (seed, epoch))."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from image_task_fixtures import (CLASSIFY, DETECT, cli, needs_fashion_mnist, needs_mobilenet, needs_yolo,
                                 lorakit_env, train_ok)
from lorakit.report.progress import read_metrics
from train_fixtures import FREEZE_AFTER_STEP, kill_after_step

LOGGED = ("loss", "lr", "grad_norm", "epoch", "valid_loss", "valid_accuracy", "valid_map50", "valid_map")


def logged(run: Path) -> list[dict]:
    """What metrics.jsonl records of each step, less the clock (time, speed, memory)."""
    return [{k: v for k, v in m.items() if k in ("step", *LOGGED)} for m in read_metrics(run / "metrics.jsonl")]


def killed_and_resumed(tmp_path: Path, overrides: list[str]) -> tuple[Path, Path]:
    """(an uninterrupted run, the same run SIGKILLed after step 3 and resumed)."""
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    train_ok(*overrides, f"output_dir={whole}")
    out = kill_after_step([sys.executable, str(FREEZE_AFTER_STEP), "3", "train", *overrides, f"output_dir={killed}",
                           "--quiet"], killed, step=3,
                          env=lorakit_env())
    assert out.returncode == -9 and not (killed / "adapter").exists()
    assert sorted(p.name for p in (killed / "checkpoints").iterdir()) == ["step-000002"]
    out = cli("train", "--resume", killed, "--quiet")
    assert out.returncode == 0, out.stderr[-3000:]
    return whole, killed


def assert_same_run(whole: Path, killed: Path) -> None:
    want = load_file(str(whole / "adapter" / "adapter_model.safetensors"))
    got = load_file(str(killed / "adapter" / "adapter_model.safetensors"))
    assert want.keys() == got.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=0, msg=key)
    assert logged(killed) == logged(whole)  # the killed step 3 logged again, once; the same losses throughout


@needs_fashion_mnist
@needs_mobilenet
def test_a_killed_classification_run_resumes_exactly(tmp_path):
    # 40 images in batches of 16: 3 batches an epoch, so steps 4-6 are epoch 1, with new crops and flips
    overrides = [*CLASSIFY, "data.train=fashion-mnist", "data.max_examples=40", "data.max_valid_examples=32",
                 "adapter.dropout=0.1", "train.steps=6", "train.save_every=2", "train.eval_every=3"]
    whole, killed = killed_and_resumed(tmp_path, overrides)
    assert [m["epoch"] for m in logged(whole) if "loss" in m] == [0, 0, 0, 1, 1, 1]
    assert_same_run(whole, killed)


@needs_yolo
def test_a_killed_detection_run_resumes_exactly(tmp_path, scenes):
    # 24 scenes in batches of 6: 4 batches an epoch, so steps 5-6 are epoch 1
    overrides = [*DETECT, f"data.train={scenes}", "train.steps=6", "train.save_every=2", "train.eval_every=3"]
    whole, killed = killed_and_resumed(tmp_path, overrides)
    assert [m["epoch"] for m in logged(whole) if "loss" in m] == [0, 0, 0, 0, 1, 1]
    assert_same_run(whole, killed)
