"""Rows attending to one shared prefix K/V in place (`forward(..., prefix=)`, what prefix-cached C-Eval scoring
runs) give the logits of the same rows run after the prefix was copied into every row's KV cache."""
from __future__ import annotations

import pytest
import torch

from conftest import TINY_NAMES


def _through_the_cache(model, kv, rows: torch.Tensor) -> torch.Tensor:
    p = kv[0][0].shape[2]
    model.setup_caches(rows.shape[0], p + rows.shape[1])
    for layer, (k, v) in zip(model.layers, kv):
        layer.attention.kv_cache.update(0, k, v)  # the prefix copied into every row
    return model(rows, p)


@pytest.mark.parametrize("width", [11, 1])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("name", TINY_NAMES)
def test_rows_after_a_shared_prefix_equal_rows_after_a_copied_prefix(load_tiny, name, attention, width):
    model = load_tiny(name).model
    g = torch.Generator().manual_seed(0)
    prefix_ids = torch.randint(3, 200, (1, 37), generator=g)
    rows = torch.randint(3, 200, (5, width), generator=g)
    tail_from = min(6, width - 1)
    try:
        model.set_attention(attention)
        with torch.inference_mode():
            kv = model.prefix_kv(prefix_ids)
            expected = _through_the_cache(model, kv, rows)
            got = model(rows, prefix_ids.shape[1], prefix=kv)
            tail = model(rows, prefix_ids.shape[1], logits_at=slice(tail_from, None), prefix=kv)
            at = torch.randint(0, width, (5, 2), generator=g)  # per row, the head sees only these positions
            gathered = model(rows, prefix_ids.shape[1], logits_at=at, prefix=kv)
    finally:
        model.set_attention("sdpa")
    assert torch.allclose(got, expected, atol=1e-5, rtol=0), f"{(got - expected).abs().max():.3e}"
    assert torch.allclose(tail, expected[:, tail_from:], atol=1e-5, rtol=0)
    assert gathered.shape == (5, 2, expected.shape[-1])
    assert torch.allclose(gathered, expected[torch.arange(5)[:, None], at], atol=1e-5, rtol=0)


def test_a_prefix_that_does_not_end_where_the_rows_start_is_refused(load_tiny):
    model = load_tiny("qwen-tiny").model
    with torch.inference_mode():
        kv = model.prefix_kv(torch.randint(3, 200, (1, 8)))
        with pytest.raises(ValueError, match="shared prefix"):
            model(torch.randint(3, 200, (2, 4)), 9, prefix=kv)
