"""The shared prompt prefix (`lorakit.tasks.shared_prefix`) side by side with the plain forward, in one process:
the demo's run (QA-LoRA on the embedded Q4_1 GGUF, the embedded docstring rows, batch 8, max 96 tokens, lr 1e-3),
alternating the two on the same batches so that the machine's drift reaches both alike.

    training    `--rounds` rounds of one optimizer step on each of two batches, shared and plain in turn (the
                order swapped every round); "plain" is `shared_length` patched to 0, the same code otherwise;
                "shared, two calls" is the prefix computed by its own decoder call into a cache (the form before
                the prefix ran as row 0 of the rows' call: `prefix_as_row` patched to False)
    validation  `--rounds` passes over the held-out rows each way (`evaluate`, the training loop's validation,
                batches of 2048 padded tokens both ways); "plain" also without `dequantize_once` (no held
                weights with the adapters merged: each quantized layer dequantizes per batch, adapters unmerged);
                "cut at the cap" is shared with the rows cut greedily into batches of 2048 padded tokens (the cut
                before `evaluation_batches` minimised padding plus a cost per batch)

Prints seconds per side and the ratio, and writes benchmarks/results/shared_prefix.json.

    python benchmarks/bench_shared_prefix.py [--rounds 6]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "shared_prefix.json"


@contextlib.contextmanager
def plain():
    """No shared prefix (and, in evaluation, no held weights: the quantized layers dequantize on the fly)."""
    import importlib

    from lorakit.tasks import shared_prefix

    linear = importlib.import_module("lorakit.quant.linear")  # the module (lorakit.quant exports a linear())

    length, once = shared_prefix.shared_length, linear.dequantize_once_if_it_fits
    shared_prefix.shared_length = lambda *a: 0
    linear.dequantize_once_if_it_fits = lambda *a, **k: contextlib.nullcontext()
    try:
        yield
    finally:
        shared_prefix.shared_length, linear.dequantize_once_if_it_fits = length, once


@contextlib.contextmanager
def two_calls():
    """The shared prefix in its own decoder call, its keys and values a cache for the rows' call."""
    from lorakit.tasks import shared_prefix

    as_row, shared_prefix.prefix_as_row = shared_prefix.prefix_as_row, lambda decoder: False
    try:
        yield
    finally:
        shared_prefix.prefix_as_row = as_row


@contextlib.contextmanager
def cut_at_cap():
    """Evaluation batches cut greedily at the token cap (length order; a new batch when one more row would pass it)."""
    from lorakit.tasks import causal_lm

    def greedy(lengths, batch_tokens):
        batches, current = [], []
        for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):
            if current and (len(current) + 1) * lengths[i] > batch_tokens:
                batches.append(current)
                current = []
            current.append(i)
        return batches + [current] if current else batches

    cut, causal_lm.evaluation_batches = causal_lm.evaluation_batches, greedy
    try:
        yield
    finally:
        causal_lm.evaluation_batches = cut


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()

    from lorakit.io import write_json
    from lorakit.tasks import make_task
    from lorakit.tasks.causal_lm import evaluate, pad_id_of
    from lorakit.training import loop
    from lorakit.training.distributed import init_world
    from lorakit.training.run_config import load_config

    out = Path(tempfile.mkdtemp(prefix="shared-prefix-"))
    config = load_config(None, [f"output_dir={out}", "method=qalora", "train.steps=1000", "train.batch_size=8",
                                "train.lr=1e-3", "train.eval_every=0", "train.save_every=0", "data.max_tokens=96"])
    run = loop._start(config, False, False, make_task(config), None, init_world())
    batches = run.batches[2:4]
    pad = pad_id_of(run.task.tokenizer)

    def step(batch) -> float:
        run.batches, run.batch_index = [batch], 0
        start = time.perf_counter()
        loop._step(run)
        return time.perf_counter() - start

    def validate() -> float:
        start = time.perf_counter()
        evaluate(run.model, run.valid_examples, pad)
        return time.perf_counter() - start

    def plain_validate() -> float:
        with plain():
            start = time.perf_counter()
            evaluate(run.model, run.valid_examples, pad)
            return time.perf_counter() - start

    def cut_validate() -> float:
        with cut_at_cap():
            return validate()

    train = {"shared": 0.0, "plain": 0.0, "shared, two calls": 0.0}
    valid = {"shared": 0.0, "plain": 0.0, "cut at the cap": 0.0}
    passes = {"shared": validate, "plain": plain_validate, "cut at the cap": cut_validate}
    for batch in batches:  # warm-up
        step(batch)
        with plain():
            step(batch)
        with two_calls():
            step(batch)
    for warm_up in passes.values():  # the first pass of a process pays one-time costs (~2 s here)
        warm_up()
    for r in range(args.rounds):
        for side in list(train) if r % 2 == 0 else list(train)[::-1]:
            for batch in batches:
                if side == "shared":
                    train[side] += step(batch)
                elif side == "shared, two calls":
                    with two_calls():
                        train[side] += step(batch)
                else:
                    with plain():
                        train[side] += step(batch)
        for side in list(valid) if r % 2 == 0 else list(valid)[::-1]:
            valid[side] += passes[side]()
    result = {
        "batches_tokens": [sum(len(e.input_ids) for e in b) for b in batches], "rounds": args.rounds,
        "valid_rows": len(run.valid_examples), "valid_tokens": sum(len(e.input_ids) for e in run.valid_examples),
        "train_s": train, "train_speedup": train["plain"] / train["shared"],
        "train_speedup_over_two_calls": train["shared, two calls"] / train["shared"],
        "valid_s_per_pass": {k: v / args.rounds for k, v in valid.items()},
        "valid_speedup": valid["plain"] / valid["shared"],
        "valid_speedup_over_the_cut_at_the_cap": valid["cut at the cap"] / valid["shared"],
    }
    print(json.dumps(result, indent=1))
    write_json(RESULTS, result)


if __name__ == "__main__":
    main()
