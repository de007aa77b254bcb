"""The serving engine: one base model, named adapters, and a thread that decodes every request as one batch.

    engine = Engine(model, tokenizer, "SmolLM2-135M-Instruct")
    engine.load_adapter("sql", "runs/sql/adapter").result()          # a model name from now on
    job = Job(engine.encode_chat(messages), "sql", SamplingParams(max_tokens=64), emit)
    engine.submit(job)                                               # emit(kind, value) is called from the engine thread

The engine thread repeats: take new requests and adapter commands from its inbox; prefill the waiting
requests (as many as `max_batch` allows) into the running `Batch`; decode one token for every running
row; send each row its new text; drop finished and cancelled rows. Rows of different adapters share
every step (`lorakit.adapters.mixed`). Only this thread touches the model, so loading and unloading
adapters run there too, between two steps. An unloaded adapter's name disappears at once; its
weights go when its last running row ends.

emit(kind, value): ("text", str) a piece of the answer; ("done", {"finish_reason", "prompt_tokens",
"completion_tokens"}); ("error", str) the request failed.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import queue
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from lorakit.serve.batch import Batch
from lorakit.serve.sampling import SamplingParams, cut_at_stop, next_token, stable_prefix


class UnknownModel(LookupError):
    def __init__(self, name: str, available: list[str]) -> None:
        super().__init__(f"The model `{name}` does not exist. Available models: {', '.join(available)}")


@dataclass(eq=False)
class Job:
    """One request: its prompt token ids, model name, sampling, and where its output goes."""

    prompt: list[int]
    model: str
    params: SamplingParams
    emit: Callable[[str, object], None]
    adapter: str | None = None  # the engine's internal adapter name (None: the base), set by submit
    generated: list[int] = field(default_factory=list)
    sent: str = ""  # text already emitted
    cancelled: bool = False  # set by the client side (disconnect): the row is dropped at the next step
    generator: torch.Generator | None = None


class Engine:
    def __init__(self, model: nn.Module, tokenizer, base_name: str, *, max_batch: int = 16,
                 prefill_tokens: int = 4096) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch={max_batch} must be at least 1")
        self.model, self.tokenizer, self.base_name = model.eval(), tokenizer, base_name
        self.max_batch, self.prefill_tokens = max_batch, prefill_tokens
        self.context = int(getattr(model.config, "max_position_embeddings", 0) or tokenizer.model_max_length)
        ids = [tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)]
        self.eos = {int(i) for x in ids if x is not None for i in (x if isinstance(x, (list, tuple)) else [x])}
        self.models: dict[str, str | None] = {base_name: None}  # public model name -> internal adapter name
        self.retiring: set[str] = set()  # internal names unloaded while rows still use them
        self._counter = itertools.count(1)
        self._inbox: queue.Queue = queue.Queue()
        self._waiting: list[Job] = []
        self._running: list[Job] = []
        self._batch = Batch(model)
        self._thread: threading.Thread | None = None

    # -- requests (any thread) ------------------------------------------------------------------
    def model_names(self) -> list[str]:
        return list(self.models)

    def resolve(self, name: str) -> str | None:
        """The internal adapter name for model `name` (None: the base); UnknownModel if there is none."""
        if name not in self.models:
            raise UnknownModel(name, self.model_names())
        return self.models[name]

    def encode_chat(self, messages: list[dict]) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(f"{self.base_name} has no chat template; use /v1/completions with a plain prompt")
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def encode_text(self, prompt: str) -> list[int]:
        return self.tokenizer(prompt).input_ids

    def check_length(self, prompt_tokens: int, max_tokens: int) -> None:
        if prompt_tokens + max_tokens > self.context:
            raise ValueError(f"This model's maximum context length is {self.context} tokens. However, you requested "
                             f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the prompt, {max_tokens} for the "
                             f"completion). Please reduce the length of the prompt or max_tokens.")

    def submit(self, job: Job) -> None:
        job.adapter = self.resolve(job.model)
        self.check_length(len(job.prompt), job.params.max_tokens)
        job.generator = job.params.generator()
        self._inbox.put(("job", job))

    def load_adapter(self, name: str, directory: str | Path) -> concurrent.futures.Future:
        """Load the PEFT adapter directory as model `name` (between two decode steps)."""
        return self._call(lambda: self._load(name, Path(directory)))

    def unload_adapter(self, name: str) -> concurrent.futures.Future:
        return self._call(lambda: self._unload(name))

    def _call(self, fn: Callable[[], object]) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        if self._thread is None:  # not started: run here (loading the adapters given at start-up)
            try:
                future.set_result(fn())
            except Exception as e:  # noqa: BLE001 - handed to the caller through the future
                future.set_exception(e)
        else:
            self._inbox.put(("call", fn, future))
        return future

    # -- the engine thread --------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="lorakit-serve-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._inbox.put(("stop",))
            self._thread.join()
            self._thread = None

    def _loop(self) -> None:
        from lorakit.quant.linear import dequantize_once

        with torch.no_grad(), dequantize_once():
            while self._drain(block=not self._running and not self._waiting):
                try:
                    self._admit()
                    if self._running:
                        self._decode()
                except Exception as e:  # noqa: BLE001 - a failed step fails its requests, not the server
                    traceback.print_exc()
                    for job in self._running:
                        job.emit("error", f"generation failed: {type(e).__name__}: {e}")
                    self._running = []
                    self._batch.keep([])
                self._retire()

    def _drain(self, block: bool) -> bool:
        """Move the inbox into the waiting list and run commands; False when asked to stop."""
        while True:
            try:
                item = self._inbox.get(block=block)
            except queue.Empty:
                return True
            block = False
            if item[0] == "stop":
                return False
            if item[0] == "job":
                self._waiting.append(item[1])
                continue
            _, fn, future = item
            try:
                future.set_result(fn())
            except Exception as e:  # noqa: BLE001 - handed to the caller through the future
                future.set_exception(e)

    def _admit(self) -> None:
        joining, budget = [], self.prefill_tokens
        while self._waiting and len(self._running) + len(joining) < self.max_batch:
            job = self._waiting[0]
            if joining and len(job.prompt) > budget:
                break  # a long prompt waits for the next step rather than stall everyone's next token
            self._waiting.pop(0)
            if job.cancelled:
                continue
            if job.adapter is not None and (job.adapter in self.retiring or job.adapter not in self.models.values()):
                job.emit("error", f"the model `{job.model}` was unloaded before this request started")
                continue
            joining.append(job)
            budget -= len(job.prompt)
        if not joining:
            return
        logits = self._batch.join([job.prompt for job in joining], [job.adapter for job in joining])
        self._running += joining
        offset = len(self._running) - len(joining)
        self._advance_rows(logits, range(offset, len(self._running)))

    def _decode(self) -> None:
        live = [i for i, job in enumerate(self._running) if not job.cancelled]
        if len(live) < len(self._running):
            self._keep(live)
            if not self._running:
                return
        logits = self._batch.step([job.generated[-1] for job in self._running])
        self._advance_rows(logits, range(len(self._running)))

    def _advance_rows(self, logits: torch.Tensor, rows: range) -> None:
        """Sample one token for each of `rows` (logits row k belongs to rows[k]); drop the rows that finished."""
        finished = set()
        for k, i in enumerate(rows):
            job = self._running[i]
            if not self._advance(job, next_token(logits[k], job.params, job.generator)):
                finished.add(i)
        if finished:
            self._keep([i for i in range(len(self._running)) if i not in finished])

    def _keep(self, rows: list[int]) -> None:
        self._running = [self._running[i] for i in rows]
        self._batch.keep(rows)

    def _advance(self, job: Job, token: int) -> bool:
        """Add `token` to the job and send its new text; False when the job is finished."""
        params = job.params
        if token in self.eos:
            return self._finish(job, "stop", self._text(job.generated))
        job.generated.append(token)
        text, stopped = cut_at_stop(self._text(job.generated), params.stop)
        if stopped:
            return self._finish(job, "stop", text)
        if len(job.generated) >= params.max_tokens:
            return self._finish(job, "length", text)
        self._send(job, stable_prefix(text, params.stop))
        return True

    def _text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _send(self, job: Job, text: str) -> None:
        if len(text) > len(job.sent) and text.startswith(job.sent):
            job.emit("text", text[len(job.sent):])
            job.sent = text

    def _finish(self, job: Job, reason: str, text: str) -> bool:
        self._send(job, text)
        job.emit("done", {"finish_reason": reason, "prompt_tokens": len(job.prompt),
                          "completion_tokens": len(job.generated)})
        return False

    # -- adapters (engine thread, between steps) -------------------------------------------------
    def _load(self, name: str, directory: Path) -> str:
        from lorakit.formats.peft import load_adapter

        if name in self.models:
            raise ValueError(f"a model named `{name}` is already being served; unload it first or pick another name")
        check_servable(directory)
        internal = f"adapter_{next(self._counter)}"
        load_adapter(self.model, directory, name=internal)
        self.models[name] = internal
        return name

    def _unload(self, name: str) -> str:
        if name == self.base_name:
            raise ValueError(f"`{name}` is the base model, which cannot be unloaded")
        internal = self.resolve(name)
        del self.models[name]
        self.retiring.add(internal)
        self._retire()
        return name

    def _retire(self) -> None:
        import lorakit

        in_use = {job.adapter for job in self._running}
        for internal in [a for a in self.retiring if a not in in_use]:
            lorakit.delete_adapter(self.model, internal)
            self.retiring.discard(internal)


def check_servable(directory: Path) -> None:
    """Refuse an adapter that would change what the other models compute: one that trains base biases
    (bias="lora_only") or carries base weights (PEFT's saved embedding layers)."""
    from safetensors import safe_open

    from lorakit.formats.peft import BASE_WEIGHT_SUFFIX, CONFIG_FILE, WEIGHTS_FILE, read_peft_config
    from lorakit.io import check_safetensors

    if not (directory / CONFIG_FILE).is_file() or not (directory / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f"{directory} is not an adapter directory: it needs {CONFIG_FILE} and {WEIGHTS_FILE} "
                                f"(lorakit never loads pickled adapter_model.bin files)")
    config, _ = read_peft_config(directory)
    if config.bias != "none":
        raise ValueError(f"{directory}: bias={config.bias!r} changes the base's biases, which every served model "
                         f"shares; serve it merged (lorakit merge) as a base of its own")
    check_safetensors(directory / WEIGHTS_FILE, "adapter weights")
    with safe_open(str(directory / WEIGHTS_FILE), framework="pt") as f:
        replaced = [k for k in f.keys() if k.endswith(BASE_WEIGHT_SUFFIX)]
    if replaced:
        raise ValueError(f"{directory} replaces base weights ({replaced[0]} ...), which every served model shares; "
                         f"serve it merged (lorakit merge) as a base of its own")
