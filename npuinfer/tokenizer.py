"""Tokenizers loaded from a checkpoint directory without running its code.

Real checkpoints ship their own ``tokenization_*.py`` and expect ``trust_remote_code``. We never import
those files. The tokenizer is chosen by the files the directory holds, in the order the family's record
lists them (transformers' order: ``tokenizer.json`` when present, else the family's native file), and each
file is read with the library it was written for:
  tokenizer.json   -> Hugging Face tokenizers
  qwen.tiktoken    -> tiktoken.Encoding with Qwen's split pattern and special tokens
  tokenizer.model  -> sentencepiece
``tokenizer_config.json`` / ``special_tokens_map.json`` are read as plain JSON for special tokens and
``add_bos_token``.
"""

from __future__ import annotations

import base64
import binascii
import json
import unicodedata
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .families import Family, get_family
from .families.base import QWEN_PAT_STR

# What each tokenizer file is, for error messages.
FILE_KINDS = {
    "tokenizer.json": "a Hugging Face tokenizers file",
    "qwen.tiktoken": "one 'base64(token) rank' pair per line",
    "tokenizer.model": "a sentencepiece model",
}

# Qwen v1 (tokenization_qwen.py): pre-tokenizer pattern and the special tokens numbered right after the BPE ranks.
QWEN_ENDOFTEXT = "<|endoftext|>"
QWEN_SPECIAL_TOKENS = (QWEN_ENDOFTEXT, "<|im_start|>", "<|im_end|>") + tuple(f"<|extra_{i}|>" for i in range(205))


class TokenizerFileError(ValueError):
    """A tokenizer file exists but cannot be read as the kind of file the family uses."""


class Tokenizer:
    """Family-independent interface; subclasses supply the raw encode/decode of their library."""

    family: str
    vocab_size: int
    bos_id: int | None
    eos_id: int
    pad_id: int
    add_bos: bool
    # Text is cut by a split regex before BPE, and no piece joins a newline with the non-space after it, so
    # encode(a + b) == encode(a) + encode(b) when a ends with a non-space then "\n" and b starts with a
    # non-space (tiktoken's Qwen pattern, byte-level tokenizer.json; after other whitespace GPT-2's pattern
    # splits differently, see ceval.encoding.newline_cut). Sentencepiece merges over the whole text: no such
    # promise.
    splits_after_newlines: bool = False

    def __init__(self, family: str, vocab_size: int, bos_id: int | None, eos_id: int, pad_id: int,
                 add_bos: bool) -> None:
        if add_bos and bos_id is None:
            raise ValueError(f"{family}: add_bos is set but this tokenizer has no bos token")
        self.family = family
        self.vocab_size = vocab_size
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.pad_id = pad_id
        self.add_bos = add_bos

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(family={self.family!r}, vocab_size={self.vocab_size}, "
                f"bos_id={self.bos_id}, eos_id={self.eos_id}, pad_id={self.pad_id}, add_bos={self.add_bos})")

    # --- implemented by subclasses -------------------------------------------------------------
    def _encode_text(self, text: str) -> list[int]:
        raise NotImplementedError

    def _decode_ids(self, ids: list[int], skip_special: bool) -> str:
        raise NotImplementedError

    # --- public API ------------------------------------------------------------------------------
    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of ``text``, with bos first when ``add_bos`` (default: ``self.add_bos``)."""
        add_bos = self.add_bos if add_bos is None else add_bos
        if add_bos and self.bos_id is None:
            raise ValueError(f"{self.family}: cannot add bos, this tokenizer has no bos token")
        problem = not_utf8(text)
        if problem:  # each tokenizer library fails on it in its own words, none naming the place
            raise ValueError(f"text to encode is not valid UTF-8 ({problem}); pass UTF-8 text")
        ids = self._encode_text(text)
        return [self.bos_id, *ids] if add_bos else ids

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special: bool = True) -> str:
        """Text of one sequence of ids.

        Ids at or above ``vocab_size`` are rows that checkpoints add to pad the embedding; no token
        owns them, so they decode to nothing (a random tiny model may well sample them).
        """
        flat = _as_id_list(ids)
        if any(i < 0 for i in flat):
            raise ValueError(f"negative token id in {flat[:16]}...")
        return self._decode_ids([i for i in flat if i < self.vocab_size], skip_special)

    def encode_batch(self, texts: list[str], add_bos: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded ``(input_ids, attention_mask)``, both int64 ``[B, T]``; the mask is 0 on padding."""
        rows = [self.encode(t, add_bos=add_bos) for t in texts]
        width = max((len(r) for r in rows), default=0)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.int64)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.int64)
        for b, row in enumerate(rows):
            if row:
                input_ids[b, width - len(row):] = torch.tensor(row, dtype=torch.int64)
                attention_mask[b, width - len(row):] = 1
        return input_ids, attention_mask


