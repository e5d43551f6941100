"""Two runs side by side: the tables of a bring-up report (REFERENCE.md section 4).

A run is a results directory: ``performance_<model>_<device>.csv`` files and/or accuracy directories of any task
``<task>_<model>_<device>/`` (``ceval_``, ``mmlu_``, ``gsm8k_``, a user's task) with ``subject_acc.json`` and
``classes_acc.json``. Runs are matched per model (the device is what differs between an NPU run and a GPU run);
performance rows on (model, batch, input, output), accuracy per task on subject and on the task's categories
(groups); a task's results are only ever compared with the same task's.

Every row is in one table: a case, subject or model present in one run only is listed with a note
saying so, never dropped. Ratio columns are ``A/B`` (the published 对比 column), difference columns
``A-B``, with the labels in the column names so a reader sees which run is which.
This module never imports pytest.
"""
from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

from ..ceval.aggregate import Grouping, grouping
from ..ceval.report import CLASSES_ACC, SUBJECT_ACC
from ..ceval.rows import CEVAL_TASK
from ..ceval.run import read_results_dir
from ..tasks.spec import load_task
from ..results.performance import BATCH, FIRST, INPUT, NEXT, OUTPUT, POST, PRE, QUIET, QUIET_REASONS, RESPONSE, \
    THROUGHPUT
from ..results.naming import model_of
from ..atomic import write_atomic
from ..device import cpu_model_name
from ..results.table import markdown_table, parse_float, read_csv
from .paired import PairedRuns, pair_runs

PERFORMANCE_METRICS = (FIRST, NEXT, RESPONSE, THROUGHPUT, PRE, POST)


@dataclass(frozen=True)
class Labels:
    a: str
    b: str

    @property
    def ratio(self) -> str:
        return f"{self.a}/{self.b} (对比)"

    @property
    def diff(self) -> str:
        return f"{self.a}-{self.b}"


def parse_labels(text: str | None, run_a: Path, run_b: Path) -> Labels:
    """``--labels NPU,GPU``; by default the two directories' names (A and B when those are equal)."""
    if text is None:
        a, b = Path(run_a).resolve().name, Path(run_b).resolve().name
        return Labels(a, b) if a != b else Labels("A", "B")
    parts = [p.strip() for p in text.split(",")]
    if len(parts) != 2 or not all(parts) or parts[0] == parts[1]:
        raise ValueError(f"--labels: expected two different names separated by a comma, such as NPU,GPU; got {text!r}")
    return Labels(*parts)


# --------------------------------------------------------------------------------------------- reading runs


@dataclass
class Run:
    """What a results directory holds, per model."""

    path: Path
    performance: dict[str, list[dict[str, str]]] = field(default_factory=dict)  # model -> rows
    performance_files: dict[str, list[Path]] = field(default_factory=dict)
    # (task, model) -> (dir, subjects, classes)
    accuracy: dict[tuple[str, str], tuple[Path, dict, dict]] = field(default_factory=dict)

    def accuracy_models(self) -> set[str]:
        return {model for _, model in self.accuracy}


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object of name -> accuracy")
    return data


def read_run(path: str | Path, what: str = "run") -> Run:
    """Scan a results directory; an error names it when it holds nothing to compare."""
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"{what} {root}: not a directory")
    run = Run(root)
    for csv_path in sorted(root.glob("performance_*.csv")):
        header, rows = read_csv(csv_path)
        missing = [c for c in (BATCH, INPUT, OUTPUT) if c not in header]
        if missing:
            raise ValueError(f"{csv_path}: missing column(s) {', '.join(missing)}: not a performance CSV")
        for row in rows:
            model = row.get("model") or model_of(csv_path)
            run.performance.setdefault(model, []).append(row)
            run.performance_files.setdefault(model, [])
            if csv_path not in run.performance_files[model]:
                run.performance_files[model].append(csv_path)
    for acc in sorted(root.glob(f"*/{SUBJECT_ACC}")):
        named = read_results_dir(acc.parent)
        if named is None:
            continue  # not an accuracy run's directory
        key = (named.task, named.model)
        classes_path = acc.parent / CLASSES_ACC
        subjects = _read_json(acc)
        classes = _read_json(classes_path) if classes_path.is_file() else {}
        if key in run.accuracy:
            raise ValueError(f"{what} {root}: two {task_title(named.task)} directories for {named.model} "
                             f"({run.accuracy[key][0].name}, {acc.parent.name}): compare runs of one device each")
        run.accuracy[key] = (acc.parent, subjects, classes)
    if not run.performance and not run.accuracy:
        raise ValueError(f"{what} {root}: no performance_<model>_<device>.csv and no "
                         f"<task>_<model>_<device>/{SUBJECT_ACC} (ceval_, mmlu_, gsm8k_, ...): nothing to compare")
    return run


