"""`npuinfer compare RUN_A RUN_B`: two results directories in the real file formats (written through the
same code the suites use), compared, and every ratio and difference checked against figures worked
out here by hand. Rows present in one run only must be listed, never dropped."""
from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

from npuinfer.ceval.report import write_report
from npuinfer.ceval.scored import ScoredRow
from npuinfer.reports.compare import compare_runs, parse_labels, read_run
from npuinfer.results.performance import performance_path, performance_row, performance_table

REPO = Path(__file__).resolve().parents[1]
FIRST, NEXT = "forward_first_token_time(ms)", "forward_next_token_time(ms)"
RESPONSE, TPUT = "ResponseTime(s)", "E2E throughput (token/s)"
SETTINGS = {"device_name": "test", "dtype": "fp32", "backend": "npuinfer", "timing": "detail", "rounds": 3,
            "warmup": 1, "tp": 1, "checkpoint": "x", "torch": "t"}


def perf(run: Path, model: str, device: str, batch: int, first: float, nxt: float, response: float,
         status: str = "ok") -> None:
    summary = {"first_token_ms": first, "next_token_ms": nxt, "response_s": response, "pre_next_ms": 0.01,
               "post_next_ms": 0.02} if status == "ok" else None
    row = performance_row(batch, 16, 8, {**SETTINGS, "model": model, "device": device}, summary=summary,
                          status=status, reason="out of memory" if status != "ok" else "")
    performance_table(performance_path(run, model, device)).upsert(row)


def ceval(run: Path, model: str, device: str, per_subject: dict[str, tuple[int, int]]) -> None:
    """per_subject: subject -> (questions, correct)."""
    rows = []
    for subject, (n, correct) in per_subject.items():
        rows += [ScoredRow.make(subject, str(i), "A", "A" if i < correct else "B") for i in range(n)]
    write_report(run / f"ceval_{model}_{device}", rows)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, Path]:
    npu, gpu = tmp_path_factory.mktemp("npu"), tmp_path_factory.mktemp("gpu")
    # qwen-7b: bs1 and bs2 in both; bs4 in both but out of memory on the GPU run; bs8 on the GPU run only.
    perf(npu, "qwen-7b", "npu0", 1, first=10.0, nxt=2.0, response=0.05)
    perf(npu, "qwen-7b", "npu0", 2, first=12.0, nxt=3.0, response=0.08)
    perf(npu, "qwen-7b", "npu0", 4, first=20.0, nxt=4.0, response=0.10)
    perf(gpu, "qwen-7b", "cuda0", 1, first=4.0, nxt=1.0, response=0.02)
    perf(gpu, "qwen-7b", "cuda0", 2, first=6.0, nxt=1.5, response=0.04)
    perf(gpu, "qwen-7b", "cuda0", 4, first=0, nxt=0, response=0, status="OOM")
    perf(gpu, "qwen-7b", "cuda0", 8, first=8.0, nxt=2.0, response=0.05)
    perf(gpu, "internlm-7b", "cuda0", 1, first=5.0, nxt=1.0, response=0.03)  # a model only the GPU run has
    # logic and law are Humanities, college_physics STEM (ceval_subjects.csv).
    ceval(npu, "qwen-7b", "npu0", {"logic": (3, 2), "law": (2, 1)})
    ceval(gpu, "qwen-7b", "cuda0", {"logic": (3, 1), "college_physics": (2, 2)})
    return npu, gpu


def rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def perf_cell(table, model, batch, metric) -> dict[str, str]:
    found = [r for r in table if r["model"] == model and r["batch_size"] == str(batch) and r["metric"] == metric]
    assert len(found) == 1, (model, batch, metric, found)
    return found[0]


def num(text: str) -> float | None:
    return float(text) if text else None


