"""ONNX edge export (`lorakit.formats.onnx`): a LoRA-fine-tuned, merged CNN exports to ONNX, runs in onnxruntime
with the same outputs as PyTorch, and quantizes to INT8 with a small, stated accuracy drop.

The stand-in is a MobileNet-style CNN (Conv-BN-ReLU6 stem, depthwise + pointwise block, linear head) trained in
full for a second on a toy 4-class problem (stripes of four orientations under noise), then LoRA-fine-tuned on
its dense convs (grouped convs take no adapter) with the head trained in full (`modules_to_save`), so B != 0, then
merged with `lorakit.merge_`.

Tolerances: fp32 ORT vs PyTorch <= 1e-4 (measured ~1e-6: summation order only; the base weights instead of the
merged ones are off by > 1e-2, checked in the fixture). INT8 accuracy within 2 points of fp32 on 2048 test images
(measured |drop| < 0.5 points; 0.5 points lost with full-range 8-bit weights, see `lorakit.formats.onnx`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from torch import nn

pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
pytest.importorskip("onnxruntime")

import lorakit  # noqa: E402
from lorakit.formats.onnx import check_onnx, export_onnx, latency, quantize_int8, run_onnx  # noqa: E402

FP32_ATOL = 1e-4
INT8_MAX_DROP = 0.02  # accuracy (fraction of 2048 test images) INT8 may lose against fp32; measured |drop| < 0.005
IMAGE = 16
CLASSES = 4
NOISE = 2.5  # noise std against stripes of amplitude 0.5-1.5: fp32 accuracy ~0.93, not a trivial 1.0


def stripes(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n RGB images (n, 3, IMAGE, IMAGE) of sine stripes at 0, 45, 90 or 135 degrees (the label), random
    frequency, phase and colour, plus Gaussian noise of the stripes' amplitude."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, CLASSES, (n,), generator=g)
    angle = labels.float() * math.pi / CLASSES
    freq = 0.5 + torch.rand(n, generator=g)
    phase = 2 * math.pi * torch.rand(n, generator=g)
    ys, xs = torch.meshgrid(torch.arange(IMAGE).float(), torch.arange(IMAGE).float(), indexing="ij")
    along = xs * torch.cos(angle)[:, None, None] + ys * torch.sin(angle)[:, None, None]  # (n, H, W)
    wave = torch.sin(freq[:, None, None] * along + phase[:, None, None])
    colour = torch.rand(n, 3, 1, 1, generator=g) + 0.5
    images = colour * wave[:, None] + NOISE * torch.randn(n, 3, IMAGE, IMAGE, generator=g)
    return images, labels


class TinyMobileNet(nn.Module):
    """(N, 3, 16, 16) -> (N, classes): Conv-BN-ReLU6 stem (stride 2), depthwise 3x3 + pointwise 1x1 block, mean pool, Linear."""

    def __init__(self, width: int = 32, classes: int = CLASSES) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 2, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU6())
        self.depthwise = nn.Sequential(nn.Conv2d(width, width, 3, 1, 1, groups=width, bias=False), nn.BatchNorm2d(width), nn.ReLU6())
        self.pointwise = nn.Sequential(nn.Conv2d(width, 2 * width, 1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU6())
        self.head = nn.Linear(2 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pointwise(self.depthwise(self.stem(x))).mean((2, 3)))


class TinyDetector(nn.Module):
    """A YOLO-shaped stand-in: a backbone and two 1x1 head convs at strides 2 and 4; returns a list of maps."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.LeakyReLU(0.1))
        self.down = nn.Sequential(nn.Conv2d(16, 32, 3, 2, 1), nn.BatchNorm2d(32), nn.LeakyReLU(0.1))
        self.head_p2 = nn.Conv2d(16, 3 * (5 + CLASSES), 1)
        self.head_p4 = nn.Conv2d(32, 3 * (5 + CLASSES), 1)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        p2 = self.backbone(x)
        return [self.head_p2(p2), self.head_p4(self.down(p2))]


