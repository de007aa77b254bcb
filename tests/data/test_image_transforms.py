"""Image transforms: preprocessing values and shapes, augmentation as a pure function of (seed, epoch,
index), and detection boxes that move with the pixels."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lorakit.data.image_transforms import (
    IMAGENET_MEAN, IMAGENET_STD, Preprocess, augment, augment_detection, detection_input, generator, preprocess, random_crop_box,
    to_tensor,
)

SPEC = Preprocess(32, 36, IMAGENET_MEAN, IMAGENET_STD)


def test_preprocess_constant_image_gives_the_normalised_constant():
    image = np.full((50, 80, 3), 255, np.uint8)
    x = preprocess(image, SPEC)
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    expected = (1 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert torch.allclose(x, expected[:, None, None].expand(3, 32, 32), atol=1e-6)


def test_preprocess_centre_crops_after_resizing_the_shorter_side():
    image = np.zeros((36, 72, 3), np.uint8)  # shorter side already 36: no resize, crop columns 20..51
    image[:, 20:52] = 255
    x = preprocess(image, Preprocess(32, 36, (0, 0, 0), (1, 1, 1)))
    assert torch.equal(x, torch.ones(3, 32, 32))


def test_grayscale_becomes_three_equal_channels():
    gray = np.arange(20, dtype=np.uint8).reshape(4, 5)
    for image in (gray, gray[:, :, None]):
        x = to_tensor(image)
        assert x.shape == (3, 4, 5) and torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])
    with pytest.raises(TypeError, match="uint8"):
        to_tensor(gray.astype(np.float32))


def test_augment_is_a_pure_function_of_seed_epoch_index():
    image = np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    a = augment(image, SPEC, seed=1, epoch=2, index=3)
    assert a.shape == (3, 32, 32)
    assert torch.equal(a, augment(image, SPEC, seed=1, epoch=2, index=3))
    others = [augment(image, SPEC, seed=s, epoch=e, index=i) for s, e, i in ((2, 2, 3), (1, 3, 3), (1, 2, 4))]
    assert all(not torch.equal(a, o) for o in others)


def test_augment_flips_about_half_and_crops_within_the_scale_range():
    flips = 0
    image = np.zeros((8, 8, 3), np.uint8)
    image[:, :4] = 255  # left half white: a flip puts it on the right
    spec = Preprocess(8, 8, (0, 0, 0), (1, 1, 1))
    for index in range(200):
        x = augment(image, spec, seed=0, epoch=0, index=index, scale=(1.0, 1.0))  # whole image: only the flip varies
        flips += int(x[0, 0, -1] > x[0, 0, 0])
    assert 70 < flips < 130
    for index in range(50):
        top, left, h, w = random_crop_box(100, 120, generator(0, 0, index), scale=(0.3, 0.6))
        assert 0 <= top and top + h <= 100 and 0 <= left and left + w <= 120
        assert 0.25 <= h * w / 12000 <= 0.65 and 3 / 4 - 0.05 <= w / h <= 4 / 3 + 0.05


def white_boxes(height: int, width: int, boxes: np.ndarray) -> np.ndarray:
    image = np.zeros((height, width, 3), np.uint8)
    for x1, y1, x2, y2 in boxes.astype(int):
        image[y1:y2, x1:x2] = 255
    return image


def tight_box(mask: np.ndarray) -> list[int]:
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return [cols[0], rows[0], cols[-1] + 1, rows[-1] + 1]


def test_detection_input_letterboxes_and_moves_the_boxes():
    boxes = np.array([[10, 20, 50, 40]], np.float32)
    x, moved = detection_input(white_boxes(60, 120, boxes), boxes, size=60)  # scale 0.5, 15 px grey above and below
    assert x.shape == (3, 60, 60)
    assert np.allclose(moved, [[5, 25, 25, 35]])
    assert tight_box(x[0].numpy() > 0.5) == [5, 25, 25, 35]  # antialiased edges: half-covered pixels


@pytest.mark.parametrize("index", range(12))
def test_augmented_boxes_cover_exactly_the_moved_pixels(index):
    """One white rectangle per box on black; after augmentation each kept box must frame its white
    pixels (to a pixel of resampling), and a dropped box must have left the crop."""
    boxes = np.array([[4, 4, 30, 20], [60, 30, 100, 70], [0, 60, 20, 80]], np.float32)
    labels = np.array([0, 1, 2])
    image = white_boxes(80, 110, boxes)
    x, moved, kept = augment_detection(image, boxes, labels, size=64, seed=0, epoch=0, index=index, min_visible=0.0)
    x_again, moved_again, _ = augment_detection(image, boxes, labels, size=64, seed=0, epoch=0, index=index, min_visible=0.0)
    assert torch.equal(x, x_again) and np.array_equal(moved, moved_again)
    white = x[0].numpy() > 0.75
    for box in moved:
        if (box[2] - box[0]) * (box[3] - box[1]) < 4:
            continue  # a sliver at the crop edge: too thin to compare after resampling
        x1, y1, x2, y2 = np.round(box).astype(int)
        inner = white[y1 + 1 : y2 - 1, x1 + 1 : x2 - 1]
        assert inner.size == 0 or inner.mean() > 0.95, (index, box)
    framed = np.zeros_like(white)
    for x1, y1, x2, y2 in moved:
        framed[max(0, int(np.floor(y1)) - 1) : int(np.ceil(y2)) + 1, max(0, int(np.floor(x1)) - 1) : int(np.ceil(x2)) + 1] = True
    assert not (white & ~framed).any(), f"white pixels outside every box (index {index})"
    assert len(moved) == len(kept)
