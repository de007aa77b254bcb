"""Property and fuzz tests for what users feed lorakit: data files, quantized weights, GGUF blocks,
PEFT adapter configs and run configs.

The rule under test: any input gives a result, or a ValueError / FileNotFoundError whose message
names the file (or value) at fault; never a raw KeyError, TypeError, UnicodeDecodeError,
OverflowError, RecursionError, ... from deep inside. `clear_error` enforces it (exact types: a
UnicodeDecodeError or pyarrow's ArrowInvalid is a ValueError subclass, but not a clear one).
"""

from __future__ import annotations

import csv
import io
import json
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hypothesis import event, given, settings
from hypothesis.control import currently_in_test_context
from hypothesis import strategies as st
from torch import nn

import lorakit
from lorakit.data.batching import collate, length_grouped_batches, pack, random_batches
from lorakit.data.records import ROLES, Dataset, read_records
from lorakit.data.render import IGNORE, Example
from lorakit.formats.peft import (
    CONFIG_FILE, PEFT_FIELDS_IGNORED, PEFT_FIELDS_MAPPED, PEFT_FIELDS_UNSUPPORTED, QALORA_FIELDS, WEIGHTS_FILE,
)
from lorakit.quant.blockwise import CODES, WEIGHT_TYPES
from lorakit.quant.intn import BITS, IntNWeight
from lorakit.training.run_config import RunConfig, load_config

CLEAR = (ValueError, FileNotFoundError)


def clear_error(call, *names):
    """call()'s result, or the clear error it raised: exactly a ValueError or FileNotFoundError whose
    message contains every one of `names`. Any other exception propagates and fails the test."""
    try:
        result = call()
    except CLEAR as e:
        assert type(e) in CLEAR, f"raw {type(e).__module__}.{type(e).__name__} instead of a clear error: {e}"
        missing = [str(n) for n in names if str(n) not in str(e)]
        assert not missing, f"error does not name {missing}: {e}"
        note_outcome("clear error: " + re.sub(r"\S*/tmp\w*|[\d(][^;]*", "", str(e))[:40])
        return e
    note_outcome("result")
    return result


def note_outcome(what: str) -> None:
    """Count outcomes, to see that a property is not vacuous: pytest --hypothesis-show-statistics."""
    if currently_in_test_context():
        event(what)


@contextmanager
def scratch():
    """A fresh directory per example (pytest's tmp_path is one per test, not per hypothesis example)."""
    with tempfile.TemporaryDirectory() as d:
        yield Path(d)


def mutate(data: bytes, edits: list[tuple[int, int, bytes]]) -> bytes:
    """Apply (position, bytes to delete, bytes to insert) edits, positions taken modulo the length."""
    b = bytearray(data)
    for at, drop, insert in edits:
        at = at % (len(b) + 1)
        b[at:at + drop] = insert
    return bytes(b)


EDITS = st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 3), st.binary(max_size=3)), min_size=1, max_size=4)


# ------------------------------------------------------------------------------------------------
# 1. Records: read_records(path, shape)

SHAPE_ARGS = st.sampled_from(["auto", "text", "instruction", "chat"])
# Any text but lone surrogates (not encodable as UTF-8): control characters, U+2028, NEL, NUL, BOM included.
TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)
NONBLANK = st.builds("{}{}{}".format, TEXT, st.characters(blacklist_categories=("Cs", "Zs", "Zl", "Zp", "Cc")), TEXT)


def messages():
    message = st.fixed_dictionaries({"role": st.sampled_from(ROLES), "content": TEXT})
    assistant = st.fixed_dictionaries({"role": st.just("assistant"), "content": TEXT})
    return st.tuples(st.lists(message, max_size=3), assistant, st.lists(message, max_size=2)).map(
        lambda t: t[0] + [t[1]] + t[2])


ROWS = {  # valid rows of each shape, as written (normalise() gives what read_records returns)
    "text": st.fixed_dictionaries({"text": NONBLANK}),
    "instruction": st.fixed_dictionaries({"instruction": NONBLANK, "output": NONBLANK},
                                         optional={"input": st.none() | TEXT}),
    "chat": st.fixed_dictionaries({"messages": messages()}),
}
EXTRA = st.dictionaries(st.sampled_from(["id", "source", "score", "text"]), st.integers() | TEXT, max_size=2)


