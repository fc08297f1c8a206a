"""Native helpers (memory check, C kernels) and the import boundary of the leaf modules."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import moelab
from moelab import native


def test_memory_check_reports_estimate(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(native, "available_memory_bytes", lambda: 1024**3)
    with pytest.raises(MemoryError, match=r"about 3\.0 GiB .*only 1\.0 GiB"):
        native.check_fits_in_memory("X", param_bytes=1024**3, state_bytes=2 * 1024**3)
    native.check_fits_in_memory("X", param_bytes=1, state_bytes=1)


def test_c_kernels_can_be_disabled(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOELAB_NO_C_KERNELS", "1")
    assert native.load_c_kernel("anything", "int f(void){return 0;}") is None


def test_leaf_modules_do_not_import_train() -> None:
    """``moelab.native`` imports no other moelab module; the retrieval and sparse-row modules
    import neither ``moelab.train`` nor anything outside ``moelab.layers`` and ``moelab.native``."""
    code = (
        "import json, sys\n"
        "def loaded(): return sorted(m for m in sys.modules if m.split('.')[0] == 'moelab')\n"
        "import moelab.native\n"
        "after_native = loaded()\n"
        "import moelab.layers.product_keys, moelab.layers.sparse_rows\n"
        "print(json.dumps([after_native, loaded()]))\n"
    )
    src = str(Path(moelab.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    )
    after_native, after_layers = json.loads(out.stdout.strip().splitlines()[-1])
    assert after_native == ["moelab", "moelab.native"]
    assert "moelab.layers.product_keys" in after_layers
    assert "moelab.layers.sparse_rows" in after_layers
    assert not [m for m in after_layers if m.startswith("moelab.train")]
    allowed = ("moelab", "moelab.layers", "moelab.native")
    outside = [m for m in after_layers if ".".join(m.split(".")[:2]) not in allowed]
    assert outside == [], outside


def _fingerprint_with(env: dict[str, str]) -> dict:
    code = (
        "import json; from moelab import native; print(json.dumps(native.numerics_fingerprint()))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout)


def test_numerics_fingerprint_sees_each_switch_that_changes_the_kernels() -> None:
    """The golden-curve test compares bit for bit only between equal fingerprints: each switch
    that changes which kernels run must show in it (measured: each moves the tiny curves)."""
    plain = _fingerprint_with({})
    assert plain["torch"] and plain["cpu"] and isinstance(plain["isa"], list)
    assert _fingerprint_with({"MOELAB_NO_C_KERNELS": "1"})["c_kernels"] is None
    assert _fingerprint_with({"MOELAB_NO_MKL_BATCH": "1"})["mkl_gemm_batch"] is False
    scalar = _fingerprint_with({"ATEN_CPU_CAPABILITY": "default"})
    assert scalar["aten_capability"] == "DEFAULT"
    if plain["aten_capability"] != "DEFAULT":
        assert scalar != plain


def test_the_fingerprint_knows_when_c_kernels_cannot_be_built(tmp_path: Path) -> None:
    """An unwritable kernel cache silently selects the eager fallbacks (other numerics): the
    fingerprint must then differ from a machine that builds the kernels."""
    if native._compiler() is None:
        pytest.skip("no C compiler on this machine")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert _fingerprint_with({"MOELAB_CACHE": str(blocker)})["c_kernels"] is None
    assert _fingerprint_with({"MOELAB_CACHE": str(tmp_path / "cache")})["c_kernels"] is not None
