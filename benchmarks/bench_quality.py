"""Speed must not cost quality: held-out perplexity of QA-LoRA at a fixed budget, `lorakit train` vs a plain script.

The budget (issue #16): QA-LoRA on the embedded SmolLM2-135M Q4_1 GGUF, 500 standard-library docstring
instruction rows, 120 steps x batch 4, r 16 (alpha 32, all linear layers), lr 1e-3, max 384 tokens. Each run
merges its adapter into the file's own Q4_1 offsets (`run_gguf`: lossless) and the perplexity of the answers
of the held-out rows (`stdlib_docs.VALID_MODULES`, modules the training rows never show) is scored on that
exported GGUF file in llama.cpp (llama-cpp-python), not in PyTorch: it is what a user ships.

Variants, one difference at a time from `lorakit train`'s defaults (a constant lr after a 10-step warmup,
length-grouped batches, offsets trained as the file holds them: fp16(m + δ) − m, straight-through, gradient
clipping at 1.0, compute dtype auto):

    defaults          as above
    before            the defaults until 2026-11-30: train.schedule=cosine (decay to 0 at the last step)
    random batches    data.group_by_length=false (uniformly random rows: more padding)
    no warmup         train.warmup_steps=0
    fp32 offsets      the adapter trained against float32 offsets (rounded to fp16 only when merged)
    no clipping       train.max_grad_norm=0
    fp32 compute      model.dtype=float32 (the defaults compute in what `auto` picks: bf16 on a CPU with native
                      bf16, AVX512-BF16 or AMX; there this variant is the fp32 side of bf16 vs fp32)
    plain script      `plain_script` below: ~60 lines, constant lr, random batches, fp32 offsets, no clipping,
                      its own loop (AdamW, the same rows, the same adapter)

Each variant runs in its own process (`--one NAME`), one after the other, and reports the held-out
perplexity, the run's training seconds and useful tokens/s (ratios within one run of this script only).

    python benchmarks/bench_quality.py                    # every variant -> benchmarks/results/quality.json
    python benchmarks/bench_quality.py --variants "defaults,plain script" --seeds 0,1
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
EXTRA_MODULES = ("re", "logging", "inspect", "typing", "enum", "contextlib", "threading")
BUDGET = ["train.steps=120", "train.batch_size=4", "adapter.r=16", "adapter.alpha=32", "train.lr=1e-3",
          "data.max_tokens=384", "method=qalora", "train.eval_every=0", "train.save_every=0"]
VARIANTS = {  # name -> overrides on top of BUDGET ("offsets=float32": the bench trains against fp32 offsets)
    "defaults": [],
    "before": ["train.schedule=cosine"],
    "random batches": ["data.group_by_length=false"],
    "no warmup": ["train.warmup_steps=0"],
    "fp32 offsets": ["offsets=float32"],
    "no clipping": ["train.max_grad_norm=0"],
    "fp32 compute": ["model.dtype=float32"],
    "plain script": None,
}


def make_data(out: Path, n_train: int = 500) -> tuple[Path, Path]:
    """train.jsonl (n_train rows: the default training modules and a few more, seeded shuffle) and valid.jsonl
    (every row of the held-out validation modules) in `out`."""
    from lorakit.data.stdlib_docs import TRAIN_MODULES, VALID_MODULES, docstring_pairs
    from lorakit.io import write_text

    pairs = docstring_pairs(TRAIN_MODULES + EXTRA_MODULES)
    random.Random(0).shuffle(pairs)
    if len(pairs) < n_train:
        raise SystemExit(f"only {len(pairs)} docstring rows on this Python; add modules to EXTRA_MODULES")
    out.mkdir(parents=True, exist_ok=True)
    paths = out / "train.jsonl", out / "valid.jsonl"
    for path, rows in zip(paths, (pairs[:n_train], docstring_pairs(VALID_MODULES))):
        write_text(path, "".join(json.dumps({"instruction": q, "input": "", "output": a}) + "\n" for q, a in rows))
    return paths


def held_out_ppl(gguf: Path, valid: Path, max_tokens: int = 384) -> float:
    """exp(mean NLL) of the held-out answers' tokens, the file run in llama.cpp."""
    from lorakit.data import records, render
    from lorakit.formats.gguf_load import load_gguf_tokenizer
    from lorakit.formats.llamacpp import label_nll, llama_logits

    examples, _ = render.encode(load_gguf_tokenizer(gguf), records.read_records(str(valid), "auto"), max_tokens, False)
    total, count = label_nll(llama_logits(gguf, [e.input_ids for e in examples]), [e.labels for e in examples])
    return math.exp(total / count)


