"""The accuracy suite (accuracy/): options, one case per task x model x subject, resumable rows, baseline gate, report.

A case scores the questions of one subject that the cache does not hold yet (``CevalRun``), records its
accuracy as user properties, and fails when ``--baseline`` has the subject more than ``--max-acc-drop``
higher. Every process (xdist workers, concurrent runs) appends to the run's cache.csv under its lock; the
controller (or the only process of a serial run) rewrites it sorted when the session ends and writes the
report, so both runs leave the same files. Then it gates the pooled category accuracies (and Avg, and the task
file's groups: C-Eval's Avg(Hard), CMMLU's China specific) of each task's rebuilt report against the baseline's
classes_acc.json of the same task, for the groups whose subjects the run covers exactly as the baseline does; a
drop fails the session. A baseline scored with other settings (template, shots, split,
scoring, data, fit) is not gated at all, with a warning naming what differs; fit counts as a difference only when
a prompt of the run was over the model's length (otherwise both fits give the same prompts).
``--acc-test mcnemar --alpha A``: a drop beyond ``--max-acc-drop`` (per subject, and per category at the end) fails
only when McNemar's exact test on the questions that flipped against the baseline's cache.csv gives p < A; a
baseline without cache.csv is gated by the drop limit alone, with a note (npuinfer.gates.accuracy).
The per-subject and per-category tables, and the category gate's lines, go to pytest's terminal summary.
"""
from __future__ import annotations

import argparse
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest

from ..backends import BackendUnsupported
from ..ceval.aggregate import aggregate, grouping
from ..ceval.cache import PROMPT_FIT, CacheError, read_cache, read_meta
from ..ceval.dataset import SPLITS, CevalDataError, available_subjects, sample_dir
from ..ceval.prompts import FITS, TEMPLATES
from ..ceval.report import CLASSES_ACC, SUBJECT_ACC, rebuild_report
from ..ceval.rows import CEVAL_TASK, rules_for, task_of
from ..ceval.taskdata import TaskData
from ..tasks.spec import TaskFileError, TaskSpec, is_task_path, load_task, task_names
from ..parallel import dist as tp_dist
from ..ceval.run import (
    CevalRun,
    NonFiniteScores,
    RunSettings,
    SubjectResult,
    read_results_dir,
    record_prompt_fit,
    results_dir,
)
from ..gates.accuracy import (
    ACC_TESTS,
    CategoryVerdict,
    in_class,
    paired_against,
    read_baseline_rows,
    significance_note,
    any_prompt_fitted,
    find_run_baseline,
    gate_categories,
    read_baseline_meta,
    read_subject_accuracy,
    settings_differences,
)
from ..ceval.scoring import PromptFit
from ..ceval.scoring import DEFAULT_BATCH_SIZE, DEFAULT_MAX_NEW_TOKENS, SCORING_MODES
from ..device import get_device
from ..options import RunConfig, non_negative_int, positive_int
from ..registry import DEFAULT_MODEL
from .common import GROUP, SERVED_BACKENDS, BackendCache, selected_models, session_run, xdist_worker_id

# user_properties keys: how a case's results reach the controller under xdist.
P_DIR, P_MODEL, P_SUBJECT = "ceval_results_dir", "ceval_model", "ceval_subject"
P_N, P_CORRECT, P_ACC, P_NEW = "ceval_questions", "ceval_correct", "ceval_accuracy", "ceval_scored_now"
P_BASE, P_TOKENS, P_SHOTS = "ceval_baseline", "ceval_prompt_tokens", "ceval_shots"
P_NOT_GATED = "ceval_not_gated"  # why a case was not compared with the baseline
P_WITHIN_CHANCE = "ceval_drop_p"  # --acc-test mcnemar: a drop that passed, and its p-value
P_TASK = "ceval_task"  # a case's task, when it is not C-Eval
P_DROPPED, P_TRUNCATED = "ceval_dropped_shots", "ceval_truncated"  # how the prompts were fitted to the model


