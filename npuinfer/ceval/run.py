"""A C-Eval run: a backend, data, settings and a resumable result cache, scored one subject at a time.

Used by the pytest plugin (one test case per subject) and usable as is from a script or a command:

    run = CevalRun(NpuinferBackend(loaded), RunSettings(data_dir), results_root / "ceval_qwen-7b_npu0")
    for subject in available_subjects(data_dir, "val"):
        print(run.run_subject(subject).accuracy)
    run.close(); rebuild_report(run.out_dir)
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from npuinfer.ceval.cache import (
    META_FILE,
    PROMPT_FIT,
    CacheError,
    CacheSettings,
    QuestionCache,
    check_against_data,
    read_meta,
    record_in_meta,
)
from npuinfer.ceval.dataset import SPLITS, CevalDataError
from npuinfer.ceval.generation import score_generation
from npuinfer.ceval.prompts import TEMPLATES, Template, resolve_fit, task_templates
from npuinfer.ceval.report import SUBJECT_ACC
from npuinfer.ceval.rows import CEVAL_TASK, TASK_FILE_KEY, TASK_KEY, rules_for, task_of
from npuinfer.ceval.scored import ScoredRow
from npuinfer.ceval.subjects import official_order
from npuinfer.ceval.taskdata import TaskData
from npuinfer.parallel import dist as tp_dist
from npuinfer.results.naming import CEVAL, TASK_KINDS, ResultName, result_path
from npuinfer.tasks.spec import TaskSpec, load_task
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
    split: str | None = None  # None: the task's test_split (C-Eval: val)
    shots: int = 5
    template: str = "lmeval"
    scoring: str = "prefix"
    batch_size: int = DEFAULT_BATCH_SIZE  # not part of the cache settings: results do not depend on it
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS  # generate mode only
    fit: str | None = None  # prompts.FITS; None: the template's default (lmeval: truncate, atb: shots)
    task: str = CEVAL_TASK  # a task file's name (npuinfer/tasks/<task>.yaml); C-Eval's rows and names by default
    max_gen_toks: int | None = None  # a generation task's token budget; None: its file's generation_kwargs

    def __post_init__(self) -> None:
        spec = load_task(self.task)
        if self.split is None:
            object.__setattr__(self, "split", spec.test_split)
        if spec.task != self.task:
            raise ValueError(f"task: {spec.path} says task {spec.task!r}, asked for {self.task!r}")
        if spec.layout == "ceval_csv" and self.split not in SPLITS:
            raise ValueError(f"split: expected one of {', '.join(SPLITS)}, got {self.split!r}")
        if self.scoring not in SCORING_MODES:
            raise ValueError(f"scoring: expected one of {', '.join(SCORING_MODES)}, got {self.scoring!r}")
        if self.shots < 0:
            raise ValueError(f"shots: expected >= 0, got {self.shots}")
        if spec.output_type == "generate_until":
            if self.max_gen_toks is None:
                object.__setattr__(self, "max_gen_toks", spec.max_gen_toks)
            if self.max_gen_toks < 1:
                raise ValueError(f"max_gen_toks: expected >= 1, got {self.max_gen_toks}")
            if self.template not in spec.templates:
                raise ValueError(f"template: task {self.task} has {', '.join(spec.templates)}, got {self.template!r}")
            object.__setattr__(self, "fit", "truncate")
            return
        templates = TEMPLATES if self.task == CEVAL_TASK else task_templates(spec)
        if self.template not in templates:
            raise ValueError(f"template: expected one of {', '.join(templates)}, got {self.template!r}")
        object.__setattr__(self, "fit", resolve_fit(self.fit, templates[self.template]))

    @property
    def spec(self) -> TaskSpec:
        return load_task(self.task)

    def prompt_template(self) -> Template:
        """A multiple-choice task's Template (C-Eval: prompts.TEMPLATES)."""
        return TEMPLATES[self.template] if self.task == CEVAL_TASK else task_templates(self.spec)[self.template]

    def cache_settings(self, backend) -> CacheSettings:
        """Everything that changes a prediction: backend, model, weights, prompt, dtype, data, scoring mode."""
        ident = backend.identity()
        extra: dict[str, object] = {"scoring": self.scoring,
                                    **TaskData(self.spec, self.data_dir).identity(self.split),
                                    "max_seq_len": ident.max_length, "fit": self.fit}
        if self.task != CEVAL_TASK:  # C-Eval's caches name no task (older ones stay valid)
            extra[TASK_KEY] = self.task
        if not self.spec.shipped:  # a user's file: found again by its path; an edited one never mixes its rows
            extra[TASK_FILE_KEY] = str(self.spec.path)
            extra["task_sha256"] = hashlib.sha256(self.spec.path.read_bytes()).hexdigest()[:16]
        if ident.backend != "npuinfer":  # npuinfer's (the first backend) adds nothing: older caches stay valid
            extra["backend"] = ident.backend
        if ident.kernels and ident.kernels != "fused":  # likewise fused, the default; a plain run never mixes
            extra["kernels"] = ident.kernels  # its rows with a fused one
        if self.spec.output_type == "generate_until":
            extra["max_new_tokens"] = self.max_gen_toks
        elif self.scoring == "generate":
            extra["max_new_tokens"] = self.max_new_tokens
        if ident.quantization.get("quantization", "none") != "none":  # W8 checkpoints (npuinfer.quant)
            extra.update({k: ident.quantization[k] for k in ("quantization", "quant_kernel")})
        return CacheSettings(model=ident.model, checkpoint=ident.checkpoint, template=self.template,
                             shots=self.shots, dtype=ident.dtype, split=self.split, extra=extra,
                             provenance=dict(ident.provenance))


