"""Batching: length grouping cuts padding, first-fit packing, and a packed row's logits equal to
each example run alone (fp32, tolerance FP32_ATOL from tests/tiny_models.py)."""

import random

import pytest
import torch

from lorakit.data.batching import (Packed, _first_fit, block_causal_mask, collate, length_grouped_batches, pack,
                                   padding_fraction)
from lorakit.data.render import IGNORE, Example
from tests.tiny_models import FP32_ATOL, VOCAB, tiny_llama


def examples_of(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(0, VOCAB, (n,), generator=g).tolist()
        out.append(Example(ids, [IGNORE] * (n // 3) + ids[n // 3:]))  # a masked prompt, then the response
    return out


def test_length_grouping_is_deterministic_complete_and_cuts_padding():
    rng = random.Random(0)
    examples = examples_of([rng.randint(4, 200) for _ in range(400)])
    batches = length_grouped_batches(examples, batch_size=8, seed=1, epoch=0)
    assert sorted(i for b in batches for i in b) == list(range(400))
    assert all(len(b) == 8 for b in batches)
    assert batches == length_grouped_batches(examples, batch_size=8, seed=1, epoch=0)
    assert batches != length_grouped_batches(examples, batch_size=8, seed=1, epoch=1)
    assert batches != length_grouped_batches(examples, batch_size=8, seed=2, epoch=0)
    order = list(range(400))
    rng.shuffle(order)
    random_batches = [order[k: k + 8] for k in range(0, 400, 8)]
    grouped = padding_fraction([[examples[i] for i in b] for b in batches])
    shuffled = padding_fraction([[examples[i] for i in b] for b in random_batches])
    assert grouped < 0.1 < 0.4 < shuffled  # ~0.03 vs ~0.5 for uniform lengths in [4, 200]
    with pytest.raises(ValueError, match="batch_size=0 must be >= 1"):
        length_grouped_batches(examples, batch_size=0, seed=0, epoch=0)


def test_padding_fraction_counts_pad_tokens_over_all_tokens():
    rows = examples_of([4, 2, 3, 3])
    assert padding_fraction([rows[:2], rows[2:]]) == pytest.approx(2 / 14)
    assert padding_fraction([]) == 0.0


def test_first_fit_puts_each_item_in_the_first_bin_with_room():
    assert _first_fit([5, 9, 3, 12, 7, 2], 16) == [[0, 1, 5], [2, 3], [4]]
    rng = random.Random(0)
    for _ in range(20):  # against the plain O(n * bins) first-fit
        lengths = [rng.randint(1, 32) for _ in range(rng.randint(0, 60))]
        bins, room = [], []
        for i, n in enumerate(lengths):
            b = next((b for b, r in enumerate(room) if r >= n), len(bins))
            if b == len(bins):
                bins.append([]), room.append(32)
            bins[b].append(i)
            room[b] -= n
        assert _first_fit(lengths, 32) == bins


def test_pack_restarts_positions_and_ignores_each_segment_start():
    examples = examples_of([5, 9, 3, 12, 7, 2])
    rows = pack(examples, max_tokens=16)
    assert [r.segment for r in rows] == [[0] * 5 + [1] * 9 + [2] * 2, [0] * 3 + [1] * 12, [0] * 7]
    first = rows[0]
    assert first.input_ids == examples[0].input_ids + examples[1].input_ids + examples[5].input_ids
    assert first.position_ids == list(range(5)) + list(range(9)) + list(range(2))
    assert first.labels == sum(([IGNORE] + examples[k].labels[1:] for k in (0, 1, 5)), [])
    with pytest.raises(ValueError, match="1 examples are longer than max_tokens=10 .*example 1: 12 tokens"):
        pack(examples_of([3, 12]), max_tokens=10)


def test_collate_pads_right_and_masks_padding():
    batch = collate([Example([1, 2, 3], [IGNORE, 2, 3]), Example([4], [4])], pad_id=0)
    assert set(batch) == {"input_ids", "labels", "attention_mask"}
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE, 2, 3], [4, IGNORE, IGNORE]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    with pytest.raises(ValueError, match="packed and unpacked rows together"):
        collate([Example([1], [1]), Packed([1], [IGNORE], [0], [0])], pad_id=0)


def test_block_causal_mask_lets_a_token_see_earlier_tokens_of_its_own_segment():
    segment = torch.tensor([[0, 0, 1, 1, 1, -1]])  # -1: padding
    mask = block_causal_mask(segment, torch.bfloat16)
    assert mask.shape == (1, 1, 6, 6) and mask.dtype == torch.bfloat16
    allowed = torch.tensor([
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [0, 0, 1, 0, 0, 0],
        [0, 0, 1, 1, 0, 0],
        [0, 0, 1, 1, 1, 0],
        [0, 0, 0, 0, 0, 1],  # padding sees itself only: no all-masked softmax row
    ], dtype=torch.bool)
    assert torch.equal(mask[0, 0] == 0, allowed)
    assert (mask[0, 0][~allowed] == torch.finfo(torch.bfloat16).min).all()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_logits_and_loss_equal_each_example_alone(attn):
    from lorakit.tasks.losses import causal_lm_loss

    model = tiny_llama()
    model.set_attn_implementation(attn)
    examples = examples_of([5, 9, 3, 12, 7, 2])
    rows = pack(examples, max_tokens=16)  # rows of 16, 15 and 7 tokens: the last two padded
    batch = collate(rows, pad_id=0)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       position_ids=batch["position_ids"]).logits  # (B, T, V)
        assert torch.isfinite(logits).all()
        members = iter([[0, 1, 5], [2, 3], [4]])
        for b, row in enumerate(rows):
            start = 0
            for k in next(members):
                n = len(examples[k].input_ids)
                alone = model(input_ids=torch.tensor([examples[k].input_ids])).logits[0]  # (n, V)
                torch.testing.assert_close(logits[b, start: start + n], alone, atol=FP32_ATOL, rtol=0)
                start += n
        # the packed loss is the token-weighted mean of the examples' losses
        loss = causal_lm_loss(model, **batch)
        counts = [sum(y != IGNORE for y in e.labels[1:]) for e in examples]
        alone = [causal_lm_loss(model, **collate([e], pad_id=0)) * c for e, c in zip(examples, counts)]
        torch.testing.assert_close(loss, sum(alone) / sum(counts), atol=FP32_ATOL, rtol=0)