# --------------------------------------------------------------------------------------------- arithmetic


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b not in (None, 0) else None


def difference(a: float | None, b: float | None) -> float | None:
    return a - b if a is not None and b is not None else None


def _num(value: object) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return None if math.isnan(value) else float(value)
    return parse_float(value if isinstance(value, str) else None)


# --------------------------------------------------------------------------------------------- performance


def _case_key(row: Mapping[str, str]) -> tuple[int, int, int, str]:
    """(batch, input, output, request rate): a served deployment's open-loop case has a rate and no batch."""
    rate = row.get("request_rate") or ""
    return int(float(row[BATCH])) if row.get(BATCH) else 0, int(float(row[INPUT])), int(float(row[OUTPUT])), rate


def _latest_per_case(rows: Sequence[Mapping[str, str]]) -> tuple[dict[tuple, Mapping[str, str]], list[Mapping[str, str]]]:
    """One row per (batch, input, output): the latest measured; the older duplicates are returned apart."""
    best: dict[tuple, Mapping[str, str]] = {}
    older: list[Mapping[str, str]] = []
    for row in sorted(rows, key=lambda r: r.get("measured_at", "")):
        key = _case_key(row)
        if key in best:
            older.append(best[key])
        best[key] = row
    return best, older


def is_busy(row: Mapping[str, str]) -> bool:
    """Measured while other processes used the machine (the noise guard's ``quiet`` column is False)."""
    return str(row.get(QUIET, "")).strip().lower() == "false"


def _machines(rows: Sequence[Mapping[str, str]]) -> list[str]:
    return sorted({r.get("device_name") or "" for r in rows} - {""})


def one_machine(rows: Sequence[Mapping[str, str]], other: Sequence[Mapping[str, str]], label: str,
                model: str) -> tuple[list[Mapping[str, str]], str | None]:
    """The rows of one machine (``device_name``) where a run holds several (a baseline directory keeps rows per
    CPU model), chosen as the gate chooses: the other run's machine when it has one, else this machine's CPU
    model; with a note saying which. Rows of a single machine come back as they are, with no note."""
    machines = _machines(rows)
    if len(machines) < 2:
        return list(rows), None
    theirs = _machines(other)
    for wanted, why in ((theirs[0] if len(theirs) == 1 else None, "the other run's machine"),
                        (cpu_model_name(), "this machine's CPU model")):
        if wanted in machines:
            return ([r for r in rows if r.get("device_name") == wanted],
                    f"{label} {model}: rows of {len(machines)} machines ({'; '.join(machines)}); compared those of "
                    f"{wanted} ({why}), as the gate does")
    return list(rows), (f"{label} {model}: rows of {len(machines)} machines ({'; '.join(machines)}), none of them the "
                        "other run's or this machine's; the newest row of each case is compared")


