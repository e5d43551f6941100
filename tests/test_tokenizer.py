"""Tokenizer loading and tiny-tokenizer training, checked against the real libraries (no mocks)."""

from __future__ import annotations

import base64
import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from npuinfer.families import get_family
from npuinfer.families import FAMILIES as FAMILY_RECORDS
from npuinfer.tokenizer import Tokenizer, TokenizerFileError, load_tokenizer
from npuinfer.tokenizer_training import CORPUS_PATH, min_vocab_size, write_tiny_tokenizer

FAMILIES = list(FAMILY_RECORDS)

VOCAB_SIZE = 1200

TEXTS = [
    "苹果公司的CEO是蒂姆·库克，他在2011年接替了史蒂夫·乔布斯。",
    "Apple's CEO is Tim Cook; revenue rose 12.5% to $94.8 billion in 2023!",
    "北京在2008年举办了夏季奥运会, and Tokyo hosted the 2020 Games (held in 2021).",
    "以下是中国关于高等数学的单项选择题，请选出其中的正确答案。\n\nA. 1\nB. 2\n答案： A",
    "line one\nline two\n\n  indented\ttabbed  ",
    "rare characters fall back to bytes: 𝄞 ñ Ω 龘 😀",
]

# What each family's directory holds after write_tiny_tokenizer: the real checkpoints' file kinds.
EXPECTED_FILES = {
    "qwen": {"qwen.tiktoken", "tokenizer_config.json"},
    "baichuan2": {"tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"},
    "internlm": {"tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"},
    "gpt-neox": {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"},
    "llama": {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"},  # Llama 3's files
    "qwen2": {"tokenizer.json", "tokenizer_config.json"},
    "qwen3": {"tokenizer.json", "tokenizer_config.json"},
}
TOKENIZER_FILE = {"qwen": "qwen.tiktoken", "baichuan2": "tokenizer.model", "internlm": "tokenizer.model",
                  "gpt-neox": "tokenizer.json", "llama": "tokenizer.json", "qwen2": "tokenizer.json",
                  "qwen3": "tokenizer.json"}

# Written out again from Qwen's tokenization_qwen.py, so the check does not reuse the module's copy.
QWEN_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    """One trained tokenizer directory per family, shared by the module: family -> (dir, returned info)."""
    out = {}
    for family in FAMILIES:
        d = tmp_path_factory.mktemp(family)
        out[family] = (d, write_tiny_tokenizer(family, d, VOCAB_SIZE))
    return out


def qwen_ranks(path: Path) -> dict[bytes, int]:
    ranks = {}
    for line in path.read_text(encoding="ascii").splitlines():
        token, rank = line.split(" ")
        ranks[base64.b64decode(token)] = int(rank)
    return ranks


# --- behaviour of every family ---------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_chinese_english_digits(tiny, family):
    tok = load_tokenizer(tiny[family][0], family)
    assert isinstance(tok, Tokenizer) and tok.family == family
    for text in TEXTS:
        ids = tok.encode(text)
        assert all(isinstance(i, int) and 0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == text
    # Merges were learned: a corpus sentence takes far fewer tokens than it has UTF-8 bytes.
    sentence = TEXTS[0]
    assert len(tok.encode(sentence, add_bos=False)) < len(sentence.encode("utf-8")) / 2


@pytest.mark.parametrize("family", FAMILIES)
def test_encode_batch_left_pads(tiny, family):
    tok = load_tokenizer(tiny[family][0], family)
    texts = ["苹果公司的CEO是", "The CEO of Apple is Tim Cook, since 2011.", "a"]
    rows = [tok.encode(t) for t in texts]
    input_ids, mask = tok.encode_batch(texts)
    width = max(len(r) for r in rows)
    assert input_ids.shape == mask.shape == (3, width)
    assert input_ids.dtype == mask.dtype == torch.int64
    for b, row in enumerate(rows):
        pad = width - len(row)
        assert mask[b].tolist() == [0] * pad + [1] * len(row)
        assert input_ids[b, pad:].tolist() == row
        assert input_ids[b, :pad].tolist() == [tok.pad_id] * pad
    assert len(rows[2]) < width  # the short row really was padded


@pytest.mark.parametrize("family", FAMILIES)
def test_encode_batch_add_bos_override_and_empty(tiny, family):
    tok = load_tokenizer(tiny[family][0], family)
    ids, mask = tok.encode_batch([])
    assert ids.shape == mask.shape == (0, 0)
    if tok.bos_id is None:
        with pytest.raises(ValueError, match="no bos"):
            tok.encode("x", add_bos=True)
    else:
        hello = tok.encode("hello", add_bos=False)
        assert tok.bos_id not in hello
        assert tok.encode("hello", add_bos=True) == [tok.bos_id, *hello]
        with_bos, mask = tok.encode_batch(["hello", "hello world"], add_bos=True)
        assert with_bos[0, -len(hello) - 1:].tolist() == [tok.bos_id, *hello]
        assert mask[0].sum().item() == len(hello) + 1


@pytest.mark.parametrize("family", FAMILIES)
def test_padded_rows_decode_to_their_text(tiny, family):
    tok = load_tokenizer(tiny[family][0], family)
    texts = ["a", TEXTS[0], TEXTS[1]]
    input_ids, _ = tok.encode_batch(texts)
    assert [tok.decode(row) for row in input_ids] == texts


@pytest.mark.parametrize("family", FAMILIES)
def test_returned_info_matches_loaded_tokenizer(tiny, family):
    directory, info = tiny[family]
    tok = load_tokenizer(directory, family)
    assert info == {"vocab_size": tok.vocab_size, "bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id,
                    "pad_token_id": tok.pad_id}
    assert min_vocab_size(get_family(family).tiny.tokenizer) <= info["vocab_size"] <= VOCAB_SIZE


@pytest.mark.parametrize("family", FAMILIES)
def test_decode_specials_tensor_and_padding_rows(tiny, family):
    tok = load_tokenizer(tiny[family][0], family)
    ids = tok.encode("Tim Cook", add_bos=False)
    assert tok.decode([tok.eos_id, *ids, tok.eos_id]) == "Tim Cook"
    assert tok.decode(torch.tensor([*ids, tok.eos_id])) == "Tim Cook"
    # Ids past the tokenizer (embedding padding rows of the config's vocab) decode to nothing.
    assert tok.decode([*ids, tok.vocab_size, tok.vocab_size + 7]) == "Tim Cook"
    assert tok.decode([*ids, tok.eos_id], skip_special=False) != "Tim Cook"
    with pytest.raises(ValueError):
        tok.decode(torch.tensor([ids, ids]))
    with pytest.raises(ValueError):
        tok.decode([-1])


@pytest.mark.parametrize("family", FAMILIES)
def test_files_on_disk_are_the_family_kinds(tiny, family):
    directory = tiny[family][0]
    assert {p.name for p in directory.iterdir()} == EXPECTED_FILES[family]
    config = json.loads((directory / "tokenizer_config.json").read_text(encoding="utf-8"))
    expected_class = {"qwen": "QWenTokenizer", "baichuan2": "BaichuanTokenizer", "internlm": "InternLMTokenizer",
                      "gpt-neox": "GPTNeoXTokenizer", "llama": "PreTrainedTokenizerFast", "qwen2": "Qwen2Tokenizer",
                      "qwen3": "Qwen2Tokenizer"}[family]
    assert config["tokenizer_class"] == expected_class
    if family in ("qwen", "baichuan2", "internlm"):  # these name their remote code, which we never write nor run
        module = config["auto_map"]["AutoTokenizer"][0]
        assert module.split(".")[0].startswith("tokenization_")
        assert not (directory / f"{module.split('.')[0]}.py").exists()


def test_qwen_tiktoken_file_format(tiny):
    directory, info = tiny["qwen"]
    lines = (directory / "qwen.tiktoken").read_text(encoding="ascii").splitlines()
    assert all(re.fullmatch(r"[A-Za-z0-9+/]+=* \d+", line) for line in lines)
    ranks = qwen_ranks(directory / "qwen.tiktoken")
    assert sorted(ranks.values()) == list(range(len(lines)))
    assert all(ranks[bytes([b])] == b for b in range(256))
    assert info["vocab_size"] == len(lines) + 3 + 205


@pytest.mark.parametrize("family,dummy_prefix", [("baichuan2", False), ("internlm", True)])
def test_sentencepiece_file_format(tiny, family, dummy_prefix):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tiny[family][0] / "tokenizer.model"))
    assert [sp.id_to_piece(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]
    assert sp.unk_id() == 0 and sp.bos_id() == 1 and sp.eos_id() == 2
    assert sp.is_byte(sp.piece_to_id("<0x0A>"))  # byte fallback, as in the real models
    # Baichuan 2 adds no dummy prefix; InternLM, like Llama, does.
    assert sp.encode("hello", out_type=str)[0].startswith("\u2581") == dummy_prefix


def test_gpt_neox_tokenizer_json_format(tiny):
    data = json.loads((tiny["gpt-neox"][0] / "tokenizer.json").read_text(encoding="utf-8"))
    assert data["model"]["type"] == "BPE"
    assert [(t["id"], t["content"], t["special"]) for t in data["added_tokens"]] == [
        (0, "<|endoftext|>", True), (1, "<|padding|>", True)]
    assert data["normalizer"]["type"] == "NFC"
    assert data["pre_tokenizer"] == {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                                     "use_regex": True}


# --- special tokens per family -----------------------------------------------------------------------

def test_qwen_special_ids(tiny):
    directory, _ = tiny["qwen"]
    tok = load_tokenizer(directory, "qwen")
    n = len((directory / "qwen.tiktoken").read_text(encoding="ascii").splitlines())
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.add_bos) == (None, n, n, False)
    assert tok.vocab_size == n + 208
    # Qwen allows its special tokens in text and numbers them right after the BPE ranks.
    assert tok.encode("<|endoftext|><|im_start|><|im_end|><|extra_0|><|extra_204|>") == [n, n + 1, n + 2, n + 3,
                                                                                        n + 207]
    assert tok.decode([n + 1], skip_special=False) == "<|im_start|>"


def test_qwen_normalizes_nfc_like_qwen(tiny):
    tok = load_tokenizer(tiny["qwen"][0], "qwen")
    assert tok.encode("Cafe\u0301 au lait") == tok.encode("Caf\u00e9 au lait")


@pytest.mark.parametrize("family,pad_id,add_bos", [("baichuan2", 0, False), ("internlm", 2, True)])
def test_sentencepiece_special_ids(tiny, family, pad_id, add_bos):
    tok = load_tokenizer(tiny[family][0], family)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.add_bos) == (1, 2, pad_id, add_bos)
    assert (tok.encode("hello")[0] == 1) == add_bos
    assert tok.decode([1, *tok.encode("hello", add_bos=False), 2], skip_special=False) == "<s>hello</s>"


