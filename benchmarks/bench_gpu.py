"""Training speed and memory on a GPU: lorakit LoRA, QLoRA and QA-LoRA beside PEFT (+ bitsandbytes QLoRA).

SmolLM2's published shapes (bench_scaling.SHAPES: 135M and 1.7B parameters, randomly initialised, bf16 on
disk: a step's cost does not depend on the values). Every configuration runs in its own process, one after
another on the same GPU, on the same batch (`--batch` rows of `--tokens` tokens of random words, every token
bearing loss), r 16 alpha 32 on every linear layer, AdamW lr 1e-4, bf16 compute:

- `lorakit-*`: `lorakit train`'s own loop (`loop._start` / `loop._step`: task, fused kernels, chunked loss,
  clipping, schedule) with `method=lora|qlora|qalora`, `model.dtype=auto` (bf16 on this GPU); `-gc` adds
  `train.gradient_checkpointing=true`, `-compile` `train.compile=true` (each decoder block through
  torch.compile: Triton kernels and fewer launches from the host; compiled in the warm-up steps).
- `peft-lora`: transformers in bf16 + PEFT, a plain loop (forward with labels, backward, AdamW step).
- `peft-bnb-qlora`: the QLoRA recipe of PEFT's docs: bitsandbytes NF4 with double quantization and bf16
  compute, `prepare_model_for_kbit_training` (which turns gradient checkpointing on and casts the norms and
  embeddings to fp32); `-nogc` the same with `use_gradient_checkpointing=False`.

Per configuration: tokens/s = batch tokens / median step time over `--steps` timed steps after 3 warm-up
steps (torch.cuda.synchronize before and after each), and the peak of `torch.cuda.max_memory_allocated`
over the timed steps (reset after loading: weights, adapters, optimizer state and activations, all that
training holds). Ratios are against `peft-bnb-qlora` of the same size. Writes benchmarks/results/gpu.json.

    python benchmarks/bench_gpu.py [--sizes 135M,1.7B] [--batch 4] [--tokens 1024] [--steps 10]
                                   [--configs lorakit-lora,...] [--tokenizer DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).parent
RESULTS = HERE / "results" / "gpu.json"
CONFIGS = {
    "lorakit-lora": "lorakit LoRA (bf16 base)",
    "lorakit-qlora": "lorakit QLoRA (NF4, double quant)",
    "lorakit-qalora": "lorakit QA-LoRA (INT4, group 32)",
    "lorakit-qlora-gc": "lorakit QLoRA + gradient checkpointing",
    "lorakit-lora-compile": "lorakit LoRA, compiled blocks",
    "lorakit-qlora-compile": "lorakit QLoRA, compiled blocks",
    "lorakit-qalora-compile": "lorakit QA-LoRA, compiled blocks",
    "lorakit-qlora-gc-compile": "lorakit QLoRA + gradient checkpointing, compiled blocks",
    "peft-lora": "PEFT LoRA (bf16 base)",
    "peft-bnb-qlora": "PEFT + bitsandbytes QLoRA (docs recipe, checkpointing)",
    "peft-bnb-qlora-nogc": "PEFT + bitsandbytes QLoRA, no checkpointing",
}
BASELINE = "peft-bnb-qlora"
R, ALPHA, WARMUP = 16, 32, 3
TINY = (64, 128, 2, 4, 2)  # --sizes tiny: a dry run of this script (on a CPU too)


def timed(step, steps: int, device: torch.device) -> tuple[list[float], int]:
    """Run WARMUP + steps steps; the timed steps' seconds and their peak allocated CUDA memory (on a CPU, for a
    dry run of this script: the peak RSS)."""
    from lorakit.training.memory import peak_rss_bytes, reset_peak_rss

    cuda = device.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    for _ in range(WARMUP):
        step()
    sync()
    torch.cuda.reset_peak_memory_stats(device) if cuda else reset_peak_rss()
    seconds = []
    for _ in range(steps):
        sync()
        start = time.perf_counter()
        step()
        sync()
        seconds.append(time.perf_counter() - start)
    return seconds, torch.cuda.max_memory_allocated(device) if cuda else peak_rss_bytes()


def run_lorakit(name: str, directory: Path, rows: Path, args) -> dict:
    from lorakit.tasks import make_task
    from lorakit.training import loop
    from lorakit.training.distributed import init_world
    from lorakit.training.run_config import load_config
    import transformers

    method = name.split("-")[1]
    out = Path(tempfile.mkdtemp(prefix=f"gpu-{name}-"))
    config = load_config(None, [
        f"method={method}", f"model.path={directory}", "model.dtype=auto", f"data.train={rows}",
        "data.valid_fraction=0", "data.shape=text", f"data.max_tokens={args.tokens}", f"output_dir={out}",
        f"train.steps={WARMUP + args.steps + 1}", f"train.batch_size={args.batch}", "train.warmup_steps=0",
        "train.eval_every=0", f"train.save_every={10 * (WARMUP + args.steps)}", f"adapter.r={R}",
        f"adapter.alpha={ALPHA}", "train.lr=1e-4", f"train.gradient_checkpointing={'-gc' in name}",
        f"train.compile={name.endswith('-compile')}",
    ])
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory, local_files_only=True)
    start = time.perf_counter()
    world = init_world()
    run = loop._start(config, False, False, make_task(config, tokenizer=tokenizer), None, world)
    load_seconds = time.perf_counter() - start
    lengths = [len(row.input_ids) for row in run.batches[0]]
    assert len(run.batches) == 1 and lengths == [args.tokens] * args.batch, lengths

    def step():
        run.batch_index = 0  # the one batch again
        loop._step(run)

    seconds, peak = timed(step, args.steps, world.device)
    return {"load_seconds": load_seconds, "seconds": seconds, "peak_bytes": peak, "dtype": str(run.dtype),
            "compiled_blocks": run.compiled_blocks}


def run_peft(name: str, directory: Path, rows: Path, args) -> dict:
    import peft
    import transformers

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory, local_files_only=True)
    texts = [json.loads(line)["text"] for line in rows.read_text().splitlines()]
    ids = tokenizer(texts, return_tensors="pt").input_ids  # tokens - 1 each, + EOS as lorakit's text rows
    ids = torch.cat([ids, torch.full((len(texts), 1), tokenizer.eos_token_id)], 1).to(device)
    assert ids.shape == (args.batch, args.tokens), ids.shape
    start = time.perf_counter()
    if "bnb" in name:
        quant = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)
        model = transformers.AutoModelForCausalLM.from_pretrained(directory, quantization_config=quant,
                                                                  dtype=torch.bfloat16, device_map={"": device})
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=not name.endswith("-nogc"))
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16).to(device)
    model = peft.get_peft_model(model, peft.LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0,
                                                       target_modules="all-linear"))
    model.train()
    load_seconds = time.perf_counter() - start
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    losses = []

    def step():
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())

    seconds, peak = timed(step, args.steps, device)
    return {"load_seconds": load_seconds, "seconds": seconds, "peak_bytes": peak, "dtype": "torch.bfloat16",
            "losses": losses}


def child(name: str, size: str, args) -> dict:
    directory, rows = Path(args.work) / size, Path(args.work) / f"rows-{args.batch}x{args.tokens}.jsonl"
    result = (run_lorakit if name.startswith("lorakit") else run_peft)(name, directory, rows, args)
    median = statistics.median(result["seconds"])
    return {"name": name, "size": size, "tokens_per_s": args.batch * args.tokens / median, "step_seconds": median,
            **result}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="135M,1.7B")
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--tokenizer", help="a tokenizer directory (default: the embedded model's)")
    parser.add_argument("--timeout", type=float, default=300, help="seconds one configuration may take")
    parser.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "lorakit-gpu"))
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--child", nargs=2, metavar=("CONFIG", "SIZE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(*args.child, args)), flush=True)
        return
    if not torch.cuda.is_available() and not args.sizes.startswith("tiny"):
        sys.exit("bench_gpu.py needs a CUDA device (torch.cuda.is_available() is False); --sizes tiny dry-runs it "
                 "on the CPU")
    import transformers

    sys.path.insert(0, str(HERE))
    from bench_scaling import SHAPES, make_model, make_rows

    from lorakit.io import write_json

    configs = args.configs.split(",")
    for name in configs:
        if name not in CONFIGS:
            sys.exit(f"--configs: {name!r} is not one of {', '.join(CONFIGS)}")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    tokenizer = None
    if args.tokenizer:
        tokenizer = transformers.AutoTokenizer.from_pretrained(args.tokenizer, local_files_only=True)
    results = []
    device = {"gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (dry run)", "torch": torch.__version__, "cuda": torch.version.cuda,
              "transformers": transformers.__version__, "python": platform.python_version()}
    for package in ("peft", "bitsandbytes"):
        try:
            device[package] = __import__(package).__version__
        except Exception as e:  # noqa: BLE001 - reported, the other rows still run
            device[package] = f"not importable: {e}"
    print(json.dumps(device), flush=True)
    for size in args.sizes.split(","):
        if size not in SHAPES and size != "tiny":
            sys.exit(f"--sizes: {size!r} is not one of {', '.join(SHAPES)}")
        start = time.perf_counter()
        make_model(size, work / size, tokenizer=tokenizer, shape=TINY if size == "tiny" else None)
        tok = transformers.AutoTokenizer.from_pretrained(work / size, local_files_only=True)
        make_rows(work / f"rows-{args.batch}x{args.tokens}.jsonl", [args.tokens] * args.batch, tok)
        print(f"{size}: model written in {time.perf_counter() - start:.1f} s", flush=True)
        for name in configs:
            cmd = [sys.executable, __file__, "--child", name, size, "--batch", str(args.batch), "--tokens",
                   str(args.tokens), "--steps", str(args.steps), "--work", args.work]
            try:
                done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout,
                                      env={**os.environ, "PYTHONWARNINGS": "ignore", "HF_HUB_OFFLINE": "1"})
            except subprocess.TimeoutExpired:
                print(f"{size} {name}: over {args.timeout:.0f} s, skipped", flush=True)
                continue
            line = next((ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if done.returncode or line is None:
                print(f"{size} {name}: FAILED (exit {done.returncode})\n{done.stderr[-2500:]}", flush=True)
                continue
            r = json.loads(line[len("RESULT "):])
            results.append(r)
            print(f"{size:5s} {name:20s} {r['tokens_per_s']:9.0f} tok/s  step {r['step_seconds'] * 1e3:7.1f} ms  "
                  f"peak {r['peak_bytes'] / 2**30:6.2f} GiB  load {r['load_seconds']:5.1f} s", flush=True)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            write_json(args.out, {"device": device, "batch": args.batch, "tokens": args.tokens, "r": R,
                                  "steps": args.steps, "results": results})
    print(table(results, args))


def table(results: list[dict], args) -> str:
    lines = [f"batch {args.batch} x {args.tokens} tokens, r {R} on all linear layers, bf16 compute, median of "
             f"{args.steps} steps after {WARMUP} warm-up", "",
             "| size | configuration | tokens/s | vs PEFT+bnb QLoRA | peak GPU memory (GiB) | vs PEFT+bnb QLoRA |",
             "|---|---|---:|---:|---:|---:|"]
    for r in results:
        base = next((b for b in results if b["size"] == r["size"] and b["name"] == BASELINE), None)
        speed = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else "-"
        memory = f"{r['peak_bytes'] / base['peak_bytes']:.2f}x" if base else "-"
        lines.append(f"| {r['size']} | {CONFIGS[r['name']]} | {r['tokens_per_s']:,.0f} | {speed} | "
                     f"{r['peak_bytes'] / 2**30:.2f} | {memory} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
