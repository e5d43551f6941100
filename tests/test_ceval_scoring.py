"""C-Eval scoring: prefix-cached == naive full-prompt on every tiny model, and both == an independent
lm-eval-style log-likelihood computed with transformers' own model classes on the same weights."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from npuinfer.ceval import build_prompt, first_choice_letter, load_split, sample_dir
from npuinfer.ceval.prompts import LMEVAL, build_prefix, get_template
from npuinfer.ceval.encoding import PromptEncoder, lmeval_split, newline_cut
from npuinfer.backends.base import LoglikelihoodRequest, WorkCounters
from npuinfer.backends.npuinfer import NpuinferBackend
from npuinfer.backends.prefix_reuse import tail_rows
from npuinfer.ceval.scoring import PromptFit, ScoringStats, score_subject
from npuinfer.ceval.synth import write_synthetic_ceval

# the seed families and two grouped-query ones (qwen3: q/k norms, wider heads; llama3: scaled RoPE); qwen2-tiny adds
# nothing to the attention paths scored here and is left out to keep the suite quick
TINY = ["qwen-tiny", "baichuan2-7b-tiny", "baichuan2-13b-tiny", "internlm-tiny", "gpt-neox-tiny",
        "llama3-tiny", "qwen3-tiny"]
SUBJECTS = ["law", "college_physics", "high_school_chemistry", "logic"]
ATOL = 1e-4
# Continuations whose tails (all tokens but the last) differ: several rows per question.
ODD = replace(LMEVAL, name="odd", continuations=(" A", " 乙乙乙", " cell ratio", "\n\n是的"))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Four subjects with 7 val questions each (the shipped sample has 3): batches of 3 leave a remainder."""
    return write_synthetic_ceval(tmp_path_factory.mktemp("ceval"), subjects=SUBJECTS, val_per_subject=7, seed=3)


def score(loaded, data_dir, subject, template="lmeval", mode="prefix", batch_size=3, shots=5, **kw):
    stats = ScoringStats()
    dev = load_split(data_dir, subject, "dev")
    val = load_split(data_dir, subject, "val")
    out = {s.row.question_id: s for s in score_subject(NpuinferBackend(loaded), subject, dev, val, template, shots, mode,
                                                        batch_size, stats=stats, **kw)}
    assert sorted(out, key=int) == [q.question_id for q in val]  # every question exactly once
    return out, stats


def assert_same(a, b, atol=ATOL):
    assert a.keys() == b.keys()
    for qid in a:
        assert a[qid].row.prediction == b[qid].row.prediction, qid
        diff = max(abs(x - y) for x, y in zip(a[qid].logprobs, b[qid].logprobs))
        assert diff < atol, (qid, a[qid].logprobs, b[qid].logprobs)


class HeadInputs:
    """The shapes the model's head receives: the output projection's inputs in a forward (a forward hook), and
    the positions given to head_logprobs, which applies it to the gathered read positions of several batches."""

    def __init__(self, model):
        self.shapes: list[tuple[int, ...]] = []
        self.gathered: list[tuple[int, ...]] = []
        self._handle = model.output.register_forward_hook(lambda mod, args, out: self.shapes.append(
            tuple(args[0].shape)))
        self._model, real = model, model.head_logprobs
        model.head_logprobs = lambda hidden, *a, **kw: self.gathered.append(tuple(hidden.shape)) or real(
            hidden, *a, **kw)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._handle.remove()
        del self._model.head_logprobs


def full_logits_loglikelihood(model, ctx: list[int], conts: list[list[int]], max_length: int) -> list[float]:
    """lm-eval's _loglikelihood_tokens, written out on our model: per choice the input
    (context + continuation)[-(max_length + 1):][:-1], every position projected, the continuation's
    log-probabilities read from the last len(continuation) positions."""
    out = []
    for cont in conts:
        inp = (ctx + cont)[-(max_length + 1):][:-1]
        model.setup_caches(1, len(inp))
        with torch.inference_mode():
            logp = model(torch.tensor([inp]), 0)[0].float().log_softmax(-1)  # [len(inp), vocab]
        first = len(inp) - len(cont)
        out.append(sum(logp[first + j, t].item() for j, t in enumerate(cont)))
    return out


