"""Adapter layers, one table row per supported layer type: init, merge/unmerge, disable, switching.

Each row wraps one layer in `Single` (target name "layer") so the same test runs on every type.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

import lorakit
from tiny_models import (
    FP32_ATOL, MIN_ADAPTER_EFFECT, fresh, image_inputs, logits, max_diff, randomise_trainable_, tiny_bert,
    tiny_convnet, tiny_gpt2, tiny_llama, token_inputs,
)

R, ALPHA = 4, 8
TARGET = ["layer"]


class Single(nn.Module):
    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


def gpt2_conv1d(nf: int, nx: int) -> nn.Module:
    pytorch_utils = pytest.importorskip("transformers.pytorch_utils")
    layer = pytorch_utils.Conv1D(nf, nx)  # y = x @ W + b, W: (nx=in, nf=out)
    nn.init.normal_(layer.weight, std=0.2)
    nn.init.normal_(layer.bias, std=0.2)
    return layer


@dataclass(frozen=True)
class LayerCase:
    id: str
    make: Callable[[], nn.Module]
    input: Callable[[torch.Generator], torch.Tensor]
    lora_params: int  # r * (fan_in + fan_out) at r = R: A is (r, fan_in), B is (fan_out, r)
    pissa: bool = False  # linear kinds: PiSSA must work here (PEFT supports it on these)
    dilated: bool = False  # PEFT cannot adapt a dilated conv (see PEFT_DILATION)


LAYERS = [
    LayerCase("linear", lambda: nn.Linear(16, 12), lambda g: torch.randn(3, 16, generator=g), R * (16 + 12), True),
    LayerCase("linear-no-bias", lambda: nn.Linear(16, 12, bias=False),
              lambda g: torch.randn(2, 5, 16, generator=g), R * (16 + 12), True),
    LayerCase("embedding", lambda: nn.Embedding(20, 12), lambda g: torch.randint(0, 20, (3, 5), generator=g),
              R * (20 + 12)),
    LayerCase("conv1d", lambda: nn.Conv1d(4, 6, 3, stride=2, padding=1),
              lambda g: torch.randn(2, 4, 17, generator=g), R * (4 * 3 + 6)),
    LayerCase("conv1d-dilation", lambda: nn.Conv1d(4, 6, 3, stride=2, padding=1, dilation=2),
              lambda g: torch.randn(2, 4, 17, generator=g), R * (4 * 3 + 6), dilated=True),
    LayerCase("conv2d", lambda: nn.Conv2d(3, 8, 3, padding=1), lambda g: torch.randn(2, 3, 9, 9, generator=g),
              R * (3 * 3 * 3 + 8)),
    LayerCase("conv2d-stride-pad-dilation", lambda: nn.Conv2d(3, 8, (3, 2), stride=(2, 1), padding=(2, 1), dilation=(2, 1)),
              lambda g: torch.randn(2, 3, 11, 10, generator=g), R * (3 * 3 * 2 + 8), dilated=True),
    LayerCase("conv2d-1x1-no-bias", lambda: nn.Conv2d(6, 5, 1, bias=False),
              lambda g: torch.randn(2, 6, 4, 4, generator=g), R * (6 + 5)),
    LayerCase("gpt2-conv1d", lambda: gpt2_conv1d(12, 16), lambda g: torch.randn(3, 5, 16, generator=g),
              R * (16 + 12), True),
]
LAYER_IDS = [c.id for c in LAYERS]


def build(case: LayerCase, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(seed)
    model = Single(case.make()).eval()
    return model, case.input(torch.Generator().manual_seed(seed + 1))


def config(**kw) -> lorakit.LoraConfig:
    return lorakit.LoraConfig(**{"r": R, "alpha": ALPHA, "target_modules": TARGET, **kw})


@torch.no_grad()
def run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model.eval()(x)


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return max_diff(a, b) / b.abs().max().item()


def injected(case: LayerCase, **kw) -> tuple[nn.Module, nn.Module, torch.Tensor]:
    """(base, model with a randomised adapter, input)."""
    base, x = build(case)
    model = fresh(base)
    assert lorakit.inject_adapters(model, config(**kw)) == ["layer"]
    randomise_trainable_(model, std=0.1)
    assert max_diff(run(model, x), run(base, x)) > MIN_ADAPTER_EFFECT, "adapter has no effect: test is vacuous"
    return base, model, x


@pytest.mark.parametrize("case", LAYERS, ids=LAYER_IDS)
def test_fresh_adapter_gives_exactly_the_base_output(case: LayerCase):
    base, x = build(case)
    model = fresh(base)
    lorakit.inject_adapters(model, config())
    assert torch.equal(run(model, x), run(base, x))


@pytest.mark.parametrize("case", LAYERS, ids=LAYER_IDS)
def test_base_state_dict_keys_and_values_unchanged(case: LayerCase):
    base, _ = build(case)
    model = fresh(base)
    lorakit.inject_adapters(model, config())
    before, after = base.state_dict(), model.state_dict()
    assert set(before) <= set(after), f"base keys renamed: missing {sorted(set(before) - set(after))}"
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("case", LAYERS, ids=LAYER_IDS)
def test_merge_gives_same_output_and_plain_layer(case: LayerCase):
    base, model, x = injected(case)
    expected = run(model, x)
    assert lorakit.merge_(model) == ["layer"]
    assert type(model.layer) is type(base.layer), f"merged layer is {type(model.layer).__name__}"
    assert rel_diff(run(model, x), expected) <= 1e-5
    assert set(model.state_dict()) == set(base.state_dict())


@pytest.mark.parametrize("case", LAYERS, ids=LAYER_IDS)
def test_unmerge_restores_adapter_and_original_weights(case: LayerCase):
    base, model, x = injected(case)
    expected = run(model, x)
    lorakit.merge_(model)
    assert lorakit.unmerge_(model) == ["layer"]
    assert type(model.layer) is not type(base.layer), "unmerge_ left a plain layer"
    restored = model.state_dict()
    for key, value in base.state_dict().items():
        assert max_diff(restored[key], value) <= 1e-6, key
    assert rel_diff(run(model, x), expected) <= 1e-5
    assert lorakit.active_adapter(model) == "default"


MODELS = [  # whole models: tied embeddings, modules_to_save, several adapted layers at once
    ("llama-all-linear-embedding", tiny_llama, token_inputs,
     dict(target_modules=r".*(embed_tokens|_proj)")),
    ("gpt2-tied-wte", tiny_gpt2, token_inputs, dict(target_modules=["wte", "c_attn", "c_fc"])),
    ("bert-modules-to-save", tiny_bert, token_inputs,
     dict(target_modules=["query", "value"], modules_to_save=["classifier"], bias="lora_only")),
    ("convnet", tiny_convnet, image_inputs, dict(target_modules=["conv1", "conv2", "head"])),
]


@pytest.mark.parametrize("build_model, inputs, kw", [m[1:] for m in MODELS], ids=[m[0] for m in MODELS])
def test_merge_and_unmerge_whole_model(build_model, inputs, kw):
    """merge_ leaves a plain model with the base's keys and the adapter's logits; unmerge_ undoes it.

    GPT-2 ties `wte` to `lm_head`: merging wte's adapter must not change the head's weight.
    """
    base, x = build_model(), inputs()
    model = fresh(base)
    lorakit.inject_adapters(model, lorakit.LoraConfig(r=R, alpha=ALPHA, **kw))
    randomise_trainable_(model)
    expected = logits(model, x)
    assert max_diff(expected, logits(base, x)) > MIN_ADAPTER_EFFECT

    lorakit.merge_(model)
    assert rel_diff(logits(model, x), expected) <= 1e-5
    assert set(model.state_dict()) == set(base.state_dict())
    foreign = {type(m).__qualname__ for m in model.modules() if type(m).__module__.startswith("lorakit")}
    assert not foreign, f"merged model still has lorakit modules: {foreign}"

    lorakit.unmerge_(model)
    assert rel_diff(logits(model, x), expected) <= 1e-5
    restored = model.state_dict()
    trained = {n for n, p in model.named_parameters() if p.requires_grad}  # bias="lora_only" trains base biases
    for key, value in base.state_dict().items():
        if key not in trained:
            assert max_diff(restored[key], value) <= 1e-6, key


def test_disable_adapters_also_restores_modules_to_save():
    base, x = tiny_bert(), token_inputs()
    model = fresh(base)
    lorakit.inject_adapters(model, lorakit.LoraConfig(r=R, alpha=ALPHA, target_modules=["query"], modules_to_save=["classifier"]))
    randomise_trainable_(model)
    assert max_diff(logits(model, x), logits(base, x)) > MIN_ADAPTER_EFFECT
    with lorakit.disable_adapters(model):
        assert torch.equal(logits(model, x), logits(base, x))


@pytest.mark.parametrize("case", LAYERS, ids=LAYER_IDS)
def test_disable_adapters_gives_exactly_the_base_output(case: LayerCase):
    base, model, x = injected(case)
    expected = run(model, x)
    with lorakit.disable_adapters(model):
        assert torch.equal(run(model, x), run(base, x))
    assert torch.equal(run(model, x), expected), "adapter not re-enabled on exit"


def _peft_version() -> tuple[int, ...]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return tuple(int(part) for part in version("peft").split(".")[:2])
    except (PackageNotFoundError, ValueError):
        return (0,)


PEFT_DILATION = pytest.mark.xfail(
    _peft_version() < (0, 22), raises=RuntimeError, strict=True,
    reason="PEFT before 0.22 builds a conv's lora_A without the base's dilation (peft/tuners/lora/layer.py, "
    "_ConvNd.update_layer), so its forward does not fit a dilated conv; lorakit keeps the dilation (exact merge); "
    "PEFT 0.22 fixed it")


@pytest.mark.parametrize("case", [pytest.param(c, marks=PEFT_DILATION) if c.dilated else c for c in LAYERS], ids=LAYER_IDS)
def test_adapter_matches_peft_both_ways(case: LayerCase, tmp_path: Path):
    """The same layer's adapter, saved by one library and loaded by the other, computes the same."""
    peft = pytest.importorskip("peft")
    base, model, x = injected(case)
    expected = run(model, x)
    lorakit.save_adapter(model, tmp_path / "lorakit")
    assert max_diff(run(peft.PeftModel.from_pretrained(fresh(base), tmp_path / "lorakit"), x), expected) <= FP32_ATOL

    extra = {"fan_in_fan_out": True} if case.id == "gpt2-conv1d" else {}
    peft_model = peft.get_peft_model(fresh(base), peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=TARGET, **extra))
    randomise_trainable_(peft_model, std=0.1)
    expected = run(peft_model, x)
    peft_model.save_pretrained(tmp_path / "peft")
    other = fresh(base)
    lorakit.load_adapter(other, tmp_path / "peft")
    assert max_diff(run(other, x), expected) <= FP32_ATOL


