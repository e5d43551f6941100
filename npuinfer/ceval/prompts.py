"""Prompt templates as data, and shot fitting.

A prompt is ``prefix + question_text``: the prefix (description + shots) is the same for every
question of a subject, so a caller can encode it once and reuse its KV cache.

Fitting a prompt to the model's length (``FITS``): ``truncate`` keeps the k shots in every prompt and cuts an
over-long one from the left, as lm-evaluation-harness does; ``shots`` drops shots from the end for the whole
subject until its longest question fits (the Ascend tool's way), cutting only a question too long even alone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from npuinfer.ceval.dataset import CHOICES, Question
from npuinfer.ceval.subjects import get_subject
from npuinfer.tasks.spec import Prompt, TaskSpec, load_task


@dataclass(frozen=True)
class Template:
    name: str
    # Format fields: {name} (subject id), {name_zh}, {display_name} (underscores -> spaces).
    description: str
    # Format fields: {<question_field>}, {A}, {B}, {C}, {D}.
    block: str
    strip_question: bool
    answer_delimiter: str  # between a shot's block and its answer letter
    shot_delimiter: str  # after every shot
    continuations: tuple[str, ...]  # scored after the context, one per choice, in CHOICES order
    fit: str  # default of FITS: how the tool this template follows fits a prompt to the model's length
    question_field: str = "question"  # the block's name for the question (CMMLU's files call it Question)
    # The task's subject table (name -> object with name, name_zh, display_name); None: C-Eval's.
    subjects: Callable[[str], Any] | None = field(default=None, compare=False, repr=False)

    def render_block(self, q: Question) -> str:
        text = q.question.strip() if self.strip_question else q.question
        return self.block.format(**{self.question_field: text}, **dict(zip(CHOICES, q.choices)))

    def render_shot(self, q: Question) -> str:
        if q.answer is None:
            raise ValueError(f"shot {q.subject}/{q.split} id {q.question_id} has no answer")
        return self.render_block(q) + self.answer_delimiter + q.answer + self.shot_delimiter

    def render_description(self, subject: str) -> str:
        s = (self.subjects or get_subject)(subject)
        return self.description.format(
            name=s.name, name_zh=s.name_zh, display_name=s.display_name
        )


def template_from_task(task: TaskSpec, prompt: Prompt) -> Template:
    """A multiple-choice task file's prompt as a Template (C-Eval's subject table for the ceval task)."""
    if tuple(prompt.choices) != CHOICES:
        raise ValueError(f"{task.path}: doc_to_choice: the multiple-choice scorer reads four choices A, B, C, D "
                         f"(the files' columns), got {list(prompt.choices)}")
    return Template(
        name=prompt.name,
        description=prompt.description,
        block=prompt.doc_to_text,
        strip_question=task.question_column in prompt.strip,
        answer_delimiter=prompt.target_delimiter,
        shot_delimiter=prompt.fewshot_delimiter,
        continuations=tuple(prompt.target_delimiter + c for c in prompt.choices),
        fit=prompt.fit,
        question_field=task.question_column,
        subjects=None if task.task == "ceval" else task.subject,
    )


def task_templates(task: TaskSpec | str) -> dict[str, Template]:
    """Every prompt of a multiple-choice task file, by name."""
    spec = load_task(task) if isinstance(task, str) else task
    return {name: template_from_task(spec, p) for name, p in spec.templates.items()}


# C-Eval's prompts, from its task file (npuinfer/tasks/ceval.yaml): lmeval is lm-evaluation-harness's
# ceval-valid (description from lm_eval/tasks/ceval/_generate_configs.py, doc_to_text from _default_ceval_yaml,
# delimiters TaskConfig's defaults " " and "\n\n"); atb is the Ascend tool's MMLU-style English prompt, which
# generates and takes the first letter A-D (its continuations are offered for log-likelihood scoring too).
_CEVAL = task_templates("ceval")
LMEVAL = _CEVAL["lmeval"]
ATB = _CEVAL["atb"]

TEMPLATES: dict[str, Template] = {t.name: t for t in (LMEVAL, ATB)}
FITS: tuple[str, ...] = ("truncate", "shots")


def resolve_fit(fit: str | None, template: Template | str) -> str:
    """``fit``, or the template's own default when None; an unknown mode is refused."""
    if fit is None:
        return get_template(template).fit
    if fit not in FITS:
        raise ValueError(f"fit: expected one of {', '.join(FITS)}, got {fit!r}")
    return fit


