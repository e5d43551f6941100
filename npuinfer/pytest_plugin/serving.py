"""bench/ against a served deployment (``--backend openai``): the serving cases, their rows and their gate.

Cases are concurrency x (input, output) (closed loop, ``--concurrency``) or request rate x (input, output) (open
loop, ``--request-rates``), with ids like ``qwen2.5-7b-c8-in1024-out256`` / ``qwen2.5-7b-r4-in1024-out256``. Each
case: a warm-up request (not counted), the server's /metrics scraped, ``--num-prompts`` requests driven by
npuinfer.serving.load, /metrics again, the figures (npuinfer.serving.metrics), its row written at once into
``performance_<served model>_openai.csv`` (the in-process suite's CSV layout, serving columns appended), then the
checks: failed requests, prompt lengths, --baseline (confirm before fail), --require-quiet. bench/test_max_batch.py
gains the served counterpart of the max batch: the largest concurrency whose p90 TTFT and TPOT stay within
--max-ttft / --max-tpot (npuinfer.serving.search).
"""
from __future__ import annotations

import argparse
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import psutil
import pytest

from ..noise import NoiseGuard, Verdict
from ..options import at_least, positive_ints
from ..results.performance import (
    BATCH, BUNCHED, BUNCHED_COLUMN, FIRST, INPUT, NEXT, OUTPUT, RESPONSE, THROUGHPUT,
    now_iso, noise_columns,
    performance_path, serving_table,
)
from ..results.table import CsvTable
from ..serving.load import LoadPlan, LoadResult, Target, run_load
from ..serving.metrics import BUNCHED_GAP_MS, Limits, bunched_share, length_problems, serving_figures
from ..serving.search import LoadSearch
from ..serving.server_metrics import scrape, server_figures
from ..serving.workload import Workload, WorkloadError, make_prompts, new_salt, parse_workload, prefix_hit_rate
from .bench import MaxBatchCase, bench_gate_verdict
from .bench_options import bench_options
from .common import GROUP, served_backend
from .noise import make_guard, record_verdict
from .perf_gate import PerformanceGate

DEVICE_LABEL = "openai"  # results files of a served deployment: performance_<served model>_openai.csv
DEFAULT_CONCURRENCY = (1, 4)
CLIENT_SATURATED = 0.9  # of one core: a client process this busy may have held the case back
SERVING_MARKER = "npuinfer_serving"


def _rates(text: str) -> tuple[float, ...]:
    rates = []
    for part in text.split(","):
        try:
            rate = float(part)
        except ValueError:
            rate = -1.0
        if not rate > 0:
            raise argparse.ArgumentTypeError(f"expected comma-separated request rates per second (> 0, or inf) such "
                                             f"as 1,4,inf; got {text!r}")
        rates.append(rate)
    return tuple(dict.fromkeys(rates))


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"expected a positive number; got {text!r}")
    return value


def _workload(text: str) -> Workload:
    try:
        return parse_workload(text)
    except WorkloadError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup(GROUP)
    group.addoption("--concurrency", type=positive_ints, default=None, dest="serve_concurrency", metavar="1,8,32",
                    help="bench with --backend openai: requests in flight at most, one case each (closed loop; "
                         f"default {','.join(map(str, DEFAULT_CONCURRENCY))} unless --request-rates is given)")
    group.addoption("--request-rates", type=_rates, default=None, dest="serve_rates", metavar="1,4,inf",
                    help="bench with --backend openai: requests per second, one case each (open loop, gamma "
                         "arrivals of shape --burstiness; inf sends every request at once)")
    group.addoption("--burstiness", type=_positive_float, default=1.0, dest="serve_burstiness",
                    help="--request-rates: the gamma shape of the gaps between requests (1: Poisson; lower is "
                         "burstier), as vllm bench serve's (default 1)")
    group.addoption("--num-prompts", type=at_least(1), default=32, dest="serve_num_prompts",
                    help="bench with --backend openai: requests per case, after one warm-up request (default 32)")
    group.addoption("--workload", type=_workload, default=Workload("random"), dest="serve_workload",
                    metavar="random|'sharegpt FILE'|'prefix P'",
                    help="bench with --backend openai: random prompts of exact length (default); ShareGPT JSON "
                         "conversations; or a shared prefix of P tokens and unique suffixes")
    group.addoption("--client-procs", type=at_least(1), default=1, dest="serve_client_procs",
                    help="bench with --backend openai: client processes a case's requests are spread over (when one "
                         "core cannot drive the load; default 1)")
    group.addoption("--prompt-salt", default=None, dest="serve_prompt_salt", metavar="HEX",
                    help="bench with --backend openai: replay the prompts of the run that printed this salt (by default "
                         "each run draws a fresh one, so the server's prefix cache cannot make a rerun faster)")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", f"{SERVING_MARKER}: a bench/ case measuring a served deployment")


