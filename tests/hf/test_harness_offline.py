"""``moelab lm-eval`` with a hub task and no network: one line naming the task and how to provide
its data offline, not the datasets library's traceback. Runs without the lm-eval package: a
stand-in whose ``simple_evaluate`` fails the way ``datasets`` does offline."""

from __future__ import annotations

import os
import sys
import types
from pathlib import Path

import pytest

from moelab.cli import main


class _DatasetsOffline(Exception):
    """Like datasets' wrapper errors: the download failure is its cause."""


def fake_lm_eval(monkeypatch: pytest.MonkeyPatch, error: BaseException | None = None) -> list[dict]:
    """An ``lm_eval`` module whose evaluation records its arguments, then raises ``error``."""
    calls: list[dict] = []

    def simple_evaluate(**kw):
        calls.append(kw)
        if error is not None:
            raise error

    lm_eval = types.ModuleType("lm_eval")
    lm_eval.simple_evaluate = simple_evaluate
    tasks = types.ModuleType("lm_eval.tasks")
    tasks.TaskManager = lambda **kw: kw
    lm_eval.tasks = tasks
    monkeypatch.setitem(sys.modules, "lm_eval", lm_eval)
    monkeypatch.setitem(sys.modules, "lm_eval.tasks", tasks)
    return calls


def _export(tmp_path: Path) -> Path:
    out = tmp_path / "export"
    out.mkdir()
    (out / "config.json").write_text("{}")  # an export-hf folder: lm-eval's hf model loads it
    return out


def _chained() -> BaseException:
    try:
        raise ConnectionError("Couldn't reach 'Rowan/hellaswag' on the Hub (LocalEntryNotFound)")
    except ConnectionError as err:
        try:
            raise _DatasetsOffline("failed to prepare the split") from err
        except _DatasetsOffline as outer:
            return outer


@pytest.mark.parametrize(
    "error",
    [
        ConnectionError("Couldn't reach 'Rowan/hellaswag' on the Hub (offline mode is enabled)"),
        None,
    ],
    ids=["connection-error", "wrapped"],
)
def test_a_hub_task_without_network_is_one_line(tmp_path, monkeypatch, capsys, error):
    calls = fake_lm_eval(monkeypatch, error or _chained())
    code = main(["lm-eval", str(_export(tmp_path)), "--tasks", "hellaswag"])
    err = capsys.readouterr().err
    assert code == 2 and len(calls) == 1
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("moelab: error: lm-eval: the data of hellaswag could not be downloaded")
    assert "--include-path" in err and "HF_DATASETS_OFFLINE=1" in err


def test_other_lm_eval_failures_are_not_disguised_as_network(tmp_path, monkeypatch):
    fake_lm_eval(monkeypatch, KeyError("acc_norm"))
    with pytest.raises(KeyError):
        main(["lm-eval", str(_export(tmp_path)), "--tasks", "hellaswag"])


def test_only_local_tasks_force_offline_mode(tmp_path, monkeypatch):
    """A hub task keeps the network (it needs it to download); local ones never go online."""
    for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    fake_lm_eval(monkeypatch, ConnectionError("no network"))
    main(["lm-eval", str(_export(tmp_path)), "--tasks", "hellaswag"])
    assert "HF_DATASETS_OFFLINE" not in os.environ
