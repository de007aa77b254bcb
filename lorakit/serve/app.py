"""The HTTP side of `lorakit serve`: OpenAI's routes over one `Engine`, with FastAPI.

    GET  /v1/models                  the base and every loaded adapter, each a model name
    POST /v1/chat/completions        messages -> the model's chat template -> an answer (stream: SSE chunks)
    POST /v1/completions             a plain prompt -> its continuation (stream: SSE chunks)
    POST /v1/load_lora_adapter       {"lora_name", "lora_path"}: serve a PEFT adapter directory as a new model
    POST /v1/unload_lora_adapter     {"lora_name"}: stop serving it

Streaming sends `data: {chunk}` events in OpenAI's chunk format and ends with `data: [DONE]`. Errors are
OpenAI's error body {"error": {"message", "type", "param", "code"}}: 404 unknown model (the message lists
the available ones), 400 malformed body, unsupported parameter or too long a prompt.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from lorakit.serve.engine import Engine, Job, UnknownModel
from lorakit.serve.schemas import (
    BadRequest, ChatRequest, CompletionRequest, LoadAdapterRequest, UnloadAdapterRequest, chat_chunk, chat_response,
    completion_chunk, completion_response, error_body, model_list, new_id, usage,
)


def create_app(engine: Engine, default_max_tokens: int = 256):
    """The FastAPI application; it starts the engine's thread on startup and stops it on shutdown.
    `default_max_tokens`: a chat request's max_tokens when it gives none (completions: OpenAI's 16)."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

    @asynccontextmanager
    async def lifespan(_app):
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    app = FastAPI(title="lorakit serve", lifespan=lifespan)

    def error(status: int, message: str, kind: str, param: str | None = None) -> JSONResponse:
        return JSONResponse(error_body(message, kind, status, param), status_code=status)

    @app.exception_handler(RequestValidationError)
    async def malformed(_request: Request, exc: RequestValidationError):
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:]) or 'body'}: {e['msg']}" for e in exc.errors())
        return error(400, f"malformed request: {problems}", "invalid_request_error")

    @app.exception_handler(UnknownModel)
    async def unknown(_request: Request, exc: UnknownModel):
        return error(404, str(exc), "model_not_found", "model")

    @app.exception_handler(BadRequest)
    async def bad(_request: Request, exc: BadRequest):
        return error(400, str(exc), "invalid_request_error")

    @app.get("/v1/models")
    async def models():
        return model_list(engine.model_names(), engine.base_name)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest):
        body.check()
        engine.resolve(body.model)
        prompt = await asyncio.to_thread(_encode, engine.encode_chat, body.chat())
        job, events = _start(engine, prompt, body, default_max_tokens)
        rid = new_id("chatcmpl")
        if not body.stream:
            return await _collect(events, job, lambda text, done: chat_response(rid, body.model, text, done))

        async def chunks() -> AsyncIterator[str]:
            yield _sse(chat_chunk(rid, body.model, {"role": "assistant", "content": ""}))
            async for kind, value in _events(events, job):
                if kind == "text":
                    yield _sse(chat_chunk(rid, body.model, {"content": value}))
                elif kind == "done":
                    yield _sse(chat_chunk(rid, body.model, {}, value["finish_reason"]))
                    if body.include_usage:
                        yield _sse(chat_chunk(rid, body.model, None, usage_=usage(value)))
                else:
                    yield _sse(error_body(value, "server_error", 500))
            yield "data: [DONE]\n\n"

        return StreamingResponse(chunks(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def complete(body: CompletionRequest):
        body.check()
        engine.resolve(body.model)
        prompt = await asyncio.to_thread(_encode, engine.encode_text, body.text())
        job, events = _start(engine, prompt, body, 16)
        rid = new_id("cmpl")
        if not body.stream:
            return await _collect(events, job, lambda text, done: completion_response(rid, body.model, text, done))

        async def chunks() -> AsyncIterator[str]:
            async for kind, value in _events(events, job):
                if kind == "text":
                    yield _sse(completion_chunk(rid, body.model, value))
                elif kind == "done":
                    yield _sse(completion_chunk(rid, body.model, "", value["finish_reason"]))
                    if body.include_usage:
                        yield _sse(completion_chunk(rid, body.model, None, usage_=usage(value)))
                else:
                    yield _sse(error_body(value, "server_error", 500))
            yield "data: [DONE]\n\n"

        return StreamingResponse(chunks(), media_type="text/event-stream")

    @app.post("/v1/load_lora_adapter")
    async def load(body: LoadAdapterRequest):
        try:
            await asyncio.wrap_future(engine.load_adapter(body.lora_name, body.lora_path))
        except (ValueError, FileNotFoundError, RuntimeError, TypeError) as e:
            return error(400, f"cannot load adapter `{body.lora_name}` from {body.lora_path}: {e}",
                         "invalid_request_error", "lora_path")
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload(body: UnloadAdapterRequest):
        try:
            await asyncio.wrap_future(engine.unload_adapter(body.lora_name))
        except ValueError as e:
            return error(400, str(e), "invalid_request_error", "lora_name")
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    return app


def _encode(encode, value) -> list[int]:
    try:
        return encode(value)
    except BadRequest:
        raise
    except Exception as e:  # noqa: BLE001 - a template or tokenizer error is the request's problem
        raise BadRequest(f"cannot turn the request into tokens: {e}") from None


def _start(engine: Engine, prompt: list[int], body, default_max_tokens: int) -> tuple[Job, asyncio.Queue]:
    """Submit the request to the engine; its events arrive on the returned queue, in this event loop."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()

    def emit(kind: str, value) -> None:
        try:
            loop.call_soon_threadsafe(events.put_nowait, (kind, value))
        except RuntimeError:  # the event loop is gone (server shutting down): nobody is listening
            pass

    # no max_tokens given: the default, or what the context leaves if that is less
    params = body.sampling(max(1, min(default_max_tokens, engine.context - len(prompt))))
    job = Job(prompt, body.model, params, emit)
    try:
        engine.submit(job)
    except ValueError as e:
        raise BadRequest(str(e)) from None
    return job, events


async def _events(events: asyncio.Queue, job: Job) -> AsyncIterator[tuple[str, object]]:
    """The job's events up to and including "done" or "error"; the job is cancelled if the client goes away."""
    finished = False
    try:
        while True:
            kind, value = await events.get()
            finished = kind != "text"
            yield kind, value
            if finished:
                return
    finally:
        if not finished:
            job.cancelled = True


async def _collect(events: asyncio.Queue, job: Job, respond):
    from fastapi.responses import JSONResponse

    text = []
    async for kind, value in _events(events, job):
        if kind == "text":
            text.append(value)
        elif kind == "done":
            return respond("".join(text), value)
        else:
            return JSONResponse(error_body(value, "server_error", 500), status_code=500)
    raise AssertionError("the event stream ended without done or error")


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def serve(engine: Engine, host: str = "127.0.0.1", port: int = 8000, default_max_tokens: int = 256,
          log_level: str = "warning") -> None:
    """Serve until interrupted, on exactly `host` (default: this machine only). Port 0 picks a free port; the
    address is printed once the socket is bound."""
    try:
        import uvicorn
    except ImportError as e:
        raise ImportError("lorakit serve needs fastapi and uvicorn: pip install 'lorakit[serve]'") from e
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise RuntimeError(f"cannot listen on {host}:{port}: {e}; pick another --port (or 0 for a free one)") from None
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    print(f"lorakit serve: {', '.join(engine.model_names())} at http://{shown}:{bound}/v1", flush=True)
    server = uvicorn.Server(uvicorn.Config(create_app(engine, default_max_tokens), log_level=log_level))
    server.run(sockets=[sock])
