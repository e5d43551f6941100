"""What a cache row of a task may hold: its subjects, its answers, its columns (the cache's validation rules).

C-Eval's rows are as they always were (FIELDS, subjects.csv, letters A-D). Another multiple-choice task's rows
differ only in their subjects; a generation task's (GSM8K) answer is the reference text and its prediction the
filtered answer, with the generated text in one more column so a disagreement can be read. A cache directory
says its task in cache_meta.json (``extra.task``; absent: C-Eval, so every older cache reads as before); a user's
task file (not shipped) also by its path (``extra.task_file``), so any later process reads its rows by its rules.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from npuinfer.ceval.dataset import CHOICES
from npuinfer.ceval.scored import FIELDS, LEGACY_FIELDS
from npuinfer.tasks.extract import exact_match
from npuinfer.tasks.spec import TaskFileError, TaskSpec, is_known_task, load_task

CEVAL_TASK = "ceval"
TASK_KEY = "task"  # key of cache_meta.json's extra
TASK_FILE_KEY = "task_file"  # a user's task: its file's path (extra), read where the name is not yet known
GENERATED = "generated"
GENERATION_FIELDS: tuple[str, ...] = LEGACY_FIELDS + (GENERATED,)


@dataclass(frozen=True)
class RowRules:
    spec: TaskSpec

    @property
    def task(self) -> str:
        return self.spec.task

    @property
    def generation(self) -> bool:
        return self.spec.output_type == "generate_until"

    @property
    def fields(self) -> tuple[str, ...]:
        """The columns every row has (a multiple-choice cache may add ``logprobs``: ``headers``)."""
        return GENERATION_FIELDS if self.generation else LEGACY_FIELDS

    @property
    def headers(self) -> tuple[tuple[str, ...], ...]:
        """The headers a cache.csv of the task may have: the newest first."""
        return (GENERATION_FIELDS,) if self.generation else (FIELDS, LEGACY_FIELDS)

    @property
    def subjects(self) -> tuple[str, ...]:
        return self.spec.subject_names

    @property
    def answers(self) -> tuple[str, ...] | None:
        """The answers a row may hold; None: free text (a generation task's reference)."""
        return None if self.generation else CHOICES

    def order(self, name: str) -> tuple[int, str]:
        """Sort key: the subject table's order, unknown names last (alphabetically)."""
        names = self.subjects
        return (names.index(name) if name in names else len(names), name)

    def correct(self, answer: str, prediction: str) -> bool:
        if self.generation:
            return exact_match(self.spec, prediction, answer)
        return prediction == answer


_RULES: dict[object, RowRules] = {}


def rules_for(task: str | TaskSpec = CEVAL_TASK) -> RowRules:
    spec = task if isinstance(task, TaskSpec) else load_task(task)
    if spec.path not in _RULES:
        _RULES[spec.path] = RowRules(spec)
    return _RULES[spec.path]


def task_of(meta: Mapping[str, Any] | None) -> str:
    """The task a cache_meta.json object is of (C-Eval when it names none). A user's task file named in it
    (``extra.task_file``) is read when the name is not known yet in this process, so the name resolves
    (load_task); a task already known by that name (the run's own file) is not read again from another path
    (a baseline copied from another machine), its version told apart by ``extra.task_sha256``."""
    extra = (meta or {}).get("extra") or {}
    task = extra.get(TASK_KEY, CEVAL_TASK) if isinstance(extra, Mapping) else CEVAL_TASK
    if not isinstance(task, str):
        return CEVAL_TASK
    task_file = extra.get(TASK_FILE_KEY)
    if isinstance(task_file, str) and not is_known_task(task):
        spec = load_task(task_file)
        if spec.task != task:
            raise TaskFileError(f"{task_file}: task: {spec.task!r}, while the results it was named in are of task "
                                f"{task!r}: the file was changed since")
    return task
