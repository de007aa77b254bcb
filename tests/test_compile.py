"""`train.compile`: the decoder blocks through torch.compile train as the eager blocks do, validation runs them
eager, the model goes back eager, and where Inductor cannot build the run trains eager with a warning.

One test compiles for real (a tiny Llama, QA-LoRA over INT4 codes: the dequantization traced too), ~1.5
minutes on 2 cores with Inductor's cache cold; the rest never compile."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")

from lorakit.report.progress import read_metrics  # noqa: E402
from lorakit.training import compile as compiling  # noqa: E402
from lorakit.training.loop import train  # noqa: E402
from lorakit.training.run_config import load_config  # noqa: E402
from tiny_models import tiny_llama  # noqa: E402
from train_fixtures import tiny_assets, tiny_run_overrides  # noqa: E402


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return tiny_assets(tmp_path_factory, "assets")


def losses(run) -> list[float]:
    return [m["loss"] for m in read_metrics(run / "metrics.jsonl") if "loss" in m]


def valid_losses(run) -> list[float]:
    return [m["valid_loss"] for m in read_metrics(run / "metrics.jsonl") if "valid_loss" in m]


def test_compiled_blocks_train_as_eager_blocks_do(assets, tmp_path, monkeypatch):
    from torch._dynamo.utils import counters

    problem = compiling.inductor_problem("cpu")
    if problem is not None:  # the fallback is tested below
        pytest.skip(f"Inductor cannot build code here ({problem}): install a C++ compiler (apt-get install g++)")

    model_dir, data = assets
    runs = {}
    for compiled in (False, True):
        run = tmp_path / f"compile-{compiled}"
        train(load_config(None, tiny_run_overrides(model_dir, data, run, "qalora", steps=4)
                          + [f"train.compile={compiled}"]), progress=False)
        runs[compiled] = run
        if not compiled:
            graphs = counters["stats"]["unique_graphs"]  # the eager run compiled nothing
    assert counters["stats"]["unique_graphs"] > graphs  # the compiled run did
    summary = {c: json.loads((run / "summary.json").read_text()) for c, run in runs.items()}
    assert summary[False]["compiled_blocks"] == 0 and summary[True]["compiled_blocks"] == 2  # the tiny Llama's 2 layers
    # the same numbers up to the rounding of fused elementwise work
    assert losses(runs[True]) == pytest.approx(losses(runs[False]), rel=1e-4)
    assert valid_losses(runs[True]) == pytest.approx(valid_losses(runs[False]), rel=1e-4)
    assert len(valid_losses(runs[True])) == 3  # before, at step 3, at the end: run eager (below)
    from safetensors.torch import load_file

    eager, compiled = (load_file(str(runs[c] / "adapter" / "adapter_model.safetensors")) for c in (False, True))
    assert eager.keys() == compiled.keys()
    for key in eager:  # Adam's normalised steps carry gradient rounding into the weights: within 1% of their scale
        assert (compiled[key] - eager[key]).abs().max() <= 1e-2 * eager[key].abs().max(), key


def test_compile_blocks_and_undo(tmp_path):
    model = tiny_llama()
    from lorakit.kernels import fuse_for_training_

    fuse_for_training_(model)
    assert compiling.compile_blocks_(model) == len(model.model.layers)
    assert compiling.is_compiled(model)
    # the hand-fused RMSNorm and SwiGLU went back to the model's own (Inductor fuses those itself)
    assert all("forward" not in m.__dict__ for m in model.modules() if type(m).__name__.endswith(("RMSNorm", "MLP")))
    assert compiling.uncompile_blocks_(model) == len(model.model.layers)
    assert not compiling.is_compiled(model) and compiling.uncompile_blocks_(model) == 0


def test_a_model_without_repeated_blocks_is_refused_by_name():
    from tiny_models import tiny_convnet

    with pytest.raises(ValueError, match=r"train.compile compiles a model's repeated blocks.*set train.compile=false"):
        compiling.compile_blocks_(tiny_convnet())


def test_eager_runs_compiled_blocks_without_compiling():
    from torch._dynamo.utils import counters

    model = tiny_llama()
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        expected = model(ids).logits
        compiling.compile_blocks_(model)
        frames = counters["frames"]["total"]
        with compiling.eager():
            logits = model(ids).logits
    assert counters["frames"]["total"] == frames  # dynamo never looked at a frame
    torch.testing.assert_close(logits, expected, rtol=0, atol=0)


def test_where_inductor_cannot_build_the_run_trains_eager_with_a_warning(assets, tmp_path, monkeypatch, capsys):
    model_dir, data = assets
    monkeypatch.setattr(compiling, "inductor_problem", lambda device_type: "CppCompileError: g++: not found")
    run = tmp_path / "run"
    train(load_config(None, tiny_run_overrides(model_dir, data, run, "lora", steps=2) + ["train.compile=true"]),
          progress=False)
    err = capsys.readouterr().err
    assert "train.compile=true, but torch.compile cannot build code on this cpu (CppCompileError: g++: not found)" in err
    assert "training eager" in err and "apt-get install g++" in err
    assert json.loads((run / "summary.json").read_text())["compiled_blocks"] == 0


def test_inductor_problem_names_a_missing_compiler(monkeypatch):
    import torch._inductor.config as inductor

    compiling.inductor_problem.cache_clear()
    monkeypatch.setattr(inductor.cpp, "cxx", ("/nonexistent/g++",))
    monkeypatch.setattr(inductor, "force_disable_caches", True)  # a cached probe would load without compiling
    try:
        problem = compiling.inductor_problem("cpu")
    finally:
        compiling.inductor_problem.cache_clear()
    assert problem is not None and "g++" in problem


def test_compile_with_fsdp_is_refused_by_name():
    with pytest.raises(ValueError, match=r"train.compile=true with train.fsdp=true is not supported.*set one of them"):
        load_config(None, ["train.compile=true", "train.fsdp=true"])


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_dynamo_traces_a_4bit_dequantization_whole(quant_type):
    """The code tables are read as they are, not rebuilt in the graph (the 8-bit map's `tolist` split it)."""
    from lorakit.quant.blockwise import weight_class

    weight = weight_class(quant_type).from_float(torch.randn(64, 128), 64, True, 256)
    explained = torch._dynamo.explain(lambda w: w.dequantize(torch.bfloat16))(weight)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    assert torch.equal(torch.compile(lambda w: w.dequantize(torch.bfloat16), backend="eager")(weight),
                       weight.dequantize(torch.bfloat16))


def test_dynamo_traces_a_checkpointed_block_whole():
    """lorakit's checkpointing wrapper (its cache-argument check) splits no graph, with the Dynamo settings
    `compile_blocks_` uses (transformers >= 5.25's attention sets a context variable at every call)."""
    from lorakit.training.compile import configure_dynamo
    from lorakit.training.recompute import enable_gradient_checkpointing

    configure_dynamo()

    model = tiny_llama().train()  # checkpointing acts in training only
    enable_gradient_checkpointing(model)
    block, x = model.model.layers[0], torch.randn(1, 5, 64, requires_grad=True)
    positions = model.model.rotary_emb(x, torch.arange(5)[None])
    explained = torch._dynamo.explain(lambda h: block(h, position_embeddings=positions, attention_mask=None))(x)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