def performance_rows(a: Run, b: Run, labels: Labels) -> tuple[list[dict[str, object]], list[str]]:
    """Long rows: one per (model, case, metric) with both values, ratio and difference; and notes."""
    out: list[dict[str, object]] = []
    notes: list[str] = []
    for model in sorted(set(a.performance) | set(b.performance)):
        cases = {}
        for label, run, other in ((labels.a, a, b), (labels.b, b, a)):
            rows, why = one_machine(run.performance.get(model, []), other.performance.get(model, []), label, model)
            if why:
                notes.append(why)
            best, older = _latest_per_case(rows)
            cases[label] = best
            for row in older:
                notes.append(f"{label} {model} bs{row[BATCH]}-in{row[INPUT]}-out{row[OUTPUT]}: an older row "
                             f"(measured {row.get('measured_at') or '?'}, {row.get('timing')} timing, "
                             f"{row.get('dtype')}) has a newer one for the same case; the newer one is compared")
        if model not in a.performance or model not in b.performance:
            only = labels.a if model in a.performance else labels.b
            notes.append(f"{model}: performance only in {only}")
        for key in sorted(set(cases[labels.a]) | set(cases[labels.b]), key=lambda k: (k[1], k[2], k[3], k[0])):
            ra, rb = cases[labels.a].get(key), cases[labels.b].get(key)
            note = []
            if ra is None or rb is None:
                note.append(f"only in {labels.a if ra is not None else labels.b}")
            for label, row in ((labels.a, ra), (labels.b, rb)):
                if row is not None and row.get("status", "ok") != "ok":
                    note.append(f"{row.get('status')} in {label}")
                if row is not None and is_busy(row):
                    note.append(f"BUSY in {label} ({row.get(QUIET_REASONS) or 'not quiet'})")
            for metric in PERFORMANCE_METRICS:
                va = _num(ra.get(metric)) if ra is not None and ra.get("status", "ok") == "ok" else None
                vb = _num(rb.get(metric)) if rb is not None and rb.get("status", "ok") == "ok" else None
                if va is None and vb is None and not note:
                    continue  # a metric neither run measured (e.g. pre/post in normal timing)
                out.append({"model": model, BATCH: f"rate {key[3]}" if key[3] else key[0], INPUT: key[1],
                            OUTPUT: key[2], "metric": metric,
                            labels.a: va, labels.b: vb, labels.ratio: ratio(va, vb), labels.diff: difference(va, vb),
                            "note": "; ".join(note)})
    return out, notes


def performance_settings(run: Run, model: str) -> str:
    rows = run.performance.get(model, [])
    if not rows:
        return "-"
    r = rows[-1]
    parts = [r.get("device_name") or r.get("device"), r.get("dtype"), r.get("backend"), f"{r.get('timing')} timing"]
    if r.get("tp") and r.get("tp") != "1":
        parts.append(f"tp {r.get('tp')}")
    if r.get("quantization") not in (None, "", "none"):
        parts.append(f"{r.get('quantization')} ({r.get('quant_kernel')})")
    return ", ".join(p for p in parts if p)


# --------------------------------------------------------------------------------------------- accuracy


def task_title(task: str) -> str:
    return "C-Eval" if task == CEVAL_TASK else task


def task_grouping(task: str) -> Grouping:
    """The task's subject groups (its file's; C-Eval's categories, Avg and Avg(Hard))."""
    return grouping(load_task(task))  # ceval's file gives C-Eval's grouping (aggregate.grouping)


def _accuracies(data: Mapping[str, object]) -> tuple[dict[str, float], str]:
    """name -> accuracy, and a note for a report without accuracies (the test split)."""
    if data.get("split") == "test" or data.get("accuracy", 0) is None:
        return {}, "no accuracy (test split)"
    return {k: float(v) for k, v in data.items() if _num(v) is not None}, ""


def _class_members(subjects: Mapping[str, object], g: Grouping) -> dict[str, set[str]]:
    """Category / Avg / the task's groups -> the run's subjects pooled into it."""
    members: dict[str, set[str]] = {}
    for name in subjects:
        try:
            keys = g.keys_of(name)
        except KeyError:  # not a subject of the task (a test-split report's keys)
            continue
        for key in keys:
            members.setdefault(key, set()).add(name)
    return members


def accuracy_rows(a: Run, b: Run, labels: Labels) -> tuple[list[dict[str, object]], list[str]]:
    out: list[dict[str, object]] = []
    notes: list[str] = []
    for key in sorted(set(a.accuracy) | set(b.accuracy)):
        task, model = key
        title = f"{model} {task_title(task)}"
        if key not in a.accuracy or key not in b.accuracy:
            notes.append(f"{title}: accuracy only in {labels.a if key in a.accuracy else labels.b}")
        g = task_grouping(task)
        for group, index, order in (("category", 2, list(g.class_keys)), ("subject", 1, None)):
            per_run = {}
            for label, run in ((labels.a, a), (labels.b, b)):
                if key in run.accuracy:
                    values, why = _accuracies(run.accuracy[key][index])
                    per_run[label] = values
                    if why:
                        notes.append(f"{label} {title}: {why}")
            names = set().union(*per_run.values()) if per_run else set()
            if order is not None:
                ordered = [n for n in order if n in names] + sorted(names - set(order))
            else:
                ordered = sorted(names, key=g.order)
            members = {label: _class_members(run.accuracy[key][1], g) for label, run in ((labels.a, a), (labels.b, b))
                       if key in run.accuracy} if group == "category" else {}
            for name in ordered:
                va, vb = per_run.get(labels.a, {}).get(name), per_run.get(labels.b, {}).get(name)
                note = "" if va is not None and vb is not None else f"only in {labels.a if va is not None else labels.b}"
                if not note and len(members) == 2:
                    ma, mb = members[labels.a].get(name, set()), members[labels.b].get(name, set())
                    if ma != mb:
                        note = (f"pooled over different subjects: {len(ma)} in {labels.a}, {len(mb)} in {labels.b}, "
                                f"{len(ma & mb)} in both")
                out.append({"task": task, "model": model, "group": group, "name": name, labels.a: va, labels.b: vb,
                            labels.diff: difference(va, vb), labels.ratio: ratio(va, vb), "note": note})
    return out, notes


