"""One walk over a model: which modules a `target_modules` pattern selects, and how to swap them.

`inject_adapters` and `quantize_` both use this walk, with Hugging Face PEFT's matching rules so
configs written for PEFT select the same modules here:

- a string is a regular expression that must match the whole module name
  (``r".*\\.(q|v)_proj"``);
- a list matches a module whose name is in it, or ends with ``"." + item``
  (``["q_proj", "v_proj"]`` selects ``model.layers.0.self_attn.q_proj``);
- ``"all-linear"`` selects every linear layer (``nn.Linear``, GPT-2's ``Conv1D``, quantized
  linears) except the output head (``model.get_output_embeddings()``);
- ``"all-conv"`` selects every convolution with ``groups == 1`` (a vision model's 1x1 and full
  convs; depthwise convs take no adapter, see `lorakit.models.classifiers`).

`exclude_modules` uses the same rules and wins over `target_modules`.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterable, Sequence

from torch import nn

ALL_LINEAR = "all-linear"
ALL_CONV = "all-conv"
Patterns = str | Sequence[str] | None


def layer_kind(module: nn.Module) -> str | None:
    """The adapter kind of a module: ``linear``, ``embedding``, ``conv1d``, ``conv2d``, or None.

    GPT-2's ``transformers.pytorch_utils.Conv1D`` is a linear layer with a transposed weight
    (in, out); it is recognised by class name so transformers stays an optional dependency.
    Quantized linears (`lorakit.quant.QuantizedLinear`) are ``linear`` too.
    """
    if getattr(module, "is_lora_layer", False):
        return module.kind  # an adapted layer can take another named adapter
    if isinstance(module, nn.Linear) or getattr(module, "is_quantized_linear", False):
        return "linear"
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        return "linear"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if isinstance(module, nn.Conv1d):
        return "conv1d"
    if isinstance(module, nn.Conv2d):
        return "conv2d"
    return None


def matches(name: str, patterns: Patterns) -> bool:
    """PEFT's rule: a string is a full regex match; a list matches exact names or ``.``-suffixes."""
    if not patterns:
        return False
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def output_head_names(model: nn.Module) -> set[str]:
    """Names of the output head (the module `get_output_embeddings()` returns), if the model has one."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if head is None:
        return set()
    return {name for name, module in model.named_modules() if module is head}


def find_targets(
    model: nn.Module,
    target_modules: Patterns,
    exclude_modules: Patterns = None,
    accept: Callable[[str, nn.Module], bool] | None = None,
) -> list[str]:
    """Names of the modules `target_modules` selects, in `named_modules()` order.

    `accept(name, module)` filters further (e.g. "supported layer types only"). A pattern that
    selects nothing is an error listing the names it could have meant: a silent no-op would train
    nothing and look like success.
    """
    if isinstance(target_modules, str) and target_modules == ALL_LINEAR:
        heads = output_head_names(model)
        selected = [
            name for name, module in model.named_modules()
            if name and layer_kind(module) == "linear" and name not in heads
        ]
    elif isinstance(target_modules, str) and target_modules == ALL_CONV:
        selected = [
            name for name, module in model.named_modules()
            if name and (layer_kind(module) or "").startswith("conv") and getattr(module, "groups", 1) == 1
        ]
    else:
        if target_modules is None or (not isinstance(target_modules, str) and len(target_modules) == 0):
            raise ValueError(
                "target_modules is empty: name the layers to adapt, e.g. target_modules=['q_proj', 'v_proj'] "
                "or target_modules='all-linear'"
            )
        selected = [name for name, _ in model.named_modules() if name and matches(name, target_modules)]
    selected = [name for name in selected if not matches(name, exclude_modules)]
    if accept is not None:
        selected = [name for name in selected if accept(name, model.get_submodule(name))]
    if not selected:
        raise ValueError(_no_match_message(model, target_modules, exclude_modules))
    return selected


def _no_match_message(model: nn.Module, target_modules: Patterns, exclude_modules: Patterns) -> str:
    candidates = sorted({
        name.rsplit(".", 1)[-1] for name, module in model.named_modules()
        if name and layer_kind(module) is not None
    })
    wanted = [target_modules] if isinstance(target_modules, str) else list(target_modules or [])
    close = list(dict.fromkeys(c for w in wanted for c in difflib.get_close_matches(str(w), candidates, n=3)))
    hint = f" Did you mean {close}?" if close else ""
    excluded = f" (after exclude_modules={exclude_modules!r})" if exclude_modules else ""
    return (
        f"target_modules={target_modules!r} matched no supported layer{excluded}.{hint} "
        f"Adaptable layer names in this model: {candidates}. "
        "A list matches exact names or name suffixes; a string is a regex that must match the whole name; "
        "'all-linear' selects every linear layer but the output head, 'all-conv' every convolution with groups=1."
    )


def parent_of(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """The module that holds `name` and the attribute name it is held under."""
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def replace_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put `new` where `name` is; return the module it replaced."""
    parent, child = parent_of(model, name)
    old = getattr(parent, child)
    setattr(parent, child, new)
    return old


def named_modules_of_type(model: nn.Module, types: type | tuple[type, ...]) -> Iterable[tuple[str, nn.Module]]:
    return ((n, m) for n, m in model.named_modules() if isinstance(m, types))