def normalise(row: dict, shape: str) -> dict:
    if shape == "text":
        return {"text": row["text"]}
    if shape == "instruction":
        return {"instruction": row["instruction"], "input": row.get("input") or "", "output": row["output"]}
    return {"messages": [{"role": m["role"], "content": m["content"]} for m in row["messages"]]}


def json_lines(values, ensure_ascii=True, blank=()) -> tuple[str, list[int]]:
    """JSON Lines text of `values`, k % 3 copies of the blank line blank[k] before value k; and each value's line."""
    out, lines = [], []
    for k, value in enumerate(values):
        if k < len(blank):
            out += [blank[k]] * (k % 3)
        out.append(json.dumps(value, ensure_ascii=ensure_ascii))
        lines.append(len(out))
    return "\n".join(out) + "\n", lines


def csv_text(header: list[str], records: list[list[str]]) -> tuple[str, list[int]]:
    """CSV text (csv module defaults) and the physical line each record starts on."""
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer)
    writer.writerow(header)
    starts = []
    for record in records:
        starts.append(len(re.findall(r"\r\n|\r|\n", buffer.getvalue())) + 1)
        writer.writerow(record)
    return buffer.getvalue(), starts


def write_parquet(path: Path, rows: list[dict]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)


def parquet_bytes(rows: list[dict]) -> bytes:
    with scratch() as d:
        write_parquet(d / "x.parquet", rows)
        return (d / "x.parquet").read_bytes()


VALID_PARQUET = [
    parquet_bytes([{"text": f"row {i}"} for i in range(6)]),
    parquet_bytes([{"instruction": "Add.", "input": str(i), "output": str(i + 1)} for i in range(6)]),
    parquet_bytes([{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": f"{i}"}]}
                   for i in range(3)]),
]
VALID_TEXT = [
    json_lines([{"text": "a"}, {"instruction": "b", "input": None, "output": "c"}])[0],
    json_lines([{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}])[0],
    "text\nfirst\n\"second, with a comma\"\n",
    "instruction,input,output\nAdd.,1 2,3\n\"multi\nline\",,x\n",
]


def check_dataset_or_clear_error(path: Path, shape: str):
    """read_records gives a Dataset of one shape with a line per row, or a clear error naming the file."""
    result = clear_error(lambda: read_records(path, shape), path)
    if isinstance(result, Dataset):
        assert result.shape in ("text", "instruction", "chat") and shape in ("auto", result.shape)
        assert len(result.rows) == len(result.line) > 0
    return result


@settings(max_examples=250, deadline=None)
@given(suffix=st.sampled_from([".jsonl", ".json", ".csv"]), shape=SHAPE_ARGS,
       data=st.binary(max_size=200) | st.builds(mutate, st.sampled_from(VALID_TEXT).map(str.encode), EDITS))
def test_any_bytes_in_a_text_data_file_are_records_or_a_clear_error(suffix, shape, data):
    with scratch() as d:
        path = d / f"train{suffix}"
        path.write_bytes(data)
        check_dataset_or_clear_error(path, shape)


@settings(max_examples=150, deadline=None)
@given(shape=SHAPE_ARGS,
       data=st.builds(mutate, st.sampled_from(VALID_PARQUET), EDITS)
       | st.builds(lambda a, b: b"PAR1" + a + b"PAR1", st.binary(max_size=100), st.just(b""))
       | st.binary(max_size=100))
def test_any_bytes_in_a_parquet_file_are_records_or_a_clear_error(shape, data):
    with scratch() as d:
        path = d / "train.parquet"
        path.write_bytes(data)
        check_dataset_or_clear_error(path, shape)


JSON_KEYS = st.sampled_from(["text", "instruction", "input", "output", "messages", "role", "content"]) | TEXT
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | TEXT | st.sampled_from(ROLES),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(JSON_KEYS, inner, max_size=4),
    max_leaves=12,
)
ANY_ROW = st.one_of(*ROWS.values()) | JSON


def _where(path: Path, array: bool) -> re.Pattern:
    return re.compile(re.escape(str(path)) + (r": row (\d+): " if array else r":(\d+): "))


@settings(max_examples=300, deadline=None)
@given(values=st.lists(ANY_ROW, min_size=1, max_size=6), shape=SHAPE_ARGS, array=st.booleans(),
       ensure_ascii=st.booleans(), blank=st.lists(st.sampled_from(["", "  ", "\t", "\r"]), max_size=6))
