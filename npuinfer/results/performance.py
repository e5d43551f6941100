"""Performance results: rows of the published CSV layout, their markdown table and plot, and the
max-batch table.

``performance_<model>_<device>.csv`` starts with the columns of the existing tool, named exactly as
REFERENCE.md section 2 lists them, then the published tables' E2E throughput, then ours.
"""
from __future__ import annotations

import datetime as _dt
import io
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

from ..atomic import write_atomic
from ..roofline import ROOFLINE_COLUMNS
from .naming import MAX_BATCH as MAX_BATCH_KIND, PERFORMANCE as PERFORMANCE_KIND, kind_of, result_path
from .table import CsvTable, markdown_table, parse_float, read_csv, varying_columns

BATCH, INPUT, OUTPUT = "batch_size", "input_seq_len(Encoding)", "output_seq_len(Decoding)"
RESPONSE = "ResponseTime(s)"
FIRST, NEXT = "forward_first_token_time(ms)", "forward_next_token_time(ms)"
PRE, POST = "pre_next_token_time(ms)", "post_next_token_time_post(ms)"
PUBLISHED_COLUMNS = [BATCH, INPUT, OUTPUT, RESPONSE, FIRST, NEXT, PRE, POST]
THROUGHPUT = "E2E throughput (token/s)"

# Our metric columns, from the keys of timing.CaseTiming.summary().
METRICS = {
    "ttft_ms": "TTFT(ms)", "tpot_ms": "TPOT(ms)",
    "tpot_p50_ms": "TPOT_p50(ms)", "tpot_p90_ms": "TPOT_p90(ms)", "tpot_p99_ms": "TPOT_p99(ms)",
    "itl_p50_ms": "ITL_p50(ms)", "itl_p90_ms": "ITL_p90(ms)", "itl_p99_ms": "ITL_p99(ms)",
    "pre_first_ms": "pre_first_token_time(ms)", "post_first_ms": "post_first_token_time(ms)",
    "other_ms": "other_time(ms)",
}
PUBLISHED_FROM_SUMMARY = {"response_s": RESPONSE, "first_token_ms": FIRST, "next_token_ms": NEXT,
                          "pre_next_ms": PRE, "post_next_ms": POST}
PEAK = "peak_memory(MiB)"
SETTINGS = ["model", "device", "device_name", "dtype", "backend", "timing", "rounds", "warmup", "tp", "checkpoint",
            "torch", "kernels", "quantization", "quant_kernel"]
# kernels: the kernel set and its self-check (provenance; "+plain" is in backend); quantization: none | W8A16 | W8A8
# (npuinfer.quant) and quant_kernel the matmul its layers ran
# The noise guard's verdict (npuinfer.noise): was the machine quiet while the row was measured, why not, and the
# figures it judged by (JSON). Last, so that rows written before it keep their columns where they were.
QUIET, QUIET_REASONS, NOISE = "quiet", "quiet_reasons", "noise"
NOISE_COLUMNS = [QUIET, QUIET_REASONS, NOISE]
PERFORMANCE_COLUMNS = (PUBLISHED_COLUMNS + [THROUGHPUT] + list(METRICS.values()) + [PEAK, "status", "reason"]
                       + SETTINGS + ["case_id", "measured_at", "rounds_detail"])
# The gate's record of a case measured against --baseline (npuinfer.gates.performance): re-measurements allowed,
# and each attempt's figures and verdict.
GATE_RETRIES, GATE_ATTEMPTS = "gate_retries", "gate_attempts"
PERFORMANCE_COLUMNS += [GATE_RETRIES, GATE_ATTEMPTS]
PERFORMANCE_COLUMNS += NOISE_COLUMNS
PERFORMANCE_COLUMNS += ["weights"] + ROOFLINE_COLUMNS  # appended: the committed baselines' columns stay as they were
# A served deployment's case (npuinfer.serving, bench/test_serving.py): the seed columns hold its figures (first
# token = median TTFT, next token = median TPOT, response time = median end-to-end latency, E2E throughput = output
# tokens/s over the case, batch = the concurrency) and these, appended, hold the rest; in-process rows leave them
# empty.
SERVING_CASE = ["request_rate", "burstiness", "num_prompts", "workload"]
SERVING_STATS = [f"{name}_{stat}(ms)" for name in ("TTFT", "TPOT", "ITL", "E2EL") for stat in ("mean", "median", "p90",
                                                                                             "p99")]
# The share of a served case's chunk gaps under 0.1 ms: above BUNCHED the answers reached the client whole, so its
# TTFT and TPOT measure the delivery, not the server (npuinfer.serving.metrics.bunched_share).
BUNCHED_COLUMN, BUNCHED = "stream_bunched", 0.5
SERVING_COLUMNS = (SERVING_CASE + [BUNCHED_COLUMN, "concurrency", "client_procs", "prompt_salt", "completed",
                                   "failed_requests",
                                   "first_error", "request_throughput(req/s)", "output_throughput(tok/s)",
                                   "total_token_throughput(tok/s)", "goodput(req/s)", "goodput_limits",
                                   "prompt_tokens_mean", "output_tokens_mean", "ignore_eos",
                                   "implied_prefix_hit_rate"]
                   + [c for c in SERVING_STATS if c not in METRICS.values()]
                   + ["server_ttft_mean(ms)", "server_itl_mean(ms)", "server_e2el_mean(ms)", "server_queue_mean(ms)",
                      "server_prefix_cache_hit_rate", "server_prompt_tokens", "server_generation_tokens",
                      "server_preemptions", "server_metrics", "client_cpu_us_per_token", "client_cpu_busiest",
                      "endpoint", "served_model", "server_version", "tokenizer"])
PERFORMANCE_COLUMNS += SERVING_COLUMNS
# Settings that make two measurements of a case different ones (device_name and torch are provenance).
PERFORMANCE_KEY = ["model", "device", "dtype", "backend", "timing", "rounds", "warmup", "tp", "checkpoint",
                   BATCH, INPUT, OUTPUT]
SERVING_KEY = PERFORMANCE_KEY + SERVING_CASE  # a served deployment's rows: open-loop cases differ by rate alone

MAX_BATCH = "max_batch_size"
MAX_BATCH_SETTINGS = ["model", "device", "device_name", "dtype", "backend", "checkpoint", "torch"]
MAX_BATCH_COLUMNS = ([INPUT, OUTPUT, MAX_BATCH, "predicted_max_batch", "memory_limit", "predicted_peak(MiB)",
                      "measured_peak(MiB)", "confirmed_by", "trial_runs", "status", "reason"]
                     + MAX_BATCH_SETTINGS + ["measured_at"]
                     # appended: the largest batch within --max-tpot / --max-ttft (npuinfer.latency)
                     + ["max_tpot(ms)", "max_ttft(ms)", "latency_max_batch", "latency_batch_tpot(ms)",
                        "latency_batch_ttft(ms)", "latency_bound_by", "latency_trials"])
LATENCY_MAX_BATCH = "latency_max_batch"
MAX_BATCH_KEY = ["model", "device", "dtype", "backend", "checkpoint", "memory_limit", INPUT, OUTPUT, "max_tpot(ms)",
                 "max_ttft(ms)"]

NUMERIC = set(PUBLISHED_COLUMNS + [THROUGHPUT, PEAK, "predicted_peak(MiB)", "measured_peak(MiB)", "MBU", "MFU",
               "achieved_bandwidth(GB/s)", "peak_bandwidth(GB/s)", "max_tpot(ms)", "max_ttft(ms)",
               "latency_batch_tpot(ms)", "latency_batch_ttft(ms)"]
              + list(METRICS.values()) + SERVING_STATS
              + ["request_throughput(req/s)", "output_throughput(tok/s)", "goodput(req/s)"])
MIB = 1024 * 1024


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def performance_path(results_dir: str | Path, model: str, device_label: str) -> Path:
    return result_path(PERFORMANCE_KIND, results_dir, model, device_label)


def max_batch_path(results_dir: str | Path, model: str, device_label: str) -> Path:
    return result_path(MAX_BATCH_KIND, results_dir, model, device_label)


def raw_rounds_path(csv_path: Path) -> Path:
    return csv_path.with_suffix(".rounds.jsonl")


def performance_table(path: str | Path) -> CsvTable:
    return CsvTable(path, PERFORMANCE_COLUMNS, PERFORMANCE_KEY)


def serving_table(path: str | Path) -> CsvTable:
    return CsvTable(path, PERFORMANCE_COLUMNS, SERVING_KEY)


