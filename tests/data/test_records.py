"""Reading records: formats, shape detection, every bad row named by file and line, the split."""

import json
import sys

import pytest

from lorakit.data.records import read_records, split

CHAT = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                     {"role": "assistant", "content": "Hello."}]}


def write_jsonl(tmp_path, rows, name="train.jsonl"):
    path = tmp_path / name
    path.write_text("".join(r if isinstance(r, str) else json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.mark.parametrize("row, shape", [
    ({"text": "Some text."}, "text"),
    ({"instruction": "Add.", "input": "1 2", "output": "3"}, "instruction"),
    # tatsu-lab/alpaca rows carry a rendered "text" too: still instruction rows
    ({"instruction": "Add.", "input": "", "output": "3", "text": "### Instruction: Add."}, "instruction"),
    (CHAT, "chat"),
])
def test_auto_detects_the_shape_from_the_first_row(tmp_path, row, shape):
    ds = read_records(write_jsonl(tmp_path, [row, row]))
    assert ds.shape == shape and len(ds.rows) == 2 and ds.line == [1, 2]


def test_rows_are_normalised_and_extra_keys_dropped(tmp_path):
    rows = [{"instruction": "Add.", "output": "3", "id": 7}, {"instruction": "Add.", "input": None, "output": "4"}]
    ds = read_records(write_jsonl(tmp_path, rows))
    assert ds.rows == [{"instruction": "Add.", "input": "", "output": "3"},
                       {"instruction": "Add.", "input": "", "output": "4"}]
    chat = {"messages": [{"role": "user", "content": "Hi", "name": "x"}, {"role": "assistant", "content": "Yo"}]}
    assert read_records(write_jsonl(tmp_path, [chat])).rows[0]["messages"][0] == {"role": "user", "content": "Hi"}


def test_blank_lines_are_skipped_and_lines_counted(tmp_path):
    ds = read_records(write_jsonl(tmp_path, ["\n", {"text": "a"}, "  \n", {"text": "b"}]))
    assert ds.line == [2, 4] and ds.where(1).endswith("train.jsonl:4")


@pytest.mark.parametrize("bad, message", [
    ('{"text": "a"\n', 'not valid JSON'),
    ({"instruction": "Add."},
     'instruction row has no "output" (a str); expected keys instruction, input (optional), output'),
    ({"instruction": "Add.", "output": 3}, 'instruction row\'s "output" has type int, expected a str'),
    ({"instruction": "  ", "output": "3"}, 'instruction row\'s "instruction" is empty'),
    ({"text": "x"}, 'instruction row has no "instruction"'),
    ([1, 2], "must be an object, got list"),
])
def test_a_bad_instruction_row_is_named_by_file_and_line(tmp_path, bad, message):
    good = {"instruction": "Add.", "input": "1 2", "output": "3"}
    path = write_jsonl(tmp_path, [good, "\n", good, bad])
    with pytest.raises(ValueError, match=r"train\.jsonl:4: ") as e:
        read_records(path)
    assert message in str(e.value)


@pytest.mark.parametrize("messages, message", [
    ([{"role": "user", "content": "Hi"}], "no assistant message"),
    ([{"role": "tool", "content": "x"}, {"role": "assistant", "content": "Hi"}], "role 'tool'"),
    ([{"role": "user", "content": 5}, {"role": "assistant", "content": "Hi"}], '"content" has type int'),
    ([{"role": "user"}], 'not an object with "role" and "content"'),
    ([], "is an empty list"),
    ("Hi", "has type str"),
])
def test_a_bad_chat_row_is_named(tmp_path, messages, message):
    path = write_jsonl(tmp_path, [CHAT, {"messages": messages}])
    with pytest.raises(ValueError, match=r"train\.jsonl:2: ") as e:
        read_records(path, shape="chat")
    assert message in str(e.value)


def test_text_rows_and_explicit_shape(tmp_path):
    with pytest.raises(ValueError, match=r'train\.jsonl:1: text row\'s "text" is empty'):
        read_records(write_jsonl(tmp_path, [{"text": ""}]))
    with pytest.raises(ValueError, match=r'text row has no "text"'):
        read_records(write_jsonl(tmp_path, [CHAT]), shape="text")
    with pytest.raises(ValueError, match=r"shape='alpaca' is not one of"):
        read_records(write_jsonl(tmp_path, [CHAT]), shape="alpaca")
    with pytest.raises(ValueError, match=r"cannot tell the shape from the first row \(keys: prompt, completion\)"):
        read_records(write_jsonl(tmp_path, [{"prompt": "a", "completion": "b"}]))


def test_empty_file_missing_file_and_unknown_suffix(tmp_path):
    with pytest.raises(ValueError, match="no records"):
        read_records(write_jsonl(tmp_path, ["\n"]))
    with pytest.raises(FileNotFoundError, match="no such data file"):
        read_records(tmp_path / "absent.jsonl")
    with pytest.raises(ValueError, match=r"unknown data format '\.txt'"):
        read_records(tmp_path / "data.txt")


def test_json_array_rows_are_numbered_by_row(tmp_path):
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps([{"instruction": "a", "output": "b"}, {"instruction": "a"}], indent=1))
    with pytest.raises(ValueError, match=r"alpaca\.json: row 2: instruction row has no \"output\""):
        read_records(path)


def test_csv_lines_are_the_physical_start_of_each_record(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text('instruction,input,output\nAdd.,1 2,3\n\n"Two\nlines",,4\nAdd.,,\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"train\.csv:6: instruction row's \"output\" is empty"):
        read_records(path)
    path.write_text('instruction,input,output\nAdd.,1 2,3\n\n"Two\nlines",,4\n', encoding="utf-8")
    ds = read_records(path)
    assert ds.shape == "instruction" and ds.line == [2, 4]
    assert ds.rows[1] == {"instruction": "Two\nlines", "input": "", "output": "4"}


def test_csv_chat_and_extra_cells_are_explained(tmp_path):
    path = tmp_path / "chat.csv"
    path.write_text('messages\n"[]"\n')
    with pytest.raises(ValueError, match="CSV cells are strings: use JSON lines or Parquet"):
        read_records(path)
    path.write_text("text\na,b\n")
    with pytest.raises(ValueError, match=r"chat\.csv:2: 2 cells but the header has 1"):
        read_records(path)


def test_parquet_without_pyarrow_says_how_to_install(tmp_path, monkeypatch):
    path = tmp_path / "train.parquet"
    path.write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow now raises ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ImportError, match="pip install pyarrow"):
        read_records(path)


def test_parquet_rows_are_numbered_by_row(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist([CHAT, {"messages": [{"role": "user", "content": "x"}]}]), path)
    with pytest.raises(ValueError, match=r"train\.parquet: row 2: chat row has no assistant message"):
        read_records(path)
    pq.write_table(pa.Table.from_pylist([CHAT]), path)
    assert read_records(path).rows == [CHAT]


def test_split_is_disjoint_complete_and_deterministic(tmp_path):
    ds = read_records(write_jsonl(tmp_path, [{"text": f"row {i}"} for i in range(40)]))
    train, valid = split(ds, 0.1, seed=3)
    assert len(valid) == 4 and len(train) == 36
    assert sorted(train.line + valid.line) == list(range(1, 41))
    assert train.line == sorted(train.line) and valid.shape == "text"
    assert split(ds, 0.1, seed=3)[1].line == valid.line
    assert split(ds, 0.1, seed=4)[1].line != valid.line
    assert len(split(ds, 0.0, seed=0)[1]) == 0 and len(split(ds, 0.001, seed=0)[1]) == 1
    with pytest.raises(ValueError, match=r"valid_fraction=1.5 must lie in \[0, 1\)"):
        split(ds, 1.5, seed=0)
    tiny = read_records(write_jsonl(tmp_path, [{"text": "only"}]))
    with pytest.raises(ValueError, match="too few"):
        split(tiny, 0.5, seed=0)