def test_gpt_neox_special_ids(tiny):
    tok = load_tokenizer(tiny["gpt-neox"][0], "gpt-neox")
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.add_bos) == (0, 0, 1, False)
    assert tok.encode("<|endoftext|>") == [0]
    assert tok.decode([0], skip_special=False) == "<|endoftext|>"


def test_add_bos_follows_tokenizer_config(tiny, tmp_path):
    directory = tmp_path / "b2"
    shutil.copytree(tiny["baichuan2"][0], directory)
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["add_bos_token"] = True
    config_path.write_text(json.dumps(config), encoding="utf-8")
    tok = load_tokenizer(directory, "baichuan2")
    assert tok.add_bos and tok.encode("hi")[0] == 1


# --- agreement with the libraries used directly ---------------------------------------------------------

def test_qwen_equals_independent_tiktoken_encoding(tiny):
    import tiktoken

    directory, _ = tiny["qwen"]
    ranks = qwen_ranks(directory / "qwen.tiktoken")
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [f"<|extra_{i}|>" for i in range(205)]
    reference = tiktoken.Encoding("qwen-test", pat_str=QWEN_PATTERN, mergeable_ranks=ranks,
                                  special_tokens={s: len(ranks) + i for i, s in enumerate(specials)})
    tok = load_tokenizer(directory, "qwen")
    assert tok.vocab_size == reference.n_vocab
    lines = CORPUS_PATH.read_text(encoding="utf-8").splitlines()
    for text in [*TEXTS, *lines[::7], "chat: <|im_start|>user\nhi<|im_end|>"]:
        ids = tok.encode(text)
        assert ids == reference.encode(text, allowed_special="all")
        assert reference.decode(ids) == text


