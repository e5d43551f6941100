"""What a new user meets first: --help everywhere, `npuinfer infer` that explains its noise and its timing,
progress on every long wait (on a terminal only), doctor's facts as `key: value` lines (issue 32)."""
from __future__ import annotations

import argparse
import fcntl
import os
import pty
import select
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest

from npuinfer.cli import build_parser, main
from npuinfer.results.table import significant

ROOT = Path(__file__).resolve().parents[1]


def run_with_terminal_stderr(cmd: list[str], env: dict, timeout: float = 240) -> tuple[int, str, str]:
    """Run ``cmd`` with stderr on a pseudo-terminal (as in a person's shell) and stdout on a pipe; returns
    (exit status, stdout, what the terminal received)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))  # a terminal has a size
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=slave, stdin=subprocess.DEVNULL, env=env, cwd=ROOT)
    os.close(slave)
    received = bytearray()
    out_fd = proc.stdout.fileno()
    stdout = bytearray()
    open_fds = {master, out_fd}
    while open_fds:
        ready, _, _ = select.select(list(open_fds), [], [], timeout)
        if not ready:
            proc.kill()
            raise TimeoutError(f"{cmd} said nothing for {timeout} s")
        for fd in ready:
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # EIO: the terminal's other side closed
                chunk = b""
            if not chunk:
                open_fds.discard(fd)
            elif fd == master:
                received += chunk
            else:
                stdout += chunk
    os.close(master)
    return proc.wait(timeout=timeout), stdout.decode("utf-8", "replace"), received.decode("utf-8", "replace")


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "npuinfer", *args]


def own_env(**extra: str) -> dict:
    env = {**os.environ, "PYTHONIOENCODING": "utf-8", **extra}
    env.pop("NPUINFER_PEAKS_FILE", None)  # this process probes itself, so its probe's progress shows
    return env


# ------------------------------------------------------------------------------------------------ 0: --help


@pytest.mark.parametrize("suite", ["bench/", "accuracy/"])
def test_pytest_help_of_each_suite_works(suite):
    proc = subprocess.run([sys.executable, "-m", "pytest", suite, "--help"], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--quiet-threshold=10%" in proc.stdout and "(default 10%)" in proc.stdout
    assert "Traceback" not in proc.stderr


def _subcommand_argvs(parser: argparse.ArgumentParser, prefix: list[str]) -> list[list[str]]:
    argvs = [prefix]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                argvs += _subcommand_argvs(sub, prefix + [name])
    return argvs


def test_help_of_every_npuinfer_subcommand_works(capsys):
    argvs = _subcommand_argvs(build_parser(), [])
    assert ["infer"] in argvs and ["baseline", "verify"] in argvs and ["report", "ceval"] in argvs
    for argv in argvs:
        with pytest.raises(SystemExit) as info:
            main(argv + ["--help"])
        assert info.value.code == 0, argv
        assert capsys.readouterr().out.startswith("usage: npuinfer"), argv


# ------------------------------------------------------------------------------------------- 2: the main job


def test_infer_on_the_tiny_default_says_its_text_is_noise_and_prints_a_timing_block():
    proc = subprocess.run(cli("infer", "--max-new-tokens", "4"), capture_output=True, text=True, timeout=240,
                          env=own_env(), cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    err = proc.stderr.splitlines()
    note = next(i for i, line in enumerate(err) if line.startswith("note: "))
    assert "random weights" in err[note] and "noise" in err[note] and "--model-path" in err[note]
    block = err[err.index("timing (qwen-tiny on cpu, fp32):"):]
    labels = [line.split(":")[0].strip() for line in block[1:]]
    assert labels == ["first token", "next token", "throughput", "MBU", "weights"]
    assert block[2].split()[3] == "ms" and "(mean of 3 steps)" in block[2]
    assert " GB/s measured (probe: " in block[4]
    assert block[5].startswith("  weights:     tiny random (qwen-tiny")
    assert proc.stdout.startswith("苹果公司的CEO是")  # stdout stays the continuation alone
    assert "note:" not in proc.stdout and "timing" not in proc.stdout


def test_infer_on_a_checkpoint_names_its_directory_and_says_no_noise(tiny_dir, tmp_path):
    # a directory that is not a tiny stand-in (no npuinfer marker): its weights are the checkpoint's
    import shutil

    from npuinfer.tiny import MARKER

    copy = tmp_path / "qwen"
    shutil.copytree(tiny_dir("qwen-tiny"), copy)
    (copy / MARKER).unlink()
    proc = subprocess.run(cli("infer", "--model-path", str(copy), "--max-new-tokens", "2"), capture_output=True,
                          text=True, timeout=240, env={**os.environ, "PYTHONIOENCODING": "utf-8"}, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "note:" not in proc.stderr
    assert f"  weights:     checkpoint {copy}" in proc.stderr.splitlines()


def test_significant_figures():
    assert [significant(v) for v in (274.7, 0.04213, 50030.1, 1.0, 0.0, 8.508e9 / 1e9)] == \
        ["275", "0.0421", "50030", "1.00", "0", "8.51"]


# ----------------------------------------------------------------------------------- 3: progress on long waits


def test_first_infer_shows_progress_on_a_terminal_and_nothing_on_a_pipe(tmp_path):
    env = own_env(NPUINFER_CACHE=str(tmp_path / "cache"))
    rc, out, terminal = run_with_terminal_stderr(cli("infer", "--max-new-tokens", "2"), env)
    assert rc == 0, terminal
    assert "building the tiny checkpoint qwen-tiny (first use)" in terminal
    assert "training its tokenizer" in terminal and "random weights" in terminal
    assert "reading qwen-tiny-v1" in terminal and "file/s" in terminal  # its two shards
    assert "bandwidth probe on cpu" in terminal
    assert out.startswith("苹果公司的CEO是")  # stdout has no bar

    proc = subprocess.run(cli("infer", "--max-new-tokens", "2"), capture_output=True, text=True, timeout=240,
                          env=own_env(NPUINFER_CACHE=str(tmp_path / "cache2")), cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "building the tiny checkpoint" not in proc.stderr and "bandwidth probe" not in proc.stderr
    assert "\r" not in proc.stderr


def test_dummy_weights_show_progress_on_a_terminal():
    rc, _, terminal = run_with_terminal_stderr(
        cli("infer", "--model", "qwen-tiny", "--dummy-weights", "--max-new-tokens", "2"), own_env())
    assert rc == 0, terminal
    assert "dummy fp32 weights on cpu" in terminal and "tensor" in terminal
    assert "note: qwen-tiny runs with --dummy-weights" in terminal
    assert "weights:     dummy at real size (seeded random, seed 0" in terminal


def test_doctor_shows_progress_and_prints_facts_as_key_value_lines(tiny_dir):
    rc, out, terminal = run_with_terminal_stderr(
        cli("doctor", "--model", "qwen-tiny", "--repeats", "2"), own_env())
    assert rc == 0, terminal + out
    assert "doctor: device facts" in terminal and "doctor: checking the fused kernels" in terminal
    assert "bandwidth probe on cpu" in terminal and "FLOP/s" not in out
    lines = out.splitlines()
    facts = lines[1:lines.index("")]
    assert "Peak(" not in out and "{'" not in out
    bandwidth = next(line for line in facts if line.startswith("  memory bandwidth: "))
    value, unit = bandwidth.split(": ")[1].split()[:2]
    assert unit == "GB/s" and len(value.replace(".", "").lstrip("0")) == 3  # 3 significant figures
    assert "  system:" in facts and "    cpus: 2 logical, this process on 0-1" in facts or any(line.startswith("    cpu model: ") for line in facts)
    assert all(": " in line or line.endswith(":") for line in facts)


def test_cut_and_quantize_show_progress_on_a_terminal(tiny_dir, tmp_path):
    import shutil

    model = tmp_path / "qwen"
    shutil.copytree(tiny_dir("qwen-tiny"), model)
    rc, _, terminal = run_with_terminal_stderr(cli("cut", "--model-path", str(model), "--tp", "2"), own_env())
    assert rc == 0, terminal
    assert "writing part_model/ for tp 2" in terminal and "reading qwen" in terminal
    rc, _, terminal = run_with_terminal_stderr(
        cli("quantize", "--model-path", str(model), "--w8a8", "--out", str(tmp_path / "w8a8")), own_env())
    assert rc == 0, terminal
    assert "quantizing W8A8" in terminal and "calibrating activations" in terminal


# --------------------------------------------------------------------------- 1 and 9: set-up, CI, README


def readme_setup_lines() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index("## Set up"):]
    start = section.index("```bash\n") + len("```bash\n")
    return section[start:section.index("```", start)].splitlines()


def test_readme_setup_is_two_python3_commands_that_ci_runs_verbatim():
    lines = readme_setup_lines()
    assert len(lines) == 2 and all(line.startswith("python3 ") for line in lines)
    assert "2>/dev/null" not in lines[0]  # nothing it says is hidden
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert all(line in ci for line in lines)
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "python3 -m venv .venv" in readme and "externally-managed-environment" in readme


def _bash_line(line: str, path: str) -> subprocess.CompletedProcess:
    return subprocess.run(["/bin/bash", "-c", line], capture_output=True, text=True, timeout=60,
                          env={"PATH": path, "HOME": os.environ.get("HOME", "/tmp")}, cwd=ROOT)


def test_first_setup_line_works_with_only_python3_and_fails_loudly_without_it(tmp_path):
    first = readme_setup_lines()[0]
    only_python3 = tmp_path / "bin"
    only_python3.mkdir()
    (only_python3 / "python3").symlink_to(sys.executable)  # no `python` on PATH, torch installed
    proc = _bash_line(first, str(only_python3))
    assert proc.returncode == 0 and not proc.stdout and not proc.stderr, proc.stderr  # torch kept, nothing installed

    nothing = tmp_path / "empty"
    nothing.mkdir()
    proc = _bash_line(first, str(nothing))
    assert proc.returncode == 127 and "python3: command not found" in proc.stderr

    # a python3 without torch and without pip: the install half says why it cannot work
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    proc = _bash_line(first, str(venv / "bin"))
    assert proc.returncode == 1 and "No module named pip" in proc.stderr


def test_ci_removes_the_folders_it_makes(tmp_path):
    """.ci/run with a stand-in python3 that records each command and writes into its --results-dir (the real
    commands take the whole CI's time): afterwards nothing is left in TMPDIR, even though results were written."""
    fake = tmp_path / "bin"
    fake.mkdir()
    log = tmp_path / "commands.log"
    (fake / "python3").write_text(
        "#!/bin/bash\n"
        f'echo "$*" >> {log}\n'
        'want=""\n'
        'for arg in "$@"; do\n'
        '  if [ -n "$want" ]; then echo row > "$arg/performance.csv"; want=""; fi\n'
        '  [ "$arg" = "--results-dir" ] && want=1\n'
        "done\n"
        "exit 0\n")
    (fake / "python3").chmod(0o755)
    outer = tmp_path / "tmp"
    outer.mkdir()
    proc = subprocess.run(["/bin/bash", str(ROOT / ".ci" / "run")], capture_output=True, text=True, timeout=60,
                          env={"PATH": f"{fake}:/usr/bin:/bin", "TMPDIR": str(outer), "HOME": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    commands = log.read_text().splitlines()
    assert len(commands) == 8  # the two set-up lines, then the six test lines
    results = [c.split("--results-dir ")[1] for c in commands if "--results-dir" in c]
    assert len(results) == 3 and all(r.startswith(str(outer)) for r in results)
    assert list(outer.iterdir()) == []


def test_readme_and_bench_scripts_name_no_development_machine_paths():
    texts = {p: p.read_text(encoding="utf-8") for p in [ROOT / "README.md", *sorted((ROOT / "bench").glob("*.py")),
                                                         *sorted((ROOT / "comparisons").glob("*.py"))]}
    for path, text in texts.items():
        for needle in ("flock ", "/work/", "realsize.lock", "/tmp/"):
            assert needle not in text, f"{path.name}: {needle}"


def test_a_missing_checkpoint_names_dummy_weights(capsys):
    assert main(["infer", "--model", "qwen-7b", "hi"]) == 1
    err = capsys.readouterr().err
    assert "--model-path DIR" in err and "--dummy-weights" in err and "--model qwen-tiny" in err
