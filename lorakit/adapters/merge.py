"""Merging adapters into the base weights. Each merge is named for what it guarantees.

- `dequantize_and_merge_(model)`: QLoRA's merge: 4-bit base weights become dense float (the values
  trained against), then the exact dense merge. Never re-quantizes.
- `merge_(model)`: exact dense merge, W ← W + ΔW for the active adapter (ΔW from
  `LoraLayer.delta_weight`), computed in float32. On a group-wise INT-N base with a QA-LoRA
  adapter (adapter group_size a multiple of the weight's), ΔW is constant inside each group and
  the merge only moves the offsets: offset ← offset + ΔW. The merged model is still INT-N with
  the same codes and scales, exactly. A DoRA adapter merges as W ← m/n ⊙ (W + ΔW), n = ||W + ΔW||_c
  (`LoraLayer.weight_norm`), exactly up to float32 rounding, into a dense base only: m/n rescales whole
  rows, so no INT-N offset move can hold it. The adapter layers are replaced by the
  original plain layers (`nn.Linear`, `nn.Embedding`, ...), so the model saves and runs like the
  base model did. `unmerge_` subtracts ΔW again and puts the adapter layers back.
  Any other quantized base is refused with the merge that fits it, never silently re-quantized.
- A weight shared with another module (e.g. an input embedding tied to the output head) is
  merged into a copy, so the other module keeps computing what it computed before; a Hugging Face
  config then says `tie_word_embeddings=False`, so a saved merged model reloads the same.
"""

from __future__ import annotations

import torch
from torch import nn

from lorakit.adapters.inject import adapter_state
from lorakit.adapters.layers import LoraLayer, SavedModule, is_dense, lora_layers, saved_modules
from lorakit.adapters.walk import replace_module


def merge_(model: nn.Module) -> list[str]:
    """Fold the active adapter into the dense base weights; return the names of merged layers.

    Exact up to float32 rounding of W + ΔW. Layers with no active adapter just go back to their
    base layer. Undo with `unmerge_`.
    """
    state = adapter_state(model)
    if state.merged:
        raise RuntimeError("adapters are already merged; call lorakit.unmerge_(model) first")
    layers = list(lora_layers(model))
    for name, layer in layers:
        if layer.adapter() is not None and not is_dense(layer.weight) and layer.adapter().magnitude is not None:
            raise ValueError(
                f"{name} has a DoRA adapter over a quantized base ({type(layer.weight).__name__}): DoRA rescales each "
                "whole output row by m / ||W + ΔW||, which moves every weight, not a constant per group, so it cannot "
                "merge into INT-N offsets or NF4 codes. What is exact: lorakit.dequantize_and_merge_(model) merges into a "
                "dense model, which lorakit.export_hf writes as a dense Hugging Face model (CLI: lorakit merge RUN, or "
                "lorakit export RUN --format hf); lorakit.export_gguf then writes it in the template GGUF's tensor types "
                "(exact where those are F32 / F16 / BF16, re-quantized with the error reported where they are 4-bit)."
            )
        if layer.adapter() is not None and not is_dense(layer.weight) and not _merges_into_offsets(layer):
            raise ValueError(
                f"{name} has a quantized base ({type(layer.weight).__name__}) that this adapter cannot merge into "
                "exactly. An exact merge into a quantized base needs a group-wise INT-N weight and a QA-LoRA adapter "
                "whose group_size is a multiple of the weight's. For QLoRA use lorakit.dequantize_and_merge_(model) "
                "(merges into a dense model); re-quantizing afterwards is a separate lorakit.quantize_ call that "
                "reports its error."
            )
    shared = _shared_parameter_ids(model)
    merged = []
    for name, layer in layers:
        base = layer.base_layer
        base.weight, base.bias = layer.weight, layer.bias  # the layer's references are authoritative
        if layer.adapter() is not None and not is_dense(layer.weight):
            layer.weight.shift_offset_(_group_delta(layer))  # QA-LoRA: codes and scales stay, offsets move
            merged.append(name)
        elif layer.adapter() is not None:
            with torch.no_grad():
                new = layer.weight.float() + layer.delta_weight()
                if layer.adapter().magnitude is not None:  # DoRA: W' = m/n ⊙ (W + ΔW)
                    state.merged_norms[name] = layer.weight_norm(layer.adapter())
                    new = new * _dora_scale(layer, state.merged_norms[name])
                if id(layer.weight) in shared:
                    base.weight = nn.Parameter(new.to(layer.weight.dtype), requires_grad=False)
                    _untie_in_config(model, state)
                else:
                    layer.weight.copy_(new)
            merged.append(name)
        replace_module(model, name, base)
        state.merged[name] = layer
    for name, wrapper in list(saved_modules(model)):
        replace_module(model, name, wrapper.current())
        state.merged[name] = wrapper
    return merged


