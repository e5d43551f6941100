"""Greedy generation with a static KV cache: `prefill`, `decode_one_token`, `generate`.

Output length is exact unless ``stop_at_eos`` is set (benchmarks never stop early).
An optional observer sees the boundaries of every step, which is how timing.py measures
pre-processing, the forward and post-processing without touching this loop.
"""
from __future__ import annotations

import weakref
from typing import Callable, Protocol

import torch
from torch import Tensor

from .device import Device
from .model import DecodeSlot, SeqState, Transformer


class StepObserver(Protocol):
    def step_start(self, step: int) -> None: ...
    def forward_start(self, step: int) -> None: ...
    def forward_end(self, step: int) -> None: ...
    def step_end(self, step: int) -> None: ...


class _NoObserver:
    def step_start(self, step: int) -> None:
        pass

    forward_start = forward_end = step_end = step_start


def seq_state(attention_mask: Tensor | None, total_len: int) -> SeqState | None:
    """None when nothing is padded: the model then uses the plain causal fast path."""
    if attention_mask is None or bool(attention_mask.bool().all()):
        return None
    return SeqState.from_attention_mask(attention_mask, total_len)


def prefill(model: Transformer, tokens: Tensor, state: SeqState | None) -> Tensor:
    """Run the prompt, fill the cache, return the last position's logits [B, vocab]."""
    return model(tokens, 0, state, last_only=True)[:, -1]


def decode_one_token(model: Transformer, token: Tensor, pos: int | DecodeSlot, state: SeqState | None) -> Tensor:
    if isinstance(pos, DecodeSlot):
        step = model.compiled_decode or model.forward_slot
        return step(token, pos, state)
    return model(token, pos, state)[:, -1]


class CompiledDecode:
    """The decode step captured as one graph, and the shapes it holds graphs for.

    A graph pins the KV cache tensors it was built with (frozen on cpu, recorded in CUDA graphs), so when
    ``setup_caches`` replaces the cache, or after ``max_shapes`` shapes, every graph is dropped
    (``torch.compiler.reset``): old caches are freed, and a sweep never reaches torch's recompile limit,
    which a fullgraph compile turns into an error.
    """

    def __init__(self, fn: Callable[[Tensor, DecodeSlot, SeqState | None], Tensor], max_shapes: int = 16) -> None:
        self.fn = fn
        self.max_shapes = max_shapes
        self._cache: weakref.ref | None = None
        self._shapes: set[tuple] = set()

    def prepare(self, model: Transformer, shape: tuple) -> None:
        """Call before decoding with a cache set up for ``shape`` (any hashable description of the step)."""
        cache = model.layers[0].attention.kv_cache.k
        replaced = self._cache is not None and self._cache() is not cache
        if replaced or (shape not in self._shapes and len(self._shapes) >= self.max_shapes):
            torch.compiler.reset()
            self._shapes.clear()
        self._cache = weakref.ref(cache)
        self._shapes.add(shape)

    def __call__(self, token: Tensor, slot: DecodeSlot, state: SeqState | None) -> Tensor:
        return self.fn(token, slot, state)


def compile_decode(model: Transformer, device: Device) -> None:
    """Capture the decode step as one graph (gpt-fast's recipe); ``generate`` then replays it every step.

    The first step at each (batch, cache length) compiles, which takes seconds to a minute: warm up per shape.
    """
    import torch._dynamo

    step = CompiledDecode(device.compile(model.forward_slot))
    config = torch._dynamo.config
    limit = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"  # torch < 2.7
    # above the shapes CompiledDecode keeps before it resets, so a fullgraph compile never hits the limit
    setattr(config, limit, max(getattr(config, limit), 2 * step.max_shapes))
    model.compiled_decode = step


def greedy(logits: Tensor) -> Tensor:
    return logits.argmax(dim=-1)


@torch.inference_mode()
def generate(
    model: Transformer,
    input_ids: Tensor,
    max_new_tokens: int,
    attention_mask: Tensor | None = None,
    *,
    eos_id: int | None = None,
    stop_at_eos: bool = False,
    observer: StepObserver | None = None,
) -> Tensor:
    """Greedy continuation [B, max_new_tokens] (positions after EOS hold eos_id when stopping)."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    obs = observer or _NoObserver()
    batch, prompt_len = input_ids.shape
    total = prompt_len + max_new_tokens
    model.setup_caches(batch, total)
    device = model.device

    obs.step_start(0)
    input_ids = input_ids.to(device, non_blocking=True)
    state = seq_state(attention_mask.to(device) if attention_mask is not None else None, total)
    out = torch.empty(batch, max_new_tokens, dtype=torch.long, device=device)
    obs.forward_start(0)
    logits = prefill(model, input_ids, state)
    obs.forward_end(0)
    token = greedy(logits)
    out[:, 0] = token
    done = (token == eos_id) if stop_at_eos and eos_id is not None else None
    obs.step_end(0)

    # Compiled decoding: the step's position is a tensor (one graph for every position), sliced from here.
    slots = None
    if model.compiled_decode is not None:
        slots = torch.arange(total, device=device)
        model.compiled_decode.prepare(model, (batch, total, state is None))
    for step in range(1, max_new_tokens):
        if done is not None and bool(done.all()):
            out[:, step:] = eos_id
            break
        obs.step_start(step)
        current = token.view(batch, 1)
        obs.forward_start(step)
        pos = prompt_len + step - 1
        if slots is not None:
            pos = DecodeSlot(slots[pos : pos + 1], total)
        logits = decode_one_token(model, current, pos, state)
        obs.forward_end(step)
        token = greedy(logits)
        if done is not None:
            token = torch.where(done, torch.full_like(token, eos_id), token)
            done |= token == eos_id
        out[:, step] = token
        obs.step_end(step)
    return out
