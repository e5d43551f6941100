"""``--backend hf``: transformers' model class on the same checkpoint (npuinfer.backends.hf_model maps the weights).

Timed generation is transformers' own ``generate`` (hf_model.HFBackend). Log-likelihood is computed here the
plain way lm-evaluation-harness's HF model does it, independently of npuinfer's prefix reuse: each request fed
whole as ``(context + continuation)[-(L + 1):][:-1]``, right-padded in batches, the continuation's tokens read
at their positions (the head applied to those positions only). So ``pytest accuracy/ --backend hf`` is an
independent check of npuinfer's scoring on the same weights.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from ..device import dtype_name, parse_dtype
from ..dummy import check_fits, dummy_source
from .hf_model import HFBackend, HFUnsupported, copied_bytes, hf_equivalent
from ..locate import resolve_model_dir
from ..model import Transformer
from ..runtime import default_dtype
from ..tokenizer import load_tokenizer
from .base import GenerateRequest, Generation, Identity, Loglikelihood, LoglikelihoodRequest, WorkCounters, \
    lmeval_fit


class HFModelBackend(HFBackend):
    """HFBackend (timed generate) with the scoring half of the backend interface."""

    tokenizer = None
    model_label = ""

    def identity(self) -> Identity:
        return Identity(backend=self.name, model=self.model_label, checkpoint=self.checkpoint, weights=self.weights,
                        dtype=dtype_name(self.dtype), max_length=self.max_seq_len,
                        tokenizer=str(getattr(self, "tokenizer_dir", "")))

    def unsupported(self, suite: str) -> str | None:
        return None

    @torch.inference_mode()
    def loglikelihood(self, requests: Sequence[LoglikelihoodRequest], *, max_length: int | None = None,
                      batch_size: int = 8, counters: WorkCounters | None = None, share_prefix: bool = True
                      ) -> Iterator[tuple[int, Loglikelihood]]:
        limit = min(self.max_seq_len, max_length or self.max_seq_len)
        counters = counters if counters is not None else WorkCounters()
        fed = [lmeval_fit(r.context, r.continuation, limit) for r in requests]
        order = sorted(range(len(requests)), key=lambda i: len(fed[i][0]), reverse=True)
        head = self.model.get_output_embeddings()
        for b in range(0, len(order), batch_size):
            batch = order[b:b + batch_size]
            width = max(len(fed[i][0]) for i in batch)
            ids = torch.full((len(batch), width), self.tokenizer.pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            rows, positions, tokens = [], [], []
            for r, i in enumerate(batch):
                row, n_context = fed[i]
                ids[r, :len(row)] = torch.tensor(row)
                mask[r, :len(row)] = 1
                for j, t in enumerate(requests[i].continuation):
                    rows.append(r)
                    positions.append(n_context - 1 + j)
                    tokens.append(t)
            dev = self.device.torch_device
            hidden = self.model.base_model(input_ids=ids.to(dev), attention_mask=mask.to(dev)).last_hidden_state
            logits = head(hidden[torch.tensor(rows, device=dev), torch.tensor(positions, device=dev)]).float()
            token_t = torch.tensor(tokens, device=dev)
            lp = logits.log_softmax(-1).gather(-1, token_t[:, None]).squeeze(-1).tolist()
            greedy = (logits.argmax(-1) == token_t).tolist()
            counters.forwards += 1
            counters.prompt_tokens += int(mask.sum())
            counters.padded_tokens += ids.numel()
            k = 0
            for r, i in enumerate(batch):
                n = len(requests[i].continuation)
                yield i, Loglikelihood(sum(lp[k:k + n]), all(greedy[k:k + n]))
                k += n

    @torch.inference_mode()
    def generate_until(self, requests: Sequence[GenerateRequest], *, max_length: int | None = None,
                       batch_size: int = 8, counters: WorkCounters | None = None, share_prefix: bool = True
                       ) -> Iterator[tuple[int, Generation]]:
        from transformers import GenerationConfig

        limit = min(self.max_seq_len, max_length or self.max_seq_len)
        counters = counters if counters is not None else WorkCounters()
        tok = self.tokenizer
        for b in range(0, len(requests), batch_size):
            batch = list(range(b, min(b + batch_size, len(requests))))
            max_new = max(requests[i].max_new_tokens for i in batch)
            rows = [list(requests[i].context)[-(limit - max_new):] for i in batch]
            width = max(len(r) for r in rows)
            ids = torch.full((len(rows), width), tok.pad_id, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for r, row in enumerate(rows):  # left padding: every row's next token at the same place
                ids[r, width - len(row):] = torch.tensor(row)
                mask[r, width - len(row):] = 1
            config = GenerationConfig(max_new_tokens=max_new, do_sample=False, num_beams=1, use_cache=True,
                                      eos_token_id=tok.eos_id, pad_token_id=tok.pad_id, bos_token_id=None)
            dev = self.device.torch_device
            out = self.model.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev), generation_config=config,
                                      return_dict_in_generate=True, output_scores=True)
            finite = torch.stack([s.max(-1).values for s in out.scores], -1).isfinite().all(-1).tolist()
            counters.forwards += 1
            counters.prompt_tokens += int(mask.sum())
            counters.padded_tokens += ids.numel()
            counters.generated_tokens += len(rows) * (len(out.scores) - 1)
            for r, i in enumerate(batch):
                new = out.sequences[r, width:].tolist()[:requests[i].max_new_tokens]
                if tok.eos_id in new:
                    new = new[:new.index(tok.eos_id)]
                stop = requests[i].stop
                if stop is not None:  # as npuinfer's runtime: the shortest output whose text passes the test
                    new = next((new[:k] for k in range(1, len(new) + 1) if stop(tok.decode(new[:k]))), new)
                yield i, Generation(tok.decode(new), bool(finite[r]))


def make_hf_backend(source) -> HFModelBackend:
    """The hf backend for a BackendSource: over npuinfer's dummy weights (no checkpoint) or a checkpoint."""
    config, device = source.config, source.device
    dtype = parse_dtype(config.dtype) if config.dtype else default_dtype(device)
    _check_fits(config, device, dtype)
    if config.dummy_weights:  # transformers over the same dummy weights
        loaded = source.local()
        backend = HFModelBackend.sharing(loaded, attention=config.attention)
        backend.tokenizer, backend.model_label, backend.tokenizer_dir = loaded.tokenizer, loaded.name, loaded.model_dir
        return backend
    model_dir = resolve_model_dir(config.model, config.model_path) if config.model else Path(config.model_path)
    device.check_dtype(dtype)
    backend = HFModelBackend.load(model_dir, device, dtype, max_seq_len=config.max_seq_len,
                                  attention=config.attention)
    backend.tokenizer = load_tokenizer(model_dir, backend.args.family)
    backend.model_label = config.model or model_dir.name
    backend.tokenizer_dir = model_dir
    return backend


def _check_fits(config, device, dtype) -> None:
    """The weights and every copy transformers' model makes of them (`copied_bytes`), refused before any is
    allocated (over dummy weights npuinfer's loader counts the weights it makes; this adds transformers' copies)."""
    args, _, origin = dummy_source(config.model, config.model_path, config.max_seq_len)
    label = config.model or Path(config.model_path).name
    check_fits(args, dtype, device, config.memory_limit, f"{label} ({origin}) under --backend hf",
               copies=(copied_bytes(args, dtype), "transformers' re-laid copy of each layer's q/k/v"),
               weights="dummy" if config.dummy_weights else "checkpoint")


def hf_refusal(config) -> str | None:
    """Why transformers has no model class computing this run's model (ALiBi, say), from its shapes alone: said
    before any case runs, without reading a weight (the mapping runs on meta tensors)."""
    args, _, origin = dummy_source(config.model, config.model_path, config.max_seq_len)
    with torch.device("meta"):
        shapes = Transformer(args).state_dict()
    try:
        hf_equivalent(args, shapes, origin)
    except HFUnsupported as exc:
        return str(exc)
    return None
