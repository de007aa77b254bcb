"""Load a Hugging Face checkpoint straight into a quantized model, one tensor at a time.

The model is built with its parameters on the meta device (buffers such as RoPE's ``inv_freq`` are
computed for real), then the ``*.safetensors`` files are read tensor by tensor. A selected linear
weight is cast to `dtype` and quantized as it arrives (NF4 blocks or INT-N groups: the same bytes
`quantize_` would produce from ``from_pretrained(..., dtype=dtype)``); every other tensor is copied into
the model in `dtype`.
Peak memory is the quantized model plus a few copies of the largest single tensor, never the
whole full-precision model. Tied weights (lm_head ↔ embed_tokens) are tied at the end.

Keys must match the model's state-dict names (what ``save_pretrained`` writes): a missing or an
unexpected key is an error, as is a shape mismatch. Checkpoints that need transformers' key
renaming or weight conversion (e.g. fused MoE experts) should be loaded dense and quantized with
`quantize_`.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor, nn

from lorakit.io import check_safetensors, read_json
from lorakit.quant.api import IntNConfig, NF4Config, check_linear_targets
from lorakit.quant.intn import check_group_size
from lorakit.quant.linear import QuantizedLinear, quantize_weight
from lorakit.adapters.walk import find_targets, replace_module

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class StreamMismatch(ValueError):
    """The checkpoint holds tensors the model does not have by those names (e.g. keys transformers renames on
    load): such a checkpoint can still be loaded dense. One that only lacks tensors raises a plain ValueError."""


def checkpoint_files(model_dir: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint: the shards its index names, or the single file. Each file's
    header is read and checked against its size, so a missing, truncated or corrupted shard is a clear
    error here instead of a failure deep inside loading."""
    model_dir = Path(model_dir)
    if (model_dir / INDEX_FILE).exists():
        index = read_json(model_dir / INDEX_FILE, "safetensors index")
        if not isinstance(index, dict) or not isinstance(index.get("weight_map"), dict):
            raise ValueError(f"{model_dir / INDEX_FILE} has no \"weight_map\" object; the file is corrupted")
        files = [model_dir / str(name) for name in sorted(set(map(str, index["weight_map"].values())))]
    elif (model_dir / SINGLE_FILE).exists():
        files = [model_dir / SINGLE_FILE]
    else:
        raise FileNotFoundError(
            f"no {SINGLE_FILE} or {INDEX_FILE} in {model_dir}; save the model with save_pretrained(..., "
            "safe_serialization=True) (lorakit never loads pickled .bin checkpoints)"
        )
    for path in files:
        check_safetensors(path, "model weights")
    return files


def stream_tensors(files: list[Path]) -> Iterator[tuple[str, Tensor]]:
    """Yield (key, tensor) for every tensor of the safetensors `files`, one at a time.

    A tensor is a view of the memory-mapped file. The file is reopened for each tensor: the pages of a
    tensor already read then leave memory with it, rather than stay mapped until the file closes.
    """
    from safetensors import safe_open

    for path in files:
        with safe_open(path, framework="pt", device="cpu") as f:
            keys = list(f.keys())
        for key in keys:
            with safe_open(path, framework="pt", device="cpu") as f:
                tensor = f.get_tensor(key)
            yield key, tensor
            del tensor


