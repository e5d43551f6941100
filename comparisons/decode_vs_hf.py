"""Decode step time: npuinfer vs transformers `generate`, and vs the step's matrix multiplications alone.

    python comparisons/decode_vs_hf.py                    # tiny + ~130M configs, gpt-neox and internlm families
    python comparisons/decode_vs_hf.py --sizes 130m --family gpt-neox --batches 1 8 --device cuda --dtype fp16
    python comparisons/decode_vs_hf.py --profile          # also where npuinfer's decode step spends its time
    python comparisons/decode_vs_hf.py --no-compile       # only the eager decode step

npuinfer is measured twice: the eager step, and the step run as one graph (`--compile` of the runtime: on cpu a
library built ahead of time by AOTInductor, on cuda CUDA graphs), which builds once per shape in the warm-up.

Both sides run the same checkpoint on the same device: a transformers model with random weights is written with
`save_pretrained` (plus a tokenizer file from the tiny checkpoint) and loaded back by npuinfer's `load_model`.

Steady-state step time: the median of the synchronized intervals between consecutive decode steps (npuinfer's
step observer; a StoppingCriteria on the transformers side, called once per token), pooled over --repeats runs
of 2N tokens, with npuinfer and transformers interleaved so machine noise hits both alike. A median of steps
shrugs off the stalls a shared machine adds. Also printed: (T(2N) - T(N)) / N, median over repeats, which
cancels the prefill and fixed costs but not the stalls.
The floor is the step's matrix multiplications, each one aten call, with nothing else: every Linear layer
(weights and biases of the loaded model) on [B, 1, dim] inputs in the step's order, and each layer's two attention
products, q . K^T and p . V, over the median step's window (prompt + N slots) of cache-shaped tensors. No softmax,
norms, rotary, cache writes or Python. The linear floor (the Linears alone, the floor of earlier versions) is
printed beside it: it leaves out reading the KV cache, which for a tiny model at batch 8 is as many bytes as its
weights (~1.2 MB at the median window against ~1 MB), so no step can come near it there.

Targets (printed, never asserted): npuinfer / transformers <= 1.0 at batch 1 and <= 0.9 at batch 8;
npuinfer / floor <= 1.15.

Figures, by machine and day: docs/MEASUREMENTS.md#decode-step-npuinfer-vs-transformers
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from npuinfer.device import get_device, parse_dtype  # noqa: E402
from npuinfer.decode_graph import compile_decode  # noqa: E402
from npuinfer.generate import generate  # noqa: E402
from npuinfer.runtime import load_model  # noqa: E402
from npuinfer.tiny import ensure_tiny  # noqa: E402

SIZES = {
    # the tiny stand-ins' sizes, and a ~130M-parameter config (GPT-2-small-like widths, vocab 50k)
    "tiny": dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, vocab_size=1024),
    "130m": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, vocab_size=50304),
}
TARGET_HF = {1: 1.0, 8: 0.9}
TARGET_FLOOR = 1.15


def hf_model(family: str, size: str, seed: int = 0):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM

    s = SIZES[size]
    common = dict(**s, max_position_embeddings=2048, tie_word_embeddings=False)
    if family == "gpt-neox":
        model = GPTNeoXForCausalLM(GPTNeoXConfig(**common, intermediate_size=4 * s["hidden_size"], hidden_act="gelu"))
    else:  # internlm: Llama layout with q/k/v/o biases
        inter = 160 if size == "tiny" else 2048
        model = LlamaForCausalLM(LlamaConfig(**common, intermediate_size=inter, attention_bias=True,
                                             num_key_value_heads=s["num_attention_heads"]))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.1 * noise if "norm" in name and name.endswith("weight") else 0.02 * noise)
    return model.eval()


def write_checkpoint(model, family: str, out: Path) -> Path:
    model.save_pretrained(out)
    tiny = ensure_tiny(f"{family}-tiny")
    tok = "tokenizer.json" if family == "gpt-neox" else "tokenizer.model"
    shutil.copy(tiny / tok, out / tok)
    return out


def floor_steps(model, batch: int, window: int) -> dict[str, callable]:
    """The decode step's matrix multiplications alone, each one aten call with the loaded model's weights:
    "floor" = every Linear on [B, 1, in] inputs plus each layer's two attention products (q . K^T and
    p . V over ``window`` cache slots, read from cache-shaped tensors); "linear floor" = the Linears only."""
    args = model.args
    linears = []
    for layer in model.layers:
        att, ff = layer.attention, layer.feed_forward
        linears += [att.wqkv, att.wo, ff.w1] + ([ff.w3] if ff.gated else []) + [ff.w2]
    linears.append(model.output)
    like = dict(device=model.device, dtype=model.dtype)
    inputs = [torch.randn(batch, 1, lin.in_features, **like) for lin in linears]
    pairs = [(x, lin.weight, lin.bias) for x, lin in zip(inputs, linears)]
    heads, dim, slots = args.n_local_heads, args.head_dim, model.cache_shape[1]
    attention = [(torch.randn(batch, heads, 1, dim, **like), torch.randn(batch, heads, 1, window, **like),
                  torch.randn(batch, heads, slots, dim, **like)[:, :, :window],
                  torch.randn(batch, heads, slots, dim, **like)[:, :, :window]) for _ in model.layers]

    def linear_floor():
        for x, w, b in pairs:
            F.linear(x, w, b)

    def floor():
        linear_floor()
        for q, p, k, v in attention:
            torch.matmul(q, k.transpose(-1, -2))
            torch.matmul(p, v)

    return {"floor": floor, "linear floor": linear_floor}


def timed(device, fn) -> float:
    device.synchronize()
    t = time.perf_counter()
    fn()
    device.synchronize()
    return time.perf_counter() - t


class _Stamps:
    """Synchronized clock readings at each step boundary: npuinfer's StepObserver and a transformers
    StoppingCriteria (called once per generated token) both feed one."""

    def __init__(self, device):
        self.device, self.t = device, []

    def stamp(self) -> None:
        self.device.synchronize()
        self.t.append(time.perf_counter())

    # npuinfer StepObserver
    def step_start(self, step: int) -> None:
        self.stamp()

    def forward_start(self, step: int) -> None:
        pass

    forward_end = step_end = forward_start

    # transformers StoppingCriteria
    def __call__(self, input_ids, scores, **kwargs):
        self.stamp()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    def steps(self, skip: int = 2) -> list[float]:
        """Decode step intervals, without the prefill and the first ``skip`` decode steps."""
        return [b - a for a, b in zip(self.t, self.t[1:])][skip:]


def measure(loaded, hf, batch: int, prompt_len: int, n: int, repeats: int, compiled=None) -> dict[str, float]:
    """Median step times; ``compiled`` (the model's compiled decode step) adds the "compiled" contender."""
    from transformers import GenerationConfig, StoppingCriteriaList

    device, model = loaded.device, loaded.model
    g = torch.Generator().manual_seed(batch)
    ids = torch.randint(3, min(loaded.tokenizer.vocab_size, loaded.args.vocab_size), (batch, prompt_len), generator=g)
    ids = ids.to(device.torch_device)
    mask = torch.ones_like(ids)

    def ours(k, stamps=None, step=None):
        def run():
            model.compiled_decode = step
            return generate(model, ids, k, mask, observer=stamps)
        return run

    def ours_compiled(k, stamps=None):
        return ours(k, stamps, compiled)

    def theirs(k, stamps=None):
        cfg = GenerationConfig(do_sample=False, max_new_tokens=k, min_new_tokens=k, eos_token_id=None,
                               pad_token_id=0, bos_token_id=None)
        criteria = StoppingCriteriaList([stamps] if stamps else [])

        def run():
            with torch.inference_mode():
                return hf.generate(input_ids=ids, attention_mask=mask, generation_config=cfg,
                                   stopping_criteria=criteria)
        return run

    # warm-up at the largest shape, then check both sides produce the same tokens (same maths)
    contenders = [("npuinfer", ours), ("transformers", theirs)] + ([("compiled", ours_compiled)] if compiled else [])
    model.setup_caches(batch, prompt_len + 2 * n)
    for _, make in contenders:  # the compiled step builds here, once per (batch, cache length)
        for k in (n, 2 * n):
            make(k)()
    reference = theirs(n)()[:, prompt_len:].cpu()
    same = all(torch.equal(make(n)().cpu(), reference) for name, make in contenders if name != "transformers")
    floors = floor_steps(model, batch, window=prompt_len + n)  # the median step of a 2N run attends ~prompt + N
    with torch.inference_mode():
        for _ in range(3):
            for floor in floors.values():
                floor()
    diff = {name: [] for name, _ in contenders}
    steps = {**{name: [] for name, _ in contenders}, **{name: [] for name in floors}}
    for _ in range(repeats):
        for name, make in contenders:
            stamps = _Stamps(device)
            short = timed(device, make(n))
            long = timed(device, make(2 * n, stamps))
            diff[name].append((long - short) / n)
            steps[name] += stamps.steps()
        with torch.inference_mode():
            for name, floor in floors.items():
                steps[name] += [timed(device, floor) for _ in range(n)]
    out = {k: statistics.median(v) for k, v in steps.items()}
    out.update({f"{k}_diff": statistics.median(v) for k, v in diff.items()})
    out["same_tokens"] = same
    return out


def profile_step(loaded, batch: int, prompt_len: int, rows: int = 18) -> str:
    from torch.profiler import profile

    model, device = loaded.model, loaded.device
    ids = torch.randint(3, 100, (batch, prompt_len), device=device.torch_device)
    model.setup_caches(batch, prompt_len + 64)
    activities = device.profiler_activities()
    with torch.inference_mode():
        model(ids, 0)
        tok = ids[:, :1]
        for pos in range(prompt_len, prompt_len + 5):  # warm
            model(tok, pos)
        with profile(activities=activities) as prof:
            for pos in range(prompt_len + 5, prompt_len + 45):
                model(tok, pos)
            device.synchronize()
    return prof.key_averages().table(sort_by=device.profiler_sort_key, row_limit=rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", nargs="+", default=["gpt-neox", "internlm"], choices=["gpt-neox", "internlm"])
    p.add_argument("--sizes", nargs="+", default=["tiny", "130m"], choices=list(SIZES))
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default=None, choices=["fp32", "fp16", "bf16"], help="default fp32 on cpu, fp16 else")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=None, help="N (the long run makes 2N); default by size")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--profile", action="store_true", help="print torch.profiler tables of npuinfer's decode step")
    p.add_argument("--no-compile", dest="compile", action="store_false",
                   help="measure only the eager decode step (compiling costs seconds to a minute per shape)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    device = get_device(args.device)
    dtype = parse_dtype(args.dtype) if args.dtype else (torch.float16 if device.is_accelerator else torch.float32)
    print(f"device {device} ({device.name()}), dtype {dtype}, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, load average {_load()}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="npuinfer-bench-") as tmp:
        for family in args.family:
            for size in args.sizes:
                hf = hf_model(family, size)
                path = write_checkpoint(hf, family, Path(tmp) / f"{family}-{size}")
                loaded = load_model(model_path=path, device=device, dtype=dtype)
                hf = hf.to(device=device.torch_device, dtype=dtype)
                params = sum(t.numel() for t in loaded.model.parameters())
                compiled = None
                if args.compile:
                    compile_decode(loaded.model, device)
                    compiled = loaded.model.compiled_decode
                n = args.new_tokens or (64 if size == "tiny" else 16)
                for batch in args.batches:
                    r = measure(loaded, hf, batch, args.prompt_len, n, args.repeats, compiled)
                    row = dict(family=family, size=size, params=params, batch=batch, **r)
                    rows.append(row)
                    print(format_row(row), flush=True)
                    if args.profile:
                        print(profile_step(loaded, batch, args.prompt_len), flush=True)
                del loaded, hf
                device.empty_cache()
    print(f"\nload average at the end {_load()} (a busy machine inflates every column; compare ratios)")
    print(table(rows))
    return 0


def _load() -> str:
    import os

    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


VARIANTS = (("npuinfer", "eager"), ("compiled", "compiled"))


def _ratios(r: dict, key: str) -> tuple[float, float, float, float]:
    """(vs transformers, vs floor, vs linear floor, (T2N-TN)/N vs transformers) of one npuinfer variant."""
    return (r[key] / r["transformers"], r[key] / r["floor"], r[key] / r["linear floor"],
            r[f"{key}_diff"] / r["transformers_diff"])


def format_row(r: dict) -> str:
    head = (f"{r['family']:9s} {r['size']:5s} {r['params'] / 1e6:7.1f}M  batch {r['batch']:2d}  "
            f"transformers {r['transformers'] * 1e3:8.3f} ms  floor {r['floor'] * 1e3:8.3f} ms  "
            f"(linears {r['linear floor'] * 1e3:.3f} ms)  same tokens: {r['same_tokens']}")
    lines = [head]
    for key, label in VARIANTS:
        if key in r:
            hf, floor, linear, diff = _ratios(r, key)
            lines.append(f"    npuinfer {label:8s} {r[key] * 1e3:8.3f} ms  | /transformers {hf:5.2f}  /floor {floor:5.2f}"
                         f"  /linear floor {linear:5.2f}  | (T2N-TN)/N {r[f'{key}_diff'] * 1e3:.3f} ms, "
                         f"/transformers {diff:.2f}")
    return "\n".join(lines)


def table(rows: list[dict]) -> str:
    head = ("| family | size | params | batch | npuinfer step | npuinfer ms/step | transformers ms/step | "
            "floor ms/step | npuinfer/transformers (target) | npuinfer/floor (target <= 1.15) | "
            "npuinfer/linear floor | (T2N-TN)/N ratio |")
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        target = TARGET_HF.get(r["batch"])
        for key, label in VARIANTS:
            if key not in r:
                continue
            hf, floor, linear, diff = _ratios(r, key)
            mark = "" if target is None else f" ({'met' if hf <= target else 'missed'}, <= {target})"
            floor_mark = "met" if floor <= TARGET_FLOOR else "missed"
            lines.append(f"| {r['family']} | {r['size']} | {r['params'] / 1e6:.1f}M | {r['batch']} | {label} | "
                         f"{r[key] * 1e3:.3f} | {r['transformers'] * 1e3:.3f} | {r['floor'] * 1e3:.3f} | "
                         f"{hf:.2f}{mark} | {floor:.2f} ({floor_mark}) | {linear:.2f} | {diff:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