def test_any_json_rows_are_records_or_an_error_naming_the_first_bad_line(values, shape, array, ensure_ascii, blank):
    """Every row is checked up front: the error names file:line (JSON Lines) or file: row n (a JSON
    array) of the first bad row, and the rows before it read fine on their own."""
    with scratch() as d:
        def write(name, rows):
            path = d / (name + (".json" if array else ".jsonl"))
            if array:
                path.write_text(json.dumps(rows, ensure_ascii=ensure_ascii), encoding="utf-8")
                return path, list(range(1, len(rows) + 1))
            text, lines = json_lines(rows, ensure_ascii, blank)
            path.write_text(text, encoding="utf-8", newline="")
            return path, lines

        path, lines = write("train", values)
        result = clear_error(lambda: read_records(path, shape), path)
        if isinstance(result, Dataset):
            assert result.line == lines and len(result.rows) == len(values)
            assert result.numbering == ("row" if array else "line")
            return
        where = _where(path, array).match(str(result))
        assert where, f"error does not start with the file and line: {result}"
        k = lines.index(int(where.group(1)))
        if k:  # the rows before the bad one are fine (in the shape taken from the first row)
            head = read_records(write("head", values[:k])[0], shape)
            shape = head.shape
        with pytest.raises(ValueError):
            read_records(write("bad", [values[k]])[0], shape)


@settings(max_examples=200, deadline=None)
@given(data=st.data(), shape=st.sampled_from(["text", "instruction", "chat"]),
       fmt=st.sampled_from(["jsonl", "jsonl-unicode", "json", "csv", "parquet"]), auto=st.booleans())
def test_valid_rows_of_every_shape_read_back_equal(data, shape, fmt, auto):
    if fmt == "csv" and shape == "chat":
        fmt = "jsonl"  # CSV cells are strings: no chat rows
    rows = data.draw(st.lists(ROWS[shape], min_size=1, max_size=5), label="rows")
    with scratch() as d:
        if fmt.startswith("jsonl"):
            extras = data.draw(st.lists(EXTRA, min_size=len(rows), max_size=len(rows)), label="extra keys")
            written = [{**extra, **row} for extra, row in zip(extras, rows)]
            path = d / "train.jsonl"
            text, lines = json_lines(written, ensure_ascii=fmt == "jsonl")
            path.write_text(text, encoding="utf-8", newline="")
        elif fmt == "json":
            path, lines = d / "train.json", list(range(1, len(rows) + 1))
            path.write_text(json.dumps(rows), encoding="utf-8")
        elif fmt == "csv":
            # Python 3.10's csv module refuses NUL ("line contains NUL"; a clear error there): leave it out.
            rows = [{k: v.replace("\x00", "") if isinstance(v, str) else v for k, v in r.items()} for r in rows]
            header = ["text"] if shape == "text" else ["instruction", "input", "output"]
            text, lines = csv_text(header, [[normalise(r, shape)[k] for k in header] for r in rows])
            path = d / "train.csv"
            path.write_text(text, encoding="utf-8", newline="")
        else:
            if shape == "instruction":  # one schema for every row: input present in all or in none
                has_input = "input" in rows[0]
                rows = [{**r, "input": r.get("input")} if has_input else {k: v for k, v in r.items() if k != "input"}
                        for r in rows]
            path, lines = d / "train.parquet", list(range(1, len(rows) + 1))
            write_parquet(path, rows)
        ds = read_records(path, "auto" if auto else shape)
    assert ds.shape == shape
    assert ds.rows == [normalise(r, shape) for r in rows]
    assert ds.line == lines


def test_line_breaks_long_cells_and_bad_utf8_found_by_fuzzing(tmp_path):
    # A JSON string may hold U+2028, U+2029 and NEL unescaped (json.dumps(ensure_ascii=False) writes them):
    # they are not line breaks.
    path = tmp_path / "train.jsonl"
    path.write_text('{"text": "a\u2028b\x85c"}\r\n{"text": "d\u2029"}\n', encoding="utf-8")
    ds = read_records(path)
    assert ds.rows == [{"text": "a\u2028b\x85c"}, {"text": "d\u2029"}] and ds.line == [1, 2]
    # A CSV cell longer than the csv module's default limit (131,072 characters); the limit is restored.
    limit, long = csv.field_size_limit(), "x" * 200_000
    path = tmp_path / "train.csv"
    path.write_text(f'text\n"{long}"\nshort\n', encoding="utf-8")
    assert read_records(path).rows == [{"text": long}, {"text": "short"}] and csv.field_size_limit() == limit
    # Bytes that are not UTF-8: the error names the line and the byte (counted with the BOM).
    data = b'\xef\xbb\xbf{"text": "a"}\n{"text": "\xff"}\n'
    at = data.index(b"\xff")
    for path in (tmp_path / "bad.jsonl", tmp_path / "bad.csv"):
        path.write_bytes(data)
        with pytest.raises(ValueError, match=re.escape(f"{path}:2: not UTF-8 text (byte {at}: ")):
            read_records(path)


