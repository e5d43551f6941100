"""How much the measuring costs: three figures for the bench/ suite.

1. Detail-timing overhead: generate under the Timer (a synchronize and a clock read at four points
   of every step) against an untimed generate, batch 1 on a tiny model. Measured two ways: the
   median relative difference of back-to-back timed / untimed pairs (needs a quiet machine: it cannot
   resolve a fraction of a percent under load), and the Timer's own per-step cost
   (its four callbacks, timed in a tight loop, minus generate's no-op observer) as a share of E2E,
   which is what the first figure estimates under noise.
2. The non-finite logits check (generate's ``check_logits``): generate with it against generate
   without it, batch 1, the same two ways as figure 1: interleaved back-to-back pairs, and its own cost
   (max with the value kept instead of argmax, per step, plus the one check at the end, timed in tight
   loops on a logits row of the model's vocabulary) as a share of E2E. Target <= 0.5%.
3. The harness's share of a default sweep: ``pytest bench/`` with no options, run in a subprocess;
   the plugin's time accounting (NPUINFER_BENCH_STATS) says how much of the session was inside
   generate and model loading; the rest (collection, fixtures, inputs, pytest-benchmark, CSV writes,
   markdown and PNG) is the harness.

    python comparisons/overhead.py                # all figures, about two minutes on 2 cores
    python comparisons/overhead.py --no-sweep     # figures 1 and 2 only

Figures: docs/MEASUREMENTS.md#measuring-overhead
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def timer_overhead(model: str, input_len: int, output_len: int, repeats: int, threads: int) -> dict:
    import torch

    from npuinfer.generate import NoObserver
    from npuinfer.runtime import load_model
    from npuinfer.backends.npuinfer import NpuinferBackend
    from npuinfer.timing import Timer, make_inputs, time_run

    torch.set_num_threads(threads)
    loaded = load_model(model, device="cpu", dtype="fp32")
    backend = NpuinferBackend(loaded)
    device = loaded.device
    ids, mask = make_inputs(device, loaded.args.vocab_size, 1, input_len)

    def untimed() -> float:
        device.synchronize()
        t0 = time.perf_counter_ns()
        backend.generate(ids, mask, output_len)
        device.synchronize()
        return (time.perf_counter_ns() - t0) / 1e6

    def timed() -> float:
        return time_run(backend, ids, mask, output_len, "detail").response_s * 1e3

    for _ in range(2):
        untimed(), timed()
    plain, detail = [], []
    for i in range(repeats):  # interleaved, alternating which goes first
        pair = (untimed, timed) if i % 2 == 0 else (timed, untimed)
        for fn in pair:
            (plain if fn is untimed else detail).append(fn())
    e2e = statistics.median(plain)
    measured = statistics.median((d - p) / p for d, p in zip(detail, plain))  # per back-to-back pair: drift cancels

    # The Timer's own cost per step: its four callbacks against generate's no-op observer's.
    steps = 200_000
    cost = {}
    for name, obs in (("timer", Timer(device)), ("noop", NoObserver())):
        if isinstance(obs, Timer):
            obs.start()
        t0 = time.perf_counter_ns()
        for step in range(steps):
            obs.step_start(step)
            obs.forward_start(step)
            obs.forward_end(step)
            obs.step_end(step)
        cost[name] = (time.perf_counter_ns() - t0) / steps / 1e6  # ms per step
    per_step = cost["timer"] - cost["noop"]
    direct = per_step * output_len / e2e
    return {"model": model, "batch": 1, "input": input_len, "output": output_len, "threads": threads,
            "repeats": repeats, "untimed_e2e_ms": e2e, "timed_e2e_ms": statistics.median(detail),
            "measured_overhead_pct": 100 * measured, "timer_cost_per_step_us": per_step * 1e3,
            "timer_cost_pct_of_e2e": 100 * direct,
            "untimed_spread_pct": 100 * (max(plain) - min(plain)) / e2e}


def nonfinite_check_overhead(model: str, input_len: int, output_len: int, repeats: int, threads: int) -> dict:
    import torch

    from npuinfer.generate import check_finite, choose_greedy, generate
    from npuinfer.runtime import load_model

    torch.set_num_threads(threads)
    loaded = load_model(model, device="cpu", dtype="fp32")
    device = loaded.device
    ids = torch.randint(0, loaded.args.vocab_size, (1, input_len), generator=torch.Generator().manual_seed(0))

    def run(check: bool) -> float:
        device.synchronize()
        t0 = time.perf_counter_ns()
        generate(loaded.model, ids, output_len, check_logits=check)
        device.synchronize()
        return (time.perf_counter_ns() - t0) / 1e6

    for _ in range(2):
        run(False), run(True)
    plain, checked = [], []
    for i in range(repeats):  # interleaved, alternating which goes first
        for check in ((False, True) if i % 2 == 0 else (True, False)):
            (checked if check else plain).append(run(check))
    e2e = statistics.median(plain)
    measured = statistics.median((c - p) / p for c, p in zip(checked, plain))

    # Its own cost: per step, max keeping the value against argmax, on a logits row of the model's size;
    # once per generate, the check of output_len chosen values.
    logits = torch.randn(1, loaded.args.vocab_size)
    steps = 20_000
    per_step = {}
    for name, chosen in (("checked", []), ("plain", None)):
        t0 = time.perf_counter_ns()
        for _ in range(steps):
            choose_greedy(logits, chosen)
        per_step[name] = (time.perf_counter_ns() - t0) / steps / 1e6
    values = [torch.randn(1) for _ in range(output_len)]
    t0 = time.perf_counter_ns()
    for _ in range(200):
        check_finite(values)
    end_ms = (time.perf_counter_ns() - t0) / 200 / 1e6
    direct_ms = (per_step["checked"] - per_step["plain"]) * output_len + end_ms
    return {"model": model, "batch": 1, "input": input_len, "output": output_len, "threads": threads,
            "repeats": repeats, "unchecked_e2e_ms": e2e, "checked_e2e_ms": statistics.median(checked),
            "measured_overhead_pct": 100 * measured,
            # load only ever adds time: the fastest call of each kind is the least disturbed
            "fastest_overhead_pct": 100 * (min(checked) / min(plain) - 1),
            "per_step_extra_us": (per_step["checked"] - per_step["plain"]) * 1e3, "end_check_us": end_ms * 1e3,
            "check_cost_pct_of_e2e": 100 * direct_ms / e2e,
            "unchecked_spread_pct": 100 * (max(plain) - min(plain)) / e2e}


def sweep_share(extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        stats_path = Path(tmp) / "stats.json"
        cmd = [sys.executable, "-m", "pytest", "bench/", "-q", "-p", "no:cacheprovider", "--results-dir",
               str(Path(tmp) / "results"), *extra]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                              env={**os.environ, "NPUINFER_BENCH_STATS": str(stats_path)})
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(f"pytest bench/ failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        stats = json.loads(stats_path.read_text())
    session = stats["session_s"]
    harness = session - stats["generate_s"] - stats["load_s"]
    return {"command": "pytest bench/ " + " ".join(extra), "process_wall_s": wall, "session_s": session,
            "generate_s": stats["generate_s"], "load_s": stats["load_s"], "report_s": stats["report_s"],
            "cases": stats["cases"], "harness_s": harness, "harness_pct_of_session": 100 * harness / session,
            "startup_s": wall - session,
            "outside_generate_pct_of_wall": 100 * (wall - stats["generate_s"]) / wall,
            "noise_guard_s": stats.get("noise_s"), "summary": proc.stdout.strip().splitlines()[-1]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen-tiny")
    parser.add_argument("--input", type=int, default=128)
    parser.add_argument("--output", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=31)
    parser.add_argument("--threads", type=int, default=1, help="torch threads for figure 1 (1: least noise)")
    parser.add_argument("--no-sweep", action="store_true", help="skip figure 3 (the sweep)")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args, extra = parser.parse_known_args(argv)

    out = {"timer": timer_overhead(args.model, args.input, args.output, args.repeats, args.threads)}
    t = out["timer"]
    print(f"1. detail timing overhead, {t['model']} batch 1, in {t['input']} out {t['output']}, "
          f"{t['threads']} thread(s), {t['repeats']} interleaved pairs:")
    print(f"   untimed E2E {t['untimed_e2e_ms']:.2f} ms, timed {t['timed_e2e_ms']:.2f} ms: "
          f"median pair difference {t['measured_overhead_pct']:+.2f}% (run-to-run spread of the untimed calls {t['untimed_spread_pct']:.0f}%)")
    print(f"   the Timer's own cost: {t['timer_cost_per_step_us']:.2f} us per step = "
          f"{t['timer_cost_pct_of_e2e']:.3f}% of E2E (target <= 1%)")
    out["nonfinite"] = n = nonfinite_check_overhead(args.model, args.input, args.output, args.repeats, args.threads)
    print(f"2. non-finite logits check, {n['model']} batch 1, in {n['input']} out {n['output']}, "
          f"{n['threads']} thread(s), {n['repeats']} interleaved pairs:")
    print(f"   unchecked E2E {n['unchecked_e2e_ms']:.2f} ms, checked {n['checked_e2e_ms']:.2f} ms: "
          f"median pair difference {n['measured_overhead_pct']:+.2f}%, fastest vs fastest "
          f"{n['fastest_overhead_pct']:+.2f}% (run-to-run spread of the unchecked calls {n['unchecked_spread_pct']:.0f}%)")
    print(f"   the check's own cost: {n['per_step_extra_us']:+.2f} us per step (max keeping the value vs argmax) + "
          f"{n['end_check_us']:.1f} us once = {n['check_cost_pct_of_e2e']:.3f}% of E2E (target <= 0.5%)")
    if not args.no_sweep:
        out["sweep"] = s = sweep_share(extra)
        print(f"3. {s['command'].strip()}: {s['summary']}")
        print(f"   process {s['process_wall_s']:.1f} s = start-up and imports {s['startup_s']:.1f} s + pytest session "
              f"{s['session_s']:.1f} s")
        print(f"   session: inside generate {s['generate_s']:.1f} s, model loading {s['load_s']:.1f} s, "
              f"harness {s['harness_s']:.2f} s = {s['harness_pct_of_session']:.1f}% of the session (target <= 5%); "
              f"of it, markdown + PNG {s['report_s']:.2f} s")
        if s["noise_guard_s"] is not None:
            print(f"   noise guard (its probes around each case): {s['noise_guard_s'] * 1e3:.1f} ms = "
                  f"{1e3 * s['noise_guard_s'] / max(s['cases'], 1):.2f} ms a case = "
                  f"{100 * s['noise_guard_s'] / s['session_s']:.3f}% of the session (goal < 1%)")
        print(f"   everything outside generate, start-up and loading included: "
              f"{s['outside_generate_pct_of_wall']:.0f}% of the process wall time")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
