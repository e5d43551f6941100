"""Small tokenizers trained on the built-in corpus, written in each family's real on-disk files.

Tiny checkpoints carry random weights but must look like the real thing on disk, so the loader in
``npuinfer.tokenizer`` is exercised exactly as with a downloaded checkpoint. The family record's
``tiny.tokenizer`` says which kind of tokenizer to train and which JSON files go with it:
  qwen.tiktoken   byte-level BPE (tokenizers' trainer, Qwen's split pattern) converted to tiktoken ranks
  sentencepiece   sentencepiece BPE with byte fallback, with or without dummy prefix -> tokenizer.model
  byte-level-bpe  byte-level BPE with the record's special tokens first              -> tokenizer.json
  split-byte-level-bpe  byte-level BPE pre-split by the record's pattern, its special tokens after the learned
                  ids, optionally a post-processor adding the first one as bos (Qwen2, Qwen3, Llama 3) -> tokenizer.json
plus tokenizer_config.json / special_tokens_map.json shaped like the published ones (their auto_map names
the real tokenization_*.py, which is never written here and never executed anywhere).
"""

from __future__ import annotations

import base64
import io
import json
import random
from collections import Counter
from pathlib import Path
from typing import Iterator

from .families import get_family
from .families.base import TinyTokenizer
from .tokenizer import QWEN_PAT_STR, QWEN_SPECIAL_TOKENS, load_tokenizer

CORPUS_PATH = Path(__file__).parent / "data" / "corpus.txt"

_SP_META_PIECES = 3  # <unk>, <s>, </s>
_SP_BYTE_PIECES = 256  # <0x00> .. <0xFF> from byte_fallback


def min_vocab_size(spec: TinyTokenizer) -> int:
    """Smallest vocab_size (total ids, specials included) a tiny tokenizer of this kind can be trained to."""
    return {"qwen.tiktoken": 256 + len(QWEN_SPECIAL_TOKENS) + 16,
            "sentencepiece": _SP_META_PIECES + _SP_BYTE_PIECES + 64,
            "byte-level-bpe": len(spec.special_tokens) + 256 + 16,
            "split-byte-level-bpe": len(spec.special_tokens) + 256 + 16}[spec.kind]


def corpus_lines(seed: int = 0) -> list[str]:
    """Non-empty lines of the built-in corpus, in an order fixed by ``seed``."""
    lines = [line for line in CORPUS_PATH.read_text(encoding="utf-8").splitlines() if line.strip()]
    random.Random(seed).shuffle(lines)
    return lines