def test_shape_none_or_unknown_is_a_clear_error(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"text": "a"}\n')
    for shape in (None, "Text", "", ["text"]):
        with pytest.raises(ValueError, match="is not one of auto, text, instruction, chat"):
            read_records(path, shape)
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        read_records(tmp_path / "missing.jsonl")


# ------------------------------------------------------------------------------------------------
# 2. Batching: pack, collate, length_grouped_batches

def examples(lengths: list[int], seed: int = 0) -> list[Example]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(0, 1000, (n,), generator=g).tolist()
        out.append(Example(ids, [IGNORE] * (n // 3) + ids[n // 3:]))
    return out


@settings(max_examples=150, deadline=None)
@given(lengths=st.lists(st.integers(1, 40), max_size=40), max_tokens=st.integers(1, 64), seed=st.integers(0, 99))
def test_pack_places_every_example_once_whole_within_max_tokens(lengths, max_tokens, seed):
    exs = examples(lengths, seed)
    if any(n > max_tokens for n in lengths):
        first = next(k for k, n in enumerate(lengths) if n > max_tokens)
        with pytest.raises(ValueError, match=rf"longer than max_tokens={max_tokens} \(example {first}: "):
            pack(exs, max_tokens)
        return
    rows = pack(exs, max_tokens)
    seen = []
    for row in rows:
        T = len(row.input_ids)
        assert 0 < T <= max_tokens
        assert len(row.labels) == len(row.position_ids) == len(row.segment) == T
        starts = [t for t in range(T) if row.position_ids[t] == 0]
        assert starts[0] == 0 and row.segment == sorted(row.segment)
        for s, (a, b) in enumerate(zip(starts, starts[1:] + [T])):
            assert row.segment[a:b] == [s] * (b - a) and row.position_ids[a:b] == list(range(b - a))
            assert row.labels[a] == IGNORE
            # the segment is one whole example, in the given order within the row
            match = [k for k, e in enumerate(exs) if e.input_ids == row.input_ids[a:b]
                     and e.labels[1:] == row.labels[a + 1:b] and k not in seen]
            assert match, "a segment is not a whole example"
            seen.append(match[0])
    assert sorted(seen) == list(range(len(exs)))


@settings(max_examples=30, deadline=None)
@given(lengths=st.lists(st.integers(0, 8), min_size=1, max_size=6))
def test_pack_refuses_an_empty_example(lengths):
    exs = examples(lengths)
    if 0 in lengths:
        with pytest.raises(ValueError, match=f"example {lengths.index(0)} has no tokens"):
            pack(exs, 16)
    else:
        assert all(len(r.labels) == len(r.input_ids) for r in pack(exs, 16))


@settings(max_examples=60, deadline=None)
@given(lengths=st.lists(st.integers(1, 12), min_size=1, max_size=12), max_tokens=st.integers(12, 24),
       batch=st.integers(1, 4), pad_id=st.integers(0, 5), dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_collate_shapes_and_a_causal_mask_within_segments_only(lengths, max_tokens, batch, pad_id, dtype):
    exs = examples(lengths)
    plain = collate(exs[:batch], pad_id)
    B, T = min(batch, len(exs)), max(lengths[:batch])
    assert {k: tuple(v.shape) for k, v in plain.items()} == {k: (B, T) for k in ("input_ids", "labels", "attention_mask")}
    assert plain["attention_mask"].sum(1).tolist() == lengths[:batch]
    rows = pack(exs, max_tokens)[:batch]
    out = collate(rows, pad_id, dtype=dtype)
    B, T = len(rows), max(len(r.input_ids) for r in rows)
    assert {k: tuple(v.shape) for k, v in out.items() if k != "attention_mask"} == {
        "input_ids": (B, T), "labels": (B, T), "position_ids": (B, T)}
    mask = out["attention_mask"]
    assert mask.shape == (B, 1, T, T) and mask.dtype == dtype
    segment = torch.full((B, T), -1)
    for b, r in enumerate(rows):
        segment[b, : len(r.segment)] = torch.tensor(r.segment)
        assert out["input_ids"][b, len(r.input_ids):].eq(pad_id).all()
        assert out["labels"][b, len(r.labels):].eq(IGNORE).all()
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    allowed = (segment[:, :, None] == segment[:, None, :]) & (j <= i)  # padding (-1) sees padding only
    assert torch.equal(mask[:, 0] == 0, allowed)
    assert torch.equal(mask[:, 0][~allowed], torch.full_like(mask[:, 0][~allowed], torch.finfo(dtype).min))
    with pytest.raises(ValueError, match="packed and unpacked"):
        collate([rows[0], exs[0]], pad_id)


@settings(max_examples=80, deadline=None)
@given(lengths=st.lists(st.integers(1, 50), max_size=120), batch_size=st.integers(1, 9),
       seed=st.integers(0, 2**32), epoch=st.integers(0, 20))
def test_length_grouped_batches_partition_the_indices_deterministically(lengths, batch_size, seed, epoch):
    exs = [Example([0] * n, [0] * n) for n in lengths]
    batches = length_grouped_batches(exs, batch_size, seed, epoch)
    assert sorted(i for b in batches for i in b) == list(range(len(exs)))
    assert all(1 <= len(b) <= batch_size for b in batches)
    assert sum(len(b) < batch_size for b in batches) <= 1  # only the last mega-chunk can leave a short batch
    assert batches == length_grouped_batches(exs, batch_size, seed, epoch)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 120), batch_size=st.integers(1, 9), seed=st.integers(0, 2**32), epoch=st.integers(0, 20))
def test_random_batches_partition_the_indices_deterministically(n, batch_size, seed, epoch):
    batches = random_batches(n, batch_size, seed, epoch)
    assert sorted(i for b in batches for i in b) == list(range(n))
    assert all(len(b) == batch_size for b in batches[:-1]) and all(1 <= len(b) <= batch_size for b in batches)
    assert batches == random_batches(n, batch_size, seed, epoch)
    if n >= 20:  # another epoch, another order
        assert batches != random_batches(n, batch_size, seed, epoch + 1)


# ------------------------------------------------------------------------------------------------
# 3. Quantized weights: shapes and the grid

def weight(out_features, in_features, seed, scale, ties):
    w = torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(seed)) * scale
    return (w * ties).round() / ties if ties else w  # ties: coarse values, so constant groups and repeats occur


WEIGHT = dict(seed=st.integers(0, 2**16), scale=st.sampled_from([1e-4, 1.0, 300.0]), ties=st.sampled_from([0, 1, 4]))


@settings(max_examples=120, deadline=None)
@given(out_features=st.integers(1, 6), n_groups=st.integers(1, 5), group_size=st.integers(1, 40),
       bits=st.sampled_from(BITS), fp16=st.booleans(), **WEIGHT)
def test_intn_dequantizes_to_its_shape_on_each_groups_grid(out_features, n_groups, group_size, bits, fp16,
                                                           seed, scale, ties):
    in_features = n_groups * group_size
    w = weight(out_features, in_features, seed, scale, ties)
    q = IntNWeight.from_float(w, bits, group_size, scale_dtype=torch.float16 if fp16 else torch.float32)
    wq = q.dequantize()
    assert wq.shape == (out_features, in_features) and wq.dtype == w.dtype and torch.isfinite(wq).all()
    assert q.scale.shape == q.offset.shape == (out_features, n_groups)
    s = q.scale.repeat_interleave(group_size, 1)
    m = q.offset.repeat_interleave(group_size, 1)
    codes = ((wq - m) / s).round()
    assert codes.min() >= 0 and codes.max() <= 2**bits - 1
    assert torch.equal(codes * s + m, wq)  # an integer code on the group's grid, exactly
    assert torch.equal(codes.to(torch.uint8), q.q())
    if not fp16:  # round to nearest: at most half a step from the weight
        assert ((wq - w).abs() <= s / 2 * (1 + 1e-5) + 1e-6 * w.abs()).all()


@settings(max_examples=40, deadline=None)
@given(in_features=st.integers(1, 200), group_size=st.integers(1, 300), bits=st.integers(-1, 9))
def test_intn_bad_group_size_or_bits_names_the_numbers(in_features, group_size, bits):
    w = torch.randn(2, in_features)
    if bits not in BITS:
        with pytest.raises(ValueError, match=rf"bits={bits} is not supported; choose one of \[2, 3, 4, 5, 8\]"):
            IntNWeight.from_float(w, bits, group_size)
    elif in_features % group_size:
        with pytest.raises(ValueError) as e:
            IntNWeight.from_float(w, bits, group_size)
        assert f"group_size={group_size} does not divide" in str(e.value) and f"input size {in_features}" in str(e.value)
    else:
        assert IntNWeight.from_float(w, bits, group_size).dequantize().shape == (2, in_features)


@pytest.mark.parametrize("w, match", [
    (torch.zeros(0, 32), r"non-empty .* got shape \(0, 32\)"),
    (torch.zeros(3, 0), r"non-empty .* got shape \(3, 0\)"),
    (torch.tensor([[0.0, float("nan"), 1.0, 2.0]]), "non-finite"),
    (torch.tensor([[0.0, float("inf"), 1.0, 2.0]]), "non-finite"),
    (torch.tensor([[-3e38, 3e38, 1.0, 2.0]]), "beyond float32"),
])
def test_intn_refuses_weights_it_cannot_put_on_a_grid(w, match):
    with pytest.raises(ValueError, match=match):
        IntNWeight.from_float(w, 4, 2)


def test_intn_fp16_scales_refuse_a_group_beyond_float16():
    w = torch.tensor([[0.0, 1.0, -2.0, 3.0], [0.0, 1e6, 1.0, 2.0]])  # scale 1e6 / 15 > 65504
    with pytest.raises(ValueError, match=r"row 1, group 0 spans 0 to 1e\+06, beyond float16's range .* keep scale_dtype"):
        IntNWeight.from_float(w, 4, 2, scale_dtype=torch.float16)


@settings(max_examples=40, deadline=None)
@given(quant_type=st.sampled_from(sorted(WEIGHT_TYPES)), out_features=st.integers(1, 5), in_features=st.integers(1, 70),
       block_size=st.sampled_from([2, 4, 6, 64]), double_quant=st.booleans(), **WEIGHT)
def test_blockwise_dequantizes_to_its_shape_on_each_blocks_code_table(quant_type, out_features, in_features,
                                                                      block_size, double_quant, seed, scale, ties):
    """(tests/quant/test_blockwise.py covers stability and error bounds; this is the shape and code-table property.)"""
    w = weight(out_features, in_features, seed, scale, ties)
    q = WEIGHT_TYPES[quant_type].from_float(w, block_size=block_size, double_quant=double_quant,
                                            double_quant_block_size=4)
    wq = q.dequantize()
    assert wq.shape == (out_features, in_features) and torch.isfinite(wq).all()
    absmax = q.block_absmax().repeat_interleave(block_size)[: w.numel()]
    nibbles = torch.stack([q.codes >> 4, q.codes & 0xF], -1).reshape(-1)[: w.numel()].long()
    assert torch.equal(wq.reshape(-1), CODES[quant_type][nibbles] * absmax)


# ------------------------------------------------------------------------------------------------
# 4. GGUF 32-weight blocks

try:
    from lorakit.formats import gguf_blocks
except ImportError:  # the gguf package is the [hf] extra
    gguf_blocks = None
needs_gguf = pytest.mark.skipif(gguf_blocks is None, reason="needs the gguf package")
QTYPES = sorted(gguf_blocks.TYPES, key=lambda t: t.name) if gguf_blocks else [None]


@needs_gguf
@settings(max_examples=60, deadline=None)
@given(qtype=st.sampled_from(QTYPES), rows=st.integers(1, 4), nb=st.integers(1, 3), seed=st.integers(0, 2**32 - 1),
       special=st.lists(st.sampled_from([0x0000, 0x8000, 0x0001, 0x03FF, 0x7BFF, 0x7C00, 0xFC00, 0x7E00, 0x7C01]),
                        max_size=4))
def test_gguf_blocks_encode_then_decode_gives_the_same_codes_and_scales(qtype, rows, nb, seed, special):
    t = gguf_blocks.TYPES[qtype]
    cols = nb * gguf_blocks.BLOCK
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 2**t.bits, (rows, cols), dtype=np.uint8)

    def halves():  # any fp16 bit pattern, and some special ones: 0, -0, subnormals, max, inf, NaN
        bits = rng.integers(0, 2**16, rows * nb, dtype=np.uint16)
        bits[: len(special)] = special[: bits.size]
        return bits.view(np.float16).reshape(rows, nb)

    blocks = gguf_blocks.Blocks(codes, halves(), halves() if t.has_offset else None)
    raw = gguf_blocks.encode(blocks, qtype)
    assert raw.dtype == np.uint8 and raw.shape == (rows, nb * t.bytes_per_block)
    for source in (raw, raw.tobytes()):
        back = gguf_blocks.decode(source, qtype, (rows, cols))
        assert np.array_equal(back.codes, codes)
        assert np.array_equal(back.d.view(np.uint16), blocks.d.view(np.uint16))
        assert (back.m is None) == (blocks.m is None)
        assert back.m is None or np.array_equal(back.m.view(np.uint16), blocks.m.view(np.uint16))
        with np.errstate(invalid="ignore", over="ignore"):  # inf · 0 for the special values
            assert np.array_equal(gguf_blocks.dequantize(back, qtype), gguf_blocks.dequantize(blocks, qtype),
                                  equal_nan=True)


