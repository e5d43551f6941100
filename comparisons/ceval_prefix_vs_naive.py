"""C-Eval scoring, prefix-cached vs naive full prompts: wall time and prompt tokens on the whole val split.

    python comparisons/ceval_prefix_vs_naive.py                       # qwen-tiny, synthetic val (1346 q), 5-shot
    python comparisons/ceval_prefix_vs_naive.py --model internlm-tiny --batch-size 16 --json out.json
    python comparisons/ceval_prefix_vs_naive.py --ceval-dir CEVAL_DIR --model qwen-7b --device npu:0
    python comparisons/ceval_prefix_vs_naive.py --vocab 151936 --threads 1 --repeat 2   # Qwen-7B's vocabulary size

Without --ceval-dir the data is written by npuinfer.ceval.synth with the official question counts (52 subjects,
1346 val questions, 5 dev rows each). Both modes score the same questions at the same batch size; the script
checks that they predict the same letters and reports the largest log-probability difference.

Figures, by machine and day: docs/MEASUREMENTS.md#c-eval-scoring-prefix-cached-vs-naive
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def peak_rss_bytes() -> int:
    """The process's peak resident set so far (ru_maxrss: KiB on Linux, bytes on macOS)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def score_all(loaded, data_dir: Path, subjects, mode: str, shots: int, batch_size: int):
    from npuinfer.backends.npuinfer import NpuinferBackend
    from npuinfer.ceval import load_split
    from npuinfer.ceval.scoring import ScoringStats, score_subject

    stats = ScoringStats()
    out = {}
    loaded.device.synchronize()
    t0, c0 = time.perf_counter(), time.process_time()
    for subject in subjects:
        dev = load_split(data_dir, subject, "dev")
        val = load_split(data_dir, subject, "val")
        for s in score_subject(NpuinferBackend(loaded), subject, dev, val, "lmeval", shots, mode, batch_size,
                               stats=stats):
            out[s.row.key] = s
    loaded.device.synchronize()
    # cpu time of the process (all its threads) besides wall time: on a shared machine it leaves out the time
    # other work held the cores, which wall time does not
    return out, stats, time.perf_counter() - t0, time.process_time() - c0


# The continuations of the lmeval (and atb) template as the tokens a real Qwen / cl100k vocabulary has them.
ANSWER_TOKENS = (b" A", b" B", b" C", b" D")


