"""An Ollama Modelfile for an exported GGUF: its chat template translated from Jinja to Go templates.

Ollama runs a GGUF through a Modelfile (``FROM ./model.gguf``) whose ``TEMPLATE`` is a Go template
over the conversation, not the Jinja ``tokenizer.chat_template`` the file carries. A fine-tuned model
only answers as trained if Ollama builds the very prompt string the chat template built in training,
so the translation is checked, not guessed: the format is recognised by a marker token (table below),
then the GGUF's Jinja template is rendered (as transformers renders it) on probe conversations, and
every rendering must equal the format's turns exactly. Anything else is an error.

    format    marker                 one message (role, content)                          generation prompt
    ChatML    <|im_start|>           <|im_start|>{role}\\n{content}<|im_end|>\\n            <|im_start|>assistant\\n
    Llama 3   <|start_header_id|>    <|start_header_id|>{role}<|end_header_id|>\\n\\n      <|start_header_id|>assistant
                                     {content}<|eot_id|>                                  <|end_header_id|>\\n\\n

ChatML covers SmolLM2 and Qwen2; Llama 3 covers Llama 3 Instruct (Llama 3.1 and later write a date
header into the system turn: no match, so an error). Each TEMPLATE is
Ollama's own for the format (``template/chatml.gotmpl``, ``llama3-instruct.gotmpl`` in its source), and
the stop tokens are Ollama's (``chatml.json``, ``llama3-instruct.json``) plus the file's EOS token.

A default system prompt (SmolLM2's "You are a helpful AI assistant named SmolLM...", Qwen2's "You are a
helpful assistant.") is the system turn the Jinja template writes before a conversation that has none.
It becomes ``SYSTEM``, which Ollama puts first exactly then (when the first message is not a system
message), so the Go template itself only walks ``.Messages``. A BOS token the Jinja template writes
first is left to llama.cpp, which prepends it when ``tokenizer.ggml.add_bos_token`` is true (Llama 3).
Known difference, the same as with Ollama's own templates: Llama 3's Jinja template strips whitespace
around each message, Ollama's does not.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from lorakit.formats.gguf_load import field_value, read_gguf
from lorakit.io import write_text

GGUF_FILE = "model.gguf"  # the GGUF's name inside the Ollama directory
MODELFILE = "Modelfile"


@dataclass(frozen=True)
class ChatFormat:
    name: str
    models: str
    marker: str            # a token only this format's Jinja templates write
    turn: str              # one message as the Jinja template writes it, with {role} and {content}
    generation: str        # what add_generation_prompt appends
    template: str          # the Ollama TEMPLATE building the same string from .Messages
    stop: tuple[str, ...]  # Ollama's stop parameters for the format

    def prompt(self, messages: list[dict], system: str | None) -> str:
        """The prompt Ollama builds for `messages` with this TEMPLATE and Modelfile SYSTEM `system`."""
        if system is not None and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": system}, *messages]
        return "".join(self.turn.format(**m) for m in messages) + self.generation


FORMATS = (
    ChatFormat("ChatML", "SmolLM2, Qwen2", "<|im_start|>", "<|im_start|>{role}\n{content}<|im_end|>\n",
               "<|im_start|>assistant\n",
               "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n"
               "{{ end }}<|im_start|>assistant\n",
               ("<|im_start|>", "<|im_end|>")),
    ChatFormat("Llama 3", "Llama 3 Instruct", "<|start_header_id|>",
               "<|start_header_id|>{role}<|end_header_id|>\n\n{content}<|eot_id|>",
               "<|start_header_id|>assistant<|end_header_id|>\n\n",
               "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>\n"
               "{{- end }}<|start_header_id|>assistant<|end_header_id|>\n\n",
               ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")),
)

# Conversations that pin a format down: the default system prompt (user only), a given system prompt, turns.
PROBES = (
    [{"role": "user", "content": "Hi."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi."}],
    [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello!"},
     {"role": "user", "content": "2+2?"}],
)

# What the "not supported" error names as found: special-token-like markers of the common chat formats.
_MARKER = re.compile(r"<\|?[A-Za-z_][\w.-]*\|?>|\[/?INST\]")


@dataclass(frozen=True)
class OllamaChat:
    format: ChatFormat
    system: str | None    # the default system prompt (SYSTEM), or None
    stop: tuple[str, ...]


def translate(chat_template: str, *, bos_token: str = "", eos_token: str = "", add_bos: bool = False) -> OllamaChat:
    """The Ollama format, default system prompt and stop tokens equivalent to a Jinja `chat_template`.
    `add_bos`: llama.cpp prepends `bos_token` to the prompt (``tokenizer.ggml.add_bos_token``)."""
    fmt = next((f for f in FORMATS if f.marker in chat_template), None)
    if fmt is None:
        found = ", ".join(sorted(set(_MARKER.findall(chat_template)))) or "no special-token markers"
        raise ValueError(f"the chat template is not one lorakit translates for Ollama: it uses {found}; supported: "
                         f"{_supported()}. Export with --format gguf and write the Modelfile's TEMPLATE by hand")
    first = bos_token if add_bos else ""
    renderings = [_render(chat_template, conv, bos_token, eos_token) for conv in PROBES]
    system = _default_system(fmt, renderings[0].removeprefix(first))
    for conv, got in zip(PROBES, renderings):
        want = first + fmt.prompt(conv, system)
        if got != want:
            roles = "+".join(m["role"] for m in conv)
            raise ValueError(f"the chat template uses {fmt.marker} ({fmt.name}) but renders a {roles} conversation as "
                             f"{got!r}, where {fmt.name} with the default system prompt {system!r} gives {want!r}; "
                             f"lorakit does not guess an Ollama template for it. Export with --format gguf and write "
                             f"the Modelfile's TEMPLATE by hand (supported: {_supported()})")
    stop = fmt.stop + ((eos_token,) if eos_token and eos_token not in fmt.stop else ())
    return OllamaChat(fmt, system, stop)


def modelfile(gguf_name: str, chat: OllamaChat) -> str:
    """The Modelfile text: FROM ./`gguf_name`, TEMPLATE, SYSTEM (when the format has one), PARAMETER stop."""
    for what, text in (("TEMPLATE", chat.format.template), ("SYSTEM", chat.system or "")):
        if '"""' in text:
            raise ValueError(f'the {what} {text!r} contains """, which a Modelfile cannot quote; write it by hand')
    lines = [f"# Ollama Modelfile written by lorakit ({chat.format.name} chat template). Use:",
             "#   ollama create NAME -f Modelfile && ollama run NAME",
             f"FROM ./{gguf_name}",
             f'TEMPLATE """{chat.format.template}"""']
    if chat.system is not None:
        lines.append(f'SYSTEM """{chat.system}"""')
    lines += [f'PARAMETER stop "{token}"' for token in chat.stop]
    return "\n".join(lines) + "\n"


