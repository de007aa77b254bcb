import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lorakit.tasks.losses import causal_lm_loss, chunked_cross_entropy

transformers = pytest.importorskip("transformers")

# fp32: chunked log-sum-exp and the reference's log_softmax round differently (~1 ulp per term).
FP32 = {"rtol": 1e-5, "atol": 1e-6}
# bf16 inputs: both compute logits in bf16 and reduce in fp32; matmul blocking may differ.
BF16 = {"rtol": 2e-2, "atol": 2e-2}


def tiny_llama(tie=True, seed=0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=tie, attn_implementation="eager",
    )
    return transformers.LlamaForCausalLM(config)


def tiny_gpt2(seed=0):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        vocab_size=97, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="eager",
    )
    return transformers.GPT2LMHeadModel(config)


def problem(n=37, d=16, v=101, dtype=torch.float32, ignored_every=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g).to(dtype).requires_grad_()
    weight = torch.randn(v, d, generator=g).to(dtype).requires_grad_()
    bias = torch.randn(v, generator=g).to(dtype).requires_grad_()
    labels = torch.randint(0, v, (n,), generator=g)
    labels[::ignored_every] = -100
    return hidden, weight, bias, labels


@pytest.mark.parametrize("chunk_size", [1, 7, 1024])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_chunked_matches_cross_entropy_and_its_gradients(chunk_size, reduction, with_bias):
    hidden, weight, bias, labels = problem()
    bias = bias if with_bias else None
    inputs = [hidden, weight] + ([bias] if with_bias else [])
    ours = chunked_cross_entropy(
        hidden, weight, labels, bias=bias, chunk_size=chunk_size, reduction=reduction
    )
    logits = hidden @ weight.T + (bias if with_bias else 0)
    ref = F.cross_entropy(logits, labels, reduction=reduction)
    torch.testing.assert_close(ours, ref, **FP32)
    for got, want in zip(torch.autograd.grad(ours, inputs), torch.autograd.grad(ref, inputs)):
        torch.testing.assert_close(got, want, **FP32)


def test_bf16_inputs_give_fp32_loss_close_to_reference():
    hidden, weight, _, labels = problem(dtype=torch.bfloat16)
    ours = chunked_cross_entropy(hidden, weight, labels, chunk_size=8)
    ref = F.cross_entropy((hidden @ weight.T).float(), labels)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref, **BF16)
    (got,) = torch.autograd.grad(ours, hidden)
    (want,) = torch.autograd.grad(ref, hidden)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, **BF16)


def test_ignored_rows_are_never_computed():
    hidden, weight, _, labels = problem()
    ignored = labels == -100
    poisoned = hidden.detach().clone()
    poisoned[ignored] = float("nan")  # would poison any matmul that touched these rows
    poisoned.requires_grad_()
    ours = chunked_cross_entropy(poisoned, weight, labels, chunk_size=4)
    ref = F.cross_entropy(hidden[~ignored] @ weight.T, labels[~ignored])
    torch.testing.assert_close(ours, ref, **FP32)
    (grad,) = torch.autograd.grad(ours, poisoned)
    assert torch.all(grad[ignored] == 0) and torch.isfinite(grad).all()


def test_all_labels_ignored_behaves_like_cross_entropy():
    hidden, weight, _, labels = problem()
    labels = torch.full_like(labels, -100)
    assert torch.isnan(chunked_cross_entropy(hidden, weight, labels))
    assert chunked_cross_entropy(hidden, weight, labels, reduction="sum").item() == 0.0


def test_backward_saves_no_logits():
    n, v = 256, 4096
    hidden, weight, _, labels = problem(n=n, v=v)
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        chunked_cross_entropy(hidden, weight, labels, chunk_size=16)
    assert sum(saved) < n * v / 8  # hidden (n, d), weight (V, d), labels, lse (n,): never (n, V)


class DequantizingWeight:
    """Stands in for a quantized weight (NF4Weight, IntNWeight): only `dequantize(dtype)`."""

    def __init__(self, weight):
        self.weight = weight
        self.calls = 0

    def dequantize(self, dtype):
        self.calls += 1
        return self.weight.to(dtype)


def test_quantized_weight_is_dequantized_in_forward_and_backward():
    hidden, weight, bias, labels = problem()
    quantized = DequantizingWeight(weight.detach())
    ours = chunked_cross_entropy(hidden, quantized, labels, bias=bias, chunk_size=5)
    ref = F.cross_entropy(hidden @ weight.detach().T + bias, labels)
    torch.testing.assert_close(ours, ref, **FP32)
    got = torch.autograd.grad(ours, (hidden, bias))
    want = torch.autograd.grad(ref, (hidden, bias))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **FP32)
    assert quantized.calls == 2


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"reduction": "none"}, "reduction"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"labels": torch.tensor([0, 5000] + [1] * 35)}, r"\[0, 101\)"),
        ({"hidden": torch.randn(37, 3)}, "weight must be"),
        ({"labels": torch.zeros(36, dtype=torch.long)}, "labels"),
    ],
)
def test_bad_input_is_named(kwargs, message):
    hidden, weight, _, labels = problem()
    args = {"hidden": hidden, "weight": weight, "labels": labels} | kwargs
    with pytest.raises(ValueError, match=message):
        chunked_cross_entropy(args.pop("hidden"), args.pop("weight"), args.pop("labels"), **args)


def batch(vocab=97, seed=1):
    """Two rows: right padding on the first, a masked prompt on the second."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, vocab, (2, 12), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, 9:] = 0
    input_ids[0, 9:] = 0  # pad id
    labels = input_ids.clone()
    labels[attention_mask == 0] = -100
    labels[1, :4] = -100  # prompt tokens are not trained on
    return input_ids, attention_mask, labels


@pytest.mark.parametrize("build", [tiny_llama, lambda: tiny_llama(tie=False), tiny_gpt2])
def test_causal_lm_loss_equals_hf_loss_and_gradients(build):
    model = build()
    input_ids, attention_mask, labels = batch()
    params = [p for p in model.parameters() if p.requires_grad]
    ours = causal_lm_loss(model, input_ids, labels, attention_mask=attention_mask, chunk_size=5)
    ref = model(input_ids, attention_mask=attention_mask, labels=labels).loss
    torch.testing.assert_close(ours, ref, **FP32)
    for got, want in zip(torch.autograd.grad(ours, params), torch.autograd.grad(ref, params)):
        torch.testing.assert_close(got, want, **FP32)


def test_causal_lm_loss_refuses_an_adapted_head():
    model = tiny_llama(tie=False)
    model.lm_head.register_parameter("lora_A", nn.Parameter(torch.zeros(2, 32)))
    input_ids, attention_mask, labels = batch()
    with pytest.raises(ValueError, match="lora_A"):
        causal_lm_loss(model, input_ids, labels)


def test_causal_lm_loss_checks_label_shape():
    model = tiny_llama()
    input_ids, _, labels = batch()
    with pytest.raises(ValueError, match="shape of input_ids"):
        causal_lm_loss(model, input_ids, labels[:, 1:])
