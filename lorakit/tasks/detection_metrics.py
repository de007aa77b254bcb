"""Detection mAP by pycocotools' COCOeval, on in-memory predictions and targets.

    map50 = AP at IoU 0.5;   map = AP averaged over IoU 0.50, 0.55, ..., 0.95
    (COCO's definition: per class, precision interpolated to be non-increasing and sampled at the
    101 recall points 0, 0.01, ..., 1; averaged over the classes that have a target; area "all";
    at most `max_dets` predictions per image, the highest scored.)

The numbers are COCOeval's own (the reference every detector reports against), not a re-derivation:
e.g. one class with two targets, a correct prediction ranked first and a false one second, gives
AP = 51/101 = 0.505 (recall 0.5 reached at precision 1 covers the 51 recall points 0..0.50), not
the 0.5 of a plain area under the curve. Needs pycocotools (``pip install pycocotools``).
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence

import numpy as np
import torch

Boxes = torch.Tensor | np.ndarray


def mean_average_precision(
    predictions: Sequence[Boxes], targets: Sequence[Boxes], num_classes: int, max_dets: int = 100
) -> dict[str, float]:
    """COCO mAP of per-image predictions against per-image targets: {"map50": .., "map": ..}.

    predictions[i]: (K, 6) rows (x1, y1, x2, y2, score, class) for image i (K may be 0);
    targets[i]: (M, 5) rows (class, x1, y1, x2, y2) for image i (M may be 0). Boxes in pixels, the
    same frame for both. Raises ValueError when no image has a target (mAP is then undefined).
    """
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError as error:
        raise ImportError("detection mAP needs pycocotools: pip install pycocotools") from error
    if len(predictions) != len(targets):
        raise ValueError(f"{len(predictions)} prediction lists for {len(targets)} target lists: give one of each per image")
    images = [{"id": i + 1} for i in range(len(targets))]
    categories = [{"id": c + 1} for c in range(num_classes)]
    ground_truth = []
    for i, rows in enumerate(targets):
        rows = _rows(rows, 5, f"targets[{i}]", "(class, x1, y1, x2, y2)")
        for c, x1, y1, x2, y2 in rows.tolist():
            _check_class(c, num_classes, f"targets[{i}]")
            ground_truth.append(_annotation(len(ground_truth) + 1, i + 1, c, x1, y1, x2, y2))
    if not ground_truth:
        raise ValueError(f"none of the {len(targets)} images has a target box: mAP is undefined; evaluate on labelled images")
    detections = []
    for i, rows in enumerate(predictions):
        rows = _rows(rows, 6, f"predictions[{i}]", "(x1, y1, x2, y2, score, class)")
        for x1, y1, x2, y2, score, c in rows.tolist():
            _check_class(c, num_classes, f"predictions[{i}]")
            detections.append({**_annotation(len(detections) + 1, i + 1, c, x1, y1, x2, y2), "score": score})

    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        gt = _coco(COCO, images, categories, ground_truth)
        dt = _coco(COCO, images, categories, detections)
        evaluator = COCOeval(gt, dt, iouType="bbox")
        evaluator.params.maxDets = [1, 10, max_dets]
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {"map50": float(evaluator.stats[1]), "map": float(evaluator.stats[0])}


def _rows(rows: Boxes, width: int, what: str, layout: str) -> np.ndarray:
    rows = rows.detach().cpu().numpy() if isinstance(rows, torch.Tensor) else np.asarray(rows, dtype=np.float64)
    rows = rows.reshape(0, width) if rows.size == 0 else rows
    if rows.ndim != 2 or rows.shape[1] != width:
        raise ValueError(f"{what} has shape {rows.shape}: expected (N, {width}) rows {layout}")
    if not np.isfinite(rows).all():
        raise ValueError(f"{what} has a non-finite value")
    return rows.astype(np.float64)


def _check_class(c: float, num_classes: int, what: str) -> None:
    if c != int(c) or not 0 <= c < num_classes:
        raise ValueError(f"{what}: class {c:g} is not an integer in [0, {num_classes})")


def _annotation(ann_id: int, image_id: int, c: float, x1: float, y1: float, x2: float, y2: float) -> dict:
    w, h = max(x2 - x1, 0.0), max(y2 - y1, 0.0)
    # ids start at 1: COCOeval marks an unmatched box with id 0
    return {"id": ann_id, "image_id": image_id, "category_id": int(c) + 1, "bbox": [x1, y1, w, h], "area": w * h, "iscrowd": 0}


def _coco(coco_class, images: list[dict], categories: list[dict], annotations: list[dict]):
    coco = coco_class()
    coco.dataset = {"images": images, "categories": categories, "annotations": annotations}
    coco.createIndex()
    return coco
