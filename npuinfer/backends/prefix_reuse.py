"""npuinfer's runtime answering ``loglikelihood`` and ``generate_until`` requests with a shared prefix run once.

The requests of a multiple-choice benchmark share most of their tokens: every question of a C-Eval subject
starts with the same k-shot prefix, and its four choices share the question. This module finds that structure
in the token ids it is given and computes each shared part once:

- **Contexts**: requests with the same context are one *group*; its continuations are read from one row. A
  continuation of one token needs only the logits at the context's last position; a longer one needs its own
  earlier tokens fed after the context. A group's rows are the distinct longest such *tails* (usually one:
  " A" .. " D" are single tokens for every real tokenizer, or share a leading "▁").
- **Shared prefix**: the longest run of tokens that the groups' contexts start with (the run that saves most
  tokens, so a context whose tokens diverge early — a tokenizer merging differently at the boundary — runs in
  full and is counted as a fallback instead of shortening everyone's) is run once at batch 1; every other row
  then runs only its own tokens, attending to that one copy of the prefix's K/V (generate copies it into every
  row of its cache, which decoding extends).
- **The head** sees only the positions a continuation reads (the hidden states are gathered first), once for
  the positions of several batches (HEAD_POSITIONS): on a Qwen-sized vocabulary a head and a
  [rows, reads, vocab] log_softmax per batch were ~40% of prefix-cached scoring on cpu.

Requests over ``max_length`` are fitted as lm-eval does (``base.lmeval_fit``) and run in full. Results are
exactly the naive computation's (each request's whole row from position 0) up to float rounding;
``share_prefix=False`` is that naive computation, the reference the tests hold this against.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from ..model import LAST_POSITION, SeqState
from .base import GenerateRequest, Generation, Loglikelihood, LoglikelihoodRequest, WorkCounters, is_cut

# Read positions gathered before the head runs: enough that reading the head's weight is a small part of a
# pass, few enough that a pass's [positions, HEAD_CHUNK] logits stay in cache.
HEAD_POSITIONS = 128


@dataclass
class _Group:
    """Requests sharing one context, and the rows that answer them."""

    context: list[int]
    members: list[tuple[int, list[int]]]  # (request index, continuation); generate: (index, [])
    cut: bool = False
    start: int = 0  # 0, or the shared prefix's length
    rows: list[list[int]] | None = None  # tokens fed after ``start``
    contexts: list[int] | None = None  # per row, how many of its tokens are context (the rest is its tail)
    row_of: list[int] | None = None  # member -> index into rows

    @property
    def width(self) -> int:
        return max(len(r) for r in self.rows)


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens ``a`` and ``b`` share: slices compared in C, the first difference found by
    halving (contexts of one subject differ only after ~1,000 shared tokens)."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    same, differs = 0, n  # a[:same] == b[:same], a[:differs] != b[:differs]
    while differs - same > 1:
        mid = (same + differs) // 2
        if a[:mid] == b[:mid]:
            same = mid
        else:
            differs = mid
    return same


def tail_rows(conts: Sequence[Sequence[int]]) -> tuple[list[tuple[int, ...]], list[int]]:
    """Distinct longest tails (continuation minus its last token) and, per continuation, the tail it reads."""
    tails = [tuple(c[:-1]) for c in conts]
    longest: list[tuple[int, ...]] = []
    for t in sorted(set(tails), key=len, reverse=True):
        if not any(u[: len(t)] == t for u in longest):
            longest.append(t)
    longest.sort()  # deterministic order
    return longest, [next(i for i, u in enumerate(longest) if u[: len(t)] == t) for t in tails]


def shared_prefix(contexts: Sequence[Sequence[int] | None]) -> tuple[int, list[int]]:
    """(P, per context its start: P, or 0 where it runs in full) for the shared prefix that saves the most tokens.

    ``None`` marks a context that must run in full (cut by truncation). The prefix is taken from the context in
    the middle of the sorted order (the largest group of contexts agreeing on a long prefix surrounds it); a
    length P serves the contexts sharing at least P tokens with it, each keeping one own token at least.
    """
    eligible = [i for i, c in enumerate(contexts) if c is not None and len(c) > 1]
    starts = [0] * len(contexts)
    if not eligible:
        return 0, starts
    anchor = sorted(contexts[i] for i in eligible)[len(eligible) // 2]
    shared = {i: common_prefix(anchor, contexts[i]) for i in eligible}
    best, best_saving = 0, 0
    for p in sorted(set(shared.values()), reverse=True):
        users = [i for i in eligible if shared[i] >= p]
        length = min(p, min(len(contexts[i]) for i in users) - 1)
        if length * len(users) > best_saving:
            best, best_saving = length, length * len(users)
    for i in eligible:
        if best > 0 and shared[i] >= best:
            starts[i] = best
    return best, starts


class PrefixReuse:
    """Log-likelihood and greedy generation over npuinfer's Transformer, shared prefixes computed once."""

    def __init__(self, model, pad_id: int, eos_id: int | None, decode) -> None:
        self.model = model
        self.pad_id = pad_id
        self.eos_id = eos_id
        self.decode = decode
        self._holds_prefix: tuple[object, list[object]] | None = None  # (prefix K/V, the caches holding it)

    # ---- log-likelihood ------------------------------------------------------------------------
    @torch.inference_mode()
    def loglikelihood(self, requests: Sequence[LoglikelihoodRequest], max_length: int, batch_size: int,
                      counters: WorkCounters, share_prefix: bool = True) -> Iterator[tuple[int, Loglikelihood]]:
        for r in requests:
            if not r.continuation:
                raise ValueError("a log-likelihood request needs at least one continuation token")
        groups = self._groups([(r.context, r.continuation) for r in requests])
        for g in groups:
            g.cut = any(is_cut(g.context, c, max_length) for _, c in g.members)
        prefix_kv = self._share(groups, counters) if share_prefix else None
        for g in groups:
            self._loglikelihood_rows(g, max_length)
        reads = _HeadReads()
        for start, batch in self._batches(groups, batch_size):
            self._forward_reads(batch, start, prefix_kv if start else None, counters, reads)
            if len(reads) >= HEAD_POSITIONS:
                yield from reads.results(self.model)
        if len(reads):
            yield from reads.results(self.model)

    def _loglikelihood_rows(self, g: _Group, max_length: int) -> None:
        conts = [c for _, c in g.members]
        if not g.cut:
            context = g.context[g.start:]
            tails, g.row_of = tail_rows(conts)
            g.rows = [context + list(t) for t in tails]
            g.contexts = [len(context)] * len(tails)
            return
        # lm-eval feeds each request (context + continuation)[-(L + 1):][:-1]: the context keeps its last
        # L - (n - 1) tokens for a continuation of n; continuations keeping as many share rows as uncut ones do.
        keeps: dict[int, list[int]] = {}
        for m, cont in enumerate(conts):
            keeps.setdefault(min(len(g.context), max_length - (len(cont) - 1)), []).append(m)
        g.rows, g.contexts, g.row_of = [], [], [0] * len(conts)
        for keep in sorted(keeps, reverse=True):
            members = keeps[keep]
            tails, of = tail_rows([conts[m] for m in members])
            for m, r in zip(members, of):
                g.row_of[m] = len(g.rows) + r
            g.rows += [g.context[len(g.context) - keep:] + list(t) for t in tails]
            g.contexts += [keep] * len(tails)

    def _forward_reads(self, batch: list[_Group], start: int, kv, counters: WorkCounters,
                       reads: "_HeadReads") -> None:
        """Run one batch up to the head: its read positions' hidden states join ``reads``."""
        model = self.model
        rows = [r for g in batch for r in g.rows]
        contexts = [n for g in batch for n in g.contexts]
        width = max(len(r) for r in rows)
        # Right padding: under the causal mask a real token never sees the padding after it.
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        # The positions a continuation reads: a row's last context position (it predicts a continuation's first
        # token) and its tail's. Rows with fewer repeat their last one; only those read go on to the head.
        n_reads = max(len(r) - n + 1 for r, n in zip(rows, contexts))
        at = torch.tensor([[n - 1 + min(k, len(r) - n) for k in range(n_reads)] for r, n in zip(rows, contexts)])
        if kv is None:
            model.setup_caches(len(rows), width)
            self._holds_prefix = None  # this forward writes from slot 0
        # With a shared prefix the rows attend to its one copy in place: no cache, nothing copied per row.
        hidden = model(ids.to(model.device), start, logits_at=at, prefix=kv, head=False)  # [rows, reads, D]
        _count(counters, rows, width)
        reads.add(batch, hidden, n_reads)

    # ---- generation ----------------------------------------------------------------------------
    @torch.inference_mode()
    def generate_until(self, requests: Sequence[GenerateRequest], max_length: int, batch_size: int,
                       counters: WorkCounters, share_prefix: bool = True) -> Iterator[tuple[int, Generation]]:
        if not requests:
            return
        steps = {r.max_new_tokens for r in requests}
        for max_new in sorted(steps):  # one budget per pass (C-Eval asks one for all)
            part = [(i, r) for i, r in enumerate(requests) if r.max_new_tokens == max_new]
            budget = max_length - max_new
            if budget < 1:
                raise ValueError(f"no room for a prompt: max length {max_length}, {max_new} tokens to generate")
            groups = self._groups([(r.context, ()) for _, r in part])
            for g in groups:
                g.cut = len(g.context) > budget
            prefix_kv = self._share(groups, counters) if share_prefix else None
            for g in groups:
                g.rows = [g.context[-budget:] if g.cut else g.context[g.start:]]
            for start, batch in self._batches(groups, batch_size):
                stops = [part[g.members[0][0]][1].stop for g in batch]
                for g, generation in self._generate(batch, start, prefix_kv if start else None, max_new, stops,
                                                    counters):
                    for member, _ in g.members:
                        yield part[member][0], generation

    def _generate(self, batch: list[_Group], start: int, kv, max_new: int, stops, counters: WorkCounters
                  ) -> Iterator[tuple[_Group, Generation]]:
        """Greedy decoding; the rows' tokens left-padded between the prefix and the new tokens."""
        model = self.model
        rows = [g.rows[0] for g in batch]
        width = max(len(r) for r in rows)
        total = start + width + max_new
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), start + width), dtype=torch.long)
        mask[:, :start] = 1
        for i, r in enumerate(rows):
            ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
            mask[i, start + width - len(r):] = 1
        self._prepare(len(rows), start, width + max_new, kv)
        device = model.device
        state = SeqState.from_attention_mask(mask.to(device), total)
        value, next_ids = model(ids.to(device), start, state, logits_at=LAST_POSITION)[:, -1].max(-1)
        finite = torch.isfinite(value)  # per row; NaN wins max, inf is the max
        _count(counters, rows, width)
        out: list[list[int]] = [[] for _ in rows]
        done = [False] * len(rows)
        for step in range(max_new):
            for i, t in enumerate(next_ids.tolist()):
                if done[i]:
                    continue
                if t == self.eos_id:
                    done[i] = True
                    continue
                out[i].append(t)
                stop = stops[i]
                done[i] = stop is not None and stop(self.decode(out[i]))
            if all(done) or step == max_new - 1:
                break
            value, next_ids = model(next_ids.view(-1, 1), start + width + step, state)[:, -1].max(-1)
            finite &= torch.isfinite(value)
            counters.generated_tokens += len(rows)
        for g, ids_out, ok in zip(batch, out, finite.tolist()):
            yield g, Generation(self.decode(ids_out), bool(ok))

    def _prepare(self, n_rows: int, start: int, length: int, kv) -> None:
        """Cache for this batch; the prefix K/V is copied only into a cache that does not hold it yet.

        ``setup_caches`` keeps a cache of the same batch size that is long enough, and a forward writes only
        slots start..start+T, so slots [0, start) still hold the prefix from the previous batch.
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

    # ---- shared by both ------------------------------------------------------------------------
    @staticmethod
    def _groups(pairs: Sequence[tuple[Sequence[int], Sequence[int]]]) -> list[_Group]:
        groups: dict[tuple[int, ...], _Group] = {}
        same_object: dict[int, _Group] = {}  # a caller passing one context object for its continuations: no rehash
        for i, (context, continuation) in enumerate(pairs):
            group = same_object.get(id(context))
            if group is None:
                key = tuple(context)
                group = groups.get(key)
                if group is None:
                    group = groups[key] = _Group(list(context), [])
                same_object[id(context)] = group
            group.members.append((i, list(continuation)))
        return list(groups.values())

    def _share(self, groups: list[_Group], counters: WorkCounters):
        """Find the shared prefix, set each group's start, run the prefix once; its K/V (None: no prefix)."""
        length, starts = shared_prefix([None if g.cut else g.context for g in groups])
        for g, s in zip(groups, starts):
            g.start = s
        counters.fallbacks += sum(len(g.members) for g, s in zip(groups, starts) if s == 0 and not g.cut)
        if length == 0:
            return None
        anchor = next(g for g in groups if g.start)
        ids = anchor.context[:length]
        kv = self.model.prefix_kv(torch.tensor([ids], device=self.model.device))
        counters.prompt_tokens += length
        counters.prefix_tokens += length
        counters.padded_tokens += length
        counters.forwards += 1
        return kv

    @staticmethod
    def _batches(groups: list[_Group], batch_size: int) -> Iterator[tuple[int, list[_Group]]]:
        """Longest first (less padding per batch, and a batch too big for the device fails at once), prefix
        users first; a new batch also when a row would be padded to over 9/8 of its length (and the batch is
        not tiny): fewer padded positions computed; results do not depend on the batching."""
        ordered = sorted(groups, key=lambda g: g.width, reverse=True)
        for start in sorted({g.start for g in ordered}, reverse=True):
            batch: list[_Group] = []
            rows = width = 0
            for g in (g for g in ordered if g.start == start):
                length = g.width
                if batch and (rows + len(g.rows) > batch_size or (rows >= 4 and 8 * width > 9 * length)):
                    yield start, batch
                    batch, rows = [], 0
                if not batch:
                    width = length
                batch.append(g)
                rows += len(g.rows)
            if batch:
                yield start, batch


