"""Edge export of a LoRA-fine-tuned MobileNetV2-shaped CNN (3.5M parameters, 224x224, 1000 classes): LoRA on
every dense conv and the classifier, a few training steps so B != 0, `merge_`, ONNX export, the max |ORT − PyTorch|,
INT8 static quantization (QDQ, per-channel; activations uint8 / int8, 7-bit / 8-bit weights) calibrated on random
images, sizes, and per-image latency in onnxruntime fp32 / int8 against PyTorch eager, same thread count.

The network is MobileNetV2's layout (Sandler et al., 2018): a 3x3 stride-2 stem, 17 inverted residual blocks
(1x1 expand x t, 3x3 depthwise, 1x1 linear project; t, c, n, s as in the paper's Table 2), a 1x1 conv to 1280,
global average pooling and a linear classifier; Conv-BN-ReLU6 throughout. Weights are random (torchvision is not
installed here) with BatchNorm statistics measured on random images, so activations have unit scale; that
leaves the latency and size figures as with trained weights.

    PYTHONPATH=. python benchmarks/bench_onnx.py [--threads 2] [--batch 1] [--repeats 20] [--out /tmp/bench_onnx]
"""

import argparse
import time
from pathlib import Path

import torch
from torch import nn

import lorakit
from lorakit.formats.onnx import check_onnx, export_onnx, latency, quantize_int8, run_onnx


def conv_bn(c_in: int, c_out: int, k: int, stride: int = 1, groups: int = 1, act: bool = True) -> nn.Sequential:
    layers = [nn.Conv2d(c_in, c_out, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(c_out)]
    return nn.Sequential(*layers, nn.ReLU6()) if act else nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, t: int) -> None:
        super().__init__()
        hidden = c_in * t
        expand = [conv_bn(c_in, hidden, 1)] if t != 1 else []
        self.block = nn.Sequential(*expand, conv_bn(hidden, hidden, 3, stride, groups=hidden),
                                   conv_bn(hidden, c_out, 1, act=False))
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x) if self.residual else self.block(x)


class MobileNetV2(nn.Module):
    SETTINGS = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]

    def __init__(self, classes: int = 1000) -> None:
        super().__init__()
        layers, c = [conv_bn(3, 32, 3, 2)], 32
        for t, c_out, n, s in self.SETTINGS:
            for i in range(n):
                layers.append(InvertedResidual(c, c_out, s if i == 0 else 1, t))
                c = c_out
        layers.append(conv_bn(c, 1280, 1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(1280, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, 3, 224, 224) -> (N, classes)
        return self.classifier(self.features(x).mean((2, 3)))


def set_batchnorm_statistics(model: nn.Module, batches: list[torch.Tensor]) -> None:
    """BatchNorm running statistics as the average over `batches`. With the initial ones (mean 0, var 1) a randomly
    initialised network's activations shrink to ~1e-8 by the last block: denormal floats, unrealistic timings."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average
    model.train()
    with torch.no_grad():
        for batch in batches:
            model(batch)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = 0.1


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--calibration", type=int, default=8, help="calibration batches of 4 images")
    parser.add_argument("--out", default="/tmp/bench_onnx")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    model = MobileNetV2()
    set_batchnorm_statistics(model, [torch.randn(8, 3, 224, 224) for _ in range(4)])
    dense_convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.groups == 1]
    lorakit.inject_adapters(model, lorakit.LoraConfig(r=8, alpha=16, target_modules=[*dense_convs, "classifier"]))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for _ in range(2):  # B != 0, so the merge changes the weights
        loss = nn.functional.cross_entropy(model(torch.randn(4, 3, 224, 224)), torch.randint(0, 1000, (4,)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    merged = lorakit.merge_(model)
    model.eval()
    print(f"MobileNetV2: {sum(p.numel() for p in model.parameters()):,} parameters, {len(merged)} layers merged")

    start = time.perf_counter()
    report = export_onnx(model, out / "mobilenet_v2.onnx", (args.batch, 3, 224, 224))
    print(f"export {time.perf_counter() - start:.1f} s: {report}")
    images = torch.randn(4, 3, 224, 224)
    print(f"max |ORT fp32 - PyTorch| = {check_onnx(report.path, model, images):.2e}")

    shape = (args.batch, 3, 224, 224)
    fp32_lat = latency(report.path, shape, model=model, threads=args.threads, repeats=args.repeats)
    print(f"fp32: {fp32_lat}")
    calibration = [torch.randn(4, 3, 224, 224) for _ in range(args.calibration)]
    with torch.no_grad():
        fp32 = model(images)
    for activation_type, reduce_range in (("uint8", True), ("uint8", False), ("int8", True), ("int8", False)):
        start = time.perf_counter()
        q = quantize_int8(report.path, out / f"mobilenet_v2.{activation_type}.{reduce_range}.onnx", calibration,
                          activation_type=activation_type, reduce_range=reduce_range)
        seconds = time.perf_counter() - start
        int8 = torch.from_numpy(run_onnx(q.path, images)[0])
        print(f"int8 activations {activation_type}, reduce_range={reduce_range}: {latency(q.path, shape, threads=args.threads, repeats=args.repeats)}; "
              f"logits max |int8 - fp32| {float((int8 - fp32).abs().max()):.3f} (max |fp32| {float(fp32.abs().max()):.2f}); "
              f"quantized in {seconds:.1f} s; {q}")


if __name__ == "__main__":
    main()
