"""Reading data files of each supported kind and mapping rows to Examples."""

from __future__ import annotations

import json
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fedtune.data.examples import Example
from fedtune.data.records import load_examples, read_rows, rewrite_gsm8k_answer, to_examples
from fedtune.errors import DataError

ROWS = [
    {"instruction": "Add 2 and 3.", "input": "", "output": "5"},
    {"instruction": "Reverse it.", "input": "abc", "output": "cba"},
    {"instruction": "Say hi.", "input": "", "output": "hi"},
]


def _write_jsonl(path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _expected(origins: list[str]) -> list[Example]:
    return [
        Example(instruction=r["instruction"], input=r["input"], output=r["output"], origin=o)
        for r, o in zip(ROWS, origins, strict=True)
    ]


# --- formats round-trip ------------------------------------------------------------------------


def test_jsonl_round_trip_with_line_numbers(tmp_path):
    path = tmp_path / "train.jsonl"
    # a blank line 2 is skipped but still counts for line numbers
    path.write_text(json.dumps(ROWS[0]) + "\n\n" + json.dumps(ROWS[1]) + "\n" + json.dumps(ROWS[2]))
    examples = load_examples(str(path), format="alpaca", fields={})
    assert examples == _expected([f"{path}:1", f"{path}:3", f"{path}:4"])


def test_json_list_and_wrapped_object(tmp_path):
    plain = tmp_path / "data.json"
    plain.write_text(json.dumps(ROWS))
    rows = read_rows(str(plain))
    assert [o for o, _ in rows] == [f"{plain}[0]", f"{plain}[1]", f"{plain}[2]"]
    assert [r for _, r in rows] == ROWS

    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"version": 1, "data": ROWS}))
    rows = read_rows(str(wrapped))
    assert [r for _, r in rows] == ROWS
    assert rows[2][0] == f"{wrapped}['data'][2]"


def test_json_object_with_two_lists_is_rejected(tmp_path):
    path = tmp_path / "two.json"
    path.write_text(json.dumps({"a": ROWS, "b": ROWS}))
    with pytest.raises(DataError, match="exactly one list-valued key"):
        read_rows(str(path))


def test_csv_and_tsv_round_trip(tmp_path):
    csv_path = tmp_path / "train.csv"
    # row 2 has a quoted field spanning two physical lines: the next row starts on line 5
    csv_path.write_text(
        'instruction,input,output\nAdd 2 and 3.,,5\n"Reverse it.",abc,"cba"\nSay hi.,,hi\n'
    )
    assert load_examples(str(csv_path), format="auto", fields={}) == _expected(
        [f"{csv_path}:2", f"{csv_path}:3", f"{csv_path}:4"]
    )
    multi = tmp_path / "multi.csv"
    multi.write_text('instruction,output\n"two\nlines",x\nnext,y\n')
    assert [o for o, _ in read_rows(str(multi))] == [f"{multi}:2", f"{multi}:4"]
    assert read_rows(str(multi))[0][1] == {"instruction": "two\nlines", "output": "x"}

    tsv_path = tmp_path / "train.tsv"
    tsv_path.write_text("instruction\tinput\toutput\nAdd 2 and 3.\t\t5\nReverse it.\tabc\tcba\n")
    rows = read_rows(str(tsv_path))
    assert [r for _, r in rows] == ROWS[:2]


def test_parquet_round_trip(tmp_path):
    path = tmp_path / "x.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), path)
    examples = load_examples(str(path), format="alpaca", fields={})
    assert examples == _expected([f"{path} row 1", f"{path} row 2", f"{path} row 3"])


def test_saved_dataset_and_dataset_dict(tmp_path):
    datasets = pytest.importorskip("datasets")
    single = tmp_path / "single"
    datasets.Dataset.from_list(ROWS).save_to_disk(str(single))
    assert [r for _, r in read_rows(str(single))] == ROWS

    both = tmp_path / "dict"
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(ROWS), "test": datasets.Dataset.from_list(ROWS[:1])}
    ).save_to_disk(str(both))
    rows = read_rows(str(both), limit=2)
    assert [r for _, r in rows] == ROWS[:2]
    assert rows[1][0] == f"{both} row 2"


def test_limit_stops_early(tmp_path):
    path = tmp_path / "train.jsonl"
    # line 3 is broken, but limit=2 never reads it
    path.write_text(json.dumps(ROWS[0]) + "\n" + json.dumps(ROWS[1]) + "\n{broken\n")
    assert len(read_rows(str(path), limit=2)) == 2


# --- bad input ---------------------------------------------------------------------------------