@pytest.mark.parametrize("case", LAYERS, ids=LAYER_IDS)
def test_gaussian_init_starts_at_the_base(case: LayerCase):
    base, x = build(case)
    model = fresh(base)
    lorakit.inject_adapters(model, config(init="gaussian"))
    assert torch.equal(run(model, x), run(base, x))
    new = [p for n, p in model.named_parameters() if n not in base.state_dict()]
    assert any(p.abs().sum() > 0 for p in new), "gaussian init left every adapter matrix at zero"


def test_gaussian_init_draws_a_with_std_one_over_r():
    """PEFT's "gaussian": A ~ N(0, 1/r^2) (Kaiming-uniform A would have std 1/sqrt(3 * in) = 0.07 here)."""
    r = 2
    model = tiny_llama()
    base_keys = set(model.state_dict())
    lorakit.inject_adapters(model, lorakit.LoraConfig(r=r, alpha=4, target_modules=["q_proj", "v_proj"], init="gaussian"))
    a = torch.cat([p.flatten() for n, p in model.named_parameters() if n not in base_keys and p.abs().sum() > 0])
    assert a.numel() == 4 * r * 64  # four A matrices (r x 64); the four B are zero
    assert 0.8 / r < a.std().item() < 1.2 / r


@pytest.mark.parametrize("case", LAYERS, ids=LAYER_IDS)
def test_pissa_starts_at_the_base(case: LayerCase):
    """PiSSA moves the top-r singular directions of W into B A; W + scaling B A must still equal W."""
    base, x = build(case)
    model = fresh(base)
    try:
        lorakit.inject_adapters(model, config(init="pissa"))
    except ValueError as e:
        assert not case.pissa, f"PiSSA refused on a linear layer: {e}"
        assert "pissa" in str(e).lower()
        return
    assert max_diff(run(model, x), run(base, x)) <= FP32_ATOL
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if n not in base.state_dict())


