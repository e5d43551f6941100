"""Scoring C-Eval questions through a backend: log-likelihood of each choice, or generate-and-parse.

Modes
  prefix    (default) log-likelihood requests, the backend asked to share what their prompts share (npuinfer's
            runtime runs a subject's k-shot prefix once: npuinfer.backends.prefix_reuse).
  naive     the same requests, every one computed from position 0 (the reference the prefix mode must equal).
  generate  greedy decoding of up to ``max_new_tokens``; the prediction is the first letter A-D of the text
            (the Ascend tool's extraction).

This module is the task's side only: prompts, shots, lm-eval's encoding of each (context, continuation) pair,
the prediction. How the requests are batched and computed is the backend's (npuinfer.backends): the same
questions run in-process (npuinfer, hf) or against a server.

Log-likelihood as lm-evaluation-harness computes it (the ids: npuinfer.ceval.encoding): the context is encoded
alone, context + continuation together, and the continuation's tokens are what the joint encoding has after the
context's length (whitespace at the end of the context moves to the continuation first). The score of a choice
is the sum of the log-probabilities of its continuation tokens; the prediction is the highest (first on a tie).

Fitting to the model's length L as lm-eval does: a choice is fed ``(context + continuation)[-(L + 1):][:-1]``
(the backend applies it, npuinfer.backends.base.lmeval_fit), so a continuation of n tokens leaves L - (n - 1)
positions to its context, and an over-long prompt loses its first tokens (``fit="truncate"``, the lmeval
template's default); ``fit="shots"`` drops shots for the whole subject first (prompts.FITS). Counted per subject
in ``ScoringStats.prompt_fit``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field

from npuinfer.backends.base import GenerateRequest, LoglikelihoodRequest, WorkCounters
from npuinfer.ceval.dataset import CHOICES, Question
from npuinfer.ceval.encoding import PromptEncoder, lmeval_split
from npuinfer.ceval.prompts import (
    Template,
    build_prefix,
    first_choice_letter,
    first_shots,
    fit_shots_for_subject,
    get_template,
    resolve_fit,
)
from npuinfer.ceval.scored import ScoredRow

SCORING_MODES: tuple[str, ...] = ("prefix", "naive", "generate")
DEFAULT_BATCH_SIZE = 8
DEFAULT_MAX_NEW_TOKENS = 8
NO_LETTER = ""  # prediction when a generation holds no letter A-D


@dataclass(frozen=True)
class PromptFit:
    """How one subject's prompts were fitted to the model's length, over all its questions (skipped ones too,
    so a resumed run reports the same)."""

    shots: int  # shots in every prompt of the subject
    dropped_shots: int  # shots asked for but dropped to fit (fit="shots")
    truncated: int  # prompts cut from the left (fit="truncate", or a question too long even alone)


@dataclass
class ScoringStats(WorkCounters):
    """What the backend was asked to compute (WorkCounters: ``prompt_tokens`` is the figure prefix sharing
    reduces) and how the subjects' prompts were made."""

    questions: int = 0
    truncated: int = 0  # scored questions whose prompt was cut from the left (over the model's length)
    shots: dict[str, int] = field(default_factory=dict)  # shots actually used per subject
    nonfinite: list[str] = field(default_factory=list)  # question ids not scored: NaN / inf logits
    prompt_fit: dict[str, PromptFit] = field(default_factory=dict)  # per subject

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass(frozen=True)
class QuestionScore:
    row: ScoredRow
    logprobs: tuple[float, ...] | None  # per choice A..D (log-likelihood modes)
    generated: str | None  # decoded generation (generate mode)


def _has_letter(text: str) -> bool:
    return first_choice_letter(text) is not None