def test_gpt_neox_equals_transformers_fast_tokenizer(tiny):
    from transformers import PreTrainedTokenizerFast

    directory, _ = tiny["gpt-neox"]
    reference = PreTrainedTokenizerFast(tokenizer_file=str(directory / "tokenizer.json"))
    tok = load_tokenizer(directory, "gpt-neox")
    assert tok.vocab_size == len(reference)
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == reference.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == reference.decode(ids)


@pytest.mark.parametrize("family", ["baichuan2", "internlm"])
def test_sentencepiece_families_equal_sentencepiece(tiny, family):
    import sentencepiece as spm

    directory, _ = tiny[family]
    reference = spm.SentencePieceProcessor(model_file=str(directory / "tokenizer.model"))
    tok = load_tokenizer(directory, family)
    assert tok.vocab_size == reference.get_piece_size()
    for text in [*TEXTS, " leading space", "  two"]:
        assert tok.encode(text, add_bos=False) == reference.encode(text)
        assert tok.encode(text, add_bos=True) == [reference.bos_id(), *reference.encode(text)]


@pytest.mark.parametrize("family", ["baichuan2", "internlm"])
def test_sentencepiece_families_equal_transformers_llama_tokenizer(tiny, family):
    # transformers 5 converts tokenizer.model into a tokenizers pipeline, which needs protobuf.
    pytest.importorskip("google.protobuf", reason="transformers needs protobuf to read tokenizer.model")
    from transformers import LlamaTokenizer

    directory, _ = tiny[family]
    # Baichuan2 has no dummy prefix; InternLM, like Llama, has one.
    reference = LlamaTokenizer.from_pretrained(str(directory), add_prefix_space=family == "internlm")
    tok = load_tokenizer(directory, family)
    # Texts without leading whitespace: there the converted pipeline and sentencepiece agree.
    for text in TEXTS:
        assert tok.encode(text, add_bos=False) == reference.encode(text, add_special_tokens=False)