def test_missing_file_named(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(DataError, match="not found.*nope.jsonl"):
        read_rows(str(missing))


def test_malformed_jsonl_line_named(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n" + json.dumps(ROWS[1]) + "\n{not json\n")
    with pytest.raises(DataError, match=r"train\.jsonl:3: not valid JSON"):
        read_rows(str(path))


def test_jsonl_row_not_an_object(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n[1, 2]\n")
    with pytest.raises(DataError, match=r"train\.jsonl:2: expected a JSON object, got list"):
        read_rows(str(path))


def test_csv_wrong_field_count_names_line(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text("instruction,output\na,b\nc,d,e\n")
    with pytest.raises(DataError, match=r"train\.csv:3: row has 3 fields but the header has 2"):
        read_rows(str(path))


@pytest.mark.parametrize(
    "name,text", [("empty.jsonl", "\n\n"), ("empty.csv", ""), ("e.json", "[]")]
)
def test_empty_files_rejected(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(DataError, match="no rows"):
        read_rows(str(path))


def test_unknown_hub_dataset(monkeypatch):
    datasets = pytest.importorskip("datasets")

    def fail(*args, **kwargs):
        raise FileNotFoundError("no such dataset")

    monkeypatch.setattr(datasets, "load_dataset", fail)
    with pytest.raises(DataError, match="neither a file nor a reachable"):
        read_rows("someone/no-such-dataset")


def test_datasets_not_installed(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(DataError, match=r"pip install 'fedtune\[hub\]'"):
        read_rows("someone/some-dataset")


# --- field mappings ----------------------------------------------------------------------------


def test_auto_detects_dolly_alpaca_gsm8k():
    dolly = [("d:1", {"instruction": "Q", "context": "C", "response": "R", "category": "open_qa"})]
    assert to_examples(dolly, format="auto", fields={}) == [
        Example(instruction="Q", input="C", output="R", category="open_qa", origin="d:1")
    ]
    alpaca = [("a:1", {"instruction": "Q", "output": "R"})]  # input column is optional
    assert to_examples(alpaca, format="auto", fields={}) == [
        Example(instruction="Q", output="R", origin="a:1")
    ]
    gsm = [("g:1", {"question": "How many?", "answer": "3 + 4 = 7\n#### 7"})]
    assert to_examples(gsm, format="auto", fields={}) == [
        Example(instruction="How many?", output="3 + 4 = 7\nThe answer is 7.", origin="g:1")
    ]


def test_auto_detect_failure_lists_columns_and_advice():
    rows = [("f:1", {"prompt": "Q", "completion": "A"})]
    with pytest.raises(DataError) as info:
        to_examples(rows, format="auto", fields={})
    message = str(info.value)
    assert "['completion', 'prompt']" in message
    assert "gsm8k: question, answer" in message
    assert "data.format: custom" in message


def test_gsm8k_rewrite_keeps_reasoning():
    answer = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n48+24 = <<48+24=72>>72\n#### 72"
    rewritten = rewrite_gsm8k_answer(answer)
    assert rewritten.endswith("\nThe answer is 72.")
    assert rewritten.startswith("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n48+24")
    assert "####" not in rewritten
    assert rewrite_gsm8k_answer("no marker") == "no marker"


def test_custom_mapping_and_value_conversion():
    rows = [("c:1", {"q": "What is 6*7?", "a": 42, "ctx": None, "topic": "math"})]
    fields = {"instruction": "q", "output": "a", "input": "ctx", "category": "topic"}
    assert to_examples(rows, format="custom", fields=fields) == [
        Example(instruction="What is 6*7?", output="42", input="", category="math", origin="c:1")
    ]


def test_fields_override_a_builtin_format():
    rows = [("o:1", {"instruction": "Q", "output": "A", "topic": "t"})]
    [example] = to_examples(rows, format="alpaca", fields={"category": "topic"})
    assert example.category == "t"


def test_missing_column_names_origin_and_column(tmp_path):
    path = tmp_path / "train.jsonl"
    _write_jsonl(path, [ROWS[0], {"instruction": "no output here"}])
    with pytest.raises(DataError, match=r"train\.jsonl:2: missing column 'output'"):
        load_examples(str(path), format="alpaca", fields={})


@pytest.mark.parametrize("value,kind", [(["a"], "list"), (True, "bool"), ({"x": 1}, "dict")])
def test_non_string_value_rejected(value, kind):
    rows = [("f.jsonl:4", {"instruction": "Q", "output": value})]
    with pytest.raises(
        DataError, match=rf"f\.jsonl:4: column 'output' must be a string, got {kind}"
    ):
        to_examples(rows, format="alpaca", fields={})


def test_null_required_value_rejected():
    rows = [("f.jsonl:1", {"instruction": None, "output": "A"})]
    with pytest.raises(DataError, match="f.jsonl:1: column 'instruction' is null"):
        to_examples(rows, format="alpaca", fields={})


def test_jsonl_bad_utf8_names_line(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(json.dumps(ROWS[0]).encode() + b"\n" + b'{"instruction": "\xff"}\n')
    with pytest.raises(DataError, match=r"train\.jsonl:2: not UTF-8"):
        read_rows(str(path))