def qwen_tiny_with_vocab(vocab: int, dest: Path) -> Path:
    """qwen-tiny with a ``vocab``-entry vocabulary (e.g. Qwen-7B's 151,936) in ``dest``: its qwen.tiktoken padded
    with synthetic ranks to ``vocab`` less Qwen's special tokens (numbered after the ranks), and random rows
    added to the embedding and the head.

    The first synthetic ranks are the answer continuations (" A" .. " D", ANSWER_TOKENS) that qwen-tiny lacks:
    the real Qwen vocabulary (cl100k-derived) has each as one token, so lm-eval reads one position per question,
    where qwen-tiny splits " D" into " " + "D" and every question then reads two (which doubled the head's work
    on this wide vocabulary). tiktoken merges any adjacent pair whose concatenation is a rank, so these ranks
    change the tokenization only where such a pair occurs (the answers of the shots and of each choice, and a
    " D" starting a word). Every other synthetic rank holds a NUL byte, which C-Eval text never does, so no BPE
    merge reaches it."""
    import base64
    import itertools
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from npuinfer.tiny import ensure_tiny
    from npuinfer.tokenizer import QWEN_SPECIAL_TOKENS, read_tiktoken_ranks

    src = ensure_tiny("qwen-tiny")
    dest.mkdir(parents=True, exist_ok=True)
    ranks = read_tiktoken_ranks(src / "qwen.tiktoken")
    n_ranks = vocab - len(QWEN_SPECIAL_TOKENS)
    if n_ranks < len(ranks):
        raise SystemExit(f"--vocab {vocab}: below qwen-tiny's {len(ranks) + len(QWEN_SPECIAL_TOKENS)} ids")
    lines = [f"{base64.b64encode(tok).decode()} {rank}" for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1])]
    added = [tok for tok in ANSWER_TOKENS if tok not in ranks]
    filler = (t for t in (b"\x00" + i.to_bytes(3, "big") for i in range(1 << 24)) if t not in ranks)
    synthetic = itertools.chain(added, filler)
    if n_ranks < len(ranks) + len(added):
        raise SystemExit(f"--vocab {vocab}: no room for the answer tokens {added}")
    for rank in range(len(ranks), n_ranks):
        lines.append(f"{base64.b64encode(next(synthetic)).decode()} {rank}")
    (dest / "qwen.tiktoken").write_text("\n".join(lines) + "\n")
    config = json.loads((src / "config.json").read_text())
    config["vocab_size"] = vocab
    (dest / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for name in ("tokenizer_config.json", "generation_config.json"):
        shutil.copy(src / name, dest / name)
    gen = torch.Generator().manual_seed(0)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    total = 0
    for shard in sorted(set(index["weight_map"].values())):
        tensors = load_file(src / shard)
        for name in ("transformer.wte.weight", "lm_head.weight"):
            if name in tensors:
                old = tensors[name]
                extra = torch.randn(vocab - old.shape[0], old.shape[1], generator=gen, dtype=old.dtype) * 0.02
                tensors[name] = torch.cat([old, extra]).contiguous()
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        save_file(tensors, dest / shard, metadata={"format": "pt"})
    index["metadata"]["total_size"] = total
    (dest / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return dest


def widen(loaded, dim: int, layers: int):
    """The same tokenizer and family with a wider, deeper random decoder: a model whose forward dominates."""
    import dataclasses

    import torch

    from npuinfer.model import Transformer

    heads = dim // 64
    args = loaded.args.with_(dim=dim, n_layers=layers, n_heads=heads, head_dim=64, intermediate_size=dim * 11 // 4,
                             rotary_dim=None)
    torch.manual_seed(0)
    model = Transformer(args).to(device=loaded.device.torch_device, dtype=loaded.dtype).eval().requires_grad_(False)
    return dataclasses.replace(loaded, name=f"{loaded.name} widened to {dim}x{layers} (random)", args=args,
                               model=model)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="qwen-tiny")
    parser.add_argument("--model-path", default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    parser.add_argument("--ceval-dir", default=None, help="official layout; default: synthetic, official counts")
    parser.add_argument("--shot", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads on cpu")
    parser.add_argument("--repeat", type=int, default=1,
                        help="timed runs per mode, alternating naive and prefix; the median is reported")
    parser.add_argument("--widen", default=None, metavar="DIMxLAYERS",
                        help="replace the decoder by a random one of this size (e.g. 512x4), same tokenizer")
    parser.add_argument("--vocab", type=int, default=None, metavar="N",
                        help="qwen-tiny with an N-entry vocabulary (synthetic ranks, among them single-token "
                             "' A'..' D' as Qwen's own; random head rows), built in a temporary directory (or "
                             "--vocab-dir): e.g. 151936, Qwen-7B's")
    parser.add_argument("--vocab-dir", default=None, help="where --vocab builds (and keeps) its checkpoint")
    parser.add_argument("--build-only", action="store_true", help="with --vocab: build the checkpoint and exit")
    parser.add_argument("--json", default=None, help="write the figures here")
    args = parser.parse_args(argv)

    import torch

    from npuinfer.ceval import available_subjects, load_split
    from npuinfer.ceval.synth import write_synthetic_ceval
    from npuinfer.runtime import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    tmp = tempfile.TemporaryDirectory()
    if args.vocab:
        if args.model != "qwen-tiny" or args.model_path:
            parser.error("--vocab builds from qwen-tiny: leave --model and --model-path out")
        built = qwen_tiny_with_vocab(args.vocab, Path(args.vocab_dir or Path(tmp.name) / "model"))
        print(f"{built}: qwen-tiny with a {args.vocab:,}-entry vocabulary")
        if args.build_only:
            return 0
        args.model, args.model_path = None, str(built)
    if args.ceval_dir is None:
        data_dir = write_synthetic_ceval(Path(tmp.name) / "data")
    else:
        data_dir = Path(args.ceval_dir)
    subjects = available_subjects(data_dir, "val")
    n_questions = sum(len(load_split(data_dir, s, "val")) for s in subjects)
    loaded = load_model(args.model, args.model_path, args.device, args.dtype)
    if args.widen:
        dim, layers = (int(x) for x in args.widen.lower().split("x"))
        loaded = widen(loaded, dim, layers)
    print(f"{loaded.name} on {loaded.device} ({loaded.dtype_name}, {torch.get_num_threads()} cpu threads), "
          f"{len(subjects)} subjects, {n_questions} val questions, {args.shot}-shot, batch {args.batch_size}")

    # Warm-up: one subject in each mode (allocator, kernels), not timed.
    for mode in ("prefix", "naive"):
        score_all(loaded, data_dir, subjects[:1], mode, args.shot, args.batch_size)

    results: dict[str, list] = {"naive": [], "prefix": []}
    for _ in range(args.repeat):
        for mode in ("naive", "prefix"):
            results[mode].append(score_all(loaded, data_dir, subjects, mode, args.shot, args.batch_size))
    cpu_runs = {}
    for mode in ("naive", "prefix"):
        runs = sorted(results[mode], key=lambda r: r[2])
        scores, stats, seconds, _ = runs[len(runs) // 2]  # median wall time (token counts are the same every run)
        cpu_runs[mode] = [r[3] for r in results[mode]]
        results[mode] = (scores, stats, seconds, [r[2] for r in results[mode]])
        print(f"{mode:>6}: {seconds:8.2f} s  prompt tokens {stats.prompt_tokens:>9,}  "
              f"(padded {stats.padded_tokens:,}, prefix {stats.prefix_tokens:,})  forwards {stats.forwards:,}  "
              f"fallbacks {stats.fallbacks}  {stats.questions / seconds:.1f} questions/s  "
              f"(runs: {', '.join(f'{t:.2f}' for t in results[mode][3])} s; "
              f"cpu: {', '.join(f'{t:.2f}' for t in cpu_runs[mode])} s)")

    (pre, ps, pt, p_runs), (nai, ns, nt, n_runs) = results["prefix"], results["naive"]
    assert pre.keys() == nai.keys() and len(pre) == n_questions
    mismatched = sum(pre[k].row.prediction != nai[k].row.prediction for k in pre)
    max_diff = max(abs(a - b) for k in pre for a, b in zip(pre[k].logprobs, nai[k].logprobs))
    figures = {
        "model": loaded.name, "device": str(loaded.device), "dtype": loaded.dtype_name,
        "cpu_threads": torch.get_num_threads(), "questions": n_questions, "shots": args.shot,
        "batch_size": args.batch_size,
        "naive": {"seconds": nt, "runs_s": n_runs, "cpu_runs_s": cpu_runs["naive"], **ns.as_dict()},
        "prefix": {"seconds": pt, "runs_s": p_runs, "cpu_runs_s": cpu_runs["prefix"], **ps.as_dict()},
        "token_ratio": ns.prompt_tokens / ps.prompt_tokens, "time_ratio": nt / pt,
        # each naive run with the prefix run right after it: slow drift of a shared machine cancels in a pair
        "pair_time_ratios": [n / p for n, p in zip(n_runs, p_runs)],
        "pair_cpu_ratios": [n / p for n, p in zip(cpu_runs["naive"], cpu_runs["prefix"])],
        "prediction_mismatches": mismatched, "max_logprob_diff": max_diff,
    }
    for d in (figures["naive"], figures["prefix"]):
        d.pop("shots")
        d.pop("prompt_fit")
    pairs = figures["pair_time_ratios"]
    if len(pairs) > 1:
        print(f"wall time ratio of each naive run to the prefix run after it: "
              f"{', '.join(f'{r:.2f}' for r in pairs)} (min {min(pairs):.2f})")
    print(f"cpu time ratio, each pair: {', '.join(f'{r:.2f}' for r in figures['pair_cpu_ratios'])}")
    print(f"naive / prefix: {figures['token_ratio']:.2f}x prompt tokens, {figures['time_ratio']:.2f}x wall time; "
          f"predictions differing: {mismatched}; max |log-prob difference|: {max_diff:.2e}")
    peak = peak_rss_bytes()
    figures["peak_rss_bytes"] = peak
    print(f"peak RSS of this process (load, warm-up, both modes): {peak / 2**30:.2f} GiB")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    tmp.cleanup()
    return 0 if mismatched == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
