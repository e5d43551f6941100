"""W8 quantization against floating point: logit error on small models, next-token time and peak memory at
real size. Figures are printed, never asserted (a shared machine is noisy).

    python comparisons/quant_vs_float.py error                  # tiny models + a widened qwen: logit error
    python comparisons/quant_vs_float.py layers --layers 4      # real Qwen-7B layers, small vocab, < 3 GiB, interleaved
    python comparisons/quant_vs_float.py speed --dims qwen-7b --dir DIR --write-only   # < 3 GiB of memory: writes
                                                                # 14.4 GiB bf16 + 8 GiB W8A16 random weights to
                                                                # DIR (a new folder on a disk with ~23 GiB free)
    python comparisons/quant_vs_float.py speed --dims qwen-7b --dir DIR    # measure (~15 GB of memory); delete DIR
                                                                # afterwards

error: each model is quantized by `npuinfer quantize` (W8A16; W8A8 calibrated on the guide's five prompts;
W8A8 with SmoothQuant alpha 0.5) and its logits over the five prompts compared with the float model's:
max |dlogit| / max |logit|, and the share of positions whose argmax agrees. Random weights have no outlier
channels, so these are a floor on what a trained model shows, not a prediction.

speed: one random bf16 checkpoint and its W8A16 quantization (written shard by shard, never both in memory);
each is then run in its own process (so its peak RSS is its own), the two alternating for --rounds rounds: prefill
16 tokens, a warm-up step, then --steps timed decode steps at batch 1 and 4. Each round gives the ratio of the
median steps and of the fastest steps. Goals (issue 13): W8A16 / bf16 <= 0.6 for both.

Figures, by machine and day: docs/MEASUREMENTS.md#w8-quantization-vs-float
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from in_turn import report, run_turn, turns  # comparisons/ is the script's own folder on sys.path

DIMS = {  # config.json overrides on the qwen tiny layout (Qwen's intermediate_size counts both branches)
    "widened": dict(hidden_size=1024, num_attention_heads=16, kv_channels=64, intermediate_size=5504,
                    num_hidden_layers=4),
    "qwen-7b": dict(hidden_size=4096, num_attention_heads=32, kv_channels=128, intermediate_size=22016,
                    num_hidden_layers=32, vocab_size=151936, seq_length=2048),
}


def write_random_qwen(out: Path, dims: dict, dtype: torch.dtype, w8a16: Path | None = None, seed: int = 0) -> None:
    """A qwen checkpoint with random weights (one shard per layer), and optionally its W8A16 copy."""
    from safetensors.torch import save_file

    from npuinfer.checkpoint import args_from_config, from_canonical
    from npuinfer.quant.layout import describe_tensors, quant_from_canonical
    from npuinfer.quant.linear import LINEARS
    from npuinfer.quant.scheme import quantize_weight
    from npuinfer.tiny import ensure_tiny

    tiny = ensure_tiny("qwen-tiny")
    config = {**json.loads((tiny / "config.json").read_text()), **dims}
    args = args_from_config(config, "qwen")
    gen = torch.Generator().manual_seed(seed)
    targets = [d for d in (out, w8a16) if d is not None]
    for d in targets:
        d.mkdir(parents=True)
        for item in tiny.iterdir():
            if item.is_file() and not item.name.endswith((".safetensors", ".json")) or item.name in (
                    "tokenizer_config.json", "generation_config.json"):
                shutil.copy2(item, d / item.name)
        (d / "config.json").write_text(json.dumps(config, indent=2))
    float_map, quant_map, types = {}, {}, {"model_quant_type": "W8A16"}
    groups = [["embed"], ["head"]] + [[i] for i in range(args.n_layers)]
    # Timing and memory do not depend on the values: tensors are filled from a 16M-value random pool at random
    # offsets (generating 7.7G normals took minutes on a shared machine), with nothing larger than the tensor.
    pool = (torch.randn(1 << 24, generator=gen) * 0.02).to(dtype)

    def rand(*shape):
        out = torch.empty(shape, dtype=dtype).view(-1)
        pos = 0
        while pos < out.numel():
            start = int(torch.randint(0, pool.numel() // 2, (1,), generator=gen))
            take = min(out.numel() - pos, pool.numel() - start)
            out[pos:pos + take] = pool[start:start + take]
            pos += take
        return out.view(shape)

    d, h, inter = args.dim, args.n_heads * args.head_dim, args.intermediate_size
    for n, group in enumerate(groups):
        if group == ["embed"]:
            canonical = {"tok_embeddings.weight": rand(args.vocab_size, d), "norm.weight": torch.ones(d, dtype=dtype)}
        elif group == ["head"]:
            canonical = {"output.weight": rand(args.vocab_size, d)}
        else:
            p = f"layers.{group[0]}."
            canonical = {p + "attention_norm.weight": torch.ones(d, dtype=dtype),
                         p + "ffn_norm.weight": torch.ones(d, dtype=dtype),
                         p + "attention.wqkv.weight": rand(3 * h, d), p + "attention.wqkv.bias": rand(3 * h),
                         p + "attention.wo.weight": rand(d, h), p + "feed_forward.w1.weight": rand(inter, d),
                         p + "feed_forward.w3.weight": rand(inter, d), p + "feed_forward.w2.weight": rand(d, inter)}
        name = f"model-{n + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = _family_names(from_canonical, canonical, args)
        save_file(tensors, str(out / name))
        float_map.update(dict.fromkeys(tensors, name))
        if w8a16 is not None:
            for lin in LINEARS:
                key = f"layers.{group[0]}.{lin}"
                if f"{key}.weight" in canonical:
                    q, scale = quantize_weight(canonical.pop(f"{key}.weight"))
                    canonical.update({f"{key}.weight": q, f"{key}.weight_scale": scale.to(dtype),
                                      f"{key}.weight_offset": torch.zeros_like(scale, dtype=dtype)})
            qname = f"quant_model_weight_w8a16-{n + 1:05d}-of-{len(groups):05d}.safetensors"
            qtensors = _family_names(quant_from_canonical, canonical, args)
            save_file(qtensors, str(w8a16 / qname))
            quant_map.update(dict.fromkeys(qtensors, qname))
            types.update({k: v for k, v in describe_tensors(qtensors, "W8A16").items() if k != "model_quant_type"})
        del canonical, tensors
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": float_map}))
    if w8a16 is not None:
        (w8a16 / "quant_model_weight_w8a16.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": quant_map}))
        (w8a16 / "quant_model_description_w8a16.json").write_text(json.dumps(types, indent=1))


def _family_names(convert, canonical: dict, args) -> dict:
    """from_canonical on a subset of the tensors (it walks all layers but converts only those present)."""
    return {k: v.contiguous() for k, v in convert("qwen", canonical, args).items()}


# ---------------------------------------------------------------- error


def logit_error(models: list[tuple[str, Path]], workdir: Path) -> None:
    from npuinfer.quantize import DEFAULT_CALIBRATION, quantize_checkpoint
    from npuinfer.runtime import load_model

    variants = [("W8A16", "W8A16", {}), ("W8A8", "W8A8", {}), ("W8A8+smooth0.5", "W8A8", {"smooth_alpha": 0.5})]
    print("| model | scheme | kernel | max|dlogit|/max|logit| | mean|dlogit|/std(logit) | argmax agreement |")
    print("|---|---|---|---|---|---|")
    for name, path in models:
        ref = load_model(model_path=path, device="cpu", dtype="fp32")
        prompts = [torch.tensor([ref.tokenizer.encode(p)]) for p in DEFAULT_CALIBRATION]
        want = [_logits(ref.model, ids) for ids in prompts]
        for label, scheme, kwargs in variants:
            out = workdir / f"{name}-{label}"
            quantize_checkpoint(path, out, scheme, **kwargs)
            q = load_model(model_path=out, device="cpu", dtype="fp32")
            got = [_logits(q.model, ids) for ids in prompts]
            a, b = torch.cat([g.flatten(0, 1) for g in got]), torch.cat([w.flatten(0, 1) for w in want])
            print(f"| {name} | {label} | {q.quantization['quant_kernel']} | {(a - b).abs().max() / b.abs().max():.4f} "
                  f"| {(a - b).abs().mean() / b.std():.4f} | {(a.argmax(-1) == b.argmax(-1)).float().mean():.3f} |")


@torch.no_grad()
def _logits(model, ids):
    model.setup_caches(1, ids.shape[1])
    return model(ids, 0).float()


# ---------------------------------------------------------------- speed


@torch.no_grad()
def measure(path: str, batch_sizes: list[int], steps: int, dtype: str) -> dict:
    """In this process: load, then per batch the median decode step (synchronized), and the peak RSS."""
    from npuinfer.model import LAST_POSITION
    from npuinfer.runtime import load_model

    t0 = time.perf_counter()
    loaded = load_model(model_path=path, device="cpu", dtype=dtype)
    out = {"load_s": time.perf_counter() - t0, "quantization": loaded.quantization, "steps": {}}
    model = loaded.model
    for batch in batch_sizes:
        ids = torch.randint(3, 1000, (batch, 16), generator=torch.Generator().manual_seed(batch))
        model.setup_caches(batch, 16 + steps + 2)
        logits = model(ids, 0, logits_at=LAST_POSITION)
        times = []
        for step in range(steps + 1):  # the first step is a warm-up, not timed
            token = logits[:, -1].argmax(-1, keepdim=True)
            t = time.perf_counter()
            logits = model(token, 16 + step)
            loaded.device.synchronize()
            times.append(time.perf_counter() - t)
        out["steps"][batch] = times[1:]
    out["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    out["weights_gib"] = sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 2**30
    return out


def speed(args) -> None:
    root = Path(args.dir)
    float_dir, quant_dir = root / "bf16", root / "w8a16"
    if not float_dir.exists():
        t = time.perf_counter()
        write_random_qwen(float_dir, DIMS[args.dims], torch.bfloat16, quant_dir)
        print(f"wrote {float_dir} and {quant_dir} in {time.perf_counter() - t:.0f} s", flush=True)
    if args.write_only:
        return
    runs: dict[str, list[dict]] = {"bf16": [], "W8A16": []}
    paths = {"bf16": float_dir, "W8A16": quant_dir}
    for round_, label in turns(list(paths), args.rounds):  # processes in turn, the order swapped each round
        cmd = [sys.executable, __file__, "_measure", str(paths[label]), "--batches", *map(str, args.batches),
               "--steps", str(args.steps)]
        r = run_turn(cmd, f"round {round_ + 1} {label}")
        runs[label].append(r)
        steps = {b: f"{statistics.median(t) * 1e3:.0f}/{min(t) * 1e3:.0f}" for b, t in r["steps"].items()}
        print(f"round {round_ + 1} {label}: load {r['load_s']:.0f} s, weights {r['weights_gib']:.2f} GiB, peak RSS "
              f"{r['peak_rss_gib']:.2f} GiB, next-token ms median/fastest by batch {steps}, load average "
              f"{os.getloadavg()[0]:.1f}, {r['quantization']}", flush=True)
    print("| batch | bf16 next-token ms (median; fastest) | W8A16 next-token ms (median; fastest) | W8A16/bf16 "
          "per round, medians | W8A16/bf16 per round, fastest |")
    print("|---|---|---|---|---|")
    for batch in map(str, args.batches):
        med = {k: [statistics.median(r["steps"][batch]) * 1e3 for r in v] for k, v in runs.items()}
        low = {k: [min(r["steps"][batch]) * 1e3 for r in v] for k, v in runs.items()}
        print(f"| {batch} | {statistics.median(med['bf16']):.0f}; {min(low['bf16']):.0f} "
              f"| {statistics.median(med['W8A16']):.0f}; {min(low['W8A16']):.0f} "
              f"| {', '.join(f'{q / f:.2f}' for q, f in zip(med['W8A16'], med['bf16']))} "
              f"| {', '.join(f'{q / f:.2f}' for q, f in zip(low['W8A16'], low['bf16']))} |")
    peak = {k: max(r["peak_rss_gib"] for r in v) for k, v in runs.items()}
    weights = {k: v[0]["weights_gib"] for k, v in runs.items()}
    print(f"peak RSS W8A16/bf16: {peak['W8A16']:.2f}/{peak['bf16']:.2f} GiB = {peak['W8A16'] / peak['bf16']:.2f} "
          f"(weights {weights['W8A16'] / weights['bf16']:.2f})")


@torch.no_grad()
def layers(args) -> None:
    """Real Qwen-7B layer dimensions, --layers decoder layers and a small vocabulary, bf16 and W8A16 built in
    memory from the same weights (< 3 GiB together), decode steps interleaved so machine noise hits both."""
    from npuinfer.checkpoint import args_from_config
    from npuinfer.kernels import kernels_for
    from npuinfer.model import LAST_POSITION, Transformer
    from npuinfer.quant import plan_from_state, prepare, swap_linears
    from npuinfer.quantize import target_linears
    from npuinfer.quant.scheme import quantize_weight
    from npuinfer.tiny import ensure_tiny

    config = {**json.loads((ensure_tiny("qwen-tiny") / "config.json").read_text()), **DIMS["qwen-7b"],
              "num_hidden_layers": args.layers, "vocab_size": 2048}
    margs = args_from_config(config, "qwen")
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)  # built in bf16 directly: an fp32 copy would double the peak
    try:
        bf16 = Transformer(margs).eval()
    finally:
        torch.set_default_dtype(torch.float32)
    state = dict(bf16.state_dict())
    for name in target_linears(state, margs.n_layers, set()):
        q, scale = quantize_weight(state.pop(f"{name}.weight"))
        state.update({f"{name}.weight": q, f"{name}.weight_scale": scale.to(torch.bfloat16),
                      f"{name}.weight_offset": torch.zeros_like(scale, dtype=torch.bfloat16)})
    with torch.device("meta"):
        w8 = Transformer(margs)
    swap_linears(w8, plan_from_state(state))
    w8.load_state_dict(state, assign=True)
    w8.eval()
    kernels = kernels_for(margs, "cpu", torch.bfloat16)
    for model in (bf16, w8):  # as load_model runs them: bf16 linears (and W8A16's head) prepacked for oneDNN
        model.use_kernels(kernels)
    print(f"{args.layers} layers at Qwen-7B dims: bf16 weights "
          f"{sum(t.numel() * t.element_size() for t in bf16.state_dict().values()) / 2**30:.2f} GiB, W8A16 "
          f"{sum(t.numel() * t.element_size() for t in w8.state_dict().values()) / 2**30:.2f} GiB, "
          f"{prepare(w8, 'cpu', torch.bfloat16)}", flush=True)
    print("| batch | bf16 step (ms) | W8A16 step (ms) | W8A16/bf16 (median of per-pair ratios) |")
    print("|---|---|---|---|")
    for batch in args.batches:
        ids = torch.randint(3, 1000, (batch, 8))
        for model in (bf16, w8):
            model.setup_caches(batch, 8 + args.steps + 2)
            model(ids, 0, logits_at=LAST_POSITION)
            model(ids[:, :1], 8)  # warm-up decode step
        times = {"bf16": [], "w8": []}
        for step in range(args.steps):
            for key, model in (("bf16", bf16), ("w8", w8)) if step % 2 == 0 else (("w8", w8), ("bf16", bf16)):
                t = time.perf_counter()
                model(ids[:, :1], 9 + step)
                times[key].append(time.perf_counter() - t)
        ratios = [q / f for q, f in zip(times["w8"], times["bf16"])]
        print(f"| {batch} | {statistics.median(times['bf16']) * 1e3:.0f} | {statistics.median(times['w8']) * 1e3:.0f} "
              f"| {statistics.median(ratios):.2f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="mode", required=True)
    err = sub.add_parser("error")
    err.add_argument("--models", nargs="*", default=["qwen-tiny", "baichuan2-13b-tiny", "internlm-tiny",
                                                      "gpt-neox-tiny", "widened"])
    sp = sub.add_parser("speed")
    sp.add_argument("--dims", choices=list(DIMS), default="qwen-7b")
    sp.add_argument("--dir", required=True, help="where the random checkpoints are written (delete afterwards)")
    sp.add_argument("--batches", type=int, nargs="*", default=[1, 4])
    sp.add_argument("--steps", type=int, default=6)
    sp.add_argument("--rounds", type=int, default=2, help="bf16 and W8A16 processes alternate this many times")
    sp.add_argument("--write-only", action="store_true",
                    help="write the checkpoints and stop (the writer stays under 3 GiB of memory)")
    ly = sub.add_parser("layers", help="real-size layers, small vocabulary, both models in one process (< 3 GiB)")
    ly.add_argument("--layers", type=int, default=4)
    ly.add_argument("--batches", type=int, nargs="*", default=[1, 4])
    ly.add_argument("--steps", type=int, default=10)
    me = sub.add_parser("_measure")
    me.add_argument("path")
    me.add_argument("--batches", type=int, nargs="*")
    me.add_argument("--steps", type=int)
    args = parser.parse_args()
    if args.mode == "_measure":
        report(measure(args.path, args.batches, args.steps, "bf16"))
    elif args.mode == "speed":
        speed(args)
    elif args.mode == "layers":
        layers(args)
    else:
        from npuinfer.tiny import ensure_tiny

        with tempfile.TemporaryDirectory() as tmp:
            models = []
            for name in args.models:
                if name == "widened":
                    path = Path(tmp) / "qwen-widened"
                    write_random_qwen(path, DIMS["widened"], torch.float32)
                    models.append((name, path))
                else:
                    models.append((name, ensure_tiny(name)))
            logit_error(models, Path(tmp))


if __name__ == "__main__":
    main()