def write_modelfile(gguf_path: str | os.PathLike) -> Path:
    """Write a Modelfile beside `gguf_path` for its chat template (GGUF metadata); returns its path."""
    gguf_path = Path(gguf_path)
    reader = read_gguf(gguf_path)
    chat_template = field_value(reader, "tokenizer.chat_template")
    if not chat_template:
        raise ValueError(f"{gguf_path} has no chat template (tokenizer.chat_template) to translate for Ollama; "
                         f"write the Modelfile by hand, or export with --format gguf")
    tokens = field_value(reader, "tokenizer.ggml.tokens", [])

    def token(key: str) -> str:
        i = field_value(reader, key)
        return tokens[i] if i is not None and i < len(tokens) else ""

    chat = translate(chat_template, bos_token=token("tokenizer.ggml.bos_token_id"),
                     eos_token=token("tokenizer.ggml.eos_token_id"),
                     add_bos=bool(field_value(reader, "tokenizer.ggml.add_bos_token", False)))
    return write_text(gguf_path.parent / MODELFILE, modelfile(gguf_path.name, chat))


def _render(chat_template: str, messages: list[dict], bos_token: str, eos_token: str) -> str:
    try:
        from transformers.utils.chat_template_utils import render_jinja_template
    except ImportError as e:
        raise ImportError("translating a chat template for Ollama renders it with transformers: "
                          "pip install 'lorakit[hf]'") from e
    try:
        rendered, _ = render_jinja_template([messages], chat_template=chat_template, add_generation_prompt=True,
                                            bos_token=bos_token, eos_token=eos_token)
    except Exception as e:  # noqa: BLE001 - Jinja syntax errors, raise_exception(...) in the template, ...
        roles = "+".join(m["role"] for m in messages)
        raise ValueError(f"the chat template cannot render a {roles} conversation ({type(e).__name__}: {e}); "
                         f"export with --format gguf and write the Modelfile by hand") from None
    return rendered[0]


def _default_system(fmt: ChatFormat, user_only: str) -> str | None:
    """The system prompt the template writes before a user-only conversation (PROBES[0]), or None."""
    body = fmt.prompt(PROBES[0], None)
    head = user_only[: -len(body)] if user_only.endswith(body) else ""
    before, _, after = fmt.turn.partition("{content}")
    before = before.format(role="system")
    if len(head) >= len(before) + len(after) and head.startswith(before) and head.endswith(after):
        return head[len(before): len(head) - len(after)]
    return None


def _supported() -> str:
    return ", ".join(f"{f.name} ({f.marker}: {f.models})" for f in FORMATS)
