"""Accuracy per subject and per category: pooled over questions, and the macro average over subjects."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from npuinfer.ceval.scored import ScoredRow
from npuinfer.ceval.subjects import CATEGORIES, HARD_SUBJECTS, get_subject, official_order
from npuinfer.tasks.spec import TaskSpec

AVG = "Avg"
AVG_HARD = "Avg(Hard)"
CLASS_KEYS: tuple[str, ...] = CATEGORIES + (AVG, AVG_HARD)
# classes_acc.json key of a group's macro average: the mean of its subjects' accuracies (the C-Eval paper's
# average), beside the pooled correct / questions under the plain key (lm-eval's ceval-valid group, seed tables).
MACRO_SUFFIX = " (macro)"


def macro_key(key: str) -> str:
    return key + MACRO_SUFFIX


@dataclass(frozen=True)
class Tally:
    correct: int
    total: int

    @property
    def accuracy(self) -> float:
        return self.correct / self.total


@dataclass(frozen=True)
class Aggregate:
    subjects: dict[str, Tally]  # subjects.csv order
    classes: dict[str, Tally]  # CLASS_KEYS order, empty groups left out; pooled over questions
    macro: dict[str, float]  # same keys: the mean of the group's subject accuracies


@dataclass(frozen=True)
class Grouping:
    """How a task's subjects are grouped in its summary: categories, then Avg, then the task file's groups."""

    class_keys: tuple[str, ...]
    category: Callable[[str], str]  # raises KeyError for a subject the task does not have
    groups: dict[str, tuple[str, ...]]
    order: Callable[[str], tuple[int, str]]

    def keys_of(self, name: str) -> tuple[str, ...]:
        """The classes a subject's questions count towards: its category, Avg, and each group holding it
        (KeyError for a subject the task does not have)."""
        return (self.category(name), AVG, *(key for key, members in self.groups.items() if name in members))


CEVAL_GROUPING = Grouping(CLASS_KEYS, lambda name: get_subject(name).category, {AVG_HARD: HARD_SUBJECTS},
                          official_order)


def grouping(task: TaskSpec | None) -> Grouping:
    """C-Eval's grouping (task None or ceval), or a task file's."""
    if task is None or task.task == "ceval":
        return CEVAL_GROUPING
    names = task.subject_names
    return Grouping(task.categories + (AVG,) + tuple(task.groups), lambda name: task.subject(name).category,
                    dict(task.groups), lambda name: (names.index(name) if name in names else len(names), name))


def aggregate(rows: Iterable[ScoredRow], task: TaskSpec | None = None) -> Aggregate:
    """Tallies per subject and per class (``task``: whose subjects and groups; None: C-Eval's).

    A category's accuracy is correct / questions over all its questions (not a mean of subject
    accuracies); Avg pools every question, Avg(Hard) the questions of the 8 hard subjects. ``macro`` holds,
    for the same groups, the mean of their subjects' accuracies (every subject weighs the same).
    """
    g = grouping(task)
    per_subject: dict[str, list[int]] = {}
    for row in rows:
        if row.correct is None:
            raise ValueError(
                f"{row.subject} id {row.question_id} has no answer: accuracy is undefined "
                "(test split?)"
            )
        g.category(row.subject)  # unknown subjects cannot be placed in a category
        tally = per_subject.setdefault(row.subject, [0, 0])
        tally[0] += int(row.correct)
        tally[1] += 1
    subjects = {
        name: Tally(*per_subject[name]) for name in sorted(per_subject, key=g.order)
    }
    groups: dict[str, list[str]] = {c: [] for c in g.class_keys}
    for name in subjects:
        for key in g.keys_of(name):
            groups[key].append(name)
    classes = {
        key: Tally(sum(subjects[n].correct for n in names), sum(subjects[n].total for n in names))
        for key, names in groups.items()
        if names
    }
    macro = {key: sum(subjects[n].accuracy for n in names) / len(names) for key, names in groups.items() if names}
    return Aggregate(subjects=subjects, classes=classes, macro=macro)


def subject_accuracy(rows: Iterable[ScoredRow], task: TaskSpec | None = None) -> dict[str, float]:
    return {k: t.accuracy for k, t in aggregate(rows, task).subjects.items()}


def classes_accuracy(rows: Iterable[ScoredRow], task: TaskSpec | None = None) -> dict[str, float]:
    """classes_acc.json: the pooled accuracies (CLASS_KEYS), then the macro averages (macro_key)."""
    agg = aggregate(rows, task)
    return {**{k: t.accuracy for k, t in agg.classes.items()}, **{macro_key(k): v for k, v in agg.macro.items()}}
