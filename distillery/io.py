"""Reading and writing record files, with one clear problem per bad line and no lost good lines.

`read_records(path)` accepts JSON Lines (the project's format) and a JSON array (the reference tutorial's format),
tolerates a UTF-8 BOM and CRLF line ends, and yields `Problem`s instead of raising for bad lines, so a caller
keeps every good record and can write every bad one to a quarantine file.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, NamedTuple, Optional, Union

import orjson

from distillery.record import RecordError, dumps, validate

MAX_LINE_BYTES = 1 << 20  # 1 MiB: a greeting record is < 4 KiB; a 10 MB line is a broken file, not data


@dataclass
class Problem:
    """One bad line (or a file that cannot be read at all, with line 0)."""

    path: str
    line: int
    field: str
    message: str
    raw: str = ""  # the offending text (truncated), kept for the quarantine file

    def __str__(self) -> str:
        where = f"{self.path}:{self.line}" if self.line else self.path
        what = f"{self.field}: {self.message}" if self.field else self.message
        return f"{where}: {what}"

    def to_quarantine(self) -> dict:
        return {"file": self.path, "line": self.line, "field": self.field, "error": self.message, "raw": self.raw}


@dataclass
class Located:
    """A valid record and where it came from."""

    path: str
    line: int
    record: dict


Item = Union[Located, Problem]


class Block(NamedTuple):
    """Whole lines of a JSON Lines file: read_blocks gives them with their bytes; a copy with data=None is a
    reference another process can read for itself (`bytes_of`), so the bytes need not cross a pipe."""

    line: int                # number of the first line
    data: Optional[bytes]
    offset: int = 0          # in the file
    size: int = 0

    def bytes_of(self, path: str) -> bytes:
        if self.data is not None:
            return self.data
        with open(path, "rb") as f:
            f.seek(self.offset)
            data = f.read(self.size)
        if len(data) != self.size:
            raise OSError(f"{path} changed while it was read")
        return data


def _decode(raw: bytes, path: str, lineno: int) -> Union[str, Problem]:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return Problem(path, lineno, "", f"not UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})",
                       raw.decode("utf-8", "replace")[:2000])


def _check(obj, path: str, lineno: int, text: Union[str, bytes], require_id: bool) -> Item:
    try:
        return Located(path, lineno, validate(obj, require_id=require_id))
    except RecordError as e:
        if isinstance(text, bytes):
            text = text.decode("utf-8")  # valid: it parsed
        return Problem(path, lineno, e.field, e.message, text[:2000])


def read_records(path: Union[str, Path], *, require_id: bool = False) -> Iterator[Item]:
    """Yield a Located for every valid record and a Problem for every bad line, in file order."""
    p = str(path)
    for x in read_lines(p, require_id=require_id):
        if isinstance(x, tuple):
            item = parse_line(x[1], p, x[0], require_id=require_id)
            if item is not None:
                yield item
        else:
            yield x


def read_lines(path: Union[str, Path], *, require_id: bool = False) -> Iterator[Union[tuple[int, bytes], Item]]:
    """A JSON Lines file's raw lines as (line number, bytes), for parse_line (in this or another process); for a
    file that is not JSON Lines, its items: a JSON array's records and problems, or the one Problem of a file that
    is missing, a directory or empty."""
    yield from _jsonl_or_items(str(path), require_id, lambda f: enumerate(_lines(f), start=1))


def read_blocks(path: Union[str, Path], *, block_bytes: int = 1 << 20,
                require_id: bool = False) -> Iterator[Union[Block, Item]]:
    """read_lines, but a JSON Lines file comes as Blocks of whole lines, for parse_block (in this or another
    process): no per-line work where the file is read. An over-long line comes as its Problem, without being held
    whole."""
    p = str(path)
    yield from _jsonl_or_items(p, require_id, lambda f: _blocks(f, p, block_bytes))


def _jsonl_or_items(p: str, require_id: bool, read_jsonl) -> Iterator:
    """The checks every input file gets; then a JSON array's items, or read_jsonl(file) for JSON Lines."""
    if not os.path.exists(p):
        yield Problem(p, 0, "", "no such file")
        return
    if os.path.isdir(p):
        yield Problem(p, 0, "", "is a directory, expected a .jsonl or .json file")
        return
    with open(p, "rb") as f:
        head = f.read(4096).lstrip(b"\xef\xbb\xbf").lstrip()
        f.seek(0)
        if not head:
            yield Problem(p, 0, "", "empty file")
            return
        if head.startswith(b"["):
            yield from _read_array(f, p, require_id)
            return
        yield from read_jsonl(f)


def _blocks(f, p: str, block_bytes: int) -> Iterator[Union[Block, Item]]:
    lineno, carry, pos = 1, b"", 0  # pos: file offset of carry's first byte
    while True:
        data = f.read(block_bytes)
        if not data:
            if carry:
                yield Block(lineno, carry, pos, len(carry))
            return
        data = carry + data if carry else data
        cut = data.rfind(b"\n") + 1
        if cut == 0:  # no line end yet: one line longer than a block
            carry = data
            if len(carry) > MAX_LINE_BYTES:  # skip the rest of the line; keep its head for the message
                size = len(carry)
                while True:
                    more = f.readline(MAX_LINE_BYTES)
                    size += len(more)
                    if not more or more.endswith(b"\n"):
                        break
                yield parse_line(_Long(carry[:2000], size), p, lineno)
                lineno, carry, pos = lineno + 1, b"", f.tell()
            continue
        yield Block(lineno, data[:cut], pos, cut)
        lineno += data.count(b"\n", 0, cut)
        carry, pos = data[cut:], pos + cut


