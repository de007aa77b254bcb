"""Tiny models shared by the tests. Every model is built from a config with a fixed seed: no hub."""

import pytest
import torch


def tiny_llama(seed: int = 0, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
    cfg.update(overrides)
    return LlamaForCausalLM(LlamaConfig(**cfg)).eval()


def randomize_trainable(model: torch.nn.Module, seed: int = 1, std: float = 0.05) -> None:
    """Give every trainable parameter random values (B starts at zero, so parity needs this)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * std)


@pytest.fixture
def llama():
    return tiny_llama()


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)
