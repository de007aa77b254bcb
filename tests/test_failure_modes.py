"""Every failure mode in docs/failure_modes.md, tried: the table there is checked against what users see.

Each row of the table names a case and an excerpt of the message. A case marked `here` is produced below
through the CLI (in-process, as `lorakit ...` runs it) and must exit with status 2 and print the excerpt
on one `lorakit <command>: error:` line, with no traceback. A case marked `file.py::test_name` is tested
there (it needs torchrun, a SIGKILL or a poisoned loss); this test checks that test exists.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from lorakit.cli import main  # noqa: E402
from train_fixtures import tiny_assets, tiny_run_overrides  # noqa: E402

DOC = Path(__file__).parents[1] / "docs" / "failure_modes.md"
ROW = re.compile(r"^\| `(?P<id>[a-z0-9-]+)` \|(?P<what>[^|]+)\|(?P<says>[^|]+)\| (?P<where>[^|]+?) \|$")


def doc_rows() -> list[dict]:
    rows = [m.groupdict() for line in DOC.read_text().splitlines() if (m := ROW.match(line))]
    assert rows, f"no failure-mode rows found in {DOC}"
    return rows


def excerpt(says: str) -> str:
    found = re.search(r"`([^`]+)`", says)
    assert found, f"the 'what you see' cell needs a `quoted` excerpt: {says}"
    return found.group(1)


def cli(*args: str) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main([str(a) for a in args])
    return code, err.getvalue()


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    model, data = tiny_assets(tmp_path_factory, "failures")
    d = model.parent
    run = d / "run"
    code, err = cli("train", *tiny_run_overrides(model, data, run, steps=2), "train.save_every=1", "--quiet")
    assert code == 0, err
    return {"dir": d, "model": model, "data": data, "run": run}


def base(ctx, out: str, *extra: str) -> list[str]:
    return ["train", *tiny_run_overrides(ctx["model"], ctx["data"], ctx["dir"] / out, steps=1), *extra, "--quiet"]


def copy_run(ctx, name: str) -> Path:
    target = ctx["dir"] / name
    shutil.copytree(ctx["run"], target)
    return target


def write(ctx, name: str, content: str | bytes) -> Path:
    path = ctx["dir"] / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def tiny_gguf(ctx) -> Path:
    path = ctx["dir"] / "tiny.Q4_1.gguf"
    if not path.exists():
        import transformers

        from formats.gguf_files import write_llama_gguf

        write_llama_gguf(path, transformers.AutoModelForCausalLM.from_pretrained(ctx["model"]))
    return path


def other_model(ctx) -> Path:
    import transformers

    target = ctx["dir"] / "other"
    if not target.exists():
        config = transformers.LlamaConfig.from_pretrained(ctx["model"])
        config.hidden_size, config.intermediate_size = 32, 64
        transformers.LlamaForCausalLM(config).save_pretrained(target)
        transformers.AutoTokenizer.from_pretrained(ctx["model"]).save_pretrained(target)
    return target


def edit_adapter_config(run: Path, **fields) -> None:
    path = run / "adapter" / "adapter_config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | fields))


def truncate(path: Path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


# --- the cases: each returns (exit status, stderr) --------------------------------------------------

def case_unknown_key(ctx):
    return cli(*base(ctx, "c", "adapter.rank=8"))


def case_wrong_type(ctx):
    return cli(*base(ctx, "c", "train.lr=fast"))


def case_r_not_positive(ctx):
    return cli(*base(ctx, "c", "adapter.r=0"))


def case_bad_yaml(ctx):
    return cli("train", write(ctx, "bad.yaml", "model: [1, 2\n"))


def case_yaml_code(ctx):
    return cli("train", write(ctx, "evil.yaml", 'x: !!python/object/apply:os.system ["echo owned"]\n'))


def case_group_size_not_dividing(ctx):
    return cli(*base(ctx, "c", "method=qalora", "adapter.group_size=48"))


def case_gguf_group_size(ctx):
    from lorakit.models.default import default_gguf_path

    return cli(*base(ctx, "c", f"model.path={default_gguf_path()}", "method=qalora", "adapter.group_size=48"))


def case_gguf_no_tokenizer(ctx):
    return cli(*base(ctx, "c", f"model.path={tiny_gguf(ctx)}"))


def case_targets_match_nothing(ctx):
    return cli(*base(ctx, "c", "adapter.target_modules=attention_only"))


def case_data_missing(ctx):
    return cli(*base(ctx, "c", f"data.train={ctx['dir'] / 'nowhere.jsonl'}"))


def case_data_row_shape(ctx):
    rows = '{"instruction": "a", "output": "b"}\n{"text": "only text"}\n'
    return cli(*base(ctx, "c", f"data.train={write(ctx, 'mixed.jsonl', rows)}"))


def case_data_corrupt_parquet(ctx):
    return cli(*base(ctx, "c", f"data.train={write(ctx, 'bad.parquet', b'PAR1 not really')}"))


def case_data_all_truncated(ctx):
    return cli(*base(ctx, "c", "data.max_tokens=4"))


def case_chat_without_template(ctx):
    model = ctx["dir"] / "no-template"
    if not model.exists():
        shutil.copytree(ctx["model"], model)
        (model / "chat_template.jinja").unlink(missing_ok=True)
        config = json.loads((model / "tokenizer_config.json").read_text())
        config.pop("chat_template", None)
        (model / "tokenizer_config.json").write_text(json.dumps(config))
    row = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]})
    chat = write(ctx, "chat.jsonl", (row + "\n") * 8)
    return cli(*base(ctx, "c", f"model.path={model}", f"data.train={chat}"))


def case_pickled_model(ctx):
    import torch
    from safetensors.torch import load_file

    model = ctx["dir"] / "pickled"
    if not model.exists():
        shutil.copytree(ctx["model"], model)
        torch.save(load_file(str(model / "model.safetensors")), model / "pytorch_model.bin")
        (model / "model.safetensors").unlink()
    return cli(*base(ctx, "c", f"model.path={model}"))


def case_model_truncated(ctx):
    model = ctx["dir"] / "truncated-model"
    if not model.exists():
        shutil.copytree(ctx["model"], model)
        truncate(model / "model.safetensors", 5000)
    return cli(*base(ctx, "c", f"model.path={model}"))


def case_model_missing(ctx):
    return cli(*base(ctx, "c", f"model.path={ctx['dir'] / 'no-model'}"))


def case_gguf_truncated(ctx):
    path = ctx["dir"] / "truncated.gguf"
    path.write_bytes(tiny_gguf(ctx).read_bytes()[:5000])
    return cli(*base(ctx, "c", f"model.path={path}"))


def case_not_gguf(ctx):
    return cli("inspect", write(ctx, "random.gguf", bytes(range(256)) * 4))


def case_adapter_other_base(ctx):
    return cli("export", "--adapter", ctx["run"] / "adapter", "--base", other_model(ctx), "--format", "hf",
               "--out", ctx["dir"] / "out-hf")


def case_adapter_truncated(ctx):
    run = copy_run(ctx, "adapter-truncated")
    truncate(run / "adapter" / "adapter_model.safetensors", 100)
    return cli("eval", run, "--prompt", "hi")


def case_adapter_config_corrupt(ctx):
    run = copy_run(ctx, "adapter-json")
    (run / "adapter" / "adapter_config.json").write_text('{"r": 4, ')
    return cli("eval", run, "--prompt", "hi")


def case_adapter_unknown_field(ctx):
    run = copy_run(ctx, "adapter-field")
    edit_adapter_config(run, lora_magic=True)
    return cli("eval", run, "--prompt", "hi")


def case_adapter_unsupported_field(ctx):
    run = copy_run(ctx, "adapter-lora-bias")
    edit_adapter_config(run, lora_bias=True)
    return cli("eval", run, "--prompt", "hi")


def case_adapter_pair_mismatch(ctx):
    run = copy_run(ctx, "adapter-pair")
    edit_adapter_config(run, lora_alpha=64)
    return cli("eval", run, "--prompt", "hi")


def case_export_over_base(ctx):
    gguf = tiny_gguf(ctx)
    return cli("export", "--adapter", ctx["run"] / "adapter", "--base", gguf, "--format", "gguf", "--out", gguf)


def case_merge_over_own_directory(ctx):
    mine = ctx["dir"] / "my-notes"
    mine.mkdir(exist_ok=True)
    (mine / "notes.txt").write_text("mine")
    code, err = cli("merge", ctx["run"], "--out", mine)
    assert (mine / "notes.txt").read_text() == "mine"
    return code, err


def case_run_config_corrupt(ctx):
    run = copy_run(ctx, "run-yaml")
    (run / "config.yaml").write_text("model: {path: [\n")
    return cli("eval", run, "--prompt", "hi")


def case_not_a_run(ctx):
    return cli("eval", ctx["dir"], "--prompt", "hi")


def case_report_to_unknown(ctx):
    return cli(*base(ctx, "c", "train.report_to=[tensorbord]"))


def case_tracker_not_installed(ctx):
    import sys
    from unittest import mock

    with mock.patch.dict(sys.modules, {"wandb": None}):  # `import wandb` raises ImportError
        return cli(*base(ctx, "no-wandb", "train.report_to=[wandb]"))


def case_plot_no_loss_yet(ctx):
    run = copy_run(ctx, "plot-fresh")
    (run / "metrics.jsonl").write_text("")
    return cli("plot", run, "--out", ctx["dir"] / "fresh.png")


def case_existing_run(ctx):
    return cli("train", *tiny_run_overrides(ctx["model"], ctx["data"], ctx["run"], steps=2), "--quiet")


def case_resume_nothing(ctx):
    empty = ctx["dir"] / "empty-run"
    if not empty.exists():
        shutil.copytree(ctx["run"], empty)
        shutil.rmtree(empty / "checkpoints")
    return cli("train", "--resume", empty)


def case_resume_with_overrides(ctx):
    return cli("train", "--resume", ctx["run"], "train.lr=1")


def case_checkpoint_corrupt(ctx):
    run = copy_run(ctx, "ckpt-truncated")
    truncate(run / "checkpoints" / "step-000002" / "trainable.safetensors", 50)
    return cli("train", "--resume", run, "--quiet")


def case_checkpoint_state_corrupt(ctx):
    run = copy_run(ctx, "ckpt-state")
    (run / "checkpoints" / "step-000002" / "state.json").write_text('{"step": ')
    return cli("train", "--resume", run, "--quiet")


def case_checkpoint_other_config(ctx):
    run = copy_run(ctx, "ckpt-config")
    config = (run / "config.yaml").read_text()
    (run / "config.yaml").write_text(re.sub(r"\n  r: 4\n", "\n  r: 8\n", config))
    return cli("train", "--resume", run, "--quiet")


CASES = {name[len("case_"):].replace("_", "-"): fn for name, fn in globals().items() if name.startswith("case_")}


@pytest.mark.parametrize("row", doc_rows(), ids=lambda row: row["id"])
def test_each_documented_failure_shows_what_the_doc_says(ctx, row):
    where = row["where"].strip()
    if where != "here":
        file, _, name = where.strip("`").partition("::")
        source = (Path(__file__).parent / file).read_text()
        assert f"def {name}(" in source, f"{row['id']}: {where} does not exist"
        return
    assert row["id"] in CASES, f"{row['id']} is documented as tested here but has no case_ function"
    code, err = CASES[row["id"]](ctx)
    lines = [line for line in err.splitlines() if ": error: " in line]
    assert code == 2 and lines, f"{row['id']}: exit {code}, stderr:\n{err[-2000:]}"
    assert "Traceback" not in err
    assert excerpt(row["says"]) in lines[-1], f"{row['id']}: the doc's excerpt is not in:\n{lines[-1]}"


def test_every_case_is_documented():
    assert set(CASES) <= {row["id"] for row in doc_rows()}, "a case_ function has no row in docs/failure_modes.md"


UNPICKLING = [  # (pattern, why it is banned) in lorakit's own source
    # torch.load only with weights_only=True on the same line: torch's restricted unpickler (tensors and plain
    # containers), for the ImageNet weights that ship as .pth files (lorakit.models.classifiers)
    (r"\btorch\.load\((?![^)]*weights_only=True)", "torch.load unpickles unless weights_only=True"),
    (r"\bpickle\.|\bdill\.|\bcloudpickle\.", "unpickling runs code"),
    (r"\byaml\.(unsafe_)?load\((?![^)]*Loader=_Loader)", "YAML is read with the safe loader only"),
    (r"\byaml\.(full_load|unsafe_load|Loader\b|UnsafeLoader|FullLoader)", "YAML is read with the safe loader only"),
    (r"trust_remote_code\s*=\s*True", "a model's own code is never run"),
    (r"allow_pickle\s*=\s*True", "numpy would unpickle object arrays"),
    (r"weights_only\s*=\s*False", "torch.load without weights_only unpickles"),
]


def test_nothing_lorakit_reads_is_unpickled_or_run():
    root = Path(__file__).parents[1] / "lorakit"
    found = []
    for path in sorted(root.rglob("*.py")):
        for n, line in enumerate(path.read_text().splitlines(), start=1):
            code = line.split("#", 1)[0]
            if "`" in code:  # prose in a docstring naming the call, not a call
                continue
            found += [f"{path.relative_to(root.parent)}:{n}: {why}: {line.strip()}"
                      for pattern, why in UNPICKLING if re.search(pattern, code)]
    assert not found, "\n".join(found)


def test_a_crash_between_the_adapter_files_is_caught_on_load(ctx, tmp_path, monkeypatch):
    """A save killed after the new weights and before the new config: the pair is refused, not mixed."""
    import transformers

    import lorakit
    import lorakit.formats.peft as peft_format

    def adapted(alpha: float):
        model = transformers.AutoModelForCausalLM.from_pretrained(ctx["model"])
        lorakit.inject_adapters(model, lorakit.LoraConfig(r=4, alpha=alpha, target_modules=["q_proj", "v_proj"]))
        return model

    directory = tmp_path / "adapter"
    lorakit.save_adapter(adapted(8), directory)
    write_json = peft_format.write_json

    def killed_before_the_config(path, data):
        if path.name == peft_format.CONFIG_FILE:
            raise KeyboardInterrupt
        return write_json(path, data)

    monkeypatch.setattr(peft_format, "write_json", killed_before_the_config)
    with pytest.raises(KeyboardInterrupt):
        lorakit.save_adapter(adapted(16), directory)  # weights written, config not
    monkeypatch.undo()
    fresh = transformers.AutoModelForCausalLM.from_pretrained(ctx["model"])
    with pytest.raises(ValueError, match="is not the config adapter_model.safetensors was saved with"):
        lorakit.load_adapter(fresh, directory)
    lorakit.save_adapter(adapted(16), directory)  # saving again repairs it
    config = json.loads((directory / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "my/renamed-base"  # bookkeeping edits are fine: not part of the math
    (directory / "adapter_config.json").write_text(json.dumps(config))
    lorakit.load_adapter(fresh, directory)


KILL_DURING_CHECKPOINT = """
import os, signal, sys
import lorakit.training.checkpoint as checkpoint
write_json = checkpoint.write_json

def killed_mid_write(path, data):  # state.json is written last into the checkpoint's temporary directory
    if path.parent.name.startswith(".step-000004"):
        os.kill(os.getpid(), signal.SIGKILL)
    return write_json(path, data)

checkpoint.write_json = killed_mid_write
from lorakit.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_kill_while_a_checkpoint_is_written_keeps_the_previous_one(ctx, tmp_path):
    import subprocess
    import sys

    from safetensors.torch import load_file

    from lorakit.training.checkpoint import latest_checkpoint

    def args(out):
        return ["train", *tiny_run_overrides(ctx["model"], ctx["data"], out, steps=6), "train.save_every=2", "--quiet"]

    killed = subprocess.run([sys.executable, "-c", KILL_DURING_CHECKPOINT, *map(str, args(tmp_path / "killed"))],
                            capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert latest_checkpoint(tmp_path / "killed").name == "step-000002"  # the half-written step 4 is not one
    assert cli("train", "--resume", tmp_path / "killed", "--quiet")[0] == 0
    assert cli(*args(tmp_path / "whole"))[0] == 0
    a = load_file(str(tmp_path / "killed" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "whole" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    assert not list((tmp_path / "killed" / "checkpoints").glob(".step-*"))  # the torn temporary was cleaned up
