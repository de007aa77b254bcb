"""The tiny model the quantization tests share: built from a config with a fixed seed, no hub."""

import pytest
import torch

LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)


def tiny_llama(seed: int = 0, **overrides):
    """The brief's 2-layer Llama (14 linears + lm_head), in eval mode; `overrides` change its LlamaConfig."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**(LLAMA | overrides))).eval()


@pytest.fixture(scope="session")
def make_llama():
    return tiny_llama
