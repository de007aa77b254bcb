"""Multi-process scaling: `lorakit train` on 1 process vs N processes (torchrun), same global batch.

Fine-tunes SmolLM2-135M-Instruct with QA-LoRA r=16, alpha 32 on every linear layer, on the embedded GGUF's
own 4-bit codes (`--method lora`: the dense fp32 base), on the standard-library docstring pairs, max 256
tokens, global batch 8 (1 process x 8 rows, or N processes x 8/N rows), the same steps, lr and schedule,
so every run trains the same model. Three runs: 1 process; N processes data-parallel (every process holds
the whole base); N processes with `train.fsdp` (each holds 1/N of the decoder blocks' base). Reports:

    useful tokens/s     loss-bearing tokens / summed optimizer-step time (loading, evaluation excluded)
    all-reduce bytes    per optimizer step: the adapter gradients, one flat fp32 buffer (0 for 1 process),
                        and the seconds that all-reduce took (a share of the step time)
    full fine-tune      what DDP of a full fine-tune would move instead (every base parameter's fp32 grad)
    base bytes          of the decoder blocks' frozen weights, held by each process (FSDP: its pieces)

On a CPU the N processes share the machine's cores: 1 process runs torch with all of them, each of N
processes with cores/N threads. On GPUs each process gets its own device (NCCL).

    python benchmarks/bench_ddp.py [--steps 12] [--processes 2] [--method qalora|lora]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from lorakit.io import write_json


def make_data(path: Path) -> Path:
    from lorakit.data.stdlib_docs import TRAIN_MODULES, docstring_pairs

    path.write_text("".join(json.dumps({"instruction": q, "output": a}) + "\n" for q, a in docstring_pairs(TRAIN_MODULES)))
    return path


def run(processes: int, data: Path, out: Path, args, fsdp: bool = False) -> dict:
    overrides = [f"train.fsdp={str(fsdp).lower()}",
        f"method={args.method}", "model.dtype=float32", f"data.train={data}", "data.valid_fraction=0",
        f"data.max_tokens={args.max_tokens}", f"output_dir={out}", f"train.steps={args.steps}",
        f"train.batch_size={args.batch // processes}", "train.lr=2e-4", "train.warmup_steps=2",
        "train.eval_every=0", f"train.save_every={args.steps}", "adapter.r=16", "adapter.alpha=32",
    ]
    threads = max(1, (os.cpu_count() or 1) // processes)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    if processes == 1:
        command = [sys.executable, "-m", "lorakit", "train", *overrides, "--quiet"]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
                   "-m", "lorakit", "train", *overrides, "--quiet"]
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode:
        raise SystemExit(f"{processes}-process run failed:\n{done.stderr[-4000:]}")
    summary = json.loads((out / "summary.json").read_text())
    shards = summary.get("fsdp")
    return {"processes": processes, "fsdp": fsdp, "threads_per_process": threads, "batch_per_process": args.batch // processes,
            "useful_tokens_per_s": round(summary["useful_tokens_per_s"], 1),
            "train_seconds": round(summary["train_seconds"], 2), "final_train_loss": summary["train_loss"],
            "allreduce_bytes_per_step": summary["allreduce_bytes_per_step"],
            "allreduce_seconds_per_step": round(summary["allreduce_seconds_per_step"], 4),
            "step_seconds": round(summary["train_seconds"] / args.steps, 3),
            "trainable_parameters": summary["trainable_parameters"],
            "block_base_bytes_per_process": shards["local_base_bytes"] if shards else None,
            "block_base_bytes": shards["sharded_base_bytes"] if shards else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8, help="global batch (rows per optimizer step)")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--method", default="qalora", choices=["qalora", "lora"])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "ddp.json"))
    args = parser.parse_args()
    if args.batch % args.processes:
        raise SystemExit(f"--batch {args.batch} must be a multiple of --processes {args.processes}")
    import torch

    from lorakit.models.default import default_model_dir

    base_parameters = sum(math.prod(shape) for shape in _tensor_shapes(default_model_dir()))
    with tempfile.TemporaryDirectory() as tmp:
        data = make_data(Path(tmp) / "train.jsonl")
        n = args.processes
        rows = [run(1, data, Path(tmp) / "p1", args), run(n, data, Path(tmp) / f"p{n}", args),
                run(n, data, Path(tmp) / f"p{n}-fsdp", args, fsdp=True)]
    one, many, sharded = rows
    result = {
        "model": "SmolLM2-135M-Instruct", "method": args.method, "steps": args.steps, "global_batch": args.batch,
        "max_tokens": args.max_tokens, "device": "cuda" if torch.cuda.is_available() else "cpu",
        "cpu_count": os.cpu_count(), "runs": rows,
        "speedup": round(many["useful_tokens_per_s"] / one["useful_tokens_per_s"], 3),
        "fsdp_speedup": round(sharded["useful_tokens_per_s"] / one["useful_tokens_per_s"], 3),
        "final_loss_difference": abs(many["final_train_loss"] - one["final_train_loss"]),
        "fsdp_final_loss_difference": abs(sharded["final_train_loss"] - one["final_train_loss"]),
        "allreduce_bytes_per_step": many["allreduce_bytes_per_step"],
        "full_finetune_grad_bytes_per_step": 4 * base_parameters,
    }
    result["allreduce_fraction_of_full_finetune"] = round(
        result["allreduce_bytes_per_step"] / result["full_finetune_grad_bytes_per_step"], 4)
    write_json(args.out, result)
    print(json.dumps(result, indent=2))


def _tensor_shapes(directory: Path):
    from safetensors import safe_open

    for f in sorted(Path(directory).glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                yield h.get_slice(k).get_shape()


if __name__ == "__main__":
    main()