# --------------------------------------------------------------------------------------------- output


@dataclass
class Comparison:
    labels: Labels
    run_a: Run
    run_b: Run
    performance: list[dict[str, object]]
    accuracy: list[dict[str, object]]
    notes: list[str]
    # (task, model) -> question-by-question comparison
    paired: dict[tuple[str, str], PairedRuns] = field(default_factory=dict)

    def busy_warning(self) -> str | None:
        """Said when either run has a row measured on a busy machine: its ratios may show the other processes."""
        busy = {}
        for label, run in ((self.labels.a, self.run_a), (self.labels.b, self.run_b)):
            rows = [r for rows in run.performance.values() for r in rows]
            count = sum(is_busy(r) for r in rows)
            if count:
                busy[label] = f"{count} of {len(rows)} rows of {label}"
        if not busy:
            return None
        return (f"WARNING: {' and '.join(busy.values())} were measured on a busy machine (quiet = False: their times "
                "include other processes' work); the ratios of the rows marked BUSY are not the devices' own. "
                "Measure again on a quiet machine (pytest bench/ --require-quiet).")

    def performance_columns(self) -> list[str]:
        la = self.labels
        return ["model", BATCH, INPUT, OUTPUT, "metric", la.a, la.b, la.ratio, la.diff, "note"]

    def accuracy_columns(self) -> list[str]:
        la = self.labels
        return ["task", "model", "group", "name", la.a, la.b, la.diff, la.ratio, "note"]


def compare_runs(run_a: str | Path, run_b: str | Path, labels: Labels) -> Comparison:
    a, b = read_run(run_a, "RUN_A"), read_run(run_b, "RUN_B")
    paired = pair_single_models(a, b)
    perf, perf_notes = performance_rows(a, b, labels)
    acc, acc_notes = accuracy_rows(a, b, labels)
    questions = {key: pair_runs(a.accuracy[key][0], b.accuracy[key][0])
                 for key in sorted(a.accuracy.keys() & b.accuracy.keys())
                 if (a.accuracy[key][0] / "cache.csv").is_file() and (b.accuracy[key][0] / "cache.csv").is_file()}
    return Comparison(labels, a, b, perf, acc, paired + _task_notes(a, b, labels) + perf_notes + acc_notes, questions)


def _task_notes(a: Run, b: Run, labels: Labels) -> list[str]:
    """Runs whose accuracy results share no task: nothing of theirs is compared or paired, and they are told so."""
    tasks_a, tasks_b = {t for t, _ in a.accuracy}, {t for t, _ in b.accuracy}
    if not tasks_a or not tasks_b or tasks_a & tasks_b:
        return []
    return [f"{labels.a} holds {', '.join(sorted(map(task_title, tasks_a)))} and {labels.b} "
            f"{', '.join(sorted(map(task_title, tasks_b)))}: no task in both; results of different tasks are never "
            "compared or paired question by question"]


def pair_single_models(a: Run, b: Run) -> list[str]:
    """One model in each run under different names (a float directory and its quantized copy, qwen-7b and
    qwen-7b-w8a16): they are compared with each other, under the name ``A-name / B-name``."""
    models_a = set(a.performance) | a.accuracy_models()
    models_b = set(b.performance) | b.accuracy_models()
    if len(models_a) != 1 or len(models_b) != 1 or models_a == models_b:
        return []
    (ma,), (mb,) = models_a, models_b
    name = f"{ma} / {mb}"
    for run, model in ((a, ma), (b, mb)):
        for table in (run.performance, run.performance_files):
            if model in table:
                table[name] = table.pop(model)
        run.accuracy = {(task, name if m == model else m): v for (task, m), v in run.accuracy.items()}
    return [f"{name}: one model in each run under different names; compared with each other"]


