"""Mixed-adapter batches: each row through its own adapter equals that row alone with the adapter active.
Tolerance: FP32_ATOL on logits (a different batch shape only changes the summation order)."""

from __future__ import annotations

import pytest
import torch

import lorakit
from tiny_models import FP32_ATOL, MIN_ADAPTER_EFFECT, VOCAB, randomise_trainable_, tiny_gpt2, tiny_llama

NAMES = ["a", "b", "c"]


def with_adapters(base: str, group_size: int | None = None, model=None):
    """A tiny Llama on `base` (dense, nf4, int4) with adapters a, b (all-linear) and c (q_proj, v_proj only)."""
    model = model or tiny_llama()
    if base == "nf4":
        lorakit.quantize_(model, lorakit.NF4Config())
    elif base == "int4":
        lorakit.quantize_(model, lorakit.IntNConfig(bits=4, group_size=32, scale_dtype="float16"))  # fp16 offsets
    for i, name in enumerate(NAMES):
        targets = "all-linear" if name != "c" else ["q_proj", "v_proj"]
        lorakit.inject_adapters(model, lorakit.LoraConfig(r=4, alpha=8, target_modules=targets, group_size=group_size),
                                name=name)
        randomise_trainable_(model, seed=i, std=0.1)
    return model


def alone(model, ids: torch.Tensor, name: str | None) -> torch.Tensor:
    with torch.no_grad():
        if name is None:
            with lorakit.disable_adapters(model):
                return model(ids).logits
        lorakit.set_active(model, name)
        return model(ids).logits


def tokens(rows: int, seq: int = 9, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (rows, seq), generator=torch.Generator().manual_seed(seed))


ROWS = ["a", "__base__", "b", "a", "c", None, "b"]  # groups with non-consecutive rows, and base rows


@pytest.mark.parametrize("base,group_size", [("dense", None), ("nf4", None), ("int4", None), ("int4", 32)],
                         ids=["dense-lora", "nf4-qlora", "int4-lora", "int4-qalora"])
def test_each_row_equals_that_row_alone(base, group_size):
    model = with_adapters(base, group_size)
    ids = tokens(len(ROWS))
    with torch.no_grad():
        mixed = model(ids, adapter_names=ROWS).logits
    for i, name in enumerate(ROWS):
        expected = alone(model, ids[i:i + 1], None if name == "__base__" else name)
        assert (mixed[i] - expected[0]).abs().max() <= FP32_ATOL, (i, name)
    # the adapters differ from each other and from the base, so the routing is visible
    assert (mixed[0] - mixed[1]).abs().max() > MIN_ADAPTER_EFFECT
    assert (mixed[0] - mixed[2]).abs().max() > MIN_ADAPTER_EFFECT
    assert (mixed[4] - mixed[1]).abs().max() > MIN_ADAPTER_EFFECT


def test_routing_ends_with_the_forward_and_the_active_adapter_is_unchanged():
    model = with_adapters("dense")
    lorakit.set_active(model, "b")
    ids = tokens(2)
    with torch.no_grad():
        before = model(ids).logits
        model(ids, adapter_names=["a", "c"])
        assert torch.equal(model(ids).logits, before)
    assert all(layer.routes is None for _, layer in lorakit.adapters.layers.lora_layers(model))
    with pytest.raises(ValueError, match="3 names but"):
        model(ids, adapter_names=["a", "b", "c"])
    assert all(layer.routes is None for _, layer in lorakit.adapters.layers.lora_layers(model))  # cleared on error


def test_generation_with_kv_cache_matches_each_row_alone():
    """Prefill + decode steps: greedy generation of a batch (left-padded) equals each prompt alone. `generate`
    checks its keyword arguments against the model's signature, so it takes the context-manager form."""
    model = with_adapters("int4", group_size=32)
    prompts = [tokens(1, 5, seed=1)[0], tokens(1, 8, seed=2)[0], tokens(1, 6, seed=3)[0]]
    names = ["b", "__base__", "a"]
    width = max(len(p) for p in prompts)
    ids = torch.stack([torch.cat([torch.zeros(width - len(p), dtype=torch.long), p]) for p in prompts])
    mask = torch.stack([torch.cat([torch.zeros(width - len(p), dtype=torch.long), torch.ones_like(p)]) for p in prompts])
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        with lorakit.mixed_adapters(model, names):
            batch = model.generate(ids, attention_mask=mask, **kw)[:, width:]
        for i, (prompt, name) in enumerate(zip(prompts, names)):
            with lorakit.mixed_adapters(model, [name]):
                single = model.generate(prompt[None], attention_mask=torch.ones_like(prompt)[None], **kw)
            assert torch.equal(batch[i], single[0, len(prompt):]), (i, name)


def test_modules_to_save_are_routed_per_row():
    model = tiny_gpt2()
    for i, name in enumerate(["a", "b"]):
        lorakit.inject_adapters(model, lorakit.LoraConfig(r=4, alpha=8, target_modules=["c_attn"],
                                                          modules_to_save=["ln_f"]), name=name)
        randomise_trainable_(model, seed=i, std=0.1)
    ids = tokens(3)
    with torch.no_grad():
        mixed = model(ids, adapter_names=["b", None, "a"]).logits
    for i, name in enumerate(["b", None, "a"]):
        assert (mixed[i] - alone(model, ids[i:i + 1], name)[0]).abs().max() <= FP32_ATOL


def test_bad_names_are_clear_errors():
    model = with_adapters("dense")
    ids = tokens(2)
    with pytest.raises(ValueError, match=r"'nope' is not an adapter of this model; it has \['a', 'b', 'c'\]"):
        model(ids, adapter_names=["a", "nope"])
    with pytest.raises(TypeError, match="one adapter name per row"):
        model(ids, adapter_names="a")
    with lorakit.mixed_adapters(model, ["a", "b"]):
        with pytest.raises(RuntimeError, match="one or the other"):
            model(ids, adapter_names=["a", "b"])
    pissa = tiny_llama()
    lorakit.inject_adapters(pissa, lorakit.LoraConfig(r=4, target_modules=["q_proj"], init="pissa"), name="p")
    with pytest.raises(ValueError, match="PiSSA"):
        pissa(ids, adapter_names=["p", "p"])