@pytest.mark.parametrize("name", TINY)
def test_prefix_cached_equals_naive(name, load_tiny, data):
    """prefix == naive == every position projected (the code before the head gathered its positions), and the
    head never receives more than the positions a continuation reads."""
    loaded = load_tiny(name)
    for subject, template in (("law", "lmeval"), ("logic", "atb"), ("college_physics", ODD)):
        with HeadInputs(loaded.model) as head:
            prefix, ps = score(loaded, data, subject, template)
            naive, ns = score(loaded, data, subject, template, mode="naive", batch_size=1)
        assert_same(prefix, naive)
        if template != ODD:  # single letters: " A" .. " D", at most two tokens each on the tiny tokenizers
            # the head once per mode for the subject's 7 questions, at most two read positions each
            assert len(head.gathered) == 2 and all(s[0] <= 2 * 7 for s in head.gathered), head.gathered
        assert head.shapes == [(1, 0, loaded.args.dim)]  # the prefix run: no logits at all
        dev, val = load_split(data, subject, "dev"), load_split(data, subject, "val")
        for q in (val[0], val[-1]):  # a question of the first batch and the one of the remainder batch
            ctx, conts = lmeval_split(loaded.tokenizer.encode, build_prompt(template, subject, dev, q).context,
                                      get_template(template).continuations)
            ref = full_logits_loglikelihood(loaded.model, ctx, conts, loaded.args.max_seq_len)
            assert max(abs(a - b) for a, b in zip(prefix[q.question_id].logprobs, ref)) < ATOL
        assert ps.fallbacks == 0 and ps.prefix_tokens > 0 and ns.prefix_tokens == 0
        assert ps.prompt_tokens < ns.prompt_tokens / 2
        if template != ODD:  # one row per question: the prefix, then 7 questions in batches of 3
            assert ps.forwards == 1 + 3 and ns.forwards == 7
        assert ps.shots == ns.shots == {subject: 5}


def test_several_rows_per_question(load_tiny, data):
    """Continuations with different multi-token tails read their own row; batching counts rows."""
    loaded = load_tiny("qwen-tiny")
    dev, val = load_split(data, "law", "dev"), load_split(data, "law", "val")
    context = build_prompt(ODD, "law", dev, val[0]).context
    _, conts = lmeval_split(loaded.tokenizer.encode, context, ODD.continuations)
    tails, _ = tail_rows(conts)
    assert len(tails) > 1, conts
    one, _ = score(loaded, data, "law", ODD, batch_size=1)  # a question's rows stay together
    many, _ = score(loaded, data, "law", ODD, batch_size=64)
    assert_same(one, many)


