"""The 52 C-Eval subjects, read from the packaged subjects.csv."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from importlib.resources import files

from npuinfer.tasks.spec import TaskSubject

CATEGORIES: tuple[str, ...] = ("STEM", "Social Science", "Humanities", "Other")

HARD_SUBJECTS: tuple[str, ...] = (
    "advanced_mathematics",
    "discrete_mathematics",
    "probability_and_statistics",
    "college_chemistry",
    "college_physics",
    "high_school_mathematics",
    "high_school_chemistry",
    "high_school_physics",
)


@dataclass(frozen=True)
class Subject(TaskSubject):
    """A C-Eval subject: a task file's subject with the official val and dev question counts."""

    val_questions: int
    dev_questions: int


def _load() -> tuple[Subject, ...]:
    text = files("npuinfer.ceval").joinpath("subjects.csv").read_text(encoding="utf-8")
    subjects = tuple(
        Subject(
            name=row["subject"],
            name_zh=row["name_zh"],
            category=row["category"],
            val_questions=int(row["val_questions"]),
            dev_questions=int(row["dev_questions"]),
        )
        for row in csv.DictReader(io.StringIO(text))
    )
    names = {s.name for s in subjects}
    bad = [s.name for s in subjects if s.category not in CATEGORIES]
    if len(names) != len(subjects) or bad or not set(HARD_SUBJECTS) <= names:
        raise RuntimeError(f"packaged subjects.csv is inconsistent (bad categories: {bad})")
    return subjects


SUBJECTS: tuple[Subject, ...] = _load()
SUBJECT_NAMES: tuple[str, ...] = tuple(s.name for s in SUBJECTS)
_BY_NAME = {s.name: s for s in SUBJECTS}


def get_subject(name: str) -> Subject:
    try:
        return _BY_NAME[name]
    except KeyError:
        raise KeyError(f"unknown C-Eval subject {name!r}") from None


def official_order(name: str) -> tuple[int, str]:
    """Sort key: subjects.csv order, unknown names last (alphabetically)."""
    index = SUBJECT_NAMES.index(name) if name in _BY_NAME else len(SUBJECT_NAMES)
    return (index, name)
