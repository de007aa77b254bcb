"""The YOLOv3 training loss (Redmon & Farhadi 2018), on raw head maps and normalised targets.

Targets are Ultralytics' label convention, one row per object: (image_index, class, cx, cy, w, h)
with the box normalised to the network input ([0, 1]; see `lorakit.tasks.yolo.targets_to_input`
when images are letterboxed).

Assignment (as Darknet's yolo layer): each target goes to the one anchor, over all heads, whose
(w, h) has the best IoU with the target's (w, h) when both are centred on the same point, at the
grid cell (gi, gj) = (⌊cx·W⌋, ⌊cy·H⌋) of that anchor's head. When two targets land on the same
(image, anchor, cell), the later one wins, as in Darknet.

With t the raw map (B, A, 5+C, H, W) of a head and, for a target assigned at (b, a, gj, gi),
p = t[b, a, :, gj, gi]:

    box  = (2 - w·h) · [ BCE(p_x, cx·W - gi) + BCE(p_y, cy·H - gj)
                         + (p_w - log(w_px / anchor_w))² + (p_h - log(h_px / anchor_h))² ]
    cls  = Σ_c BCE(p_c, 1[c = class])
    obj  = Σ over every (b, a, cell) of BCE(t_o, 1 if assigned else 0), leaving out the unassigned
           predictions whose decoded box has IoU > ignore_thresh with any target of their image

BCE(z, y) = -y·log σ(z) - (1-y)·log(1-σ(z)) on logits. The box terms are Darknet's: its gradient
for x, y is σ(p) - target (that of BCE on the logit, not of a squared error on σ), for w, h it is
proportional to p - target (a squared error on log-size), and 2 - w·h weights small boxes up.
The BCE on the soft xy target is not 0 at its optimum (it is the target's binary entropy); its
gradient is. Each part is a sum over its terms divided by the batch size B: the total is the mean
per image of box + obj + cls. ignore_thresh defaults to the paper's 0.5.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from lorakit.tasks.yolo import box_iou, cxcywh_to_xyxy, decode


def check_targets(targets: torch.Tensor, batch_size: int, num_classes: int) -> None:
    """A clear error for the first bad target row (index, value, and what a row must hold)."""
    if targets.dim() != 2 or targets.shape[1] != 6:
        raise ValueError(f"targets must be (M, 6) rows (image_index, class, cx, cy, w, h), got shape {tuple(targets.shape)}")
    checks = [
        (torch.isfinite(targets).all(1), "has a non-finite value"),
        ((targets[:, 0] >= 0) & (targets[:, 0] < batch_size) & (targets[:, 0] == targets[:, 0].round()), f"image_index is not an integer in [0, {batch_size})"),
        ((targets[:, 1] >= 0) & (targets[:, 1] < num_classes) & (targets[:, 1] == targets[:, 1].round()), f"class is not an integer in [0, {num_classes})"),
        (((targets[:, 2:4] >= 0) & (targets[:, 2:4] <= 1)).all(1), "centre (cx, cy) is outside [0, 1]: boxes are normalised (cx, cy, w, h in [0, 1])"),
        (((targets[:, 4:6] > 0) & (targets[:, 4:6] <= 1)).all(1), "size (w, h) is not in (0, 1]: boxes are normalised (cx, cy, w, h in [0, 1])"),
    ]
    for ok, problem in checks:
        bad = (~ok).nonzero()
        if len(bad):
            row = int(bad[0])
            raise ValueError(f"target row {row} {targets[row].tolist()}: {problem}")


def shape_iou(wh: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """IoU of sizes wh (M, 2) and anchors (A, 2) centred on one point -> (M, A)."""
    inter = torch.minimum(wh[:, None], anchors[None]).prod(-1)
    return inter / (wh.prod(-1)[:, None] + anchors.prod(-1)[None] - inter)


def yolo_loss(
    heads: Sequence[torch.Tensor],
    targets: torch.Tensor,
    anchors: Sequence[torch.Tensor],
    input_size: tuple[int, int],
    ignore_thresh: float = 0.5,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The YOLOv3 loss of the module docstring: (total, {"box", "obj", "cls"}), each per image.

    heads: raw maps (B, A·(5+C), H, W) as `Darknet.forward` returns; anchors: per head (A, 2) (w, h)
    in input pixels; input_size: (H, W) of the network input.
    """
    batch = heads[0].shape[0]
    num_classes = heads[0].shape[1] // len(anchors[0]) - 5
    targets = targets.to(heads[0].device, torch.float32)
    check_targets(targets, batch, num_classes)
    size_wh = torch.tensor([input_size[1], input_size[0]], device=targets.device, dtype=torch.float32)
    all_anchors = torch.cat([a.to(targets.device, torch.float32) for a in anchors])  # (A_total, 2)
    best = shape_iou(targets[:, 4:6] * size_wh, all_anchors).argmax(1)  # (M,) over all heads

    # the ignore rule compares every predicted box with every target of its image, in input pixels
    target_boxes = cxcywh_to_xyxy(targets[:, 2:6] * size_wh.repeat(2))  # (M, 4)
    image_of = targets[:, 0].long()

    box = obj = cls = heads[0].new_zeros((), dtype=torch.float32)
    first = 0
    for head, anchor in zip(heads, anchors, strict=True):
        b, _, h, w = head.shape
        a = len(anchor)
        t = head.float().view(b, a, 5 + num_classes, h, w)  # (B, A, 5+C, H, W)
        mine = (best >= first) & (best < first + a)
        first += a
        k, ai = mine.nonzero(as_tuple=True)[0], best[mine] - (first - a)
        tb = targets[k]
        gx, gy = tb[:, 2] * w, tb[:, 3] * h
        gi, gj = gx.long().clamp(0, w - 1), gy.long().clamp(0, h - 1)
        bi = tb[:, 0].long()
        key = ((bi * a + ai) * h + gj) * w + gi
        last = _last_of_each(key)  # Darknet: a later target on the same anchor and cell wins
        k, ai, tb, gx, gy, gi, gj, bi = k[last], ai[last], tb[last], gx[last], gy[last], gi[last], gj[last], bi[last]

        p = t[bi, ai, :, gj, gi]  # (K, 5+C)
        anchor_wh = anchor.to(p.device, torch.float32)[ai]  # (K, 2)
        xy_target = torch.stack([gx - gi, gy - gj], 1)
        wh_target = torch.log(tb[:, 4:6] * size_wh / anchor_wh)
        scale = 2.0 - tb[:, 4] * tb[:, 5]
        xy = F.binary_cross_entropy_with_logits(p[:, :2], xy_target, reduction="none").sum(1)
        wh = (p[:, 2:4] - wh_target).pow(2).sum(1)
        box = box + (scale * (xy + wh)).sum()
        one_hot = F.one_hot(tb[:, 1].long(), num_classes).float()
        cls = cls + F.binary_cross_entropy_with_logits(p[:, 5:], one_hot, reduction="sum")

        obj_target = torch.zeros(b, a, h, w, device=p.device)
        obj_target[bi, ai, gj, gi] = 1.0
        with torch.no_grad():
            predicted = cxcywh_to_xyxy(decode([head.detach().float()], [anchor], input_size)[..., :4])  # (B, H·W·A, 4)
            ignore = torch.zeros(b, h * w * a, dtype=torch.bool, device=p.device)
            for image in range(b):
                theirs = target_boxes[image_of == image]
                if len(theirs):
                    ignore[image] = box_iou(predicted[image], theirs).amax(1) > ignore_thresh
            ignore = ignore.view(b, h, w, a).permute(0, 3, 1, 2) & (obj_target == 0)  # decode's order is (row, col, anchor)
        obj_terms = F.binary_cross_entropy_with_logits(t[:, :, 4], obj_target, reduction="none")
        obj = obj + obj_terms.masked_fill(ignore, 0.0).sum()
    parts = {"box": box / batch, "obj": obj / batch, "cls": cls / batch}
    return (box + obj + cls) / batch, {name: value.detach() for name, value in parts.items()}


def _last_of_each(key: torch.Tensor) -> torch.Tensor:
    """Indices of the last occurrence of each distinct value of key (M,)."""
    if key.numel() == 0:
        return key
    unique, inverse = torch.unique(key, return_inverse=True)
    positions = torch.arange(len(key), device=key.device)
    return torch.full((len(unique),), -1, device=key.device, dtype=torch.long).scatter_reduce(0, inverse, positions, "amax")