def plain_script(train_path: Path, out: Path, seed: int) -> dict:
    """QA-LoRA in a plain loop, the same budget: constant lr, random batches, offsets in fp32 while training
    (rounded to the file's fp16 when merged), no clipping. Writes out/merged.gguf."""
    import lorakit
    from lorakit.data import batching, records, render
    from lorakit.models.default import default_gguf_path
    from lorakit.quant.intn import IntNWeight
    from lorakit.tasks.causal_lm import pad_id_of

    torch.manual_seed(seed)
    model, tok = lorakit.load_gguf(default_gguf_path(), torch.float32, quantized=True)
    weights = [m for m in model.modules() if isinstance(m, IntNWeight)]
    for w in weights:
        w.offset_dtype = None
    lorakit.inject_adapters(model, lorakit.LoraConfig(r=16, alpha=32, target_modules="all-linear", group_size=32))
    examples, _ = render.encode(tok, records.read_records(str(train_path), "auto"), 384, False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    pad = pad_id_of(tok)
    order, rng = [], random.Random(seed)
    model.train()
    start, tokens = time.perf_counter(), 0
    for step in range(120):
        if len(order) < 4:
            order = list(range(len(examples)))
            rng.shuffle(order)
        batch = batching.collate([examples[order.pop()] for _ in range(4)], pad)
        loss = lorakit.causal_lm_loss(model, batch["input_ids"], batch["labels"], batch["attention_mask"])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens += int((batch["labels"][:, 1:] != -100).sum())
    seconds = time.perf_counter() - start
    for w in weights:
        w.offset_dtype = torch.float16  # the file's precision: merge_ rounds m + δ to it, as the export writes
    model.eval()
    lorakit.merge_(model)
    out.mkdir(parents=True, exist_ok=True)
    lorakit.export_gguf(model, out / "merged.gguf", template=default_gguf_path())
    return {"seconds": seconds, "useful_tokens_per_s": tokens / seconds}


def run_one(name: str, seed: int, work: Path) -> dict:
    """Train variant `name` with `seed`, export its merged GGUF, score it on the held-out rows."""
    from lorakit.models.default import default_gguf_path
    from lorakit.tasks.causal_lm import load_model, run_gguf
    from lorakit.training.loop import train
    from lorakit.training.run_config import load_config

    train_path, valid_path = work / "data" / "train.jsonl", work / "data" / "valid.jsonl"  # made once by main
    out = work / f"{name.replace(' ', '-')}-seed{seed}"
    shutil.rmtree(out, ignore_errors=True)  # a fresh run every time
    if name == "base":
        return {"held_out_ppl": held_out_ppl(default_gguf_path(), valid_path)}
    if name == "plain script":
        speed = plain_script(train_path, out, seed)
        return {**speed, "held_out_ppl": held_out_ppl(out / "merged.gguf", valid_path)}
    extra = VARIANTS[name]
    overrides = BUDGET + [o for o in extra if not o.startswith("offsets=")] + [
        f"data.train={train_path}", f"data.valid={valid_path}", f"output_dir={out}", f"train.seed={seed}"]
    config = load_config(None, overrides)
    model = tokenizer = None
    if "offsets=float32" in extra:
        from lorakit.quant.intn import IntNWeight

        model, tokenizer = load_model(config)
        for w in model.modules():
            if isinstance(w, IntNWeight):
                w.offset_dtype = None  # run_gguf reloads the base (fp16 offsets) and merges: rounded there
    result = train(config, progress=False, model=model, tokenizer=tokenizer)
    gguf = run_gguf(out, config)
    summary = json.loads((out / "summary.json").read_text())
    return {"compute_dtype": summary.get("compute_dtype"), "seconds": result.seconds, "useful_tokens_per_s": result.per_s,
            "valid_ppl_torch": result.valid_ppl_after, "held_out_ppl": held_out_ppl(gguf, valid_path)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", default="base," + ",".join(VARIANTS), help="comma-separated variant names")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds")
    parser.add_argument("--work", default="/tmp/lorakit-quality", help="runs and data go here")
    parser.add_argument("--out", default=str(HERE / "results" / "quality.json"))
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.seed, Path(args.work))))
        return
    from lorakit.formats import llamacpp

    if not llamacpp.available():
        raise SystemExit("scoring runs in llama.cpp: pip install llama-cpp-python")
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in names if v != "base" and v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant {unknown[0]!r}; choose from base, {', '.join(VARIANTS)}")
    make_data(Path(args.work) / "data")
    rows = []
    for name in names:
        for seed in ([0] if name == "base" else [int(s) for s in args.seeds.split(",")]):
            cmd = [sys.executable, __file__, "--one", name, "--seed", str(seed), "--work", args.work]
            done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
            if done.returncode:
                raise SystemExit(f"{name} seed {seed} failed:\n{done.stderr[-3000:]}")
            result = json.loads(done.stdout.strip().splitlines()[-1])
            row = {"variant": name, "overrides": VARIANTS.get(name), "seed": seed, **result}
            rows.append(row)
            print(json.dumps(row), flush=True)
    info = {"python": platform.python_version(), "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(), "budget": BUDGET, "rows": rows}
    from lorakit.io import write_json

    write_json(args.out, info)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
