"""A serving case's figures from its request records, by vllm bench serve's definitions (vllm/benchmarks/serve.py):

- TTFT: first chunk's arrival - send; E2EL: the request's latency;
- TPOT per request: (latency - TTFT) / (output tokens - 1), requests with one output token left out;
- ITL: the gaps between a request's successive chunks;
- throughputs over the case's duration (first send to last answer): completed requests, output tokens, all tokens;
- goodput: requests meeting every given limit (TTFT, TPOT; a one-token request's TPOT counts as 0) per second.
Percentiles are numpy's (linear interpolation), as vllm's.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .stream import RequestRecord

PERCENTILES = (50, 90, 99)
PROMPT_LENGTH_SLACK = 3  # tokens a server may add around a prompt (bos, a template's markers) before a case fails
BUNCHED_GAP_MS = 0.1  # a gap between two chunks this short means they were read together, not generated so fast


@dataclass(frozen=True)
class Limits:
    ttft_ms: float | None = None
    tpot_ms: float | None = None


def _stats(name: str, seconds: Sequence[float]) -> dict[str, float | None]:
    if not seconds:
        return {f"{name}_mean_ms": None, f"{name}_median_ms": None, **{f"{name}_p{p}_ms": None for p in PERCENTILES
                                                                       if p != 50}}
    ms = np.asarray(seconds, dtype=float) * 1000
    out = {f"{name}_mean_ms": float(ms.mean()), f"{name}_median_ms": float(np.median(ms))}
    out.update({f"{name}_p{p}_ms": float(np.percentile(ms, p)) for p in PERCENTILES if p != 50})
    return out


def tpot_s(record: RequestRecord) -> float | None:
    n = record.output_tokens
    if n <= 1 or record.ttft is None:
        return None
    return (record.latency - record.ttft) / (n - 1)


def itls_s(record: RequestRecord) -> list[float]:
    t = record.chunk_times
    return [b - a for a, b in zip(t, t[1:])]


def serving_figures(records: Sequence[RequestRecord], duration_s: float, limits: Limits = Limits()) -> dict:
    """Every figure of a case: counts, throughputs, goodput, and mean / median / p90 / p99 of TTFT, TPOT, ITL and
    E2EL in ms."""
    ok = [r for r in records if r.ok]
    ttft = [r.ttft for r in ok]
    tpots = [t for t in (tpot_s(r) for r in ok) if t is not None]
    itl = [g for r in ok for g in itls_s(r)]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens if r.prompt_tokens is not None else r.prompt_len for r in ok)
    duration_s = max(duration_s, 1e-9)
    good = 0
    for r in ok:
        t = tpot_s(r) or 0.0
        if (limits.ttft_ms is None or r.ttft * 1000 <= limits.ttft_ms) and \
                (limits.tpot_ms is None or t * 1000 <= limits.tpot_ms):
            good += 1
    figures: dict = {"completed": len(ok), "failed": len(records) - len(ok), "duration_s": duration_s,
                     "input_tokens": in_tokens, "output_tokens": out_tokens,
                     "request_throughput": len(ok) / duration_s, "output_throughput": out_tokens / duration_s,
                     "total_token_throughput": (in_tokens + out_tokens) / duration_s,
                     "goodput": good / duration_s if (limits.ttft_ms or limits.tpot_ms) else None}
    for name, values in (("ttft", ttft), ("tpot", tpots), ("itl", itl), ("e2el", [r.latency for r in ok])):
        figures.update(_stats(name, values))
    figures["prompt_tokens_mean"] = in_tokens / len(ok) if ok else None
    figures["output_tokens_mean"] = out_tokens / len(ok) if ok else None
    return figures


def length_problems(records: Sequence[RequestRecord], ignore_eos: bool) -> list[str]:
    """Prompts the server counted more than a few tokens off the length they were made to have, and (where
    ``ignore_eos`` was honoured) answers of another length than asked."""
    problems = []
    for r in records:
        if not r.ok:
            continue
        if r.prompt_tokens is not None and abs(r.prompt_tokens - r.prompt_len) > PROMPT_LENGTH_SLACK:
            problems.append(f"request {r.index}: the server counted {r.prompt_tokens} prompt tokens, the prompt was "
                            f"made to have {r.prompt_len} (is --tokenizer the served model's tokenizer?)")
        if ignore_eos and r.output_tokens != r.output_len:
            problems.append(f"request {r.index}: {r.output_tokens} output tokens, {r.output_len} asked with ignore_eos")
    return problems


def bunched_share(records: Sequence[RequestRecord]) -> float:
    """The share of chunk gaps under BUNCHED_GAP_MS: near 1 when whole answers reached the client at once (TPOT and
    ITL then say nothing of the server's pace)."""
    gaps = [g for r in records if r.ok for g in itls_s(r)]
    return sum(g * 1000 < BUNCHED_GAP_MS for g in gaps) / len(gaps) if gaps else 0.0
