"""Two C-Eval runs of the same questions compared question by question: reference vs deployment, float vs W8,
tp 1 vs tp 2, in-process vs served. Per subject and overall: how many questions both runs answered alike, the
flips (right in A and wrong in B, and the reverse), and McNemar's exact test on the flips: whether a difference
in accuracy is more than chance on these questions (a fixed drop limit cannot tell on 52 small subjects).

McNemar's exact test: with b = right in A and wrong in B and c = the reverse, p = min(1, 2 P[X <= min(b, c)])
for X ~ Binomial(b + c, 1/2); no flips give p = 1.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from ..ceval.cache import read_cache


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


def pair_runs(dir_a: str | Path, dir_b: str | Path) -> PairedRuns:
    """The questions both C-Eval result directories scored, paired by (subject, question id); a question whose
    answer differs between the two is an error naming it (the runs are not of the same data)."""
    a = {r.key: r for r in read_cache(dir_a)}
    b = {r.key: r for r in read_cache(dir_b)}
    per_subject: dict[str, PairedCounts] = {}
    overall = PairedCounts("overall")
    flips: list[Flip] = []
    for key in sorted(a.keys() & b.keys()):
        ra, rb = a[key], b[key]
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
    return PairedRuns([per_subject[s] for s in sorted(per_subject)], overall, flips,
                      len(a.keys() ^ b.keys()))