def parse_block(data: bytes, path: str, first_lineno: int, *,
                require_id: bool = False) -> Iterator[tuple[int, bytes, Item]]:
    """The records and problems of one read_blocks block, as read_records gives them, each with its raw line and
    where that starts in data."""
    lines = data.split(b"\n")
    if not lines[-1]:
        lines.pop()  # the block ends with a newline (or is the file's unterminated last line)
    last, start = len(lines) - 1, 0
    for k, raw in enumerate(lines):
        at, start = start, start + len(raw) + 1
        if len(raw) >= MAX_LINE_BYTES and (k < last or data.endswith(b"\n")):
            raw += b"\n"  # the limit counts the newline, as readline does
        item = parse_line(raw, path, first_lineno + k, require_id=require_id)
        if item is not None:
            yield at, raw, item


def parse_line(raw: bytes, path: str, lineno: int, *, require_id: bool = False) -> Union[Item, None]:
    """One raw JSON Lines line → a Located record, a Problem, or None for a blank line."""
    if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    if len(raw) > MAX_LINE_BYTES:
        return Problem(path, lineno, "", f"line is {len(raw):,} bytes, over the {MAX_LINE_BYTES:,}-byte limit",
                       raw[:2000].decode("utf-8", "replace"))
    raw = raw.rstrip(b"\r\n")
    if not raw.strip():
        return None
    try:
        # orjson: the bulk of curate's per-record read cost (~2x faster than json, and it checks UTF-8 itself).
        # Stricter than json where JSON is: NaN, Infinity, lone surrogates (\ud800) are invalid JSON here.
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        text = _decode(raw, path, lineno)  # not UTF-8 is the more useful message where it applies
        if isinstance(text, Problem):
            return text
        return Problem(path, lineno, "", f"invalid JSON ({e.msg} at column {e.colno})", text[:2000])
    return _check(obj, path, lineno, raw, require_id)


def _lines(f) -> Iterator[bytes]:
    """Lines of a binary file; an over-long line is yielded cut short (with its length kept) instead of read whole."""
    while True:
        line = f.readline(MAX_LINE_BYTES + 1)
        if not line:
            return
        if len(line) > MAX_LINE_BYTES and not line.endswith(b"\n"):
            size = len(line)
            while True:  # skip the rest of the line without holding it
                more = f.readline(MAX_LINE_BYTES)
                size += len(more)
                if not more or more.endswith(b"\n"):
                    break
            yield _Long(line[:2000], size)
            continue
        yield line


class _Long(bytes):
    """The first bytes of an over-long line, with `len()` of the whole line."""

    def __new__(cls, head: bytes, size: int):
        obj = super().__new__(cls, head)
        obj._size = size
        return obj

    def __len__(self) -> int:  # noqa: D105
        return self._size


def _read_array(f, p: str, require_id: bool) -> Iterator[Item]:
    data = f.read()
    text = _decode(data, p, 1)
    if isinstance(text, Problem):
        yield text
        return
    text = text.lstrip("\ufeff")
    try:
        arr = json.loads(text)
    except json.JSONDecodeError as e:
        yield Problem(p, e.lineno, "", f"invalid JSON array ({e.msg} at column {e.colno})")
        return
    if not isinstance(arr, list):
        yield Problem(p, 1, "", "expected a JSON array of records or JSON Lines")
        return
    for i, obj in enumerate(arr, start=1):
        # In an array the "line" is the element number: that is what a user can find in an editor's outline.
        item = _check(obj, p, i, json.dumps(obj, ensure_ascii=False)[:2000], require_id)
        if isinstance(item, Problem):
            item.message += f" (array element {i})"
        yield item


def read_all(path: Union[str, Path], *, missing_ok: bool = False) -> list[dict]:
    """Every record of a file, or ReadError naming the first bad line (and how many more): for callers that must
    not act on a partial read (a release, a review merge, an eval split). An empty file is no records;
    a missing one too when `missing_ok`."""
    path = Path(path)
    if missing_ok and not path.exists():
        return []
    records, problems = [], []
    for item in read_records(path):
        if isinstance(item, Located):
            records.append(item.record)
        elif not (item.line == 0 and item.message == "empty file"):
            problems.append(item)
    if problems:
        more = f" (and {len(problems) - 1} more bad lines)" if len(problems) > 1 else ""
        raise ReadError(f"{problems[0]}{more}")
    return records


class ReadError(ValueError):
    """A file read_all could not read whole; the message is one line naming the file, line and field."""


def write_json_atomic(path: Union[str, Path], obj, *, indent: Optional[int] = 2, sort_keys: bool = False) -> None:
    """A JSON document (report, manifest, marker) through a temp file and rename: a crash never leaves half a file."""
    write_text_atomic(path, json.dumps(obj, ensure_ascii=False, indent=indent, sort_keys=sort_keys) + "\n")


def write_text_atomic(path: Union[str, Path], text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_jsonl_atomic(path: Union[str, Path], records) -> int:
    """Write records to `path` through a temp file and rename, so a reader never sees a half-written file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    n = 0
    with open(tmp, "w", encoding="utf-8") as f:
        for rec in records:
            f.write(dumps(rec))
            f.write("\n")
            n += 1
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return n
