"""The rows of a task's data files, in the layouts task files name (csv_header, csv_noheader, jsonl).

C-Eval's own layout (ceval_csv) is read by npuinfer.ceval.dataset; these readers serve the other tasks. A row
is its file's columns by name, plus an id: the file's id column when the task names one (CMMLU's unnamed index
column), else the row's 0-based position in the file (MMLU's and GSM8K's files have no id). Errors name the
file, the row and what was expected.
"""
from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

from npuinfer.tasks.spec import TaskSpec


class TaskDataError(ValueError):
    """A task's data file is missing or malformed; the message names the file (and row)."""


@dataclass(frozen=True)
class Row:
    row_id: str
    fields: dict[str, str]
    line: int  # where the row starts in its file (1-based)


def split_path(task: TaskSpec, data_dir: str | os.PathLike, subject: str, split: str) -> Path:
    return Path(data_dir) / task.files.format(split=split, subject=subject)


def available_subjects(task: TaskSpec, data_dir: str | os.PathLike, split: str) -> list[str]:
    """The task's subjects that have a file for this split, in the subject table's order."""
    root = Path(data_dir)
    if not root.is_dir():
        raise TaskDataError(f"{root}: {task.task} data directory not found")
    found = [s for s in task.subject_names if split_path(task, root, s, split).is_file()]
    if not found:
        where = split_path(task, root, "<subject>", split)
        raise TaskDataError(f"{root}: no {task.task} file for the {split} split (expected {where} for a subject of "
                            f"{task.path.name})")
    return found


def read_rows(task: TaskSpec, data_dir: str | os.PathLike, subject: str, split: str) -> list[Row]:
    path = split_path(task, data_dir, subject, split)
    if not path.is_file():
        raise TaskDataError(f"{path}: file not found ({task.task} subject {subject!r}, split {split!r})")
    try:
        text = path.read_bytes().decode("utf-8-sig")  # a BOM from a spreadsheet tool is dropped
    except UnicodeDecodeError as exc:
        raise TaskDataError(f"{path}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at byte {exc.start}); "
                            "convert it (e.g. iconv -f GBK -t UTF-8)") from None
    if task.layout == "jsonl":
        rows = _jsonl(text, path, task.columns)
    else:
        try:
            rows = _csv(text, path, task.columns, task.layout == "csv_header", task.id_column)
        except csv.Error as exc:
            raise TaskDataError(f"{path}: not CSV ({exc})") from None
    if not rows:
        raise TaskDataError(f"{path}: no rows")
    return rows


def _csv(text: str, path: Path, columns: tuple[str, ...], header: bool, id_column: str | None) -> list[Row]:
    reader = csv.reader(io.StringIO(text, newline=""))
    names = list(columns)
    if header:
        first = next(reader, None)
        if first is None:
            raise TaskDataError(f"{path}: empty file (no header, no rows)")
        found = [h.strip() for h in first]
        missing = [c for c in columns if c not in found]
        if missing:
            raise TaskDataError(f"{path}: row 0 (header): missing column(s) {', '.join(missing)}; found "
                                f"{','.join(found)}; expected {','.join(columns)}")
        names = found
    rows: list[Row] = []
    seen: dict[str, int] = {}
    line = reader.line_num + 1
    for index, values in enumerate(reader):
        where = f"{path}: row {index + 1} (line {line})"
        if len(values) != len(names):
            raise TaskDataError(f"{where}: {len(values)} fields, expected {len(names)} ({','.join(names)})")
        fields = dict(zip(names, values))
        row_id = fields[id_column].strip() if header and id_column is not None and id_column in fields else str(index)
        if not row_id:
            raise TaskDataError(f"{where}: empty id in column {id_column!r}")
        if row_id in seen:
            raise TaskDataError(f"{where}: duplicate id {row_id!r} (first in row {seen[row_id]})")
        seen[row_id] = index + 1
        rows.append(Row(row_id, fields, line))
        line = reader.line_num + 1
    return rows


def _jsonl(text: str, path: Path, columns: tuple[str, ...]) -> list[Row]:
    rows = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TaskDataError(f"{path}: line {line_no}: not a JSON object ({exc.msg})") from None
        if not isinstance(obj, dict):
            raise TaskDataError(f"{path}: line {line_no}: expected a JSON object, got {type(obj).__name__}")
        missing = [c for c in columns if not isinstance(obj.get(c), str)]
        if missing:
            raise TaskDataError(f"{path}: line {line_no}: missing or non-string field(s) {', '.join(missing)}")
        rows.append(Row(str(len(rows)), {c: obj[c] for c in obj if isinstance(obj[c], str)}, line_no))
    return rows
