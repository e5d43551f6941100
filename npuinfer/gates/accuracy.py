"""The accuracy baseline gate, without pytest: a baseline's accuracies and settings found and read, the settings
that make two runs comparable, and the pooled category verdicts of any task, over the groups its task file
declares (C-Eval's categories, Avg and Avg(Hard); MMLU's four categories and Avg; a task without subjects: Avg
alone); the per-subject drop is checked by the accuracy plugin with ``--max-acc-drop``.

``--acc-test``: ``drop`` fails any drop beyond ``--max-acc-drop``; ``mcnemar`` fails such a drop only when it is
significant: McNemar's exact test on the questions that flipped between the baseline's cache.csv and the run
(p < ``--alpha``). A baseline without cache.csv cannot be paired: the drop limit alone decides, with a note."""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from ..ceval.aggregate import CEVAL_GROUPING, Grouping
from ..ceval.cache import CACHE_FILE, IMPLIED_EXTRA, META_FILE, CacheError, read_cache, read_meta
from ..ceval.scored import ScoredRow
from ..reports.paired import PairedCounts
from ..ceval.report import SUBJECT_ACC
from ..ceval.rows import CEVAL_TASK
from ..ceval.run import find_task_baseline, results_dir
from ..ceval.scoring import PromptFit
from ..results.naming import CEVAL, ResultName
def read_subject_accuracy(path: str | os.PathLike, what: str = "subject") -> dict[str, float]:
    """Accuracies of a subject_acc.json (or, with ``what="category"``, a classes_acc.json); empty for a
    test-split report, which has none."""
    try:
        data = json.loads(Path(path).read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not a JSON file of {what} accuracies ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object of {what} -> accuracy")
    if data.get("split") == "test":
        return {}
    bad = [k for k, v in data.items() if not isinstance(v, (int, float)) or isinstance(v, bool)]
    if bad:
        raise ValueError(f"{path}: accuracy of {bad[0]!r} is not a number")
    return {k: float(v) for k, v in data.items()}


def find_baseline(baseline: str | os.PathLike, model: str, device_label: str) -> Path | None:
    """The subject_acc.json a --baseline points at for this model.

    Accepted: the file itself; a run directory holding it; or a directory of runs holding
    ``ceval_<model>_<device>/`` (any device when that one is missing but exactly one other is there:
    comparing an NPU run with a GPU baseline is the point).
    """
    path = Path(baseline)
    if path.is_file():
        return path
    if (path / SUBJECT_ACC).is_file():
        return path / SUBJECT_ACC
    exact = results_dir(path, model, device_label) / SUBJECT_ACC
    if exact.is_file():
        return exact
    others = sorted(path.glob(f"{ResultName(CEVAL, model, '*').name}/{SUBJECT_ACC}"))
    return others[0] if len(others) == 1 else None


def find_run_baseline(baseline: str | os.PathLike, task: str, model: str, device_label: str) -> Path | None:
    """The subject_acc.json a --baseline holds for a run of this task and model (C-Eval's: find_baseline)."""
    if task == CEVAL_TASK:
        return find_baseline(baseline, model, device_label)
    return find_task_baseline(baseline, task, model, device_label)


# --------------------------------------------------------------------------------- gating against a baseline

ACC_TESTS: tuple[str, ...] = ("drop", "mcnemar")


def read_baseline_rows(subject_acc: str | os.PathLike) -> dict[tuple[str, str], ScoredRow] | None:
    """The baseline's per-question rows (cache.csv beside its subject_acc.json) by (subject, id); None when it
    has none (a baseline made before `npuinfer baseline update` kept it)."""
    directory = Path(subject_acc).parent
    if not (directory / CACHE_FILE).is_file() or not (directory / META_FILE).is_file():
        return None
    try:
        return {r.key: r for r in read_cache(directory)}
    except CacheError as exc:
        raise ValueError(str(exc)) from None


def paired_against(baseline: dict[tuple[str, str], ScoredRow], rows: Iterable[ScoredRow],
                   name: str) -> PairedCounts:
    """The run's ``rows`` paired with the baseline's same questions: right in the baseline and wrong now
    (``right_to_wrong``), and the reverse; questions the baseline lacks are not counted."""
    counts = PairedCounts(name)
    for row in rows:
        base = baseline.get(row.key)
        if base is None or base.correct is None or row.correct is None:
            continue
        counts.questions += 1
        counts.agree += base.prediction == row.prediction
        if base.correct and not row.correct:
            counts.right_to_wrong += 1
        elif row.correct and not base.correct:
            counts.wrong_to_right += 1
    return counts


def significance_note(counts: PairedCounts, alpha: float) -> str:
    """What McNemar's test says of a drop, for a gate's message."""
    verdict = "significant" if counts.p_value < alpha else "not significant"
    return (f"{counts.right_to_wrong} question(s) right in the baseline and wrong now, {counts.wrong_to_right} the "
            f"reverse, of {counts.questions} paired: McNemar's exact p = {counts.p_value:.4g}, {verdict} at "
            f"--alpha {alpha:g}")

# The settings under which two accuracies are comparable at all; a baseline scored otherwise is not gated.
GATED_SETTINGS: tuple[str, ...] = ("template", "shots", "split", "scoring", "data_sha256", "fit", "task_sha256")


def gate_settings(meta: dict) -> dict[str, object]:
    """GATED_SETTINGS out of a cache_meta.json object (scoring, the data hash and fit live under ``extra``; a
    meta written before a setting existed implies the behaviour of then, cache.IMPLIED_EXTRA)."""
    extra = {**IMPLIED_EXTRA, **(meta.get("extra") or {})}
    return {"template": meta.get("template"), "shots": meta.get("shots"), "split": meta.get("split"),
            "scoring": extra.get("scoring"), "data_sha256": extra.get("data_sha256"), "fit": extra.get("fit"),
            "task_sha256": extra.get("task_sha256")}  # a user's task file: its version (None for a shipped task)


def settings_differences(baseline_meta: dict, run_meta: dict, prompts_fitted: bool = True) -> list[str]:
    """One ``"<setting> <baseline value> (baseline) vs <run value> (this run)"`` per differing setting.

    ``prompts_fitted=False``: no prompt of the compared subjects was over the model's length in this run (no shot
    dropped, none cut), so either fit gives the same prompts (same data, template, shots) and fit is not a
    difference.
    """
    old, new = gate_settings(baseline_meta), gate_settings(run_meta)
    return [f"{k} {old[k]!r} (baseline) vs {new[k]!r} (this run)" for k in GATED_SETTINGS
            if old[k] != new[k] and (k != "fit" or prompts_fitted)]


def any_prompt_fitted(fits: Iterable[PromptFit | dict | None]) -> bool:
    """Whether some subject dropped a shot or cut a prompt (an unknown PromptFit counts as fitted)."""
    for f in fits:
        if f is None:
            return True
        f = f if isinstance(f, PromptFit) else PromptFit(**f)
        if f.dropped_shots or f.truncated:
            return True
    return False


def read_baseline_meta(subject_acc: str | os.PathLike) -> dict | None:
    """The cache_meta.json beside a baseline's subject_acc.json; None when there is none."""
    directory = Path(subject_acc).parent
    if not (directory / META_FILE).is_file():
        return None
    try:
        return read_meta(directory)
    except CacheError as exc:
        raise ValueError(str(exc)) from None


def in_class(subject: str, key: str, grouping: Grouping = CEVAL_GROUPING) -> bool:
    """Whether a subject's questions count towards a classes_acc.json entry (of the task ``grouping`` is of)."""
    return key in grouping.keys_of(subject)


@dataclass(frozen=True)
class CategoryVerdict:
    category: str
    status: str  # "passed", "failed" or "not gated"
    accuracy: float | None
    baseline: float | None
    message: str


def gate_categories(run_subjects: dict[str, float], run_classes: dict[str, float],
                    base_subjects: dict[str, float], base_classes: dict[str, float],
                    max_drop: float, paired: Callable[[str], PairedCounts] | None = None,
                    alpha: float = 0.05, grouping: Grouping = CEVAL_GROUPING) -> list[CategoryVerdict]:
    """The pooled category (and Avg, and the task file's groups: C-Eval's Avg(Hard)) accuracies of a run against
    a baseline's; ``grouping``: the task's (aggregate.grouping), C-Eval's by default.

    Only categories the baseline has are looked at. A category is gated only when the run holds exactly
    the baseline's subjects of it: a pooled accuracy over other questions is not comparable. ``paired``
    (--acc-test mcnemar): a category's questions paired with the baseline's; a drop beyond ``max_drop`` then
    fails only when McNemar's p is below ``alpha``.
    """
    verdicts = []
    for key in grouping.class_keys:
        base = base_classes.get(key)
        if base is None:
            continue
        want = {s for s in base_subjects if in_class(s, key, grouping)}
        have = {s for s in run_subjects if in_class(s, key, grouping)}
        acc = run_classes.get(key)
        if want != have or acc is None:
            extra = f", and {len(have - want)} the baseline lacks" if have - want else ""
            verdicts.append(CategoryVerdict(key, "not gated", acc, base,
                                            f"{key}: category not gated: run covers {len(want & have)} of "
                                            f"{len(want)} subjects{extra}"))
            continue
        drop = base - acc
        counts = paired(key) if paired is not None and drop > max_drop + 1e-12 else None
        if counts is not None and counts.p_value >= alpha:
            verdicts.append(CategoryVerdict(key, "passed", acc, base,
                                            f"{key}: category accuracy {acc!r} is {drop:.6g} below the baseline "
                                            f"{base!r}, within chance: {significance_note(counts, alpha)}"))
        elif drop > max_drop + 1e-12:
            why = f"; {significance_note(counts, alpha)}" if counts is not None else ""
            verdicts.append(CategoryVerdict(key, "failed", acc, base,
                                            f"{key}: category accuracy {acc!r} is {drop:.6g} below the baseline "
                                            f"{base!r}; allowed drop {max_drop:g} (--max-acc-drop){why}"))
        else:
            verdicts.append(CategoryVerdict(key, "passed", acc, base,
                                            f"{key}: category accuracy {acc!r}, baseline {base!r}: passed"))
    return verdicts
