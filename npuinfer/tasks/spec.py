"""Task files: what a benchmark is, as data (lm-evaluation-harness's task yaml, its keys where they fit).

A task file (``npuinfer/tasks/<name>.yaml``, or a user's file by path) says where the rows are and in which layout, which
split is scored and which one gives the shots, how a row becomes a prompt, what is scored (choices by
log-likelihood, or a generation and the pattern its answer is read with), the metric, and the subject table
the summary groups by. Read with PyYAML's safe loader; templates are Python ``str.format`` strings whose
fields must be plain names of the row or subject (checked here), so a task file never runs code.

Keys (lm-eval's name where it has one):
  task, output_type (multiple_choice | generate_until), dataset.layout (ceval_csv | csv_header |
  csv_noheader | jsonl), dataset.files (path under the data directory, fields {split} and {subject}),
  dataset.columns (csv_noheader: the column names; csv_header: the columns required), dataset.id_column,
  dataset.sample (the shipped sample, relative to the package), test_split, fewshot_split, num_fewshot,
  fewshot_sampler (first_n | random: lm-eval's seeded draw per question), fewshot_samples (fixed shots),
  subjects_file, categories, groups, description, doc_to_text, strip (row fields stripped before rendering), doc_to_choice,
  doc_to_target, target_delimiter, fewshot_delimiter, generation_kwargs (until, max_gen_toks),
  filter_list (name, regex_pattern, group_select), metric_list, templates (named prompt variants).

Paths in a file (dataset.sample or its synonym dataset.data_dir, subjects_file) are relative to the package for a
shipped task, to the file's own directory for a user's. A user's task is known by its ``task:`` name once its file
is read (``load_task(path)``): that name may be neither a shipped task's nor another file's, since its results
directory and cache are named after it.
"""
from __future__ import annotations

import csv
import io
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any

import yaml

PACKAGE_ROOT = Path(str(files("npuinfer")))
TASKS_DIR = Path(str(files("npuinfer.tasks")))
OUTPUT_TYPES = ("multiple_choice", "generate_until")
LAYOUTS = ("ceval_csv", "csv_header", "csv_noheader", "jsonl")
SAMPLERS = ("first_n", "random")
METRICS = ("acc", "exact_match")
SUBJECT_FIELDS = ("name", "name_zh", "display_name", "category")
FEWSHOT_SEED = 1234  # lm-eval's fewshot_random_seed default


class TaskFileError(ValueError):
    """A task file is missing, not YAML, or a field is missing or wrong; the message names file and field."""


@dataclass(frozen=True)
class TaskSubject:
    name: str
    name_zh: str
    category: str

    @property
    def display_name(self) -> str:
        """English name as prompts print it: underscores turned to spaces."""
        return self.name.replace("_", " ")

    def fields(self) -> dict[str, str]:
        return {"name": self.name, "name_zh": self.name_zh, "display_name": self.display_name,
                "category": self.category}


@dataclass(frozen=True)
class Prompt:
    """How a row becomes a prompt: lm-eval's description, doc_to_text, doc_to_choice and delimiters."""

    name: str
    description: str  # fields: SUBJECT_FIELDS
    doc_to_text: str  # fields: the row's columns
    strip: tuple[str, ...]  # columns stripped before rendering (lm-eval's {{question.strip()}})
    choices: tuple[str, ...]  # continuations after target_delimiter, one per choice (multiple choice)
    target_delimiter: str
    fewshot_delimiter: str
    fit: str  # truncate (lm-eval's) | shots


@dataclass(frozen=True)
class FilterSpec:
    """lm-eval's regex filter then take_first: the answer read from a generation."""

    name: str
    regex_pattern: str
    group_select: int = 0
    fallback: str = "[invalid]"


