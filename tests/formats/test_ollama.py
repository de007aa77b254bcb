"""Ollama export: each supported chat format's TEMPLATE, run the way Ollama runs it, builds the same
prompt string as the model's Jinja chat template rendered by transformers; `lorakit export --format
ollama` writes the GGUF `--format gguf` writes plus a Modelfile Ollama's parser reads.

Ollama itself is not installed here. Its side is modelled from its source: the chat handler puts the
Modelfile's SYSTEM first when a conversation does not start with a system message and merges
consecutive messages of one role (server/routes.go, template/template.go `collate`); the TEMPLATE is
then a Go text/template over ``.Messages``, executed by `go_render` below (the subset lorakit writes)
and, where a Go toolchain is installed, by Go's own text/template.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import pytest

pytest.importorskip("transformers")

from lorakit.formats import ollama  # noqa: E402

# The chat templates as the models ship them (tokenizer_config.json "chat_template"), and their GGUF tokens.
SMOLLM2 = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
           "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
           "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
           "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
QWEN2 = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
         "You are a helpful assistant.<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
         "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
         "{{ '<|im_start|>assistant\n' }}{% endif %}")
LLAMA3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' "
          "+ message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 "
          "%}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")

FAMILIES = {  # name: (chat template, bos, eos, add_bos, format, default system prompt)
    "smollm2": (SMOLLM2, "<|im_start|>", "<|im_end|>", False, "ChatML",
                "You are a helpful AI assistant named SmolLM, trained by Hugging Face"),
    "qwen2": (QWEN2, "", "<|im_end|>", False, "ChatML", "You are a helpful assistant."),
    "llama3": (LLAMA3, "<|begin_of_text|>", "<|end_of_text|>", True, "Llama 3", None),
}

CONVERSATIONS = {
    "user": [{"role": "user", "content": "What does textwrap.dedent do?"}],
    "system-user": [{"role": "system", "content": "Answer in one sentence."},
                    {"role": "user", "content": "What does textwrap.dedent do?"}],
    "user-assistant-user": [{"role": "user", "content": "Hello, how are you?"},
                            {"role": "assistant", "content": "Fine, thanks.\nAnd you?"},
                            {"role": "user", "content": "Name a {curly} stdlib module."}],
    "system-user-assistant-user": [{"role": "system", "content": "You are terse."},
                                   {"role": "user", "content": "Hi."},
                                   {"role": "assistant", "content": "Hi."},
                                   {"role": "user", "content": "Bye."}],
}


def jinja_prompt(chat_template: str, messages: list[dict], bos: str, eos: str) -> str:
    """The prompt as training built it: transformers' chat template rendering, with the generation prompt."""
    from transformers.utils.chat_template_utils import render_jinja_template

    rendered, _ = render_jinja_template([messages], chat_template=chat_template, add_generation_prompt=True,
                                        bos_token=bos, eos_token=eos)
    return rendered[0]


def ollama_values(messages: list[dict], system: str | None) -> dict:
    """What Ollama's chat handler gives the TEMPLATE: SYSTEM first unless the chat starts with a system
    message, consecutive same-role messages joined by a blank line, all system contents as .System."""
    if system is not None and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system}, *messages]
    collated = []
    for m in messages:
        if collated and collated[-1]["Role"] == m["role"]:
            collated[-1]["Content"] += "\n\n" + m["content"]
        else:
            collated.append({"Role": m["role"], "Content": m["content"]})
    return {"System": "\n\n".join(m["content"] for m in messages if m["role"] == "system"), "Messages": collated}


_ACTION = re.compile(r"\{\{(- )?\s*(.*?)\s*( -)?\}\}", re.S)
_GO_SPACE = " \t\r\n"


def go_render(template: str, values: dict) -> str:
    """Go text/template for the subset lorakit writes: text, ``{{ .Field }}``, ``{{ range .Field }} ...
    {{ end }}``, and ``{{- `` / `` -}}`` trimming the white space before / after an action."""
    root: list = []
    stack, pos, trim_next = [root], 0, False
    for m in _ACTION.finditer(template):
        text = template[pos:m.start()]
        text = text.lstrip(_GO_SPACE) if trim_next else text
        stack[-1].append(text.rstrip(_GO_SPACE) if m.group(1) else text)
        action, trim_next, pos = m.group(2), bool(m.group(3)), m.end()
        if action == "end":
            stack.pop()
        elif action.startswith("range "):
            body: list = []
            stack[-1].append(("range", _field(action.removeprefix("range ")), body))
            stack.append(body)
        else:
            stack[-1].append(("field", _field(action)))
    assert len(stack) == 1, f"unclosed range in {template!r}"
    tail = template[pos:]
    root.append(tail.lstrip(_GO_SPACE) if trim_next else tail)
    return _run(root, values)


def _field(expr: str) -> str:
    assert re.fullmatch(r"\.[A-Za-z]\w*", expr), f"not in the subset: {expr!r}"
    return expr[1:]


