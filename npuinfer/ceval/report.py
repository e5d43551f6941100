"""Result files of a C-Eval run: subject_acc.json, classes_acc.json, summary.md, a bar chart.

On the test split (no answers) only predictions are reported: the JSON files say that no
accuracy was computed, and submission.json holds the predictions in the official upload format.
"""

from __future__ import annotations

import io
import json
import os
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from tabulate import tabulate

from npuinfer.atomic import write_atomic
from npuinfer.results.table import accuracy_text, key_value_lines
from npuinfer.ceval.aggregate import AVG, AVG_HARD, Aggregate, aggregate, macro_key
from npuinfer.ceval.cache import (
    PROMPT_FIT,
    RUN_RECORDS,
    CacheSettings,
    _id_key,
    check_meta_data,
    lock,
    merge_parts,
    read_all,
    read_meta,
)
from npuinfer.ceval.dataset import CHOICES
from npuinfer.ceval.scored import ScoredRow
from npuinfer.ceval.rows import CEVAL_TASK, rules_for, task_of
from npuinfer.ceval.subjects import CATEGORIES, get_subject, official_order
from npuinfer.tasks.spec import TaskSpec

SUBJECT_ACC = "subject_acc.json"
CLASSES_ACC = "classes_acc.json"
SUMMARY = "summary.md"
CHART = "ceval_acc.png"
SUBMISSION = "submission.json"
NO_ACCURACY = (
    "test split: the data has no answers, so no accuracy is computed; predictions only "
    f"(see {SUBMISSION})"
)


def _write_json(path: Path, obj: Any) -> None:
    write_atomic(path, json.dumps(obj, ensure_ascii=False, indent=2) + "\n")


def _settings_lines(settings: Mapping[str, Any] | CacheSettings | None) -> list[str]:
    if settings is None:
        return []
    meta = settings.to_meta() if isinstance(settings, CacheSettings) else dict(settings)
    extra = meta.pop("extra", None) or {}
    for key in RUN_RECORDS:
        meta.pop(key, None)
    return ["## Settings", "", *key_value_lines({**meta, **extra}, bullet="- "), ""]


def _check_rows(rows: list[ScoredRow]) -> bool:
    """True when every row has an answer, False when none has; anything else is an error."""
    if not rows:
        raise ValueError("no scored rows to report")
    keys = Counter(r.key for r in rows)
    dup = next((k for k, n in keys.items() if n > 1), None)
    if dup:
        raise ValueError(f"{dup[0]} id {dup[1]} appears more than once")
    with_answer = sum(r.answer is not None for r in rows)
    if 0 < with_answer < len(rows):
        raise ValueError(
            f"{with_answer} of {len(rows)} rows have answers: cannot mix scored rows with "
            "test-split predictions"
        )
    return with_answer == len(rows)


def _fit_columns(fits: Mapping[str, Any], name: str) -> tuple[str, ...]:
    fit = fits.get(name)
    if not isinstance(fit, Mapping):
        return ("-", "-", "-")
    return tuple(str(fit.get(k, "-")) for k in ("shots", "dropped_shots", "truncated"))


def _fit_lines(fits: Mapping[str, Any], subjects: Iterable[str]) -> list[str]:
    """What fitting the prompts to the model's length did, from cache_meta.json's prompt_fit record."""
    known = [fits[s] for s in subjects if isinstance(fits.get(s), Mapping)]
    if not known:
        return []
    cut = [f.get("truncated", 0) for f in known]
    dropped = [f.get("dropped_shots", 0) for f in known]
    return [f"Prompts over the model's length: {sum(cut)} cut from the left (lm-eval's truncation) in "
            f"{sum(1 for n in cut if n)} subjects; shots dropped in {sum(1 for n in dropped if n)} subjects "
            f"({sum(dropped)} in all). Per subject: shots kept, shots dropped, prompts cut.", ""]


