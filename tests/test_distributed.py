"""Data-parallel `lorakit train` under torchrun, 2 processes on CPU (gloo), on a tiny Llama.

The contract: K steps with 2 processes x batch b leave the adapter that 1 process x batch 2b leaves, to
float rounding; and a checkpoint resumes on another number of processes with the same result."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("transformers")

from lorakit.training.distributed import World, split_rows  # noqa: E402
from lorakit.report.progress import read_metrics  # noqa: E402
from train_fixtures import FREEZE_AFTER_STEP, kill_after_step, tiny_assets, tiny_run_overrides  # noqa: E402

STEPS = 4
ENV = {"OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return tiny_assets(tmp_path_factory, "ddp")


def overrides(assets, out: Path, batch_size: int) -> list[str]:
    model_dir, data = assets
    return [*tiny_run_overrides(model_dir, data, out, steps=STEPS), f"train.batch_size={batch_size}",
            "train.save_every=2", "train.eval_every=2", "adapter.dropout=0"]


def command(args: list[str], processes: int, entry: list[str] = ("-m", "lorakit")) -> list[str]:
    if processes == 1:
        return [sys.executable, *entry, *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", *entry, *args]


def run(args: list[str], processes: int) -> subprocess.CompletedProcess:
    return subprocess.run(command(args, processes), capture_output=True, text=True, env={**os.environ, **ENV},
                          timeout=600)


def killed_after_step_3(args: list[str], out: Path, processes: int) -> subprocess.CompletedProcess:
    """The run SIGKILLed from outside after step 3, its newest checkpoint being step 2."""
    return kill_after_step(command(args, processes, [str(FREEZE_AFTER_STEP), "3"]), out, 3, env=ENV)


def adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def assert_same_adapter(a: dict, b: dict, atol: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=atol, msg=name)


@pytest.fixture(scope="module")
def reference(assets, tmp_path_factory):
    """One process, batch 4: the run every multi-process run must reproduce."""
    out = tmp_path_factory.mktemp("ref") / "run"
    done = run(["train", *overrides(assets, out, 4), "--quiet"], 1)
    assert done.returncode == 0, done.stderr
    return out


def test_two_processes_with_batch_b_equal_one_process_with_batch_2b(assets, reference, tmp_path):
    out = tmp_path / "run"
    done = run(["train", *overrides(assets, out, 2), "--quiet"], 2)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_adapter(adapter(out), adapter(reference))
    ours, theirs = read_metrics(out / "metrics.jsonl"), read_metrics(reference / "metrics.jsonl")
    for field in ("loss", "valid_loss"):
        a = [m[field] for m in ours if field in m]
        b = [m[field] for m in theirs if field in m]
        assert len(a) == len(b) > 0
        assert a == pytest.approx(b, rel=1e-4), field
    summary = json.loads((out / "summary.json").read_text())
    trainable = summary["trainable_parameters"]
    assert summary["processes"] == 2 and summary["global_batch"] == 4
    assert summary["allreduce_bytes_per_step"] == 4 * trainable  # adapter gradients only, fp32
    assert all(m["allreduce_bytes"] == 4 * trainable for m in ours if "loss" in m)
    # only rank 0 wrote: one line per logged step, no duplicates
    assert [m["step"] for m in ours if "loss" in m] == list(range(1, STEPS + 1))


def test_a_two_process_checkpoint_resumes_on_one_process(assets, reference, tmp_path):
    out = tmp_path / "run"
    killed = killed_after_step_3(["train", *overrides(assets, out, 2), "--quiet"], out, 2)
    assert killed.returncode == -9  # both processes killed from outside after step 3 (checkpoint 2 is the newest)
    assert not (out / "adapter").exists()
    state = json.loads((out / "checkpoints" / "step-000002" / "state.json").read_text())
    assert state["processes"] == 2 and state["global_batch"] == 4
    resumed = run(["train", "--resume", str(out), "--quiet"], 1)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming a 2-process run on 1" in resumed.stdout
    assert_same_adapter(adapter(out), adapter(reference))


def test_a_one_process_checkpoint_resumes_on_two_processes(assets, reference, tmp_path):
    out = tmp_path / "run"
    killed = killed_after_step_3(["train", *overrides(assets, out, 4), "--quiet"], out, 1)
    assert killed.returncode == -9
    resumed = run(["train", "--resume", str(out), "--quiet"], 2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_adapter(adapter(out), adapter(reference))


def test_a_global_batch_the_processes_cannot_split_is_refused(assets, tmp_path):
    out = tmp_path / "run"
    killed = killed_after_step_3(["train", *overrides(assets, out, 3), "--quiet"], out, 1)
    assert killed.returncode == -9
    resumed = run(["train", "--resume", str(out), "--quiet"], 2)
    assert resumed.returncode != 0
    assert "global batch of 3 rows" in resumed.stderr and "divides 3" in resumed.stderr


@pytest.mark.parametrize("method", ["qalora", "qlora", "lora"])
def test_fsdp_shards_the_quantized_base_and_trains_the_same_adapter(assets, tmp_path, method):
    one, two = tmp_path / "one", tmp_path / "two"
    done = run(["train", *overrides(assets, one, 4), f"method={method}", "--quiet"], 1)
    assert done.returncode == 0, done.stderr[-3000:]
    done = run(["train", *overrides(assets, two, 2), f"method={method}", "train.fsdp=true",
                "train.gradient_checkpointing=true", "--quiet"], 2)
    assert done.returncode == 0, done.stderr[-3000:]
    # FSDP's all-gathers and the checkpoint's recompute sum in another order, and Adam divides each update by
    # the gradient's own size, so an element whose gradient is near 0 can move by ~1e-5 more (measured 2.5e-5 for
    # 1 of 256 elements on an AVX-512 CPU without BF16, 1.5e-6 on one with it); a wrong gradient moves ~1e-2.
    assert_same_adapter(adapter(two), adapter(one), atol=1e-4)
    fsdp = json.loads((two / "summary.json").read_text())["fsdp"]
    assert fsdp["blocks"] == 2
    # each process keeps half of the blocks' frozen tensors: packed codes and scales, or dense weights
    # (dim-0 pieces, padded to equal size)
    assert fsdp["sharded_base_bytes"] / 2 <= fsdp["local_base_bytes"] <= fsdp["sharded_base_bytes"] / 2 + 1024


def test_fsdp_needs_several_processes(assets, tmp_path):
    done = run(["train", *overrides(assets, tmp_path / "run", 4), "train.fsdp=true", "--quiet"], 1)
    assert done.returncode == 2 and "torchrun --nproc_per_node=N" in done.stderr


def test_split_rows_covers_a_batch_once_in_order():
    rows = list(range(7))
    slices = [split_rows(rows, World(rank=k, size=3)) for k in range(3)]
    assert slices == [[0, 1, 2], [3, 4, 5], [6]]
    assert split_rows([0, 1], World(rank=2, size=3)) == []  # a short last batch can leave a process idle
    assert split_rows(rows, World()) == rows


def test_a_single_process_world_does_no_communication():
    world = World()
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.full((3,), 2.0)
    assert world.sum(1.5, 2) == [1.5, 2.0]
    assert world.all_reduce_grads([p]) == 0 and p.grad.tolist() == [2.0, 2.0, 2.0]
    assert len(world.gather_rng()) == 1


def test_world_size_without_torchrun_is_a_clear_error(monkeypatch):
    from lorakit.training.distributed import init_world

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(ValueError, match="torchrun"):
        init_world()