@dataclass(frozen=True)
class TaskSpec:
    path: Path
    task: str
    output_type: str
    layout: str
    files: str
    columns: tuple[str, ...]
    id_column: str | None
    sample: Path | None
    test_split: str
    fewshot_split: str | None
    num_fewshot: int
    fewshot_sampler: str
    fewshot_samples: tuple[Mapping[str, str], ...]
    subjects: tuple[TaskSubject, ...]
    categories: tuple[str, ...]
    groups: Mapping[str, tuple[str, ...]]  # extra summary groups beside the categories (C-Eval's Avg(Hard))
    prompt: Prompt
    templates: Mapping[str, Prompt]
    doc_to_target: str  # multiple choice: the column holding the letter; generation: a template
    question_column: str
    answer_column: str = "answer"  # generation: the column the reference answer is read from
    until: tuple[str, ...] = ()
    max_gen_toks: int = 256
    filters: tuple[FilterSpec, ...] = ()
    metric: str = "acc"
    ignore_regexes: tuple[str, ...] = ()
    ignore_case: bool = False
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def shipped(self) -> bool:
        """A task file of npuinfer's own (npuinfer/tasks/), not a user's."""
        return self.path.parent == TASKS_DIR.resolve()

    @property
    def subject_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.subjects)

    def subject(self, name: str) -> TaskSubject:
        for s in self.subjects:
            if s.name == name:
                return s
        raise KeyError(f"unknown {self.task} subject {name!r}")

    def template(self, name: str | None = None) -> Prompt:
        if name is None or name == self.prompt.name:
            return self.prompt
        try:
            return self.templates[name]
        except KeyError:
            raise KeyError(f"task {self.task}: unknown prompt template {name!r}; known: "
                           f"{sorted(self.templates)}") from None

    def sample_dir(self) -> Path:
        if self.sample is None:
            raise TaskFileError(f"{self.path}: dataset.data_dir: none given (nor dataset.sample); pass the data "
                                f"directory with --task-dir {self.task}=DIR")
        return self.sample


def task_names() -> list[str]:
    """The task files shipped with npuinfer."""
    return sorted(p.stem for p in TASKS_DIR.glob("*.yaml"))


_CACHE: dict[Path, TaskSpec] = {}
_USER: dict[str, Path] = {}  # a user's task name -> its file, once read in this process


def is_task_path(text: str | Path) -> bool:
    """Whether ``--task`` names a task file (a .yaml / .yml path) rather than a task."""
    return Path(text).suffix in (".yaml", ".yml")


def is_known_task(name: str) -> bool:
    """Whether ``load_task(name)`` finds the task: a shipped one, or a user's whose file was read here."""
    return name in _USER or (TASKS_DIR / f"{name}.yaml").is_file()


def load_task(name_or_path: str | Path) -> TaskSpec:
    """A shipped task by name (``mmlu``), a user's task by the name its file gave once read, or a task file by
    path; read once per process."""
    path = Path(name_or_path)
    if not is_task_path(path):
        if str(name_or_path) in _USER:
            return _CACHE[_USER[str(name_or_path)]]
        path = TASKS_DIR / f"{name_or_path}.yaml"
        if not path.is_file():
            raise TaskFileError(f"unknown task {name_or_path!r}: no {path.name} among the shipped tasks "
                                f"({', '.join(task_names())}); or pass a task file's path")
    path = path.resolve()
    if path not in _CACHE:
        spec = _read(path)
        if not spec.shipped:
            _claim_name(spec)
        _CACHE[path] = spec
    return _CACHE[path]


def _claim_name(spec: TaskSpec) -> None:
    """A user's task name is its results directory's and its cache's: never a shipped task's, nor another
    file's in the same process (their rows would mix)."""
    if spec.task in task_names():
        raise TaskFileError(f"{spec.path}: task: {spec.task!r} is the name of a shipped task "
                            f"({TASKS_DIR / (spec.task + '.yaml')}); a task file of your own needs a name of its own "
                            "(its results directory and its cache are named after it)")
    other = _USER.get(spec.task)
    if other is not None and other != spec.path:
        raise TaskFileError(f"{spec.path}: task: {spec.task!r} is already the name of {other}; two task files "
                            "need two names (their results directories and caches are named after them)")
    _USER[spec.task] = spec.path