def _whole_encodings(encode, context, continuations):
    """lm-eval's _encode_pair written out: every continuation encoded with the whole context."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuations = [context[-n_spaces:] + c for c in continuations]
        context = context[:-n_spaces]
    ctx = encode(context)
    return ctx, [encode(context + c)[len(ctx):] for c in continuations]


@pytest.mark.parametrize("name", TINY)
def test_lmeval_split_equals_whole_encodings(name, load_tiny):
    """The last-line shortcut of lmeval_split gives lm-eval's ids, for every tokenizer kind and template,
    on every shipped sample question with its 5-shot prefix (and on lines it must not shortcut)."""
    from npuinfer.ceval import available_subjects
    from npuinfer.ceval.prompts import get_template

    tok = load_tiny(name).tokenizer
    encode, splits = tok.encode, tok.splits_after_newlines
    assert splits == (name in ("qwen-tiny", "gpt-neox-tiny"))
    data = sample_dir()
    checked = 0
    for subject in available_subjects(data, "val"):
        dev, val = load_split(data, subject, "dev"), load_split(data, subject, "val")
        for template in (get_template("lmeval"), get_template("atb"), ODD):
            for q in val:
                context = build_prompt(template, subject, dev, q).context
                expected = _whole_encodings(encode, context, template.continuations)
                assert lmeval_split(encode, context, template.continuations, splits) == expected, (subject, q.question_id)
                checked += 1
    for context in ("no newline at all 答案：", "line\n  indented last line", "ends with a newline\n",
                    "中文\n答案：", "x\n\n"):
        assert lmeval_split(encode, context, (" A", "B"), True) == _whole_encodings(encode, context, (" A", "B"))
    assert checked == 52 * 3 * 3


def test_newline_cut():
    assert newline_cut("答案：C\n\n") == 0  # the break sits next to another newline
    assert newline_cut("A. x\n答案：C\n\n") == 5
    assert newline_cut("a \nb\n") == 0 and newline_cut("a\n b") == 0 and newline_cut("no break") == 0
    assert newline_cut("a\nb\n c") == 2


@pytest.mark.parametrize("name", TINY)
def test_prompt_encoder_equals_whole_encodings(name, load_tiny, data):
    """Every prompt the encoder builds from a reused head equals the tokenizer's whole encoding, and after a
    head's first text it hands the tokenizer only the text past the head's cut (byte-level and tiktoken);
    sentencepiece, which makes no promise, is encoded whole."""
    tok = load_tiny(name).tokenizer
    for subject in ("law", "logic"):
        dev, val = load_split(data, subject, "dev"), load_split(data, subject, "val")
        for template in (LMEVAL, ODD, "atb"):
            encoder = PromptEncoder(tok)
            head = build_prefix(template, subject, dev)
            encoder.add_head(head)
            encoder.add_head(build_prefix(template, subject, dev[:2]))  # a shorter head must not be chosen
            contexts = [build_prompt(template, subject, dev, q).context for q in val]
            assert [encoder.encode(c) for c in contexts] == [tok.encode(c) for c in contexts]
            cut = newline_cut(head)
            if name in ("qwen-tiny", "gpt-neox-tiny"):
                assert "\n" not in head[cut:].rstrip("\n")  # all but the shots' last line is reused
                expected = cut + len(contexts[0]) + sum(len(c) - cut for c in contexts)
            else:
                expected = sum(len(c) for c in contexts)
            assert encoder.encoded_chars == expected


class DummyPrefixTokenizer:
    """Claims the newline promise but, as sentencepiece's dummy prefix does, marks the start of every text."""

    def __init__(self, tok):
        self._tok = tok
        self.splits_after_newlines = True

    def encode(self, text, add_bos=None):
        return [0] + self._tok.encode(text, add_bos=add_bos)


def test_prompt_encoder_checks_the_reuse_and_stops_when_it_differs(load_tiny, data):
    tok = DummyPrefixTokenizer(load_tiny("qwen-tiny").tokenizer)
    dev, val = load_split(data, "law", "dev"), load_split(data, "law", "val")
    encoder = PromptEncoder(tok)
    encoder.add_head(build_prefix(LMEVAL, "law", dev))
    contexts = [build_prompt(LMEVAL, "law", dev, q).context for q in val]
    assert [encoder.encode(c) for c in contexts] == [tok.encode(c) for c in contexts]
    head = build_prefix(LMEVAL, "law", dev)
    cut = newline_cut(head)
    # the first text: head part, rest, and the whole check; every later one whole
    assert encoder.encoded_chars == cut + (len(contexts[0]) - cut) + sum(len(c) for c in contexts)


def testtail_rows():
    # tails: (), (7, 8), (7,), (6,): () and (7,) are read from the rows of longer tails that start with them
    tails, row_of = tail_rows([[5], [7, 8, 9], [7, 8], [6, 1]])
    assert tails == [(6,), (7, 8)]
    assert [tails[i] for i in row_of] == [(6,), (7, 8), (7, 8), (6,)]
    assert tail_rows([[1], [2], [3], [4]]) == ([()], [0, 0, 0, 0])


