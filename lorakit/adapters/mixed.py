"""Mixed-adapter batches: one adapter per row of a batch (or the base model for a row).

    logits = model(input_ids, adapter_names=["math", "__base__", "chat", "math"]).logits   # (4, T, vocab)
    with lorakit.mixed_adapters(model, names):                                             # every forward inside,
        out = model.generate(ids, attention_mask=mask)                                     # prefill and decode

Row i computes what the model computes for that row alone with adapter names[i] active (None or
"__base__": no adapter, as in `disable_adapters`). An adapter that does not touch a layer leaves
that layer's rows at the base output, exactly as when it is the active one.

Per adapted layer, with rows R_a = {i : names[i] = a}:

    y      = base(x)                                   one base GEMM for the whole batch (B, ..., out)
    y[R_a] += s_a · B_a A_a pool(x[R_a])               one A and one B GEMM per adapter present

A group whose rows are consecutive is a slice (a view of x, an in-place add into y); otherwise an
index (a gather and an index_add). `modules_to_save` copies run once per adapter on its rows.

The names reach every `LoraLayer` and `SavedModule` as a `Routes` object for the duration of one
root forward: `attach_adapter` installs a forward pre-hook (with kwargs) on the root module that
takes `adapter_names` out of the call, and a forward hook (always called) that clears it. The
routing is model-wide state: one mixed forward at a time per model.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from lorakit.adapters.layers import LoraLayer, SavedModule, lora_layers, saved_modules

BASE = "__base__"  # PEFT's name for "no adapter on this row"
KWARG = "adapter_names"


@dataclass(frozen=True)
class Routes:
    """Which rows of the batch go through which adapter.

    rows:    the batch size the names cover
    groups:  ((adapter name, rows), ...), one per adapter present; rows a slice or a LongTensor (n,)
    """

    rows: int
    groups: tuple[tuple[str, slice | torch.Tensor], ...]

    def _check(self, x: torch.Tensor, where: nn.Module) -> None:
        if x.shape[0] != self.rows:
            raise ValueError(f"adapter_names has {self.rows} names but a {type(where).__name__} received a batch of "
                             f"{x.shape[0]} rows (input shape {tuple(x.shape)}); give one name per row")

    def layer_forward(self, layer: LoraLayer, x: torch.Tensor) -> torch.Tensor:
        """`layer`'s output with each group's adapter on its rows: (B, ...) -> (B, ..., out)."""
        self._check(x, layer)
        out = layer.base_forward(x)
        if layer.disabled:
            return out
        for name, rows in self.groups:
            adapter = layer.lora[name] if name in layer.lora else None
            if adapter is None:
                continue
            part = x[rows]
            if layer.moves_offsets(adapter):
                update = layer.offset_forward(adapter, part)  # as LoraLayer.forward: QA-LoRA on deployed offsets
            else:
                update = layer.adapter_forward(adapter, part)
            if isinstance(rows, slice):
                out[rows] += update.to(out.dtype)
            else:
                out.index_add_(0, rows, update.to(out.dtype))
        return out

    def saved_forward(self, module: SavedModule, *args, **kwargs):
        """`modules_to_save`: the original on every row, then each adapter's copy on its rows."""
        if len(args) != 1 or kwargs or not isinstance(args[0], torch.Tensor):
            raise ValueError(f"a mixed-adapter batch routes a {type(module.original).__name__} in modules_to_save only "
                             f"when it takes one tensor argument; this call passes {len(args)} positional and "
                             f"{sorted(kwargs)} keyword arguments")
        x = args[0]
        self._check(x, module)
        out = module.original(x)
        if module.disabled:
            return out
        out = out.clone()  # the original's output may alias its buffers (e.g. an identity module)
        for name, rows in self.groups:
            if name in module.copies:
                out[rows] = module.copies[name](x[rows]).to(out.dtype)
        return out


