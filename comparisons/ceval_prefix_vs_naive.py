"""C-Eval scoring, prefix-cached vs naive full prompts: wall time and prompt tokens on the whole val split.

    python comparisons/ceval_prefix_vs_naive.py                       # qwen-tiny, synthetic val (1346 q), 5-shot
    python comparisons/ceval_prefix_vs_naive.py --model internlm-tiny --batch-size 16 --json out.json
    python comparisons/ceval_prefix_vs_naive.py --ceval-dir /data/ceval --model qwen-7b --device npu:0

Without --ceval-dir the data is written by npuinfer.ceval.synth with the official question counts (52 subjects,
1346 val questions, 5 dev rows each). Both modes score the same questions at the same batch size; the script
checks that they predict the same letters and reports the largest log-probability difference.

Measured on a shared 2-core cpu VM (2026-11-30, after the shared head was tokenized once per subject; full val,
5-shot, fp32, 5 alternating runs per mode, median; "pairs" is the range of naive/prefix over the 5 runs in order):

| model | threads | batch | naive s | prefix s | time ratio | pairs | tokens ratio |
|---|---|---|---|---|---|---|---|
| qwen-tiny | 2 | 8 | 9.06 | 1.99 | 4.55 | 4.33-4.85 | 5.29 |
| qwen-tiny | 1 | 8 | 10.30 | 2.36 | 4.36 | 4.19-4.54 | 5.29 |
| qwen-tiny | 2 | 32 | 6.97 | 1.43 | 4.86 | 3.57-5.07 | 5.29 |
| gpt-neox-tiny | 2 | 8 | 8.85 | 2.17 | 4.08 | 4.01-4.23 | 5.30 |
| baichuan2-13b-tiny (ALiBi) | 2 | 8 | 7.23 | 1.76 | 4.12 | 4.04-5.00 | 5.30 |
| internlm-tiny | 2 | 8 | 8.05 | 2.17 | 3.71 | 3.64-3.77 | 5.32 |
| baichuan2-7b-tiny | 2 | 8 | 7.61 | 2.09 | 3.65 | 3.43-3.84 | 5.30 |
| qwen-tiny widened to 512x4 (`--widen 512x4`) | 2 | 8 | 145.13 | 28.30 | 5.13 | 1 run | 5.29 |

Identical predictions in every run; log-probabilities within 3e-6. The same configuration reads 3.4x-4.7x from one
quarter of an hour to the next on this machine, so compare modes only within one run. On a model this small the
attention over the ~530-token prefix (every question reads all of it) is over half of the prefix mode's time, so the
time ratio stays below the token ratio; once the model's matmuls dominate (the widened row) it approaches it. The
sentencepiece models (internlm, baichuan2-7b) also pay five whole encodings per question in both modes (the shortcuts
in npuinfer/ceval/encoding.py need a tokenizer that splits after newlines).

A Qwen-sized vocabulary (`--vocab 151936`: qwen-tiny's ranks padded with synthetic ones, 151,936 head rows), 2026-12-01,
full val, 5-shot, batch 8, 1 thread, before (main, `--model-path` to the same checkpoint) and after the head was given
only the positions a continuation reads; both processes ran side by side on the shared 2-core VM at load 4-12, so
absolute times are several times a quiet machine's and only same-run figures compare:

| code | naive s | prefix s | time ratio | peak RSS of the process |
|---|---|---|---|---|
| before (the quietest pair, load ~4) | 77.7 | 21.9 | 3.56 | 0.82 GiB |
| after (same pair) | 50.3 | 18.6 | 2.71 | 0.46 GiB |
| before | 130.7 | 31.5 | 4.15 | 0.75 GiB |
| after | 72.6 | 32.5 | 2.24 | 0.45 GiB |
| before (an earlier pair, load ~12) | 237.1 | 65.1 | 3.64 | 0.76 GiB |
| after (same pair) | 128.8 | 65.3 | 1.97 | 0.46 GiB |

Positions through the head on 6 subjects (152 questions): before 2,124 (prefix) and 3,418 (naive), after 304 in both
(two per question: the tiny tokenizer splits " D" in two). Naive scoring got 1.5-1.8x faster; prefix scoring
1.0-1.2x: its remaining vocabulary cost is per forward (reading the 39 MB head and a log-softmax over
151,936 entries for each read position, 326 forwards against naive's 191), so the ratio fell. Identical predictions.

Then the head was applied once to the read positions of several batches (every ~128 positions and at the end of
a subject: 52 passes in prefix mode instead of 274), as each token's logit less a log-sum-exp reduced over
the vocabulary in 4,096-row chunks while they are in cache (`Transformer.head_logprobs`; no [rows, reads, vocab]
tensor, no log_softmax over it). 2026-12-01, same settings (`--vocab 151936 --threads 1`, batch 8), `--repeat 2`
(naive and prefix alternating within the process), after (this code) and before (7fbc8f7) alternating as whole
processes, load average 5-6 on the 2-core VM for the first four (other sessions' jobs), 1-3 for the last four, so
again only same-process figures compare:

| code | naive s (runs) | prefix s (runs) | naive/prefix, each pair | median ratio | peak RSS |
|---|---|---|---|---|---|
| after | 36.05, 34.29 | 9.53, 8.89 | 3.78, 3.86 | 3.78 | 0.47 GiB |
| before | 35.26, 31.42 | 13.42, 13.42 | 2.63, 2.34 | 2.63 | 0.47 GiB |
| after | 30.54, 30.91 | 8.07, 8.42 | 3.79, 3.67 | 3.67 | 0.46 GiB |
| before | 27.02, 30.43 | 7.67, 12.25 | 3.52, 2.48 | 2.48 | 0.46 GiB |
| after (`--repeat 3`, load 4.3 falling to 3.5) | 23.29, 18.25, 14.91 | 5.66, 5.45, 5.84 | 4.12, 3.35, 2.56 | 3.22 | 0.47 GiB |
| before (1 run, load 2.4) | 20.95 | 7.67 | 2.73 | 2.73 | 0.46 GiB |
| after (load 0.8-1.1) | 14.83, 14.34 | 3.82, 3.77 | 3.88, 3.80 | 3.88 | 0.47 GiB |
| before (load 1.1-2.2) | 16.32, 16.52 | 6.69, 5.82 | 2.44, 2.84 | 2.47 | 0.46 GiB |
| after (load 2.1-2.6) | 13.24, 13.52 | 5.02, 3.84 | 2.64, 3.52 | 2.69 | 0.46 GiB |
| before (load 2.6-2.8) | 13.88, 13.07 | 5.81, 5.44 | 2.39, 2.40 | 2.39 | 0.47 GiB |

Prefix scoring got ~1.5x faster (at load 5-6 12.8 s -> 8.7 s by the medians, at load 1-3 5.4-6.7 s -> 3.8-5.0 s;
single runs of either code catch lulls and spikes), naive about the same (its head ran on 16 positions a batch
already): the ratio per pair is 2.6-4.1 (7 of 11 pairs 3.5-3.9, one 4.12) against 2.3-3.5 before, not the 4x asked
for. Identical predictions, log-probabilities within 3e-6. Profiled (cProfile, 1 thread): the head now takes 2,692
positions x (0.22 ms matmul + 0.13 ms normaliser) on a quiet core, ~0.95 s (1.9-2.8 s at load 4-5), in both modes
alike, as does tokenization (~0.3 s); the rest of prefix scoring is its forwards (attention of every question token
over the ~530-token prefix is half of them, the 52 prefix runs ~10%, ~1.2 ms fixed cost a forward). With the
tiny-vocabulary figures above (naive 10.3 s, prefix 2.36 s), a cost S added to both modes gives (10.3 + S) / (2.36 +
S), >= 4 only for S <= 0.3 s; the exact fp32 head alone (151,936 x 64 x 2,692 = 26 G multiply-adds) is over that on
one core, so 4x on this configuration needs the prefix mode's own forwards cheaper still. Peak RSS is unchanged
(0.46-0.47 GiB; the head's chunks are at most [~130, 4096] fp32).

Those 2,692 read positions were two per question only because qwen-tiny's tiny BPE splits the continuation " D"
into " " + "D" (" A", " B", " C" are single tokens there). Qwen's real vocabulary (qwen.tiktoken, cl100k-derived)
has all four as single tokens (cl100k/Llama-3 ids 362, 426, 356, 423; Qwen2.5, whose ranks are Qwen-7B's: 362,
425, 356, 422), so lm-eval reads one position per question there. `--vocab` now gives the synthetic vocabulary
those tokens (`ANSWER_TOKENS`, the first ranks after qwen-tiny's; tiktoken merges any adjacent pair whose
concatenation is a rank, so prompts change only where " " + "D" meet: the shots answered D, each choice, and " D"
starting a word, which the synthetic text never has; tests/test_ceval_vocab_bench.py checks both). That halves the
head's read positions: 1,346 in each mode instead of 2,692 (52 passes each, one per subject). 2026-12-01, full
val, 5-shot, batch 8, `--threads 1 --repeat 2`, this code with `--model-path` to two kept checkpoints built by
`--vocab 151936 --vocab-dir DIR --build-only` (this code, and the one before it), alternating as whole processes;
another session's benchmarks held one core (load average at each process's start-end in the table), so naive
runs of one process vary by up to 20%. Process cpu seconds per run; peak RSS lower than above because no process
built its checkpoint:

| answers | load | naive cpu s | prefix cpu s | cpu ratio, each pair | wall ratio, each pair | peak RSS |
|---|---|---|---|---|---|---|
| single-token | 0.8-1.5 | 17.19, 18.74 | 4.68, 5.30 | 3.67, 3.54 | 3.68, 3.59 | 0.39 GiB |
| two-token " D" | 1.4-1.7 | 16.84, 18.27 | 5.70, 5.49 | 2.96, 3.33 | 2.95, 3.31 | 0.40 GiB |
| single-token | 1.1-1.6 | 17.45, 16.34 | 5.16, 5.09 | 3.38, 3.21 | 3.35, 3.21 | 0.39 GiB |
| two-token " D" | 1.6-1.9 | 20.87, 18.44 | 5.44, 4.86 | 3.84, 3.80 | 3.86, 3.82 | 0.39 GiB |
| single-token | 1.9 | 16.87, 16.04 | 4.00, 4.91 | 4.22, 3.27 | 4.22, 3.22 | 0.39 GiB |
| two-token " D" | 1.9 | 21.82, 19.13 | 5.87, 5.51 | 3.72, 3.47 | 3.99, 3.49 | 0.39 GiB |
| single-token | 1.9-1.5 | 17.49, 14.90 | 4.71, 4.52 | 3.71, 3.30 | 3.77, 3.31 | 0.38 GiB |
| two-token " D" | 1.5-1.4 | 19.59, 20.10 | 5.47, 5.64 | 3.58, 3.56 | 3.52, 3.57 | 0.40 GiB |
| two-token " D" | 2.9-3.6 | 13.77, 15.85 | 4.12, 5.28 | 3.34, 3.00 | 3.31, 2.95 | 0.40 GiB |
| single-token | 3.6-2.9 | 16.98, 20.56 | 5.39, 5.11 | 3.15, 4.02 | 3.25, 4.24 | 0.39 GiB |
| two-token " D" | 2.9-2.8 | 17.16, 16.64 | 5.55, 4.40 | 3.09, 3.78 | 3.01, 3.90 | 0.39 GiB |
| single-token | 2.8-2.9 | 16.51, 17.91 | 4.28, 4.90 | 3.86, 3.66 | 3.89, 3.51 | 0.39 GiB |
| two-token " D" | 2.9 | 21.54, 19.15 | 5.74, 4.41 | 3.75, 4.35 | 3.76, 4.46 | 0.40 GiB |
| single-token | 2.9-1.9 | 19.84, 18.55 | 5.21, 4.17 | 3.81, 4.45 | 3.93, 4.56 | 0.39 GiB |
| single-token | 0.9-1.0 | 16.73, 18.19 | 5.26, 4.94 | 3.18, 3.68 | 3.12, 3.71 | 0.38 GiB |
| two-token " D" | 1.0 | 17.55, 19.20 | 4.72, 5.30 | 3.72, 3.62 | 3.72, 3.75 | 0.40 GiB |
| single-token | 1.0 | 15.37, 17.96 | 5.03, 5.14 | 3.06, 3.49 | 3.05, 3.47 | 0.39 GiB |
| two-token " D" | 1.0 | 17.44, 19.08 | 4.86, 5.49 | 3.59, 3.47 | 3.58, 3.48 | 0.39 GiB |

Identical predictions between modes in every process; max |log-prob difference| 1.9e-6 (single-token), 2.9e-6
(two-token). Medians over the 18 runs each: prefix 4.99 cpu s single-token against 5.46 two-token (-0.47 s: 1,346
positions at ~0.4 ms of head each), naive 17.32 against 18.76 (its head lost the same positions; the rest of its
-1.44 s is this machine's noise); the cpu ratio per pair 3.06-4.45, median 3.60, three of 18 pairs >= 4, against
2.96-4.35, median 3.58, one of 18. The default command (2 threads, one process, load 1.5-1.7) read 2.66 and 3.37.
So 4x is not reached, and the ratio did not measurably move: taking ~0.5 s off both modes should raise it by ~0.25
at these times, less than the pair-to-pair noise here (+-0.5). Profiled at 1 thread (cProfile, prefix mode, 4.3 s):
the flash calls 1.58 s (the folded prefix call runs at ~1 ns per query-key pair at head_dim 16 whatever the shape;
the causal call over each row's own ~100 tokens takes 0.59 s, ~4x that per pair, its 32-query blocks dominated by
per-block cost; neither the math path nor contiguous inputs nor per-row calls were faster), the head 0.64 s (~26
positions a pass: the fp32 matmul 10.5 ms a pass at ~48 GFLOP/s, oneDNN's prepacked fp32 no faster; the normaliser
2-4 ms a pass, of which fewer passes over the logits saved 1-2 ms, ~0.07 s a run, not pursued), tokenization ~0.2
s, and ~1.3 ms fixed per forward (326 forwards against naive's 191). What would reach 4x here is a cheaper
attention kernel for the prefix mode's short causal calls, not the common costs.

The same checkpoint on the quiet machine (2026-12-01 23:06-23:08, load 0.5-1.5, nothing else running), one process
each, `--model-path` to the single-token build:

| threads | batch | naive s (runs) | prefix s (runs) | wall ratio, each pair | cpu ratio, each pair | peak RSS |
|---|---|---|---|---|---|---|
| 1 | 8 | 20.30, 16.22 | 5.34, 3.69 | 3.80, 4.40 | 3.61, 4.37 | 0.39 GiB |
| 1 | 32 | 17.75, 17.02 | 4.29, 3.95 | 4.13, 4.31 | 4.14, 4.31 | 0.51 GiB |
| 2 (the default) | 8 | 11.76, 11.26, 10.99 | 3.69, 3.29, 2.95 | 3.19, 3.43, 3.72 | 3.23, 3.43, 3.74 | 0.38 GiB |

Quiet, one thread reads about 4 (3.8-4.4 at batch 8, 4.1-4.3 at batch 32); with two threads naive's large forwards
use the second core better than prefix mode's small ones, and the ratio is 3.2-3.7.

Which machine: the first table (qwen-tiny 4.4-4.9, the figures #16's 4x was set from) was measured on 2026-11-30,
most likely on the AMD EPYC VM this project's sessions ran on that day (the cpu baselines' rows of that day are AMD
EPYC ones); every later figure is from the Intel Xeon VM (model 207). The same 1,200-entry qwen-tiny reads lower
there. 2026-12-02 02:58-03:01, 2 threads, batch 8, `--repeat 2`, the two builds alternating as whole processes (load
0.6-1.7):

| build | wall ratio, each pair | median |
|---|---|---|
| qwen-tiny (1,200 entries) | 3.55, 3.70, 2.92, 3.14, 4.47, 3.77 | 3.6 |
| `--vocab 151936` (single-token answers) | 2.66, 2.97, 2.49, 3.69, 2.96, 3.30 | 3.0 |

At one thread (03:11-03:15, three processes, `--repeat 3`, load 0.7-1.0) the 151,936-entry build read 3.15, 3.26,
3.77, 2.90, 4.01, 3.47, 3.49, 3.58, 3.89 (median 3.5). Timed apart under cProfile in one process (2 threads, three
rounds), the head took 0.55-0.61 s a run in either mode and the rest outside the forwards 0.47-0.56 s; the
forwards alone (question batches, and prefix mode's 52 prefix runs at 0.47-0.69 s) read 3.56, 3.13, 3.22 naive over
prefix. So on this CPU even a head and a tokenizer that cost nothing would leave the ratio under 4 at two threads.
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
    from npuinfer.ceval import load_split
    from npuinfer.ceval.scoring import ScoringStats, score_subject

    stats = ScoringStats()
    out = {}
    loaded.device.synchronize()
    t0, c0 = time.perf_counter(), time.process_time()
    for subject in subjects:
        dev = load_split(data_dir, subject, "dev")
        val = load_split(data_dir, subject, "val")
        for s in score_subject(loaded, subject, dev, val, "lmeval", shots, mode, batch_size, stats=stats):
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
