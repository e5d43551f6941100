"""One decoder for every family; a family is a set of `ModelArgs` fields.

Canonical tensor names (what checkpoint.py maps each family's names onto):
  tok_embeddings.weight
  layers.N.attention_norm.{weight,bias}     layers.N.ffn_norm.{weight,bias}
  layers.N.attention.wqkv.{weight,bias}     fused [Q; K; V]: Q n_heads x head_dim rows, K and V n_kv_heads x
                                            head_dim rows each (grouped-query attention when n_kv_heads < n_heads)
  layers.N.attention.{q_norm,k_norm}.weight  per-head RMSNorm of q and k before RoPE (Qwen3), head_dim wide
  layers.N.attention.wo.{weight,bias}
  layers.N.feed_forward.w1  (gate for swiglu, up for gelu)
  layers.N.feed_forward.w3  (up, swiglu only)
  layers.N.feed_forward.w2  (down)
  norm.{weight,bias}        output.weight
"""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass, replace
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .kernels import KernelSet, kernels_for
from .kernels import reference as plain_ops
from .kernels.torch_fused import SDPA_GQA


@dataclass(frozen=True)
class Llama3RopeScaling:
    """``rope_scaling`` of type llama3 (Llama-3.1 and later): long wavelengths divided by ``factor``, short ones
    kept, the band between smoothly interpolated, as transformers' ``_compute_llama3_parameters``."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int

    def scale(self, inv_freq: Tensor) -> Tensor:
        old_len = self.original_max_position_embeddings
        low_freq_wavelen = old_len / self.low_freq_factor
        high_freq_wavelen = old_len / self.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / self.factor, inv_freq)
        smooth = (old_len / wavelen - self.low_freq_factor) / (self.high_freq_factor - self.low_freq_factor)
        smoothed = (1 - smooth) * scaled / self.factor + smooth * scaled
        medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
        return torch.where(medium, smoothed, scaled)


@dataclass(frozen=True)
class ModelArgs:
    family: str
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    head_dim: int
    intermediate_size: int  # per branch for swiglu (gate and up each this wide); the 4h width for gelu
    max_seq_len: int
    norm: str = "rms"  # "rms" | "layer"
    norm_eps: float = 1e-6
    position: str = "rope"  # "rope" | "alibi"
    rotary_dim: int | None = None  # None: the whole head (partial rotary for gpt-neox)
    rope_base: float = 10000.0
    qkv_bias: bool = False
    o_bias: bool = False
    mlp: str = "swiglu"  # "swiglu" | "gelu"
    activation: str = "gelu"  # for mlp == "gelu": "gelu" (erf) | "gelu_tanh"
    mlp_bias: bool = False
    parallel_residual: bool = False
    norm_head: bool = False  # Baichuan2: rows of the head are L2-normalised
    n_kv_heads: int | None = None  # K/V heads (grouped-query attention when fewer than n_heads); None: n_heads
    qk_norm: bool = False  # Qwen3: RMSNorm over each head of q and k before RoPE
    rope_scaling: Llama3RopeScaling | None = None
    tp_size: int = 1
    tp_rank: int = 0

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        if self.n_kv_heads < 1 or self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_kv_heads={self.n_kv_heads} must divide n_heads={self.n_heads}")
        for name in ("n_heads", "intermediate_size"):
            if getattr(self, name) % self.tp_size:
                raise ValueError(f"tensor parallel size {self.tp_size} does not divide {name}={getattr(self, name)}")
        if self.n_kv_heads % self.tp_size and self.tp_size % self.n_kv_heads:
            raise ValueError(f"tensor parallel size {self.tp_size} must divide n_kv_heads={self.n_kv_heads} or be "
                             f"a multiple of it (each K/V head then replicated to tp / n_kv_heads ranks)")

    @property
    def n_local_heads(self) -> int:
        return self.n_heads // self.tp_size

    @property
    def n_local_kv_heads(self) -> int:
        """K/V heads one rank holds: its share, or one replicated head when tp exceeds n_kv_heads (as vLLM)."""
        return max(1, self.n_kv_heads // self.tp_size)

    @property
    def kv_head_start(self) -> int:
        """The first K/V head of this rank (ranks that share a replicated head get the same one)."""
        if self.tp_size > self.n_kv_heads:
            return self.tp_rank // (self.tp_size // self.n_kv_heads)
        return self.tp_rank * self.n_local_kv_heads

    @property
    def qkv_widths(self) -> tuple[int, int, int]:
        """Rows of the Q, K and V blocks of the whole (unsharded) fused projection."""
        kv = self.n_kv_heads * self.head_dim
        return self.n_heads * self.head_dim, kv, kv

    @property
    def local_intermediate_size(self) -> int:
        return self.intermediate_size // self.tp_size

    @property
    def rot_dim(self) -> int:
        return self.head_dim if self.rotary_dim is None else self.rotary_dim

    def with_(self, **changes) -> "ModelArgs":
        return replace(self, **changes)

    def num_parameters(self) -> int:
        """Parameters of the whole (unsharded) model, biases included."""
        d, h, i, v = self.dim, self.n_heads * self.head_dim, self.intermediate_size, self.vocab_size
        qkv = h + 2 * self.n_kv_heads * self.head_dim
        norm = d * (2 if self.norm == "layer" else 1)
        attn = d * qkv + (qkv if self.qkv_bias else 0) + h * d + (d if self.o_bias else 0)
        attn += 2 * self.head_dim if self.qk_norm else 0
        n_mats = 3 if self.mlp == "swiglu" else 2
        mlp = n_mats * d * i + ((i + d) if self.mlp_bias else 0)
        return 2 * v * d + norm + self.n_layers * (attn + mlp + 2 * norm)

    def kv_cache_bytes(self, batch: int, seq_len: int, dtype_bytes: int) -> int:
        return 2 * self.n_layers * batch * seq_len * self.n_local_kv_heads * self.head_dim * dtype_bytes


@dataclass
class SeqState:
    """Which cache slots hold real tokens and their position ids, for a left-padded batch."""

    key_valid: Tensor  # [B, S] bool
    positions: Tensor  # [B, S] long
    has_padding: bool

    @classmethod
    def from_attention_mask(cls, attention_mask: Tensor, total_len: int) -> "SeqState":
        batch, prompt_len = attention_mask.shape
        valid = torch.ones(batch, total_len, dtype=torch.bool, device=attention_mask.device)
        valid[:, :prompt_len] = attention_mask.bool()
        positions = (valid.long().cumsum(-1) - 1).clamp_(min=0)
        return cls(valid, positions, has_padding=not bool(attention_mask.bool().all()))


class DecodeSlot(NamedTuple):
    """Where one decode step writes, in a form a captured graph can take: ``pos`` is a 1-element tensor,
    ``window`` the cache slots attended (fixed per run in the cuda/npu graphs; pos + 1, a dynamic dimension,
    in the step exported for cpu)."""

    pos: Tensor
    window: int


class KVCache(nn.Module):
    def __init__(self, batch: int, heads: int, seq_len: int, head_dim: int, dtype: torch.dtype, device=None):
        super().__init__()
        shape = (batch, heads, seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    @classmethod
    def over(cls, k: Tensor, v: Tensor) -> "KVCache":
        """A cache over existing tensors (the exported decode step receives its cache as inputs)."""
        cache = cls.__new__(cls)
        nn.Module.__init__(cache)
        cache.register_buffer("k", k, persistent=False)
        cache.register_buffer("v", v, persistent=False)
        return cache

    def update(self, start: int | DecodeSlot, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        if isinstance(start, DecodeSlot):
            self.k.index_copy_(2, start.pos, k)
            self.v.index_copy_(2, start.pos, v)
            return self.k[:, :, : start.window], self.v[:, :, : start.window]
        end = start + k.shape[2]
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


def _norm(args: ModelArgs) -> nn.Module:
    if args.norm == "layer":
        return nn.LayerNorm(args.dim, eps=args.norm_eps)
    return RMSNorm(args.dim, eps=args.norm_eps)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.kernels: KernelSet | None = None  # set by Transformer.use_kernels; None: the plain reference

    def forward(self, x: Tensor) -> Tensor:
        norm = self.kernels.rms_norm if self.kernels is not None else plain_ops.rms_norm
        return norm(x, self.weight, self.eps)


def rope_tables(args: ModelArgs, device=None) -> tuple[Tensor, Tensor]:
    half = args.rot_dim // 2
    inv_freq = 1.0 / (args.rope_base ** (torch.arange(0, half, dtype=torch.float32, device=device) * 2 / args.rot_dim))
    if args.rope_scaling is not None:
        inv_freq = args.rope_scaling.scale(inv_freq)
    t = torch.arange(args.max_seq_len, dtype=torch.float32, device=device)
    freqs = torch.outer(t, inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def alibi_slopes(n_heads: int) -> Tensor:
    """ALiBi head slopes (Press et al.), with the usual interleave for non-powers of two."""

    def power_of_two(n: int) -> list[float]:
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if math.log2(n_heads).is_integer():
        return torch.tensor(power_of_two(n_heads))
    closest = 2 ** math.floor(math.log2(n_heads))
    extra = power_of_two(2 * closest)[0::2][: n_heads - closest]
    return torch.tensor(power_of_two(closest) + extra)


class AttentionKind(enum.Enum):
    CACHE = "cache"  # rows attend to the KV cache (written first), under ``mask`` or causally
    SPLIT_PREFIX = "split prefix"  # rows after a shared prefix: prefix and own tokens apart, merged by LSE
    CONCAT_PREFIX = "concat prefix"  # rows after a shared prefix: [prefix; own tokens] under ``mask``


@dataclass(frozen=True)
class AttentionPlan:
    """How every layer attends in one forward: chosen once by ``Transformer`` from the rows' state and the
    kernel set, not inferred per layer from whether a mask happens to be there.

    ``mask``: bool [B,1,T,S] (True: visible) or the additive ALiBi bias; None: causal over the keys.
    ``decode``: one query per row against the cache, the decode kernel; ``graph``: inside a captured step."""

    kind: AttentionKind
    mask: Tensor | None = None
    decode: bool = False
    graph: bool = False


Reduce = Callable[[Tensor], Tensor]


class Linear(nn.Linear):
    """nn.Linear through the kernel table's ``linear``. The fused cpu one holds a bf16 weight prepacked for
    oneDNN: ``Transformer.use_kernels`` replaces ``weight`` by the packed tensor (the dense one is dropped, so the
    weights are held once) and puts it back to a dense one for a kernel set that does not pack."""

    kernels: KernelSet | None = None

    def forward(self, x: Tensor) -> Tensor:
        if self.kernels is None:
            return F.linear(x, self.weight, self.bias)
        return self.kernels.linear(x, self.weight, self.bias)

    @property
    def packed(self) -> bool:
        return self.weight.is_mkldnn

    def place_weight(self, kernels: KernelSet, pack: bool = True) -> None:
        """Hold the weight as ``kernels``' linear takes it (prepacked, or dense), replacing the tensor held."""
        self.kernels = kernels
        weight, prepare = self.weight, kernels.kernels["linear"].prepare if pack else None
        if weight.is_mkldnn and prepare is not None and prepare is self._packed_by:
            return  # already in this kernel's form
        dense = weight.to_dense() if weight.is_mkldnn else weight
        placed = prepare(dense) if prepare is not None else dense
        self._packed_by = prepare if placed.is_mkldnn else None
        if placed is not weight:
            self.weight = nn.Parameter(placed, requires_grad=False)

    _packed_by: Callable | None = None


def _identity(x: Tensor) -> Tensor:
    return x


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        width = args.n_local_heads * args.head_dim
        self.kv_width = args.n_local_kv_heads * args.head_dim
        self.wqkv = Linear(args.dim, width + 2 * self.kv_width, bias=args.qkv_bias)
        self.wo = Linear(width, args.dim, bias=args.o_bias)
        if args.qk_norm:
            self.q_norm = RMSNorm(args.head_dim, eps=args.norm_eps)
            self.k_norm = RMSNorm(args.head_dim, eps=args.norm_eps)
        # q, k and v of one shape: projected, rotated and split as one tensor (the fast path of MHA models)
        self.stacked = args.n_local_kv_heads == args.n_local_heads and not args.qk_norm
        self.kv_cache: KVCache | None = None
        self.reduce: Reduce = _identity  # all-reduce under tensor parallelism
        self.kernels: KernelSet | None = None  # set by Transformer.use_kernels
        self.eager = False  # attention through the plain reference (scores materialised; memory.py reads it)

    def forward(self, x: Tensor, start: int | DecodeSlot, cos: Tensor | None, sin: Tensor | None,
                plan: AttentionPlan, prefix: tuple[Tensor, Tensor] | None = None) -> Tensor:
        args, ops = self.args, self.kernels
        bsz, seqlen, _ = x.shape
        rope = ops.rope if ops is not None else plain_ops.rope
        if self.stacked:
            qkv = self.wqkv(x).view(bsz, seqlen, 3, args.n_local_heads, args.head_dim).permute(2, 0, 3, 1, 4)
            if cos is not None:
                q, k = rope(qkv[:2], cos, sin, args.rot_dim)  # q and k rotated in one pass
                v = qkv[2]
            else:
                q, k, v = qkv
        else:  # grouped-query attention (K/V [B, kv heads, T, D]) or per-head q/k norms
            q, k, v = self._split_heads(self.wqkv(x), bsz, seqlen)
            if cos is not None:
                q, k = rope(q, cos, sin, args.rot_dim), rope(k, cos, sin, args.rot_dim)
        if plan.kind is AttentionKind.SPLIT_PREFIX:
            y = _split_prefix_attention(q, k, v, *prefix)
        else:
            if plan.kind is AttentionKind.CONCAT_PREFIX:  # rows continuing one shared [1, H, P, D] prefix
                k = torch.cat([prefix[0].expand(bsz, -1, -1, -1), k], dim=2)
                v = torch.cat([prefix[1].expand(bsz, -1, -1, -1), v], dim=2)
            elif self.kv_cache is not None:
                k, v = self.kv_cache.update(start, k, v)
            causal = plan.mask is None and seqlen > 1
            y = self._attend(plan)(q, k, v, plan.mask, causal)
        y = y.transpose(1, 2).reshape(bsz, seqlen, -1)
        return self.reduce(self.wo(y))

    def _split_heads(self, qkv: Tensor, bsz: int, seqlen: int) -> tuple[Tensor, Tensor, Tensor]:
        args = self.args
        q, k, v = qkv.split([args.n_local_heads * args.head_dim, self.kv_width, self.kv_width], dim=-1)
        q = q.view(bsz, seqlen, args.n_local_heads, args.head_dim)
        k = k.view(bsz, seqlen, args.n_local_kv_heads, args.head_dim)
        if args.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        v = v.view(bsz, seqlen, args.n_local_kv_heads, args.head_dim)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def _attend(self, plan: AttentionPlan) -> Callable:
        ops = self.kernels
        if ops is None or self.eager:
            return plain_ops.attention
        if plan.graph:
            return ops.graph_decode_attention
        return ops.decode_attention if plan.decode else ops.prefill_attention


