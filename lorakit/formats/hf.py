"""Dense Hugging Face export of a merged model: a directory `transformers` loads with
`AutoModelForCausalLM.from_pretrained`, holding float weights.

Quantized layers (NF4, INT-N) are written as their dequantized values: exactly the numbers the
merged model computes with, so the exported model's outputs equal lorakit's up to the dtype
written. The directory is built under a temporary name beside the target and renamed into place:
an interrupted export leaves the previous directory untouched. An existing directory is replaced only
when it is an earlier lorakit export (it holds `lorakit_export.json`) or `overwrite=True`: pointing
`--out` at a base model or any directory of one's own never deletes it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from torch import nn

from lorakit.io import plain_modes_, temp_dir_beside, write_json
from lorakit.adapters.layers import LoraLayer, SavedModule
from lorakit.quant.linear import QuantizedLinear


def dense_state_dict(model: nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The model's state dict with every quantized linear as a dense `<name>.weight` (and bias)."""
    adapters = [n for n, m in model.named_modules() if isinstance(m, (LoraLayer, SavedModule))]
    if adapters:
        raise ValueError(
            f"the model still has adapter layers ({adapters[:3]}{'...' if len(adapters) > 3 else ''}): merge first "
            "with lorakit.merge_(model) (LoRA, QA-LoRA) or lorakit.dequantize_and_merge_(model) (QLoRA)"
        )
    quantized = {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    out = {}
    for key, value in model.state_dict().items():
        owner = key.rsplit(".weight.", 1)[0] if ".weight." in key else None
        if owner in quantized:
            continue  # the packed buffers; written below as one dense weight
        out[key] = value.to(dtype) if dtype is not None and value.is_floating_point() else value
    for name, module in quantized.items():
        out[f"{name}.weight"] = module.weight.dequantize(dtype or module.weight.dtype)
        if module.bias is not None:
            out[f"{name}.bias"] = module.bias.detach().to(dtype or module.bias.dtype)
    return out


MARKER = "lorakit_export.json"  # marks a directory export_hf wrote, which a later export may replace


def export_hf(model: nn.Module, directory: str | os.PathLike, tokenizer=None, dtype: torch.dtype | None = None,
              overwrite: bool = False) -> Path:
    """Write a merged model as a dense Hugging Face directory (safetensors); return its path."""
    if not hasattr(model, "save_pretrained"):
        raise TypeError(f"{type(model).__name__} is not a Hugging Face model (no save_pretrained); "
                        "use lorakit.formats.hf.dense_state_dict and save it yourself")
    directory = Path(directory)
    if directory.exists() and not overwrite and not (directory / MARKER).is_file() and (
            not directory.is_dir() or any(directory.iterdir())):
        raise ValueError(f"{directory} exists and is not an earlier lorakit export; nothing was written. Choose a new "
                         f"directory, or replace it with overwrite=True (lorakit merge/export: --force)")
    state = dense_state_dict(model, dtype)
    tmp = temp_dir_beside(directory)
    try:
        model.save_pretrained(tmp, state_dict=state, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_json(tmp / MARKER, {"written_by": "lorakit.export_hf", "dtype": str(dtype or "as trained")})
        plain_modes_(tmp)
        old = None
        if directory.exists():
            old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
            os.replace(directory, old)
        os.replace(tmp, directory)
        if old is not None:
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return directory
