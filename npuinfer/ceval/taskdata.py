"""A task's data as the scorers read it: multiple-choice rows as Questions, generation rows as Problems.

C-Eval (layout ceval_csv) goes through npuinfer.ceval.dataset exactly as before; every other task through the
layout readers of npuinfer.tasks.data, its columns named by the task file.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

from npuinfer.ceval import dataset
from npuinfer.ceval.dataset import CHOICES, CevalDataError, Question
from npuinfer.tasks import data as task_data
from npuinfer.tasks.data import TaskDataError
from npuinfer.tasks.extract import reference
from npuinfer.tasks.spec import TaskSpec, load_task


@dataclass(frozen=True)
class Problem:
    """One row of a generation task: its columns, and the reference answer the metric compares with."""

    subject: str
    split: str
    question_id: str
    fields: dict[str, str] = field(compare=False)
    answer: str | None


class TaskData:
    """The rows of one task in one data directory."""

    def __init__(self, task: TaskSpec | str, data_dir: str | os.PathLike) -> None:
        self.task = load_task(task) if isinstance(task, str) else task
        self.data_dir = Path(data_dir)
        self.is_ceval = self.task.layout == "ceval_csv"

    def path(self, subject: str, split: str) -> Path:
        if self.is_ceval:
            return dataset.split_path(self.data_dir, subject, split)
        return task_data.split_path(self.task, self.data_dir, subject, split)

    def subjects(self, split: str) -> list[str]:
        if self.is_ceval:
            return dataset.available_subjects(self.data_dir, split)
        try:
            return task_data.available_subjects(self.task, self.data_dir, split)
        except TaskDataError as exc:
            raise CevalDataError(str(exc)) from None

    def questions(self, subject: str, split: str) -> list[Question]:
        """A multiple-choice task's rows of one subject file, in file order."""
        if self.is_ceval:
            return dataset.load_split(self.data_dir, subject, split)
        t = self.task
        out = []
        for row in self._rows(subject, split):
            answer = row.fields[t.doc_to_target].strip()
            if answer not in CHOICES:
                raise CevalDataError(f"{self.path(subject, split)}: line {row.line}: {t.doc_to_target} {answer!r} "
                                     f"for id {row.row_id!r} is not one of A, B, C, D")
            out.append(Question(subject=subject, split=split, question_id=row.row_id,
                                question=row.fields[t.question_column],
                                choices=tuple(row.fields[c] for c in CHOICES),  # type: ignore[arg-type]
                                answer=answer))
        return out

    def problems(self, subject: str, split: str) -> list[Problem]:
        """A generation task's rows of one file, in file order."""
        return [Problem(subject, split, row.row_id, row.fields, row.fields.get(self.task.answer_column))
                for row in self._rows(subject, split)]

    def answers(self, subject: str, split: str) -> dict[str, str | None]:
        """question id -> the answer a cache row must carry."""
        if self.task.output_type == "generate_until":
            return {p.question_id: reference(self.task, p.answer) for p in self.problems(subject, split)}
        return {q.question_id: q.answer for q in self.questions(subject, split)}

    def _rows(self, subject: str, split: str) -> list[task_data.Row]:
        try:
            return task_data.read_rows(self.task, self.data_dir, subject, split)
        except TaskDataError as exc:
            raise CevalDataError(str(exc)) from None

    def identity(self, split: str) -> dict[str, str]:
        """The directory and one hash over the shot split's and the scored split's files (cache settings)."""
        if self.is_ceval:
            return dataset.data_identity(self.data_dir, split)
        digest = hashlib.sha256()
        for sub in sorted({split, *([self.task.fewshot_split] if self.task.fewshot_split else [])}):
            for subject in self.task.subject_names:
                path = self.path(subject, sub)
                if path.is_file():
                    digest.update(f"{path.relative_to(self.data_dir)}\0".encode())
                    digest.update(hashlib.sha256(path.read_bytes()).digest())
        return {"data_dir": str(self.data_dir.resolve()), "data_sha256": digest.hexdigest()[:16]}
