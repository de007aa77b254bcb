"""QLoRA end to end on a tiny Llama: NF4 base + LoRA adapters, against LoRA over the dequantized
dense weights (the exact model QLoRA trains). Tolerance: fp32 rounding, FP32_ATOL."""

import copy
import json

import pytest
import torch
from torch import nn

import lorakit
from tiny_models import FP32_ATOL, randomise_trainable_, tiny_llama, train_steps

CFG = lorakit.LoraConfig(r=4, alpha=8, target_modules="all-linear")


def qlora_and_dense_twin(double_quant: bool = True):
    """A QLoRA model and a dense LoRA model whose base weights are its dequantized weights."""
    qmodel = tiny_llama()
    lorakit.quantize_(qmodel, lorakit.NF4Config(double_quant=double_quant))
    lorakit.inject_adapters(qmodel, CFG)
    randomise_trainable_(qmodel, seed=3)
    dense = copy.deepcopy(qmodel)
    assert len(lorakit.dequantize_(dense)) == 14
    assert all(isinstance(m.weight, nn.Parameter) for m in dense.modules() if isinstance(m, lorakit.LoraLayer))
    return qmodel, dense


def batch():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 128, (2, 9), generator=g)


@pytest.mark.parametrize("double_quant", [True, False])
def test_qlora_matches_lora_over_dequantized_weights(double_quant):
    qmodel, dense = qlora_and_dense_twin(double_quant)
    x = batch()
    q_out, d_out = qmodel(x, labels=x), dense(x, labels=x)
    assert (q_out.logits - d_out.logits).abs().max() <= FP32_ATOL
    q_out.loss.backward()
    d_out.loss.backward()
    q_grads = {n: p.grad for n, p in qmodel.named_parameters() if p.requires_grad}
    d_grads = {n: p.grad for n, p in dense.named_parameters() if p.requires_grad}
    assert q_grads.keys() == d_grads.keys() and len(q_grads) == 2 * 14
    for name in q_grads:
        torch.testing.assert_close(q_grads[name], d_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_autograd_never_saves_a_dequantized_weight():
    qmodel, _ = qlora_and_dense_twin()
    weight_shapes = {tuple(m.weight.shape) for m in qmodel.modules() if isinstance(m, lorakit.LoraLayer)}
    params = {p.untyped_storage().data_ptr() for p in qmodel.parameters()}
    saved = []

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:  # e.g. the dense lm_head's own weight is fine
            saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        x = batch()
        qmodel(x, labels=x).loss.backward()
    assert saved, "hook recorded nothing"
    assert not weight_shapes & set(saved), f"a dense (out, in) weight was saved: {weight_shapes & set(saved)}"


def test_merge_refuses_quantized_base_and_names_the_fix():
    qmodel, _ = qlora_and_dense_twin()
    with pytest.raises(ValueError, match="dequantize_and_merge_"):
        lorakit.merge_(qmodel)


def test_dequantize_and_merge_is_exact_and_dense():
    qmodel, _ = qlora_and_dense_twin()
    x = batch()
    with torch.no_grad():
        before = qmodel(x).logits
        merged = lorakit.dequantize_and_merge_(qmodel)
        after = qmodel(x).logits
    assert len(merged) == 14
    assert (after - before).abs().max() <= FP32_ATOL
    assert not any(isinstance(m, (lorakit.QuantizedLinear, lorakit.LoraLayer)) for m in qmodel.modules())
    assert type(qmodel.model.layers[0].self_attn.q_proj) is nn.Linear


def test_qlora_adapter_saves_settings_and_loads_onto_dense_base(tmp_path):
    peft = pytest.importorskip("peft")
    qmodel, dense = qlora_and_dense_twin()
    lorakit.save_adapter(qmodel, tmp_path)
    meta = json.loads((tmp_path / "lorakit.json").read_text())
    assert meta["base_weights"]["weight_types"] == {"NF4Weight": 14}
    assert meta["base_weights"]["quantization"]["NF4Weight"]["block_size"] == 64
    assert meta["base_weights"]["quantization"]["NF4Weight"]["double_quant"] is True
    # PEFT on the dequantized base computes what the QLoRA model computes.
    base = copy.deepcopy(dense)
    lorakit.delete_adapter(base, "default")
    peft_model = peft.PeftModel.from_pretrained(base, tmp_path).eval()
    x = batch()
    with torch.no_grad():
        assert (peft_model(x).logits - qmodel(x).logits).abs().max() <= FP32_ATOL
    # and lorakit loads it back onto a fresh quantized base
    fresh = tiny_llama()
    lorakit.quantize_(fresh, lorakit.NF4Config())
    lorakit.load_adapter(fresh, tmp_path)
    with torch.no_grad():
        assert (fresh(x).logits - qmodel(x).logits).abs().max() <= FP32_ATOL


def test_tiny_llama_trains_with_qlora():
    torch.manual_seed(0)
    model = tiny_llama()
    lorakit.quantize_(model, lorakit.NF4Config())
    lorakit.inject_adapters(model, lorakit.LoraConfig(r=8, alpha=16, target_modules="all-linear"))
    losses = train_steps(model, torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(5)))
    assert losses[-1] < losses[0] - 0.8, losses  # ln(128) = 4.85 at the start: a real drop, not noise
    assert all(isinstance(m.weight, lorakit.NF4Weight) for m in model.modules() if isinstance(m, lorakit.LoraLayer))


def test_cast_base_keeps_trainable_float32_and_codes():
    model = tiny_llama()
    lorakit.quantize_(model, lorakit.NF4Config())
    lorakit.inject_adapters(model, lorakit.LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    codes = model.model.layers[0].self_attn.q_proj.weight.codes.clone()
    assert lorakit.cast_base_(model, "bf16") == torch.bfloat16
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight.codes, codes)
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    assert {p.dtype for p in model.parameters() if not p.requires_grad} == {torch.bfloat16}
    x = batch()
    out = model(x, labels=x)
    assert out.logits.dtype == torch.bfloat16
    out.loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    with pytest.raises(ValueError):
        lorakit.cast_base_(model, "float8")
