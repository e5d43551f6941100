"""``--backend npuinfer``: npuinfer's own runtime (static KV cache, the kernel table, W8 layers, TP)."""
from __future__ import annotations

from collections.abc import Iterator, Sequence

from torch import Tensor

from ..generate import generate
from ..runtime import LoadedModel
from .base import GenerateRequest, Generation, Identity, Loglikelihood, LoglikelihoodRequest, WorkCounters
from .prefix_reuse import PrefixReuse


class NpuinferBackend:
    """A LoadedModel behind the backend interface: generate() with EOS ignored, prefix-reusing scoring."""

    name = "npuinfer"

    def __init__(self, loaded: LoadedModel):
        self.loaded = loaded
        self.device = loaded.device
        self.dtype = loaded.dtype
        self.checkpoint = loaded.checkpoint_id
        self.quantization = loaded.quantization  # {"quantization": ..., "quant_kernel": ...} (npuinfer.quant)
        self.weights = loaded.weights
        self.max_seq_len = loaded.args.max_seq_len
        self.vocab_size = loaded.args.vocab_size
        self.tokenizer = loaded.tokenizer
        self._scoring = PrefixReuse(loaded.model, loaded.tokenizer.pad_id, loaded.tokenizer.eos_id,
                                    loaded.tokenizer.decode)

    @property
    def args(self):  # npuinfer.model.ModelArgs
        return self.loaded.args

    def identity(self) -> Identity:
        kernels = self.loaded.kernels
        return Identity(backend=self.name, model=self.loaded.name, checkpoint=self.checkpoint,
                        weights=self.weights, dtype=self.loaded.dtype_name, max_length=self.max_seq_len,
                        kernels=kernels.label, quantization=dict(self.quantization),
                        tokenizer=str(self.loaded.model_dir),
                        provenance={"kernels": kernels.describe(), "kernel_check": kernels.check_summary()})

    def unsupported(self, suite: str) -> str | None:
        return None

    def generate(self, input_ids: Tensor, attention_mask: Tensor, max_new_tokens: int,
                 observer: object | None = None) -> Tensor:
        return generate(self.loaded.model, input_ids, max_new_tokens, attention_mask, stop_at_eos=False,
                        observer=observer)

    def loglikelihood(self, requests: Sequence[LoglikelihoodRequest], *, max_length: int | None = None,
                      batch_size: int = 8, counters: WorkCounters | None = None, share_prefix: bool = True
                      ) -> Iterator[tuple[int, Loglikelihood]]:
        return self._scoring.loglikelihood(requests, self._max_length(max_length), batch_size,
                                           counters if counters is not None else WorkCounters(), share_prefix)

    def generate_until(self, requests: Sequence[GenerateRequest], *, max_length: int | None = None,
                       batch_size: int = 8, counters: WorkCounters | None = None, share_prefix: bool = True
                       ) -> Iterator[tuple[int, Generation]]:
        return self._scoring.generate_until(requests, self._max_length(max_length), batch_size,
                                            counters if counters is not None else WorkCounters(), share_prefix)

    def _max_length(self, max_length: int | None) -> int:
        return min(self.max_seq_len, max_length or self.max_seq_len)
