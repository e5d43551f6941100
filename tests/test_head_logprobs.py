"""The head over gathered read positions: Transformer.head_logprobs equals log_softmax of the whole head's logits,
and C-Eval scoring applies it once to the read positions of several batches, never per forward."""
from __future__ import annotations

import pytest
import torch

from npuinfer.ceval import build_prompt, load_split
from npuinfer.ceval.encoding import lmeval_split
from npuinfer.ceval.prompts import get_template
from npuinfer.backends.npuinfer import NpuinferBackend
from npuinfer.backends.prefix_reuse import HEAD_POSITIONS
from npuinfer.ceval.scoring import ScoringStats, score_subject
from npuinfer.ceval.synth import write_synthetic_ceval
from npuinfer.model import HEAD_CHUNK


@pytest.mark.parametrize("name", ["qwen-tiny", "gpt-neox-tiny"])
@pytest.mark.parametrize("chunk", [HEAD_CHUNK, 97])  # one chunk on a tiny vocabulary; many, the last one short
def test_head_logprobs_equal_log_softmax_of_the_whole_head(name, chunk, load_tiny):
    model = load_tiny(name).model
    vocab = model.args.vocab_size
    assert vocab % 97 and vocab > 97 * 3
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(11, model.args.dim, generator=gen) * 3
    rows = torch.randint(0, 11, (40,), generator=gen)
    tokens = torch.randint(0, vocab, (40,), generator=gen)
    tokens[:2] = torch.tensor([0, vocab - 1])  # the first and the last head row
    with torch.inference_mode():
        want = model.output(hidden).float().log_softmax(-1)[rows, tokens]
        got = model.head_logprobs(hidden, rows, tokens, chunk=chunk)
    assert got.dtype == torch.float32 and got.shape == (40,)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_the_head_runs_once_over_the_read_positions_of_several_batches(load_tiny, tmp_path):
    """Batch size 2 over 150 questions: 75 forwards, but the head runs only when HEAD_POSITIONS read positions are
    gathered (and once for the rest), on exactly the distinct positions the choices read; no forward of the
    scoring computes logits."""
    loaded = load_tiny("qwen-tiny")
    model, tok = loaded.model, loaded.tokenizer
    write_synthetic_ceval(tmp_path, subjects=["law"], val_per_subject=150, seed=5)
    dev, val = load_split(tmp_path, "law", "dev"), load_split(tmp_path, "law", "val")
    # Per question, its one row is read at as many positions as its longest continuation has tokens.
    template = get_template("lmeval")
    reads = sum(max(len(c) for c in lmeval_split(tok.encode, build_prompt(template, "law", dev, q).context,
                                                 template.continuations, tok.splits_after_newlines)[1])
                for q in val)
    assert reads > 2 * HEAD_POSITIONS

    passes: list[tuple[int, ...]] = []
    logits: list[tuple[int, ...]] = []
    real = model.head_logprobs
    model.head_logprobs = lambda hidden, *a, **kw: passes.append(tuple(hidden.shape)) or real(hidden, *a, **kw)
    hook = model.output.register_forward_hook(lambda mod, args, out: logits.append(tuple(out.shape)))
    stats = ScoringStats()
    try:
        scores = list(score_subject(NpuinferBackend(loaded), "law", dev, val, "lmeval", 5, "prefix", 2, stats=stats))
    finally:
        hook.remove()
        del model.head_logprobs
    assert len(scores) == len(val) and stats.forwards == 1 + len(val) // 2
    assert logits == [(1, 0, model.args.vocab_size)]  # only the prefix run's (empty) head call
    sizes = [n for n, _ in passes]
    assert all(d == model.args.dim for _, d in passes)
    assert sum(sizes) == reads
    # every pass but the last as soon as HEAD_POSITIONS are gathered: at most one batch (2 questions) more
    assert len(sizes) >= 2 and all(HEAD_POSITIONS <= n < HEAD_POSITIONS + 2 * 2 for n in sizes[:-1])
