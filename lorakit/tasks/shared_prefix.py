"""One forward of the prompt prefix that every row of a batch shares (a chat template's system prompt).

Rows b = 1..B of a right-padded batch, input_ids (B, T), that agree on their first P tokens: causal
attention makes the hidden states, keys and values of those positions identical in every row, so the
decoder computes them once, for one row of S = P - 1 tokens, and the B rows go on from position S with
that prefix as their key/value cache:

    prefix   decoder(ids[:1, :S], cache)              cache: keys/values (1, h_kv, S, d_head) per layer
    repeat   cache -> (B, h_kv, S, d_head)            (backward sums the B rows' gradients into the one)
    rows     decoder(ids[:, S:], mask (B, T), cache)  hidden (B, T - S, d) at positions S..T-1

The decoder's work falls from B·T to S + B·(T - S) positions: with SmolLM2's chat template (a 27-token
system prompt) on the embedded docstring rows, 47% of all tokens.

Hidden state t predicts token t + 1. Sharing S = P - 1 rather than P tokens keeps the last common token
in the rows' part, so every position that predicts a row's own tokens is there; the positions inside the
prefix predict tokens 1..S, which must carry no loss (labels[:, 1:S+1] all ignored: a prompt). Nothing
is shared (S = 0, the ordinary forward) when any condition below fails; it is never approximate:

- the batch has 2+ rows, a (B, T) attention_mask that is 1 over the prefix, and no position_ids (packed
  rows have a block-diagonal 4-D mask and their own positions);
- S >= `MIN_SHARED` tokens (a shorter prefix saves less than the second decoder call costs);
- the decoder takes a transformers `Cache` as `cache=` (transformers >= 5.24) and the model's cache is
  full attention only (a sliding window would need its own handling);
- while training with grad, no gradient checkpointing: a checkpointed block recomputes without the cache
  (`lorakit.training.recompute`), which would drop the prefix;
- while training a quantized base, its dense copies fit in `losses.HOLD_SHARE` of the free memory: the two
  decoder calls and their backwards share one dequantization per weight (`lorakit.quant.linear.hold_dense`),
  where dequantizing on the fly would take four.
"""

from __future__ import annotations

import inspect

import torch
from torch import Tensor, nn

from lorakit.data.render import IGNORE
from lorakit.quant.linear import held
from lorakit.training.recompute import is_checkpointing

MIN_SHARED = 8


def shared_length(input_ids: Tensor, labels: Tensor, attention_mask: Tensor | None) -> int:
    """S: how many leading positions the decoder can compute once for all rows (0: none). input_ids,
    labels, attention_mask: (B, T); see the module docstring for the conditions."""
    B, T = input_ids.shape
    if B < 2 or attention_mask is None or attention_mask.dim() != 2:
        return 0
    differs = (input_ids != input_ids[:1]).any(0) | (attention_mask == 0).any(0)  # (T,)
    P = int(differs.int().argmax()) if bool(differs.any()) else T  # first position where rows part
    S = min(P, T - 1) - 1  # the rows keep at least one position each, and the last common token
    if S < MIN_SHARED:
        return 0
    if bool((labels[:, 1:S + 1] != IGNORE).any()):  # positions in the prefix would have to predict a loss
        return 0
    return S


def prefix_cache(decoder: nn.Module, model: nn.Module):
    """An empty transformers `DynamicCache` for `model` when `decoder` (its body) can run on a shared prefix:
    it takes `cache=`, the cache is full attention in every layer, and no gradient checkpointing recomputes
    its blocks while training; else None."""
    try:
        parameters = inspect.signature(decoder.forward).parameters
    except (TypeError, ValueError):
        return None
    config = getattr(model, "config", None)
    if "cache" not in parameters or config is None:
        return None
    if torch.is_grad_enabled() and model.training and is_checkpointing(model):
        return None
    from transformers import DynamicCache

    cache = DynamicCache(config=config)
    if not cache.layers or any(type(layer).__name__ != "DynamicLayer" for layer in cache.layers):
        return None  # sliding-window (or other) layers: not handled
    return cache


def decode_with_shared_prefix(decoder: nn.Module, cache, input_ids: Tensor, attention_mask: Tensor, S: int) -> Tensor:
    """The decoder's last hidden states (B, T - S, d) at positions S..T-1 of `input_ids` (B, T), its first
    S tokens (common to all rows) computed once into `cache` (empty, from `prefix_cache`). Inside
    `dequantize_once()` without grad (evaluation) the prefix's keys/values are kept and reused by every later
    batch that begins with the same S tokens: a validation pass computes its system prompt once."""
    prefix = input_ids[:1, :S]

    def prefill() -> list[tuple[Tensor, Tensor]]:
        decoder(input_ids=prefix, attention_mask=attention_mask[:1, :S], cache=cache, use_cache=True)
        return [(layer.keys, layer.values) for layer in cache.layers]  # (1, h_kv, S, d_head) each

    kept = held(decoder, ("shared prefix", tuple(prefix[0].tolist())), prefill)
    if kept is None:
        prefill()
    elif cache.get_seq_length() == 0:  # kept from an earlier batch, so not computed into this cache
        for i, (keys, values) in enumerate(kept):
            cache.update(keys, values, i)
    cache.batch_repeat_interleave(input_ids.shape[0])  # new tensors: what `held` keeps stays (1, ...)
    out = decoder(input_ids=input_ids[:, S:], attention_mask=attention_mask, cache=cache, use_cache=True)
    return out.last_hidden_state
