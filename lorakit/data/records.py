"""Training records from a user's file: read, detect the shape, validate every row up front.

Formats, chosen by suffix:

    .jsonl, .json   one JSON object per line (lines end at LF, CRLF or CR, never at U+2028 or NEL,
                    which JSON strings may hold); blank lines are skipped. A .json file holding one
                    JSON array of objects is read as well (its items are numbered as rows).
    .csv            a header row, then one record per row (`csv` module; quoted cells may span
                    lines). Every cell is a str, so CSV holds text and instruction rows only.
    .parquet        one record per table row (needs pyarrow).

Shapes (the keys of one row; any other key is ignored and dropped):

    text         {"text": str}
    instruction  {"instruction": str, "input": str (optional), "output": str}      (Alpaca)
    chat         {"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}
                 with at least one assistant message

`shape="auto"` takes the shape from the first row's keys, in the order messages -> chat,
instruction -> instruction, text -> text (tatsu-lab/alpaca rows carry instruction, input, output
and a pre-rendered "text": they are instruction rows). Every row is then checked against that one
shape before training starts, so a bad row 90% into an epoch fails at load time instead, with
its file and line:

    data/train.jsonl:17: instruction row has no "output" (a str); expected keys instruction,
    input (optional), output

    ds = read_records("data/train.jsonl")      # Dataset(path, shape, rows, line, numbering)
    train, valid = split(ds, 0.05, seed=0)     # disjoint, deterministic in seed

Rows are normalised: only the shape's keys are kept, a missing or null "input" becomes "",
and messages keep only role and content. `Dataset.line[i]` is the 1-based source line of
rows[i] (the first physical line of a CSV record); for Parquet and JSON arrays it is the row
index + 1 and `numbering` is "row".
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SHAPES = ("text", "instruction", "chat")
ROLES = ("system", "user", "assistant")
SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
EXPECTED = {
    "text": "expected key text",
    "instruction": "expected keys instruction, input (optional), output",
    "chat": 'expected key messages: a list of {"role": "system"|"user"|"assistant", "content": str}',
}


@dataclass
class Dataset:
    """Validated, normalised rows of one shape. rows[i] came from line[i] of `path`."""

    path: str
    shape: str  # "text" | "instruction" | "chat"
    rows: list[dict[str, Any]]
    line: list[int]
    numbering: str = "line"  # "line": line[i] is a line number; "row": a 1-based row index

    def __len__(self) -> int:
        return len(self.rows)

    def where(self, i: int) -> str:
        """Where rows[i] came from, for error messages: "data/train.jsonl:17" or "x.parquet: row 17"."""
        return _where(self.path, self.line[i], self.numbering)


def read_records(path, shape: str = "auto") -> Dataset:
    """Read `path` (.jsonl/.json/.csv/.parquet) and validate every row as `shape` (or the detected one)."""
    if shape != "auto" and shape not in SHAPES:
        raise ValueError(f"shape={shape!r} is not one of auto, {', '.join(SHAPES)}")
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix not in SUFFIXES:
        raise ValueError(f"{path}: unknown data format {p.suffix!r}; use one of {', '.join(SUFFIXES)}")
    if not p.is_file():
        raise FileNotFoundError(f"{path}: no such data file")
    read = {".csv": _read_csv, ".parquet": _read_parquet}.get(suffix, _read_json)
    raw, lines, numbering = read(p)
    if not raw:
        raise ValueError(f"{path}: no records; expected at least one row of shape {shape}")
    if shape == "auto":
        shape = _detect(raw[0], _where(str(path), lines[0], numbering))
        detected = f" (shape {shape} was detected from the first row; pass shape= to choose)"
    else:
        detected = ""
    rows = []
    for row, line in zip(raw, lines):
        where = _where(str(path), line, numbering)
        try:
            rows.append(_VALIDATE[shape](row))
        except ValueError as e:
            raise ValueError(f"{where}: {e}{detected}") from None
    return Dataset(str(path), shape, rows, lines, numbering)


def split(dataset: Dataset, valid_fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """(train, valid): round(n * valid_fraction) random rows (at least 1 when the fraction is > 0)
    held out; the same seed gives the same split. Each part keeps the file order."""
    if not 0 <= valid_fraction < 1:
        raise ValueError(f"valid_fraction={valid_fraction} must lie in [0, 1)")
    n = len(dataset)
    n_valid = max(1, round(n * valid_fraction)) if valid_fraction > 0 else 0
    if n_valid >= n:
        raise ValueError(
            f"{dataset.path}: {n} rows are too few to hold out {n_valid} for validation "
            f"(valid_fraction={valid_fraction}); add rows or lower valid_fraction"
        )
    order = list(range(n))
    random.Random(seed).shuffle(order)
    valid = set(order[:n_valid])
    return _subset(dataset, [i for i in range(n) if i not in valid]), _subset(dataset, sorted(valid))


def _subset(dataset: Dataset, index: list[int]) -> Dataset:
    return Dataset(dataset.path, dataset.shape, [dataset.rows[i] for i in index],
                   [dataset.line[i] for i in index], dataset.numbering)


def _where(path: str, n: int, numbering: str) -> str:
    return f"{path}:{n}" if numbering == "line" else f"{path}: row {n}"


# ----------------------------------------------------------------------------------------------
# Readers: (raw rows, their 1-based line or row numbers, "line" | "row")


_LINE_BREAK = re.compile(r"\r\n|\r|\n")  # JSON strings hold no raw CR or LF, so a line is never cut inside a value


def _read_text(p: Path) -> str:
    """The file as text: UTF-8, a leading byte order mark dropped; else a ValueError naming the line."""
    data = p.read_bytes()
    bom = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        return data[bom:].decode("utf-8")
    except UnicodeDecodeError as e:
        at = bom + e.start
        line = len(_LINE_BREAK.findall(data[bom:at].decode("utf-8"))) + 1
        raise ValueError(f"{p}:{line}: not UTF-8 text (byte {at}: {e.reason}); save the file as UTF-8") from None


def _loads(text: str, p: Path, line: int | None = None, expected: str = "") -> Any:
    """json.loads of `text`, which starts at `line` of `p` (None: the whole file); errors name the line."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        at = (line or 1) + e.lineno - 1
        raise ValueError(f"{p}:{at}: not valid JSON ({e.msg}, column {e.colno}){expected}") from None
    except (ValueError, RecursionError) as e:  # an integer of over 4300 digits, nesting deeper than the stack
        where = f"{p}:{line}" if line else str(p)
        raise ValueError(f"{where}: cannot read this JSON ({e}){expected}") from None


