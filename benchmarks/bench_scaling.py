"""What a training step costs as the work grows: SmolLM2's published shapes (135M, 360M, 1.7B parameters,
randomly initialised: the cost does not depend on the values) at 256 to 2048 tokens per row.

For each size and method (`lora` on the dense model in `--dtype`, `qlora` streamed into NF4, `qalora` on INT4 groups of
32) one process saves nothing but runs `lorakit train`'s own loop (`_start` / `_step`) with batch 1 and r 16 on
every linear layer, on one row of each length in turn (shortest first, the first one twice as a warm-up), and
reports per length: seconds per step, tokens/s, MFU against the matmul peak of `bench_roofline.py`, and the
process's peak RSS (the high-water mark, reset after the model is loaded: the training steps' own peak; the
load's peak is reported apart). `--dtype` is the compute dtype (`model.dtype`: float32, or bfloat16 where the
CPU has it natively; MFU against the peak of the same dtype); `--compile` trains with `train.compile=true`
(the blocks through torch.compile; its compile time is in the warm-up step, not in the figures). Writes
benchmarks/results/scaling.json and scaling.png (log-log); scaling_bf16.json / _compile for the others.

    python benchmarks/bench_scaling.py [--sizes 135M,360M,1.7B] [--lengths 256,512,1024,2048]
                                       [--methods lora,qlora,qalora] [--dtype float32|bfloat16] [--compile]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).parent
RESULTS = HERE / "results" / "scaling.json"
# SmolLM2's published configs (hidden, intermediate, layers, heads, kv heads); vocabulary 49152, tied embeddings
SHAPES = {"135M": (576, 1536, 30, 9, 3), "360M": (960, 2560, 32, 15, 5), "1.7B": (2048, 8192, 24, 32, 32)}


def make_model(size: str, directory: Path, tokenizer=None, shape: tuple | None = None) -> Path:
    """A randomly initialised Llama of `size` (or of `shape`: hidden, intermediate, layers, heads, kv heads) saved
    as a Hugging Face directory (bf16 on disk, with `tokenizer`, by default the embedded model's)."""
    import transformers

    from lorakit.models.default import load_causal_lm

    if (directory / "config.json").exists():
        return directory
    hidden, inter, layers, heads, kv = shape or SHAPES[size]
    config = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                                      num_attention_heads=heads, num_key_value_heads=kv, vocab_size=49152,
                                      tie_word_embeddings=True, max_position_embeddings=8192, rope_theta=100000,
                                      bos_token_id=1, eos_token_id=2, pad_token_id=2)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # bench_gpu.py: initialising 1.7B on the GPU is ~10x faster
    model = model.to_empty(device=device).to(torch.bfloat16)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02) if p.ndim > 1 else torch.nn.init.ones_(p)
    model.lm_head.weight = model.model.embed_tokens.weight  # tied, as SmolLM2 (to_empty made two tensors)
    model.save_pretrained(directory)
    if tokenizer is None:
        _, tokenizer = load_causal_lm(None)
    tokenizer.save_pretrained(directory)
    return directory