def _scored_summary(agg: Aggregate, settings_lines: list[str], fits: Mapping[str, Any]) -> str:
    subject_rows = [
        (name, get_subject(name).name_zh, get_subject(name).category, t.total, t.correct,
         accuracy_text(t.accuracy), *_fit_columns(fits, name))
        for name, t in agg.subjects.items()
    ]
    class_rows = [(key, t.total, t.correct, accuracy_text(t.accuracy), accuracy_text(agg.macro[key]))
                  for key, t in agg.classes.items()]
    lines = [
        "# C-Eval results",
        "",
        *settings_lines,
        "Accuracy is correct / questions, pooled over all questions of a group: a category is not "
        f"the mean of its subjects. {AVG_HARD} pools the 8 hard subjects. The macro average (the C-Eval "
        "paper's) is the mean of the group's subject accuracies, every subject weighing the same: "
        f"`{macro_key('Avg')}` etc. in {CLASSES_ACC}.",
        "",
        *_fit_lines(fits, agg.subjects),
        "## Per subject",
        "",
        tabulate(subject_rows, headers=["subject", "名称", "category", "n", "correct", "accuracy", "shots",
                                        "shots dropped", "prompts cut"],
                 tablefmt="github", disable_numparse=True),
        "",
        "## Per category",
        "",
        tabulate(class_rows, headers=["category", "n", "correct", "accuracy (pooled)", "macro average"],
                 tablefmt="github", disable_numparse=True),
        "",
    ]
    return "\n".join(lines)


def _task_summary(agg: Aggregate, task: TaskSpec, settings_lines: list[str], fits: Mapping[str, Any]) -> str:
    """summary.md of a task other than C-Eval: the same tables, its own subjects and groups."""
    subject_rows = [(name, task.subject(name).name_zh or "-", task.subject(name).category, t.total, t.correct,
                     accuracy_text(t.accuracy), *_fit_columns(fits, name)) for name, t in agg.subjects.items()]
    class_rows = [(key, t.total, t.correct, accuracy_text(t.accuracy), accuracy_text(agg.macro[key]))
                  for key, t in agg.classes.items()]
    metric = "exact match" if task.metric == "exact_match" else "accuracy"
    lines = [
        f"# {task.task} results",
        "",
        *settings_lines,
        f"Metric: {metric} ({task.path.name}). Pooled over all questions of a group ({AVG}: every question); the "
        f"macro average is the mean of the group's subject figures: `{macro_key(AVG)}` etc. in {CLASSES_ACC}.",
        "",
        *_fit_lines(fits, agg.subjects),
        "## Per subject",
        "",
        tabulate(subject_rows, headers=["subject", "名称", "category", "n", "correct", metric, "shots",
                                        "shots dropped", "prompts cut"], tablefmt="github", disable_numparse=True),
        "",
        "## Per category",
        "",
        tabulate(class_rows, headers=["category", "n", "correct", f"{metric} (pooled)", "macro average"],
                 tablefmt="github", disable_numparse=True),
        "",
    ]
    return "\n".join(lines)


def chart_name(task: str) -> str:
    return CHART if task == CEVAL_TASK else f"{task}_acc.png"


def task_chart(agg: Aggregate, task: TaskSpec, settings: Mapping[str, Any] | None = None):
    """scored_chart's figure for a task other than C-Eval: its categories, its subjects."""
    from matplotlib.figure import Figure

    meta = dict(settings or {})
    fig = Figure(figsize=(9, max(6, 2 + 0.18 * len(agg.subjects))), layout="constrained")
    fig.suptitle(f"{task.task}: {meta.get('model', '?')} ({meta.get('dtype', '?')}), {meta.get('shots', '?')}-shot, "
                 f"{meta.get('split', '?')} split")
    top, bottom = fig.subplots(2, 1, height_ratios=[1, 4])
    keys = list(agg.classes)
    top.bar(keys, [agg.classes[k].accuracy for k in keys], color="tab:blue")
    top.set_ylim(0, 1)
    top.tick_params(axis="x", labelsize=7)
    names = list(agg.subjects)[::-1]
    colors = {c: f"C{i}" for i, c in enumerate(task.categories)}
    bottom.barh(names, [agg.subjects[n].accuracy for n in names],
                color=[colors.get(task.subject(n).category, "C9") for n in names])
    bottom.set_xlim(0, 1)
    bottom.tick_params(axis="y", labelsize=6)
    return fig


def _letter(prediction: str) -> str:
    return prediction if prediction in CHOICES else "other"


