"""comparisons/ceval_prefix_vs_naive.py --vocab: qwen-tiny widened to a Qwen-sized vocabulary keeps what C-Eval scoring
reads as a real Qwen vocabulary has it: each answer continuation " A" .. " D" one token (one head position per
question), and every prompt tokenized as on qwen-tiny except where " " + "D" now merge."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from npuinfer.ceval import available_subjects, load_split
from npuinfer.ceval.encoding import lmeval_split
from npuinfer.ceval.prompts import TEMPLATES, build_prompt, first_shots
from npuinfer.ceval.synth import write_synthetic_ceval
from npuinfer.tiny import ensure_tiny
from npuinfer.tokenizer import QWEN_SPECIAL_TOKENS, load_tokenizer, read_tiktoken_ranks

BENCH = Path(__file__).resolve().parents[1] / "comparisons" / "ceval_prefix_vs_naive.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("ceval_prefix_vs_naive", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def widened(bench, tmp_path_factory):
    vocab = 3000  # a few thousand synthetic ranks: the same construction as 151,936, quicker
    return vocab, bench.qwen_tiny_with_vocab(vocab, tmp_path_factory.mktemp("vocab") / "model")


def test_the_answer_continuations_are_single_tokens_as_in_qwens_vocabulary(bench, widened):
    vocab, path = widened
    small = load_tokenizer(ensure_tiny("qwen-tiny"), "qwen")
    wide = load_tokenizer(path, "qwen")
    assert wide.vocab_size == vocab
    assert len(read_tiktoken_ranks(path / "qwen.tiktoken")) == vocab - len(QWEN_SPECIAL_TOKENS)
    assert len(small.encode(" D")) == 2  # why the ranks are added: qwen-tiny splits it
    for tok in bench.ANSWER_TOKENS:
        ids = wide.encode(tok.decode())
        assert len(ids) == 1 and wide.decode(ids) == tok.decode()


def test_prompts_tokenize_as_on_qwen_tiny_but_for_the_answer_merges(widened, tmp_path):
    """Every lmeval prompt of a few subjects: the context and each continuation are qwen-tiny's ids with each
    " " "D" pair folded into the one " D" token, and each continuation is one token."""
    _, path = widened
    small = load_tokenizer(ensure_tiny("qwen-tiny"), "qwen")
    wide = load_tokenizer(path, "qwen")
    space, d, merged = small.encode(" ")[0], small.encode("D")[0], wide.encode(" D")[0]

    def fold(ids):
        out = []
        for t in ids:
            if out and out[-1] == space and t == d:
                out[-1] = merged
            else:
                out.append(t)
        return out

    data = write_synthetic_ceval(tmp_path, seed=3)
    template = TEMPLATES["lmeval"]
    folded = 0
    for subject in available_subjects(data, "val")[:6]:
        shots = first_shots(load_split(data, subject, "dev"), 5)
        for q in load_split(data, subject, "val"):
            context = build_prompt(template, subject, shots, q).context
            ctx_small, conts_small = lmeval_split(small.encode, context, template.continuations)
            ctx_wide, conts_wide = lmeval_split(wide.encode, context, template.continuations)
            assert ctx_wide == fold(ctx_small)
            assert conts_wide == [fold(c) for c in conts_small] and all(len(c) == 1 for c in conts_wide)
            folded += ctx_wide != ctx_small
    assert folded  # some shots answer D: their " D" is one token now, as in Qwen's vocabulary
