"""Token timing: a Timer that sees every step of generate, and the measurement of one benchmark case.

Two modes, as the published tools time them (REFERENCE.md section 2):

* ``detail``: `Timer` is generate's step observer. At each of the four step boundaries
  (step_start, forward_start, forward_end, step_end) it synchronizes the device and reads
  ``time.perf_counter_ns``, so a forward's time is the device's time for it, pre is the host work
  that prepares the step's input, post the work after the forward (logits processing, token choice).
  Step 0 is the prefill: its forward is the first-token time.
* ``normal``: the two-run estimate. T1 = a 1-token generate, Tn = an n-token generate;
  next-token = (Tn - T1) / (n - 1). Nothing inside generate is observed.

A case (batch, input, output) is warmed up at its own shape, then timed ``rounds`` times; its row
reports the median round (by ResponseTime) and keeps every round. Under tensor parallelism each
rank measures and rank 0 reports the max over ranks (npuinfer.parallel.dist.max_over_ranks).

This module never imports pytest: the same measurement runs from the command line.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

import torch
from torch import Tensor


MODES = ("detail", "normal")
NS_PER_MS = 1_000_000
ITL_MIN = "itl_min_ms"  # a round's fastest inter-token gap, in rounds_detail
NS_PER_S = 1_000_000_000


class Synchronizer(Protocol):
    def synchronize(self) -> None: ...


# --------------------------------------------------------------------------------------------- Timer


class Timer:
    """generate()'s step observer with synchronized timestamps (``detail`` timing).

    ``start()`` and ``stop()`` bracket the whole generate call; their difference is the ResponseTime
    (input transfer, cache set-up and every step included). A backend that cannot see where a step
    starts (transformers' generate, observed through forward hooks) may skip ``step_start``: the step
    then starts where the previous one ended (the first step: where the response started).
    """

    __slots__ = ("_sync", "_clock", "t_start", "t_stop", "step_starts", "forward_starts", "forward_ends",
                 "step_ends")

    def __init__(self, device: Synchronizer, clock: Callable[[], int] = time.perf_counter_ns):
        self._sync = device.synchronize
        self._clock = clock
        self.reset()

    def reset(self) -> None:
        self.t_start: int | None = None
        self.t_stop: int | None = None
        self.step_starts: list[int] = []
        self.forward_starts: list[int] = []
        self.forward_ends: list[int] = []
        self.step_ends: list[int] = []

    def _now(self) -> int:
        self._sync()
        return self._clock()

    # -- the response
    def start(self) -> None:
        self.reset()
        self.t_start = self._now()

    def stop(self) -> None:
        self.t_stop = self._now()

    # -- generate's StepObserver protocol
    def step_start(self, step: int) -> None:
        self.step_starts.append(self._now())

    def forward_start(self, step: int) -> None:
        now = self._now()
        if len(self.step_starts) == len(self.forward_starts):  # no step_start seen for this step
            self.step_starts.append(self.step_ends[-1] if self.step_ends else self.t_start)
        self.forward_starts.append(now)

    def forward_end(self, step: int) -> None:
        self.forward_ends.append(self._now())

    def step_end(self, step: int) -> None:
        self.step_ends.append(self._now())

    def result(self, batch: int, input_len: int) -> "DetailRun":
        if self.t_start is None or self.t_stop is None:
            raise RuntimeError("Timer.result() before start() and stop()")
        n = len(self.step_ends)
        if not n or not (len(self.step_starts) == len(self.forward_starts) == len(self.forward_ends) == n):
            raise RuntimeError(
                f"Timer saw an incomplete generate: {len(self.step_starts)} step starts, "
                f"{len(self.forward_starts)} forward starts, {len(self.forward_ends)} forward ends, {n} step ends")
        t0 = self.t_start
        return DetailRun(
            batch=batch, input_len=input_len, output_len=n, response_ns=self.t_stop - t0,
            forward_ns=tuple(e - s for s, e in zip(self.forward_starts, self.forward_ends)),
            pre_ns=tuple(f - s for s, f in zip(self.step_starts, self.forward_starts)),
            post_ns=tuple(e - f for f, e in zip(self.forward_ends, self.step_ends)),
            token_ns=tuple(e - t0 for e in self.step_ends),
        )


# --------------------------------------------------------------------------------------------- one run


def _ms(ns: float) -> float:
    return ns / NS_PER_MS


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear-interpolated percentile (numpy's default), None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


@dataclass(frozen=True)
class DetailRun:
    """One timed generate call, every step observed. Times in ns; properties give ms / s."""

    batch: int
    input_len: int
    output_len: int
    response_ns: int
    forward_ns: tuple[int, ...]  # per step; [0] is the prefill (first token)
    pre_ns: tuple[int, ...]  # per step: step start -> forward start
    post_ns: tuple[int, ...]  # per step: forward end -> step end
    token_ns: tuple[int, ...]  # per step: response start -> the step's token is available
    mode: str = field(default="detail", init=False)

    @property
    def response_s(self) -> float:
        return self.response_ns / NS_PER_S

    @property
    def first_token_ms(self) -> float:
        return _ms(self.forward_ns[0])

    @property
    def next_token_ms_each(self) -> list[float]:
        return [_ms(t) for t in self.forward_ns[1:]]

    @property
    def next_token_ms(self) -> float | None:
        return _mean(self.next_token_ms_each)

    @property
    def pre_next_ms(self) -> float | None:
        return _mean([_ms(t) for t in self.pre_ns[1:]])

    @property
    def post_next_ms(self) -> float | None:
        return _mean([_ms(t) for t in self.post_ns[1:]])

    @property
    def pre_first_ms(self) -> float:
        return _ms(self.pre_ns[0])

    @property
    def post_first_ms(self) -> float:
        return _ms(self.post_ns[0])

    @property
    def ttft_ms(self) -> float:
        return _ms(self.token_ns[0])

    @property
    def tpot_ms(self) -> float | None:
        """(E2E - TTFT) / (output_len - 1), the serving benchmarks' time per output token."""
        if self.output_len < 2:
            return None
        return _ms(self.response_ns - self.token_ns[0]) / (self.output_len - 1)

    @property
    def itl_ms(self) -> list[float]:
        """Inter-token latencies: the gaps between consecutive tokens becoming available."""
        ends = self.token_ns
        return [_ms(b - a) for a, b in zip(ends, ends[1:])]

    @property
    def other_ms(self) -> float:
        """ResponseTime not inside any step (cache set-up, loop overhead, the final synchronize)."""
        inside = sum(self.forward_ns) + sum(self.pre_ns) + sum(self.post_ns)
        return _ms(self.response_ns - inside)

    @property
    def throughput(self) -> float:
        return self.batch * self.output_len / self.response_s

    def summary(self) -> dict[str, float | None]:
        return {"response_s": self.response_s, "first_token_ms": self.first_token_ms,
                "next_token_ms": self.next_token_ms, "pre_next_ms": self.pre_next_ms,
                "post_next_ms": self.post_next_ms, "pre_first_ms": self.pre_first_ms,
                "post_first_ms": self.post_first_ms, "ttft_ms": self.ttft_ms, "tpot_ms": self.tpot_ms,
                "other_ms": self.other_ms, "throughput": self.throughput}

    def raw(self) -> dict:
        """Per-token figures for the raw-rounds side file (ms)."""
        return {"response_s": self.response_s, "forward_ms": [_ms(t) for t in self.forward_ns],
                "pre_ms": [_ms(t) for t in self.pre_ns], "post_ms": [_ms(t) for t in self.post_ns],
                "token_ms": [_ms(t) for t in self.token_ns]}


@dataclass(frozen=True)
class NormalRun:
    """The two-run estimate: T1 (1-token generate) and Tn (n-token generate), in ns."""

    batch: int
    input_len: int
    output_len: int
    t1_ns: int
    response_ns: int  # Tn
    mode: str = field(default="normal", init=False)

    @property
    def response_s(self) -> float:
        return self.response_ns / NS_PER_S

    @property
    def first_token_ms(self) -> float:
        return _ms(self.t1_ns)

    @property
    def next_token_ms(self) -> float | None:
        if self.output_len < 2:
            return None
        return _ms(self.response_ns - self.t1_ns) / (self.output_len - 1)

    @property
    def itl_ms(self) -> list[float]:
        return []

    @property
    def throughput(self) -> float:
        return self.batch * self.output_len / self.response_s

    def summary(self) -> dict[str, float | None]:
        return {"response_s": self.response_s, "first_token_ms": self.first_token_ms,
                "next_token_ms": self.next_token_ms, "pre_next_ms": None, "post_next_ms": None,
                "pre_first_ms": None, "post_first_ms": None, "ttft_ms": self.first_token_ms,
                "tpot_ms": self.next_token_ms, "other_ms": None, "throughput": self.throughput}

    def raw(self) -> dict:
        return {"response_s": self.response_s, "t1_ms": _ms(self.t1_ns)}


Run = DetailRun | NormalRun


# --------------------------------------------------------------------------------------------- one case


@dataclass(frozen=True)
class CaseTiming:
    """The measured rounds of one case (warm-up runs kept apart) and the figures a row reports."""

    mode: str
    rounds: tuple[Run, ...]
    warmups: tuple[Run, ...] = ()

    @property
    def median(self) -> Run:
        """The median round by ResponseTime (the lower one for an even count): a real run, so a
        row's figures all come from one generate call and add up."""
        ordered = sorted(self.rounds, key=lambda r: r.response_ns)
        return ordered[(len(ordered) - 1) // 2]

    @property
    def generate_s(self) -> float:
        """Wall time spent inside generate calls, warm-ups included (for the harness-overhead figure)."""
        total = 0
        for run in self.rounds + self.warmups:
            total += run.response_ns + (run.t1_ns if isinstance(run, NormalRun) else 0)
        return total / NS_PER_S

    def summary(self) -> dict[str, float | None]:
        """The median round's figures, plus percentiles over rounds (TPOT) and over every token gap of
        every round (ITL)."""
        out = dict(self.median.summary())
        tpots = [r.summary()["tpot_ms"] for r in self.rounds]
        tpots = [t for t in tpots if t is not None]
        gaps = [g for r in self.rounds for g in r.itl_ms]
        for q in (50, 90, 99):
            out[f"tpot_p{q}_ms"] = percentile(tpots, q)
            out[f"itl_p{q}_ms"] = percentile(gaps, q)
        return out

    def rounds_brief(self) -> list[dict[str, float | None]]:
        """Per-round headline figures (kept in the CSV row), with the round's fastest inter-token gap where
        tokens were timed one by one (the gate's next-token reading, npuinfer.gates.performance)."""
        keys = ("response_s", "first_token_ms", "next_token_ms")
        brief = []
        for r in self.rounds:
            figures = {k: _round(r.summary()[k]) for k in keys}
            if r.itl_ms:
                figures[ITL_MIN] = _round(min(r.itl_ms))
            brief.append(figures)
        return brief


def _round(value: float | None, digits: int = 6) -> float | None:
    return None if value is None else float(f"{value:.{digits}g}")


# --------------------------------------------------------------------------------------------- backends


class Backend(Protocol):
    """What a case needs from an inference engine: exact-length greedy generate with an observer."""

    name: str
    device: object  # npuinfer.device.Device
    dtype: torch.dtype
    checkpoint: str  # identity of the weights on disk (npuinfer.runtime.checkpoint_identity)
    max_seq_len: int
    vocab_size: int

    def generate(self, input_ids: Tensor, attention_mask: Tensor, max_new_tokens: int,
                 observer: object | None = None) -> Tensor: ...


# --------------------------------------------------------------------------------------------- measuring


@dataclass(frozen=True)
class BenchCase:
    model: str
    batch: int
    input_len: int
    output_len: int

    @property
    def id(self) -> str:
        return f"{self.model}-bs{self.batch}-in{self.input_len}-out{self.output_len}"


def make_inputs(device, vocab_size: int, batch: int, input_len: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Random token ids of exactly ``input_len`` and an all-ones mask, seeded through the device."""
    device.seed(seed)
    ids = torch.randint(0, vocab_size, (batch, input_len), dtype=torch.long)
    return ids, torch.ones_like(ids)


def time_run(backend: Backend, input_ids: Tensor, attention_mask: Tensor, output_len: int, mode: str) -> Run:
    """One timed generate call (detail) or one T1 + Tn pair (normal)."""
    batch, input_len = input_ids.shape
    if mode == "detail":
        timer = Timer(backend.device)
        timer.start()
        out = backend.generate(input_ids, attention_mask, output_len, timer)
        timer.stop()
        _check_length(backend, out, output_len)
        return timer.result(batch, input_len)
    if mode == "normal":
        t1 = _timed_generate(backend, input_ids, attention_mask, 1)
        tn = _timed_generate(backend, input_ids, attention_mask, output_len)
        return NormalRun(batch, input_len, output_len, t1, tn)
    raise ValueError(f"--timing: expected one of {', '.join(MODES)}, got {mode!r}")


def _timed_generate(backend: Backend, input_ids: Tensor, attention_mask: Tensor, n: int) -> int:
    sync, clock = backend.device.synchronize, time.perf_counter_ns
    sync()
    t0 = clock()
    out = backend.generate(input_ids, attention_mask, n)
    sync()
    elapsed = clock() - t0
    _check_length(backend, out, n)
    return elapsed


def _check_length(backend: Backend, out: Tensor, n: int) -> None:
    if out.shape[-1] != n:
        raise RuntimeError(f"{backend.name} generate returned {out.shape[-1]} tokens, expected exactly {n}")


Repeat = Callable[[Callable[[], None], int, int], None]


def plain_repeat(target: Callable[[], None], rounds: int, warmup: int) -> None:
    for _ in range(warmup + rounds):
        target()


def measure_case(backend: Backend, case: BenchCase, *, rounds: int = 3, warmup: int = 1, mode: str = "detail",
                 seed: int = 0, repeat: Repeat = plain_repeat) -> CaseTiming:
    """Warm up at the case's shape, then time ``rounds`` runs.

    ``repeat(target, rounds, warmup)`` calls ``target`` warmup + rounds times, warm-ups first; the
    pytest plugin passes pytest-benchmark's ``pedantic`` here so its statistics see the same runs.
    """
    if mode not in MODES:
        raise ValueError(f"--timing: expected one of {', '.join(MODES)}, got {mode!r}")
    if rounds < 1 or warmup < 0:
        raise ValueError(f"rounds must be >= 1 and warmup >= 0, got rounds={rounds}, warmup={warmup}")
    ids, mask = make_inputs(backend.device, backend.vocab_size, case.batch, case.input_len, seed)
    runs: list[Run] = []
    repeat(lambda: runs.append(time_run(backend, ids, mask, case.output_len, mode)), rounds, warmup)
    if len(runs) != warmup + rounds:
        raise RuntimeError(f"expected {warmup} warm-up and {rounds} timed runs, got {len(runs)} runs")
    return CaseTiming(mode, tuple(runs[warmup:]), tuple(runs[:warmup]))
