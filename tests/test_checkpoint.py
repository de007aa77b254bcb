import random

import numpy as np
import pytest
import torch

import lorakit
from lorakit.training.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from tiny_models import tiny_llama


def setup(seed=0):
    model = tiny_llama()
    lorakit.inject_adapters(model, lorakit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], dropout=0.1))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 3))
    torch.manual_seed(seed)
    return model, opt, sched


def step(model, opt, sched):
    ids = torch.randint(0, 128, (2, 12))  # drawn from the global RNG: resume must restore it
    noise = random.random() + np.random.rand()
    loss = model(ids, labels=ids).loss * (1 + 0 * noise)
    loss.backward()
    opt.step()
    sched.step()
    opt.zero_grad()


def trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_resume_continues_exactly(tmp_path):
    model, opt, sched = setup()
    for _ in range(3):
        step(model, opt, sched)
    save_checkpoint(tmp_path, 3, model, opt, sched, {"epoch": 0, "batch": 3})
    for _ in range(3):
        step(model, opt, sched)
    want = trainable(model)

    model2, opt2, sched2 = setup()
    torch.manual_seed(123)  # a different RNG position: the checkpoint must restore it
    state = load_checkpoint(latest_checkpoint(tmp_path), model2, opt2, sched2)
    assert state["step"] == 3 and state["batch"] == 3
    for _ in range(3):
        step(model2, opt2, sched2)
    got = trainable(model2)
    assert all(torch.equal(want[n], got[n]) for n in want)


def test_incomplete_checkpoints_are_ignored_and_old_ones_pruned(tmp_path):
    model, opt, sched = setup()
    step(model, opt, sched)
    for s in (1, 2, 3):
        save_checkpoint(tmp_path, s, model, opt, sched, {}, keep=2)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step-000002", "step-000003"]
    (tmp_path / "checkpoints" / "step-000009").mkdir()  # a crash before state.json: not complete
    assert latest_checkpoint(tmp_path).name == "step-000003"


def test_checkpoint_for_another_model_is_refused(tmp_path):
    model, opt, sched = setup()
    step(model, opt, sched)
    save_checkpoint(tmp_path, 1, model, opt, sched, {})
    other = tiny_llama()
    lorakit.inject_adapters(other, lorakit.LoraConfig(r=4, target_modules=["o_proj"]))
    opt2 = torch.optim.AdamW([p for p in other.parameters() if p.requires_grad])
    with pytest.raises(ValueError, match="does not fit"):
        load_checkpoint(latest_checkpoint(tmp_path), other, opt2, None)
