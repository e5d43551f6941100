"""Shared fixtures for tests/: tiny checkpoints built once per session, and models loaded once.

Tiny checkpoints go to a per-session cache (``$NPUINFER_CACHE`` when the caller set one), so a test run
never depends on, or writes into, the user's ~/.cache/npuinfer. Subprocesses started by tests inherit the
variable and reuse the same checkpoints.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

TINY_NAMES = ["qwen-tiny", "baichuan2-7b-tiny", "baichuan2-13b-tiny", "internlm-tiny", "gpt-neox-tiny",
              "qwen2-tiny", "llama3-tiny", "qwen3-tiny"]


@pytest.fixture(scope="session", autouse=True)
def npuinfer_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if os.environ.get("NPUINFER_CACHE"):
        yield Path(os.environ["NPUINFER_CACHE"])
        return
    with pytest.MonkeyPatch.context() as mp:
        cache = tmp_path_factory.mktemp("npuinfer_cache")
        mp.setenv("NPUINFER_CACHE", str(cache))
        yield cache


@pytest.fixture(scope="session", autouse=True)
def quiet_subprocess_plugins():
    """pytest subprocesses started by tests (bench/, accuracy/ suites) run without hypothesis's and anyio's plugins,
    which no suite here uses and which cost about a second each of every start (anyio's imports trio)."""
    with pytest.MonkeyPatch.context() as mp:
        unused = "-p no:hypothesispytest -p no:anyio"
        mp.setenv("PYTEST_ADDOPTS", f"{os.environ.get('PYTEST_ADDOPTS', '')} {unused}".strip())
        yield


@pytest.fixture(scope="session", autouse=True)
def subprocesses_are_not_xdist_workers():
    """Under ``pytest -n``, suites started by tests are ordinary pytest sessions: pytest-xdist's worker variables
    would otherwise be inherited, and pytest-benchmark then takes the subprocess for a worker and writes no
    --benchmark-json."""
    with pytest.MonkeyPatch.context() as mp:
        for name in ("PYTEST_XDIST_WORKER", "PYTEST_XDIST_WORKER_COUNT", "PYTEST_XDIST_TESTRUNUID"):
            mp.delenv(name, raising=False)
        yield


@pytest.fixture(scope="session", autouse=True)
def peaks_probed_once(tmp_path_factory):
    """The bench and infer subprocesses share one bandwidth and FLOP/s probe (npuinfer.roofline.shared_peak)."""
    from npuinfer.roofline import PEAKS_FILE_ENV

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(PEAKS_FILE_ENV, str(tmp_path_factory.mktemp("peaks") / "peaks.json"))
        yield


@pytest.fixture(scope="session")
def tiny_dir(npuinfer_cache):
    """tiny_dir(name) -> the tiny checkpoint directory, built on first use (do not modify it)."""
    from npuinfer.tiny import ensure_tiny

    return ensure_tiny


def model_loader(dtype: str):
    """get(name) -> that registry model's LoadedModel on cpu in ``dtype``, loaded on its first call only."""
    from npuinfer.runtime import load_model

    loaded = {}

    def get(name: str):
        if name not in loaded:
            loaded[name] = load_model(name, device="cpu", dtype=dtype)
        return loaded[name]

    return get


@pytest.fixture(scope="session")
def load_tiny(npuinfer_cache):
    """load_tiny(name) -> LoadedModel on cpu in fp32, loaded once per session (do not modify its weights)."""
    return model_loader("fp32")


@pytest.fixture(scope="session")
def served_vllm(tmp_path_factory):
    """A real vLLM server (its CPU build, tests/vllm_server.py) serving a GPT-NeoX with heads of 64 on 127.0.0.1,
    one per session: ``.base_url``, ``.served_name``, ``.model_dir`` (its tokenizer too)."""
    from vllm_server import SERVED, VllmServer, write_served_checkpoint

    checkpoint = write_served_checkpoint(tmp_path_factory.mktemp("served") / "neox-64")
    server = VllmServer(checkpoint, SERVED, tmp_path_factory.mktemp("vllm") / "server.log")
    try:
        server.wait_healthy()
        yield server
    finally:
        server.stop()