def _split_prefix_attention(q: Tensor, k: Tensor, v: Tensor, kp: Tensor, vp: Tensor) -> Tensor:
    """Attention over [shared prefix; own causal tokens] as two unmasked flash calls merged by log-sum-exp.

    Every row's queries go against the one prefix K/V in a single call (the batch folded into the query
    length), and against their own K/V with a plain causal mask; no [B, H, T, P+T] mask is built. This is
    where prefix-cached C-Eval scoring spends most of its time on small models (on cpu the masked call over the
    concatenated K/V measured 1.0-1.7x slower by shape, 1.2-1.35x over whole scoring runs).
    """
    flash = _CPU_FLASH
    bsz, heads, seqlen, dim = q.shape
    if not SDPA_GQA and kp.shape[1] != heads:  # an older torch's flash kernel takes K/V at the query heads
        kp, vp, k, v = (plain_ops.repeat_kv(t, heads) for t in (kp, vp, k, v))
    folded = q.transpose(0, 1).reshape(1, heads, bsz * seqlen, dim)
    out_p, lse_p = flash(folded, kp, vp, 0.0, False)
    out_p = out_p.view(heads, bsz, seqlen, dim).transpose(0, 1)
    lse_p = lse_p.view(heads, bsz, seqlen).transpose(0, 1)
    out_o, lse_o = flash(q, k, v, 0.0, True)
    # softmax over both parts = the two partial outputs weighted by their shares of the normaliser (in fp32:
    # a bf16 weight and lerp doubled the error of one attention call)
    weight = torch.sigmoid(lse_p.float() - lse_o.float()).unsqueeze(-1)
    return torch.lerp(out_o.float(), out_p.float(), weight).to(q.dtype)