def train(model: nn.Module, steps: int, lr: float, seed: int) -> None:
    """AdamW on batches of 32 stripes. One thread: as fast on these tiny batches, and two threads stall
    (five times slower, measured) when other processes hold the second core."""
    images, labels = stripes(steps * 32, seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model.train()
    try:
        for x, y in zip(images.split(32), labels.split(32)):
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        model.eval()
        torch.set_num_threads(threads)


def lora_config() -> lorakit.LoraConfig:
    """LoRA on the dense convs (grouped convs take no adapter); the classifier head trained in full, as for new classes."""
    return lorakit.LoraConfig(r=4, alpha=8, target_modules=["stem.0", "pointwise.0"], modules_to_save=["head"])


@dataclass
class FineTuned:
    model: nn.Module       # merged: plain Conv2d / Linear layers again
    probe: torch.Tensor    # (4, 3, IMAGE, IMAGE)
    tuned: torch.Tensor    # logits of the adapted model on `probe`, before the merge
    base: torch.Tensor     # logits of the base model (adapters disabled) on `probe`


@pytest.fixture(scope="module")
def fine_tuned() -> FineTuned:
    """TinyMobileNet: 80 full steps, then LoRA on its dense convs plus a trained copy of the head for 20 steps,
    merged (2-3 s on one core)."""
    torch.manual_seed(0)
    model = TinyMobileNet()
    train(model, steps=80, lr=3e-3, seed=1)
    lorakit.inject_adapters(model, lora_config())
    train(model, steps=20, lr=3e-3, seed=2)
    probe = stripes(4, seed=5)[0]
    with torch.no_grad():
        tuned = model(probe)
        with lorakit.disable_adapters(model):
            base = model(probe)
    assert float((tuned - base).abs().max()) > 1e-2  # B != 0: the adapter changed the model
    assert lorakit.merge_(model) == ["stem.0", "pointwise.0"]
    assert type(model.stem[0]) is nn.Conv2d and type(model.head) is nn.Linear
    return FineTuned(model, probe, tuned, base)


@pytest.fixture(scope="module")
def exported(fine_tuned, tmp_path_factory):
    return export_onnx(fine_tuned.model, tmp_path_factory.mktemp("onnx") / "model.onnx", (1, 3, IMAGE, IMAGE))


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(1) == labels).float().mean())


def test_export_computes_the_fine_tuned_model(fine_tuned, exported):
    assert exported.input_shape == ("batch", 3, IMAGE, IMAGE)
    assert exported.output_names == ["output"] and exported.output_shapes == [("batch", CLASSES)]
    assert "BatchNormalization" not in exported.op_counts  # folded into the convs
    assert exported.op_counts["Conv"] == 3 and exported.size_bytes == exported.path.stat().st_size
    got = torch.from_numpy(run_onnx(exported.path, fine_tuned.probe)[0])
    assert float((got - fine_tuned.tuned).abs().max()) <= FP32_ATOL  # the merged weights, not the base's
    for batch in (1, 5):  # the batch dimension is dynamic
        assert check_onnx(exported.path, fine_tuned.model, torch.randn(batch, 3, IMAGE, IMAGE)) <= FP32_ATOL


def test_export_in_training_mode_uses_eval_batchnorm_and_restores_the_flags(fine_tuned, tmp_path):
    model = fine_tuned.model
    statistics = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    model.train()
    try:
        report = export_onnx(model, tmp_path / "model.onnx", (2, 3, IMAGE, IMAGE), dynamic_batch=False)
        assert all(m.training for m in model.modules())
        assert all(torch.equal(model.state_dict()[k], v) for k, v in statistics.items())  # no train-mode forward ran
        assert check_onnx(report.path, model, torch.randn(2, 3, IMAGE, IMAGE)) <= FP32_ATOL  # eval-mode BN on both sides
        assert all(m.training for m in model.modules())
    finally:
        model.eval()
    assert report.input_shape == (2, 3, IMAGE, IMAGE)
    with pytest.raises(ValueError, match=r"shape \(3, 3, 16, 16\).*takes \(2, 3, 16, 16\)"):
        run_onnx(report.path, torch.randn(3, 3, IMAGE, IMAGE))


