"""Tiny models and helpers for the adapter tests (test_lora_layers, test_peft_parity).

Every model here is built from a config with a fixed seed (no hub, no downloads) and is small
enough that a forward pass takes milliseconds on one CPU core.

Tolerance: fp32 only. Two implementations of the same adapter (lorakit vs PEFT, merged vs
unmerged) differ by float rounding of a different summation order; on these tiny models that is
~1e-7, so `FP32_ATOL = 1e-5` on logits leaves two orders of margin and still catches a wrong
scaling (an alpha/r vs alpha/sqrt(r) mix-up changes logits by > 1e-3).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

FP32_ATOL = 1e-5
# An adapter whose effect on the logits is smaller than this would make a parity test vacuous.
MIN_ADAPTER_EFFECT = 1e-4

VOCAB = 128


def tiny_llama(seed: int = 0, hidden: int = 64, layers: int = 2) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=VOCAB, intermediate_size=128, max_position_embeddings=64,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


def tiny_gpt2(seed: int = 0) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(
        n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64, bos_token_id=0, eos_token_id=0,
    )
    return transformers.GPT2LMHeadModel(cfg).eval()


def tiny_bert(seed: int = 0) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        vocab_size=VOCAB, max_position_embeddings=64, num_labels=3,
    )
    return transformers.BertForSequenceClassification(cfg).eval()


class TinyConvNet(nn.Module):
    """conv(3->8, 3x3, pad 1) -> relu -> conv(8->16, 3x3, stride 2) -> flatten -> linear head."""

    def __init__(self, image: int = 8, classes: int = 5):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2)
        side = (image - 3) // 2 + 1
        self.head = nn.Linear(16 * side * side, classes)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(pixel_values))  # (B, 8, H, W)
        x = self.conv2(x)  # (B, 16, H', W')
        return self.head(x.flatten(1))  # (B, classes)


def tiny_convnet(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return TinyConvNet().eval()


def token_inputs(seed: int = 1, batch: int = 2, seq: int = 7) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, VOCAB, (batch, seq), generator=g)}


def image_inputs(seed: int = 1, batch: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"pixel_values": torch.randn(batch, 3, 8, 8, generator=g)}


@torch.no_grad()
def logits(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's output tensor (`.logits` for transformers models), in eval mode."""
    model.eval()
    out = model(**inputs)
    return out.logits if hasattr(out, "logits") else out


@torch.no_grad()
def randomise_trainable_(model: nn.Module, seed: int = 0, std: float = 0.02) -> list[str]:
    """Add N(0, std) noise to every trainable parameter, in name order; return their names.

    B starts at zero, so without this every adapter is a no-op and a parity test passes vacuously.
    Adding (rather than overwriting) keeps PiSSA's and Kaiming's A at their scale.
    """
    g = torch.Generator().manual_seed(seed)
    names = []
    for name, p in sorted(model.named_parameters(), key=lambda item: item[0]):
        if p.requires_grad:
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)
            names.append(name)
    assert names, "no trainable parameters: nothing was injected"
    return names


def fresh(model: nn.Module) -> nn.Module:
    """An independent copy with the same weights (lorakit and PEFT both modify models in place)."""
    return copy.deepcopy(model)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, f"shape {tuple(a.shape)} != {tuple(b.shape)}"
    return (a - b).abs().max().item()


def train_steps(model: nn.Module, input_ids: torch.Tensor, steps: int = 30, lr: float = 1e-2) -> list[float]:
    """AdamW on the trainable parameters, memorising one batch; returns the loss of every step."""
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(input_ids, labels=input_ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses
