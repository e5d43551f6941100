"""A generation's answer, as lm-evaluation-harness reads and scores it.

- ``cut_at_stops``: the generated text up to the first stop string (lm-eval splits at every ``until`` term);
- ``apply_filter``: lm-eval's ``regex`` filter then ``take_first``: every match of the pattern, the one at
  ``group_select``; a match of several groups gives its first non-empty group; stripped; no match: the fallback;
- ``normalize`` / ``exact_match``: the metric's ``regexes_to_ignore`` (each removed, in order) and
  ``ignore_case``, applied to both sides (lm-eval's exact_match_hf_evaluate);
- ``reference``: a row's answer as the metric sees it (GSM8K: ``"... #### 18"`` -> ``"18"``).
"""
from __future__ import annotations

import re
from collections.abc import Sequence

from npuinfer.tasks.spec import FilterSpec, TaskSpec


def cut_at_stops(text: str, until: Sequence[str]) -> str:
    for term in until:
        if term:
            text = text.split(term)[0]
    return text


def apply_filter(spec: FilterSpec, text: str) -> str:
    matches = re.findall(spec.regex_pattern, text)
    if not matches:
        return spec.fallback
    match = matches[spec.group_select]
    if isinstance(match, tuple):
        groups = [m for m in match if m]
        match = groups[0] if groups else spec.fallback
    return match.strip()


def normalize(task: TaskSpec, text: str) -> str:
    for pattern in task.ignore_regexes:
        text = re.sub(pattern, "", text)
    return text.lower() if task.ignore_case else text


def reference(task: TaskSpec, answer: str | None) -> str | None:
    return None if answer is None else normalize(task, answer)


def exact_match(task: TaskSpec, prediction: str, ref: str) -> bool:
    """``ref``: a reference already normalized (``reference``; what a cache row holds)."""
    return normalize(task, prediction) == ref


def stop_test(until: Sequence[str]):
    """``stop(text)`` for a GenerateRequest: True once a stop string has been generated."""
    terms = tuple(t for t in until if t)
    return lambda text: any(t in text for t in terms)