def test_refuses_unmerged_adapters(tmp_path):
    torch.manual_seed(0)
    model = TinyMobileNet()
    lorakit.inject_adapters(model, lora_config())
    with pytest.raises(ValueError, match=r"unmerged adapters \(3 modules: stem.0, pointwise.0, head\).*lorakit.merge_"):
        export_onnx(model, tmp_path / "model.onnx", (1, 3, IMAGE, IMAGE))
    assert list(tmp_path.iterdir()) == []


def test_several_outputs(tmp_path):
    torch.manual_seed(0)
    model = TinyDetector().eval()
    lorakit.inject_adapters(model, lorakit.LoraConfig(r=2, target_modules=["head_p2", "head_p4"]))
    with torch.no_grad():
        for layer in (model.head_p2, model.head_p4):
            layer.lora["default"].B.normal_(std=0.1)
    lorakit.merge_(model)
    with pytest.raises(ValueError, match="returns 2 tensor"):
        export_onnx(model, tmp_path / "bad.onnx", (1, 3, IMAGE, IMAGE), output_names=["only_one"])
    report = export_onnx(model, tmp_path / "det.onnx", (1, 3, IMAGE, IMAGE), output_names=["p2", "p4"])
    assert report.output_names == ["p2", "p4"]
    assert report.output_shapes == [("batch", 27, 8, 8), ("batch", 27, 4, 4)]
    assert check_onnx(report.path, model, torch.randn(2, 3, IMAGE, IMAGE)) <= FP32_ATOL


class BoxesAndScores(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        y = self.conv(x)
        return {"boxes": y, "scores": y.mean((2, 3))}


def test_dict_outputs_name_the_graph_outputs(tmp_path):
    model = BoxesAndScores().eval()
    report = export_onnx(model, tmp_path / "dict.onnx", (1, 3, 8, 8))
    assert report.output_names == ["boxes", "scores"]
    assert report.output_shapes == [("batch", 4, 6, 6), ("batch", 4)]
    assert check_onnx(report.path, model, torch.randn(3, 3, 8, 8)) <= FP32_ATOL


class DataDependent(nn.Module):
    """Runs in eager mode but cannot be exported: the branch depends on the input's values."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return y if y.sum() > 0 else -y


def test_failed_export_keeps_the_existing_file(tmp_path):
    target = tmp_path / "model.onnx"
    target.write_bytes(b"the previous export")
    with pytest.raises(torch.onnx.OnnxExporterError, match="torch.export"):
        export_onnx(DataDependent(), target, (1, 3, IMAGE, IMAGE))
    assert target.read_bytes() == b"the previous export"
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]  # no temporary file left


def test_bad_inputs_are_clear_errors(fine_tuned, tmp_path):
    model = fine_tuned.model
    with pytest.raises(ValueError, match=r"input_shape=\(3, 0, 16\)"):
        export_onnx(model, tmp_path / "m.onnx", (3, 0, 16))
    with pytest.raises(ValueError, match="opset=13"):
        export_onnx(model, tmp_path / "m.onnx", (1, 3, IMAGE, IMAGE), opset=13)
    with pytest.raises(ValueError, match=r"torch.float16: export a float32 model \(model.float\(\)\)"):
        export_onnx(TinyMobileNet().half(), tmp_path / "m.onnx", (1, 3, IMAGE, IMAGE))
    nf4 = TinyMobileNet()
    lorakit.quantize_(nf4, lorakit.NF4Config(target_modules=["head"]))
    with pytest.raises(ValueError, match=r"head has a lorakit-quantized weight.*lorakit.dequantize_\(model\)"):
        export_onnx(nf4, tmp_path / "m.onnx", (1, 3, IMAGE, IMAGE))
    with pytest.raises(FileNotFoundError, match="ONNX model not found"):
        check_onnx(tmp_path / "missing.onnx", model, torch.randn(1, 3, IMAGE, IMAGE))
    (tmp_path / "junk.onnx").write_bytes(b"not a protobuf")
    with pytest.raises(ValueError, match="onnxruntime cannot load"):
        run_onnx(tmp_path / "junk.onnx", torch.randn(1, 3, IMAGE, IMAGE))
    assert not (tmp_path / "m.onnx").exists()


def test_int8_keeps_accuracy(fine_tuned, exported, tmp_path, monkeypatch):
    calibration = stripes(256, seed=3)[0].split(32)
    monkeypatch.chdir(tmp_path)  # onnxruntime's shape inference once left its temporaries in the working directory
    report = quantize_int8(exported.path, tmp_path / "model.int8.onnx", calibration)
    assert [p.name for p in tmp_path.iterdir()] == ["model.int8.onnx"]  # no temporary or side file left
    assert report.calibration_batches == 8 and report.activation_type == "uint8"
    assert report.quantized_ops == {"Conv": 3, "Gemm": 1, "ReduceMean": 1} and report.float_ops == {}
    kept = quantize_int8(exported.path, tmp_path / "kept.int8.onnx", calibration, float_outputs=True)
    assert kept.float_ops == {"Gemm": 1} and kept.quantized_ops == {"Conv": 3, "ReduceMean": 1}  # the output layer
    (tmp_path / "kept.int8.onnx").unlink()
    images, labels = stripes(2048, seed=4)
    with torch.no_grad():
        fp32 = accuracy(fine_tuned.model(images), labels)
    int8 = accuracy(torch.from_numpy(run_onnx(report.path, images)[0]), labels)
    print(f"fp32 accuracy {fp32:.3f}, int8 {int8:.3f}, drop {fp32 - int8:+.3f}; {report}")
    assert fp32 > 0.85  # the toy problem was learned, so the comparison means something
    assert fp32 - int8 <= INT8_MAX_DROP


class WideConvNet(nn.Module):
    """Dense 3x3 convs with many inputs per output channel, where weights (not per-channel scales) fill the file."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 64, 3, 2, 1), nn.ReLU6(), nn.Conv2d(64, 128, 3, 1, 1), nn.ReLU6(),
                                      nn.Conv2d(128, 128, 3, 1, 1), nn.ReLU6())
        self.head = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean((2, 3)))