def not_utf8(text: str) -> str | None:
    """Where ``text`` is not Unicode text, in words, or None. Bytes that were not valid UTF-8 reach Python as
    lone surrogates (a command line, a file read with surrogateescape): encoded back, they are found again."""
    try:
        text.encode("utf-8")
        return None
    except UnicodeEncodeError:
        raw = text.encode("utf-8", "surrogateescape") if _escaped_only(text) else None
    if raw is None:
        index = next(i for i, ch in enumerate(text) if 0xD800 <= ord(ch) <= 0xDFFF)
        return f"character {index} is the lone surrogate {text[index]!r}"
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return f"byte 0x{raw[exc.start]:02x} at byte {exc.start}"
    return None


def _escaped_only(text: str) -> bool:
    try:
        text.encode("utf-8", "surrogateescape")
        return True
    except UnicodeEncodeError:
        return False


def _as_id_list(ids: Sequence[int] | torch.Tensor) -> list[int]:
    if isinstance(ids, torch.Tensor):
        if ids.dim() > 1:
            raise ValueError(f"decode takes one sequence, got a tensor of shape {tuple(ids.shape)}")
        ids = ids.reshape(-1).tolist()
    return [int(i) for i in ids]


class QwenTokenizer(Tokenizer):
    """qwen.tiktoken through tiktoken, as Qwen's own tokenizer does: NFC first, special tokens allowed in text."""

    splits_after_newlines = True

    def __init__(self, encoding: Any, n_ranks: int, add_bos: bool, pad_token: str | None,
                 family: str = "qwen") -> None:
        self._enc = encoding
        self._n_ranks = n_ranks
        self._special_ids = {tok: n_ranks + i for i, tok in enumerate(QWEN_SPECIAL_TOKENS)}
        eos_id = self._special_ids[QWEN_ENDOFTEXT]
        pad_id = self._special_ids.get(pad_token or QWEN_ENDOFTEXT, eos_id)
        super().__init__(family, n_ranks + len(QWEN_SPECIAL_TOKENS), None, eos_id, pad_id, add_bos)

    def _encode_text(self, text: str) -> list[int]:
        text = unicodedata.normalize("NFC", text)
        return self._enc.encode(text, allowed_special="all", disallowed_special=())

    def _decode_ids(self, ids: list[int], skip_special: bool) -> str:
        if skip_special:
            ids = [i for i in ids if i < self._n_ranks]
        return self._enc.decode(ids, errors="replace")


