"""Max batch under a latency limit (MindIE ModelTest's performance_maxbs): for an (input, output) the largest
batch whose measured time per output token (TPOT) and / or first-token time (TTFT) stays within a limit.

Every answer is a measurement: batches are timed as bench cases are (npuinfer.timing.measure_case, the median
round), doubling from 1 until a batch is over the limit or the memory-bound batch is reached, then bisecting.
The search always ends on a batch b measured within the limit and, unless b is the memory-bound cap, on b + 1
measured over it: both are in ``trials``. Latency need not grow strictly with the batch on a noisy machine, so the
answer is "b was within and b + 1 was not, as measured", not a promise about every batch below b.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from .timing import BenchCase, measure_case

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|us)?\s*$")


def parse_duration_ms(text: str, option: str = "--max-tpot") -> float:
    """``50ms``, ``0.05s``, ``500us`` or a plain number of milliseconds -> milliseconds."""
    match = _DURATION_RE.match(str(text))
    if not match or float(match.group(1)) <= 0:
        raise ValueError(f"{option}: expected a positive duration such as 50ms or 0.5s, got {text!r}")
    return float(match.group(1)) * {"ms": 1.0, None: 1.0, "s": 1000.0, "us": 0.001}[match.group(2)]


@dataclass
class LatencyBatchResult:
    max_batch: int  # 0 when not even batch 1 is within the limits
    tpot_ms: float | None  # measured at max_batch
    ttft_ms: float | None
    capped: bool  # max_batch is the cap (the memory-bound batch), not a latency answer
    trials: list = field(default_factory=list)  # [batch, TPOT ms, TTFT ms, within] in the order measured


class LatencyBatchSearch:
    MAX_TRIALS = 20

    def __init__(self, backend, model: str, input_len: int, output_len: int, *, max_tpot_ms: float | None = None,
                 max_ttft_ms: float | None = None, rounds: int = 3, warmup: int = 1, mode: str = "detail",
                 seed: int = 0):
        if max_tpot_ms is None and max_ttft_ms is None:
            raise ValueError("a latency search needs --max-tpot and / or --max-ttft")
        if max_tpot_ms is not None and output_len < 2:
            raise ValueError(f"--max-tpot needs an output of 2 tokens or more (TPOT is undefined), got {output_len}")
        self.backend, self.model, self.input_len, self.output_len = backend, model, input_len, output_len
        self.max_tpot_ms, self.max_ttft_ms = max_tpot_ms, max_ttft_ms
        self.rounds, self.warmup, self.mode, self.seed = rounds, warmup, mode, seed
        self.trials: list[list] = []
        self._measured: dict[int, tuple[float | None, float | None, bool]] = {}

    def measure(self, batch: int) -> tuple[float | None, float | None]:
        """(TPOT ms, TTFT ms) of the median round at ``batch``."""
        case = BenchCase(self.model, batch, self.input_len, self.output_len)
        summary = measure_case(self.backend, case, rounds=self.rounds, warmup=self.warmup, mode=self.mode,
                               seed=self.seed).summary()
        return summary.get("tpot_ms"), summary.get("ttft_ms")

    def within(self, batch: int) -> bool:
        if batch not in self._measured:
            tpot, ttft = self.measure(batch)
            ok = ((self.max_tpot_ms is None or (tpot is not None and tpot <= self.max_tpot_ms))
                  and (self.max_ttft_ms is None or (ttft is not None and ttft <= self.max_ttft_ms)))
            self._measured[batch] = (tpot, ttft, ok)
            self.trials.append([batch, tpot, ttft, ok])
        return self._measured[batch][2]

    def run(self, cap: int) -> LatencyBatchResult:
        """Search batches 1..cap (the memory-bound batch)."""
        if cap < 1:
            return LatencyBatchResult(0, None, None, capped=True, trials=self.trials)
        fit, fail, probe = 0, None, 1
        while len(self.trials) < self.MAX_TRIALS:
            if not self.within(probe):
                fail = probe
                break
            fit = probe
            if probe == cap:
                break
            probe = min(cap, probe * 2)
        while fail is not None and fail - fit > 1 and len(self.trials) < self.MAX_TRIALS:
            mid = (fit + fail) // 2
            if self.within(mid):
                fit = mid
            else:
                fail = mid
        tpot, ttft, _ = self._measured.get(fit, (None, None, False))
        return LatencyBatchResult(fit, tpot, ttft, capped=fit == cap, trials=self.trials)