# --- training ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_training_is_deterministic(tiny, family, tmp_path):
    again = write_tiny_tokenizer(family, tmp_path, VOCAB_SIZE)
    directory, info = tiny[family]
    assert again == info
    for name in EXPECTED_FILES[family]:
        assert (tmp_path / name).read_bytes() == (directory / name).read_bytes(), name


def test_training_rejects_too_small_vocab(tmp_path):
    with pytest.raises(ValueError, match="too small"):
        write_tiny_tokenizer("qwen", tmp_path, 300)
    assert not (tmp_path / "qwen.tiktoken").exists()


def test_corpus_is_small_mixed_and_has_the_probe_sentence():
    text = CORPUS_PATH.read_text(encoding="utf-8")
    assert len(text.encode("utf-8")) < 60_000
    assert len(text.splitlines()) >= 300
    assert "苹果公司的CEO是" in text
    assert re.search(r"\d", text) and re.search(r"[A-Za-z]{4}", text) and "，" in text


# --- errors ------------------------------------------------------------------------------------------

# Every file a family's checkpoint may hold its tokenizer in, in the order they are looked for.
LOOKED_FOR = {"qwen": ["tokenizer.json", "qwen.tiktoken"], "baichuan2": ["tokenizer.json", "tokenizer.model"],
              "internlm": ["tokenizer.json", "tokenizer.model"], "gpt-neox": ["tokenizer.json"],
              "llama": ["tokenizer.json", "tokenizer.model"], "qwen2": ["tokenizer.json"], "qwen3": ["tokenizer.json"]}


