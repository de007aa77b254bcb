import copy

import pytest
import torch

from lorakit.training.recompute import disable_gradient_checkpointing, enable_gradient_checkpointing, find_blocks

transformers = pytest.importorskip("transformers")

# fp32: recomputation repeats the same ops on the same inputs; only kernel nondeterminism differs.
FP32 = {"rtol": 1e-5, "atol": 1e-6}


def tiny_llama(layers=4, seed=0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        attn_implementation="eager",
    )
    return transformers.LlamaForCausalLM(config).train()


def tiny_gpt2(seed=0):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=97, n_embd=32, n_layer=3, n_head=4, n_positions=64,
                                     bos_token_id=1, eos_token_id=2)
    return transformers.GPT2LMHeadModel(config).train()


def adapters_only(model):
    """Train only weights inside the blocks, as adapters do: block inputs need no grad."""
    for name, param in model.named_parameters():
        param.requires_grad_(name.endswith(("q_proj.weight", "down_proj.weight")))
    return [p for p in model.parameters() if p.requires_grad]


def inputs(batch=2, seq=24):
    ids = torch.randint(0, 97, (batch, seq), generator=torch.Generator().manual_seed(1))
    return ids, torch.ones_like(ids)


def loss_grads_and_saved_bytes(model, params):
    saved = [0]

    def pack(t):
        saved[0] += t.numel() * t.element_size()
        return t

    ids, mask = inputs()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(ids, attention_mask=mask, labels=ids).loss  # use_cache defaults to True
    return loss, torch.autograd.grad(loss, params), saved[0]


def test_finds_the_decoder_layers():
    llama, gpt2 = tiny_llama(), tiny_gpt2()
    assert find_blocks(llama) is llama.model.layers
    assert find_blocks(gpt2) is gpt2.transformer.h


def test_same_gradients_less_saved_memory_with_only_adapter_params_trainable():
    model = tiny_llama()
    params = adapters_only(model)
    loss, grads, saved = loss_grads_and_saved_bytes(model, params)

    assert enable_gradient_checkpointing(model) == 4
    loss_ckpt, grads_ckpt, saved_ckpt = loss_grads_and_saved_bytes(model, params)

    torch.testing.assert_close(loss_ckpt, loss, **FP32)
    for got, want in zip(grads_ckpt, grads):
        assert got.abs().sum() > 0
        torch.testing.assert_close(got, want, **FP32)
    assert saved_ckpt < 0.5 * saved


def test_gpt2_blocks_and_dropout_rng_are_replayed():
    model = tiny_gpt2()  # dropout 0.1: the recompute must see the same masks
    params = [p for p in model.parameters() if p.requires_grad]
    torch.manual_seed(5)
    _, grads, _ = loss_grads_and_saved_bytes(model, params)
    enable_gradient_checkpointing(model)
    torch.manual_seed(5)
    _, grads_ckpt, _ = loss_grads_and_saved_bytes(model, params)
    for got, want in zip(grads_ckpt, grads):
        torch.testing.assert_close(got, want, **FP32)


def test_not_checkpointed_in_eval_or_without_grad():
    model = tiny_llama()
    params = adapters_only(model)
    model.eval()
    _, _, saved = loss_grads_and_saved_bytes(model, params)
    enable_gradient_checkpointing(model)
    _, _, saved_ckpt = loss_grads_and_saved_bytes(model, params)
    assert saved_ckpt == saved
    ids, _ = inputs()
    with torch.no_grad():
        model.train()(ids)


def test_state_dict_keys_unchanged_and_disable_restores_class_forward():
    model = tiny_llama()
    keys = list(model.state_dict())
    assert enable_gradient_checkpointing(model, model.model.layers) == 4
    assert enable_gradient_checkpointing(model) == 0  # already wrapped
    assert list(model.state_dict()) == keys
    assert disable_gradient_checkpointing(model) == 4
    assert all("forward" not in layer.__dict__ for layer in model.model.layers)
    assert list(model.state_dict()) == keys


def test_deepcopy_wraps_the_copy_not_the_original():
    model = tiny_llama()
    enable_gradient_checkpointing(model)
    clone = copy.deepcopy(model)
    for layer, original in zip(clone.model.layers, model.model.layers):
        assert layer.forward.__self__ is layer
        assert layer._lorakit_unchecked_forward.__self__ is layer is not original


def test_refuses_double_checkpointing_and_bad_blocks():
    model = tiny_llama()
    model.activation_checkpointing_enable()
    with pytest.raises(ValueError, match="activation_checkpointing_disable"):
        enable_gradient_checkpointing(model)
    with pytest.raises(TypeError, match="ModuleList"):
        enable_gradient_checkpointing(model, model.model)
    with pytest.raises(ValueError, match="blocks="):
        find_blocks(torch.nn.Linear(2, 2))


def test_a_cache_under_any_argument_name_is_not_passed_to_the_recompute():
    """transformers has renamed the cache argument (past_key_value, past_key_values, layer_past, cache in 5.24);
    a block that appended to a cache in forward and again in the recompute would see twice the keys."""

    class Cache:  # what transformers' caches derive from, matched by name
        def __init__(self):
            self.appended = 0

    class DynamicCache(Cache):
        pass

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(4, 4)

        def forward(self, x, some_future_name=None, use_cache=True):
            if some_future_name is not None:
                some_future_name.appended += 1
            return self.linear(x)

    blocks = torch.nn.ModuleList([Block(), Block()])
    enable_gradient_checkpointing(torch.nn.Sequential(), blocks)
    cache, x = DynamicCache(), torch.randn(2, 4)
    out = blocks[1](blocks[0](x, some_future_name=cache), some_future_name=cache)
    out.sum().backward()
    assert cache.appended == 0 and blocks[0].linear.weight.grad is not None
    blocks.eval()
    with torch.no_grad():
        blocks[0](x, some_future_name=cache)  # no checkpoint outside training: the cache is used
    assert cache.appended == 1