# Flash attention on cpu that also returns the log-sum-exp (torch >= 2.3); without it the concatenated path runs.
_CPU_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        width = args.local_intermediate_size
        self.gated = args.mlp == "swiglu"
        self.w1 = Linear(args.dim, width, bias=args.mlp_bias)
        if self.gated:
            self.w3 = Linear(args.dim, width, bias=args.mlp_bias)
        self.w2 = Linear(width, args.dim, bias=args.mlp_bias)
        self.approximate = "tanh" if args.activation == "gelu_tanh" else "none"
        self.reduce: Reduce = _identity
        self.kernels: KernelSet | None = None

    def forward(self, x: Tensor) -> Tensor:
        if self.gated:
            gated_mlp = self.kernels.gated_mlp if self.kernels is not None else plain_ops.gated_mlp
            h = gated_mlp(self.w1(x), self.w3(x))
        else:
            h = F.gelu(self.w1(x), approximate=self.approximate)
        return self.reduce(self.w2(h))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.parallel_residual = args.parallel_residual
        self.attention_norm = _norm(args)
        self.attention = Attention(args)
        self.ffn_norm = _norm(args)
        self.feed_forward = FeedForward(args)
        self.kernels: KernelSet | None = None

    def forward(self, x: Tensor, start: int | DecodeSlot, cos, sin, plan: AttentionPlan,
                prefix: tuple[Tensor, Tensor] | None = None) -> Tensor:
        attn = self.attention(self.attention_norm(x), start, cos, sin, plan, prefix)
        if self.parallel_residual:
            return x + attn + self.feed_forward(self.ffn_norm(x))
        if self.kernels is not None and isinstance(self.ffn_norm, RMSNorm):  # the residual add and norm in one
            normed, h = self.kernels.add_rms_norm(x, attn, self.ffn_norm.weight, self.ffn_norm.eps)
            return h + self.feed_forward(normed)
        h = x + attn
        return h + self.feed_forward(self.ffn_norm(h))


