"""A real-size model with dummy weights: npuinfer vs transformers' generate on the same tensors, with MBU / MFU.

    python comparisons/realsize_vs_hf.py                                  # qwen-7b, bf16, batch 1 and 4 (~29 GB)
    python comparisons/realsize_vs_hf.py --model qwen-7b --layers 2 --vocab 32000   # the same layer shapes, 1.1 GB
    python comparisons/realsize_vs_hf.py --profile                        # + where a decode step goes
    python comparisons/realsize_vs_hf.py --separate                       # each backend in its own process (~15 GB)

A full-size run takes most of a machine's memory and all its cores: run one at a time.

One set of dummy weights (npuinfer.dummy, made in memory, no checkpoint) is run by both: transformers' model is
built over npuinfer's tensors (HFBackend.sharing). With --kernels fused (the default) npuinfer then prepacks its
linears for oneDNN (cpu bf16), new tensors beside the dense ones transformers keeps: the pair needs about twice the
linears' memory (qwen-7b bf16: ~29 GB; on a machine with less, run it with --layers); --kernels plain shares
one copy (15.4 GB). npuinfer alone (--no-hf, or `npuinfer infer`) holds each weight once.
--separate runs each backend in a process of its own, one at a time (npuinfer round 0, transformers round 0,
transformers round 1, npuinfer round 1, ...: the order swapped each round, comparisons/in_turn.py), so only one
model is in memory (qwen-7b at 32 layers: ~15 GB, where the pair needs ~29) and consecutive runs of the two see the
same machine; each process builds the same seeded weights, warms up once per batch (2 new tokens) and times one generate
per batch; the ratio of each pair (a round) is printed, then the medians.
Each round times one generate per backend and batch, the backends alternating, so the machine's drift hits both;
a figure is the median over rounds. The bandwidth probe (npuinfer.roofline) runs before and after the rounds and
the best of the two is the peak MBU is measured against.

Goals of issue #15 (printed, never asserted): next-token npuinfer / transformers <= 0.9 at batch 1 and 4,
decode MBU >= 0.85 against the probe, first-token npuinfer / transformers <= 0.4.

Figures, by machine and day: docs/MEASUREMENTS.md#real-size-dummy-weights-npuinfer-vs-transformers
"""
from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time

import torch

