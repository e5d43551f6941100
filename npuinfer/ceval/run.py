"""A C-Eval run: a backend, data, settings and a resumable result cache, scored one subject at a time.

Used by the pytest plugin (one test case per subject) and usable as is from a script or a command:

    run = CevalRun(NpuinferBackend(loaded), RunSettings(data_dir), results_root / "ceval_qwen-7b_npu0")
    for subject in available_subjects(data_dir, "val"):
        print(run.run_subject(subject).accuracy)
    run.close(); rebuild_report(run.out_dir)
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from npuinfer.ceval.cache import PROMPT_FIT, CacheSettings, QuestionCache, check_against_data, record_in_meta
from npuinfer.ceval.dataset import SPLITS, CevalDataError, data_identity, load_split, split_path
from npuinfer.ceval.prompts import TEMPLATES, resolve_fit
from npuinfer.ceval.scored import ScoredRow
from npuinfer.ceval.subjects import official_order
from npuinfer.parallel import dist as tp_dist
from npuinfer.results.naming import CEVAL, result_path
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

    def cache_settings(self, backend) -> CacheSettings:
        """Everything that changes a prediction: backend, model, weights, prompt, dtype, data, scoring mode."""
        ident = backend.identity()
        extra: dict[str, object] = {"scoring": self.scoring, **data_identity(self.data_dir, self.split),
                                    "max_seq_len": ident.max_length, "fit": self.fit}
        if ident.backend != "npuinfer":  # npuinfer's (the first backend) adds nothing: older caches stay valid
            extra["backend"] = ident.backend
        if ident.kernels and ident.kernels != "fused":  # likewise fused, the default; a plain run never mixes
            extra["kernels"] = ident.kernels  # its rows with a fused one
        if self.scoring == "generate":
            extra["max_new_tokens"] = self.max_new_tokens
        if ident.quantization.get("quantization", "none") != "none":  # W8 checkpoints (npuinfer.quant)
            extra.update({k: ident.quantization[k] for k in ("quantization", "quant_kernel")})
        return CacheSettings(model=ident.model, checkpoint=ident.checkpoint, template=self.template,
                             shots=self.shots, dtype=ident.dtype, split=self.split, extra=extra,
                             provenance=dict(ident.provenance))


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

    def __init__(self, backend, settings: RunSettings, out_dir: str | os.PathLike):
        self.backend = backend  # npuinfer.backends.base.Backend
        self.settings = settings
        self.out_dir = Path(out_dir)
        self.cache: QuestionCache | _RankView = _open_cache(self.out_dir, settings.cache_settings(backend))

    def run_subject(self, subject: str) -> SubjectResult:
        s = self.settings
        questions = load_split(s.data_dir, subject, s.split)
        dev = load_split(s.data_dir, subject, "dev") if s.shots else []
        if len(dev) < s.shots:
            raise CevalDataError(f"{split_path(s.data_dir, subject, 'dev')}: {len(dev)} row(s), and {s.shots} shots "
                                 f"were asked for (--shot): pass --shot {len(dev)} or fewer, or add dev rows")
        check_against_data(self.out_dir, s.data_dir, s.split, [subject])  # before a row is added or trusted
        done = {qid: row for (_, qid), row in self.cache.scored_rows(subject).items()}
        stats = ScoringStats()
        new: list[ScoredRow] = []
        for scored in score_subject(self.backend, subject, dev, questions, s.template, s.shots, s.scoring,
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