class _Fields:
    """A task file's mapping, read field by field with errors naming the file and the field."""

    def __init__(self, path: Path, data: Mapping[str, Any], where: str = "") -> None:
        self.path, self.data, self.where = path, data, where

    def err(self, key: str, what: str) -> TaskFileError:
        return TaskFileError(f"{self.path}: {self.where}{key}: {what}")

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = ..., *, what: str = "") -> Any:
        if key not in self.data or self.data[key] is None:
            if default is ...:
                raise self.err(key, f"missing; expected {what or _kind_name(kind)}")
            return default
        value = self.data[key]
        if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _as_tuple(kind)):
            raise self.err(key, f"expected {what or _kind_name(kind)}, got {value!r}")
        return value

    def choice(self, key: str, options: Sequence[str], default: Any = ...) -> str:
        value = self.get(key, str, default, what=f"one of {', '.join(options)}")
        if value not in options:
            raise self.err(key, f"expected one of {', '.join(options)}, got {value!r}")
        return value

    def strings(self, key: str, default: Any = ...) -> tuple[str, ...]:
        value = self.get(key, list, default, what="a list of strings")
        if not all(isinstance(v, str) for v in value):
            raise self.err(key, f"expected a list of strings, got {value!r}")
        return tuple(value)

    def sub(self, key: str, default: Any = ...) -> "_Fields":
        return _Fields(self.path, self.get(key, dict, default, what="a mapping"), f"{self.where}{key}.")


def _as_tuple(kind) -> tuple:
    return kind if isinstance(kind, tuple) else (kind,)


def _kind_name(kind) -> str:
    names = {str: "a string", int: "an integer", list: "a list", dict: "a mapping", bool: "true or false"}
    return " or ".join(names.get(k, k.__name__) for k in _as_tuple(kind))


def check_template(f: _Fields, key: str, text: str, allowed: Sequence[str] | None) -> str:
    """``text`` as a str.format template whose fields are plain names (of ``allowed``, when given)."""
    try:
        parsed = list(string.Formatter().parse(text))
    except ValueError as exc:
        raise f.err(key, f"not a valid template ({exc}); a literal brace is written {{{{ or }}}}") from None
    for _, name, spec, conv in parsed:
        if name is None:
            continue
        if not name.isidentifier() or spec or conv:
            raise f.err(key, f"field {{{name}{'!' + conv if conv else ''}{':' + spec if spec else ''}}}: only "
                             "plain names are allowed ({question}), no attributes, indexes or formats")
        if allowed is not None and name not in allowed:
            raise f.err(key, f"field {{{name}}} is none of {', '.join(allowed)}")
    return text