def get_template(template: Template | str) -> Template:
    if isinstance(template, Template):
        return template
    try:
        return TEMPLATES[template]
    except KeyError:
        raise KeyError(f"unknown prompt template {template!r}; known: {sorted(TEMPLATES)}") from None


@dataclass(frozen=True)
class PromptParts:
    prefix: str  # description + shots, shared by all questions of a subject
    question_text: str
    continuations: tuple[str, ...]

    @property
    def context(self) -> str:
        return self.prefix + self.question_text


def build_prefix(template: Template | str, subject: str, shots: Sequence[Question]) -> str:
    t = get_template(template)
    for shot in shots:
        if shot.subject != subject:
            raise ValueError(f"shot id {shot.question_id} is from {shot.subject!r}, not {subject!r}")
    return t.render_description(subject) + "".join(t.render_shot(s) for s in shots)


def build_prompt(
    template: Template | str, subject: str, shots: Sequence[Question], question: Question
) -> PromptParts:
    t = get_template(template)
    if question.subject != subject:
        raise ValueError(
            f"question id {question.question_id} is from {question.subject!r}, not {subject!r}"
        )
    return PromptParts(
        prefix=build_prefix(t, subject, shots),
        question_text=t.render_block(question),
        continuations=t.continuations,
    )


def first_shots(dev_rows: Sequence[Question], k: int) -> list[Question]:
    """The first k dev rows (the shots of lm-eval's ceval-valid and of the Ascend tool)."""
    if k < 0:
        raise ValueError(f"shot count must be >= 0, got {k}")
    if k > len(dev_rows):
        raise ValueError(f"asked for {k} shots but only {len(dev_rows)} dev rows are available")
    return list(dev_rows[:k])


def fit_shots(
    template: Template | str,
    subject: str,
    dev_rows: Sequence[Question],
    question: Question,
    k: int,
    count_tokens: Callable[[str], int],
    max_tokens: int,
) -> list[Question]:
    """The first k dev rows, dropping shots from the end until the full context fits.

    Returns [] when even the zero-shot prompt is over budget; the caller decides what then.
    """
    t = get_template(template)
    shots = first_shots(dev_rows, k)
    while shots and count_tokens(build_prompt(t, subject, shots, question).context) > max_tokens:
        shots.pop()
    return shots


def fit_shots_for_subject(
    template: Template | str,
    subject: str,
    dev_rows: Sequence[Question],
    questions: Sequence[Question],
    k: int,
    count_tokens: Callable[[str], int],
    max_tokens: int,
    fits_alone: Callable[[Question], bool] | None = None,
) -> list[Question]:
    """One shot list for a whole subject, short enough for every one of its questions.

    With a cached prefix all questions of a subject must share the same shots. Questions are
    checked longest first, so usually only the longest one costs more than one token count.
    ``fits_alone(q)``: whether q's zero-shot prompt fits; a question that does not is left out (it is
    cut when scored and must not cost the others their shots), and when none fits the answer is [].
    It is asked only of questions the shots make too long, and of as few others as that answer needs.
    """
    t = get_template(template)
    shots = first_shots(dev_rows, k)
    some_fit_alone = False
    for q in sorted(questions, key=lambda q: len(t.render_block(q)), reverse=True):
        while shots and count_tokens(build_prompt(t, subject, shots, q).context) > max_tokens:
            if fits_alone is not None:
                if not fits_alone(q):
                    break
                some_fit_alone = True
            shots.pop()
    if shots and fits_alone is not None and not some_fit_alone and not any(map(fits_alone, questions)):
        return []
    return shots


def first_choice_letter(text: str) -> str | None:
    """The Ascend tool's answer extraction: the first character of the generation in A-D."""
    return next((ch for ch in text if ch in CHOICES), None)
