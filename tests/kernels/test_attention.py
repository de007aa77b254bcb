"""Attention over short queries in float32 on a CPU in bf16/fp16 (`lorakit.kernels.attention`): the call itself,
and a transformers model routed through it by `fuse_attention_`. Bitwise: the float32 path must be exactly the
same attention on float32 copies, and everything else exactly the call it replaces."""

import copy

import pytest
import torch
import torch.nn.functional as F

from lorakit.kernels import fuse_attention_, fuse_for_training_, unfuse_, unfuse_attention_
from lorakit.kernels.attention import NAME, UPCAST_BELOW, sdpa, upcast
from tiny_models import VOCAB, tiny_llama


_SDPA = F.scaled_dot_product_attention  # the kernel itself, also while a test patches F's name


def _qkv(T, S, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 4, T, 16, generator=g).to(dtype).requires_grad_()
    k, v = (torch.randn(2, 4, S, 16, generator=g).to(dtype).requires_grad_() for _ in range(2))
    return q, k, v


def _float32_reference(q, k, v, **kwargs):
    mask = kwargs.pop("attn_mask", None)
    mask = mask.float() if mask is not None and mask.is_floating_point() else mask
    return _SDPA(q.float(), k.float(), v.float(), attn_mask=mask, **kwargs).to(q.dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mask", ["causal", "bool", "additive"])
def test_a_short_query_is_float32_attention_cast_back(dtype, mask):
    T, S = 10, 14  # 4 prefix keys before 10 own ones, as the shared prefix's rows have
    allowed = torch.ones(T, S, dtype=torch.bool).tril(S - T)
    kwargs = {"causal": {"is_causal": True}, "bool": {"attn_mask": allowed},
              "additive": {"attn_mask": torch.zeros(T, S).masked_fill(~allowed, float("-inf")).to(dtype)}}[mask]
    if mask == "causal":
        S = T
    q, k, v = _qkv(T, S, dtype)
    assert upcast(q)
    out = sdpa(q, k, v, scale=0.3, **kwargs)
    grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    expected = _float32_reference(q2, k2, v2, scale=0.3, **kwargs)
    assert out.dtype == dtype and torch.equal(out, expected)
    for got, want in zip(grads, torch.autograd.grad(expected.float().square().sum(), (q2, k2, v2))):
        assert got.dtype == dtype and torch.equal(got, want)
    # and it is not the bf16/fp16 kernel's own result (else this test could not tell the paths apart)
    assert not torch.equal(out, F.scaled_dot_product_attention(q, k, v, scale=0.3, **kwargs))


@pytest.mark.parametrize("T,dtype", [(UPCAST_BELOW, torch.bfloat16), (UPCAST_BELOW + 7, torch.float16),
                                     (10, torch.float32)])
def test_long_queries_and_float32_call_the_kernel_as_it_is(T, dtype):
    q, k, v = _qkv(T, T, dtype)
    assert not upcast(q)
    assert torch.equal(sdpa(q, k, v, is_causal=True), F.scaled_dot_product_attention(q, k, v, is_causal=True))


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (3, 12), generator=g)
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[1, 8:] = 0  # a right-padded row
    mask[2, 5:] = 0
    return ids, mask


def test_a_bf16_llama_on_the_cpu_attends_in_float32_through_transformers(monkeypatch):
    model = tiny_llama().to(torch.bfloat16)
    fused = copy.deepcopy(model)
    assert fuse_attention_(fused) == 1 and fused.config._attn_implementation == NAME
    assert model.config._attn_implementation == "sdpa"
    ids, mask = _batch()
    labels = ids.masked_fill(mask == 0, -100)
    out = fused(input_ids=ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    # the reference: the unfused model, its own sdpa attention, with the kernel call made on float32 copies
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda q, k, v, **kw: _float32_reference(q, k, v, **kw))
    ref = model(input_ids=ids, attention_mask=mask, labels=labels)
    ref.loss.backward()
    monkeypatch.undo()
    assert torch.equal(out.logits, ref.logits) and torch.equal(out.loss, ref.loss)
    # gradients to bf16 rounding: with GQA the fused path casts k, v before repeating their heads, so each
    # head group's gradient is summed in float32 before its one rounding to bf16 (the reference sums in bf16)
    for (name, p), (_, p_ref) in zip(fused.named_parameters(), model.named_parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1.6e-2, atol=1e-3, msg=name)
    plain = copy.deepcopy(model)
    assert not torch.equal(out.logits, plain(input_ids=ids, attention_mask=mask).logits)  # the path differs
    assert unfuse_attention_(fused) == 1 and fused.config._attn_implementation == "sdpa"
    assert torch.equal(fused(input_ids=ids, attention_mask=mask).logits, plain(input_ids=ids, attention_mask=mask).logits)


def test_fuse_leaves_float32_and_other_attention_alone():
    model = tiny_llama()
    assert fuse_for_training_(model)["attention"] == 0 and model.config._attn_implementation == "sdpa"
    eager = tiny_llama().to(torch.bfloat16)
    eager.config._attn_implementation_internal = "eager"  # e.g. a model whose soft cap sdpa cannot apply
    assert fuse_attention_(eager) == 0 and eager.config._attn_implementation == "eager"
    bf16 = tiny_llama().to(torch.bfloat16)
    assert fuse_for_training_(bf16)["attention"] == 1
    assert unfuse_(bf16)["attention"] == 1 and unfuse_(bf16)["attention"] == 0


def test_evaluation_attends_as_training_does_and_leaves_the_model_as_it_found_it():
    from lorakit.data.render import Example
    from lorakit.tasks.causal_lm import evaluate

    g = torch.Generator().manual_seed(2)
    examples = [Example(ids, [-100] * 3 + ids[3:]) for ids in
                (torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (9, 14, 6))]
    model = tiny_llama().to(torch.bfloat16)
    plain = evaluate(model, examples, pad_id=0)
    assert model.config._attn_implementation == "sdpa"  # switched for the pass only
    assert fuse_attention_(model) == 1
    assert evaluate(model, examples, pad_id=0) == plain  # as inside a training run (fused by the loop)
    assert model.config._attn_implementation == NAME  # a fused model stays fused
    unfuse_attention_(model)
    with pytest.MonkeyPatch.context() as m:  # and without the float32 path it would differ
        m.setattr("lorakit.kernels.attention.UPCAST_BELOW", 0)
        assert evaluate(model, examples, pad_id=0) != plain