def lmeval_reference(model, encode, context: str, continuations) -> list[float]:
    """lm-eval's loglikelihood, written out: one sequence per choice, no cache, no batching."""
    ctx = encode(context)
    out = []
    for cont in continuations:
        whole = encode(context + cont)
        cont_ids = whole[len(ctx):]
        inp = torch.tensor([(ctx + cont_ids)[:-1]])
        with torch.no_grad():
            logits = model(inp).logits[0].float().log_softmax(-1)
        n = len(cont_ids)
        out.append(sum(logits[len(ctx) - 1 + j, t].item() for j, t in enumerate(cont_ids)))
        assert n >= 1
    return out


def hf_model_and_encode(name: str, model_dir: Path):
    """transformers' GPTNeoX / Llama classes on the checkpoint files, with transformers' tokenizers."""
    import transformers

    if name == "gpt-neox-tiny":
        model = transformers.GPTNeoXForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(model_dir / "tokenizer.json"))
        encode = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    else:  # InternLM is the Llama layout with q/k/v/o biases; its remote code is not used
        pytest.importorskip("google.protobuf", reason="transformers needs protobuf to read tokenizer.model")
        c = json.loads((model_dir / "config.json").read_text())
        cfg = transformers.LlamaConfig(
            vocab_size=c["vocab_size"], hidden_size=c["hidden_size"], intermediate_size=c["intermediate_size"],
            num_hidden_layers=c["num_hidden_layers"], num_attention_heads=c["num_attention_heads"],
            num_key_value_heads=c["num_attention_heads"], rms_norm_eps=c["rms_norm_eps"],
            max_position_embeddings=c["max_position_embeddings"], attention_bias=True, tie_word_embeddings=False)
        model = transformers.LlamaForCausalLM(cfg).float()
        state = {}
        for shard in sorted(set(json.loads((model_dir / "pytorch_model.bin.index.json").read_text())
                                ["weight_map"].values())):
            state.update(torch.load(model_dir / shard, weights_only=True))
        missing, unexpected = model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
        assert not unexpected and not [m for m in missing if "rotary" not in m], (missing, unexpected)
        tok = transformers.LlamaTokenizer.from_pretrained(str(model_dir), add_prefix_space=True)
        # InternLMTokenizer's add_bos_token is True: <s> first, as npuinfer's tokenizer does
        encode = lambda text: [tok.bos_token_id, *tok.encode(text, add_special_tokens=False)]  # noqa: E731
    return model.eval(), encode


@pytest.mark.parametrize("name", ["internlm-tiny", "gpt-neox-tiny"])
def test_equals_independent_lmeval_loglikelihood(name, load_tiny):
    loaded = load_tiny(name)
    model, encode = hf_model_and_encode(name, loaded.model_dir)
    data = sample_dir()
    for subject, template in (("law", "lmeval"), ("logic", "atb"), ("college_physics", ODD)):
        ours, _ = score(loaded, data, subject, template, batch_size=2)
        dev = load_split(data, subject, "dev")
        for q in load_split(data, subject, "val"):
            parts = build_prompt(template, subject, dev, q)
            ref = lmeval_reference(model, encode, parts.context, parts.continuations)
            got = ours[q.question_id]
            assert max(abs(a - b) for a, b in zip(got.logprobs, ref)) < ATOL, (got.logprobs, ref)
            assert got.row.prediction == "ABCD"[max(range(4), key=lambda i: (ref[i], -i))]


class MergingTokenizer:
    """Encodes the prefix alone differently from inside prefix + question, ``depth`` tokens from its end
    (depth 0: one token longer, as Qwen's "\n\n" is one token alone and two before a question)."""

    def __init__(self, tok, prefix: str, depth: int = 0):
        self._tok, self._prefix, self._depth = tok, prefix, depth

    def __getattr__(self, name):
        return getattr(self._tok, name)

    def encode(self, text, add_bos=None):
        ids = self._tok.encode(text, add_bos=add_bos)
        if text != self._prefix:
            return ids
        if self._depth == 0:
            return ids + [ids[-1]]
        changed = list(ids)
        changed[-self._depth] = (changed[-self._depth] + 1) % 100
        return changed