def write_tiny_tokenizer(family: str, out_dir: str | Path, vocab_size: int, seed: int = 0) -> dict:
    """Train a tokenizer of at most ``vocab_size`` ids and write the family's tokenizer files to ``out_dir``.

    Returns ``{"vocab_size", "bos_token_id", "eos_token_id", "pad_token_id"}`` of what was written.
    ``vocab_size`` there counts every id the tokenizer can produce, specials included; it can be
    smaller than asked when the corpus runs out of merges, and the caller picks the config's
    (embedding) vocab_size >= it, as real checkpoints pad theirs. Deterministic for equal arguments;
    ``seed`` only fixes the order the corpus lines are fed in.
    """
    spec = get_family(family).tiny.tokenizer
    if vocab_size < min_vocab_size(spec):
        raise ValueError(f"vocab_size {vocab_size} is too small for a {family} tokenizer; "
                         f"the minimum is {min_vocab_size(spec)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _WRITERS[spec.kind](out_dir, corpus_lines(seed), vocab_size, spec)
    for name, content in spec.extra_files.items():
        _write_json(out_dir / name, content)
    tok = load_tokenizer(out_dir, family)
    return {"vocab_size": tok.vocab_size, "bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id,
            "pad_token_id": tok.pad_id}


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# --- qwen.tiktoken --------------------------------------------------------------------------------

def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's printable stand-in character for each byte, inverted: char -> byte value."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return {c: b for b, c in chars.items()}


def train_byte_level_merges(text: str, n_tokens: int, split_pattern: str) -> list[tuple[bytes, bytes]]:
    """Byte-level BPE merges (in order) learned from ``text``, pre-split by ``split_pattern``."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split_pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    trainer = trainers.BpeTrainer(vocab_size=n_tokens, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=[], show_progress=False)
    tok.train_from_iterator([text], trainer=trainer)
    to_byte = _byte_level_alphabet()
    merges = json.loads(tok.to_str())["model"]["merges"]
    # tokenizers writes a merge as "a b" in older releases and as ["a", "b"] in newer ones.
    pairs = [m.split(" ") if isinstance(m, str) else m for m in merges]
    return [(bytes(to_byte[c] for c in a), bytes(to_byte[c] for c in b)) for a, b in pairs]


def merges_to_ranks(merges: list[tuple[bytes, bytes]]) -> dict[bytes, int]:
    """tiktoken ranks: the 256 single bytes first, then each merge's concatenation in merge order."""
    ranks = {bytes([b]): b for b in range(256)}
    for left, right in merges:
        token = left + right
        if token in ranks:
            raise ValueError(f"merge {left!r} + {right!r} repeats token {token!r}")
        ranks[token] = len(ranks)
    return ranks


def write_tiktoken_file(path: Path, ranks: dict[bytes, int]) -> None:
    lines = (f"{base64.b64encode(token).decode('ascii')} {rank}\n"
             for token, rank in sorted(ranks.items(), key=lambda item: item[1]))
    path.write_text("".join(lines), encoding="ascii")


def _write_tiktoken(out_dir: Path, lines: list[str], vocab_size: int, spec: TinyTokenizer) -> None:
    n_ranks = vocab_size - len(QWEN_SPECIAL_TOKENS)
    merges = train_byte_level_merges("\n".join(lines), n_ranks, QWEN_PAT_STR)
    write_tiktoken_file(out_dir / "qwen.tiktoken", merges_to_ranks(merges))


# --- sentencepiece ---------------------------------------------------------------------------------

def _sentencepiece_input(lines: list[str], vocab_size: int) -> Iterator[str]:
    """Training sentences whose distinct characters leave room for merges.

    sentencepiece gives every kept character its own piece; the corpus has ~1000 distinct characters,
    more than a small vocab holds. Characters beyond the budget are cut out of the training text
    (lines are split there), so at run time they fall back to byte pieces.
    """
    budget = (vocab_size - _SP_META_PIECES - _SP_BYTE_PIECES) * 3 // 4
    counts = Counter(c for line in lines for c in line)
    keep = {c for c, _ in counts.most_common(budget)}
    for line in lines:
        fragment: list[str] = []
        for c in line:
            if c in keep:
                fragment.append(c)
            elif fragment:
                yield "".join(fragment)
                fragment = []
        if fragment:
            yield "".join(fragment)


def train_sentencepiece(lines: list[str], vocab_size: int, add_dummy_prefix: bool) -> bytes:
    """Serialized sentencepiece BPE model: unk 0, bos 1, eos 2, byte fallback, digits split, no normalization."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=_sentencepiece_input(lines, vocab_size),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        hard_vocab_limit=False,  # a small corpus may run out of merges before a large vocab_size
        character_coverage=1.0,
        byte_fallback=True,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=add_dummy_prefix,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    return model.getvalue()


def _write_sentencepiece(out_dir: Path, lines: list[str], vocab_size: int, spec: TinyTokenizer) -> None:
    (out_dir / "tokenizer.model").write_bytes(train_sentencepiece(lines, vocab_size, spec.add_dummy_prefix))


# --- tokenizer.json ------------------------------------------------------------------------------

def _write_byte_level_bpe(out_dir: Path, lines: list[str], vocab_size: int, spec: TinyTokenizer) -> None:
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    # NFC, byte-level without prefix space (gpt-neox-20b's tokenizer.json pipeline).
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True)
    tok.post_processor = processors.ByteLevel(trim_offsets=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(spec.special_tokens),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(["\n".join(lines)], trainer=trainer)
    tok.save(str(out_dir / "tokenizer.json"))


def _write_split_byte_level_bpe(out_dir: Path, lines: list[str], vocab_size: int, spec: TinyTokenizer) -> None:
    """Qwen2 / Llama 3's tokenizer.json pipeline: NFC (Qwen2), a regex Split then byte-level without its own regex,
    the special tokens added after the learned vocabulary (as their ids 151643+ / 128000+ are)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, \
        trainers

    tok = Tokenizer(models.BPE())
    if not spec.bos_template:
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(spec.split_pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(spec.special_tokens), special_tokens=[],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(["\n".join(lines)], trainer=trainer)
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in spec.special_tokens])
    byte_level = processors.ByteLevel(trim_offsets=False)
    if spec.bos_template:
        bos = spec.special_tokens[0]
        template = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                 special_tokens=[(bos, tok.token_to_id(bos))])
        tok.post_processor = processors.Sequence([byte_level, template])
    else:
        tok.post_processor = byte_level
    tok.save(str(out_dir / "tokenizer.json"))


_WRITERS = {"qwen.tiktoken": _write_tiktoken, "sentencepiece": _write_sentencepiece,
            "byte-level-bpe": _write_byte_level_bpe, "split-byte-level-bpe": _write_split_byte_level_bpe}
