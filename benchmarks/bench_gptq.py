"""GPTQ vs round-to-nearest on the embedded SmolLM2-135M-Instruct: held-out perplexity at 4, 3 (and 2) bits.

Every linear layer but the output head is quantized to group-wise INT-N (group_size 32, min-max
scale and float zero per group, `lorakit.quant.gptq`), each configuration from a fresh copy of the
fp32 model; the quantized weights are written back dense (W_q = scale · (q − zero)), so every row
runs the same fp32 forward and only the weights differ.

Text is the Python standard library's docstrings (`inspect.getdoc` of each public function and
class): calibration from one set of modules, held-out perplexity on another, disjoint set, so
GPTQ is not scored on what it calibrated on.

    python benchmarks/bench_gptq.py                       # 4, 3 and 2 bits: RTN, GPTQ, GPTQ + act_order
    python benchmarks/bench_gptq.py --bits 4 --calib 8    # quicker

The issue's target: GPTQ's held-out perplexity below RTN's at 4 and 3 bits. Note that the embedded
model's weights are dequantized from a Q4_1 GGUF (4 bits, min-max blocks of 32 weights): at 4 bits
and group_size 32 they are already on the grid, so RTN (and GPTQ) at that setting are lossless and
tie with fp32. `--group-size 64` (576 = 9·64) gives a 4-bit comparison with something to win.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import inspect
import json
import math
import platform
import time

import torch

CALIB_MODULES = ("textwrap", "json", "shutil", "collections", "functools", "pathlib", "argparse", "logging",
                 "email.message", "unittest", "subprocess", "typing", "itertools", "os", "re", "inspect")
HELD_OUT_MODULES = ("glob", "shlex", "html", "math", "secrets", "uuid", "hashlib", "struct", "csv", "zipfile",
                    "tarfile", "statistics", "fractions", "decimal", "calendar", "string")


def docstrings(module_names) -> str:
    """The docstrings of each module and of its public functions and classes, in a fixed order."""
    parts = []
    for name in module_names:
        module = importlib.import_module(name)
        parts.append(inspect.getdoc(module) or "")
        for attr in sorted(getattr(module, "__all__", None) or dir(module)):
            obj = getattr(module, attr, None)
            if attr.startswith("_") or not (inspect.isfunction(obj) or inspect.isclass(obj) or inspect.isbuiltin(obj)):
                continue
            doc = inspect.getdoc(obj)
            if doc:
                parts.append(f"{attr}: {doc}")
    return "\n\n".join(parts)


def sequences(tokenizer, module_names, n: int, seq: int) -> torch.Tensor:
    """Up to n (n, seq) token-id rows cut from the modules' docstrings."""
    ids = tokenizer(docstrings(module_names), return_tensors="pt").input_ids[0]
    rows = min(n, ids.numel() // seq)
    return ids[: rows * seq].view(rows, seq).to(torch.long)


def perplexity(model, ids: torch.Tensor, batch: int = 4) -> float:
    """exp(mean next-token negative log-likelihood) over every predicted token of ids (n, seq)."""
    nll, count = 0.0, 0
    with torch.no_grad():
        for chunk in ids.split(batch):
            loss = model(input_ids=chunk, labels=chunk, use_cache=False).loss
            tokens = chunk[:, 1:].numel()
            nll, count = nll + loss.item() * tokens, count + tokens
    return math.exp(nll / count)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bits", default="4,3,2", help="comma-separated bit widths (default 4,3,2)")
    parser.add_argument("--group-size", type=int, default=32)
    parser.add_argument("--calib", type=int, default=16, help="calibration sequences (default 16)")
    parser.add_argument("--held-out", type=int, default=16, help="held-out sequences (default 16)")
    parser.add_argument("--seq", type=int, default=256, help="tokens per sequence (default 256)")
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorakit.models.default import default_model_dir
    from lorakit.quant.gptq import quantize_gptq_, quantize_rtn_

    torch.manual_seed(0)
    model_dir = default_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval().requires_grad_(False)
    calib = sequences(tokenizer, CALIB_MODULES, args.calib, args.seq)
    held_out = sequences(tokenizer, HELD_OUT_MODULES, args.held_out, args.seq)
    calib_batches = list(calib.split(4))
    print(f"SmolLM2-135M-Instruct fp32, {torch.get_num_threads()} threads; calibration {tuple(calib.shape)}, "
          f"held-out {tuple(held_out.shape)}, group_size {args.group_size}", flush=True)

    rows = []

    def record(method: str, bits: int | None, act_order: bool | None, model, seconds: float) -> None:
        ppl = perplexity(model, held_out)
        rows.append(dict(method=method, bits=bits, act_order=act_order, ppl=round(ppl, 3),
                         quantize_s=round(seconds, 1)))
        print(f"  {method:<5} bits={bits} act_order={act_order}: ppl {ppl:.3f} ({seconds:.0f} s to quantize)", flush=True)

    record("fp32", None, None, base, 0.0)
    for bits in (int(b) for b in args.bits.split(",")):
        model = copy.deepcopy(base)
        start = time.perf_counter()
        quantize_rtn_(model, bits, args.group_size)
        record("RTN", bits, None, model, time.perf_counter() - start)
        for act_order in (False, True):
            model = copy.deepcopy(base)
            start = time.perf_counter()
            quantize_gptq_(model, calib_batches, bits, args.group_size, act_order=act_order)
            record("GPTQ", bits, act_order, model, time.perf_counter() - start)
        del model

    print("\n| method | bits | act_order | held-out ppl | quantize (s) |\n|---|---|---|---|---|")
    for r in rows:
        bits = r["bits"] if r["bits"] is not None else "32 (fp)"
        act = {None: "", False: "off", True: "on"}[r["act_order"]]
        print(f"| {r['method']} | {bits} | {act} | {r['ppl']:.3f} | {r['quantize_s']} |")
    print(json.dumps({"benchmark": "gptq", "model": "SmolLM2-135M-Instruct", "group_size": args.group_size,
                      "calib": list(calib.shape), "held_out": list(held_out.shape),
                      "threads": torch.get_num_threads(), "machine": platform.machine(), "rows": rows}))


if __name__ == "__main__":
    main()