class CevalBaselineWarning(UserWarning):
    """A case's accuracy could not be compared with the baseline (no entry for it, other settings)."""


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an accuracy difference in [0, 1], got {text!r}") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"expected an accuracy difference in [0, 1], got {text!r}")
    return value


def _alpha(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a significance level in (0, 1), got {text!r}") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"expected a significance level in (0, 1), got {text!r}")
    return value


def _task_dir(text: str) -> tuple[str, str]:
    task, sep, directory = text.partition("=")
    if not sep or not task or not directory:
        raise argparse.ArgumentTypeError(f"expected TASK=DIR (e.g. mmlu=/data/mmlu), got {text!r}")
    return task, directory


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup(GROUP)
    group.addoption("--task", action="append", default=None, dest="accuracy_tasks", metavar="TASK",
                    help="accuracy task to run, repeatable: a task file shipped in npuinfer/tasks (ceval, cmmlu, "
                         "mmlu, gsm8k, gsm8k_cot), or the path of a task file of your own (.yaml; known then by "
                         "its task: name, which must be its own); default ceval. Cases: "
                         "test_ceval[<model>-<subject>] for C-Eval, test_task[<task>-<model>-<subject>] for the others")
    group.addoption("--task-dir", action="append", type=_task_dir, default=[], dest="accuracy_task_dirs",
                    metavar="TASK=DIR", help="a task's data in its official layout (repeatable; default: the small "
                                             "sample shipped with npuinfer; C-Eval: --ceval-dir)")
    group.addoption("--ceval-dir", default=None, dest="ceval_dir", metavar="DIR",
                    help="C-Eval data in the official layout (dev/, val/, test/); default: the small sample "
                         "shipped with npuinfer")
    group.addoption("--ceval-split", default="val", choices=list(SPLITS), dest="ceval_split",
                    help="split to score (default val); test has no answers: predictions only, no accuracy")
    group.addoption("--shot", type=non_negative_int, default=None, dest="ceval_shot",
                    help="k-shot examples from the first dev rows (default: the task file's num_fewshot, 5 for "
                         "C-Eval; dropped from the end to fit with --fit shots)")
    group.addoption("--template", default=None, choices=list(TEMPLATES), dest="ceval_template",
                    help="prompt: lmeval (lm-evaluation-harness ceval-valid) or atb (the Ascend tool's); default: "
                         "the task file's own prompt (lmeval for the shipped tasks)")
    group.addoption("--fit", default=None, choices=list(FITS), dest="ceval_fit",
                    help="a prompt over the model's length: truncate (lm-eval's: every prompt keeps the shots, an "
                         "over-long one loses its first tokens; default for --template lmeval) or shots (shots "
                         "dropped from the end for the whole subject until its longest question fits; default "
                         "for --template atb)")
    group.addoption("--scoring", default="prefix", choices=list(SCORING_MODES), dest="ceval_scoring",
                    help="prefix: log-likelihood with the k-shot prefix cached per subject (default); naive: "
                         "the same, every prompt run in full; generate: greedy, first letter A-D")
    group.addoption("--ceval-batch-size", type=positive_int, default=DEFAULT_BATCH_SIZE,
                    dest="ceval_batch_size", help=f"questions per forward (default {DEFAULT_BATCH_SIZE})")
    group.addoption("--ceval-max-new-tokens", type=positive_int, default=DEFAULT_MAX_NEW_TOKENS,
                    dest="ceval_max_new_tokens",
                    help=f"tokens generated per question with --scoring generate (default {DEFAULT_MAX_NEW_TOKENS})")
    group.addoption("--max-gen-toks", type=positive_int, default=None, dest="accuracy_max_gen_toks",
                    help="generation tasks (gsm8k, gsm8k_cot): tokens generated at most per question (default: the "
                         "task file's generation_kwargs.max_gen_toks, 256 as lm-eval's)")
    group.addoption("--max-acc-drop", type=_fraction, default=0.0, dest="ceval_max_acc_drop",
                    help="every task: allowed accuracy drop below the baseline per subject, and per category (group) at "
                         "the session's end (default 0)")
    group.addoption("--acc-test", default="drop", choices=list(ACC_TESTS), dest="ceval_acc_test",
                    help="accuracy gate: drop (default: any drop beyond --max-acc-drop fails) or mcnemar (a drop beyond "
                         "--max-acc-drop fails only when McNemar's exact test on the questions that flipped against "
                         "the baseline's cache.csv gives p < --alpha; a baseline without cache.csv falls back to "
                         "drop, with a note)")
    group.addoption("--alpha", type=_alpha, default=0.05, dest="ceval_alpha",
                    help="--acc-test mcnemar: significance level (default 0.05)")


@dataclass(frozen=True)
class CevalOptions:
    """The accuracy session's settings, read once from the options: the run's (``run``, a RunConfig shared with
    the CLI and the bench suite), the C-Eval run's (``settings``) and the gate's."""

    run: RunConfig  # model=None: the session's settings; a case's model comes from its parameters
    settings: RunSettings
    max_drop: float
    baseline: str | None
    device_label: str  # the results directories' suffix: the device asked for, or the served backend's name
    acc_test: str = "drop"  # ACC_TESTS: how a drop below the baseline fails
    alpha: float = 0.05  # --acc-test mcnemar: the significance level
    tasks: tuple[str, ...] = (CEVAL_TASK,)
    task_settings: tuple[tuple[str, RunSettings], ...] = ()  # the other tasks' RunSettings

    def settings_for(self, task: str) -> RunSettings:
        return self.settings if task == CEVAL_TASK else dict(self.task_settings)[task]

    @property
    def data_dir(self) -> Path:
        return self.settings.data_dir

    @classmethod
    def from_config(cls, config: pytest.Config) -> "CevalOptions":
        opt = config.getoption
        run = session_run(config)
        tasks = tuple(dict.fromkeys(_task_name(t) for t in opt("accuracy_tasks") or [CEVAL_TASK]))
        dirs = dict(opt("accuracy_task_dirs") or [])
        for task in dirs:
            if task not in tasks:
                raise pytest.UsageError(f"--task-dir {task}=...: {task} is not among the tasks run (--task)")
        ceval_dir = opt("ceval_dir") or dirs.get(CEVAL_TASK)
        data_dir = Path(ceval_dir) if ceval_dir else sample_dir()
        shots = opt("ceval_shot")
        settings = RunSettings(data_dir=data_dir, split=opt("ceval_split"),
                               shots=load_task(CEVAL_TASK).num_fewshot if shots is None else shots,
                               template=opt("ceval_template") or load_task(CEVAL_TASK).prompt.name,
                               scoring=opt("ceval_scoring"),
                               batch_size=opt("ceval_batch_size"), max_new_tokens=opt("ceval_max_new_tokens"),
                               fit=opt("ceval_fit"))
        others = []
        for task in tasks:
            if task == CEVAL_TASK:
                continue
            spec = load_task(task)
            try:
                others.append((task, RunSettings(
                    data_dir=Path(dirs[task]) if task in dirs else spec.sample_dir(), task=task,
                    shots=spec.num_fewshot if shots is None else shots,
                    template=opt("ceval_template") or spec.prompt.name,
                    scoring=opt("ceval_scoring"), batch_size=opt("ceval_batch_size"),
                    max_new_tokens=opt("ceval_max_new_tokens"),
                    fit=opt("ceval_fit") if spec.output_type == "multiple_choice" else None,
                    max_gen_toks=opt("accuracy_max_gen_toks") if spec.output_type == "generate_until" else None)))
            except (ValueError, TaskFileError) as exc:
                raise pytest.UsageError(f"--task {task}: {exc}") from None
        # The run's device as asked for (xdist workers on npu:N/cuda:N add their index): one directory per run;
        # a served backend's run is of the endpoint, not of this machine.
        label = run.backend if run.backend in SERVED_BACKENDS else get_device(run.device).label
        by_loglikelihood = [t for t in tasks if load_task(t).output_type == "multiple_choice"
                            and settings.scoring != "generate"]
        if run.chat and (run.backend not in SERVED_BACKENDS or by_loglikelihood):
            raise pytest.UsageError("--chat: asks a served model (--backend openai) for a generation: the answer "
                                    "letter of a multiple-choice task, so it needs --scoring generate, or a "
                                    f"generation task's text (this run: --backend {run.backend}, --scoring "
                                    f"{settings.scoring}, --task {' --task '.join(tasks)})")
        return cls(run, settings, opt("ceval_max_acc_drop"), opt("npuinfer_baseline"), label,
                   opt("ceval_acc_test"), opt("ceval_alpha"), tasks, tuple(others))


def _task_name(text: str) -> str:
    """A --task value as a task name: a shipped name, or a task file's path read (and known from then on by its
    task: name); an error names the option, the file and the field."""
    if not is_task_path(text):
        known = task_names()
        if text not in known:
            raise pytest.UsageError(f"--task {text}: no such task; shipped: {', '.join(known)}; or give the path "
                                    "of a task file (.yaml)")
        return text
    if not Path(text).is_file():
        raise pytest.UsageError(f"--task {text}: no such task file")
    try:
        return load_task(text).task
    except TaskFileError as exc:
        raise pytest.UsageError(f"--task {text}: {exc}") from None


_OPTIONS = pytest.StashKey[CevalOptions]()


def ceval_options(config: pytest.Config) -> CevalOptions:
    if _OPTIONS not in config.stash:
        config.stash[_OPTIONS] = CevalOptions.from_config(config)
    return config.stash[_OPTIONS]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "task_subject" in metafunc.fixturenames:
        return _generate_task_cases(metafunc)
    if "ceval_subject" not in metafunc.fixturenames:
        return
    config = metafunc.config
    opts = ceval_options(config)
    if CEVAL_TASK not in opts.tasks:
        metafunc.parametrize(("ceval_model", "ceval_subject"), [])  # --task without ceval: no C-Eval case
        return
    try:
        subjects = available_subjects(opts.data_dir, opts.settings.split)
    except CevalDataError as exc:
        raise pytest.UsageError(f"--ceval-dir: {exc}") from None
    if not subjects:
        raise pytest.UsageError(f"--ceval-dir {opts.data_dir}: no <subject>_{opts.settings.split}.csv "
                                "file of a known C-Eval subject")
    models = selected_models(config, [DEFAULT_MODEL])
    pairs = [(m, s) for m in models for s in subjects]
    metafunc.parametrize(("ceval_model", "ceval_subject"), pairs, ids=[f"{m}-{s}" for m, s in pairs])


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The C-Eval case function without ``--task ceval``, or test_task without another task, has no cases: its
    empty parametrization's placeholder (``[NOTSET]``) is no case either, and is left out."""
    items[:] = [i for i in items if not (getattr(i, "originalname", None) in ("test_ceval", "test_task")
                                         and i.name.endswith("[NOTSET]"))]


def _generate_task_cases(metafunc: pytest.Metafunc) -> None:
    """test_task[<task>-<model>-<subject>]: one case per task (other than C-Eval) x model x subject."""
    opts = ceval_options(metafunc.config)
    models = selected_models(metafunc.config, [DEFAULT_MODEL])
    cases = []
    for task, settings in opts.task_settings:
        try:
            subjects = TaskData(task, settings.data_dir).subjects(settings.split)
        except CevalDataError as exc:
            raise pytest.UsageError(f"--task {task}: {exc}") from None
        cases += [(task, m, s) for m in models for s in subjects]
    metafunc.parametrize(("task_name", "task_model", "task_subject"), cases,
                         ids=[f"{t}-{m}-{s}" for t, m, s in cases])


class CevalSuite:
    """One per session (per xdist worker): a CevalRun per model, the baseline, the gate."""

    def __init__(self, config: pytest.Config, backend_cache: BackendCache, results_root: Path):
        self.config = config
        self.backend_cache = backend_cache
        self.results_root = results_root
        opts = ceval_options(config)
        self.settings = opts.settings
        self.device_label = opts.device_label
        self.max_drop = opts.max_drop
        self.baseline = opts.baseline
        self.options = opts
        self.acc_test, self.alpha = opts.acc_test, opts.alpha
        # per (task, model): the baseline's cache.csv rows (None: it has none)
        self._base_rows: dict[tuple[str, str], dict | None] = {}
        self._runs: dict[tuple[str, str], CevalRun | Exception] = {}
        self._baselines: dict[tuple[str, str], tuple[Path | None, dict[str, float], dict | None]] = {}

    def out_dir(self, model: str, task: str = CEVAL_TASK) -> Path:
        return results_dir(self.results_root, model, self.device_label, task)

    def _run(self, model: str, task: str = CEVAL_TASK) -> CevalRun:
        key = (task, model)
        if key not in self._runs:
            try:
                self._runs[key] = CevalRun(self.backend_cache.get(model), self.options.settings_for(task),
                                           self.out_dir(model, task))
            except BackendUnsupported as exc:  # e.g. hf on an ALiBi model: every case says why
                self._runs[key] = exc
            except CacheError as exc:
                self._runs[key] = exc
                raise
        run = self._runs[key]
        if isinstance(run, Exception):  # refused once: every case of the model fails with the same reason
            pytest.fail(f"{type(run).__name__}: {run}", pytrace=False)
        return run

    def run_case(self, model: str, subject: str, record, task: str = CEVAL_TASK) -> SubjectResult:
        record(P_MODEL, model)
        record(P_SUBJECT, subject)
        if task != CEVAL_TASK:
            record(P_TASK, task)
        run = self._run(model, task)
        # Before scoring: the controller merges this directory even if the case fails midway.
        record(P_DIR, str(run.out_dir))
        try:
            result = run.run_subject(subject)
        except (NonFiniteScores, CacheError, CevalDataError) as exc:
            pytest.fail(str(exc), pytrace=False)
        record(P_N, result.questions)
        record(P_CORRECT, result.correct)
        record(P_ACC, result.accuracy)
        record(P_NEW, result.scored_now)
        record(P_TOKENS, result.stats.prompt_tokens)
        record(P_SHOTS, result.stats.shots.get(subject))
        if result.fit is not None:
            record(P_DROPPED, result.fit.dropped_shots)
            record(P_TRUNCATED, result.fit.truncated)
        self.gate(model, result, record, task)
        return result

    def _baseline_for(self, model: str, task: str = CEVAL_TASK) -> tuple[Path | None, dict[str, float], dict | None]:
        """The baseline's subject_acc.json, its accuracies, and its cache_meta.json (None: none beside it)."""
        if (task, model) not in self._baselines:
            path = find_run_baseline(self.baseline, task, model, self.device_label)
            accs = read_subject_accuracy(path) if path else {}
            meta = read_baseline_meta(path) if path else None
            self._baselines[(task, model)] = (path, accs, meta)
        return self._baselines[(task, model)]

    def gate(self, model: str, result: SubjectResult, record, task: str = CEVAL_TASK) -> None:
        if not self.baseline:
            return
        path, accs, meta = self._baseline_for(model, task)
        differ = []
        if meta is not None:
            run = self._runs[(task, model)]
            differ = settings_differences(meta, run.settings.cache_settings(run.backend).to_meta(),
                                          prompts_fitted=any_prompt_fitted([result.fit]))
            if task_of(meta) != task:
                differ.append(f"task {task_of(meta)!r} (baseline) vs {task!r} (this run)")
        where = path or f"{self.baseline} (no subject_acc.json for {model})"
        if differ:
            record(P_NOT_GATED, "settings differ")
            warnings.warn(CevalBaselineWarning(
                f"{model}-{result.subject}: NOT GATED: the baseline {where} was scored with other settings: "
                f"{'; '.join(differ)}"))
            return
        if result.accuracy is None:
            warnings.warn(CevalBaselineWarning(
                f"{model}-{result.subject}: {self.options.settings_for(task).split} split has no accuracy; baseline "
                "gate not applied"))
            return
        base = accs.get(result.subject)
        if base is None:
            record(P_BASE, None)
            warnings.warn(CevalBaselineWarning(
                f"{model}-{result.subject}: no baseline accuracy in {where}; gate skipped"))
            return
        record(P_BASE, base)
        drop = base - result.accuracy
        if drop <= self.max_drop + 1e-12:
            return
        why = ""
        if self.acc_test == "mcnemar":
            rows = self._baseline_rows(model, task, path)
            if rows is None:
                warnings.warn(CevalBaselineWarning(
                    f"{model}-{result.subject}: --acc-test mcnemar: the baseline {where} has no cache.csv (its "
                    "questions one by one): gated by --max-acc-drop alone; `npuinfer baseline update` keeps it"))
            else:
                counts = paired_against(rows, result.rows, result.subject)
                if counts.p_value >= self.alpha:
                    record(P_WITHIN_CHANCE, counts.p_value)
                    return  # a drop McNemar's test cannot tell from chance: passed
                why = f"; {significance_note(counts, self.alpha)}"
        pytest.fail(f"{model}-{result.subject}: accuracy {result.accuracy!r} ({result.correct}/"
                    f"{result.questions}) is {drop:.6g} below the baseline {base!r} from {where}; "
                    f"allowed drop {self.max_drop:g} (--max-acc-drop){why}", pytrace=False)

    def _baseline_rows(self, model: str, task: str, path: Path | None) -> dict | None:
        if (task, model) not in self._base_rows:
            self._base_rows[(task, model)] = read_baseline_rows(path) if path else None
        return self._base_rows[(task, model)]

    def close(self) -> None:
        for run in self._runs.values():
            if isinstance(run, CevalRun):
                run.close()


@pytest.fixture(scope="session")
def ceval_suite(pytestconfig: pytest.Config, backend_cache: BackendCache, results_dir: Path):
    suite = CevalSuite(pytestconfig, backend_cache, results_dir)
    yield suite
    suite.close()


def pytest_configure(config: pytest.Config) -> None:
    baseline = ceval_options(config).baseline
    if baseline and not Path(baseline).exists():
        raise pytest.UsageError(f"--baseline {baseline}: no such file or directory")
    config.pluginmanager.register(CevalSessionReport(config), "npuinfer-ceval-report")


class CevalSessionReport:
    """Session end: merge and report the result directories the cases wrote; the tables in the summary."""

    def __init__(self, config: pytest.Config):
        self.config = config
        self.cases: list[dict] = []
        self.written: list[tuple[Path, list[Path], object]] = []
        self.baseline = ceval_options(config).baseline
        self.max_drop = ceval_options(config).max_drop
        self.acc_test, self.alpha = ceval_options(config).acc_test, ceval_options(config).alpha
        # Per results directory: the category gate's verdicts, or lines saying why it did not run.
        self.category_gates: dict[Path, tuple[Path | None, list[CategoryVerdict | str]]] = {}

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        # Under xdist the controller gets here for the workers' cases too, user_properties included.
        props = dict(report.user_properties)
        if P_DIR in props and report.when == "call":
            self.cases.append({**props, "outcome": report.outcome})

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if xdist_worker_id(self.config) is not None or not tp_dist.is_rank0():
            return  # the controller (xdist) or rank 0 (tensor parallel) merges once the others are done
        for out_dir in sorted({c[P_DIR] for c in self.cases}):
            task = _task_of_dir(self.cases, out_dir)
            try:
                fits = _prompt_fits([c for c in self.cases if c[P_DIR] == out_dir])
                if fits:
                    record_prompt_fit(out_dir, fits, task)
                paths = rebuild_report(out_dir)
                rows = read_cache(out_dir)
                spec = None if task == CEVAL_TASK else load_task(task)
                agg = aggregate(rows, spec) if all(r.answer is not None for r in rows) else None
                self.written.append((Path(out_dir), paths, agg))
            except (CacheError, ValueError, OSError) as exc:
                self.written.append((Path(out_dir), [], exc))
                continue
            if self.baseline and agg is not None:
                self._gate_categories(Path(out_dir), task, spec)
        failed = any(isinstance(v, CategoryVerdict) and v.status == "failed"
                     for _, verdicts in self.category_gates.values() for v in verdicts)
        if failed and session.exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def _gate_categories(self, out_dir: Path, task: str, spec: TaskSpec | None) -> None:
        """Pooled category (group) accuracies of the rebuilt report against the baseline's classes_acc.json, over
        the groups the task declares (C-Eval's when ``spec`` is None)."""
        named = read_results_dir(out_dir)  # <task>_<model>_<device>, made by ceval.run.results_dir
        model, device_label = named.model, named.device
        groups = grouping(spec)
        path = find_run_baseline(self.baseline, task, model, device_label)
        if path is None:
            self.category_gates[out_dir] = (None, [f"categories not gated: no subject_acc.json for {model} "
                                                   f"in {self.baseline}"])
            return
        classes = path.parent / CLASSES_ACC
        try:
            meta = read_baseline_meta(path)
            run_meta = read_meta(out_dir)
            fitted = any_prompt_fitted((run_meta.get(PROMPT_FIT) or {}).get(s) for s in
                                       read_subject_accuracy(out_dir / SUBJECT_ACC))
            differ = settings_differences(meta, run_meta, prompts_fitted=fitted) if meta is not None else []
            if meta is not None and task_of(meta) != task:
                differ.append(f"task {task_of(meta)!r} (baseline) vs {task!r} (this run)")
            if differ:
                lines = [f"categories not gated: the baseline was scored with other settings: {'; '.join(differ)}"]
            elif not classes.is_file():
                lines = [f"categories not gated: no {CLASSES_ACC} beside {path}"]
            else:
                paired, note = None, None
                if self.acc_test == "mcnemar":
                    base_rows = read_baseline_rows(path)
                    if base_rows is None:
                        note = (f"--acc-test mcnemar: no cache.csv beside {path}: categories gated by "
                                "--max-acc-drop alone")
                    else:
                        run_rows = read_cache(out_dir)

                        def paired(key: str):
                            return paired_against(base_rows, [r for r in run_rows
                                                              if in_class(r.subject, key, groups)], key)
                lines = gate_categories(read_subject_accuracy(out_dir / SUBJECT_ACC),
                                        read_subject_accuracy(out_dir / CLASSES_ACC, "category"),
                                        read_subject_accuracy(path), read_subject_accuracy(classes, "category"),
                                        self.max_drop, paired, self.alpha, groups)
                if meta is None:
                    lines.insert(0, f"settings not checked: no cache_meta.json beside {path}")
                if note:
                    lines.insert(0, note)
        except (CacheError, ValueError, KeyError, OSError) as exc:
            lines = [f"categories not gated: {exc}"]
        self.category_gates[out_dir] = (classes, lines)

    def pytest_terminal_summary(self, terminalreporter) -> None:
        from tabulate import tabulate

        tr = terminalreporter
        for out_dir, paths, agg in self.written:
            task = _task_of_dir(self.cases, str(out_dir))
            rules = rules_for(task)
            tr.write_sep("-", f"npuinfer {'C-Eval' if task == CEVAL_TASK else task}: {out_dir.name}")
            mine = sorted((c for c in self.cases if c[P_DIR] == str(out_dir)),
                          key=lambda c: rules.order(c[P_SUBJECT]))
            rows = [(c[P_SUBJECT], rules.spec.subject(c[P_SUBJECT]).category, _fmt(c.get(P_N)), _fmt(c.get(P_CORRECT)),
                     _fmt(c.get(P_ACC)), "not gated" if c.get(P_NOT_GATED) else _fmt(c.get(P_BASE)),
                     _fmt(c.get(P_NEW)), _fmt(c.get(P_SHOTS)), _fmt(c.get(P_DROPPED)), _fmt(c.get(P_TRUNCATED)),
                     c["outcome"]) for c in mine]
            tr.write_line(tabulate(rows, headers=["subject", "category", "n", "correct", "accuracy", "baseline",
                                                  "scored now", "shots", "shots dropped", "prompts cut", "case"],
                                   tablefmt="github", disable_numparse=True))
            tr.write_line(_fit_line(mine))
            if isinstance(agg, Exception):
                tr.write_line(f"report not written: {agg}")
                continue
            if agg is not None:
                tr.write_line("")
                tr.write_line("Every question in cache.csv, pooled per category (macro: the mean of its subjects):")
                classes = [(k, t.total, t.correct, _fmt(t.accuracy), _fmt(agg.macro[k]))
                           for k, t in agg.classes.items()]
                tr.write_line(tabulate(classes, headers=["category", "n", "correct", "accuracy", "macro average"],
                                       tablefmt="github", disable_numparse=True))
            names = ", ".join(p.name for p in paths)
            tr.write_line(f"results: {out_dir}{os.sep} (cache.csv, {names})")
            if out_dir in self.category_gates:
                self._write_category_gate(tr, out_dir)

    def _write_category_gate(self, tr, out_dir: Path) -> None:
        classes, lines = self.category_gates[out_dir]
        tr.write_line("")
        test = f", --acc-test mcnemar --alpha {self.alpha:g}" if self.acc_test == "mcnemar" else ""
        tr.write_line(f"Category gate against {classes or self.baseline} (--max-acc-drop {self.max_drop:g}{test}):")
        for line in lines:
            if isinstance(line, str):
                tr.write_line(f"WARNING: {line}", yellow=True, bold=True)
            elif line.status == "failed":
                tr.write_line(f"FAILED {out_dir.name} {line.message}", red=True, bold=True)
            elif line.status == "not gated":
                tr.write_line(f"WARNING: {line.message}", yellow=True, bold=True)
            else:
                tr.write_line(line.message, green=True)


def _task_of_dir(cases: list[dict], out_dir: str) -> str:
    return next((c.get(P_TASK, CEVAL_TASK) for c in cases if c[P_DIR] == out_dir), CEVAL_TASK)


def _prompt_fits(cases: list[dict]) -> dict[str, PromptFit]:
    """Each case's PromptFit, from its user properties (cases that failed before scoring have none)."""
    return {c[P_SUBJECT]: PromptFit(int(c[P_SHOTS]), int(c[P_DROPPED]), int(c[P_TRUNCATED]))
            for c in cases if c.get(P_TRUNCATED) is not None}


def _fit_line(cases: list[dict]) -> str:
    fits = _prompt_fits(cases)
    cut = sum(f.truncated for f in fits.values())
    dropped = [f for f in fits.values() if f.dropped_shots]
    return (f"Prompts over the model's length: {cut} cut from the left in "
            f"{sum(1 for f in fits.values() if f.truncated)} subjects; shots dropped in {len(dropped)} subjects "
            f"({sum(f.dropped_shots for f in dropped)} in all).")


def _fmt(value) -> str:
    return "-" if value is None else (f"{value:.4f}" if isinstance(value, float) else str(value))