def _read(path: Path) -> TaskSpec:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise TaskFileError(f"{path}: cannot read the task file ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise TaskFileError(f"{path}: not YAML ({exc})") from None
    if not isinstance(data, dict):
        raise TaskFileError(f"{path}: expected a mapping of task fields, got {type(data).__name__}")
    f = _Fields(path, data)
    output_type = f.choice("output_type", OUTPUT_TYPES)
    ds = f.sub("dataset")
    layout = ds.choice("layout", LAYOUTS)
    columns = ds.strings("columns", ())
    if layout == "csv_noheader" and not columns:
        raise ds.err("columns", "missing; a file without a header needs its column names")
    root = PACKAGE_ROOT if path.parent == TASKS_DIR.resolve() else path.parent
    sample = ds.get("sample", str, None)
    if sample is not None and ds.get("data_dir", str, None) is not None:
        raise ds.err("data_dir", "give dataset.sample or dataset.data_dir (the same thing), not both")
    sample = sample if sample is not None else ds.get("data_dir", str, None)
    subjects, categories, hard = _subjects(f, root)
    row_fields = columns or None
    prompt_name = f.get("prompt_name", str, "default")
    prompt = _prompt(f, prompt_name, row_fields)
    templates = {prompt_name: prompt}
    for name, body in (f.get("templates", dict, {}) or {}).items():
        if not isinstance(body, dict):
            raise f.err(f"templates.{name}", "expected a mapping of prompt fields")
        templates[name] = _prompt(_Fields(path, {**data, **body}, f"templates.{name}."), name, row_fields)
    gen = f.sub("generation_kwargs", {})
    filters = []
    for i, item in enumerate(f.get("filter_list", list, [])):
        ff = _Fields(path, item if isinstance(item, dict) else {}, f"filter_list[{i}].")
        filters.append(FilterSpec(ff.get("name", str), ff.get("regex_pattern", str), ff.get("group_select", int, 0),
                                  ff.get("fallback", str, "[invalid]")))
    metrics = f.get("metric_list", list, [{"metric": "acc"}])
    metric = _Fields(path, metrics[0] if metrics and isinstance(metrics[0], dict) else {}, "metric_list[0].")
    num_fewshot = f.get("num_fewshot", int, 0)
    if num_fewshot < 0:
        raise f.err("num_fewshot", f"expected >= 0, got {num_fewshot}")
    shots = f.get("fewshot_samples", list, [])
    if output_type == "generate_until" and not filters:
        raise f.err("filter_list", "missing; a generation task needs the pattern its answer is read with")
    max_gen = gen.get("max_gen_toks", int, 256)
    if max_gen < 1:
        raise gen.err("max_gen_toks", f"expected >= 1, got {max_gen}")
    return TaskSpec(
        path=path, task=f.get("task", str), output_type=output_type, layout=layout, files=ds.get("files", str),
        columns=columns, id_column=ds.get("id_column", str, None),
        sample=root / sample if sample else None, test_split=f.get("test_split", str),
        fewshot_split=f.get("fewshot_split", str, None), num_fewshot=num_fewshot,
        fewshot_sampler=f.choice("fewshot_sampler", SAMPLERS, "first_n"),
        fewshot_samples=tuple(dict(s) for s in shots), subjects=subjects, categories=categories,
        groups=hard, prompt=prompt, templates=templates, doc_to_target=f.get("doc_to_target", str),
        question_column=f.get("question_column", str, "question"),
        answer_column=f.get("answer_column", str, "answer"),
        until=gen.strings("until", ()), max_gen_toks=max_gen, filters=tuple(filters),
        metric=metric.choice("metric", METRICS, "acc"), ignore_regexes=metric.strings("regexes_to_ignore", ()),
        ignore_case=metric.get("ignore_case", bool, False))


def _prompt(f: _Fields, name: str, row_fields: Sequence[str] | None) -> Prompt:
    description = check_template(f, "description", f.get("description", str, ""), SUBJECT_FIELDS)
    text = check_template(f, "doc_to_text", f.get("doc_to_text", str), row_fields)
    return Prompt(name=name, description=description, doc_to_text=text, strip=f.strings("strip", ()),
                  choices=f.strings("doc_to_choice", ()), target_delimiter=f.get("target_delimiter", str, " "),
                  fewshot_delimiter=f.get("fewshot_delimiter", str, "\n\n"),
                  fit=f.choice("fit", ("truncate", "shots"), "truncate"))


def _subjects(f: _Fields, root: Path) -> tuple[tuple[TaskSubject, ...], tuple[str, ...], dict[str, tuple[str, ...]]]:
    """The subject table (CSV: subject, name_zh, category; more columns are ignored) and its categories."""
    rel = f.get("subjects_file", str, None)
    categories = f.strings("categories", ())
    hard = {}
    for key, members in (f.get("groups", dict, {}) or {}).items():
        if not isinstance(members, list) or not all(isinstance(m, str) for m in members):
            raise f.err(f"groups.{key}", f"expected a list of subject names, got {members!r}")
        hard[key] = tuple(members)
    if rel is None:
        name = f.get("subject", str, f.data.get("task", "main"))
        return (TaskSubject(name, "", categories[0] if categories else "All"),), categories or ("All",), {}
    path = root / rel
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        raise f.err("subjects_file", f"{path}: not found") from None
    rows = list(csv.DictReader(io.StringIO(text)))
    if not rows or not {"subject", "category"} <= set(rows[0]):
        raise f.err("subjects_file", f"{path}: expected a CSV with columns subject, name_zh, category")
    subjects = tuple(TaskSubject(r["subject"], r.get("name_zh") or "", r["category"]) for r in rows)
    if not categories:
        categories = tuple(dict.fromkeys(s.category for s in subjects))
    bad = sorted({s.category for s in subjects} - set(categories))
    if bad:
        raise f.err("subjects_file", f"{path}: categories {', '.join(bad)} are not in categories: {list(categories)}")
    if len({s.name for s in subjects}) != len(subjects):
        raise f.err("subjects_file", f"{path}: a subject is listed twice")
    for key, members in hard.items():
        unknown = sorted(set(members) - {s.name for s in subjects})
        if unknown:
            raise f.err(f"groups.{key}", f"{', '.join(unknown)} not in {path}")
    return subjects, categories, hard
