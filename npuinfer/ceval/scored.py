"""One scored question: the row shared by the cache, aggregation and the report."""

from __future__ import annotations

from dataclasses import dataclass

# Column order of cache.csv; part of the cache format.
FIELDS: tuple[str, ...] = ("subject", "question_id", "answer", "prediction", "correct")


@dataclass(frozen=True)
class ScoredRow:
    subject: str
    question_id: str
    answer: str | None  # None on the test split (no truth)
    prediction: str
    correct: bool | None  # None when there is no answer
    generated: str | None = None  # a generation task's text (its cache's last column); None for multiple choice

    @classmethod
    def make(cls, subject: str, question_id: str, answer: str | None, prediction: str) -> ScoredRow:
        correct = None if answer is None else prediction == answer
        return cls(subject, str(question_id), answer, prediction, correct)

    @property
    def key(self) -> tuple[str, str]:
        return (self.subject, self.question_id)
