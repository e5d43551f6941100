"""GSM8K through a served model's chat endpoint: `pytest accuracy/ --task gsm8k --backend openai --chat` against the
session's real vLLM (tests/conftest.py `served_vllm`: its checkpoint's chat template passes the user message
through). The generated text is kept per question, a chat run's cache never takes a completions run's rows, and
the two runs are compared question by question. Marked e2e: the server takes a minute to start."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from npuinfer.ceval.cache import read_cache
from npuinfer.tasks import load_task
from npuinfer.tasks.extract import apply_filter

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.e2e


def served_gsm8k(server, results: Path, *more: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pytest", "accuracy", "-p", "no:cacheprovider", "-q", "--results-dir", str(results),
           "--task", "gsm8k", "--max-gen-toks", "16", "--backend", "openai", "--base-url", server.base_url,
           "--served-model", server.served_name, "--tokenizer", str(server.model_dir), "--num-concurrent", "2", *more]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_gsm8k_through_chat_keeps_the_text_and_never_mixes_with_completions(served_vllm, tmp_path):
    chat = served_gsm8k(served_vllm, tmp_path / "chat", "--chat")
    assert chat.returncode == 0, chat.stdout[-3000:] + chat.stderr[-3000:] + served_vllm.log_tail()
    (run,) = (tmp_path / "chat").glob("gsm8k_*")
    meta = json.loads((run / "cache_meta.json").read_text(encoding="utf-8"))
    assert "/v1/chat/completions" in meta["checkpoint"] and meta["extra"]["task"] == "gsm8k"
    header = (run / "cache.csv").read_text(encoding="utf-8").splitlines()[0]
    assert header == "subject,question_id,answer,prediction,correct,generated"
    rows = read_cache(run)
    strict = load_task("gsm8k").filters[0]
    assert len(rows) == 4 and all(r.generated is not None for r in rows) and any(r.generated for r in rows)
    assert all(r.prediction == apply_filter(strict, r.generated) for r in rows)  # the answer read from the text

    # A completions run pointed at the chat run's directory: refused, the chat rows untouched.
    mixed = served_gsm8k(served_vllm, tmp_path / "chat")
    assert mixed.returncode != 0, mixed.stdout[-3000:]
    assert "the cache was written with other settings" in mixed.stdout and "chat/completions" in mixed.stdout
    assert read_cache(run) == rows

    plain = served_gsm8k(served_vllm, tmp_path / "plain")
    assert plain.returncode == 0, plain.stdout[-3000:] + plain.stderr[-3000:]
    compared = subprocess.run([sys.executable, "-m", "npuinfer", "compare", str(tmp_path / "chat"),
                               str(tmp_path / "plain"), "--labels", "chat,completions", "--out", str(tmp_path / "cmp")],
                              cwd=REPO, capture_output=True, text=True, timeout=120)
    assert compared.returncode == 0, compared.stderr
    assert "gsm8k: question by question" in compared.stdout and "4 questions scored by both runs" in compared.stdout
    assert "Log-prob drift: not available (run A holds no log-likelihoods" in compared.stdout
