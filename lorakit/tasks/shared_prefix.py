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

While training a Llama-family decoder (grad on), the prefix instead runs as row 0 of the rows' own decoder
call, so one call (and one backward) does the work of two:

    batch    (B + 1, T'), T' = max(S, T - S): row 0 the prefix ids[0, :S], rows 1..B ids[:, S:] (right-padded)
    positions  row 0: 0..T'-1; rows 1..B: S..S+T'-1
    attention  row 0 causal over itself; each row b over [row 0's first S keys/values ; its own, causal]:
               softmax(q_b [K_0[:S] ; K_b]ᵀ · scale + mask) [V_0[:S] ; V_b],  mask (T', S + T') allowing
               every prefix key and own keys j <= i
    hidden   rows 1..B, their first T - S positions

the same keys, values and softmax as the cached form (which concatenates the repeated prefix keys before the
rows' own), so the same loss and gradients to float rounding. On the embedded rows (8 rows of ~57 tokens) a
second decoder call of 26 positions cost its fixed per-layer work more than its FLOPs: 1.13-1.17x per step
(LoRA, QLoRA, QA-LoRA). Only where the padding it adds (`row_padding`) is at most `CALL_COST` positions: long
rows (a 500-token row after a 25-token prefix) keep two calls rather than pad row 0 by 450. Evaluation keeps
the cached form: there the prefix is computed once for a whole validation pass.

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

import functools
import inspect

import torch
from torch import Tensor, nn

from lorakit.data.render import IGNORE
from lorakit.kernels.attention import sdpa
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
    S tokens (common to all rows) computed once: while training a Llama-family decoder as row 0 of the rows'
    own call (`decode_prefix_as_row`), else into `cache` (empty, from `prefix_cache`). Inside
    `dequantize_once()` without grad (evaluation) the prefix's keys/values are kept and reused by every later
    batch that begins with the same S tokens: a validation pass computes its system prompt once."""
    if (torch.is_grad_enabled() and row_padding(*input_ids.shape, S) <= CALL_COST and prefix_as_row(decoder)
            and right_padded(attention_mask)):
        return decode_prefix_as_row(decoder, input_ids, S)
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


# ---- the prefix as row 0 of the rows' decoder call (training) --------------------------------------------------

# A second decoder call (forward and backward) costs about this many positions beyond its own: its fixed
# per-layer work (the 26-position prefix call of an 8 x 57-token step took ~0.15-0.2 s, ~40 positions' worth).
# The prefix runs as row 0 when that saves more than the row's padding costs (`row_padding`).
CALL_COST = 64
ROW_MODEL_TYPES = frozenset({"llama"})  # attention is plain softmax(q kᵀ · scale) v: no window, soft cap or sinks
_ATTENTION = "lorakit_shared_prefix"


def prefix_as_row(decoder: nn.Module) -> bool:
    """Whether `decoder` can run a shared prefix as row 0 of the rows' call: a Llama-family body whose attention
    is plain (`ROW_MODEL_TYPES`), without attention dropout at work, whose config picks the attention function
    by name (transformers >= 5)."""
    config = getattr(decoder, "config", None)
    if (getattr(config, "model_type", None) not in ROW_MODEL_TYPES
            or not hasattr(config, "_attn_implementation_internal")):
        return False
    if decoder.training and float(getattr(config, "attention_dropout", 0.0) or 0.0) > 0:
        return False
    try:
        _register_attention()
    except ImportError:
        return False
    return True


@functools.cache
def _register_attention() -> None:
    """transformers' table of attention functions learns `_prefix_row_attention` by name, once; a model uses it
    only while `decode_prefix_as_row` names it in its config."""
    from transformers import AttentionInterface

    AttentionInterface.register(_ATTENTION, _prefix_row_attention)


def row_padding(B: int, T: int, S: int) -> int:
    """Padding positions `decode_prefix_as_row` adds for B rows of T tokens sharing S: all rows are T' =
    max(S, T - S) wide, so a prefix shorter than the rows' part pads row 0 by T - 2S, a longer one each row by
    2S - T."""
    return (T - 2 * S) if T - S >= S else B * (2 * S - T)


def right_padded(attention_mask: Tensor) -> bool:
    """Whether every row of a (B, T) mask is ones, then zeros: padding only after a row's last token, where
    causal attention keeps it out of every real position (what `decode_prefix_as_row` relies on)."""
    return bool((attention_mask[:, 1:] <= attention_mask[:, :-1]).all())


def _expand_heads(x: Tensor, groups: int) -> Tensor:
    """(B, h_kv, T, d) -> (B, h_kv · groups, T, d): each key/value head repeated for its query heads (GQA)."""
    if groups == 1:
        return x
    B, h, T, d = x.shape
    return x[:, :, None].expand(B, h, groups, T, d).reshape(B, h * groups, T, d)


def _prefix_row_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor,
                          dropout: float = 0.0, scaling: float | None = None, **kwargs) -> tuple[Tensor, None]:
    """The attention of `decode_prefix_as_row`'s batch (the module docstring): query (B + 1, h, T', d), key and
    value (B + 1, h_kv, T', d), row 0 the prefix (its first S positions real), and the rows' mask
    (1, 1, T', S + T') that `decode_prefix_as_row` gave the decoder (transformers hands a 4-D mask on as it is)
    -> (B + 1, T', h, d)."""
    for name in ("softcap", "sliding_window", "s_aux"):
        if kwargs.get(name) is not None:
            raise ValueError(f"the shared prefix's attention does not apply {name}; "
                             f"{type(module).__name__} should not have reached it (ROW_MODEL_TYPES)")
    if dropout:
        raise ValueError(f"the shared prefix's attention has no dropout (got {dropout}); prefix_as_row excludes it")
    rows, T = query.shape[0] - 1, query.shape[2]
    S = attention_mask.shape[-1] - T
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = _expand_heads(key, groups), _expand_heads(value, groups)
    prefix = sdpa(query[:1], key[:1], value[:1], is_causal=True, scale=scaling)  # float32 where that is faster
    keys = torch.cat([key[:1, :, :S].expand(rows, -1, -1, -1), key[1:]], dim=2)  # (B, h, S + T', d)
    values = torch.cat([value[:1, :, :S].expand(rows, -1, -1, -1), value[1:]], dim=2)
    out = sdpa(query[1:], keys, values, attn_mask=attention_mask, scale=scaling)  # (B, h, T', d)
    return torch.cat([prefix, out]).transpose(1, 2).contiguous(), None


def decode_prefix_as_row(decoder: nn.Module, input_ids: Tensor, S: int) -> Tensor:
    """The decoder's last hidden states (B, T - S, d) at positions S..T-1 of `input_ids` (B, T), in one call
    whose row 0 is the shared prefix input_ids[0, :S] (the module docstring; `prefix_as_row` must hold). Padding
    past a row's end (`right_padded`) sits after every real position, so causal attention alone keeps it out."""
    B, T = input_ids.shape
    width = max(S, T - S)
    batch = input_ids[0, 0].expand(B + 1, width).clone()  # (B + 1, T'); padding: any valid id (no device sync)
    batch[0, :S] = input_ids[0, :S]
    batch[1:, :T - S] = input_ids[:, S:]
    positions = torch.arange(width, device=input_ids.device).repeat(B + 1, 1)
    positions[1:] += S
    own = torch.ones(width, width, dtype=torch.bool, device=input_ids.device).tril()
    mask = torch.cat([own.new_ones(width, S), own], dim=1)[None, None]  # (1, 1, T', S + T'): the prefix, own causal
    config = decoder.config
    before = config._attn_implementation_internal
    config._attn_implementation_internal = _ATTENTION  # this call only: the model keeps its own attention
    try:
        hidden = decoder(input_ids=batch, attention_mask=mask, position_ids=positions,
                         use_cache=False).last_hidden_state
    finally:
        config._attn_implementation_internal = before
    return hidden[1:, :T - S]
