"""Gradient (activation) checkpointing of the repeated decoder blocks.

Without it, backward needs every activation each block saved in forward: for L blocks,
about L * (B, T, d) * (a few dozen) values. With it, each block keeps only its input (the
checkpoint's recompute closure holds it) and recomputes its forward during backward: one extra
forward of the blocks, for activation memory of L block inputs plus one block's internals.

Each block's ``forward`` is replaced on the instance (a bound method; the class and the
state-dict keys are untouched) by one that runs the original under
``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)`` while the block is training and
grad is enabled. The non-reentrant variant passes keyword arguments through (HF decoder layers take
``position_embeddings``, ``attention_mask``, ...) and yields gradients for parameters inside the
block even when the block's inputs do not require grad, as with adapters on a frozen base.

A key/value cache cannot be checkpointed (the recompute would append to it a second time, and
attention then sees twice the keys: transformers 5.24's "size of tensor a (48) must match ... (24)"),
so while checkpointing, ``use_cache`` is passed as False and the cache as None, as transformers' own
checkpointing does. The cache argument has had several names (``past_key_values``,
``past_key_value``, ``layer_past``, and ``cache`` since transformers 5.24), so besides those names any
keyword argument holding a transformers ``Cache`` object is dropped too. Training does not use a cache.
"""

from __future__ import annotations

import types

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

_INNER = "_lorakit_unchecked_forward"  # the block's forward before wrapping
_CACHE_OFF = {"use_cache": False, "past_key_values": None, "past_key_value": None, "layer_past": None, "cache": None}


def _is_cache(value) -> bool:
    """A transformers ``Cache`` (any subclass), recognised without importing transformers. (Tensors, tuples
    and plain values first: compiled code (`train.compile`) cannot walk a type's ``__mro__``.)"""
    if value is None or isinstance(value, (torch.Tensor, tuple, bool, int, float, str)):
        return False
    return any(cls.__name__ == "Cache" for cls in type(value).__mro__)


def _checkpointed_forward(self: nn.Module, *args, **kwargs):
    """The block's own forward, under a non-reentrant checkpoint while training with grad."""
    inner = getattr(self, _INNER)
    if not (self.training and torch.is_grad_enabled()):
        return inner(*args, **kwargs)
    kwargs.update({key: value for key, value in _CACHE_OFF.items() if key in kwargs})
    kwargs.update({key: None for key, value in kwargs.items() if _is_cache(value)})
    return checkpoint(inner, *args, use_reentrant=False, **kwargs)


def find_blocks(model: nn.Module) -> nn.ModuleList:
    """The repeated blocks: the largest ``nn.ModuleList`` whose children all have one type
    (``model.model.layers`` in Llama, ``transformer.h`` in GPT-2)."""
    best = None
    for module in model.modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        identical = len({type(block) for block in module}) == 1
        if identical and (best is None or len(module) > len(best)):
            best = module
    if best is None:
        raise ValueError(
            f"{type(model).__name__} has no nn.ModuleList of identical blocks; pass blocks= "
            f"(the ModuleList of decoder layers) to enable_gradient_checkpointing"
        )
    return best


def enable_gradient_checkpointing(model: nn.Module, blocks: nn.ModuleList | None = None) -> int:
    """Checkpoint every block of `blocks` (default: `find_blocks(model)`) in training. Returns
    the number of blocks wrapped now (blocks already wrapped are left as they are)."""
    blocks = find_blocks(model) if blocks is None else blocks
    if not isinstance(blocks, nn.ModuleList):
        raise TypeError(f"blocks must be an nn.ModuleList of decoder layers, got {type(blocks).__name__}")
    wrapped = 0
    for block in blocks:
        if hasattr(block, _INNER):
            continue
        if getattr(block, "gradient_checkpointing", False):
            raise ValueError(
                f"{type(block).__name__} is already checkpointed by transformers; call "
                f"model.activation_checkpointing_disable() (before transformers 5.23: "
                f"gradient_checkpointing_disable()) first, or don't checkpoint twice"
            )
        setattr(block, _INNER, block.forward)
        block.forward = types.MethodType(_checkpointed_forward, block)
        wrapped += 1
    return wrapped


def disable_gradient_checkpointing(model: nn.Module) -> int:
    """Undo `enable_gradient_checkpointing` on every wrapped block of `model`; returns how many."""
    unwrapped = 0
    for block in model.modules():
        inner = block.__dict__.pop(_INNER, None)
        if inner is None:
            continue
        if getattr(inner, "__func__", None) is type(block).forward and inner.__self__ is block:
            del block.forward  # the class's forward shows through again
        else:
            block.forward = inner  # an instance forward set before ours (e.g. accelerate's hooks)
        unwrapped += 1
    return unwrapped


def is_checkpointing(model: nn.Module) -> bool:
    """Whether blocks of `model` recompute their forward in backward: lorakit's `enable_gradient_checkpointing`
    or transformers' own `gradient_checkpointing_enable()` (its modules' `gradient_checkpointing` flag)."""
    return any(_INNER in m.__dict__ or getattr(m, "gradient_checkpointing", False) is True for m in model.modules())
