"""QA-LoRA's headline comparison at small scale, on the embedded SmolLM2-135M-Instruct.

Held-out perplexity (answers of the validation modules of `lorakit.data.stdlib_docs`, modules the
fine-tune never saw) of:
  (a) the base model (fp32);
  (b) QLoRA (NF4 base, LoRA r=16 on all linear layers), merged into a dense fp32 model;
  (c) (b) re-quantized to INT-N, group 32, by round-to-nearest and by GPTQ: the usual route to a
      low-bit deployment, which loses some of what was trained;
  (d) QA-LoRA on an INT-N base (group 32, same bits; base quantized by --base-quant, scales and
      offsets on fp16 values with --scale-dtype float16), merged into the offsets: still INT-N,
      exactly, with no re-quantization;
  (e) at 4 bits, (d) exported to GGUF (Q4_1 blocks, the embedded model's metadata) and run in
      llama.cpp (needs llama-cpp-python; skipped without it), with its top-1 agreement with (d).
Both fine-tunes use the same data, steps, learning rate, rank and seed. The paper's expectation:
(d) matches (b) within noise and beats (c), with the gap growing at lower bits.

    python benchmarks/bench_qalora.py                       # 4, 3, 2 bits
    python benchmarks/bench_qalora.py --bits 4 --steps 30   # quicker
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import time

import torch

import lorakit
from lorakit.io import write_json
from lorakit.data.stdlib_docs import TRAIN_MODULES, VALID_MODULES, collate, docstring_pairs, encode_chat, mean_loss
from lorakit.models.default import default_model_dir

GROUP = 32


def fine_tune(model, rows, pad_id, args) -> list[float]:
    """A short AdamW run with warmup + cosine decay; the same for QLoRA and QA-LoRA."""
    torch.manual_seed(args.seed)
    order = random.Random(args.seed).sample(range(len(rows)), len(rows))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 5) * 0.5 * (1 + math.cos(math.pi * s / args.steps)))
    losses = []
    for step in range(args.steps):
        start = step * args.batch % len(order)
        ids, labels, mask = collate([rows[i] for i in order[start: start + args.batch]], pad_id)
        loss = lorakit.causal_lm_loss(model, ids, labels, mask)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def gguf_row(model, valid, results, args) -> None:
    """(e): the merged INT4 model as a GGUF file (the embedded model's metadata), run in llama.cpp."""
    import tempfile
    from pathlib import Path

    from lorakit.formats.llamacpp import label_nll, llama_logits, top1_agreement
    from lorakit.models.default import default_gguf_path

    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        print("(e) skipped: pip install llama-cpp-python to run the GGUF in llama.cpp")
        return
    path = Path(tempfile.mkdtemp(prefix="lorakit-qalora-")) / "qalora-int4.gguf"
    report = lorakit.export_gguf(model, path, template=default_gguf_path(), merged="QA-LoRA INT4 (bench_qalora)")
    results["(e) export max weight error"] = report.max_abs_error
    results["(e) export rules"] = report.counts()
    seqs, labels = [ids for ids, _ in valid], [y for _, y in valid]
    logits = llama_logits(path, seqs)
    nll, n = label_nll(logits, labels)
    results["(e) QA-LoRA INT4 GGUF, llama.cpp"] = math.exp(nll / n)
    with torch.no_grad():
        ours = [model(torch.tensor(ids)[None]).logits[0].float().numpy() for ids in seqs]
    results["(e) top1 agreement with (d)"] = top1_agreement(logits, ours)
    print(f"{'(e) QA-LoRA INT4 GGUF, llama.cpp':34s} ppl {results['(e) QA-LoRA INT4 GGUF, llama.cpp']:8.3f}   "
          f"top-1 agreement with (d) {results['(e) top1 agreement with (d)']:.4f}; export error "
          f"{report.max_abs_error:.3g}", flush=True)


def calibration(rows, n: int) -> list[torch.Tensor]:
    """GPTQ calibration batches: training prompts+answers (never the validation modules)."""
    return [torch.tensor(ids)[None] for ids, _ in rows[:n]]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bits", type=int, nargs="+", default=[4, 3, 2])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--base-quant", choices=["rtn", "gptq"], default="gptq", help="how QA-LoRA's INT-N base is quantized")
    p.add_argument("--calibration", type=int, default=64, help="GPTQ calibration sequences")
    p.add_argument("--scale-dtype", choices=["float32", "float16"], default="float16",
                   help="QA-LoRA base scales/offsets (float16: what GGUF Q4_1 stores, so (e) is exact)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = default_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    train = encode_chat(tokenizer, docstring_pairs(TRAIN_MODULES), args.max_tokens)
    valid = encode_chat(tokenizer, docstring_pairs(VALID_MODULES), args.max_tokens)
    calib = calibration(train, args.calibration)
    lora = dict(r=args.r, alpha=2 * args.r, target_modules="all-linear")
    results: dict[str, float] = {}
    t0 = time.perf_counter()

    def record(key: str, model) -> None:
        results[key] = math.exp(mean_loss(model.eval(), valid, pad_id))
        print(f"{key:34s} ppl {results[key]:8.3f}   ({time.perf_counter() - t0:5.0f} s)", flush=True)

    dense = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    record("(a) base fp32", dense)

    qlora = lorakit.load_quantized(model_dir, lorakit.NF4Config())
    lorakit.inject_adapters(qlora, lorakit.LoraConfig(**lora))
    lorakit.fuse_for_training_(qlora)
    qlora_losses = fine_tune(qlora, train, pad_id, args)
    lorakit.unfuse_(qlora)
    lorakit.dequantize_and_merge_(qlora)  # dense, exactly what was trained
    record("(b) QLoRA merged, dense", qlora)

    for bits in args.bits:
        rtn = copy.deepcopy(qlora)
        report = lorakit.quantize_(rtn, lorakit.IntNConfig(bits=bits, group_size=GROUP))
        record(f"(c) QLoRA merged -> INT{bits} RTN", rtn)
        del rtn
        gptq = copy.deepcopy(qlora)
        lorakit.quantize_(gptq, lorakit.IntNConfig(bits=bits, group_size=GROUP, method="gptq"), calibration=calib)
        record(f"(c) QLoRA merged -> INT{bits} GPTQ", gptq)
        del gptq

        base = copy.deepcopy(dense)
        quant = lorakit.IntNConfig(bits=bits, group_size=GROUP, method=args.base_quant, scale_dtype=args.scale_dtype)
        lorakit.quantize_(base, quant, calibration=calib if args.base_quant == "gptq" else None)
        record(f"    INT{bits} {args.base_quant.upper()} base (no fine-tune)", base)
        lorakit.inject_adapters(base, lorakit.LoraConfig(**lora, group_size=GROUP))
        lorakit.fuse_for_training_(base)
        qa_losses = fine_tune(base, train, pad_id, args)
        lorakit.unfuse_(base)
        with torch.no_grad():
            probe = collate(valid[:4], pad_id)[0]
            before = base(probe).logits
            lorakit.merge_(base)  # into the zeros: still INT-N
            drift = (base(probe).logits - before).abs().max().item()
        assert all(isinstance(m.weight, lorakit.IntNWeight) for m in base.modules() if isinstance(m, lorakit.QuantizedLinear))
        record(f"(d) QA-LoRA INT{bits} merged (exact)", base)
        results[f"(d) merge max logit change INT{bits}"] = drift
        if bits == 4:
            gguf_row(base, valid, results, args)
        results[f"loss curve QA-LoRA INT{bits}"] = [qa_losses[0], qa_losses[-1]]
        del base
    results["loss curve QLoRA"] = [qlora_losses[0], qlora_losses[-1]]
    results["requant report INT{} (weights)".format(args.bits[-1])] = report.relative_error

    print(f"\nSmolLM2-135M-Instruct, {args.steps} steps x batch {args.batch}, r={args.r} all-linear, lr {args.lr}, "
          f"group {GROUP}, QA-LoRA base {args.base_quant.upper()}, {len(train)} train / {len(valid)} held-out pairs\n")
    print("| bits | (b) QLoRA merged dense | (c) re-quantized RTN | (c) re-quantized GPTQ | (d) QA-LoRA merged |")
    print("|---|---:|---:|---:|---:|")
    for bits in args.bits:
        print(f"| {bits} | {results['(b) QLoRA merged, dense']:.3f} | {results[f'(c) QLoRA merged -> INT{bits} RTN']:.3f} "
              f"| {results[f'(c) QLoRA merged -> INT{bits} GPTQ']:.3f} | {results[f'(d) QA-LoRA INT{bits} merged (exact)']:.3f} |")
    print(f"\n(a) base fp32: {results['(a) base fp32']:.3f}")
    print(json.dumps(results))
    if args.json:
        write_json(args.json, results)  # temporary name + rename, like every file lorakit writes


if __name__ == "__main__":
    main()
