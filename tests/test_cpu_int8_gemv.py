"""npuinfer's own cpu W8A16 GEMV (npuinfer/kernels/csrc/w8a16_gemv.cpp, issue 13): built wherever it can be, equal to
a float64 reference over shapes with remainders in both dimensions, chosen for W8A16 layers and checked by the
kernel table against dequantize-then-matmul, int8pack beyond 4 rows, and off with $NPUINFER_CPU_KERNELS=0."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from npuinfer.kernels import cpu_extension


@pytest.fixture(scope="module")
def gemv():
    reason = cpu_extension.why_not()
    if reason is not None:
        pytest.skip(f"npuinfer's cpu kernels cannot be built here: {reason}")
    return cpu_extension.load().w8a16_gemv  # where it can be built it must build: a failure fails here


@pytest.mark.parametrize("rows", [1, 2, 3, 4])
@pytest.mark.parametrize("n, k", [(1, 16), (7, 70), (37, 64), (64, 333), (389, 40)])  # 389: 5-7 chunks of rows
def test_gemv_equals_a_float64_reference(gemv, rows, n, k):
    gen = torch.Generator().manual_seed(rows * 1000 + n + k)
    x = torch.randn(rows, k, generator=gen)
    w = torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int8)
    scale = torch.rand(n, 1, generator=gen) * 0.02 + 1e-3
    want = (x.double() @ w.double().T) * scale.double().view(1, -1)
    got = gemv(x, w, scale)
    assert got.dtype == torch.float32 and got.shape == (rows, n)
    assert (got.double() - want).abs().max() <= 1e-5 * want.abs().max()  # fp32 sums of exact products
    bf16 = gemv(x.bfloat16(), w, scale)  # bf16 activations are widened exactly; the output is rounded to bf16
    want16 = (x.bfloat16().double() @ w.double().T) * scale.double().view(1, -1)
    assert bf16.dtype == torch.bfloat16 and (bf16.double() - want16).abs().max() <= 8e-3 * want16.abs().max()


def test_rows_handed_out_dynamically_give_the_same_bits_on_any_thread_count(gemv):
    # each output row is one thread's sequential sum, whichever thread takes its chunk
    gen = torch.Generator().manual_seed(5)
    x, w = torch.randn(4, 72, generator=gen), torch.randint(-128, 128, (1001, 72), generator=gen, dtype=torch.int8)
    scale = torch.rand(1001, generator=gen)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = [gemv(x[:m], w, scale) for m in (1, 4)]
        torch.set_num_threads(max(2, threads))
        assert all(torch.equal(gemv(x[:m], w, scale), want) for m, want in zip((1, 4), one))
    finally:
        torch.set_num_threads(threads)


def test_bad_shapes_are_refused_naming_them(gemv):
    w = torch.zeros(8, 16, dtype=torch.int8)
    with pytest.raises(RuntimeError, match="1 to 4 rows of x, got 5"):
        gemv(torch.zeros(5, 16), w, torch.ones(8))
    with pytest.raises(RuntimeError, match=r"x \[M, K\] and weight \[N, K\] expected"):
        gemv(torch.zeros(2, 15), w, torch.ones(8))
    with pytest.raises(RuntimeError, match="contiguous cpu int8 weight"):
        gemv(torch.zeros(2, 8), w.T, torch.ones(16))


@pytest.mark.parametrize("offset", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_w8a16_layers_choose_it_and_agree_with_dequantize_then_matmul(gemv, offset, dtype):
    from npuinfer.quant.kernels import CPU_GEMV, w8a16_dequantize
    from npuinfer.quant.linear import QuantLinear

    gen = torch.Generator().manual_seed(1)
    layer = QuantLinear(96, 50, "W8A16", bias=False)
    layer.weight.copy_(torch.randint(-128, 128, (50, 96), generator=gen, dtype=torch.int8))
    layer.weight_scale.copy_(torch.rand(50, 1, generator=gen) * 0.01 + 1e-3)
    layer.weight_offset.copy_(torch.randint(-3, 4, (50, 1), generator=gen).float() if offset else torch.zeros(50, 1))
    assert layer.prepare("cpu", dtype) == [] and layer.kernel_name == CPU_GEMV
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for rows in (1, 4, 5, 9):  # the GEMV's rows, then int8pack's
        x = torch.randn(rows, 96, generator=gen).to(dtype)
        with torch.no_grad():
            got, want = layer(x).double(), w8a16_dequantize(x.double(), layer)
        assert (got - want).abs().max() <= tol * want.abs().max(), rows


LAYER_WITH_KERNELS_OFF = """
import torch
from npuinfer.quant.linear import QuantLinear
layer = QuantLinear(32, 8, "W8A16", bias=False)
layer.weight.zero_(); layer.weight_scale.fill_(1.0); layer.weight_offset.zero_()
print(layer.prepare("cpu", torch.float32)); print(layer.kernel_name)
"""


def test_off_with_the_environment_variable_and_the_notes_say_so():
    env = {**os.environ, cpu_extension.DISABLE_ENV: "0"}
    run = subprocess.run([sys.executable, "-c", LAYER_WITH_KERNELS_OFF], capture_output=True, text=True, timeout=300,
                         env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    notes, name = run.stdout.splitlines()
    assert name == "torch._weight_int8pack_mm"
    assert f"Unavailable: ${cpu_extension.DISABLE_ENV}=0" in notes