def make_rows(path: Path, lengths: list[int], tokenizer) -> Path:
    """One text row per length of random words from the tokenizer's vocabulary: n - 1 tokens that encode back to
    n - 1 tokens (+ the EOS token text rows end with: n)."""
    rng = random.Random(0)
    words = [w for w in tokenizer.get_vocab() if w.isalpha() and len(w) > 2][:5000]
    rows = []
    for n in lengths:
        while True:
            ids = tokenizer(" ".join(rng.choice(words) for _ in range(2 * n)), add_special_tokens=False).input_ids
            text = tokenizer.decode(ids[:n - 1])
            if len(tokenizer(text, add_special_tokens=False).input_ids) == n - 1:  # the decode/encode round trip
                break
        rows.append({"text": text})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run_one(size: str, method: str, args) -> dict:
    import transformers

    from lorakit.tasks import make_task
    from lorakit.training import loop
    from lorakit.training.distributed import init_world
    from lorakit.training.flops import LlamaShape, gemm_shapes, step_flops
    from lorakit.training.memory import current_rss_bytes, peak_rss_bytes, reset_peak_rss
    from lorakit.training.run_config import load_config

    sys.path.insert(0, str(HERE))
    from bench_roofline import matmul_peak

    directory = Path(args.work) / size
    lengths = [int(n) for n in args.lengths.split(",")]
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory, local_files_only=True)
    rows = make_rows(Path(args.work) / f"rows-{size}-{method}.jsonl", lengths, tokenizer)
    out = Path(tempfile.mkdtemp(prefix=f"scaling-{size}-{method}-"))
    config = load_config(None, [
        f"method={method}", f"model.path={directory}", f"model.dtype={args.dtype}", f"data.train={rows}",
        f"train.compile={args.compile}",
        "data.valid_fraction=0", "data.shape=text", f"data.max_tokens={max(lengths)}", f"output_dir={out}",
        f"train.steps={len(lengths) + 1}", "train.batch_size=1", "train.warmup_steps=0", "train.eval_every=0",
        f"train.save_every={10 * len(lengths)}", f"adapter.r={args.r}", f"adapter.alpha={2 * args.r}",
    ])
    start = time.perf_counter()
    run = loop._start(config, False, False, make_task(config, tokenizer=tokenizer), None, init_world())
    load_seconds, load_peak = time.perf_counter() - start, peak_rss_bytes()
    shape = LlamaShape.of(run.model.config)
    by_length = {len(b[0].input_ids): i for i, b in enumerate(run.batches)}
    reset_peak_rss()
    results = []
    for k, n in enumerate(sorted(by_length)):
        for _ in range(2 if k == 0 else 1):  # the shortest row twice: the first step warms up
            run.batch_index = by_length[n]
            before = run.seconds
            loop._step(run)
            seconds = run.seconds - before
        flops = step_flops(shape, [n], n - 1, args.r)["total"]
        peak = matmul_peak(gemm_shapes(shape, n, args.r), run.dtype, repeats=2)
        results.append({"tokens": n, "seconds_per_step": seconds, "tokens_per_s": n / seconds,
                        "mfu": flops / seconds / peak, "matmul_peak_flops_per_s": peak, "peak_rss_bytes": peak_rss_bytes()})
        print(json.dumps({"size": size, "method": method, **results[-1]}), file=sys.stderr, flush=True)
    return {"size": size, "method": method, "dtype": str(run.dtype).removeprefix("torch."),
            "compiled_blocks": run.compiled_blocks, "parameters": shape.parameters(), "load_seconds": load_seconds,
            "load_peak_rss_bytes": load_peak, "rss_after_load_bytes": current_rss_bytes(), "steps": results}


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for r in results:
        tokens = [s["tokens"] for s in r["steps"]]
        style = {"lora": "-", "qlora": "--", "qalora": ":"}[r["method"]]
        label = f"{r['size']} {r['method']}"
        left.loglog(tokens, [s["seconds_per_step"] for s in r["steps"]], style, marker="o", label=label)
        right.loglog(tokens, [s["peak_rss_bytes"] / 2**30 for s in r["steps"]], style, marker="o", label=label)
    left.set(xlabel="tokens per row (batch 1)", ylabel="seconds per step", title="step time")
    right.set(xlabel="tokens per row (batch 1)", ylabel="peak RSS (GiB)", title="peak memory while training")
    for ax in (left, right):
        ax.grid(True, which="both", alpha=0.3)
    left.legend(fontsize=7, ncol=3)
    dtypes = sorted({r.get("dtype", "float32") for r in results})
    fig.suptitle(", ".join(dtypes) + (", compiled blocks" if any(r.get("compiled_blocks") for r in results) else ""),
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="135M,360M,1.7B")
    parser.add_argument("--lengths", default="256,512,1024,2048")
    parser.add_argument("--methods", default="lora,qlora,qalora")
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "lorakit-scaling"))
    parser.add_argument("--one", nargs=2, metavar=("SIZE", "METHOD"), help=argparse.SUPPRESS)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--compile", action="store_true", help="train.compile=true (the blocks through torch.compile)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.out is None:
        suffix = ("_bf16" if args.dtype == "bfloat16" else "") + ("_compile" if args.compile else "")
        args.out = RESULTS.with_name(f"scaling{suffix}.json")
    if args.one:
        print(json.dumps(run_one(*args.one, args)))
        return
    results = []
    for size in args.sizes.split(","):
        if size not in SHAPES:
            sys.exit(f"--sizes: {size!r} is not one of {', '.join(SHAPES)}")
        make_model(size, Path(args.work) / size)
        for method in args.methods.split(","):
            cmd = [sys.executable, __file__, "--one", size, method, "--lengths", args.lengths, "--r", str(args.r),
                   "--work", args.work, "--dtype", args.dtype] + (["--compile"] if args.compile else [])
            done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
            if done.returncode:
                sys.exit(f"{size} {method} failed (exit {done.returncode})")
            result = json.loads(done.stdout.strip().splitlines()[-1])
            results.append(result)
            for s in result["steps"]:
                print(f"{size:5s} {method:7s} {s['tokens']:5d} tokens  {s['seconds_per_step']:8.2f} s/step "
                      f"{s['tokens_per_s']:7.1f} tok/s  MFU {s['mfu']:.0%}  peak RSS {s['peak_rss_bytes'] / 2**30:5.2f} GiB",
                      flush=True)
            from lorakit.io import write_json

            args.out.parent.mkdir(parents=True, exist_ok=True)
            write_json(args.out, {"torch": torch.__version__, "cpu": os.cpu_count(), "dtype": args.dtype,
                                  "compile": args.compile, "results": results})
    plot(results, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