def _prediction_summary(rows: list[ScoredRow], settings_lines: list[str], fits: Mapping[str, Any]) -> str:
    letters = [*CHOICES, "other"]
    by_subject: dict[str, Counter[str]] = {}
    for r in rows:
        by_subject.setdefault(r.subject, Counter())[_letter(r.prediction)] += 1
    table = [
        (name, get_subject(name).name_zh, get_subject(name).category,
         sum(c.values()), *(c[x] for x in letters), *_fit_columns(fits, name))
        for name, c in sorted(by_subject.items(), key=lambda kv: official_order(kv[0]))
    ]
    lines = [
        "# C-Eval predictions (test split)",
        "",
        *settings_lines,
        f"**No accuracy:** {NO_ACCURACY}.",
        "",
        *_fit_lines(fits, by_subject),
        "## Predictions per subject",
        "",
        tabulate(table, headers=["subject", "名称", "category", "n", *letters, "shots", "shots dropped",
                                 "prompts cut"],
                 tablefmt="github", disable_numparse=True),
        "",
    ]
    return "\n".join(lines)


def _save(fig: Any, path: Path) -> None:
    # No version metadata, so the bytes depend only on the data (and the matplotlib build).
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, metadata={"Software": None})
    write_atomic(path, buf.getvalue())


CHANCE = 1 / len(CHOICES)  # four choices: a model that guesses scores 0.25


def chart_title(settings: Mapping[str, Any] | CacheSettings | None) -> str:
    """What the chart is of: model, checkpoint, template, shots and split (from cache_meta.json)."""
    if settings is None:
        return "C-Eval accuracy"
    meta = settings.to_meta() if isinstance(settings, CacheSettings) else dict(settings)
    return (f"C-Eval: {meta.get('model', '?')} (checkpoint {meta.get('checkpoint', '?')}, {meta.get('dtype', '?')})\n"
            f"template {meta.get('template', '?')}, {meta.get('shots', '?')}-shot, {meta.get('split', '?')} split")


def scored_chart(agg: Aggregate, settings: Mapping[str, Any] | CacheSettings | None = None):
    """The accuracy chart (a matplotlib Figure): categories on top, subjects below, the chance line on both."""
    # Figure.savefig uses the Agg canvas; no pyplot, so no global backend change for the caller.
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    fig = Figure(figsize=(9, 16), layout="constrained")
    fig.suptitle(chart_title(settings))
    top, bottom = fig.subplots(2, 1, height_ratios=[1, 5])
    keys = list(agg.classes)
    top.bar(keys, [agg.classes[k].accuracy for k in keys], color="tab:blue")
    top.axhline(CHANCE, color="black", linestyle="--", linewidth=1, label=f"chance ({CHANCE:g})")
    top.legend(loc="upper right")
    top.set_ylim(0, 1)
    top.set_ylabel("accuracy")
    top.set_title("per category (pooled over questions)")
    names = list(agg.subjects)[::-1]
    colors = {c: f"C{i}" for i, c in enumerate(CATEGORIES)}
    bottom.barh(names, [agg.subjects[n].accuracy for n in names],
                color=[colors[get_subject(n).category] for n in names])
    bottom.axvline(CHANCE, color="black", linestyle="--", linewidth=1)
    bottom.set_xlim(0, 1)
    bottom.margins(y=0.005)
    bottom.set_xlabel("accuracy")
    bottom.set_title("per subject")
    present = [c for c in CATEGORIES if c in agg.classes]
    bottom.legend(handles=[Patch(color=colors[c], label=c) for c in present]
                  + [Line2D([], [], color="black", linestyle="--", label=f"chance ({CHANCE:g})")], loc="lower right")
    bottom.tick_params(axis="y", labelsize=7)
    return fig


def _prediction_chart(rows: list[ScoredRow], path: Path) -> None:
    from matplotlib.figure import Figure

    letters = [*CHOICES, "other"]
    counts = {c: Counter() for c in CATEGORIES}
    for r in rows:
        counts[get_subject(r.subject).category][_letter(r.prediction)] += 1
    fig = Figure(figsize=(8, 4), layout="constrained")
    ax = fig.subplots()
    width = 0.8 / len(letters)
    for i, letter in enumerate(letters):
        ax.bar([j + i * width for j in range(len(CATEGORIES))],
               [counts[c][letter] for c in CATEGORIES], width, label=letter)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(CATEGORIES))], CATEGORIES)
    ax.set_ylabel("predictions")
    ax.set_title("C-Eval test split: predicted letters per category (no accuracy)")
    ax.legend()
    _save(fig, path)


