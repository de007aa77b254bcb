"""Cross-entropy over a large vocabulary that never holds the (tokens x vocabulary) logits.

For kept rows i = 1..n (label != ignore_index) with hidden state h_i (d,), output weight
W (V, d), optional bias b (V,) and label y_i:

    z_i    = W h_i + b                          logits, (V,)
    lse_i  = log sum_v exp(z_iv)                 (computed as m_i + log sum_v exp(z_iv - m_i))
    loss_i = lse_i - z_{i,y_i}
    L      = sum_i loss_i   ("sum")    or    L / n   ("mean", as `F.cross_entropy`)

With p_i = softmax(z_i) = exp(z_i - lse_i):

    dloss_i/dz_i = p_i - onehot(y_i)  =: g_i     (V,)
    dL/dh_i = W^T g_i        dL/dW = sum_i g_i h_i^T        dL/db = sum_i g_i

Rows with an ignored label are dropped first: no matmul is spent on them. The kept rows go in
chunks of `chunk_size`: per chunk the logits (c, V) are computed in the input dtype and upcast
to fp32 for the log-sum-exp. Peak extra memory is about one (chunk_size, V) fp32 block, instead
of (n, V) logits in the input dtype, their fp32 copy and their gradient.

Two ways to get gradients:
- eager (W and b frozen, the LoRA case): forward already holds each chunk's logits, so it forms
  g_i there and keeps dL/dh (n, d); backward multiplies it by the incoming scalar gradient. Same
  matmul count as the unchunked loss (one (n,d)x(d,V) forward, one (n,V)x(V,d) for dL/dh).
- recomputing (W or b trainable): forward keeps the per-row lse (n fp32 values) besides its inputs
  (hidden, weight by reference, labels); backward recomputes each chunk's logits.

`causal_lm_loss` applies this to a Hugging Face causal LM: run the decoder, shift, and use the
output embedding (the lm_head) as W, never calling the lm_head on all tokens.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn

from lorakit.quant.linear import dense_bytes, dense_weight, fits, hold_dense


# A shared prefix in training holds dense copies of the quantized weights (`hold_dense`) only while they take at
# most this share of the free memory: a 4-bit base is chosen for its memory, so a large one is not shared instead.
HOLD_SHARE = 0.125


def _logits(hidden: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """(c, d) x (V, d) [+ (V,)] -> (c, V) logits computed in the input dtype, returned in fp32."""
    z = hidden @ weight.T if bias is None else torch.addmm(bias, hidden, weight.T)
    return z.float()


class _ChunkedCrossEntropySum(torch.autograd.Function):
    """sum_i (lse_i - z_{i,y_i}) over rows that are all kept. Saves hidden (n, d), the weight
    (a Tensor by reference, or the quantized weight object on ctx), bias, labels (n,), lse (n,)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, chunk_size):
        w = dense_weight(weight, hidden.dtype)  # (V, d)
        b = None if bias is None else bias.to(hidden.dtype)
        if labels.numel() and (labels.min() < 0 or labels.max() >= w.shape[0]):
            raise ValueError(
                f"labels must lie in [0, {w.shape[0]}) (the vocabulary) or equal ignore_index; got "
                f"values in [{labels.min().item()}, {labels.max().item()}]"
            )
        n = hidden.shape[0]
        lse = torch.empty(n, dtype=torch.float32, device=hidden.device)  # (n,)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        # The usual LoRA case: only hidden needs a gradient and the loss is a scalar, so
        # dL/dh = (softmax - onehot) W is computed here, from the logits already in hand, and
        # backward only scales it: no second pass over the (n, V) logits.
        eager = ctx.needs_input_grad[0] and not any(ctx.needs_input_grad[1:3])
        grad_hidden = torch.empty_like(hidden) if eager else None  # (n, d)
        for start in range(0, n, chunk_size):
            rows = slice(start, start + chunk_size)
            z = _logits(hidden[rows], w, b)  # (c, V) fp32
            target = z.gather(1, labels[rows, None]).squeeze(1)  # (c,)
            m = z.amax(dim=1)  # (c,)
            sums = z.sub_(m[:, None]).exp_().sum(dim=1)  # in place: z is now exp(z - m)
            lse[rows] = sums.log().add_(m)
            total += (lse[rows] - target).sum()
            if eager:
                z.div_(sums[:, None])  # softmax p
                z[torch.arange(z.shape[0], device=z.device), labels[rows]] -= 1  # p - onehot(y)
                grad_hidden[rows] = z.to(hidden.dtype) @ w  # (c, d)
            del z  # free this chunk's logits before the next chunk allocates its own
        ctx.chunk_size = chunk_size
        if eager:
            ctx.save_for_backward(grad_hidden)
            ctx.eager = True
            return total
        ctx.eager = False
        if isinstance(weight, Tensor):
            ctx.save_for_backward(hidden, weight, bias, labels, lse)
        else:
            ctx.save_for_backward(hidden, None, bias, labels, lse)
            ctx.quantized_weight = weight
        return total

    @staticmethod
    def backward(ctx, grad_total):
        if ctx.eager:
            (grad_hidden,) = ctx.saved_tensors
            return grad_hidden * grad_total.to(grad_hidden.dtype), None, None, None, None
        hidden, weight, bias, labels, lse = ctx.saved_tensors
        w = dense_weight(weight if weight is not None else ctx.quantized_weight, hidden.dtype)  # (V, d)
        b = None if bias is None else bias.to(hidden.dtype)
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None  # (n, d)
        grad_weight = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if need_weight else None
        grad_bias = torch.zeros(w.shape[0], dtype=torch.float32, device=w.device) if need_bias else None
        for start in range(0, hidden.shape[0], ctx.chunk_size):
            rows = slice(start, start + ctx.chunk_size)
            h = hidden[rows]  # (c, d)
            g = _logits(h, w, b).sub_(lse[rows, None]).exp_()  # (c, V) softmax p
            g[torch.arange(h.shape[0], device=g.device), labels[rows]] -= 1  # p - onehot(y)
            g = g.mul_(grad_total).to(hidden.dtype)
            if need_hidden:
                grad_hidden[rows] = g @ w  # (c, d)
            if need_weight:
                grad_weight += g.T @ h  # (V, d)
            if need_bias:
                grad_bias += g.sum(dim=0, dtype=torch.float32)  # (V,)
            del g  # free this chunk's logits before the next chunk allocates its own
        if need_weight:
            grad_weight = grad_weight.to(weight.dtype)
        if need_bias:
            grad_bias = grad_bias.to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None