def test_int8_is_four_times_smaller(tmp_path):
    torch.manual_seed(0)
    path = export_onnx(WideConvNet().eval(), tmp_path / "wide.onnx", (1, 3, 8, 8)).path
    report = quantize_int8(path, tmp_path / "wide.int8.onnx", [torch.randn(4, 3, 8, 8) for _ in range(2)])
    assert report.weight_ratio > 3.8, report  # int8 weights; a scale, a zero point and an int32 bias per channel
    assert report.ratio > 3.6, report         # the file: weights plus graph
    assert report.quantized_ops["Conv"] == 3 and report.quantized_ops["Gemm"] == 1


def test_int8_refuses_empty_or_misshaped_calibration(exported, tmp_path):
    out = tmp_path / "model.int8.onnx"
    with pytest.raises(ValueError, match="calibration_inputs is empty"):
        quantize_int8(exported.path, out, [])
    with pytest.raises(ValueError, match=r"calibration batch 1 has shape \(2, 3, 8, 8\)"):
        quantize_int8(exported.path, out, [torch.randn(2, 3, IMAGE, IMAGE), torch.randn(2, 3, 8, 8)])
    with pytest.raises(ValueError, match="method='kl'"):
        quantize_int8(exported.path, out, [torch.randn(2, 3, IMAGE, IMAGE)], method="kl")
    with pytest.raises(ValueError, match="is the float model itself"):
        quantize_int8(exported.path, exported.path, [torch.randn(2, 3, IMAGE, IMAGE)])
    assert not out.exists()


def test_latency_reports_both_runtimes(fine_tuned, exported):
    report = latency(exported.path, (4, 3, IMAGE, IMAGE), model=fine_tuned.model, threads=1, repeats=3, warmup=1)
    assert report.batch == 4 and report.threads == 1
    assert 0 < report.onnx_ms < 1e3 and 0 < report.torch_ms < 1e3
    assert latency(exported.path, (1, 3, IMAGE, IMAGE), repeats=1).torch_ms is None
    with pytest.raises(ValueError, match="threads=0"):
        latency(exported.path, (1, 3, IMAGE, IMAGE), threads=0)