def _requests(contexts, conts=((7,), (8,), (9, 10), (11,))):
    return [LoglikelihoodRequest(tuple(c), tuple(k)) for c in contexts for k in conts]


def _loglikelihoods(backend, requests, **kw):
    counters = WorkCounters()
    got = dict(backend.loglikelihood(requests, batch_size=3, counters=counters, **kw))
    assert sorted(got) == list(range(len(requests)))  # every request answered exactly once
    return [got[i] for i in range(len(requests))], counters


def test_the_shared_prefix_is_found_in_the_requests_and_a_diverging_context_falls_back(load_tiny):
    """The backend finds what the contexts share (no prefix given to it): every context sharing the long run
    attends to one copy of it; one diverging early (a tokenizer merging across the boundary) runs in full and
    is counted; the results equal the naive computation."""
    backend = NpuinferBackend(load_tiny("internlm-tiny"))
    g = torch.Generator().manual_seed(0)
    shared = torch.randint(20, 200, (60,), generator=g).tolist()
    contexts = [shared + [200 + i, 30 + i, 40] for i in range(6)]  # distinct from the first own token on
    contexts.append(shared[:9] + [201, 202] + shared[11:] + [60])  # diverges at token 9
    requests = _requests(contexts)
    got, counters = _loglikelihoods(backend, requests)
    naive, naive_counters = _loglikelihoods(backend, requests, share_prefix=False)
    assert counters.prefix_tokens == len(shared) and counters.fallbacks == 4  # the diverging context's 4 choices
    assert naive_counters.prefix_tokens == 0 and naive_counters.prompt_tokens > counters.prompt_tokens
    assert max(abs(a.logprob - b.logprob) for a, b in zip(got, naive)) < ATOL
    assert [a.is_greedy for a in got] == [b.is_greedy for b in naive]


def test_is_greedy_is_the_argmax_of_every_continuation_token(load_tiny):
    loaded = load_tiny("qwen-tiny")
    backend = NpuinferBackend(loaded)
    context = list(range(40, 90))
    with torch.inference_mode():
        loaded.model.setup_caches(1, len(context) + 1)
        first = int(loaded.model(torch.tensor([context]), 0)[0, -1].argmax())
        loaded.model.setup_caches(1, len(context) + 2)
        second = int(loaded.model(torch.tensor([context + [first]]), 0)[0, -1].argmax())
    other = (first + 1) % loaded.args.vocab_size
    requests = [LoglikelihoodRequest(tuple(context), (first,)), LoglikelihoodRequest(tuple(context), (other,)),
                LoglikelihoodRequest(tuple(context), (first, second)),
                LoglikelihoodRequest(tuple(context), (first, (second + 1) % loaded.args.vocab_size))]
    got, _ = _loglikelihoods(backend, requests)
    assert [r.is_greedy for r in got] == [True, False, True, False]
    assert got[0].logprob > got[1].logprob


def replace_tokenizer(loaded, tok):
    return replace(loaded, tokenizer=tok)


def test_shots_dropped_from_the_end_to_fit(load_tiny, data):
    loaded = load_tiny("gpt-neox-tiny")
    dev, val = load_split(data, "law", "dev"), load_split(data, "law", "val")

    def longest(k: int) -> int:
        """The longest row a k-shot prompt needs: context and the longest tail (" D" is two tokens here)."""
        return max(len(ctx) + max(len(c) for c in conts) - 1 for ctx, conts in (
            lmeval_split(loaded.tokenizer.encode, build_prompt("lmeval", "law", dev[:k], q).context,
                         LMEVAL.continuations) for q in val))

    budget = longest(2)  # the 2-shot prompts fit, the 3-shot ones do not
    assert longest(3) > budget
    cut, cs = score(loaded, data, "law", max_length=budget, fit="shots")
    assert cs.shots == {"law": 2} and cs.prompt_fit["law"] == PromptFit(shots=2, dropped_shots=3, truncated=0)
    naive, _ = score(loaded, data, "law", mode="naive", max_length=budget, fit="shots")
    assert_same(cut, naive)
    # lm-eval's budget to the token: a prompt of exactly max_length tokens is fed whole, with every shot
    exact, es = score(loaded, data, "law", max_length=longest(5), fit="shots")
    assert es.prompt_fit["law"] == PromptFit(shots=5, dropped_shots=0, truncated=0)
    _, ts = score(loaded, data, "law", max_length=longest(5), fit="truncate")
    assert ts.prompt_fit["law"] == PromptFit(shots=5, dropped_shots=0, truncated=0)
    _, ts = score(loaded, data, "law", max_length=longest(5) - 1, fit="truncate")
    assert ts.prompt_fit["law"].truncated >= 1 and ts.prompt_fit["law"].dropped_shots == 0


