"""`Task`: what the training loop asks of a task, and nothing more.

The loop (`lorakit.training.loop`) never looks inside an example or a batch. It asks its task for:

    model = task.load_model()                      the base model, before adapters are injected
    task.adapt(model, lora_config)                 inject the adapter (and a task's new head, trained in full)
    train, valid, stats = task.examples()          lists of examples; stats is summary.json's "data"
    batches = task.epoch_batches(train, epoch, n)  one epoch's global micro-batches (lists of examples),
                                                   a pure function of (seed, epoch, n): resume depends on it
    batch = task.collate(rows, dtype, device)      tensors for one micro-batch
    n = task.weight(batch)                         the loss units in it (loss-bearing tokens, images)
    loss = task.loss(model, batch)                 mean loss over those units (a 0-dim tensor)
    metrics = task.evaluate(model, valid, world)   {"valid_loss": ..., and the task's own metrics}

One optimizer step's loss is the mean over all units of its micro-batches (each micro-batch's mean is
weighted by `weight`), so gradient accumulation and data parallelism give the gradient of one big batch.
`unit` names what `weight` counts ("tokens", "images"): metrics.jsonl logs `{unit}_per_s`. A task's
`summary` and `describe` turn validation metrics into summary.json entries and the last progress line;
`adapter_metadata` is what the saved adapter records of the task (an image task's classes).

Image tasks also have `restore(model, metadata)` (a trained adapter's classes and input size, from its
lorakit.json) and `predict(model, images)` (`lorakit predict`); a causal LM predicts with `generate`.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import nn


class Task(Protocol):
    unit: str          # what `weight` counts: metrics.jsonl logs f"{unit}_per_s"
    speed_label: str   # the progress bar's throughput label, e.g. "useful tok/s"

    def load_model(self) -> nn.Module: ...

    def adapt(self, model: nn.Module, lora_config) -> list[str]: ...

    def adapter_metadata(self) -> dict | None: ...

    def examples(self) -> tuple[list, list, dict[str, Any]]: ...

    def epoch_batches(self, examples: list, epoch: int, batch_size: int) -> list[list]: ...

    def collate(self, rows: list, dtype: torch.dtype, device: torch.device | None) -> dict: ...

    def weight(self, batch: dict) -> int: ...

    def loss(self, model: nn.Module, batch: dict) -> torch.Tensor: ...

    def evaluate(self, model: nn.Module, examples: list, world) -> dict[str, float]: ...

    def summary(self, before: dict | None, after: dict | None, per_s: float) -> dict[str, Any]: ...

    def describe(self, before: dict | None, after: dict | None, per_s: float) -> str: ...


def compute_dtype(model: nn.Module) -> torch.dtype:
    """The dtype the frozen base computes in (the first frozen floating-point parameter's; float32 if none)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point() and not p.requires_grad), torch.float32)


def before_after(before: dict | None, after: dict | None, *keys: str) -> dict:
    """summary.json entries `{key}_before` and `{key}_after` for each validation metric (None without validation)."""
    out = {}
    for key in keys:
        out[f"{key}_before"] = before[key] if before else None
        out[f"{key}_after"] = after[key] if after else None
    return out


def change(before: dict | None, after: dict | None, key: str, label: str, digits: int = 4) -> str:
    """", {label} {before} -> {after}" for the last progress line, or "" without validation."""
    return f", {label} {before[key]:.{digits}f} -> {after[key]:.{digits}f}" if before and after else ""