@needs_gguf
@settings(max_examples=40, deadline=None)
@given(qtype=st.sampled_from(QTYPES), rows=st.integers(1, 4),
       nb=st.integers(1, 3), delta=st.integers(1, 40).map(lambda k: k if k % 2 else -k // 2), as_bytes=st.booleans())
def test_gguf_blocks_of_the_wrong_length_are_a_clear_error(qtype, rows, nb, delta, as_bytes):
    t = gguf_blocks.TYPES[qtype]
    n = max(rows * nb * t.bytes_per_block + delta, 0)
    raw = np.zeros(n, np.uint8)
    shape = (rows, nb * gguf_blocks.BLOCK)
    with pytest.raises(ValueError) as e:
        gguf_blocks.decode(raw.tobytes() if as_bytes else raw, qtype, shape)
    assert type(e.value) is ValueError
    assert f"takes {rows * nb * t.bytes_per_block} bytes" in str(e.value) and f"got {n}" in str(e.value)


# ------------------------------------------------------------------------------------------------
# 5. PEFT adapter_config.json

class TwoLinears(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(8, 8)
        self.v_proj = nn.Linear(8, 8)


@pytest.fixture(scope="module")
def adapter(tmp_path_factory) -> Path:
    """A valid adapter directory (two rank-2 LoRA layers) to corrupt the config of. Its weights are
    rewritten without lorakit's record of the config they were saved with, as PEFT writes them: else
    any edited config is refused for not being that one, before it is parsed."""
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    model = TwoLinears()
    lorakit.inject_adapters(model, lorakit.LoraConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj"]))
    directory = lorakit.save_adapter(model, tmp_path_factory.mktemp("adapter"))
    save_file(load_file(directory / WEIGHTS_FILE), directory / WEIGHTS_FILE, metadata={"format": "pt"})
    assert lorakit.load_adapter(TwoLinears(), directory) == ["q_proj", "v_proj"]
    return directory


def load_with_config(adapter: Path, config: bytes):
    """load_adapter on a copy of `adapter` whose adapter_config.json holds `config`; result or clear error."""
    with scratch() as d:
        shutil.copy(adapter / WEIGHTS_FILE, d / WEIGHTS_FILE)
        (d / CONFIG_FILE).write_bytes(config)
        return clear_error(lambda: lorakit.load_adapter(TwoLinears(), d), d)


KNOWN = sorted(set(PEFT_FIELDS_MAPPED) | PEFT_FIELDS_IGNORED | set(PEFT_FIELDS_UNSUPPORTED) | set(QALORA_FIELDS))
PLAUSIBLE = st.sampled_from([None, True, False, 0, 1, 2, 4, 8, -1, 0.5, 1e308, 10**400, "", "LORA", "gaussian",
                             "none", "lora_only", "all", ["q_proj"], [], {}, {"q_proj": 2}, {"(": 1},
                             {"v_proj": "x"}, {"q_proj": -1}, {".*": 1e400}, [1, 2], "q_proj"])
CONFIG_VALUES = PLAUSIBLE | JSON


@settings(max_examples=250, deadline=None)
@given(start_valid=st.booleans(), update=st.dictionaries(st.sampled_from(KNOWN), CONFIG_VALUES, max_size=4))
def test_any_adapter_config_loads_or_is_a_clear_error(adapter, start_valid, update):
    config = json.loads((adapter / CONFIG_FILE).read_text()) if start_valid else {}
    result = load_with_config(adapter, json.dumps({**config, **update}).encode())
    if not isinstance(result, Exception):
        assert result == ["q_proj", "v_proj"]


@settings(max_examples=40, deadline=None)
@given(unknown=st.dictionaries(TEXT.filter(lambda k: k not in KNOWN), CONFIG_VALUES, min_size=1, max_size=3))
def test_unknown_adapter_config_fields_are_refused_by_name(adapter, unknown):
    config = json.loads((adapter / CONFIG_FILE).read_text())
    error = load_with_config(adapter, json.dumps({**config, **unknown}).encode())
    assert isinstance(error, ValueError), "an unknown field was accepted"
    assert "does not know" in str(error) and all(repr(k) in str(error) for k in unknown)


@settings(max_examples=120, deadline=None)
@given(config=st.binary(max_size=80) | JSON.map(lambda v: json.dumps(v).encode())
       | st.builds(mutate, st.just(b'{"peft_type": "LORA", "r": 2, "lora_alpha": 4}'), EDITS))
def test_adapter_config_of_any_bytes_is_a_clear_error(adapter, config):
    result = load_with_config(adapter, config)
    if not isinstance(result, Exception):  # only a JSON object of known fields can load
        assert isinstance(json.loads(config), dict)


def test_missing_adapter_files_are_file_not_found(adapter, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        lorakit.load_adapter(TwoLinears(), tmp_path / "nowhere")
    shutil.copy(adapter / WEIGHTS_FILE, tmp_path / WEIGHTS_FILE)
    with pytest.raises(FileNotFoundError, match=CONFIG_FILE):
        lorakit.load_adapter(TwoLinears(), tmp_path)


# ------------------------------------------------------------------------------------------------
# 6. Run config files (tests/test_run_config.py fuzzes overrides and from_dict; these are whole files)

SECTIONS = {name: sorted(value) for name, value in RunConfig().to_dict().items() if isinstance(value, dict)}
YAML_KEYS = st.sampled_from(sorted(RunConfig().to_dict()) + sorted({k for ks in SECTIONS.values() for k in ks}))
YAML_SCALARS = (st.none() | st.booleans() | st.integers() | st.floats() | TEXT
                | st.sampled_from([10**400, -10**400, 2**64, 1e-4, "1e-4", "auto", "all-linear", "qalora", "q_proj", ""]))
YAML_VALUES = st.recursive(
    YAML_SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(YAML_KEYS | st.integers() | TEXT, inner, max_size=3),
    max_leaves=10,
)
RUN_CONFIGS = st.fixed_dictionaries({}, optional={
    "method": YAML_SCALARS, "output_dir": YAML_SCALARS,
    **{name: st.dictionaries(st.sampled_from(keys), YAML_VALUES, max_size=4) | YAML_VALUES
       for name, keys in SECTIONS.items()},
}).flatmap(lambda known: st.dictionaries(YAML_KEYS | TEXT, YAML_VALUES, max_size=1).map(lambda extra: {**extra, **known}))


def check_config_file(data: bytes):
    with scratch() as d:
        path = d / "run.yaml"
        path.write_bytes(data)
        result = clear_error(lambda: load_config(path, []), path)
        assert isinstance(result, (RunConfig, ValueError))
        if isinstance(result, ValueError):
            assert str(result).startswith(str(path)), f"the error should start with the file: {result}"


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=120)
       | st.builds(mutate, st.just(b"method: qlora\ntrain:\n  lr: 1e-4\n  steps: 10\nadapter: {r: 8}\n"), EDITS))
def test_a_run_config_file_of_any_bytes_is_a_config_or_an_error_naming_it(data):
    check_config_file(data)


@settings(max_examples=200, deadline=None)
@given(config=RUN_CONFIGS | YAML_VALUES)
def test_a_run_config_file_of_any_yaml_is_a_config_or_an_error_naming_it(config):
    check_config_file(yaml.safe_dump(config, allow_unicode=True, sort_keys=False).encode())


@pytest.mark.parametrize("text", ["[" * 5000 + "]" * 5000, "a: " + "{b: " * 5000 + "1" + "}" * 5000])
def test_a_deeply_nested_run_config_is_an_error_naming_it(text):
    check_config_file(text.encode())