def _prompt_fits(settings: Mapping[str, Any] | CacheSettings | None) -> Mapping[str, Any]:
    if settings is None or isinstance(settings, CacheSettings):
        return {}
    fits = settings.get(PROMPT_FIT)
    return fits if isinstance(fits, Mapping) else {}


def write_report(
    out_dir: str | os.PathLike,
    rows: Iterable[ScoredRow],
    settings: Mapping[str, Any] | CacheSettings | None = None,
) -> list[Path]:
    """Write the result files for these rows into out_dir; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = list(rows)
    scored = _check_rows(rows)
    settings_lines = _settings_lines(settings)
    task = task_of(settings.to_meta() if isinstance(settings, CacheSettings) else settings)
    if task != CEVAL_TASK:
        return _write_task_report(out, rows, rules_for(task).spec, settings, settings_lines, scored)
    paths = [out / SUBJECT_ACC, out / CLASSES_ACC, out / SUMMARY, out / CHART]
    if scored:
        agg = aggregate(rows)
        _write_json(paths[0], {k: t.accuracy for k, t in agg.subjects.items()})
        _write_json(paths[1], {**{k: t.accuracy for k, t in agg.classes.items()},
                               **{macro_key(k): v for k, v in agg.macro.items()}})
        write_atomic(paths[2], _scored_summary(agg, settings_lines, _prompt_fits(settings)))
        _save(scored_chart(agg, settings), paths[3])
        return paths
    counts = Counter(r.subject for r in rows)
    subjects = sorted(counts, key=official_order)
    _write_json(paths[0], {"split": "test", "accuracy": None, "note": NO_ACCURACY,
                           "predictions": {s: counts[s] for s in subjects}})
    _write_json(paths[1], {"split": "test", "accuracy": None, "note": NO_ACCURACY,
                           "predictions": len(rows)})
    write_atomic(paths[2], _prediction_summary(rows, settings_lines, _prompt_fits(settings)))
    _prediction_chart(rows, paths[3])
    submission: dict[str, dict[str, str]] = {}
    for r in sorted(rows, key=lambda r: (official_order(r.subject), _id_key(r.question_id))):
        submission.setdefault(r.subject, {})[r.question_id] = r.prediction
    paths.append(out / SUBMISSION)
    _write_json(paths[4], submission)
    return paths


def _write_task_report(out: Path, rows: list[ScoredRow], task: TaskSpec,
                       settings: Mapping[str, Any] | CacheSettings | None, settings_lines: list[str],
                       scored: bool) -> list[Path]:
    if not scored:
        raise ValueError(f"{task.task}: rows without answers; only C-Eval's test split is scored without them")
    meta = settings.to_meta() if isinstance(settings, CacheSettings) else settings
    paths = [out / SUBJECT_ACC, out / CLASSES_ACC, out / SUMMARY, out / chart_name(task.task)]
    agg = aggregate(rows, task)
    _write_json(paths[0], {k: t.accuracy for k, t in agg.subjects.items()})
    _write_json(paths[1], {**{k: t.accuracy for k, t in agg.classes.items()},
                           **{macro_key(k): v for k, v in agg.macro.items()}})
    write_atomic(paths[2], _task_summary(agg, task, settings_lines, _prompt_fits(settings)))
    _save(task_chart(agg, task, meta), paths[3])
    return paths


def rebuild_report(cache_dir: str | os.PathLike) -> list[Path]:
    """Rebuild every result file from cache.csv and cache_meta.json alone (no model needed).

    Holds the cache's lock throughout (runs appending to the cache wait, then carry on), and writes
    nothing until every row of the cache validated: then cache.csv is rewritten sorted (leftover part
    files folded in, identical duplicates collapsed, no row dropped) and the report written.
    """
    settings = read_meta(cache_dir)  # first: a directory that is no cache is named as such
    with lock(cache_dir):
        rows = read_all(cache_dir)
        _check_rows(rows)
        check_meta_data(cache_dir, settings)
        merge_parts(cache_dir)
        return write_report(cache_dir, rows, settings=settings)
