import pytest
from torch import nn

from tiny_models import tiny_llama
from lorakit.adapters.walk import find_targets, layer_kind, matches


@pytest.mark.parametrize("name, patterns, expected", [
    ("model.layers.0.self_attn.q_proj", ["q_proj"], True),
    ("model.layers.0.self_attn.q_proj", ["self_attn.q_proj"], True),
    ("model.layers.0.self_attn.q_proj", ["proj"], False),          # suffix means a whole name part
    ("model.layers.0.self_attn.q_proj", r".*\.(q|v)_proj", True),
    ("model.layers.0.self_attn.q_proj", r"q_proj", False),          # a regex must match the whole name
    ("q_proj", ["q_proj"], True),
    ("x", None, False),
])
def test_peft_matching_rules(name, patterns, expected):
    assert matches(name, patterns) is expected


def test_all_linear_skips_output_head():
    model = tiny_llama()
    names = find_targets(model, "all-linear")
    assert len(names) == 14 and "lm_head" not in names


def test_exclude_wins():
    names = find_targets(tiny_llama(), "all-linear", exclude_modules=["down_proj", "up_proj"])
    assert len(names) == 10 and not any("down_proj" in n or "up_proj" in n for n in names)


def test_no_match_lists_candidates_and_suggests():
    with pytest.raises(ValueError) as e:
        find_targets(tiny_llama(), ["q_prj"])
    msg = str(e.value)
    assert "q_prj" in msg and "Did you mean ['q_proj'," in msg and "'v_proj'" in msg


def test_layer_kinds():
    from transformers.pytorch_utils import Conv1D

    assert layer_kind(nn.Linear(2, 3)) == "linear"
    assert layer_kind(Conv1D(3, 2)) == "linear"
    assert layer_kind(nn.Embedding(4, 2)) == "embedding"
    assert layer_kind(nn.Conv1d(2, 3, 3)) == "conv1d"
    assert layer_kind(nn.Conv2d(2, 3, 3)) == "conv2d"
    assert layer_kind(nn.LayerNorm(3)) is None
    assert layer_kind(nn.Conv3d(2, 3, 3)) is None
