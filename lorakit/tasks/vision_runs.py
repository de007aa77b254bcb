"""A finished image-task run, used: load its model with the adapter, evaluate it, predict on image files.

    model, task, config = load_vision_run(run_dir)          base + the run's adapter (head included), eval mode
    metrics = evaluate_run(run_dir)                           the task's validation metrics
    results = predict_files(run_dir, paths, out_dir=...)     classes / boxes per image; detection pictures

The adapter's lorakit.json records what it was trained for (task, classes, model, input size), so a
model loads from the adapter directory alone: `load_vision_adapter(adapter_dir)`. Adapters for different
class sets share one base (each carries its own head) and swap with `lorakit.set_active`:

    model, fine = load_vision_adapter("fine/adapter", name="fine", overrides=["data.train=fashion-mnist"])
    _, coarse = load_vision_adapter("coarse/adapter", name="coarse", model=model,
                                    overrides=["data.train=fashion-mnist-coarse"])
    _, valid, _ = coarse.examples()                  # the overrides name the data a task evaluates on
    lorakit.set_active(model, "coarse"); coarse.evaluate(model, valid)
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from torch import nn

IMAGE_TASKS = ("image-classification", "object-detection")


def load_vision_run(run_dir: str | Path):
    """(model with the run's adapter, task, config) of a finished image-task run."""
    from lorakit.training.run_config import read_run_config

    config = read_run_config(run_dir)
    if config.task not in IMAGE_TASKS:
        raise ValueError(f"{run_dir} is a task={config.task} run; this needs an image task run ({', '.join(IMAGE_TASKS)})")
    adapter = Path(run_dir) / "adapter"
    if not adapter.is_dir():
        raise FileNotFoundError(f"{run_dir} has no adapter/ yet: the run has not finished (a run that stopped "
                                f"continues with lorakit train --resume {run_dir})")
    model, task = _with_adapter(config, adapter, _task_metadata(adapter))
    return model, task, config


def load_vision_adapter(adapter_dir: str | Path, name: str = "default", model: nn.Module | None = None,
                        overrides: Sequence[str] = ()):
    """(model, task) from an image-task adapter directory alone (its lorakit.json names the task, classes,
    model and input size); with `model`, the adapter is added to that base under `name` instead.
    `overrides` are run-config `key=value` settings for the task, e.g. the data it evaluates on
    (`data.valid=DIR`, `data.max_valid_examples=500`) for `task.examples()` and `task.evaluate`."""
    from lorakit.training.run_config import load_config

    meta = _task_metadata(Path(adapter_dir))
    if not meta or meta.get("task") not in IMAGE_TASKS:
        raise ValueError(f"{adapter_dir} was not trained by an image task (its lorakit.json has no image task)")
    trained = [f"task={meta['task']}", f"model.path={meta['model']}"]  # what the adapter was trained for wins
    if meta.get("image_size"):
        trained.append(f"data.image_size={meta['image_size']}")
    config = load_config(None, [trained[0], *overrides, *trained])
    return _with_adapter(config, Path(adapter_dir), meta, name, model)


def _task_metadata(adapter_dir: Path) -> dict | None:
    """The `task` entry of an adapter's lorakit.json: what it was trained for (task, classes, model, size)."""
    from lorakit.io import read_json

    return read_json(adapter_dir / "lorakit.json", "lorakit metadata").get("task")


def _with_adapter(config, adapter_dir: Path, meta: dict | None, name: str = "default", model: nn.Module | None = None):
    import lorakit
    from lorakit.tasks import make_task

    task = make_task(config)
    base = model if model is not None else task.load_model()
    lorakit.load_adapter(base, adapter_dir, name=name)
    task.restore(base, meta or {})
    return base.eval(), task


def evaluate_run(run_dir: str | Path) -> dict[str, float]:
    """The task's validation metrics of a finished run's model on its validation images."""
    model, task, _ = load_vision_run(run_dir)
    _, valid, _ = task.examples()
    if not valid:
        raise ValueError(f"{run_dir} has no validation images (set data.valid or data.valid_fraction)")
    return task.evaluate(model, valid)


def predict_files(run_dir: str | Path, paths: list[str], out_dir: str | Path | None = None, **options) -> list:
    """The run's predictions for image files: classification, the top classes; detection, the boxes, with a
    copy of each image with its boxes drawn written to `out_dir` (default RUN_DIR/predictions)."""
    from lorakit.data.images import read_image

    model, task, config = load_vision_run(run_dir)
    images = [read_image(p) for p in paths]
    results = task.predict(model, images, **options)
    if config.task == "object-detection":
        from lorakit.report.draw import draw_boxes

        out = Path(out_dir) if out_dir is not None else Path(run_dir) / "predictions"
        out.mkdir(parents=True, exist_ok=True)
        for path, image, found in zip(paths, images, results):
            draw_boxes(image, found, out / (Path(path).stem + ".boxes.png"))
    return results
