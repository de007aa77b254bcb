"""YOLO detection ops: preprocessing, decoding head maps to boxes, per-class NMS, `detect`.

Preprocessing (RGB, divided by 255) is Darknet's detector path by default: a letterbox (resize
keeping the aspect ratio, grey 0.5 borders); ``letterbox=False`` is OpenCV's ``blobFromImage(img,
1/255, (416, 416), swapRB=True, crop=False)``, a plain resize. The pretrained YOLOv3-tiny is
better with the letterbox: on Darknet's person.jpg it finds the horse (0.92) where the plain
resize sees a sheep (0.79, horse 0.16). `targets_to_input` maps labels into the letterboxed frame.

Decoding one head map (B, A·(5+C), H, W) with anchors (A, 2) in input pixels and stride
s = input_h / H (YOLOv3, Redmon & Farhadi 2018, eq. 1):

    t = map.view(B, A, 5+C, H, W)
    cx = (col + σ(tx)) · s_x      cy = (row + σ(ty)) · s_y        (input pixels)
    w  = anchor_w · exp(tw)       h  = anchor_h · exp(th)
    objectness = σ(to)            class probabilities p_c = σ(t_c)  (independent logistic classifiers)

`decode` returns rows (B, N, 5+C) = (cx, cy, w, h, objectness, p_1..p_C), N = Σ A·H·W, ordered
head by head, then (row, col, anchor): the order of Darknet's ``get_network_boxes`` (OpenCV's rows
carry the same numbers with the box normalised and p_c multiplied by the objectness).

Detection scores are objectness · p_c, one candidate per (box, class) above `conf` as in Darknet
(a box may be reported for two classes), then greedy NMS per class at IoU `iou`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F


def preprocess(
    images: Sequence[np.ndarray | torch.Tensor], size: tuple[int, int] = (416, 416), letterbox: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """RGB uint8 images (H, W, 3) -> (x, frames): the network input x (B, 3, size_h, size_w) float32 in
    [0, 1], and frames (B, 4) = (scale_x, scale_y, offset_x, offset_y), with
    input pixel = image pixel · scale + offset.

    letterbox=True: Darknet's detector (``letterbox_image``): scale by min(size_w/W, size_h/H) keeping
    the aspect ratio, centre, fill the rest with 0.5. letterbox=False: OpenCV's
    ``blobFromImage(img, 1/255, size, swapRB=True, crop=False)``, a plain resize. The resize is
    bilinear with half-pixel centres and no antialiasing (OpenCV's INTER_LINEAR) in float: OpenCV
    rounds the resized uint8 image, so its blob differs by at most 0.5/255 per value.
    """
    size_h, size_w = size
    batch, frames = [], []
    for k, image in enumerate(images):
        image = torch.as_tensor(image)
        if image.dim() != 3 or image.shape[-1] != 3 or image.dtype != torch.uint8:
            raise ValueError(f"image {k}: expected an RGB uint8 array of shape (H, W, 3), got {image.dtype} {tuple(image.shape)}")
        h, w = image.shape[:2]
        s = min(size_w / w, size_h / h)
        new_h, new_w = (max(1, round(h * s)), max(1, round(w * s))) if letterbox else (size_h, size_w)
        x = image.permute(2, 0, 1)[None].float()  # (1, 3, H, W)
        x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=False).clamp_(0, 255) / 255.0
        top, left = (size_h - new_h) // 2, (size_w - new_w) // 2
        batch.append(F.pad(x, (left, size_w - new_w - left, top, size_h - new_h - top), value=0.5))
        frames.append([new_w / w, new_h / h, left, top])
    return torch.cat(batch), torch.tensor(frames, dtype=torch.float32)


def targets_to_input(targets: torch.Tensor, frames: torch.Tensor, image_sizes: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Targets (M, 6) = (image_index, class, cx, cy, w, h) normalised to each image -> the same,
    normalised to the network input that `preprocess` made (identity for letterbox=False).

    image_sizes (B, 2) = (H, W) of the original images; frames from `preprocess`.
    """
    i = targets[:, 0].long()
    sx, sy, ox, oy = frames[i].unbind(1)
    h, w = image_sizes[i].to(targets.dtype).unbind(1)
    out = targets.clone()
    out[:, 2] = (targets[:, 2] * w * sx + ox) / size[1]
    out[:, 3] = (targets[:, 3] * h * sy + oy) / size[0]
    out[:, 4] = targets[:, 4] * w * sx / size[1]
    out[:, 5] = targets[:, 5] * h * sy / size[0]
    return out


def decode(heads: Sequence[torch.Tensor], anchors: Sequence[torch.Tensor], input_size: tuple[int, int]) -> torch.Tensor:
    """Head maps -> rows (B, N, 5+C): (cx, cy, w, h) in input pixels, objectness, class probabilities."""
    rows = []
    for head, anchor in zip(heads, anchors, strict=True):
        b, _, h, w = head.shape
        a = len(anchor)
        t = head.view(b, a, -1, h, w).permute(0, 3, 4, 1, 2)  # (B, H, W, A, 5+C)
        grid_y, grid_x = torch.meshgrid(torch.arange(h, device=head.device), torch.arange(w, device=head.device), indexing="ij")
        stride = torch.tensor([input_size[1] / w, input_size[0] / h], device=head.device, dtype=head.dtype)
        cell = torch.stack([grid_x, grid_y], -1)[:, :, None].to(head.dtype)  # (H, W, 1, 2) as (col, row)
        xy = (cell + t[..., :2].sigmoid()) * stride
        wh = t[..., 2:4].exp() * anchor.to(head.dtype)
        rows.append(torch.cat([xy, wh, t[..., 4:].sigmoid()], -1).reshape(b, h * w * a, -1))
    return torch.cat(rows, 1)


def cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    """(..., 4) centre, size -> (..., 4) corners (x1, y1, x2, y2)."""
    cxcy, wh = boxes[..., :2], boxes[..., 2:4]
    return torch.cat([cxcy - wh / 2, cxcy + wh / 2], -1)


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of corner boxes a (N, 4) and b (M, 4) -> (N, M); 0 where both boxes are empty."""
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area_a = (a[:, 2:] - a[:, :2]).clamp(min=0).prod(-1)
    area_b = (b[:, 2:] - b[:, :2]).clamp(min=0).prod(-1)
    union = area_a[:, None] + area_b[None, :] - inter
    return torch.where(union > 0, inter / union.clamp(min=torch.finfo(union.dtype).tiny), torch.zeros_like(union))


def nms(boxes: torch.Tensor, scores: torch.Tensor, classes: torch.Tensor, iou: float) -> torch.Tensor:
    """Greedy per-class non-maximum suppression; the indices kept, by decreasing score.

    boxes (N, 4) corners, scores (N,), classes (N,) integer. A box is dropped when a higher-scored
    box of the same class overlaps it with IoU > `iou`. Boxes of different classes never meet:
    each class is shifted to its own region of the plane before one IoU matrix is computed.
    """
    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    order = scores.argsort(descending=True)
    span = (boxes.max() - boxes.min()).clamp(min=1) + 1
    shifted = boxes[order] + (classes[order].to(boxes.dtype) * span)[:, None]
    overlaps = box_iou(shifted, shifted) > iou  # (N, N)
    keep = torch.ones(len(order), dtype=torch.bool, device=boxes.device)
    for i in range(len(order)):  # greedy: a kept box suppresses the lower-scored ones it overlaps
        if keep[i]:
            keep[i + 1 :] &= ~overlaps[i, i + 1 :]
    return order[keep]


def postprocess(rows: torch.Tensor, conf: float = 0.25, iou: float = 0.45, max_det: int = 300) -> list[torch.Tensor]:
    """Decoded rows (B, N, 5+C) -> per image a (K, 6) tensor (x1, y1, x2, y2, score, class), by score."""
    if not 0.0 <= conf <= 1.0 or not 0.0 <= iou <= 1.0:
        raise ValueError(f"conf={conf} and iou={iou} must lie in [0, 1]")
    out = []
    for r in rows:
        scores = r[:, 4:5] * r[:, 5:]  # (N, C): objectness · p_c
        box_index, cls = (scores > conf).nonzero(as_tuple=True)
        score = scores[box_index, cls]
        boxes = cxcywh_to_xyxy(r[box_index, :4])
        keep = nms(boxes, score, cls, iou)[:max_det]
        out.append(torch.cat([boxes[keep], score[keep, None], cls[keep, None].to(boxes.dtype)], 1))
    return out


@torch.no_grad()
def detect(
    model, images: Sequence[np.ndarray | torch.Tensor], conf: float = 0.25, iou: float = 0.45, max_det: int = 300, letterbox: bool = True
) -> list[torch.Tensor]:
    """Run a YOLO model (a `lorakit.models.darknet.Darknet`) on RGB uint8 images (H, W, 3).

    Returns per image a (K, 6) float tensor (x1, y1, x2, y2, score, class) with the box in that
    image's pixels (clipped to the image), sorted by score; class indexes ``model.class_names``.
    """
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        x, frames = preprocess(images, model.input_size, letterbox)
        rows = decode(model(x.to(device)), model.anchors, model.input_size)
    finally:
        model.train(was_training)
    return [to_image_pixels(found.cpu(), frame, image.shape[:2])
            for image, frame, found in zip(images, frames, postprocess(rows, conf, iou, max_det))]


def to_image_pixels(found: torch.Tensor, frame: torch.Tensor, size) -> torch.Tensor:
    """(K, 6) detections with boxes in input pixels -> the same in the original image's pixels (`frame` from
    `preprocess`, `size` the image's (H, W)), clipped to the image."""
    sx, sy, ox, oy = frame.tolist()
    h, w = (float(v) for v in size)
    out = found.clone()
    out[:, [0, 2]] = ((found[:, [0, 2]] - ox) / sx).clamp(0, w)
    out[:, [1, 3]] = ((found[:, [1, 3]] - oy) / sy).clamp(0, h)
    return out
