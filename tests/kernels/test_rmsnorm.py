"""rmsnorm against its reference, the zero-weight fallback, and fuse_rmsnorm_ on a tiny Llama.
Tolerance: fp32 rounding (x̂ is recovered as y / w, one extra rounding)."""

import copy

import pytest
import torch
from torch import nn

import lorakit
from lorakit.kernels import fuse_for_training_, fuse_rmsnorm_, rmsnorm, rmsnorm_reference, unfuse_
from tiny_models import randomise_trainable_, tiny_llama


@pytest.mark.parametrize("zero_weight", [False, True])
def test_matches_reference(zero_weight):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 32, generator=g, requires_grad=True)
    w = torch.rand(32, generator=g) + 0.5
    if zero_weight:
        w[3] = 0.0  # x̂ cannot be recovered from y there: the op must keep x instead
    x_ref = x.detach().clone().requires_grad_()
    y, y_ref = rmsnorm(x, w, 1e-6), rmsnorm_reference(x_ref, w, 1e-6)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    gy = torch.randn_like(y)
    y.backward(gy)
    y_ref.backward(gy)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-6)
    assert torch.isfinite(x.grad).all()


def _host_reads(fn) -> int:
    """How many times `fn` reads a tensor's value back to the host (on a GPU: a synchronisation)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Reads(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Reads.n += func.overloadpacket in (torch.ops.aten._local_scalar_dense, torch.ops.aten.is_nonzero)
            return func(*args, **(kwargs or {}))

    with Reads():
        fn()
    return Reads.n


def test_the_zero_weight_check_reads_the_weight_once_per_version():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 32, generator=g)
    w = torch.rand(32, generator=g) + 0.5
    assert _host_reads(lambda: rmsnorm(x, w, 1e-6)) == 1
    assert _host_reads(lambda: rmsnorm(x, w, 1e-6)) == 0  # remembered: no GPU synchronisation per call
    w[3] = 0.0  # an in-place write bumps the version counter: checked again, and x kept from now on
    xg = x.clone().requires_grad_()
    assert _host_reads(lambda: rmsnorm(xg, w, 1e-6).sum().backward()) == 1
    xr = x.clone().requires_grad_()
    rmsnorm_reference(xr, w, 1e-6).sum().backward()
    torch.testing.assert_close(xg.grad, xr.grad, rtol=1e-5, atol=1e-6)
    assert _host_reads(lambda: rmsnorm(x, w.to(torch.float64), 1e-6)) == 1  # another tensor, another check
    v = torch.rand(32, generator=g) + 0.5
    rmsnorm(x, v, 1e-6)
    v.data[3] = 0.0  # a write through .data bumps no version: the remembered answer is stale, and the
    xv = x.clone().requires_grad_()  # gradient turns NaN (0/0), which the training loop stops on
    rmsnorm(xv, v, 1e-6).sum().backward()
    assert not torch.isfinite(xv.grad).all()


def test_refuses_trainable_weight():
    with pytest.raises(ValueError, match="frozen"):
        rmsnorm(torch.randn(2, 4), nn.Parameter(torch.ones(4)), 1e-6)


def test_leaves_other_norm_formulas_alone():
    class GemmaLikeRMSNorm(nn.Module):  # (1 + w) scaling: must not be swapped
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(8), requires_grad=False)
            self.variance_epsilon = 1e-6

        def forward(self, x):
            return (1 + self.weight) * rmsnorm_reference(x, torch.ones(8), self.variance_epsilon)

    assert fuse_rmsnorm_(nn.Sequential(GemmaLikeRMSNorm())) == 0


def test_fused_llama_equals_unfused_and_keeps_no_norm_inputs():
    model = tiny_llama()
    lorakit.inject_adapters(model, lorakit.LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    randomise_trainable_(model, seed=4)
    fused = copy.deepcopy(model)
    assert fuse_for_training_(fused) == {"rmsnorm": 5, "swiglu": 2, "attention": 0}  # 2 per layer + final norm; fp32
    x = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    out, out_f = model(x, labels=x), fused(x, labels=x)
    torch.testing.assert_close(out_f.logits, out.logits, rtol=1e-5, atol=1e-5)
    out.loss.backward()
    out_f.loss.backward()
    grads = dict(model.named_parameters())
    for n, p in fused.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads[n].grad, rtol=1e-4, atol=1e-6, msg=n)
    assert unfuse_(fused) == {"rmsnorm": 5, "swiglu": 2, "attention": 0}
