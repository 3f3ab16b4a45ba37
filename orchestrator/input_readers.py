"""Raw rows of a prompt file, one reader per format, each naming where every row came from.

    json_rows       JSON text: a JSON list (AlpacaEval) or JSON Lines, told apart by the first character
    parquet_rows    Parquet, a batch of rows at a time, only the columns asked for
    csv_rows        CSV with a header row, a block at a time, every cell as bytes (decoded by the caller)

Readers stream: memory holds a line, an element of a JSON list, or a batch of rows, not the file. They
deal with what editors and spreadsheet tools write (a UTF-8 byte-order mark, CRLF line ends, blank
lines) and refuse the rest with the file and the line or row: a UTF-16 file, an undecodable byte.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import chain
from typing import IO, Any

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from orchestrator.errors import InputError

__all__ = ["Place", "Row", "Select", "csv_rows", "json_rows", "parquet_rows", "text_lines"]

UTF8_BOM = b"\xef\xbb\xbf"
UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")
# Rows per Parquet batch: a few hundred prompts of a few KB each stay within a few MB.
PARQUET_BATCH = 512
_WHITESPACE = re.compile(r"[ \t\r\n]*")


@dataclass(frozen=True)
class Place:
    """Where a row starts: a line of JSON text (and the element of a JSON list), or a table row.

    CSV rows are counted the way a spreadsheet shows them (the header is row 1); Parquet rows from 1.
    """

    source: str
    line: int | None = None
    index: int | None = None
    row: int | None = None

    def __str__(self) -> str:
        if self.row is not None:
            return f"{self.source}: row {self.row}"
        return f"{self.source}:{self.line}" + (f": record [{self.index}]" if self.index is not None else "")

    def short(self) -> str:
        """The place without the file name, for a message that already names it."""
        if self.row is not None:
            return f"row {self.row}"
        return f"line {self.line}" + (f" (record [{self.index}])" if self.index is not None else "")


Row = tuple[Place, Any]
# Given a table's column names, the columns to read (raises InputError naming what is missing).
Select = Callable[[Sequence[str]], list[str]]


def _not_utf16(head: bytes, source: str) -> None:
    if head.startswith(UTF16_BOMS):
        raise InputError(
            f"{source}: not UTF-8 text: it starts with a UTF-16 byte-order mark; save it as UTF-8"
        )


def text_lines(raw_lines: Iterable[bytes], source: str) -> Iterator[tuple[int, str]]:
    """Numbered lines of UTF-8 text, without a leading byte-order mark; an undecodable byte names its line."""
    for number, raw in enumerate(raw_lines, start=1):
        if number == 1:
            _not_utf16(raw, source)
            raw = raw.removeprefix(UTF8_BOM)
        try:
            yield number, raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            column = len(raw[: exc.start].decode("utf-8", errors="replace")) + 1
            raise InputError(f"{source}:{number}: not UTF-8 text ({exc.reason} at column {column})") from None


def json_rows(lines: Iterator[tuple[int, str]], source: str, *, listed: bool | None = None) -> Iterator[Row]:
    """Values of JSON text with the line each starts on. `listed`: True, a JSON list; False, JSON Lines;
    None, whichever the first character says (`[` opens a list)."""
    head: list[tuple[int, str]] = []
    for number, text in lines:
        head.append((number, text))
        if text.strip():
            break
    if not head or not head[-1][1].strip():
        raise InputError(f"{source}: the file is empty: expected JSONL records or a JSON list")
    starts_list = head[-1][1].lstrip().startswith("[")
    rest = chain(head, lines)
    if listed is None:
        listed = starts_list
    elif listed and not starts_list:
        first = head[-1][1].strip()[0]
        raise InputError(f"{source}:{head[-1][0]}: expected a JSON list ('[' first), found {first!r}")
    if not listed:
        return _json_lines(rest, source)
    return _ListReader((text for _, text in rest), head[0][0], source).rows()


def _json_lines(lines: Iterator[tuple[int, str]], source: str) -> Iterator[Row]:
    for number, text in lines:
        if not text.strip():
            continue
        try:
            value = json.loads(text.rstrip("\r\n"))
        except json.JSONDecodeError as exc:
            raise InputError(f"{source}:{number}: invalid JSON: {exc.msg} (column {exc.colno})") from None
        yield Place(source, line=number), value


class _ListReader:
    """A top-level JSON list decoded element by element, reading more lines only as an element needs them.

    The buffer always starts at the beginning of a line, so positions in it convert to line and column.
    """

    def __init__(self, lines: Iterator[str], first_line: int, source: str) -> None:
        self._lines = lines
        self._source = source
        self._text = ""
        self._pos = 0
        self._line = first_line  # the line self._text starts on
        self._decoder = json.JSONDecoder()

    def _more(self) -> bool:
        line = next(self._lines, None)
        if line is None:
            return False
        self._text += line
        return True

    def _error(self, message: str, pos: int) -> InputError:
        line = self._line + self._text.count("\n", 0, pos)
        column = pos - (self._text.rfind("\n", 0, pos) + 1) + 1
        return InputError(f"{self._source}:{line}: invalid JSON: {message} (column {column})")

    def _next_char(self) -> str | None:
        """Skip white space (reading on as needed); the next character, or None at the end of the file."""
        while True:
            match = _WHITESPACE.match(self._text, self._pos)
            self._pos = match.end() if match else self._pos
            if self._pos < len(self._text):
                return self._text[self._pos]
            if not self._more():
                return None

    def _drop_read_lines(self) -> None:
        cut = self._text.rfind("\n", 0, self._pos) + 1
        if cut:
            self._line += self._text.count("\n", 0, cut)
            self._text, self._pos = self._text[cut:], self._pos - cut

    def _value(self) -> Any:
        while True:
            try:
                value, self._pos = self._decoder.raw_decode(self._text, self._pos)
                return value
            except json.JSONDecodeError as exc:
                # An error before the buffer's last line end is in the text; one at its end may only
                # mean the element goes on: read at least as much again (linear in the element's size).
                if exc.pos < len(self._text.rstrip()):
                    raise self._error(exc.msg, exc.pos) from None
                before = len(self._text)
                wanted = before + max(before - self._pos, 1)
                while len(self._text) < wanted and self._more():
                    pass
                if len(self._text) == before:
                    raise self._error(exc.msg, exc.pos) from None

    def rows(self) -> Iterator[Row]:
        self._next_char()
        self._pos += 1  # the opening bracket
        index = 0
        while True:
            char = self._next_char()
            if char == "]" and index == 0:
                raise InputError(f"{self._source}: the JSON list is empty")
            if char is None:
                raise self._error("the list is not closed (expected ']')", self._pos)
            self._drop_read_lines()
            place = Place(self._source, line=self._line + self._text.count("\n", 0, self._pos), index=index)
            yield place, self._value()
            index += 1
            char = self._next_char()
            if char == "]":
                break
            if char != ",":
                raise self._error("expected ',' or ']' after a list element", self._pos)
            self._pos += 1
        self._pos += 1
        if self._next_char() is not None:
            raise self._error("extra data after the list", self._pos)


def parquet_rows(handle: IO[bytes], source: str, select: Select) -> Iterator[Row]:
    """The rows of a Parquet file, a batch at a time, with the selected columns only."""
    try:
        parquet = pq.ParquetFile(handle)
    except (pa.ArrowException, OSError) as exc:
        raise InputError(f"{source}: not a Parquet file ({exc})") from None
    columns = select(parquet.schema_arrow.names)
    number = 0
    for batch in parquet.iter_batches(batch_size=PARQUET_BATCH, columns=columns):
        for values in batch.to_pylist():
            number += 1
            yield Place(source, row=number), values


def csv_rows(handle: IO[bytes], source: str, select: Select) -> Iterator[Row]:
    """The rows of a CSV file with a header row; cells as bytes (empty ones None), quoted line ends kept."""
    _not_utf16(handle.read(2), source)
    handle.seek(0)
    bad_rows: list[Any] = []

    def refuse(row: Any) -> str:
        bad_rows.append(row)
        return "error"

    # Serial reading: pyarrow numbers a bad row only then.
    read = pa_csv.ReadOptions(use_threads=False)
    parse = pa_csv.ParseOptions(newlines_in_values=True, invalid_row_handler=refuse)
    # Readers are closed as soon as they are done with: one left to the interpreter's exit can take
    # Arrow's read-ahead thread down with the process (SIGABRT, "terminate called without an active
    # exception"), which turned a clean input error into a crash now and then.
    try:
        with pa_csv.open_csv(handle, read_options=read, parse_options=parse) as header:
            names = header.schema.names
    except UnicodeDecodeError as exc:
        raise InputError(f"{source}: row 1: the header is not UTF-8 text ({exc.reason})") from None
    except pa.ArrowInvalid as exc:
        raise _csv_error(source, exc, bad_rows) from None
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise InputError(f"{source}: row 1: more than one column named {', '.join(map(repr, repeated))}")
    columns = select(names)
    handle.seek(0)
    convert = pa_csv.ConvertOptions(
        column_types={name: pa.binary() for name in columns},
        include_columns=columns,
        strings_can_be_null=True,
        null_values=[""],
    )
    with pa_csv.open_csv(handle, read_options=read, parse_options=parse, convert_options=convert) as reader:
        number = 1
        while True:
            try:
                batch = reader.read_next_batch()
            except StopIteration:
                return
            except pa.ArrowInvalid as exc:
                raise _csv_error(source, exc, bad_rows) from None
            for values in batch.to_pylist():
                number += 1
                yield Place(source, row=number), values


def _csv_error(source: str, exc: Exception, bad_rows: list[Any]) -> InputError:
    if bad_rows:
        row = bad_rows[0]
        return InputError(
            f"{source}: row {row.number}: expected {row.expected_columns} columns "
            f"(as in the header), got {row.actual_columns}"
        )
    message = str(exc).removeprefix("CSV parse error: ")
    if message == "Empty CSV file":
        return InputError(f"{source}: the file is empty: expected a header row and rows")
    return InputError(f"{source}: not a CSV file that can be read: {message}")
