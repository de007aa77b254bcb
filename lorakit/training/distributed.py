"""Data parallelism for `lorakit train` over torch.distributed (started by torchrun), in one small object.

    torchrun --nproc_per_node=2 -m lorakit train config.yaml      # gloo on CPU, NCCL on GPUs

Every process loads the same frozen base and the same adapter (rank 0's initial A and B are broadcast),
reads the same data and builds the same global batches; process `rank` of `size` takes its slice of
each global micro-batch:

    global micro-batch (G = batch_size x size rows, length-grouped)    rows[0 : G]
    rank k's rows                                                      rows[k*G/size : (k+1)*G/size]

A step's loss is the mean over every loss-bearing token of the global batch, so rank k backpropagates
loss_k * n_k / N with N = sum_k n_k (one all-reduce of a scalar per step), and the all-reduced SUM of
the adapter gradients is exactly the one-process gradient of the whole global batch. Only trainable
(adapter) gradients travel: one flat buffer per step,

    bytes per step = sum over trainable parameters of numel x element size

(SmolLM2-135M, r=16 on all linear layers: 4.9 M fp32 values = 19.6 MB; the frozen base's 135 M
weights never move). Every rank then clips and steps the same gradient, so parameters stay identical
without another broadcast. Only rank 0 writes files and prints.

Equivalence (tested in CI on CPU): K steps with 2 processes x batch b give the adapter of 1 process x
batch 2b, to float rounding (padding differs per slice; with dropout > 0 the masks differ, so
equivalence is in distribution only).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    """This process's place among `size` data-parallel processes (size 1: no torch.distributed at all)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        """Whether this process writes files and prints (rank 0)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def sum(self, *values: float) -> list[float]:
        """Each value summed over all processes (float64, so token counts stay exact)."""
        if not self.distributed:
            return [float(v) for v in values]
        t = torch.tensor(values, dtype=torch.float64, device=self._comm_device)
        dist.all_reduce(t)
        return t.tolist()

    def gather(self, items: list) -> list:
        """Every process's `items` (picklable, small: e.g. detections for a metric), concatenated in rank order."""
        if not self.distributed:
            return list(items)
        parts: list = [None] * self.size
        dist.all_gather_object(parts, items)
        return [item for part in parts for item in part]

    def all_reduce_grads(self, params: list[torch.nn.Parameter]) -> int:
        """Sum every parameter's gradient over all processes, as one flat buffer; return the bytes sent.
        A parameter without a gradient on this process (it saw no tokens) contributes zeros."""
        if not self.distributed:
            return 0
        grads = []
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
        flat = torch.cat([g.reshape(-1).to(torch.float32) for g in grads]).to(self._comm_device)
        dist.all_reduce(flat)
        flat = flat.to(grads[0].device)
        offset = 0
        for g in grads:
            g.copy_(flat[offset: offset + g.numel()].view_as(g))
            offset += g.numel()
        return flat.numel() * flat.element_size()

    def broadcast_params(self, params: list[torch.nn.Parameter]) -> None:
        """Make every process start from rank 0's values."""
        if not self.distributed:
            return
        with torch.no_grad():
            for p in params:
                buf = p.detach().to(self._comm_device)
                dist.broadcast(buf, src=0)
                p.copy_(buf)

    def gather_rng(self) -> list[torch.Tensor]:
        """Every process's torch CPU generator state (rank order), so a checkpoint can restore each one."""
        state = torch.get_rng_state()
        if not self.distributed:
            return [state]
        gathered = [torch.empty_like(state, device=self._comm_device) for _ in range(self.size)]
        dist.all_gather(gathered, state.to(self._comm_device))
        return [s.cpu() for s in gathered]

    @property
    def _comm_device(self) -> torch.device:
        # NCCL moves CUDA tensors only; gloo moves CPU tensors.
        return self.device if self.device.type == "cuda" else torch.device("cpu")


def init_world() -> World:
    """The `World` torchrun describes in the environment (RANK, WORLD_SIZE, LOCAL_RANK), with the process
    group initialised: NCCL when CUDA is available, else gloo. Without torchrun: a single process."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    if cuda and local_rank >= torch.cuda.device_count():
        raise ValueError(f"LOCAL_RANK={local_rank} but this machine has {torch.cuda.device_count()} CUDA device(s): "
                         f"start at most that many processes per node (torchrun --nproc_per_node)")
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if size <= 1:
        return World(device=device)
    if "MASTER_ADDR" not in os.environ:
        raise ValueError(f"WORLD_SIZE={size} but MASTER_ADDR is not set: start multi-process training with "
                         f"torchrun (torchrun --nproc_per_node={size} -m lorakit train CONFIG.yaml)")
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return World(rank=dist.get_rank(), size=dist.get_world_size(), local_rank=local_rank, device=device)


def close_world(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


def split_rows(rows: list, world: World) -> list:
    """This process's contiguous slice of a global micro-batch (length-grouped, so slices pad alike).
    A short last batch may leave a process with fewer rows, or none."""
    per = -(-len(rows) // world.size)
    return rows[world.rank * per: (world.rank + 1) * per]
