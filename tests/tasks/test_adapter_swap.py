"""Per-task adapters on one base: a 10-class (Fashion-MNIST) and a 4-class (its coarse grouping) adapter,
each with its own head, loaded into ONE MobileNetV2 and switched with `lorakit.set_active`: each gives its own
run's validation numbers exactly, however often they swap and even after the other one trains, and the base's
tensors (BatchNorm statistics included) stay bit-identical to a freshly loaded base."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import lorakit
from image_task_fixtures import CLASSIFY, last_valid, needs_fashion_mnist, needs_mobilenet, train_ok
from lorakit.data.fashion_mnist import COARSE_CLASSES, FASHION_MNIST_CLASSES

pytestmark = [needs_fashion_mnist, needs_mobilenet]

DATA = [o for o in CLASSIFY if o.startswith("data.max")]  # the runs' training and validation subsets


@pytest.fixture(scope="module")
def coarse_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("coarse") / "run"
    train_ok(*CLASSIFY, "data.train=fashion-mnist-coarse", "train.steps=6", f"output_dir={run}")
    return run


def base_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The frozen base's tensors under their own names: everything but LoRA factors and adapters' head copies."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if ".lora." not in k and ".copies." not in k}


def test_two_task_adapters_share_one_base_and_swap(fine_run, coarse_run):
    from lorakit.tasks.vision_runs import load_vision_adapter

    model, fine = load_vision_adapter(fine_run / "adapter", name="fine", overrides=["data.train=fashion-mnist", *DATA])
    same, coarse = load_vision_adapter(coarse_run / "adapter", name="coarse", model=model,
                                       overrides=["data.train=fashion-mnist-coarse", *DATA])
    assert same is model and lorakit.adapter_names(model) == ["fine", "coarse"]
    assert (fine.classes, coarse.classes) == (FASHION_MNIST_CLASSES, COARSE_CLASSES)
    fresh = base_tensors(fine.load_model())
    assert {k: v.shape for k, v in base_tensors(model).items()} == {k: v.shape for k, v in fresh.items()}
    _, fine_valid, _ = fine.examples()
    _, coarse_valid, _ = coarse.examples()
    image = np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)

    def run_as(name, task, valid):
        lorakit.set_active(model, name)
        return task.evaluate(model, valid), task.predict(model, [image], top=10)[0]

    want_fine, want_coarse = last_valid(fine_run), last_valid(coarse_run)
    got_fine, fine_top = run_as("fine", fine, fine_valid)
    assert got_fine == want_fine and {c for c, _ in fine_top} == set(FASHION_MNIST_CLASSES)
    got_coarse, coarse_top = run_as("coarse", coarse, coarse_valid)
    assert got_coarse == want_coarse and {c for c, _ in coarse_top} == set(COARSE_CLASSES)
    assert run_as("fine", fine, fine_valid) == (want_fine, fine_top)

    lorakit.set_active(model, "coarse")  # one training step of the coarse adapter, in train mode
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    batch = coarse.collate(coarse.epoch_batches(coarse_valid, 0, 16)[0], torch.float32, None)
    coarse.loss(model, batch).backward()
    torch.optim.SGD(trainable, lr=0.1).step()
    model.eval()
    assert run_as("coarse", coarse, coarse_valid)[0] != want_coarse  # it did train
    assert run_as("fine", fine, fine_valid) == (want_fine, fine_top)  # and the fine adapter did not move
    for key, value in base_tensors(model).items():
        assert torch.equal(value, fresh[key]), key  # nor did the base, BatchNorm running statistics included


def test_an_adapter_refuses_data_with_other_classes(coarse_run):
    from lorakit.tasks.vision_runs import load_vision_adapter

    _, coarse = load_vision_adapter(coarse_run / "adapter", overrides=["data.train=fashion-mnist", *DATA])
    with pytest.raises(ValueError, match=r"data.train=fashion-mnist has the classes \['T-shirt/top'.*trained for "
                                         r"\['tops', 'bottoms', 'footwear', 'bags'\]"):
        coarse.examples()
