"""distillery.record / distillery.io: the schema and the bad-input cases every stage relies on."""
import json

import pytest

from distillery.io import MAX_LINE_BYTES, Located, Problem, read_records, write_jsonl_atomic
from distillery.record import RecordError, canonical_hash, content_id, ensure_id, validate
from distillery.text import char_count

GOOD = {"instruction": "你现在是一个送祝福大师", "input": "祝妈妈生日快乐,正常风格", "output": "妈妈，生日快乐！"}


def lines(items):
    return [(type(i).__name__, i.line, getattr(i, "field", None)) for i in items]


def test_validate_did_you_mean():
    bad = {"instrution": "x", "input": "y", "output": "z"}
    with pytest.raises(RecordError) as e:
        validate(bad)
    assert e.value.field == "instrution" and "did you mean instruction?" in str(e.value)


@pytest.mark.parametrize("rec,field", [
    ({"input": "a", "output": "b"}, "instruction"),
    ({**GOOD, "output": 3}, "output"),
    ({**GOOD, "output": "  "}, "output"),
    ({**GOOD, "meta": {"max_chars": "20"}}, "meta.max_chars"),
    ({**GOOD, "curation": {"verdict": "maybe"}}, "curation.verdict"),
])
def test_validate_names_the_field(rec, field):
    with pytest.raises(RecordError) as e:
        validate(rec)
    assert e.value.field == field


def test_ids_are_content_derived():
    a, b = dict(GOOD), dict(GOOD)
    assert ensure_id(a) == ensure_id(b)
    assert ensure_id({**GOOD, "output": "另一句"}) != a["id"]
    assert content_id("p", "x") == content_id("p", "x") != content_id("p", "y")
    assert canonical_hash({"b": 1, "a": 2}) == canonical_hash({"a": 2, "b": 1})


def test_mixed_file_keeps_good_lines(tmp_path):
    p = tmp_path / "mixed.jsonl"
    good = json.dumps(GOOD, ensure_ascii=False).encode()
    p.write_bytes(b"\xef\xbb\xbf" + good + b"\r\n"          # BOM + CRLF: fine
                  + b"{not json\n"                            # invalid JSON
                  + json.dumps({"instrution": "a", "input": "b", "output": "c"}).encode() + b"\n"
                  + b'{"instruction": "a", "input": "b", "output": "\xff\xfe"}\n'  # not UTF-8
                  + b"\n"                                      # blank: skipped
                  + b'{"instruction": "a", "input": "b", "output": "' + b"x" * (MAX_LINE_BYTES + 10) + b'"}\n'
                  + good + b"\n")
    items = list(read_records(p))
    assert [type(i) for i in items] == [Located, Problem, Problem, Problem, Problem, Located]
    assert [i.line for i in items] == [1, 2, 3, 4, 6, 7]
    assert items[2].field == "instrution"
    assert "not UTF-8" in items[3].message and "over the" in items[4].message
    assert str(items[1]).startswith(f"{p}:2: invalid JSON")


def test_json_array_and_empty_and_missing(tmp_path):
    arr = tmp_path / "train.json"
    arr.write_text(json.dumps([GOOD, {"input": "x", "output": "y"}], ensure_ascii=False), encoding="utf-8")
    items = list(read_records(arr))
    assert isinstance(items[0], Located) and isinstance(items[1], Problem) and items[1].field == "instruction"
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert [str(i) for i in read_records(empty)] == [f"{empty}: empty file"]
    assert [str(i) for i in read_records(tmp_path / "nope.jsonl")] == [f"{tmp_path / 'nope.jsonl'}: no such file"]


def test_atomic_write_roundtrip(tmp_path):
    out = tmp_path / "a.jsonl"
    assert write_jsonl_atomic(out, [GOOD, GOOD]) == 2
    assert [i.record for i in read_records(out)] == [GOOD, GOOD]
    assert not (tmp_path / "a.jsonl.tmp").exists()


def test_char_count_counts_what_a_reader_sees():
    assert char_count("生日快乐！") == 5
    assert char_count("闪闪发光呀✨") == 6
    assert char_count("一家人👨‍👩‍👧 平安") == 6   # a ZWJ family emoji is one; spaces do not count
