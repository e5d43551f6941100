"""Generic result files: a keyed CSV that is written row by row, and markdown tables.

Used by the performance tables and meant for the C-Eval and comparison code too. A row is written
the moment it is measured: the file is rewritten to a temporary name, fsynced and renamed over the old
one (npuinfer.atomic, under a lock, so pytest-xdist workers can share a file), so a run killed at any point leaves
every row measured before it, and never a half-written line. Rows are keyed: writing a row whose
key is already present replaces it, so a rerun does not duplicate rows.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import warnings
from pathlib import Path
from typing import Collection, Iterable, Iterator, Mapping, Sequence

from ..atomic import write_atomic

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]


def format_value(value: object) -> str:
    """CSV cell text: '' for None / NaN, 9 significant digits for floats, compact JSON for lists / dicts."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.9g}"
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    return str(value)


def parse_float(text: str | None) -> float | None:
    if text is None or text == "":
        return None
    try:
        return float(text)
    except ValueError:
        return None


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock for writing ``path``: flock on its directory, so no lock files are left
    behind (writes are small, one lock per results directory is plenty)."""
    directory = Path(path).parent
    directory.mkdir(parents=True, exist_ok=True)
    if fcntl is None:
        yield
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


class ResultFileError(ValueError):
    """A results or baseline file that is not what its name says (binary, not CSV, another table)."""


def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """(header, rows) of a CSV file; ([], []) when it does not exist. A file that is not UTF-8 CSV text
    raises ResultFileError naming it."""
    path = Path(path)
    if not path.is_file():
        return [], []
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ResultFileError(f"{path}: not a CSV text file (not UTF-8: {exc.reason} at byte {exc.start})") from None
    if "\x00" in text:
        raise ResultFileError(f"{path}: not a CSV text file (NUL bytes at character {text.index(chr(0))})")
    try:
        reader = csv.DictReader(io.StringIO(text, newline=""))
        rows = [dict(row) for row in reader]
    except csv.Error as exc:
        raise ResultFileError(f"{path}: not a readable CSV file ({exc})") from None
    return list(reader.fieldnames or []), rows


class CsvTable:
    """A CSV file of keyed rows; ``columns`` come first in the header, unknown ones found in an
    existing file are kept after them."""

    def __init__(self, path: str | os.PathLike, columns: Sequence[str], key: Sequence[str]):
        missing = [k for k in key if k not in columns]
        if missing:
            raise ValueError(f"key columns not in the table: {missing}")
        self.path = Path(path)
        self.columns = list(columns)
        self.key = list(key)

    def key_of(self, row: Mapping[str, object]) -> tuple[str, ...]:
        return tuple(row.get(k) if isinstance(row.get(k), str) else format_value(row.get(k)) for k in self.key)

    def _read(self) -> tuple[list[str], list[dict[str, str]]]:
        """(header, rows) of the file; one holding none of the key columns belongs to something else: refused,
        never merged into (its rows would turn into blank rows of this table). A file lacking only some key
        columns is this table written before they existed: its rows are kept."""
        header, rows = read_csv(self.path)
        missing = [k for k in self.key if k not in header]
        if header and len(missing) == len(self.key):
            raise ResultFileError(f"{self.path}: not a table of this kind: its header ({','.join(header)}) lacks "
                                  f"the key column(s) {', '.join(missing)}; move it away or use another "
                                  "--results-dir")
        return header, rows

    def rows(self) -> list[dict[str, str]]:
        return self._read()[1]

    def find(self, key_values: Mapping[str, object]) -> dict[str, str] | None:
        wanted = self.key_of(key_values)
        return next((row for row in self.rows() if self.key_of(row) == wanted), None)

    def upsert(self, row: Mapping[str, object]) -> None:
        """Write ``row`` now, replacing the row with the same key (in place) or appending it."""
        cells = {k: v if isinstance(v, str) else format_value(v) for k, v in row.items()}
        unknown = [k for k in cells if k not in self.columns]
        if unknown:
            raise ValueError(f"{self.path.name}: unknown columns {unknown}")
        with file_lock(self.path):
            header, rows = self._read()
            columns = self.columns + [c for c in header if c not in self.columns]
            wanted = self.key_of(cells)
            for i, old in enumerate(rows):
                if self.key_of(old) == wanted:
                    rows[i] = cells
                    break
            else:
                rows.append(cells)
            write_csv(self.path, columns, rows)


def write_csv(path: Path, columns: Sequence[str], rows: Iterable[Mapping[str, str]]) -> None:
    """Write ``rows`` under ``columns`` (missing cells empty, others dropped), atomically."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({c: row.get(c, "") or "" for c in columns})
    write_atomic(Path(path), buf.getvalue())


