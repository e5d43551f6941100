"""The served counterpart of the max batch: the largest concurrency (or whole request rate, requests/s) whose p90
TTFT and p90 TPOT stay within the limits. The load doubles from 1 until a trial is beyond a limit (or has failed
requests), then the gap between the last trial within and the first beyond is halved until they are neighbours.
Each trial is a full case measurement (warm-up, --num-prompts requests)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from .metrics import Limits

MAX_CONCURRENCY = 4096


@dataclass
class SearchResult:
    best: int | None = None
    best_ttft_p90: float | None = None
    best_tpot_p90: float | None = None
    bound_by: str = ""
    trials: list[str] = field(default_factory=list)


class LoadSearch:
    def __init__(self, measure: Callable[[int], tuple], limits: Limits, cap: int = MAX_CONCURRENCY, label: str = "c"):
        self.measure = measure  # load -> (row, load result, verdict), as ServingSession.measure
        self.limits = limits
        self.cap = cap
        self.label = label  # "c" (concurrency) or "r" (requests/s), in the trials' text

    def _trial(self, concurrency: int, result: SearchResult) -> bool:
        row = self.measure(concurrency)[0]
        ttft, tpot = row.get("TTFT_p90(ms)"), row.get("TPOT_p90(ms)")
        beyond = []
        if row.get("failed_requests"):
            beyond.append(f"{row['failed_requests']} failed requests")
        if self.limits.ttft_ms is not None and (ttft is None or ttft > self.limits.ttft_ms):
            beyond.append(f"p90 TTFT {ttft:.1f} ms > {self.limits.ttft_ms:g} ms" if ttft is not None else "no TTFT")
        if self.limits.tpot_ms is not None and (tpot is None or tpot > self.limits.tpot_ms):
            beyond.append(f"p90 TPOT {tpot:.2f} ms > {self.limits.tpot_ms:g} ms" if tpot is not None else "no TPOT")
        figures = f"p90 TTFT {ttft:.1f} ms, p90 TPOT {tpot:.2f} ms" if ttft is not None and tpot is not None else ""
        result.trials.append(f"{self.label}{concurrency}: {figures}: " + ("; ".join(beyond) if beyond else "within"))
        if not beyond and (result.best is None or concurrency > result.best):
            result.best, result.best_ttft_p90, result.best_tpot_p90 = concurrency, ttft, tpot
        if beyond:
            result.bound_by = f"{self.label}{concurrency}: {'; '.join(beyond)}"
        return not beyond

    def run(self) -> SearchResult:
        result = SearchResult()
        low, high = 0, None
        c = 1
        while low < self.cap:
            if self._trial(c, result):
                low = c
                c = min(2 * c, self.cap)
            else:
                high = c
                break
        if high is None:
            result.bound_by = f"every load up to {self.label}{self.cap} was within the limits"
            return result
        while high - low > 1:
            mid = (low + high) // 2
            if self._trial(mid, result):
                low = mid
            else:
                high = mid
        return result
