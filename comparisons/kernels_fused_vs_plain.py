"""--kernels fused vs plain on one model, side by side: prefill and decode-step times at each batch size,
the two kernel sets interleaved (fused, plain, fused, plain, ...) so a shared machine's drift hits both.

    python comparisons/kernels_fused_vs_plain.py --model qwen-tiny            # a tiny checkpoint, fp32
    python comparisons/kernels_fused_vs_plain.py --random qwen-7b --dtype bf16 \
        --input-len 32 --steps 3 --pairs 2                                    # Qwen-7B sizes, random weights

``--random NAME`` builds the registry model's dimensions (ModelSpec) with random weights in memory (nothing
is written; 14.4 GiB for qwen-7b in bf16), so the real sizes need no checkpoint.

Figures: docs/MEASUREMENTS.md#kernels-fused-vs-plain
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch


def random_model(name: str, dtype: torch.dtype, max_seq_len: int):
    from npuinfer.model import ModelArgs, Transformer
    from npuinfer.registry import get_spec

    spec = get_spec(name)
    family = spec.family
    intermediate = spec.intermediate_size // 2 if family == "qwen" else spec.intermediate_size  # qwen: both branches
    args = ModelArgs(family=family, vocab_size=spec.vocab_size, dim=spec.hidden_size, n_layers=spec.num_layers,
                     n_heads=spec.num_heads, head_dim=spec.hidden_size // spec.num_heads,
                     intermediate_size=intermediate, max_seq_len=max_seq_len, position=spec.position,
                     qkv_bias=family == "qwen")
    with torch.device("meta"):
        model = Transformer(args)
    model = model.to_empty(device="cpu").to(dtype)  # no fp32 copy first: 7B in fp32 would not fit
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=gen, dtype=torch.float32).mul_(0.02).to(dtype)
                        if param.dim() > 1 else torch.ones(param.shape, dtype=dtype))
    return model.eval().requires_grad_(False), args


@torch.inference_mode()
def one_run(model, batch: int, input_len: int, steps: int) -> tuple[float, float]:
    """(prefill s, median decode-step s) of a left-padded batch (row 0 one token shorter when batch > 1)."""
    from npuinfer.generate import seq_state
    from npuinfer.model import LAST_POSITION

    ids = torch.randint(3, 1000, (batch, input_len), generator=torch.Generator().manual_seed(batch))
    mask = torch.ones(batch, input_len, dtype=torch.long)
    if batch > 1:
        mask[0, 0] = 0
    total = input_len + steps + 1
    model.setup_caches(batch, total)
    state = seq_state(mask, total) if batch > 1 else None
    start = time.perf_counter()
    logits = model(ids, 0, state, logits_at=LAST_POSITION)
    prefill = time.perf_counter() - start
    token = logits[:, -1].argmax(-1, keepdim=True)
    step_times = []
    for step in range(steps):
        start = time.perf_counter()
        token = model(token, input_len + step, state)[:, -1].argmax(-1, keepdim=True)
        step_times.append(time.perf_counter() - start)
    return prefill, statistics.median(step_times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen-tiny", help="a checkpoint from the registry (tiny ones build)")
    parser.add_argument("--random", default=None, metavar="NAME", help="registry dimensions, random weights")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--input-len", type=int, default=64)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--pairs", type=int, default=5, help="fused/plain pairs per batch size")
    args = parser.parse_args()

    from npuinfer.device import parse_dtype
    from npuinfer.kernels import kernels_for

    dtype = parse_dtype(args.dtype)
    if args.random:
        model, model_args = random_model(args.random, dtype, args.input_len + args.steps + 1)
        what = f"{args.random} dimensions, random weights"
    else:
        from npuinfer.runtime import load_model

        loaded = load_model(args.model, device="cpu", dtype=args.dtype)
        model, model_args, what = loaded.model, loaded.args, args.model
    sets = {mode: kernels_for(model_args, "cpu", dtype, mode) for mode in ("fused", "plain")}
    print(f"{what}, {args.dtype}, cpu ({torch.get_num_threads()} threads), input {args.input_len}, "
          f"{args.steps} decode steps; fused = {sets['fused'].describe()}")
    print(f"{'batch':>5} {'pair':>4} {'prefill fused':>14} {'prefill plain':>14} {'plain/fused':>11} "
          f"{'step fused':>11} {'step plain':>11} {'plain/fused':>11}")
    for batch in [int(b) for b in args.batches.split(",")]:
        model.use_kernels(sets["fused"])
        one_run(model, batch, args.input_len, 1)  # warm-up: cache allocation, first calls
        prefill_ratios, step_ratios = [], []
        for pair in range(args.pairs):
            times = {}
            for mode in (("fused", "plain") if pair % 2 == 0 else ("plain", "fused")):
                model.use_kernels(sets[mode])
                times[mode] = one_run(model, batch, args.input_len, args.steps)
            (pf, sf), (pp, sp) = times["fused"], times["plain"]
            prefill_ratios.append(pp / pf)
            step_ratios.append(sp / sf)
            print(f"{batch:>5} {pair:>4} {pf * 1e3:>11.1f} ms {pp * 1e3:>11.1f} ms {pp / pf:>10.2f}x "
                  f"{sf * 1e3:>8.2f} ms {sp * 1e3:>8.2f} ms {sp / sf:>10.2f}x")
        print(f"{batch:>5} median plain/fused: prefill {statistics.median(prefill_ratios):.2f}x, "
              f"decode step {statistics.median(step_ratios):.2f}x")


if __name__ == "__main__":
    main()