class TornLineWarning(UserWarning):
    """A JSON-lines log ended in half a line (a run killed mid-write); the half was set aside."""


def append_jsonl(path: str | os.PathLike, record: Mapping[str, object]) -> None:
    """Append one JSON line (a log: nothing is replaced). A file that does not end with a newline ends in a
    torn line: appended to, it would swallow this record into that line, so the torn tail is moved to
    ``<name>.torn`` (kept, named in a TornLineWarning) first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(record, separators=(",", ":"), ensure_ascii=False) + "\n"
    with file_lock(path):
        _set_aside_torn_tail(path)
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(line)


def _set_aside_torn_tail(path: Path) -> None:
    try:
        fh = open(path, "rb+")
    except FileNotFoundError:
        return
    with fh:
        size = fh.seek(0, os.SEEK_END)
        if size == 0:
            return
        fh.seek(size - 1)
        if fh.read(1) == b"\n":
            return
        fh.seek(0)
        data = fh.read()
        whole = data.rfind(b"\n") + 1  # 0 when the file is one torn line
        torn = path.with_name(path.name + ".torn")
        with open(torn, "ab") as out:  # the torn tail is kept (first, on disk) before the file is cut
            out.write(data[whole:] + b"\n")
            out.flush()
            os.fsync(out.fileno())
        fh.truncate(whole)
        fh.flush()
        os.fsync(fh.fileno())
    warnings.warn(TornLineWarning(f"{path}: ended in a torn line ({size - whole} bytes, a run killed mid-write); "
                                  f"moved to {torn}, the next record starts on a line of its own"), stacklevel=3)


def varying_columns(rows: Sequence[Mapping[str, str]], candidates: Sequence[str]) -> list[str]:
    """The candidate columns whose value differs between rows (settings worth showing in a table)."""
    return [c for c in candidates if len({row.get(c, "") for row in rows}) > 1]


def short_number(text: object) -> str:
    """A number cell for reading: 4 significant digits, no exponent for everyday magnitudes."""
    value = parse_float(text) if isinstance(text, str) else text
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return "" if text is None else str(text)
    if isinstance(value, float) and math.isnan(value):
        return ""
    if float(value).is_integer() and abs(value) < 1e15:
        return str(int(value))
    magnitude = abs(value)
    if magnitude >= 1000:
        return f"{value:.0f}"
    if magnitude >= 1e-3:
        return f"{value:.4g}"
    return f"{value:.3e}"


def significant(value: float, digits: int = 3) -> str:
    """``value`` to ``digits`` significant figures, written without an exponent (274.7 -> '275', 0.04213 ->
    '0.0421', 50030.1 -> '50030'): times, bandwidths and rates for people."""
    if value == 0 or not math.isfinite(value):
        return f"{value:g}"
    decimals = max(0, digits - 1 - math.floor(math.log10(abs(value))))
    return f"{round(value, decimals):.{decimals}f}"


def accuracy_text(value: float | None) -> str:
    """An accuracy for people: 4 decimals ('-' when there is none); the JSON files keep full precision."""
    return "-" if value is None else f"{value:.4f}"


def key_value_lines(mapping: Mapping[str, object], indent: str = "", bullet: str = "") -> list[str]:
    """``key: value`` lines (each after ``bullet``, e.g. "- " for a markdown list); a mapping value becomes
    ``key:`` with its own lines indented under it."""
    lines = []
    for key, value in mapping.items():
        if isinstance(value, Mapping):
            lines.append(f"{indent}{bullet}{key}:")
            lines += key_value_lines(value, indent + "  ", bullet)
        else:
            lines.append(f"{indent}{bullet}{key}: {value}")
    return lines


def markdown_table(rows: Sequence[Mapping[str, object]], columns: Sequence[str], numeric: Collection[str] = ()) -> str:
    """A GitHub markdown table (tabulate) of ``columns``; the ``numeric`` ones shortened for reading with
    `short_number` (the CSV keeps full precision); empty cells stay empty."""
    from tabulate import tabulate

    def cell(row: Mapping[str, object], column: str) -> str:
        value = row.get(column)
        if column in numeric:
            return short_number(value)
        return "" if value is None else str(value)

    body = [[cell(row, c) for c in columns] for row in rows]
    return tabulate(body, headers=list(columns), tablefmt="github", disable_numparse=True)