def _read_json(p: Path) -> tuple[list[Any], list[int], str]:
    text = _read_text(p)
    if p.suffix.lower() == ".json" and text.lstrip().startswith("["):
        items = _loads(text, p)
        return items, list(range(1, len(items) + 1)), "row"
    rows, lines = [], []
    # Lines end at LF, CRLF or CR only: str.splitlines would also cut at U+2028, NEL (U+0085) and
    # other characters a JSON string may hold unescaped.
    for n, line in enumerate(_LINE_BREAK.split(text), start=1):
        if not line.strip():
            continue
        rows.append(_loads(line, p, n, "; expected one JSON object per line"))
        lines.append(n)
    return rows, lines, "line"


def _read_csv(p: Path) -> tuple[list[dict[str, str]], list[int], str]:
    text = _read_text(p)
    rows, lines = [], []
    reader = csv.reader(io.StringIO(text, newline=""))
    header, end = None, 0  # end: the last physical line read so far
    limit = csv.field_size_limit(max(len(text), csv.field_size_limit()))  # a cell may be as long as the file
    try:
        for record in reader:
            start, end = end + 1, reader.line_num
            if not record:  # a blank line
                continue
            if header is None:
                header = record
                continue
            if len(record) > len(header):
                raise ValueError(
                    f"{p}:{start}: {len(record)} cells but the header has {len(header)} "
                    f"({', '.join(header)}); quote cells that contain commas"
                )
            rows.append(dict(zip(header, record)))
            lines.append(start)
    except csv.Error as e:
        raise ValueError(f"{p}:{end + 1}: not valid CSV ({e})") from None
    finally:
        csv.field_size_limit(limit)
    return rows, lines, "line"


