"""NF4 vs FP4 vs INT4 on real text: the QLoRA paper's 4-bit data-type comparison, at small scale.

For each storage format of the frozen base -- fp32 (no quantization), NF4 with and without double
quantization, FP4 and INT4 (both with double quantization, lorakit's default), all with blocks of
64 -- we load a fresh copy of the embedded SmolLM2-135M-Instruct, quantize every linear layer but
the output head with `lorakit.quantize_` (its default "all-linear" selection; the head stays tied
to the fp32 embeddings) and measure:

  - bits/param and weight rel. error ‖Ŵ - W‖_F / ‖W‖_F over all quantized weights, from the
    `QuantizationReport` that `quantize_` returns;
  - held-out perplexity, exp(mean token loss), with `lorakit.causal_lm_loss` under torch.no_grad,
    through the quantized layers themselves (weights dequantized to fp32 on each forward).

Held-out text: `inspect.getdoc` of every public function and class defined in a fixed list of
standard-library modules (glob, shlex, html, math, secrets, uuid, hashlib, struct, csv, zipfile,
textwrap, json, ...), in sorted name order, deduplicated, joined by blank lines, tokenized once and
cut into N_SEQ non-overlapping sequences of SEQ_LEN tokens, the i-th starting at token
i * (total // N_SEQ) so that they sample the whole text (each sequence is scored on its own:
SEQ_LEN - 1 predicted tokens). The model never trained on this
exact concatenation, but docstrings of the standard library are surely in its pre-training data,
so "held-out" means "not seen by any adapter", not "unseen by the base". The text depends on the
Python version (docstrings change); the version and token count are printed with the results.

Caveat: the "fp32" SmolLM2 embedded in lorakit is itself dequantized from a Q4_1 GGUF (blocks of
32, scale + min per block), so its weights already sit on a 4-bit grid; quantizing them again
measures the error of re-quantizing those values, not of quantizing an original bf16 checkpoint.

    python benchmarks/bench_4bit_formats.py                    # Markdown table + final JSON line
    python benchmarks/bench_4bit_formats.py --n-seq 8          # quicker
    python benchmarks/bench_4bit_formats.py --formats fp32 nf4 fp4

About 1 minute on 2 otherwise idle CPU cores with the defaults (16 x 256 tokens, 5 formats); the
timings printed are informational only and swing widely when the cores are shared.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import math
import platform
import sys
import time

import torch

import lorakit
from lorakit.models.default import default_model_dir

MODULES = (
    "glob", "shlex", "html", "math", "secrets", "uuid", "hashlib", "struct", "csv", "zipfile",
    "textwrap", "json", "fnmatch", "base64", "bisect", "heapq", "statistics", "fractions",
    "string", "difflib", "shutil", "tempfile", "calendar", "ipaddress", "random", "urllib.parse",
)
# name -> NF4Config keyword arguments (None: the dense fp32 model)
FORMATS = {
    "fp32": None,
    "nf4": dict(quant_type="nf4", block_size=64, double_quant=True),
    "nf4-nodq": dict(quant_type="nf4", block_size=64, double_quant=False),
    "fp4": dict(quant_type="fp4", block_size=64, double_quant=True),
    "int4": dict(quant_type="int4", block_size=64, double_quant=True),
}
LABELS = {
    "fp32": "fp32 (no quantization)",
    "nf4": "NF4, block 64, double quant",
    "nf4-nodq": "NF4, block 64",
    "fp4": "FP4, block 64, double quant",
    "int4": "INT4, block 64, double quant",
}


def docstring_text(modules=MODULES) -> str:
    """The docstrings of the public functions and classes defined in `modules`, in a fixed order."""
    docs, seen = [], set()
    for module_name in modules:
        module = importlib.import_module(module_name)
        for name in sorted(vars(module)):
            if name.startswith("_"):
                continue
            obj = getattr(module, name)
            if not (inspect.isfunction(obj) or inspect.isbuiltin(obj) or inspect.isclass(obj)):
                continue
            if getattr(obj, "__module__", None) not in (module_name, "_" + module_name.rsplit(".", 1)[-1]):
                continue  # re-exported from elsewhere (e.g. `os` in glob); C accelerators (_csv, _struct) count
            doc = inspect.getdoc(obj)
            if doc and doc not in seen:
                seen.add(doc)
                docs.append(f"{module_name}.{name}: {doc.strip()}")
    return "\n\n".join(docs)


def heldout_ids(tokenizer, n_seq: int, seq_len: int) -> tuple[torch.Tensor, int]:
    ids = tokenizer(docstring_text(), return_tensors="pt", verbose=False).input_ids[0]  # longer than 8192: fine, cut below
    stride = ids.numel() // n_seq   # spread the sequences over the whole text, so every module is sampled
    if stride < seq_len:
        raise SystemExit(f"only {ids.numel()} tokens of docstrings, {n_seq * seq_len} needed: lower --n-seq or --seq-len")
    rows = [ids[i * stride:i * stride + seq_len] for i in range(n_seq)]
    return torch.stack(rows).to(torch.long).contiguous(), ids.numel()


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, batch: int) -> tuple[float, float]:
    """(perplexity, mean token loss) over all predicted tokens of `ids` (n_seq, seq_len)."""
    total, count = 0.0, 0
    for start in range(0, ids.shape[0], batch):
        chunk = ids[start:start + batch]
        n = chunk.shape[0] * (chunk.shape[1] - 1)   # no -100 labels: every next token counts
        total += lorakit.causal_lm_loss(model, chunk, chunk.clone()).item() * n
        count += n
    loss = total / count
    return math.exp(loss), loss


def run(name: str, ids: torch.Tensor, batch: int) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(default_model_dir(), dtype=torch.float32).eval()
    t0 = time.perf_counter()
    kwargs = FORMATS[name]
    if kwargs is None:
        bits, rel_err, max_err, n_layers = 32.0, 0.0, 0.0, 0
    else:
        report = lorakit.quantize_(model, lorakit.NF4Config(**kwargs))
        bits, rel_err, max_err, n_layers = (report.bits_per_param, report.relative_error,
                                            report.max_abs_error, len(report.layers))
    quant_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    ppl, loss = perplexity(model, ids, batch)
    eval_s = time.perf_counter() - t0
    return dict(format=name, label=LABELS[name], config=kwargs, layers_quantized=n_layers,
                bits_per_param=bits, weight_rel_error=rel_err, weight_max_abs_error=max_err,
                loss=loss, ppl=ppl, quantize_s=quant_s, eval_s=eval_s)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--formats", nargs="+", choices=list(FORMATS), default=list(FORMATS))
    parser.add_argument("--n-seq", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()   # no "Loading weights" bar per format

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir())
    ids, n_tokens = heldout_ids(tokenizer, args.n_seq, args.seq_len)
    print(f"held-out text: docstrings of {len(MODULES)} stdlib modules (Python {platform.python_version()}), "
          f"{n_tokens} tokens, using {args.n_seq} x {args.seq_len}", file=sys.stderr)

    formats = list(args.formats)
    if "fp32" not in formats:
        formats.insert(0, "fp32")   # the reference every ppl ratio is taken against
    results = []
    for name in formats:
        res = run(name, ids, args.batch)
        print(f"  {name:<9} ppl {res['ppl']:.4f}  bits {res['bits_per_param']:.3f}  rel.err "
              f"{res['weight_rel_error']:.4f}  (quantize {res['quantize_s']:.1f}s, eval {res['eval_s']:.1f}s)",
              file=sys.stderr)
        results.append(res)
    base = results[0]["ppl"]
    for res in results:
        res["ppl_vs_fp32"] = res["ppl"] / base

    print(f"\nSmolLM2-135M-Instruct, all linear layers but lm_head; held-out ppl on {args.n_seq} x {args.seq_len} "
          f"tokens of stdlib docstrings\n")
    print("| format | bits/param | weight rel. error | held-out ppl | ppl vs fp32 |")
    print("|---|---:|---:|---:|---:|")
    for res in results:
        print(f"| {res['label']} | {res['bits_per_param']:.3f} | {res['weight_rel_error']:.4f} "
              f"| {res['ppl']:.3f} | {res['ppl_vs_fp32']:.4f}x |")
    print(json.dumps(dict(benchmark="bench_4bit_formats", model="SmolLM2-135M-Instruct",
                          python=platform.python_version(), torch=torch.__version__, n_seq=args.n_seq,
                          seq_len=args.seq_len, heldout_tokens_available=n_tokens, results=results)))


if __name__ == "__main__":
    main()
