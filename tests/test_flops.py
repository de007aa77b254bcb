"""The FLOP count of `lorakit.training.flops` against PyTorch's own counter (`FlopCounterMode`, which counts
every matmul and attention call a step actually runs, forward and backward)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import lorakit
from lorakit.training.flops import LlamaShape, gemm_shapes, step_flops
from tests.tiny_models import VOCAB, tiny_llama


def _addmm_(self_shape, a_shape, b_shape, *args, **kwargs):  # (m, k) @ (k, n)
    return 2 * a_shape[0] * a_shape[1] * b_shape[1]


# lorakit adds B's product into the base output in place (addmm_), which the counter has no formula for
ADDMM_ = {torch.ops.aten.addmm_: _addmm_}


@pytest.mark.parametrize("group_size", [None, 16])
@pytest.mark.parametrize("targets", [None, ("q_proj", "v_proj"), ("gate_proj", "down_proj")])
def test_step_flops_equal_pytorchs_count(targets, group_size):
    model = tiny_llama(layers=3)
    model.config._attn_implementation = "eager"  # attention as plain matmuls, which the counter sees
    r = 4
    if group_size:  # QA-LoRA: an INT-N base (dequantized on the fly), A over the group means
        lorakit.quantize_(model, lorakit.IntNConfig(bits=4, group_size=group_size))
    lorakit.inject_adapters(model, lorakit.LoraConfig(r=r, alpha=8, group_size=group_size,
                                                      target_modules=list(targets) if targets else "all-linear"))
    model.train()
    ids = torch.randint(0, VOCAB, (3, 20))
    labels = ids.clone()
    labels[:, :7] = -100  # prompts: no loss there, so the output layer runs on 13 - 1 shifted positions per row
    with FlopCounterMode(display=False, custom_mapping=ADDMM_) as counter:
        loss = lorakit.causal_lm_loss(model, ids, labels, torch.ones_like(ids))
        loss.backward()
    n_loss = int((labels[:, 1:] != -100).sum())
    # eager attention computes the masked half too: causal=False
    expected = step_flops(LlamaShape.of(model.config), [20] * 3, n_loss, r, targets, causal=False, group_size=group_size)
    assert counter.get_total_flops() == expected["total"]
    assert expected["adapter"] > 0 and expected["attention"] > 0 and expected["output"] > 0


def test_shared_prefix_flops_equal_pytorchs_count(monkeypatch):
    from lorakit.tasks import shared_prefix

    # the cached form (prefix, then rows): exactly the useful work; the prefix as row 0 also computes its padding
    monkeypatch.setattr(shared_prefix, "prefix_as_row", lambda decoder: False)
    model = tiny_llama(layers=2)
    model.config._attn_implementation = "eager"
    lorakit.inject_adapters(model, lorakit.LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    model.train()
    ids = torch.randint(0, VOCAB, (3, 20), generator=torch.Generator().manual_seed(0))
    ids[:, :10] = ids[0, :10]  # a common prompt: the decoder computes its first 9 tokens once
    labels = ids.clone()
    labels[:, :12] = -100
    with FlopCounterMode(display=False, custom_mapping=ADDMM_) as counter:
        loss = lorakit.causal_lm_loss(model, ids, labels, torch.ones_like(ids))
        loss.backward()
    n_loss = int((labels[:, 1:] != -100).sum())
    shape = LlamaShape.of(model.config)
    expected = step_flops(shape, [20] * 3, n_loss, 4, causal=False, shared=9)
    assert counter.get_total_flops() == expected["total"]
    assert expected["total"] < step_flops(shape, [20] * 3, n_loss, 4, causal=False)["total"]
    with pytest.raises(ValueError, match="shared=20"):
        step_flops(shape, [20, 20], 4, 4, shared=20)


def test_causal_attention_is_half_and_parts_add_up():
    shape = LlamaShape(576, 1536, 30, 9, 3, 49152)  # SmolLM2-135M
    full = step_flops(shape, [512, 300], 400, 16, causal=False)
    causal = step_flops(shape, [512, 300], 400, 16)
    assert causal["attention"] * 2 == full["attention"]
    assert causal["total"] == sum(causal[k] for k in ("base", "adapter", "attention", "output"))
    assert 134e6 < shape.parameters() < 135e6  # SmolLM2-135M's published count: 134,515,008
    assert len(gemm_shapes(shape, 2048, 16)) == 7 * 4


def test_unknown_target_is_named():
    with pytest.raises(ValueError, match="lm_head"):
        step_flops(LlamaShape(64, 128, 2, 4, 2, 128), [8], 4, 4, ("lm_head",))
