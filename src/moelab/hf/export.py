"""Export a moelab model or run to a directory ``transformers`` loads (``moelab export-hf``).

The directory holds ``config.json`` (``model_type: moelab``, an ``auto_map`` to the modelling file,
and ``block_ffns``: per block, the FFN kind and the arguments of its moelab layer),
``model.safetensors`` (moelab's own state dict under ``model.``, plus ``lm_head.weight``),
``modeling_moelab.py``, ``generation_config.json``, and the run's ``tokenizer.json`` with a
``tokenizer_config.json``, so that::

    AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)
    AutoTokenizer.from_pretrained(DIR)

work without moelab (or, after :func:`moelab.hf.register_auto_classes`, without remote code).
Writing needs no ``transformers``; only loading does.

``modeling_moelab.py`` is not a second implementation: :mod:`moelab.hf.gen_modeling` generates it
from moelab's own modules (blocks, attention, every FFN layer, every exportable router) and a small
Hugging Face wrapper, so the exported model runs moelab's code. Which routers go through is the
routers' own declaration (:func:`export_refusal`): causal at inference, ``exportable``, and
defined in moelab's router package; any other is refused before anything is written.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, processors

from moelab.data.tokenizer import PAD_TOKEN, TextTokenizer
from moelab.hf.exportable import export_refusal
from moelab.hf.gen_modeling import modeling_source
from moelab.layers import PEER, PKM, DenseFFN, MoE
from moelab.model import ModelConfig, TransformerLM
from moelab.rundir import RunDir, check_not_source, clear_entries, foreign_entries
from moelab.train import CheckpointError, load_run_config, run_tokenizer

MODELING_FILE = "modeling_moelab.py"  # written by gen_modeling at each export
# What an export consists of: all --overwrite removes, and all an OUT_DIR may hold to be replaced.
EXPORT_FILES = (
    "config.json",
    "model.safetensors",
    MODELING_FILE,
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "__pycache__",
)
LAYERS = {"dense": DenseFFN, "moe": MoE, "peer": PEER, "pkm": PKM}  # the FFN kinds it builds
# Arguments the exported layers take whatever moelab trained with: dense gradients, which every
# ``transformers`` optimizer accepts (moelab's row-sparse gradients need its own optimizer).
HF_LAYER_ARGS = {"sparse_grad": False}


def block_ffn_spec(ffn: Any, block: int) -> dict[str, Any]:
    """The exported description of one block's (resolved) FFN config: its kind and the arguments
    its moelab layer is built with (those the config holds, by the layer's signature, and a MoE's
    router options), which the generated modelling file passes to the same layer class."""
    kind = getattr(ffn, "kind", type(ffn).__name__)
    if kind not in LAYERS:
        raise ValueError(
            f"model.ffn.kind: {kind!r} (block {block}) cannot be exported; exported kinds: "
            f"{', '.join(LAYERS)}"
        )
    if kind == "moe":
        line = export_refusal(ffn.router, ffn.router_kwargs())
        if line is not None:
            raise ValueError(f"model.ffn.router (block {block}): {line}")
        if getattr(ffn, "expert_quant", "none") != "none":  # torchao formats stay in moelab
            raise ValueError(
                f"model.ffn.expert_quant: is {ffn.expert_quant!r}; quantized experts are not "
                "exported to transformers (allowed: 'none'); export the run it was quantized from"
            )
    params = inspect.signature(LAYERS[kind]).parameters
    spec: dict[str, Any] = {"kind": kind}
    for name, param in list(params.items())[1:]:  # after d_model
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        if name in HF_LAYER_ARGS:
            spec[name] = HF_LAYER_ARGS[name]
        elif hasattr(ffn, name) and name not in ("kind", "init_std"):
            spec[name] = getattr(ffn, name)
    if kind == "pkm":  # PKM's own value init (None: its default), not the model's
        spec["init_std"] = ffn.init_std
    if kind == "moe":
        spec |= ffn.router_kwargs()
    return spec


def hf_config(cfg: ModelConfig, tokenizer: TextTokenizer | None = None) -> dict[str, Any]:
    """``config.json`` of the exported model."""
    out: dict[str, Any] = {
        "model_type": "moelab",
        "architectures": ["MoelabForCausalLM"],
        "auto_map": {
            "AutoConfig": "modeling_moelab.MoelabConfig",
            "AutoModelForCausalLM": "modeling_moelab.MoelabForCausalLM",
        },
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_seq_len,
        "rope_theta": cfg.rope_base,
        "rms_norm_eps": cfg.norm_eps,
        "qkv_bias": cfg.qkv_bias,
        "qk_norm": cfg.qk_norm,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
        "block_ffns": [block_ffn_spec(cfg.ffn_for(i), i) for i in range(cfg.n_layers)],
        "use_cache": True,
        "moelab_config": cfg.to_dict(),  # the source config, to convert back without guessing
    }
    if tokenizer is not None and tokenizer.eos_id is not None:
        out |= {"eos_token_id": tokenizer.eos_id, "bos_token_id": tokenizer.eos_id}
        pad = pad_id(tokenizer)
        out["pad_token_id"] = tokenizer.eos_id if pad is None else pad
    return out


def pad_id(tokenizer: TextTokenizer) -> int | None:
    """Id of moelab's padding token in ``tokenizer`` (None: it has none)."""
    return Tokenizer.from_file(str(tokenizer.path)).token_to_id(PAD_TOKEN)


