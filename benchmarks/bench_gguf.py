"""GGUF in, GGUF out: fine-tune the embedded SmolLM2 Q4_1 file on its own codes and run the result in llama.cpp.

Held-out perplexity (answers of the validation modules of `lorakit.data.stdlib_docs`) of:
  (a) the base GGUF, in llama.cpp;
  (b) lorakit's model after QA-LoRA (group 32, r=16, all linear layers) on the file's own Q4_1 codes,
      merged into the Q4_1 offsets (lorakit's forward);
  (c) the fine-tuned GGUF lorakit wrote, in llama.cpp;
  (d) the usual route: PEFT LoRA (same r, alpha, data, steps) on the dequantized model, merged, then
      re-quantized to Q4_1 with gguf.quants, in llama.cpp (and the merged dense model before
      re-quantization, in lorakit, for reference).
Also: how much of each fine-tune's loss gain survives in the GGUF llama.cpp runs, top-1 agreement of
llama.cpp with lorakit on (c) and on base + GGUF adapter, file sizes, and the wall time from GGUF in
to GGUF out. Needs peft and llama-cpp-python.

    python benchmarks/bench_gguf.py [--steps 60] [--json benchmarks/results/gguf.json]
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import torch

import lorakit
from bench_qalora import fine_tune
from lorakit.data.stdlib_docs import TRAIN_MODULES, VALID_MODULES, docstring_pairs, encode_chat, mean_loss
from lorakit.formats.llamacpp import label_nll, llama_logits, top1_agreement
from lorakit.io import write_json
from lorakit.models.default import default_gguf_path


def lorakit_logits(model, rows) -> list:
    with torch.no_grad():
        return [model(torch.tensor(ids)[None]).logits[0].float().numpy() for ids, _ in rows]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="directory for the GGUF files (default: a temporary one)")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="lorakit-bench-gguf-"))
    out.mkdir(parents=True, exist_ok=True)
    src = default_gguf_path()
    res: dict = {"steps": args.steps, "batch": args.batch, "r": args.r, "lr": args.lr}

    t_in = time.perf_counter()
    model, tok = lorakit.load_gguf(src)  # float32: the file's codes, scales and offsets, exactly
    res["load_s"] = time.perf_counter() - t_in
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    train = encode_chat(tok, docstring_pairs(TRAIN_MODULES), args.max_tokens)
    valid = encode_chat(tok, docstring_pairs(VALID_MODULES), args.max_tokens)
    seqs, labels = [ids for ids, _ in valid], [y for _, y in valid]

    def llama_ppl(key, path, lora=None, reference=None):
        logits = llama_logits(path, seqs, lora=lora)
        nll, n = label_nll(logits, labels)
        res[key] = math.exp(nll / n)
        if reference is not None:
            res[key + " top1 agreement"] = top1_agreement(logits, reference)
            res[key + " max |logit diff|"] = float(max(abs(a - b).max() for a, b in zip(logits, reference)))
        print(f"{key:52s} ppl {res[key]:8.3f}", flush=True)
        return nll / n

    def lorakit_ppl(key, m):
        loss = mean_loss(m.eval(), valid, pad)
        res[key] = math.exp(loss)
        print(f"{key:52s} ppl {res[key]:8.3f}", flush=True)
        return loss

    base_loss = llama_ppl("(a) base GGUF, llama.cpp", src, reference=lorakit_logits(model, valid))
    res["base GGUF, lorakit"] = math.exp(mean_loss(model, valid, pad))

    # --- QA-LoRA on the file's own Q4_1 codes ---------------------------------------------------
    t0 = time.perf_counter()
    lorakit.inject_adapters(model, lorakit.LoraConfig(r=args.r, alpha=2 * args.r, target_modules="all-linear",
                                                      group_size=32))
    losses = fine_tune(model, train, pad, args)
    res["QA-LoRA train_s"] = time.perf_counter() - t0
    res["QA-LoRA loss first/last"] = [losses[0], losses[-1]]
    unmerged = lorakit_logits(model.eval(), valid)
    lorakit.export_gguf_adapter(model, out / "adapter.gguf")
    lorakit.merge_(model)
    report = lorakit.export_gguf(model, out / "finetuned.gguf", merged="QA-LoRA r=16 on stdlib docstrings")
    res["GGUF in -> GGUF out s"] = time.perf_counter() - t_in
    res["export max weight error (fp16 offsets)"] = report.max_abs_error
    res["export rules"] = report.counts()
    print(report)
    trained_loss = lorakit_ppl("(b) QA-LoRA merged, lorakit", model)
    merged = lorakit_logits(model, valid)
    res["(b) merged vs unmerged top1 agreement"] = top1_agreement(merged, unmerged)
    ft_loss = llama_ppl("(c) fine-tuned GGUF, llama.cpp", out / "finetuned.gguf", reference=merged)
    llama_ppl("    base GGUF + GGUF adapter, llama.cpp", src, lora=out / "adapter.gguf", reference=unmerged)
    res["(c) gain kept"] = (base_loss - ft_loss) / (base_loss - trained_loss)
    res["(c) vs (b) ppl difference %"] = 100 * (res["(c) fine-tuned GGUF, llama.cpp"] / res["(b) QA-LoRA merged, lorakit"] - 1)
    del model, merged, unmerged

    # --- the usual route: PEFT LoRA on the dequantized model, merge, re-quantize to Q4_1 -----------
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    dense, _ = lorakit.load_gguf(src, quantized=False, tokenizer=False)
    peft_model = get_peft_model(dense, PeftLoraConfig(r=args.r, lora_alpha=2 * args.r, target_modules="all-linear",
                                                      lora_dropout=0.0))
    t0 = time.perf_counter()
    peft_losses = fine_tune(peft_model.base_model.model, train, pad, args)
    res["PEFT LoRA train_s"] = time.perf_counter() - t0
    res["PEFT LoRA loss first/last"] = [peft_losses[0], peft_losses[-1]]
    merged_dense = peft_model.merge_and_unload()
    dense_loss = lorakit_ppl("    PEFT LoRA merged dense (before re-quantization)", merged_dense)
    requant = lorakit.export_gguf(merged_dense, out / "usual_route.gguf", template=src)
    res["(d) re-quantization max weight error"] = requant.max_abs_error
    usual_loss = llama_ppl("(d) usual route: merged, re-quantized Q4_1, llama.cpp", out / "usual_route.gguf")
    res["(d) gain kept"] = (base_loss - usual_loss) / (base_loss - dense_loss)

    res["file MB"] = {f.name: round(f.stat().st_size / 2**20, 2) for f in [src, *sorted(out.glob("*.gguf"))]}
    print(json.dumps(res, indent=1, default=str))
    print(f"\n| | held-out ppl | fine-tune loss gain kept |\n|---|---:|---:|\n"
          f"| (a) base GGUF, llama.cpp | {res['(a) base GGUF, llama.cpp']:.3f} | |\n"
          f"| (b) QA-LoRA on the Q4_1 codes, merged, lorakit | {res['(b) QA-LoRA merged, lorakit']:.3f} | 100% (reference) |\n"
          f"| (c) lorakit's fine-tuned GGUF, llama.cpp | {res['(c) fine-tuned GGUF, llama.cpp']:.3f} | {100 * res['(c) gain kept']:.0f}% |\n"
          f"| PEFT LoRA merged, dense (lorakit) | {res['    PEFT LoRA merged dense (before re-quantization)']:.3f} | 100% (reference) |\n"
          f"| (d) usual route re-quantized to Q4_1, llama.cpp | {res['(d) usual route: merged, re-quantized Q4_1, llama.cpp']:.3f} | {100 * res['(d) gain kept']:.0f}% |")
    if args.json:
        write_json(args.json, res)


if __name__ == "__main__":
    main()
