"""What both suites ask of an inference engine, and nothing more (lm-evaluation-harness's ``LM``, plus timing).

- ``generate``: exact-length greedy generation of a batch of token-id prompts, every forward reported to an
  observer (npuinfer.timing's Timer) — what ``bench/`` times;
- ``loglikelihood``: (context ids, continuation ids) -> the continuation's summed log-probability and whether
  greedy decoding would have produced it, fitted to ``max_length`` as lm-eval does — what ``accuracy/`` scores;
- ``generate_until``: greedy text after a context, up to a token budget or until a stop test passes.

A backend also says what a result row must say about it (``identity``) and, before any case runs, what it
cannot do (``unsupported``). Backends are made from one table (npuinfer.backends); the suites never reach
into a model: how a backend batches, caches a shared prefix or talks to a server is its own business.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from ..timing import Backend as TimedGenerate

SUITES = ("bench", "accuracy")


class BackendUnsupported(ValueError):
    """A backend cannot run this model or this suite (said before any case runs)."""


@dataclass(frozen=True)
class LoglikelihoodRequest:
    """One continuation after one context, as token ids (lm-eval's ``loglikelihood`` request, encoded)."""

    context: tuple[int, ...]
    continuation: tuple[int, ...]


@dataclass(frozen=True)
class Loglikelihood:
    logprob: float  # sum over the continuation's tokens; NaN / inf when the logits were not finite
    is_greedy: bool  # every continuation token is the argmax at its position


@dataclass(frozen=True)
class GenerateRequest:
    """Greedy continuation of ``context`` for at most ``max_new_tokens``; ``stop(text)`` True ends it early
    (the text decoded so far); ``until``: stop strings, for backends that can only be told strings."""

    context: tuple[int, ...]
    max_new_tokens: int
    stop: Callable[[str], bool] | None = None
    until: tuple[str, ...] = ()


@dataclass(frozen=True)
class Generation:
    text: str
    finite: bool = True  # False: NaN / inf logits on the way (an error, never a prediction)


@dataclass
class WorkCounters:
    """What a backend was asked to compute, accumulated by the calls that are given it."""

    prompt_tokens: int = 0  # real tokens run through the model (a shared prefix once, then the rows)
    padded_tokens: int = 0  # positions computed, padding included
    prefix_tokens: int = 0  # of prompt_tokens: tokens of shared prefixes computed once
    forwards: int = 0  # model calls with prompt tokens (decode steps not included)
    generated_tokens: int = 0  # decode positions computed (rows x steps)
    fallbacks: int = 0  # requests run without the shared prefix (their tokens diverged from it)


@dataclass(frozen=True)
class Identity:
    """What a result row or a C-Eval cache says about the backend that produced it."""

    backend: str  # npuinfer | hf | openai | a plugin's name
    model: str  # registry name, checkpoint directory name or served model name
    checkpoint: str  # identity of the weights on disk (or of the endpoint)
    weights: str  # checkpoint | dummy(seed N)
    dtype: str
    max_length: int
    kernels: str = ""  # npuinfer's kernel set label ("" for other backends)
    quantization: Mapping[str, str] = field(default_factory=lambda: {"quantization": "none", "quant_kernel": ""})
    tokenizer: str = ""
    provenance: Mapping[str, Any] = field(default_factory=dict)  # free-form facts (kernel check, server version)


@runtime_checkable
class Backend(TimedGenerate, Protocol):
    """The interface both suites use: the timed generation ``bench/`` measures (npuinfer.timing's protocol: the
    attributes a case needs to make inputs and check lengths, and ``generate``), plus scoring for ``accuracy/``."""

    tokenizer: Any  # npuinfer.tokenizer.Tokenizer

    def identity(self) -> Identity: ...

    def unsupported(self, suite: str) -> str | None: ...

    def loglikelihood(self, requests: Sequence[LoglikelihoodRequest], *, max_length: int | None = None,
                      batch_size: int = 8, counters: WorkCounters | None = None, share_prefix: bool = True
                      ) -> Iterator[tuple[int, Loglikelihood]]:
        """(request index, result) pairs as they are computed, every index once, in any order.
        ``share_prefix``: a hint that the requests share prefixes worth computing once (False: the reference
        computation, every request from position 0; a backend may ignore it)."""

    def generate_until(self, requests: Sequence[GenerateRequest], *, max_length: int | None = None,
                       batch_size: int = 8, counters: WorkCounters | None = None, share_prefix: bool = True
                       ) -> Iterator[tuple[int, Generation]]:
        """(request index, generation) pairs as they finish, every index once, in any order."""


def lmeval_fit(context: Sequence[int], continuation: Sequence[int], max_length: int) -> tuple[list[int], int]:
    """lm-eval's left truncation: the tokens fed for one request, ``(context + continuation)[-(L + 1):][:-1]``,
    and how many of them are context (the continuation's last token is predicted, never fed)."""
    whole = list(context) + list(continuation)
    fed = whole[-(max_length + 1):][:-1]
    return fed, len(fed) - (len(continuation) - 1)


def is_cut(context: Sequence[int], continuation: Sequence[int], max_length: int) -> bool:
    """Whether lm-eval's truncation drops tokens of this request's context."""
    return len(context) + len(continuation) - 1 > max_length


def results_in_order(results: Iterator[tuple[int, Any]], n: int) -> list[Any]:
    """A backend call's (index, result) pairs as a list in request order (every index exactly once)."""
    out: list[Any] = [None] * n
    seen = 0
    for i, result in results:
        out[i] = result
        seen += 1
    if seen != n:
        raise RuntimeError(f"backend returned {seen} results for {n} requests")
    return out
