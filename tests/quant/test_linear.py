"""Training through a quantized weight: the same numbers as over the dequantized dense weight, less memory."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lorakit.quant import NF4Config, NF4Weight, QuantizedLinear, linear
from lorakit.adapters.walk import layer_kind

OUT, IN = 48, 80


def quantized(dtype=torch.float32):
    w = torch.randn(OUT, IN, generator=torch.Generator().manual_seed(0)).to(dtype)
    return NF4Weight.from_float(w)


def inputs(*shape, dtype=torch.float32, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype).requires_grad_()


def test_forward_and_backward_equal_dense_over_the_dequantized_weight():
    q = quantized()
    dense = q.dequantize()
    bias = torch.randn(OUT).requires_grad_()
    x, x_ref = inputs(2, 5, IN), inputs(2, 5, IN)
    grad = torch.randn(2, 5, OUT)

    y = linear(x, q, bias)
    y.backward(grad)
    grad_bias = bias.grad.clone()
    bias.grad = None
    y_ref = F.linear(x_ref, dense, bias)
    y_ref.backward(grad)

    assert torch.equal(y, y_ref)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1.3e-6, atol=1e-5)   # fp32 rounding
    torch.testing.assert_close(grad_bias, bias.grad, rtol=1.3e-6, atol=1e-5)


def test_lora_gradients_equal_lora_over_the_dequantized_weight():
    """y = x Ŵᵀ + (α/r) x Aᵀ Bᵀ: the adapter's gradients through the quantized base match the dense base."""
    q, r, scaling = quantized(), 4, 2.0
    gen = torch.Generator().manual_seed(2)
    a0, b0 = torch.randn(r, IN, generator=gen) * 0.1, torch.randn(OUT, r, generator=gen) * 0.1
    x, grad = inputs(3, IN), torch.randn(3, OUT)

    def adapter_grads(base):
        a, b = a0.clone().requires_grad_(), b0.clone().requires_grad_()
        (linear(x, base) + scaling * F.linear(F.linear(x, a), b)).backward(grad)
        return a.grad, b.grad

    for mine, ref in zip(adapter_grads(q), adapter_grads(q.dequantize())):
        torch.testing.assert_close(mine, ref, rtol=1.3e-6, atol=1e-5)


def test_autograd_saves_no_dequantized_weight():
    """Record what autograd saves: the dense path saves the (out, in) weight, the quantized one nothing as big."""
    q = quantized()

    def saved_sizes(weight):
        sizes = []

        def pack(t):
            sizes.append(t.numel())
            return t

        x = inputs(4, IN)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = linear(x, weight)
        y.sum().backward()
        assert x.grad is not None
        return sizes

    assert OUT * IN in saved_sizes(q.dequantize())     # the control: F.linear keeps the dense weight
    assert all(size < OUT * IN for size in saved_sizes(q))


def test_computes_in_the_input_dtype():
    q = quantized()
    x = inputs(2, IN, dtype=torch.bfloat16)
    y = linear(x, q, torch.zeros(OUT))                 # a float32 bias is cast to x.dtype
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, F.linear(x, q.dequantize(torch.bfloat16), torch.zeros(OUT, dtype=torch.bfloat16)))
    y.float().sum().backward()
    assert x.grad.dtype == torch.bfloat16


def test_dense_weights_and_bad_weights():
    w, x = torch.randn(OUT, IN), torch.randn(2, IN)
    assert torch.equal(linear(x, w), F.linear(x, w))
    with pytest.raises(TypeError, match="got Linear"):
        linear(x, nn.Linear(IN, OUT))


def test_quantized_linear_layer():
    dense = nn.Linear(IN, OUT)
    layer = QuantizedLinear.from_linear(dense, NF4Config())
    assert layer_kind(layer) == "linear" and layer.is_quantized_linear
    assert (layer.in_features, layer.out_features) == (IN, OUT)
    assert set(layer.state_dict()) == {"bias", "weight.codes", "weight.absmax_codes", "weight.nested_absmax",
                                       "weight.nested_offset"}
    assert not layer.bias.requires_grad and list(layer.parameters()) == [layer.bias]
    x = torch.randn(3, IN)
    assert torch.equal(layer(x), F.linear(x, layer.weight.dequantize(), dense.bias))
    assert "in_features=80, out_features=48, bias=True" in repr(layer) and "NF4Weight" in repr(layer)


def test_to_dense_is_a_frozen_linear_with_the_dequantized_weight():
    layer = QuantizedLinear.from_linear(nn.Linear(IN, OUT, dtype=torch.bfloat16), NF4Config(quant_type="int4"))
    dense = layer.to_dense()
    assert type(dense) is nn.Linear and dense.weight.dtype == torch.bfloat16
    assert torch.equal(dense.weight, layer.weight.dequantize(torch.bfloat16))
    assert torch.equal(dense.bias, layer.bias)
    assert not dense.weight.requires_grad