def max_batch_table(path: str | Path) -> CsvTable:
    return CsvTable(path, MAX_BATCH_COLUMNS, MAX_BATCH_KEY)


def case_columns(batch: int, input_len: int, output_len: int) -> dict[str, int]:
    return {BATCH: batch, INPUT: input_len, OUTPUT: output_len}


def performance_row(batch: int, input_len: int, output_len: int, settings: Mapping[str, object], *,
                    summary: Mapping[str, float | None] | None = None, rounds_detail: Sequence[dict] = (),
                    peak_bytes: int | None = None, status: str = "ok", reason: str = "",
                    case_id: str = "") -> dict[str, object]:
    """One CSV row. ``summary`` is a `CaseTiming.summary()` (under tensor parallelism, its max over ranks);
    None for a case that produced no timing (an OOM row). Throughput is computed here from ResponseTime."""
    row: dict[str, object] = {**case_columns(batch, input_len, output_len), **settings,
                              "status": status, "reason": reason, "case_id": case_id, "measured_at": now_iso()}
    if summary is not None:
        for key, column in {**PUBLISHED_FROM_SUMMARY, **METRICS}.items():
            row[column] = summary.get(key)
        response = summary.get("response_s")
        row[THROUGHPUT] = batch * output_len / response if response else None
        row["rounds_detail"] = list(rounds_detail)
    row[PEAK] = peak_bytes / MIB if peak_bytes is not None else None
    return row


def noise_columns(quiet: bool, reasons: str, facts: Mapping[str, object]) -> dict[str, object]:
    """The noise guard's cells of a row: ``quiet`` True / False, the reasons, the measured figures."""
    return {QUIET: quiet, QUIET_REASONS: reasons, NOISE: dict(facts)}


def busy_rows(rows: Sequence[Mapping[str, str]]) -> list[Mapping[str, str]]:
    """Rows the noise guard marked as measured on a busy machine (rows without a verdict are not among them)."""
    return [r for r in rows if r.get(QUIET) == "False"]


# --------------------------------------------------------------------------------------------- reports


def _sort_key(row: Mapping[str, str]) -> tuple:
    def num(column: str) -> float:
        value = parse_float(row.get(column))
        return value if value is not None else float("inf")

    return (row.get("model", ""), num(INPUT), num(OUTPUT), num(BATCH))


def _title(rows: Sequence[Mapping[str, str]], columns: Sequence[str]) -> str:
    first = rows[0] if rows else {}
    parts = [f"{c}: {first.get(c)}" for c in columns if first.get(c)]
    return ", ".join(parts)


def performance_markdown(csv_path: Path) -> str:
    _, rows = read_csv(csv_path)
    rows = sorted(rows, key=_sort_key)
    varying = varying_columns(rows, [c for c in SETTINGS if c not in ("model",)])
    busy = busy_rows(rows)
    roofline = ["achieved_bandwidth(GB/s)", "MBU"] if any(r.get("MBU") for r in rows) else []
    if any(r.get("served_model") for r in rows):
        return serving_markdown(csv_path, rows)
    columns = (PUBLISHED_COLUMNS + [THROUGHPUT, "TTFT(ms)", "TPOT(ms)"] + roofline + ["status"]
               + ([QUIET] if busy else []) + varying)
    same = [c for c in SETTINGS if c not in varying]
    lines = [f"# Performance: {rows[0]['model'] if rows else csv_path.stem}", "",
             _title(rows, same + ["weights"]), "", markdown_table(rows, columns, numeric=NUMERIC), ""]
    notes = [f"- {r.get('case_id') or _case_label(r)}: {r.get('status')}: {r.get('reason')}"
             for r in rows if r.get("status") != "ok" and r.get("reason")]
    peaks = sorted({f"{float(r['peak_bandwidth(GB/s)']):.1f} GB/s ({r.get('peak_bandwidth_source')})"
                    for r in rows if r.get("MBU") and r.get("peak_bandwidth(GB/s)")})
    if peaks:
        lines += ["MBU = (weight + KV bytes a decode step reads) / next-token time / peak bandwidth; peak used: "
                  + "; ".join(peaks), ""]
    if notes:
        lines += ["Rows not measured:", *notes, ""]
    if busy:
        lines += ["**Rows measured on a busy machine** (quiet = False: their times include other processes' work; "
                  "measure again on a quiet machine, or run with --require-quiet):",
                  *[f"- {r.get('case_id') or _case_label(r)}: {r.get(QUIET_REASONS)}" for r in busy], ""]
    lines.append(f"Source: {csv_path.name} (raw rounds: {raw_rounds_path(csv_path).name})")
    return "\n".join(lines) + "\n"