# --------------------------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class ServingCase:
    model: str
    input_len: int
    output_len: int
    concurrency: int | None = None
    rate: float | None = None

    @property
    def id(self) -> str:
        load = f"c{self.concurrency}" if self.rate is None else f"r{self.rate:g}"
        return f"{self.model}-{load}-in{self.input_len}-out{self.output_len}"


ServingSearchCase = MaxBatchCase  # the largest load within latency limits, per (input, output): the same fields


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    names = metafunc.fixturenames
    if "serving_case" not in names and "serving_search_case" not in names:
        return
    served = served_backend(metafunc.config)
    opts = bench_options(metafunc.config)
    model = served.endpoint.served_model if served is not None else None
    if "serving_case" in names:
        cases = []
        if served is not None:
            rates = metafunc.config.getoption("serve_rates")
            concurrency = metafunc.config.getoption("serve_concurrency")
            loads = [(c, None) for c in (concurrency or (() if rates else DEFAULT_CONCURRENCY))]
            loads += [(None, r) for r in rates or ()]
            cases = [ServingCase(model, i, o, c, r) for i, o in opts.pairs for c, r in loads]
        metafunc.parametrize("serving_case", cases, ids=[c.id for c in cases])
    if "serving_search_case" in names:
        cases = [ServingSearchCase(model, i, o) for i, o in opts.pairs] if served is not None else []
        metafunc.parametrize("serving_search_case", cases, ids=[c.id for c in cases])


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A served backend runs the serving cases and nothing of the in-process grid; an in-process one the reverse:
    the other kind's tests are deselected, not skipped one by one."""
    served = served_backend(config) is not None
    keep, drop = [], []
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        if fixtures & {"serving_case", "serving_search_case"}:
            item.add_marker(SERVING_MARKER)
            (keep if served else drop).append(item)
        elif served and fixtures & {"perf_case", "max_batch_case"}:
            drop.append(item)
        else:
            keep.append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


# --------------------------------------------------------------------------------------------- the session


def _local_server_pids(base_url: str) -> list[int]:
    """The processes listening on the endpoint's port where the server runs on this machine: their cpu time is the
    measurement's own, not noise (the server's workers are their children)."""
    parts = urlsplit(base_url)
    if parts.hostname not in ("127.0.0.1", "localhost", "::1") or not parts.port:
        return []
    try:
        return sorted({c.pid for c in psutil.net_connections("tcp")
                       if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == parts.port and c.pid})
    except (psutil.Error, OSError):
        return []


