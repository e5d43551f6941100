"""`pytest accuracy/` end to end, in subprocesses on a tiny model and a small synthetic C-Eval set:
resume after a kill, xdist == serial, settings checked, the baseline gate, the report command."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from npuinfer.ceval.synth import write_synthetic_ceval

REPO = Path(__file__).resolve().parents[1]
SUBJECTS = ["law", "logic", "college_physics", "high_school_chemistry"]
PER_SUBJECT = 12
RUN = "ceval_qwen-tiny_cpu"
FILES = ["cache.csv", "cache_meta.json", "subject_acc.json", "classes_acc.json", "summary.md", "ceval_acc.png"]

SLOW_PLUGIN = '''
import time
from npuinfer.ceval.cache import QuestionCache

_add = QuestionCache.add


def add(self, row):  # one row every 0.1 s, so the test can kill the run midway
    _add(self, row)
    time.sleep(0.1)


QuestionCache.add = add
'''


PAUSE_PLUGIN = '''
import os
import time
from pathlib import Path
from npuinfer.ceval.cache import QuestionCache

_add = QuestionCache.add
_added = 0


def add(self, row):  # after 8 rows: wait (outside the cache's lock) until the test releases the run
    global _added
    result = _add(self, row)
    _added += 1
    if _added == 8:
        pause_dir = Path(os.environ["NPUINFER_TEST_PAUSE_DIR"])
        (pause_dir / f"paused-{os.getpid()}").touch()
        while not (pause_dir / "release").exists():
            time.sleep(0.02)
    return result


QuestionCache.add = add
'''


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_synthetic_ceval(tmp_path_factory.mktemp("ceval"), subjects=SUBJECTS, val_per_subject=PER_SUBJECT,
                                 test_per_subject=2)


def command(results: Path, data: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "pytest", "accuracy", "-p", "no:cacheprovider", "-q", "--device", "cpu",
            "--results-dir", str(results), "--ceval-dir", str(data), *args]


def env(**extra: str) -> dict[str, str]:
    # One thread per process: two xdist workers on two cores, and no oversubscription on a busy machine.
    return {**os.environ, "OMP_NUM_THREADS": "1", **extra}


def pytest_run(results: Path, data: Path, *args: str, **extra_env: str) -> subprocess.CompletedProcess:
    return subprocess.run(command(results, data, *args), cwd=REPO, env=env(**extra_env), capture_output=True,
                          text=True, timeout=300)


def cache_rows(path: Path) -> list[list[str]]:
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines[0] in ("subject,question_id,answer,prediction,correct",  # scored by generation
                        "subject,question_id,answer,prediction,correct,logprobs")
    return [line.split(",") for line in lines[1:]]


def same_cache(got: Path, want: Path) -> None:
    """Two cache.csv files hold the same rows in the same order: every column byte for byte but the choices'
    log-likelihoods, which a resumed run computes in other batches (other padding, other last bits)."""
    rows, ref = cache_rows(got), cache_rows(want)
    assert [r[:5] for r in rows] == [r[:5] for r in ref]
    for r, w in zip(rows, ref):
        assert len(r) == len(w) == 6 and all(abs(float(a) - float(b)) < 1e-4
                                             for a, b in zip(r[5].split(";"), w[5].split(";"))), (r, w)


def properties(junit: Path) -> dict[str, dict[str, str]]:
    """Per case id: its user properties from a --junitxml file."""
    out = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        props = {p.get("name"): p.get("value") for p in case.iter("property")}
        out[case.get("name")] = props
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data) -> Path:
    """An uninterrupted serial run: the files every other run is compared with."""
    results = tmp_path_factory.mktemp("serial")
    junit = results / "junit.xml"
    proc = pytest_run(results, data, "--ceval-batch-size", "4", f"--junitxml={junit}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = results / RUN
    rows = cache_rows(out / "cache.csv")
    assert sorted((r[0], int(r[1])) for r in rows) == sorted((s, i) for s in SUBJECTS for i in range(PER_SUBJECT))
    assert len(rows) == len({(r[0], r[1]) for r in rows})
    props = properties(junit)
    assert set(props) == {f"test_ceval[qwen-tiny-{s}]" for s in SUBJECTS}
    acc = json.loads((out / "subject_acc.json").read_text())
    for s in SUBJECTS:  # each case recorded its accuracy, and it is the report's
        assert float(props[f"test_ceval[qwen-tiny-{s}]"]["ceval_accuracy"]) == acc[s]
    # the terminal summary has both tables
    assert "npuinfer C-Eval: ceval_qwen-tiny_cpu" in proc.stdout and "Avg(Hard)" in proc.stdout
    return out


def copy_run(reference: Path, tmp_path: Path) -> Path:
    results = tmp_path / "results"
    shutil.copytree(reference, results / RUN)
    return results


@pytest.mark.e2e
def test_xdist_run_equals_serial_run(reference, data, tmp_path):
    proc = pytest_run(tmp_path, data, "-n", "2", "--ceval-batch-size", "3")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = tmp_path / RUN
    assert not list(out.glob("cache.part-*")), "part files are merged and removed"
    same_cache(out / "cache.csv", reference / "cache.csv")  # batches of 3 here, 4 there
    for name in FILES[1:]:
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name


def test_killed_run_resumes_and_ends_like_an_uninterrupted_one(reference, data, tmp_path):
    (tmp_path / "slow_cache.py").write_text(SLOW_PLUGIN)
    results = tmp_path / "results"
    cache = results / RUN / "cache.csv"
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen(command(results, data, "-p", "slow_cache", "--ceval-batch-size", "4"), cwd=REPO,
                                env=env(PYTHONPATH=f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"),
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 120
        try:
            while time.monotonic() < deadline and proc.poll() is None:
                if cache.exists() and len(cache.read_text().splitlines()) > 6:  # header + 6 rows
                    break
                time.sleep(0.02)
            assert proc.poll() is None, (tmp_path / "killed.log").read_text()
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    before = len(cache_rows(cache))
    assert 6 <= before < len(SUBJECTS) * PER_SUBJECT
    assert not (results / RUN / "subject_acc.json").exists()

    junit = tmp_path / "junit.xml"
    proc2 = pytest_run(results, data, "--ceval-batch-size", "4", f"--junitxml={junit}")
    assert proc2.returncode == 0, proc2.stdout + proc2.stderr
    scored_now = sum(int(p["ceval_scored_now"]) for p in properties(junit).values())
    assert before + scored_now == len(SUBJECTS) * PER_SUBJECT  # nothing scored twice
    rows = cache_rows(results / RUN / "cache.csv")
    assert len(rows) == len({(r[0], r[1]) for r in rows}) == len(SUBJECTS) * PER_SUBJECT
    same_cache(results / RUN / "cache.csv", reference / "cache.csv")
    for name in ("subject_acc.json", "classes_acc.json"):
        assert (results / RUN / name).read_bytes() == (reference / name).read_bytes(), name


@pytest.mark.e2e
def test_concurrent_runs_and_a_report_in_between_keep_every_question_once(reference, data, tmp_path):
    """Two runs on one --results-dir with overlapping -k, and `npuinfer report ceval` while they write."""
    (tmp_path / "paused_cache.py").write_text(PAUSE_PLUGIN)
    results = tmp_path / "results"
    out = results / RUN
    release = tmp_path / "release"
    pause_env = env(PYTHONPATH=f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
                    NPUINFER_TEST_PAUSE_DIR=str(tmp_path))
    selections = ["law or logic or college_physics", "logic or college_physics or high_school_chemistry"]
    logs = [tmp_path / f"run{i}.log" for i in range(2)]
    procs = []
    for selection, log in zip(selections, logs):
        with open(log, "w") as fh:
            procs.append(subprocess.Popen(command(results, data, "-p", "paused_cache", "--ceval-batch-size", "4",
                                                  "-k", selection),
                                          cwd=REPO, env=pause_env, stdout=fh, stderr=subprocess.STDOUT))
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and len(list(tmp_path.glob("paused-*"))) < 2:
            assert all(p.poll() is None for p in procs), "\n".join(log.read_text() for log in logs)
            time.sleep(0.05)
        assert len(list(tmp_path.glob("paused-*"))) == 2, "both runs pause midway"
        report = subprocess.run([sys.executable, "-m", "npuinfer", "report", "ceval", str(out)], cwd=REPO,
                                env=env(), capture_output=True, text=True, timeout=120)
        assert report.returncode == 0, report.stdout + report.stderr
        release.touch()
        codes = [p.wait(timeout=240) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert codes == [0, 0], "\n".join(log.read_text() for log in logs)
    rows = cache_rows(out / "cache.csv")
    assert sorted((r[0], int(r[1])) for r in rows) == sorted((s, i) for s in SUBJECTS for i in range(PER_SUBJECT))
    same_cache(out / "cache.csv", reference / "cache.csv")
    for name in ("subject_acc.json", "classes_acc.json"):
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name


def test_cache_from_other_settings_is_refused_with_the_reason(reference, data, tmp_path):
    results = copy_run(reference, tmp_path)
    before = (results / RUN / "cache.csv").read_bytes()
    proc = pytest_run(results, data, "--shot", "0", "-k", "law or logic")
    assert proc.returncode == 1
    assert "shots: 5 in the cache, 0 now" in proc.stdout
    assert "rows from different settings are never mixed" in proc.stdout
    assert (results / RUN / "cache.csv").read_bytes() == before


def test_baseline_gate(reference, data, tmp_path):
    results = copy_run(reference, tmp_path)  # complete cache: nothing is scored again, the gate is what runs
    acc = json.loads((reference / "subject_acc.json").read_text())
    equal = tmp_path / "equal"
    equal.mkdir()
    shutil.copy(reference / "subject_acc.json", equal)
    proc = pytest_run(results, data, "--baseline", str(equal))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"{len(SUBJECTS)} passed" in proc.stdout and "warning" not in proc.stdout

    # A baseline directory of runs (as results/baselines/<name>/ holds them), the gate's subjects doctored.
    doctored = tmp_path / "doctored" / RUN
    doctored.mkdir(parents=True)
    bad = {**acc, "law": acc["law"] + 0.1}
    del bad["logic"]
    (doctored / "subject_acc.json").write_text(json.dumps(bad))
    proc = pytest_run(results, data, "--baseline", str(doctored.parent))
    assert proc.returncode == 1
    assert "1 failed" in proc.stdout and f"{len(SUBJECTS) - 1} passed" in proc.stdout
    assert f"qwen-tiny-law: accuracy {acc['law']!r}" in proc.stdout and repr(acc["law"] + 0.1) in proc.stdout
    assert "qwen-tiny-logic: no baseline accuracy" in proc.stdout  # skipped gate, visible

    proc = pytest_run(results, data, "--baseline", str(doctored.parent), "--max-acc-drop", "0.15", "-k", "law")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_test_split_predictions_without_accuracy(data, tmp_path):
    proc = pytest_run(tmp_path, data, "--ceval-split", "test", "-k", "law")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = tmp_path / RUN
    assert json.loads((out / "subject_acc.json").read_text())["accuracy"] is None
    assert set(json.loads((out / "submission.json").read_text())["law"]) == {"0", "1"}
    assert all(r[2] == "" and r[4] == "" for r in cache_rows(out / "cache.csv"))


def test_missing_data_dir_fails_collection_naming_it(tmp_path):
    proc = pytest_run(tmp_path, tmp_path / "nowhere")
    assert proc.returncode == 2  # interrupted: error during collection
    assert f"--ceval-dir: {tmp_path / 'nowhere'}: C-Eval data directory not found" in proc.stdout


def test_report_command_rebuilds_from_cache_alone(reference, tmp_path):
    from npuinfer.cli import main

    out = copy_run(reference, tmp_path) / RUN
    for name in ("subject_acc.json", "classes_acc.json", "summary.md", "ceval_acc.png"):
        (out / name).unlink()
    assert main(["report", "ceval", str(out)]) == 0
    for name in FILES:
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name


def test_rows_from_other_data_are_never_reused(data, tmp_path):
    from npuinfer.ceval.cache import CacheError
    from npuinfer.backends.npuinfer import NpuinferBackend
    from npuinfer.ceval.run import CevalRun, RunSettings
    from npuinfer.runtime import load_model

    loaded = load_model("qwen-tiny", device="cpu", dtype="fp32")
    copy = shutil.copytree(data, tmp_path / "data")
    out = tmp_path / RUN
    run = CevalRun(NpuinferBackend(loaded), RunSettings(copy, batch_size=16), out)
    first = run.run_subject("law")
    run.close()
    assert first.scored_now == PER_SUBJECT and first.accuracy == first.correct / PER_SUBJECT
    # batch size is not a setting: rows reused
    run = CevalRun(NpuinferBackend(loaded), RunSettings(copy, batch_size=5), out)
    again = run.run_subject("law")
    run.close()
    assert again.scored_now == 0 and again.rows == first.rows
    path = copy / "val" / "logic_val.csv"
    path.write_text(path.read_text(encoding="utf-8") + "99,新的题目,a,b,c,d,A\n", encoding="utf-8")
    with pytest.raises(CacheError, match=r"extra\.data_sha256: '[0-9a-f]+' in the cache, '[0-9a-f]+' now"):
        CevalRun(NpuinferBackend(loaded), RunSettings(copy), out)