def _run(nodes: list, dot: dict) -> str:
    out = []
    for node in nodes:
        if isinstance(node, str):
            out.append(node)
        elif node[0] == "field":
            out.append(str(dot[node[1]]))
        else:  # ("range", field, body): the body once per element, with the element as dot
            out += [_run(node[2], item) for item in dot[node[1]]]
    return "".join(out)


def ollama_prompt(chat: ollama.OllamaChat, messages: list[dict], bos: str, add_bos: bool) -> str:
    """The prompt llama.cpp sees under Ollama: BOS (when the GGUF adds it), then the TEMPLATE's output."""
    return (bos if add_bos else "") + go_render(chat.format.template, ollama_values(messages, chat.system))


@pytest.mark.parametrize("family", FAMILIES)
def test_translation_builds_the_training_prompt(family):
    chat_template, bos, eos, add_bos, fmt, system = FAMILIES[family]
    chat = ollama.translate(chat_template, bos_token=bos, eos_token=eos, add_bos=add_bos)
    assert chat.format.name == fmt and chat.system == system
    assert chat.stop[:len(chat.format.stop)] == chat.format.stop and eos in chat.stop
    for name, messages in CONVERSATIONS.items():
        assert ollama_prompt(chat, messages, bos, add_bos) == jinja_prompt(chat_template, messages, bos, eos), name


@pytest.mark.slow
def test_embedded_model_template():
    """The chat template the embedded SmolLM2 GGUF carries is the one tested above."""
    from lorakit.formats.gguf_load import field_value, read_gguf
    from lorakit.models.default import default_gguf_path

    try:
        reader = read_gguf(default_gguf_path())
    except ModuleNotFoundError as e:
        pytest.skip(str(e))
    assert field_value(reader, "tokenizer.chat_template") == SMOLLM2