def dequantize_and_merge_(model: nn.Module) -> list[str]:
    """QLoRA's merge: make every quantized base weight dense, then merge exactly (`merge_`).

    The dense weights hold exactly the values the adapter was trained against (the dequantized
    4-bit codes), so the merged model computes what the trained QLoRA model computed, up to float32
    rounding of W + ΔW. Nothing is re-quantized: that is a separate, explicit `lorakit.quantize_`
    call, which reports the error it makes. `unmerge_` afterwards leaves a dense base.
    """
    from lorakit.quant.api import dequantize_

    dequantize_(model)
    return merge_(model)


def unmerge_(model: nn.Module) -> list[str]:
    """Undo `merge_`: W ← W − ΔW (float32 rounding) and put the adapter layers back."""
    state = adapter_state(model)
    if not state.merged:
        raise RuntimeError("nothing to unmerge: lorakit.merge_(model) has not been called on this model")
    unmerged = []
    for name, module in state.merged.items():
        current = model.get_submodule(name)
        if isinstance(module, SavedModule):
            if current is not module.current():
                raise RuntimeError(f"{name} was replaced after merge_; cannot unmerge it")
            replace_module(model, name, module)
            continue
        layer: LoraLayer = module
        if current is not layer.base_layer:
            raise RuntimeError(f"{name} was replaced after merge_; cannot unmerge it")
        if layer.adapter() is not None and not is_dense(layer.weight):
            layer.weight.shift_offset_(-_group_delta(layer))
            unmerged.append(name)
        elif layer.adapter() is not None:
            with torch.no_grad():
                if current.weight is layer.weight:
                    w = layer.weight.float()
                    if name in state.merged_norms:  # DoRA: W = W' / (m/n) − ΔW, n as it was at merge_
                        w = w / _dora_scale(layer, state.merged_norms[name])
                    layer.weight.copy_(w - layer.delta_weight())
                current.weight = layer.weight  # a tied weight was merged into a copy: drop the copy
            unmerged.append(name)
        replace_module(model, name, layer)
    state.merged.clear()
    state.merged_norms.clear()
    if state.untied:
        model.config.tie_word_embeddings = True
        state.untied = False
    return unmerged


def _untie_in_config(model: nn.Module, state) -> None:
    """A merged tied weight is no longer tied: say so in a Hugging Face config, or saving and
    reloading the model would tie the weights again and change its outputs."""
    config = getattr(model, "config", None)
    if getattr(config, "tie_word_embeddings", False):
        config.tie_word_embeddings = False
        state.untied = True


def _dora_scale(layer: LoraLayer, norm: torch.Tensor) -> torch.Tensor:
    """m / n (float32) laid out to scale W's output channels: linear (out, 1), Conv1D (1, out),
    embedding (1, dim), convNd (out, 1, ...)."""
    scale = layer.adapter().magnitude.float() / norm.float()
    if layer.kind.startswith("conv"):
        return scale.reshape(-1, *(1 for _ in layer.weight.shape[1:]))
    return scale[None, :] if layer.transposed or layer.kind == "embedding" else scale[:, None]


def _merges_into_offsets(layer: LoraLayer) -> bool:
    """QA-LoRA on group-wise INT-N: ΔW is constant inside every weight group, so only offsets move."""
    from lorakit.quant.intn import IntNWeight

    adapter = layer.adapter()
    return (isinstance(layer.weight, IntNWeight) and adapter.group_size is not None
            and adapter.group_size % layer.weight.group_size == 0)


def _group_delta(layer: LoraLayer) -> torch.Tensor:
    """ΔW per weight group, (out, in/g_w): one column of each group of the dense update."""
    with torch.no_grad():
        return layer.delta_weight()[:, :: layer.weight.group_size]


def _shared_parameter_ids(model: nn.Module) -> set[int]:
    """ids of parameters reachable from more than one module (tied weights)."""
    seen: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        seen[id(p)] = seen.get(id(p), 0) + 1
    # a LoraLayer registers its base's weight once; its unregistered base_layer is not counted
    return {i for i, n in seen.items() if n > 1}
