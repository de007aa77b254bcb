"""swiglu_down against its plain-autograd reference, and fuse_swiglu_ on whole models.
Tolerance: fp32 rounding (rtol 1e-5 / atol 1e-6; sums are reordered)."""

import copy

import pytest
import torch

import lorakit
from lorakit.kernels import fuse_swiglu_, swiglu_down, swiglu_down_reference, unfuse_swiglu_
from tiny_models import randomise_trainable_, tiny_llama


def _inputs(seed=0, n=(2, 5), f=24, d=16, r=4, bias=True):
    g = torch.Generator().manual_seed(seed)
    t = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return (t(*n, f).requires_grad_(), t(*n, f).requires_grad_(), t(d, f) * 0.2,
            (t(d) * 0.1).requires_grad_() if bias else None,
            (t(r, f) * 0.2).requires_grad_(), (t(d, r) * 0.2).requires_grad_())


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("adapter", [True, False, "qalora"])
def test_matches_reference_values_and_gradients(bias, adapter):
    g, u, w, b0, a, b = _inputs(bias=bias)
    group_size = None
    if not adapter:
        a = b = None
    elif adapter == "qalora":  # A sees the input averaged over groups of 8: (r, f/8)
        group_size = 8
        a = a[:, : a.shape[1] // group_size].detach().clone().requires_grad_()
    _check_against_reference([g, u, w, b0, a, b, 0.7, group_size], atol=1e-6)


def _check_against_reference(args, atol):
    """swiglu_down(*args) and swiglu_down_reference on copies of args: the same values and gradients."""
    ref_args = [t.detach().clone().requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor) else t for t in args]
    y, y_ref = swiglu_down(*args), swiglu_down_reference(*ref_args)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=atol)
    gy = torch.randn_like(y)
    y.backward(gy)
    y_ref.backward(gy)
    for t, t_ref in zip(args, ref_args):
        if isinstance(t, torch.Tensor) and t.requires_grad:
            torch.testing.assert_close(t.grad, t_ref.grad, rtol=1e-5, atol=atol)


def _in_chunks(monkeypatch):
    """Weights over 2 x 256 elements are dequantized in chunks (`lorakit.quant.blockwise.chunked`)."""
    import lorakit.quant.blockwise as blockwise

    monkeypatch.setattr(blockwise, "CHUNK", 256)


@pytest.mark.parametrize("chunks", [False, True])
def test_quantized_weight_matches_its_dequantized_reference(monkeypatch, chunks):
    if chunks:  # a large 4-bit weight on a CPU: dequantized a chunk at a time
        _in_chunks(monkeypatch)
    g, u, w, b0, a, b = _inputs(f=64, d=32)
    qw = lorakit.NF4Weight.from_float(w)
    _check_against_reference([g, u, qw, b0, a, b, 2.0, None], atol=1e-5)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("chunks", [False, True])
def test_moved_offsets_match_reference_values_and_gradients(monkeypatch, bias, chunks):
    """QA-LoRA on deployed offsets: the down projection over the moved INT-N grid equals the base plus the
    offsets' change times each group's sum, forward and gradients (g, u, b and the moved offsets)."""
    if chunks:
        _in_chunks(monkeypatch)
    g, u, w, b0, *_ = _inputs(f=64, d=32, bias=bias)
    qw = lorakit.IntNWeight.from_float(w, 4, 32)
    moved = (torch.randn(32, 2, generator=torch.Generator().manual_seed(1)) * 0.05).requires_grad_()
    _check_against_reference([g, u, qw, b0, None, None, 1.0, None, moved], atol=1e-5)
    assert moved.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="INT-N weight"):
        swiglu_down(g, u, w, b0, moved=moved)


def test_refuses_trainable_weight():
    g, u, w, *_ = _inputs()
    with pytest.raises(ValueError, match="frozen"):
        swiglu_down(g, u, w.requires_grad_())


def _saved_bytes(model, x):
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x, labels=x).loss.backward()
    return total


@pytest.mark.parametrize("quantized", [False, "nf4", "qalora", "qalora on fp16 offsets"])
def test_fused_llama_equals_unfused_and_saves_less(quantized):
    model = tiny_llama()
    group_size = None
    if quantized == "nf4":
        lorakit.quantize_(model, lorakit.NF4Config())
    elif quantized:  # "on fp16 offsets": deployed as llama.cpp's Q4_1, the adapter moves the offsets
        lorakit.quantize_(model, lorakit.IntNConfig(bits=4, group_size=32,
                                                    scale_dtype="float16" if "fp16" in quantized else "float32"))
        group_size = 32
    lorakit.inject_adapters(model, lorakit.LoraConfig(r=4, alpha=8, target_modules="all-linear", group_size=group_size))
    randomise_trainable_(model, seed=2)
    fused = copy.deepcopy(model)
    assert fuse_swiglu_(fused) == 2
    x = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    out, out_f = model(x, labels=x), fused(x, labels=x)
    torch.testing.assert_close(out_f.logits, out.logits, rtol=1e-5, atol=1e-5)
    out.loss.backward()
    out_f.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    for n, p in fused.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads[n], rtol=1e-4, atol=1e-6, msg=n)
    for m in (model, fused):
        m.zero_grad()
    # (N, f) tensors per MLP fewer: silu(g), and m, which plain LoRA's A keeps (QA-LoRA's keeps P m, small)
    fewer = 1 if group_size else 2
    if quantized == "qalora on fp16 offsets":  # the unfused layer keeps m for its group sums; fused keeps S
        assert next(m for m in fused.modules() if hasattr(m, "offset_dtype")).offset_dtype == torch.float16
    assert _saved_bytes(model, x) - _saved_bytes(fused, x) >= 2 * fewer * 32 * 128 * 4  # 2 layers, 32 tokens
    assert unfuse_swiglu_(fused) == 2
    torch.testing.assert_close(fused(x).logits, model(x).logits)
