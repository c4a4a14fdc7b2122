"""Read rows from data files, saved datasets or the hub, and map them to `Example`s by format."""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from fedtune.data.code_language import code_language
from fedtune.data.examples import Example
from fedtune.errors import DataError

Row = tuple[str, dict]

FILE_SUFFIXES = (".json", ".jsonl", ".ndjson", ".csv", ".tsv", ".parquet")

# format -> {our field: column}; the fields in REQUIRED must be present in every row.
FORMATS: dict[str, dict[str, str]] = {
    "dolly": {
        "instruction": "instruction",
        "input": "context",
        "output": "response",
        "category": "category",
    },
    "alpaca": {"instruction": "instruction", "input": "input", "output": "output"},
    "gsm8k": {"instruction": "question", "output": "answer"},
    # alpaca columns; the category is the programming language (fedtune.data.code_language)
    "codealpaca": {"instruction": "instruction", "input": "input", "output": "output"},
}
REQUIRED = ("instruction", "output")

_GSM8K_FINAL = re.compile(r"^\s*####\s*(.*?)\s*$")


# ---------------------------------------------------------------------------------------------
# Reading rows


def read_rows(source: str, *, limit: int | None = None) -> list[Row]:
    """(origin, row) pairs from a file, a saved `datasets` directory or a hub dataset name."""
    path = Path(source).expanduser()
    check_local_source(source)
    if path.is_dir():
        rows = _take(_read_saved_dataset(path), limit)
    elif path.is_file():
        rows = _take(_read_file(path), limit)
    else:
        rows = _read_hub_dataset(source, limit)
    if not rows:
        raise DataError(f"{source}: no rows found (the file or dataset is empty)")
    return rows


def check_local_source(source: str) -> None:
    """DataError when `source` names a local file (by its suffix or path) that does not exist."""
    path = Path(source).expanduser()
    if path.exists():
        return
    if path.suffix.lower() in FILE_SUFFIXES or source.startswith((".", "/", "~")):
        raise DataError(f"data file not found: {source}")


def _take(rows: Iterator[Row], limit: int | None) -> list[Row]:
    out: list[Row] = []
    if limit is not None and limit <= 0:
        return out
    for row in rows:
        out.append(row)
        if limit is not None and len(out) >= limit:
            break
    return out


def _read_file(path: Path) -> Iterator[Row]:
    suffix = path.suffix.lower()
    if suffix == ".json":
        return _read_json(path)
    if suffix in (".jsonl", ".ndjson"):
        return _read_jsonl(path)
    if suffix in (".csv", ".tsv"):
        return _read_delimited(path, "\t" if suffix == ".tsv" else ",")
    if suffix == ".parquet":
        return _read_parquet(path)
    raise DataError(
        f"{path}: unsupported file type {suffix or '(none)'!r}; "
        f"supported: {', '.join(FILE_SUFFIXES)}, or a saved `datasets` directory"
    )


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc})") from None


def _read_json(path: Path) -> Iterator[Row]:
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
    prefix = str(path)
    if isinstance(data, dict):
        lists = [key for key, value in data.items() if isinstance(value, list)]
        if len(lists) != 1:
            raise DataError(
                f"{path}: expected a JSON list of objects, or an object with exactly one "
                f'list-valued key such as {{"data": [...]}}; found list keys {lists}'
            )
        prefix = f"{path}[{lists[0]!r}]"
        data = data[lists[0]]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of objects, got {type(data).__name__}")
    for i, row in enumerate(data):
        origin = f"{prefix}[{i}]"
        if not isinstance(row, dict):
            raise DataError(f"{origin}: expected a JSON object, got {type(row).__name__}")
        yield origin, row


def _read_jsonl(path: Path) -> Iterator[Row]:
    try:
        handle = path.open("rb")
    except OSError as exc:
        raise DataError(f"{path}: cannot open ({exc})") from None
    with handle:
        for number, raw in enumerate(handle, start=1):
            origin = f"{path}:{number}"
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"{origin}: not UTF-8 text ({exc})") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{origin}: not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{origin}: expected a JSON object, got {type(row).__name__}")
            yield origin, row


