"""The vision pieces' costs on this machine: classifier load time and forward ms/image, and how fast
the Fashion-MNIST IDX files (70,000 images) read.

For each classifier in lorakit.models.CLASSIFIERS: the wall time of `load_classifier` (build, weights_only
torch.load, strict load; best of `--repeats`), then eval-mode forward under torch.no_grad at the model's
input size (224 × 224) for batch 1 and batch 8, median of `--repeats` timed runs after one warm-up, in
ms per image. Fashion-MNIST: `load_fashion_mnist` for train then test (gzip decompress + header checks),
best of `--repeats`.

    python benchmarks/bench_vision_data.py                 # Markdown table + final JSON line
    python benchmarks/bench_vision_data.py --threads 1 --repeats 3

Numbers depend on the CPU and on other load: the machine's load average is printed beside them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from lorakit.data.fashion_mnist import load_fashion_mnist
from lorakit.models.classifiers import CLASSIFIERS, load_classifier


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results: dict[str, dict] = {}
    for name in sorted(CLASSIFIERS):
        load_s = min(timed(lambda: load_classifier(name)) for _ in range(args.repeats))
        clf = load_classifier(name)
        row = {"load_s": round(load_s, 3)}
        for batch in (1, 8):
            x = torch.randn(batch, 3, clf.preprocess.size, clf.preprocess.size)
            with torch.no_grad():
                clf.model(x)
                runs = [timed(lambda: clf.model(x)) for _ in range(args.repeats)]
            row[f"ms_per_image_b{batch}"] = round(1000 * statistics.median(runs) / batch, 1)
        results[name] = row
    idx_s = min(timed(lambda: (load_fashion_mnist("train"), load_fashion_mnist("test"))) for _ in range(args.repeats))
    results["fashion-mnist-idx"] = {"read_s_70k": round(idx_s, 3), "images_per_s": round(70_000 / idx_s)}

    print(f"threads {args.threads}, load average {os.getloadavg()[0]:.1f}, torch {torch.__version__}\n")
    print("| classifier | load s | ms/image batch 1 | ms/image batch 8 |\n|---|---|---|---|")
    for name in sorted(CLASSIFIERS):
        r = results[name]
        print(f"| {name} | {r['load_s']} | {r['ms_per_image_b1']} | {r['ms_per_image_b8']} |")
    r = results["fashion-mnist-idx"]
    print(f"\nFashion-MNIST IDX, 70,000 images: {r['read_s_70k']} s ({r['images_per_s']:,} images/s)")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