def routes_for(model: nn.Module, names: Sequence[str | None], device: torch.device | None = None) -> Routes:
    """Group `names` (one per row; None or "__base__": the base) into `Routes`, checking each name."""
    from lorakit.adapters.inject import adapter_state

    if isinstance(names, str) or not isinstance(names, Sequence):
        raise TypeError(f"{KWARG} must be a list with one adapter name per row, got {type(names).__name__} {names!r}")
    if not names:
        raise ValueError(f"{KWARG} is empty: give one adapter name (or {BASE!r}) per row of the batch")
    state = adapter_state(model)
    if state.merged:
        raise RuntimeError(f"adapters {sorted(state.merged)} are merged into the weights: call lorakit.unmerge_(model) "
                           f"before a mixed-adapter batch")
    rows_of: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        if name is None or name == BASE:
            continue
        if name not in state.configs:
            raise ValueError(f"{KWARG}[{i}] = {name!r} is not an adapter of this model; it has {list(state.configs)} "
                             f"(or {BASE!r} / None for the base model)")
        rows_of.setdefault(name, []).append(i)
    for name in rows_of:
        config = state.configs[name]
        if config.init == "pissa" or config.use_dora:
            kind = "PiSSA" if config.init == "pissa" else "DoRA"
            raise ValueError(f"adapter {name!r} is a {kind} adapter, which mixed-adapter batches do not route "
                             f"(it changes the base weight or its norm); run it alone with lorakit.set_active")
        if config.bias != "none":
            raise ValueError(f"adapter {name!r} trains the base biases (bias={config.bias!r}), which all rows share; "
                             f"run it alone with lorakit.set_active")
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    groups = []
    for name, rows in rows_of.items():
        if rows[-1] - rows[0] + 1 == len(rows):  # consecutive: a view, no gather
            groups.append((name, slice(rows[0], rows[-1] + 1)))
        else:
            groups.append((name, torch.tensor(rows, dtype=torch.long, device=device)))
    return Routes(len(names), tuple(groups))


def _route(model: nn.Module, routes: Routes | None) -> None:
    for _, layer in lora_layers(model):
        layer.routes = routes
    for _, wrapper in saved_modules(model):
        wrapper.routes = routes


@contextmanager
def mixed_adapters(model: nn.Module, names: Sequence[str | None]) -> Iterator[None]:
    """Inside the block every forward of `model` runs adapter names[i] on row i (None / "__base__": the base)."""
    if any(layer.routes is not None for _, layer in lora_layers(model)):
        raise RuntimeError("a mixed-adapter batch is already running on this model (adapter_names given twice, or "
                           "mixed_adapters nested); one routing at a time")
    routes = routes_for(model, names)
    _route(model, routes)
    try:
        yield
    finally:
        _route(model, None)


def _pre_hook(module: nn.Module, args: tuple, kwargs: dict):
    """Forward pre-hook on the root: `adapter_names=[...]` routes this forward (kept out of the model's own call)."""
    if KWARG not in kwargs:
        return None
    names = kwargs.pop(KWARG)
    if names is None:
        return args, kwargs
    if any(layer.routes is not None for _, layer in lora_layers(module)):
        raise RuntimeError(f"{KWARG}= was given inside `with lorakit.mixed_adapters(...)`: use one or the other")
    _route(module, routes_for(module, names))
    module.__dict__["_lorakit_routed_by_kwarg"] = True
    return args, kwargs


def _post_hook(module: nn.Module, args: tuple, kwargs: dict, output):
    if module.__dict__.pop("_lorakit_routed_by_kwarg", False):
        _route(module, None)
    return None


def install_routing_hooks(model: nn.Module) -> None:
    """Make `model(..., adapter_names=[...])` work (once per root module; `attach_adapter` calls it)."""
    if model.__dict__.get("_lorakit_routing_hooks"):
        return
    model.register_forward_pre_hook(_pre_hook, with_kwargs=True)
    model.register_forward_hook(_post_hook, with_kwargs=True, always_call=True)
    model.__dict__["_lorakit_routing_hooks"] = True
