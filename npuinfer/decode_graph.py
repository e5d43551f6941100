"""The decode step captured once and replayed every step (gpt-fast's recipe), as each device does it best.

- cpu: `ExportedDecode`. The step is exported (torch.export) and built ahead of time by AOTInductor into a
  shared library with the weights frozen in (inductor prepacks them and generates its own GEMMs); a step is
  then one C++ call with no Python guards or wrappers around it, which is what brings a tiny model's step down
  to the cost of its matmuls. The window attended (the slots up to the current position) is a dynamic
  dimension, so one library serves every position and every run length of a (batch, cache length, padding)
  shape, and attends over exactly the slots written so far. The KV cache tensors are the library's inputs,
  written in place, so a replaced cache needs no rebuild and no library keeps an old one alive.
- cuda, npu: `CompiledDecode`. torch.compile with CUDA graphs (reduce-overhead) or torchair's graph mode,
  over `Transformer.forward_slot`'s fixed window; one graph per (batch, run length).

``generate`` asks ``model.compiled_decode.prepare(model, batch, total, state)`` for the step of one run and
calls it as ``step(token, pos)``; like gpt-fast's ``decode_one_token``, the captured step includes the greedy
choice (a separate argmax call costs more than the whole attention of a tiny model). The first run at a new
shape builds, which takes seconds to a minute.
"""
from __future__ import annotations

import shutil
import tempfile
import weakref
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Protocol

import torch
from torch import Tensor, nn

from .device import Device, DeviceError
from .generate import greedy
from .model import DecodeSlot, KVCache, SeqState, Transformer

# (token [B, 1], cache slot being written) -> (next token [B], logits [B, vocab])
Step = Callable[[Tensor, int], tuple[Tensor, Tensor]]


class DecodeGraphs(Protocol):
    def prepare(self, model: Transformer, batch: int, total: int, state: SeqState | None) -> Step:
        """The captured step for one run of ``total`` slots (prompt + new tokens) with the current cache."""
        ...


def compile_decode(model: Transformer, device: Device) -> None:
    """Capture the decode step for ``device``; ``generate`` then replays it every step."""
    kernels = model.resolve_kernels()  # checked now, eagerly: never inside a trace
    if device.builds_ahead_of_time:
        # AOTInductor freezes the weights and prepacks them itself; it cannot trace oneDNN's opaque tensors
        model.use_kernels(kernels.with_plain("linear"))
        model.compiled_decode = ExportedDecode(device)
        return
    import torch._dynamo

    graphs = CompiledDecode(device.compile(_ChoosingStep(model)))
    config = torch._dynamo.config
    limit = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"  # torch < 2.7
    # above the shapes CompiledDecode keeps before it resets, so a fullgraph compile never hits the limit
    setattr(config, limit, max(getattr(config, limit), 2 * graphs.max_shapes))
    model.compiled_decode = graphs


class CompiledDecode:
    """torch.compile graphs of ``forward_slot`` (fixed window = the run's length), one per (batch, length).

    A graph pins the KV cache tensors it was built with (recorded in CUDA graphs), so when ``setup_caches``
    replaces the cache, or after ``max_shapes`` shapes, every graph is dropped (``torch.compiler.reset``): old
    caches are freed, and a sweep never reaches torch's recompile limit, which fullgraph turns into an error.
    """

    def __init__(self, fn: Callable[[Tensor, DecodeSlot, SeqState | None], tuple[Tensor, Tensor]],
                 max_shapes: int = 16) -> None:
        self.fn = fn
        self.max_shapes = max_shapes
        self._cache: weakref.ref | None = None
        self._shapes: set[tuple] = set()

    def prepare(self, model: Transformer, batch: int, total: int, state: SeqState | None) -> Step:
        shape = (batch, total, state is None)
        cache = model.layers[0].attention.kv_cache.k
        replaced = self._cache is not None and self._cache() is not cache
        if replaced or (shape not in self._shapes and len(self._shapes) >= self.max_shapes):
            torch.compiler.reset()
            self._shapes.clear()
        self._cache = weakref.ref(cache)
        self._shapes.add(shape)
        slots = torch.arange(total, device=model.device)  # the position is a tensor: one graph for all

        def step(token: Tensor, pos: int) -> tuple[Tensor, Tensor]:
            chosen, logits = self.fn(token, DecodeSlot(slots[pos : pos + 1], total), state)
            # a CUDA graph's output is overwritten by its next replay, and this token is the next input
            return chosen.clone(), logits

        return step


LIBRARY_BUDGET = 4 << 30  # bytes of frozen weights the kept libraries may hold (each has its own copy)