def results_dir(root: str | os.PathLike, model: str, device_label: str, task: str = CEVAL_TASK) -> Path:
    """``<root>/ceval_<model>_<device>/`` (``<task>_<model>_<device>/`` for another task): where a run's
    cache.csv and report files live."""
    return result_path(CEVAL if task == CEVAL_TASK else task, root, model, device_label)


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
        spec = s.spec
        data = TaskData(spec, s.data_dir)
        shot_split = spec.fewshot_split or "dev"
        generation = spec.output_type == "generate_until"
        if generation:
            questions = data.problems(subject, s.split)
            dev = (list(spec.fewshot_samples) if spec.fewshot_samples
                   else [p.fields for p in data.problems(subject, shot_split)] if s.shots else [])
        else:
            questions = data.questions(subject, s.split)
            dev = data.questions(subject, shot_split) if s.shots else []
        if len(dev) < s.shots:
            where = spec.path if spec.fewshot_samples else data.path(subject, shot_split)
            raise CevalDataError(f"{where}: {len(dev)} row(s), and {s.shots} shots "
                                 f"were asked for (--shot): pass --shot {len(dev)} or fewer, or add dev rows")
        check_against_data(self.out_dir, s.data_dir, s.split, [subject])  # before a row is added or trusted
        done = {qid: row for (_, qid), row in self.cache.scored_rows(subject).items()}
        stats = ScoringStats()
        new: list[ScoredRow] = []
        if generation:
            scores = score_generation(self.backend, spec, subject, dev, questions, s.shots,
                                      batch_size=s.batch_size, max_new_tokens=s.max_gen_toks, stats=stats,
                                      skip=set(done),
                                      share_prefix=s.scoring != "naive")
        else:
            scores = score_subject(self.backend, subject, dev, questions, s.prompt_template(), s.shots, s.scoring,
                                   s.batch_size, max_new_tokens=s.max_new_tokens, stats=stats,
                                   skip=set(done), fit=s.fit)
        for scored in scores:
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


def record_prompt_fit(out_dir: str | os.PathLike, fits: dict[str, PromptFit], task: str = CEVAL_TASK) -> None:
    """Add each subject's PromptFit to the run's cache_meta.json (a record of the run, not a setting); called
    once by the process that merges the run (the only writer), before the report that shows them is written."""
    order = official_order if task == CEVAL_TASK else rules_for(task).order
    record_in_meta(out_dir, PROMPT_FIT, {s: asdict(f) for s, f in fits.items()}, order=order)


def find_task_baseline(baseline: str | os.PathLike, task: str, model: str, device_label: str) -> Path | None:
    """The subject_acc.json a --baseline holds for this task and model: a run directory of the task holding it,
    or ``<task>_<model>_<device>/`` in a directory of runs (any device when exactly one other is there)."""
    path = Path(baseline)
    candidates = [path / SUBJECT_ACC] if path.is_dir() else [path]
    for candidate in candidates:
        if candidate.is_file() and (candidate.parent / META_FILE).is_file():
            try:
                if task_of(read_meta(candidate.parent)) == task:
                    return candidate
            except CacheError:
                pass
    exact = results_dir(path, model, device_label, task) / SUBJECT_ACC
    if exact.is_file():
        return exact
    others = sorted(path.glob(f"{results_dir(path, model, '*', task).name}/{SUBJECT_ACC}"))
    return others[0] if len(others) == 1 else None


@dataclass(frozen=True)
class ResultsDir:
    """What an accuracy results directory is of: ``<task>_<model>_<device>/`` (results_dir's name)."""

    path: Path
    task: str
    model: str
    device: str


def read_results_dir(directory: str | os.PathLike) -> ResultsDir | None:
    """The task, model and device of an accuracy results directory; None for a directory that is none. The task
    is its cache_meta.json's (a user's task names its file there); a directory without one is named by a shipped
    task (``ceval_``, ``mmlu_``, ...). The model and device come from the name after ``<task>_``."""
    path = Path(directory)
    task = None
    if (path / META_FILE).is_file():
        try:
            task = task_of(read_meta(path))
        except CacheError:
            task = None
    if task is None:
        parsed = ResultName.parse(path.name)
        if parsed is None or parsed.kind not in (CEVAL, *TASK_KINDS):
            return None
        return ResultsDir(path, CEVAL_TASK if parsed.kind == CEVAL else parsed.kind, parsed.model, parsed.device)
    prefix = (CEVAL if task == CEVAL_TASK else task) + "_"
    if not path.name.startswith(prefix):
        return ResultsDir(path, task, path.name, "")  # renamed by hand: the whole name stands for the model
    model, sep, device = path.name[len(prefix):].rpartition("_")
    return ResultsDir(path, task, model, device) if sep else ResultsDir(path, task, device, "")