def test_ollama_templates_in_go(tmp_path):
    """go_render agrees with Go's own text/template on every format and conversation."""
    go = shutil.which("go")
    if go is None:
        pytest.skip("no Go toolchain (apt-get install golang-go) to run text/template")
    program = """package main

import (
	"encoding/json"
	"os"
	"strings"
	"text/template"
)

func main() {
	var cases []struct {
		Template string
		Values   map[string]any
	}
	if err := json.NewDecoder(os.Stdin).Decode(&cases); err != nil {
		panic(err)
	}
	var out []string
	for _, c := range cases {
		var b strings.Builder
		t := template.Must(template.New("").Option("missingkey=zero").Parse(c.Template))
		if err := t.Execute(&b, c.Values); err != nil {
			panic(err)
		}
		out = append(out, b.String())
	}
	json.NewEncoder(os.Stdout).Encode(out)
}
"""
    cases, expected = [], []
    for chat_template, bos, eos, add_bos, _, _ in FAMILIES.values():
        chat = ollama.translate(chat_template, bos_token=bos, eos_token=eos, add_bos=add_bos)
        for messages in CONVERSATIONS.values():
            values = ollama_values(messages, chat.system)
            cases.append({"Template": chat.format.template, "Values": values})
            expected.append(go_render(chat.format.template, values))
    (tmp_path / "render.go").write_text(program)
    done = subprocess.run([go, "run", str(tmp_path / "render.go")], input=json.dumps(cases), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == expected


@pytest.mark.parametrize("template, found", [
    ("{{ bos_token }}{% for m in messages %}{{ '<start_of_turn>' + m['role'] + '\n' + m['content'] + "
     "'<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}",
     "<end_of_turn>, <start_of_turn>"),  # Gemma
    ("{% for m in messages %}{{ m['content'] }}{% endfor %}", "no special-token markers"),
])
def test_unknown_format_is_an_error(template, found):
    with pytest.raises(ValueError) as e:
        ollama.translate(template)
    assert found in str(e.value) and "--format gguf" in str(e.value) and "ChatML (<|im_start|>" in str(e.value)


def test_marker_with_another_layout_is_an_error():
    """Llama 3.1 writes a date header into every system turn: <|start_header_id|>, but not Llama 3's prompt."""
    llama31 = LLAMA3.replace("'<|end_header_id|>\n\n'+ message['content']",
                             "'<|end_header_id|>\n\n' + ('Today Date: 26 Jul 2024\n\n' if message['role'] == 'system' "
                             "else '') + message['content']")
    assert llama31 != LLAMA3
    with pytest.raises(ValueError, match=r"uses <\|start_header_id\|> \(Llama 3\) but renders a system\+user .*"
                                         r"Today Date.*--format gguf"):
        ollama.translate(llama31, bos_token="<|begin_of_text|>", add_bos=True)
    with pytest.raises(ValueError, match=r"renders a user conversation as '<\|begin_of_text\|><\|start_header_id\|>"):
        ollama.translate(LLAMA3, bos_token="<|begin_of_text|>", add_bos=False)  # llama.cpp would not add the BOS


_MF_SKIP = re.compile(r"(?:\s+|#[^\n]*)*")  # white space and comments between instructions
_MF_WORD = re.compile(r"([A-Za-z_]+)[ \t]+")
_MF_VALUE = re.compile(r'"""(.*?)"""|"([^"\n]*)"|([^\n]*)', re.S)


def parse_modelfile(text: str) -> list[tuple[str, str]]:
    """(instruction, value) pairs read as Ollama's parser reads them: '#' comments, PARAMETER NAME VALUE,
    a value \"\"\"over lines\"\"\", "quoted", or bare to the end of the line."""
    commands, pos = [], 0
    while (pos := _MF_SKIP.match(text, pos).end()) < len(text):
        m = _MF_WORD.match(text, pos)
        assert m, f"not an instruction: {text[pos:pos + 40]!r}"
        name, pos = m.group(1).upper(), m.end()
        if name == "PARAMETER":
            m = _MF_WORD.match(text, pos)
            name, pos = m.group(1), m.end()
        m = _MF_VALUE.match(text, pos)
        commands.append((name, next(g for g in m.groups() if g is not None)))
        pos = m.end()
    return commands


def test_modelfile_text():
    chat = ollama.translate(SMOLLM2, bos_token="<|im_start|>", eos_token="<|im_end|>")
    commands = parse_modelfile(ollama.modelfile("model.gguf", chat))
    assert commands == [("FROM", "./model.gguf"), ("TEMPLATE", chat.format.template),
                        ("SYSTEM", FAMILIES["smollm2"][5]), ("stop", "<|im_start|>"), ("stop", "<|im_end|>")]
    llama = ollama.translate(LLAMA3, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", add_bos=True)
    assert [c for c in parse_modelfile(ollama.modelfile("x.gguf", llama)) if c[0] in ("SYSTEM", "stop")] == \
        [("stop", "<|start_header_id|>"), ("stop", "<|end_header_id|>"), ("stop", "<|eot_id|>")]


def test_export_ollama_cli(tmp_path, capsys):
    """`lorakit export --format ollama`: the GGUF --format gguf writes, byte for byte, and its Modelfile."""
    pytest.importorskip("gguf")
    import lorakit
    from lorakit.cli import main
    from tests.formats.gguf_files import write_llama_gguf
    from tests.tiny_models import tiny_llama

    tokens = ["<unk>", "<|im_start|>", "<|im_end|>"]
    chat_keys = {"tokenizer.ggml.tokens": tokens, "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
                 "tokenizer.ggml.add_bos_token": False, "tokenizer.chat_template": SMOLLM2}
    src = write_llama_gguf(tmp_path / "base.gguf", tiny_llama(), "Q4_1", metadata=chat_keys)
    model, _ = lorakit.load_gguf(src, tokenizer=False)
    lorakit.inject_adapters(model, lorakit.LoraConfig(r=4, alpha=8, target_modules=["v_proj"], group_size=32))
    for p in model.parameters():
        if p.requires_grad:
            p.data.normal_(0, 0.5)
    lorakit.save_adapter(model, tmp_path / "adapter")

    export = ["export", "--adapter", str(tmp_path / "adapter"), "--format"]
    assert main([*export, "gguf", "--base", str(src), "--out", str(tmp_path / "ft.gguf")]) == 0
    done = subprocess.run([sys.executable, "-m", "lorakit", *export, "ollama", "--base", str(src), "--out",
                           str(tmp_path / "ollama")], capture_output=True, text=True)  # as the user runs it
    assert done.returncode == 0, done.stderr
    assert "offsets moved" in done.stdout and "ollama create NAME -f" in done.stdout
    assert (tmp_path / "ollama" / "model.gguf").read_bytes() == (tmp_path / "ft.gguf").read_bytes()
    commands = dict(parse_modelfile((tmp_path / "ollama" / "Modelfile").read_text()))
    assert (tmp_path / "ollama" / commands["FROM"]).resolve() == (tmp_path / "ollama" / "model.gguf").resolve()
    assert commands["TEMPLATE"].startswith("{{- range .Messages }}<|im_start|>{{ .Role }}")
    assert commands["SYSTEM"] == FAMILIES["smollm2"][5] and commands["stop"] == "<|im_end|>"

    unknown = write_llama_gguf(tmp_path / "gemma-ish.gguf", tiny_llama(), "Q4_1",
                               metadata={"tokenizer.chat_template": "{{ '<start_of_turn>' }}"})
    capsys.readouterr()
    assert main([*export, "ollama", "--base", str(unknown), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "but no Modelfile: the chat template is not one lorakit translates for Ollama: it uses <start_of_turn>" in err
    assert "--format gguf" in err
    assert main([*export, "ollama", "--base", str(src), "--out", str(tmp_path / "ft.gguf")]) == 2
    assert "is a file: give a directory" in capsys.readouterr().err