@pytest.mark.parametrize("case", [c for c in LAYERS if c.pissa], ids=[c.id for c in LAYERS if c.pissa])
def test_pissa_adapter_applies_to_the_original_base_in_peft(case: LayerCase, tmp_path: Path):
    peft = pytest.importorskip("peft")
    base, x = build(case)
    model = fresh(base)
    lorakit.inject_adapters(model, config(init="pissa"))
    randomise_trainable_(model, std=0.1)  # stands in for training
    expected = run(model, x)
    lorakit.save_adapter(model, tmp_path)
    peft_model = peft.PeftModel.from_pretrained(fresh(base), tmp_path)
    assert max_diff(run(peft_model, x), expected) <= FP32_ATOL


@pytest.mark.parametrize("case", LAYERS, ids=LAYER_IDS)
def test_set_active_switches_between_named_adapters(case: LayerCase):
    base, x = build(case)
    model = fresh(base)
    lorakit.inject_adapters(model, config(), name="first")
    randomise_trainable_(model, seed=1, std=0.1)
    lorakit.inject_adapters(model, config(r=2, alpha=2), name="second")
    randomise_trainable_(model, seed=2, std=0.1)
    assert sorted(lorakit.adapter_names(model)) == ["first", "second"]

    outputs = {}
    for name in ["first", "second"]:
        lorakit.set_active(model, name)
        assert lorakit.active_adapter(model) == name
        assert lorakit.parameter_report(model).active == name
        outputs[name] = run(model, x)
    assert max_diff(outputs["first"], outputs["second"]) > MIN_ADAPTER_EFFECT
    lorakit.set_active(model, "first")
    assert torch.equal(run(model, x), outputs["first"])