def test_question_too_long_alone_is_cut_and_others_keep_shots(load_tiny, tmp_path):
    import csv

    write_synthetic_ceval(tmp_path, subjects=["law"], val_per_subject=3)
    path = tmp_path / "val" / "law_val.csv"
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f))
    rows[1][1] = "很长的题目" * 300  # question 0 alone is over the budget
    with open(path, "w", encoding="utf-8", newline="") as f:
        csv.writer(f).writerows(rows)
    loaded = load_tiny("qwen-tiny")
    for fit in ("shots", "truncate"):
        got, stats = score(loaded, tmp_path, "law", max_length=600, fit=fit)
        assert 1 <= stats.truncated == stats.prompt_fit["law"].truncated < 3
        if fit == "shots":  # shots dropped until the others fit: only the one too long alone is cut
            assert stats.truncated == 1 and 0 < stats.shots["law"] < 5
        else:  # every prompt keeps the 5 shots, the over-long ones are cut
            assert stats.shots["law"] == 5 and stats.prompt_fit["law"].dropped_shots == 0
        naive, _ = score(loaded, tmp_path, "law", mode="naive", max_length=600, fit=fit)
        assert_same(got, naive)


@pytest.mark.parametrize("name, template", [("qwen-tiny", "lmeval"), ("internlm-tiny", ODD),
                                            ("baichuan2-13b-tiny", "atb")])
def test_an_over_long_question_is_fed_exactly_lmeval_ids(name, template, load_tiny, tmp_path):
    """fit truncate: each choice is fed (context + continuation)[-(L + 1):][:-1] of lm-eval's _encode_pair ids
    (computed here from whole encodings), every question keeps its 5 shots, and the log-likelihoods equal
    lm-eval's computation on those ids."""
    import csv

    write_synthetic_ceval(tmp_path, subjects=["law"], val_per_subject=3)
    path = tmp_path / "val" / "law_val.csv"
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f))
    rows[1][1] = "很长的题目" * 300  # question 0: thousands of tokens
    with open(path, "w", encoding="utf-8", newline="") as f:
        csv.writer(f).writerows(rows)
    loaded = load_tiny(name)
    tok, model, max_length = loaded.tokenizer, loaded.model, 700
    t = get_template(template)
    dev, val = load_split(tmp_path, "law", "dev"), load_split(tmp_path, "law", "val")
    fed: list[list[int]] = []
    hook = model.register_forward_pre_hook(
        lambda mod, args, kwargs: fed.extend(args[0].tolist()) if args[1] == 0 and kwargs.get("prefix") is None
        else None, with_kwargs=True)
    try:
        got, stats = score(loaded, tmp_path, "law", template, batch_size=1, max_length=max_length)
    finally:
        hook.remove()
    assert stats.prompt_fit["law"].shots == 5 and stats.prompt_fit["law"].dropped_shots == 0
    ctx, conts = _whole_encodings(tok.encode, build_prompt(t, "law", dev, val[0]).context, t.continuations)
    assert len(ctx) > 2 * max_length
    inputs = [(ctx + cont)[-(max_length + 1):][:-1] for cont in conts]
    assert all(len(i) == max_length for i in inputs)
    # Rows of batch size 1 hold one question: the over-long one's rows are its choices' distinct inputs (one
    # input that starts another is read from the longer row), unpadded.
    longest = [i for i in inputs if not any(j != i and j[:len(i)] == i for j in inputs)]
    assert sorted(r for r in fed if len(r) == max_length) == sorted(map(list, {tuple(i) for i in longest}))
    assert stats.truncated == stats.prompt_fit["law"].truncated >= 1
    ref = full_logits_loglikelihood(model, ctx, conts, max_length)
    assert max(abs(a - b) for a, b in zip(got["0"].logprobs, ref)) < ATOL


