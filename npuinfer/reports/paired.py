"""Two runs of one task on the same questions compared question by question (any task: C-Eval, MMLU, GSM8K...): reference vs deployment, float vs W8,
tp 1 vs tp 2, in-process vs served. Per subject and overall: how many questions both runs answered alike, the
flips (right in A and wrong in B, and the reverse), and McNemar's exact test on the flips: whether a difference
in accuracy is more than chance on these questions (a fixed drop limit cannot tell on 52 small subjects).

McNemar's exact test: with b = right in A and wrong in B and c = the reverse, p = min(1, 2 P[X <= min(b, c)])
for X ~ Binomial(b + c, 1/2); no flips give p = 1.

Log-prob drift, where both runs scored by log-likelihood (cache.csv's logprobs column): over the questions both
hold, the largest and the 99th percentile (nearest rank) of |log-likelihood in A - in B|, of every choice and of
the choice A predicted. A run scored by generation (GSM8K: right or wrong by exact match, so flips and McNemar
apply), or cached before the column existed, has none: "not available", with the reason. Runs of two different
tasks are never paired: an error naming both.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from ..ceval.cache import read_cache, read_meta
from ..ceval.rows import task_of
from ..ceval.dataset import CHOICES
from ..ceval.scored import ScoredRow


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value for b and c discordant pairs."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


@dataclass(frozen=True)
class Flip:
    subject: str
    question_id: str
    answer: str
    prediction_a: str
    prediction_b: str


@dataclass
class PairedCounts:
    name: str  # a subject, or "overall"
    questions: int = 0  # answered in both runs
    agree: int = 0  # same prediction
    right_to_wrong: int = 0  # right in A, wrong in B
    wrong_to_right: int = 0  # wrong in A, right in B

    @property
    def p_value(self) -> float:
        return mcnemar_exact(self.right_to_wrong, self.wrong_to_right)

    def row(self) -> dict[str, object]:
        return {"name": self.name, "questions": self.questions, "agree": self.agree,
                "right->wrong": self.right_to_wrong, "wrong->right": self.wrong_to_right,
                "McNemar p": self.p_value}


@dataclass
class PairedRuns:
    subjects: list[PairedCounts]
    overall: PairedCounts
    flips: list[Flip] = field(default_factory=list)
    only_one: int = 0  # questions scored in one run only (not paired)
    drift: Drift | None = None  # None: not available (drift_missing says why)
    drift_missing: str = ""


@dataclass(frozen=True)
class Drift:
    """|log-likelihood in A - in B| over the questions both runs scored by log-likelihood."""

    questions: int
    max_each: float  # every choice's
    p99_each: float
    max_chosen: float  # the choice run A predicted
    p99_chosen: float

    def describe(self) -> str:
        return (f"Log-prob drift over {self.questions} questions, |A - B| of each choice's log-likelihood: max "
                f"{self.max_each:.3g}, p99 {self.p99_each:.3g}; of the choice A predicted: max {self.max_chosen:.3g}, "
                f"p99 {self.p99_chosen:.3g}")


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in (0, 100]) of a non-empty list."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def log_prob_drift(pairs: list[tuple[ScoredRow, ScoredRow]], label_a: str = "A",
                   label_b: str = "B") -> tuple[Drift | None, str]:
    """The drift over question pairs (A row, B row), or None and why it is not available."""
    for rows, label in (([a for a, _ in pairs], label_a), ([b for _, b in pairs], label_b)):
        if pairs and all(r.logprobs is None for r in rows):
            return None, (f"run {label} holds no log-likelihoods (scored by generation, or cached before npuinfer "
                          "kept them)")
    both = [(a, b) for a, b in pairs if a.logprobs is not None and b.logprobs is not None]
    if not both:
        return None, "no question scored by log-likelihood in both runs"
    each = [abs(x - y) for a, b in both for x, y in zip(a.logprobs, b.logprobs)]
    chosen = [abs(a.logprobs[CHOICES.index(a.prediction)] - b.logprobs[CHOICES.index(a.prediction)])
              for a, b in both]
    return Drift(len(both), max(each), percentile(each, 99), max(chosen), percentile(chosen, 99)), ""


def pair_runs(dir_a: str | Path, dir_b: str | Path) -> PairedRuns:
    """The questions both result directories (of one task) scored, paired by (subject, question id); runs of two
    tasks, or a question whose answer differs between the two, are an error naming them (not the same data)."""
    task_a, task_b = task_of(read_meta(dir_a)), task_of(read_meta(dir_b))
    if task_a != task_b:
        raise ValueError(f"{dir_a} holds task {task_a!r} and {dir_b} task {task_b!r}: runs of different tasks are "
                         "never paired question by question")
    a = {r.key: r for r in read_cache(dir_a)}
    b = {r.key: r for r in read_cache(dir_b)}
    per_subject: dict[str, PairedCounts] = {}
    overall = PairedCounts("overall")
    flips: list[Flip] = []
    pairs: list[tuple[ScoredRow, ScoredRow]] = []
    for key in sorted(a.keys() & b.keys()):
        ra, rb = a[key], b[key]
        pairs.append((ra, rb))
        if ra.answer != rb.answer:
            raise ValueError(f"{key[0]} question {key[1]}: answer {ra.answer!r} in {dir_a}, {rb.answer!r} in {dir_b}: "
                             "the two runs are not of the same data")
        counts = per_subject.setdefault(ra.subject, PairedCounts(ra.subject))
        for c in (counts, overall):
            c.questions += 1
            c.agree += ra.prediction == rb.prediction
        if ra.correct is None or ra.correct == rb.correct:
            continue
        for c in (counts, overall):
            if ra.correct:
                c.right_to_wrong += 1
            else:
                c.wrong_to_right += 1
        flips.append(Flip(ra.subject, ra.question_id, ra.answer or "", ra.prediction, rb.prediction))
    drift, missing = log_prob_drift(pairs)
    return PairedRuns([per_subject[s] for s in sorted(per_subject)], overall, flips,
                      len(a.keys() ^ b.keys()), drift, missing)
