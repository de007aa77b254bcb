"""RMSNorm that keeps its output instead of its input for backward.

Llama-family RMSNorm over the last dim (size d), computed in float32:

    rstd = 1 / sqrt(mean(x²) + eps)          (..., 1)
    x̂    = x · rstd                           (..., d)
    y    = w ⊙ x̂  (cast as Hugging Face does: w * x̂.to(x.dtype))

Autograd over that keeps x (the residual stream) for backward, while the layers after the norm
(LoRA's A projections) keep y anyway. `rmsnorm` keeps y and rstd only and recovers x̂ = y / w
in backward, so each norm costs no activation memory of its own. That needs every w_j ≠ 0; a
norm with a zero weight keeps x instead. The check reads the (d,) weight back to the host, which on a
GPU is a synchronisation (the host waits for all queued work: 61 of them per SmolLM2 forward), so it is
done once per weight and remembered with the weight's storage, dtype and version counter (any in-place
write through the tensor, `load_state_dict`, `.to()` makes it check again). A write through `.data`
bumps no version counter: if it zeroes an element afterwards, x̂ = y / w is 0/0 in backward and the
gradients turn NaN, which the training loop stops on before any update; never a wrong finite value.

Backward (w frozen), with gy = dL/dy and ĝ = gy ⊙ w:

    dL/dx = rstd · (ĝ − x̂ · mean(ĝ ⊙ x̂))

`rmsnorm_reference` is the plain version it must match; `fuse_rmsnorm_` swaps it into a model
only where it reproduces the module's own forward on a probe input.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lorakit.kernels.patching import patch_forward, unpatch_forward


def rmsnorm_reference(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        h = x.float()
        rstd = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)  # (..., 1) fp32
        y = weight * (h * rstd).to(x.dtype)
        ctx.keep_output = _all_nonzero(weight)
        ctx.x_dtype = x.dtype
        ctx.save_for_backward(y if ctx.keep_output else x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, gy):
        kept, weight, rstd = ctx.saved_tensors
        w = weight.float()
        x_hat = kept.float() / w if ctx.keep_output else kept.float() * rstd  # (..., d)
        g_hat = gy.float() * w
        dx = rstd * (g_hat - x_hat * (g_hat * x_hat).mean(-1, keepdim=True))
        return dx.to(ctx.x_dtype), None, None


def _all_nonzero(weight: Tensor) -> bool:
    """Whether every element of `weight` is nonzero: read once per (storage, dtype, version) of the tensor and
    remembered on it."""
    stamp = (weight.data_ptr(), weight.dtype, weight._version)
    known = getattr(weight, "_lorakit_all_nonzero", None)
    if known is None or known[0] != stamp:
        known = (stamp, bool((weight != 0).all()))
        weight._lorakit_all_nonzero = known
    return known[1]


def rmsnorm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """Llama RMSNorm with a frozen weight, keeping (y, rstd) for backward instead of x."""
    if weight.requires_grad:
        raise ValueError("rmsnorm keeps no input for a weight gradient: the norm weight must be frozen")
    return _RMSNorm.apply(x, weight, eps)


def _fused_forward(norm: nn.Module, x: Tensor) -> Tensor:
    if norm.weight.requires_grad:
        return type(norm).forward(norm, x)
    return rmsnorm(x, norm.weight, norm.variance_epsilon)


def fuse_rmsnorm_(model: nn.Module) -> int:
    """Use `rmsnorm` in every RMSNorm module that computes exactly the Llama formula; return how many.

    A module qualifies if its class name ends in "RMSNorm", it has `weight` and `variance_epsilon`,
    and its own forward agrees with `rmsnorm_reference` on a probe input (so variants such as
    Gemma's (1 + w) scaling are left alone). In place on the instances; `unfuse_rmsnorm_` undoes it.
    """
    count = 0
    for module in model.modules():
        if not (type(module).__name__.endswith("RMSNorm") and hasattr(module, "variance_epsilon")
                and isinstance(getattr(module, "weight", None), Tensor) and module.weight.dim() == 1):
            continue
        w = module.weight
        probe = torch.randn(2, w.shape[0], generator=torch.Generator().manual_seed(0)).to(w.device, w.dtype)
        with torch.no_grad():
            if not torch.equal(type(module).forward(module, probe), rmsnorm_reference(probe, w, module.variance_epsilon)):
                continue
        patch_forward(module, _fused_forward)
        count += 1
    return count


def unfuse_rmsnorm_(model: nn.Module) -> int:
    return unpatch_forward(model, _fused_forward)