def _read_delimited(path: Path, delimiter: str) -> Iterator[Row]:
    try:
        handle = path.open(encoding="utf-8-sig", newline="")
    except OSError as exc:
        raise DataError(f"{path}: cannot open ({exc})") from None
    with handle:
        reader = csv.reader(handle, delimiter=delimiter)
        try:
            header = next(reader, None)
            if header is None:
                return
            if len(set(header)) != len(header):
                raise DataError(f"{path}:1: header has duplicate column names: {header}")
            start = reader.line_num + 1
            for values in reader:
                line, start = start, reader.line_num + 1
                if not values:
                    continue
                if len(values) != len(header):
                    raise DataError(
                        f"{path}:{line}: row has {len(values)} fields but the header has "
                        f"{len(header)} ({', '.join(header)})"
                    )
                yield f"{path}:{line}", dict(zip(header, values, strict=True))
        except csv.Error as exc:
            raise DataError(f"{path}:{reader.line_num}: malformed row ({exc})") from None
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}: not UTF-8 text ({exc})") from None


def _read_parquet(path: Path) -> Iterator[Row]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for unreadable files
        raise DataError(f"{path}: not a readable Parquet file ({exc})") from None
    index = 0
    for batch in parquet.iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            index += 1
            yield f"{path} row {index}", row


def _import_datasets() -> Any:
    try:
        import datasets
    except ImportError:
        raise DataError(
            "reading a saved or hub dataset needs the `datasets` package: "
            "pip install 'fedtune[hub]'"
        ) from None
    return datasets


def _read_saved_dataset(path: Path) -> Iterator[Row]:
    datasets = _import_datasets()
    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as exc:  # datasets raises FileNotFoundError, ValueError, ...
        raise DataError(
            f"{path}: a directory, but not one written by datasets' save_to_disk ({exc})"
        ) from None
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise DataError(
                f"{path}: saved DatasetDict has no 'train' split; splits: {list(loaded)}"
            )
        loaded = loaded["train"]
    for index, row in enumerate(loaded, start=1):
        yield f"{path} row {index}", dict(row)


def _read_hub_dataset(name: str, limit: int | None) -> list[Row]:
    datasets = _import_datasets()
    split = "train" if limit is None else f"train[:{limit}]"
    try:
        loaded = datasets.load_dataset(name, split=split)
    except Exception as exc:  # network, missing dataset, bad config: all mean "cannot use"
        raise DataError(
            f"data source {name!r} is neither a file nor a reachable `datasets` hub dataset ({exc})"
        ) from None
    return [(f"{name} row {i}", dict(row)) for i, row in enumerate(loaded, start=1)]


# ---------------------------------------------------------------------------------------------
# Rows -> Examples


def detect_format(columns: Iterable[str], fields: dict[str, str] | None = None) -> str:
    """`messages` when the chat column is there, else the first built-in format whose required
    columns are all in `columns`."""
    present = set(columns)
    fields = fields or {}
    if fields.get("messages", "messages") in present:
        return "messages"
    for name, mapping in FORMATS.items():
        merged = {**mapping, **fields}
        if all(merged[key] in present for key in REQUIRED):
            return name
    if all(fields.get(key) in present for key in REQUIRED):
        return "custom"
    needs = "; ".join(
        f"{name}: {', '.join(mapping[key] for key in REQUIRED)}"
        for name, mapping in FORMATS.items()
    )
    raise DataError(
        f"cannot detect the data format: columns seen are {sorted(present)}; "
        f"the built-in formats need {needs}. "
        "Set `data.format: custom` with `data.fields` mapping instruction, output "
        "(and optionally input, category) to your column names"
    )