class ExportedDecode:
    """AOTInductor libraries of the decode step, one per (batch, cache length, padded, threads, dtype), the
    most recently used kept: up to ``max_shapes``, and no more than fit ``LIBRARY_BUDGET`` (each library holds
    a frozen copy of the weights, so a 7B model keeps one). Inductor fixes the thread count in the generated
    code, and the library reads its inputs at the dtypes and strides it was built for, hence the key."""

    def __init__(self, device: Device, max_shapes: int = 16) -> None:
        self.device = device
        self.max_shapes = max_shapes
        self.builds = 0
        self._runners: OrderedDict[tuple, object] = OrderedDict()
        self._dir = Path(tempfile.mkdtemp(prefix="npuinfer-decode-"))
        # also at interpreter exit: a loaded library removes the directory it was unpacked into only when
        # it is destroyed, which exit alone does not guarantee
        weakref.finalize(self, _release, self._runners, self._dir)

    def prepare(self, model: Transformer, batch: int, total: int, state: SeqState | None) -> Step:
        cache_len = model.cache_shape[1]
        if cache_len < 4:  # a window of exactly 2 slots cannot be a dynamic dimension; not worth a build
            return _eager_step(model, state)
        key = (batch, cache_len, state is not None, torch.get_num_threads(), model.dtype)
        runner = self._runners.get(key)
        if runner is None:
            weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
            keep = max(1, min(self.max_shapes, LIBRARY_BUDGET // max(weight_bytes, 1)))
            while len(self._runners) >= keep:
                self._runners.popitem(last=False)
            runner = self._build(model, *key[:4])
            self._runners[key] = runner
        self._runners.move_to_end(key)
        run = getattr(runner, "boxed_run", None) or runner.run  # a list of tensors (boxed: consumed); older: run
        caches = [t for layer in model.layers for t in (layer.attention.kv_cache.k, layer.attention.kv_cache.v)]
        slots = torch.arange(cache_len, device=model.device)
        if state is None:
            return lambda token, pos: tuple(run([token, slots[: pos + 1], *caches]))
        # the padding state at the cache's full (static) length: the library reads inputs at the strides it
        # was built for, so a view sliced from a longer tensor would be read wrongly
        valid = torch.ones(batch, cache_len, dtype=torch.bool, device=model.device)
        positions = torch.zeros(batch, cache_len, dtype=torch.long, device=model.device)
        valid[:, :total], positions[:, :total] = state.key_valid, state.positions
        return lambda token, pos: tuple(run([token, slots[: pos + 1], valid, positions, *caches]))

    def _build(self, model: Transformer, batch: int, cache_len: int, padded: bool, threads: int):
        try:
            return self._export_and_build(model, batch, cache_len, padded, threads)
        except DeviceError:
            raise
        except Exception as exc:  # no C++ compiler, an op AOTInductor cannot lower, ...
            raise DeviceError(f"--compile: building the decode step (batch {batch}, KV cache {cache_len}) on "
                              f"{self.device} failed: {type(exc).__name__}: {exc}; run without --compile") from exc

    def _export_and_build(self, model: Transformer, batch: int, cache_len: int, padded: bool, threads: int):
        from torch.export import Dim

        # the window never reaches the cache length: the last token generated is never fed back
        window = Dim("window", min=2, max=cache_len - 1)
        device = model.device
        with torch.inference_mode(False):  # export traces outside inference mode, on example tensors of its own
            example_w = cache_len - 1
            tokens = torch.zeros(batch, 1, dtype=torch.long, device=device)
            slots = torch.arange(example_w, device=device)
            # empty: export only reads shapes, and untouched pages cost no memory (a 7B cache can be 17 GB)
            caches = tuple(torch.empty_like(t) for layer in model.layers
                           for t in (layer.attention.kv_cache.k, layer.attention.kv_cache.v))
            rest: tuple = caches
            if padded:
                rest = (torch.ones(batch, cache_len, dtype=torch.bool, device=device),
                        torch.arange(cache_len, device=device).expand(batch, -1).contiguous()) + caches
            rest_shapes = (None,) * len(rest)
            # dynamic_shapes follows forward's signature: tokens, slots, then *rest as one tuple; the model's
            # own cache is detached meanwhile, or export would lift it into the program as a buffer
            with _caches_set(model, [None] * len(model.layers)):
                program = torch.export.export(_ExportedStep(model, padded), (tokens, slots, *rest),
                                              dynamic_shapes=(None, {0: window}, rest_shapes))
        path = self._dir / f"decode-b{batch}-s{cache_len}{'-padded' if padded else ''}-t{threads}.pt2"
        self.builds += 1
        runner = self.device.build_ahead_of_time(program, path)
        path.unlink(missing_ok=True)  # the loaded library was unpacked elsewhere; the package is not needed
        return runner


def _release(runners: OrderedDict, package_dir: Path) -> None:
    runners.clear()
    shutil.rmtree(package_dir, ignore_errors=True)


class _ChoosingStep(nn.Module):
    """``forward_slot`` and the greedy choice: the step captured for cuda and npu."""

    def __init__(self, model: Transformer) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: Tensor, slot: DecodeSlot, state: SeqState | None) -> tuple[Tensor, Tensor]:
        logits = self.model.forward_slot(tokens, slot, state)
        return greedy(logits), logits


class _ExportedStep(nn.Module):
    """``forward_slot`` and the greedy choice, with the window, the padding state and the KV cache as
    inputs: the form exported for cpu."""

    def __init__(self, model: Transformer, padded: bool) -> None:
        super().__init__()
        self.model = model
        self.padded = padded

    def forward(self, tokens: Tensor, slots: Tensor, *rest: Tensor) -> tuple[Tensor, Tensor]:
        state = None
        if self.padded:
            state, rest = SeqState(rest[0], rest[1], has_padding=True), rest[2:]
        caches = [KVCache.over(rest[2 * i], rest[2 * i + 1]) for i in range(len(self.model.layers))]
        with _caches_set(self.model, caches):
            logits = self.model.forward_slot(tokens, DecodeSlot(slots[-1:], slots.shape[0]), state)
        return greedy(logits), logits


def _eager_step(model: Transformer, state: SeqState | None) -> Step:
    def step(token: Tensor, pos: int) -> tuple[Tensor, Tensor]:
        logits = model(token, pos, state)[:, -1]
        return greedy(logits), logits

    return step


@contextmanager
def _caches_set(model: Transformer, caches: list[KVCache | None]) -> Iterator[None]:
    """The model's per-layer KV caches replaced for the duration (restored after)."""
    saved = [layer.attention.kv_cache for layer in model.layers]
    try:
        for layer, cache in zip(model.layers, caches):
            layer.attention.kv_cache = cache
        yield
    finally:
        for layer, cache in zip(model.layers, saved):
            layer.attention.kv_cache = cache
