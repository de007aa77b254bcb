"""Useful training throughput: `lorakit train` vs `transformers.Trainer` + `peft`, same run, same machine.

Both fine-tune SmolLM2-135M-Instruct (the embedded model, dense fp32) with LoRA r=16, alpha 32 on every
linear layer, on an instruction dataset with varied lengths (the standard-library docstring pairs:
answers of 20 to 400 characters), in the model's chat template, loss on responses only, max 256 tokens,
batch 8, the same number of optimizer steps, lr, warmup and cosine schedule. Useful tokens are the
loss-bearing ones (response tokens, not padding, not prompts). Throughput = useful tokens / summed step
time (data preparation and model loading excluded for both; evaluation and checkpoints off).

    transformers.Trainer: what its users get by default (random batches padded to the longest), and with
        train_sampling_strategy="group_by_length";
    lorakit train: length-grouped batches, its adapter layers and the fused chunked cross-entropy.

    python benchmarks/bench_train.py [--steps 24]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from lorakit.io import write_json


def make_data(path: Path) -> Path:
    from lorakit.data.stdlib_docs import TRAIN_MODULES, docstring_pairs

    path.write_text("".join(json.dumps({"instruction": q, "output": a}) + "\n" for q, a in docstring_pairs(TRAIN_MODULES)))
    return path


def run_lorakit(data: Path, out: Path, args) -> dict:
    from lorakit.training.run_config import load_config
    from lorakit.training.loop import train

    config = load_config(None, [
        "method=lora", "model.dtype=float32", f"data.train={data}", "data.valid_fraction=0", f"data.max_tokens={args.max_tokens}",
        f"output_dir={out}", f"train.steps={args.steps}", f"train.batch_size={args.batch}", "train.lr=2e-4",
        "train.warmup_steps=2", "train.schedule=cosine", "train.eval_every=0",
        f"train.save_every={args.steps}", "adapter.r=16", "adapter.alpha=32",
    ])
    result = train(config, progress=False)
    return {"useful_tokens": round(result.useful_tokens_per_s * result.seconds), "seconds": result.seconds,
            "useful_tokens_per_s": result.useful_tokens_per_s}


def run_hf(data: Path, out: Path, args, group_by_length: bool) -> dict:
    import transformers
    from peft import LoraConfig, get_peft_model

    from lorakit.data import records, render
    from lorakit.models.default import load_causal_lm

    model, tok = load_causal_lm(None, torch.float32)
    examples, _ = render.encode(tok, records.read_records(data), args.max_tokens)
    rows = [{"input_ids": e.input_ids, "labels": e.labels} for e in examples]
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0))
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    counted = {"tokens": 0}

    def collate(batch):
        width = max(len(b["input_ids"]) for b in batch)
        ids = torch.full((len(batch), width), pad)
        labels = torch.full((len(batch), width), -100)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, b in enumerate(batch):
            n = len(b["input_ids"])
            ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(b["input_ids"]), torch.tensor(b["labels"]), 1
        counted["tokens"] += int((labels[:, 1:] != -100).sum())
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

    class StepTimer(transformers.TrainerCallback):
        seconds = 0.0

        def on_step_begin(self, *a, **k):
            self.start = time.perf_counter()

        def on_step_end(self, *a, **k):
            StepTimer.seconds += time.perf_counter() - self.start

    targs = transformers.TrainingArguments(
        output_dir=str(out), max_steps=args.steps, per_device_train_batch_size=args.batch, learning_rate=2e-4,
        warmup_steps=2, lr_scheduler_type="cosine", report_to=[], save_strategy="no", use_cpu=True,
        logging_steps=args.steps, disable_tqdm=True, seed=0,
        train_sampling_strategy="group_by_length" if group_by_length else "random",
        dataloader_num_workers=0, remove_unused_columns=False,
    )
    trainer = transformers.Trainer(model=model, args=targs, train_dataset=rows, data_collator=collate,
                                   callbacks=[StepTimer()])
    trainer.train()
    return {"useful_tokens": counted["tokens"], "seconds": StepTimer.seconds,
            "useful_tokens_per_s": counted["tokens"] / StepTimer.seconds}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="lorakit-bench-train-"))
    data = make_data(work / "train.jsonl")
    results = {
        "transformers.Trainer + peft": run_hf(data, work / "hf", args, group_by_length=False),
        "transformers.Trainer + peft, group_by_length sampler": run_hf(data, work / "hf-grouped", args, group_by_length=True),
        "lorakit train": run_lorakit(data, work / "lorakit", args),
    }
    base = results["transformers.Trainer + peft"]["useful_tokens_per_s"]
    print(f"\nSmolLM2-135M-Instruct fp32, LoRA r=16 all-linear, {args.steps} steps x batch {args.batch}, "
          f"max {args.max_tokens} tokens\n")
    print("| | useful tokens | step time (s) | useful tokens/s | vs Trainer |\n|---|---:|---:|---:|---:|")
    for name, r in results.items():
        r["ratio"] = r["useful_tokens_per_s"] / base
        print(f"| {name} | {r['useful_tokens']} | {r['seconds']:.1f} | {r['useful_tokens_per_s']:.0f} | {r['ratio']:.2f}x |")
    if args.json:
        write_json(args.json, results)


if __name__ == "__main__":
    main()
