"""Fused operations, each beside the plain PyTorch reference it must match.

`fuse_for_training_(model)` applies every fusion that fits the model; each is exact up to float
rounding: RMSNorm and SwiGLU only change what autograd keeps for backward, not what the model computes;
attention on a CPU in bf16/fp16 computes short queries in float32 (`lorakit.kernels.attention`).
"""

from torch import nn

from lorakit.kernels.attention import fuse_attention_, unfuse_attention_
from lorakit.kernels.rmsnorm import fuse_rmsnorm_, rmsnorm, rmsnorm_reference, unfuse_rmsnorm_
from lorakit.kernels.swiglu import fuse_swiglu_, swiglu_down, swiglu_down_reference, unfuse_swiglu_


def fuse_for_training_(model: nn.Module) -> dict[str, int]:
    """Swap in the memory-lean fused ops (RMSNorm, SwiGLU + down projection) and, on a CPU in bf16/fp16, float32
    attention for short queries; return counts per op."""
    return {"rmsnorm": fuse_rmsnorm_(model), "swiglu": fuse_swiglu_(model), "attention": fuse_attention_(model)}


def unfuse_(model: nn.Module) -> dict[str, int]:
    return {"rmsnorm": unfuse_rmsnorm_(model), "swiglu": unfuse_swiglu_(model), "attention": unfuse_attention_(model)}


__all__ = [
    "fuse_attention_", "fuse_for_training_", "fuse_rmsnorm_", "fuse_swiglu_", "rmsnorm", "rmsnorm_reference", "swiglu_down",
    "swiglu_down_reference", "unfuse_", "unfuse_attention_", "unfuse_rmsnorm_", "unfuse_swiglu_",
]