def test_set_active_is_fast_and_saved_adapters_match(tmp_path: Path):
    """Switching is a pointer change, not a weight rewrite; each saved adapter is the one that ran."""
    base = tiny_llama()
    inputs = token_inputs()
    model = fresh(base)
    for seed, name in enumerate(["first", "second"]):
        lorakit.inject_adapters(model, lorakit.LoraConfig(r=4, alpha=8, target_modules="all-linear"), name=name)
        randomise_trainable_(model, seed=seed)
    for name in ["first", "second", "first"]:
        start = time.perf_counter()
        lorakit.set_active(model, name)
        assert time.perf_counter() - start < 0.5
        report = lorakit.parameter_report(model)
        assert report.active == name and name in str(report)
        expected = logits(model, inputs)
        lorakit.save_adapter(model, tmp_path / name, name=name)
        other = fresh(base)
        lorakit.load_adapter(other, tmp_path / name)
        assert max_diff(logits(other, inputs), expected) <= FP32_ATOL


def test_unmatched_target_lists_candidate_names():
    model = tiny_llama()
    with pytest.raises(ValueError) as err:
        lorakit.inject_adapters(model, lorakit.LoraConfig(target_modules=["q_projj"]))
    assert "q_proj" in str(err.value) and "v_proj" in str(err.value)
    assert all(type(m).__module__.startswith(("torch", "transformers")) for m in model.modules()), "model changed"


@pytest.mark.parametrize("bias", ["none", "lora_only"])
@pytest.mark.parametrize("case", LAYERS, ids=LAYER_IDS)
def test_only_adapters_are_trainable_and_report_counts(case: LayerCase, bias: str):
    base, _ = build(case)
    model = fresh(base)
    lorakit.inject_adapters(model, config(bias=bias))
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    base_trainable = {n for n in trainable if n in base.state_dict()}
    layer_bias = ["layer.bias"] if bias == "lora_only" and getattr(base.layer, "bias", None) is not None else []
    assert sorted(base_trainable) == layer_bias
    assert sum(trainable.values()) == case.lora_params + sum(base.state_dict()[n].numel() for n in layer_bias)
    check_report(model)


