"""A fixed reference workload timed beside each benchmark case, so timings taken on a shared or a
different machine can be compared as ratios that cancel the machine's speed.

The workload is a small decoder written here in plain torch (3 layers, 64 wide): a prefill at the
case's own (batch, input) shape, then single cached decode steps, each timed on its own. It is the
kind of work a case does, but runs none of npuinfer's model code, so a change that makes npuinfer
slower never slows the reference with it.

Right before and right after each case it times ``steps`` decode steps, and the pytest plugin times
``INTERLEAVED_STEPS`` more before each of the case's runs. The gate divides the case's fastest readings
(npuinfer.gates.performance.gate_values) by the fastest of all these steps: a slow spell of the machine
in the middle of a case then touches neither, and the gate compares time / calibration (throughput x
calibration) with the baseline's same ratio. The median step of the before and after sides is kept too,
for baselines written before the fastest step was.

Why one figure and not a prefill calibration as well: timing the reference's prefill too (best of a
few, like the gate's first-token time) was tried and made the first-token ratios *noisier* than the
raw times on a shared 2-core machine, while the decode-step figure made every metric steadier; see
results/baselines/cpu-tiny/SPREAD.md.

``WORKLOAD`` names the workload: calibrations of different workloads, dtypes or thread counts are never
compared. Change the workload only together with that name.

The figures are stored by npuinfer.results.calibration (``calibration_<model>_<device>.csv``). No pytest here.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

WORKLOAD = "mini-decoder-step-v1"
# Steps timed before each of a case's runs as well (the plugin interleaves them), so the fastest step is drawn
# from the same stretch of time as the case's fastest readings.
INTERLEAVED_STEPS = 4


@dataclass(frozen=True)
class WorkloadShape:
    hidden: int = 64
    heads: int = 4
    ffn: int = 256
    layers: int = 3
    vocab: int = 1024


class Calibrator:
    """Times the reference workload on a device, at a case's (batch, input) shape."""

    def __init__(self, device, dtype: torch.dtype = torch.float32, shape: WorkloadShape = WorkloadShape(),
                 steps: int = 24):
        if steps < 1:
            raise ValueError(f"calibration needs >= 1 step, got {steps}")
        self.device = device  # npuinfer.device.Device (synchronize, torch_device)
        self.dtype = dtype
        self.shape = shape
        self.steps = steps
        gen = torch.Generator().manual_seed(0)
        s = shape

        def weight(*size: int) -> torch.Tensor:
            return (torch.randn(*size, generator=gen) / math.sqrt(size[-1])).to(device.torch_device, dtype)

        self._embed = weight(s.vocab, s.hidden)
        self._layers = [(weight(3 * s.hidden, s.hidden), weight(s.hidden, s.hidden), weight(2 * s.ffn, s.hidden),
                         weight(s.hidden, s.ffn)) for _ in range(s.layers)]
        self._head = weight(s.vocab, s.hidden)
        self._warm: set[tuple[int, int]] = set()

    @staticmethod
    def _norm(x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6).to(x.dtype)

    def _forward(self, ids: torch.Tensor, cache: list) -> torch.Tensor:
        s = self.shape
        x = self._embed[ids]
        b, t, _ = x.shape
        for i, (qkv_w, o_w, up_w, down_w) in enumerate(self._layers):
            q, k, v = F.linear(self._norm(x), qkv_w).view(b, t, 3, s.heads, -1).unbind(2)
            q, k, v = (y.transpose(1, 2) for y in (q, k, v))
            if len(cache) > i:
                k = torch.cat([cache[i][0], k], dim=2)
                v = torch.cat([cache[i][1], v], dim=2)
                cache[i] = (k, v)
            else:
                cache.append((k, v))
            attn = F.scaled_dot_product_attention(q, k, v, is_causal=t > 1)
            x = x + F.linear(attn.transpose(1, 2).reshape(b, t, -1), o_w)
            gate, up = F.linear(self._norm(x), up_w).chunk(2, dim=-1)
            x = x + F.linear(F.silu(gate) * up, down_w)
        return F.linear(self._norm(x[:, -1:]), self._head).argmax(-1)

    def _timed(self, fn) -> tuple[float, object]:
        self.device.synchronize()
        start = time.perf_counter_ns()
        out = fn()
        self.device.synchronize()
        return (time.perf_counter_ns() - start) / 1e6, out

    @torch.inference_mode()
    def measure(self, batch: int, input_len: int, steps: int | None = None) -> list[float]:
        """A prefill of [batch, input_len] token ids (untimed), then ``steps`` (default: the calibrator's)
        decode steps, each timed on its own: their times in ms (the first call at a shape also runs the
        prefill once more, to warm up)."""
        gen = torch.Generator().manual_seed(batch * 100_003 + input_len)
        ids = torch.randint(0, self.shape.vocab, (batch, input_len), generator=gen).to(self.device.torch_device)
        if (batch, input_len) not in self._warm:
            self._forward(ids, [])
            self._warm.add((batch, input_len))
        cache: list = []
        token = self._forward(ids, cache)
        times = []
        for _ in range(self.steps if steps is None else steps):
            ms, token = self._timed(lambda: self._forward(token, cache))
            times.append(ms)
        return times
