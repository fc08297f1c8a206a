"""The exported ``modeling_moelab.py`` is generated from moelab's modules at export time: it
imports nothing outside torch, ``transformers`` and the standard library, carries every router the
export takes, and is what an export writes."""

from __future__ import annotations

import ast
import os
import subprocess
import sys

import pytest
import torch

from moelab.hf import gen_modeling
from moelab.hf.exportable import exportable_routers


def test_an_export_writes_the_generated_file(tmp_path) -> None:
    pytest.importorskip("transformers")
    from moelab.hf import export_model
    from moelab.model import ModelConfig, TransformerLM

    cfg = ModelConfig(vocab_size=32, d_model=16, n_layers=1, n_heads=2, max_seq_len=8)
    export_model(TransformerLM(cfg), tmp_path / "out")
    written = (tmp_path / "out" / gen_modeling.FILE_NAME).read_text()
    assert written == gen_modeling.render()


def test_generated_file_imports_only_torch_transformers_and_the_standard_library() -> None:
    tree = ast.parse(gen_modeling.modeling_source())
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            roots.add((node.module or "").split(".")[0])
    assert roots - set(sys.stdlib_module_names) == {"torch", "transformers"}


def test_wrapper_names_replace_moelab_definitions_once() -> None:
    """``float_kernel`` and ``load_c_kernel`` are defined by the wrapper (no C kernels), so
    moelab's compile helper is not copied; every top-level name is defined once."""
    tree = ast.parse(gen_modeling.modeling_source())
    names = [n for stmt in tree.body for n in gen_modeling.bound_names(stmt)]
    assert names.count("float_kernel") == 1 and names.count("load_c_kernel") == 1
    assert "_compiler" not in names  # moelab's compile helper stays out of the exported file
    defs = [s.name for s in tree.body if isinstance(s, ast.FunctionDef | ast.ClassDef)]
    assert len(defs) == len(set(defs))


def test_every_exportable_router_is_in_the_generated_file() -> None:
    pytest.importorskip("transformers")
    modeling_moelab = gen_modeling.load_module()
    assert modeling_moelab.__name__ == gen_modeling.MODULE_NAME
    assert set(exportable_routers()) <= set(modeling_moelab.ROUTERS)
    assert {"topk", "hash", "rmoe", "aux_free"} <= set(exportable_routers())


@pytest.mark.slow  # two fresh interpreters: ~10 s
def test_generation_does_not_depend_on_the_hash_seed() -> None:
    """Set and dict orders vary with PYTHONHASHSEED; the generated text must not."""
    code = "from moelab.hf import gen_modeling; print(gen_modeling.render(), end='')"
    texts = {
        subprocess.run(
            [sys.executable, "-c", code],
            env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for seed in ("1", "2")
    }
    assert len(texts) == 1


def test_generated_expert_banks_are_moelabs_and_refuse_quantized_ones() -> None:
    """The exported file copies moelab's ``build_expert_bank`` (one definition); only the quant
    check is the wrapper's, which refuses a quantized bank (its formats need torchao)."""
    pytest.importorskip("transformers")
    from moelab.layers.expert_banks import build_expert_bank

    modeling_moelab = gen_modeling.load_module()
    args = (4, 8, 16, "swiglu", 0.02, "loop")
    with pytest.raises(
        ValueError, match=r"expert_quant: a quantized run \('int8'\) is not exported"
    ):
        modeling_moelab.build_expert_bank(*args, expert_quant="int8")
    for kwargs in ({}, {"expert_slots": 2}, {"compressed_experts": 1, "compressed_width": 4}):
        torch.manual_seed(0)
        ours = build_expert_bank(*args, **kwargs)
        torch.manual_seed(0)
        theirs = modeling_moelab.build_expert_bank(*args, **kwargs)
        assert type(theirs).__name__ == type(ours).__name__
        assert {k: v.shape for k, v in theirs.state_dict().items()} == {
            k: v.shape for k, v in ours.state_dict().items()
        }
    with pytest.raises(ValueError, match="compressed_experts: cannot be combined"):
        modeling_moelab.build_expert_bank(*args, compressed_experts=1, expert_slots=2)
