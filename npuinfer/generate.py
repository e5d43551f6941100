"""Greedy generation with a static KV cache: `prefill`, `decode_one_token`, `generate`.

Output length is exact unless ``stop_at_eos`` is set (benchmarks never stop early).
An optional observer sees the boundaries of every step, which is how timing.py measures
pre-processing, the forward and post-processing without touching this loop.

Non-finite logits (a NaN weight, fp16 overflow) raise `NonFiniteLogits` naming the step. The check
costs no extra device work per step and no host synchronization: the greedy choice is made with
``max`` (value and index in one reduction, the index as argmax's), the chosen values are kept, and
they are checked once, after the last step. NaN wins max and inf is the max, so a step whose
logits hold either is caught.
"""
from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from .model import LAST_POSITION, SeqState, Transformer


class StepObserver(Protocol):
    def step_start(self, step: int) -> None: ...
    def forward_start(self, step: int) -> None: ...
    def forward_end(self, step: int) -> None: ...
    def step_end(self, step: int) -> None: ...


class NoObserver:
    """A StepObserver that does nothing: what `generate` runs with when given none."""

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
    return model(tokens, 0, state, logits_at=LAST_POSITION)[:, -1]


def decode_one_token(model: Transformer, token: Tensor, pos: int, state: SeqState | None) -> Tensor:
    return model(token, pos, state)[:, -1]


def greedy(logits: Tensor) -> Tensor:
    return logits.argmax(dim=-1)


class NonFiniteLogits(RuntimeError):
    """The model produced NaN or inf logits: its tokens are meaningless."""

    def __init__(self, step: int, rows: list[int]):
        self.step, self.rows = step, rows
        where = "the prompt's forward (step 0, prefill)" if step == 0 else f"decode step {step}"
        super().__init__(
            f"non-finite logits (NaN or inf) at {where}, batch row(s) {', '.join(map(str, rows))}: the model's "
            "output is not a number; look for NaN / inf in the weights, or an fp16 overflow (try --dtype bf16 "
            "or fp32)")


def choose_greedy(logits: Tensor, chosen: list[Tensor] | None) -> Tensor:
    """The greedy token; with ``chosen``, its logit is appended there (max: value and index in one reduction,
    the index the same as argmax's, the first maximum)."""
    if chosen is None:
        return greedy(logits)
    value, token = logits.max(dim=-1)
    chosen.append(value)
    return token


def check_finite(chosen: list[Tensor]) -> None:
    """Raise NonFiniteLogits for the first step whose chosen logits (one [B] tensor per step) are not finite."""
    if not chosen:
        return
    finite = torch.isfinite(torch.cat(chosen).view(len(chosen), -1))  # [steps, B]; cat is cheaper than stack
    if bool(finite.all()):  # the one host synchronization of the check
        return
    step = int((~finite).any(dim=1).nonzero()[0, 0])
    raise NonFiniteLogits(step, (~finite[step]).nonzero().flatten().tolist())


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
    check_logits: bool = True,
) -> Tensor:
    """Greedy continuation [B, max_new_tokens] (positions after EOS hold eos_id when stopping).

    Raises NonFiniteLogits when a step's logits are NaN or inf (``check_logits=False``: not checked, for
    measuring what the check costs)."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    obs = observer or NoObserver()
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
    chosen: list[Tensor] = []  # the chosen token's logit per step, checked after the last step
    token = choose_greedy(logits, chosen if check_logits else None)
    out[:, 0] = token
    done = (token == eos_id) if stop_at_eos and eos_id is not None else None
    obs.step_end(0)

    # the captured step (decode_graph), built on the first run at a new shape that has a decode step at all
    compiled = None
    if model.compiled_decode is not None and max_new_tokens > 1:
        compiled = model.compiled_decode.prepare(model, batch, total, state)
    for step in range(1, max_new_tokens):
        if done is not None and bool(done.all()):
            out[:, step:] = eos_id
            break
        obs.step_start(step)
        current = token.view(batch, 1)
        obs.forward_start(step)
        pos = prompt_len + step - 1
        if compiled:  # the captured step includes the greedy choice
            token, logits = compiled(current, pos)
            obs.forward_end(step)
            if check_logits:
                chosen.append(logits.gather(-1, token.view(-1, 1)).view(-1))
        else:
            logits = decode_one_token(model, current, pos, state)
            obs.forward_end(step)
            token = choose_greedy(logits, chosen if check_logits else None)
        if done is not None:
            token = torch.where(done, torch.full_like(token, eos_id), token)
            done |= token == eos_id
        out[:, step] = token
        obs.step_end(step)
    check_finite(chosen)
    return out