@pytest.fixture(scope="module")
def compared(runs, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    npu, gpu = runs
    out = tmp_path_factory.mktemp("cmp")
    proc = subprocess.run([sys.executable, "-m", "npuinfer", "compare", str(npu), str(gpu), "--labels", "NPU,GPU",
                           "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return out, proc


def test_performance_ratio_and_difference_by_hand(compared):
    out, _ = compared
    table = rows(out / "performance.csv")
    assert list(table[0]) == ["model", "batch_size", "input_seq_len(Encoding)", "output_seq_len(Decoding)", "metric",
                              "NPU", "GPU", "NPU/GPU (对比)", "NPU-GPU", "note"]
    first = perf_cell(table, "qwen-7b", 1, FIRST)
    assert (num(first["NPU"]), num(first["GPU"])) == (10.0, 4.0)
    assert num(first["NPU/GPU (对比)"]) == pytest.approx(2.5) and num(first["NPU-GPU"]) == pytest.approx(6.0)
    nxt = perf_cell(table, "qwen-7b", 2, NEXT)
    assert num(nxt["NPU/GPU (对比)"]) == pytest.approx(2.0) and num(nxt["NPU-GPU"]) == pytest.approx(1.5)
    # throughput = batch x output / ResponseTime: bs2: 2*8/0.08 = 200 vs 2*8/0.04 = 400
    tput = perf_cell(table, "qwen-7b", 2, TPUT)
    assert num(tput["NPU"]) == pytest.approx(200) and num(tput["GPU"]) == pytest.approx(400)
    assert num(tput["NPU/GPU (对比)"]) == pytest.approx(0.5) and num(tput["NPU-GPU"]) == pytest.approx(-200)
    response = perf_cell(table, "qwen-7b", 1, RESPONSE)
    assert num(response["NPU/GPU (对比)"]) == pytest.approx(2.5) and num(response["NPU-GPU"]) == pytest.approx(0.03)


def test_rows_in_one_run_only_are_listed(compared):
    out, proc = compared
    table = rows(out / "performance.csv")
    only_gpu = perf_cell(table, "qwen-7b", 8, FIRST)
    assert only_gpu["NPU"] == "" and num(only_gpu["GPU"]) == 8.0 and only_gpu["note"] == "only in GPU"
    assert only_gpu["NPU/GPU (对比)"] == only_gpu["NPU-GPU"] == ""
    oom = perf_cell(table, "qwen-7b", 4, FIRST)
    assert num(oom["NPU"]) == 20.0 and oom["GPU"] == "" and oom["note"] == "OOM in GPU"
    other_model = perf_cell(table, "internlm-7b", 1, FIRST)
    assert other_model["note"] == "only in GPU"
    assert "internlm-7b: performance only in GPU" in proc.stdout
    # every case of either run is in the table
    cases = {(r["model"], r["batch_size"]) for r in table}
    assert cases == {("qwen-7b", "1"), ("qwen-7b", "2"), ("qwen-7b", "4"), ("qwen-7b", "8"), ("internlm-7b", "1")}


def test_accuracy_by_subject_category_and_avg_by_hand(compared):
    out, _ = compared
    table = {(r["group"], r["name"]): r for r in rows(out / "accuracy.csv")}
    logic = table[("subject", "logic")]
    assert num(logic["NPU"]) == pytest.approx(2 / 3) and num(logic["GPU"]) == pytest.approx(1 / 3)
    assert num(logic["NPU-GPU"]) == pytest.approx(1 / 3) and num(logic["NPU/GPU (对比)"]) == pytest.approx(2.0)
    assert table[("subject", "law")]["note"] == "only in NPU" and table[("subject", "law")]["GPU"] == ""
    assert table[("subject", "college_physics")]["note"] == "only in GPU"
    # Humanities pools logic + law: NPU (2+1)/(3+2) = 0.6, GPU logic only 1/3
    hum = table[("category", "Humanities")]
    assert num(hum["NPU"]) == pytest.approx(0.6) and num(hum["GPU"]) == pytest.approx(1 / 3)
    assert num(hum["NPU-GPU"]) == pytest.approx(0.6 - 1 / 3)
    assert hum["note"] == "pooled over different subjects: 2 in NPU, 1 in GPU, 1 in both"
    assert table[("category", "STEM")]["note"] == "only in GPU"
    # Avg: NPU 3/5, GPU (1+2)/5: equal
    avg = table[("category", "Avg")]
    assert num(avg["NPU"]) == pytest.approx(0.6) and num(avg["GPU"]) == pytest.approx(0.6)
    assert num(avg["NPU-GPU"]) == pytest.approx(0.0, abs=1e-12) and num(avg["NPU/GPU (对比)"]) == pytest.approx(1.0)


def test_markdown_is_printed_and_written_with_the_labels(compared):
    out, proc = compared
    md = (out / "compare.md").read_text(encoding="utf-8")
    assert md.startswith("# NPU vs GPU")
    assert "NPU/GPU (对比)" in md and "NPU-GPU" in md
    assert "## Performance" in md and "## Accuracy (C-Eval)" in md and "by category" in md
    assert md.strip() in proc.stdout
    assert f"wrote {out / 'compare.md'}" in proc.stdout


def test_default_labels_are_the_directory_names(runs):
    npu, gpu = runs
    labels = parse_labels(None, npu, gpu)
    assert (labels.a, labels.b) == (npu.name, gpu.name)
    table = compare_runs(npu, gpu, labels).performance
    first = next(r for r in table if r["model"] == "qwen-7b" and r["batch_size"] == 1 and r["metric"] == FIRST)
    assert labels.ratio == f"{npu.name}/{gpu.name} (对比)" and first[labels.ratio] == pytest.approx(2.5)


@pytest.mark.parametrize("text", ["NPU", "NPU,", "NPU,NPU", "A,B,C"])
def test_bad_labels_are_refused_naming_the_option(runs, text):
    with pytest.raises(ValueError, match="--labels"):
        parse_labels(text, *runs)


def test_a_directory_with_nothing_to_compare_is_an_error_naming_it(tmp_path, runs):
    proc = subprocess.run([sys.executable, "-m", "npuinfer", "compare", str(tmp_path), str(runs[1])], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert f"RUN_A {tmp_path}: no performance_<model>_<device>.csv" in proc.stderr
    with pytest.raises(FileNotFoundError, match="RUN_B"):
        read_run(tmp_path / "missing", "RUN_B")
