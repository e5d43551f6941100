"""Prompts for a serving case, of an exact token length under the served model's tokenizer, salted per run.

A fixed seed would replay the same prompts into the server's prefix cache and make a rerun's first tokens look
many times faster (vllm-project/vllm #54227); so every run mixes a fresh salt into the seed (kept in the row:
``--prompt-salt`` replays it on purpose). Each prompt is text whose encoding has exactly the asked number of
tokens: random token ids, decoded, re-encoded and topped up or cut until the count holds (the server tokenizes
the text; ``usage.prompt_tokens`` is checked against the length afterwards, npuinfer.serving.metrics).

Workloads: ``random`` (default), ``sharegpt FILE`` (ShareGPT JSON: each entry's first human turn is the prompt,
the first answer's length the output length, as vllm bench serve reads it), ``prefix P`` (a shared prefix of P
tokens, then unique suffixes).
"""
from __future__ import annotations

import json
import random
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

from ..tokenizer import Tokenizer
from .stream import Prompt

STABLE_POOL = 4096  # token ids that decode and re-encode to themselves, drawn once per tokenizer
MIN_WORDS = 32  # " word" tokens enough for random prompts; fewer: any stable token joins the pool
WORD = re.compile(r" [A-Za-z]+")
FIT_TRIES = 50


class WorkloadError(ValueError):
    """A workload that cannot be made as asked (the option or file named)."""


@dataclass(frozen=True)
class Workload:
    kind: str  # random | sharegpt | prefix
    source: str = ""  # sharegpt: the file
    prefix_len: int = 0

    @property
    def label(self) -> str:
        return {"random": "random", "sharegpt": f"sharegpt {Path(self.source).name}",
                "prefix": f"prefix {self.prefix_len}"}[self.kind]


def parse_workload(text: str) -> Workload:
    """``random``, ``sharegpt FILE`` or ``prefix P`` (the --workload option)."""
    parts = text.split(maxsplit=1)
    kind = parts[0] if parts else ""
    if kind == "random" and len(parts) == 1:
        return Workload("random")
    if kind == "sharegpt" and len(parts) == 2:
        path = Path(parts[1]).expanduser()
        if not path.is_file():
            raise WorkloadError(f"--workload sharegpt {parts[1]}: no such file")
        return Workload("sharegpt", str(path))
    if kind == "prefix" and len(parts) == 2 and parts[1].isdigit() and int(parts[1]) > 0:
        return Workload("prefix", prefix_len=int(parts[1]))
    raise WorkloadError(f"--workload {text!r}: expected 'random', 'sharegpt FILE' or 'prefix P' (P tokens > 0)")


def new_salt() -> str:
    return secrets.token_hex(4)


_POOLS: dict[int, tuple[Tokenizer, list[int]]] = {}  # id(tokenizer) -> (the tokenizer, kept alive; its pool)


class PromptMaker:
    """Exact-length prompt text under one tokenizer, from a seeded generator."""

    def __init__(self, tokenizer: Tokenizer, seed: int, salt: str):
        self.tokenizer = tokenizer
        self.rng = random.Random(f"{seed}:{salt}")
        if id(tokenizer) not in _POOLS:  # every case (and its warm-up) asks again: the pool is drawn once
            _POOLS[id(tokenizer)] = (tokenizer, self._stable_ids())
        self.pool = _POOLS[id(tokenizer)][1]

    def _stable_ids(self) -> list[int]:
        """Token ids that decode and encode back to themselves. Where the tokenizer has enough of them, only
        words after a space (" word"): a pre-tokenizer splits text at such words, so a run of them encodes back
        to the same ids whatever their neighbours (byte-level BPE, tiktoken, most sentencepiece models)."""
        tok = self.tokenizer
        specials = {tok.bos_id, tok.eos_id, tok.pad_id}
        picker = random.Random(0)  # the pool depends on the tokenizer only
        words: list[int] = []
        others: list[int] = []
        for i in picker.sample(range(tok.vocab_size), min(tok.vocab_size, STABLE_POOL * 8)):
            if i in specials:
                continue
            text = tok.decode([i])
            if not text.strip() or tok.encode(text, add_bos=False) != [i]:
                continue
            (words if WORD.fullmatch(text) else others).append(i)
            if len(words) >= STABLE_POOL:
                break
        pool = words if len(words) >= MIN_WORDS else words + others
        if not pool:
            raise WorkloadError(f"{tok!r}: found no token that decodes and encodes back to itself")
        return pool

    def ids(self, n: int) -> list[int]:
        return [self.rng.choice(self.pool) for _ in range(n)]

    def text(self, n: int, head: str = "") -> str:
        """Text whose tokens after ``head`` number exactly ``n`` when encoded with ``head`` in front."""
        tok = self.tokenizer
        base = len(tok.encode(head, add_bos=False)) if head else 0
        ids = self.ids(n)
        for _ in range(FIT_TRIES):
            body = tok.decode(ids)
            got = tok.encode(head + body, add_bos=False)[base:]
            if len(got) == n:
                return body
            ids = got[:n] if len(got) > n else got + self.ids(n - len(got))
        raise WorkloadError(f"could not make a prompt of exactly {n} tokens with {tok!r} in {FIT_TRIES} tries")


