"""LoRA vs DoRA at the same budget: `lorakit train` on the embedded SmolLM2-135M-Instruct, same run otherwise.

Every run fine-tunes the embedded model (dense fp32 base for lora / dora, NF4 for qlora / qdora) on the
embedded data (standard-library docstring pairs in the chat template, loss on answers only), adapters on
every linear layer with the same r, alpha = 2r, lr, warmup, cosine schedule, steps, batch and seed; the
validation set is the data's held-out modules. Reported per method: held-out perplexity before and after,
seconds per optimizer step (summed step time / steps; evaluation and checkpoints excluded), trainable
parameters. DoRA adds one magnitude per output channel (a few thousand parameters) and, per layer and
step, the norm of the dense W + s·B A (no grad) and one rescaling.

    python benchmarks/bench_dora.py [--steps 50] [--batch 4] [--r 16] [--methods lora dora] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from lorakit.io import write_json

METHODS = ("lora", "dora", "qlora", "qdora")


def run(method: str, out: Path, args) -> dict:
    from lorakit.training.loop import train
    from lorakit.training.run_config import load_config

    config = load_config(None, [
        f"method={method}", "model.dtype=float32", f"data.max_tokens={args.max_tokens}", f"output_dir={out}",
        f"train.steps={args.steps}", f"train.batch_size={args.batch}", f"train.lr={args.lr}", "train.warmup_steps=5",
        "train.schedule=cosine", "train.eval_every=0", f"train.save_every={args.steps}", "train.seed=0",
        f"adapter.r={args.r}", f"adapter.alpha={2 * args.r}",
    ])
    result = train(config, progress=False)
    summary = json.loads((out / "summary.json").read_text())
    return {"valid_ppl_before": result.valid_ppl_before, "valid_ppl_after": result.valid_ppl_after,
            "train_loss": result.train_loss, "seconds_per_step": result.seconds / result.steps,
            "trainable_parameters": summary["trainable_parameters"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--methods", nargs="+", choices=METHODS, default=["lora", "dora"])
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="lorakit-bench-dora-"))
    results = {}
    for method in args.methods:
        results[method] = run(method, work / method, args)
        print(f"{method}: {results[method]}", flush=True)
    print(f"\nSmolLM2-135M-Instruct, all-linear r={args.r} alpha={2 * args.r}, {args.steps} steps x batch {args.batch}, "
          f"lr {args.lr:g}, max {args.max_tokens} tokens, embedded data (held-out modules for validation)\n")
    print("| method | valid ppl before | valid ppl after | train loss (last step) | s/step | trainable params |")
    print("|---|---:|---:|---:|---:|---:|")
    for method, r in results.items():
        print(f"| {method} | {r['valid_ppl_before']:.3f} | {r['valid_ppl_after']:.3f} | {r['train_loss']:.4f} | "
              f"{r['seconds_per_step']:.2f} | {r['trainable_parameters']:,} |")
    if args.json:
        write_json(args.json, {"settings": vars(args), "results": results})


if __name__ == "__main__":
    main()
