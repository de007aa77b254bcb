"""`lorakit serve` as users run it: the CLI in a subprocess on a free port, talked to with the official `openai`
client (and httpx for malformed bodies). A tiny Llama with the embedded model's tokenizer, three tiny adapters.

Expected texts come from transformers' own greedy `generate` on the same model with one adapter active,
so "the server's batch of mixed adapters" is checked against "each adapter alone" by an independent path.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from serve_reference import expected_chat, expected_completion

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

PROMPTS = ["What does shlex.quote do?", "Name a prime number.", "Say hello.", "Count to three."]


@pytest.fixture(scope="module")
def server(assets):
    """The base URL of `lorakit serve --base TINY --adapter a=... --adapter b=... --port 0`."""
    model_dir, dirs, _, _ = assets
    command = [sys.executable, "-m", "lorakit", "serve", "--base", str(model_dir), "--name", "tiny", "--port", "0",
               "--max-batch", "8", "--adapter", f"a={dirs['a']}", "--adapter", f"b={dirs['b']}"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + 180
    line = ""
    while time.monotonic() < deadline and "lorakit serve:" not in line:
        line = process.stdout.readline()
        if not line and process.poll() is not None:
            raise AssertionError(f"lorakit serve exited {process.returncode}:\n{process.stderr.read()[-3000:]}")
    url = line.rsplit(" at ", 1)[1].strip()
    assert url.startswith("http://127.0.0.1:"), line  # the default address: this machine only
    for _ in range(200):  # uvicorn accepts once its startup (the engine thread) is done
        try:
            httpx.get(url + "/models", timeout=1.0)
            break
        except httpx.TransportError:
            time.sleep(0.05)
    yield url
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server, api_key="unused", max_retries=0, timeout=120)


def chat(client, model: str, question: str, max_tokens: int = 12, **kw) -> str:
    reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                           max_tokens=max_tokens, temperature=0, **kw)
    return reply.choices[0].message.content


def test_models_lists_the_base_and_every_adapter(client):
    models = client.models.list().data
    assert [m.id for m in models] == ["tiny", "a", "b"]
    assert [getattr(m, "parent", None) for m in models] == [None, "tiny", "tiny"]


def test_chat_completion_equals_generate_with_that_adapter(client, assets):

    reply = client.chat.completions.create(model="a", messages=[{"role": "user", "content": PROMPTS[0]}],
                                           max_tokens=12, temperature=0)
    assert reply.object == "chat.completion" and reply.model == "a"
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == expected_chat(assets, "a", PROMPTS[0], 12)
    assert reply.usage.completion_tokens <= 12 and reply.usage.prompt_tokens > 5
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert chat(client, "tiny", PROMPTS[0]) == expected_chat(assets, None, PROMPTS[0], 12)
    assert chat(client, "a", PROMPTS[0]) != chat(client, "b", PROMPTS[0])  # the adapters are visible


def test_completion_equals_generate(client, assets):
    reply = client.completions.create(model="b", prompt="def fibonacci(n):", max_tokens=10, temperature=0)
    assert reply.object == "text_completion"
    assert reply.choices[0].text == expected_completion(assets, "b", "def fibonacci(n):", 10)
    default = client.completions.create(model="b", prompt="def fibonacci(n):", temperature=0)  # OpenAI's default 16
    assert default.usage.completion_tokens <= 16


def test_streaming_gives_the_same_text_in_chunks(client):
    whole = chat(client, "a", PROMPTS[1], 16)
    stream = client.chat.completions.create(model="a", messages=[{"role": "user", "content": PROMPTS[1]}],
                                            max_tokens=16, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)  # the client stops at `data: [DONE]`
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole
    assert chunks[-2].choices[0].finish_reason in ("stop", "length")
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    text = client.completions.create(model="b", prompt="import os", max_tokens=8, temperature=0).choices[0].text
    pieces = list(client.completions.create(model="b", prompt="import os", max_tokens=8, temperature=0, stream=True))
    assert "".join(p.choices[0].text for p in pieces) == text


def test_concurrent_requests_for_different_adapters_equal_each_alone(client, assets):
    jobs = [(model, question, 6 + 3 * i) for i, (model, question) in
            enumerate((m, q) for q in PROMPTS[:2] for m in ("a", "b", "tiny"))]  # rows of different lengths
    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(lambda job: chat(client, job[0], job[1], job[2]), jobs))
    for (model, question, n), answer in zip(jobs, answers):
        assert answer == expected_chat(assets, None if model == "tiny" else model, question, n), (model, question)


def test_unknown_model_is_404_naming_it_and_the_available_ones(client):
    with pytest.raises(openai.NotFoundError) as e:
        chat(client, "gpt-4", "hi")
    message = e.value.body["message"]
    assert "`gpt-4` does not exist" in message and "tiny, a, b" in message
    assert e.value.body["type"] == "model_not_found"


def test_malformed_bodies_are_400_in_openai_error_shape(server):
    for body in (b"{not json", b'{"model": "a"}', b'{"model": "a", "messages": [], "max_tokens": 4}',
                 b'{"model": "a", "messages": [{"role": "user", "content": "hi"}], "temperature": 9}'):
        r = httpx.post(server + "/chat/completions", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 400, (body, r.text)
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = httpx.post(server + "/completions", json={"model": "a", "prompt": "x", "n": 2})
    assert r.status_code == 400 and "n=2 is not supported" in r.json()["error"]["message"]


def test_too_long_a_prompt_is_400_with_the_numbers(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="a", prompt="word " * 300, max_tokens=4)  # the tiny model: 256 positions
    assert "maximum context length is 256 tokens" in e.value.body["message"]


def test_stop_and_seed_are_honoured(client):
    whole = chat(client, "b", PROMPTS[2], 16)
    stop = whole[len(whole) // 2: len(whole) // 2 + 3]
    assert stop and chat(client, "b", PROMPTS[2], 16, stop=[stop]) == whole[:whole.find(stop)]
    sampled = [client.completions.create(model="a", prompt="Once", max_tokens=10, temperature=1.0, seed=7).choices[0].text
               for _ in range(2)]
    assert sampled[0] == sampled[1]


def test_adapters_load_and_unload_at_run_time(client, server, assets):
    _, dirs, _, _ = assets
    r = httpx.post(server + "/load_lora_adapter", json={"lora_name": "c", "lora_path": str(dirs["c"])})
    assert r.status_code == 200, r.text
    assert "c" in [m.id for m in client.models.list().data]
    assert chat(client, "c", PROMPTS[3]) == expected_chat(assets, "c", PROMPTS[3], 12)
    r = httpx.post(server + "/load_lora_adapter", json={"lora_name": "c", "lora_path": str(dirs["c"])})
    assert r.status_code == 400 and "already being served" in r.json()["error"]["message"]
    r = httpx.post(server + "/load_lora_adapter", json={"lora_name": "d", "lora_path": "/nonexistent"})
    assert r.status_code == 400 and "/nonexistent" in r.json()["error"]["message"]
    r = httpx.post(server + "/unload_lora_adapter", json={"lora_name": "c"})
    assert r.status_code == 200, r.text
    with pytest.raises(openai.NotFoundError):
        chat(client, "c", PROMPTS[3])
    assert [m.id for m in client.models.list().data] == ["tiny", "a", "b"]
    assert httpx.post(server + "/unload_lora_adapter", json={"lora_name": "c"}).status_code == 404
