"""Dense Hugging Face export of merged LoRA, QLoRA and QA-LoRA models: transformers loads it and
computes the same logits (fp32 rounding)."""

import pytest
import torch

import lorakit
from tiny_models import FP32_ATOL, randomise_trainable_, tiny_llama


def _lora():
    model = tiny_llama()
    lorakit.inject_adapters(model, lorakit.LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    return model, lorakit.merge_


def _qlora():
    model = tiny_llama()
    lorakit.quantize_(model, lorakit.NF4Config())
    lorakit.inject_adapters(model, lorakit.LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    return model, lorakit.dequantize_and_merge_


def _qalora():
    model = tiny_llama()
    lorakit.quantize_(model, lorakit.IntNConfig(bits=4, group_size=32))
    lorakit.inject_adapters(model, lorakit.LoraConfig(r=4, alpha=8, target_modules="all-linear", group_size=32))
    return model, lorakit.merge_  # stays INT-N; exported dense


@pytest.mark.parametrize("build", [_lora, _qlora, _qalora], ids=["lora", "qlora", "qalora"])
def test_export_loads_in_transformers_with_same_logits(build, tmp_path):
    from transformers import AutoModelForCausalLM

    model, merge = build()
    randomise_trainable_(model, seed=2, std=0.1)
    merge(model)
    x = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(x).logits
    lorakit.export_hf(model, tmp_path / "out")
    lorakit.export_hf(model, tmp_path / "out")  # replacing an existing export works
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    assert not [p for p in (tmp_path).iterdir() if p.name.startswith(".")], "temporary directories left behind"
    with torch.no_grad():
        assert (loaded(x).logits - ref).abs().max() <= FP32_ATOL


def test_unmerged_model_is_refused(tmp_path):
    model, _ = _lora()
    with pytest.raises(ValueError, match="merge first"):
        lorakit.export_hf(model, tmp_path / "out")
