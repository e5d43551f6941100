"""How often CI's gated bench sweep fails on unchanged code (false alarms), and how often it fails when the
code is slower (detections).

    python comparisons/false_alarm.py                    # 20 runs each way, alternating (long: ~1 min a run)
    python comparisons/false_alarm.py --runs 5 --slowdown 1.5

The sweep is CI's own command, read from .ci/run (README's gated bench line), run from the repository root:
- *unchanged*: against results/baselines/cpu-tiny as committed. Any failure is a false alarm.
- *slower*: against a copy of it in which every time is divided by ``--slowdown`` and every throughput
  multiplied by it (calibrations unchanged), so the code as it is measures ``--slowdown`` times slower
  than that baseline. A run that does not fail missed the regression. These runs add ``-x``: pytest stops at
  the first failing case, which gives the same verdict (a run fails when any case fails) without re-measuring
  every case of a run that already failed.

The two kinds alternate, so a period of heavier load on a shared machine falls on both. One line per run
(kind, exit code, wall time, the gate's summary line and the largest change it saw), then the counts.

Figures, by machine and day: results/baselines/cpu-tiny/SPREAD.md
(docs/MEASUREMENTS.md#gate-false-alarms-and-detections).
"""
from __future__ import annotations

import argparse
import csv
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BASELINE = "results/baselines/cpu-tiny"
THROUGHPUT = "E2E throughput (token/s)"
ROUND_TIMES = ("response_s", "first_token_ms", "next_token_ms", "itl_min_ms")


def ci_gated_command() -> str:
    """The gated bench line of .ci/run, as CI runs it."""
    for line in (REPO / ".ci" / "run").read_text().splitlines():
        if "bench/test_performance.py" in line and "--baseline" in line:
            return line.split("; passed_or_empty")[0].strip()
    raise SystemExit(f"{REPO / '.ci' / 'run'}: no gated bench line (bench/test_performance.py ... --baseline)")


def doctor(source: Path, target: Path, slowdown: float) -> None:
    """A copy of a baseline whose performance rows are ``slowdown`` times faster."""
    shutil.copytree(source, target)
    for path in target.glob("performance_*.csv"):
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            header, rows = list(reader.fieldnames or []), list(reader)
        for row in rows:
            for column in header:
                if row.get(column) and (column.endswith("(ms)") or column == "ResponseTime(s)"):
                    row[column] = repr(float(row[column]) / slowdown)
            if row.get(THROUGHPUT):
                row[THROUGHPUT] = repr(float(row[THROUGHPUT]) * slowdown)
            if row.get("rounds_detail"):
                rounds = json.loads(row["rounds_detail"])
                row["rounds_detail"] = json.dumps([{k: (v / slowdown if k in ROUND_TIMES and v else v)
                                                    for k, v in r.items()} for r in rounds])
        with open(path, "w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=header, lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)


def run_once(command: str, baseline: str, extra: str = "") -> dict:
    results = tempfile.mkdtemp(prefix="npuinfer-false-alarm-")
    line = command.replace(f"--baseline {BASELINE}", f"--baseline {baseline}")
    line = line.replace('--results-dir "$(mktemp -d)"', f"--results-dir {results}") + (f" {extra}" if extra else "")
    start = time.monotonic()
    proc = subprocess.run(["bash", "-c", line], cwd=REPO, capture_output=True, text=True)
    wall = time.monotonic() - start
    shutil.rmtree(results, ignore_errors=True)
    out = proc.stdout
    summary = re.search(r"^\d+ case\(s\) within the limit.*$", out, re.M)
    largest = re.search(r"^largest change against the baseline: (.*)$", out, re.M)
    last = out.strip().splitlines()[-1] if out.strip() else proc.stderr.strip()[-300:]
    regressed, keep = [], False  # the gate's REGRESSED blocks: each failing case with every attempt's figures
    for text in out.splitlines():
        keep = text.startswith("REGRESSED ") or (keep and text.startswith("  "))
        if keep:
            regressed.append(text)
    return {"rc": proc.returncode, "wall_s": wall, "gate": summary.group(0) if summary else "",
            "largest": largest.group(1) if largest else "", "pytest": last.strip("= "), "regressed": regressed}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20, help="runs of each kind (default 20)")
    parser.add_argument("--slowdown", type=float, default=1.5, help="the regression the slower runs stand for (1.5)")
    args = parser.parse_args(argv)
    command = ci_gated_command()
    print(f"CI's gated sweep: {command}", flush=True)
    counts = {"unchanged": [0, 0], "slower": [0, 0]}  # [failed, runs]
    walls: dict[str, list[float]] = {"unchanged": [], "slower": []}
    with tempfile.TemporaryDirectory(prefix="npuinfer-doctored-") as tmp:
        doctored = Path(tmp) / "cpu-tiny-faster"
        doctor(REPO / BASELINE, doctored, args.slowdown)
        for i in range(1, args.runs + 1):
            for kind, baseline, extra in (("unchanged", BASELINE, ""), ("slower", str(doctored), "-x")):
                r = run_once(command, baseline, extra)
                failed = r["rc"] != 0
                counts[kind][0] += failed
                counts[kind][1] += 1
                walls[kind].append(r["wall_s"])
                print(f"run {i:2d} {kind:9s} rc={r['rc']} {'FAILED' if failed else 'passed'} {r['wall_s']:6.1f} s | "
                      f"{r['gate']} | largest change {r['largest']} | {r['pytest']}", flush=True)
                if kind == "unchanged" and failed:  # a false alarm: show what the gate saw
                    print("\n".join("    " + text for text in r["regressed"]), flush=True)
    (fa, n), (det, m) = counts["unchanged"], counts["slower"]
    print(f"false alarms: {fa} of {n} runs on unchanged code failed (wall {min(walls['unchanged']):.0f}-"
          f"{max(walls['unchanged']):.0f} s)")
    print(f"detections: {det} of {m} runs {args.slowdown:g}x slower than the baseline failed (wall "
          f"{min(walls['slower']):.0f}-{max(walls['slower']):.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