class SubjectScorer:
    """Scores the questions of one subject through a backend: prompt building, fitting to the model's length,
    the requests, the predictions.

    ``backend``: npuinfer.backends.base.Backend (its ``tokenizer``, ``max_seq_len``, ``loglikelihood`` /
    ``generate_until``). ``max_length``: lm-eval's max_length, the most tokens a row may hold (default and
    ceiling: the backend's max_seq_len). ``fit``: prompts.FITS, None for the template's default.
    """

    def __init__(self, backend, subject: str, dev_rows: Sequence[Question], questions: Sequence[Question],
                 template: Template | str = "lmeval", shots: int = 5, mode: str = "prefix",
                 batch_size: int = DEFAULT_BATCH_SIZE, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                 max_length: int | None = None, stats: ScoringStats | None = None, fit: str | None = None) -> None:
        if mode not in SCORING_MODES:
            raise ValueError(f"scoring mode: expected one of {', '.join(SCORING_MODES)}, got {mode!r}")
        if batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {batch_size}")
        if mode == "generate" and max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        for q in questions:
            if q.subject != subject:
                raise ValueError(f"question id {q.question_id} is from {q.subject!r}, not {subject!r}")
        self.backend = backend
        self.tok = backend.tokenizer
        self.subject = subject
        self.template = get_template(template)
        self.fit_mode = resolve_fit(fit, self.template)
        self.mode = mode
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.stats = stats if stats is not None else ScoringStats()
        self.questions = list(questions)
        self._prompts = PromptEncoder(self.tok)
        self._split: dict[str, tuple[list[int], list[list[int]]]] = {}  # question id -> (context, continuations)
        self.max_length = min(backend.max_seq_len, max_length or backend.max_seq_len)
        self.budget = self._budget()
        self.shots = self._choose_shots(dev_rows, shots) if self.questions else []
        self.prefix_text = build_prefix(self.template, subject, self.shots)
        self._prompts.add_head(self.prefix_text)
        self.fit = PromptFit(shots=len(self.shots),
                             dropped_shots=shots - len(self.shots) if self.questions else 0,
                             truncated=sum(self._is_cut(q) for q in self.questions))
        self.stats.shots[subject] = len(self.shots)
        self.stats.prompt_fit[subject] = self.fit

    # ---- prompts -------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Memoized (shot fitting encodes every question's full prompt, which scoring needs again), and a
        prompt's shared head is not re-encoded (see encoding.PromptEncoder)."""
        return self._prompts.encode(text)

    def _budget(self) -> int:
        """Most context tokens a prompt may hold uncut: the model's length less the tail a continuation adds
        (lm-eval feeds a continuation of n tokens after L - (n - 1) context tokens; the last one is never fed),
        or less the tokens generate mode adds."""
        if self.mode == "generate":
            reserve = self.max_new_tokens
        else:
            probe = self.template.render_description(self.subject) + self.template.render_block(
                self.questions[0]) if self.questions else "x"
            reserve = max(len(c) for c in lmeval_split(self.tok.encode, probe, self.template.continuations,
                                                       self.tok.splits_after_newlines)[1]) - 1
        budget = self.max_length - reserve
        if budget < 1:
            raise ValueError(f"no room for a prompt: max length {self.max_length}, "
                             f"{reserve} tokens reserved after it")
        return budget

    def _choose_shots(self, dev_rows: Sequence[Question], k: int) -> list[Question]:
        """fit "truncate": the first k dev rows. fit "shots": the first k, dropped from the end until the
        longest question fits.

        Questions too long even without shots are left out of that fit (they are cut from the left when
        scored, as lm-eval does); they must not cost every other question its shots.
        """
        if self.fit_mode == "truncate" or k == 0:
            return first_shots(dev_rows, k)
        for n in range(1, min(k, len(dev_rows)) + 1):
            self._prompts.add_head(build_prefix(self.template, self.subject, dev_rows[:n]))
        description = self.template.render_description(self.subject)

        def fits_alone(q: Question) -> bool:
            return len(self.encode(description + self.template.render_block(q))) <= self.budget

        return fit_shots_for_subject(self.template, self.subject, dev_rows, self.questions, k,
                                     lambda text: len(self.encode(text)), self.budget, fits_alone)

    def _encode(self, q: Question) -> tuple[list[int], list[list[int]]]:
        """(context ids, continuation ids per choice) of one question, lm-eval style, whole (uncut)."""
        split = self._split.get(q.question_id)
        if split is None:
            context = self.prefix_text + self.template.render_block(q)
            if self.mode == "generate":
                split = self.encode(context), []
            else:
                split = lmeval_split(self.encode, context, self.template.continuations,
                                     self.tok.splits_after_newlines)
            self._split[q.question_id] = split
        return split

    def request_ids(self, q: Question) -> tuple[list[int], list[list[int]]]:
        """(context ids, continuation ids per choice) of one question, whole: what lm-eval's ``_encode_pair``
        makes of its (context, continuation) pairs (comparisons/tasks_vs_lmeval.py checks it against lm-eval)."""
        return self._encode(q)

    def _is_cut(self, q: Question) -> bool:
        """Whether lm-eval's truncation cuts this question's prompt for some choice."""
        ctx, conts = self._encode(q)
        if self.mode == "generate":
            return len(ctx) > self.budget
        return any(len(ctx) + len(c) - 1 > self.max_length for c in conts)

    # ---- running -------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[QuestionScore]:
        if not self.questions:
            return
        encoded = [self._encode(q) for q in self.questions]
        self.stats.truncated += sum(self._is_cut(q) for q in self.questions)
        self._prompts.clear()
        self._split.clear()
        share = self.mode != "naive"
        options = dict(max_length=self.max_length, batch_size=self.batch_size, counters=self.stats,
                       share_prefix=share)
        if self.mode == "generate":
            requests = [GenerateRequest(tuple(ctx), self.max_new_tokens, stop=_has_letter) for ctx, _ in encoded]
            for i, generation in self.backend.generate_until(requests, **options):
                self.stats.questions += 1
                q = self.questions[i]
                if not generation.finite:  # NaN / inf logits: an error, never a prediction
                    self.stats.nonfinite.append(q.question_id)
                    continue
                letter = first_choice_letter(generation.text)
                yield QuestionScore(ScoredRow.make(q.subject, q.question_id, q.answer, letter or NO_LETTER),
                                    None, generation.text)
            return
        n = len(CHOICES)
        contexts = [tuple(ctx) for ctx, _ in encoded]  # one object per question, shared by its choices' requests
        requests = [LoglikelihoodRequest(context, tuple(cont)) for context, (_, conts) in zip(contexts, encoded)
                    for cont in conts]
        got: dict[int, dict[int, float]] = {}
        for i, result in self.backend.loglikelihood(requests, **options):
            answers = got.setdefault(i // n, {})
            answers[i % n] = result.logprob
            if len(answers) == n:
                yield from self._prediction(self.questions[i // n], [answers[c] for c in range(n)])

    def _prediction(self, q: Question, lps: list[float]) -> Iterator[QuestionScore]:
        self.stats.questions += 1
        if not all(math.isfinite(lp) for lp in lps):  # NaN / inf logits: an error, never a prediction
            self.stats.nonfinite.append(q.question_id)
            return
        best = max(range(len(lps)), key=lambda c: (lps[c], -c))  # first of equal maxima, as argmax
        yield QuestionScore(ScoredRow.make(q.subject, q.question_id, q.answer, CHOICES[best], tuple(lps)), tuple(lps),
                            None)


def score_subject(backend, subject: str, dev_rows: Sequence[Question], questions: Sequence[Question],
                  template: Template | str = "lmeval", shots: int = 5, mode: str = "prefix",
                  batch_size: int = DEFAULT_BATCH_SIZE, *, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                  max_length: int | None = None, stats: ScoringStats | None = None,
                  skip: frozenset[str] | set[str] = frozenset(), fit: str | None = None) -> Iterator[QuestionScore]:
    """Score the questions of one subject; yields one QuestionScore per question as the backend answers it.

    ``backend``: npuinfer.backends.base.Backend (npuinfer's runtime: backends.npuinfer.NpuinferBackend). Shots are
    the first ``shots`` dev rows; with ``fit="shots"`` they are dropped from the end until the prompt of the
    longest question fits the model's length, fitted against all ``questions``, including those in ``skip``
    (ids already scored, e.g. on resume), so a resumed run uses the same prompt. ``fit=None``: the template's
    default (lmeval: "truncate", lm-eval's left truncation of an over-long prompt). ``max_length``: lm-eval's
    max_length (default the model's). ``stats`` accumulates token counts and each subject's PromptFit.
    Yield order is the backend's (npuinfer: longest prompts first), not file order.
    """
    scorer = SubjectScorer(backend, subject, dev_rows, questions, template, shots, mode, batch_size,
                           max_new_tokens, max_length, stats, fit)
    if skip:
        scorer.questions = [q for q in scorer.questions if q.question_id not in skip]
    return iter(scorer)

