"""The exported ``modeling_moelab.py`` is generated from moelab's modules: it is current, imports
nothing outside torch, ``transformers`` and the standard library, and carries every router the
export takes."""

from __future__ import annotations

import ast
import os
import subprocess
import sys

import pytest

from moelab.hf import gen_modeling
from moelab.hf.export import exportable_routers


def test_generated_file_is_current() -> None:
    assert gen_modeling.OUTPUT.read_text() == gen_modeling.render(), (
        "src/moelab/hf/modeling_moelab.py is stale: run python -m moelab.hf.gen_modeling"
    )


def test_generated_file_imports_only_torch_transformers_and_the_standard_library() -> None:
    tree = ast.parse(gen_modeling.OUTPUT.read_text())
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            roots.add((node.module or "").split(".")[0])
    assert roots - set(sys.stdlib_module_names) == {"torch", "transformers"}


def test_wrapper_names_replace_moelab_definitions_once() -> None:
    """``float_kernel`` is defined by the wrapper (no C kernels), so moelab's compile helper is not
    copied; every top-level name is defined once."""
    tree = ast.parse(gen_modeling.OUTPUT.read_text())
    names = [n for stmt in tree.body for n in gen_modeling.bound_names(stmt)]
    assert names.count("float_kernel") == 1 and "load_c_kernel" not in names
    defs = [s.name for s in tree.body if isinstance(s, ast.FunctionDef | ast.ClassDef)]
    assert len(defs) == len(set(defs))


def test_every_exportable_router_is_in_the_generated_file() -> None:
    pytest.importorskip("transformers")
    from moelab.hf import modeling_moelab

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
