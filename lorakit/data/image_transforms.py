"""Image transforms: a model's preprocessing, and training augmentation that is a pure function of
(seed, epoch, index), so a resumed run sees exactly the images an uninterrupted run would.

Images come in as uint8 arrays (H, W, C) with C = 1 or 3 (or (H, W) grayscale), the form every
lorakit image reader returns. Models take float32 tensors (3, size, size):

    x = (crop(resize(image)) / 255 − mean) / std        per channel; grayscale repeated to 3 channels

`Preprocess` is a model's evaluation recipe: resize the shorter side to `resize` (antialiased), take
the centre `size` × `size` crop. `augment` replaces resize+crop in training with a random crop of
`scale` ∈ [scale_min, 1] of the image area and aspect ratio in [3/4, 4/3] (Inception-style, as
torchvision's RandomResizedCrop), resized to `size`, and a horizontal flip with probability 1/2.

Detection keeps the whole image: `letterbox` scales the longer side to `size` and pads the rest with
grey (114, Ultralytics' value), so boxes only scale and shift. `augment_detection` jitters scale and
crops, then letterboxes; boxes (n, 4) are pixel (x1, y1, x2, y2) and move with the image. A box
left with under `min_visible` of its area inside the crop is dropped with its label.

Random draws come from a torch.Generator seeded with hash(seed, epoch, index), never from global
state, so workers, resumes and re-runs agree.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LETTERBOX_FILL = 114


@dataclass(frozen=True)
class Preprocess:
    """A classifier's input recipe: resize the shorter side to `resize`, centre-crop `size`, normalise."""

    size: int  # the model's input is (3, size, size)
    resize: int  # shorter side before the centre crop (size / 0.875 for ImageNet models)
    mean: tuple[float, float, float]  # per channel, on [0, 1] pixel values
    std: tuple[float, float, float]
    interpolation: str = "bilinear"  # torch.nn.functional.interpolate mode (antialiased)


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 (H, W) / (H, W, 1) / (H, W, 3) -> float32 (3, H, W) in [0, 1]; grayscale becomes 3 channels."""
    if image.dtype != np.uint8:
        raise TypeError(f"expected a uint8 image array, got dtype {image.dtype}")
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in (1, 3):
        raise ValueError(f"expected an image of shape (H, W), (H, W, 1) or (H, W, 3), got {image.shape}")
    x = torch.from_numpy(np.require(image, requirements=["C", "W"])).permute(2, 0, 1).float().div_(255)  # (C, H, W)
    return x.expand(3, -1, -1).contiguous() if x.shape[0] == 1 else x


def normalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    """(3, H, W) in [0, 1] -> (x − mean) / std per channel."""
    m = torch.tensor(mean, dtype=x.dtype)[:, None, None]
    s = torch.tensor(std, dtype=x.dtype)[:, None, None]
    return (x - m) / s


def resize(x: torch.Tensor, height: int, width: int, mode: str = "bilinear") -> torch.Tensor:
    """(C, H, W) -> (C, height, width), antialiased when shrinking."""
    if x.shape[-2:] == (height, width):
        return x
    return F.interpolate(x[None], size=(height, width), mode=mode, antialias=True, align_corners=False)[0].clamp_(0, 1)


def preprocess(image: np.ndarray, spec: Preprocess) -> torch.Tensor:
    """Evaluation transform: uint8 image -> normalised float32 (3, spec.size, spec.size)."""
    x = to_tensor(image)
    h, w = x.shape[-2:]
    scale = spec.resize / min(h, w)
    x = resize(x, max(spec.size, round(h * scale)), max(spec.size, round(w * scale)), spec.interpolation)
    top, left = (x.shape[-2] - spec.size) // 2, (x.shape[-1] - spec.size) // 2
    return normalize(x[:, top : top + spec.size, left : left + spec.size], spec.mean, spec.std)


def generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """A torch.Generator determined by (seed, epoch, index) alone."""
    digest = hashlib.blake2b(f"{seed}/{epoch}/{index}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))


def _uniform(g: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * torch.rand((), generator=g).item()


def random_crop_box(height: int, width: int, g: torch.Generator, scale=(0.35, 1.0), ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a crop with area fraction in `scale` and aspect w/h in `ratio` (10 tries,
    then the largest centred crop inside `ratio`)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * _uniform(g, *scale)
        aspect = math.exp(_uniform(g, *log_ratio))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (), generator=g))
            left = int(torch.randint(0, width - w + 1, (), generator=g))
            return top, left, h, w
    aspect = width / height
    if aspect < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif aspect > ratio[1]:
        h, w = height, round(height * ratio[1])
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def augment(image: np.ndarray, spec: Preprocess, seed: int, epoch: int, index: int, scale=(0.35, 1.0), hflip: bool = True) -> torch.Tensor:
    """Training transform: random resized crop + horizontal flip, normalised float32 (3, size, size).

    Pure: the same (image, seed, epoch, index) always gives the same tensor."""
    g = generator(seed, epoch, index)
    x = to_tensor(image)
    top, left, h, w = random_crop_box(x.shape[-2], x.shape[-1], g, scale)
    x = resize(x[:, top : top + h, left : left + w], spec.size, spec.size, spec.interpolation)
    if hflip and torch.rand((), generator=g).item() < 0.5:
        x = x.flip(-1)
    return normalize(x, spec.mean, spec.std)


def letterbox(x: torch.Tensor, boxes: np.ndarray, size: int) -> tuple[torch.Tensor, np.ndarray]:
    """(3, H, W) in [0, 1] -> (3, size, size): longer side scaled to `size`, centred on grey; boxes follow."""
    h, w = x.shape[-2:]
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    top, left = (size - nh) // 2, (size - nw) // 2
    out = torch.full((3, size, size), LETTERBOX_FILL / 255, dtype=x.dtype)
    out[:, top : top + nh, left : left + nw] = resize(x, nh, nw)
    sx, sy = nw / w, nh / h
    moved = boxes.astype(np.float32) * np.array([sx, sy, sx, sy], dtype=np.float32) + np.array([left, top, left, top], dtype=np.float32)
    return out, moved


def detection_input(image: np.ndarray, boxes: np.ndarray, size: int, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)) -> tuple[torch.Tensor, np.ndarray]:
    """Evaluation transform for detection: letterbox to (3, size, size), normalise; boxes (n, 4) pixel xyxy follow."""
    x, moved = letterbox(to_tensor(image), boxes, size)
    return normalize(x, mean, std), moved


def crop_and_flip(image: np.ndarray, boxes: np.ndarray, labels: np.ndarray, seed: int, epoch: int, index: int,
                  scale=(0.5, 1.0), hflip: bool = True, min_visible: float = 0.4):
    """Detection's training crop, a pure function of (seed, epoch, index): a random crop of `scale` of the
    area (the image's own aspect), then a horizontal flip with probability 1/2. uint8 (H, W, C) image; boxes
    (n, 4) pixel xyxy are clipped to the crop and move with it; one keeping under `min_visible` of its area
    is dropped with its label. Returns (image, boxes, labels)."""
    g = generator(seed, epoch, index)
    height, width = image.shape[:2]
    fraction = math.sqrt(_uniform(g, *scale))
    h, w = max(1, round(height * fraction)), max(1, round(width * fraction))
    top = int(torch.randint(0, height - h + 1, (), generator=g))
    left = int(torch.randint(0, width - w + 1, (), generator=g))
    image = image[top : top + h, left : left + w]
    b = boxes.astype(np.float32).reshape(-1, 4) - np.array([left, top, left, top], dtype=np.float32)
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    b = np.clip(b, 0, [w, h, w, h]).astype(np.float32)
    kept = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) >= min_visible * np.maximum(area, 1e-9)
    b, labels = b[kept], labels[kept]
    if hflip and torch.rand((), generator=g).item() < 0.5:
        image = image[:, ::-1]
        b = np.stack([w - b[:, 2], b[:, 1], w - b[:, 0], b[:, 3]], axis=1).astype(np.float32)
    return np.ascontiguousarray(image), b, labels


def augment_detection(
    image: np.ndarray, boxes: np.ndarray, labels: np.ndarray, size: int, seed: int, epoch: int, index: int,
    scale=(0.5, 1.0), hflip: bool = True, min_visible: float = 0.4, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0),
) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """Training transform for detection: `crop_and_flip`, then letterbox to `size` and normalise.
    Returns (x, boxes, labels)."""
    image, b, labels = crop_and_flip(image, boxes, labels, seed, epoch, index, scale, hflip, min_visible)
    x, b = letterbox(to_tensor(image), b, size)
    return normalize(x, mean, std), b, labels