def test_dequantize_once_builds_each_weight_once_without_grad_and_gives_the_same_outputs(monkeypatch):
    from lorakit.quant.intn import IntNWeight
    from lorakit.quant.linear import dense_weight, dequantize_once

    weights = [quantized(), IntNWeight.from_float(torch.randn(OUT, IN), 4, 16)]
    calls = []
    for w in weights:
        original = w.dequantize
        monkeypatch.setattr(w, "dequantize", lambda dtype=None, original=original: calls.append(dtype) or original(dtype))
    x = torch.randn(3, IN)
    want = [linear(x, w) for w in weights]
    calls.clear()
    with torch.no_grad(), dequantize_once():
        for _ in range(5):  # five tokens
            got = [linear(x, w) for w in weights]
        assert dense_weight(weights[0], torch.float32) is dense_weight(weights[0], torch.float32)
        with dequantize_once():  # nested: the same cache
            linear(x, weights[0])
        linear(x.double(), weights[0])  # another dtype: built once more
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert calls == [torch.float32, torch.float32, torch.float64]  # each weight once per dtype
    calls.clear()
    with dequantize_once():  # with grad on, nothing is kept: autograd rebuilds W in backward anyway
        linear(inputs(3, IN), weights[0]).sum().backward()
        linear(x, weights[0])
    assert len(calls) == 3  # forward, backward, forward
    calls.clear()
    with torch.no_grad():  # outside the block: on the fly, as before
        linear(x, weights[0]), linear(x, weights[0])
    assert len(calls) == 2


def test_dequantize_once_if_it_fits_caches_only_when_the_dense_copy_fits(monkeypatch):
    import importlib

    from lorakit.quant.intn import IntNWeight

    linear_module = importlib.import_module("lorakit.quant.linear")
    model = nn.Sequential(QuantizedLinear(IntNWeight.from_float(torch.randn(OUT, IN), 4, 16)), nn.Linear(OUT, 3))
    assert linear_module.dense_bytes(model, torch.float32) == OUT * IN * 4  # the dense nn.Linear is not counted
    assert linear_module.dense_bytes(model, torch.bfloat16) == OUT * IN * 2
    weight = model[0].weight
    calls = []
    original = weight.dequantize
    monkeypatch.setattr(weight, "dequantize", lambda dtype=None: calls.append(dtype) or original(dtype))
    x = torch.randn(3, IN)
    for free, builds in ((10 * OUT * IN * 4, 1), (OUT * IN * 4, 4)):  # room for it; not twice its size: on the fly
        monkeypatch.setattr(linear_module, "available_memory_bytes", lambda device=None, free=free: free)
        calls.clear()
        with torch.no_grad(), linear_module.dequantize_once_if_it_fits(model, torch.float32):
            outs = [model(x) for _ in range(4)]
        assert len(calls) == builds and all(torch.equal(o, outs[0]) for o in outs)
    monkeypatch.setattr(linear_module, "available_memory_bytes", lambda device=None: None)  # unknown: cache
    assert isinstance(linear_module.dequantize_once_if_it_fits(model, torch.float32), type(linear_module.dequantize_once()))
    dense = nn.Sequential(nn.Linear(IN, OUT))  # nothing quantized: nothing to hold
    assert not isinstance(linear_module.dequantize_once_if_it_fits(dense, torch.float32), type(linear_module.dequantize_once()))


@pytest.mark.parametrize("kind", ["nf4", "int4", "int4-moved", "int5-moved", "int3", "int8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_large_weights_dequantized_in_chunks_train_bit_for_bit_as_whole(monkeypatch, kind, dtype):
    # a weight over 2 x CHUNK elements on a CPU is dequantized CHUNK elements (NF4) or rows (INT-N, bf16/fp16) at a
    # time: the same float32 numbers rounded once, so the products and every gradient are the same bits
    import lorakit.quant.blockwise as blockwise
    from lorakit.quant.intn import IntNWeight
    from lorakit.quant.linear import offset_linear

    w = torch.randn(OUT, IN + 48, generator=torch.Generator().manual_seed(2))  # (48, 128): whole blocks
    bits = None if kind == "nf4" else int(kind[3])  # INT-N: 3 and 5 bits are a bit stream, rows of whole bytes
    q = NF4Weight.from_float(w, block_size=64) if bits is None else IntNWeight.from_float(w, bits, 32)
    moved = (torch.randn(q.scale.shape) * 0.01).requires_grad_() if kind.endswith("-moved") else None
    bias = torch.randn(OUT).requires_grad_()
    grad = torch.randn(3, 7, OUT).to(dtype)

    def run():
        x = inputs(3, 7, IN + 48, dtype=dtype, seed=4)
        y = linear(x, q, bias) if moved is None else offset_linear(x, q, bias, moved)
        y.backward(grad)
        grads = [x.grad, bias.grad.clone()] + ([] if moved is None else [moved.grad.clone()])
        bias.grad = None
        if moved is not None:
            moved.grad = None
        return [y.detach()] + grads

    whole = run()
    monkeypatch.setattr(blockwise, "CHUNK", 256)  # this 6,144-element weight now goes in chunks
    calls = []
    if bits is None:
        chunks = blockwise._dequantize_chunks
        monkeypatch.setattr(blockwise, "_dequantize_chunks", lambda *a: calls.append(a) or chunks(*a))
    else:
        rows = IntNWeight._rows
        monkeypatch.setattr(IntNWeight, "_rows", lambda self, *a: calls.append(a) or rows(self, *a))
    chunked = run()
    # forward and backward dequantized in chunks (INT-N: float32 is made whole, the result itself being the buffer)
    assert (len(calls) > 0) == (bits is None or dtype != torch.float32)
    for a, b in zip(chunked, whole):
        assert a.dtype == b.dtype and torch.equal(a, b)