def hf_state_dict(
    model: TransformerLM, dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """moelab's state dict under ``model.`` (the head as ``lm_head.weight``, left out when tied:
    ``transformers`` ties it back on load), contiguous, floats cast to ``dtype`` if given."""
    out = {}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight":
            if model.cfg.tie_embeddings:
                continue
            key = name
        else:
            key = f"model.{name}"
        t = t.detach().cpu()
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        out[key] = t.contiguous().clone()
    return out


def export_model(
    model: TransformerLM,
    out_dir: str | Path,
    tokenizer: TextTokenizer | None = None,
    *,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``model`` (and ``tokenizer``, if given) as a ``transformers`` directory."""
    if not isinstance(model, TransformerLM):
        raise ValueError(f"export_model expects a moelab TransformerLM, got {type(model).__name__}")
    config = hf_config(model.cfg, tokenizer)  # checks the FFN kinds before anything is written
    out = Path(out_dir).expanduser()
    clear_entries(out, _check_out_dir(out, overwrite))  # an earlier export's files, nothing else
    out.mkdir(parents=True, exist_ok=True)
    first = next(iter(model.state_dict().values()))
    config["torch_dtype"] = str(dtype or first.dtype).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(hf_state_dict(model, dtype), str(out / "model.safetensors"), {"format": "pt"})
    (out / MODELING_FILE).write_text(modeling_source())
    generation = {"_from_model_config": True}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if key in config:
            generation[key] = config[key]
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    if tokenizer is not None:
        write_tokenizer(tokenizer, out, model.cfg.max_seq_len)
    return out


def write_tokenizer(tokenizer: TextTokenizer, out: Path, max_len: int) -> None:
    """``tokenizer.json`` and a ``tokenizer_config.json`` that ``AutoTokenizer`` reads as a fast
    tokenizer, with the end-of-text token as BOS/EOS. moelab's documents start after an
    end-of-text token in training, so the exported tokenizer prepends one when asked for special
    tokens (``transformers``' default, as Llama's adds its BOS): ``tok(text)`` is what the model
    saw; moelab's own tokenizer never adds it (same token ids otherwise)."""
    tok = Tokenizer.from_file(str(tokenizer.path))
    if tokenizer.eos_token is not None:
        eos = tokenizer.eos_token
        prefix = processors.TemplateProcessing(
            single=f"{eos} $A", pair=f"{eos} $A {eos} $B", special_tokens=[(eos, tokenizer.eos_id)]
        )
        old = tok.post_processor
        tok.post_processor = prefix if old is None else processors.Sequence([old, prefix])
    tok.save(str(out / "tokenizer.json"))
    cfg: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": max_len,
        "clean_up_tokenization_spaces": False,
    }
    if tokenizer.eos_token is not None:
        cfg |= {"eos_token": tokenizer.eos_token, "bos_token": tokenizer.eos_token}
        cfg["pad_token"] = PAD_TOKEN if pad_id(tokenizer) is not None else tokenizer.eos_token
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")


def export_run(
    run_dir: str | Path,
    out_dir: str | Path,
    *,
    checkpoint: str | int | None = None,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
) -> Path:
    """Export a run's checkpoint (default: the latest) and tokenizer; see :func:`export_model`."""
    run = RunDir(run_dir)
    check_not_source(out_dir, run_dir, field="OUT_DIR", source_field="RUN_DIR")
    config = load_run_config(run_dir)  # ConfigError naming run_dir when it is not a run
    _check_out_dir(Path(out_dir).expanduser(), overwrite)  # before any work
    for i in range(config.model.n_layers):  # unsupported kinds fail before the weights load
        block_ffn_spec(config.model.ffn_for(i), i)
    try:
        model = run.load_model(config.model, checkpoint)
    except CheckpointError as err:
        raise ValueError(
            f"RUN_DIR: {run.path} has no weights to export ({err}); train it first "
            "(moelab train --run-dir RUN_DIR) or name an existing --checkpoint"
        ) from None
    return export_model(model, out_dir, run_tokenizer(run_dir), dtype=dtype, overwrite=overwrite)


def _check_out_dir(out: Path, overwrite: bool) -> list[str]:
    """Where an export may go (new, empty, or an earlier export with ``overwrite``; never a
    dataset or a directory holding other files); returns the earlier export's entries."""
    what = "a transformers export"
    return foreign_entries(out, EXPORT_FILES, what=what, overwrite=overwrite, field="OUT_DIR")
