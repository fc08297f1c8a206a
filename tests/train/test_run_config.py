"""Run configs and presets; bad input stops before training with one message naming the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from moelab.cli import main
from moelab.model import accounting
from moelab.train import DEFAULT_PRESET, RunConfig, Trainer, list_presets, resolve_run_config
from run_fixtures import tiny_config


def test_presets_load_and_match_active_flops() -> None:
    names = list_presets()
    assert {"dense-tiny", "topk-tiny", "remoe-tiny", "peer-tiny"} <= set(names)
    assert DEFAULT_PRESET == "remoe-tiny"
    flops = {}
    for name in ("dense-tiny", "topk-tiny", "remoe-tiny", "peer-tiny"):
        cfg = resolve_run_config(preset=name)
        flops[name] = accounting(cfg.model)["flops_per_token"]
    base = flops["dense-tiny"]
    for name, value in flops.items():
        assert abs(value / base - 1) < 0.02, (name, value, base)
    remoe = resolve_run_config(preset="remoe-tiny").model.ffn
    assert (remoe.router, remoe.num_experts, remoe.top_k) == ("relu", 8, 1)  # E=8, k=1 (paper)


def test_overrides_are_typed() -> None:
    cfg = resolve_run_config(
        preset="topk-tiny", overrides=["model.ffn.top_k=2", "train.steps=7", "optim.lr=1e-3"]
    )
    assert cfg.model.ffn.top_k == 2 and cfg.train.steps == 7 and cfg.optim.lr == 1e-3
    assert cfg.method == "topk"
    assert RunConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"preset": "remoe-huge"}, "unknown preset 'remoe-huge'; allowed: dense-tiny"),
        ({"overrides": ["train.steps=-5"]}, "train.steps: must be a positive integer, got -5"),
        ({"overrides": ["model.ffn.top_k=9"]}, "model.ffn.top_k: must be <= num_experts (8)"),
        ({"overrides": ["train.step=5"]}, "train: unknown key 'step' (did you mean 'steps'?)"),
        ({"overrides": ["train.steps=ten"]}, "train.steps: expected int"),
        ({"overrides": ["optim.lr=0"]}, "optim.lr: must be > 0"),
        ({"overrides": ["data.micro_batch_size=5"]}, "data.micro_batch_size: must divide"),
        ({"overrides": ["data.seq_len=4096"]}, "data.seq_len: must be <= model.max_seq_len"),
        ({"overrides": ["train.device=tpu"]}, "train.device: must be one of"),
        ({"config_file": "/nonexistent/run.yaml"}, "config: file '/nonexistent/run.yaml'"),
    ],
)
def test_bad_config_names_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError) as err:
        resolve_run_config(**kwargs)
    assert field in str(err.value)


def test_bad_data_stops_before_any_work(tmp_path: Path, data_dir: Path) -> None:
    run_dir = tmp_path / "run"
    missing = tiny_config(data_dir, data={"path": str(tmp_path / "nope")})
    with pytest.raises(ValueError, match=r"data\.path: .*nope' does not exist"):
        Trainer(missing, run_dir)
    small_vocab = tiny_config(data_dir, model={"vocab_size": 1000})
    with pytest.raises(ValueError, match=r"model\.vocab_size: 1000 is smaller than .* 8192"):
        Trainer(small_vocab, run_dir)
    assert not run_dir.exists()  # nothing was created


def test_existing_run_dir_needs_resume_or_overwrite(tmp_path: Path, data_dir: Path) -> None:
    cfg = tiny_config(data_dir, train={"steps": 1})
    Trainer(cfg, tmp_path / "run")
    with pytest.raises(ValueError, match="already holds a run; continue it with --resume"):
        Trainer(cfg, tmp_path / "run")
    Trainer(cfg, tmp_path / "run", overwrite=True)
    with pytest.raises(ValueError, match="holds no run"):
        Trainer(cfg, tmp_path / "other", resume=True)


def test_cli_reports_errors_in_one_line(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    rc = main(["train", "--preset", "nope", "--run-dir", str(tmp_path / "r")])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("moelab: error: preset: unknown preset 'nope'") and "\n" not in err
    rc = main(["train", "model.ffn.top_k=9", "--run-dir", str(tmp_path / "r")])
    assert rc == 2
    assert "model.ffn.top_k: must be <= num_experts (8), got 9" in capsys.readouterr().err
    rc = main(["train", "--set", "model.ffn.kind=mo", "--run-dir", str(tmp_path / "r")])
    assert "model.ffn.kind: must be one of 'dense', 'moe', 'peer', 'pkm'" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_logging_backend_missing_is_clear(tmp_path: Path, data_dir: Path) -> None:
    try:
        import tensorboard  # noqa: F401

        pytest.skip("tensorboard is installed")
    except ImportError:
        pass
    cfg = tiny_config(data_dir, logging={"tensorboard": True})
    with pytest.raises(ValueError, match=r"logging\.tensorboard: needs the 'tensorboard' package"):
        Trainer(cfg, tmp_path / "run")


def test_overwrite_keeps_the_old_run_when_the_new_config_is_bad(
    tmp_path: Path, data_dir: Path
) -> None:
    run = tmp_path / "run"
    Trainer(tiny_config(data_dir, train={"steps": 1}), run)
    bad = tiny_config(data_dir, data={"path": str(tmp_path / "missing")})
    with pytest.raises(ValueError, match="data.path"):
        Trainer(bad, run, overwrite=True)
    assert (run / "config.yaml").is_file()


def test_lambda_bounds_reach_the_controller(data_dir: Path) -> None:
    """``train.lambda_min`` / ``train.lambda_max`` (defaults: the controller's) bound ReMoE's λ."""
    from moelab.layers.sparsity_controller import LAMBDA_MAX, LAMBDA_MIN
    from moelab.model import TransformerLM
    from moelab.train.setup import build_controller
    from run_fixtures import REMOE

    default = tiny_config(data_dir, ffn=REMOE)
    assert (default.train.lambda_min, default.train.lambda_max) == (LAMBDA_MIN, LAMBDA_MAX)
    cfg = tiny_config(data_dir, ffn=REMOE, train={"lambda_min": 1e-12, "lambda_max": 1e-2})
    controller = build_controller(TransformerLM(cfg.model), cfg)
    assert (controller.lambda_min, controller.lambda_max) == (1e-12, 1e-2)
    with pytest.raises(ValueError, match=r"train\.lambda0: must lie in \[lambda_min, lambda_max\]"):
        resolve_run_config(overrides=["train.lambda_min=1e-6"])  # above lambda0 = 1e-8
    with pytest.raises(ValueError, match=r"train\.lambda_max: must be finite and > 0"):
        resolve_run_config(overrides=["train.lambda_max=0"])
