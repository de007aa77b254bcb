"""YOLO ops (preprocess, decode, NMS, detect) and the YOLOv3 loss."""

import math

import numpy as np
import pytest
import torch

from darknet_models import read_rgb, tiny_darknet
from lorakit.tasks.yolo import box_iou, decode, detect, nms, postprocess, preprocess, targets_to_input
from lorakit.tasks.yolo_loss import yolo_loss

LOG2 = math.log(2.0)


def test_decode_by_hand():
    head = torch.zeros(1, 2 * 6, 2, 2)  # 2 anchors, 1 class, 2x2 grid over a 64x64 input: stride 32
    head[0, 6 + 0, 1, 0] = 2.0  # anchor 1, row 1, col 0: tx
    head[0, 6 + 3, 1, 0] = math.log(3.0)  # th
    rows = decode([head], [torch.tensor([[10.0, 10.0], [16.0, 8.0]])], (64, 64))
    assert rows.shape == (1, 8, 6)
    r = rows[0, (1 * 2 + 0) * 2 + 1]  # order (row, col, anchor)
    sig2 = 1 / (1 + math.exp(-2.0))
    torch.testing.assert_close(r, torch.tensor([(0 + sig2) * 32, 1.5 * 32, 16.0, 24.0, 0.5, 0.5]))


def test_nms_is_per_class_and_greedy():
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 11, 11], [0, 0, 10, 10], [20, 20, 30, 30], [2, 0, 12, 10.0]])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5])
    classes = torch.tensor([0, 0, 1, 0, 0])
    # box 1 overlaps box 0 (IoU 0.68): dropped; box 2 is another class; box 4 overlaps box 0 (IoU 0.67) only
    assert nms(boxes, scores, classes, 0.5).tolist() == [0, 2, 3]
    assert nms(boxes, scores, classes, 0.7).tolist() == [0, 1, 2, 3, 4]
    assert nms(boxes[:0], scores[:0], classes[:0], 0.5).numel() == 0
    iou = box_iou(boxes[:1], boxes[1:2])
    assert iou.item() == pytest.approx(81 / 119)


def test_postprocess_scores_are_objectness_times_class():
    rows = torch.tensor([[[50.0, 50, 20, 20, 0.8, 0.5, 0.9], [10, 10, 4, 4, 0.1, 0.9, 0.9]]])
    (found,) = postprocess(rows, conf=0.3, iou=0.5)
    torch.testing.assert_close(found, torch.tensor([[40.0, 40, 60, 60, 0.72, 1], [40, 40, 60, 60, 0.4, 0]]))


def test_letterbox_frames_and_targets():
    image = np.zeros((100, 200, 3), np.uint8)
    image[25:75, 50:150] = 255  # a white box, centre (100, 50), 100 x 50
    x, frames = preprocess([image], (64, 64))
    assert x.shape == (1, 3, 64, 64)
    torch.testing.assert_close(frames, torch.tensor([[0.32, 0.32, 0.0, 16.0]]))
    assert x[0, :, :16].eq(0.5).all() and x[0, :, 48:].eq(0.5).all()  # grey borders above and below
    target = torch.tensor([[0, 0, 0.5, 0.5, 0.5, 0.5]])
    moved = targets_to_input(target, frames, torch.tensor([[100, 200]]), (64, 64))
    torch.testing.assert_close(moved, torch.tensor([[0, 0, 0.5, 0.5, 0.5, 0.25]]))
    plain, frames = preprocess([image], (64, 64), letterbox=False)
    torch.testing.assert_close(frames, torch.tensor([[0.32, 0.64, 0.0, 0.0]]))
    torch.testing.assert_close(targets_to_input(target, frames, torch.tensor([[100, 200]]), (64, 64)), target)
    with pytest.raises(ValueError, match=r"image 0: expected an RGB uint8 array"):
        preprocess([image.astype(np.float32)])


def found_names(model, found):
    return {model.class_names[int(c)] for c in found[:, 5]}


def test_pretrained_finds_the_darknet_samples(yolov3_tiny):
    dog, person = read_rgb("dog.jpg"), read_rgb("person.jpg")
    found_dog, found_person = detect(yolov3_tiny, [dog, person], conf=0.3, iou=0.45)
    assert {"dog", "bicycle"} <= found_names(yolov3_tiny, found_dog)
    assert found_names(yolov3_tiny, found_dog) & {"car", "truck"}
    assert {"person", "horse", "dog"} <= found_names(yolov3_tiny, found_person)
    dog_box = found_dog[found_dog[:, 5] == yolov3_tiny.class_names.index("dog")][0, :4]
    assert box_iou(dog_box[None], torch.tensor([[125.0, 200, 375, 520]])).item() > 0.7  # the dog in the lower left
    assert (found_dog[:, 2] <= dog.shape[1]).all() and (found_dog[:, 3] <= dog.shape[0]).all()


