"""Scoring C-Eval questions with a loaded model: log-likelihood of each choice, or generate-and-parse.

Modes
  prefix    (default) the k-shot prefix of a subject is run once at batch 1; a batch of questions then runs
            only their own tokens, attending to that one copy of the prefix's K/V (generate mode copies it
            into every row of its cache, which decoding extends).
  naive     every question runs its whole prompt from position 0 (the reference the prefix mode must equal).
  generate  greedy decoding of up to ``max_new_tokens``; the prediction is the first letter A-D of the text
            (the Ascend tool's extraction); uses the cached prefix too.

Log-likelihood as lm-evaluation-harness computes it (the ids: npuinfer.ceval.encoding): the context is encoded
alone, context + continuation together, and the continuation's tokens are what the joint encoding has after the
context's length (whitespace at the end of the context moves to the continuation first). The score of a choice
is the sum of the log-probabilities of its continuation tokens; the prediction is the highest (first on a tie).

One forward per question: all four continuations are read from one row. A continuation of one token needs
only the logits at the context's last position; a longer one needs its own earlier tokens fed after the
context. Rows are the distinct longest such "tails" (usually one: " A" .. " D" are single tokens for every
real tokenizer, or share a leading "▁"), and each choice reads the row whose tail starts with its own.

The model always sees the ids of each question's own joint encoding, as in the naive mode. The cache holds
the longest run of the prefix's tokens that the questions' encodings all start with (a tokenizer may merge the
prefix's last token or two differently once a question follows); a question sharing less runs its full
prompt and is counted in ``ScoringStats.fallbacks``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field

import torch

from npuinfer.ceval.dataset import CHOICES, Question
from npuinfer.ceval.encoding import PromptEncoder, lmeval_split
from npuinfer.ceval.prompts import (
    Template,
    build_prefix,
    first_choice_letter,
    fit_shots_for_subject,
    get_template,
)
from npuinfer.ceval.scored import ScoredRow
from npuinfer.model import SeqState

SCORING_MODES: tuple[str, ...] = ("prefix", "naive", "generate")
DEFAULT_BATCH_SIZE = 8
DEFAULT_MAX_NEW_TOKENS = 8
NO_LETTER = ""  # prediction when a generation holds no letter A-D


@dataclass
class ScoringStats:
    """What the model was asked to do; ``prompt_tokens`` is the figure prefix caching reduces."""

    questions: int = 0
    prompt_tokens: int = 0  # real tokens run through the model (prefixes once, then question rows)
    padded_tokens: int = 0  # positions computed, right padding included
    prefix_tokens: int = 0  # of prompt_tokens: tokens of cached prefixes
    forwards: int = 0  # model calls with prompt tokens (decode steps of generate not included)
    generated_tokens: int = 0  # decode positions computed in generate mode (rows x steps)
    fallbacks: int = 0  # questions run without the cached prefix (tokenizer merged across the boundary)
    truncated: int = 0  # questions whose zero-shot prompt alone was over the length budget (cut from the left)
    shots: dict[str, int] = field(default_factory=dict)  # shots actually used per subject
    nonfinite: list[str] = field(default_factory=list)  # question ids not scored: NaN / inf logits

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass(frozen=True)
class QuestionScore:
    row: ScoredRow
    logprobs: tuple[float, ...] | None  # per choice A..D (log-likelihood modes)
    generated: str | None  # decoded generation (generate mode)
    cached_prefix: bool  # False: ran its full prompt (naive mode, or a fallback)


@dataclass
class _Item:
    question: Question
    start: int  # 0, or the cached prefix's length
    tokens: list[int]  # context tokens after ``start``
    conts: list[list[int]]  # continuation tokens per choice (log-likelihood modes)
    rows: list[list[int]]  # tokens fed after ``start``: context part + one tail each
    row_of: list[int]  # choice -> index into rows


# How many of the prefix's last tokens a tokenizer may merge differently once a question follows.
BOUNDARY_SLACK = 4


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:  # the usual case, compared in C
        return n
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def _tail_rows(conts: Sequence[Sequence[int]]) -> tuple[list[tuple[int, ...]], list[int]]:
    """Distinct longest tails (continuation minus its last token) and, per choice, the tail it reads."""
    tails = [tuple(c[:-1]) for c in conts]
    longest = []
    for t in sorted(set(tails), key=len, reverse=True):
        if not any(u[: len(t)] == t for u in longest):
            longest.append(t)
    longest.sort()  # deterministic order
    return longest, [next(i for i, u in enumerate(longest) if u[: len(t)] == t) for t in tails]


class SubjectScorer:
    """Scores the questions of one subject: prompt building, shot fitting, batching, the forwards."""

    def __init__(self, loaded, subject: str, dev_rows: Sequence[Question], questions: Sequence[Question],
                 template: Template | str = "lmeval", shots: int = 5, mode: str = "prefix",
                 batch_size: int = DEFAULT_BATCH_SIZE, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                 max_prompt_tokens: int | None = None, stats: ScoringStats | None = None) -> None:
        if mode not in SCORING_MODES:
            raise ValueError(f"scoring mode: expected one of {', '.join(SCORING_MODES)}, got {mode!r}")
        if batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {batch_size}")
        if mode == "generate" and max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        for q in questions:
            if q.subject != subject:
                raise ValueError(f"question id {q.question_id} is from {q.subject!r}, not {subject!r}")
        self.model = loaded.model
        self.tok = loaded.tokenizer
        self.subject = subject
        self.template = get_template(template)
        self.mode = mode
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.stats = stats if stats is not None else ScoringStats()
        self.questions = list(questions)
        self._prompts = PromptEncoder(self.tok)
        self._holds_prefix: tuple[object, list[object]] | None = None  # (prefix K/V, the caches holding it)
        self.budget = self._budget(max_prompt_tokens)
        self.shots = self._fit_shots(dev_rows, shots) if self.questions else []
        self.stats.shots[subject] = len(self.shots)
        self.prefix_text = build_prefix(self.template, subject, self.shots)
        self._prompts.add_head(self.prefix_text)

    # ---- prompts -------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Memoized (shot fitting encodes every question's full prompt, which scoring needs again), and a
        prompt's shared head is not re-encoded (see encoding.PromptEncoder)."""
        return self._prompts.encode(text)

    def _budget(self, max_prompt_tokens: int | None) -> int:
        """Most context tokens a question may have: room is left for the tails or the generated tokens."""
        if self.mode == "generate":
            reserve = self.max_new_tokens
        else:
            probe = self.template.render_description(self.subject) + self.template.render_block(
                self.questions[0]) if self.questions else "x"
            reserve = max(len(c) for c in lmeval_split(self.tok.encode, probe, self.template.continuations,
                                                       self.tok.splits_after_newlines)[1])
        budget = self.model.args.max_seq_len - reserve
        if max_prompt_tokens is not None:
            budget = min(budget, max_prompt_tokens)
        if budget < 1:
            raise ValueError(f"no room for a prompt: max_seq_len {self.model.args.max_seq_len}, "
                             f"{reserve} tokens reserved after it")
        return budget

    def _fit_shots(self, dev_rows: Sequence[Question], k: int) -> list[Question]:
        """The first k dev rows, dropped from the end until the longest question fits.

        Questions too long even without shots are left out of the fit (they are cut from the left when
        scored, as lm-eval does); they must not cost every other question its shots.
        """
        if k == 0:
            return []
        for n in range(1, min(k, len(dev_rows)) + 1):
            self._prompts.add_head(build_prefix(self.template, self.subject, dev_rows[:n]))
        description = self.template.render_description(self.subject)

        def fits_alone(q: Question) -> bool:
            return len(self.encode(description + self.template.render_block(q))) <= self.budget

        return fit_shots_for_subject(self.template, self.subject, dev_rows, self.questions, k,
                                     lambda text: len(self.encode(text)), self.budget, fits_alone)

    def _encode(self, q: Question) -> tuple[list[int], list[list[int]], bool]:
        """(context ids, continuation ids, truncated) of one question, lm-eval style."""
        context = self.prefix_text + self.template.render_block(q)
        if self.mode == "generate":
            ctx, conts = self.encode(context), []
        else:
            ctx, conts = lmeval_split(self.encode, context, self.template.continuations,
                                      self.tok.splits_after_newlines)
        extra = max((len(c) - 1 for c in conts), default=0)  # tail tokens fed after the context
        limit = min(self.budget, self.model.args.max_seq_len - extra)
        if len(ctx) > limit:
            self.stats.truncated += 1
            return ctx[-limit:], conts, True  # lm-eval keeps the last tokens of an over-long input
        return ctx, conts, False

    def _item(self, q: Question, ctx: list[int], conts: list[list[int]], start: int) -> _Item:
        tokens = ctx[start:]
        if self.mode == "generate":
            return _Item(q, start, tokens, conts, [tokens], [])
        tails, row_of = _tail_rows(conts)
        return _Item(q, start, tokens, conts, [tokens + list(t) for t in tails], row_of)

    def _cached_length(self, prefix_ids: list[int], encoded: list[tuple[list[int], list, bool]]) -> list[int]:
        """Per question, how many leading tokens come from the cached prefix (0: runs its full prompt).

        The cache holds the longest run of the prefix's tokens that every question's joint encoding starts
        with: a tokenizer that merges differently at the boundary (Qwen's "\n\n" alone is one token, before
        a question two) costs the last token or two, not the cache. A question sharing less than that falls back.
        """
        shared = [_common_prefix(prefix_ids, ctx) if not truncated and len(ctx) > 1 else 0
                  for ctx, _, truncated in encoded]
        usable = [n for n in shared if n >= len(prefix_ids) - BOUNDARY_SLACK and n > 0]
        length = min(min(usable, default=0), min(len(ctx) for ctx, _, _ in encoded) - 1)
        starts = [length if length > 0 and n >= length else 0 for n in shared]
        self.stats.fallbacks += sum(1 for n, (_, _, truncated) in zip(starts, encoded) if n == 0 and not truncated)
        return starts

    # ---- running -------------------------------------------------------------------------------
    @torch.inference_mode()
    def __iter__(self) -> Iterator[QuestionScore]:
        if not self.questions:
            return
        encoded = [self._encode(q) for q in self.questions]
        starts = [0] * len(encoded)
        if self.mode != "naive":
            starts = self._cached_length(self.tok.encode(self.prefix_text), encoded)
        items = [self._item(q, ctx, conts, start) for q, (ctx, conts, _), start in zip(self.questions, encoded, starts)]
        self._prompts.clear()
        prefix_kv = None
        if any(starts):
            cached = max(starts)
            prefix_kv = self._run_prefix(encoded[starts.index(cached)][0][:cached])
        # Longest first: less padding per batch, and a batch too big for the device fails at once.
        items.sort(key=lambda it: max(len(r) for r in it.rows), reverse=True)
        for start in sorted({it.start for it in items}, reverse=True):
            group = [it for it in items if it.start == start]
            kv = prefix_kv if start else None
            for batch in self._batches(group):
                if self.mode == "generate":
                    yield from self._generate(batch, start, kv)
                else:
                    yield from self._loglikelihood(batch, start, kv)

    def _batches(self, items: list[_Item]) -> Iterator[list[_Item]]:
        batch: list[_Item] = []
        rows = 0
        width = 0
        for it in items:  # longest first
            length = max(len(r) for r in it.rows)
            # A new batch also when this row would be padded to over 9/8 of its length (and the batch is not
            # tiny): fewer padded positions computed (4% of a prefix-cached run at 4/3); results do not depend
            # on the batching.
            if batch and (rows + len(it.rows) > self.batch_size or (rows >= 4 and 8 * width > 9 * length)):
                yield batch
                batch, rows = [], 0
            if not batch:
                width = length
            batch.append(it)
            rows += len(it.rows)
        if batch:
            yield batch

    def _run_prefix(self, prefix_ids: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Run the prefix once at batch 1; a copy of every layer's K/V for slots [0, P)."""
        p = len(prefix_ids)
        kv = self.model.prefix_kv(torch.tensor([prefix_ids], device=self.model.device))
        self.stats.prompt_tokens += p
        self.stats.prefix_tokens += p
        self.stats.padded_tokens += p
        self.stats.forwards += 1
        return kv

    def _prepare(self, n_rows: int, start: int, length: int, kv) -> None:
        """Cache for this batch; the prefix K/V is copied only into a cache that does not hold it yet.

        ``setup_caches`` keeps a cache of the same batch size that is long enough, and a forward writes only
        slots start..start+T, so slots [0, start) still hold the prefix from the previous batch of the subject.
        """
        model = self.model
        model.setup_caches(n_rows, start + length)
        if kv is None:
            self._holds_prefix = None  # this batch writes from slot 0
            return
        caches = [layer.attention.kv_cache for layer in model.layers]
        if self._holds_prefix is not None and self._holds_prefix[0] is kv and all(
                a is b for a, b in zip(self._holds_prefix[1], caches)):
            return
        for cache, (k, v) in zip(caches, kv):
            cache.update(0, k, v)  # slots [0, start), into every row
        self._holds_prefix = (kv, caches)

    def _count(self, rows: Sequence[Sequence[int]], width: int) -> None:
        self.stats.prompt_tokens += sum(len(r) for r in rows)
        self.stats.padded_tokens += len(rows) * width
        self.stats.forwards += 1

    def _loglikelihood(self, batch: list[_Item], start: int, kv) -> Iterator[QuestionScore]:
        model = self.model
        rows = [r for it in batch for r in it.rows]
        width = max(len(r) for r in rows)
        # Right padding: under the causal mask a real token never sees the padding after it.
        ids = torch.full((len(rows), width), self.tok.pad_id, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        first = min(len(it.tokens) for it in batch) - 1  # no continuation is read before this position
        if kv is None:
            model.setup_caches(len(rows), width)
            self._holds_prefix = None  # this forward writes from slot 0
        # With a cached prefix the rows attend to its one copy in place: no cache, nothing copied per row.
        logits = model(ids.to(model.device), start, logits_from=first, prefix=kv)
        self._count(rows, width)
        # Gather the logits every continuation token needs: row, position, token.
        row_idx, pos_idx, tok_idx, owner = [], [], [], []
        base = 0
        for n, it in enumerate(batch):
            last = len(it.tokens) - 1  # the context's last position predicts a continuation's first token
            for c, cont in enumerate(it.conts):
                for j, t in enumerate(cont):
                    row_idx.append(base + it.row_of[c])
                    pos_idx.append(last + j - first)
                    tok_idx.append(t)
                    owner.append((n, c))
            base += len(it.rows)
        picked = logits[torch.tensor(row_idx), torch.tensor(pos_idx)].float().log_softmax(-1)
        token_lp = picked[torch.arange(len(tok_idx)), torch.tensor(tok_idx)].tolist()
        sums = [[0.0] * len(CHOICES) for _ in batch]
        for (n, c), lp in zip(owner, token_lp):
            sums[n][c] += lp
        self.stats.questions += len(batch)
        for it, lps in zip(batch, sums):
            q = it.question
            if not all(math.isfinite(lp) for lp in lps):  # NaN / inf logits: an error, never a prediction
                self.stats.nonfinite.append(q.question_id)
                continue
            best = max(range(len(lps)), key=lambda c: (lps[c], -c))  # first of equal maxima, as argmax
            yield QuestionScore(ScoredRow.make(q.subject, q.question_id, q.answer, CHOICES[best]),
                                tuple(lps), None, it.start > 0)

    def _generate(self, batch: list[_Item], start: int, kv) -> Iterator[QuestionScore]:
        """Greedy decoding; question tokens left-padded between the prefix and the new tokens."""
        model, tok = self.model, self.tok
        rows = [it.tokens for it in batch]
        width = max(len(r) for r in rows)
        total = start + width + self.max_new_tokens
        ids = torch.full((len(rows), width), tok.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), start + width), dtype=torch.long)
        mask[:, :start] = 1
        for i, r in enumerate(rows):
            ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
            mask[i, start + width - len(r):] = 1
        self._prepare(len(rows), start, width + self.max_new_tokens, kv)
        device = model.device
        state = SeqState.from_attention_mask(mask.to(device), total)
        value, next_ids = model(ids.to(device), start, state, last_only=True)[:, -1].max(-1)
        finite = torch.isfinite(value)  # per row; NaN wins max, inf is the max
        self._count(rows, width)
        out: list[list[int]] = [[] for _ in rows]
        letters: list[str | None] = [None] * len(rows)
        done = [False] * len(rows)
        for step in range(self.max_new_tokens):
            for i, t in enumerate(next_ids.tolist()):
                if done[i]:
                    continue
                if t == tok.eos_id:
                    done[i] = True
                    continue
                out[i].append(t)
                letters[i] = first_choice_letter(tok.decode(out[i]))
                done[i] = letters[i] is not None
            if all(done) or step == self.max_new_tokens - 1:
                break
            value, next_ids = model(next_ids.view(-1, 1), start + width + step, state)[:, -1].max(-1)
            finite &= torch.isfinite(value)
            self.stats.generated_tokens += len(rows)
        self.stats.questions += len(batch)
        for it, ids_out, letter, ok in zip(batch, out, letters, finite.tolist()):
            q = it.question
            if not ok:  # NaN / inf logits: an error, never a prediction
                self.stats.nonfinite.append(q.question_id)
                continue
            yield QuestionScore(ScoredRow.make(q.subject, q.question_id, q.answer, letter or NO_LETTER),
                                None, tok.decode(ids_out), it.start > 0)


def score_subject(loaded, subject: str, dev_rows: Sequence[Question], questions: Sequence[Question],
                  template: Template | str = "lmeval", shots: int = 5, mode: str = "prefix",
                  batch_size: int = DEFAULT_BATCH_SIZE, *, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                  max_prompt_tokens: int | None = None, stats: ScoringStats | None = None,
                  skip: frozenset[str] | set[str] = frozenset()) -> Iterator[QuestionScore]:
    """Score the questions of one subject; yields one QuestionScore per question as its batch finishes.

    ``loaded`` is a runtime.LoadedModel (its ``model``, ``tokenizer`` are used). Shots are the first
    ``shots`` dev rows, dropped from the end until the prompt of the longest question fits the model's
    length; they are fitted against all ``questions``, including those in ``skip`` (ids already scored,
    e.g. on resume), so a resumed run uses the same prompt. ``stats`` accumulates token counts.
    Yield order is scoring order (longest prompts first), not file order.
    """
    scorer = SubjectScorer(loaded, subject, dev_rows, questions, template, shots, mode, batch_size,
                           max_new_tokens, max_prompt_tokens, stats)
    if skip:
        scorer.questions = [q for q in scorer.questions if q.question_id not in skip]
    return iter(scorer)
