"""Sharding the frozen base over the processes (FSDP2, `torch.distributed.fsdp.fully_shard`).

    lorakit train config.yaml train.fsdp=true          # under torchrun, 2+ processes

Data parallelism (`lorakit.training.distributed`) keeps a whole copy of the frozen base in every process. With
`train.fsdp` each decoder block's frozen tensors are cut into P pieces along dim 0 and process k keeps
piece k; a block's pieces are all-gathered just before its forward, freed after it, and gathered again
for its backward (reshard_after_forward). Steady-state memory for the blocks' base weights is 1/P per
process; every step moves (P-1)/P of them twice per process instead (all-gather, forward and backward).

Quantized weights shard as they are. An NF4 or INT-N weight is a module of packed tensors (codes,
absmax / scale, offset) whose meaning does not depend on where dim 0 is cut: all-gathering the pieces
restores the identical bytes, so no tensor subclass is needed. FSDP2 manages parameters only, so those
tensors move from the module's buffers to frozen parameters (requires_grad=False; the state-dict keys
do not change); FSDP2 all-gathers mixed dtypes (uint8 codes, fp16/fp32 scales) as bytes.

What is not sharded, and why:
- The adapters (A, B): `ignored_params`. They are small, and `lorakit.training.distributed` all-reduces their
  gradients exactly as without FSDP, so the run is the same run (tested: the adapter equals the
  1-process run's to float rounding).
- The embeddings, the final norm and the output head stay whole in every process: the fused loss uses
  the head's weight outside its module's forward (no FSDP hook would gather it), and the input and output
  embeddings are often one tied tensor. For a 7B Llama that is ~3% of the weights.
- Loading: every process first loads the whole base, then shards it, so peak memory while loading is
  the whole base (in host memory: on GPUs the pieces are moved to the device after sharding, so the GPU
  never holds the whole base). Reading each process's rows straight from the file is not built.
- After training the in-memory model holds pieces; the adapter is saved as usual, and merge/export
  load the base again (`lorakit export RUN` does).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lorakit.training.recompute import find_blocks
from lorakit.training.distributed import World


@dataclass(frozen=True)
class ShardReport:
    blocks: int  # decoder blocks sharded
    sharded_bytes: int  # the blocks' frozen tensors, whole
    local_bytes: int  # this process's pieces of them
    replicated_bytes: int  # frozen tensors every process keeps whole (embeddings, head, norms)


def shard_base_(model: nn.Module, world: World) -> ShardReport:
    """Shard the frozen tensors of `model`'s decoder blocks over `world`'s processes, in place."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if not world.distributed:
        raise ValueError("train.fsdp shards the base over several processes: start the run with torchrun "
                         "--nproc_per_node=N (N >= 2), or set train.fsdp=false")
    blocks = find_blocks(model)
    block_params = {id(p) for p in blocks.parameters()}
    _packed_buffers_to_parameters_(blocks)
    frozen = [p for p in blocks.parameters() if not p.requires_grad]
    sharded = sum(p.numel() * p.element_size() for p in frozen)
    replicated = sum(p.numel() * p.element_size() for p in model.parameters()
                     if not p.requires_grad and id(p) not in block_params)
    replicated += sum(b.numel() * b.element_size() for b in model.buffers())
    mesh = init_device_mesh(world.device.type, (world.size,))
    for block in blocks:
        trainable = {p for p in block.parameters() if p.requires_grad}
        fully_shard(block, mesh=mesh, reshard_after_forward=True, ignored_params=trainable)
    if world.device.type != "cpu":  # FSDP moved the pieces; the rest follows
        model.to(world.device)
    local = sum(_local(p).numel() * p.element_size() for p in blocks.parameters() if not p.requires_grad)
    return ShardReport(len(blocks), sharded, local, replicated)


def _packed_buffers_to_parameters_(module: nn.Module) -> None:
    """Every quantized weight's packed tensors become frozen parameters, under the same names."""
    from lorakit.quant.storage import PackedWeight

    for weight in module.modules():
        if isinstance(weight, PackedWeight):
            for name in [n for n, b in weight._buffers.items() if b is not None and b.dim() > 0]:
                tensor = weight._buffers.pop(name)
                weight.register_parameter(name, nn.Parameter(tensor, requires_grad=False))


def _local(p: torch.Tensor) -> torch.Tensor:
    return p.to_local() if hasattr(p, "to_local") else p
