"""`train.compile`: the repeated blocks (a Llama's decoder layers) through `torch.compile`, eager where it
cannot build.

Between its GEMMs a decoder block runs dozens of small memory-bound operators: RMSNorm, the rotary
embedding, SwiGLU, casts, residual adds and, on a 4-bit base, the dequantization of every weight. On short
rows they, not the GEMMs, take most of a step (`benchmarks/bench_roofline.py`'s profile). TorchInductor
fuses each run of them into one generated loop (C++ on a CPU, Triton on a GPU); the GEMMs and attention stay
the libraries' own. What a block computes is unchanged; the rounding of fused elementwise work can differ in
the last bits (fp32 accumulation inside a fused loop), as with any compiled model.

    compile_blocks_(model)   each block of `find_blocks(model)` compiled (`nn.Module.compile`, dynamic shapes:
                             rows of any length reuse the code; one code for all blocks, their weights
                             are inputs); lorakit's hand-fused RMSNorm and SwiGLU (`lorakit.kernels`) are put
                             back first: Inductor fuses the model's own ops itself, and the hand kernels' data-
                             dependent check would split the graph
    uncompile_blocks_(model) undoes it (the model's own modules run eager again)
    eager()                  a block in which compiled blocks run eager: the training loop's validation
                             (no-grad calls would compile a second set of graphs, and `dequantize_once`'s
                             cache is not traceable); the loop hands the model back uncompiled, also after
                             an error

A 4-bit weight is dequantized in the compiled forward and again in its backward (`hold_dense`'s cache is not
traceable; each is one fused loop). Compiling costs time at the first steps (SmolLM2-135M on 2 CPU cores:
~100 s, ~25 s again once Inductor's on-disk cache holds the graphs), so it pays on long runs of short rows
(README, "Compiled blocks").
Where Inductor cannot build code (a CPU one needs a C++ compiler), `inductor_problem()` says why and the run
trains eager with a warning.
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch import nn

from lorakit.training.recompute import find_blocks


@functools.cache
def inductor_problem(device_type: str = "cpu") -> str | None:
    """Why TorchInductor cannot build code for `device_type` here (a tiny function compiled and run), or None."""
    try:
        import torch._dynamo

        fn = torch.compile(lambda x: torch.sin(x) * 2 + 1, backend="inductor", fullgraph=True)
        x = torch.arange(8.0, device=device_type)
        if not torch.allclose(fn(x), torch.sin(x) * 2 + 1):
            return "a compiled probe computed wrong numbers"
        torch._dynamo.reset()
    except Exception as e:  # a missing compiler shows as any of several exception types
        return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:300]
    return None


def configure_dynamo() -> None:
    """The process-wide Dynamo settings compiled blocks need (`compile_blocks_` sets them):

    - `recompile_limit` at least 64: each (method, grad or not, first block or not) is a graph of the one block
      class, room for several runs in one process;
    - `skip_fwd_side_effects_in_bwd_under_checkpoint`: since transformers 5.25 an attention forward runs through
      the `kernels` package's hub-layer wrapper, which sets a context variable and resets it at every call.
      Inside a checkpoint (`train.gradient_checkpointing`) Dynamo will not trace a side effect that the
      recompute in backward would not replay, and splits each block there (no graph at all for the block);
      that set-and-reset leaves nothing to replay."""
    import torch._dynamo

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True


def compile_blocks_(model: nn.Module) -> int:
    """Compile every block of `model`'s largest list of identical blocks; return how many. In place (the
    modules and state-dict keys are untouched); `uncompile_blocks_` undoes it."""
    from lorakit.kernels import unfuse_rmsnorm_, unfuse_swiglu_

    try:
        blocks = find_blocks(model)
    except ValueError:
        raise ValueError(f"train.compile compiles a model's repeated blocks (an nn.ModuleList of identical layers, "
                         f"as a transformer's); {type(model).__name__} has none: set train.compile=false") from None
    unfuse_rmsnorm_(model)
    unfuse_swiglu_(model)

    configure_dynamo()
    for block in blocks:
        block.compile(dynamic=True)
    return len(blocks)


def uncompile_blocks_(model: nn.Module) -> int:
    """Run the blocks `compile_blocks_` compiled eager again (any other compiled module is left alone); return
    how many were compiled."""
    try:
        blocks = find_blocks(model)
    except ValueError:  # nothing compile_blocks_ could have compiled
        return 0
    count = 0
    for block in blocks:
        if block._compiled_call_impl is not None:
            block._compiled_call_impl = None
            count += 1
    return count


def is_compiled(model: nn.Module) -> bool:
    return any(getattr(m, "_compiled_call_impl", None) is not None for m in model.modules())


def eager() -> contextlib.AbstractContextManager[None]:
    """Within the block, compiled code runs eager (torch.compiler.set_stance("force_eager"))."""
    return torch.compiler.set_stance("force_eager")
