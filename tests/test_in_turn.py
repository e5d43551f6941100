"""comparisons/in_turn.py, the helper of the benchmarks that compare configurations in processes of their own."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "comparisons"))
from in_turn import run_turn, turns  # noqa: E402


def test_the_order_is_swapped_every_other_round():
    assert list(turns(["a", "b"], 3)) == [(0, "a"), (0, "b"), (1, "b"), (1, "a"), (2, "a"), (2, "b")]


def test_a_child_report_comes_back_and_other_output_is_left_alone():
    code = "print('warming up'); from in_turn import report; report({'ms': [1.5, 2]}); print('bye')"
    cmd = [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(Path(__file__).parents[1] / 'comparisons')!r}); {code}"]
    assert run_turn(cmd, "round 1 x") == {"ms": [1.5, 2]}


@pytest.mark.parametrize("code, says", [("raise SystemExit(3)", "exit code 3, no report"),
                                        ("import os, signal; os.kill(os.getpid(), signal.SIGKILL)", "exit code -9")])
def test_a_failed_child_stops_the_benchmark_naming_the_round(code, says, capsys):
    with pytest.raises(SystemExit, match=f"round 2 bf16: the process failed \\({says}"):
        run_turn([sys.executable, "-c", code], "round 2 bf16")
