"""Family records: every named model's family has one, config.json is matched to it, and no module outside
npuinfer/families/ branches on a family's name."""
from __future__ import annotations

import ast

import pytest

from npuinfer.checkpoint import CheckpointError
from npuinfer.families import FAMILIES, family_of_config, get_family, read_model_args
from npuinfer.registry import MODELS
from test_imports import modules

NAMES = {name for family in FAMILIES.values() for name in (family.name, *family.model_types)}


def test_every_named_model_has_a_family_record_and_its_tiny_config_reads_back():
    assert {spec.family for spec in MODELS.values()} == set(FAMILIES)
    for spec in MODELS.values():
        family = get_family(spec.family)
        config = family.tiny.config(spec, {"hidden_size": spec.hidden_size, "num_hidden_layers": spec.num_layers,
                                           "num_attention_heads": spec.num_heads,
                                           "intermediate_size": spec.intermediate_size,
                                           "vocab_size": spec.vocab_size}, {})
        assert family_of_config(config) is family
        args = read_model_args(config, family, position=spec.position)
        assert (args.family, args.dim, args.n_layers, args.n_heads, args.position) == (
            spec.family, spec.hidden_size, spec.num_layers, spec.num_heads, spec.position)
        assert (args.n_kv_heads, args.head_dim) == (spec.kv_heads, spec.head_dim), spec.name


def test_family_from_architectures_when_model_type_is_absent_and_unknown_types_listed():
    assert family_of_config({"architectures": ["LlamaForCausalLM"]}).name == "llama"
    assert family_of_config({"model_type": "llama"}).name == "llama"
    assert family_of_config({"architectures": ["InternLMForCausalLM"]}).name == "internlm"
    assert family_of_config({"model_type": "qwen2"}).name == "qwen2"
    assert family_of_config({"architectures": ["Qwen3ForCausalLM"]}).name == "qwen3"
    with pytest.raises(CheckpointError) as err:
        family_of_config({"model_type": "mistral", "architectures": ["LlamaForCausalLM"]}, "/m/config.json")
    message = str(err.value)
    assert "/m/config.json" in message and "'mistral'" in message
    for family in FAMILIES.values():
        assert all(t in message for t in family.model_types + family.architectures)
    assert get_family("GPT_NeoX") is FAMILIES["gpt-neox"]
    with pytest.raises(ValueError, match="unknown model family 'mistral'"):
        get_family("mistral")


def _family_literals(tree: ast.AST) -> list[int]:
    """Lines where a family name is compared with, or used as a table key."""
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            for op in operands:
                elts = op.elts if isinstance(op, (ast.Tuple, ast.List, ast.Set)) else [op]
                if any(isinstance(e, ast.Constant) and e.value in NAMES for e in elts):
                    lines.append(node.lineno)
        elif isinstance(node, ast.Dict):
            if any(isinstance(k, ast.Constant) and k.value in NAMES for k in node.keys):
                lines.append(node.lineno)
    return lines


def test_no_module_outside_families_branches_on_a_family_name():
    found = {name: _family_literals(ast.parse(path.read_text(encoding="utf-8")))
             for name, path in modules().items() if not name.startswith("npuinfer.families")}
    assert not {name: lines for name, lines in found.items() if lines}
    bad = ast.parse('if family == "qwen":\n    pass\nTABLE = {"gpt-neox": 1}\nx = f in ("internlm", "b")\n')
    assert _family_literals(bad) == [1, 3, 4]  # the check itself sees each kind of branch