# Which positions of a forward reach the head (Transformer.forward's ``logits_at``).
LogitsAt = slice | Tensor
ALL_POSITIONS = slice(None)
LAST_POSITION = slice(-1, None)
NO_POSITION = slice(0, 0)
# Vocabulary rows per matmul in Transformer.head_logprobs: [N, HEAD_CHUNK] fp32 logits stay in cache for the N
# (~100) read positions a scoring run gathers (on cpu 2-4x faster than one [N, vocab] head and log_softmax).
HEAD_CHUNK = 4096


def _at_positions(x: Tensor, at: LogitsAt) -> Tensor:
    """x [B, T, D] at a slice of T ([B, K, D]), or at per-row positions [B, K] (gathered: [B, K, D])."""
    if isinstance(at, slice):
        return x if at == ALL_POSITIONS else x[:, at]
    if at.dim() != 2 or at.shape[0] != x.shape[0]:
        raise ValueError(f"logits_at: expected a slice or positions [batch={x.shape[0]}, K], got shape "
                         f"{tuple(at.shape)}")
    return x.gather(1, at.to(x.device).unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def _embedding(vocab_size: int, dim: int) -> nn.Embedding:
    """nn.Embedding; built under ``torch.device("meta")`` (weights loaded after) without its random init, which
    has no data to fill there and whose meta ``normal_`` imports torch._dynamo: over a second of every start."""
    if torch.empty(0).is_meta:
        return nn.Embedding(vocab_size, dim, _weight=torch.empty(vocab_size, dim))
    return nn.Embedding(vocab_size, dim)


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = _embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = _norm(args)
        self.output = Linear(args.dim, args.vocab_size, bias=False)
        self._tables: dict[str, Tensor] = {}
        self.cache_shape: tuple[int, int] = (0, 0)
        self.compiled_decode = None  # decode_graph.DecodeGraphs, set by decode_graph.compile_decode
        self.kernels: KernelSet | None = None  # use_kernels; None until then: fused, checked at first forward
        self.attention_impl = "sdpa"  # set_attention

    @property
    def device(self) -> torch.device:
        return self.output.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.output.weight.dtype

    def set_attention(self, impl: str) -> None:
        """"eager": attention through the plain reference whatever the kernel set; "sdpa": the kernel set's."""
        if impl not in ("sdpa", "eager"):
            raise ValueError(f"attention: expected 'sdpa' or 'eager', got {impl!r}")
        self.attention_impl = impl
        self._mark_eager()

    def use_kernels(self, kernels: KernelSet) -> None:
        """Run every norm, RoPE, attention, MLP activation and linear layer through ``kernels`` (checked by the
        caller). Linear weights are prepacked here, once, where the linear kernel packs (and unpacked where the
        new set's does not); a head tied to the embedding table stays dense (packing it would hold it twice)."""
        self.kernels = kernels
        modules = [self.norm]
        for layer in self.layers:
            modules += [layer, layer.attention_norm, layer.ffn_norm, layer.attention, layer.feed_forward,
                        getattr(layer.attention, "q_norm", None), getattr(layer.attention, "k_norm", None)]
        for module in modules:
            if hasattr(module, "kernels"):
                module.kernels = kernels
        head = self.output.weight
        tied = not head.is_mkldnn and head.data_ptr() == self.tok_embeddings.weight.data_ptr()
        for module in self.modules():
            if isinstance(module, Linear):  # one at a time: the peak is one matrix above the weights
                module.place_weight(kernels, pack=not (tied and module is self.output))
        self._mark_eager()

    @property
    def packed_linears(self) -> int:
        """How many linear layers hold a prepacked weight."""
        return sum(1 for m in self.modules() if isinstance(m, Linear) and m.packed)

    def _mark_eager(self) -> None:
        plain = self.kernels is not None and not self.kernels.is_fused("prefill_attention")
        for layer in self.layers:
            layer.attention.eager = self.attention_impl == "eager" or plain

    def resolve_kernels(self, mode: str = "fused") -> KernelSet:
        """The model's kernel set; the first call without one selects ``mode`` for the model's device and
        checks it there (at the model's shapes and dtype)."""
        if self.kernels is None:
            self.use_kernels(kernels_for(self.args, self.device, self.dtype, mode))
        return self.kernels

    def setup_caches(self, batch: int, seq_len: int) -> None:
        """Allocate the static KV cache, keeping the current one when it is large enough."""
        if seq_len > self.args.max_seq_len:
            raise ValueError(
                f"{seq_len} tokens (prompt + new tokens) exceed the KV cache limit of {self.args.max_seq_len} "
                "(the model's maximum length, or MAX_SEQ_LEN / --max-seq-len)"
            )
        if self.cache_shape[0] == batch and self.cache_shape[1] >= seq_len:
            return
        # Marked empty first: an allocation that fails midway (out of memory) must not leave a shape
        # that a later call would trust with half the layers holding no cache.
        self.cache_shape = (0, 0)
        for layer in self.layers:
            layer.attention.kv_cache = None  # free the old cache before allocating the new one
        for layer in self.layers:
            layer.attention.kv_cache = KVCache(  # at the K/V heads: never expanded to the query heads
                batch, self.args.n_local_kv_heads, seq_len, self.args.head_dim, self.dtype, self.device
            )
        self.cache_shape = (batch, seq_len)
        self._build_tables()

    def _build_tables(self) -> None:
        args, device = self.args, self.device
        if args.position == "rope":
            cos, sin = rope_tables(args, device)
            self._tables = {"cos": cos.to(self.dtype), "sin": sin.to(self.dtype)}
        else:
            heads = slice(args.tp_rank * args.n_local_heads, (args.tp_rank + 1) * args.n_local_heads)
            self._tables = {"slopes": alibi_slopes(args.n_heads)[heads].to(device)}

    def forward(self, tokens: Tensor, start: int, state: SeqState | None = None,
                logits_at: LogitsAt = ALL_POSITIONS, prefix: list[tuple[Tensor, Tensor]] | None = None,
                head: bool = True) -> Tensor:
        """Logits [B, K, vocab] for ``tokens`` written into cache slots start..start+T, at ``logits_at``.

        ``logits_at``: the positions (of the T) put through the final norm and the head: a slice, the same for
        every row (ALL_POSITIONS, LAST_POSITION, NO_POSITION for a run that only fills the cache), or a [B, K]
        tensor of positions per row. The hidden states are gathered first, so a prefill or a scoring batch never
        holds logits nobody reads ([B, T, vocab] is 5 GB for qwen-7b at batch 8 x 2048).
        ``prefix``: per layer the [1, H, start, D] K/V of slots 0..start shared by every (unpadded) row; the
        rows then attend to it in place and the KV cache is neither read nor written.
        ``head=False``: what the head would receive instead, the final norm's output [B, K, dim] (for
        ``head_logprobs``, which applies the head to the positions of several forwards at once).
        """
        if prefix is not None and (state is not None or prefix[0][0].shape[2] != start):
            raise ValueError("a shared prefix needs rows without padding state that start right after it")
        kernels = self.resolve_kernels()
        # RoPE rows after a shared prefix on cpu: two unmasked flash calls, no mask at all (_split_prefix_attention)
        split_prefix = (prefix is not None and tokens.is_cpu and _CPU_FLASH is not None
                        and self.args.position == "rope" and kernels.is_fused("prefill_attention")
                        and not self.layers[0].attention.eager)
        bsz, seqlen = tokens.shape
        end = start + seqlen
        if state is None:
            positions = None
            k_pos, valid, padded = None, None, False
        else:
            positions = state.positions[:, start:end]
            k_pos, valid, padded = state.positions[:, :end], state.key_valid[:, :end], state.has_padding
        cos = sin = None
        mask = None
        if self.args.position == "rope":
            if positions is None:  # every row at the same positions: a slice, no gather
                cos, sin = self._tables["cos"][start:end][None, None], self._tables["sin"][start:end][None, None]
            else:
                cos, sin = self._rope_at(positions)
            if padded:
                mask = _causal_mask(valid, start, seqlen)
            elif start > 0 and (seqlen > 1 or prefix is not None) and not split_prefix:
                mask = _causal_mask(None, start, seqlen, bsz=bsz, device=tokens.device)
        else:
            if positions is None:  # one bias row for the whole batch: SDPA broadcasts it
                positions = torch.arange(start, end, device=tokens.device)[None]
                k_pos = torch.arange(end, device=tokens.device)[None]
            mask = self._alibi_bias(positions, k_pos, _causal_mask(valid, start, seqlen, device=tokens.device))
        if prefix is None:
            kind = AttentionKind.CACHE
        else:
            kind = AttentionKind.SPLIT_PREFIX if split_prefix else AttentionKind.CONCAT_PREFIX
        plan = AttentionPlan(kind, mask, decode=kind is AttentionKind.CACHE and seqlen == 1 and start > 0)
        x = self.tok_embeddings(tokens)
        for i, layer in enumerate(self.layers):
            x = layer(x, start, cos, sin, plan, prefix[i] if prefix is not None else None)
        hidden = self.norm(_at_positions(x, logits_at))
        return self.output(hidden) if head else hidden

    def head_logprobs(self, hidden: Tensor, rows: Tensor, tokens: Tensor, chunk: int = HEAD_CHUNK,
                      greedy: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """fp32 log_softmax(head(hidden))[rows, tokens]: for ``hidden`` [N, dim] (positions of
        ``forward(..., head=False)``) and ``rows``, ``tokens`` [M], the log-probability of each token at its row.

        The head runs over the vocabulary ``chunk`` rows at a time and each chunk's logits are reduced to a max
        and a sum of exponentials while they are still in cache: no [N, vocab] tensor is built, and the weight
        is read once for all N rows (callers gather as many rows as they can). A token's own logit is its row's
        dot product with the token's head row, in the head's dtype as the whole head computes it.
        ``greedy``: also whether each token is its row's argmax (lm-eval's is_greedy), as (logprobs, flags).
        """
        if self.output.packed:  # a oneDNN-prepacked head has no rows to split: one pass, [N, vocab] logits
            logits = self.output(hidden).float()
            picked = logits.log_softmax(-1)[rows, tokens]
            return (picked, logits.argmax(-1)[rows] == tokens) if greedy else picked
        weight = self.output.weight
        maxes, sums, best = [], [], []
        for offset, part in zip(range(0, weight.shape[0], chunk), weight.split(chunk)):
            logits = F.linear(hidden, part).float()  # [N, chunk]
            top, where = logits.max(-1, keepdim=True)
            maxes.append(top)
            if greedy:
                best.append(where + offset)
            sums.append(logits.sub_(top).exp_().sum(-1, keepdim=True))
        top, total = torch.cat(maxes, -1), torch.cat(sums, -1)  # [N, chunks]
        peak, chunk_of_peak = top.max(-1, keepdim=True)
        log_norm = (peak + (total * (top - peak).exp()).sum(-1, keepdim=True).log()).squeeze(-1)  # [N]
        picked = torch.bmm(hidden[rows].unsqueeze(1), weight[tokens].unsqueeze(-1)).view(-1).float()
        if not greedy:
            return picked - log_norm[rows]
        argmax = torch.cat(best, -1).gather(-1, chunk_of_peak).squeeze(-1)  # [N]: first maximum, as argmax
        return picked - log_norm[rows], argmax[rows] == tokens

    def prefix_kv(self, tokens: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Run ``tokens`` [1, P] from slot 0 and return a copy of every layer's K/V of slots [0, P): the shared
        prefix that rows given to ``forward(..., prefix=)`` attend to."""
        p = tokens.shape[1]
        self.setup_caches(1, p)
        self(tokens, 0, logits_at=NO_POSITION)  # only the cache is kept: no logits at all
        return [(layer.attention.kv_cache.k[:, :, :p].clone(), layer.attention.kv_cache.v[:, :, :p].clone())
                for layer in self.layers]

    def forward_slot(self, tokens: Tensor, slot: DecodeSlot, state: SeqState | None = None) -> Tensor:
        """Logits [B, vocab] of one decode position, with shapes that do not depend on the position.

        The form decode_graph captures once and replays every step (gpt-fast's decode): the K/V are written
        with index_copy at ``slot.pos`` and attention reads the first ``slot.window`` slots under a mask, so
        the step's graph is the same at every position. Same maths as ``forward``.
        """
        self.resolve_kernels()
        device = tokens.device
        k_idx = torch.arange(slot.window, device=device)
        visible = (k_idx <= slot.pos)[None]  # [1, W]
        if state is None:
            q_pos = slot.pos.view(1, 1)
            k_pos = k_idx[None]
        else:
            visible = visible & state.key_valid[:, : slot.window]
            q_pos = state.positions.index_select(1, slot.pos)  # [B, 1]
            k_pos = state.positions[:, : slot.window]
        cos = sin = None
        if self.args.position == "rope":
            cos, sin = self._rope_at(q_pos)
            mask = visible[:, None, None, :]
        else:
            mask = self._alibi_bias(q_pos, k_pos, visible[:, None, None, :])
        plan = AttentionPlan(AttentionKind.CACHE, mask, decode=True, graph=True)
        x = self.tok_embeddings(tokens)
        for layer in self.layers:
            x = layer(x, slot, cos, sin, plan)
        return self.output(self.norm(x))[:, -1]

    def _rope_at(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """cos, sin [B, 1, T, rot] for per-row position ids [B, T]."""
        return self._tables["cos"][positions].unsqueeze(1), self._tables["sin"][positions].unsqueeze(1)

    def _alibi_bias(self, q_pos: Tensor, k_pos: Tensor, allowed: Tensor) -> Tensor:
        slopes = self._tables["slopes"].view(1, -1, 1, 1)
        distance = (k_pos[:, None, None, :] - q_pos[:, None, :, None]).float()
        bias = (slopes * distance).masked_fill_(~allowed, float("-inf"))  # fp32 as the reference, one copy
        return bias.to(self.dtype)


def _causal_mask(valid: Tensor | None, start: int, seqlen: int, bsz: int = 1, device=None) -> Tensor:
    """[B,1,T,start+T] bool: slot j visible to query i when j <= start+i and slot j is real."""
    end = start + seqlen
    device = valid.device if valid is not None else device
    allowed = torch.ones(seqlen, end, dtype=torch.bool, device=device).tril(start)
    if valid is None:
        return allowed[None, None].expand(bsz, 1, seqlen, end)
    # A padding query would see no slot at all and produce NaN, which then leaks through
    # 0 * NaN into real rows; letting every query see its own slot keeps the math finite.
    own = torch.arange(seqlen, device=device)
    itself = torch.zeros(seqlen, end, dtype=torch.bool, device=device)
    itself[own, start + own] = True
    return (allowed[None] & valid[:, None, :] | itself[None]).unsqueeze(1)
