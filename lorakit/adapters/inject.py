"""Putting adapters into a model, choosing the active one, and reporting what trains.

    names = inject_adapters(model, LoraConfig(r=16, target_modules="all-linear"))   # in place
    print(parameter_report(model))
    with disable_adapters(model): base_logits = model(x)
    set_active(model, "other")                                                       # no reload

Every adapter has a name (default "default"). Exactly one is active at a time; its A and B (and
its `modules_to_save` copies, the adapted biases with bias="lora_only", and DoRA's magnitudes) are the only
parameters with `requires_grad`. Adding an adapter makes it the active one.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from lorakit.adapters.config import LoraConfig
from lorakit.adapters.layers import GROUPED_CONV, LoraLayer, SavedModule, lora_layers, saved_modules
from lorakit.adapters.mixed import install_routing_hooks
from lorakit.adapters.walk import find_targets, layer_kind, matches, replace_module

_NAME = re.compile(r"^[A-Za-z0-9_\-]+$")


@dataclass
class AdapterState:
    """What lorakit keeps on the root module: the adapters' configs and which one is active."""

    configs: dict[str, LoraConfig] = field(default_factory=dict)
    active: str | None = None
    merged: dict[str, nn.Module] = field(default_factory=dict)  # name -> adapter layer taken out by merge_
    merged_norms: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> DoRA's n at merge_, for unmerge_
    untied: bool = False  # merge_ set config.tie_word_embeddings False; unmerge_ restores it


def adapter_state(model: nn.Module) -> AdapterState:
    state = model.__dict__.get("_lorakit")
    if state is None:
        state = AdapterState()
        object.__setattr__(model, "_lorakit", state)
    return state


