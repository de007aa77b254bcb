"""How close `lorakit train` runs to this machine's matmul peak: model FLOPs utilisation (MFU) per method and
dtype, and where the rest of a step goes.

    MFU = model FLOPs of the step / step time / matmul peak

- model FLOPs: `lorakit.training.flops.step_flops`, from the model's shapes and each step's rows (non-padding
  tokens, causal attention, the output layer at loss tokens only); checked against PyTorch's FlopCounterMode
  in tests/test_flops.py.
- matmul peak: measured in the same process, in the same dtype, on the step's own GEMM shapes (every linear
  layer's forward and input-gradient product and the adapters' rank-r products at the run's mean tokens per
  micro-batch), as their FLOPs over their summed best-of-5 times, before the first round and after each (the
  highest: shared machines are noisy): the speed the step would have if it were nothing but its matmuls.
- step time: all methods train side by side in one process on the same batches; in each of `--rounds` rounds
  every method steps through the same `--steps` batches in turn, so the machine's drift (10-20% from minute
  to minute on a shared machine) reaches all methods alike. MFU from each batch's mean time (typical) and
  from its best (as the matmul peak is a best-of-5: both sides measured alike).
- where the rest goes: one more step per method under torch.profiler, every operator's own time put in one
  bucket (base matmuls, adapter matmuls, output layer + loss, attention, dequantization, norms, SwiGLU,
  optimizer, other operators) and the wall time no operator accounts for (Python).
- peak RSS: each method again alone in its own process (the same warm-up and rounds, no profile).

On the embedded SmolLM2-135M-Instruct, on instruction rows made of whole standard-library docstrings (long
answers), batch 4, max 512 tokens, r 16 on every linear layer: `lora` on the dense model, `qlora` on NF4
codes, `qalora` on the GGUF file's own Q4_1 codes; `METHOD+compile` (e.g. `qalora+compile`) the same with
`train.compile=true` (the blocks through torch.compile; its warm-up steps compile). bf16 runs only where the CPU multiplies bf16 natively
(`lorakit env` says; --bf16 forces it). `--rows embedded` runs the default job's rows instead (the embedded
chat-template docstring rows `lorakit train` and `lorakit demo` train on: short rows, ~57 tokens, each
beginning with the same system prompt), e.g. at its batch of 8 with `--batch 8`.

    python benchmarks/bench_roofline.py [--steps 4] [--rounds 2] [--warmup 2] [--methods lora,qlora,qalora] [--bf16]
                                        [--rows docstrings|embedded] [--batch 4] [--out PATH]
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results" / "roofline.json"


def make_rows(path: Path, n: int = 80, min_chars: int = 400) -> Path:
    """The first `n` public functions/classes of the training modules whose whole docstring has >= min_chars."""
    import importlib

    from lorakit.data.stdlib_docs import TRAIN_MODULES

    rows = []
    for module_name in TRAIN_MODULES:
        module = importlib.import_module(module_name)
        for name, obj in sorted(vars(module).items()):
            if name.startswith("_") or not (inspect.isfunction(obj) or inspect.isclass(obj)):
                continue
            doc = inspect.getdoc(obj) or ""
            if len(doc) >= min_chars:
                rows.append({"instruction": f"Explain `{module_name}.{name}` in full.", "output": doc})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows[:n]))
    return path


def matmul_peak(shapes: list[tuple[int, int, int, int]], dtype: torch.dtype, repeats: int = 5) -> float:
    """FLOP/s of the GEMMs (m, k, n, count): Σ 2·m·k·n·count / Σ best time · count."""
    flops = seconds = 0.0
    for m, k, n, count in shapes:
        a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
        a @ b
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - start)
        flops += 2 * m * k * n * count
        seconds += best * count
    return flops / seconds


def _label(cls, method: str, label: str) -> None:
    """Wrap cls.method in a profiler range named `label` (benchmark only)."""
    original = getattr(cls, method)

    def wrapped(*args, **kwargs):
        with torch.profiler.record_function(label):
            return original(*args, **kwargs)

    setattr(cls, method, wrapped)


def _buckets(prof, adapter_dims: set[int], vocab: int) -> dict[str, float]:
    """Seconds per bucket: every operator's self time, by what it is or the labelled range it runs in. A matmul
    with a dimension in `adapter_dims` (r; for QA-LoRA also each layer's group count in/g) is an adapter's."""
    out: dict[str, float] = defaultdict(float)
    matmuls = ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm")
    for event in prof.events():
        if event.device_type != torch.autograd.DeviceType.CPU:
            continue
        seconds = event.self_cpu_time_total / 1e6
        names = []
        parent = event
        while parent is not None:
            names.append(parent.name)
            parent = parent.cpu_parent
        chain = " ".join(names)
        if event.is_user_annotation or event.name.startswith(("autograd::engine", "Optimizer.step")):
            out["python in labelled ranges"] += seconds
        elif "lorakit::dequantize" in chain:
            out["dequantization"] += seconds
        elif "Optimizer.step" in chain or "clip_grad" in chain:
            out["optimizer + clipping"] += seconds
        elif event.name in matmuls:
            dims = {d for shape in event.input_shapes for d in shape}
            out["output layer + loss" if vocab in dims else "adapter matmuls" if dims & adapter_dims
                else "base matmuls"] += seconds
        elif "scaled_dot_product" in chain or "flash_attention" in chain:
            out["attention"] += seconds
        elif "lorakit::loss" in chain:
            out["output layer + loss"] += seconds
        elif "RMSNorm" in chain or "lorakit::rmsnorm" in chain:
            out["norms"] += seconds
        elif "SwiGLU" in chain or "lorakit::swiglu" in chain:
            out["SwiGLU"] += seconds
        else:
            out["other operators"] += seconds
    return dict(out)


def run_methods(methods: list[str], dtype: str, args) -> list[dict]:
    """Train each method of `methods` side by side in this process, on the same batches: `args.warmup` steps
    each, then `args.rounds` rounds in which every method steps through the same `args.steps` batches in
    turn (so the machine's drift reaches all alike), the matmul peak measured before the first round and
    after each; then one profiled step each. With `args.rss_only`: one method, the same steps, no profile: its
    peak RSS."""
    from lorakit.data.stdlib_docs import IGNORE
    from lorakit.tasks.shared_prefix import shared_length
    import importlib

    from lorakit.quant.linear import is_quantized_weight
    from lorakit.tasks import losses, make_task
    from lorakit.training import loop
    from lorakit.training.distributed import init_world
    from lorakit.training.flops import LlamaShape, gemm_shapes, step_flops
    from lorakit.training.memory import peak_rss_bytes
    from lorakit.training.run_config import load_config

    torch.set_num_threads(args.threads or torch.get_num_threads())
    work = Path(tempfile.mkdtemp(prefix="roofline-"))
    data = ([f"data.train={make_rows(work / 'rows.jsonl')}", "data.valid_fraction=0"] if args.rows == "docstrings"
            else [])  # embedded: the default config's data
    total = args.warmup + args.steps * args.rounds + 1
    world = init_world()
    runs, results = {}, {}
    for method in methods:
        base_method, compiled = method.removesuffix("+compile"), method.endswith("+compile")
        config = load_config(None, [
            f"method={base_method}", f"model.dtype={dtype}", *data, f"train.compile={compiled}",
            f"data.max_tokens={args.max_tokens}", f"output_dir={work / method}", f"train.steps={total + 1}",
            f"train.batch_size={args.batch}", "train.lr=2e-4", "train.warmup_steps=0", "train.eval_every=0",
            f"train.save_every={total + 1}", f"adapter.r={args.r}", f"adapter.alpha={2 * args.r}",
        ])
        runs[method] = run = loop._start(config, False, False, make_task(config), None, world)
        for _ in range(args.warmup):
            loop._step(run)
        group_size = config.adapter.group_size if base_method == "qalora" else None  # QA-LoRA's A reads group means
        results[method] = {"method": method, "group_size": group_size, "steps": []}
    r = args.r
    first_run = runs[methods[0]]
    shape = LlamaShape.of(first_run.model.config)
    mean_tokens = round(sum(sum(len(e.input_ids) for e in b) for b in first_run.batches) / len(first_run.batches))
    gemms = gemm_shapes(shape, mean_tokens, r)
    peaks = [] if args.rss_only else [matmul_peak(gemms, first_run.dtype)]
    first = first_run.batch_index
    for round_ in range(args.rounds):  # the same batches again: each batch's time, best and typical
        for method, run in runs.items():
            steps = results[method]["steps"]
            run.batch_index = first  # 20 batches per epoch (39 embedded at batch 8): no step here crosses an epoch
            for j in range(args.steps):
                rows_ = run.batches[run.batch_index]
                before = run.seconds
                loop._step(run)
                seconds = run.seconds - before
                if round_:
                    steps[j]["rounds_s"].append(seconds)
                    continue
                lengths = [len(e.input_ids) for e in rows_]
                loss_tokens = sum(sum(1 for y in e.labels[1:] if y != IGNORE) for e in rows_)
                batch = run.task.collate(rows_, run.dtype, None)  # the prompt prefix computed once, if shared
                shared = shared_length(batch["input_ids"], batch["labels"], batch["attention_mask"])
                flops = step_flops(shape, lengths, loss_tokens, r, group_size=results[method]["group_size"],
                                   shared=shared)
                steps.append({"rounds_s": [seconds], "tokens": sum(lengths), "loss_tokens": loss_tokens,
                              "shared_tokens": shared,
                              "padded_tokens": max(lengths) * len(lengths), "flops": flops})
        if not args.rss_only:
            peaks.append(matmul_peak(gemms, first_run.dtype))
    if args.rss_only:
        return [{"method": methods[0], "peak_rss_bytes": peak_rss_bytes()}]
    def label_ranges():  # for what operator names alone do not tell apart
        for weight_type in {type(m) for run in runs.values() for m in run.model.modules() if is_quantized_weight(m)}:
            _label(weight_type, "dequantize", "lorakit::dequantize")
        _label(losses._ChunkedCrossEntropySum, "apply", "lorakit::loss")
        for module, fn in (("rmsnorm", "_RMSNorm"), ("swiglu", "_SwiGLUDown")):
            _label(getattr(importlib.import_module(f"lorakit.kernels.{module}"), fn), "apply", f"lorakit::{module}")

    peak = max(peaks)
    out = []
    # the profiled steps: compiled runs first (the labels wrap functions their code was traced through, so
    # a compiled run profiled after them would compile again)
    labelled = False
    for method, run in sorted(runs.items(), key=lambda kv: not kv[0].endswith("+compile")):
        if not labelled and not method.endswith("+compile"):
            label_ranges()
            labelled = True
        result, steps = results[method], results[method]["steps"]
        run.batch_index = first + args.steps
        profiled_tokens = sum(len(e.input_ids) for e in run.batches[run.batch_index])
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
            start = time.perf_counter()
            loop._step(run)
            wall = time.perf_counter() - start
        group_size = result.pop("group_size")
        adapter_dims = {r} | ({a // group_size for a, _ in shape.linears().values()} if group_size else set())
        buckets = _buckets(prof, adapter_dims, shape.vocab_size)
        buckets["Python (no operator)"] = max(wall - sum(buckets.values()), 0.0)
        for step in steps:
            step["seconds"] = sum(step["rounds_s"]) / len(step["rounds_s"])
            step["best_seconds"] = min(step["rounds_s"])
        seconds = sum(s["seconds"] for s in steps)
        best = sum(s["best_seconds"] for s in steps)
        flops = sum(s["flops"]["total"] for s in steps)
        out.append({
            **result, "dtype": str(run.dtype).removeprefix("torch."), "threads": torch.get_num_threads(),
            "rounds": args.rounds, "seconds_per_step": seconds / len(steps),
            "best_seconds_per_step": best / len(steps), "tokens_per_s": sum(s["tokens"] for s in steps) / seconds,
            "model_flops_per_s": flops / seconds, "best_model_flops_per_s": flops / best,
            "matmul_peaks_flops_per_s": peaks, "matmul_peak_flops_per_s": peak,
            "mfu": flops / seconds / peak, "mfu_best": flops / best / peak,
            "profile_tokens": profiled_tokens, "profile_wall_s": wall, "profile_buckets_s": buckets,
            "compiled_blocks": run.compiled_blocks,
        })
    return sorted(out, key=lambda result: methods.index(result["method"]))


def _child(args, methods: str, dtype: str, *extra: str, env: dict | None = None) -> list[dict]:
    cmd = [sys.executable, __file__, "--one", methods, dtype, "--steps", str(args.steps), "--warmup",
           str(args.warmup), "--rounds", str(args.rounds), "--batch", str(args.batch), "--max-tokens",
           str(args.max_tokens), "--r", str(args.r), "--threads", str(args.threads), "--rows", args.rows, *extra]
    done = subprocess.run(cmd, capture_output=True, text=True,
                          env={**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})})
    if done.returncode:
        sys.exit(f"{methods} {dtype} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2, help="times each timed batch runs (mean and best reported)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rows", choices=("docstrings", "embedded"), default="docstrings",
                        help="whole-docstring rows (long; the default) or the default job's embedded chat rows")
    parser.add_argument("--max-tokens", type=int, default=512)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--methods", default="lora,qlora,qalora")
    parser.add_argument("--bf16", action="store_true", help="also run bf16 where the CPU has no native bf16")
    parser.add_argument("--one", nargs=2, metavar=("METHODS", "DTYPE"), help=argparse.SUPPRESS)
    parser.add_argument("--rss-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_methods(args.one[0].split(","), args.one[1], args)))
        return
    from lorakit.training.hardware import compute_dtype_reason, cpu_has_fast_bf16

    dtypes = ["float32"] + (["bfloat16"] if cpu_has_fast_bf16() or args.bf16 else [])
    results = []
    for dtype in dtypes:
        timed = _child(args, args.methods, dtype)  # all methods side by side in one process
        for result in timed:  # peak memory: each method alone in its own process
            result["peak_rss_bytes"] = _child(args, result["method"], dtype, "--rss-only")[0]["peak_rss_bytes"]
            results.append(result)
            b = result["profile_buckets_s"]
            share = ", ".join(f"{k} {v / result['profile_wall_s']:.0%}" for k, v in sorted(b.items(), key=lambda kv: -kv[1]))
            print(f"{result['method']:7s} {result['dtype']:8s} {result['seconds_per_step']:6.2f} s/step "
                  f"{result['tokens_per_s']:6.0f} tok/s  model {result['model_flops_per_s'] / 1e9:6.1f} GFLOP/s  "
                  f"peak {result['matmul_peak_flops_per_s'] / 1e9:6.1f}  MFU {result['mfu']:.0%} "
                  f"(best of {args.rounds} rounds {result['mfu_best']:.0%})  "
                  f"RSS {result['peak_rss_bytes'] / 2**20:.0f} MiB\n    profile: {share}", flush=True)
        print("matmul peaks measured between rounds: "
              + ", ".join(f"{p / 1e9:.1f}" for p in timed[0]["matmul_peaks_flops_per_s"]) + " GFLOP/s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    from lorakit.io import write_json

    write_json(args.out, {"cpu_bf16": compute_dtype_reason("cpu"), "torch": torch.__version__,
                          "cpu": os.cpu_count(), "rows": args.rows, "batch": args.batch, "results": results})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