def _cell(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)  # full precision in the CSV
    return str(value)


def to_csv(rows: Sequence[Mapping[str, object]], columns: Sequence[str]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([_cell(row.get(c)) for c in columns])
    return buf.getvalue()


def to_markdown(c: Comparison) -> str:
    la = c.labels
    lines = [f"# {la.a} vs {la.b}", "",
             f"- {la.a}: `{c.run_a.path}`", f"- {la.b}: `{c.run_b.path}`",
             f"- `{la.ratio}` is {la.a}'s value divided by {la.b}'s: for times below 1 means {la.a} is faster, "
             f"for throughput and accuracy above 1 means {la.a} is higher. `{la.diff}` is {la.a}'s value minus {la.b}'s.",
             ""]
    busy = c.busy_warning()
    if busy:
        lines += [f"**{busy}**", ""]
    if c.performance:
        lines += ["## Performance", ""]
        for model in dict.fromkeys(r["model"] for r in c.performance):
            lines += [f"### {model}", "",
                      f"{la.a}: {performance_settings(c.run_a, model)}; {la.b}: {performance_settings(c.run_b, model)}",
                      "",
                      markdown_table([r for r in c.performance if r["model"] == model], c.performance_columns()[1:],
                                     numeric={la.a, la.b, la.ratio, la.diff}), ""]
    for task in dict.fromkeys(r["task"] for r in c.accuracy):
        lines += [f"## Accuracy ({task_title(task)})", ""]
        for model in dict.fromkeys(r["model"] for r in c.accuracy if r["task"] == task):
            rows = [r for r in c.accuracy if r["model"] == model and r["task"] == task]
            for group, title in (("category", "by category"), ("subject", "by subject")):
                part = [r for r in rows if r["group"] == group]
                if part:
                    lines += [f"### {model}, {title}", "",
                              markdown_table(part, ["name", la.a, la.b, la.diff, la.ratio, "note"],
                                             numeric={la.a, la.b, la.diff, la.ratio}), ""]
    for (task, model), pr in c.paired.items():
        o = pr.overall
        lines += [f"## {model} {task_title(task)}: question by question", "",
                  f"{o.questions} questions scored by both runs, {o.agree} predicted alike; {o.right_to_wrong} right in "
                  f"{la.a} and wrong in {la.b}, {o.wrong_to_right} the reverse; McNemar's exact p = {o.p_value:.4g} "
                  f"({'a difference beyond chance at 0.05' if o.p_value < 0.05 else 'no difference beyond chance at 0.05'})"
                  + (f"; {pr.only_one} questions scored in one run only" if pr.only_one else ""), "",
                  markdown_table([s.row() for s in pr.subjects] + [o.row()],
                                 ["name", "questions", "agree", "right->wrong", "wrong->right", "McNemar p"],
                                 numeric={"McNemar p"}), ""]
        lines += [pr.drift.describe() if pr.drift else f"Log-prob drift: not available ({pr.drift_missing})",
                  ""]
        if pr.flips:
            lines += [f"Questions that flipped ({la.a} -> {la.b}):", "",
                      markdown_table([{"subject": f.subject, "id": f.question_id, "answer": f.answer,
                                       la.a: f.prediction_a, la.b: f.prediction_b} for f in pr.flips],
                                     ["subject", "id", "answer", la.a, la.b]), ""]
    if c.notes:
        lines += ["## Notes", "", *[f"- {n}" for n in c.notes], ""]
    return "\n".join(lines)


def write_comparison(c: Comparison, out_dir: str | Path) -> list[Path]:
    """compare.md, and performance.csv / accuracy.csv where there is something to put in them."""
    out = Path(out_dir)
    written = []
    if c.performance:
        written.append(out / "performance.csv")
        write_atomic(written[-1], to_csv(c.performance, c.performance_columns()))
    if c.accuracy:
        written.append(out / "accuracy.csv")
        write_atomic(written[-1], to_csv(c.accuracy, c.accuracy_columns()))
    written.append(out / "compare.md")
    write_atomic(written[-1], to_markdown(c))
    return written