SERVING_TABLE = [BATCH, "request_rate", INPUT, OUTPUT, "completed", "failed_requests", "request_throughput(req/s)",
                 THROUGHPUT, "goodput(req/s)", "TTFT_median(ms)", "TTFT_p90(ms)", "TPOT_median(ms)", "TPOT_p90(ms)",
                 "ITL_median(ms)", "E2EL_median(ms)", "server_ttft_mean(ms)", "server_itl_mean(ms)",
                 "client_cpu_us_per_token", "status"]
SERVING_IDENTITY = ["model", "backend", "endpoint", "server_version", "tokenizer", "workload", "num_prompts",
                    "burstiness", "goodput_limits"]


def serving_markdown(csv_path: Path, rows: Sequence[Mapping[str, str]]) -> str:
    """A served deployment's rows: the case columns and vllm bench serve's figures (client and server side)."""
    busy = busy_rows(rows)
    varying = varying_columns(rows, SERVING_IDENTITY)
    same = [c for c in SERVING_IDENTITY if c not in varying]
    columns = SERVING_TABLE + ([QUIET] if busy else []) + varying
    lines = [f"# Serving performance: {rows[0].get('served_model') or csv_path.stem}", "", _title(rows, same), "",
             markdown_table(rows, columns, numeric=NUMERIC), "",
             "batch_size is the concurrency (requests in flight at most); TTFT, TPOT, ITL, E2EL as vllm bench serve "
             "defines them; E2E throughput = output tokens / s over the case; server_* from the server's /metrics.", ""]
    failed = [f"- {r.get('case_id')}: {r.get('status')}: {r.get('reason')}" for r in rows if r.get("status") != "ok"]
    if failed:
        lines += ["Cases not measured cleanly:", *failed, ""]
    if busy:
        lines += ["**Rows measured on a busy machine** (quiet = False):",
                  *[f"- {r.get('case_id')}: {r.get(QUIET_REASONS)}" for r in busy], ""]
    lines.append(f"Source: {csv_path.name}")
    return "\n".join(lines) + "\n"


def _case_label(row: Mapping[str, str]) -> str:
    return f"bs{row.get(BATCH)}-in{row.get(INPUT)}-out{row.get(OUTPUT)}"


@dataclass(frozen=True)
class Panel:
    """One panel of the performance plot: a line per ``series`` label, each a list of (x, y) sorted by x;
    ``busy`` holds the points of rows measured on a busy machine (quiet = False), by the same labels."""
    title: str
    xlabel: str
    ylabel: str
    series: dict[str, list[tuple[float, float]]]
    busy: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    # a serving curve: x is a latency (linear axis), and each point is labelled (its concurrency or rate)
    point_labels: dict[str, list[str]] = field(default_factory=dict)


def plot_rows(csv_path: Path) -> list[Mapping[str, str]]:
    """The rows a plot draws: measured ones (status ok, with a response time)."""
    _, rows = read_csv(csv_path)
    return [r for r in rows if r.get("status") == "ok" and parse_float(r.get(RESPONSE)) is not None]


