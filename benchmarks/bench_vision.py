"""LoRA's claims for vision, measured: head-only vs LoRA r 4 / 8 / 16 vs full fine-tune, same images, same budget.

Two tasks, each run through `lorakit train` in a subprocess (the loop users run), one run per method:

    classification  MobileNetV2 (ImageNet) on Fashion-MNIST at --cls-size px (default 64): --cls-train
                    training images (a seeded subset of the 60,000), --cls-valid test images for accuracy
    detection       YOLOv3-tiny (COCO) on Fashion-MNIST detection scenes (`make_detection_scenes`, 128 px
                    canvas, 1-3 items each) at input 128: mAP@0.5 and mAP@0.5:0.95 (pycocotools) on the val scenes

    head      only the task's new head, in full                        adapter.target_modules=[]
    lora-rN   LoRA on every groups=1 conv (depthwise convs excluded), alpha = 2r, + the new head in full
    full      the whole network in full: head + backbone via modules_to_save (MobileNetV2 `features`,
              YOLOv3-tiny's 11 non-head conv blocks); batch-norm running statistics stay frozen for every method

Within a task every method sees the same images in the same order with the same augmentation (seed 0),
the same steps, batch, warmup (5% of steps) and cosine decay; only the AdamW lr differs per method
(--cls-lr / --det-lr head=.. lora=.. full=..). The defaults are the best of a 50-step sweep over three lrs
per method (benchmarks/results/vision_lr_sweep.json); a longer budget may want lower ones.
Reported per run: the task metric before and after, trainable parameters, the adapter directory's size on
disk (for `full` it holds the whole backbone: that is the checkpoint a user ships), summed optimizer-step
time (evaluation and loading excluded), images/s over those steps, the process's peak memory
(`peak_memory_bytes` in metrics.jsonl: peak RSS on CPU, CUDA peak on a GPU), and the run's wall time.

    python benchmarks/bench_vision.py                       # 13 min on 2 shared cores at load 4; ~2x when busier
    python benchmarks/bench_vision.py --cls-steps 600 --det-steps 800 --cls-train 20000   # bigger budgets
    python benchmarks/bench_vision.py --smoke               # 1 step each, tiny sets: checks the plumbing

Timings depend on the CPU and on other load: the load average is recorded beside them. Each run uses
--threads OpenMP threads (default 1: on an oversubscribed machine 2 threads were measured 3-20x slower).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lorakit.io import write_json

REPO = Path(__file__).resolve().parents[1]
METHODS = ("head", "lora-r4", "lora-r8", "lora-r16", "full")
DEFAULT_LR = {"classification": {"head": 1e-2, "lora": 2e-3, "full": 3e-4},  # AdamW; one lr for every LoRA r
              "detection": {"head": 1e-2, "lora": 6e-3, "full": 1e-3}}


def backbone(task: str) -> list[str]:
    """The modules that, with the task's new head, are the whole network: MobileNetV2's `features`;
    YOLOv3-tiny's conv blocks but the two whose conv is a head (`layers` itself is a ModuleList, which
    cannot be trained as one module, and a head block holds the new head the task adds)."""
    if task == "classification":
        return ["features"]
    from lorakit.models.darknet import ConvBlock, load_yolov3_tiny

    model = load_yolov3_tiny()
    heads = {name.removesuffix(".conv") for name in model.head_names}
    return [f"layers.{i}" for i, m in enumerate(model.layers) if isinstance(m, ConvBlock) and f"layers.{i}" not in heads]


def method_overrides(method: str, task: str, args) -> list[str]:
    """The adapter and lr settings that make `method` on `task`."""
    lrs = {**DEFAULT_LR[task], **parse_lrs(args.cls_lr if task == "classification" else args.det_lr)}
    if method == "head":
        return ["adapter.target_modules=[]", f"train.lr={lrs['head']}"]
    if method == "full":
        return ["adapter.target_modules=[]", f"adapter.modules_to_save=[{','.join(backbone(task))}]",
                f"train.lr={lrs['full']}"]
    r = int(method.removeprefix("lora-r"))
    return [f"adapter.r={r}", f"adapter.alpha={2 * r}", f"train.lr={lrs['lora']}"]


def parse_lrs(items: list[str]) -> dict[str, float]:
    """["head=1e-2", "lora=2e-3"] -> {"head": 0.01, "lora": 0.002}."""
    lrs = {}
    for item in items:
        kind, _, value = item.partition("=")
        if kind not in ("head", "lora", "full") or not value:
            raise SystemExit(f"lr {item!r}: write head=LR, lora=LR or full=LR")
        lrs[kind] = float(value)
    return lrs


def task_overrides(task: str, args, scenes: Path | None) -> list[str]:
    if task == "classification":
        return ["task=image-classification", "data.train=fashion-mnist", f"data.image_size={args.cls_size}",
                f"data.max_examples={args.cls_train}", f"data.max_valid_examples={args.cls_valid}",
                f"train.steps={args.cls_steps}", f"train.batch_size={args.cls_batch}",
                f"train.warmup_steps={max(1, args.cls_steps // 20)}"]
    return ["task=object-detection", f"data.train={scenes}", "data.image_size=128",
            f"data.max_valid_examples={args.det_valid}", f"train.steps={args.det_steps}",
            f"train.batch_size={args.det_batch}", f"train.warmup_steps={max(1, args.det_steps // 20)}"]


def run(task: str, method: str, out: Path, args, scenes: Path | None) -> dict:
    overrides = [*task_overrides(task, args, scenes), *method_overrides(method, task, args), f"output_dir={out}",
                 "train.seed=0", "train.eval_every=0", "train.save_every=0", "train.schedule=cosine"]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(REPO)}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "lorakit", "train", *overrides, "--quiet"],
                          capture_output=True, text=True, env=env, cwd=REPO)
    wall = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"{task} {method} failed:\n{' '.join(overrides)}\n{done.stderr[-4000:]}")
    summary = json.loads((out / "summary.json").read_text())
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    row = {"lr": float(next(o for o in overrides if o.startswith("train.lr=")).split("=")[1]),
           "trainable_parameters": summary["trainable_parameters"],
           "adapter_bytes": sum(p.stat().st_size for p in (out / "adapter").rglob("*") if p.is_file()),
           "train_seconds": round(summary["train_seconds"], 2), "wall_seconds": round(wall, 1),
           "images_per_s": round(summary["images_per_s"], 2),
           "peak_memory_bytes": max(r.get("peak_memory_bytes", 0) for r in records),
           "train_loss": summary["train_loss"], "valid_loss": summary["valid_loss"]}
    keys = ("valid_accuracy",) if task == "classification" else ("valid_map50", "valid_map")
    for key in keys:
        row[f"{key}_before"], row[f"{key}_after"] = summary[f"{key}_before"], summary[f"{key}_after"]
    return row


def table(task: str, rows: dict[str, dict]) -> str:
    metric = (["accuracy"] if task == "classification" else ["mAP@0.5", "mAP@0.5:0.95"])
    keys = (["valid_accuracy"] if task == "classification" else ["valid_map50", "valid_map"])
    lines = ["| method | lr | " + " | ".join(metric) + " | trainable params | adapter on disk | step time (s) | "
             "img/s | peak memory | wall (s) |",
             "|---|---:|" + "---:|" * len(metric) + "---:|---:|---:|---:|---:|---:|"]
    for method, r in rows.items():
        scores = " | ".join(f"{r[k + '_after']:.3f}" for k in keys)
        lines.append(f"| {method} | {r['lr']:g} | {scores} | {r['trainable_parameters']:,} | "
                     f"{r['adapter_bytes'] / 2**20:.2f} MiB | {r['train_seconds']:.1f} | {r['images_per_s']:.1f} | "
                     f"{r['peak_memory_bytes'] / 2**20:.0f} MiB | {r['wall_seconds']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", nargs="+", choices=("classification", "detection"), default=["classification", "detection"])
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--cls-size", type=int, default=64)
    p.add_argument("--cls-train", type=int, default=4000)
    p.add_argument("--cls-valid", type=int, default=1000)
    p.add_argument("--cls-steps", type=int, default=125)
    p.add_argument("--cls-batch", type=int, default=32)
    p.add_argument("--det-train", type=int, default=2000, help="training scenes to generate")
    p.add_argument("--det-valid", type=int, default=300, help="val scenes to generate and evaluate on")
    p.add_argument("--det-steps", type=int, default=125)
    p.add_argument("--det-batch", type=int, default=16)
    p.add_argument("--cls-lr", nargs="+", default=[], metavar="KIND=LR", help=f"e.g. head=1e-2 lora=2e-3 full=3e-4 "
                   f"(default {DEFAULT_LR['classification']})")
    p.add_argument("--det-lr", nargs="+", default=[], metavar="KIND=LR", help=f"default {DEFAULT_LR['detection']}")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each run")
    p.add_argument("--smoke", action="store_true", help="1 step per run on a few images: checks the plumbing only")
    p.add_argument("--work", help="run directories go here (default: a new temporary directory)")
    p.add_argument("--json", help="write the results here (default benchmarks/results/vision.json; "
                                  "with --smoke, the work directory)")
    args = p.parse_args()
    if args.smoke:
        args.cls_train, args.cls_valid, args.cls_steps, args.cls_batch = 16, 16, 1, 8
        args.det_train, args.det_valid, args.det_steps, args.det_batch = 16, 8, 1, 4
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="lorakit-bench-vision-"))
    scenes = None
    if "detection" in args.tasks:
        from lorakit.data.scenes import make_detection_scenes

        folder = work / f"scenes-{args.det_train}-{args.det_valid}"  # kept: a rerun with --work reuses it
        scenes = (folder / "data.yaml" if (folder / "data.yaml").is_file() else
                  make_detection_scenes(folder, {"train": args.det_train, "val": args.det_valid}, seed=0, canvas=128))
    results: dict[str, dict] = {}
    for task in args.tasks:
        results[task] = {}
        for method in args.methods:
            row = run(task, method, work / task / method, args, scenes)
            row["load_average"] = round(os.getloadavg()[0], 1)
            results[task][method] = row
            print(f"{task} {method}: {row}", flush=True)
    print(f"\nthreads {args.threads}, load average {os.getloadavg()[0]:.1f}, work dir {work}")
    for task, rows in results.items():
        if task == "classification":
            print(f"\nMobileNetV2 on Fashion-MNIST {args.cls_size} px: {args.cls_train} train / {args.cls_valid} valid "
                  f"images, {args.cls_steps} steps x batch {args.cls_batch}; accuracy before: "
                  f"{next(iter(rows.values()))['valid_accuracy_before']:.3f}\n")
        else:
            first = next(iter(rows.values()))
            print(f"\nYOLOv3-tiny on Fashion-MNIST scenes 128 px: {args.det_train} train / {args.det_valid} val scenes, "
                  f"{args.det_steps} steps x batch {args.det_batch}; mAP@0.5 before: {first['valid_map50_before']:.3f}\n")
        print(table(task, rows))
    out = args.json or (work / "vision.json" if args.smoke else REPO / "benchmarks/results/vision.json")
    write_json(out, {"settings": vars(args), "results": results})


if __name__ == "__main__":
    main()