def column_mapping(format: str, fields: dict[str, str]) -> dict[str, str]:
    """Our field name -> column name for `format`, with `fields` overriding the built-in names."""
    if format == "messages":
        return {"messages": "messages", **fields}
    if format == "custom":
        missing = [key for key in REQUIRED if key not in fields]
        if missing:
            raise DataError(f"data.format 'custom' needs data.fields to map {missing} to columns")
        return dict(fields)
    if format not in FORMATS:
        raise DataError(
            f"unknown data.format {format!r}; allowed: auto, custom, messages, {', '.join(FORMATS)}"
        )
    return {**FORMATS[format], **fields}


def _text(row: dict, origin: str, column: str | None, *, required: bool) -> str | None:
    if column is None:
        return None
    if column not in row:
        if required:
            raise DataError(f"{origin}: missing column {column!r}; row has {sorted(row)}")
        return None
    value = row[column]
    if value is None:
        if required:
            raise DataError(f"{origin}: column {column!r} is null; it must be a string")
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise DataError(f"{origin}: column {column!r} must be a string, got {type(value).__name__}")


def rewrite_gsm8k_answer(answer: str) -> str:
    """Replace GSM8K's final `#### N` line by `The answer is N.`, keeping the reasoning above it."""
    lines = answer.split("\n")
    for i in range(len(lines) - 1, -1, -1):
        match = _GSM8K_FINAL.match(lines[i])
        if match:
            value = match.group(1).rstrip(".")
            lines[i] = f"The answer is {value}."
            return "\n".join(lines)
    return answer


def to_examples(
    rows: list[Row], *, format: str, fields: dict[str, str], split_by: str | None = None
) -> list[Example]:
    """Map rows to Examples with a built-in format (`auto` detects it from the first row) or `custom`.

    `split_by`: a column whose value each example keeps as `split_value` (`data.split.by`).
    """
    if not rows:
        return []
    if format == "auto":
        format = detect_format(rows[0][1], fields)
    mapping = column_mapping(format, fields)
    if format == "messages":
        return [_chat_example(origin, row, mapping, split_by) for origin, row in rows]
    examples = []
    for origin, row in rows:
        instruction = _text(row, origin, mapping["instruction"], required=True)
        output = _text(row, origin, mapping["output"], required=True)
        assert instruction is not None and output is not None
        if format == "gsm8k":
            output = rewrite_gsm8k_answer(output)
        input_text = _text(row, origin, mapping.get("input"), required=False) or ""
        category = _text(row, origin, mapping.get("category"), required=False) or None
        if format == "codealpaca" and category is None:
            category = code_language(instruction, input_text, output)
        split_value = _split_value(row, origin, split_by) if split_by else None
        examples.append(
            Example(instruction=instruction, output=output, input=input_text, category=category,
                    origin=origin, split_value=split_value)
        )
    return examples


def _chat_example(origin: str, row: dict, mapping: dict[str, str], split_by: str | None) -> Example:
    """A conversation row: its turns, the last assistant turn as the reference answer."""
    from fedtune.data.chat import parse_messages

    column = mapping["messages"]
    if column not in row:
        raise DataError(f"{origin}: missing column {column!r} (data.format messages); row has "
                        f"{sorted(row)}; name the column with data.fields.messages")
    turns = parse_messages(row[column], origin, column)
    users = [content for role, content in turns if role == "user"]
    category = _text(row, origin, mapping.get("category"), required=False) or None
    return Example(instruction=users[-1] if users else "", output=turns[-1][1], category=category,
                   origin=origin, messages=turns,
                   split_value=_split_value(row, origin, split_by) if split_by else None)


def _split_value(row: dict, origin: str, column: str) -> str | None:
    """The row's value of the `data.split.by` column as text (None when missing or null)."""
    value = row.get(column)
    if value is None:
        return None
    if isinstance(value, (str, int, float, bool)):
        return str(value)
    raise DataError(f"{origin}: column {column!r} (data.split.by) must be a string or a number, "
                    f"got {type(value).__name__}")


def load_examples(
    source: str, *, format: str, fields: dict[str, str], limit: int | None = None,
    split_by: str | None = None,
) -> list[Example]:
    """Read `source` and map its rows to Examples."""
    return to_examples(read_rows(source, limit=limit), format=format, fields=fields,
                       split_by=split_by)