class SentencePieceTokenizer(Tokenizer):
    """tokenizer.model through sentencepiece (Baichuan2, InternLM)."""

    def __init__(self, family: str, processor: Any, bos_id: int | None, eos_id: int, pad_id: int,
                 add_bos: bool) -> None:
        self._sp = processor
        n = processor.get_piece_size()
        self._special_ids = {i for i in range(n) if processor.is_control(i) or processor.is_unknown(i)}
        super().__init__(family, n, bos_id, eos_id, pad_id, add_bos)

    def _encode_text(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def _decode_ids(self, ids: list[int], skip_special: bool) -> str:
        if skip_special:
            return self._sp.decode([i for i in ids if i not in self._special_ids])
        # sentencepiece drops control pieces when decoding; spell them out between decoded runs.
        parts: list[str] = []
        run: list[int] = []
        for i in ids:
            if i in self._special_ids:
                parts += [self._sp.decode(run), self._sp.id_to_piece(i)]
                run = []
            else:
                run.append(i)
        parts.append(self._sp.decode(run))
        return "".join(parts)


class HFJsonTokenizer(Tokenizer):
    """tokenizer.json through the Hugging Face ``tokenizers`` library (GPT-NeoX)."""

    def __init__(self, family: str, backend: Any, bos_id: int | None, eos_id: int, pad_id: int,
                 add_bos: bool) -> None:
        self._tok = backend
        self.splits_after_newlines = type(backend.pre_tokenizer).__name__ == "ByteLevel"
        super().__init__(family, backend.get_vocab_size(with_added_tokens=True), bos_id, eos_id, pad_id, add_bos)

    def _encode_text(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def _decode_ids(self, ids: list[int], skip_special: bool) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special)


# --- loading -------------------------------------------------------------------------------------

def load_tokenizer(model_dir: str | Path, family: str | Family) -> Tokenizer:
    """Tokenizer of the checkpoint in ``model_dir``: the first of the family's tokenizer files it holds."""
    family = get_family(family)
    model_dir = Path(model_dir)
    holds = f"{_article(family.title)} {family.title} checkpoint directory holds {' or '.join(family.tokenizer.files)}"
    if not model_dir.is_dir():
        raise FileNotFoundError(f"{model_dir}: not a directory; {holds}")
    path = next((model_dir / name for name in family.tokenizer.files if (model_dir / name).is_file()), None)
    if path is None:
        looked = ", ".join(f"{model_dir / name} ({FILE_KINDS[name]})" for name in family.tokenizer.files)
        raise FileNotFoundError(f"{model_dir}: no tokenizer file found; looked for {looked}: not found; {holds}")
    specials = {**family.tokenizer.specials, **_read_special_tokens(model_dir)}
    return _READERS[path.name](path, family, _read_add_bos(model_dir), specials)


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise TokenizerFileError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(data, dict):
        raise TokenizerFileError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _token_content(value: Any) -> str | None:
    """A special token as written in HF configs: a plain string or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _read_special_tokens(model_dir: Path) -> dict[str, str]:
    """bos/eos/unk/pad token strings; tokenizer_config.json wins over special_tokens_map.json."""
    merged: dict[str, str] = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        data = _read_json(model_dir / name)
        for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
            content = _token_content(data.get(key))
            if content is not None:
                merged[key] = content
    return merged


def _read_add_bos(model_dir: Path) -> bool | None:
    """add_bos_token of tokenizer_config.json; None when it does not say."""
    value = _read_json(model_dir / "tokenizer_config.json").get("add_bos_token")
    return value if isinstance(value, bool) else None


def read_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    """Parse a ``qwen.tiktoken`` file: one ``base64(token_bytes) rank`` pair per line."""
    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(path.read_bytes().splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split()
        try:
            if len(fields) != 2:
                raise ValueError(f"{len(fields)} fields")
            token, rank = base64.b64decode(fields[0], validate=True), int(fields[1])
        except (ValueError, binascii.Error) as err:
            raise TokenizerFileError(
                f"{path}: line {lineno} is not 'base64(token) rank' ({err}); qwen.tiktoken holds "
                f"{FILE_KINDS['qwen.tiktoken']}") from err
        ranks[token] = rank
    _check_ranks(path, ranks)
    return ranks


def _check_ranks(path: Path, ranks: dict[bytes, int]) -> None:
    if not ranks:
        raise TokenizerFileError(f"{path}: holds no ranks; qwen.tiktoken holds {FILE_KINDS['qwen.tiktoken']}")
    # Special tokens are numbered from len(ranks), so ranks must be exactly 0..n-1.
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise TokenizerFileError(f"{path}: ranks are not the distinct numbers 0..{len(ranks) - 1}")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise TokenizerFileError(f"{path}: {len(missing)} single bytes have no rank (e.g. {missing[0]:#04x}); "
                                 "byte-level BPE needs all 256")


def qwen_encoding(ranks: dict[bytes, int]) -> Any:
    """tiktoken.Encoding for Qwen v1 given its mergeable ranks."""
    import tiktoken

    specials = {tok: len(ranks) + i for i, tok in enumerate(QWEN_SPECIAL_TOKENS)}
    return tiktoken.Encoding("qwen", pat_str=QWEN_PAT_STR, mergeable_ranks=ranks, special_tokens=specials)


def _load_qwen(path: Path, family: Family, add_bos: bool | None, specials: dict[str, str]) -> QwenTokenizer:
    ranks = read_tiktoken_ranks(path)
    add_bos = family.tokenizer.add_bos if add_bos is None else add_bos
    return QwenTokenizer(qwen_encoding(ranks), len(ranks), add_bos, specials.get("pad_token"), family.name)


def _load_sentencepiece(path: Path, family: Family, add_bos: bool | None,
                        specials: dict[str, str]) -> SentencePieceTokenizer:
    import sentencepiece as spm

    try:
        sp = spm.SentencePieceProcessor(model_file=str(path))
    except (RuntimeError, OSError) as err:
        raise TokenizerFileError(f"{path}: cannot be read as {FILE_KINDS[path.name]} ({err})") from err

    def piece_id(token: str | None, fallback: int) -> int | None:
        if token is not None:
            i = sp.piece_to_id(token)
            if sp.id_to_piece(i) == token:  # piece_to_id answers unk for unknown pieces
                return i
        return fallback if fallback >= 0 else None

    bos_id = piece_id(specials.get("bos_token"), sp.bos_id())
    eos_id = piece_id(specials.get("eos_token"), sp.eos_id())
    if eos_id is None:
        raise TokenizerFileError(f"{path}: the sentencepiece model has no eos piece")
    pad_id = piece_id(specials.get("pad_token"), eos_id)
    add_bos = family.tokenizer.add_bos if add_bos is None else add_bos
    return SentencePieceTokenizer(family.name, sp, bos_id, eos_id, pad_id, add_bos)


def _load_hf_json(path: Path, family: Family, add_bos: bool | None, specials: dict[str, str]) -> HFJsonTokenizer:
    from tokenizers import Tokenizer as HFTokenizer

    try:
        backend = HFTokenizer.from_file(str(path))
    except Exception as err:  # tokenizers raises a bare Exception on malformed files
        raise TokenizerFileError(f"{path}: cannot be read as {FILE_KINDS[path.name]} ({err})") from err

    def token_id(key: str) -> int | None:
        return backend.token_to_id(specials[key]) if key in specials else None

    eos_id = token_id("eos_token")
    if eos_id is None:
        raise TokenizerFileError(f"{path}: has no eos token (eos_token {specials.get('eos_token')!r}; "
                                 f"tokenizer_config.json or special_tokens_map.json name it)")
    bos_id, pad_id = token_id("bos_token"), token_id("pad_token")
    if add_bos is None:
        # As transformers does for tokenizer.json: its post-processor decides whether a bos is added.
        add_bos = _post_processor_adds(backend, bos_id)
    return HFJsonTokenizer(family.name, backend, bos_id, eos_id, eos_id if pad_id is None else pad_id, add_bos)


def _post_processor_adds(backend: Any, bos_id: int | None) -> bool:
    plain = backend.encode("a", add_special_tokens=False).ids
    full = backend.encode("a", add_special_tokens=True).ids
    return bos_id is not None and full[:1] == [bos_id] and full[1:len(plain) + 1] == plain


_READERS: dict[str, Callable[[Path, Family, bool | None, dict[str, str]], Tokenizer]] = {
    "tokenizer.json": _load_hf_json,
    "qwen.tiktoken": _load_qwen,
    "tokenizer.model": _load_sentencepiece,
}
