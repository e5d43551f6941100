"""Loader for the official C-Eval layout: <dir>/{dev,val,test}/{subject}_{split}.csv."""

from __future__ import annotations

import csv
import hashlib
import io
import os
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

from npuinfer.ceval.subjects import SUBJECT_NAMES

CHOICES: tuple[str, ...] = ("A", "B", "C", "D")
SPLITS: tuple[str, ...] = ("dev", "val", "test")

_BASE_COLUMNS = ("id", "question", "A", "B", "C", "D")
REQUIRED_COLUMNS: dict[str, tuple[str, ...]] = {
    # The explanation column is read when present but not required: only the answer is scored.
    "dev": _BASE_COLUMNS + ("answer",),
    "val": _BASE_COLUMNS + ("answer",),
    "test": _BASE_COLUMNS,
}


class CevalDataError(ValueError):
    """A C-Eval data file is missing or malformed; the message names the file (and row)."""


@dataclass(frozen=True)
class Question:
    subject: str
    split: str
    question_id: str
    question: str
    choices: tuple[str, str, str, str]
    answer: str | None  # None on the test split
    explanation: str | None = None

    def choice(self, letter: str) -> str:
        return self.choices[CHOICES.index(letter)]


def split_path(data_dir: str | os.PathLike, subject: str, split: str) -> Path:
    return Path(data_dir) / split / f"{subject}_{split}.csv"


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown C-Eval split {split!r}; expected one of {SPLITS}")


def _check_split_dir(data_dir: Path, split: str) -> Path:
    if not data_dir.is_dir():
        raise CevalDataError(f"{data_dir}: C-Eval data directory not found")
    split_dir = data_dir / split
    if not split_dir.is_dir():
        raise CevalDataError(f"{split_dir}: split directory not found in {data_dir}")
    return split_dir


def load_split(data_dir: str | os.PathLike, subject: str, split: str) -> list[Question]:
    """Rows of one subject file in file order (shots are taken from the start of dev)."""
    _check_split(split)
    path = split_path(data_dir, subject, split)
    if subject not in SUBJECT_NAMES:
        raise CevalDataError(f"{path}: unknown C-Eval subject {subject!r}")
    _check_split_dir(Path(data_dir), split)
    if not path.is_file():
        raise CevalDataError(f"{path}: file not found (subject {subject!r}, split {split!r})")
    # utf-8-sig: files re-saved by spreadsheet tools start with a BOM.
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise CevalDataError(f"{path}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at byte {exc.start}); "
                             "C-Eval files are UTF-8: convert it (e.g. iconv -f GBK -t UTF-8, for a file saved as "
                             "GBK)") from None
    with io.StringIO(text, newline="") as f:
        reader = _Records(csv.reader(f))
        try:
            return _parse_split(reader, path, subject, split)
        except csv.Error as exc:
            raise CevalDataError(f"{path}: from line {reader.record_line}: not CSV as C-Eval writes it ({exc}): a "
                                 f"field over {csv.field_size_limit()} characters is most often a quote left open; "
                                 "check the quoting from that line on") from None


class _Records:
    """A csv reader that knows the line its current record started on (a malformed record can run on for many
    lines before the reader gives up on it)."""

    def __init__(self, reader) -> None:
        self.reader = reader
        self.record_line = 1

    def __iter__(self) -> "_Records":
        return self

    def __next__(self) -> list[str]:
        self.record_line = self.reader.line_num + 1
        return next(self.reader)

    @property
    def line_num(self) -> int:
        return self.reader.line_num


def _parse_split(reader: _Records, path: Path, subject: str, split: str) -> list[Question]:
    header = next(reader, None)
    if header is None:
        raise CevalDataError(f"{path}: empty file (no header, no rows)")
    header = [h.strip() for h in header]
    missing = [c for c in REQUIRED_COLUMNS[split] if c not in header]
    if missing:
        raise CevalDataError(
            f"{path}: row 0 (header): missing column(s) {', '.join(missing)}; "
            f"found {', '.join(header)}"
        )
    col = {name: header.index(name) for name in header}
    questions: list[Question] = []
    first_row_of: dict[str, int] = {}
    for row_no, fields in enumerate(reader, start=1):
        where = f"{path}: row {row_no} (line {reader.line_num})"
        if len(fields) != len(header):
            raise CevalDataError(f"{where}: {len(fields)} fields, header has {len(header)}")
        qid = fields[col["id"]].strip()
        if not qid:
            raise CevalDataError(f"{where}: empty id")
        if qid in first_row_of:
            raise CevalDataError(
                f"{where}: duplicate id {qid!r} (first seen in row {first_row_of[qid]})"
            )
        first_row_of[qid] = row_no
        answer = None
        if split != "test":
            answer = fields[col["answer"]].strip()
            if answer not in CHOICES:
                raise CevalDataError(
                    f"{where}: answer {answer!r} for id {qid!r} is not one of A, B, C, D"
                )
        if not any(fields[col[c]].strip() for c in CHOICES):
            raise CevalDataError(f"{where}: id {qid!r} has all four choices A-D empty: nothing to choose "
                                 "between; fill them in or remove the row")
        questions.append(
            Question(
                subject=subject,
                split=split,
                question_id=qid,
                question=fields[col["question"]],
                choices=tuple(fields[col[c]] for c in CHOICES),  # type: ignore[arg-type]
                answer=answer,
                explanation=fields[col["explanation"]] if "explanation" in col else None,
            )
        )
    if not questions:
        raise CevalDataError(f"{path}: empty file (header only, no questions)")
    return questions


def available_subjects(data_dir: str | os.PathLike, split: str) -> list[str]:
    """Known subjects that have a file for this split, in subjects.csv order."""
    _check_split(split)
    split_dir = _check_split_dir(Path(data_dir), split)
    return [s for s in SUBJECT_NAMES if (split_dir / f"{s}_{split}.csv").is_file()]


def load_all(
    data_dir: str | os.PathLike, split: str, subjects: list[str] | None = None
) -> dict[str, list[Question]]:
    """Every subject of a split (or the given ones), keyed by subject in subjects.csv order."""
    names = available_subjects(data_dir, split) if subjects is None else subjects
    return {s: load_split(data_dir, s, split) for s in names}


def data_identity(data_dir: str | os.PathLike, split: str) -> dict[str, str]:
    """Where the data is and what it holds: the directory and one hash over its dev and ``split`` files.

    Goes into a result cache's settings, so rows scored on other data are never reused.
    """
    _check_split(split)
    root = Path(data_dir)
    digest = hashlib.sha256()
    for sub in sorted({"dev", split}):
        split_dir = _check_split_dir(root, sub)
        for path in sorted(split_dir.glob(f"*_{sub}.csv")):
            digest.update(f"{sub}/{path.name}\0".encode())
            digest.update(hashlib.sha256(path.read_bytes()).digest())
    return {"data_dir": str(root.resolve()), "data_sha256": digest.hexdigest()[:16]}


def sample_dir() -> Path:
    """The small synthetic sample shipped with npuinfer (default data of ``pytest accuracy/``).

    Written by npuinfer.ceval.synth (``python -m npuinfer.ceval.synth`` regenerates it): all 52
    subjects, 5 dev, 3 val and 2 test questions each, random text in the official format.
    """
    return Path(str(files("npuinfer.ceval").joinpath("sample")))
