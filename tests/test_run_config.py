"""RunConfig: defaults -> YAML file -> key=value overrides, strict checks, and the saved config.yaml."""

import dataclasses
import json
import re
import tempfile
import typing
from pathlib import Path

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from lorakit import LoraConfig
from lorakit.quant.intn import BITS
from lorakit.training.run_config import (
    RUN_CONFIG_FILE,
    AdapterConfig,
    RunConfig,
    TrainConfig,
    load_config,
    read_run_config,
    save_config,
)


def write(tmp_path, text, name="run.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def leaf_keys():
    keys = []
    for f in dataclasses.fields(RunConfig):
        if dataclasses.is_dataclass(f.default_factory):
            keys += [f"{f.name}.{g.name}" for g in dataclasses.fields(f.default_factory)]
        else:
            keys.append(f.name)
    return keys


def get(config, key):
    for part in key.split("."):
        config = getattr(config, part)
    return config


def with_value(data, key, value):
    *sections, name = key.split(".")
    inner = data
    for s in sections:
        inner = inner[s]
    inner[name] = value
    return data


def test_defaults():
    config = load_config(None, [])
    assert config == RunConfig()
    assert (config.method, config.output_dir, config.model.path, config.model.dtype) == ("qalora", "runs/lorakit", None, "auto")
    assert (config.data.train, config.data.valid, config.data.valid_fraction, config.data.shape) == (None, None, 0.05, "auto")
    assert (config.data.max_tokens, config.data.train_on_prompt, config.data.packing) == (512, False, False)
    assert config.data.group_by_length
    a = config.adapter
    assert (a.r, a.alpha, a.dropout, a.target_modules, a.exclude_modules) == (16, 32.0, 0.0, "all-linear", None)
    assert (a.use_rslora, a.group_size, a.bits, a.quant_method) == (False, 32, 4, "rtn")
    t = config.train
    assert (t.steps, t.epochs, t.batch_size, t.grad_accum, t.lr, t.weight_decay) == (None, 1.0, 8, 1, 2e-4, 0.0)
    assert (t.warmup_steps, t.schedule, t.max_grad_norm, t.gradient_checkpointing) == (10, "constant", 1.0, False)
    assert (t.eval_every, t.save_every, t.log_every, t.seed) == (50, 50, 1, 0)


def test_file_then_overrides_in_order(tmp_path):
    path = write(tmp_path, "method: lora\nmodel:\n  path: models/tiny\ntrain:\n  lr: 1e-3\n  steps: 100\n"
                           "adapter: {r: 8, alpha: 16, target_modules: [q_proj]}\n")
    config = load_config(path, [])
    assert (config.method, config.model.path, config.train.lr, config.train.steps) == ("lora", "models/tiny", 1e-3, 100)
    assert (config.adapter.r, config.adapter.alpha, config.adapter.target_modules) == (8, 16.0, ["q_proj"])
    assert config.train.batch_size == 8  # untouched keys keep their defaults

    config = load_config(path, ["train.lr=1e-4", "model.path=null", "adapter.target_modules=[q_proj,v_proj]",
                                "train.steps=5", "train.steps=7", "adapter={r: 4}", "data.packing=true"])
    assert (config.train.lr, config.model.path, config.adapter.target_modules) == (1e-4, None, ["q_proj", "v_proj"])
    assert config.train.steps == 7  # the last override wins
    assert (config.adapter.r, config.adapter.alpha) == (4, 16.0)  # a section override merges into the file's
    assert (config.method, config.data.packing) == ("lora", True)


@pytest.mark.parametrize("text, lr", [("1e-4", 1e-4), ("2E-5", 2e-5), ("1.0e-4", 1e-4), (".5e-3", 5e-4),
                                      ("3e+2", 300.0), ("1", 1.0), ("0.001", 1e-3)])
def test_numbers_with_exponents_are_floats(tmp_path, text, lr):
    assert load_config(None, [f"train.lr={text}"]).train.lr == lr
    config = load_config(write(tmp_path, f"train:\n  lr: {text}\n"), [])
    assert config.train.lr == lr and type(config.train.lr) is float


def test_empty_file_and_empty_section_keep_defaults(tmp_path):
    assert load_config(write(tmp_path, ""), []) == RunConfig()
    assert load_config(write(tmp_path, "train:\nadapter:\n"), []) == RunConfig()


@pytest.mark.parametrize("text, message", [
    ("learning_rate: 1e-4\n", "unknown key 'learning_rate'; did you mean 'train.lr'?"),
    ("trian: {lr: 1e-4}\n", "unknown key 'trian'; did you mean 'train'?"),
    ("train:\n  learning_rate: 1e-4\n", "unknown key 'train.learning_rate'; did you mean 'train.lr'?"),
    ("adapter: {lora_alpha: 16}\n", "unknown key 'adapter.lora_alpha'; did you mean 'adapter.alpha'?"),
    ("adapter: {lr: 1e-4}\n", "unknown key 'adapter.lr'; did you mean 'train.lr'?"),
    ("data: {max_seq_len: 256}\n", "unknown key 'data.max_seq_len'; did you mean 'data.max_tokens'?"),
    ("train.lr: 1e-4\n", "unknown key 'train.lr': dotted keys are for overrides; in a file, nest it: 'train: {lr: ...}'"),
    ("train: {zzzzzz: 1}\n", "unknown key 'train.zzzzzz'; the keys in 'train' are ['train.steps', "),
])
def test_unknown_key_in_file_names_it_and_the_closest(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(ValueError, match="^" + re.escape(f"{path}: {message}")):
        load_config(path, [])


@pytest.mark.parametrize("override, message", [
    ("train.learning_rate=1e-4", "unknown key 'train.learning_rate'; did you mean 'train.lr'?"),
    ("adapter.rank=4", "unknown key 'adapter.rank'; did you mean 'adapter.r'?"),
    ("lr=1e-4", "unknown key 'lr'; did you mean 'train.lr'?"),
    ("optim.lr=1e-4", "unknown key 'optim.lr'; did you mean 'train.lr'?"),
    ("train={learning_rate: 1}", "unknown key 'train.learning_rate'; did you mean 'train.lr'?"),
])
def test_unknown_key_in_override(override, message):
    with pytest.raises(ValueError, match="^" + re.escape(f"override {override!r}: {message}")):
        load_config(None, [override])


@pytest.mark.parametrize("override, message", [
    ("adapter.r=0", "adapter.r=0 must be an integer >= 1"),
    ("adapter.r=-3", "adapter.r=-3 must be an integer >= 1"),
    ("adapter.r=2.5", "adapter.r=2.5 must be an integer"),
    ("adapter.r=true", "adapter.r=True must be an integer"),
    ("adapter.r='16'", "adapter.r='16' must be an integer"),
    ("train.batch_size=0", "train.batch_size=0 must be an integer >= 1"),
    ("train.batch_size=eight", "train.batch_size='eight' must be an integer >= 1"),
    ("train.steps=0", "train.steps=0 must be an integer >= 1 or null"),
    ("train.lr=0", "train.lr=0 must be a number > 0"),
    ("train.lr=-1e-4", "train.lr=-0.0001 must be a number > 0"),
    ("train.lr=.inf", "train.lr=inf must be a number > 0"),
    ("train.lr=fast", "train.lr='fast' must be a number > 0"),
    ("train.lr=true", "train.lr=True must be a number > 0"),
    ("data.valid_fraction=1", "data.valid_fraction=1 must be a number in \\[0, 1\\)"),
    ("data.valid_fraction=-0.1", "data.valid_fraction=-0.1 must be a number in \\[0, 1\\)"),
    ("adapter.dropout=1.0", "adapter.dropout=1.0 must be a number in \\[0, 1\\)"),
    ("data.packing='true'", "data.packing='true' must be true or false"),
    ("data.packing=1", "data.packing=1 must be true or false"),
    ("method=vera", "method='vera' must be one of \\['lora', 'qlora', 'qalora', 'dora', 'qdora'\\]"),
    ("method=qlor", "method='qlor' must be one of .* \\(did you mean 'qlora'\\?\\)"),
    ("data.shape=json", "data.shape='json' must be one of \\['auto', 'text', 'instruction', 'chat'\\]"),
    ("train.schedule=cosin", "train.schedule='cosin' must be one of .* \\(did you mean 'cosine'\\?\\)"),
    ("model.dtype=fp16", "model.dtype='fp16' must be one of \\['auto', 'float32', 'bfloat16', 'float16'\\]"),
    ("adapter.bits=6", "adapter.bits=6 must be one of \\[2, 3, 4, 5, 8\\]"),
    ("adapter.bits=4.0", "adapter.bits=4.0 must be one of"),
    ("adapter.quant_method=awq", "adapter.quant_method='awq' must be one of \\['rtn', 'gptq'\\]"),
    ("adapter.target_modules=[q_proj, '']", "adapter.target_modules=\\['q_proj', ''\\] must be a regex, 'all-linear', 'all-conv', a list"),
    ("data.train=2024-13-45", "not valid YAML: month must be in 1..12"),
    ("adapter.target_modules=[q_proj, 3]", "adapter.target_modules=\\['q_proj', 3\\] must be"),
    ("output_dir=123", "output_dir=123 must be a non-empty string"),
    ("output_dir=null", "output_dir=None must be a non-empty string"),
    ("model.path=''", "model.path='' must be a non-empty string .* or null"),
    ("train=5", "train must be a mapping of settings"),
])
def test_bad_value_names_key_value_and_what_is_allowed(override, message):
    with pytest.raises(ValueError, match="^" + re.escape(f"override {override!r}: ") + message):
        load_config(None, [override])


def test_bad_value_in_file_names_the_file(tmp_path):
    path = write(tmp_path, "train:\n  batch_size: '8'\n")
    with pytest.raises(ValueError, match="^" + re.escape(f"{path}: train.batch_size='8' must be an integer >= 1") + "$"):
        load_config(path, [])
    with pytest.raises(ValueError, match="^the configuration must be a mapping"):
        RunConfig.from_dict(["train"])
    with pytest.raises(ValueError, match="must be a mapping of settings .* got list"):
        load_config(write(tmp_path, "- a\n- b\n"), [])


def test_bad_yaml_names_file_and_line(tmp_path):
    path = write(tmp_path, "method: qalora\ntrain:\n  lr: 1e-4\n  steps: [1\nmodel: {}\n")
    with pytest.raises(ValueError, match="^" + re.escape(f"{path}, line 5, column 6: not valid YAML: ") + ".*from line 4"):
        load_config(path, [])
    path = write(tmp_path, "train:\n\tlr: 1\n")
    with pytest.raises(ValueError, match="^" + re.escape(f"{path}, line 2, column 1: not valid YAML")):
        load_config(path, [])
    with pytest.raises(ValueError, match="^override 'adapter.target_modules=\\[q_proj': not valid YAML"):
        load_config(None, ["adapter.target_modules=[q_proj"])


def test_override_needs_an_equals_sign(tmp_path):
    with pytest.raises(ValueError, match="override 'train.lr' has no '=': write key=value, e.g. train.lr=1e-4"):
        load_config(None, ["train.lr"])
    with pytest.raises(TypeError, match="a list of 'key=value' strings"):
        load_config(None, "train.lr=1e-4")
    with pytest.raises(FileNotFoundError, match="config file not found"):
        load_config(tmp_path / "missing.yaml", [])


def test_save_and_read_back(tmp_path):
    config = load_config(None, ["method=qlora", "model.path=models/my model", "train.lr=1e-10", "train.steps=300",
                                "adapter.target_modules=[q_proj,v_proj]", "adapter.exclude_modules=lm_head",
                                "data.valid_fraction=0", "output_dir='123'", "data.train='1e5'", "train.gradient_checkpointing=yes"])
    assert (config.output_dir, config.data.train) == ("123", "1e5")  # strings YAML would read as numbers stay strings
    run_dir = tmp_path / "run"
    path = save_config(config, run_dir / RUN_CONFIG_FILE)
    assert path == run_dir / RUN_CONFIG_FILE and [p.name for p in run_dir.iterdir()] == [RUN_CONFIG_FILE]  # no temp file left
    assert read_run_config(run_dir) == config
    assert load_config(path, []) == config
    assert RunConfig.from_dict(config.to_dict()) == config
    assert config.to_dict()["adapter"]["target_modules"] == ["q_proj", "v_proj"]
    with pytest.raises(FileNotFoundError, match="not the output directory of a `lorakit train` run"):
        read_run_config(tmp_path)


def test_from_dict_is_strict():
    with pytest.raises(ValueError, match="unknown key 'adapter.rank'; did you mean 'adapter.r'"):
        RunConfig.from_dict({"adapter": {"rank": 4}})
    with pytest.raises(ValueError, match="adapter.r=0 must be an integer >= 1"):
        RunConfig.from_dict({"adapter": {"r": 0}})
    with pytest.raises(ValueError, match="train.lr=0 must be a number > 0"):
        TrainConfig(lr=0)
    with pytest.raises(TypeError, match="adapter must be of type AdapterConfig, got dict"):
        RunConfig(adapter={"r": 4})


def test_lora_config():
    config = load_config(None, ["adapter.r=4", "adapter.alpha=8", "adapter.dropout=0.1", "adapter.use_rslora=true",
                                "adapter.target_modules=[q_proj]", "adapter.exclude_modules=lm_head", "adapter.group_size=64"])
    assert config.lora_config() == LoraConfig(r=4, alpha=8.0, dropout=0.1, target_modules=["q_proj"],
                                              exclude_modules="lm_head", use_rslora=True, group_size=64)
    for method in ("lora", "qlora", "dora", "qdora"):
        assert load_config(None, [f"method={method}"]).lora_config().group_size is None
    assert not config.lora_config().use_dora


@pytest.mark.parametrize("method, base_method, use_dora", [
    ("lora", "lora", False), ("qlora", "qlora", False), ("qalora", "qalora", False),
    ("dora", "lora", True), ("qdora", "qlora", True),
])
def test_dora_methods_train_a_dora_adapter_on_lora_and_qlora_bases(method, base_method, use_dora):
    config = load_config(None, [f"method={method}"])
    assert (config.base_method, config.lora_config().use_dora) == (base_method, use_dora)


def test_bits_are_the_quantizer_bits():
    assert typing.get_args(typing.get_type_hints(AdapterConfig)["bits"]) == BITS


# -- properties ----------------------------------------------------------------------------------------

def floats(low, high=None, *, exclude_low=False, exclude_high=False):
    return st.floats(low, high, exclude_min=exclude_low, exclude_max=exclude_high, allow_nan=False, allow_infinity=False)


# Printable text: YAML refuses control characters, and folds line separators inside quotes.
TEXT = st.text(st.characters(blacklist_categories=("Cs", "Cc", "Cn", "Zl", "Zp")), min_size=1, max_size=20)
MODULES = st.lists(st.text("abcdefghijklmnopqrstuvwxyz_.0123456789", min_size=1, max_size=10), min_size=1, max_size=4)
VALID = {  # an independent statement of what each key accepts
    "method": st.sampled_from(["lora", "qlora", "qalora", "dora", "qdora"]),
    "output_dir": TEXT,
    "model.path": st.none() | TEXT,
    "model.dtype": st.sampled_from(["auto", "float32", "bfloat16", "float16"]),
    "data.train": st.none() | TEXT,
    "data.valid": st.none() | TEXT,
    "data.valid_fraction": floats(0, 1, exclude_high=True),
    "data.shape": st.sampled_from(["auto", "text", "instruction", "chat"]),
    "data.max_tokens": st.integers(2, 10**9),
    "data.train_on_prompt": st.booleans(),
    "data.packing": st.booleans(),
    "data.group_by_length": st.booleans(),
    "adapter.r": st.integers(1, 10**6),
    "adapter.alpha": floats(0, exclude_low=True),
    "adapter.dropout": floats(0, 1, exclude_high=True),
    "adapter.target_modules": TEXT | MODULES,
    "adapter.exclude_modules": st.none() | TEXT | MODULES,
    "adapter.use_rslora": st.booleans(),
    "adapter.group_size": st.integers(1, 4096),
    "adapter.bits": st.sampled_from(BITS),
    "adapter.quant_method": st.sampled_from(["rtn", "gptq"]),
    "train.steps": st.none() | st.integers(1, 10**12),
    "train.epochs": floats(0, exclude_low=True),
    "train.batch_size": st.integers(1, 10**6),
    "train.grad_accum": st.integers(1, 10**6),
    "train.lr": floats(0, exclude_low=True),
    "train.weight_decay": floats(0),
    "train.warmup_steps": st.integers(0, 10**9),
    "train.schedule": st.sampled_from(["cosine", "linear", "constant"]),
    "train.max_grad_norm": floats(0),
    "train.gradient_checkpointing": st.booleans(),
    "train.fsdp": st.booleans(),
    "train.compile": st.booleans(),  # not together with train.fsdp (test_compile)
    "train.eval_every": st.integers(0, 10**9),
    "train.save_every": st.integers(0, 10**9),
    "train.log_every": st.integers(1, 10**9),
    "train.seed": st.integers(0, 2**63),
    "train.report_to": st.lists(st.sampled_from(["tensorboard", "wandb", "mlflow"]), max_size=3, unique=True),
    "task": st.just("causal-lm"),  # an image task also changes the defaults of method and target_modules
    "adapter.modules_to_save": st.none() | MODULES,
    "data.image_size": st.none() | st.integers(16, 10**6),
    "data.augment": st.booleans(),
    "data.max_examples": st.none() | st.integers(1, 10**9),
    "data.max_valid_examples": st.none() | st.integers(1, 10**9),
}
IMAGE_KEYS = {"data.image_size", "data.augment", "data.max_examples", "data.max_valid_examples"}  # set with task=image-classification


def yaml_text(value):
    """How a user would write `value` on the command line (strings double-quoted, which YAML reads as JSON does)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, list):
        return "[" + ", ".join(json.dumps(v, ensure_ascii=False) for v in value) + "]"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    return repr(value)


def test_the_property_table_covers_every_key():
    assert set(VALID) == set(leaf_keys())


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_an_override_sets_exactly_its_field(data):
    key = data.draw(st.sampled_from(sorted(VALID)))
    value = data.draw(VALID[key])
    task = ["task=image-classification"] if key in IMAGE_KEYS else []
    config = load_config(None, [*task, f"{key}={yaml_text(value)}"])
    assert get(config, key) == value and type(get(config, key)) is type(value)
    default = RunConfig(task="image-classification") if task else RunConfig()
    assert config.to_dict() == with_value(default.to_dict(), key, value)


@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_any_valid_config_saves_and_reads_back_equal(data):
    image = data.draw(st.booleans())
    allowed = (sorted(IMAGE_KEYS | {k for k in VALID if k.startswith("train.")}) if image  # what an image task takes
               else sorted(set(VALID) - IMAGE_KEYS))
    keys = data.draw(st.lists(st.sampled_from(allowed), max_size=8, unique=True))
    values = {key: data.draw(VALID[key]) for key in keys}
    assume(not (values.get("train.compile") and values.get("train.fsdp")))  # refused together (test_compile)
    config = load_config(None, ["task=image-classification"] * image
                         + [f"{key}={yaml_text(value)}" for key, value in values.items()])
    with tempfile.TemporaryDirectory() as run_dir:
        save_config(config, Path(run_dir) / RUN_CONFIG_FILE)
        assert read_run_config(run_dir) == config


NAMES = st.sampled_from(sorted({part for key in leaf_keys() for part in key.split(".")})) | st.text(max_size=12)
GARBAGE = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                       lambda inner: st.lists(inner, max_size=3) | st.dictionaries(NAMES, inner, max_size=3), max_leaves=8)


@settings(max_examples=300, deadline=None)
@given(override=st.text(max_size=40) | st.builds("{}={}".format, st.sampled_from(leaf_keys()) | st.text(max_size=20),
                                                 st.text(max_size=20)),
       mapping=st.dictionaries(NAMES | st.integers(), GARBAGE, max_size=4))
def test_garbage_is_a_value_error(override, mapping):
    for attempt in (lambda: load_config(None, [override]), lambda: RunConfig.from_dict(mapping)):
        try:
            attempt()
        except ValueError:
            pass
