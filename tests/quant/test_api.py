"""quantize_ / dequantize_ / memory_report on a tiny Llama, and NF4Config's input checks."""

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lorakit.quant import (
    NF4Config, NF4Weight, QuantizedLinear, dequantize_, linear, memory_report, quantize_,
)

LINEARS = [f"model.layers.{i}.{m}" for i in range(2) for m in (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
TOKENS = torch.arange(24).view(2, 12) % 128


def logits(model):
    with torch.no_grad():
        return model(TOKENS).logits


def relative_error(a, b):
    return (torch.linalg.norm(a - b) / torch.linalg.norm(b)).item()


def test_quantize_swaps_every_linear_but_the_head(make_llama):
    model = make_llama()
    dense_logits = logits(model)
    report = quantize_(model, NF4Config())
    assert report.names == LINEARS
    assert all(isinstance(model.get_submodule(n), QuantizedLinear) for n in LINEARS)
    assert type(model.lm_head) is nn.Linear
    assert not any(p.requires_grad for n in LINEARS for p in model.get_submodule(n).parameters())
    assert relative_error(logits(model), dense_logits) < 0.2   # 4-bit weights: close, not equal


def test_report_measures_sizes_and_the_error_it_made(make_llama):
    model = make_llama()
    originals = {n: model.get_submodule(n).weight.detach().clone() for n in LINEARS}
    report = quantize_(model)
    for layer in report.layers:
        w, w_hat = originals[layer.name], model.get_submodule(layer.name).weight.dequantize()
        assert layer.shape == tuple(w.shape) and layer.bytes_before == w.numel() * 4
        assert layer.bytes_after == model.get_submodule(layer.name).weight.nbytes
        assert layer.max_abs_error == pytest.approx((w_hat - w).abs().max().item())
        assert layer.relative_error == pytest.approx(relative_error(w_hat, w), rel=1e-5)
        assert 0.05 < layer.relative_error < 0.15
    assert report.bytes_before == 4 * sum(w.numel() for w in originals.values())
    assert 4.1 < report.bits_per_param < 4.2
    text = str(report)
    assert "14 linear weights -> nf4, block 64" in text and "model.layers.1.mlp.down_proj" in text and "total" in text


def test_filter_fn_and_exclude_modules_narrow_the_selection(make_llama):
    report = quantize_(make_llama(), NF4Config(exclude_modules=["k_proj", "v_proj"]),
                       filter_fn=lambda name, module: "layers.0." in name)
    assert report.names == [n for n in LINEARS[:7] if not n.endswith(("k_proj", "v_proj"))]


def test_quantizing_twice_is_a_clear_error(make_llama):
    model = make_llama()
    quantize_(model)
    with pytest.raises(TypeError, match="QuantizedLinear.*dequantize_ first"):
        quantize_(model)


def test_nf4_fp4_int4_comparison_runs_and_nf4_wins(make_llama):
    errors = {qt: quantize_(make_llama(), NF4Config(quant_type=qt)).relative_error for qt in ("nf4", "fp4", "int4")}
    assert errors["nf4"] < errors["fp4"] and errors["nf4"] < errors["int4"]


def test_state_dict_round_trips_through_safetensors(tmp_path, make_llama):
    model = make_llama()
    quantize_(model)
    save_file(model.state_dict(), tmp_path / "model.safetensors")
    assert "model.layers.0.self_attn.q_proj.weight.codes" in load_file(tmp_path / "model.safetensors")

    other = make_llama(seed=7)
    quantize_(other)
    other.load_state_dict(load_file(tmp_path / "model.safetensors"))
    assert torch.equal(logits(other), logits(model))


def test_dequantize_restores_dense_frozen_linears_with_the_same_outputs(make_llama):
    model = make_llama()
    quantize_(model)
    quantized_logits = logits(model)
    assert dequantize_(model) == LINEARS
    assert all(type(model.get_submodule(n)) is nn.Linear for n in LINEARS)
    assert not model.model.layers[0].mlp.up_proj.weight.requires_grad
    assert "model.layers.0.mlp.up_proj.weight" in model.state_dict()
    assert torch.equal(logits(model), quantized_logits)
    assert dequantize_(model) == []


def test_dequantize_replaces_a_quantized_weight_held_by_reference():
    """An adapter layer owns the base weight by reference (`self.weight = base.weight`): it gets a dense Parameter."""

    class Holder(nn.Module):
        def __init__(self, base):
            super().__init__()
            self.weight = base.weight
            object.__setattr__(self, "base_layer", base)   # unregistered; attribute lookups fall back to it

        def __getattr__(self, name):
            try:
                return super().__getattr__(name)
            except AttributeError:
                return getattr(self.__dict__["base_layer"], name)

        def forward(self, x):
            return linear(x, self.weight)

    holder = nn.Sequential(Holder(QuantizedLinear(NF4Weight.from_float(torch.randn(8, 64)))))
    x = torch.randn(2, 64)
    before = holder(x)
    assert dequantize_(holder) == ["0"]
    assert isinstance(holder[0].weight, nn.Parameter) and not holder[0].weight.requires_grad
    assert torch.equal(holder(x), before)


def test_memory_report(make_llama):
    model = make_llama()
    report = quantize_(model)
    for p in model.parameters():
        p.requires_grad_(False)
    adapter = nn.Parameter(torch.zeros(4, 64))
    model.register_parameter("adapter", adapter)
    memory = memory_report(model)
    assert memory.quantized_params == sum(64 * 64 * 2 + 32 * 64 * 2 + 128 * 64 * 3 for _ in range(2))
    assert memory.quantized_bytes == report.bytes_after
    assert memory.bits_per_param_quantized == pytest.approx(report.bits_per_param)
    dense_frozen = [model.model.embed_tokens.weight, model.lm_head.weight, model.model.norm.weight]
    assert memory.frozen_params == sum(p.numel() for p in dense_frozen) + 64 * 2 * 2
    assert memory.trainable_bytes == adapter.numel() * 4
    assert memory.base_bytes == memory.quantized_bytes + memory.frozen_bytes
    assert "bits/param" in str(memory) and "trainable" in str(memory)


def test_model_float_casts_keep_quantized_buffers(make_llama):
    model = make_llama()
    quantize_(model)
    model.to(torch.bfloat16)
    weight = model.model.layers[0].self_attn.q_proj.weight
    assert weight.dtype == torch.bfloat16 and weight.nested_absmax.dtype == torch.float32
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert type(model.model.layers[0].mlp.up_proj.to_dense()) is nn.Linear
    assert model.model.layers[0].mlp.up_proj.to_dense().weight.dtype == torch.bfloat16


def test_config_round_trip_and_checks(make_llama):
    config = NF4Config(block_size=128, double_quant=False, quant_type="int4", target_modules=["q_proj"])
    assert NF4Config.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match=r"unknown NF4Config key 'bits'"):
        NF4Config.from_dict({"bits": 4})
    with pytest.raises(ValueError, match=r"quant_type='nf8' is not supported; choose one of"):
        NF4Config(quant_type="nf8")
    with pytest.raises(ValueError, match=r"block_size=63 must be a positive multiple of 2"):
        NF4Config(block_size=63)
    with pytest.raises(ValueError, match=r"double_quant_block_size=0 must be"):
        NF4Config(double_quant_block_size=0)
    with pytest.raises(ValueError, match=r"double_quant='yes' must be True or False"):
        NF4Config(double_quant="yes")
    with pytest.raises(ValueError, match=r"target_modules=3 must be a regex string, a list"):
        NF4Config(target_modules=3)
    with pytest.raises(ValueError, match="matched no supported layer"):
        quantize_(make_llama(), NF4Config(target_modules=["q_prj"]))