def chunked_cross_entropy(
    hidden: Tensor,
    weight,
    labels: Tensor,
    *,
    bias: Tensor | None = None,
    chunk_size: int = 256,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> Tensor:
    """Cross-entropy of logits ``hidden @ weight.T + bias`` against `labels`, computed in chunks.

    hidden (N, d); weight (V, d) Tensor, or a quantized weight with ``dequantize(dtype)``; labels
    (N,) integer; bias (V,) or None. Returns a scalar fp32 tensor equal (up to fp32 rounding) to
    ``F.cross_entropy((hidden @ weight.T + bias).float(), labels, ignore_index=..., reduction=...)``,
    including its NaN for "mean" when every label is ignored. See the module docstring for the
    math and the memory it saves.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if hidden.dim() != 2 or labels.shape != hidden.shape[:1]:
        raise ValueError(
            f"expected hidden (N, d) and labels (N,), got {tuple(hidden.shape)} and "
            f"{tuple(labels.shape)}; flatten (B, T, d) to (B*T, d) first"
        )
    if isinstance(weight, Tensor) and (weight.dim() != 2 or weight.shape[1] != hidden.shape[1]):
        raise ValueError(
            f"weight must be (V, d) with d = {hidden.shape[1]} (hidden's last dim), got {tuple(weight.shape)}"
        )
    keep = labels != ignore_index  # (N,)
    total = _ChunkedCrossEntropySum.apply(hidden[keep], weight, bias, labels[keep], chunk_size)
    return total / keep.sum() if reduction == "mean" else total


def _decoder(model: nn.Module) -> nn.Module:
    """The transformer body of a causal LM: what returns ``last_hidden_state`` before the lm_head."""
    get_decoder = getattr(model, "get_decoder", None)
    candidates = [get_decoder()] if callable(get_decoder) else []
    candidates += [getattr(model, name, None) for name in ("model", "transformer", "base_model")]
    for candidate in candidates:
        if isinstance(candidate, nn.Module) and candidate is not model:
            return candidate
    raise ValueError(
        f"cannot find the decoder of {type(model).__name__}: expected a Hugging Face causal LM with "
        f"get_decoder() or a .model / .transformer attribute"
    )


def _output_head(model: nn.Module) -> nn.Module:
    """The lm_head, checked to compute exactly ``h W^T + b`` (no adapter, no logit scaling)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or not hasattr(head, "weight"):
        raise ValueError(
            f"{type(model).__name__} has no output head with a .weight (get_output_embeddings())"
        )
    extra = [name for name, _ in head.named_parameters() if name not in ("weight", "bias")]
    if extra:
        raise ValueError(
            f"the output head has extra parameters {extra[:3]} (an adapter?); the chunked loss computes "
            f"h W^T + b only. Leave the lm_head out of target_modules, or use model(..., labels=...).loss"
        )
    config = getattr(model, "config", None)
    for name in ("final_logit_softcapping", "logit_scale"):
        if getattr(config, name, None) is not None:
            raise ValueError(
                f"config.{name} is set: the chunked loss does not scale logits; use model(...).loss"
            )
    return head


def causal_lm_loss(
    model: nn.Module,
    input_ids: Tensor,
    labels: Tensor,
    attention_mask: Tensor | None = None,
    chunk_size: int = 256,
    share_prefix: bool = True,
    **model_kwargs,
) -> Tensor:
    """Mean next-token cross-entropy of a Hugging Face causal LM without materialising logits.

    input_ids, labels, attention_mask: (B, T). Token t predicts labels[:, t + 1]; labels equal to
    -100 (prompt, padding) are ignored, exactly as ``model(input_ids, attention_mask=...,
    labels=labels).loss`` (which this equals to fp32 rounding). As there, padding is only ignored
    where its labels are -100. `share_prefix`: when all rows begin with the same prompt tokens (a chat
    template's system prompt), the decoder computes those positions once (`lorakit.tasks.shared_prefix`:
    the same loss and gradients to float rounding).
    """
    if labels.shape != input_ids.shape:
        raise ValueError(
            f"labels {tuple(labels.shape)} must have the shape of input_ids {tuple(input_ids.shape)}"
        )
    from lorakit.tasks.base import compute_dtype
    from lorakit.tasks.shared_prefix import decode_with_shared_prefix, prefix_cache, shared_length

    head = _output_head(model)
    decoder = _decoder(model)
    S = shared_length(input_ids, labels, attention_mask) if share_prefix and not model_kwargs else 0
    training = torch.is_grad_enabled()
    cache = prefix_cache(decoder, model) if S else None
    if cache is not None and training and not fits(dense_bytes(model, compute_dtype(model), merged=False),
                                                   share=HOLD_SHARE, device=input_ids.device):
        cache = None  # the decoder runs twice: without held dense weights that dequantizes each weight four times
    if cache is not None:
        with hold_dense() if training else contextlib.nullcontext():  # one dequantization per weight
            hidden = decode_with_shared_prefix(decoder, cache, input_ids, attention_mask, S)  # (B, T - S, d)
    else:
        S = 0
        # model_kwargs: e.g. position_ids for packed rows (their attention_mask is then 4-D, block-diagonal)
        hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                         **model_kwargs).last_hidden_state  # (B, T, d)
    hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1])  # (B*(T-S-1), d): positions S..T-2 predict
    targets = labels[:, S + 1:].reshape(-1)  # (B*(T-S-1),): the next token
    return chunked_cross_entropy(
        hidden, head.weight, targets, bias=getattr(head, "bias", None), chunk_size=chunk_size
    )