from in_turn import report, run_turn, turns  # comparisons/ is the script's own folder on sys.path
from npuinfer.device import get_device, parse_dtype
from npuinfer.roofline import probe_bandwidth, probe_flops, roofline_figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen-7b")
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--input", type=int, default=64)
    parser.add_argument("--output", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--layers", type=int, default=None, help="keep only this many layers (a preview)")
    parser.add_argument("--vocab", type=int, default=None, help="a smaller vocabulary (a preview)")
    parser.add_argument("--no-hf", action="store_true")
    parser.add_argument("--kernels", default="fused", choices=["fused", "plain"],
                        help="npuinfer's kernel set (fused: on cpu bf16 the linears on prepacked oneDNN weights)")
    parser.add_argument("--profile", action="store_true", help="torch.profiler over one npuinfer decode step")
    parser.add_argument("--separate", action="store_true",
                        help="each backend in its own process, the two taking turns round by round (one model in "
                             "memory at a time)")
    parser.add_argument("--worker", choices=["npuinfer", "hf"], help=argparse.SUPPRESS)  # a --separate child
    parser.add_argument("--round", type=int, default=0, help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    if opts.separate and (opts.no_hf or opts.profile):
        parser.error("--separate compares the two backends run by run: it takes neither --no-hf nor --profile")
    if opts.worker:
        return worker(opts)
    if opts.separate:
        return separate(opts, argv if argv is not None else sys.argv[1:])

    from npuinfer import dummy
    from npuinfer.runtime import LoadedModel
    from npuinfer.tiny import ensure_tiny
    from npuinfer.backends.npuinfer import NpuinferBackend
    from npuinfer.timing import BenchCase, make_inputs, time_run
    from npuinfer.tokenizer import load_tokenizer

    device, dtype = get_device("cpu"), parse_dtype(opts.dtype)
    spec, args = shapes(opts)
    before = probe_bandwidth(device, dtype)  # before the model takes the memory the probe's buffer needs
    dummy.check_fits(args, dtype, device, None, opts.model)
    print(f"# {opts.model}: {args.num_parameters() / 1e9:.2f}B parameters ({args.n_layers} layers, vocab "
          f"{args.vocab_size}), dummy {opts.dtype}, {torch.get_num_threads()} threads, torch {torch.__version__}",
          flush=True)
    start = time.perf_counter()
    model = dummy.build_dummy_model(args, device, dtype, seed=0)
    tok_dir = ensure_tiny(spec.stand_in or spec.name)
    loaded = LoadedModel(opts.model, args.family, tok_dir, args, model, load_tokenizer(tok_dir, args.family), device,
                         dtype, dummy_seed=0)
    print(f"# built in {time.perf_counter() - start:.1f} s", flush=True)
    backends = {"npuinfer": NpuinferBackend(loaded)}
    if not opts.no_hf:
        from npuinfer.backends.hf_model import HFBackend

        backends["hf"] = HFBackend.sharing(loaded)
    start = time.perf_counter()  # checked and (linears) prepacked now, not inside the first timed run
    kernels = model.resolve_kernels(opts.kernels)
    print(f"# npuinfer kernels {opts.kernels}: linear = {kernels.describe()['linear']}, {model.packed_linears} "
          f"linears prepacked in {time.perf_counter() - start:.1f} s", flush=True)
    peaks = [before]
    flops = probe_flops(device, dtype)
    print(f"# probe before: {peaks[0].value / 1e9:.2f} GB/s ({peaks[0].source}); {flops.value / 1e12:.3f} TFLOP/s "
          f"({flops.source})", flush=True)

    runs: dict[tuple[str, int], list] = {}
    for r in range(opts.rounds):
        for batch in opts.batches:
            ids, mask = make_inputs(device, args.vocab_size, batch, opts.input, seed=r)
            for name, backend in backends.items():
                run = time_run(backend, ids, mask, opts.output, "detail")
                runs.setdefault((name, batch), []).append(run)
                print(f"round {r} {name:8s} bs{batch}: first {run.first_token_ms:9.1f} ms, next "
                      f"{run.next_token_ms:8.1f} ms", flush=True)
    if opts.profile:
        profile_decode(loaded, opts, make_inputs, BenchCase)
    names = list(backends)
    del backends, loaded, model
    gc.collect()  # transformers' hooks hold the model in reference cycles
    peaks.append(probe_bandwidth(device, dtype))
    peak = max(peaks, key=lambda p: p.value)
    flops = max(flops, probe_flops(device, dtype), key=lambda p: p.value)  # the best of before and after too
    print(f"# probe after: {peaks[1].value / 1e9:.2f} GB/s; MBU against the best: {peak.value / 1e9:.2f} GB/s "
          f"({peak.source})\n")

    print("| backend | batch | first token (ms) | next token (ms) | GB/s | MBU | TFLOP/s | MFU |")
    print("|---|---|---|---|---|---|---|---|")
    medians = {}
    for (name, batch), rs in runs.items():
        first = statistics.median(r.first_token_ms for r in rs)
        nxt = statistics.median(r.next_token_ms for r in rs)
        medians[name, batch] = (first, nxt)
        fig = roofline_figures(args, batch, opts.input, opts.output, dtype, first, nxt, peak, flops)
        print(f"| {name} | {batch} | {first:.1f} | {nxt:.1f} | {fig['achieved_bandwidth(GB/s)']:.2f} | "
              f"{fig['MBU']:.3f} | {fig['achieved_TFLOP/s']:.3f} | {fig['MFU']:.3f} |")
    if "hf" in names:
        print()
        for batch in opts.batches:
            (f_n, n_n), (f_h, n_h) = medians["npuinfer", batch], medians["hf", batch]
            print(f"bs{batch}: next-token npuinfer / transformers {n_n / n_h:.3f} (goal <= 0.9); first-token "
                  f"{f_n / f_h:.3f} (goal <= 0.4)")
    return 0


def shapes(opts):
    from npuinfer import dummy
    from npuinfer.registry import get_spec

    spec = get_spec(opts.model)
    args = dummy.registry_args(spec)
    if opts.layers or opts.vocab:
        args = args.with_(n_layers=opts.layers or args.n_layers, vocab_size=opts.vocab or args.vocab_size)
    return spec, args


def worker(opts) -> int:
    """A --separate child: builds the dummy model (seed 0), runs ``opts.worker`` on it, one warm-up (2 new tokens)
    and one timed generate per batch with round ``opts.round``'s inputs, and reports them (in_turn.report)."""

    from npuinfer import dummy
    from npuinfer.runtime import LoadedModel
    from npuinfer.tiny import ensure_tiny
    from npuinfer.backends.npuinfer import NpuinferBackend
    from npuinfer.timing import make_inputs, time_run
    from npuinfer.tokenizer import load_tokenizer

    device, dtype = get_device("cpu"), parse_dtype(opts.dtype)
    spec, args = shapes(opts)
    dummy.check_fits(args, dtype, device, None, opts.model)
    start = time.perf_counter()
    model = dummy.build_dummy_model(args, device, dtype, seed=0)
    tok_dir = ensure_tiny(spec.stand_in or spec.name)
    loaded = LoadedModel(opts.model, args.family, tok_dir, args, model, load_tokenizer(tok_dir, args.family), device,
                         dtype, dummy_seed=0)
    if opts.worker == "npuinfer":
        model.resolve_kernels(opts.kernels)  # checked and (linears) prepacked now, not inside a timed run
        backend = NpuinferBackend(loaded)
    else:
        from npuinfer.backends.hf_model import HFBackend

        backend = HFBackend.sharing(loaded)
    built = time.perf_counter() - start
    runs = []
    for batch in opts.batches:
        ids, mask = make_inputs(device, args.vocab_size, batch, opts.input, seed=opts.round)
        backend.generate(ids, mask, 2)  # warm-up: kernel selection, first touch of the cache
        run = time_run(backend, ids, mask, opts.output, "detail")
        runs.append({"batch": batch, "first_token_ms": run.first_token_ms, "next_token_ms": run.next_token_ms})
    report({"backend": opts.worker, "round": opts.round, "built_s": built, "runs": runs})
    return 0


def child_argv(argv: list[str]) -> list[str]:
    """The parent's options for a child, less --separate."""
    return [a for a in argv if a != "--separate"]


def separate(opts, argv: list[str]) -> int:
    """--separate: the two backends in processes of their own, taking turns (npuinfer, hf, hf, npuinfer, ...);
    the probes run here, with no model in memory, before and after; a ratio per pair and the medians."""
    device, dtype = get_device("cpu"), parse_dtype(opts.dtype)
    spec, args = shapes(opts)
    peaks = [probe_bandwidth(device, dtype)]
    flops = [probe_flops(device, dtype)]
    print(f"# {opts.model}: {args.num_parameters() / 1e9:.2f}B parameters ({args.n_layers} layers, vocab "
          f"{args.vocab_size}), dummy {opts.dtype}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"each backend in its own process\n# probe before: {peaks[0].value / 1e9:.2f} GB/s ({peaks[0].source}); "
          f"{flops[0].value / 1e12:.3f} TFLOP/s ({flops[0].source})", flush=True)
    results: dict[tuple[str, int], list[dict]] = {}
    for turn, (r, name) in enumerate(turns(("npuinfer", "hf"), opts.rounds)):  # the order swapped each round
        cmd = [sys.executable, __file__, *child_argv(argv), "--worker", name, "--round", str(r)]
        child = run_turn(cmd, f"round {r} {name}")
        for run in child["runs"]:
            results.setdefault((name, run["batch"]), []).append(run)
            print(f"round {r} {name:8s} bs{run['batch']}: first {run['first_token_ms']:11.3f} ms, next "
                  f"{run['next_token_ms']:10.3f} ms (built in {child['built_s']:.1f} s)", flush=True)
        if turn % 2:  # the round's second process: its pair is complete
            for batch in opts.batches:
                n, h = results["npuinfer", batch][r], results["hf", batch][r]
                print(f"pair {r} bs{batch}: next-token npuinfer / transformers "
                      f"{n['next_token_ms'] / h['next_token_ms']:.3f}, first-token "
                      f"{n['first_token_ms'] / h['first_token_ms']:.3f}", flush=True)
    peaks.append(probe_bandwidth(device, dtype))
    flops.append(probe_flops(device, dtype))
    peak, flop = max(peaks, key=lambda p: p.value), max(flops, key=lambda p: p.value)
    print(f"# probe after: {peaks[1].value / 1e9:.2f} GB/s, {flops[1].value / 1e12:.3f} TFLOP/s; MBU / MFU against "
          f"the best: {peak.value / 1e9:.2f} GB/s ({peak.source}), {flop.value / 1e12:.3f} TFLOP/s\n")
    print("| backend | batch | first token (ms) | next token (ms) | GB/s | MBU | TFLOP/s | MFU |")
    print("|---|---|---|---|---|---|---|---|")
    for (name, batch), runs in results.items():
        first = statistics.median(r["first_token_ms"] for r in runs)
        nxt = statistics.median(r["next_token_ms"] for r in runs)
        fig = roofline_figures(args, batch, opts.input, opts.output, dtype, first, nxt, peak, flop)
        print(f"| {name} | {batch} | {first:.1f} | {nxt:.1f} | {fig['achieved_bandwidth(GB/s)']:.2f} | "
              f"{fig['MBU']:.3f} | {fig['achieved_TFLOP/s']:.3f} | {fig['MFU']:.3f} |")
    print()
    for batch in opts.batches:
        ratios = [n["next_token_ms"] / h["next_token_ms"]
                  for n, h in zip(results["npuinfer", batch], results["hf", batch])]
        firsts = [n["first_token_ms"] / h["first_token_ms"]
                  for n, h in zip(results["npuinfer", batch], results["hf", batch])]
        print(f"bs{batch}: next-token npuinfer / transformers, median of {len(ratios)} pairs "
              f"{statistics.median(ratios):.3f} (goal <= 0.9); first-token {statistics.median(firsts):.3f} "
              "(goal <= 0.4)")
    return 0


def profile_decode(loaded, opts, make_inputs, BenchCase) -> None:
    from torch.profiler import profile

    from npuinfer.generate import decode_one_token, prefill

    model, device = loaded.model, loaded.device
    batch = opts.batches[0]
    ids, _ = make_inputs(device, loaded.args.vocab_size, batch, opts.input, seed=0)
    model.setup_caches(batch, opts.input + 2)
    with torch.inference_mode():
        token = prefill(model, ids, None).argmax(-1).view(batch, 1)
        with profile(activities=device.profiler_activities()) as prof:
            decode_one_token(model, token, opts.input, None)
    print(f"\n# one npuinfer decode step, batch {batch}")
    print(prof.key_averages().table(sort_by=device.profiler_sort_key, row_limit=15))


if __name__ == "__main__":
    sys.exit(main())