def performance_panels(rows: Sequence[Mapping[str, str]]) -> list[Panel]:
    """What the performance plot draws: throughput vs batch (a line per input/output length), next-token latency
    vs input length (a line per batch), and where rows carry the roofline columns, MBU vs batch and MFU vs batch
    (a line per input/output length; the peak each is measured against is in the panel's title). Rows whose
    settings differ (dtype, backend, ...) get those settings in their labels."""
    if any(r.get("served_model") for r in rows):
        return serving_panels(rows)
    varying = varying_columns(rows, [c for c in SETTINGS if c not in ("model", "device_name", "torch", "kernels")])

    def label(row: Mapping[str, str], tail: str) -> str:
        return " ".join([*(f"{row[c]}" for c in varying), tail]).strip()

    def series(column: str, x: str, key: Callable[[Mapping[str, str]], str], busy_only: bool = False) -> dict[str, list]:
        lines: dict[str, list] = {}
        for r in rows:
            y = parse_float(r.get(column))
            if y is not None and (not busy_only or r.get(QUIET) == "False"):
                lines.setdefault(key(r), []).append((int(r[x]), y))
        return {k: sorted(v) for k, v in sorted(lines.items(), key=lambda kv: _series_order(kv[0]))}

    def panel(title: str, xlabel: str, column: str, x: str, key: Callable[[Mapping[str, str]], str]) -> Panel:
        return Panel(title, xlabel, column, series(column, x, key), series(column, x, key, busy_only=True))

    def per_seq(r: Mapping[str, str]) -> str:
        return label(r, f"in{r[INPUT]}/out{r[OUTPUT]}")

    panels = [panel("E2E throughput vs batch", "batch size", THROUGHPUT, BATCH, per_seq),
              panel("next-token latency vs sequence length", "input length (tokens)", NEXT, INPUT,
                    lambda r: label(r, f"bs{r[BATCH]}"))]
    for column, peak, unit, what in (("MBU", "peak_bandwidth(GB/s)", "GB/s", "decode"),
                                     ("MFU", "peak_TFLOP/s", "TFLOP/s", "prefill")):
        if series(column, BATCH, per_seq):
            peaks = sorted({f"{float(r[peak]):.3g}" for r in rows if parse_float(r.get(peak)) is not None})
            panels.append(panel(f"{what} {column} vs batch (peak {', '.join(peaks)} {unit})", "batch size",
                                column, BATCH, per_seq))
    return panels


def serving_panels(rows: Sequence[Mapping[str, str]]) -> list[Panel]:
    """A served deployment's curves: output tokens/s against median TPOT and against median TTFT, a point per
    concurrency (or request rate), a line per input/output length and sweep kind."""
    def sweep(r: Mapping[str, str]) -> tuple[str, str]:
        if r.get("request_rate"):
            return "rate", f"r{r['request_rate']}"
        return "concurrency", f"c{r.get(BATCH)}"

    def curve(x_column: str, what: str) -> Panel:
        lines: dict[str, list[tuple[float, float, str]]] = {}
        for r in rows:
            x, y = parse_float(r.get(x_column)), parse_float(r.get(THROUGHPUT))
            if x is None or y is None:
                continue
            kind, point = sweep(r)
            lines.setdefault(f"in{r[INPUT]}/out{r[OUTPUT]} over {kind}", []).append((x, y, point))
        series = {k: [(x, y) for x, y, _ in sorted(v)] for k, v in lines.items()}
        labels = {k: [p for _, _, p in sorted(v)] for k, v in lines.items()}
        return Panel(f"output tokens/s vs {what}", f"{what} (ms)", THROUGHPUT, series, point_labels=labels)

    return [curve(NEXT, "median TPOT"), curve(FIRST, "median TTFT")]