def _count(counters: WorkCounters, rows: Sequence[Sequence[int]], width: int) -> None:
    counters.prompt_tokens += sum(len(r) for r in rows)
    counters.padded_tokens += len(rows) * width
    counters.forwards += 1


class _HeadReads:
    """Read positions of batches waiting for the head, which then runs once over all of them.

    A pass of the head reads its whole weight (151,936 rows: 39 MB at qwen-tiny's width, 1.2 GB for qwen-7b in
    fp16), and a prefix-cached batch reads only one or two positions per group: so the hidden states of
    several batches are gathered and the head is applied to them together.
    """

    def __init__(self) -> None:
        self.groups: list[_Group] = []
        self.hidden: list[torch.Tensor] = []  # [n, dim] per batch: the distinct positions its requests read
        self.positions = 0
        self.position_of: list[int] = []  # per continuation token: its position among all gathered
        self.tokens: list[int] = []  # per continuation token: its id
        self.owner: list[int] = []  # per continuation token: its request index

    def __len__(self) -> int:
        return self.positions

    def add(self, batch: list[_Group], hidden: torch.Tensor, reads: int) -> None:
        """``hidden`` [rows, reads, dim]: the batch's rows in order, ``reads`` positions each."""
        used: dict[int, int] = {}  # flat index into hidden -> position among all gathered
        row = 0
        for g in batch:
            self.groups.append(g)
            for m, (index, cont) in enumerate(g.members):
                for j, t in enumerate(cont):
                    flat = (row + g.row_of[m]) * reads + j
                    self.position_of.append(used.setdefault(flat, self.positions + len(used)))
                    self.tokens.append(t)
                    self.owner.append(index)
            row += len(g.rows)
        self.hidden.append(hidden.reshape(-1, hidden.shape[-1])[torch.tensor(list(used), device=hidden.device)])
        self.positions += len(used)

    def results(self, model) -> Iterator[tuple[int, Loglikelihood]]:
        """Each gathered request's summed log-probability and greediness, in gathering order; then empties."""
        device = self.hidden[0].device
        token_lp, greedy = model.head_logprobs(torch.cat(self.hidden), torch.tensor(self.position_of, device=device),
                                               torch.tensor(self.tokens, device=device), greedy=True)
        sums: dict[int, float] = {}
        all_greedy: dict[int, bool] = {}
        for index, lp, g in zip(self.owner, token_lp.tolist(), greedy.tolist()):
            sums[index] = sums.get(index, 0.0) + lp
            all_greedy[index] = all_greedy.get(index, True) and bool(g)
        groups = self.groups
        self.__init__()
        for group in groups:
            for index, _ in group.members:
                yield index, Loglikelihood(sums[index], all_greedy[index])
