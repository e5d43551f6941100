"""``--backend hf``: transformers' own ``generate`` on the same checkpoint, timed by the same Timer.

The checkpoint is read by npuinfer's loader (same files, same canonical tensors) and mapped onto
the transformers class that computes the same function, chosen by what the model computes (ModelArgs),
not by its family's name:

  GELU MLP, LayerNorm               -> GPTNeoXForCausalLM (gpt-neox; GPT-NeoX tensor names)
  SwiGLU, per-head q/k norms        -> Qwen3ForCausalLM (qwen3)
  SwiGLU, bias on q/k/v only        -> Qwen2ForCausalLM (qwen2; qwen v1: fused c_attn split into q/k/v, w2 the gate)
  SwiGLU, bias on all of q/k/v/o    -> LlamaForCausalLM with attention_bias=True (internlm)
  SwiGLU, no attention bias         -> LlamaForCausalLM (llama; baichuan2-7b: W_pack split; NormHead rows
                                       normalised at load)
Each gets the model's K/V head count (grouped-query attention), head_dim and RoPE scaling (llama3 type).
  ALiBi                             -> none: no transformers equivalent, a clear error (baichuan2-13b)

transformers is not patched. Its generate is observed from outside: forward pre/post hooks on the
model mark each forward, and a StoppingCriteria (called once per step, after the new token is
appended) marks the end of each step. A step starts where the previous one ended, so pre-processing
is transformers' input preparation for that step (cache and mask update, prepare_inputs) and
post-processing its logits processing, argmax and the token append. A LogitsProcessor keeps each step's
largest logit per row, as npuinfer's own decoder does, so NaN / inf logits raise NonFiniteLogits on both
backends (one max over the vocabulary a step, on either side).
"""
from __future__ import annotations

import inspect
from pathlib import Path

import torch
from torch import Tensor

from ..checkpoint import (
    args_from_config,
    checkpoint_identity,
    detect_family,
    env_max_seq_len,
    from_canonical,
    read_canonical,
    read_config,
)
from ..device import Device
from ..families import gpt_neox
from ..generate import check_finite
from ..model import Linear, Llama3RopeScaling, ModelArgs
from ..quant import plan_from_state
from .base import BackendUnsupported


class HFUnsupported(BackendUnsupported):
    """A checkpoint transformers has no native model for."""


