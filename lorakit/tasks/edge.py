"""Edge export of an image-task run: the adapter merged into the base (exact), written as ONNX, checked in
onnxruntime against PyTorch, timed, and optionally quantized to INT8 with the run's own images as the
calibration set; each model is scored with the task's own metric on the run's validation images.

    report = export_run_onnx(run_dir, "model.onnx", int8=True)
    # report: max |ORT - PyTorch|, ms/image (PyTorch, ORT fp32, ORT int8), file sizes, and the metrics of the
    # PyTorch model, the ONNX model and the INT8 model (accuracy or mAP): the INT8 drop is measured, not assumed

Needs onnx, onnxscript and onnxruntime (`pip install 'lorakit[vision]'`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn


class OnnxRuntimeModel(nn.Module):
    """An ONNX file run by onnxruntime behind the PyTorch module interface the tasks call: forward(x) gives
    the outputs as torch tensors (one tensor, or a list for a detector's heads). `like`'s attributes a task
    reads (a YOLO model's `anchors` and `input_size`) are copied, so `task.evaluate` scores it unchanged."""

    def __init__(self, path: str | Path, like: nn.Module, threads: int | None = None) -> None:
        super().__init__()
        from lorakit.formats.onnx import _session

        self.path = Path(path)
        self.session = _session(self.path, threads)
        self.input_name = self.session.get_inputs()[0].name
        self.many = isinstance(getattr(like, "anchors", None), list)  # a detector returns one map per head
        for name in ("anchors", "input_size"):
            if hasattr(like, name):
                setattr(self, name, getattr(like, name))

    def forward(self, x: torch.Tensor):
        outputs = [torch.from_numpy(o) for o in self.session.run(None, {self.input_name: x.float().numpy()})]
        return outputs if self.many else outputs[0]


@dataclass
class EdgeReport:
    onnx_path: Path
    max_abs_diff: float
    torch_ms: float
    onnx_ms: float
    onnx_bytes: int
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)  # "pytorch", "onnx", "int8" -> task metrics
    int8_path: Path | None = None
    int8_ms: float | None = None
    int8_bytes: int | None = None

    def __str__(self) -> str:
        lines = [f"{self.onnx_path}: {self.onnx_bytes / 2**20:.2f} MiB, max |onnxruntime - PyTorch| = "
                 f"{self.max_abs_diff:.2e}",
                 f"per image: PyTorch {self.torch_ms:.1f} ms, onnxruntime {self.onnx_ms:.1f} ms"
                 + (f", INT8 {self.int8_ms:.1f} ms" if self.int8_ms is not None else "")]
        if self.int8_path is not None:
            lines.append(f"{self.int8_path}: {self.int8_bytes / 2**20:.2f} MiB "
                         f"({self.onnx_bytes / self.int8_bytes:.2f}x smaller)")
        for name, values in self.metrics.items():
            lines.append(f"{name:8s} " + ", ".join(f"{k.removeprefix('valid_')} {v:.4f}" for k, v in values.items()))
        return "\n".join(lines)


def export_run_onnx(run_dir: str | Path, out: str | Path, *, int8: bool = False, calibration_images: int = 128,
                    threads: int | None = None, score: bool = True) -> EdgeReport:
    """Merge the run's adapter, export ONNX to `out` (and `out` with .int8.onnx when `int8`), check, time and
    score (see the module docstring). Nothing is written if the export fails."""
    import lorakit
    from lorakit.formats import onnx as onnx_format
    from lorakit.tasks.base import compute_dtype
    from lorakit.tasks.vision_runs import load_vision_run

    model, task, _ = load_vision_run(run_dir)
    train, valid, _ = task.examples()
    before = task.evaluate(model, valid) if score and valid else None
    lorakit.merge_(model)  # exact: the dense ΔW folded into each conv; the head copy becomes the model's head
    size = getattr(task, "input_size", None) or (task.preprocess.size,) * 2
    out = Path(out)
    onnx_format.export_onnx(model, out, (1, 3, *size))
    probe = task.collate(valid[:4] or train[:4], compute_dtype(model), None)["images"]
    diff = onnx_format.check_onnx(out, model, probe)
    timing = onnx_format.latency(out, (1, 3, *size), model=model, threads=threads)
    report = EdgeReport(out, diff, timing.torch_ms, timing.onnx_ms, out.stat().st_size)
    if before is not None:
        report.metrics["pytorch"] = before
        report.metrics["onnx"] = task.evaluate(OnnxRuntimeModel(out, model, threads), valid)
    if int8:
        rows = train[:calibration_images]
        batches = [task.collate(rows[i:i + 16], torch.float32, None)["images"] for i in range(0, len(rows), 16)]
        int8_path = out.with_suffix(".int8.onnx")
        onnx_format.quantize_int8(out, int8_path, batches)
        report.int8_path, report.int8_bytes = int8_path, int8_path.stat().st_size
        report.int8_ms = onnx_format.latency(int8_path, (1, 3, *size), threads=threads).onnx_ms
        if before is not None:
            report.metrics["int8"] = task.evaluate(OnnxRuntimeModel(int8_path, model, threads), valid)
    return report