class ServingSession:
    """Per pytest session: the served backend (its endpoint, tokenizer, server version), the salt, the noise guard,
    whether the server is still answering."""

    def __init__(self, config: pytest.Config, results_dir: Path):
        self.config = config
        self.options = bench_options(config)
        self.backend = served_backend(config)
        self.endpoint = self.backend.endpoint
        self.results_dir = Path(results_dir)
        self.salt = config.getoption("serve_prompt_salt") or new_salt()
        self.workload: Workload = config.getoption("serve_workload")
        self.num_prompts: int = config.getoption("serve_num_prompts")
        self.burstiness: float = config.getoption("serve_burstiness")
        self.procs: int = config.getoption("serve_client_procs")
        self.limits = Limits(self.options.max_ttft_ms, self.options.max_tpot_ms)
        self.ignore_eos = True
        self.token_ids = bool(self.backend.server_version)  # vLLM's /version: it knows return_token_ids
        self.gone: str | None = None
        self.guard: NoiseGuard = make_guard(config, None)
        self.guard.also_own = _local_server_pids(self.endpoint.base_url)
        self.gate = PerformanceGate(self.options.baseline, self.options.max_regression, self.options.gate_retries)

    # -- the server
    def _url(self, path: str) -> str:
        return self.endpoint.base_url.rstrip("/") + path

    def target(self) -> Target:
        return Target(self._url("/completions"), self.endpoint.served_model, self.endpoint.headers(),
                      self.endpoint.timeout_s, self.ignore_eos, self.token_ids)

    def check_alive(self) -> None:
        """A server that stopped answering fails this case and every later one at once, with one message."""
        if self.gone is None:
            try:
                httpx.get(self._url("/models"), headers=self.endpoint.headers(), timeout=10).raise_for_status()
            except httpx.HTTPError as exc:
                self.gone = (f"the server at {self.endpoint.label} stopped answering ({type(exc).__name__}: {exc}); "
                             "this case and the remaining ones are not measured")
        if self.gone is not None:
            pytest.fail(self.gone, pytrace=False)

    def warm_up(self, input_len: int, output_len: int) -> None:
        """One request at the case's shape, not counted. A server that refuses ``ignore_eos`` is asked without it
        from then on (said once; the rows report the lengths it returned). Any other failure is left to the case,
        whose requests will meet it and count it."""
        prompts = make_prompts(Workload("random"), self.backend.tokenizer, 1, input_len, output_len, seed=1,
                               salt=self.salt + "-warm")
        result = run_load(self.target(), prompts, LoadPlan(concurrency=1))
        error = result.records[0].error
        if error and self.ignore_eos and "ignore_eos" in error:
            warnings.warn(f"{self.endpoint.label} refuses ignore_eos ({error[:200]}): requests go without it, so "
                          "answers may stop early; the rows report the output lengths the server returned")
            self.ignore_eos = False
            result = run_load(self.target(), prompts, LoadPlan(concurrency=1))
            error = result.records[0].error
        if error and self.token_ids and "return_token_ids" in error:
            self.token_ids = False
            result = run_load(self.target(), prompts, LoadPlan(concurrency=1))
            error = result.records[0].error
        if error:  # the case's own requests will meet it too, and count it: only a server gone stops here
            self.check_alive()

    # -- a case
    def settings(self) -> dict[str, object]:
        return {"model": self.endpoint.served_model, "device": DEVICE_LABEL, "device_name": "",
                "dtype": "server", "backend": self.backend.name, "timing": "serving", "rounds": 1, "warmup": 1,
                "tp": "", "checkpoint": self.backend.tokenizer_dir, "torch": "", "kernels": "",
                "quantization": "", "quant_kernel": "", "weights": "served", "endpoint": self.endpoint.label,
                "served_model": self.endpoint.served_model, "server_version": self.backend.server_version or "",
                "tokenizer": self.backend.tokenizer_dir}

    def measure(self, case: ServingCase) -> tuple[dict, LoadResult, Verdict]:
        """Prompts, warm-up, /metrics, the load, /metrics: the case's row (not written)."""
        try:
            prompts = make_prompts(self.workload, self.backend.tokenizer, self.num_prompts, case.input_len,
                                   case.output_len, seed=self.options.seed, salt=self.salt)
        except WorkloadError as exc:
            pytest.fail(f"{case.id}: {exc}", pytrace=False)
        self.warm_up(case.input_len, case.output_len)
        metrics_url = self.endpoint.base_url.rstrip("/").rsplit("/v1", 1)[0] + "/metrics"
        before = scrape(metrics_url, self.endpoint.served_model, self.endpoint.headers())
        plan = LoadPlan(concurrency=case.concurrency, rate=case.rate if case.rate is not None else math.inf,
                        burstiness=self.burstiness, seed=self.options.seed, procs=self.procs)
        start = self.guard.start()
        try:
            result = run_load(self.target(), prompts, plan)
        except ValueError as exc:
            pytest.fail(f"{case.id}: {exc}", pytrace=False)
        verdict = self.guard.stop(start)
        after = scrape(metrics_url, self.endpoint.served_model, self.endpoint.headers())
        if result.client_busiest > CLIENT_SATURATED:
            verdict = Verdict(False, verdict.reasons + [
                f"a client process used {result.client_busiest:.0%} of a core: the client may have held the case "
                "back (--client-procs N spreads it)"], verdict.facts, verdict.cost_s)
        bunched = bunched_share(result.records)
        if bunched > BUNCHED:
            verdict = Verdict(False, verdict.reasons + [
                f"{bunched:.0%} of the gaps between chunks were under {BUNCHED_GAP_MS:g} ms: answers reached the client "
                "in bursts, not at the server's pace (the server's process or the client was kept waiting for a cpu)"],
                verdict.facts, verdict.cost_s)
        figures = serving_figures(result.records, result.duration, self.limits)
        row = self.row(case, prompts, result, figures, server_figures(before, after), verdict)
        row[BUNCHED_COLUMN] = round(bunched, 3)
        return row, result, verdict

    def row(self, case: ServingCase, prompts, result: LoadResult, figures: dict, server: dict,
            verdict: Verdict) -> dict:
        first_error = next((r.error for r in result.records if r.error), "")
        streamed = sum(sum(r.chunk_tokens) for r in result.records)
        row = {**self.settings(), BATCH: case.concurrency if case.concurrency is not None else "",
               INPUT: case.input_len, OUTPUT: case.output_len, "case_id": case.id, "measured_at": now_iso(),
               "status": "ok" if not figures["failed"] else "failed",
               "reason": f"{figures['failed']} of {len(result.records)} requests failed; first: {first_error}"
               if figures["failed"] else "",
               "request_rate": "" if case.rate is None else f"{case.rate:g}",
               "burstiness": "" if case.rate is None else self.burstiness, "num_prompts": len(prompts),
               "workload": self.workload.label, "concurrency": case.concurrency or "", "client_procs": result.procs,
               "prompt_salt": self.salt, "completed": figures["completed"], "failed_requests": figures["failed"],
               "first_error": first_error[:500], "request_throughput(req/s)": figures["request_throughput"],
               "output_throughput(tok/s)": figures["output_throughput"], THROUGHPUT: figures["output_throughput"],
               "total_token_throughput(tok/s)": figures["total_token_throughput"],
               "goodput(req/s)": figures["goodput"],
               "goodput_limits": ", ".join(f"{k} {v:g} ms" for k, v in (("TTFT", self.limits.ttft_ms),
                                                                          ("TPOT", self.limits.tpot_ms)) if v),
               "prompt_tokens_mean": figures["prompt_tokens_mean"], "output_tokens_mean": figures["output_tokens_mean"],
               "ignore_eos": self.ignore_eos,
               "implied_prefix_hit_rate": prefix_hit_rate(self.workload, len(prompts), case.input_len),
               FIRST: figures["ttft_median_ms"], NEXT: figures["tpot_median_ms"],
               RESPONSE: figures["e2el_median_ms"] / 1000 if figures["e2el_median_ms"] is not None else None,
               "TTFT(ms)": figures["ttft_median_ms"], "TPOT(ms)": figures["tpot_median_ms"],
               "client_cpu_us_per_token": 1e6 * result.client_cpu_s / streamed if streamed else None,
               "client_cpu_busiest": round(result.client_busiest, 3),
               **noise_columns(verdict.quiet, verdict.reason, verdict.facts)}
        for name in ("ttft", "tpot", "itl", "e2el"):
            for stat in ("mean", "median", "p90", "p99"):
                row[f"{name.upper()}_{stat}(ms)"] = figures[f"{name}_{stat}_ms"]
        row["TPOT_p50(ms)"] = figures["tpot_median_ms"]  # ITL_p50 stays the in-process decode's (the gate reads it)
        row.update({k.replace("_ms", "(ms)"): v for k, v in server.items()})
        return row

    def table(self) -> tuple[CsvTable, Path]:
        path = performance_path(self.results_dir, self.endpoint.served_model, DEVICE_LABEL)
        return serving_table(path), path

    def run(self, case: ServingCase) -> None:
        self.check_alive()
        table, path = self.table()
        attempts: list[dict] = []
        while True:
            row, result, verdict = self.measure(case)
            # a served deployment's rows are compared raw: the local calibration workload says nothing of a server
            outcome = self.gate.judge(row, DEVICE_LABEL, mode="raw") if row["status"] == "ok" else None
            again = self.gate.settle(outcome, attempts, row)
            table.upsert(row)  # each attempt's row replaces the last; a Ctrl-C leaves the last complete one
            if not again:
                break
        if row["status"] != "ok":
            self.check_alive()
            pytest.fail(f"{case.id}: {row['reason']}", pytrace=False)
        problems = length_problems(result.records, self.ignore_eos)
        if problems:
            pytest.fail(f"{case.id}: {len(problems)} request(s) not of the asked length (row written to {path}):\n"
                        + "\n".join(problems[:5]), pytrace=False)
        record_verdict(self.config, case.id, verdict)
        if outcome is not None:
            self.verdict(case, outcome)

    # -- the gate
    def verdict(self, case: ServingCase, outcome) -> None:
        bench_gate_verdict(self.config, case.id, outcome)

    # -- the largest concurrency (or request rate) within the latency limits
    def search(self, case: ServingSearchCase) -> None:
        """Concurrency 1, 2, 4, ... up to --num-prompts (nothing more is ever in flight); with --request-rates, also
        whole rates 1, 2, 4, ... requests/s up to the largest rate given."""
        if self.limits.ttft_ms is None and self.limits.tpot_ms is None:
            pytest.skip("the largest load within latency limits needs --max-tpot and / or --max-ttft")
        self.check_alive()
        shape = (case.model, case.input_len, case.output_len)
        searches = [("concurrency", LoadSearch(lambda c: self.measure(ServingCase(*shape, concurrency=c)), self.limits,
                                               cap=self.num_prompts, label="c"))]
        rates = [r for r in self.config.getoption("serve_rates") or () if not math.isinf(r)]
        if rates:
            searches.append(("request_rate", LoadSearch(lambda r: self.measure(ServingCase(*shape, rate=float(r))),
                                                        self.limits, cap=max(1, int(max(rates))), label="r")))
        path = self.results_dir / f"max_load_{self.endpoint.served_model}_{DEVICE_LABEL}.csv"
        table = CsvTable(path, MAX_LOAD_COLUMNS, ["model", "endpoint", "load", INPUT, OUTPUT, "max_ttft(ms)",
                                                  "max_tpot(ms)", "workload", "num_prompts"])
        failures = []
        for load, search in searches:
            result = search.run()
            table.upsert({"model": case.model, "endpoint": self.endpoint.label, "load": load, INPUT: case.input_len,
                          OUTPUT: case.output_len, "max_ttft(ms)": self.limits.ttft_ms,
                          "max_tpot(ms)": self.limits.tpot_ms, "workload": self.workload.label,
                          "num_prompts": self.num_prompts, "largest_within": result.best,
                          "ttft_p90(ms)": result.best_ttft_p90, "tpot_p90(ms)": result.best_tpot_p90,
                          "bound_by": result.bound_by, "trials": "; ".join(result.trials),
                          "server_version": self.backend.server_version or "", "measured_at": now_iso()})
            if result.best is None:
                failures.append(f"even {load} 1 is beyond the limits ({result.bound_by})")
        if failures:
            pytest.fail(f"{case.id}: " + "; ".join(failures), pytrace=False)


MAX_LOAD_COLUMNS = ["model", "endpoint", "load", INPUT, OUTPUT, "max_ttft(ms)", "max_tpot(ms)", "workload",
                    "num_prompts", "largest_within", "ttft_p90(ms)", "tpot_p90(ms)", "bound_by", "trials",
                    "server_version", "measured_at"]


@pytest.fixture(scope="session")
def serving(pytestconfig: pytest.Config, results_dir: Path) -> ServingSession:
    """The serving session of a --backend openai run."""
    return ServingSession(pytestconfig, results_dir)