def _read_parquet(p: Path) -> tuple[list[dict[str, Any]], list[int], str]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ImportError(f"reading {p} needs pyarrow: pip install pyarrow") from e
    import pyarrow as pa

    try:
        rows = pq.read_table(p).to_pylist()
    except (pa.ArrowException, OSError, UnicodeDecodeError) as e:  # ArrowInvalid, thrift errors, bad UTF-8 strings
        raise ValueError(f"{p}: cannot read this Parquet file ({e}); it is truncated, corrupted or not Parquet") from None
    return rows, list(range(1, len(rows) + 1)), "row"


# ----------------------------------------------------------------------------------------------
# Shapes: detect from the first row, then validate and normalise each row (ValueError: what is wrong)


def _detect(row: Any, where: str) -> str:
    if isinstance(row, dict):
        for key, shape in (("messages", "chat"), ("instruction", "instruction"), ("text", "text")):
            if key in row:
                return shape
        found = ", ".join(map(str, row)) or "none"
    else:
        found = f"a {type(row).__name__}, not an object"
    raise ValueError(
        f"{where}: cannot tell the shape from the first row (keys: {found}); expected a text row "
        f"{{text}}, an instruction row {{instruction, input (optional), output}} or a chat row {{messages}}"
    )


def _object(row: Any, shape: str) -> dict:
    if not isinstance(row, dict):
        raise ValueError(f"a {shape} row must be an object, got {type(row).__name__}; {EXPECTED[shape]}")
    return row


def _text_field(row: dict, key: str, shape: str, optional: bool = False) -> str:
    if key not in row or (optional and row[key] is None):
        if optional:
            return ""
        raise ValueError(f'{shape} row has no "{key}" (a str); {EXPECTED[shape]}')
    value = row[key]
    if not isinstance(value, str):
        raise ValueError(f'{shape} row\'s "{key}" has type {type(value).__name__}, expected a str; {EXPECTED[shape]}')
    if not optional and not value.strip():
        raise ValueError(f'{shape} row\'s "{key}" is empty; expected non-empty text')
    return value


def _text_row(row: Any) -> dict:
    return {"text": _text_field(_object(row, "text"), "text", "text")}


def _instruction_row(row: Any) -> dict:
    row = _object(row, "instruction")
    return {
        "instruction": _text_field(row, "instruction", "instruction"),
        "input": _text_field(row, "input", "instruction", optional=True),
        "output": _text_field(row, "output", "instruction"),
    }


def _chat_row(row: Any) -> dict:
    row = _object(row, "chat")
    if "messages" not in row:
        raise ValueError(f'chat row has no "messages"; {EXPECTED["chat"]}')
    messages = row["messages"]
    if not isinstance(messages, list) or not messages:
        what = "is an empty list" if isinstance(messages, list) else f"has type {type(messages).__name__}"
        hint = " (CSV cells are strings: use JSON lines or Parquet for chat data)" if isinstance(messages, str) else ""
        raise ValueError(f'chat row\'s "messages" {what}; {EXPECTED["chat"]}{hint}')
    out = []
    for k, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f'chat message {k} is not an object with "role" and "content"; {EXPECTED["chat"]}')
        if m["role"] not in ROLES:
            raise ValueError(f"chat message {k} has role {m['role']!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise ValueError(f'chat message {k}\'s "content" has type {type(m["content"]).__name__}, expected a str')
        out.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "assistant" for m in out):
        raise ValueError("chat row has no assistant message; expected at least one (the loss is on assistant turns)")
    return {"messages": out}


_VALIDATE = {"text": _text_row, "instruction": _instruction_row, "chat": _chat_row}
