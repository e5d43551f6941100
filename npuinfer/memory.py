"""Memory planning: the peak a generate call needs, and the largest batch that fits a limit.

The prediction is weights + the static KV cache (allocated for input + output at once) + the
largest set of activations alive together, which is the prefill: one layer's temporaries, or the
head's logits (the prefill projects only the last position, [B, 1, vocab]).
It is the starting point of the max-batch search; on an accelerator every answer is confirmed by
real runs whose peak is read from the device.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from .generate import generate
from .model import ModelArgs
from .timing import make_inputs

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
          "t": 1000**4, "tb": 1000**4, "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str) -> int:
    """``16GiB``, ``512MiB``, ``8GB`` (decimal units), or plain bytes ``123456`` -> bytes."""
    match = _SIZE_RE.match(str(text))
    unit = match.group(2).lower() if match else None
    if not match or unit not in _UNITS or float(match.group(1)) <= 0:
        raise ValueError(f"--memory-limit: expected a size such as 16GiB, 512MiB or 8GB, got {text!r}")
    return int(float(match.group(1)) * _UNITS[unit])


def format_size(n: int | float | None) -> str:
    if n is None:
        return ""
    for unit, size in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:.4g}{unit}"
    return f"{int(n)}B"


@dataclass(frozen=True)
class MemoryEstimate:
    weights: int
    kv_cache: int
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.activations


def weight_bytes(args: ModelArgs, dtype_bytes: int) -> int:
    """Parameter bytes from the config (divided evenly under tensor parallelism: an approximation;
    pass a loaded model's real bytes to `estimate` instead where there is one)."""
    return args.num_parameters() * dtype_bytes // args.tp_size


def activation_bytes(args: ModelArgs, batch: int, input_len: int, dtype_bytes: int,
                     materialized_scores: bool | None = None) -> int:
    """Peak activations of a generate call: the prefill's, over ``input_len`` tokens (a decode step's are
    those of one token, whatever the output length).

    ``materialized_scores``: whether attention materializes [B, H, T, S] scores (the eager path,
    ALiBi's additive bias, a masked sdpa); default: for ALiBi only.
    """
    b, t = batch, input_len  # the prefill attends over its own t keys (the cache holds input + output)
    d, h = args.dim, args.n_local_heads * args.head_dim
    inter = args.local_intermediate_size
    if materialized_scores is None:
        materialized_scores = args.position == "alibi"
    # Alive through a layer: the residual x, the normed input, and the fp32 copy RMSNorm makes.
    residual = b * t * d * (2 * dtype_bytes + 4)
    qkv_width = (args.n_local_heads + 2 * args.n_local_kv_heads) * args.head_dim
    qkv = b * t * qkv_width * dtype_bytes * 2  # projection output and the rotated / permuted copies
    if args.position == "rope":
        qkv += 2 * b * t * args.rot_dim * dtype_bytes  # gathered cos / sin
    scores = 0
    if materialized_scores:
        scores = b * args.n_local_heads * t * t * (dtype_bytes + 4)  # scores (or ALiBi's bias) and an fp32 copy
        if args.position == "alibi":
            scores += b * t * t * 4  # the float distance matrix
    attention = qkv + scores + b * t * h * dtype_bytes
    mlp = b * t * inter * dtype_bytes * (3 if args.mlp == "swiglu" else 2)
    layer = residual + max(attention, mlp)
    head = b * d * dtype_bytes * 2 + b * args.vocab_size * (dtype_bytes + 4)  # last position: norm out + logits
    return max(layer, head)


def estimate(args: ModelArgs, batch: int, input_len: int, output_len: int, dtype_bytes: int,
             weights: int | None = None, materialized_scores: bool | None = None) -> MemoryEstimate:
    """Peak bytes of generate(batch, input_len -> output_len); ``weights`` overrides the parameter count
    (pass the loaded model's real bytes)."""
    if weights is None:
        weights = weight_bytes(args, dtype_bytes)
    tables = 2 * args.max_seq_len * args.rot_dim * dtype_bytes if args.position == "rope" else 0
    return MemoryEstimate(
        weights=weights + tables,
        kv_cache=args.kv_cache_bytes(batch, input_len + output_len, dtype_bytes),
        activations=activation_bytes(args, batch, input_len, dtype_bytes, materialized_scores),
    )


def predict_max_batch(args: ModelArgs, input_len: int, output_len: int, dtype_bytes: int, limit: int,
                      weights: int | None = None, materialized_scores: bool | None = None,
                      cap: int = 1 << 20) -> int:
    """Largest batch whose estimate is within ``limit`` bytes (0 when not even batch 1 fits).

    The estimate grows linearly in the batch, so two evaluations give it; the loop only corrects rounding.
    """
    def total(b: int) -> int:
        return estimate(args, b, input_len, output_len, dtype_bytes, weights, materialized_scores).total

    fixed = total(0)
    per_batch = total(1) - fixed
    if fixed + per_batch > limit:
        return 0
    best = min(cap, (limit - fixed) // max(1, per_batch))
    while best > 1 and total(best) > limit:
        best -= 1
    while best < cap and total(best + 1) <= limit:
        best += 1
    return int(best)


# --------------------------------------------------------------------------------------------- max batch


class Unconfirmable(RuntimeError):
    """A trial that this machine cannot run safely (a cpu run larger than the free host memory)."""


@dataclass(frozen=True)
class MaxBatchResult:
    max_batch: int
    predicted: int  # the prediction the search started from
    predicted_peak: int | None  # bytes, at max_batch
    measured_peak: int | None  # bytes reserved at max_batch (accelerators)
    confirmed_by: str
    trials: list  # [batch, fits, peak MiB or None, "run" | "oom" | "prediction"] in the order tried
    status: str  # ok | none fits | unconfirmed
    reason: str = ""


class MaxBatchSearch:
    """Largest batch for (input, output) within ``limit`` bytes: a prediction, confirmed by real runs.

    A trial allocates the static KV cache for input + output at batch b, runs the prefill over the
    full input and two decode steps (the prefill is the activation peak; later steps add only one
    token's activations), and on an accelerator reads the device's peak reserved memory (the caching
    allocator's, fragmentation included): b fits when it ran without running out of memory and that peak is
    within the limit. The search starts at the prediction, steps up while that fits (doubling), down while it
    does not (halving), then bisects.
    A cpu has no peak to read (torch's host allocations are not tracked), so there b fits when its
    *predicted* peak is within the limit and a real run at b succeeds; the result says which.
    """

    MAX_TRIALS = 24

    def __init__(self, loaded, device, input_len: int, output_len: int, limit: int, seed: int = 0):
        self.loaded, self.device = loaded, device  # npuinfer.runtime.LoadedModel, npuinfer.device.Device
        self.input_len, self.output_len, self.limit, self.seed = input_len, output_len, limit, seed
        model = loaded.model
        self.dtype_bytes = model.dtype.itemsize
        self.weights = sum(p.numel() * p.element_size() for p in model.parameters())
        self.scores = loaded.args.position == "alibi" or any(layer.attention.eager for layer in model.layers)
        self.trials: list[list] = []
        self._peaks: dict[int, int | None] = {}

    def predicted(self, batch: int) -> int:
        return estimate(self.loaded.args, batch, self.input_len, self.output_len, self.dtype_bytes, self.weights,
                        self.scores).total

    def _release(self) -> None:
        self.loaded.model.setup_caches(1, 1)  # drop a large cache before the next allocation
        self.device.empty_cache()

    def trial(self, batch: int) -> tuple[bool, int | None, str]:
        """(fits, measured peak bytes or None, how it was decided: run | oom | prediction)."""
        if not self.device.is_accelerator:
            if self.predicted(batch) > self.limit:
                return False, None, "prediction"  # not run: the prediction already says it does not fit
            host = self.device.free_memory_bytes()
            if host is not None and self.predicted(batch) > 0.8 * host:
                raise Unconfirmable(f"a run at batch {batch} would need about {format_size(self.predicted(batch))}, "
                                    f"more than this machine can spare ({format_size(host)} available)")
        self._release()
        self.device.reset_peak_memory()
        ids, mask = make_inputs(self.device, self.loaded.args.vocab_size, batch, self.input_len, self.seed)
        out_of_memory = False
        try:
            self.loaded.model.setup_caches(batch, self.input_len + self.output_len)
            generate(self.loaded.model, ids, min(2, self.output_len), mask)
            self.device.synchronize()
        except Exception as exc:
            if not self.device.is_out_of_memory(exc):
                raise
            out_of_memory = True
        if out_of_memory:  # freed here, not in the handler, where the traceback keeps the failed frames' tensors
            self._release()
            return False, None, "oom"
        # what the process held, cache and fragmentation included, not only the tensors allocated
        peak = self.device.peak_reserved_bytes()
        return (peak is None or peak <= self.limit), peak, "run"

    def _try(self, batch: int) -> bool:
        fits, peak, how = self.trial(batch)
        self.trials.append([batch, fits, round(peak / 2**20, 1) if peak is not None else None, how])
        self._peaks[batch] = peak
        return fits

    def search(self, start: int) -> int:
        fit, fail = 0, None
        if self._try(start):
            fit, step = start, 1
            while fail is None and len(self.trials) < self.MAX_TRIALS:  # the prediction may be conservative
                probe = fit + step
                if self._try(probe):
                    fit, step = probe, step * 2
                else:
                    fail = probe
        else:
            fail = start
            while fit == 0 and fail > 1 and len(self.trials) < self.MAX_TRIALS:
                probe = fail // 2
                if self._try(probe):
                    fit = probe
                else:
                    fail = probe
        while fail is not None and fail - fit > 1 and len(self.trials) < self.MAX_TRIALS:
            probe = (fit + fail) // 2
            if self._try(probe):
                fit = probe
            else:
                fail = probe
        return fit

    def run(self) -> MaxBatchResult:
        predicted = predict_max_batch(self.loaded.args, self.input_len, self.output_len, self.dtype_bytes, self.limit,
                                      self.weights, self.scores)
        status, reason = "ok", ""
        confirmed = ("device peak memory of real runs" if self.device.is_accelerator else
                     "prediction; a real run at this batch succeeded (cpu peak memory is not measured)")
        try:
            best = self.search(max(1, predicted))
        except Unconfirmable as exc:
            best, status, reason, confirmed = predicted, "unconfirmed", str(exc), "prediction only"
        finally:
            self._release()
        if status == "ok" and best == 0:
            status, reason = "none fits", f"not even batch 1 fits in {format_size(self.limit)}"
        return MaxBatchResult(max_batch=best, predicted=predicted,
                              predicted_peak=self.predicted(best) if best else None,
                              measured_peak=self._peaks.get(best), confirmed_by=confirmed, trials=self.trials,
                              status=status, reason=reason)
