"""QA-LoRA: group-pooled adapters on a group-wise INT-N base, merged exactly into the zeros.
Tolerance: fp32 rounding (FP32_ATOL on logits)."""

import copy
import json

import pytest
import torch
from torch import nn

import lorakit
from tiny_models import FP32_ATOL, randomise_trainable_, tiny_llama, train_steps


def qalora_llama(bits=4, weight_group=32, adapter_group=32, seed=1):
    model = tiny_llama()
    lorakit.quantize_(model, lorakit.IntNConfig(bits=bits, group_size=weight_group))
    lorakit.inject_adapters(model, lorakit.LoraConfig(r=4, alpha=8, target_modules="all-linear", group_size=adapter_group))
    randomise_trainable_(model, seed=seed, std=0.1)
    return model


def tokens(seed=0, shape=(2, 9)):
    return torch.randint(0, 128, shape, generator=torch.Generator().manual_seed(seed))


def test_adapter_shapes_and_dense_equivalent():
    model = qalora_llama()
    layer = model.model.layers[0].mlp.down_proj  # in = 128
    assert layer.lora["default"].A.shape == (4, 128 // 32)
    x = torch.randn(3, 128)
    expected = x @ (layer.weight.dequantize() + layer.delta_weight()).T
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)
    # ΔW is constant inside every group of 32 input columns
    delta = layer.delta_weight().view(layer.weight.shape[0], -1, 32)
    assert torch.equal(delta, delta[..., :1].expand_as(delta))


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
def test_merge_moves_only_zeros_and_keeps_logits(bits):
    model = qalora_llama(bits=bits)
    x = tokens()
    layers = {n: m for n, m in model.named_modules() if isinstance(m, lorakit.LoraLayer)}
    before_codes = {n: (m.weight.q().clone(), m.weight.scale.clone()) for n, m in layers.items()}
    with torch.no_grad():
        before = model(x).logits
        assert len(lorakit.merge_(model)) == 14
        after = model(x).logits
    assert (after - before).abs().max() <= FP32_ATOL
    for name, (codes, scale) in before_codes.items():
        merged = model.get_submodule(name)
        assert isinstance(merged, lorakit.QuantizedLinear) and isinstance(merged.weight, lorakit.IntNWeight)
        assert torch.equal(merged.weight.q(), codes) and torch.equal(merged.weight.scale, scale)
        g = merged.weight.group_size
        w = merged.weight.dequantize()  # every weight on its group's grid, exactly
        grid = merged.weight.scale.repeat_interleave(g, 1) * codes.float() + merged.weight.offset.repeat_interleave(g, 1)
        assert torch.equal(w, grid)
    lorakit.unmerge_(model)
    with torch.no_grad():
        assert (model(x).logits - before).abs().max() <= FP32_ATOL


def test_coarser_adapter_groups_merge_exactly_finer_are_refused():
    model = qalora_llama(weight_group=32, adapter_group=64)
    x = tokens()
    with torch.no_grad():
        before = model(x).logits
        lorakit.merge_(model)
        assert (model(x).logits - before).abs().max() <= FP32_ATOL
    with pytest.raises(ValueError, match="group_size is a multiple"):
        lorakit.merge_(qalora_llama(weight_group=64, adapter_group=32))