def _transformers_version() -> tuple[int, int]:
    import transformers

    major, minor = transformers.__version__.split(".")[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


def _rope_kwargs(config_cls, base: float, partial: float | None = None,
                 scaling: Llama3RopeScaling | None = None) -> dict:
    """RoPE settings as this transformers version spells them (5.x: rope_parameters)."""
    scaled = {} if scaling is None else {"rope_type": "llama3", "factor": scaling.factor,
                                         "low_freq_factor": scaling.low_freq_factor,
                                         "high_freq_factor": scaling.high_freq_factor,
                                         "original_max_position_embeddings": scaling.original_max_position_embeddings}
    if "rope_parameters" in inspect.signature(config_cls.__init__).parameters:
        params = {"rope_type": "default", "rope_theta": base, **scaled}
        if partial is not None:
            params["partial_rotary_factor"] = partial
        return {"rope_parameters": params}
    if partial is not None:  # GPTNeoXConfig of transformers 4.x
        return {"rotary_pct": partial, "rotary_emb_base": base}
    return {"rope_theta": base, **({"rope_scaling": scaled} if scaled else {})}


def _common(args: ModelArgs) -> dict:
    return dict(vocab_size=args.vocab_size, hidden_size=args.dim, num_hidden_layers=args.n_layers,
                num_attention_heads=args.n_heads, max_position_embeddings=args.max_seq_len,
                tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=0)


def _llama_names(args: ModelArgs, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Canonical tensors -> Llama / Qwen2 / Qwen3 names, the fused [Q; K; V] split into three projections."""
    out = {"model.embed_tokens.weight": state["tok_embeddings.weight"], "model.norm.weight": state["norm.weight"],
           "lm_head.weight": state["output.weight"]}
    for i in range(args.n_layers):
        src, dst = f"layers.{i}.", f"model.layers.{i}."
        out[dst + "input_layernorm.weight"] = state[src + "attention_norm.weight"]
        out[dst + "post_attention_layernorm.weight"] = state[src + "ffn_norm.weight"]
        for kind in ("weight", "bias"):
            fused = state.get(f"{src}attention.wqkv.{kind}")
            if fused is not None:
                for name, part in zip("qkv", fused.split(list(args.qkv_widths), dim=0)):
                    out[f"{dst}self_attn.{name}_proj.{kind}"] = part
            if f"{src}attention.wo.{kind}" in state:
                out[f"{dst}self_attn.o_proj.{kind}"] = state[f"{src}attention.wo.{kind}"]
        for norm in ("q_norm", "k_norm"):
            if f"{src}attention.{norm}.weight" in state:
                out[f"{dst}self_attn.{norm}.weight"] = state[f"{src}attention.{norm}.weight"]
        out[dst + "mlp.gate_proj.weight"] = state[src + "feed_forward.w1.weight"]
        out[dst + "mlp.up_proj.weight"] = state[src + "feed_forward.w3.weight"]
        out[dst + "mlp.down_proj.weight"] = state[src + "feed_forward.w2.weight"]
    return out


def hf_equivalent(args: ModelArgs, state: dict[str, Tensor], where: str = "checkpoint"):
    """(transformers model class, its config, its state dict) computing what ``args`` + ``state`` compute."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2Config, \
        Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    if args.position == "alibi":
        raise HFUnsupported(
            f"{where}: ALiBi attention (Baichuan2-13B) has no native transformers model, so --backend hf cannot run "
            "it without the checkpoint's own remote code, which npuinfer never executes; use --backend npuinfer")
    if args.mlp == "gelu":
        if args.norm != "layer" or args.qkv_bias != args.o_bias or not args.mlp_bias:
            raise HFUnsupported(f"{where}: a GELU MLP maps onto GPTNeoXForCausalLM only with LayerNorm and biases "
                                f"on the MLP and on all attention projections alike")
        config = GPTNeoXConfig(**_common(args), intermediate_size=args.intermediate_size,
                               hidden_act="gelu" if args.activation == "gelu" else "gelu_pytorch_tanh",
                               layer_norm_eps=args.norm_eps, use_parallel_residual=args.parallel_residual,
                               attention_bias=args.qkv_bias,
                               **_rope_kwargs(GPTNeoXConfig, args.rope_base, args.rot_dim / args.head_dim))
        hf_state = from_canonical(gpt_neox.FAMILY.name, state, args)  # GPTNeoX's names are the family's own
        return GPTNeoXForCausalLM, config, hf_state
    if args.rotary_dim not in (None, args.head_dim):
        raise HFUnsupported(f"{where}: partial rotary embeddings are only mapped for a GELU (GPT-NeoX) model")
    if args.norm != "rms" or args.parallel_residual:
        raise HFUnsupported(f"{where}: a SwiGLU model maps onto Llama / Qwen2 only with RMSNorm and sequential residuals")
    common = dict(**_common(args), intermediate_size=args.intermediate_size, num_key_value_heads=args.n_kv_heads,
                  rms_norm_eps=args.norm_eps, hidden_act="silu")
    if args.qk_norm:  # Qwen3: per-head q/k RMSNorm; attention_bias covers q, k, v and o alike
        if args.qkv_bias != args.o_bias:
            raise HFUnsupported(f"{where}: Qwen3's attention_bias covers q, k, v and o together; this checkpoint has "
                                f"qkv bias={args.qkv_bias}, o bias={args.o_bias}")
        config = Qwen3Config(**common, head_dim=args.head_dim, attention_bias=args.qkv_bias, use_sliding_window=False,
                             **_rope_kwargs(Qwen3Config, args.rope_base, scaling=args.rope_scaling))
        return Qwen3ForCausalLM, config, _llama_names(args, state)
    if args.qkv_bias and not args.o_bias:  # Qwen2: biases on q, k and v only, heads of hidden_size / heads
        if args.head_dim * args.n_heads != args.dim:
            raise HFUnsupported(f"{where}: Qwen2ForCausalLM's heads are hidden_size / num_attention_heads wide; this "
                                f"checkpoint's are {args.head_dim}")
        config = Qwen2Config(**common, use_sliding_window=False,
                             **_rope_kwargs(Qwen2Config, args.rope_base, scaling=args.rope_scaling))
        return Qwen2ForCausalLM, config, _llama_names(args, state)
    if args.qkv_bias != args.o_bias:
        raise HFUnsupported(f"{where}: Llama's attention_bias covers q, k, v and o together and Qwen2 biases q, k "
                            f"and v only; this checkpoint has qkv bias={args.qkv_bias}, o bias={args.o_bias}")
    # Baichuan2's NormHead: to_canonical already normalised the head's rows, so a plain lm_head matches.
    config = LlamaConfig(**common, head_dim=args.head_dim, attention_bias=args.qkv_bias, mlp_bias=False,
                         **_rope_kwargs(LlamaConfig, args.rope_base, scaling=args.rope_scaling))
    return LlamaForCausalLM, config, _llama_names(args, state)


def copied_bytes(args: ModelArgs, dtype: torch.dtype) -> int:
    """Bytes transformers' model holds beyond the canonical tensors it shares (`hf_equivalent`): GPT-NeoX interleaves
    q, k and v per head, a re-laid copy of each layer's fused qkv weight and bias; the Llama / Qwen2 mappings split
    the fused tensor into row blocks, which are views (no copy)."""
    if args.mlp != "gelu":
        return 0
    width = args.n_heads * args.head_dim
    return args.n_layers * (3 * width * args.dim + (3 * width if args.qkv_bias else 0)) * dtype.itemsize


def load_hf_model(model_dir: str | Path, device: Device, dtype: torch.dtype, *, position: str | None = None,
                  max_seq_len: int | None = None, attention: str = "sdpa"):
    """(transformers model on ``device``, ModelArgs) for a checkpoint directory npuinfer can load."""
    model_dir = Path(model_dir)
    config = read_config(model_dir)
    config_path = str(model_dir / "config.json")
    family = detect_family(config, config_path)
    cap = max_seq_len if max_seq_len is not None else env_max_seq_len()
    args = args_from_config(config, family, position=position, path=config_path, max_seq_len=cap)
    if args.position == "alibi":  # fail before reading gigabytes of weights
        hf_equivalent(args, {}, config_path)
    state, _ = read_canonical(model_dir, config, family, args)
    if plan_from_state(state):  # int8 weights would load into float layers as their integer values
        raise HFUnsupported(f"{model_dir}: a W8 quantized checkpoint; transformers has no equivalent of its int8 "
                            f"layers here; use --backend npuinfer")
    return hf_model_from_canonical(args, state, device, dtype, attention, config_path), args


def hf_model_from_canonical(args: ModelArgs, state: dict[str, Tensor], device: Device, dtype: torch.dtype,
                            attention: str = "sdpa", where: str = "checkpoint"):
    """The transformers model computing ``args`` + canonical ``state``; tensors already in ``dtype`` on the
    device are used in place, not copied (so --dummy-weights runs both backends on one set of weights)."""
    cls, hf_config, hf_state = hf_equivalent(args, state, where)
    hf_state = {k: v.to(dtype) for k, v in hf_state.items()}
    dtype_kw = "dtype" if _transformers_version() >= (4, 56) else "torch_dtype"
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model = cls.from_pretrained(None, config=hf_config, state_dict=hf_state, attn_implementation=attention,
                                    **{dtype_kw: dtype})
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    model = model.to(device.torch_device).eval().requires_grad_(False)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


class HFBackend:
    """transformers generate, exact output length (no EOS), observed through hooks (see module doc)."""

    name = "hf"

    def __init__(self, model, args: ModelArgs, device: Device, checkpoint: str = ""):
        from transformers import LogitsProcessor, StoppingCriteria

        self.model = model
        self.args = args
        self.device = device
        self.dtype = model.dtype
        self.checkpoint = checkpoint
        self.weights = "checkpoint"
        self.max_seq_len = args.max_seq_len
        self.vocab_size = args.vocab_size
        self._observer = None
        self._forwards = 0
        self._steps = 0
        model.register_forward_pre_hook(self._forward_start)
        model.register_forward_hook(self._forward_end)
        backend = self

        class _StepEnd(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                if backend._observer is not None:
                    backend._observer.step_end(backend._steps)
                backend._steps += 1
                return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

        self._step_end = _StepEnd()

        class _RecordChosen(LogitsProcessor):
            """Each step's largest logit per row (what greedy picks), for the same non-finite check npuinfer's
            own decoder runs (generate.check_finite); the scores pass through unchanged."""

            def __call__(self, input_ids, scores):
                if backend._chosen is not None:
                    backend._chosen.append(scores.max(dim=-1).values)
                return scores

        self._record_chosen = _RecordChosen()
        self._chosen: list[Tensor] | None = None

    @classmethod
    def load(cls, model_dir: str | Path, device: Device, dtype: torch.dtype, *, position: str | None = None,
             max_seq_len: int | None = None, attention: str = "sdpa") -> "HFBackend":
        model, args = load_hf_model(model_dir, device, dtype, position=position, max_seq_len=max_seq_len,
                                    attention=attention)
        return cls(model, args, device, checkpoint_identity(model_dir))

    @classmethod
    def sharing(cls, loaded, attention: str = "sdpa") -> "HFBackend":
        """transformers' model over the weights of an npuinfer LoadedModel (its dummy weights: no checkpoint)."""
        # A weight prepacked for npuinfer's cpu linear kernel is unpacked in place, one matrix at a time (that
        # kernel takes dense weights too): transformers then reads the very tensors npuinfer's model holds. An
        # unpacked copy beside the prepacked model held the weights twice (qwen-7b bf16: 2 x 15 GB, OOM-killed).
        for module in loaded.model.modules():
            if isinstance(module, Linear) and module.packed:
                module.place_weight(module.kernels, pack=False)
        state = loaded.model.state_dict()
        model = hf_model_from_canonical(loaded.args, state, loaded.device, loaded.dtype, attention, loaded.name)
        backend = cls(model, loaded.args, loaded.device, loaded.checkpoint_id)
        backend.weights = loaded.weights
        return backend

    def _forward_start(self, module, args) -> None:
        if self._observer is not None:
            self._observer.forward_start(self._forwards)

    def _forward_end(self, module, args, output) -> None:
        if self._observer is not None:
            self._observer.forward_end(self._forwards)
        self._forwards += 1

    @torch.inference_mode()
    def generate(self, input_ids: Tensor, attention_mask: Tensor, max_new_tokens: int,
                 observer: object | None = None) -> Tensor:
        from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList

        config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, use_cache=True,
                                  eos_token_id=None, pad_token_id=0, bos_token_id=None)
        self._observer, self._forwards, self._steps, self._chosen = observer, 0, 0, []
        try:
            dev = self.device.torch_device
            ids = input_ids.to(dev, non_blocking=True)
            out = self.model.generate(input_ids=ids, attention_mask=attention_mask.to(dev, non_blocking=True),
                                      generation_config=config,
                                      stopping_criteria=StoppingCriteriaList([self._step_end]),
                                      logits_processor=LogitsProcessorList([self._record_chosen]))
            check_finite(self._chosen)  # NonFiniteLogits, as from npuinfer's generate: a bench row "nonfinite"
        finally:
            self._observer, self._chosen = None, None
        return out[:, input_ids.shape[1]:]
