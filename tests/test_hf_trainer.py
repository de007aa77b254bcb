"""A lorakit-injected model trains under Hugging Face's Trainer, for users who stay in that ecosystem."""

import pytest
import torch

import lorakit
from tiny_models import tiny_llama

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")


@pytest.mark.parametrize("quantized", [False, True])
def test_one_trainer_step_updates_only_the_adapter(tmp_path, quantized):
    model = tiny_llama()
    if quantized:
        lorakit.quantize_(model, lorakit.IntNConfig(bits=4, group_size=32))
    lorakit.inject_adapters(model, lorakit.LoraConfig(r=4, alpha=8, target_modules="all-linear",
                                                      group_size=32 if quantized else None))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    gen = torch.Generator().manual_seed(0)
    rows = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 128, (8, 16), generator=gen)]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=4, learning_rate=1e-2,
        report_to=[], save_strategy="no", use_cpu=True, logging_steps=1, disable_tqdm=True,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=rows)
    out = trainer.train()
    assert out.global_step == 1 and torch.isfinite(torch.tensor(out.training_loss))
    after = dict(model.named_parameters())
    assert any(not torch.equal(before[n], after[n]) for n in before if n.endswith(".B"))  # B moved off zero
    assert all(torch.equal(frozen[n], after[n]) for n in frozen)  # the base did not move
    lorakit.save_adapter(model, tmp_path / "adapter")  # and the result saves as usual