def test_resume_skip_uses_the_same_shots(load_tiny, data):
    loaded = load_tiny("qwen-tiny")
    full, _ = score(loaded, data, "law")
    dev, val = load_split(data, "law", "dev"), load_split(data, "law", "val")
    done = {q.question_id for q in val[:4]}
    rest = {s.row.question_id: s for s in score_subject(NpuinferBackend(loaded), "law", dev, val, skip=done,
                                                                  batch_size=3)}
    assert set(rest) == {q.question_id for q in val[4:]}
    assert_same(rest, {k: full[k] for k in rest})


def test_test_split_rows_have_no_answer(load_tiny):
    loaded = load_tiny("qwen-tiny")
    data = sample_dir()
    dev, test = load_split(data, "law", "dev"), load_split(data, "law", "test")
    rows = [s.row for s in score_subject(NpuinferBackend(loaded), "law", dev, test)]
    assert len(rows) == len(test) and all(r.answer is None and r.correct is None for r in rows)
    assert {r.prediction for r in rows} <= set("ABCD")


@pytest.mark.parametrize("name", ["qwen-tiny", "baichuan2-13b-tiny"])
def test_generate_with_cached_prefix_equals_full_prompt_generation(name, load_tiny, data):
    from npuinfer.generate import generate

    loaded = load_tiny(name)
    tok = loaded.tokenizer
    dev, val = load_split(data, "logic", "dev"), load_split(data, "logic", "val")
    stats = ScoringStats()
    got = {s.row.question_id: s for s in score_subject(NpuinferBackend(loaded), "logic", dev, val, "atb", 5, "generate", 3,
                                                        max_new_tokens=6, stats=stats)}
    assert stats.fallbacks == 0 and stats.prefix_tokens > 0
    for q in val:
        ids = torch.tensor([tok.encode(build_prompt("atb", "logic", dev, q).context)])
        ref = generate(loaded.model, ids, 6, eos_id=tok.eos_id, stop_at_eos=True)[0].tolist()
        if tok.eos_id in ref:
            ref = ref[: ref.index(tok.eos_id)]
        for k in range(1, len(ref) + 1):  # decoding stops at the first letter A-D
            if first_choice_letter(tok.decode(ref[:k])):
                ref = ref[:k]
                break
        text = tok.decode(ref)
        assert got[q.question_id].generated == text
        assert got[q.question_id].row.prediction == (first_choice_letter(text) or "")


def test_generate_parses_the_first_letter(load_tiny, data):
    """A tokenizer whose decode always says 'xyz C' makes every prediction C."""
    loaded = load_tiny("qwen-tiny")

    class Says(MergingTokenizer):
        def encode(self, text, add_bos=None):
            return self._tok.encode(text, add_bos=add_bos)

        def decode(self, ids, skip_special=True):
            return "xyz C" if len(ids) >= 2 else "xyz"

    says = replace_tokenizer(loaded, Says(loaded.tokenizer, ""))
    dev, val = load_split(data, "logic", "dev"), load_split(data, "logic", "val")
    rows = [s.row for s in score_subject(NpuinferBackend(says), "logic", dev, val, "atb", 5, "generate", 4, max_new_tokens=4)]
    assert {r.prediction for r in rows} == {"C"}
    rows = [s.row for s in score_subject(NpuinferBackend(says), "logic", dev, val, "atb", 5, "generate", 4, max_new_tokens=1)]
    assert {r.prediction for r in rows} == {""}  # no letter within the budget: no prediction, never correct
    assert not any(r.correct for r in rows)
