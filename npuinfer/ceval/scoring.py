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

The head sees only the positions a continuation reads (the hidden states are gathered first): one per row for
single-token choices, two where " A" is "▁" + "A"; never a [rows, length, vocab] tensor. It runs once for the
positions of several batches (HEAD_POSITIONS, and the rest at the end of a subject), and a token's
log-probability is its logit less its position's log-sum-exp, over the vocabulary in chunks
(Transformer.head_logprobs): on a Qwen-sized vocabulary a head and a [rows, reads, vocab] log_softmax per
batch were ~40% of prefix-cached scoring on cpu.

Fitting to the model's length L as lm-eval does: a choice is fed ``(context + continuation)[-(L + 1):][:-1]``,
so a continuation of n tokens leaves L - (n - 1) positions to its context, and an over-long prompt loses its
first tokens (``fit="truncate"``, the lmeval template's default); ``fit="shots"`` drops shots for the whole
subject first (prompts.FITS). Counted per subject in ``ScoringStats.prompt_fit``.

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
    first_shots,
    fit_shots_for_subject,
    get_template,
    resolve_fit,
)
from npuinfer.ceval.scored import ScoredRow
from npuinfer.model import LAST_POSITION, SeqState

SCORING_MODES: tuple[str, ...] = ("prefix", "naive", "generate")
DEFAULT_BATCH_SIZE = 8
DEFAULT_MAX_NEW_TOKENS = 8
NO_LETTER = ""  # prediction when a generation holds no letter A-D


@dataclass(frozen=True)
class PromptFit:
    """How one subject's prompts were fitted to the model's length, over all its questions (skipped ones too,
    so a resumed run reports the same)."""

    shots: int  # shots in every prompt of the subject
    dropped_shots: int  # shots asked for but dropped to fit (fit="shots")
    truncated: int  # prompts cut from the left (fit="truncate", or a question too long even alone)


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
    truncated: int = 0  # scored questions whose prompt was cut from the left (over the model's length)
    shots: dict[str, int] = field(default_factory=dict)  # shots actually used per subject
    nonfinite: list[str] = field(default_factory=list)  # question ids not scored: NaN / inf logits
    prompt_fit: dict[str, PromptFit] = field(default_factory=dict)  # per subject

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
    conts: list[list[int]]  # continuation tokens per choice (log-likelihood modes)
    rows: list[list[int]]  # tokens fed after ``start``: context part + one tail each (generate: the context)
    contexts: list[int]  # per row, how many of its tokens are context (the rest is its tail)
    row_of: list[int]  # choice -> index into rows


class _HeadReads:
    """Read positions of scored batches waiting for the head, which then runs once over all of them.

    A pass of the head reads its whole weight (151,936 rows: 39 MB at qwen-tiny's width, 1.2 GB for qwen-7b in
    fp16), and a prefix-cached batch reads only one or two positions per question: so the hidden states of
    several batches are gathered and the head is applied to them together.
    """

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self.items: list[_Item] = []
        self.hidden: list[torch.Tensor] = []  # [n, dim] per batch: the distinct positions its choices read
        self.positions = 0
        self.position_of: list[int] = []  # per continuation token: its position among all gathered
        self.tokens: list[int] = []  # per continuation token: its id
        self.owner: list[tuple[int, int]] = []  # per continuation token: (item index, choice)

    def __len__(self) -> int:
        return self.positions

    def add(self, batch: list[_Item], hidden: torch.Tensor, reads: int) -> None:
        """``hidden`` [rows, reads, dim]: the batch's rows in order, ``reads`` positions each."""
        used: dict[int, int] = {}  # flat index into hidden -> position among all gathered
        row = 0
        for it in batch:
            n = len(self.items)
            self.items.append(it)
            for c, cont in enumerate(it.conts):
                for j, t in enumerate(cont):
                    flat = (row + it.row_of[c]) * reads + j
                    self.position_of.append(used.setdefault(flat, self.positions + len(used)))
                    self.tokens.append(t)
                    self.owner.append((n, c))
            row += len(it.rows)
        self.hidden.append(hidden.reshape(-1, hidden.shape[-1])[torch.tensor(list(used), device=hidden.device)])
        self.positions += len(used)

    def logprob_sums(self, model) -> tuple[list[_Item], list[list[float]]]:
        """The gathered items and, per item, each choice's summed log-probability; then empties the queue."""
        device = self.hidden[0].device
        token_lp = model.head_logprobs(torch.cat(self.hidden), torch.tensor(self.position_of, device=device),
                                       torch.tensor(self.tokens, device=device)).tolist()
        sums = [[0.0] * len(CHOICES) for _ in self.items]
        for (n, c), lp in zip(self.owner, token_lp):
            sums[n][c] += lp
        items = self.items
        self.clear()
        return items, sums


