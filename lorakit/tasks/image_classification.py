"""The image classification task: a pretrained ImageNet classifier fine-tuned for a new class set.

    model      `config.model.path`: "mobilenet-v2" (default) or "efficientnet-lite0" (`lorakit.models.classifiers`)
    head       the pretrained 1000-way head is kept in the base; the task's own head (in_features -> C) is
               the adapter's copy of it (`modules_to_save`), so each adapter carries its class set and a
               base serves any number of them (`lorakit.set_active` switches head and LoRA layers together)
    examples   ImageRow(split, index, epoch) references into the dataset (`data.train`, `data.valid`):
               an ImageFolder directory, an IDX images file (MNIST family; its labels file beside it), or
               "fashion-mnist" / "fashion-mnist-coarse" (Debian's dataset-fashion-mnist; valid = its test split)
    batches    a seeded shuffle of the training images per epoch; training images are augmented (random
               resized crop + horizontal flip, a pure function of (seed, epoch, index), so resume is exact)
    loss       mean cross-entropy over the batch's images:  loss = - 1/B · Σ_i log softmax(f(x_i))[y_i]
    weight     B, the number of images
    metrics    valid_loss and valid_accuracy (top-1) over the validation images
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lorakit.tasks.base import before_after, change
from lorakit.tasks.image_data import ImageRow, hold_out, shuffled_batches, subset_indices, trained_classes

DEFAULT_MODEL = "mobilenet-v2"
BUILTIN = ("fashion-mnist", "fashion-mnist-coarse")


class ImageClassification:
    """The `Task` of an image-classification run."""

    unit = "images"
    speed_label = "img/s"

    def __init__(self, config) -> None:
        self.config = config
        self.datasets: dict[str, object] = {}
        self.classes: tuple[str, ...] = ()

    @property
    def preprocess(self):
        """The model's input recipe (`lorakit.data.image_transforms.Preprocess`) at `data.image_size`."""
        from lorakit.models.classifiers import CLASSIFIERS

        if self.model_name not in CLASSIFIERS:
            raise ValueError(f"model.path={self.model_name!r} is not a classifier lorakit knows; choose one of "
                             f"{sorted(CLASSIFIERS)}")
        return input_spec(CLASSIFIERS[self.model_name].preprocess, self.config.data.image_size)

    # --- model -----------------------------------------------------------------------------------
    def load_model(self) -> nn.Module:
        from lorakit.models.classifiers import freeze_batchnorm_, load_classifier

        model = load_classifier(self.model_name).model
        freeze_batchnorm_(model)  # running statistics are the base's: a LoRA step must not move them
        return model

    @property
    def model_name(self) -> str:
        return self.config.model.path or DEFAULT_MODEL

    def restore(self, model: nn.Module, meta: dict) -> None:
        """Set the classes of a trained adapter from its lorakit.json `task` entry (the input size comes from
        `data.image_size`, which the loader sets from the same entry)."""
        self.classes = tuple(meta["classes"])

    def adapt(self, model: nn.Module, lora_config) -> list[str]:
        """LoRA on the targeted convs, and a new head for this task's classes trained in full."""
        import lorakit
        from lorakit.models.classifiers import classifier_head

        head = classifier_head(model)
        old = model.get_submodule(head)
        new = nn.Linear(old.in_features, len(self.classes), dtype=old.weight.dtype, device=old.weight.device)
        nn.init.normal_(new.weight, std=0.01)  # torchvision's init for these heads
        nn.init.zeros_(new.bias)
        saved = list(dict.fromkeys([*(lora_config.modules_to_save or []), head]))
        return lorakit.inject_adapters(model, replace(lora_config, modules_to_save=saved), new_modules={head: new})

    def adapter_metadata(self) -> dict:
        return {"task": "image-classification", "classes": list(self.classes),
                "model": self.model_name, "image_size": self.preprocess.size}

    # --- data ------------------------------------------------------------------------------------
    def examples(self):
        data, seed = self.config.data, self.config.train.seed
        source = data.train or "fashion-mnist"
        train = read_source(source, "train")
        if data.valid:
            valid = read_source(data.valid, "valid")
        elif source in BUILTIN:
            valid = read_source(source, "valid")
        elif data.valid_fraction > 0:
            train, valid = hold_out(train, data.valid_fraction, seed)
        else:
            valid = None
        if valid is not None and tuple(valid.classes) != tuple(train.classes):
            raise ValueError(f"data.valid has classes {list(valid.classes)} but data.train has {list(train.classes)}; "
                             f"both must name the same classes in the same order")
        self.datasets = {"train": train, "valid": valid}
        self.classes = trained_classes(self.classes, train.classes, f"data.train={source}")
        train_rows = [ImageRow("train", int(i)) for i in subset_indices(len(train), data.max_examples, seed)]
        valid_rows = ([] if valid is None else
                      [ImageRow("valid", int(i)) for i in subset_indices(len(valid), data.max_valid_examples, seed + 1)])
        stats = {"classes": list(self.classes), "train_examples": len(train_rows), "valid_examples": len(valid_rows)}
        return train_rows, valid_rows, stats

    def epoch_batches(self, examples, epoch: int, batch_size: int) -> list:
        return shuffled_batches(examples, epoch, batch_size, self.config.train.seed)

    def collate(self, rows, dtype: torch.dtype, device: torch.device | None) -> dict:
        from lorakit.data.image_transforms import augment, preprocess

        spec, images, labels = self.preprocess, [], []  # the recipe once per batch, not once per image
        for row in rows:
            image, label = self.datasets[row.split][row.index]
            if row.epoch is not None and self.config.data.augment:
                x = augment(image, spec, self.config.train.seed, row.epoch, row.index)
            else:
                x = preprocess(image, spec)
            images.append(x)
            labels.append(label)
        batch = {"images": torch.stack(images).to(dtype), "labels": torch.tensor(labels, dtype=torch.long)}
        if device is not None and device.type != "cpu":
            batch = {k: v.to(device) for k, v in batch.items()}
        return batch

    def weight(self, batch: dict) -> int:
        return len(batch["labels"])

    def loss(self, model, batch: dict) -> torch.Tensor:
        logits = model(batch["images"])  # (B, C)
        return F.cross_entropy(logits.float(), batch["labels"])

    @torch.no_grad()
    def evaluate(self, model, examples, world=None, batch_size: int = 64) -> dict[str, float]:
        """valid_loss (mean cross-entropy) and valid_accuracy (top-1) over `examples`; with several processes
        each takes every P-th batch and the sums are all-reduced."""
        from lorakit.tasks.base import compute_dtype
        from lorakit.training.distributed import World

        world = world or World()
        was_training = model.training
        model.eval()
        total, correct, count = 0.0, 0, 0
        for start in range(world.rank * batch_size, len(examples), batch_size * world.size):
            rows = [replace(r, epoch=None) for r in examples[start:start + batch_size]]
            batch = self.collate(rows, compute_dtype(model), world.device)
            logits = model(batch["images"]).float()
            total += F.cross_entropy(logits, batch["labels"], reduction="sum").item()
            correct += int((logits.argmax(-1) == batch["labels"]).sum())
            count += len(rows)
        total, correct, count = world.sum(total, correct, count)
        model.train(was_training)
        return {"valid_loss": total / max(count, 1), "valid_accuracy": correct / max(count, 1)}

    # --- results ---------------------------------------------------------------------------------
    def summary(self, before: dict | None, after: dict | None, per_s: float) -> dict:
        return {"valid_loss": after["valid_loss"] if after else None,
                **before_after(before, after, "valid_accuracy"), "images_per_s": per_s}

    def describe(self, before: dict | None, after: dict | None, per_s: float) -> str:
        return f"{change(before, after, 'valid_accuracy', 'valid accuracy')}, {per_s:.1f} img/s"

    @torch.no_grad()
    def predict(self, model, images: list[np.ndarray], top: int = 5) -> list[list[tuple[str, float]]]:
        """The `top` classes and probabilities of each image (uint8 HWC arrays), best first."""
        from lorakit.data.image_transforms import preprocess
        from lorakit.tasks.base import compute_dtype

        spec = self.preprocess
        x = torch.stack([preprocess(image, spec) for image in images]).to(compute_dtype(model))
        probs = model(x).float().softmax(-1)  # (N, C)
        p, i = probs.topk(min(top, probs.shape[-1]), dim=-1)
        return [[(self.classes[c], float(q)) for q, c in zip(pp.tolist(), ii.tolist())] for pp, ii in zip(p, i)]


