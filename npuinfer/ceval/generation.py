"""Scoring a generation task (GSM8K) through a backend: lm-eval's prompts, greedy text until the stop strings,
the answer read by the task's first filter (strict-match), exact match against the row's reference.

Shots as lm-eval draws them: ``first_n`` takes the first k rows of the shot split (or of the task file's fixed
``fewshot_samples``); ``random`` draws k rows of the shot split for each question in file order from one
``random.Random(1234)`` per subject (lm-eval's fewshot_random_seed), so question i gets the same shots whether
or not the questions before it were scored in this run (a resumed run draws for skipped ones too).
"""
from __future__ import annotations

import random
from collections.abc import Iterator, Mapping, Sequence

from npuinfer.backends.base import GenerateRequest
from npuinfer.ceval.scored import ScoredRow
from npuinfer.ceval.scoring import PromptFit, QuestionScore, ScoringStats
from npuinfer.ceval.taskdata import Problem
from npuinfer.tasks.extract import apply_filter, cut_at_stops, exact_match, reference, stop_test
from npuinfer.tasks.spec import FEWSHOT_SEED, TaskFileError, TaskSpec


def render(task: TaskSpec, template: str, fields: Mapping[str, str], what: str) -> str:
    try:
        return template.format(**fields)
    except KeyError as exc:
        raise TaskFileError(f"{task.path}: {what}: field {exc} is not a column of the row "
                            f"({', '.join(fields)})") from None


def shot_text(task: TaskSpec, shot: Mapping[str, str]) -> str:
    p = task.prompt
    return (render(task, p.doc_to_text, shot, "doc_to_text") + p.target_delimiter
            + render(task, task.doc_to_target, shot, "doc_to_target") + p.fewshot_delimiter)


def context(task: TaskSpec, shots: Sequence[Mapping[str, str]], doc: Mapping[str, str]) -> str:
    """lm-eval's fewshot_context without a chat template: description, the shots, the question."""
    return (task.prompt.description + "".join(shot_text(task, s) for s in shots)
            + render(task, task.prompt.doc_to_text, doc, "doc_to_text"))


def draw_shots(task: TaskSpec, pool: Sequence[Mapping[str, str]], n_questions: int, k: int
               ) -> list[list[Mapping[str, str]]]:
    """The shots of each question in order (see the module docstring)."""
    if k > len(pool):
        raise ValueError(f"{task.task}: {k} shots asked for, {len(pool)} rows to draw them from")
    if task.fewshot_sampler == "first_n" or k == 0:
        return [list(pool[:k])] * n_questions
    rnd = random.Random(FEWSHOT_SEED)
    return [rnd.sample(list(pool), k) for _ in range(n_questions)]


def score_generation(backend, task: TaskSpec, subject: str, pool: Sequence[Mapping[str, str]],
                     problems: Sequence[Problem], shots: int, *, batch_size: int = 8,
                     max_length: int | None = None, max_new_tokens: int | None = None,
                     stats: ScoringStats | None = None, skip: frozenset[str] | set[str] = frozenset(),
                     share_prefix: bool = True) -> Iterator[QuestionScore]:
    """Score the problems of one subject; one QuestionScore per problem not in ``skip``, as the backend
    answers. ``pool``: the rows shots are drawn from (the task's fixed samples, or its shot split's rows)."""
    stats = stats if stats is not None else ScoringStats()
    tok = backend.tokenizer
    limit = min(backend.max_seq_len, max_length or backend.max_seq_len)
    max_new = max_new_tokens or task.max_gen_toks
    budget = limit - max_new
    if budget < 1:
        raise ValueError(f"no room for a prompt: max length {limit}, {max_new} tokens to generate")
    drawn = draw_shots(task, pool, len(problems), shots)
    todo = [(p, s) for p, s in zip(problems, drawn) if p.question_id not in skip]
    ids = [tok.encode(context(task, s, p.fields)) for p, s in todo]
    cut = sum(len(x) > budget for x in ids)
    stats.shots[subject] = shots
    stats.prompt_fit[subject] = PromptFit(shots=shots, dropped_shots=0, truncated=cut)
    stats.truncated += cut
    requests = [GenerateRequest(tuple(x), max_new, stop=stop_test(task.until), until=task.until) for x in ids]
    strict = task.filters[0]
    for i, generation in backend.generate_until(requests, max_length=limit, batch_size=batch_size,
                                                counters=stats, share_prefix=share_prefix):
        stats.questions += 1
        problem = todo[i][0]
        if not generation.finite:
            stats.nonfinite.append(problem.question_id)
            continue
        text = cut_at_stops(generation.text, task.until)
        answer = apply_filter(strict, text)
        ref = reference(task, problem.answer)
        row = ScoredRow(subject, problem.question_id, ref, answer,
                        None if ref is None else exact_match(task, answer, ref), generated=text)
        yield QuestionScore(row, None, text)