def make_prompts(workload: Workload, tokenizer: Tokenizer, n: int, input_len: int, output_len: int, *, seed: int,
                 salt: str) -> list[Prompt]:
    """``n`` prompts of the workload (plus nothing else: the warm-up asks for its own)."""
    maker = PromptMaker(tokenizer, seed, salt)
    if workload.kind == "random":
        return [Prompt(maker.text(input_len), input_len, output_len) for _ in range(n)]
    if workload.kind == "prefix":
        if workload.prefix_len >= input_len:
            raise WorkloadError(f"--workload prefix {workload.prefix_len}: the prefix must be shorter than the "
                                f"input length {input_len}")
        head = maker.text(workload.prefix_len)
        return [Prompt(head + maker.text(input_len - workload.prefix_len, head), input_len, output_len)
                for _ in range(n)]
    return sharegpt_prompts(Path(workload.source), tokenizer, n, maker, salt)


def prefix_hit_rate(workload: Workload, n: int, input_len: int) -> float | None:
    """The share of prompt tokens a prefix cache can serve: every prompt but the first finds the shared prefix."""
    if workload.kind != "prefix" or n <= 0:
        return None
    return workload.prefix_len * (n - 1) / (n * input_len)


def sharegpt_prompts(path: Path, tokenizer: Tokenizer, n: int, maker: PromptMaker, salt: str) -> list[Prompt]:
    """vllm bench serve's reading of ShareGPT: the first two turns of each conversation (human, then the answer),
    shuffled with the seeded generator; pairs whose prompt or answer is under 4 tokens, whose prompt is over 1024
    or whose sum is over 2048 are passed over. The salt goes in front of every prompt."""
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise WorkloadError(f"--workload sharegpt {path}: not readable as JSON ({exc})") from None
    if not isinstance(entries, list):
        raise WorkloadError(f"--workload sharegpt {path}: expected a JSON list of conversations")
    pairs = []
    for k, entry in enumerate(entries):
        turns = entry.get("conversations") if isinstance(entry, dict) else None
        if not isinstance(turns, list):
            raise WorkloadError(f"--workload sharegpt {path}: entry {k} has no 'conversations' list")
        if len(turns) >= 2 and all(isinstance(t, dict) and isinstance(t.get("value"), str) for t in turns[:2]):
            pairs.append((turns[0]["value"], turns[1]["value"]))
    maker.rng.shuffle(pairs)
    prompts = []
    for question, answer in pairs:
        text = f"[{salt}] {question}"
        prompt_len = len(tokenizer.encode(text, add_bos=False))
        output_len = len(tokenizer.encode(answer, add_bos=False))
        if prompt_len < 4 or output_len < 4 or prompt_len > 1024 or prompt_len + output_len > 2048:
            continue
        prompts.append(Prompt(text, prompt_len, output_len))
        if len(prompts) == n:
            return prompts
    raise WorkloadError(f"--workload sharegpt {path}: {len(prompts)} usable conversations, --num-prompts asks {n}")