def _series_order(label: str) -> tuple:
    """Labels in numeric order (in8 before in16, bs2 before bs16)."""
    return tuple((0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", label))


BUSY_LABEL = "busy machine (quiet = False)"


def draw_panel(ax, panel: Panel) -> None:
    """One panel on ``ax``: lines over the x values, or grouped bars where there is a single x value (one batch
    size, one length), so no lone points; the y axis from zero with room above the highest value (and above the
    peak line of MBU / MFU when drawn); the points of busy rows ringed in red (bars hatched and edged in red)."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    xs = sorted({x for points in panel.series.values() for x, _ in points})
    top = max(y for points in panel.series.values() for _, y in points)
    busy_handle = None
    if len(xs) == 1:
        width = 0.8 / len(panel.series)
        for i, (name, points) in enumerate(panel.series.items()):
            busy = name in panel.busy
            ax.bar(-0.4 + width * (i + 0.5), points[0][1], width * 0.9, label=name, color=f"C{i}",
                   hatch="//" if busy else None, edgecolor="red" if busy else None, linewidth=1.5 if busy else 0)
            busy_handle = busy_handle or (Patch(facecolor="white", hatch="//", edgecolor="red", label=BUSY_LABEL)
                                          if busy else None)
        ax.set_xlim(-0.6, 0.6)
        ax.set_xticks([0], [str(xs[0])])
    elif panel.point_labels:
        for name, points in panel.series.items():
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
            for (x, y), text in zip(points, panel.point_labels.get(name, ())):
                ax.annotate(text, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set_xlim(0, max(xs) * 1.15)
    else:
        for name, points in panel.series.items():
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
        for points in panel.busy.values():
            ax.scatter([p[0] for p in points], [p[1] for p in points], s=160, facecolors="none", edgecolors="red",
                       linewidths=1.5, zorder=3)
            busy_handle = Line2D([], [], marker="o", linestyle="none", markersize=11, markerfacecolor="none",
                                 markeredgecolor="red", label=BUSY_LABEL)
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(t) for t in xs])
        ax.minorticks_off()
        ax.margins(x=0.08)  # the end points' markers and busy rings inside the panel
    if panel.ylabel in ("MBU", "MFU") and top > 0.5:
        ax.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")  # the probe's peak
        top = max(top, 1.0)
    ax.set_ylim(0, top * 1.15)  # from zero; the highest point and its marker inside the panel
    ax.grid(True, alpha=0.3)
    handles, _ = ax.get_legend_handles_labels()
    ax.legend(handles=handles + ([busy_handle] if busy_handle else []), fontsize=7)
    ax.set(xlabel=panel.xlabel, ylabel=panel.ylabel)
    ax.set_title(panel.title, fontsize=9)


def performance_figure(rows: Sequence[Mapping[str, str]]):
    """The performance plot of measured rows (a matplotlib Figure): `performance_panels`, two to a row."""
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state

    panels = performance_panels(rows)
    ncols = 2
    nrows = (len(panels) + ncols - 1) // ncols
    fig = Figure(figsize=(11, 4.2 * nrows))
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax, panel in zip(axes.flat, panels):
        draw_panel(ax, panel)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.suptitle(f"{rows[0].get('model')} on {rows[0].get('device_name') or rows[0].get('device')} "
                 f"({rows[0].get('dtype')}, {rows[0].get('backend')}, {rows[0].get('timing')} timing)", fontsize=10)
    fig.tight_layout()
    return fig


def performance_plot(csv_path: Path, png_path: Path) -> bool:
    """Draws `performance_figure` of the CSV's measured rows into a PNG. False when there is nothing measured."""
    rows = plot_rows(csv_path)
    if not rows:
        return False
    buf = io.BytesIO()
    performance_figure(rows).savefig(buf, format="png", dpi=110)
    write_atomic(png_path, buf.getvalue())
    return True


def max_batch_markdown(csv_path: Path) -> str:
    _, rows = read_csv(csv_path)
    rows = sorted(rows, key=_sort_key)
    varying = varying_columns(rows, [c for c in MAX_BATCH_SETTINGS + ["memory_limit"] if c != "model"])
    columns = [INPUT, OUTPUT, MAX_BATCH, "predicted_max_batch", "memory_limit", "measured_peak(MiB)",
               "confirmed_by", "status"] + [c for c in varying if c != "memory_limit"]
    if any(r.get(LATENCY_MAX_BATCH) for r in rows):
        columns[3:3] = ["max_tpot(ms)", "max_ttft(ms)", LATENCY_MAX_BATCH, "latency_batch_tpot(ms)"]
    same = [c for c in MAX_BATCH_SETTINGS if c not in varying]
    return "\n".join([f"# Max batch: {rows[0]['model'] if rows else csv_path.stem}", "", _title(rows, same), "",
                      markdown_table(rows, columns, numeric=NUMERIC), "", f"Source: {csv_path.name}"]) + "\n"


def write_reports(csv_path: str | Path) -> list[Path]:
    """Markdown (and for performance, a PNG) beside a results CSV; returns the files written."""
    csv_path = Path(csv_path)
    written = []
    md = csv_path.with_suffix(".md")
    if kind_of(csv_path) == MAX_BATCH_KIND:
        write_atomic(md, max_batch_markdown(csv_path))
        return [md]
    write_atomic(md, performance_markdown(csv_path))
    written.append(md)
    png = csv_path.with_suffix(".png")
    if performance_plot(csv_path, png):
        written.append(png)
    return written


def rounds_record(case_id: str, settings: Mapping[str, object], mode: str, rounds: Sequence[dict],
                  warmups: Sequence[dict]) -> dict:
    """One line of the raw-rounds side file: every round's per-token times."""
    return {"case_id": case_id, "measured_at": now_iso(), **{k: settings.get(k) for k in PERFORMANCE_KEY
                                                            if k in settings}, "timing": mode,
            "rounds": list(rounds), "warmups": [{"response_s": w.get("response_s")} for w in warmups]}
