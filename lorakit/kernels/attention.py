"""Attention over short queries computed in float32 on a CPU that trains in bf16 or fp16.

PyTorch's CPU kernel for `scaled_dot_product_attention` (its flash attention: blocks of queries against
blocks of keys, an online softmax in float32) is slow in bf16 on short queries: measured on a 2-core
AVX512-BF16 + AMX Xeon (torch 2.13, 9 heads of 64, a 25-token shared prefix, forward + backward, the
median of 6 alternations, the fp32 side including its casts):

    query tokens                    26     64    128    256    384    512    768   1024   2000
    bf16 time / fp32 time         1.62   1.53   1.31   0.83   0.76   1.27   0.66   0.70   0.71

Below ~256 query tokens the bf16 kernel's blocks are too small to pay for themselves and the same call on
float32 copies is faster; from ~256 on bf16 wins (the 512 point is this VM's noise). So on a CPU, for a
bf16/fp16 query of fewer than `UPCAST_BELOW` tokens, q, k, v are cast to float32, attention runs there, and
the output is cast back (the gradients flow back through the casts):

    O = fp32→dtype( softmax(q32 k32ᵀ · scale + mask) v32 )          q (B, h, T, d), k, v (B, h_kv, S, d)

The bf16 kernel already accumulates and takes its softmax in float32; the float32 one also keeps the
probabilities P in float32 for P·V (the bf16 kernel rounds them to bf16 first), so the result differs by
rounding only, towards the more precise. Elsewhere (GPU, fp32, long queries) the call is unchanged.

`sdpa` is the call; `fuse_attention_(model)` makes a transformers model's attention go through it for
training (the model's own `sdpa` attention function, `sdpa_attention_forward`, with its q, k, v cast), by
naming a registered attention function in the model's config; `unfuse_attention_` names `sdpa` again.
`float32_attention(model)` does both around a block (evaluation: the same numbers inside and outside a
training run). Generation is left alone: a one-token query would cast the whole KV cache at every step.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

UPCAST_BELOW = 256  # query tokens: below this, CPU attention in bf16/fp16 runs in float32 (the table above)
REDUCED = (torch.bfloat16, torch.float16)  # the compute dtypes whose short-query CPU attention runs in float32
NAME = "lorakit_sdpa"  # the attention function's name in transformers' tables


def upcast(query: Tensor) -> bool:
    """Whether attention over `query` (..., T, d) runs in float32: a CPU tensor in bf16 or fp16 with T <
    `UPCAST_BELOW`."""
    return query.device.type == "cpu" and query.dtype in REDUCED and query.shape[-2] < UPCAST_BELOW


def _float(mask: Tensor | None) -> Tensor | None:
    """A floating (additive) mask in float32 beside float32 q, k, v; a boolean mask or None as it is."""
    return mask.float() if mask is not None and mask.is_floating_point() else mask


def sdpa(query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None = None, **kwargs) -> Tensor:
    """`F.scaled_dot_product_attention(query, key, value, attn_mask, **kwargs)`, in float32 where `upcast(query)`
    (the module docstring) and cast back to query's dtype."""
    if not upcast(query):
        return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, **kwargs)
    return F.scaled_dot_product_attention(query.float(), key.float(), value.float(), attn_mask=_float(attn_mask),
                                          **kwargs).to(query.dtype)


def attention_forward(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                      attention_mask: Tensor | None, **kwargs) -> tuple[Tensor, None]:
    """transformers' `sdpa_attention_forward` (its mask handling, GQA, causal flag), over float32 q, k, v where
    `upcast(query)`: query (B, h, T, d), key and value (B, h_kv, S, d) -> (B, T, h, d) in query's dtype."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if not upcast(query):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    out, weights = sdpa_attention_forward(module, query.float(), key.float(), value.float(), _float(attention_mask),
                                          **kwargs)
    return out.to(query.dtype), weights


@functools.cache
def _register() -> None:
    """transformers learns `attention_forward` by name, once, with the sdpa mask it expects (a 2-D padding mask
    becomes sdpa's boolean mask, or none when causal alone is exact)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)


def _configs(model: nn.Module) -> list:
    """The model's config and its sub-configs that name an attention implementation (a multimodal model's
    text config)."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "_attn_implementation_internal"):
        return []
    subs = [getattr(config, name, None) for name in getattr(config, "sub_configs", {}) or {}]
    return [config] + [c for c in subs if c is not None and hasattr(c, "_attn_implementation_internal")]


def fuse_attention_(model: nn.Module) -> int:
    """Route a transformers model's `sdpa` attention through `attention_forward` where it can gain: the model on
    a CPU in bf16 or fp16 (its first floating-point parameter). Returns how many configs now name it (0 where
    nothing changed: another device, fp32, or an attention other than sdpa, e.g. eager for a soft cap)."""
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    if param is None or param.device.type != "cpu" or param.dtype not in REDUCED:
        return 0
    count = 0
    for config in _configs(model):
        if config._attn_implementation_internal == "sdpa":
            _register()
            config._attn_implementation_internal = NAME
            count += 1
    return count


def unfuse_attention_(model: nn.Module) -> int:
    """Name `sdpa` again wherever `fuse_attention_` named `attention_forward`; returns how many configs."""
    count = 0
    for config in _configs(model):
        if config._attn_implementation_internal == NAME:
            config._attn_implementation_internal = "sdpa"
            count += 1
    return count


@contextlib.contextmanager
def float32_attention(model: nn.Module):
    """Inside the block, `fuse_attention_(model)`; after it, undone where the block did it (a model the training
    loop fused stays fused). Yields how many configs the block switched."""
    switched = fuse_attention_(model)
    try:
        yield switched
    finally:
        if switched:
            unfuse_attention_(model)
