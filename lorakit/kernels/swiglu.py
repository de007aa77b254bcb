"""SwiGLU feeding a (LoRA-adapted) down projection, keeping two activations instead of four.

A Llama-family MLP computes, after its gate and up projections g, u (N, f):

    m = silu(g) ⊙ u                                   (N, f)
    y = m Wᵀ + b + s · (m Aᵀ) Bᵀ                       W (d, f), A (r, f), B (d, r); y (N, d)

Autograd over that saves g (for silu), silu(g) and u (for ⊙), and m (for dL/dA): four (N, f)
tensors per layer, the largest activations of the model. `swiglu_down` saves g, u and the small
h = s · m Aᵀ (N, r), and rebuilds silu(g) and m in backward: two elementwise passes instead of two
stored (N, f) tensors, and no extra matmul. W may be dense or quantized (dequantized on the fly,
never saved).

Backward, with gy = dL/dy (N, d), σ = sigmoid(g), silu(g) = g σ, silu'(g) = σ (1 + g (1 − σ)):

    gh    = gy B                   (N, r)      dL/dB = gyᵀ h               (d, r)
    gm    = gy W + s · gh A        (N, f)      dL/dA = s · ghᵀ m           (r, f)
    dL/dg = gm ⊙ u ⊙ silu'(g)                 dL/du = gm ⊙ silu(g)
    dL/db = Σ_N gy                 (only if the bias trains)

QA-LoRA adapters (group_size g) see m averaged over groups, P m (N, f/g): then h = s · (P m) Aᵀ,
dL/dA = s · ghᵀ (P m), and the adapter's part of gm is s · (gh A) spread over each group / g.

QA-LoRA on deployed offsets (`moved` = Δm (d, f/g), `lorakit.quant.linear.offset_linear`) has no A, B here:
W's offsets move by Δm, y = m Ŵ'ᵀ + b, saving also S = Σ_{j∈G} m_j (N, f/g); gm = gy Ŵ', dL/dΔm = gyᵀ S.

`swiglu_down_reference` is the plain-autograd version it must match.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lorakit.kernels.patching import patch_forward, unpatch_forward
from lorakit.quant.intn import group_sums
from lorakit.quant.linear import dense_weight, kept_or_dense, offset_grad, training_dense


def _pool(m: Tensor, group_size: int | None) -> Tensor:
    return m if group_size is None else m.unflatten(-1, (-1, group_size)).mean(-1)  # (..., f/g)


def swiglu_down_reference(g: Tensor, u: Tensor, weight, bias: Tensor | None,
                          a: Tensor | None, b: Tensor | None, scaling: float, group_size: int | None = None,
                          moved: Tensor | None = None) -> Tensor:
    m = F.silu(g) * u
    y = F.linear(m, dense_weight(weight, m.dtype), None if bias is None else bias.to(m.dtype))
    if a is not None:
        y = y + F.linear(F.linear(_pool(m, group_size), a.to(m.dtype)) * scaling, b.to(m.dtype))
    if moved is not None:  # the offsets' change times each group's sum of m
        y = y + F.linear(group_sums(m, weight.group_size), moved.to(m.dtype))
    return y


class _SwiGLUDown(torch.autograd.Function):
    @staticmethod
    def forward(ctx, g, u, weight, bias, a, b, scaling, group_size, moved):
        m = F.silu(g) * u  # (N, f), freed after forward
        ctx.dense = training_dense(weight, m.dtype, moved)  # inside hold_dense(): one copy for forward and backward
        y = F.linear(m, kept_or_dense(ctx.dense, weight, m.dtype, moved),
                     None if bias is None else bias.to(m.dtype))  # (N, d)
        sums = group_sums(m, weight.group_size) if ctx.needs_input_grad[8] else None  # (N, f/g)
        h = None
        if a is not None:
            h = F.linear(_pool(m, group_size), a.to(m.dtype)) * scaling  # (N, r)
            y.view(-1, y.shape[-1]).addmm_(h.reshape(-1, h.shape[-1]), b.to(m.dtype).t())
        ctx.weight = weight  # a frozen Parameter or a quantized module: a reference, not a copy
        ctx.scaling = scaling
        ctx.group_size = group_size
        ctx.save_for_backward(g, u, bias, a, b, h, moved, sums)
        return y

    @staticmethod
    def backward(ctx, gy):
        g, u, bias, a, b, h, moved, sums = ctx.saved_tensors
        dtype = gy.dtype
        gm = gy @ kept_or_dense(ctx.dense, ctx.weight, dtype, moved)  # (N, f)
        grad_a = grad_b = grad_bias = grad_moved = None
        if ctx.needs_input_grad[8]:
            grad_moved = offset_grad(gy, sums)
        if a is not None:
            gh = gy @ b.to(dtype)  # (N, r)
            if ctx.group_size is None:
                gm.view(-1, gm.shape[-1]).addmm_(gh.reshape(-1, gh.shape[-1]), a.to(dtype), alpha=ctx.scaling)
            else:  # QA-LoRA: the pooled gradient, spread over each group / g
                gp = (gh @ a.to(dtype)) * (ctx.scaling / ctx.group_size)  # (N, f/g)
                gm += gp.repeat_interleave(ctx.group_size, dim=-1)
            sig = torch.sigmoid(g)
            silu = g * sig
            if ctx.needs_input_grad[4]:
                m = _pool(silu * u, ctx.group_size)  # rebuilt, (N, f) or (N, f/g)
                grad_a = (ctx.scaling * gh.reshape(-1, gh.shape[-1]).t() @ m.reshape(-1, m.shape[-1])).to(a.dtype)
                del m
            if ctx.needs_input_grad[5]:
                grad_b = (gy.reshape(-1, gy.shape[-1]).t() @ h.reshape(-1, h.shape[-1])).to(b.dtype)
        else:
            sig = torch.sigmoid(g)
            silu = g * sig
        if ctx.needs_input_grad[3]:
            grad_bias = gy.reshape(-1, gy.shape[-1]).sum(0).to(bias.dtype)
        grad_u = gm * silu if ctx.needs_input_grad[1] else None
        grad_g = None
        if ctx.needs_input_grad[0]:
            # silu'(g) = σ (1 + g (1 − σ)): one (N, f) temporary, then in place on it and on sig
            grad_g = gm.mul_(u).mul_(sig.mul_(torch.rsub(sig, 1).mul_(g).add_(1)))
        return grad_g, grad_u, None, grad_bias, grad_a, grad_b, None, None, grad_moved


def swiglu_down(g: Tensor, u: Tensor, weight, bias: Tensor | None = None,
                a: Tensor | None = None, b: Tensor | None = None, scaling: float = 1.0,
                group_size: int | None = None, moved: Tensor | None = None) -> Tensor:
    """y = silu(g)·u Wᵀ + b [+ s·(pool(silu(g)·u) Aᵀ) Bᵀ], saving g, u (and the (N, r) h) only.

    g, u (..., f); weight (d, f) frozen Tensor or quantized module; a (r, f) — (r, f/g) with a
    QA-LoRA group_size g — and b (d, r), or None. `moved` (d, f/g), float32, with an INT-N weight and no
    a, b: QA-LoRA's offset change on deployed offsets, y = silu(g)·u Ŵ'ᵀ + b over the moved grid.
    """
    if isinstance(weight, Tensor) and weight.requires_grad:
        raise ValueError("swiglu_down needs a frozen down-projection weight (it computes no weight gradient)")
    if moved is not None and (a is not None or not hasattr(weight, "group_size")):
        got = type(weight).__name__ + (" with a, b" if a is not None else "")
        raise ValueError(f"swiglu_down(moved=...) moves a group-wise INT-N weight's offsets, got a {got}: pass an "
                         "IntNWeight and no a, b (QA-LoRA on deployed offsets has no A, B product)")
    return _SwiGLUDown.apply(g, u, weight, bias, a, b, scaling, group_size, moved)


def _is_silu(act: nn.Module) -> bool:
    return isinstance(act, nn.SiLU) or type(act).__name__ in ("SiLUActivation", "SiLU")


def _fused_mlp_forward(mlp: nn.Module, x: Tensor) -> Tensor:
    g, u = mlp.gate_proj(x), mlp.up_proj(x)
    down = mlp.down_proj
    weight = down.weight
    if (isinstance(weight, Tensor) and weight.requires_grad) or not torch.is_grad_enabled():
        return down(F.silu(g) * u)  # a trainable base weight needs the plain path; without grad nothing is saved
    if getattr(down, "is_lora_layer", False):
        if down.transposed or (down.active is not None and (down.disabled or not isinstance(down.lora[down.active].dropout, nn.Identity))):
            return down(F.silu(g) * u)  # dropout / PiSSA-disabled paths: keep the layer's own forward
        adapter = down.adapter()
        if adapter is not None and adapter.magnitude is None and down.moves_offsets(adapter):
            # QA-LoRA against fp16-deployed offsets: the down projection over the moved grid
            return swiglu_down(g, u, weight, down.bias, moved=down.moved_offset(adapter))
        if adapter is not None and adapter.magnitude is not None:
            return down(F.silu(g) * u)  # DoRA rescales the output channels: the layer's dora_forward
        if adapter is not None:
            return swiglu_down(g, u, weight, down.bias, adapter.A, adapter.B, adapter.scaling, adapter.group_size)
    return swiglu_down(g, u, weight, down.bias)


def fuse_swiglu_(model: nn.Module) -> int:
    """Make every Llama-style MLP (gate_proj, up_proj, down_proj, SiLU) use `swiglu_down`; return how many.

    In place, on the instances (state-dict keys are unchanged); undo with `unfuse_swiglu_`.
    Outputs and gradients equal the unfused model's up to float rounding.
    """
    count = 0
    for module in model.modules():
        if all(hasattr(module, n) for n in ("gate_proj", "up_proj", "down_proj", "act_fn")) and _is_silu(module.act_fn):
            patch_forward(module, _fused_mlp_forward)
            count += 1
    return count


def unfuse_swiglu_(model: nn.Module) -> int:
    return unpatch_forward(model, _fused_mlp_forward)
