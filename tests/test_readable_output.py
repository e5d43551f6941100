"""Output a person reads at a glance (issue 32): rounded accuracies and settings as `key: value` lines, the
C-Eval chart that names its run with the chance line, `report ceval` on a folder of runs, compare's busy rows
and baseline machine, the bench plot's axes, and the gate's re-measure lines."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from npuinfer.ceval.aggregate import aggregate
from npuinfer.ceval.cache import CacheSettings
from npuinfer.ceval.report import CHANCE, scored_chart, write_report
from npuinfer.ceval.scored import ScoredRow
from npuinfer.cli import main

ROOT = Path(__file__).resolve().parents[1]

SETTINGS = CacheSettings(model="qwen-7b", checkpoint="sha256:abc", template="atb", shots=5, dtype="float16",
                         split="val", extra={"provenance": {"kernels": {"rms_norm": "F.rms_norm"},
                                                            "kernel_check": "ok: 8 cases"}})
# STEM pooled 7/30 = 0.2333..., the figure the issue saw printed in full
ROWS = ([ScoredRow.make("advanced_mathematics", str(i), "A", "A" if i < 7 else "B") for i in range(30)]
        + [ScoredRow.make("logic", "0", "B", "B")])


def test_summary_rounds_accuracies_and_lists_settings_as_key_value_lines(tmp_path):
    write_report(tmp_path, ROWS, settings=SETTINGS)
    summary = (tmp_path / "summary.md").read_text(encoding="utf-8")
    assert "0.23333" not in summary and "| 0.2333 " in summary
    lines = summary.splitlines()
    assert "- template: atb" in lines and "- provenance:" in lines
    assert "    - rms_norm: F.rms_norm" in lines and "  - kernel_check: ok: 8 cases" in lines
    assert "{'" not in summary  # no Python dict
    assert json.loads((tmp_path / "classes_acc.json").read_text())["STEM"] == 7 / 30  # JSON: full precision


def test_ceval_chart_names_the_run_and_draws_the_chance_line():
    fig = scored_chart(aggregate(ROWS), SETTINGS)
    title = fig._suptitle.get_text()
    assert "qwen-7b" in title and "sha256:abc" in title and "template atb" in title and "5-shot" in title
    top, bottom = fig.axes
    horizontal = [line for line in top.get_lines() if set(line.get_ydata()) == {CHANCE}]
    vertical = [line for line in bottom.get_lines() if set(line.get_xdata()) == {CHANCE}]
    assert CHANCE == 0.25 and horizontal and vertical
    assert top.get_ylim() == (0, 1) and bottom.get_xlim() == (0, 1)
    assert "chance (0.25)" in [t.get_text() for t in top.get_legend().get_texts()]


def test_terminal_category_table_of_the_suite_is_rounded(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "accuracy/", "-k", "logic or law",
                           "--results-dir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:]
    table = proc.stdout[proc.stdout.index("pooled per category"):]
    rows = [line for line in table.splitlines() if line.startswith("| Humanities")]
    accuracy, macro = [cell.strip() for cell in rows[0].split("|")[4:6]]
    assert len(accuracy.split(".")[1]) == 4 and len(macro.split(".")[1]) == 4


def test_report_ceval_on_a_folder_of_runs_names_them(tmp_path, capsys):
    run = tmp_path / "ceval_qwen-tiny_cpu"
    write_report(run, ROWS, settings=SETTINGS)
    (run / "cache_meta.json").write_text(json.dumps(SETTINGS.to_meta()))
    with pytest.raises(SystemExit) as info:
        main(["report", "ceval", str(tmp_path)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "holds C-Eval runs" in err and str(run) in err and "not found" not in err


# ------------------------------------------------------------------------------------------------ 6: compare


def _write_rows(path: Path, header: list[str], rows: list[dict]) -> None:
    import csv

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, header)
        writer.writeheader()
        writer.writerows(rows)


def _baseline_rows() -> tuple[list[str], list[dict]]:
    from npuinfer.results.table import read_csv

    return read_csv(ROOT / "results" / "baselines" / "cpu-tiny" / "performance_qwen-tiny_cpu.csv")


def test_compare_marks_busy_rows_and_warns(tmp_path, capsys):
    header, rows = _baseline_rows()
    machine = rows[0]["device_name"]
    mine = [dict(r, quiet="True") for r in rows if r["device_name"] == machine]
    mine[0]["quiet"], mine[0]["quiet_reasons"] = "False", "other processes used 40% of cpus 0-1"
    _write_rows(tmp_path / "a" / "performance_qwen-tiny_cpu.csv", header, mine)
    _write_rows(tmp_path / "b" / "performance_qwen-tiny_cpu.csv", header, [dict(r, quiet="True") for r in mine])
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "out")]) == 0
    out, err = capsys.readouterr()
    assert "WARNING: 1 of" in err and "busy machine" in err
    assert "**WARNING: 1 of" in out
    busy_lines = [line for line in out.splitlines() if "BUSY in a (other processes used 40%" in line]
    case = f"| {mine[0]['batch_size']} "
    assert busy_lines and all(line.startswith(case) for line in busy_lines)
    assert len(busy_lines) == 6  # every metric of that case, no other case


def test_compare_against_a_baseline_of_several_machines_uses_the_matching_one(tmp_path, capsys):
    from npuinfer.device import cpu_model_name
    from npuinfer.reports.compare import compare_runs, parse_labels

    header, rows = _baseline_rows()
    template = [r for r in rows if r["device_name"] == rows[0]["device_name"]]
    here = cpu_model_name()
    # the baseline: this machine's rows, and newer ones of another CPU model whose times are 10x
    ours = [dict(r, device_name=here, measured_at="2026-01-01T00:00:00") for r in template]
    newer = [dict(r, device_name="Another CPU", measured_at="2026-12-01T00:00:00",
                  **{"forward_next_token_time(ms)": str(10 * float(r["forward_next_token_time(ms)"]))})
             for r in template]
    _write_rows(tmp_path / "base" / "performance_qwen-tiny_cpu.csv", header, ours + newer)
    # a run of a third machine: the baseline's rows of this machine's CPU model are compared, as the gate does
    _write_rows(tmp_path / "run" / "performance_qwen-tiny_cpu.csv", header,
                [dict(r, device_name="Third CPU") for r in template])
    c = compare_runs(tmp_path / "run", tmp_path / "base", parse_labels("run,base", tmp_path, tmp_path))
    ratios = {r["model"]: r["run/base (对比)"] for r in c.performance if r["metric"] == "forward_next_token_time(ms)"}
    assert ratios and all(abs(v - 1) < 1e-9 for v in ratios.values())
    assert any(f"compared those of {here} (this machine's CPU model), as the gate does" in n for n in c.notes)
    # a run of the other machine: its own rows are compared
    _write_rows(tmp_path / "run2" / "performance_qwen-tiny_cpu.csv", header,
                [dict(r, device_name="Another CPU") for r in newer])
    c = compare_runs(tmp_path / "run2", tmp_path / "base", parse_labels("run,base", tmp_path, tmp_path))
    assert all(abs(r["run/base (对比)"] - 1) < 1e-9 for r in c.performance
               if r["metric"] == "forward_next_token_time(ms)")
    assert any("compared those of Another CPU (the other run's machine)" in n for n in c.notes)


# -------------------------------------------------------------------------------------------- 7: bench plot


def _plot_rows(batches: set[str], busy_index: int = 0) -> list[dict]:
    _, rows = _baseline_rows()
    machine = rows[0]["device_name"]
    chosen = [dict(r, quiet="True") for r in rows if r["device_name"] == machine and r["batch_size"] in batches]
    chosen[busy_index]["quiet"] = "False"
    return chosen


def _panel_values(ax) -> list[float]:
    values = [p.get_height() for c in ax.containers for p in c.patches]
    values += [y for line in ax.get_lines() if line.get_marker() == "o" for y in line.get_ydata()]
    return values


def test_bench_plot_of_one_batch_draws_bars_from_zero_with_the_busy_row_marked():
    from npuinfer.results.performance import BUSY_LABEL, performance_figure

    rows = _plot_rows({"1"})
    fig = performance_figure(rows)
    by_title = {ax.get_title(): ax for ax in fig.axes if ax.get_visible()}
    for title in ("E2E throughput vs batch", next(t for t in by_title if t.startswith("decode MBU"))):
        ax = by_title[title]
        bars = [p for c in ax.containers for p in c.patches]
        assert len(bars) == 2 and not [line for line in ax.get_lines() if line.get_marker() == "o"]  # no lone points
        bottom, top = ax.get_ylim()
        assert bottom == 0 and top > max(p.get_height() for p in bars)  # from zero, nothing clipped
        hatched = [p for p in bars if p.get_hatch()]
        assert len(hatched) == 1 and hatched[0].get_edgecolor()[:3] == (1.0, 0.0, 0.0)
        assert BUSY_LABEL in [t.get_text() for t in ax.get_legend().get_texts()]
    assert [t.get_text() for t in by_title["E2E throughput vs batch"].get_xticklabels()] == ["1"]


def test_bench_plot_of_several_batches_draws_lines_from_zero_with_busy_points_ringed():
    from npuinfer.results.performance import BUSY_LABEL, performance_figure

    fig = performance_figure(_plot_rows({"1", "8"}))
    for ax in (a for a in fig.axes if a.get_visible()):
        values = _panel_values(ax)
        bottom, top = ax.get_ylim()
        assert bottom == 0 and top >= 1.1 * max(values), ax.get_title()
        left, right = ax.get_xlim()
        xs = [x for line in ax.get_lines() if line.get_marker() == "o" for x in line.get_xdata()]
        assert left < min(xs) and right > max(xs)
        rings = [c for c in ax.collections if len(c.get_offsets())]
        assert len(rings) == 1 and tuple(rings[0].get_edgecolor()[0][:3]) == (1.0, 0.0, 0.0)
        assert BUSY_LABEL in [t.get_text() for t in ax.get_legend().get_texts()]


# --------------------------------------------------------------------------------- 8: the gate's re-measures


def test_gate_lines_compare_calibrated_with_calibrated_and_label_the_raw_pair():
    from npuinfer.gates.performance import NEXT, compare_row, describe_attempt

    # the figures: raw next-token gaps ~10% apart, 32.9% apart once each is divided by its calibration
    row = {"case_id": "bs1-in32-out32", "batch_size": "1", "output_seq_len(Decoding)": "32", "timing": "normal",
           NEXT: "1.89144", "rounds": "10"}
    base = dict(row, **{NEXT: "1.71653"})
    outcome = compare_row(row, base, calibration=1.0, baseline_calibration=1.21, estimator="typical")
    check = next(c for c in outcome.checks if c.metric == NEXT)
    assert check.slowdown == pytest.approx(1.89144 / (1.71653 / 1.21))
    text = check.describe()
    assert text.startswith(f"{NEXT} (the row's value): calibrated (time / calibration) 1.8914 now vs 1.4186 in the "
                           "baseline: 33.3% slower; raw (uncalibrated) 1.89144 now vs 1.71653 in the baseline"), text
    line = describe_attempt(outcome.figures())
    assert f"{NEXT} calibrated 1.891 vs 1.419 (33.3% slower; raw 1.89144 vs 1.71653)" in line, line
    raw = compare_row(row, base, estimator="typical")
    assert next(c for c in raw.checks if c.metric == NEXT).describe().endswith(
        "raw 1.89144 now vs 1.71653 in the baseline: 10.2% slower")
    assert f"{NEXT} raw 1.89144 vs 1.71653 (10.2% slower)" in describe_attempt(raw.figures())