# Read positions gathered before the head runs (and at the end of a subject): enough that reading the head's
# weight is a small part of a pass, few enough that a pass's [positions, HEAD_CHUNK] logits stay in cache.
HEAD_POSITIONS = 128

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
    """Scores the questions of one subject: prompt building, fitting to the model's length, batching, the forwards.

    ``max_length``: lm-eval's max_length, the most tokens a row may hold (default and ceiling: the model's
    max_seq_len). ``fit``: prompts.FITS, None for the template's default.
    """

    def __init__(self, loaded, subject: str, dev_rows: Sequence[Question], questions: Sequence[Question],
                 template: Template | str = "lmeval", shots: int = 5, mode: str = "prefix",
                 batch_size: int = DEFAULT_BATCH_SIZE, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                 max_length: int | None = None, stats: ScoringStats | None = None, fit: str | None = None) -> None:
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
        self.fit_mode = resolve_fit(fit, self.template)
        self.mode = mode
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.stats = stats if stats is not None else ScoringStats()
        self.questions = list(questions)
        self._prompts = PromptEncoder(self.tok)
        self._split: dict[str, tuple[list[int], list[list[int]]]] = {}  # question id -> (context, continuations)
        self._holds_prefix: tuple[object, list[object]] | None = None  # (prefix K/V, the caches holding it)
        self._reads = _HeadReads()
        self.max_length = min(self.model.args.max_seq_len, max_length or self.model.args.max_seq_len)
        self.budget = self._budget()
        self.shots = self._choose_shots(dev_rows, shots) if self.questions else []
        self.prefix_text = build_prefix(self.template, subject, self.shots)
        self._prompts.add_head(self.prefix_text)
        self.fit = PromptFit(shots=len(self.shots),
                             dropped_shots=shots - len(self.shots) if self.questions else 0,
                             truncated=sum(self._is_cut(q) for q in self.questions))
        self.stats.shots[subject] = len(self.shots)
        self.stats.prompt_fit[subject] = self.fit

    # ---- prompts -------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Memoized (shot fitting encodes every question's full prompt, which scoring needs again), and a
        prompt's shared head is not re-encoded (see encoding.PromptEncoder)."""
        return self._prompts.encode(text)

    def _budget(self) -> int:
        """Most context tokens a prompt may hold uncut: the model's length less the tail a continuation adds
        (lm-eval feeds a continuation of n tokens after L - (n - 1) context tokens; the last one is never fed),
        or less the tokens generate mode adds."""
        if self.mode == "generate":
            reserve = self.max_new_tokens
        else:
            probe = self.template.render_description(self.subject) + self.template.render_block(
                self.questions[0]) if self.questions else "x"
            reserve = max(len(c) for c in lmeval_split(self.tok.encode, probe, self.template.continuations,
                                                       self.tok.splits_after_newlines)[1]) - 1
        budget = self.max_length - reserve
        if budget < 1:
            raise ValueError(f"no room for a prompt: max length {self.max_length}, "
                             f"{reserve} tokens reserved after it")
        return budget

    def _choose_shots(self, dev_rows: Sequence[Question], k: int) -> list[Question]:
        """fit "truncate": the first k dev rows. fit "shots": the first k, dropped from the end until the
        longest question fits.

        Questions too long even without shots are left out of that fit (they are cut from the left when
        scored, as lm-eval does); they must not cost every other question its shots.
        """
        if self.fit_mode == "truncate" or k == 0:
            return first_shots(dev_rows, k)
        for n in range(1, min(k, len(dev_rows)) + 1):
            self._prompts.add_head(build_prefix(self.template, self.subject, dev_rows[:n]))
        description = self.template.render_description(self.subject)

        def fits_alone(q: Question) -> bool:
            return len(self.encode(description + self.template.render_block(q))) <= self.budget

        return fit_shots_for_subject(self.template, self.subject, dev_rows, self.questions, k,
                                     lambda text: len(self.encode(text)), self.budget, fits_alone)

    def _encode(self, q: Question) -> tuple[list[int], list[list[int]]]:
        """(context ids, continuation ids per choice) of one question, lm-eval style, whole (uncut)."""
        split = self._split.get(q.question_id)
        if split is None:
            context = self.prefix_text + self.template.render_block(q)
            if self.mode == "generate":
                split = self.encode(context), []
            else:
                split = lmeval_split(self.encode, context, self.template.continuations,
                                     self.tok.splits_after_newlines)
            self._split[q.question_id] = split
        return split

    def _is_cut(self, q: Question) -> bool:
        """Whether lm-eval's truncation cuts this question's prompt for some choice."""
        ctx, conts = self._encode(q)
        if self.mode == "generate":
            return len(ctx) > self.budget
        return any(len(ctx) + len(c) - 1 > self.max_length for c in conts)

    def _item(self, q: Question, ctx: list[int], conts: list[list[int]], start: int, cut: bool) -> _Item:
        if self.mode == "generate":
            tokens = ctx[-self.budget:] if cut else ctx[start:]
            return _Item(q, start, conts, [tokens], [len(tokens)], [])
        if not cut:
            context = ctx[start:]
            tails, row_of = _tail_rows(conts)
            return _Item(q, start, conts, [context + list(t) for t in tails], [len(context)] * len(tails), row_of)
        # lm-eval feeds each choice (context + continuation)[-(L + 1):][:-1]: the context keeps its last
        # L - (n - 1) tokens for a continuation of n; choices keeping as many share rows as uncut ones do.
        keeps: dict[int, list[int]] = {}
        for c, cont in enumerate(conts):
            keeps.setdefault(min(len(ctx), self.max_length - (len(cont) - 1)), []).append(c)
        rows: list[list[int]] = []
        contexts: list[int] = []
        row_of = [0] * len(conts)
        for keep in sorted(keeps, reverse=True):
            choices = keeps[keep]
            tails, of = _tail_rows([conts[c] for c in choices])
            for c, r in zip(choices, of):
                row_of[c] = len(rows) + r
            rows += [ctx[len(ctx) - keep:] + list(t) for t in tails]
            contexts += [keep] * len(tails)
        return _Item(q, 0, conts, rows, contexts, row_of)

    def _cached_length(self, prefix_ids: list[int], encoded: list[tuple[list[int], list]],
                       cut: list[bool]) -> list[int]:
        """Per question, how many leading tokens come from the cached prefix (0: runs its full prompt).

        The cache holds the longest run of the prefix's tokens that every question's joint encoding starts
        with: a tokenizer that merges differently at the boundary (Qwen's "\n\n" alone is one token, before
        a question two) costs the last token or two, not the cache. A question sharing less than that falls
        back; a cut question (its first tokens are not the prefix's) runs in full too.
        """
        shared = [_common_prefix(prefix_ids, ctx) if not c and len(ctx) > 1 else 0
                  for (ctx, _), c in zip(encoded, cut)]
        usable = [n for n in shared if n >= len(prefix_ids) - BOUNDARY_SLACK and n > 0]
        length = min(min(usable, default=0), min((len(ctx) for (ctx, _), c in zip(encoded, cut) if not c),
                                                 default=1) - 1)
        starts = [length if length > 0 and n >= length else 0 for n in shared]
        self.stats.fallbacks += sum(1 for n, c in zip(starts, cut) if n == 0 and not c)
        return starts

    # ---- running -------------------------------------------------------------------------------
    @torch.inference_mode()
    def __iter__(self) -> Iterator[QuestionScore]:
        if not self.questions:
            return
        encoded = [self._encode(q) for q in self.questions]
        cut = [self._is_cut(q) for q in self.questions]
        self.stats.truncated += sum(cut)
        starts = [0] * len(encoded)
        if self.mode != "naive":
            starts = self._cached_length(self.tok.encode(self.prefix_text), encoded, cut)
        items = [self._item(q, ctx, conts, start, c)
                 for q, (ctx, conts), start, c in zip(self.questions, encoded, starts, cut)]
        self._prompts.clear()
        self._split.clear()
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
                    continue
                self._loglikelihood(batch, start, kv)
                if len(self._reads) >= HEAD_POSITIONS:
                    yield from self._scores()
        if self._reads:
            yield from self._scores()

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

    def _loglikelihood(self, batch: list[_Item], start: int, kv) -> None:
        """Run one batch up to the head: its read positions' hidden states join ``self._reads``."""
        model = self.model
        rows = [r for it in batch for r in it.rows]
        contexts = [n for it in batch for n in it.contexts]
        width = max(len(r) for r in rows)
        # Right padding: under the causal mask a real token never sees the padding after it.
        ids = torch.full((len(rows), width), self.tok.pad_id, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        # The positions a continuation reads: a row's last context position (it predicts a continuation's first
        # token) and its tail's. Rows with fewer repeat their last one; only those read go on to the head.
        reads = max(len(r) - n + 1 for r, n in zip(rows, contexts))
        at = torch.tensor([[n - 1 + min(k, len(r) - n) for k in range(reads)] for r, n in zip(rows, contexts)])
        if kv is None:
            model.setup_caches(len(rows), width)
            self._holds_prefix = None  # this forward writes from slot 0
        # With a cached prefix the rows attend to its one copy in place: no cache, nothing copied per row.
        hidden = model(ids.to(model.device), start, logits_at=at, prefix=kv, head=False)  # [rows, reads, D]
        self._count(rows, width)
        self._reads.add(batch, hidden, reads)

    def _scores(self) -> Iterator[QuestionScore]:
        """The head over every position gathered so far, once; the scores of their questions."""
        batch, sums = self._reads.logprob_sums(self.model)
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
        rows = [it.rows[0] for it in batch]
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
        value, next_ids = model(ids.to(device), start, state, logits_at=LAST_POSITION)[:, -1].max(-1)
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
                  max_length: int | None = None, stats: ScoringStats | None = None,
                  skip: frozenset[str] | set[str] = frozenset(), fit: str | None = None) -> Iterator[QuestionScore]:
    """Score the questions of one subject; yields one QuestionScore per question as its batch finishes.

    ``loaded`` is a runtime.LoadedModel (its ``model``, ``tokenizer`` are used). Shots are the first
    ``shots`` dev rows; with ``fit="shots"`` they are dropped from the end until the prompt of the longest
    question fits the model's length, fitted against all ``questions``, including those in ``skip`` (ids
    already scored, e.g. on resume), so a resumed run uses the same prompt. ``fit=None``: the template's
    default (lmeval: "truncate", lm-eval's left truncation of an over-long prompt). ``max_length``: lm-eval's
    max_length (default the model's). ``stats`` accumulates token counts and each subject's PromptFit.
    Yield order is scoring order (longest prompts first), not file order.
    """
    scorer = SubjectScorer(loaded, subject, dev_rows, questions, template, shots, mode, batch_size,
                           max_new_tokens, max_length, stats, fit)
    if skip:
        scorer.questions = [q for q in scorer.questions if q.question_id not in skip]
    return iter(scorer)
