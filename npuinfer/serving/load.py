"""Driving one serving case: every prompt sent as vllm bench serve sends it, the records gathered.

Closed loop: at most ``concurrency`` requests in flight, the next sent as one finishes (``rate`` inf). Open loop:
requests sent at ``rate`` per second with gaps drawn from a gamma distribution of shape ``burstiness`` and scale
1 / (rate x burstiness) (1 = Poisson), seeded; a concurrency cap may apply as well. With ``procs`` > 1 the
prompts are dealt round robin to that many client processes; each gets its send times on the one schedule (and
its share of the concurrency cap) and the records merge on the machine's monotonic clock.

The client's own cost is measured: the cpu seconds each client process spent, beside the wall time, so a case
can say whether its client might have been the bottleneck.
"""
from __future__ import annotations

import asyncio
import math
import multiprocessing
import random
import resource
import time
from dataclasses import dataclass, field
from typing import Sequence

import aiohttp

# Client processes import this module: nothing here may pull in torch (the tokenizer's, in workload.py).
from .stream import Prompt, RequestRecord, completion_payload, stream_completion

START_DELAY_S = 0.3  # client processes start their schedule together, this long after the parent plans it


@dataclass(frozen=True)
class Target:
    """Where the requests go and how they are asked (never the key in a label)."""

    url: str  # .../v1/completions
    model: str
    headers: dict[str, str]
    timeout_s: float
    ignore_eos: bool = True
    token_ids: bool = False


@dataclass(frozen=True)
class LoadPlan:
    concurrency: int | None = None  # requests in flight at most (None: no cap)
    rate: float = math.inf  # requests per second; inf: all at once
    burstiness: float = 1.0
    seed: int = 0
    procs: int = 1

    def send_offsets(self, n: int) -> list[float]:
        """Seconds after the start at which each request is sent (vllm bench serve's arrival process)."""
        if math.isinf(self.rate):
            return [0.0] * n
        rng = random.Random(self.seed)
        scale = 1.0 / (self.rate * self.burstiness)
        t, out = 0.0, []
        for _ in range(n):
            out.append(t)
            t += rng.gammavariate(self.burstiness, scale)
        return out


@dataclass
class LoadResult:
    records: list[RequestRecord]
    start: float
    end: float
    client_cpu_s: float  # all client processes together
    client_busiest: float = 0.0  # the highest share of one core a client process used over the case
    procs: int = 1
    notes: list[str] = field(default_factory=list)

    @property
    def duration(self) -> float:
        return self.end - self.start


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _drive(target: Target, jobs: Sequence[tuple[int, Prompt, float]], cap: int | None,
                 start_at: float) -> list[RequestRecord]:
    limit = asyncio.Semaphore(cap) if cap else None
    # --request-timeout bounds the connection and every wait for the next bytes, not the whole (long) stream
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=target.timeout_s, sock_read=target.timeout_s)
    connector = aiohttp.TCPConnector(limit=0, force_close=False)  # no cap of its own: the plan's concurrency rules
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as client:
        try:  # the client's first request pays for imports and a connection: not inside the schedule
            async with client.get(target.url.rsplit("/", 1)[0] + "/models", headers=target.headers) as reply:
                await reply.read()
        except (aiohttp.ClientError, asyncio.TimeoutError):
            pass  # the requests themselves will say what is wrong

        async def one(index: int, prompt: Prompt, offset: float) -> RequestRecord:
            delay = start_at + offset - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            record = RequestRecord(index, prompt.prompt_len, prompt.output_len)
            payload = completion_payload(target.model, prompt.text, prompt.output_len,
                                         ignore_eos=target.ignore_eos, token_ids=target.token_ids)
            if limit is None:
                return await stream_completion(client, target.url, target.headers, payload, record)
            async with limit:
                return await stream_completion(client, target.url, target.headers, payload, record)

        return list(await asyncio.gather(*(one(i, p, o) for i, p, o in jobs)))


def _worker(target: Target, jobs: list, cap: int | None, start_at: float) -> tuple[list[dict], float, float]:
    """One client process: its records (as dicts), its cpu seconds and its wall seconds over the schedule."""
    cpu0, wall0 = _cpu_s(), time.perf_counter()
    records = asyncio.run(_drive(target, jobs, cap, start_at))
    return [r.to_json() for r in records], _cpu_s() - cpu0, time.perf_counter() - wall0


def _ready(_: int) -> bool:
    return True


def run_load(target: Target, prompts: Sequence[Prompt], plan: LoadPlan) -> LoadResult:
    """Send every prompt by the plan; the records in prompt order."""
    offsets = plan.send_offsets(len(prompts))
    jobs = [(i, p, o) for i, (p, o) in enumerate(zip(prompts, offsets))]
    procs = max(1, min(plan.procs, len(jobs)))
    if procs == 1:
        cpu0 = _cpu_s()
        start = time.perf_counter()
        records = asyncio.run(_drive(target, jobs, plan.concurrency, start))
        end = time.perf_counter()
        cpu = _cpu_s() - cpu0
        return LoadResult(records, start, end, cpu, cpu / max(end - start, 1e-9))
    caps = [None] * procs
    if plan.concurrency:
        if plan.concurrency < procs:
            raise ValueError(f"--client-procs {procs} is more than the concurrency {plan.concurrency}: each client "
                             "process needs at least one request in flight")
        caps = [plan.concurrency // procs + (1 if k < plan.concurrency % procs else 0) for k in range(procs)]
    shares = [jobs[k::procs] for k in range(procs)]
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no torch state, no fork of threads
    with context.Pool(procs) as pool:
        pool.map(_ready, range(procs), chunksize=1)  # every client process is up before the schedule is set
        start = time.perf_counter() + START_DELAY_S
        pending = [pool.apply_async(_worker, (target, share, cap, start)) for share, cap in zip(shares, caps)]
        answers = [p.get() for p in pending]
    end = max(r["end"] for answer in answers for r in answer[0])
    records = sorted((RequestRecord.from_json(r) for answer in answers for r in answer[0]), key=lambda r: r.index)
    busiest = max(cpu / max(wall, 1e-9) for _, cpu, wall in answers)
    return LoadResult(records, start, end, sum(cpu for _, cpu, _ in answers), busiest, procs)
