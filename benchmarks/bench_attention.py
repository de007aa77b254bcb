"""Causal attention on a CPU, forward + backward: how fast each way of computing it runs in one dtype.

    python benchmarks/bench_attention.py                      # bf16, 256 / 512 / 1024 query tokens
    python benchmarks/bench_attention.py --dtype float32 --lengths 128,512

SmolLM2-135M's attention shape (9 query heads and 3 key-value heads of 64; `--heads`), `--batch` rows of T
tokens, every row full length (no padding mask), alternating the candidates in one process for `--rounds`
rounds (the first a warm-up) of `--repeats` calls each; the median per call. FLOPs are the causal count:
forward q·kᵀ and P·v over half the T x T scores (2 · 2·B·h·T²·d / 2), backward twice that.

- `flash`: `F.scaled_dot_product_attention(..., is_causal=True, enable_gqa=True)`, PyTorch's CPU flash kernel;
  what training in bf16 uses from `lorakit.kernels.attention.UPCAST_BELOW` query tokens on.
- `float32`: the same call on float32 copies, cast back (`lorakit.kernels.attention.sdpa` below that length).
- `math`: the same call restricted to PyTorch's math backend (q·kᵀ, softmax and P·v as whole tensors).
- `blocked`: not in lorakit (measured, not adopted: the README's "On a CPU with AVX512-BF16 but no AMX"):
  `--block` queries at a time against their causal prefix of keys through `bmm` in the dtype (each key-value
  head's query heads folded into the rows), the softmax in float32. Its scores q·kᵀ are rounded to the dtype
  before the softmax (a CPU `bmm` has no float32 output in torch 2.13); the flash kernel keeps them in float32.
- `blocked-f32-scores`: the same with q·kᵀ computed from float32 copies of q and k (the flash kernel's precision
  for the scores, at float32 GEMM speed for that product).

Prints one line per length and writes `--out` (JSON; default benchmarks/results/attention_<dtype>.json).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

RESULTS = Path(__file__).resolve().parent / "results"


def flash(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def float32(q, k, v):
    return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True,
                                          enable_gqa=True).to(q.dtype)


def math(q, k, v):
    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def blocked(q, k, v, block: int, scores_dtype: torch.dtype | None = None):
    """q (B, h, T, d), k and v (B, h_kv, T, d) -> (B, h, T, d): rows s..e of each head against keys 0..e."""
    batch, heads, length, dim = q.shape
    kv_heads = k.shape[1]
    group = heads // kv_heads
    folded = (q * dim ** -0.5).view(batch, kv_heads, group, length, dim)
    outs = []
    for s in range(0, length, block):
        e = min(s + block, length)
        rows = folded[:, :, :, s:e].reshape(batch, kv_heads, group * (e - s), dim)     # (B, h_kv, G·b, d)
        if scores_dtype is not None:  # q·kᵀ computed in scores_dtype (float32: the flash kernel's precision)
            rows, keys = rows.to(scores_dtype), k[:, :, :e].to(scores_dtype)
        else:
            keys = k[:, :, :e]
        scores = (rows @ keys.transpose(-1, -2)).float().view(batch, kv_heads, group, e - s, e)
        future = torch.ones(e - s, e, dtype=torch.bool).triu_(s + 1)                   # key j > query s + i
        p = torch.softmax(scores.masked_fill(future, float("-inf")), -1).to(q.dtype)
        outs.append((p.view(batch, kv_heads, group * (e - s), e) @ v[:, :, :e]).view(batch, kv_heads, group, e - s, dim))
    return torch.cat(outs, 3).view(batch, heads, length, dim)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtype", choices=("bfloat16", "float32", "float16"), default="bfloat16")
    parser.add_argument("--lengths", default="256,512,1024")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--heads", default="9,3", help="query heads, key-value heads")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--block", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: PyTorch's default)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    heads, kv_heads = (int(x) for x in args.heads.split(","))
    if heads % kv_heads:
        sys.exit(f"--heads {args.heads}: the query heads must be a multiple of the key-value heads")
    candidates = {"flash": flash, "float32": float32, "math": math,
                  "blocked": lambda q, k, v: blocked(q, k, v, args.block),
                  "blocked-f32-scores": lambda q, k, v: blocked(q, k, v, args.block, torch.float32)}
    rows = []
    for length in (int(t) for t in args.lengths.split(",")):
        g = torch.Generator().manual_seed(length)
        q, k, v = (torch.randn(args.batch, h, length, args.dim, generator=g).to(dtype).requires_grad_()
                   for h in (heads, kv_heads, kv_heads))
        grad = torch.randn(args.batch, heads, length, args.dim, generator=g).to(dtype)
        with torch.no_grad():  # the exact result, to report each one's error
            reference = flash(q.double(), k.double(), v.double())
            errors = {name: (fn(q, k, v).double() - reference).abs().max().item() for name, fn in candidates.items()}
        times = {name: [] for name in candidates}
        for round_ in range(args.rounds):
            for name, fn in candidates.items():
                start = time.perf_counter()
                for _ in range(args.repeats):
                    out = fn(q, k, v)
                    out.backward(grad)
                if round_:
                    times[name].append((time.perf_counter() - start) / args.repeats)
        flops = 3 * 2 * args.batch * heads * length * length * args.dim  # causal: forward 2·B·h·T²·d, backward 2x
        row = {"tokens": length, "flops": flops}
        for name in candidates:
            seconds = statistics.median(times[name])
            row[name] = {"seconds": seconds, "gflops_per_s": flops / seconds / 1e9, "max_abs_error": errors[name]}
        rows.append(row)
        print(f"{length:5d} tokens  " + "  ".join(
            f"{name} {row[name]['seconds'] * 1e3:7.1f} ms ({row[name]['gflops_per_s']:4.0f} GFLOP/s, "
            f"err {row[name]['max_abs_error']:.1e})" for name in candidates), flush=True)
    from lorakit.io import write_json

    out = args.out or RESULTS / f"attention_{args.dtype}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, {"torch": torch.__version__, "cpu": os.cpu_count(), "threads": torch.get_num_threads(),
                     "dtype": args.dtype, "batch": args.batch, "heads": [heads, kv_heads], "dim": args.dim,
                     "block": args.block, "results": rows})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