def test_loss_by_hand():
    """1x1 grid, all logits 0: every BCE is log 2; the target's size equals anchor 0 (log-size error 0)."""
    heads = [torch.zeros(2, 2 * 6, 1, 1)]  # batch 2, anchors (16, 16) and (20, 20), 1 class, 32x32 input
    anchors = [torch.tensor([[16.0, 16.0], [20.0, 20.0]])]
    targets = torch.tensor([[0, 0, 0.5, 0.5, 0.5, 0.5]])  # image 0: 16x16 centred, anchor 0 fits exactly
    total, parts = yolo_loss(heads, targets, anchors, (32, 32), ignore_thresh=0.5)
    # image 0: box (2 - 0.25)·(2 log 2 + 0); cls log 2; obj log 2 for anchor 0, anchor 1 is ignored
    # (its box, 20x20 on the same centre, has IoU 256/400 = 0.64 > 0.5 with the target); image 1: obj 2 log 2
    assert parts["box"].item() == pytest.approx(1.75 * 2 * LOG2 / 2)
    assert parts["cls"].item() == pytest.approx(LOG2 / 2)
    assert parts["obj"].item() == pytest.approx(3 * LOG2 / 2)
    assert total.item() == pytest.approx((3.5 + 1 + 3) * LOG2 / 2)
    _, strict = yolo_loss(heads, targets, anchors, (32, 32), ignore_thresh=0.7)  # 0.64 < 0.7: not ignored
    assert strict["obj"].item() == pytest.approx(4 * LOG2 / 2)


def test_loss_rejects_bad_targets():
    heads = [torch.zeros(1, 12, 1, 1)]
    anchors = [torch.tensor([[16.0, 16.0], [20.0, 20.0]])]
    with pytest.raises(ValueError, match=r"target row 1 .*class is not an integer in \[0, 1\)"):
        yolo_loss(heads, torch.tensor([[0, 0, 0.5, 0.5, 0.1, 0.1], [0, 3, 0.5, 0.5, 0.1, 0.1]]), anchors, (32, 32))
    with pytest.raises(ValueError, match=r"target row 0 .*image_index"):
        yolo_loss(heads, torch.tensor([[1, 0, 0.5, 0.5, 0.1, 0.1]]), anchors, (32, 32))
    with pytest.raises(ValueError, match=r"size \(w, h\) is not in \(0, 1\]"):
        yolo_loss(heads, torch.tensor([[0, 0, 0.5, 0.5, 0.0, 0.1]]), anchors, (32, 32))


def random_targets(generator, batch, count, num_classes):
    wh = torch.rand(count, 2, generator=generator) * 0.5 + 0.05
    centre = wh / 2 + torch.rand(count, 2, generator=generator) * (1 - wh)
    image = torch.randint(0, batch, (count, 1), generator=generator).float()
    cls = torch.randint(0, num_classes, (count, 1), generator=generator).float()
    return torch.cat([image, cls, centre, wh], 1)


def test_loss_is_finite_positive_and_training_lowers_it():
    generator = torch.Generator().manual_seed(0)
    model = tiny_darknet().train()
    x = torch.rand(2, 3, 64, 64, generator=generator)
    targets = random_targets(generator, 2, 6, 2)
    total, parts = yolo_loss(model(x), targets, model.anchors, model.input_size)
    assert torch.isfinite(total) and total.item() > 0 and all(v.item() > 0 for v in parts.values())
    assert total.item() == pytest.approx(sum(v.item() for v in parts.values()), rel=1e-6)
    total.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if n.endswith("conv.weight"))
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(8):
        total, _ = yolo_loss(model(x), targets, model.anchors, model.input_size)
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        losses.append(total.item())
    assert losses[-1] < 0.8 * losses[0], losses
    empty, parts = yolo_loss(model(x), torch.zeros(0, 6), model.anchors, model.input_size)  # no objects: obj only
    assert parts["box"].item() == 0 and parts["cls"].item() == 0 and empty.item() > 0
