"""QLoRA training memory and speed on the embedded SmolLM2-135M-Instruct: lorakit vs PEFT (+ bitsandbytes).

Every configuration runs in its own fresh process, one after another on the same machine, on the
same real-text batch (4 x 256 tokens of Python standard-library docstrings), LoRA r=16 alpha=32 on
all linear layers, AdamW. Per configuration we report:
  - tokens/s: batch tokens / median wall time of the timed training steps;
  - peak RSS: the process's resident-memory high-water mark over all training steps, reset after the
    model is loaded and the adapters are in (Linux /proc/self/clear_refs), so it is what training
    needs: weights + activations + optimizer + runtime.
lorakit's rows use lorakit's training path: `causal_lm_loss` (fused chunked cross-entropy) and
`fuse_for_training_` (RMSNorm keeping its output, not its input; SwiGLU + down projection keeping
2 instead of 4 activations); all exact up to float rounding.
The parent tokenizes the batch and hands the ids to each child, so no training process holds a
tokenizer (about 110 MiB of fixed overhead that training never uses), in every configuration alike.
All children run with MALLOC_MMAP_THRESHOLD_=1048576 so glibc returns freed tensor memory to the OS
instead of keeping it, for every configuration alike (otherwise RSS measures the allocator).

    python benchmarks/bench_qlora.py                 # all configurations, prints a Markdown table
    python benchmarks/bench_qlora.py --only lorakit-qlora --steps 2

Targets (issue #3), against PEFT + bitsandbytes QLoRA (nf4, double quant, fp32 compute):
lorakit QLoRA peak <= 0.5x at >= 0.9x tokens/s; with memory-saving options <= 0.25x at >= 0.7x.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

from lorakit.io import write_json

CONFIGS = {
    # name: (description, dtype)
    "peft-bnb-qlora": "PEFT + bitsandbytes QLoRA (nf4, double quant, fp32 compute)",
    "peft-bnb-qlora-gc": "PEFT + bitsandbytes QLoRA + HF gradient checkpointing",
    "peft-lora": "PEFT LoRA (fp32 dense base)",
    "lorakit-lora": "lorakit LoRA (fp32 dense base)",
    "lorakit-qlora": "lorakit QLoRA (nf4, double quant, fp32 compute)",
    "lorakit-qlora-memsave": "lorakit QLoRA + memory-saving options (gradient checkpointing, loss chunk 128)",
    "lorakit-qlora-bf16": "lorakit QLoRA + memory-saving options, bf16 compute (what 'auto' picks on a CPU with native bf16)",
}
BASELINE = "peft-bnb-qlora"
R, ALPHA = 16, 32


def batch_ids(tokenizer, batch: int, seq: int):
    """(batch, seq) token ids of real text: the standard library's module docstrings, in a fixed order."""
    import importlib

    import torch

    text = []
    for name in ("textwrap", "json", "argparse", "collections", "functools", "pathlib", "subprocess", "logging", "email", "unittest"):
        doc = importlib.import_module(name).__doc__ or ""
        text.append(doc)
    ids = tokenizer("\n\n".join(text), return_tensors="pt").input_ids[0]
    need = batch * seq
    if ids.numel() < need:
        ids = ids.repeat(need // ids.numel() + 1)
    return ids[:need].view(batch, seq).contiguous().to(torch.long)


def child(name: str, steps: int, warmup: int, batch: int, seq: int) -> dict:
    import torch

    import lorakit
    from lorakit.models.default import default_model_dir

    torch.manual_seed(0)
    model_dir = default_model_dir()
    from transformers import AutoModelForCausalLM

    ids = torch.tensor(json.loads(os.environ["LORAKIT_BENCH_IDS"])).view(batch, seq)  # tokenized by the parent
    start_load = time.perf_counter()
    fused_loss = name.startswith("lorakit")
    if name.startswith("peft"):
        import peft

        if "bnb" in name:
            from transformers import BitsAndBytesConfig

            qcfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=torch.float32)
            model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=qcfg, dtype=torch.float32, device_map="cpu")
            model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=name.endswith("-gc"))
        else:
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        model = peft.get_peft_model(model, peft.LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules="all-linear"))
    else:
        if "qlora" in name:
            model = lorakit.load_quantized(model_dir, lorakit.NF4Config(double_quant=True))
        else:
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        lorakit.inject_adapters(model, lorakit.LoraConfig(r=R, alpha=ALPHA, target_modules="all-linear"))
        lorakit.fuse_for_training_(model)  # lorakit's training path: same math, fewer saved activations
        if name.endswith("memsave") or name.endswith("bf16"):
            lorakit.enable_gradient_checkpointing(model)
    compute_dtype = torch.float32
    if name.endswith("bf16"):
        compute_dtype = lorakit.cast_base_(model, "auto")  # 4-bit codes unchanged; adapters keep fp32 masters
    load_s = time.perf_counter() - start_load
    memsave = name.endswith("memsave") or name.endswith("bf16")
    chunk_size = 128 if memsave else 256  # smaller loss chunks are one of the memory-saving options
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4)

    def step() -> float:
        if fused_loss:
            loss = lorakit.causal_lm_loss(model, ids, ids, chunk_size=chunk_size)
        else:
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    rss_before = lorakit.current_rss_bytes()
    reset_ok = lorakit.reset_peak_rss()
    times, losses = [], []
    for i in range(warmup + steps):
        t = time.perf_counter()
        losses.append(step())
        if i >= warmup:
            times.append(time.perf_counter() - t)
    peak = lorakit.peak_rss_bytes()
    return {
        "name": name, "peak_rss_mib": peak / 2**20, "rss_after_load_mib": rss_before / 2**20, "reset_ok": reset_ok,
        "step_s": statistics.median(times), "tokens_per_s": batch * seq / statistics.median(times),
        "losses": losses, "trainable": sum(p.numel() for p in trainable), "load_s": load_s,
        "compute_dtype": str(compute_dtype).replace("torch.", ""),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", nargs="*", choices=list(CONFIGS), help="run just these configurations")
    p.add_argument("--steps", type=int, default=3, help="timed steps per configuration (median)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args.steps, args.warmup, args.batch, args.seq)), flush=True)
        return

    from transformers import AutoTokenizer

    from lorakit.models.default import default_model_dir

    ids = batch_ids(AutoTokenizer.from_pretrained(default_model_dir()), args.batch, args.seq)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "1048576", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "LORAKIT_BENCH_IDS": json.dumps(ids.view(-1).tolist())}
    results = {}
    for name in args.only or list(CONFIGS):
        cmd = [sys.executable, __file__, "--child", name, "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--batch", str(args.batch), "--seq", str(args.seq)]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True)
        line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if out.returncode != 0 or line is None:
            print(f"{name}: FAILED\n{out.stderr[-3000:]}", file=sys.stderr)
            continue
        results[name] = json.loads(line[len("RESULT "):])
        r = results[name]
        print(f"{name:24s} peak {r['peak_rss_mib']:7.0f} MiB  {r['tokens_per_s']:6.0f} tok/s  step {r['step_s']:.2f}s  "
              f"loss {r['losses'][0]:.4f}->{r['losses'][-1]:.4f}", flush=True)

    base = results.get(BASELINE)
    print(f"\nSmolLM2-135M-Instruct, batch {args.batch} x {args.seq}, r={R} all-linear, {args.steps} timed steps "
          f"(+{args.warmup} warmup), {platform.machine()}, {os.cpu_count()} CPUs, torch threads default\n")
    print("| configuration | peak RSS (MiB) | vs PEFT+bnb QLoRA | tokens/s | vs PEFT+bnb QLoRA | first loss |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        mem = f"{r['peak_rss_mib'] / base['peak_rss_mib']:.2f}x" if base else "-"
        speed = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else "-"
        print(f"| {CONFIGS[name]} | {r['peak_rss_mib']:.0f} | {mem} | {r['tokens_per_s']:.0f} | {speed} | {r['losses'][0]:.4f} |")
    if args.json:
        write_json(args.json, results)  # temporary name + rename, like every file lorakit writes


if __name__ == "__main__":
    main()