def input_spec(spec, image_size: int | None):
    """The classifier's preprocessing, at `image_size` pixels when given (the resize keeps its crop ratio)."""
    if image_size is None or image_size == spec.size:
        return spec
    return replace(spec, size=image_size, resize=round(image_size * spec.resize / spec.size))


def read_source(source: str, split: str):
    """A classification dataset from `source` (see the module docstring); `split` picks the builtin's half."""
    from lorakit.data import fashion_mnist

    if source in BUILTIN:
        dataset = fashion_mnist.load_fashion_mnist("train" if split == "train" else "test")
        return fashion_mnist.coarse(dataset) if source.endswith("-coarse") else dataset
    path = Path(source).expanduser()
    if path.is_dir():
        from lorakit.data.image_folder import read_image_folder

        return read_image_folder(path)
    if "idx3-ubyte" in path.name:
        from lorakit.data.idx import read_idx_pair

        labels = path.with_name(path.name.replace("images-idx3", "labels-idx1"))
        if not labels.is_file():
            raise FileNotFoundError(f"{source}: its labels file {labels.name} is not beside it; an IDX images file "
                                    f"(*-images-idx3-ubyte[.gz]) needs its *-labels-idx1-ubyte[.gz] pair")
        raw = np.unique(_idx_labels(labels))
        return read_idx_pair(path, labels, tuple(str(c) for c in range(int(raw.max()) + 1)))
    raise ValueError(f"data.{'train' if split == 'train' else 'valid'}={source!r} is not an image dataset: give a folder "
                     f"with one subfolder per class (ImageFolder), an IDX images file (*-images-idx3-ubyte[.gz]), "
                     f"or one of {list(BUILTIN)}")


def _idx_labels(path: Path) -> np.ndarray:
    from lorakit.data.idx import read_idx

    return read_idx(path)
