"""The detection tests' tiny Darknet (two YOLO heads, 64x64 input, 2 classes, seeded) and sample photos."""

from pathlib import Path

import numpy as np
import pytest
import torch

from lorakit.models.darknet import Darknet, parse_cfg

DARKNET_DATA = Path("/usr/share/darknet/data")

# layers: 0 conv (s2) 1 maxpool 2 conv 3 maxpool 4 conv 5 maxpool (size 2 stride 1) 6 head 7 yolo
#         8 route 5  9 upsample  10 route 9, 2  11 head  12 yolo
TINY_CFG = """
[net]
width=64
height=64
channels=3

[convolutional]
batch_normalize=1
filters=8
size=3
stride=2
pad=1
activation=leaky

[maxpool]
size=2
stride=2

[convolutional]
batch_normalize=1
filters=16
size=3
stride=1
pad=1
activation=leaky

[maxpool]
size=2
stride=2

[convolutional]
batch_normalize=1
filters=16
size=3
stride=1
pad=1
activation=leaky

[maxpool]
size=2
stride=1

[convolutional]
size=1
stride=1
pad=1
filters=21
activation=linear

[yolo]
mask = 3,4,5
anchors = 4,6, 8,8, 12,16, 20,20, 30,40, 60,60
classes=2
num=6

[route]
layers = -3

[upsample]
stride=2

[route]
layers = -1, 2

[convolutional]
size=1
stride=1
pad=1
filters=21
activation=linear

[yolo]
mask = 0,1,2
anchors = 4,6, 8,8, 12,16, 20,20, 30,40, 60,60
classes=2
num=6
"""


def tiny_darknet(seed: int = 0) -> Darknet:
    """The tiny Darknet with random weights and non-trivial batch-norm statistics, in eval mode."""
    torch.manual_seed(seed)
    model = Darknet(parse_cfg(TINY_CFG), ["cat", "dog"])
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.1, 0.1)
    return model.eval()


def read_rgb(name: str) -> np.ndarray:
    """A Debian darknet sample photo as RGB uint8 (H, W, 3); skips where it or OpenCV is missing."""
    cv2 = pytest.importorskip("cv2")
    path = DARKNET_DATA / name
    if not path.is_file():
        pytest.skip(f"{path} is missing: apt-get install darknet")
    return np.ascontiguousarray(cv2.imread(str(path))[:, :, ::-1])
