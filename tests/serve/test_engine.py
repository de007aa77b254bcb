"""The engine in-process: requests for different adapters share decode steps, rows join and leave, a
cancelled row goes, and each answer equals its adapter alone. Plus the sampling helpers."""

from __future__ import annotations

import threading

import pytest
import torch

from lorakit.serve.engine import Engine, Job
from lorakit.serve.sampling import SamplingParams, cut_at_stop, next_token, stable_prefix
from serve_reference import expected_chat


class Collector:
    def __init__(self) -> None:
        self.text, self.done, self.finished = [], None, threading.Event()

    def __call__(self, kind: str, value) -> None:
        if kind == "text":
            self.text.append(value)
        else:
            self.done = (kind, value)
            self.finished.set()


def test_rows_share_steps_join_leave_and_equal_each_adapter_alone(assets):
    from lorakit.models.default import load_causal_lm

    model_dir, dirs, _, _ = assets
    model, tokenizer = load_causal_lm(model_dir)
    engine = Engine(model, tokenizer, "tiny", max_batch=3)
    for name in ("a", "b"):
        engine.load_adapter(name, dirs[name]).result()
    rows = []  # batch size of every forward, seen from outside
    model.register_forward_pre_hook(lambda m, args, kwargs: rows.append(kwargs["input_ids"].shape), with_kwargs=True)
    requests = [("a", "Say hello.", 4), ("b", "Say hello.", 9), ("tiny", "Count to three.", 6),
                ("b", "Name a prime number.", 5), ("a", "Count to three.", 7)]
    jobs = []
    for model_name, question, n in requests:
        job = Job(engine.encode_chat([{"role": "user", "content": question}]), model_name,
                  SamplingParams(max_tokens=n, temperature=0), Collector())
        engine.submit(job)
        jobs.append(job)
    cancelled = Job(engine.encode_chat([{"role": "user", "content": "hi"}]), "a", SamplingParams(max_tokens=50),
                    Collector())
    cancelled.cancelled = True  # before it ever starts: never admitted
    engine.submit(cancelled)
    engine.start()
    try:
        assert all(job.emit.finished.wait(120) for job in jobs)
    finally:
        engine.stop()
    assert rows[0][0] == 3 and max(r[0] for r in rows) == 3  # the first three prefilled together, never above max_batch
    assert any(r[1] > 1 for r in rows[1:])  # later prompts joined a running batch (a prefill after the first)
    for job, (model_name, question, n) in zip(jobs, requests):
        kind, done = job.emit.done
        assert kind == "done" and done["completion_tokens"] <= n
        assert "".join(job.emit.text) == expected_chat(assets, None if model_name == "tiny" else model_name, question, n)
    assert cancelled.emit.done is None and not cancelled.generated


def test_unknown_model_and_too_long_prompt_are_refused_at_submit(assets):
    from lorakit.models.default import load_causal_lm
    from lorakit.serve.engine import UnknownModel

    model, tokenizer = load_causal_lm(assets[0])
    engine = Engine(model, tokenizer, "tiny")
    with pytest.raises(UnknownModel, match="`nope` does not exist. Available models: tiny"):
        engine.submit(Job([1, 2], "nope", SamplingParams(max_tokens=4), Collector()))
    with pytest.raises(ValueError, match="maximum context length is 256 tokens.*250 in the prompt, 10 for"):
        engine.submit(Job([1] * 250, "tiny", SamplingParams(max_tokens=10), Collector()))


def test_stop_strings_cut_and_hold_back_their_prefixes():
    assert cut_at_stop("hello world. bye", ("world", ".")) == ("hello ", True)
    assert cut_at_stop("hello", ("x",)) == ("hello", False)
    assert stable_prefix("answer: wor", ("world",)) == "answer: "  # "wor" may become "world"
    assert stable_prefix("answer: w\ufffd", ()) == "answer: w"  # an incomplete UTF-8 character waits


def test_top_p_keeps_the_nucleus_and_seed_repeats():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    params = SamplingParams(max_tokens=1, temperature=1.0, top_p=0.7, seed=3)
    g = params.generator()
    draws = {next_token(logits, params, g) for _ in range(200)}
    assert draws == {0, 1}  # 0.5 + 0.3 reach 0.7; the tail is cut
    assert next_token(logits, SamplingParams(max_tokens=1, temperature=0), None) == 0
    first = [next_token(logits, params, params.generator()) for _ in range(5)]
    assert len(set(first)) == 1  # the same seed, the same draw
