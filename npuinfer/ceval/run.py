"""A C-Eval run: a loaded model, data, settings and a resumable result cache, scored one subject at a time.

Used by the pytest plugin (one test case per subject) and usable as is from a script or a command:

    run = CevalRun(loaded, RunSettings(data_dir), results_root / "ceval_qwen-7b_npu0")
    for subject in available_subjects(data_dir, "val"):
        print(run.run_subject(subject).accuracy)
    run.close(); rebuild_report(run.out_dir)
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from npuinfer.ceval.aggregate import AVG, AVG_HARD, CLASS_KEYS
from npuinfer.ceval.cache import (
    IMPLIED_EXTRA,
    META_FILE,
    PROMPT_FIT,
    CacheError,
    CacheSettings,
    QuestionCache,
    read_meta,
    record_in_meta,
)
from npuinfer.parallel import dist as tp_dist
from npuinfer.results.naming import CEVAL, ResultName, result_path
from npuinfer.ceval.dataset import SPLITS, data_identity, load_split
from npuinfer.ceval.prompts import TEMPLATES, resolve_fit
from npuinfer.ceval.report import SUBJECT_ACC
from npuinfer.ceval.scored import ScoredRow
from npuinfer.ceval.subjects import HARD_SUBJECTS, get_subject, official_order
from npuinfer.ceval.scoring import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_MAX_NEW_TOKENS,
    SCORING_MODES,
    PromptFit,
    ScoringStats,
    score_subject,
)


class NonFiniteScores(RuntimeError):
    """Questions whose logits were NaN or inf: errors, never scored."""


@dataclass(frozen=True)
class RunSettings:
    data_dir: Path
    split: str = "val"
    shots: int = 5
    template: str = "lmeval"
    scoring: str = "prefix"
    batch_size: int = DEFAULT_BATCH_SIZE  # not part of the cache settings: results do not depend on it
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS  # generate mode only
    fit: str | None = None  # prompts.FITS; None: the template's default (lmeval: truncate, atb: shots)

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise ValueError(f"split: expected one of {', '.join(SPLITS)}, got {self.split!r}")
        if self.template not in TEMPLATES:
            raise ValueError(f"template: expected one of {', '.join(TEMPLATES)}, got {self.template!r}")
        if self.scoring not in SCORING_MODES:
            raise ValueError(f"scoring: expected one of {', '.join(SCORING_MODES)}, got {self.scoring!r}")
        if self.shots < 0:
            raise ValueError(f"shots: expected >= 0, got {self.shots}")
        object.__setattr__(self, "fit", resolve_fit(self.fit, self.template))

    def cache_settings(self, loaded) -> CacheSettings:
        """Everything that changes a prediction: model, weights, prompt, dtype, data, scoring mode."""
        extra: dict[str, object] = {"scoring": self.scoring, **data_identity(self.data_dir, self.split),
                                    "max_seq_len": loaded.args.max_seq_len, "fit": self.fit}
        kernels = getattr(loaded, "kernels", None)
        if kernels is not None and kernels.label != "fused":  # fused (the default) adds nothing: older caches
            extra["kernels"] = kernels.label  # stay valid; a plain run never mixes rows with a fused one
        if self.scoring == "generate":
            extra["max_new_tokens"] = self.max_new_tokens
        if loaded.quantization.get("quantization", "none") != "none":  # W8 checkpoints (npuinfer.quant)
            extra.update({k: loaded.quantization[k] for k in ("quantization", "quant_kernel")})
        provenance = {} if kernels is None else {"kernels": kernels.describe(),
                                                 "kernel_check": kernels.check_summary()}
        return CacheSettings(model=loaded.name, checkpoint=loaded.checkpoint_id, template=self.template,
                             shots=self.shots, dtype=loaded.dtype_name, split=self.split, extra=extra,
                             provenance=provenance)


def results_dir(root: str | os.PathLike, model: str, device_label: str) -> Path:
    """``<root>/ceval_<model>_<device>/``: where a run's cache.csv and report files live."""
    return result_path(CEVAL, root, model, device_label)


@dataclass
class SubjectResult:
    subject: str
    rows: list[ScoredRow]  # every question of the subject: from the cache and scored now
    scored_now: int
    stats: ScoringStats = field(default_factory=ScoringStats)

    @property
    def fit(self) -> PromptFit | None:
        """Shots kept and dropped, prompts cut: how the subject's prompts were fitted to the model's length."""
        return self.stats.prompt_fit.get(self.subject)

    @property
    def questions(self) -> int:
        return len(self.rows)

    @property
    def correct(self) -> int | None:
        if any(r.correct is None for r in self.rows):
            return None
        return sum(bool(r.correct) for r in self.rows)

    @property
    def accuracy(self) -> float | None:
        """None on the test split (no answers)."""
        correct = self.correct
        return None if correct is None or not self.rows else correct / len(self.rows)


