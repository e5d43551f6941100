"""One scored question: the row shared by the cache, aggregation and the report."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

# Column order of cache.csv; part of the cache format. ``logprobs`` (each choice's log-likelihood, A..D, ";"
# between) is there when some row was scored by log-likelihood; caches written before it have LEGACY_FIELDS.
LEGACY_FIELDS: tuple[str, ...] = ("subject", "question_id", "answer", "prediction", "correct")
FIELDS: tuple[str, ...] = (*LEGACY_FIELDS, "logprobs")


@dataclass(frozen=True)
class ScoredRow:
    subject: str
    question_id: str
    answer: str | None  # None on the test split (no truth)
    prediction: str
    correct: bool | None  # None when there is no answer
    # Per choice A..D (log-likelihood scoring); None: generate mode, or a cache without the column. Not compared:
    # the same question scored in another batch may differ in the last bits, and it is still the same row.
    logprobs: tuple[float, ...] | None = field(default=None, compare=False)
    generated: str | None = None  # a generation task's text (its cache's last column); None for multiple choice

    @classmethod
    def make(cls, subject: str, question_id: str, answer: str | None, prediction: str,
             logprobs: tuple[float, ...] | None = None) -> ScoredRow:
        correct = None if answer is None else prediction == answer
        return cls(subject, str(question_id), answer, prediction, correct, logprobs)

    @property
    def key(self) -> tuple[str, str]:
        return (self.subject, self.question_id)


def format_logprobs(logprobs: tuple[float, ...] | None) -> str:
    """The cache's text of a row's log-likelihoods (repr: read back bit for bit)."""
    return "" if logprobs is None else ";".join(repr(float(x)) for x in logprobs)


def parse_logprobs(text: str, n: int) -> tuple[float, ...] | None:
    """format_logprobs read back; ValueError naming what is wrong."""
    if text == "":
        return None
    try:
        values = tuple(float(x) for x in text.split(";"))
    except ValueError:
        raise ValueError(f"logprobs {text!r}: expected {n} numbers separated by ';'") from None
    if len(values) != n or not all(math.isfinite(v) for v in values):
        raise ValueError(f"logprobs {text!r}: expected {n} finite numbers separated by ';'")
    return values