def inject_adapters(model: nn.Module, config: LoraConfig, name: str = "default", *,
                    new_modules: Mapping[str, nn.Module] | None = None) -> list[str]:
    """Add adapter `name` to the layers `config.target_modules` selects; return their names.

    In place. Layers already adapted take the new adapter beside their others. `target_modules=[]` with
    `modules_to_save` trains those modules in full and no LoRA layer (a head-only, or a full, fine-tune
    measured against LoRA with the same files and loop). The new adapter
    becomes the active one and the only thing that trains (see `set_active`). `new_modules` maps
    names in `config.modules_to_save` to the module this adapter's copy starts as, instead of a copy
    of the original (a new classifier head for this adapter's classes).
    """
    if not isinstance(config, LoraConfig):
        raise TypeError(f"config must be a lorakit.LoraConfig, got {type(config).__name__}")
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"adapter name {name!r} must be non-empty letters, digits, '_' or '-' (it becomes part of file keys)")
    state = adapter_state(model)
    if state.merged:
        raise RuntimeError("the model has merged adapters: call lorakit.unmerge_(model) before adding another")
    if name in state.configs:
        raise ValueError(f"adapter {name!r} already exists; pick another name or lorakit.delete_adapter(model, {name!r})")

    saved = config.modules_to_save or []

    def accept(module_name: str, module: nn.Module) -> bool:
        inside_saved = any(re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", module_name) for m in saved)
        return layer_kind(module) is not None and not inside_saved and not _inside_saved_module(model, module_name)

    only_saved = isinstance(config.target_modules, list) and not config.target_modules and saved
    names = [] if only_saved else find_targets(model, config.target_modules, config.exclude_modules, accept)
    grouped = [n for n in names if layer_kind(model.get_submodule(n)).startswith("conv") and model.get_submodule(n).groups != 1]
    if grouped:  # checked before any layer changes, so the model is left as it was
        raise ValueError(f"target_modules selects grouped convs {grouped[:5]}{' ...' if len(grouped) > 5 else ''} "
                         f"({len(grouped)} in all): {GROUPED_CONV}")
    new_modules = dict(new_modules or {})
    unknown = [n for n in new_modules if n not in saved]
    if unknown:
        raise ValueError(f"new_modules names {unknown}, which are not in modules_to_save={saved}; a new module "
                         f"replaces the adapter's copy of a module trained in full, so list it there too")
    attach_adapter(model, name, config, names, _saved_names(model, saved), starts=new_modules)
    return names


def attach_adapter(
    model: nn.Module,
    name: str,
    config: LoraConfig,
    module_names: list[str],
    saved_names: list[str],
    per_module: dict[str, LoraConfig] | None = None,
    starts: Mapping[str, nn.Module] | None = None,
) -> None:
    """Add adapter `name` at exactly `module_names` (and copies at `saved_names`), then activate it.

    `per_module` overrides the config for some layers (PEFT's rank_pattern / alpha_pattern); `starts`
    gives the module a saved copy starts as (default: a copy of the original).
    """
    state = adapter_state(model)
    if name in state.configs:
        raise ValueError(f"adapter {name!r} already exists; pick another name or lorakit.delete_adapter(model, {name!r})")
    per_module = per_module or {}
    for module_name in module_names:
        module = model.get_submodule(module_name)
        layer = module if isinstance(module, LoraLayer) else LoraLayer(module)
        layer.add_adapter(name, per_module.get(module_name, config))
        if layer is not module:
            replace_module(model, module_name, layer)
    for module_name in saved_names:
        module = model.get_submodule(module_name)
        wrapper = module if isinstance(module, SavedModule) else SavedModule(module)
        wrapper.add_adapter(name, (starts or {}).get(module_name))
        if wrapper is not module:
            replace_module(model, module_name, wrapper)
    state.configs[name] = config
    set_active(model, name)
    install_routing_hooks(model)  # model(..., adapter_names=[...]): one adapter per row


def _inside_saved_module(model: nn.Module, module_name: str) -> bool:
    parts = module_name.split(".")
    return any(isinstance(model.get_submodule(".".join(parts[:i])), SavedModule) for i in range(1, len(parts)))


def _saved_names(model: nn.Module, saved: list[str]) -> list[str]:
    if not saved:
        return []
    names = [n for n, m in model.named_modules() if n and matches(n, saved) and not _inside_saved_module(model, n)]
    missing = [s for s in saved if not any(matches(n, [s]) for n in names)]
    if missing:
        raise ValueError(f"modules_to_save={missing} matched no module in the model; check the names with model.named_modules()")
    containers = [n for n in names if type(model.get_submodule(n)).forward is nn.Module.forward]
    if containers:  # a ModuleList / ModuleDict is never called, so a copy of it could not replace it
        raise ValueError(f"modules_to_save names {containers}, a container with no forward of its own (e.g. a "
                         f"ModuleList); list the modules inside it instead (model.named_children())")
    nested = [(outer, n) for n in names for outer in names if n.startswith(outer + ".")]
    if nested:  # the outer copy would be the one called, leaving the inner module's copy unused
        outer, inner = nested[0]
        raise ValueError(f"modules_to_save matches {inner!r} inside {outer!r}; a module trained in full cannot hold "
                         f"another (for a task's new head, list the modules beside it, not the one around it)")
    return names


def adapter_to_write(model: nn.Module, name: str | None, what: str) -> tuple[str, LoraConfig]:
    """(name, config) of adapter `name` (default: the active one), for writing it out as `what`; a clear
    error if the adapters are merged or there is no such adapter."""
    state = adapter_state(model)
    if state.merged:
        raise RuntimeError(f"adapters are merged into the weights: call lorakit.unmerge_(model) before {what}")
    name = name or state.active
    if name not in state.configs:
        raise ValueError(f"no adapter named {name!r} for {what}; this model has {list(state.configs)}")
    return name, state.configs[name]


def adapter_names(model: nn.Module) -> list[str]:
    return list(adapter_state(model).configs)


def active_adapter(model: nn.Module) -> str | None:
    return adapter_state(model).active


def set_active(model: nn.Module, name: str) -> None:
    """Make adapter `name` the one that runs and trains. Cheap: flips flags, reloads nothing."""
    state = adapter_state(model)
    if name not in state.configs:
        raise ValueError(f"no adapter named {name!r}; this model has {list(state.configs)}")
    config = state.configs[name]
    for p in model.parameters():
        p.requires_grad_(False)
    for _, layer in lora_layers(model):
        layer.active = name if name in layer.lora else None
        if layer.active is not None:
            adapter = layer.lora[name]
            adapter.A.requires_grad_(True)
            adapter.B.requires_grad_(True)
            if adapter.magnitude is not None:  # DoRA
                adapter.magnitude.requires_grad_(True)
            if config.bias == "lora_only" and layer.bias is not None:
                layer.bias.requires_grad_(True)
    for _, wrapper in saved_modules(model):
        wrapper.active = name if name in wrapper.copies else None
        if wrapper.active is not None:
            wrapper.copies[name].requires_grad_(True)
    state.active = name


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter `name` everywhere; layers left with no adapter go back to the base layer."""
    state = adapter_state(model)
    if name not in state.configs:
        raise ValueError(f"no adapter named {name!r}; this model has {list(state.configs)}")
    for module_name, layer in list(lora_layers(model)):
        if name in layer.lora:
            layer.delete_adapter(name)
            if not layer.lora:
                replace_module(model, module_name, layer.base_layer)
    for module_name, wrapper in list(saved_modules(model)):
        if name in wrapper.copies:
            wrapper.delete_adapter(name)
            if not wrapper.copies:
                replace_module(model, module_name, wrapper.original)
    del state.configs[name]
    if state.active == name:
        state.active = None
        if state.configs:
            set_active(model, next(iter(state.configs)))


@contextmanager
def disable_adapters(model: nn.Module) -> Iterator[None]:
    """Run the base model inside the block (for PiSSA, the original weights, not the residual)."""
    modules = [m for _, m in lora_layers(model)] + [m for _, m in saved_modules(model)]
    before = [m.disabled for m in modules]
    for m in modules:
        m.disabled = True
    try:
        yield
    finally:
        for m, was in zip(modules, before):
            m.disabled = was


@dataclass(frozen=True)
class ParameterReport:
    trainable: int
    total: int
    active: str | None
    adapters: tuple[str, ...]

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        others = [a for a in self.adapters if a != self.active]
        return (
            f"trainable params: {self.trainable:,} || all params: {self.total:,} || "
            f"trainable%: {self.percent:.4f} || active adapter: {self.active}"
            + (f" (also loaded: {', '.join(others)})" if others else "")
        )

    __repr__ = __str__


def parameter_report(model: nn.Module) -> ParameterReport:
    """Trainable and total parameter counts. A quantized weight counts its logical elements."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    total += sum(_numel(m.shape) for m in model.modules() if _is_quantized_weight(m))
    state = adapter_state(model)
    return ParameterReport(trainable, total, state.active, tuple(state.configs))


def _is_quantized_weight(module: nn.Module) -> bool:
    return callable(getattr(module, "dequantize", None)) and hasattr(module, "shape") and not list(module.parameters(recurse=False))


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n
