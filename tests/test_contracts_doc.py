"""docs/CONTRACTS.md states the signatures other modules rely on; this keeps it true.

Every line of its ``signatures`` block is ``dotted.name(parameters)`` as :func:`plain_signature`
writes it (names and defaults, no annotations). A change to one of these signatures must update the
document in the same commit: the failure prints the line to paste.
"""

from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parent.parent / "docs" / "CONTRACTS.md"


def plain_signature(obj: object) -> str:
    """``(a, b, *, c=1, **kw)``: parameter names, kinds and defaults (``self`` left out)."""
    parts: list[str] = []
    star = False
    for p in inspect.signature(obj).parameters.values():
        if p.name == "self":
            continue
        if p.kind is p.VAR_POSITIONAL:
            star = True
            parts.append(f"*{p.name}")
            continue
        if p.kind is p.VAR_KEYWORD:
            parts.append(f"**{p.name}")
            continue
        if p.kind is p.KEYWORD_ONLY and not star:
            star = True
            parts.append("*")
        parts.append(p.name if p.default is p.empty else f"{p.name}={p.default!r}")
    return f"({', '.join(parts)})"


def resolve(dotted: str) -> object:
    """Walk ``dotted`` by attribute from its top package, importing submodules on the way (a
    package attribute wins over a submodule of the same name: ``moelab.model.accounting``)."""
    parts = dotted.split(".")
    obj = importlib.import_module(parts[0])
    for i, name in enumerate(parts[1:], start=2):
        try:
            obj = getattr(obj, name)
        except AttributeError:
            obj = importlib.import_module(".".join(parts[:i]))
    return obj


def documented() -> list[tuple[str, str]]:
    block = re.search(r"```signatures\n(.*?)```", DOC.read_text(), re.S)
    assert block, "docs/CONTRACTS.md has no ```signatures block"
    lines = [line.strip() for line in block.group(1).splitlines() if line.strip()]
    return [(line.split("(", 1)[0], line) for line in lines]


@pytest.mark.parametrize("name, line", documented(), ids=[n for n, _ in documented()])
def test_documented_signature_matches_the_code(name: str, line: str) -> None:
    actual = name + plain_signature(resolve(name))
    assert line == actual, f"docs/CONTRACTS.md is out of date; the code says:\n{actual}"