@pytest.mark.parametrize("family", FAMILIES)
def test_missing_tokenizer_file_names_every_file_looked_for(tmp_path, family):
    with pytest.raises(FileNotFoundError) as err:
        load_tokenizer(tmp_path, family)
    message = str(err.value)
    for name in LOOKED_FOR[family]:
        assert str(tmp_path / name) in message
    assert "not found" in message and f"holds {' or '.join(LOOKED_FOR[family])}" in message


@pytest.mark.parametrize("family", FAMILIES)
def test_corrupt_tokenizer_file_is_named(tmp_path, family):
    path = tmp_path / TOKENIZER_FILE[family]
    path.write_bytes(b"\x00\xff\xfe\x89PNG\r\n\x1a garbage \xc3\x28" * 20)
    with pytest.raises(TokenizerFileError) as err:
        load_tokenizer(tmp_path, family)
    assert str(path) in str(err.value)


def test_qwen_file_with_gaps_in_ranks_is_rejected(tiny, tmp_path):
    lines = (tiny["qwen"][0] / "qwen.tiktoken").read_text(encoding="ascii").splitlines()
    (tmp_path / "qwen.tiktoken").write_text("\n".join(lines[:300] + lines[301:]) + "\n", encoding="ascii")
    with pytest.raises(TokenizerFileError, match="qwen.tiktoken: ranks"):
        load_tokenizer(tmp_path, "qwen")


def test_corrupt_tokenizer_config_is_named(tiny, tmp_path):
    shutil.copy(tiny["internlm"][0] / "tokenizer.model", tmp_path / "tokenizer.model")
    (tmp_path / "tokenizer_config.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(TokenizerFileError, match="tokenizer_config.json"):
        load_tokenizer(tmp_path, "internlm")


def test_missing_directory_and_unknown_family(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_tokenizer(tmp_path / "nowhere", "qwen")
    with pytest.raises(ValueError, match="unknown model family"):
        load_tokenizer(tmp_path, "mistral")


def test_remote_code_in_the_directory_is_never_run(tiny, tmp_path):
    directory = tmp_path / "qwen"
    shutil.copytree(tiny["qwen"][0], directory)
    sentinel = tmp_path / "ran"
    (directory / "tokenization_qwen.py").write_text(f"open({str(sentinel)!r}, 'w').close()\n", encoding="utf-8")
    tok = load_tokenizer(directory, "qwen")
    assert tok.decode(tok.encode(TEXTS[0])) == TEXTS[0]
    assert not sentinel.exists()


def test_tokenizer_json_is_preferred_to_the_native_file(tiny, tmp_path):
    """transformers' order: tokenizer.json when the directory holds one, else the family's own file."""
    from npuinfer.tokenizer import HFJsonTokenizer, SentencePieceTokenizer

    shutil.copy(tiny["internlm"][0] / "tokenizer.model", tmp_path / "tokenizer.model")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(tiny["gpt-neox"][0] / name, tmp_path / name)
    both = load_tokenizer(tmp_path, "internlm")
    assert isinstance(both, HFJsonTokenizer)
    assert both.encode(TEXTS[1]) == load_tokenizer(tiny["gpt-neox"][0], "gpt-neox").encode(TEXTS[1])
    (tmp_path / "tokenizer.json").unlink()
    native = load_tokenizer(tmp_path, "internlm")
    assert isinstance(native, SentencePieceTokenizer)
    assert native.encode(TEXTS[1]) == load_tokenizer(tiny["internlm"][0], "internlm").encode(TEXTS[1])
