"""Tiny checkpoints in each family's real on-disk layout: file names, tensor names,
config.json fields and tokenizer file kind as the real download, weights from a seed.

The directory also gets the family's ``modeling_*.py`` named by config.json's auto_map,
written so that executing it raises: loading must never run code from a model directory.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from .atomic import fsync_dir, fsync_tree
from .checkpoint import BIN_INDEX, SAFETENSORS_INDEX, args_from_config, from_canonical
from .families import get_family
from .model import Transformer
from .progress import progress
from .registry import MODELS, ModelSpec, get_spec
from .tokenizer_training import write_tiny_tokenizer

TINY_FORMAT = 1  # bump when the tiny layout or weights change, so caches are rebuilt
MARKER = "npuinfer_tiny.json"

_POISON = (
    "raise RuntimeError('npuinfer executed code from a model directory; loading must only read "
    "config.json, tokenizer and weight files')\n"
)


def cache_root() -> Path:
    return Path(os.environ.get("NPUINFER_CACHE", Path.home() / ".cache" / "npuinfer"))


def ensure_tiny(name: str) -> Path:
    """The cached tiny checkpoint for ``name``, built on first use (safe against concurrent builders)."""
    target = cache_root() / "tiny" / f"{name}-v{TINY_FORMAT}"
    if (target / MARKER).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        make_tiny(name, staging, desc=f"building the tiny checkpoint {name} (first use)")
        fsync_tree(staging)  # on disk before it is published: a crash cannot leave a torn cached checkpoint
        try:
            staging.rename(target)
        except OSError:
            if not (target / MARKER).is_file():  # not another process's finished copy: a real failure
                raise
        else:
            fsync_dir(target.parent)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def config_for(spec: ModelSpec, tok: dict) -> dict:
    """config.json as the family's real download writes it (the family's template around these common fields)."""
    ids = {k: tok[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if tok.get(k) is not None}
    base = {"hidden_size": spec.hidden_size, "num_hidden_layers": spec.num_layers,
            "num_attention_heads": spec.num_heads, "intermediate_size": spec.intermediate_size,
            "vocab_size": spec.vocab_size, "initializer_range": 0.02, "tie_word_embeddings": False,
            "use_cache": True}
    return get_family(spec.family).tiny.config(spec, base, ids)


def random_canonical_state(model: Transformer, seed: int) -> dict[str, torch.Tensor]:
    """Weights that exercise every path: biases and norm scales are random too, never 0 or 1."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, param in model.state_dict().items():
        if name.endswith("norm.weight"):
            value = 1.0 + 0.1 * torch.randn(param.shape, generator=gen)
        elif name.endswith("bias"):
            value = 0.02 * torch.randn(param.shape, generator=gen)
        else:
            value = 0.05 * torch.randn(param.shape, generator=gen)
        state[name] = value
    return state


def _shards(state: dict[str, torch.Tensor], n_layers: int) -> list[dict[str, torch.Tensor]]:
    """Two shards split at the middle layer, as real multi-file checkpoints are split by size."""
    shards: list[dict[str, torch.Tensor]] = [{}, {}]
    for name, tensor in state.items():
        layer = next((int(p) for p in name.split(".") if p.isdigit()), None)
        if layer is None:
            second = not ("embed" in name or "wte" in name)  # embeddings first; final norm and head last
        else:
            second = layer >= n_layers // 2
        shards[second][name] = tensor
    return shards


def _write_weights(file_format: str, state: dict[str, torch.Tensor], n_layers: int, out: Path) -> None:
    shards = _shards(state, n_layers)
    total = sum(t.numel() * t.element_size() for t in state.values())
    weight_map = {}
    if file_format == "safetensors":
        from safetensors.torch import save_file

        for i, shard in enumerate(shards, 1):
            fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(out / fname), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, fname))
        index = SAFETENSORS_INDEX
    else:
        for i, shard in enumerate(shards, 1):
            fname = f"pytorch_model-{i:05d}-of-{len(shards):05d}.bin"
            torch.save(shard, out / fname)
            weight_map.update(dict.fromkeys(shard, fname))
        index = BIN_INDEX
    (out / index).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def make_tiny(name: str, out_dir: str | os.PathLike, seed: int = 0, desc: str | None = None) -> Path:
    """Write the tiny checkpoint ``name`` into ``out_dir`` (created if needed); ``desc`` heads its progress bar."""
    spec = get_spec(name)
    if not spec.tiny:
        raise ValueError(f"make-tiny: {name!r} is a real model; tiny ones are: "
                         + ", ".join(n for n, s in MODELS.items() if s.tiny))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    family = get_family(spec.family)
    with progress(desc=desc or f"building {name}", total=2) as bar:
        bar.set_postfix_str("training its tokenizer")
        tok = write_tiny_tokenizer(spec.family, out, family.tiny.tokenizer.vocab_size, seed=seed)
        bar.update()
        bar.set_postfix_str("random weights")
        _write_checkpoint(name, spec, family, tok, out, seed)
        bar.update()
    (out / MARKER).write_text(json.dumps({"name": name, "seed": seed, "format": TINY_FORMAT}) + "\n")
    return out


def _write_checkpoint(name: str, spec: ModelSpec, family, tok: dict, out: Path, seed: int) -> None:
    """config.json, generation_config.json, the poisoned modeling files and the weights of a tiny checkpoint."""
    if tok["vocab_size"] > spec.vocab_size:
        raise RuntimeError(f"tiny tokenizer has {tok['vocab_size']} ids, more than {name}'s vocab_size "
                           f"{spec.vocab_size}")
    config = config_for(spec, tok)
    (out / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    (out / "generation_config.json").write_text(json.dumps(
        {k: v for k, v in tok.items() if k.endswith("_token_id") and v is not None}, indent=2) + "\n")
    for module in {ref.split(".")[0] for ref in config.get("auto_map", {}).values()}:
        (out / f"{module}.py").write_text(_POISON)
    args = args_from_config(config, spec.family, position=spec.position)
    with torch.device("cpu"):
        model = Transformer(args)
    canonical = random_canonical_state(model, seed)
    if config.get("tie_word_embeddings"):  # as save_pretrained writes a tied model: no head tensor
        del canonical["output.weight"]
    state = from_canonical(spec.family, canonical, args)
    _write_weights(family.tiny.weights, state, args.n_layers, out)