class CevalRun:
    """Scores subjects into ``out_dir``; questions already in its cache (same settings) are skipped."""

    def __init__(self, loaded, settings: RunSettings, out_dir: str | os.PathLike):
        self.loaded = loaded
        self.settings = settings
        self.out_dir = Path(out_dir)
        self.cache: QuestionCache | _RankView = _open_cache(self.out_dir, settings.cache_settings(loaded))

    def run_subject(self, subject: str) -> SubjectResult:
        s = self.settings
        questions = load_split(s.data_dir, subject, s.split)
        dev = load_split(s.data_dir, subject, "dev") if s.shots else []
        done = {qid: row for (_, qid), row in self.cache.scored_rows(subject).items()}
        stats = ScoringStats()
        new: list[ScoredRow] = []
        for scored in score_subject(self.loaded, subject, dev, questions, s.template, s.shots, s.scoring,
                                    s.batch_size, max_new_tokens=s.max_new_tokens, stats=stats,
                                    skip=set(done), fit=s.fit):
            self.cache.add(scored.row)
            new.append(scored.row)
        if stats.nonfinite:
            raise NonFiniteScores(
                f"{subject}: non-finite logits (NaN or inf) for {len(stats.nonfinite)} question(s), id(s) "
                f"{', '.join(stats.nonfinite)}: errors, not scored and not cached (the other questions are); look "
                "for NaN / inf in the weights, or an fp16 overflow (try --dtype bf16 or fp32)")
        by_id = {**done, **{r.question_id: r for r in new}}
        rows = [by_id[q.question_id] for q in questions]  # file order; KeyError would be a scoring bug
        return SubjectResult(subject, rows, len(new), stats)

    def close(self) -> None:
        self.cache.close()


class _RankView:
    """What a tensor-parallel rank other than 0 sees of the cache: rank 0's rows as they were when the
    run started (so every rank skips the same questions and runs the same forwards); it writes nothing."""

    def __init__(self, rows: dict[tuple[str, str], ScoredRow]):
        self._rows = rows

    def scored_rows(self, subject: str | None = None) -> dict[tuple[str, str], ScoredRow]:
        return {k: r for k, r in self._rows.items() if subject is None or r.subject == subject}

    def add(self, row: ScoredRow) -> None:
        pass

    def close(self) -> None:
        pass


def _open_cache(out_dir: Path, settings: CacheSettings) -> QuestionCache | _RankView:
    """The result cache; under tensor parallelism only rank 0 writes it (opened before the others read it)."""
    if tp_dist.tp_world() is None:
        return QuestionCache(out_dir, settings)
    if tp_dist.is_rank0():
        cache = QuestionCache(out_dir, settings)
        tp_dist.barrier()
        return cache
    tp_dist.barrier()
    return _RankView(QuestionCache.snapshot(out_dir))


def record_prompt_fit(out_dir: str | os.PathLike, fits: dict[str, PromptFit]) -> None:
    """Add each subject's PromptFit to the run's cache_meta.json (a record of the run, not a setting); called
    once by the process that merges the run (the only writer), before the report that shows them is written."""
    record_in_meta(out_dir, PROMPT_FIT, {s: asdict(f) for s, f in fits.items()}, order=official_order)


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


# --------------------------------------------------------------------------------- gating against a baseline

# The settings under which two accuracies are comparable at all; a baseline scored otherwise is not gated.
GATED_SETTINGS: tuple[str, ...] = ("template", "shots", "split", "scoring", "data_sha256", "fit")


def gate_settings(meta: dict) -> dict[str, object]:
    """GATED_SETTINGS out of a cache_meta.json object (scoring, the data hash and fit live under ``extra``; a
    meta written before a setting existed implies the behaviour of then, cache.IMPLIED_EXTRA)."""
    extra = {**IMPLIED_EXTRA, **(meta.get("extra") or {})}
    return {"template": meta.get("template"), "shots": meta.get("shots"), "split": meta.get("split"),
            "scoring": extra.get("scoring"), "data_sha256": extra.get("data_sha256"), "fit": extra.get("fit")}


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


def in_class(subject: str, key: str) -> bool:
    """Whether a subject's questions count towards a classes_acc.json entry."""
    if key == AVG:
        return True
    if key == AVG_HARD:
        return subject in HARD_SUBJECTS
    return get_subject(subject).category == key


@dataclass(frozen=True)
class CategoryVerdict:
    category: str
    status: str  # "passed", "failed" or "not gated"
    accuracy: float | None
    baseline: float | None
    message: str


def gate_categories(run_subjects: dict[str, float], run_classes: dict[str, float],
                    base_subjects: dict[str, float], base_classes: dict[str, float],
                    max_drop: float) -> list[CategoryVerdict]:
    """The pooled category (and Avg, Avg(Hard)) accuracies of a run against a baseline's.

    Only categories the baseline has are looked at. A category is gated only when the run holds exactly
    the baseline's subjects of it: a pooled accuracy over other questions is not comparable.
    """
    verdicts = []
    for key in CLASS_KEYS:
        base = base_classes.get(key)
        if base is None:
            continue
        want = {s for s in base_subjects if in_class(s, key)}
        have = {s for s in run_subjects if in_class(s, key)}
        acc = run_classes.get(key)
        if want != have or acc is None:
            extra = f", and {len(have - want)} the baseline lacks" if have - want else ""
            verdicts.append(CategoryVerdict(key, "not gated", acc, base,
                                            f"{key}: category not gated: run covers {len(want & have)} of "
                                            f"{len(want)} subjects{extra}"))
            continue
        drop = base - acc
        if drop > max_drop + 1e-12:
            verdicts.append(CategoryVerdict(key, "failed", acc, base,
                                            f"{key}: category accuracy {acc!r} is {drop:.6g} below the baseline "
                                            f"{base!r}; allowed drop {max_drop:g} (--max-acc-drop)"))
        else:
            verdicts.append(CategoryVerdict(key, "passed", acc, base,
                                            f"{key}: category accuracy {acc!r}, baseline {base!r}: passed"))
    return verdicts
