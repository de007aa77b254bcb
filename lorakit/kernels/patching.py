"""Swapping a fused forward into module instances, and taking it out again.

The swap sets `forward` on the instance only (its class and state-dict keys are untouched), so
undoing it is deleting that attribute."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn


def patch_forward(module: nn.Module, fn: Callable) -> None:
    module.forward = fn.__get__(module)


def unpatch_forward(model: nn.Module, fn: Callable) -> int:
    """Remove `fn` wherever `patch_forward` put it; return how many modules were restored."""
    count = 0
    for module in model.modules():
        if "forward" in module.__dict__ and getattr(module.forward, "__func__", None) is fn:
            del module.forward
            count += 1
    return count