def test_only_adapters_modules_to_save_and_lora_biases_are_trainable():
    model = tiny_bert()
    base_keys = set(model.state_dict())
    lorakit.inject_adapters(model, lorakit.LoraConfig(r=8, alpha=16, target_modules=["query", "value"],
                                                      modules_to_save=["classifier"], bias="lora_only"))
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    base_trainable = {n for n in trainable if n in base_keys}
    lora_biases = {f"bert.encoder.layer.{i}.attention.self.{m}.bias" for i in range(2) for m in ["query", "value"]}
    assert base_trainable <= lora_biases | {"classifier.weight", "classifier.bias"}
    assert lora_biases <= base_trainable
    extra = {n for n in trainable if n not in base_keys}
    assert all("classifier" in n or "lora" in n.lower() for n in extra), sorted(extra)
    lora = 4 * 8 * (64 + 64)  # 2 layers x {query, value}, A (8 x 64) + B (64 x 8)
    assert sum(trainable.values()) == lora + 4 * 64 + (3 * 64 + 3)
    check_report(model)


def check_report(model: nn.Module) -> None:
    report = lorakit.parameter_report(model)
    params = list(model.parameters())  # deduplicates tied weights
    trainable = sum(p.numel() for p in params if p.requires_grad)
    total = sum(p.numel() for p in params)
    assert (report.trainable, report.total) == (trainable, total)
    assert math.isclose(report.percent, 100 * trainable / total, rel_tol=1e-9)
    assert report.active == "default"
    text = str(report)
    assert f"{trainable:,}" in text or str(trainable) in text, text


class SamePadConv2d(nn.Conv2d):
    """A conv that pads in its own forward, TensorFlow's "SAME" (as EfficientNet's Conv2dStaticSamePadding):
    out = ceil(in / stride), the extra pad on the bottom/right."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size, k, s in zip(x.shape[:1:-1], self.kernel_size[::-1], self.stride[::-1]):  # (W, H) order for F.pad
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        return nn.functional.conv2d(nn.functional.pad(x, pads), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def test_a_conv_that_pads_in_forward_gets_the_same_padding_for_its_adapter():
    """The update must be conv(pad(x), ΔW): computed through the layer's own forward, not _conv_forward (no pad)."""
    torch.manual_seed(0)
    base = Single(SamePadConv2d(3, 8, 3, stride=2))
    x = torch.randn(2, 3, 9, 9, generator=torch.Generator().manual_seed(1))
    model = fresh(base)
    lorakit.inject_adapters(model, config())
    assert torch.equal(run(model, x), run(base, x))
    randomise_trainable_(model, std=0.1)
    layer = model.layer
    with torch.no_grad():
        dense = fresh(base)
        dense.layer.weight += layer.delta_weight()
    expected = run(dense, x)  # (2, 8, 5, 5): SAME padding keeps ceil(9 / 2)
    assert expected.shape == (2, 8, 5, 5)
    assert max_diff(run(model, x), expected) <= FP32_ATOL
    lorakit.merge_(model)
    assert type(model.layer) is SamePadConv2d
    assert max_diff(run(model, x), expected) <= FP32_ATOL


def test_grouped_convs_are_refused_naming_them_and_leaving_the_model_unchanged():
    model = nn.Sequential(nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 3, groups=4))
    with pytest.raises(ValueError, match=r"grouped convs \['1'\].*modules_to_save"):
        lorakit.inject_adapters(model, lorakit.LoraConfig(r=2, target_modules=["0", "1"]))
    assert [type(m) for m in model] == [nn.Conv2d, nn.Conv2d]


def test_modules_to_save_refuses_containers_and_nesting_leaving_the_model_unchanged():
    class Stack(nn.Module):  # like Darknet: a ModuleList iterated by the parent's forward
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU()), nn.Conv2d(4, 2, 1)])

    model = Stack()
    with pytest.raises(ValueError, match=r"\['layers'\], a container with no forward"):
        lorakit.inject_adapters(model, lorakit.LoraConfig(target_modules=[], modules_to_save=["layers"]))
    with pytest.raises(ValueError, match=r"'layers\.0\.0' inside 'layers\.0'"):
        lorakit.inject_adapters(model, lorakit.LoraConfig(target_modules=[], modules_to_save=["layers.0", "layers.0.0"]))
    assert [type(m) for m in model.layers] == [nn.Sequential, nn.Conv2d]
    lorakit.inject_adapters(model, lorakit.LoraConfig(target_modules=[], modules_to_save=["layers.0", "layers.1"]))
    assert [type(m) for m in model.layers] == [lorakit.SavedModule, lorakit.SavedModule]
