"""The server's own figures from its Prometheus ``/metrics``, scraped before and after a case.

vLLM (and vllm-ascend) expose the names below under ``vllm:``, SGLang the same under ``sglang:``; MindIE Service
exposes a Prometheus endpoint as well, under names of its own not listed here yet: for a server without these names
the row says the figures are absent.
Histograms give a mean over the case as (sum after - sum before) / (count after - count before).
"""
from __future__ import annotations

from dataclasses import dataclass

import httpx
from prometheus_client.parser import text_string_to_metric_families

PREFIXES = ("vllm:", "sglang:")  # the servers whose names these are; the first found in a scrape is used
# column -> histogram (seconds): the server's view of the quantities the client measures
HISTOGRAM_MEANS = {"server_ttft_mean_ms": "time_to_first_token_seconds",
                   "server_itl_mean_ms": "inter_token_latency_seconds",
                   "server_e2el_mean_ms": "e2e_request_latency_seconds",
                   "server_queue_mean_ms": "request_queue_time_seconds"}
COUNTERS = {"prefix_cache_queries": "prefix_cache_queries", "prefix_cache_hits": "prefix_cache_hits",
            "server_prompt_tokens": "prompt_tokens", "server_generation_tokens": "generation_tokens",
            "server_preemptions": "num_preemptions"}
SERVER_COLUMNS = [*HISTOGRAM_MEANS, "server_prefix_cache_hit_rate", "server_prompt_tokens",
                  "server_generation_tokens", "server_preemptions", "server_metrics"]


@dataclass(frozen=True)
class Scrape:
    values: dict[str, float]  # sample name -> value, summed over the served model's label sets
    error: str | None = None


def scrape(metrics_url: str, served_model: str, headers: dict[str, str] | None = None) -> Scrape:
    try:
        reply = httpx.get(metrics_url, headers=headers or {}, timeout=10)
    except httpx.HTTPError as exc:
        return Scrape({}, f"{metrics_url}: {type(exc).__name__}")
    if reply.status_code != 200:
        return Scrape({}, f"{metrics_url} answered {reply.status_code}")
    values: dict[str, float] = {}
    try:
        for family in text_string_to_metric_families(reply.text):
            for sample in family.samples:
                model = sample.labels.get("model_name")
                if model is not None and model != served_model:
                    continue
                values[sample.name] = values.get(sample.name, 0.0) + sample.value
    except ValueError as exc:
        return Scrape({}, f"{metrics_url}: not Prometheus text ({exc})")
    return Scrape(values)


def server_figures(before: Scrape, after: Scrape) -> dict:
    """The case's server-side columns; ``server_metrics`` says which were absent and why."""
    out: dict = {c: None for c in SERVER_COLUMNS}
    if before.error or after.error:
        out["server_metrics"] = f"absent: {before.error or after.error}"
        return out
    delta = {k: after.values.get(k, 0.0) - before.values.get(k, 0.0) for k in after.values}
    prefix = next((p for p in PREFIXES if f"{p}{HISTOGRAM_MEANS['server_ttft_mean_ms']}_count" in after.values), None)
    if prefix is None:
        out["server_metrics"] = (f"absent: /metrics answers, but without the names of {', '.join(PREFIXES)} servers "
                                 f"({len(after.values)} samples)")
        return out
    absent = []
    for column, name in HISTOGRAM_MEANS.items():
        name = prefix + name
        total, count = delta.get(f"{name}_sum"), delta.get(f"{name}_count")
        if total is None or count is None:
            absent.append(name)
        elif count > 0:
            out[column] = 1000 * total / count
    counters = {}
    for column, name in COUNTERS.items():
        name = prefix + name
        value = delta.get(f"{name}_total", delta.get(name))
        if value is None:
            absent.append(name)
        counters[column] = value
    if counters.get("prefix_cache_queries"):
        out["server_prefix_cache_hit_rate"] = (counters.get("prefix_cache_hits") or 0.0) / counters["prefix_cache_queries"]
    for column in ("server_prompt_tokens", "server_generation_tokens", "server_preemptions"):
        out[column] = counters.get(column)
    out["server_metrics"] = f"absent: {', '.join(absent)}" if absent else "scraped"
    return out
