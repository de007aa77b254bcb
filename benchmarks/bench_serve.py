"""`lorakit serve` under load, on the embedded SmolLM2-135M-Instruct (its Q4_1 codes): the server in a
subprocess with 3 random LoRA adapters (r=16, all-linear), `--requests` chat requests from `--clients`
concurrent `openai` clients, spread over the base and the adapters. Reports whether every request was
answered, latency percentiles (request sent -> whole answer received) and completion tokens per second.

    python benchmarks/bench_serve.py [--requests 200] [--clients 8] [--max-tokens 32]
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = ["What does shlex.quote do?", "What does math.isclose do?", "Explain list comprehensions.",
             "What is a Python generator?", "How do I read a file line by line?", "What does os.path.join do?"]


def make_adapters(directory: Path, count: int) -> dict[str, Path]:
    import lorakit
    from lorakit.models.default import default_gguf_path

    model, _ = lorakit.load_gguf(default_gguf_path(), tokenizer=False)
    dirs = {}
    for i in range(count):
        name = f"adapter{i}"
        lorakit.inject_adapters(model, lorakit.LoraConfig(r=16, alpha=32, target_modules="all-linear"), name=name)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * 0.01)
        dirs[name] = lorakit.save_adapter(model, directory / name, name=name)
    return dirs


def start_server(adapters: dict[str, Path], max_batch: int) -> tuple[subprocess.Popen, str]:
    command = [sys.executable, "-m", "lorakit", "serve", "--port", "0", "--max-batch", str(max_batch)]
    for name, path in adapters.items():
        command += ["--adapter", f"{name}={path}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env)
    line = ""
    while "lorakit serve:" not in line:
        line = process.stdout.readline()
        if not line and process.poll() is not None:
            raise SystemExit(f"lorakit serve exited with {process.returncode}")
    return process, line.rsplit(" at ", 1)[1].strip()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--adapters", type=int, default=3)
    args = parser.parse_args()
    import httpx
    import openai

    with tempfile.TemporaryDirectory() as tmp:
        adapters = make_adapters(Path(tmp), args.adapters)
        process, url = start_server(adapters, max_batch=args.clients)
        try:
            for _ in range(600):
                try:
                    httpx.get(url + "/models", timeout=1.0)
                    break
                except httpx.TransportError:
                    time.sleep(0.1)
            client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=600)
            models = [m.id for m in client.models.list().data]

            def one(i: int) -> tuple[float, int]:
                start = time.perf_counter()
                reply = client.chat.completions.create(
                    model=models[i % len(models)], max_tokens=args.max_tokens, temperature=0,
                    messages=[{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}])
                assert reply.choices[0].finish_reason in ("stop", "length")
                return time.perf_counter() - start, reply.usage.completion_tokens

            one(0)  # warm-up: the first request dequantizes the base once
            start = time.perf_counter()
            with ThreadPoolExecutor(args.clients) as pool:
                results = list(pool.map(one, range(args.requests)))
            wall = time.perf_counter() - start
        finally:
            process.terminate()
            process.wait(timeout=30)
    latencies = sorted(r[0] for r in results)
    q = statistics.quantiles(latencies, n=100, method="inclusive")
    tokens = sum(r[1] for r in results)
    print(f"models {models}; {len(results)}/{args.requests} requests answered from {args.clients} clients, "
          f"max_tokens {args.max_tokens}, torch threads {torch.get_num_threads()}")
    print(f"latency s: p50 {q[49]:.2f}  p90 {q[89]:.2f}  p99 {q[98]:.2f}  max {latencies[-1]:.2f}")
    print(f"{tokens} completion tokens in {wall:.1f} s: {tokens / wall:.1f} tokens/s, {len(results) / wall:.2f} requests/s")


if __name__ == "__main__":
    main()