def test_plain_lora_on_intn_is_refused_not_requantized():
    model = tiny_llama()
    lorakit.quantize_(model, lorakit.IntNConfig(bits=4, group_size=32))
    lorakit.inject_adapters(model, lorakit.LoraConfig(r=4, alpha=8, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="dequantize_and_merge_"):
        lorakit.merge_(model)


@pytest.mark.parametrize("kwargs, match", [
    ({"target_modules": ["q_proj"], "group_size": 48}, "group_size=48 does not divide"),
    ({"target_modules": ["embed_tokens"], "group_size": 32}, "linear layers only"),
])
def test_bad_group_sizes_name_the_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        lorakit.inject_adapters(tiny_llama(), lorakit.LoraConfig(r=4, **kwargs))


def test_tiny_llama_trains_with_qalora():
    torch.manual_seed(0)
    model = tiny_llama()
    lorakit.quantize_(model, lorakit.IntNConfig(bits=4, group_size=32))
    lorakit.inject_adapters(model, lorakit.LoraConfig(r=8, alpha=16, target_modules="all-linear", group_size=32))
    x = tokens(5, (4, 16))
    losses = train_steps(model, x)
    assert losses[-1] < losses[0] - 0.5, losses
    with torch.no_grad():
        before = model(x).logits
        lorakit.merge_(model)
        assert (model(x).logits - before).abs().max() <= 1e-4  # trained adapter: larger values, same exactness


def test_peft_qalora_format_round_trip_and_peft_formula(tmp_path):
    model = qalora_llama()
    x = tokens()
    with torch.no_grad():
        ref = model(x).logits
    lorakit.save_adapter(model, tmp_path / "a")
    raw = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert raw["use_qalora"] is True and raw["qalora_group_size"] == 32
    meta = json.loads((tmp_path / "a" / "lorakit.json").read_text())
    assert meta["qalora"]["group_size"] == 32 and meta["qalora"]["pooling"].startswith("mean")
    fresh = tiny_llama()
    lorakit.quantize_(fresh, lorakit.IntNConfig(bits=4, group_size=32))
    lorakit.load_adapter(fresh, tmp_path / "a")
    with torch.no_grad():
        assert (fresh(x).logits - ref).abs().max() <= FP32_ATOL
    # PEFT's use_qalora forward (peft/tuners/lora/variants.py): mean over the group * (in/g), then A, B
    from safetensors.torch import load_file

    tensors = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    layer = model.model.layers[1].mlp.down_proj
    a = tensors["base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"]
    b = tensors["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"]
    h = torch.randn(5, 128)
    pooled = h.view(5, 128 // 32, 32).mean(2) * (128 // 32)
    peft_delta = pooled @ a.T @ b.T * layer.lora["default"].scaling
    torch.testing.assert_close(layer(h) - layer.base_forward(h), peft_delta, rtol=1e-5, atol=1e-6)


def test_qalora_as_plain_lora_loads_in_peft_on_dense_base(tmp_path):
    peft = pytest.importorskip("peft")
    model = qalora_llama()
    x = tokens()
    with torch.no_grad():
        ref = model(x).logits
    lorakit.save_adapter(model, tmp_path / "a", qalora_as_lora=True)
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["use_qalora"] is False
    dense = copy.deepcopy(model)
    lorakit.delete_adapter(dense, "default")
    lorakit.dequantize_(dense)
    assert not any(isinstance(m, lorakit.QuantizedLinear) for m in dense.modules())
    peft_model = peft.PeftModel.from_pretrained(dense, tmp_path / "a").eval()
    with torch.no_grad():
        assert (peft_model(x).logits - ref).abs().max() <= FP32_ATOL
    assert type(peft_model.base_model.model.model.layers[0].self_attn.q_proj.base_layer) is nn.Linear


def test_gptq_base_holds_intn_weights_and_beats_rtn_on_outputs():
    model = tiny_llama()
    x = tokens(3)
    calib = [tokens(s, (2, 32)) for s in range(4)]
    with torch.no_grad():
        ref = model(x).logits
    errors = {}
    for method in ("rtn", "gptq"):
        m = copy.deepcopy(model)
        report = lorakit.quantize_(m, lorakit.IntNConfig(bits=3, group_size=32, method=method),
                                   calibration=calib if method == "gptq" else None)
        assert len(report.layers) == 14
        assert all(isinstance(q.weight, lorakit.IntNWeight) for q in m.modules() if isinstance(q, lorakit.QuantizedLinear))
        with torch.no_grad():
            errors[method] = (m(x).logits - ref).pow(2).mean().item()
    assert errors["gptq"] < errors["rtn"], errors
    with pytest.raises(ValueError, match="needs calibration"):
        lorakit.quantize_(copy.deepcopy(model), lorakit.IntNConfig(method="gptq"))
    with pytest.raises(ValueError, match="method='bogus'"):
        lorakit.IntNConfig(method="bogus")


def test_intn_quantize_report_prints_and_bad_group_changes_nothing():
    model = tiny_llama()
    report = lorakit.quantize_(model, lorakit.IntNConfig(bits=3, group_size=32))
    assert str(report).startswith("quantize_: 14 linear weights -> INT3, group 32, round to nearest")
    fresh = tiny_llama()  # down_proj has in=128, the others 64: group 128 fits only down_proj
    with pytest.raises(ValueError, match="group_size=128 does not divide model.layers.0.self_attn.q_proj"):
        lorakit.quantize_(fresh, lorakit.IntNConfig(bits=4, group_size=128))
    assert not any(isinstance(m, lorakit.QuantizedLinear) for m in fresh.modules())


def test_qalora_on_a_hugging_face_directory_streams_into_int4(tmp_path_factory, monkeypatch, capsys):
    """`lorakit train method=qalora` on a Hugging Face directory streams it into INT4 groups (never the whole dense
    model in memory), the same bytes as loading it dense and quantizing; a checkpoint that cannot stream is
    loaded dense instead, to the same weights."""
    from transformers import AutoModelForCausalLM

    from lorakit.quant import stream
    from lorakit.tasks.causal_lm import load_model
    from lorakit.training.run_config import load_config
    from train_fixtures import tiny_assets

    model_dir, _ = tiny_assets(tmp_path_factory)
    config = load_config(None, [f"model.path={model_dir}", "method=qalora", "model.dtype=float32"])
    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    lorakit.quantize_(reference, lorakit.IntNConfig(bits=4, group_size=32, scale_dtype="float16"))
    want = reference.state_dict()
    real, calls = lorakit.load_quantized, []
    monkeypatch.setattr(lorakit, "load_quantized", lambda *a, **k: calls.append(a[1]) or real(*a, **k))

    def mismatch(*args, **kwargs):
        raise stream.StreamMismatch(f"cannot stream {model_dir}: tensors the model does not have ['x.weight']")

    for source in ("streamed", "dense"):
        if source == "dense":
            monkeypatch.setattr(lorakit, "load_quantized", mismatch)
        model, _ = load_model(config)
        got = model.state_dict()
        assert got.keys() == want.keys()
        for key, value in want.items():
            assert torch.equal(got[key], value), (source, key)
    assert [type(c).__name__ for c in calls] == ["IntNConfig"]
    assert "cannot stream" in capsys.readouterr().err
