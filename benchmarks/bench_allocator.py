"""glibc's malloc keeping the memory it frees (`lorakit.training.allocator`) against its own thresholds
(`LORAKIT_MALLOC=system`): LoRA through the roofline's batches (`bench_roofline.py`: SmolLM2-135M, whole-docstring
rows, batch 4, max 512 tokens, r 16, fp32, 2 warm-up steps, then the same 4 batches of 595-2022 tokens).

malloc is set once per process, so each side runs in its own process; the two alternate `--repeats` times (the
order swapped every repeat) so that the machine's drift reaches both alike. Prints each batch's seconds per side,
the totals and their ratio, and writes benchmarks/results/allocator.json.

    python benchmarks/bench_allocator.py [--repeats 3]     # about 1 minute per process
"""

from __future__ import annotations

import argparse
from pathlib import Path

import bench_roofline

RESULTS = Path(__file__).parent / "results" / "allocator.json"
SIDES = {"keeps freed memory": {}, "glibc's own thresholds": {"LORAKIT_MALLOC": "system"}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    roofline = argparse.Namespace(steps=4, warmup=2, rounds=1, batch=4, max_tokens=512, r=16, threads=0)

    from lorakit.io import write_json

    runs = {side: [] for side in SIDES}
    for repeat in range(args.repeats):
        for side in list(SIDES) if repeat % 2 == 0 else list(SIDES)[::-1]:
            steps = bench_roofline._child(roofline, "lora", "float32", env=SIDES[side])[0]["steps"]
            runs[side].append([s["seconds"] for s in steps])
            print(f"{side:24s} " + " ".join(f"{s:6.2f}" for s in runs[side][-1])
                  + f"  total {sum(runs[side][-1]):6.2f} s", flush=True)
    totals = {side: sum(map(sum, r)) / len(r) for side, r in runs.items()}
    ratio = totals["glibc's own thresholds"] / totals["keeps freed memory"]
    print("mean totals: " + ", ".join(f"{side} {t:.2f} s" for side, t in totals.items()) + f": {ratio:.2f}x")
    tokens = [s["tokens"] for s in steps]
    write_json(RESULTS, {"batch_tokens": tokens, "seconds_per_batch": runs, "mean_total_s": totals,
                         "speedup": ratio})


if __name__ == "__main__":
    main()