def load_quantized(
    model_dir: str | Path,
    config: NF4Config | IntNConfig | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    model_class=None,
    filter_fn=None,
) -> nn.Module:
    """A transformers model from `model_dir` with the linears `config` selects quantized as they stream in:
    NF4/FP4 blocks (`NF4Config`, the default) or INT-N groups rounded to nearest (`IntNConfig`, QA-LoRA's base;
    GPTQ needs the dense model and calibration data: load it and use `quantize_`).

    `model_class` defaults to ``AutoModelForCausalLM``; `filter_fn(name, module)` narrows the selection
    as in `quantize_`. The model is returned in eval mode, like ``from_pretrained``.
    """
    try:
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM
    except ImportError as e:
        hint = "load_quantized needs transformers and accelerate: pip install transformers accelerate"
        raise ImportError(hint) from e

    config = config or NF4Config()
    if getattr(config, "method", "rtn") != "rtn":
        raise ValueError(f"load_quantized streams round-to-nearest weights; IntNConfig(method={config.method!r}) "
                         "needs the dense model and calibration data: load it with from_pretrained, then "
                         "lorakit.quantize_(model, config, calibration=...)")
    files = checkpoint_files(model_dir)
    with init_empty_weights(include_buffers=False):
        model = (model_class or AutoModelForCausalLM).from_config(AutoConfig.from_pretrained(model_dir), dtype=dtype)
    targets = find_targets(model, config.target_modules, config.exclude_modules, accept=filter_fn)
    check_linear_targets(model, targets)
    if isinstance(config, IntNConfig):  # every layer checked before anything is read
        for name in targets:
            check_group_size(config.group_size, model.get_submodule(name).in_features, name)

    weight_keys = {f"{name}.weight": name for name in targets}
    unexpected = []
    for key, tensor in stream_tensors(files):
        if key in weight_keys:
            _quantize_into(model, weight_keys[key], tensor.to(dtype), config)
        elif not _copy_into(model, key, tensor, dtype):
            unexpected.append(key)
        del tensor  # drop the memory map of this tensor before reading the next
    model.tie_weights()
    _check_complete(model, targets, unexpected, model_dir)
    return model.eval()


def _quantize_into(model: nn.Module, name: str, weight: Tensor, config: NF4Config | IntNConfig) -> None:
    dense = model.get_submodule(name)
    _check_shape(name + ".weight", dense.weight, weight)
    replace_module(model, name, QuantizedLinear(quantize_weight(weight, config), dense.bias))  # a bias on meta arrives later


def _copy_into(model: nn.Module, key: str, tensor: Tensor, dtype: torch.dtype) -> bool:
    """Put a copy of `tensor` (in `dtype` if floating) where `key` names; False if the model has no such tensor."""
    module_name, _, attr = key.rpartition(".")
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        return False
    value = tensor.to(dtype if tensor.is_floating_point() else tensor.dtype, copy=True)
    if attr in module._parameters:
        old = module._parameters[attr]
        _check_shape(key, old, value)
        module._parameters[attr] = nn.Parameter(value, requires_grad=old.requires_grad)
    elif attr in module._buffers and attr not in module._non_persistent_buffers_set:
        _check_shape(key, module._buffers[attr], value)
        module._buffers[attr] = value
    else:
        return False
    return True


def _check_shape(key: str, expected: Tensor, got: Tensor) -> None:
    if expected.shape != got.shape:
        raise ValueError(
            f"checkpoint tensor {key} has shape {tuple(got.shape)} but the model built from config.json expects "
            f"{tuple(expected.shape)}: the checkpoint and its config.json disagree"
        )


def _check_complete(model: nn.Module, targets: list[str], unexpected: list[str], model_dir) -> None:
    not_quantized = [n for n in targets if not isinstance(model.get_submodule(n), QuantizedLinear)]
    missing = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if not (not_quantized or missing or unexpected):
        return
    problems = []
    if not_quantized:
        problems.append(
            f"no weight in the checkpoint for selected layers {not_quantized} (a head tied to the embeddings has "
            "none: exclude it, e.g. exclude_modules=['lm_head'])"
        )
    if missing:
        problems.append(f"missing tensors {missing}")
    if unexpected:
        problems.append(f"tensors the model does not have {unexpected}")
    error = StreamMismatch if unexpected else ValueError  # only missing: an incomplete checkpoint, never loaded
    raise error(
        f"cannot stream {model_dir} into {type(model).__name__}: " + "; ".join(problems)
        + ". Keys must match the model's state-dict names; otherwise load it dense (from_pretrained), then quantize_."
    )
